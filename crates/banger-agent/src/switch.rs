//! Leaving the initramfs: move the pseudo filesystems into the new root, free the initramfs'
//! memory, make the new root `/`, and exec the image's init as PID 1.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::AgentError;
use crate::sys;

const RAMFS_MAGIC: i64 = 0x8584_58f6;
const TMPFS_MAGIC: i64 = 0x0102_1994;

/// Moves /dev, /proc, /sys and /run into `newroot`, frees the initramfs and chroots into
/// `newroot` (the classic switch_root sequence: `mount --move . /` then `chroot .`).
pub fn switch_root(newroot: &Path) -> Result<(), AgentError> {
    for d in ["dev", "proc", "sys", "run"] {
        let target = newroot.join(d);
        sys::mkdir_p(&target)?;
        sys::move_mount(&Path::new("/").join(d), &target)?;
    }
    if root_is_initramfs() {
        let root_dev = std::fs::metadata("/")
            .map_err(AgentError::io("stat", "/"))?
            .dev();
        // Freeing is best effort: a leftover file only costs memory.
        let _ = remove_same_fs(Path::new("/"), root_dev);
    }
    std::env::set_current_dir(newroot).map_err(AgentError::io("chdir", newroot))?;
    sys::move_mount(Path::new("."), Path::new("/"))?;
    std::os::unix::fs::chroot(".").map_err(AgentError::io("chroot", newroot))?;
    std::env::set_current_dir("/").map_err(AgentError::io("chdir", "/"))?;
    Ok(())
}

fn root_is_initramfs() -> bool {
    // SAFETY: statfs is plain old data; all-zero is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: statfs fills the struct we pass; the path is a static C string.
    if unsafe { libc::statfs(c"/".as_ptr(), &mut st) } != 0 {
        return false;
    }
    let t = st.f_type as i64;
    t == RAMFS_MAGIC || t == TMPFS_MAGIC
}

/// Deletes everything under `dir` that lives on device `dev`, without crossing into other
/// filesystems (the new root and the moved mounts are mount points, so they are skipped).
pub fn remove_same_fs(dir: &Path, dev: u64) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let path = e?.path();
        let meta = std::fs::symlink_metadata(&path)?;
        if meta.dev() != dev {
            continue;
        }
        if meta.is_dir() {
            remove_same_fs(&path, dev)?;
            // Fails harmlessly when a mount point below kept it non-empty.
            let _ = std::fs::remove_dir(&path);
        } else {
            std::fs::remove_file(&path)?;
        }
    }
    Ok(())
}

/// The first of `candidates` that is an executable file under `root` (symlinks followed, which
/// is right once `root` is `/` after the chroot).
pub fn choose_init(root: &Path, candidates: &[&str]) -> Result<PathBuf, AgentError> {
    candidates
        .iter()
        .map(PathBuf::from)
        .find(|c| {
            std::fs::metadata(root.join(c.strip_prefix("/").unwrap_or(c)))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .ok_or_else(|| AgentError::NoInit(candidates.join(", ")))
}

/// execs `init` with no arguments and the kernel-given environment. Returns only on failure.
pub fn exec(init: &Path) -> AgentError {
    let path = sys::cstr(init);
    let argv = [path.as_ptr(), std::ptr::null()];
    // Rust's runtime ignores SIGPIPE, and an ignored signal survives exec: without this the
    // image's init and everything it starts would get EPIPE errors instead of SIGPIPE
    // (`yes | head` printing "Broken pipe").
    // SAFETY: restoring a signal's default disposition has no preconditions.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    // SAFETY: argv is a NULL-terminated array of valid C strings that outlive the call.
    unsafe { libc::execv(path.as_ptr(), argv.as_ptr()) };
    AgentError::io("exec", init)(std::io::Error::last_os_error())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exe(p: &Path) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn init_fallbacks_in_order() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        let defaults = banger_guest::config::DEFAULT_INITS;
        assert!(
            choose_init(r, &defaults)
                .unwrap_err()
                .to_string()
                .contains("/sbin/init, /lib/systemd/systemd, /bin/sh")
        );
        exe(&r.join("bin/sh"));
        assert_eq!(choose_init(r, &defaults).unwrap(), Path::new("/bin/sh"));
        exe(&r.join("lib/systemd/systemd"));
        // A relative symlink, as after the chroot an absolute one would resolve too.
        std::fs::create_dir_all(r.join("sbin")).unwrap();
        std::os::unix::fs::symlink("../lib/systemd/systemd", r.join("sbin/init")).unwrap();
        assert_eq!(choose_init(r, &defaults).unwrap(), Path::new("/sbin/init"));
        // Not executable: skipped.
        std::fs::write(r.join("custom"), "x").unwrap();
        assert!(choose_init(r, &["/custom"]).is_err());
        exe(&r.join("custom"));
        assert_eq!(choose_init(r, &["/custom"]).unwrap(), Path::new("/custom"));
    }

    #[test]
    fn exec_failure_is_reported() {
        let e = exec(Path::new("/nonexistent/init")).to_string();
        assert!(
            e.contains("/nonexistent/init") && e.contains("No such file"),
            "{e}"
        );
    }

    #[test]
    fn remove_same_fs_empties_a_tree() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("a/b")).unwrap();
        std::fs::write(d.path().join("a/b/f"), "x").unwrap();
        std::os::unix::fs::symlink("/etc", d.path().join("link")).unwrap();
        let dev = std::fs::metadata(d.path()).unwrap().dev();
        remove_same_fs(d.path(), dev).unwrap();
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
        // Nothing on another device is touched.
        std::fs::create_dir_all(d.path().join("keep")).unwrap();
        std::fs::write(d.path().join("keep/f"), "x").unwrap();
        remove_same_fs(d.path(), dev + 1).unwrap();
        assert!(d.path().join("keep/f").exists());
    }
}
