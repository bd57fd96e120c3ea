//! The sync manifest: what the guest's working tree holds, file by file, as of the last copy.
//! The CLI keeps one per VM on the host; `sync` compares a fresh inspection with it and sends
//! only the difference.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::WorkspaceError;
use crate::repo::{FileEntry, Repo};

/// The manifest format this build writes and reads.
pub const MANIFEST_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestEntry {
    /// `sha256:<hex>` of the content (or link target); `git:<blob id>` for files checked out
    /// in the guest from a commit rather than copied.
    pub hash: String,
    /// git's mode: 100644, 100755 or 120000.
    pub mode: u32,
    pub size: u64,
    pub mtime_ns: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub version: u32,
    pub host_path: PathBuf,
    pub guest_path: String,
    /// The commit the guest's history was prepared at.
    pub prepared_head: String,
    /// The host's HEAD at the last prepare or sync.
    pub synced_head: String,
    pub include_untracked: bool,
    pub submodules: bool,
    pub files: BTreeMap<String, ManifestEntry>,
}

/// What `sync` sends: files new or changed since the manifest, and paths to delete.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncPlan {
    pub send: Vec<FileEntry>,
    pub delete: Vec<String>,
}

impl SyncPlan {
    pub fn is_empty(&self) -> bool {
        self.send.is_empty() && self.delete.is_empty()
    }
}

impl Manifest {
    /// The manifest of a full copy of `repo` to `guest_path`.
    pub fn of(
        repo: &Repo,
        guest_path: &str,
        prepared_head: &str,
        include_untracked: bool,
        submodules: bool,
    ) -> Manifest {
        Manifest {
            version: MANIFEST_VERSION,
            host_path: repo.root.clone(),
            guest_path: guest_path.to_string(),
            prepared_head: prepared_head.to_string(),
            synced_head: repo.head.clone(),
            include_untracked,
            submodules,
            files: repo
                .files
                .iter()
                .map(|f| (f.path.clone(), entry(f)))
                .collect(),
        }
    }

    /// What differs between the guest (as recorded) and `repo` now.
    pub fn diff(&self, repo: &Repo) -> SyncPlan {
        let send = repo
            .files
            .iter()
            .filter(|f| {
                self.files
                    .get(&f.path)
                    .is_none_or(|e| e.hash != f.hash || e.mode != f.kind.git_mode())
            })
            .cloned()
            .collect();
        let now: std::collections::BTreeSet<&str> =
            repo.files.iter().map(|f| f.path.as_str()).collect();
        let delete = self
            .files
            .keys()
            .filter(|p| !now.contains(p.as_str()))
            .cloned()
            .collect();
        SyncPlan { send, delete }
    }

    /// Records a sync of `plan` taken from `repo`.
    pub fn apply(&mut self, repo: &Repo, plan: &SyncPlan) {
        for p in &plan.delete {
            self.files.remove(p);
        }
        for f in &plan.send {
            self.files.insert(f.path.clone(), entry(f));
        }
        // Unchanged files may have a new mtime (touched): keep it, so the next inspection
        // need not read them again.
        for f in &repo.files {
            if let Some(e) = self.files.get_mut(&f.path)
                && e.hash == f.hash
            {
                e.mtime_ns = f.mtime_ns;
                e.size = f.size;
            }
        }
        self.synced_head = repo.head.clone();
    }

    pub fn load(path: &Path) -> Result<Option<Manifest>, WorkspaceError> {
        let bad = |detail: String| WorkspaceError::Manifest {
            path: path.to_path_buf(),
            detail,
        };
        let text = match std::fs::read(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(bad(format!("cannot read: {e}"))),
        };
        let m: Manifest =
            serde_json::from_slice(&text).map_err(|e| bad(format!("unreadable: {e}")))?;
        if m.version != MANIFEST_VERSION {
            return Err(bad(format!(
                "format version {} is not {MANIFEST_VERSION}; prepare the workspace again",
                m.version
            )));
        }
        Ok(Some(m))
    }

    /// Writes atomically (temp file, then rename), private to the user.
    pub fn save(&self, path: &Path) -> Result<(), WorkspaceError> {
        let bad = |detail: String| WorkspaceError::Manifest {
            path: path.to_path_buf(),
            detail,
        };
        let dir = path
            .parent()
            .ok_or_else(|| bad("has no parent directory".into()))?;
        std::fs::create_dir_all(dir)
            .map_err(|e| bad(format!("cannot create {}: {e}", dir.display())))?;
        let tmp = tempfile::NamedTempFile::new_in(dir)
            .map_err(|e| bad(format!("cannot create a temp file: {e}")))?;
        serde_json::to_writer(&tmp, self).map_err(|e| bad(format!("cannot write: {e}")))?;
        tmp.persist(path)
            .map_err(|e| bad(format!("cannot rename into place: {e}")))?;
        Ok(())
    }
}

fn entry(f: &FileEntry) -> ManifestEntry {
    ManifestEntry {
        hash: f.hash.clone(),
        mode: f.kind.git_mode(),
        size: f.size,
        mtime_ns: f.mtime_ns,
    }
}
