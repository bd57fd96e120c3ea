//! banger's own directories (`state_dir`, `runtime_dir`, `cache_dir`): which paths may be one,
//! and how one is made or taken over. banger makes them owner-only (0700), so pointing a key at
//! a directory that is not banger's must never re-mode it: `state_dir = "/"` once made `/`
//! unusable for everyone.
//!
//! The rule (docs/config.md, docs/state.md):
//! - `/` and the system directories themselves ([`SYSTEM_DIRS`]), and the owner's home itself,
//!   are refused when the config is read, whoever reads it;
//! - a missing directory is created (parents included) owner-only: it is banger's;
//! - an existing one is taken over only if it is a directory owned by the user banger runs as,
//!   and is empty (but for `lost+found`: a fresh filesystem mounted for banger) or already holds
//!   banger's files ([`STATE_ENTRIES`], …); its mode is then set
//!   to 0700. Anything else is refused with an error naming the key and the path, and nothing
//!   about the directory is changed.

use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

/// Directories banger never takes as one of its own (nor re-modes), compared after lexical
/// normalisation and, where they exist, after resolving symlinks (`/lib` → `/usr/lib`).
pub const SYSTEM_DIRS: &[&str] = &[
    "/",
    "/bin",
    "/boot",
    "/dev",
    "/etc",
    "/home",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/lost+found",
    "/media",
    "/mnt",
    "/opt",
    "/proc",
    "/root",
    "/run",
    "/run/user",
    "/sbin",
    "/snap",
    "/srv",
    "/sys",
    "/tmp",
    "/usr",
    "/usr/bin",
    "/usr/include",
    "/usr/lib",
    "/usr/lib64",
    "/usr/libexec",
    "/usr/local",
    "/usr/local/bin",
    "/usr/local/lib",
    "/usr/local/sbin",
    "/usr/local/share",
    "/usr/sbin",
    "/usr/share",
    "/usr/src",
    "/var",
    "/var/cache",
    "/var/lib",
    "/var/local",
    "/var/lock",
    "/var/log",
    "/var/mail",
    "/var/opt",
    "/var/run",
    "/var/spool",
    "/var/tmp",
];

/// Entries that mark an existing directory as banger's state dir.
pub const STATE_ENTRIES: &[&str] = &[
    "banger.db",
    "bangerd.log",
    "vms",
    "images",
    "kernels",
    "build",
    "ssh",
    "jail",
];
/// Entries that mark an existing directory as banger's runtime dir.
pub const RUNTIME_ENTRIES: &[&str] = &[
    "bangerd.sock",
    "bangerd.lock",
    "bangerd.pid",
    "bangerd.start.log",
    "vms",
];
/// Entries that mark an existing directory as banger's cache dir.
pub const CACHE_ENTRIES: &[&str] = &["oci", "workspaces"];

/// Why a directory cannot be one of banger's; each names the config key and the path.
#[derive(Debug, thiserror::Error)]
pub enum DirError {
    #[error("{key} = {}: {reason}; banger needs a directory of its own, e.g. {}", path.display(), suggestion.display())]
    Unsafe {
        key: String,
        path: PathBuf,
        reason: String,
        suggestion: PathBuf,
    },
    #[error("{key} = {}: {what}: {source}", path.display())]
    Io {
        key: String,
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// `path` with `.` and `..` resolved lexically (a `..` above `/` stays at `/`).
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

/// Why absolute `path` may never be a directory of banger's (it is `/`, a system directory
/// or `home` itself), if so.
pub fn forbidden_reason(path: &Path, home: &Path) -> Option<String> {
    let mut candidates = vec![normalize(path)];
    if let Ok(real) = std::fs::canonicalize(path) {
        candidates.push(real);
    }
    for p in &candidates {
        if p == Path::new("/") {
            return Some("is the root directory".into());
        }
        if SYSTEM_DIRS.iter().any(|d| p == Path::new(d)) {
            return Some(format!("{} is a system directory", p.display()));
        }
        if p == &normalize(home) {
            return Some("is your home directory itself".into());
        }
    }
    None
}

/// Makes `dir` (the value of config key `key`) banger's owner-only directory, or refuses
/// without changing anything (see the module doc). `ours` lists the entries that mark an
/// existing non-empty directory as banger's.
pub fn prepare_private_dir(key: &str, dir: &Path, ours: &[&str]) -> Result<(), DirError> {
    let unsafe_dir = |reason: String| DirError::Unsafe {
        key: key.to_string(),
        path: dir.to_path_buf(),
        reason,
        suggestion: dir.join("banger"),
    };
    let io = |what: &'static str| {
        move |source| DirError::Io {
            key: key.to_string(),
            path: dir.to_path_buf(),
            what,
            source,
        }
    };
    if let Some(reason) = forbidden_reason(dir, Path::new("")) {
        return Err(unsafe_dir(reason));
    }
    // Follows a symlink on purpose: what counts is the directory banger would use.
    let md = match std::fs::metadata(dir) {
        Ok(md) => md,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io("creating it"));
        }
        Err(e) => return Err(io("examining it")(e)),
    };
    if !md.is_dir() {
        return Err(unsafe_dir("exists and is not a directory".into()));
    }
    let me = nix::unistd::geteuid().as_raw();
    if md.uid() != me {
        return Err(unsafe_dir(format!(
            "is owned by uid {}, not by the user banger runs as (uid {me}); its mode stays {:o}",
            md.uid(),
            md.mode() & 0o7777
        )));
    }
    // A fresh filesystem mounted there for banger holds only `lost+found`: still empty.
    let mut entries = std::fs::read_dir(dir).map_err(io("listing it"))?;
    let empty = entries.all(|e| e.is_ok_and(|e| e.file_name() == "lost+found"));
    if !empty && !ours.iter().any(|e| dir.join(e).symlink_metadata().is_ok()) {
        return Err(unsafe_dir(format!(
            "exists, is not empty and holds none of banger's files; banger does not take it \
             over (its mode stays {:o})",
            md.mode() & 0o7777
        )));
    }
    if md.mode() & 0o7777 != 0o700 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io("making it owner-only"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn system_dirs_and_home_are_forbidden() {
        let home = Path::new("/home/dev");
        for p in [
            "/",
            "//",
            "/etc",
            "/etc/",
            "/usr/./local",
            "/var/lib/..",
            "/usr/../..",
            "/tmp",
            "/home",
            "/root",
            "/home/dev",
            "/home/dev/x/..",
        ] {
            assert!(forbidden_reason(Path::new(p), home).is_some(), "{p}");
        }
        for p in [
            "/var/lib/banger",
            "/home/dev/.local/state/banger",
            "/tmp/banger-1000",
            "/etc/banger",
        ] {
            assert_eq!(forbidden_reason(Path::new(p), home), None, "{p}");
        }
    }

    #[test]
    fn creates_missing_dirs_owner_only() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("a/b/state");
        prepare_private_dir("state_dir", &d, STATE_ENTRIES).unwrap();
        assert_eq!(mode(&d), 0o700);
    }

    #[test]
    fn takes_over_empty_or_bangers_dirs_only() {
        let t = tempfile::tempdir().unwrap();
        let empty = t.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        std::fs::set_permissions(&empty, std::fs::Permissions::from_mode(0o755)).unwrap();
        prepare_private_dir("state_dir", &empty, STATE_ENTRIES).unwrap();
        assert_eq!(mode(&empty), 0o700);

        let fresh_fs = t.path().join("mnt");
        std::fs::create_dir_all(fresh_fs.join("lost+found")).unwrap();
        prepare_private_dir("state_dir", &fresh_fs, STATE_ENTRIES).unwrap();

        let old = t.path().join("old");
        std::fs::create_dir(&old).unwrap();
        std::fs::write(old.join("banger.db"), b"").unwrap();
        std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o750)).unwrap();
        prepare_private_dir("state_dir", &old, STATE_ENTRIES).unwrap();
        assert_eq!(mode(&old), 0o700);

        let other = t.path().join("other");
        std::fs::create_dir(&other).unwrap();
        std::fs::write(other.join("notes.txt"), b"mine").unwrap();
        std::fs::set_permissions(&other, std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = prepare_private_dir("state_dir", &other, STATE_ENTRIES)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("state_dir = "), "{e}");
        assert!(e.contains(&other.display().to_string()), "{e}");
        assert!(e.contains("none of banger's files"), "{e}");
        assert_eq!(mode(&other), 0o755, "unchanged");

        let file = t.path().join("file");
        std::fs::write(&file, b"").unwrap();
        let e = prepare_private_dir("cache_dir", &file, CACHE_ENTRIES).unwrap_err();
        assert!(e.to_string().contains("not a directory"), "{e}");

        let e = prepare_private_dir("runtime_dir", Path::new("/"), RUNTIME_ENTRIES).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("runtime_dir = /: is the root directory"),
            "{e}"
        );
    }

    #[test]
    fn refuses_a_dir_of_someone_else() {
        if nix::unistd::geteuid().as_raw() != 0 {
            println!("SKIP: chown needs root");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("theirs");
        std::fs::create_dir(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::chown(&d, Some(65534), Some(65534)).unwrap();
        let e = prepare_private_dir("state_dir", &d, STATE_ENTRIES).unwrap_err();
        assert!(e.to_string().contains("owned by uid 65534"), "{e}");
        assert_eq!(mode(&d), 0o755);
    }
}
