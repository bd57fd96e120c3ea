//! The per-VM handles file: what a running VM holds on the host.
//!
//! It is written (atomically: temp file, fsync, rename) *before* the daemon's in-memory state
//! changes, so a daemon killed at any instant leaves a file naming every live resource; the next
//! daemon re-adopts or tears them down from it.

use std::io::Write;
use std::path::{Path, PathBuf};

use banger_vmm::VmmHandle;
use serde::{Deserialize, Serialize};

/// Live host resources of one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handles {
    /// Format version of this file.
    pub v: u32,
    /// Per-VM runtime dir holding the VMM's sockets.
    pub run_dir: PathBuf,
    /// The VMM process, once spawned.
    pub vmm: Option<VmmHandle>,
    /// The VM's tap device, recorded before it is created.
    #[serde(default)]
    pub tap: Option<String>,
    /// Whether NAT rules (tagged with the VM id) may exist for this run.
    #[serde(default)]
    pub nat: bool,
    /// Loop devices and the device-mapper snapshot of a `dm-snapshot` root disk, in the order
    /// they were made (released in reverse).
    #[serde(default)]
    pub block: Vec<BlockResource>,
}

/// A host block device a run holds (a loop device or a device-mapper snapshot).
pub use crate::dm::DmResource as BlockResource;

#[derive(Debug, thiserror::Error)]
pub enum HandlesError {
    #[error("writing handles file {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading handles file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("handles file {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

impl Handles {
    pub const VERSION: u32 = 1;

    pub fn new(run_dir: PathBuf) -> Self {
        Handles {
            v: Self::VERSION,
            run_dir,
            vmm: None,
            tap: None,
            nat: false,
            block: Vec::new(),
        }
    }

    /// Atomically replaces `path` with this content.
    pub fn write(&self, path: &Path) -> Result<(), HandlesError> {
        let err = |source| HandlesError::Write {
            path: path.to_path_buf(),
            source,
        };
        let tmp = path.with_extension("json.tmp");
        let data = serde_json::to_vec_pretty(self).expect("handles always serialize");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(err)?;
        f.write_all(&data).map_err(err)?;
        f.sync_all().map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)?;
        if let Some(dir) = path.parent() {
            // The rename is durable only once the directory entry is.
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(err)?;
        }
        Ok(())
    }

    /// Reads the file; `Ok(None)` if it does not exist.
    pub fn read(path: &Path) -> Result<Option<Handles>, HandlesError> {
        let data = match std::fs::read(path) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(HandlesError::Read {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        serde_json::from_slice(&data)
            .map(Some)
            .map_err(|e| HandlesError::Corrupt {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })
    }

    pub fn remove(path: &Path) -> std::io::Result<()> {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use banger_vmm::VmmKind;

    #[test]
    fn round_trip_and_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("handles.json");
        assert!(Handles::read(&path).unwrap().is_none());
        let mut h = Handles::new(dir.path().join("run"));
        h.vmm = Some(VmmHandle {
            kind: VmmKind::Firecracker,
            pid: 42,
            start_time: 7,
            control_socket: dir.path().join("fc.sock"),
            log_path: dir.path().join("vmm.log"),
        });
        h.write(&path).unwrap();
        assert_eq!(Handles::read(&path).unwrap(), Some(h));
        assert!(!path.with_extension("json.tmp").exists());
        std::fs::write(&path, b"{not json").unwrap();
        let err = Handles::read(&path).unwrap_err();
        assert!(matches!(err, HandlesError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("handles.json"));
        Handles::remove(&path).unwrap();
        Handles::remove(&path).unwrap();
    }
}
