//! Cleaning `<state>/build`: the scratch trees of image builds, pulls and imports.
//!
//! An mmdebstrap that was interrupted (a cancelled request, or a daemon SIGKILLed under it)
//! can leave its processes running and the host's `/proc`, `/sys`, `/dev/pts` and `/dev/shm`
//! mounted inside its tree. A build tree is removed in this order: processes working in it
//! killed, mounts under it detached (deepest first), then the tree deleted without ever
//! crossing a mount point (`banger_sys::rmtree`), so a mount that could not be detached stops
//! the delete instead of losing host files.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Pids of this user's processes working in the tree `root`: their working directory or root
/// is `root` or under it, or an argument names a path in it (mmdebstrap itself runs from
/// elsewhere but names its target). `root` must be the tree's real path (no link in it), so
/// only processes inside the real build dir count; a process of another user is never listed
/// (`/proc/PID` belongs to the process's effective uid).
pub fn processes_in(proc_root: &Path, root: &Path) -> Vec<i32> {
    use std::os::unix::fs::MetadataExt;
    let named = root.as_os_str().as_encoded_bytes().to_vec();
    let Ok(entries) = std::fs::read_dir(proc_root) else {
        return Vec::new();
    };
    let me = std::process::id();
    let uid = nix::unistd::geteuid().as_raw();
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| u32::try_from(pid).ok() != Some(me))
        .filter(|pid| {
            std::fs::symlink_metadata(proc_root.join(pid.to_string())).is_ok_and(|m| m.uid() == uid)
        })
        .filter(|pid| {
            let dir = proc_root.join(pid.to_string());
            ["cwd", "root"]
                .iter()
                .any(|l| std::fs::read_link(dir.join(l)).is_ok_and(|t| t.starts_with(root)))
                || std::fs::read(dir.join("cmdline")).is_ok_and(|c| {
                    c.split(|b| *b == 0).any(|arg| {
                        arg.starts_with(&named) && matches!(arg.get(named.len()), None | Some(b'/'))
                    })
                })
        })
        .collect()
}

/// Removes one build tree (see the module docs). Errors name what stays and why. A link (or
/// any other non-directory) is unlinked, never followed: what it points to is not banger's.
pub fn clean(tree: &Path) -> Result<(), String> {
    let md = match std::fs::symlink_metadata(tree) {
        Ok(md) => md,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("{}: {e}", tree.display())),
    };
    if !md.is_dir() {
        return std::fs::remove_file(tree).map_err(|e| format!("{}: {e}", tree.display()));
    }
    // The real path of the tree itself (not a link, checked above) for the /proc comparison:
    // its parent resolved, its own name kept.
    let (Some(parent), Some(name)) = (tree.parent(), tree.file_name()) else {
        return Err(format!("{}: not a build tree", tree.display()));
    };
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    let real = std::fs::canonicalize(parent)
        .map_err(|e| format!("{}: {e}", parent.display()))?
        .join(name);
    for _ in 0..50 {
        let pids = processes_in(Path::new("/proc"), &real);
        if pids.is_empty() {
            break;
        }
        for pid in pids {
            // SAFETY: kill has no memory preconditions.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    banger_sys::mounts::unmount_under(&real).map_err(|e| e.to_string())?;
    banger_sys::rmtree::remove_tree(&real).map_err(|e| e.to_string())
}

/// Cleans every entry of the build dir (at daemon start nothing in it is in use); returns what
/// was removed and what could not be.
pub fn clean_all(build: &Path) -> (Vec<PathBuf>, Vec<String>) {
    let (mut removed, mut failed) = (Vec::new(), Vec::new());
    let Ok(entries) = std::fs::read_dir(build) else {
        return (removed, failed);
    };
    for e in entries.flatten() {
        let p = e.path();
        match clean(&p) {
            Ok(()) => removed.push(p),
            Err(err) => failed.push(err),
        }
    }
    (removed, failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_process_working_in_the_tree() {
        let t = tempfile::tempdir().unwrap();
        let real = std::fs::canonicalize(t.path()).unwrap();
        // GNU sleep refuses a path argument and exits at once; a shell keeps it as $1 (the
        // `; :` stops the shell from exec'ing sleep in its place).
        let mut named = std::process::Command::new("sh")
            .args(["-c", "sleep 30; :", "sh"])
            .arg(real.join("target"))
            .spawn()
            .unwrap();
        // Until it has exec'd, its command line is still this test's.
        let found = (0..100).any(|_| {
            std::thread::sleep(Duration::from_millis(20));
            processes_in(Path::new("/proc"), &real).contains(&(named.id() as i32))
        });
        assert!(found);
        let _ = named.kill();
        let _ = named.wait();
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .current_dir(&real)
            .spawn()
            .unwrap();
        let pid = i32::try_from(child.id()).unwrap();
        assert!(processes_in(Path::new("/proc"), &real).contains(&pid));
        assert!(!processes_in(Path::new("/proc"), &real.join("x")).contains(&pid));
        clean(&real).unwrap();
        let _ = child.wait();
        assert!(!real.exists());
    }

    #[test]
    fn a_link_in_the_build_dir_is_unlinked_not_followed() {
        // Probe finding 2: build/deps -> a precious tree outside; a process working there.
        let t = tempfile::tempdir().unwrap();
        let t = std::fs::canonicalize(t.path()).unwrap();
        let precious = t.join("precious");
        std::fs::create_dir_all(precious.join("sub")).unwrap();
        std::fs::write(precious.join("sub/data.txt"), b"keep").unwrap();
        let build = t.join("build");
        std::fs::create_dir_all(build.join("obj")).unwrap();
        std::os::unix::fs::symlink(&precious, build.join("deps")).unwrap();
        let mut outside = std::process::Command::new("sleep")
            .arg("30")
            .current_dir(&precious)
            .spawn()
            .unwrap();
        let (removed, failed) = clean_all(&build);
        assert!(failed.is_empty(), "{failed:?}");
        assert_eq!(removed.len(), 2);
        assert!(build.join("deps").symlink_metadata().is_err());
        assert!(!build.join("obj").exists());
        assert_eq!(
            std::fs::read(precious.join("sub/data.txt")).unwrap(),
            b"keep"
        );
        assert!(
            outside.try_wait().unwrap().is_none(),
            "a process working in the link's target was killed"
        );
        let _ = outside.kill();
        let _ = outside.wait();
    }

    #[test]
    fn another_users_process_is_never_listed() {
        if !nix::unistd::geteuid().is_root() {
            println!("SKIP: needs root to run a process as another user");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let real = std::fs::canonicalize(t.path()).unwrap();
        let tree = real.join("tree");
        std::fs::create_dir(&tree).unwrap();
        std::fs::set_permissions(&real, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let mut theirs = std::process::Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "sleep",
                "30",
            ])
            .current_dir(&tree)
            .spawn()
            .unwrap();
        let pid = i32::try_from(theirs.id()).unwrap();
        // Until setpriv has dropped to 65534, the process is still root's.
        let dropped = (0..100).any(|_| {
            std::thread::sleep(Duration::from_millis(20));
            std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|s| {
                s.lines()
                    .any(|l| l.starts_with("Uid:") && l.contains("65534"))
            })
        });
        assert!(dropped);
        assert!(!processes_in(Path::new("/proc"), &tree).contains(&pid));
        clean(&tree).unwrap();
        assert!(
            theirs.try_wait().unwrap().is_none(),
            "their process was killed"
        );
        let _ = theirs.kill();
        let _ = theirs.wait();
    }
}
