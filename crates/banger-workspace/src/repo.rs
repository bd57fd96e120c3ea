//! Inspecting a host repository: which files a workspace carries, and what they hold.

use std::collections::BTreeSet;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::manifest::Manifest;
use crate::{WorkspaceError, git};

/// What to copy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Options {
    /// Also copy untracked files that are not ignored (ignored files are never copied).
    pub include_untracked: bool,
    /// Copy submodules' files as plain files instead of refusing a repository that has any.
    pub submodules: bool,
}

/// How a file is stored, as git sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// A regular file; `exec` is the owner execute bit.
    File { exec: bool },
    /// A symbolic link, copied as a link (its target is never followed).
    Symlink { target: String },
}

impl Kind {
    /// git's mode number: 100644, 100755 or 120000.
    pub fn git_mode(&self) -> u32 {
        match self {
            Kind::File { exec: false } => 0o100644,
            Kind::File { exec: true } => 0o100755,
            Kind::Symlink { .. } => 0o120000,
        }
    }
}

/// One file of the working tree that the workspace carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileEntry {
    /// Relative to the repository's top level, `/`-separated.
    pub path: String,
    pub kind: Kind,
    pub size: u64,
    /// Modification time, nanoseconds since the epoch (to skip re-hashing unchanged files).
    pub mtime_ns: i64,
    /// `sha256:<hex>` of the content (of the target, for a link).
    pub hash: String,
    /// Whether git does not track it (only present with `include_untracked`).
    pub untracked: bool,
}

/// A host repository as a workspace sees it.
#[derive(Debug, Clone)]
pub struct Repo {
    /// The top-level directory of the working tree.
    pub root: PathBuf,
    /// Its directory name: the default guest directory is `/root/<name>`.
    pub name: String,
    /// The commit HEAD points at.
    pub head: String,
    /// The checked-out branch; `None` when HEAD is detached.
    pub branch: Option<String>,
    pub origin_url: Option<String>,
    pub user_name: Option<String>,
    pub user_email: Option<String>,
    /// Files to copy, sorted by path.
    pub files: Vec<FileEntry>,
    /// Tracked files missing from the working tree.
    pub deleted: Vec<String>,
    /// Submodule paths (only when `Options::submodules`).
    pub submodules: Vec<String>,
}

impl Repo {
    /// The lines `--dry-run` prints: one per file, deletions and untracked files marked.
    pub fn listing(&self) -> String {
        let mut s = String::new();
        for f in &self.files {
            let mark = if f.untracked { "untracked " } else { "" };
            let link = match &f.kind {
                Kind::Symlink { target } => format!(" -> {target}"),
                Kind::File { exec: true } => " (executable)".into(),
                Kind::File { exec: false } => String::new(),
            };
            s.push_str(&format!("{mark}{}{link}\n", f.path));
        }
        for d in &self.deleted {
            s.push_str(&format!("deleted {d}\n"));
        }
        s
    }

    /// Total bytes of the files to copy.
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

fn utf8(root: &Path, raw: &[u8]) -> Result<String, WorkspaceError> {
    String::from_utf8(raw.to_vec()).map_err(|_| WorkspaceError::NonUtf8Path {
        path: root.to_path_buf(),
        name: String::from_utf8_lossy(raw).into_owned(),
    })
}

/// The top level of the working tree holding `path`; refuses bare repositories.
pub fn toplevel(path: &Path) -> Result<PathBuf, WorkspaceError> {
    let not_repo = |detail: String| WorkspaceError::NotARepo {
        path: path.to_path_buf(),
        detail,
    };
    if !path.is_dir() {
        return Err(not_repo("not a directory".into()));
    }
    let bare = git::text(path, &["rev-parse", "--is-bare-repository"]).map_err(|e| match e {
        WorkspaceError::Git { detail, .. } => not_repo(detail),
        other => other,
    })?;
    if bare == "true" {
        return Err(WorkspaceError::Bare {
            path: path.to_path_buf(),
        });
    }
    let top = git::run(path, &["rev-parse", "--show-toplevel"])?;
    let top = String::from_utf8_lossy(&top)
        .trim_end_matches('\n')
        .to_string();
    if top.is_empty() {
        // Inside a .git directory: there is a repository but no working tree here.
        return Err(WorkspaceError::Bare {
            path: path.to_path_buf(),
        });
    }
    Ok(PathBuf::from(top))
}

/// Inspects the repository holding `path`. `previous`, the manifest of the last copy, lets
/// files whose size and mtime did not change keep their recorded hash without being read.
pub fn inspect(
    path: &Path,
    opts: &Options,
    previous: Option<&Manifest>,
) -> Result<Repo, WorkspaceError> {
    let root = toplevel(path)?;
    let head = git::text(&root, &["rev-parse", "--verify", "-q", "HEAD^{commit}"])
        .map_err(|_| WorkspaceError::NoCommits { path: root.clone() })?;
    let branch = git::command(&root)
        .args(["symbolic-ref", "-q", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|b| !b.is_empty());

    // Submodules are gitlinks (mode 160000) in the index.
    let staged = git::run(&root, &["ls-files", "-z", "--stage"])?;
    let mut submodules = Vec::new();
    for rec in git::split_z(&staged) {
        if rec.starts_with(b"160000 ")
            && let Some(tab) = rec.iter().position(|b| *b == b'\t')
        {
            submodules.push(utf8(&root, &rec[tab + 1..])?);
        }
    }
    if let Some(first) = submodules.first()
        && !opts.submodules
    {
        return Err(WorkspaceError::Submodule {
            path: root.clone(),
            submodule: first.clone(),
        });
    }

    let mut tracked_args = vec!["ls-files", "-z", "--cached"];
    if opts.submodules {
        tracked_args.push("--recurse-submodules");
    }
    let tracked = git::run(&root, &tracked_args)?;
    let deleted_raw = git::run(&root, &["ls-files", "-z", "--deleted"])?;
    let deleted_set: BTreeSet<&[u8]> = git::split_z(&deleted_raw).collect();
    let subs: BTreeSet<&str> = submodules.iter().map(String::as_str).collect();

    let mut paths: Vec<(String, bool)> = Vec::new();
    let mut deleted = Vec::new();
    let mut seen = BTreeSet::new();
    for raw in git::split_z(&tracked) {
        let p = utf8(&root, raw)?;
        if subs.contains(p.as_str()) || !seen.insert(p.clone()) {
            // The gitlink itself (its files come with --recurse-submodules), or a path listed
            // twice (unmerged stages).
            continue;
        }
        if deleted_set.contains(raw) || std::fs::symlink_metadata(root.join(&p)).is_err() {
            deleted.push(p);
        } else {
            paths.push((p, false));
        }
    }
    if opts.include_untracked {
        let others = git::run(&root, &["ls-files", "-z", "--others", "--exclude-standard"])?;
        for raw in git::split_z(&others) {
            let p = utf8(&root, raw)?;
            if seen.insert(p.clone()) {
                paths.push((p, true));
            }
        }
    }
    paths.sort();
    let mut files = Vec::with_capacity(paths.len());
    for (p, untracked) in paths {
        let full = root.join(&p);
        let meta = match std::fs::symlink_metadata(&full) {
            Ok(m) => m,
            // Gone since git listed it.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if !untracked {
                    deleted.push(p);
                }
                continue;
            }
            Err(e) => return Err(WorkspaceError::io(&full, "reading file metadata")(e)),
        };
        if meta.is_dir() {
            // An untracked nested repository shows as a directory: not ours to copy.
            continue;
        }
        let mtime_ns = meta.mtime() * 1_000_000_000 + meta.mtime_nsec();
        let kind = if meta.file_type().is_symlink() {
            let t = std::fs::read_link(&full)
                .map_err(WorkspaceError::io(&full, "reading symbolic link"))?;
            let target = t
                .to_str()
                .ok_or_else(|| WorkspaceError::NonUtf8Path {
                    path: root.clone(),
                    name: format!("{p} -> {}", t.display()),
                })?
                .to_string();
            Kind::Symlink { target }
        } else if meta.is_file() {
            Kind::File {
                exec: meta.permissions().mode() & 0o100 != 0,
            }
        } else {
            // Sockets, fifos: nothing to copy.
            continue;
        };
        let size = meta.len();
        let reuse = previous
            .and_then(|m| m.files.get(&p))
            .filter(|e| e.size == size && e.mtime_ns == mtime_ns && e.mode == kind.git_mode())
            .map(|e| e.hash.clone());
        let hash = match (reuse, &kind) {
            (Some(h), _) => h,
            (None, Kind::Symlink { target }) => hash_bytes(target.as_bytes()),
            (None, Kind::File { .. }) => hash_file(&full)?,
        };
        files.push(FileEntry {
            path: p,
            kind,
            size,
            mtime_ns,
            hash,
            untracked,
        });
    }
    deleted.sort();
    let name = root
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "repo".into());
    Ok(Repo {
        name,
        head,
        branch,
        origin_url: git::config(&root, "remote.origin.url")?,
        user_name: git::config(&root, "user.name")?,
        user_email: git::config(&root, "user.email")?,
        files,
        deleted,
        submodules,
        root,
    })
}

/// `sha256:<hex>` of some bytes.
pub fn hash_bytes(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// `sha256:<hex>` of a file's content.
pub fn hash_file(path: &Path) -> Result<String, WorkspaceError> {
    let mut f = std::fs::File::open(path).map_err(WorkspaceError::io(path, "opening file"))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(WorkspaceError::io(path, "reading file"))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("sha256:{}", hex::encode(h.finalize())))
}

/// The commit `rev` names in the repository at `root`.
pub fn resolve_commit(root: &Path, rev: &str) -> Result<String, WorkspaceError> {
    if rev.starts_with('-') {
        return Err(WorkspaceError::BadRevision {
            path: root.to_path_buf(),
            rev: rev.into(),
            detail: "a revision cannot start with '-'".into(),
        });
    }
    git::text(
        root,
        &["rev-parse", "--verify", "-q", &format!("{rev}^{{commit}}")],
    )
    .map_err(|e| WorkspaceError::BadRevision {
        path: root.to_path_buf(),
        rev: rev.into(),
        detail: match e {
            WorkspaceError::Git { detail, .. } if !detail.is_empty() => detail,
            _ => "no such commit".into(),
        },
    })
}

/// Checks a branch name with `git check-ref-format --branch`.
pub fn check_branch_name(root: &Path, name: &str) -> Result<(), WorkspaceError> {
    if name.starts_with('-') {
        return Err(WorkspaceError::BadBranch {
            name: name.into(),
            detail: "a branch name cannot start with '-'".into(),
        });
    }
    git::run(root, &["check-ref-format", "--branch", name])
        .map(|_| ())
        .map_err(|e| WorkspaceError::BadBranch {
            name: name.into(),
            detail: match e {
                WorkspaceError::Git { detail, .. } => detail,
                other => other.to_string(),
            },
        })
}
