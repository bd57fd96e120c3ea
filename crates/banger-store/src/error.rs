//! The store's error type.

use std::path::PathBuf;

use banger_core::ErrorCode;

/// Everything that can go wrong reading or writing banger's state database. Each message names
/// the file, table, key or value involved.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create state directory {}: {source}", path.display())]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot prepare state database file {}: {source}", path.display())]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open state database {}: {source}", path.display())]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("cannot configure state database {}: {what}", path.display())]
    Pragma { path: PathBuf, what: String },
    #[error(
        "state database {} is damaged ({reason}); banger left it untouched: keep a copy, then restore a backup or move it aside to start with an empty store (banger then forgets its VMs and images)",
        path.display()
    )]
    Damaged { path: PathBuf, reason: String },
    #[error(
        "state database schema version {found} is newer than the newest this banger knows ({supported}); upgrade banger"
    )]
    TooNew { found: u32, supported: u32 },
    #[error("migration {version} of state database {} failed: {source}", path.display())]
    Migration {
        path: PathBuf,
        version: u32,
        source: rusqlite::Error,
    },
    #[error("{what} {value:?} already exists")]
    AlreadyExists { what: &'static str, value: String },
    #[error("{what} {value:?} not found")]
    NotFound { what: &'static str, value: String },
    #[error("corrupt row in table {table} (key {key:?}): {reason}")]
    Corrupt {
        table: &'static str,
        key: String,
        reason: String,
    },
    #[error("cannot store {field} = {value}: {reason}")]
    Unstorable {
        field: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("state database error while {op}: {source}")]
    Sqlite { op: String, source: rusqlite::Error },
}

impl StoreError {
    /// The protocol error class this failure maps to.
    pub fn code(&self) -> ErrorCode {
        match self {
            StoreError::AlreadyExists { .. } => ErrorCode::AlreadyExists,
            StoreError::NotFound { .. } => ErrorCode::NotFound,
            StoreError::Unstorable { .. } => ErrorCode::BadRequest,
            StoreError::TooNew { .. } => ErrorCode::BadVersion,
            StoreError::Sqlite { source, .. } if is_busy(source) => ErrorCode::Busy,
            _ => ErrorCode::OperationFailed,
        }
    }

    /// Whether the write failed because the disk under the database is full.
    pub fn is_disk_full(&self) -> bool {
        match self {
            StoreError::Sqlite { source, .. }
            | StoreError::Open { source, .. }
            | StoreError::Migration { source, .. } => {
                source.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull)
            }
            _ => false,
        }
    }

    pub(crate) fn sqlite(op: impl Into<String>) -> impl FnOnce(rusqlite::Error) -> StoreError {
        let op = op.into();
        move |source| StoreError::Sqlite { op, source }
    }
}

fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

/// Which UNIQUE / PRIMARY KEY constraint a failed write hit, as `table.column`, if any. SQLite
/// names it in the message ("UNIQUE constraint failed: vms.name"); reading it from the error
/// instead of pre-checking keeps conflicting concurrent inserts race-free.
pub(crate) fn unique_violation(e: &rusqlite::Error) -> Option<String> {
    if let rusqlite::Error::SqliteFailure(err, Some(msg)) = e {
        let unique = err.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
            || err.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY;
        if unique {
            return msg
                .split_once(": ")
                .map(|(_, cols)| cols.split(',').next().unwrap_or(cols).trim().to_string());
        }
    }
    None
}
