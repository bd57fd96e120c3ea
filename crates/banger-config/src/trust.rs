//! Whether a directory or socket in a shared place can be trusted by the user running banger.
//!
//! The fallback runtime dir is `/tmp/banger-<uid>`: any local user can create that name before
//! us, and a socket there answering as bangerd could steer the CLI. A path is trusted when no
//! other account can have put or replaced anything on it: the leaf and every directory above it
//! (symbolic links resolved) belong to the user or root, and none is writable by group or
//! others, except a sticky ancestor such as `/tmp` (where others cannot replace our entries).
//! Links are judged before they are followed: every component of the path as written is
//! lstat'ed, and a link owned by another account (`/tmp/banger-<uid>` -> somewhere of yours,
//! planted by someone else) is refused, as is a leaf that is a link in a shared directory.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// Why a path is not trusted; the text names the path and its owner.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrustError {
    #[error(
        "refusing to use {path}: it is owned by uid {owner}, not by you (uid {uid}) or root; another user may have planted it (remove it, or set XDG_RUNTIME_DIR / runtime_dir to a private directory)"
    )]
    ForeignOwner { path: PathBuf, owner: u32, uid: u32 },
    #[error(
        "refusing to use {path}: it is writable by group or others (mode {mode:04o}, owner uid {owner}); make it private (chmod go-w) or use another runtime_dir"
    )]
    Writable {
        path: PathBuf,
        mode: u32,
        owner: u32,
    },
    #[error("refusing to use {path}: {what} (owner uid {owner})")]
    WrongKind {
        path: PathBuf,
        what: &'static str,
        owner: u32,
    },
    #[error(
        "refusing to use {path}: it is a symbolic link owned by uid {owner}, not by you (uid {uid}) or root; another user may have planted it (remove it, or set XDG_RUNTIME_DIR / runtime_dir to a private directory)"
    )]
    ForeignLink { path: PathBuf, owner: u32, uid: u32 },
    #[error(
        "refusing to use {path}: it is a symbolic link in a directory others can write ({parent}); banger's directory there must be a real directory of yours"
    )]
    SharedLink { path: PathBuf, parent: PathBuf },
    #[error(
        "refusing to talk to {path}: the daemon answering there runs as uid {peer}, not as you (uid {uid}) or root; another user may have put it there (remove the socket and its directory, or set XDG_RUNTIME_DIR / runtime_dir to a private directory)"
    )]
    ForeignPeer { path: PathBuf, peer: u32, uid: u32 },
    #[error("cannot check {path}: {reason}")]
    Unreadable { path: PathBuf, reason: String },
}

/// The accounts whose files `uid` may trust: itself and root.
fn trusted_owner(owner: u32, uid: u32) -> bool {
    owner == uid || owner == 0
}

/// Checks one directory of the chain. `leaf` is the directory things are put in (no group or
/// other write at all); ancestors may be world-writable only when sticky.
fn check_dir(
    path: &Path,
    meta: &std::fs::Metadata,
    uid: u32,
    leaf: bool,
) -> Result<(), TrustError> {
    let (owner, mode) = (meta.uid(), meta.mode() & 0o7777);
    if !meta.is_dir() {
        return Err(TrustError::WrongKind {
            path: path.to_path_buf(),
            what: "it is not a directory",
            owner,
        });
    }
    if !trusted_owner(owner, uid) {
        return Err(TrustError::ForeignOwner {
            path: path.to_path_buf(),
            owner,
            uid,
        });
    }
    let sticky = mode & 0o1000 != 0;
    if mode & 0o022 != 0 && (leaf || !sticky) {
        return Err(TrustError::Writable {
            path: path.to_path_buf(),
            mode,
            owner,
        });
    }
    Ok(())
}

/// Checks that `dir` and every directory above it (after resolving links) can be trusted by
/// `uid`. A missing `dir` is fine (nothing can be in it yet) as long as its existing ancestors
/// are trusted; the caller creates it and checks again.
pub fn check_dir_chain(dir: &Path, uid: u32) -> Result<(), TrustError> {
    let unreadable = |path: &Path, e: std::io::Error| TrustError::Unreadable {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    check_links(dir, uid)?;
    // The nearest existing directory, resolved: links are judged by where they lead, and every
    // directory on the resolved path is checked below.
    let mut existing = dir.to_path_buf();
    let mut leaf = true;
    let real = loop {
        match std::fs::canonicalize(&existing) {
            Ok(p) => break p,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                leaf = false;
                if !existing.pop() {
                    return Err(unreadable(dir, e));
                }
            }
            Err(e) => return Err(unreadable(&existing, e)),
        }
    };
    let mut cur = Some(real.as_path());
    while let Some(p) = cur {
        let meta = std::fs::symlink_metadata(p).map_err(|e| unreadable(p, e))?;
        check_dir(p, &meta, uid, leaf)?;
        leaf = false;
        cur = p.parent();
    }
    Ok(())
}

/// Walks `dir` as written, component by component, without following anything: a symbolic
/// link on the way must be owned by `uid` or root (else whoever owns it chooses where we go),
/// and `dir` itself must not be a link in a directory others can write (a shared place such as
/// `/tmp`). Links met are followed for the rest of the walk, so the components of where they
/// lead are judged the same way. Stops at the first missing component.
fn check_links(dir: &Path, uid: u32) -> Result<(), TrustError> {
    let unreadable = |path: &Path, e: std::io::Error| TrustError::Unreadable {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let dir = if dir.is_absolute() {
        dir.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| unreadable(dir, e))?
            .join(dir)
    };
    // Pending components, last first; a link's target is pushed in front of the rest.
    let mut todo: Vec<std::ffi::OsString> = dir
        .components()
        .rev()
        .filter_map(|c| match c {
            std::path::Component::Normal(n) => Some(n.to_os_string()),
            std::path::Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect();
    let mut cur = PathBuf::from("/");
    let mut links = 0;
    while let Some(name) = todo.pop() {
        if name == ".." {
            cur.pop();
            continue;
        }
        let next = cur.join(&name);
        let meta = match std::fs::symlink_metadata(&next) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(unreadable(&next, e)),
        };
        if !meta.file_type().is_symlink() {
            cur = next;
            continue;
        }
        if !trusted_owner(meta.uid(), uid) {
            return Err(TrustError::ForeignLink {
                path: next,
                owner: meta.uid(),
                uid,
            });
        }
        if todo.is_empty() {
            let parent = std::fs::metadata(&cur).map_err(|e| unreadable(&cur, e))?;
            if parent.mode() & 0o022 != 0 {
                return Err(TrustError::SharedLink {
                    path: next,
                    parent: cur,
                });
            }
        }
        links += 1;
        if links > 40 {
            return Err(unreadable(
                &next,
                std::io::Error::from(nix::errno::Errno::ELOOP),
            ));
        }
        let target = std::fs::read_link(&next).map_err(|e| unreadable(&next, e))?;
        if target.is_absolute() {
            cur = PathBuf::from("/");
        }
        for c in target.components().rev() {
            match c {
                std::path::Component::Normal(n) => todo.push(n.to_os_string()),
                std::path::Component::ParentDir => todo.push("..".into()),
                _ => {}
            }
        }
    }
    Ok(())
}

/// Checks a daemon socket before connecting: its directory chain (see [`check_dir_chain`]),
/// and the socket itself, if it exists, is a socket owned by `uid` or root and not writable by
/// group or others.
pub fn check_socket(socket: &Path, uid: u32) -> Result<(), TrustError> {
    let dir = socket.parent().unwrap_or(Path::new("/"));
    check_dir_chain(dir, uid)?;
    let meta = match std::fs::symlink_metadata(socket) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(TrustError::Unreadable {
                path: socket.to_path_buf(),
                reason: e.to_string(),
            });
        }
    };
    let (owner, mode) = (meta.uid(), meta.mode() & 0o7777);
    if !meta.file_type().is_socket() {
        return Err(TrustError::WrongKind {
            path: socket.to_path_buf(),
            what: "it is not a socket",
            owner,
        });
    }
    if !trusted_owner(owner, uid) {
        return Err(TrustError::ForeignOwner {
            path: socket.to_path_buf(),
            owner,
            uid,
        });
    }
    if mode & 0o022 != 0 {
        return Err(TrustError::Writable {
            path: socket.to_path_buf(),
            mode,
            owner,
        });
    }
    Ok(())
}

/// Checks who answers on a connected daemon socket (`SO_PEERCRED`: the uid that listened):
/// `uid`, root, or for root the owner of a system install (whose daemon runs as that owner).
/// [`check_socket`] judges the path before connecting; this closes the gap between that check
/// and the connect (a directory or link swapped in between), which no path check can.
pub fn check_peer(
    stream: &std::os::unix::net::UnixStream,
    socket: &Path,
    uid: u32,
) -> Result<(), TrustError> {
    use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
    let cred = getsockopt(stream, PeerCredentials).map_err(|e| TrustError::Unreadable {
        path: socket.to_path_buf(),
        reason: format!("reading the peer's credentials: {e}"),
    })?;
    let peer = cred.uid();
    let system_owner = uid == 0 && crate::system_owner_uid() == Some(peer);
    if trusted_owner(peer, uid) || system_owner {
        return Ok(());
    }
    Err(TrustError::ForeignPeer {
        path: socket.to_path_buf(),
        peer,
        uid,
    })
}

/// The real uid of this process.
pub fn current_uid() -> u32 {
    nix::unistd::getuid().as_raw()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn chmod(p: &Path, m: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
    }

    #[test]
    fn private_dirs_pass_and_writable_ones_do_not() {
        let uid = current_uid();
        let t = tempfile::tempdir().unwrap();
        let run = t.path().join("run");
        std::fs::create_dir(&run).unwrap();
        chmod(t.path(), 0o700);
        chmod(&run, 0o700);
        check_dir_chain(&run, uid).unwrap();
        // Not there yet: its parent decides.
        check_socket(&run.join("missing/bangerd.sock"), uid).unwrap();
        chmod(&run, 0o777);
        let e = check_socket(&run.join("bangerd.sock"), uid).unwrap_err();
        assert!(matches!(e, TrustError::Writable { .. }), "{e}");
        // Sticky is fine above, never for the directory itself.
        chmod(&run, 0o1777);
        assert!(check_dir_chain(&run, uid).is_err());
        let inner = run.join("inner");
        std::fs::create_dir(&inner).unwrap();
        chmod(&inner, 0o700);
        check_dir_chain(&inner, uid).unwrap();
        chmod(&run, 0o777);
        assert!(check_dir_chain(&inner, uid).is_err());
    }

    #[test]
    fn foreign_owners_and_wrong_kinds_are_refused() {
        let uid = current_uid();
        let t = tempfile::tempdir().unwrap();
        chmod(t.path(), 0o700);
        // Seen as another user: our own files are "foreign" to uid+1 (unless it is root's).
        if uid != 0 {
            let e = check_dir_chain(t.path(), uid + 1).unwrap_err();
            assert!(matches!(e, TrustError::ForeignOwner { .. }), "{e}");
        }
        let f = t.path().join("bangerd.sock");
        std::fs::write(&f, b"").unwrap();
        chmod(&f, 0o600);
        let e = check_socket(&f, uid).unwrap_err();
        assert!(matches!(e, TrustError::WrongKind { .. }), "{e}");
        // A link is judged by where it leads.
        let link = t.path().join("link");
        std::os::unix::fs::symlink("/", &link).unwrap();
        check_dir_chain(&link, uid).unwrap();
    }

    #[test]
    fn a_link_planted_by_someone_else_is_refused_with_its_owner() {
        if current_uid() != 0 {
            println!("SKIP: needs root to make a link owned by another user");
            return;
        }
        // Probe finding 1: /tmp/banger-<uid> -> the victim's own (trusted) state dir, planted
        // by uid 65534 in a sticky shared dir.
        let t = tempfile::tempdir().unwrap();
        let shared = t.path().join("tmp");
        std::fs::create_dir(&shared).unwrap();
        chmod(&shared, 0o1777);
        let state = t.path().join("state");
        std::fs::create_dir(&state).unwrap();
        chmod(&state, 0o700);
        let link = shared.join("banger-0");
        std::os::unix::fs::symlink(&state, &link).unwrap();
        std::os::unix::fs::lchown(&link, Some(65534), Some(65534)).unwrap();
        let e = check_dir_chain(&link, 0).unwrap_err();
        assert!(
            matches!(e, TrustError::ForeignLink { owner: 65534, .. }),
            "{e}"
        );
        assert!(e.to_string().contains(&link.display().to_string()), "{e}");
        let e = check_socket(&link.join("bangerd.sock"), 0).unwrap_err();
        assert!(matches!(e, TrustError::ForeignLink { .. }), "{e}");
        // Deeper down the path too.
        assert!(check_dir_chain(&link.join("vms/x"), 0).is_err());
        // Even a link of one's own is no runtime dir in a shared place.
        let own = shared.join("banger-own");
        std::os::unix::fs::symlink(&state, &own).unwrap();
        let e = check_dir_chain(&own, 0).unwrap_err();
        assert!(matches!(e, TrustError::SharedLink { .. }), "{e}");
        // A real directory of ours there is fine.
        let real = shared.join("banger-real");
        std::fs::create_dir(&real).unwrap();
        chmod(&real, 0o700);
        check_dir_chain(&real, 0).unwrap();
        check_socket(&real.join("bangerd.sock"), 0).unwrap();
    }

    #[test]
    fn a_daemon_of_ours_passes_the_peer_check() {
        let t = tempfile::tempdir().unwrap();
        let sock = t.path().join("s");
        let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let c = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        check_peer(&c, &sock, current_uid()).unwrap();
        if current_uid() != 0 {
            // Seen as another user, our daemon is foreign (unless that user is root).
            let e = check_peer(&c, &sock, current_uid() + 1).unwrap_err();
            assert!(matches!(e, TrustError::ForeignPeer { .. }), "{e}");
        }
    }

    #[test]
    fn a_dir_owned_by_someone_else_is_refused_with_its_owner() {
        if current_uid() != 0 {
            println!("SKIP: needs root to chown a directory to another user");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("banger-1000");
        std::fs::create_dir(&d).unwrap();
        chmod(&d, 0o700);
        std::os::unix::fs::chown(&d, Some(65534), Some(65534)).unwrap();
        let e = check_dir_chain(&d, 0).unwrap_err();
        assert!(
            matches!(e, TrustError::ForeignOwner { owner: 65534, .. }),
            "{e}"
        );
        assert!(e.to_string().contains(&d.display().to_string()), "{e}");
    }
}
