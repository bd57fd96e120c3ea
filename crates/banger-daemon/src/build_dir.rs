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

/// Pids of processes working in the tree `root`: their working directory or root is `root` or
/// under it, or an argument names a path in it (mmdebstrap itself runs from elsewhere but names
/// its target). Only processes whose `/proc/PID` entries this user may read.
pub fn processes_in(proc_root: &Path, root: &Path) -> Vec<i32> {
    let named = root.as_os_str().as_encoded_bytes().to_vec();
    let Ok(entries) = std::fs::read_dir(proc_root) else {
        return Vec::new();
    };
    let me = std::process::id();
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| u32::try_from(pid).ok() != Some(me))
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

/// Removes one build tree (see the module docs). Errors name what stays and why.
pub fn clean(tree: &Path) -> Result<(), String> {
    let real = match std::fs::canonicalize(tree) {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("{}: {e}", tree.display())),
    };
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
        let mut named = std::process::Command::new("sleep")
            .arg("30")
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
}
