//! Workspace errors. Each names the repository, file or command it is about.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum WorkspaceError {
    #[error("{path}: not a git repository (or git cannot read it): {detail}")]
    NotARepo { path: PathBuf, detail: String },
    #[error("{path}: is a bare repository; workspaces need a working tree")]
    Bare { path: PathBuf },
    #[error("{path}: the repository has no commits yet; commit something first")]
    NoCommits { path: PathBuf },
    #[error(
        "{path}: contains submodule {submodule:?}; pass --submodules to copy submodule files as plain files"
    )]
    Submodule { path: PathBuf, submodule: String },
    #[error("{path}: file name {name:?} is not UTF-8; workspaces only copy UTF-8 paths")]
    NonUtf8Path { path: PathBuf, name: String },
    #[error("{path}: unknown revision {rev:?} for --from: {detail}")]
    BadRevision {
        path: PathBuf,
        rev: String,
        detail: String,
    },
    #[error("invalid branch name {name:?}: {detail}")]
    BadBranch { name: String, detail: String },
    #[error("{path}: `git {args}` failed: {detail}")]
    Git {
        path: PathBuf,
        args: String,
        detail: String,
    },
    #[error("{path}: {detail}")]
    Io {
        path: PathBuf,
        detail: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: the HEAD moved while preparing ({expected} became {found}); try again")]
    HeadMoved {
        path: PathBuf,
        expected: String,
        found: String,
    },
    #[error("manifest {path}: {detail}")]
    Manifest { path: PathBuf, detail: String },
    #[error("{path}: refusing archive entry {entry:?}: {detail}")]
    UnsafeEntry {
        path: PathBuf,
        entry: String,
        detail: String,
    },
}

impl WorkspaceError {
    pub(crate) fn io(
        path: impl Into<PathBuf>,
        detail: impl Into<String>,
    ) -> impl FnOnce(std::io::Error) -> WorkspaceError {
        let (path, detail) = (path.into(), detail.into());
        move |source| WorkspaceError::Io {
            path,
            detail: format!("{detail}: {source}"),
            source,
        }
    }
}
