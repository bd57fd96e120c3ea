//! Registry credentials from a Docker client config (`~/.docker/config.json`).
//!
//! Only the static `"auths"` entries are used: `{"auths": {"<registry>": {"auth":
//! base64("user:pass")}}}` (or the rarer explicit `"username"`/`"password"` fields). Identity
//! tokens (OAuth refresh tokens written by some `docker login` flows) and credential helpers
//! (`credsStore`, `credHelpers`) would need a token exchange or an external program; they are
//! ignored and reported in [`DockerCredentials::notes`] so the caller can tell the user why a
//! pull is anonymous.

use std::collections::BTreeMap;
use std::path::Path;

use base64::Engine as _;
use serde::Deserialize;

use crate::OciError;
use crate::reference::DOCKER_HUB;

/// A user name and password for HTTP Basic authentication (oci-client turns them into a
/// bearer token when the registry asks for one).
#[derive(Clone, PartialEq, Eq)]
pub struct BasicCredentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for BasicCredentials {
    // The password must never reach a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BasicCredentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// The credentials found in a docker config, keyed by normalised registry (`docker.io`,
/// `ghcr.io`, `localhost:5000`).
#[derive(Debug, Clone, Default)]
pub struct DockerCredentials {
    by_registry: BTreeMap<String, BasicCredentials>,
    notes: Vec<String>,
}

#[derive(Deserialize)]
struct ConfigFile {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: BTreeMap<String, String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct AuthEntry {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
    identitytoken: Option<String>,
}

impl DockerCredentials {
    /// No credentials: every pull is anonymous.
    pub fn none() -> DockerCredentials {
        DockerCredentials::default()
    }

    /// Reads a docker config file. A missing file means no credentials (most users never ran
    /// `docker login`); an unreadable or malformed one is an error naming the file.
    pub fn load(path: &Path) -> Result<DockerCredentials, OciError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::none()),
            Err(e) => {
                return Err(OciError::DockerConfig {
                    path: path.to_path_buf(),
                    message: e.to_string(),
                });
            }
        };
        Self::parse(&text).map_err(|message| OciError::DockerConfig {
            path: path.to_path_buf(),
            message,
        })
    }

    /// Parses the text of a docker config file.
    pub fn parse(text: &str) -> Result<DockerCredentials, String> {
        let file: ConfigFile =
            serde_json::from_str(text).map_err(|e| format!("not a valid docker config: {e}"))?;
        let mut out = DockerCredentials::default();
        if let Some(store) = &file.creds_store {
            out.notes.push(format!(
                "credential store {store:?} (credsStore) is not supported; only \"auths\" entries are used"
            ));
        }
        for (registry, helper) in &file.cred_helpers {
            out.notes.push(format!(
                "credential helper {helper:?} for {registry} (credHelpers) is not supported; only \"auths\" entries are used"
            ));
        }
        for (key, entry) in file.auths {
            let registry = normalize_registry_key(&key);
            if entry
                .identitytoken
                .as_deref()
                .is_some_and(|t| !t.is_empty())
            {
                out.notes.push(format!(
                    "identity token for {registry} ignored (OAuth identity tokens are not supported); using its user/password if present"
                ));
            }
            let creds = match (&entry.auth, &entry.username, &entry.password) {
                (Some(auth), _, _) if !auth.is_empty() => {
                    decode_auth(auth).map_err(|e| format!("auths.{key:?}.auth: {e}"))?
                }
                (_, Some(u), Some(p)) if !u.is_empty() => BasicCredentials {
                    username: u.clone(),
                    password: p.clone(),
                },
                _ => continue,
            };
            out.by_registry.insert(registry, creds);
        }
        Ok(out)
    }

    /// The credentials for `registry` (as in [`crate::Reference::registry`]).
    pub fn get(&self, registry: &str) -> Option<&BasicCredentials> {
        self.by_registry.get(&normalize_registry_key(registry))
    }

    /// Things in the file that were ignored, for the caller to log.
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// Registries that have credentials.
    pub fn registries(&self) -> impl Iterator<Item = &str> {
        self.by_registry.keys().map(String::as_str)
    }
}

/// `https://index.docker.io/v1/` → `docker.io`, `https://ghcr.io` → `ghcr.io`,
/// `Localhost:5000` → `localhost:5000`.
fn normalize_registry_key(key: &str) -> String {
    let no_scheme = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let host = no_scheme.split('/').next().unwrap_or(no_scheme);
    let host = host.to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            DOCKER_HUB.to_string()
        }
        _ => host,
    }
}

fn decode_auth(auth: &str) -> Result<BasicCredentials, String> {
    let raw = base64::engine::general_purpose::STANDARD
        .decode(auth.trim())
        .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(auth.trim()))
        .map_err(|e| format!("not base64: {e}"))?;
    let text = String::from_utf8(raw).map_err(|_| "not UTF-8 once decoded".to_string())?;
    let (username, password) = text
        .split_once(':')
        .ok_or_else(|| "not of the form base64(user:password)".to_string())?;
    if username.is_empty() {
        return Err("the user name is empty".into());
    }
    Ok(BasicCredentials {
        username: username.to_string(),
        password: password.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    #[test]
    fn parses_auths_and_normalises_keys() {
        let text = format!(
            r#"{{
              "auths": {{
                "https://index.docker.io/v1/": {{"auth": "{hub}"}},
                "ghcr.io": {{"auth": "{gh}", "identitytoken": "tok"}},
                "http://Localhost:5000/v2/": {{"username": "u", "password": "p:w"}},
                "empty.example": {{}},
                "quay.io": {{"identitytoken": "only-a-token"}}
              }},
              "credsStore": "desktop",
              "HttpHeaders": {{"User-Agent": "x"}}
            }}"#,
            hub = b64("hubuser:hub:pass"),
            gh = b64("ghuser:ghpass"),
        );
        let c = DockerCredentials::parse(&text).unwrap();
        let hub = c.get("docker.io").unwrap();
        assert_eq!(hub.username, "hubuser");
        assert_eq!(hub.password, "hub:pass", "only the first ':' separates");
        assert_eq!(c.get("index.docker.io"), Some(hub));
        assert_eq!(c.get("ghcr.io").unwrap().username, "ghuser");
        assert_eq!(c.get("localhost:5000").unwrap().password, "p:w");
        assert!(c.get("empty.example").is_none());
        assert!(c.get("quay.io").is_none());
        assert!(c.get("other.example").is_none());
        let notes = c.notes().join("\n");
        assert!(notes.contains("credsStore"), "{notes}");
        assert!(notes.contains("identity token for ghcr.io"), "{notes}");
        assert!(notes.contains("identity token for quay.io"), "{notes}");
        assert!(
            !format!("{hub:?}").contains("hub:pass"),
            "passwords are redacted"
        );
    }

    #[test]
    fn bad_files_are_errors() {
        assert!(
            DockerCredentials::parse("{")
                .unwrap_err()
                .contains("not a valid")
        );
        let e = DockerCredentials::parse(r#"{"auths":{"x.io":{"auth":"!!!"}}}"#).unwrap_err();
        assert!(e.contains("x.io") && e.contains("base64"), "{e}");
        let e = DockerCredentials::parse(&format!(
            r#"{{"auths":{{"x.io":{{"auth":"{}"}}}}}}"#,
            b64("nocolon")
        ))
        .unwrap_err();
        assert!(e.contains("user:password"), "{e}");
        assert!(
            DockerCredentials::parse("{}")
                .unwrap()
                .get("docker.io")
                .is_none()
        );
    }

    #[test]
    fn missing_file_means_anonymous_and_bad_file_names_path() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.json");
        assert!(
            DockerCredentials::load(&missing)
                .unwrap()
                .get("docker.io")
                .is_none()
        );
        let bad = dir.path().join("config.json");
        std::fs::write(&bad, "not json").unwrap();
        let e = DockerCredentials::load(&bad).unwrap_err().to_string();
        assert!(e.contains(&bad.display().to_string()), "{e}");
    }
}
