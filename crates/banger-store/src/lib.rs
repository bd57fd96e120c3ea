//! banger's persistent state: VMs, images and kernels in one SQLite database.
//!
//! [`Store::open`] creates the file (mode 0600, built aside and linked into place, so a database
//! file that exists always has a schema) and its directory, refuses an empty or damaged file
//! ([`StoreError::Damaged`], the file left untouched), configures the connection (WAL, 5 s busy
//! timeout, foreign keys, `synchronous=NORMAL`) and applies pending
//! [migrations](migrations::MIGRATIONS). [`check_migrations`] tells what opening would do without
//! writing anything, for `bangerd --check-migrations` and `banger doctor`.
//!
//! A [`Store`] is one connection behind a mutex; it is cheap to clone and every call is a short
//! statement, so async callers use it directly.

use std::fs::{DirBuilder, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

mod artefacts;
mod error;
pub mod migrations;
mod vms;

pub use error::StoreError;
pub use migrations::{LATEST_VERSION, MIGRATIONS, MigrationStatus};

/// How long a statement waits for another connection's write lock before failing with "busy".
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// A handle on the state database. Clones share one connection.
#[derive(Debug, Clone)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
    path: Arc<PathBuf>,
}

impl Store {
    /// Opens (creating if needed) the database at `path` and migrates it to [`LATEST_VERSION`].
    /// Refuses with [`StoreError::TooNew`] a database written by a newer banger.
    pub fn open(path: impl AsRef<Path>) -> Result<Store, StoreError> {
        let path = path.as_ref();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|source| StoreError::CreateDir {
                    path: dir.to_path_buf(),
                    source,
                })?;
        }
        match std::fs::symlink_metadata(path) {
            Ok(meta) => check_not_empty(path, &meta)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => create_fresh(path)?,
            Err(source) => {
                return Err(StoreError::File {
                    path: path.to_path_buf(),
                    source,
                });
            }
        }
        ensure_private_file(path)?;
        let mut conn = Connection::open(path).map_err(|source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        conn.busy_timeout(BUSY_TIMEOUT)
            .map_err(|e| StoreError::Pragma {
                path: path.to_path_buf(),
                what: format!("busy_timeout: {e}"),
            })?;
        check_integrity(&conn, path)?;
        configure(&conn, path)?;
        migrations::migrate(&mut conn, path)?;
        Ok(Store {
            conn: Arc::new(Mutex::new(conn)),
            path: Arc::new(path.to_path_buf()),
        })
    }

    /// The database file this store was opened on.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The schema version recorded in the database.
    pub fn schema_version(&self) -> Result<u32, StoreError> {
        migrations::current_version(&self.lock())
            .map_err(StoreError::sqlite("reading schema version"))
    }

    /// The connection, even if a thread panicked while holding it: every write is a single
    /// statement or a transaction that rolls back on drop, so the connection stays consistent.
    pub(crate) fn lock(&self) -> MutexGuard<'_, Connection> {
        self.conn
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Makes a new database beside `path` (schema applied, rollback journal so everything is in
/// the one file) and links it into place. A database file banger finds therefore always has a
/// schema: an empty or unreadable one is damage (a truncation, a disk that filled, a stray
/// `>`), never "a fresh install" whose reconcile would tear down the running VMs it forgot.
fn create_fresh(path: &Path) -> Result<(), StoreError> {
    let file_err = |p: &Path| {
        let p = p.to_path_buf();
        move |source| StoreError::File { path: p, source }
    };
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = sidecar(path, &format!(".new-{}-{seq}", std::process::id()));
    for f in [tmp.clone(), sidecar(&tmp, "-journal")] {
        match std::fs::remove_file(&f) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(file_err(&f)(e)),
            _ => {}
        }
    }
    let result = (|| {
        ensure_private_file(&tmp)?;
        let mut conn = Connection::open(&tmp).map_err(|source| StoreError::Open {
            path: tmp.clone(),
            source,
        })?;
        conn.busy_timeout(BUSY_TIMEOUT)
            .and_then(|()| conn.execute_batch("PRAGMA foreign_keys = ON;"))
            .map_err(|e| StoreError::Pragma {
                path: tmp.clone(),
                what: e.to_string(),
            })?;
        migrations::migrate(&mut conn, &tmp)?;
        conn.close().map_err(|(_, source)| StoreError::Open {
            path: tmp.clone(),
            source,
        })?;
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(file_err(&tmp))?;
        // A link, not a rename: it never replaces a database another opener made meanwhile.
        match std::fs::hard_link(&tmp, path) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                return Err(file_err(path)(e));
            }
            _ => {}
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(file_err(dir))?;
        }
        Ok(())
    })();
    let _ = std::fs::remove_file(&tmp);
    result
}

/// An existing database file of 0 bytes is a damaged one (see [`create_fresh`]).
fn check_not_empty(path: &Path, meta: &std::fs::Metadata) -> Result<(), StoreError> {
    if meta.is_file() && meta.len() == 0 {
        return Err(StoreError::Damaged {
            path: path.to_path_buf(),
            reason: "it is empty (0 bytes)".into(),
        });
    }
    Ok(())
}

/// SQLite's `quick_check` (every page and record well-formed; no index cross-check, so it is
/// fast): a database with garbage in it is refused before anything trusts its rows.
fn check_integrity(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    let damaged = |reason: String| StoreError::Damaged {
        path: path.to_path_buf(),
        reason,
    };
    let mut stmt = conn
        .prepare("PRAGMA quick_check(3)")
        .map_err(|e| damaged(e.to_string()))?;
    let problems: Vec<String> = stmt
        .query_map([], |r| r.get::<_, String>(0))
        .and_then(|rows| rows.collect())
        .map_err(|e| damaged(e.to_string()))?;
    match problems.as_slice() {
        [ok] if ok == "ok" => Ok(()),
        _ => {
            // One line: SQLite's report spans several.
            let text = problems.join("; ");
            let text: Vec<&str> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with("***"))
                .collect();
            Err(damaged(format!("integrity check: {}", text.join("; "))))
        }
    }
}

/// Creates the database file with mode 0600 before SQLite sees it, so it is never briefly
/// world-readable; an existing file with group/other bits is tightened. SQLite gives the -wal and
/// -shm files the database file's mode.
fn ensure_private_file(path: &Path) -> Result<(), StoreError> {
    let file_err = |source| StoreError::File {
        path: path.to_path_buf(),
        source,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(file_err)?;
    let meta = file.metadata().map_err(file_err)?;
    if meta.permissions().mode() & 0o077 != 0 {
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(file_err)?;
    }
    Ok(())
}

/// Per-connection settings. These do not persist in the file (except WAL), so every connection
/// the store ever opens goes through here.
fn configure(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    let fail = |what: String| StoreError::Pragma {
        path: path.to_path_buf(),
        what,
    };
    // The busy timeout first: switching to WAL takes a lock another opener may hold.
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(|e| fail(format!("busy_timeout: {e}")))?;
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
        .map_err(|e| fail(format!("journal_mode=WAL: {e}")))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(fail(format!("journal_mode=WAL: SQLite kept mode {mode:?}")));
    }
    conn.execute_batch("PRAGMA foreign_keys = ON; PRAGMA synchronous = NORMAL;")
        .map_err(|e| fail(format!("foreign_keys/synchronous: {e}")))?;
    let fk: bool = conn
        .query_row("PRAGMA foreign_keys", [], |r| r.get(0))
        .map_err(|e| fail(format!("foreign_keys: {e}")))?;
    if !fk {
        return Err(fail("foreign_keys=ON: not supported by this SQLite".into()));
    }
    Ok(())
}

/// Reports whether opening `path` would migrate it, without creating or writing anything: a
/// missing file is "would migrate from 0". The database is opened read-only.
pub fn check_migrations(path: impl AsRef<Path>) -> Result<MigrationStatus, StoreError> {
    let path = path.as_ref();
    match std::fs::symlink_metadata(path) {
        Ok(meta) => check_not_empty(path, &meta)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(MigrationStatus::from_version(0));
        }
        Err(source) => {
            return Err(StoreError::File {
                path: path.to_path_buf(),
                source,
            });
        }
    }
    // A read-only connection to a WAL database creates -wal and -shm files it cannot remove
    // (owned by whoever ran the check, possibly root). Without a -wal file there is nothing
    // beyond the main file to read, so it is opened as immutable, which creates no files. With
    // one (a daemon has it open, or crashed), the sidecars exist already and are only read.
    let wal = sidecar(path, "-wal");
    let immutable = !wal.exists();
    let conn = Connection::open_with_flags(
        sqlite_uri(path, immutable),
        OpenFlags::SQLITE_OPEN_READ_ONLY
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_URI,
    )
    .map_err(|source| StoreError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(|e| StoreError::Pragma {
            path: path.to_path_buf(),
            what: format!("busy_timeout: {e}"),
        })?;
    check_integrity(&conn, path)?;
    let version = migrations::current_version(&conn).map_err(|source| StoreError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(MigrationStatus::from_version(version))
}

fn sidecar(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(suffix);
    PathBuf::from(s)
}

/// A `file:` URI for `path`, percent-encoding every byte that could be read as URI syntax.
fn sqlite_uri(path: &Path, immutable: bool) -> String {
    use std::os::unix::ffi::OsStrExt;
    let mut uri = String::from("file:");
    for &b in path.as_os_str().as_bytes() {
        if b.is_ascii_alphanumeric() || b"/-_.~".contains(&b) {
            uri.push(b as char);
        } else {
            uri.push_str(&format!("%{b:02X}"));
        }
    }
    uri.push_str("?mode=ro");
    if immutable {
        uri.push_str("&immutable=1");
    }
    uri
}

/// Converts a value SQLite must hold as a signed 64-bit INTEGER.
pub(crate) fn to_i64(field: &'static str, v: u64) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| StoreError::Unstorable {
        field,
        value: v.to_string(),
        reason: "larger than SQLite's INTEGER range",
    })
}

/// Paths are stored as TEXT; a non-UTF-8 path would not round-trip, so it is refused on write.
pub(crate) fn path_text<'a>(field: &'static str, p: &'a Path) -> Result<&'a str, StoreError> {
    p.to_str().ok_or_else(|| StoreError::Unstorable {
        field,
        value: p.display().to_string(),
        reason: "path is not valid UTF-8",
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn tmp() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    #[test]
    fn open_creates_private_file_and_parent() {
        let dir = tmp();
        let path = dir.path().join("a/b/state.db");
        let store = Store::open(&path).unwrap();
        assert_eq!(store.path(), path);
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        assert_eq!(
            std::fs::metadata(dir.path().join("a/b")).unwrap().mode() & 0o777,
            0o700
        );
        assert_eq!(store.schema_version().unwrap(), LATEST_VERSION);
    }

    #[test]
    fn open_tightens_existing_world_readable_file() {
        let dir = tmp();
        let path = dir.path().join("state.db");
        drop(Store::open(&path).unwrap());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        Store::open(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
    }

    #[test]
    fn empty_or_garbled_database_is_refused_and_left_untouched() {
        let dir = tmp();
        let path = dir.path().join("state.db");
        // Empty: never taken for a fresh install.
        std::fs::write(&path, b"").unwrap();
        let e = Store::open(&path).unwrap_err();
        assert!(matches!(e, StoreError::Damaged { .. }), "{e}");
        assert!(e.to_string().contains("empty (0 bytes)"), "{e}");
        assert!(e.to_string().contains("state.db"), "{e}");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
        assert!(matches!(
            check_migrations(&path),
            Err(StoreError::Damaged { .. })
        ));
        std::fs::remove_file(&path).unwrap();

        // Garbage over the pages after the header (a real database with rows first).
        let store = Store::open(&path).unwrap();
        drop(store);
        let mut bytes = std::fs::read(&path).unwrap();
        assert!(bytes.len() > 4096, "{}", bytes.len());
        for b in &mut bytes[4096..] {
            *b = 0xa5;
        }
        std::fs::write(&path, &bytes).unwrap();
        let e = Store::open(&path).unwrap_err();
        assert!(matches!(e, StoreError::Damaged { .. }), "{e}");
        assert_eq!(
            std::fs::read(&path).unwrap(),
            bytes,
            "the evidence was changed"
        );
        assert!(matches!(
            check_migrations(&path),
            Err(StoreError::Damaged { .. })
        ));
        // Not a database at all.
        std::fs::write(&path, vec![0x5a; 8192]).unwrap();
        let e = Store::open(&path).unwrap_err();
        assert!(matches!(e, StoreError::Damaged { .. }), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), vec![0x5a; 8192]);
        // Nothing made beside it.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("state.db")]);
    }

    #[test]
    fn pragmas_hold_on_the_connection() {
        let dir = tmp();
        let store = Store::open(dir.path().join("state.db")).unwrap();
        let conn = store.lock();
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        let fk: i64 = conn
            .query_row("PRAGMA foreign_keys", [], |r| r.get(0))
            .unwrap();
        assert_eq!(fk, 1);
        let sync: i64 = conn
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap();
        assert_eq!(sync, 1, "NORMAL");
        let busy: i64 = conn
            .query_row("PRAGMA busy_timeout", [], |r| r.get(0))
            .unwrap();
        assert_eq!(busy, 5000);
    }

    #[test]
    fn reopen_is_idempotent() {
        let dir = tmp();
        let path = dir.path().join("state.db");
        drop(Store::open(&path).unwrap());
        let store = Store::open(&path).unwrap();
        drop(Store::open(&path).unwrap());
        let n: i64 = store
            .lock()
            .query_row("SELECT COUNT(*) FROM schema_migrations", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, MIGRATIONS.len() as i64);
        assert_eq!(store.schema_version().unwrap(), LATEST_VERSION);
    }

    fn bump_version(path: &Path, to: u32) {
        let store = Store::open(path).unwrap();
        store
            .lock()
            .execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES (?1, 0)",
                [to],
            )
            .unwrap();
    }

    #[test]
    fn open_refuses_newer_database() {
        let dir = tmp();
        let path = dir.path().join("state.db");
        bump_version(&path, LATEST_VERSION + 5);
        match Store::open(&path) {
            Err(StoreError::TooNew { found, supported }) => {
                assert_eq!(found, LATEST_VERSION + 5);
                assert_eq!(supported, LATEST_VERSION);
            }
            other => panic!("expected TooNew, got {other:?}"),
        }
    }

    fn snapshot(path: &Path) -> (Vec<u8>, std::time::SystemTime) {
        (
            std::fs::read(path).unwrap(),
            std::fs::metadata(path).unwrap().modified().unwrap(),
        )
    }

    fn dir_listing(dir: &Path) -> Vec<std::ffi::OsString> {
        let mut names: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn check_migrations_on_missing_file_creates_nothing() {
        let dir = tmp();
        let path = dir.path().join("sub/state.db");
        assert_eq!(
            check_migrations(&path).unwrap(),
            MigrationStatus::WouldMigrate {
                from: 0,
                to: LATEST_VERSION
            }
        );
        assert!(!path.exists());
        assert!(!dir.path().join("sub").exists());
    }

    #[test]
    fn check_migrations_on_current_database_is_read_only() {
        let dir = tmp();
        let path = dir.path().join("state.db");
        drop(Store::open(&path).unwrap());
        let before = snapshot(&path);
        let files_before = dir_listing(dir.path());
        assert_eq!(
            check_migrations(&path).unwrap(),
            MigrationStatus::UpToDate {
                version: LATEST_VERSION
            }
        );
        assert_eq!(snapshot(&path), before);
        assert_eq!(
            dir_listing(dir.path()),
            files_before,
            "no -wal/-shm left behind"
        );
    }

    #[test]
    fn check_migrations_while_store_is_open() {
        let dir = tmp();
        let path = dir.path().join("state.db");
        let _store = Store::open(&path).unwrap();
        assert_eq!(check_migrations(&path).unwrap().exit_code(), 0);
    }

    #[test]
    fn check_migrations_with_uri_characters_in_path() {
        let dir = tmp();
        let path = dir.path().join("we?ird #%20 dir/state.db");
        drop(Store::open(&path).unwrap());
        assert_eq!(check_migrations(&path).unwrap().exit_code(), 0);
    }

    #[test]
    fn check_migrations_on_newer_database() {
        let dir = tmp();
        let path = dir.path().join("state.db");
        bump_version(&path, LATEST_VERSION + 1);
        let before = snapshot(&path);
        assert_eq!(
            check_migrations(&path).unwrap(),
            MigrationStatus::TooNew {
                found: LATEST_VERSION + 1,
                supported: LATEST_VERSION
            }
        );
        assert_eq!(snapshot(&path), before);
    }

    #[test]
    fn check_migrations_on_empty_file_is_damage() {
        // banger never leaves an empty database (it builds one aside), so an empty file is a
        // truncated one, not "version 0".
        let dir = tmp();
        let path = dir.path().join("state.db");
        std::fs::write(&path, b"").unwrap();
        let e = check_migrations(&path).unwrap_err();
        assert!(e.to_string().contains("empty (0 bytes)"), "{e}");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
    }

    #[test]
    fn garbage_file_is_an_error_naming_the_path() {
        let dir = tmp();
        let path = dir.path().join("state.db");
        std::fs::write(&path, vec![b'x'; 4096]).unwrap();
        let err = check_migrations(&path).unwrap_err().to_string();
        assert!(err.contains("state.db"), "{err}");
        let err = Store::open(&path).unwrap_err().to_string();
        assert!(err.contains("state.db"), "{err}");
    }
}
