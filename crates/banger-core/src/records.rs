//! The persistent records the store keeps and the protocol returns.
//!
//! One definition is shared by the store (rows), the daemon (logic), the protocol (`vm show`,
//! `vm ls --json`) and the CLI (tables), so a field added here reaches every layer.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::{ByteSize, VmId, VmName, VmState};

/// One sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    pub id: VmId,
    pub name: VmName,
    pub state: VmState,
    /// Name of the image the root disk is built on.
    pub image: String,
    /// Name of the kernel the VM boots.
    pub kernel: String,
    pub vcpu: u32,
    pub memory_mib: u32,
    pub work_disk_size: ByteSize,
    /// The VM's address on banger's bridge; allocated at create, held until delete.
    pub ip: Option<Ipv4Addr>,
    /// Outbound NAT requested for this VM.
    pub nat: bool,
    /// Which VMM backend ran (or will run) the VM, e.g. `firecracker`, `qemu-tcg`.
    pub vmm: Option<String>,
    /// Why the last operation failed, naming the failed step; cleared by a successful start.
    pub last_error: Option<String>,
    /// Unix seconds.
    pub created_at: i64,
    pub updated_at: i64,
    pub started_at: Option<i64>,
    /// The host repository copied into the guest by `vm run PATH` or `vm workspace prepare`.
    #[serde(default)]
    pub workspace: Option<WorkspaceInfo>,
    /// `--nested`: the guest gets hardware virtualisation (`/dev/kvm`) and the kernel's whole
    /// module tree; kept across stop/start.
    #[serde(default)]
    pub nested: bool,
}

/// Where a VM's workspace lives and what it was prepared from. The per-file sync manifest is
/// the CLI's (it can be large); the daemon keeps only this summary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkspaceInfo {
    /// Absolute path of the repository in the guest, e.g. `/root/myrepo`.
    pub guest_path: String,
    /// The host repository's top-level directory.
    pub host_path: PathBuf,
    /// The commit the workspace was prepared at (the default base of `workspace export`).
    pub head_commit: String,
    /// Unix seconds.
    pub prepared_at: i64,
    /// Whether untracked, non-ignored files were copied too.
    #[serde(default)]
    pub include_untracked: bool,
}

impl WorkspaceInfo {
    /// Checks what a client may record: an absolute, normalised guest path and a hex commit id.
    pub fn validate(&self) -> Result<(), String> {
        let g = &self.guest_path;
        if !g.starts_with('/')
            || g.contains('\0')
            || g.split('/').any(|c| c == "." || c == "..")
            || g == "/"
        {
            return Err(format!(
                "invalid workspace guest path {g:?}: expected an absolute path below /, without . or .."
            ));
        }
        let h = &self.head_commit;
        if !(h.len() == 40 || h.len() == 64) || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!(
                "invalid workspace head commit {h:?}: expected a full hex commit id"
            ));
        }
        if !self.host_path.is_absolute() {
            return Err(format!(
                "invalid workspace host path {:?}: expected an absolute path",
                self.host_path
            ));
        }
        Ok(())
    }
}

/// A root filesystem image shared read-only by every VM built on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    pub name: String,
    pub rootfs: PathBuf,
    /// The kernel VMs of this image boot unless told otherwise.
    pub kernel: Option<String>,
    pub size_bytes: u64,
    /// Where it came from: `register:/path`, `build:debian`, `oci:docker.io/...`.
    pub source: String,
    /// Whether banger owns the files (and deletes them with the image).
    pub managed: bool,
    pub created_at: i64,
    /// What banger learned about the image's contents when it made it.
    #[serde(default)]
    pub meta: ImageMeta,
}

/// Facts about an image's root filesystem that decide how its VMs boot and run commands.
/// Images built or registered before these were recorded have the defaults: `None` means
/// "unknown", which banger treats as "the image has its own init and sshd".
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageMeta {
    /// The OCI manifest digest or the bundle's sha256 the image was made from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// The image's environment (`KEY=VALUE`), given to commands banger runs in its VMs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    /// The image's working directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// The image's configured user (recorded; sessions run as root).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    /// Whether the image has an init system (`/sbin/init`, systemd); `None`: unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub has_init: Option<bool>,
    /// Whether the image has an sshd; `None`: unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub has_sshd: Option<bool>,
    /// `apt`, `apk`, `dnf`, `yum`, `zypper` or `pacman` when the image has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub package_manager: Option<String>,
}

impl ImageMeta {
    /// Whether VMs of this image are reached through the agent's built-in ssh server.
    pub fn agent_ssh(&self) -> bool {
        self.has_sshd == Some(false)
    }

    /// Whether the agent stays PID 1 (the image has no init system).
    pub fn agent_init(&self) -> bool {
        self.has_init == Some(false)
    }

    /// How VMs of the image are reached and booted, in words (`image show`, `vm show`).
    pub fn access_summary(&self) -> String {
        let ssh = if self.agent_ssh() {
            match &self.package_manager {
                Some(pm) => format!(
                    "banger's agent serves ssh (no sshd in the image; with --nat the first boot installs one via {pm})"
                ),
                None => "banger's agent serves ssh (no sshd in the image)".to_string(),
            }
        } else {
            "the image's sshd".to_string()
        };
        let init = if self.agent_init() {
            "banger's agent is PID 1 (no init in the image)"
        } else {
            "the image's init"
        };
        format!("{ssh}; {init}")
    }
}

/// A bootable kernel: an ELF vmlinux and an optional initramfs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelRecord {
    pub name: String,
    pub vmlinux: PathBuf,
    pub initrd: Option<PathBuf>,
    pub version: String,
    pub sha256: String,
    pub source: String,
    pub created_at: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workspace_info_validation() {
        let good = WorkspaceInfo {
            guest_path: "/root/repo".into(),
            host_path: "/src/repo".into(),
            head_commit: "ab".repeat(20),
            prepared_at: 1,
            include_untracked: false,
        };
        assert_eq!(good.validate(), Ok(()));
        for (g, h, host) in [
            ("root/repo", "ab".repeat(20), "/src"),
            ("/", "ab".repeat(20), "/src"),
            ("/root/../etc", "ab".repeat(20), "/src"),
            ("/root/repo", "HEAD".into(), "/src"),
            ("/root/repo", "ab".repeat(20), "src"),
        ] {
            let w = WorkspaceInfo {
                guest_path: g.into(),
                head_commit: h,
                host_path: host.into(),
                ..good.clone()
            };
            assert!(w.validate().is_err(), "{w:?}");
        }
        // Older records without the field still decode.
        let old: WorkspaceInfo = serde_json::from_str(
            r#"{"guest_path":"/root/r","host_path":"/r","head_commit":"x","prepared_at":0}"#,
        )
        .unwrap();
        assert!(!old.include_untracked);
    }
}
