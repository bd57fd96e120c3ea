//! Seeding the work disk from the image's `/root` on its first use.
//!
//! The copy keeps modes, owners, symlinks, device nodes and timestamps, so dotfiles shipped in an
//! image behave the same on the work disk. A marker file written last (and synced) makes the
//! seeding happen exactly once; an interrupted seed is redone on the next boot.

use std::ffi::CString;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use crate::error::AgentError;

/// Written at the top of the work disk once it has been seeded.
pub const MARKER: &str = ".banger-seeded";

/// Seeds `work` from `image_root` unless `work` carries the marker. Returns whether it copied.
pub fn seed_if_needed(image_root: &Path, work: &Path) -> Result<bool, AgentError> {
    let marker = work.join(MARKER);
    if marker.exists() {
        return Ok(false);
    }
    if std::fs::symlink_metadata(image_root).is_ok_and(|m| m.is_dir()) {
        copy_tree(image_root, work)?;
    }
    let f = std::fs::File::create(&marker).map_err(AgentError::io("writing", &marker))?;
    // The marker must not reach the disk before the files it vouches for.
    // SAFETY: syncfs on an fd we own.
    unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&f)) };
    Ok(true)
}

fn c(p: &Path) -> CString {
    crate::sys::cstr(p)
}

/// Copies the metadata of `meta` onto `dst` without following a symlink at `dst`.
fn apply_metadata(dst: &Path, meta: &std::fs::Metadata) -> Result<(), AgentError> {
    let cp = c(dst);
    // SAFETY: cp is a valid C string for the duration of each call.
    if unsafe { libc::lchown(cp.as_ptr(), meta.uid(), meta.gid()) } != 0 {
        return Err(AgentError::io("chown", dst)(std::io::Error::last_os_error()));
    }
    if !meta.file_type().is_symlink() {
        // After chown: chown clears set-id bits.
        std::fs::set_permissions(dst, std::fs::Permissions::from_mode(meta.mode() & 0o7777))
            .map_err(AgentError::io("chmod", dst))?;
    }
    let times = [
        libc::timespec {
            tv_sec: meta.atime(),
            tv_nsec: meta.atime_nsec(),
        },
        libc::timespec {
            tv_sec: meta.mtime(),
            tv_nsec: meta.mtime_nsec(),
        },
    ];
    // SAFETY: valid path and a two-element timespec array.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            cp.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc != 0 {
        return Err(AgentError::io("setting times on", dst)(
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Recursively copies the contents of directory `src` into directory `dst` (which may exist),
/// then gives `dst` the metadata of `src`. Returns the number of entries copied.
pub fn copy_tree(src: &Path, dst: &Path) -> Result<u64, AgentError> {
    let mut count = 0;
    let entries = std::fs::read_dir(src).map_err(AgentError::io("reading directory", src))?;
    for entry in entries {
        let entry = entry.map_err(AgentError::io("reading directory", src))?;
        let from = entry.path();
        let to = dst.join(entry.file_name());
        let meta = std::fs::symlink_metadata(&from).map_err(AgentError::io("stat", &from))?;
        let ft = meta.file_type();
        // Replace whatever non-directory is in the way (a fresh ext4 only has lost+found).
        if let Ok(existing) = std::fs::symlink_metadata(&to)
            && !(existing.is_dir() && ft.is_dir())
        {
            let r = if existing.is_dir() {
                std::fs::remove_dir_all(&to)
            } else {
                std::fs::remove_file(&to)
            };
            r.map_err(AgentError::io("removing", &to))?;
        }
        if ft.is_dir() {
            if !to.exists() {
                std::fs::create_dir(&to).map_err(AgentError::io("creating directory", &to))?;
            }
            count += copy_tree(&from, &to)?;
            continue; // copy_tree applied the metadata.
        } else if ft.is_symlink() {
            let target =
                std::fs::read_link(&from).map_err(AgentError::io("reading link", &from))?;
            std::os::unix::fs::symlink(&target, &to)
                .map_err(AgentError::io("creating symlink", &to))?;
        } else if ft.is_file() {
            std::fs::copy(&from, &to).map_err(AgentError::io("copying to", &to))?;
        } else {
            // FIFOs and device nodes; sockets are runtime objects and are not copied.
            use std::os::unix::fs::FileTypeExt;
            if ft.is_socket() {
                continue;
            }
            let cp = c(&to);
            // SAFETY: valid path; mode and dev come from lstat of the source.
            if unsafe { libc::mknod(cp.as_ptr(), meta.mode(), meta.rdev()) } != 0 {
                return Err(AgentError::io("mknod", &to)(std::io::Error::last_os_error()));
            }
        }
        apply_metadata(&to, &meta)?;
        count += 1;
    }
    let meta = std::fs::symlink_metadata(src).map_err(AgentError::io("stat", src))?;
    apply_metadata(dst, &meta)?;
    Ok(count + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set_mtime(p: &Path, secs: i64) {
        let times = [
            libc::timespec {
                tv_sec: secs,
                tv_nsec: 0,
            },
            libc::timespec {
                tv_sec: secs,
                tv_nsec: 0,
            },
        ];
        let cp = c(p);
        // SAFETY: valid path and times array.
        let rc = unsafe {
            libc::utimensat(
                libc::AT_FDCWD,
                cp.as_ptr(),
                times.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        assert_eq!(rc, 0);
    }

    #[test]
    fn copies_modes_links_and_times_once() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("image-root");
        let work = d.path().join("work");
        std::fs::create_dir_all(src.join(".config/app")).unwrap();
        std::fs::create_dir_all(work.join("lost+found")).unwrap();
        std::fs::write(src.join(".bashrc"), "PS1='$ '\n").unwrap();
        std::fs::write(src.join(".config/app/secret"), "s3cret").unwrap();
        std::fs::set_permissions(
            src.join(".config/app/secret"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        std::os::unix::fs::symlink(".bashrc", src.join(".profile")).unwrap();
        std::os::unix::fs::symlink("/nonexistent/target", src.join("dangling")).unwrap();
        std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o700)).unwrap();
        set_mtime(&src.join(".bashrc"), 1_000_000);
        set_mtime(&src.join("dangling"), 2_000_000);
        set_mtime(&src.join(".config"), 3_000_000);

        assert!(seed_if_needed(&src, &work).unwrap());
        assert_eq!(
            std::fs::read_to_string(work.join(".bashrc")).unwrap(),
            "PS1='$ '\n"
        );
        let secret = std::fs::metadata(work.join(".config/app/secret")).unwrap();
        assert_eq!(secret.mode() & 0o7777, 0o600);
        assert_eq!(
            std::fs::read_link(work.join(".profile")).unwrap(),
            Path::new(".bashrc")
        );
        assert_eq!(
            std::fs::read_link(work.join("dangling")).unwrap(),
            Path::new("/nonexistent/target")
        );
        assert_eq!(
            std::fs::metadata(work.join(".bashrc")).unwrap().mtime(),
            1_000_000
        );
        assert_eq!(
            std::fs::symlink_metadata(work.join("dangling"))
                .unwrap()
                .mtime(),
            2_000_000
        );
        assert_eq!(
            std::fs::metadata(work.join(".config")).unwrap().mtime(),
            3_000_000
        );
        assert_eq!(std::fs::metadata(&work).unwrap().mode() & 0o7777, 0o700);
        let src_owner = std::fs::metadata(src.join(".bashrc")).unwrap().uid();
        assert_eq!(
            std::fs::metadata(work.join(".bashrc")).unwrap().uid(),
            src_owner
        );
        assert!(work.join("lost+found").is_dir());
        assert!(work.join(MARKER).exists());

        // Second boot: the user's changes are kept, nothing is copied again.
        std::fs::write(work.join(".bashrc"), "mine\n").unwrap();
        assert!(!seed_if_needed(&src, &work).unwrap());
        assert_eq!(
            std::fs::read_to_string(work.join(".bashrc")).unwrap(),
            "mine\n"
        );
    }

    #[test]
    fn image_without_root_dir_still_marks() {
        let d = tempfile::tempdir().unwrap();
        let work = d.path().join("work");
        std::fs::create_dir(&work).unwrap();
        assert!(seed_if_needed(&d.path().join("absent"), &work).unwrap());
        assert!(work.join(MARKER).exists());
    }

    #[test]
    fn fifo_is_recreated_and_errors_name_paths() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("s");
        std::fs::create_dir(&src).unwrap();
        let fifo = c(&src.join("pipe"));
        // SAFETY: valid path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o640) }, 0);
        let dst = d.path().join("d");
        std::fs::create_dir(&dst).unwrap();
        assert_eq!(copy_tree(&src, &dst).unwrap(), 2);
        use std::os::unix::fs::FileTypeExt;
        let m = std::fs::symlink_metadata(dst.join("pipe")).unwrap();
        assert!(m.file_type().is_fifo());
        assert_eq!(m.mode() & 0o777, 0o640);
        let e = copy_tree(&d.path().join("missing"), &dst)
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing"), "{e}");
    }
}
