//! The documents of an image: manifest, index (manifest list) and config, with the checks that
//! decide whether banger can use them. The registry protocol (requests, auth, digests of
//! manifests) is oci-client's; this is only the reading of what it returns.

use serde::{Deserialize, Serialize};

use oci_client::manifest::{
    IMAGE_CONFIG_MEDIA_TYPE, IMAGE_DOCKER_CONFIG_MEDIA_TYPE, IMAGE_DOCKER_LAYER_GZIP_MEDIA_TYPE,
    IMAGE_LAYER_GZIP_MEDIA_TYPE, IMAGE_LAYER_MEDIA_TYPE,
    IMAGE_LAYER_NONDISTRIBUTABLE_GZIP_MEDIA_TYPE, IMAGE_LAYER_NONDISTRIBUTABLE_MEDIA_TYPE,
    IMAGE_MANIFEST_LIST_MEDIA_TYPE, IMAGE_MANIFEST_MEDIA_TYPE, OCI_IMAGE_INDEX_MEDIA_TYPE,
    OCI_IMAGE_MEDIA_TYPE,
};

use crate::reference::is_sha256_hex;

/// Largest manifest or index banger reads (they are held in memory and parsed).
pub const MAX_MANIFEST_BYTES: u64 = 4 << 20;
/// Largest image config banger reads.
pub const MAX_CONFIG_BYTES: u64 = 4 << 20;

pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
pub const OCI_LAYER_NONDISTRIBUTABLE_ZSTD: &str =
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd";
pub const DOCKER_FOREIGN_LAYER: &str = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip";
pub const DOCKER_SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1+json";
pub const DOCKER_SCHEMA1_SIGNED: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";

/// What we ask registries for: the two current manifest kinds and their indexes. Schema 1 is
/// left out on purpose (a registry then converts or refuses); one that sends it anyway gets a
/// clear error from [`parse_document`].
pub const ACCEPTED_MANIFESTS: &[&str] = &[
    OCI_IMAGE_MEDIA_TYPE,
    IMAGE_MANIFEST_MEDIA_TYPE,
    OCI_IMAGE_INDEX_MEDIA_TYPE,
    IMAGE_MANIFEST_LIST_MEDIA_TYPE,
];

/// Layer media types banger can unpack.
pub const LAYER_MEDIA_TYPES: &[&str] = &[
    IMAGE_LAYER_MEDIA_TYPE,
    IMAGE_LAYER_GZIP_MEDIA_TYPE,
    OCI_LAYER_ZSTD,
    IMAGE_DOCKER_LAYER_GZIP_MEDIA_TYPE,
];

/// Layers that live outside the registry (Windows base layers, mostly) and may not be
/// redistributed: banger refuses them rather than fetching from arbitrary URLs.
const FOREIGN_LAYER_MEDIA_TYPES: &[&str] = &[
    DOCKER_FOREIGN_LAYER,
    IMAGE_LAYER_NONDISTRIBUTABLE_MEDIA_TYPE,
    IMAGE_LAYER_NONDISTRIBUTABLE_GZIP_MEDIA_TYPE,
    OCI_LAYER_NONDISTRIBUTABLE_ZSTD,
];

const CONFIG_MEDIA_TYPES: &[&str] = &[IMAGE_CONFIG_MEDIA_TYPE, IMAGE_DOCKER_CONFIG_MEDIA_TYPE];

/// A content descriptor, as found in manifests and indexes.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    pub digest: String,
    pub size: i64,
    #[serde(default)]
    pub platform: Option<Platform>,
}

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Platform {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub variant: Option<String>,
}

impl Platform {
    fn label(&self) -> String {
        match &self.variant {
            Some(v) if !v.is_empty() => format!("{}/{}/{v}", self.os, self.architecture),
            _ => format!("{}/{}", self.os, self.architecture),
        }
    }
}

/// The fields of any manifest-like document we look at.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Document {
    schema_version: Option<i64>,
    media_type: Option<String>,
    config: Option<Descriptor>,
    layers: Option<Vec<Descriptor>>,
    manifests: Option<Vec<Descriptor>>,
    /// Only schema 1 manifests have it.
    fs_layers: Option<serde_json::Value>,
}

/// A parsed manifest or index.
#[derive(Debug)]
pub(crate) enum Parsed {
    Index(Vec<Descriptor>),
    Manifest {
        config: Descriptor,
        layers: Vec<Descriptor>,
    },
}

/// Reads a manifest or index; the error is a message for "pulling <ref>: …".
pub(crate) fn parse_document(body: &[u8]) -> Result<Parsed, String> {
    let doc: Document =
        serde_json::from_slice(body).map_err(|e| format!("the manifest is not valid JSON: {e}"))?;
    let media_type = doc.media_type.as_deref().unwrap_or("");
    if doc.schema_version == Some(1)
        || doc.fs_layers.is_some()
        || media_type == DOCKER_SCHEMA1
        || media_type == DOCKER_SCHEMA1_SIGNED
    {
        return Err(
            "the image uses the Docker schema 1 manifest format, which is not supported \
             (deprecated since 2017; push the image again with a current Docker or buildah)"
                .into(),
        );
    }
    if doc.schema_version != Some(2) {
        return Err(format!(
            "unsupported manifest schemaVersion {}",
            doc.schema_version
                .map_or_else(|| "(missing)".to_string(), |v| v.to_string())
        ));
    }
    let is_index = match media_type {
        OCI_IMAGE_INDEX_MEDIA_TYPE | IMAGE_MANIFEST_LIST_MEDIA_TYPE => true,
        OCI_IMAGE_MEDIA_TYPE | IMAGE_MANIFEST_MEDIA_TYPE => false,
        // OCI makes mediaType optional; the fields tell the kinds apart.
        "" => doc.manifests.is_some(),
        other => {
            return Err(format!(
                "unsupported manifest media type {other:?} (not a container image manifest or index)"
            ));
        }
    };
    if is_index {
        let manifests = doc.manifests.ok_or("the index has no \"manifests\" list")?;
        return Ok(Parsed::Index(manifests));
    }
    let config = doc.config.ok_or("the manifest has no \"config\"")?;
    let layers = doc.layers.ok_or("the manifest has no \"layers\"")?;
    Ok(Parsed::Manifest { config, layers })
}

/// Picks the linux/amd64 entry of an index. The amd64 variant is ignored (`v1` is what most
/// indexes say if anything); an entry without a variant or with `v1` wins over other variants.
/// Errors with the list of the platforms the index does have.
pub(crate) fn select_platform(entries: &[Descriptor]) -> Result<&Descriptor, String> {
    let amd64: Vec<&Descriptor> = entries
        .iter()
        .filter(|e| {
            e.platform
                .as_ref()
                .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
        })
        .collect();
    let plain = amd64.iter().find(|e| {
        e.platform
            .as_ref()
            .and_then(|p| p.variant.as_deref())
            .is_none_or(|v| v.is_empty() || v == "v1")
    });
    if let Some(e) = plain.or(amd64.first()) {
        return Ok(e);
    }
    let mut available: Vec<String> = entries
        .iter()
        .filter_map(|e| e.platform.as_ref())
        // Buildkit's attestation manifests say unknown/unknown: not an image anyone can pick.
        .filter(|p| p.os != "unknown")
        .map(Platform::label)
        .collect();
    available.dedup();
    Err(if available.is_empty() {
        "none".to_string()
    } else {
        available.join(", ")
    })
}

/// Checks a manifest's config and layer descriptors: media types banger can use, sha256 digests,
/// sane sizes, no foreign layers.
pub(crate) fn check_manifest(config: &Descriptor, layers: &[Descriptor]) -> Result<(), String> {
    if !CONFIG_MEDIA_TYPES.contains(&config.media_type.as_str()) {
        return Err(format!(
            "not a container image: its config has media type {:?}",
            config.media_type
        ));
    }
    check_descriptor(config)?;
    let foreign: Vec<&str> = layers
        .iter()
        .filter(|l| FOREIGN_LAYER_MEDIA_TYPES.contains(&l.media_type.as_str()))
        .map(|l| l.digest.as_str())
        .collect();
    if !foreign.is_empty() {
        return Err(format!(
            "the image has foreign (non-distributable) layers, which banger does not fetch: {}",
            foreign.join(", ")
        ));
    }
    for layer in layers {
        if !LAYER_MEDIA_TYPES.contains(&layer.media_type.as_str()) {
            return Err(format!(
                "layer {} has unsupported media type {:?} (supported: {})",
                layer.digest,
                layer.media_type,
                LAYER_MEDIA_TYPES.join(", ")
            ));
        }
        check_descriptor(layer)?;
    }
    Ok(())
}

pub(crate) fn check_descriptor(d: &Descriptor) -> Result<(), String> {
    let ok = d.digest.strip_prefix("sha256:").is_some_and(is_sha256_hex);
    if !ok {
        return Err(format!(
            "descriptor digest {:?} is not sha256:<64 lowercase hex> (only sha256 is supported)",
            d.digest
        ));
    }
    if d.size < 0 {
        return Err(format!("descriptor {} has a negative size", d.digest));
    }
    Ok(())
}

/// What a VM needs from the image config (`config` object of the OCI image config, plus the
/// platform).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    /// `KEY=value` entries.
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
    pub architecture: String,
    pub os: String,
}

#[derive(Deserialize)]
struct RawConfig {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
    #[serde(default)]
    config: Option<RawRuntime>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawRuntime {
    #[serde(rename = "Env")]
    env: Option<Vec<String>>,
    #[serde(rename = "WorkingDir")]
    working_dir: Option<String>,
    #[serde(rename = "User")]
    user: Option<String>,
    #[serde(rename = "Entrypoint")]
    entrypoint: Option<Vec<String>>,
    #[serde(rename = "Cmd")]
    cmd: Option<Vec<String>>,
}

impl ImageConfig {
    /// Parses an OCI / Docker image config. Empty strings become `None` (Docker writes `""`
    /// for "not set").
    pub fn parse(bytes: &[u8]) -> Result<ImageConfig, String> {
        let raw: RawConfig =
            serde_json::from_slice(bytes).map_err(|e| format!("not a valid image config: {e}"))?;
        let rt = raw.config.unwrap_or_default();
        let non_empty = |s: Option<String>| s.filter(|s| !s.is_empty());
        Ok(ImageConfig {
            env: rt.env.unwrap_or_default(),
            working_dir: non_empty(rt.working_dir),
            user: non_empty(rt.user),
            entrypoint: rt.entrypoint,
            cmd: rt.cmd,
            architecture: raw.architecture,
            os: raw.os,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

    fn entry(digest: &str, os: &str, arch: &str, variant: Option<&str>) -> Descriptor {
        Descriptor {
            media_type: OCI_IMAGE_MEDIA_TYPE.into(),
            digest: digest.into(),
            size: 10,
            platform: Some(Platform {
                architecture: arch.into(),
                os: os.into(),
                variant: variant.map(Into::into),
            }),
        }
    }

    #[test]
    fn schema1_is_rejected_clearly() {
        let body = br#"{"schemaVersion":1,"name":"x","tag":"1","architecture":"amd64","fsLayers":[{"blobSum":"sha256:a"}],"history":[]}"#;
        let e = parse_document(body).unwrap_err();
        assert!(e.contains("schema 1"), "{e}");
        let body = br#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v1+prettyjws"}"#;
        assert!(parse_document(body).unwrap_err().contains("schema 1"));
    }

    #[test]
    fn documents_are_told_apart() {
        let idx = format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"{OCI_IMAGE_MEDIA_TYPE}","digest":"{D1}","size":5,"platform":{{"os":"linux","architecture":"amd64"}}}}]}}"#
        );
        assert!(
            matches!(parse_document(idx.as_bytes()).unwrap(), Parsed::Index(m) if m.len() == 1)
        );
        let man = format!(
            r#"{{"schemaVersion":2,"mediaType":"{IMAGE_MANIFEST_MEDIA_TYPE}","config":{{"mediaType":"{IMAGE_DOCKER_CONFIG_MEDIA_TYPE}","digest":"{D1}","size":5}},"layers":[]}}"#
        );
        assert!(matches!(
            parse_document(man.as_bytes()).unwrap(),
            Parsed::Manifest { .. }
        ));
        let art = r#"{"schemaVersion":2,"mediaType":"application/vnd.cncf.helm.chart"}"#;
        assert!(
            parse_document(art.as_bytes())
                .unwrap_err()
                .contains("media type")
        );
        assert!(parse_document(b"[]").unwrap_err().contains("JSON"));
        assert!(
            parse_document(br#"{"schemaVersion":3}"#)
                .unwrap_err()
                .contains("schemaVersion 3")
        );
    }

    #[test]
    fn platform_selection() {
        let entries = vec![
            entry(D2, "linux", "arm64", Some("v8")),
            entry(D1, "linux", "amd64", None),
        ];
        assert_eq!(select_platform(&entries).unwrap().digest, D1);
        let entries = vec![
            entry(D2, "linux", "amd64", Some("v3")),
            entry(D1, "linux", "amd64", Some("v1")),
        ];
        assert_eq!(
            select_platform(&entries).unwrap().digest,
            D1,
            "v1 preferred"
        );
        let entries = vec![entry(D2, "linux", "amd64", Some("v3"))];
        assert_eq!(
            select_platform(&entries).unwrap().digest,
            D2,
            "variant ignored"
        );
        let entries = vec![
            entry(D1, "linux", "arm64", Some("v8")),
            entry(D2, "windows", "amd64", None),
            entry(D2, "unknown", "unknown", None),
        ];
        assert_eq!(
            select_platform(&entries).unwrap_err(),
            "linux/arm64/v8, windows/amd64"
        );
    }

    #[test]
    fn layer_checks() {
        let cfg = Descriptor {
            media_type: IMAGE_CONFIG_MEDIA_TYPE.into(),
            digest: D1.into(),
            size: 2,
            platform: None,
        };
        let layer = |mt: &str, digest: &str| Descriptor {
            media_type: mt.into(),
            digest: digest.into(),
            size: 3,
            platform: None,
        };
        for mt in LAYER_MEDIA_TYPES {
            check_manifest(&cfg, &[layer(mt, D2)]).unwrap();
        }
        let e = check_manifest(&cfg, &[layer(DOCKER_FOREIGN_LAYER, D2)]).unwrap_err();
        assert!(e.contains("foreign") && e.contains(D2), "{e}");
        let e = check_manifest(&cfg, &[layer("application/x-foo", D2)]).unwrap_err();
        assert!(e.contains("application/x-foo"), "{e}");
        let e = check_manifest(&cfg, &[layer(IMAGE_LAYER_MEDIA_TYPE, "sha512:ab")]).unwrap_err();
        assert!(e.contains("sha512:ab"), "{e}");
        let wasm = Descriptor {
            media_type: "application/vnd.wasm.config.v1+json".into(),
            ..cfg.clone()
        };
        assert!(
            check_manifest(&wasm, &[])
                .unwrap_err()
                .contains("not a container image")
        );
    }

    #[test]
    fn config_parsing() {
        let c = ImageConfig::parse(
            br#"{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/bin","A=b"],"WorkingDir":"","User":"app","Entrypoint":null,"Cmd":["sh","-c","x"]},"rootfs":{"type":"layers","diff_ids":[]}}"#,
        )
        .unwrap();
        assert_eq!(c.env, vec!["PATH=/bin", "A=b"]);
        assert_eq!(c.working_dir, None);
        assert_eq!(c.user.as_deref(), Some("app"));
        assert_eq!(c.entrypoint, None);
        assert_eq!(c.cmd, Some(vec!["sh".into(), "-c".into(), "x".into()]));
        assert_eq!((c.os.as_str(), c.architecture.as_str()), ("linux", "amd64"));
        let bare = ImageConfig::parse(br#"{"architecture":"amd64","os":"linux"}"#).unwrap();
        assert!(bare.env.is_empty() && bare.cmd.is_none());
        assert!(ImageConfig::parse(b"{\"config\": 5}").is_err());
    }
}
