//! Symlink-proof path resolution.
//!
//! A path from a request is never handed to the kernel as a string while root. It is walked from
//! `/` one component at a time with `openat(dir_fd, component, O_PATH | O_NOFOLLOW)`: every
//! component is checked on the object actually opened (a symlink at any level is refused, every
//! directory must be owned by root or the owner and writable by nobody else), and the next
//! component is looked up relative to that descriptor. Renaming or swapping anything along the
//! path after it was checked cannot redirect the walk, because the walk never goes back to a
//! name it has already resolved.

use std::ffi::CString;
use std::fmt;
use std::os::fd::{AsFd, OwnedFd};

use nix::errno::Errno;
use nix::fcntl::{AT_FDCWD, OFlag, openat};
use nix::sys::stat::{FileStat, Mode, SFlag, fstat};

/// Why a walk stopped. Every variant names the path up to the component at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WalkError {
    Missing(String),
    Symlink(String),
    NotADirectory(String),
    NotARegularFile { path: String, kind: &'static str },
    Owner { path: String, uid: u32, owner: u32 },
    HardLinked { path: String, links: u64 },
    Writable { path: String, mode: u32 },
    Exists(String),
    Io { path: String, errno: Errno },
}

impl fmt::Display for WalkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WalkError::Missing(p) => write!(f, "{p:?} does not exist"),
            WalkError::Symlink(p) => write!(f, "{p:?} is a symlink; banger's paths never are"),
            WalkError::NotADirectory(p) => write!(f, "{p:?} is not a directory"),
            WalkError::NotARegularFile { path, kind } => {
                write!(f, "{path:?} is a {kind}, not a regular file")
            }
            WalkError::Owner { path, uid, owner } => write!(
                f,
                "{path:?} is owned by uid {uid}, neither root nor the owner (uid {owner})"
            ),
            WalkError::HardLinked { path, links } => write!(
                f,
                "{path:?} is root's and has {links} links; a root-owned file must have one"
            ),
            WalkError::Writable { path, mode } => write!(
                f,
                "{path:?} (mode {mode:04o}) is writable by group or others"
            ),
            WalkError::Exists(p) => write!(f, "{p:?} already exists"),
            WalkError::Io { path, errno } => write!(f, "{path:?}: {}", errno.desc()),
        }
    }
}

impl std::error::Error for WalkError {}

fn kind_of(st: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits())
}

/// A short name for a file type, for messages.
pub fn kind_name(st: &FileStat) -> &'static str {
    match kind_of(st) {
        SFlag::S_IFDIR => "directory",
        SFlag::S_IFLNK => "symlink",
        SFlag::S_IFREG => "regular file",
        SFlag::S_IFBLK => "block device",
        SFlag::S_IFCHR => "character device",
        SFlag::S_IFIFO => "FIFO",
        SFlag::S_IFSOCK => "socket",
        _ => "file of unknown type",
    }
}

pub fn is_regular(st: &FileStat) -> bool {
    kind_of(st) == SFlag::S_IFREG
}

pub fn is_socket(st: &FileStat) -> bool {
    kind_of(st) == SFlag::S_IFSOCK
}

fn opath(dir: impl AsFd, name: &str, shown: &str) -> Result<OwnedFd, WalkError> {
    let c = CString::new(name).map_err(|_| WalkError::Io {
        path: shown.to_string(),
        errno: Errno::EINVAL,
    })?;
    openat(
        dir,
        c.as_c_str(),
        OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|errno| match errno {
        Errno::ENOENT => WalkError::Missing(shown.to_string()),
        Errno::ENOTDIR => WalkError::NotADirectory(shown.to_string()),
        errno => WalkError::Io {
            path: shown.to_string(),
            errno,
        },
    })
}

fn stat(fd: &OwnedFd, shown: &str) -> Result<FileStat, WalkError> {
    fstat(fd).map_err(|errno| WalkError::Io {
        path: shown.to_string(),
        errno,
    })
}

/// The directory rule: owned by root or the owner, and not writable by group or others unless
/// the sticky bit makes that harmless (`/tmp`, `/var/tmp`: nobody can rename another user's
/// entry there).
fn check_dir(st: &FileStat, shown: &str, owner: u32) -> Result<(), WalkError> {
    if kind_of(st) == SFlag::S_IFLNK {
        return Err(WalkError::Symlink(shown.to_string()));
    }
    if kind_of(st) != SFlag::S_IFDIR {
        return Err(WalkError::NotADirectory(shown.to_string()));
    }
    if st.st_uid != 0 && st.st_uid != owner {
        return Err(WalkError::Owner {
            path: shown.to_string(),
            uid: st.st_uid,
            owner,
        });
    }
    let mode = st.st_mode & 0o7777;
    if mode & 0o022 != 0 && mode & 0o1000 == 0 {
        return Err(WalkError::Writable {
            path: shown.to_string(),
            mode,
        });
    }
    Ok(())
}

/// Joins components into the absolute path they spell (for messages).
pub fn join(comps: &[&str]) -> String {
    if comps.is_empty() {
        "/".to_string()
    } else {
        comps.iter().fold(String::new(), |mut s, c| {
            s.push('/');
            s.push_str(c);
            s
        })
    }
}

/// Walks `/` + `comps` (each a single, already validated component) and returns an `O_PATH`
/// descriptor of the final directory. Every level, `/` included, must be a real directory
/// (never a symlink) that passes the directory rule for `owner`.
pub fn walk_dir(comps: &[&str], owner: u32) -> Result<OwnedFd, WalkError> {
    let root = openat(
        AT_FDCWD,
        "/",
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|errno| WalkError::Io {
        path: "/".into(),
        errno,
    })?;
    check_dir(&stat(&root, "/")?, "/", owner)?;
    let mut fd = root;
    for (i, c) in comps.iter().enumerate() {
        let shown = join(&comps[..=i]);
        let next = opath(&fd, c, &shown)?;
        check_dir(&stat(&next, &shown)?, &shown, owner)?;
        fd = next;
    }
    Ok(fd)
}

/// Opens entry `name` of `dir` without following it; returns the `O_PATH` descriptor and what
/// it is. `shown` is the entry's full path, for messages.
pub fn open_entry(
    dir: &OwnedFd,
    name: &str,
    shown: &str,
) -> Result<(OwnedFd, FileStat), WalkError> {
    let fd = opath(dir, name, shown)?;
    let st = stat(&fd, shown)?;
    if kind_of(&st) == SFlag::S_IFLNK {
        return Err(WalkError::Symlink(shown.to_string()));
    }
    Ok((fd, st))
}

/// Opens regular file `name` of `dir` (never through a symlink), owned by the owner or by root;
/// a root-owned file must have a single link, so it cannot be a hard link to a system file
/// planted in banger's tree.
pub fn open_regular(
    dir: &OwnedFd,
    name: &str,
    shown: &str,
    owner: u32,
) -> Result<(OwnedFd, FileStat), WalkError> {
    let (fd, st) = open_entry(dir, name, shown)?;
    if !is_regular(&st) {
        return Err(WalkError::NotARegularFile {
            path: shown.to_string(),
            kind: kind_name(&st),
        });
    }
    if st.st_uid != owner && st.st_uid != 0 {
        return Err(WalkError::Owner {
            path: shown.to_string(),
            uid: st.st_uid,
            owner,
        });
    }
    if st.st_uid == 0 && st.st_nlink != 1 {
        return Err(WalkError::HardLinked {
            path: shown.to_string(),
            links: st.st_nlink,
        });
    }
    Ok((fd, st))
}

/// Succeeds only if `dir` has no entry `name` (not even a dangling symlink).
pub fn must_be_absent(dir: &OwnedFd, name: &str, shown: &str) -> Result<(), WalkError> {
    match opath(dir, name, shown) {
        Ok(_) => Err(WalkError::Exists(shown.to_string())),
        Err(WalkError::Missing(_)) => Ok(()),
        Err(e) => Err(e),
    }
}

/// `/proc/self/fd/<fd>`: the path of an open descriptor. Opening or binding through it reaches
/// exactly the object the descriptor holds, whatever has been renamed since.
pub fn proc_path(fd: &impl std::os::fd::AsRawFd) -> String {
    format!("/proc/self/fd/{}", fd.as_raw_fd())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{PermissionsExt, symlink};
    use std::path::Path;

    fn me() -> u32 {
        nix::unistd::geteuid().as_raw()
    }

    fn comps(p: &Path) -> Vec<String> {
        p.to_str()
            .unwrap()
            .split('/')
            .filter(|c| !c.is_empty())
            .map(str::to_string)
            .collect()
    }

    fn walk(p: &Path) -> Result<OwnedFd, WalkError> {
        let c = comps(p);
        let c: Vec<&str> = c.iter().map(String::as_str).collect();
        walk_dir(&c, me())
    }

    #[test]
    fn walks_real_directories_and_refuses_symlinks_at_any_level() {
        let d = tempfile::tempdir().unwrap();
        let base = d.path();
        std::fs::create_dir_all(base.join("a/b/c")).unwrap();
        walk(&base.join("a/b/c")).unwrap();
        walk(Path::new("/")).unwrap();

        symlink(base.join("a"), base.join("la")).unwrap();
        symlink(base.join("a/b"), base.join("a/lb")).unwrap();
        symlink(base.join("a/b/c"), base.join("a/b/lc")).unwrap();
        for (p, at) in [
            (base.join("la/b/c"), base.join("la")),
            (base.join("a/lb/c"), base.join("a/lb")),
            (base.join("a/b/lc"), base.join("a/b/lc")),
        ] {
            let e = walk(&p).unwrap_err();
            assert_eq!(e, WalkError::Symlink(at.display().to_string()), "{p:?}");
        }
        assert!(matches!(
            walk(&base.join("a/nope")),
            Err(WalkError::Missing(_))
        ));
        std::fs::write(base.join("a/file"), b"x").unwrap();
        assert!(matches!(
            walk(&base.join("a/file/x")),
            Err(WalkError::NotADirectory(_))
        ));
    }

    #[test]
    fn directory_permissions_matter() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("open");
        std::fs::create_dir(&p).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(matches!(walk(&p), Err(WalkError::Writable { .. })));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o1777)).unwrap();
        walk(&p).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o770)).unwrap();
        assert!(matches!(walk(&p), Err(WalkError::Writable { .. })));
        // Another user's directory.
        if me() == 0 {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o700)).unwrap();
            std::os::unix::fs::chown(&p, Some(54321), None).unwrap();
            let e = walk(&p).unwrap_err();
            assert!(matches!(e, WalkError::Owner { uid: 54321, .. }), "{e}");
        }
    }

    #[test]
    fn regular_files_and_absence() {
        let d = tempfile::tempdir().unwrap();
        let dir = walk(d.path()).unwrap();
        std::fs::write(d.path().join("f"), b"x").unwrap();
        std::fs::create_dir(d.path().join("sub")).unwrap();
        symlink("/etc/passwd", d.path().join("l")).unwrap();
        symlink("/nonexistent", d.path().join("dangling")).unwrap();
        let (_, st) = open_regular(&dir, "f", "f", me()).unwrap();
        assert!(is_regular(&st));
        assert!(matches!(
            open_regular(&dir, "sub", "sub", me()),
            Err(WalkError::NotARegularFile {
                kind: "directory",
                ..
            })
        ));
        assert_eq!(
            open_regular(&dir, "l", "l", me()).unwrap_err(),
            WalkError::Symlink("l".into())
        );
        must_be_absent(&dir, "new", "new").unwrap();
        assert_eq!(
            must_be_absent(&dir, "f", "f").unwrap_err(),
            WalkError::Exists("f".into())
        );
        assert_eq!(
            must_be_absent(&dir, "dangling", "dangling").unwrap_err(),
            WalkError::Exists("dangling".into())
        );
    }

    #[test]
    fn root_owned_hard_links_are_refused() {
        if me() != 0 {
            println!("SKIP: needs root to own files as root while the owner is someone else");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let dir = walk(d.path()).unwrap();
        std::fs::write(d.path().join("f"), b"x").unwrap();
        // Root-owned, one link: fine for any owner.
        open_regular(&dir, "f", "f", 4242).unwrap();
        std::fs::hard_link(d.path().join("f"), d.path().join("g")).unwrap();
        let e = open_regular(&dir, "f", "f", 4242).unwrap_err();
        assert_eq!(
            e,
            WalkError::HardLinked {
                path: "f".into(),
                links: 2
            }
        );
        assert!(e.to_string().contains("2 links"), "{e}");
        // The owner's own file may have links.
        std::os::unix::fs::chown(d.path().join("f"), Some(4242), None).unwrap();
        open_regular(&dir, "f", "f", 4242).unwrap();
    }

    #[test]
    fn messages_name_the_path() {
        let e = WalkError::Symlink("/var/lib/banger/images".into());
        assert!(
            e.to_string()
                .contains("\"/var/lib/banger/images\" is a symlink")
        );
        assert_eq!(join(&[]), "/");
        assert_eq!(join(&["a", "b"]), "/a/b");
    }
}
