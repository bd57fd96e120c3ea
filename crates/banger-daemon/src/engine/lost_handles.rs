//! A VM the store says may have a VMM, but whose handles file is unreadable (truncated,
//! garbled) or gone (its VM dir deleted): the VMM is found by its marks instead of being
//! abandoned with its tap, and the damaged file is kept for inspection.
//!
//! The mark is the VM's state or runtime dir in the process's arguments (`--api-sock
//! <run>/fc.sock`, `-qmp unix:<run>/qmp.sock`), as [`crate::leaks::unrecorded_vmms`] finds
//! it: those dirs are private to banger and named after the VM id. Only
//! processes of the daemon's own user count, so another user's process quoting the path can
//! never be taken for (and killed as) a VMM.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use banger_core::VmRecord;
use banger_vmm::{VmmHandle, VmmKind};

use super::Engine;
use crate::handles::Handles;

impl Engine {
    /// Handles rebuilt for `vm` from what exists: its VMM process (found by its runtime dir),
    /// its tap (named after the VM id) if the interface exists, NAT if the VM asked for it.
    /// `None` if no VMM process names the VM's runtime dir.
    pub(super) fn handles_from_marks(&self, vm: &VmRecord) -> Option<Handles> {
        let run_dir = self.layout().vm_run_dir(&vm.id);
        let kind = [VmmKind::Firecracker, VmmKind::QemuKvm, VmmKind::QemuTcg]
            .into_iter()
            .find(|k| vm.vmm.as_deref() == Some(k.as_str()))
            .unwrap_or(VmmKind::Firecracker);
        let socket = match kind {
            VmmKind::Firecracker => banger_vmm::firecracker::API_SOCKET_NAME,
            VmmKind::QemuKvm | VmmKind::QemuTcg => banger_vmm::qemu::QMP_SOCKET_NAME,
        };
        // The same search reconcile uses for a VMM killed before its pid was recorded, kept
        // to this user's processes: only those can be the VMMs of this daemon's own launches.
        let me = nix::unistd::geteuid().as_raw();
        let (pid, start_time) = crate::leaks::unrecorded_vmms(
            Path::new("/proc"),
            self.layout(),
            &vm.id,
            std::process::id() as i32,
        )
        .into_iter()
        .filter(|pid| std::fs::metadata(format!("/proc/{pid}")).is_ok_and(|m| m.uid() == me))
        .find_map(|pid| {
            banger_vmm::process::proc_stat(pid)
                .filter(|st| !matches!(st.state, 'Z' | 'X' | 'x'))
                .map(|st| (pid, st.start_time))
        })?;
        let mut h = Handles::new(run_dir.clone());
        h.vmm = Some(VmmHandle {
            kind,
            pid,
            start_time,
            control_socket: run_dir.join(socket),
            log_path: self.layout().vmm_log(&vm.id),
        });
        let tap = banger_net::TapName::for_vm(&vm.id);
        if Path::new("/sys/class/net").join(tap.as_str()).exists() {
            h.tap = Some(tap.as_str().to_string());
        }
        h.nat = vm.nat;
        Some(h)
    }
}

/// Moves a handles file that cannot be read to `<name>.damaged` (or `.damaged.N`), never over
/// an earlier one, so the evidence survives the teardown that removes `handles.json`.
pub(super) fn keep_damaged(path: &Path) -> Result<PathBuf, String> {
    for n in 0..100 {
        let mut name = path.as_os_str().to_os_string();
        name.push(if n == 0 {
            ".damaged".to_string()
        } else {
            format!(".damaged.{n}")
        });
        let dest = PathBuf::from(name);
        if dest.symlink_metadata().is_ok() {
            continue;
        }
        // A hard link then unlink: unlike a rename it can never replace an existing file.
        return std::fs::hard_link(path, &dest)
            .and_then(|()| std::fs::remove_file(path))
            .map(|()| dest.clone())
            .map_err(|e| format!("keeping {} as {}: {e}", path.display(), dest.display()));
    }
    Err(format!(
        "{}: too many damaged copies kept already",
        path.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn damaged_files_are_kept_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("handles.json");
        std::fs::write(&p, "{tru").unwrap();
        let kept = keep_damaged(&p).unwrap();
        assert_eq!(kept, dir.path().join("handles.json.damaged"));
        assert!(!p.exists());
        std::fs::write(&p, "{again").unwrap();
        let kept2 = keep_damaged(&p).unwrap();
        assert_eq!(kept2, dir.path().join("handles.json.damaged.1"));
        assert_eq!(std::fs::read_to_string(kept).unwrap(), "{tru");
        assert_eq!(std::fs::read_to_string(kept2).unwrap(), "{again");
    }
}
