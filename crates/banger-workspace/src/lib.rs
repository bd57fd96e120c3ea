//! The host side of banger workspaces: put a git repository into a VM, keep it in sync, and
//! get the guest's work back.
//!
//! * [`repo::inspect`] lists what a workspace carries: git-tracked files (deleted ones as
//!   deletions), untracked non-ignored files only when asked, ignored files never; modes,
//!   symbolic links (as links) and binary content.
//! * [`prepare`] builds the copy: a shallow history ([`history`]) whose `.git` the guest
//!   unpacks, then the working tree laid over it, so `git status` in the guest matches the
//!   host's.
//! * [`manifest::Manifest`] records what the guest holds; [`manifest::Manifest::diff`] is
//!   what `sync` sends.
//! * [`guest`] holds the guest-side scripts, [`archive`] the tar streams (built in Rust from
//!   the file list, never `tar -T`), [`extract`] the one way guest bytes become host files.
//!
//! Nothing here knows about the daemon: the CLI runs the scripts over ssh.

pub mod archive;
mod error;
pub mod extract;
pub mod git;
pub mod guest;
pub mod history;
pub mod manifest;
pub mod repo;

use std::io::{BufWriter, Write};
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};

pub use error::WorkspaceError;
pub use history::{History, HistorySpec};
pub use manifest::{Manifest, ManifestEntry, SyncPlan};
pub use repo::{FileEntry, Kind, Options, Repo};

/// What `prepare` copies and where.
#[derive(Debug, Clone, Default)]
pub struct PrepareSpec {
    pub options: Options,
    pub history: HistorySpec,
    /// Where the repository goes in the guest; `/root/<repo name>` when absent.
    pub guest_path: Option<String>,
}

/// A workspace ready to be sent: the inspected repository and its shallow history.
#[derive(Debug)]
pub struct Prepared {
    pub repo: Repo,
    pub history: History,
    pub guest_path: String,
    spec: PrepareSpec,
}

/// `/root/<repo name>`.
pub fn default_guest_path(repo: &Repo) -> String {
    format!("/root/{}", repo.name)
}

/// Inspects the repository at `path` and builds the history the guest will get.
pub fn prepare(path: &Path, spec: &PrepareSpec) -> Result<Prepared, WorkspaceError> {
    prepare_in(path, spec, None)
}

/// [`prepare`], with the temporary repository made in `scratch` (see [`history::build_in`]).
pub fn prepare_in(
    path: &Path,
    spec: &PrepareSpec,
    scratch: Option<&Path>,
) -> Result<Prepared, WorkspaceError> {
    let repo = repo::inspect(path, &spec.options, None)?;
    let guest_path = spec
        .guest_path
        .clone()
        .unwrap_or_else(|| default_guest_path(&repo));
    guest::validate_guest_path(&guest_path).map_err(|detail| WorkspaceError::Manifest {
        path: path.to_path_buf(),
        detail,
    })?;
    let history = history::build_in(&repo, &spec.history, scratch)?;
    Ok(Prepared {
        repo,
        history,
        guest_path,
        spec: spec.clone(),
    })
}

impl Prepared {
    /// The guest script that unpacks [`Prepared::write_archive`]'s stream.
    pub fn script(&self, force: bool) -> String {
        guest::prepare_script(&self.guest_path, force, self.history.checkout)
    }

    /// Working-tree files the archive carries (none when the guest checks a commit out).
    pub fn files(&self) -> &[FileEntry] {
        if self.history.checkout {
            &[]
        } else {
            &self.repo.files
        }
    }

    /// The archive: the history's `.git`, then the working tree.
    pub fn write_archive(&self, w: impl Write) -> Result<(), WorkspaceError> {
        let mut b = tar::Builder::new(w);
        b.follow_symlinks(false);
        let git_dir = self.history.git_dir();
        archive::append_tree(&mut b, Path::new(".git"), &git_dir)?;
        archive::append_worktree(&mut b, &self.repo.root, self.files())?;
        b.into_inner()
            .and_then(|mut w| w.flush())
            .map_err(WorkspaceError::io(&self.repo.root, "finishing the archive"))
    }

    /// What the guest holds once the archive is unpacked.
    pub fn manifest(&self) -> Result<Manifest, WorkspaceError> {
        let mut m = Manifest::of(
            &self.repo,
            &self.guest_path,
            &self.history.head,
            self.spec.options.include_untracked,
            self.spec.options.submodules,
        );
        if self.history.checkout {
            // The guest checked out a commit: record its blobs, so the first sync sends the
            // host's working tree over it.
            m.files.clear();
            let tree = git::run(
                &self.repo.root,
                &["ls-tree", "-r", "-z", "--full-tree", &self.history.head],
            )?;
            for rec in git::split_z(&tree) {
                let rec = String::from_utf8_lossy(rec);
                let Some((meta, path)) = rec.split_once('\t') else {
                    continue;
                };
                let f: Vec<&str> = meta.split(' ').collect();
                if f.len() == 3 && f[1] == "blob" {
                    m.files.insert(
                        path.to_string(),
                        ManifestEntry {
                            hash: format!("git:{}", f[2]),
                            mode: u32::from_str_radix(f[0], 8).unwrap_or(0o100644),
                            size: 0,
                            mtime_ns: 0,
                        },
                    );
                }
            }
        }
        Ok(m)
    }
}

/// Inspects the repository a manifest was made from, with the manifest's options, reusing its
/// hashes for files whose size and mtime did not change; returns it and what to send.
pub fn plan_sync(manifest: &Manifest) -> Result<(Repo, SyncPlan), WorkspaceError> {
    let opts = Options {
        include_untracked: manifest.include_untracked,
        submodules: manifest.submodules,
    };
    let repo = repo::inspect(&manifest.host_path, &opts, Some(manifest))?;
    let plan = manifest.diff(&repo);
    Ok((repo, plan))
}

/// The archive of a sync: the files the plan sends.
pub fn write_sync_archive(
    root: &Path,
    plan: &SyncPlan,
    w: impl Write,
) -> Result<(), WorkspaceError> {
    let mut b = tar::Builder::new(w);
    b.follow_symlinks(false);
    archive::append_worktree(&mut b, root, &plan.send)?;
    b.into_inner()
        .and_then(|mut w| w.flush())
        .map_err(WorkspaceError::io(root, "finishing the archive"))
}

/// Whether the host repository moved on since the manifest: a new HEAD, or files that differ.
/// `None` when it did not.
pub fn staleness(manifest: &Manifest) -> Result<Option<String>, WorkspaceError> {
    let (repo, plan) = plan_sync(manifest)?;
    let mut why = Vec::new();
    if repo.head != manifest.synced_head {
        why.push(format!(
            "HEAD moved from {} to {}",
            short(&manifest.synced_head),
            short(&repo.head)
        ));
    }
    if !plan.is_empty() {
        why.push(format!(
            "{} file{} changed and {} deleted",
            plan.send.len(),
            if plan.send.len() == 1 { "" } else { "s" },
            plan.delete.len()
        ));
    }
    Ok((!why.is_empty()).then(|| why.join(", ")))
}

fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

/// Runs `cmd` with `feed` writing its stdin (buffered); returns its exit status. A command
/// that exits before reading everything (a failing guest script) reports its own status
/// rather than a broken pipe.
pub fn run_with_stdin(
    cmd: &mut Command,
    feed: impl FnOnce(&mut dyn Write) -> Result<(), WorkspaceError>,
) -> Result<ExitStatus, WorkspaceError> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let mut child = cmd
        .stdin(Stdio::piped())
        .spawn()
        .map_err(WorkspaceError::io(&program, "starting"))?;
    let stdin = child.stdin.take().expect("piped stdin");
    let mut w = BufWriter::with_capacity(1 << 20, stdin);
    let fed = feed(&mut w).and_then(|()| {
        w.flush()
            .map_err(WorkspaceError::io(&program, "writing its input"))
    });
    drop(w);
    let status = child
        .wait()
        .map_err(WorkspaceError::io(&program, "waiting for it"))?;
    match fed {
        Err(_) if !status.success() => Ok(status),
        Err(e) => Err(e),
        Ok(()) => Ok(status),
    }
}

#[cfg(test)]
mod tests;
