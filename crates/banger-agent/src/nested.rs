//! `--nested` VMs: the kernel's module tree arrives on a read-only ext4 disk. Before the switch
//! to the image's root the agent mounts it at [`MODULES_MOUNT`] and loads the modules its
//! [`banger_guest::MODULES_LOAD_ORDER`] lists (kvm and its vendor module, tun, bridge,
//! nf_tables, ...), so `/dev/kvm` exists and taps, bridges and nftables work without modprobe
//! in the image. After the switch it bind-mounts the tree read-only at
//! `/lib/modules/<release>`, so the guest's own modprobe (and the kernel's module autoloading
//! through it) finds every other module.

use std::path::Path;

use crate::error::AgentError;
use crate::modules::ModuleReport;
use crate::sys;

/// Where the modules disk is mounted, inside the agent's own `/run/banger` (moved along with
/// `/run` into the guest's root).
pub const MODULES_MOUNT: &str = "/run/banger/modules";

/// Mounts `dev` read-only at `mount` and loads the modules its load order lists, in order. A
/// module that fails (the other CPU vendor's kvm module, for one) is reported, not fatal.
pub fn mount_and_load(dev: &Path, mount: &Path) -> Result<ModuleReport, AgentError> {
    sys::mkdir_p(mount)?;
    sys::mount(
        &dev.to_string_lossy(),
        mount,
        "ext4",
        libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        Some("noload"),
    )?;
    load_listed(mount, sys::finit_module)
}

/// Loads, with `load`, every module listed in `tree`'s load order (a missing list: nothing).
pub fn load_listed(
    tree: &Path,
    mut load: impl FnMut(&Path) -> Result<bool, std::io::Error>,
) -> Result<ModuleReport, AgentError> {
    let list = tree.join(banger_guest::MODULES_LOAD_ORDER);
    let text = match std::fs::read_to_string(&list) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(ModuleReport::default()),
        Err(e) => return Err(AgentError::io("reading", list)(e)),
    };
    let mut report = ModuleReport::default();
    let entries = match banger_guest::parse_modules_load_order(&text) {
        Ok(e) => e,
        Err((line, reason)) => {
            report
                .failed
                .push((format!("{} line {line}", list.display()), reason));
            return Ok(report);
        }
    };
    for rel in entries {
        match load(&tree.join(&rel)) {
            Ok(true) => report.loaded.push(rel),
            Ok(false) => report.already.push(rel),
            Err(e) => report.failed.push((rel, e.to_string())),
        }
    }
    Ok(report)
}

/// After the switch to the guest's root: the tree at `/lib/modules/<release>`, read-only.
/// Runs after the chroot, so `/lib` resolves as the guest sees it (a merged-usr symlink).
pub fn expose_tree(root: &Path, mount: &Path, release: &str) -> Result<String, AgentError> {
    let target = root.join("lib/modules").join(release);
    sys::mkdir_p(&target)?;
    sys::mount(
        &mount.to_string_lossy(),
        &target,
        "none",
        libc::MS_BIND,
        None,
    )?;
    sys::mount(
        "none",
        &target,
        "none",
        libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
        None,
    )?;
    Ok(format!("{} (read-only)", target.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_listed_paths_in_order_and_reports_failures() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(banger_guest::MODULES_LOAD_ORDER),
            "kernel/virt/lib/irqbypass.ko\nkernel/arch/x86/kvm/kvm.ko\nkernel/arch/x86/kvm/kvm-intel.ko\n",
        )
        .unwrap();
        let mut seen = Vec::new();
        let r = load_listed(dir.path(), |p| {
            seen.push(p.strip_prefix(dir.path()).unwrap().to_path_buf());
            if p.ends_with("kvm-intel.ko") {
                Err(std::io::Error::from_raw_os_error(libc::ENODEV))
            } else {
                Ok(!p.ends_with("irqbypass.ko"))
            }
        })
        .unwrap();
        assert_eq!(seen[0], Path::new("kernel/virt/lib/irqbypass.ko"));
        assert_eq!(r.already, ["kernel/virt/lib/irqbypass.ko"]);
        assert_eq!(r.loaded, ["kernel/arch/x86/kvm/kvm.ko"]);
        assert_eq!(r.failed.len(), 1);
        // A list that escapes the tree loads nothing.
        std::fs::write(
            dir.path().join(banger_guest::MODULES_LOAD_ORDER),
            "../../etc/evil.ko\n",
        )
        .unwrap();
        let r = load_listed(dir.path(), |_| panic!("must not load")).unwrap();
        assert_eq!(r.failed.len(), 1);
        // No list: nothing to do.
        let empty = tempfile::tempdir().unwrap();
        assert_eq!(
            load_listed(empty.path(), |_| panic!("nothing")).unwrap(),
            ModuleReport::default()
        );
    }
}
