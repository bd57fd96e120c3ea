//! The agent's error type: every variant names what it was working on.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("mounting {source_dev} ({fstype}) on {target}: {error}")]
    Mount {
        source_dev: String,
        fstype: String,
        target: PathBuf,
        #[source]
        error: std::io::Error,
    },
    #[error("config disk {device}: {error}")]
    ConfigDisk {
        device: PathBuf,
        #[source]
        error: banger_guest::ConfigDiskError,
    },
    #[error(
        "no banger config disk (magic BNGRCFG1) among the block devices after {waited_s} s; seen: {seen}"
    )]
    NoConfigDisk { waited_s: u64, seen: String },
    #[error("{role} with ext4 UUID {uuid} not found after {waited_s} s; seen: {seen}")]
    MissingDisk {
        role: &'static str,
        uuid: String,
        waited_s: u64,
        seen: String,
    },
    #[error("{0}")]
    Network(String),
    #[error("no init to run: tried {0}")]
    NoInit(String),
    #[error("ssh server: {0}")]
    Sshd(#[from] crate::sshd::SshdError),
    #[error("config has ssh_server \"agent\" but no ssh identity")]
    NoSshIdentity,
}

impl AgentError {
    pub fn io(
        what: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> AgentError {
        let path = path.into();
        move |source| AgentError::Io { what, path, source }
    }
}
