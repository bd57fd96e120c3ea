//! banger's own directories (`state_dir`, `runtime_dir`, `cache_dir`): which paths may be one,
//! and how one is made or taken over. banger makes them owner-only (0700), so pointing a key at
//! a directory that is not banger's must never re-mode it: `state_dir = "/"` once made `/`
//! unusable for everyone.
//!
//! The rule (docs/config.md, docs/state.md):
//! - `/` and the system directories themselves ([`SYSTEM_DIRS`]), and the owner's home itself,
//!   are refused when the config is read, whoever reads it;
//! - a missing directory is created (parents included) owner-only and marked banger's with a
//!   [`MARKER`] file;
//! - an existing one is taken over only if it is a directory owned by the user banger runs as,
//!   and carries the [`MARKER`], or is empty (but for `lost+found`: a fresh filesystem mounted
//!   for banger), or is banger's from before the marker existed: a state dir holding a regular
//!   `banger.db`, or a mode-0700 directory holding nothing but banger's names ([`STATE_ENTRIES`],
//!   …). Its mode is then set to 0700 and the marker written. Common names alone (`build`,
//!   `vms`) never make a directory banger's: banger deletes what it finds under them.
//!   Anything else is refused with an error naming the key and the path, and nothing about the
//!   directory is changed.

use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
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

/// The file banger writes in each directory it creates or takes over: what makes an existing
/// directory banger's (see the module doc).
pub const MARKER: &str = ".banger-dir";

/// The names banger puts in its state dir (with [`MARKER`]); `banger.db` alone marks a state
/// dir of an installation older than the marker.
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
/// The names banger puts in its runtime dir.
pub const RUNTIME_ENTRIES: &[&str] = &[
    "bangerd.sock",
    "bangerd.lock",
    "bangerd.pid",
    "bangerd.start.log",
    "vms",
];
/// The names banger puts in its cache dir.
pub const CACHE_ENTRIES: &[&str] = &["oci", "blobs", "workspaces"];

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
/// without changing anything (see the module doc). `ours` lists the names banger puts there
/// (for a directory of an installation older than [`MARKER`]).
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
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io("creating it"))?;
            return write_marker(key, dir).map_err(io("marking it as banger's"));
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
    let is_file = |name: &str| {
        dir.join(name)
            .symlink_metadata()
            .is_ok_and(|m| m.file_type().is_file())
    };
    if is_file(MARKER) {
        return make_owner_only(&md, dir).map_err(io("making it owner-only"));
    }
    let names: Vec<std::ffi::OsString> = std::fs::read_dir(dir)
        .map_err(io("listing it"))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()
        .map_err(io("listing it"))?;
    // A fresh filesystem mounted there for banger holds only `lost+found`: still empty.
    let empty = names.iter().all(|n| n == "lost+found");
    // Installations older than the marker: the state dir's database, or a private directory
    // holding nothing but banger's names (the runtime and cache dirs).
    let old_state = ours.contains(&"banger.db") && is_file("banger.db");
    let old_private =
        md.mode() & 0o7777 == 0o700 && names.iter().all(|n| ours.iter().any(|o| n == *o));
    if !(empty || old_state || old_private) {
        return Err(unsafe_dir(format!(
            "exists, is not empty and is not banger's (no {MARKER} mark; banger's names alone \
             do not count); banger does not take it over (its mode stays {:o})",
            md.mode() & 0o7777
        )));
    }
    make_owner_only(&md, dir).map_err(io("making it owner-only"))?;
    write_marker(key, dir).map_err(io("marking it as banger's"))
}

fn make_owner_only(md: &std::fs::Metadata, dir: &Path) -> std::io::Result<()> {
    if md.mode() & 0o7777 != 0o700 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// Writes [`MARKER`] into `dir` (never through a link: `create_new`).
fn write_marker(key: &str, dir: &Path) -> std::io::Result<()> {
    use std::io::Write;
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dir.join(MARKER))
    {
        Ok(mut f) => writeln!(
            f,
            "This directory is banger's {key}: banger creates and deletes files in it."
        ),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
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
        assert!(e.contains("is not banger's"), "{e}");
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
    fn bangers_names_alone_do_not_make_a_dir_bangers() {
        // Probe finding 2: a project with a `build/` dir, a folder with `vms/` in it.
        let t = tempfile::tempdir().unwrap();
        let proj = t.path().join("proj");
        std::fs::create_dir_all(proj.join("build/obj")).unwrap();
        std::fs::write(proj.join("main.c"), b"int main;").unwrap();
        std::fs::set_permissions(&proj, std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = prepare_private_dir("state_dir", &proj, STATE_ENTRIES).unwrap_err();
        assert!(e.to_string().contains("is not banger's"), "{e}");
        assert_eq!(mode(&proj), 0o755);
        assert!(!proj.join(MARKER).exists());
        let run = t.path().join("run");
        std::fs::create_dir_all(run.join("vms/myvm")).unwrap();
        std::fs::write(run.join("vms/myvm/notes.txt"), b"mine").unwrap();
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(prepare_private_dir("runtime_dir", &run, RUNTIME_ENTRIES).is_err());
        assert_eq!(mode(&run), 0o755);
        // Only banger's names, but not private: someone's folder, not banger's.
        std::fs::remove_file(run.join("vms/myvm/notes.txt")).unwrap();
        assert!(prepare_private_dir("runtime_dir", &run, RUNTIME_ENTRIES).is_err());
        // A private one holding only banger's names: a runtime dir of an older banger.
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o700)).unwrap();
        prepare_private_dir("runtime_dir", &run, RUNTIME_ENTRIES).unwrap();
        assert!(run.join(MARKER).is_file());
        // Once marked, whatever banger puts there next is fine.
        std::fs::write(run.join("other"), b"").unwrap();
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o750)).unwrap();
        prepare_private_dir("runtime_dir", &run, RUNTIME_ENTRIES).unwrap();
        assert_eq!(mode(&run), 0o700);
        // Created and taken-over empty dirs are marked.
        let made = t.path().join("made");
        prepare_private_dir("cache_dir", &made, CACHE_ENTRIES).unwrap();
        assert!(made.join(MARKER).is_file());
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
