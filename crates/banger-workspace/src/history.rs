//! The shallow copy of history the guest gets: a throw-away repository on the host holding
//! the last `depth` commits up to the prepared commit, the branch, `origin`'s URL, the user's
//! identity and (when the working tree is overlaid) the host's index. Its `.git` is what the
//! guest receives.

use std::path::{Path, PathBuf};

use crate::repo::Repo;
use crate::{WorkspaceError, git};

/// History the guest gets by default: enough for `git log` and recent diffs.
pub const DEFAULT_DEPTH: u32 = 10;

/// What the guest's history should look like.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HistorySpec {
    /// Commits of history to copy (at least 1).
    pub depth: u32,
    /// A new guest-only branch to start.
    pub branch: Option<String>,
    /// Where that branch starts (a commit of the host repository); HEAD when absent. With a
    /// start point, the guest checks that commit out instead of receiving the host's working
    /// tree.
    pub from: Option<String>,
}

/// The temporary repository; removed on drop.
#[derive(Debug)]
pub struct History {
    dir: tempfile::TempDir,
    /// The commit the guest's HEAD is at.
    pub head: String,
    /// The branch the guest has checked out (`None`: detached).
    pub branch: Option<String>,
    /// Whether the guest checks out `head` (`--from`) rather than receiving the host's tree.
    pub checkout: bool,
}

impl History {
    /// The repository's `.git` directory.
    pub fn git_dir(&self) -> PathBuf {
        self.dir.path().join("r/.git")
    }

    fn work(&self) -> PathBuf {
        self.dir.path().join("r")
    }
}

/// Builds the history for `repo` in a temp directory.
pub fn build(repo: &Repo, spec: &HistorySpec) -> Result<History, WorkspaceError> {
    build_in(repo, spec, None)
}

/// The prefix of a temp repository's directory: `banger-ws.<pid of the process that made it>.`,
/// so a sweeper can tell the ones whose process is gone (killed before it could remove them).
pub fn temp_prefix(pid: u32) -> String {
    format!("banger-ws.{pid}.")
}

/// The pid a temp repository's directory name carries (see [`temp_prefix`]).
pub fn temp_owner(name: &str) -> Option<u32> {
    name.strip_prefix("banger-ws.")?
        .split('.')
        .next()?
        .parse()
        .ok()
}

/// [`build`] in `scratch` (the system temp dir when `None`); the directory is private (0700).
pub fn build_in(
    repo: &Repo,
    spec: &HistorySpec,
    scratch: Option<&Path>,
) -> Result<History, WorkspaceError> {
    let root = &repo.root;
    if let Some(b) = &spec.branch {
        crate::repo::check_branch_name(root, b)?;
    }
    let head = match &spec.from {
        Some(rev) => crate::repo::resolve_commit(root, rev)?,
        None => repo.head.clone(),
    };
    let base = scratch.map_or_else(std::env::temp_dir, Path::to_path_buf);
    let dir = {
        use std::os::unix::fs::PermissionsExt;
        tempfile::Builder::new()
            .prefix(&temp_prefix(std::process::id()))
            .permissions(std::fs::Permissions::from_mode(0o700))
            .tempdir_in(&base)
            .map_err(WorkspaceError::io(&base, "creating a temp dir"))?
    };
    let work = dir.path().join("r");
    let format =
        git::text(root, &["rev-parse", "--show-object-format"]).unwrap_or_else(|_| "sha1".into());
    let work_s = work.to_string_lossy().into_owned();
    git::run(
        dir.path(),
        &[
            "init",
            "-q",
            "--template=",
            &format!("--object-format={format}"),
            &work_s,
        ],
    )?;
    let h = History {
        dir,
        head: head.clone(),
        branch: spec.branch.clone().or_else(|| {
            if spec.from.is_some() {
                None
            } else {
                repo.branch.clone()
            }
        }),
        checkout: spec.from.is_some(),
    };
    let w = h.work();
    let root_s = root.to_string_lossy().into_owned();
    git::run(
        &w,
        &[
            "fetch",
            "-q",
            "--no-tags",
            "--no-write-fetch-head",
            &format!("--depth={}", spec.depth.max(1)),
            "--",
            &root_s,
            &format!("{head}:refs/banger/prepared"),
        ],
    )?;
    let got = git::text(&w, &["rev-parse", "refs/banger/prepared"])?;
    if got != head {
        return Err(WorkspaceError::HeadMoved {
            path: root.clone(),
            expected: head,
            found: got,
        });
    }
    match &h.branch {
        Some(b) => {
            git::run(&w, &["update-ref", &format!("refs/heads/{b}"), &head])?;
            git::run(&w, &["symbolic-ref", "HEAD", &format!("refs/heads/{b}")])?;
        }
        None => {
            git::run(&w, &["update-ref", "--no-deref", "HEAD", &head])?;
        }
    }
    git::run(&w, &["update-ref", "-d", "refs/banger/prepared"])?;
    if let Some(url) = &repo.origin_url {
        git::run(&w, &["config", "remote.origin.url", url])?;
        git::run(
            &w,
            &[
                "config",
                "remote.origin.fetch",
                "+refs/heads/*:refs/remotes/origin/*",
            ],
        )?;
    }
    if let Some(n) = &repo.user_name {
        git::run(&w, &["config", "user.name", n])?;
    }
    if let Some(e) = &repo.user_email {
        git::run(&w, &["config", "user.email", e])?;
    }
    if h.checkout {
        git::run(&w, &["read-tree", &head])?;
    } else {
        copy_index(root, &w)?;
    }
    Ok(h)
}

/// Gives the temp repository the host's index (staged changes included), copying the blobs
/// it refers to that the shallow history lacks.
fn copy_index(root: &Path, work: &Path) -> Result<(), WorkspaceError> {
    let staged = git::run(root, &["ls-files", "-z", "--stage"])?;
    let mut wanted = String::new();
    for rec in git::split_z(&staged) {
        let text = String::from_utf8_lossy(rec);
        let mut it = text.split(' ');
        if let (Some(mode), Some(id)) = (it.next(), it.next())
            && mode != "160000"
        {
            wanted.push_str(id);
            wanted.push('\n');
        }
    }
    let check = git::run_with_input(
        work,
        &["cat-file", "--batch-check=%(objectname) %(objecttype)"],
        wanted.as_bytes(),
    )?;
    let mut missing: Vec<String> = String::from_utf8_lossy(&check)
        .lines()
        .filter(|l| l.ends_with(" missing"))
        .filter_map(|l| l.split(' ').next().map(str::to_string))
        .collect();
    missing.sort_unstable();
    missing.dedup();
    if !missing.is_empty() {
        let list = missing.join("\n") + "\n";
        let pack = git::run_with_input(root, &["pack-objects", "-q", "--stdout"], list.as_bytes())?;
        git::run_with_input(work, &["unpack-objects", "-q"], &pack)?;
    }
    git::run_with_input(work, &["update-index", "-z", "--index-info"], &staged)?;
    Ok(())
}
