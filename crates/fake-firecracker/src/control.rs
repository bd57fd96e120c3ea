//! Test control: a JSON file named by `FAKE_FIRECRACKER_CONTROL`, re-read at every request so a
//! test can change the fake's behaviour between calls or VMs without restarting anything.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Names the control file.
pub const CONTROL_ENV: &str = "FAKE_FIRECRACKER_CONTROL";
/// Names a record file when the control file does not.
pub const RECORD_ENV: &str = "FAKE_FIRECRACKER_RECORD";

/// One injected failure. Every field that is set must match the call; an unset field matches
/// anything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailRule {
    #[serde(default)]
    pub method: Option<String>,
    /// The request path (`/drives/rootfs`) or its spec template (`/drives/{drive_id}`).
    #[serde(default)]
    pub path: Option<String>,
    /// For `PUT /actions`: the `action_type` of the body.
    #[serde(default)]
    pub action_type: Option<String>,
    /// The fake's `--id`.
    #[serde(default)]
    pub vm_id: Option<String>,
    /// HTTP status to answer with; 400 when unset.
    #[serde(default)]
    pub status: Option<u16>,
    /// The `fault_message`; "injected failure" when unset.
    #[serde(default)]
    pub message: Option<String>,
}

/// The request a [`FailRule`] is matched against.
#[derive(Debug, Clone, Copy)]
pub struct CallInfo<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub template: Option<&'a str>,
    pub action_type: Option<&'a str>,
    pub vm_id: &'a str,
}

impl FailRule {
    pub fn matches(&self, call: &CallInfo<'_>) -> bool {
        let method_ok = self
            .method
            .as_deref()
            .is_none_or(|m| m.eq_ignore_ascii_case(call.method));
        let path_ok = self
            .path
            .as_deref()
            .is_none_or(|p| p == call.path || Some(p) == call.template);
        let action_ok = self
            .action_type
            .as_deref()
            .is_none_or(|a| Some(a) == call.action_type);
        let id_ok = self.vm_id.as_deref().is_none_or(|i| i == call.vm_id);
        method_ok && path_ok && action_ok && id_ok
    }

    pub fn status(&self) -> u16 {
        self.status.unwrap_or(400)
    }

    pub fn message(&self) -> &str {
        self.message.as_deref().unwrap_or("injected failure")
    }
}

/// The control file's contents; every field is optional.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Control {
    #[serde(default)]
    pub fail: Vec<FailRule>,
    /// Exit with code 1 this many ms after a successful InstanceStart (a guest crash).
    #[serde(default)]
    pub exit_after_start_ms: Option<u64>,
    /// The guest ignores Ctrl+Alt+Del, so the process keeps running.
    #[serde(default)]
    pub ignore_ctrl_alt_del: bool,
    /// Wait this long before creating the API socket (a slow VMM start).
    #[serde(default)]
    pub socket_delay_ms: Option<u64>,
    /// InstanceStart takes this long before it answers, as the real one does while it loads
    /// the kernel into guest memory (8-9 s for a 53 MB kernel on a nested host). Like every
    /// call, it blocks the API meanwhile.
    #[serde(default)]
    pub instance_start_ms: Option<u64>,
    /// Append one JSON line per API call to this file.
    #[serde(default)]
    pub record: Option<PathBuf>,
}

/// A control file that exists but cannot be used. A test that wrote a broken file wants to know.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("reading control file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parsing control file {path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

impl Control {
    /// Reads `path`; a missing file means all defaults. `record_env` fills `record` when the
    /// file does not set it.
    pub fn load(path: Option<&Path>, record_env: Option<&Path>) -> Result<Control, ControlError> {
        let mut control = match path {
            None => Control::default(),
            Some(path) => match std::fs::read(path) {
                Ok(bytes) if bytes.iter().all(u8::is_ascii_whitespace) => Control::default(),
                Ok(bytes) => {
                    serde_json::from_slice(&bytes).map_err(|source| ControlError::Parse {
                        path: path.to_path_buf(),
                        source,
                    })?
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Control::default(),
                Err(source) => {
                    return Err(ControlError::Read {
                        path: path.to_path_buf(),
                        source,
                    });
                }
            },
        };
        if control.record.is_none() {
            control.record = record_env.map(Path::to_path_buf);
        }
        Ok(control)
    }

    /// The first rule matching `call`.
    pub fn failure_for(&self, call: &CallInfo<'_>) -> Option<&FailRule> {
        self.fail.iter().find(|r| r.matches(call))
    }
}

/// One recorded API call, a line of the record file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordedCall {
    pub id: String,
    pub method: String,
    pub path: String,
    pub body: Value,
    pub status: u16,
}

/// Appends `call` as one line. The line goes out in a single `write` on an `O_APPEND` file, so
/// fakes sharing one record file never interleave their lines.
pub fn append_record(path: &Path, call: &RecordedCall) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(call).map_err(std::io::Error::other)?;
    line.push(b'\n');
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o644)
        .open(path)?;
    file.write_all(&line)
}

/// Reads a record file back, for tests.
pub fn read_records(path: &Path) -> std::io::Result<Vec<RecordedCall>> {
    let text = std::fs::read_to_string(path)?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).map_err(std::io::Error::other))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call<'a>(method: &'a str, path: &'a str, action: Option<&'a str>) -> CallInfo<'a> {
        CallInfo {
            method,
            path,
            template: None,
            action_type: action,
            vm_id: "vm1",
        }
    }

    #[test]
    fn missing_file_gives_defaults_and_env_record() {
        let dir = tempfile::tempdir().unwrap();
        let c = Control::load(Some(&dir.path().join("nope.json")), None).unwrap();
        assert_eq!(c, Control::default());
        let rec = dir.path().join("rec.jsonl");
        let c = Control::load(None, Some(&rec)).unwrap();
        assert_eq!(c.record.as_deref(), Some(rec.as_path()));
    }

    #[test]
    fn file_record_wins_over_env() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.json");
        std::fs::write(&path, r#"{"record": "/a", "ignore_ctrl_alt_del": true}"#).unwrap();
        let c = Control::load(Some(&path), Some(Path::new("/b"))).unwrap();
        assert_eq!(c.record.as_deref(), Some(Path::new("/a")));
        assert!(c.ignore_ctrl_alt_del);
    }

    #[test]
    fn broken_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.json");
        std::fs::write(&path, r#"{"fial": []}"#).unwrap();
        let e = Control::load(Some(&path), None).unwrap_err().to_string();
        assert!(e.contains("c.json") && e.contains("fial"), "{e}");
    }

    #[test]
    fn rules_match_on_the_fields_they_set() {
        let rule = FailRule {
            method: Some("PUT".into()),
            path: Some("/actions".into()),
            action_type: Some("InstanceStart".into()),
            ..FailRule::default()
        };
        assert!(rule.matches(&call("put", "/actions", Some("InstanceStart"))));
        assert!(!rule.matches(&call("PUT", "/actions", Some("SendCtrlAltDel"))));
        assert!(!rule.matches(&call("PUT", "/boot-source", None)));
        let by_template = FailRule {
            path: Some("/drives/{drive_id}".into()),
            vm_id: Some("vm2".into()),
            ..FailRule::default()
        };
        let mut c = call("PUT", "/drives/rootfs", None);
        c.template = Some("/drives/{drive_id}");
        assert!(!by_template.matches(&c));
        c.vm_id = "vm2";
        assert!(by_template.matches(&c));
        assert_eq!(by_template.status(), 400);
        assert_eq!(by_template.message(), "injected failure");
    }

    #[test]
    fn records_append_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rec.jsonl");
        for status in [204, 400] {
            append_record(
                &path,
                &RecordedCall {
                    id: "vm1".into(),
                    method: "PUT".into(),
                    path: "/vm".into(),
                    body: serde_json::json!({"state": "Paused"}),
                    status,
                },
            )
            .unwrap();
        }
        let back = read_records(&path).unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!(back[1].status, 400);
        assert_eq!(back[0].body["state"], "Paused");
    }
}
