//! The VM state machine.

use serde::{Deserialize, Serialize};

/// Where a VM is in its lifecycle. `Starting` and `Stopping` are transient: a daemon that dies
/// in one of them finds the VM there on restart and reconciles it to `Running` or `Stopped`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    Created,
    Starting,
    Running,
    Stopping,
    Stopped,
    Error,
}

impl VmState {
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Created => "created",
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Stopping => "stopping",
            VmState::Stopped => "stopped",
            VmState::Error => "error",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "created" => VmState::Created,
            "starting" => VmState::Starting,
            "running" => VmState::Running,
            "stopping" => VmState::Stopping,
            "stopped" => VmState::Stopped,
            "error" => VmState::Error,
            _ => return None,
        })
    }

    /// States from which `start` may begin.
    pub fn can_start(self) -> bool {
        matches!(self, VmState::Created | VmState::Stopped | VmState::Error)
    }

    /// States in which a VMM process may exist and must be accounted for.
    pub fn may_have_vmm(self) -> bool {
        matches!(
            self,
            VmState::Starting | VmState::Running | VmState::Stopping
        )
    }
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        for s in [
            VmState::Created,
            VmState::Starting,
            VmState::Running,
            VmState::Stopping,
            VmState::Stopped,
            VmState::Error,
        ] {
            assert_eq!(VmState::parse(s.as_str()), Some(s));
            assert_eq!(serde_json::to_string(&s).unwrap(), format!("\"{s}\""));
        }
        assert_eq!(VmState::parse("bogus"), None);
    }
}
