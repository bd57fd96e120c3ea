//! Deleting a directory tree banger does not fully trust (build trees, VM dirs, scratch dirs,
//! staging dirs): never through a symlink, never across a mount point.
//!
//! `std::fs::remove_dir_all` does not follow symlinks, but it descends into whatever is mounted
//! inside the tree: an interrupted mmdebstrap leaves the host's `/proc`, `/sys`, `/dev/pts` and
//! `/dev/shm` mounted under the build dir, and deleting through them deletes host files. No
//! crate offers a remove that stops at mount points, so this one walks with `openat`/`unlinkat`
//! from descriptors (no path is resolved twice) and compares each entry's mount id
//! (`statx(STATX_MNT_ID)`, or `st_dev` on kernels without it) with the tree's: an entry on
//! another mount is left in place and reported, everything else is deleted.

use std::ffi::{CStr, CString, OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

/// Deeper trees are refused (each level holds a descriptor).
pub const MAX_DEPTH: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum RemoveError {
    #[error("not deleting {path}: it is a mount point (unmount it first)")]
    MountPoint { path: PathBuf },
    #[error("not deleting {path}: deeper than {MAX_DEPTH} levels")]
    TooDeep { path: PathBuf },
    #[error("deleting {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Where an entry lives: its mount and inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Identity {
    /// The mount id when the kernel reports it, else the device number.
    mount: u64,
    ino: u64,
    is_dir: bool,
}

fn last_error(path: &Path) -> RemoveError {
    RemoveError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::last_os_error(),
    }
}

fn cstring(name: &OsStr, path: &Path) -> Result<CString, RemoveError> {
    CString::new(name.as_bytes()).map_err(|_| RemoveError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
    })
}

/// `statx` of `name` in `dirfd` (or of `dirfd` itself for an empty name), never following a
/// symlink. `None` when the entry is gone.
fn identity(dirfd: libc::c_int, name: &CStr, path: &Path) -> Result<Option<Identity>, RemoveError> {
    let mut stx: libc::statx = unsafe_zeroed_statx();
    let flags = libc::AT_SYMLINK_NOFOLLOW
        | libc::AT_NO_AUTOMOUNT
        | if name.is_empty() {
            libc::AT_EMPTY_PATH
        } else {
            0
        };
    // SAFETY: `name` is NUL-terminated, `stx` is a valid out-pointer for the call's duration.
    let rc = unsafe {
        libc::statx(
            dirfd,
            name.as_ptr(),
            flags,
            libc::STATX_TYPE | libc::STATX_INO | libc::STATX_MNT_ID,
            &mut stx,
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::NotFound {
            return Ok(None);
        }
        return Err(RemoveError::Io {
            path: path.to_path_buf(),
            source: e,
        });
    }
    let mount = if stx.stx_mask & libc::STATX_MNT_ID != 0 {
        stx.stx_mnt_id
    } else {
        (u64::from(stx.stx_dev_major) << 32) | u64::from(stx.stx_dev_minor)
    };
    Ok(Some(Identity {
        mount,
        ino: stx.stx_ino,
        is_dir: u32::from(stx.stx_mode) & libc::S_IFMT == libc::S_IFDIR,
    }))
}

fn unsafe_zeroed_statx() -> libc::statx {
    // SAFETY: statx is a plain C struct of integers; all-zero is a valid value.
    unsafe { std::mem::zeroed() }
}

/// An open directory descriptor, closed on drop.
struct DirFd(libc::c_int);

impl Drop for DirFd {
    fn drop(&mut self) {
        // SAFETY: we own the descriptor.
        unsafe { libc::close(self.0) };
    }
}

fn open_dir(dirfd: libc::c_int, name: &CStr, path: &Path) -> Result<DirFd, RemoveError> {
    // SAFETY: `name` is NUL-terminated; the flags forbid following a symlink.
    let fd = unsafe {
        libc::openat(
            dirfd,
            name.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(last_error(path));
    }
    Ok(DirFd(fd))
}

/// The names in the directory `fd` (without `.` and `..`).
fn list(fd: &DirFd, path: &Path) -> Result<Vec<OsString>, RemoveError> {
    // SAFETY: dup of a descriptor we own; fdopendir takes over the copy.
    let copy = unsafe { libc::fcntl(fd.0, libc::F_DUPFD_CLOEXEC, 0) };
    if copy < 0 {
        return Err(last_error(path));
    }
    // SAFETY: `copy` is an open directory descriptor.
    let dir = unsafe { libc::fdopendir(copy) };
    if dir.is_null() {
        let e = last_error(path);
        // SAFETY: fdopendir failed, so the copy is still ours.
        unsafe { libc::close(copy) };
        return Err(e);
    }
    // SAFETY: rewinding a fresh stream is always valid (the descriptor's offset is shared).
    unsafe { libc::rewinddir(dir) };
    let mut names = Vec::new();
    loop {
        // SAFETY: `dir` is a valid stream; the entry is copied out before the next call.
        let ent = unsafe { libc::readdir(dir) };
        if ent.is_null() {
            break;
        }
        // SAFETY: d_name is NUL-terminated within the entry.
        let name = unsafe { CStr::from_ptr((*ent).d_name.as_ptr()) };
        let bytes = name.to_bytes();
        if bytes != b"." && bytes != b".." {
            names.push(OsString::from_vec(bytes.to_vec()));
        }
    }
    // SAFETY: closes the stream and its descriptor copy.
    unsafe { libc::closedir(dir) };
    Ok(names)
}

fn unlink_at(dirfd: libc::c_int, name: &CStr, dir: bool, path: &Path) -> Result<(), RemoveError> {
    let flags = if dir { libc::AT_REMOVEDIR } else { 0 };
    // SAFETY: `name` is NUL-terminated.
    if unsafe { libc::unlinkat(dirfd, name.as_ptr(), flags) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::NotFound {
            return Err(RemoveError::Io {
                path: path.to_path_buf(),
                source: e,
            });
        }
    }
    Ok(())
}

/// Deletes the contents of `fd` (at `path`, on mount `mount`); entries named in `last` go after
/// all others, in that order, and only if all others went. Keeps going past other errors and
/// returns the first.
fn remove_contents(
    fd: &DirFd,
    path: &Path,
    mount: u64,
    depth: usize,
    last: &[&OsStr],
) -> Result<(), RemoveError> {
    if depth > MAX_DEPTH {
        return Err(RemoveError::TooDeep {
            path: path.to_path_buf(),
        });
    }
    let mut names = list(fd, path)?;
    names.sort_by_key(|n| last.iter().position(|l| *l == n.as_os_str()));
    let mut first_err = None;
    for name in names {
        if first_err.is_some() && last.contains(&name.as_os_str()) {
            // Something else stays: so does the mark standing for it.
            break;
        }
        let child = path.join(&name);
        if let Err(e) = remove_entry(fd, &name, &child, mount, depth) {
            first_err.get_or_insert(e);
        }
    }
    first_err.map_or(Ok(()), Err)
}

fn remove_entry(
    parent: &DirFd,
    name: &OsStr,
    path: &Path,
    mount: u64,
    depth: usize,
) -> Result<(), RemoveError> {
    let c = cstring(name, path)?;
    let Some(id) = identity(parent.0, &c, path)? else {
        return Ok(());
    };
    if id.mount != mount {
        return Err(RemoveError::MountPoint {
            path: path.to_path_buf(),
        });
    }
    if !id.is_dir {
        return unlink_at(parent.0, &c, false, path);
    }
    let child = open_dir(parent.0, &c, path)?;
    // The directory opened must be the one inspected (not swapped in between), on this mount.
    let opened = identity(child.0, c"", path)?.ok_or_else(|| last_error(path))?;
    if opened.mount != mount {
        return Err(RemoveError::MountPoint {
            path: path.to_path_buf(),
        });
    }
    if opened.ino != id.ino {
        return Err(RemoveError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::other("replaced while being deleted"),
        });
    }
    remove_contents(&child, path, mount, depth + 1, &[])?;
    drop(child);
    unlink_at(parent.0, &c, true, path)
}

/// Deletes `path` and everything under it, on its own filesystem only: symlinks are removed,
/// never followed; a mount point inside (or `path` itself being one) stops the delete there
/// with [`RemoveError::MountPoint`] after everything else is gone. A missing `path` is fine.
pub fn remove_tree(path: &Path) -> Result<(), RemoveError> {
    remove_tree_last(path, &[])
}

/// [`remove_tree`], deleting the top-level entries named in `last` after all the others, in
/// that order, before the directory itself: a mark such as `.deleting` disappears only once
/// everything it stands for is gone, so an interrupted delete still carries it.
pub fn remove_tree_last(path: &Path, last: &[&OsStr]) -> Result<(), RemoveError> {
    let (parent_path, name) = match (path.parent(), path.file_name()) {
        (Some(p), Some(n)) => (
            if p.as_os_str().is_empty() {
                Path::new(".")
            } else {
                p
            },
            n,
        ),
        _ => {
            return Err(RemoveError::Io {
                path: path.to_path_buf(),
                source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
            });
        }
    };
    let pc = cstring(parent_path.as_os_str(), parent_path)?;
    let parent = match open_dir(libc::AT_FDCWD, &pc, parent_path) {
        Ok(p) => p,
        Err(RemoveError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    let parent_id = identity(parent.0, c"", parent_path)?.ok_or_else(|| last_error(parent_path))?;
    let c = cstring(name, path)?;
    let Some(id) = identity(parent.0, &c, path)? else {
        return Ok(());
    };
    if id.mount != parent_id.mount {
        return Err(RemoveError::MountPoint {
            path: path.to_path_buf(),
        });
    }
    if !id.is_dir {
        return unlink_at(parent.0, &c, false, path);
    }
    let dir = open_dir(parent.0, &c, path)?;
    let opened = identity(dir.0, c"", path)?.ok_or_else(|| last_error(path))?;
    if opened.mount != id.mount || opened.ino != id.ino {
        return Err(RemoveError::MountPoint {
            path: path.to_path_buf(),
        });
    }
    remove_contents(&dir, path, id.mount, 0, last)?;
    drop(dir);
    unlink_at(parent.0, &c, true, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removes_a_tree_without_following_symlinks() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("keep"), b"x").unwrap();
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("tree");
        std::fs::create_dir_all(root.join("a/b/c")).unwrap();
        std::fs::write(root.join("a/b/c/f"), b"1").unwrap();
        std::fs::write(root.join("top"), b"1").unwrap();
        std::os::unix::fs::symlink(outside.path(), root.join("a/link")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("keep"), root.join("flink")).unwrap();
        remove_tree(&root).unwrap();
        assert!(!root.exists());
        assert!(outside.path().join("keep").exists());
        // Missing is fine; a symlink given as the root is removed, not followed.
        remove_tree(&root).unwrap();
        let l = t.path().join("l");
        std::os::unix::fs::symlink(outside.path(), &l).unwrap();
        remove_tree(&l).unwrap();
        assert!(std::fs::symlink_metadata(&l).is_err());
        assert!(outside.path().join("keep").exists());
    }

    #[test]
    fn named_entries_go_last() {
        // That the mark stays when something else cannot go is checked with a mount point
        // (below, root only).
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("vm");
        std::fs::create_dir_all(root.join("d")).unwrap();
        std::fs::write(root.join(".deleting"), b"x").unwrap();
        std::fs::write(root.join("root.ext4"), b"x").unwrap();
        remove_tree_last(&root, &[OsStr::new(".deleting")]).unwrap();
        assert!(!root.exists());
    }

    #[test]
    fn stops_at_a_mount_point_and_keeps_the_mark() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIP: mounting a tmpfs needs root");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("build");
        let mnt = root.join("rootfs/dev/shm");
        std::fs::create_dir_all(&mnt).unwrap();
        std::fs::write(root.join(".deleting"), b"x").unwrap();
        std::fs::write(root.join("rootfs/file"), b"x").unwrap();
        let c = CString::new(mnt.as_os_str().as_bytes()).unwrap();
        // SAFETY: valid NUL-terminated strings.
        let rc = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                c.as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
        std::fs::write(mnt.join("host-file"), b"precious").unwrap();
        let err = remove_tree_last(&root, &[OsStr::new(".deleting")]).unwrap_err();
        assert!(
            matches!(err, RemoveError::MountPoint { ref path } if *path == mnt),
            "{err}"
        );
        assert!(mnt.join("host-file").exists(), "deleted through the mount");
        assert!(
            root.join(".deleting").exists(),
            "the mark went before the tree"
        );
        assert!(!root.join("rootfs/file").exists());
        // Given the mount point itself, it refuses too.
        assert!(matches!(
            remove_tree(&mnt),
            Err(RemoveError::MountPoint { .. })
        ));
        // SAFETY: valid NUL-terminated path.
        assert_eq!(unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) }, 0);
        remove_tree(&root).unwrap();
        assert!(!root.exists());
    }
}
