//! Forward-only numbered schema migrations.
//!
//! A migration, once released, is never edited: a schema change is a new entry at the end of
//! [`MIGRATIONS`] (`ALTER TABLE ... ADD COLUMN`, `CREATE TABLE`). Each applied version is recorded
//! in `schema_migrations`, so a database tells which scripts it has seen.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, Transaction};

use crate::StoreError;

/// Every migration, in order. Versions start at 1 and increase by one.
pub const MIGRATIONS: &[(u32, &str)] = &[
    (1, MIGRATION_1),
    (2, MIGRATION_2),
    (3, MIGRATION_3),
    (4, MIGRATION_4),
];

/// The schema version this binary creates and understands.
pub const LATEST_VERSION: u32 = MIGRATIONS[MIGRATIONS.len() - 1].0;

// STRICT tables make SQLite reject a value of the wrong type instead of storing it, so a decoding
// error on read really means outside tampering.
const MIGRATION_1: &str = "
CREATE TABLE vms (
    id             TEXT    PRIMARY KEY NOT NULL,
    name           TEXT    NOT NULL UNIQUE,
    state          TEXT    NOT NULL CHECK (state IN
                       ('created', 'starting', 'running', 'stopping', 'stopped', 'error')),
    image          TEXT    NOT NULL,
    kernel         TEXT    NOT NULL,
    vcpu           INTEGER NOT NULL CHECK (vcpu > 0),
    memory_mib     INTEGER NOT NULL CHECK (memory_mib > 0),
    work_disk_size INTEGER NOT NULL CHECK (work_disk_size >= 0),
    ip             TEXT    UNIQUE,
    nat            INTEGER NOT NULL CHECK (nat IN (0, 1)),
    vmm            TEXT,
    last_error     TEXT,
    created_at     INTEGER NOT NULL,
    updated_at     INTEGER NOT NULL,
    started_at     INTEGER
) STRICT;
CREATE INDEX vms_image ON vms (image);
CREATE INDEX vms_kernel ON vms (kernel);

CREATE TABLE images (
    name       TEXT    PRIMARY KEY NOT NULL,
    rootfs     TEXT    NOT NULL,
    kernel     TEXT,
    size_bytes INTEGER NOT NULL CHECK (size_bytes >= 0),
    source     TEXT    NOT NULL,
    managed    INTEGER NOT NULL CHECK (managed IN (0, 1)),
    created_at INTEGER NOT NULL
) STRICT;

CREATE TABLE kernels (
    name       TEXT    PRIMARY KEY NOT NULL,
    vmlinux    TEXT    NOT NULL,
    initrd     TEXT,
    version    TEXT    NOT NULL,
    sha256     TEXT    NOT NULL,
    source     TEXT    NOT NULL,
    created_at INTEGER NOT NULL
) STRICT;
";

// A VM's workspace summary (banger_core::records::WorkspaceInfo as JSON); NULL when none.
const MIGRATION_2: &str = "ALTER TABLE vms ADD COLUMN workspace_json TEXT;";

/// What banger learned about an image's contents (`ImageMeta` as JSON; NULL for older images).
const MIGRATION_3: &str = "ALTER TABLE images ADD COLUMN meta_json TEXT;";

/// `vm create --nested`: the VM gets virtualisation and the kernel's module tree.
const MIGRATION_4: &str =
    "ALTER TABLE vms ADD COLUMN nested INTEGER NOT NULL DEFAULT 0 CHECK (nested IN (0, 1));";

const CREATE_VERSION_TABLE: &str = "CREATE TABLE IF NOT EXISTS schema_migrations (
    version    INTEGER PRIMARY KEY,
    applied_at INTEGER
)";

/// What `check_migrations` found, without changing anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrationStatus {
    /// The database is at the version this binary expects.
    UpToDate { version: u32 },
    /// Opening the database with [`crate::Store::open`] would apply migrations `from+1..=to`.
    WouldMigrate { from: u32, to: u32 },
    /// The database was written by a newer banger; this binary refuses to open it.
    TooNew { found: u32, supported: u32 },
}

impl MigrationStatus {
    /// The `bangerd --check-migrations` exit code: 0 up to date, 1 would migrate, 2 too new.
    pub fn exit_code(self) -> i32 {
        match self {
            MigrationStatus::UpToDate { .. } => 0,
            MigrationStatus::WouldMigrate { .. } => 1,
            MigrationStatus::TooNew { .. } => 2,
        }
    }

    pub(crate) fn from_version(version: u32) -> Self {
        use std::cmp::Ordering::*;
        match version.cmp(&LATEST_VERSION) {
            Equal => MigrationStatus::UpToDate { version },
            Less => MigrationStatus::WouldMigrate {
                from: version,
                to: LATEST_VERSION,
            },
            Greater => MigrationStatus::TooNew {
                found: version,
                supported: LATEST_VERSION,
            },
        }
    }
}

/// The highest applied migration, 0 for a database without the version table (new or foreign).
pub(crate) fn current_version(conn: &Connection) -> rusqlite::Result<u32> {
    let has_table: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations')",
        [],
        |r| r.get(0),
    )?;
    if !has_table {
        return Ok(0);
    }
    let v: Option<i64> = conn
        .query_row("SELECT MAX(version) FROM schema_migrations", [], |r| {
            r.get(0)
        })
        .optional()?
        .flatten();
    // A negative or absurd version can only come from tampering; treat it as "newer than known"
    // so the binary refuses rather than re-running migration 1 over existing tables.
    Ok(v.map(|v| u32::try_from(v).unwrap_or(u32::MAX)).unwrap_or(0))
}

/// Brings the database up to [`LATEST_VERSION`] in one IMMEDIATE transaction, so two processes
/// opening a fresh database at once cannot both apply the same script.
pub(crate) fn migrate(conn: &mut Connection, path: &Path) -> Result<u32, StoreError> {
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(|source| StoreError::Migration {
            path: path.to_path_buf(),
            version: 0,
            source,
        })?;
    let mig_err = |version: u32| {
        move |source| StoreError::Migration {
            path: path.to_path_buf(),
            version,
            source,
        }
    };
    tx.execute_batch(CREATE_VERSION_TABLE).map_err(mig_err(0))?;
    let from = current_version(&tx).map_err(mig_err(0))?;
    if from > LATEST_VERSION {
        return Err(StoreError::TooNew {
            found: from,
            supported: LATEST_VERSION,
        });
    }
    for &(version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > from) {
        apply(&tx, version, sql).map_err(mig_err(version))?;
    }
    tx.commit().map_err(mig_err(LATEST_VERSION))?;
    Ok(LATEST_VERSION)
}

fn apply(tx: &Transaction<'_>, version: u32, sql: &str) -> rusqlite::Result<()> {
    tx.execute_batch(sql)?;
    tx.execute(
        "INSERT INTO schema_migrations (version, applied_at) VALUES (?1, unixepoch())",
        [version],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_consecutive_from_one() {
        for (i, (v, _)) in MIGRATIONS.iter().enumerate() {
            assert_eq!(*v as usize, i + 1);
        }
    }

    #[test]
    fn status_from_version() {
        assert_eq!(
            MigrationStatus::from_version(0),
            MigrationStatus::WouldMigrate {
                from: 0,
                to: LATEST_VERSION
            }
        );
        assert_eq!(
            MigrationStatus::from_version(LATEST_VERSION),
            MigrationStatus::UpToDate {
                version: LATEST_VERSION
            }
        );
        assert_eq!(
            MigrationStatus::from_version(LATEST_VERSION + 1).exit_code(),
            2
        );
    }

    #[test]
    fn every_migration_applies_on_an_empty_database() {
        let mut conn = Connection::open_in_memory().unwrap();
        assert_eq!(current_version(&conn).unwrap(), 0);
        migrate(&mut conn, Path::new(":memory:")).unwrap();
        assert_eq!(current_version(&conn).unwrap(), LATEST_VERSION);
        // Idempotent: a second run applies nothing and does not fail on existing tables.
        migrate(&mut conn, Path::new(":memory:")).unwrap();
        let rows: i64 = conn
            .query_row("SELECT COUNT(*) FROM schema_migrations", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, MIGRATIONS.len() as i64);
    }

    #[test]
    fn migration_2_keeps_version_1_rows() {
        let mut conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(CREATE_VERSION_TABLE).unwrap();
        {
            let tx = conn.transaction().unwrap();
            apply(&tx, 1, MIGRATION_1).unwrap();
            tx.commit().unwrap();
        }
        conn.execute(
            "INSERT INTO vms (id, name, state, image, kernel, vcpu, memory_mib, work_disk_size, \
             nat, created_at, updated_at) \
             VALUES ('0123456789ab', 'old', 'stopped', 'i', 'k', 1, 256, 0, 0, 1, 1)",
            [],
        )
        .unwrap();
        assert_eq!(current_version(&conn).unwrap(), 1);
        migrate(&mut conn, Path::new(":memory:")).unwrap();
        assert_eq!(current_version(&conn).unwrap(), LATEST_VERSION);
        let (name, ws): (String, Option<String>) = conn
            .query_row("SELECT name, workspace_json FROM vms", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        assert_eq!((name.as_str(), ws), ("old", None));
    }

    #[test]
    fn migration_3_leaves_older_images_without_metadata() {
        let mut conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(CREATE_VERSION_TABLE).unwrap();
        {
            let tx = conn.transaction().unwrap();
            apply(&tx, 1, MIGRATION_1).unwrap();
            apply(&tx, 2, MIGRATION_2).unwrap();
            tx.commit().unwrap();
        }
        conn.execute(
            "INSERT INTO images (name, rootfs, kernel, size_bytes, source, managed, created_at) \
             VALUES ('old', '/x/rootfs.ext4', NULL, 1, 'build:debian', 1, 1)",
            [],
        )
        .unwrap();
        migrate(&mut conn, Path::new(":memory:")).unwrap();
        assert_eq!(current_version(&conn).unwrap(), LATEST_VERSION);
        let meta: Option<String> = conn
            .query_row("SELECT meta_json FROM images", [], |r| r.get(0))
            .unwrap();
        assert_eq!(meta, None);
    }

    #[test]
    fn migration_4_makes_existing_vms_not_nested() {
        let mut conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(CREATE_VERSION_TABLE).unwrap();
        {
            let tx = conn.transaction().unwrap();
            for &(v, sql) in &MIGRATIONS[..3] {
                apply(&tx, v, sql).unwrap();
            }
            tx.commit().unwrap();
        }
        conn.execute(
            "INSERT INTO vms (id, name, state, image, kernel, vcpu, memory_mib, work_disk_size, \
             ip, nat, vmm, last_error, created_at, updated_at, started_at) \
             VALUES ('0123456789ab', 'old', 'stopped', 'i', 'k', 1, 256, 1, NULL, 0, NULL, NULL, 1, 1, NULL)",
            [],
        )
        .unwrap();
        migrate(&mut conn, Path::new(":memory:")).unwrap();
        let nested: bool = conn
            .query_row("SELECT nested FROM vms", [], |r| r.get(0))
            .unwrap();
        assert!(!nested);
        assert!(
            conn.execute("UPDATE vms SET nested = 2", []).is_err(),
            "nested is 0 or 1"
        );
    }
}
