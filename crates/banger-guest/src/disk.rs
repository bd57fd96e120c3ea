//! The config disk: how a [`GuestConfig`] reaches the guest without touching the shared image.
//!
//! A raw block device with no filesystem, attached read-only:
//!
//! | bytes        | content                                   |
//! |--------------|-------------------------------------------|
//! | 0..8         | `BNGRCFG1`                                |
//! | 8..12        | JSON length `n`, u32 little-endian        |
//! | 12..12+n     | the config as JSON                        |
//! | 12+n..       | zeros up to a multiple of 4096            |
//!
//! No filesystem means the agent needs no mount and no driver to read it, and the magic lets it
//! be found among the VM's disks whatever the attach order.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::config::{ConfigError, GuestConfig};

/// The first 8 bytes of a config disk.
pub const CONFIG_DISK_MAGIC: &[u8; 8] = b"BNGRCFG1";
/// Size of the fixed header (magic + length).
pub const HEADER_LEN: usize = 12;
/// Config disks are padded to a multiple of this, a size every VMM accepts for a block device.
pub const DISK_ALIGN: usize = 4096;
/// Upper bound on the JSON length; a larger value means a corrupt header, not a real config.
pub const MAX_JSON_LEN: usize = 16 << 20;

/// Why bytes are not a usable config disk. The agent adds the device name around it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigDiskError {
    #[error("not a banger config disk: the first 8 bytes are {found:?}, expected \"BNGRCFG1\"")]
    BadMagic { found: String },
    #[error("config disk is {len} bytes, shorter than its {HEADER_LEN}-byte header")]
    TooShort { len: usize },
    #[error(
        "config disk header declares {declared} bytes of JSON but {available} follow it (max {MAX_JSON_LEN})"
    )]
    BadLength { declared: usize, available: usize },
    #[error("config disk JSON is malformed: {0}")]
    Json(#[source] serde_json::Error),
    #[error("config disk holds an invalid config: {0}")]
    Invalid(#[from] ConfigError),
    #[error("writing config disk {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Whether `bytes` (at least the first 8 bytes of a device) start with the config disk magic.
pub fn has_magic(bytes: &[u8]) -> bool {
    bytes.starts_with(CONFIG_DISK_MAGIC)
}

/// The total number of bytes (header + JSON) a config disk's header announces, so a reader can
/// fetch exactly that much after reading the first block.
pub fn declared_len(header: &[u8]) -> Result<usize, ConfigDiskError> {
    if header.len() < HEADER_LEN {
        return Err(ConfigDiskError::TooShort { len: header.len() });
    }
    if !has_magic(header) {
        return Err(ConfigDiskError::BadMagic {
            found: String::from_utf8_lossy(&header[..8]).into_owned(),
        });
    }
    let n = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes")) as usize;
    if n > MAX_JSON_LEN {
        return Err(ConfigDiskError::BadLength {
            declared: n,
            available: header.len() - HEADER_LEN,
        });
    }
    Ok(HEADER_LEN + n)
}

/// The config disk image for `config`: header, JSON, zero padding to 4 KiB.
pub fn encode(config: &GuestConfig) -> Vec<u8> {
    let json = serde_json::to_vec(config).expect("GuestConfig serializes to JSON");
    let mut out = Vec::with_capacity((HEADER_LEN + json.len()).next_multiple_of(DISK_ALIGN));
    out.extend_from_slice(CONFIG_DISK_MAGIC);
    out.extend_from_slice(&(json.len() as u32).to_le_bytes());
    out.extend_from_slice(&json);
    out.resize(out.len().next_multiple_of(DISK_ALIGN), 0);
    out
}

/// Reads a config disk image (or at least its header and JSON) and validates the config.
pub fn decode(bytes: &[u8]) -> Result<GuestConfig, ConfigDiskError> {
    let total = declared_len(bytes)?;
    if total > bytes.len() {
        return Err(ConfigDiskError::BadLength {
            declared: total - HEADER_LEN,
            available: bytes.len() - HEADER_LEN,
        });
    }
    let json = &bytes[HEADER_LEN..total];
    // Check the version before the full parse, so a newer layout is reported as such rather than
    // as whatever field it happens to have renamed.
    #[derive(serde::Deserialize)]
    struct Version {
        v: u32,
    }
    let Version { v } = serde_json::from_slice(json).map_err(ConfigDiskError::Json)?;
    if v != crate::config::CONFIG_VERSION {
        return Err(ConfigError::Version(v).into());
    }
    let config: GuestConfig = serde_json::from_slice(json).map_err(ConfigDiskError::Json)?;
    config.validate()?;
    Ok(config)
}

/// Validates `config` and writes its config disk to a new file at `path` (mode 0600; an existing
/// file is never overwritten).
pub fn write_config_disk(path: &Path, config: &GuestConfig) -> Result<(), ConfigDiskError> {
    config.validate()?;
    let io = |source| ConfigDiskError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    let result = f.write_all(&encode(config)).and_then(|()| f.sync_all());
    if let Err(e) = result {
        drop(f);
        let _ = std::fs::remove_file(path);
        return Err(io(e));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::sample;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn round_trip_and_layout() {
        let c = sample();
        let img = encode(&c);
        assert_eq!(img.len() % DISK_ALIGN, 0);
        assert_eq!(&img[..8], b"BNGRCFG1");
        let n = u32::from_le_bytes(img[8..12].try_into().unwrap()) as usize;
        let json: serde_json::Value = serde_json::from_slice(&img[12..12 + n]).unwrap();
        assert_eq!(json["hostname"], "devbox");
        assert!(img[12 + n..].iter().all(|&b| b == 0));
        assert_eq!(decode(&img).unwrap(), c);
        // The agent may hand over only header + JSON.
        assert_eq!(decode(&img[..12 + n]).unwrap(), c);
        assert_eq!(declared_len(&img[..4096]).unwrap(), 12 + n);
    }

    #[test]
    fn large_configs_span_blocks() {
        let mut c = sample();
        c.files
            .push(crate::GuestFile::new("/big", 0o600, &vec![7u8; 10_000]));
        let img = encode(&c);
        assert!(img.len() >= 3 * DISK_ALIGN && img.len().is_multiple_of(DISK_ALIGN));
        assert_eq!(decode(&img).unwrap(), c);
    }

    #[test]
    fn errors_are_distinct() {
        let img = encode(&sample());
        let mut bad = img.clone();
        bad[0] = b'X';
        let e = decode(&bad).unwrap_err();
        assert!(matches!(e, ConfigDiskError::BadMagic { .. }), "{e}");
        assert!(e.to_string().contains("XNGRCFG1"), "{e}");

        assert!(matches!(
            decode(b"BNGRCFG1"),
            Err(ConfigDiskError::TooShort { len: 8 })
        ));
        assert!(matches!(
            decode(&[0u8; 4096]),
            Err(ConfigDiskError::BadMagic { .. })
        ));

        let mut bad = img.clone();
        bad[8..12].copy_from_slice(&(img.len() as u32).to_le_bytes());
        assert!(matches!(
            decode(&bad),
            Err(ConfigDiskError::BadLength { .. })
        ));
        bad[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decode(&bad),
            Err(ConfigDiskError::BadLength { .. })
        ));

        let mut bad = img.clone();
        bad[12] = b'[';
        assert!(matches!(decode(&bad), Err(ConfigDiskError::Json(_))));

        let mut c = sample();
        c.hostname = "no_underscores".into();
        let e = decode(&encode(&c)).unwrap_err();
        assert!(
            matches!(e, ConfigDiskError::Invalid(ConfigError::Hostname(_))),
            "{e}"
        );

        // A future version is reported as such even if its fields changed.
        let json = br#"{"v":2,"something":"else"}"#;
        let mut img = b"BNGRCFG1".to_vec();
        img.extend_from_slice(&(json.len() as u32).to_le_bytes());
        img.extend_from_slice(json);
        let e = decode(&img).unwrap_err();
        assert!(
            matches!(e, ConfigDiskError::Invalid(ConfigError::Version(2))),
            "{e}"
        );
    }

    #[test]
    fn write_is_create_new_0600() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.img");
        write_config_disk(&p, &sample()).unwrap();
        let meta = std::fs::metadata(&p).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(decode(&std::fs::read(&p).unwrap()).unwrap(), sample());
        let e = write_config_disk(&p, &sample()).unwrap_err();
        assert!(e.to_string().contains("config.img"), "{e}");

        let mut c = sample();
        c.machine_id = "x".into();
        let q = dir.path().join("other.img");
        assert!(matches!(
            write_config_disk(&q, &c),
            Err(ConfigDiskError::Invalid(_))
        ));
        assert!(!q.exists(), "an invalid config must not leave a file");
    }
}
