//! Running git: argv only, never a shell, and never under a caller's `GIT_DIR`/`GIT_INDEX_FILE`
//! (a hook environment would otherwise redirect every call).

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::WorkspaceError;

/// Variables that would make git look at another repository, index or tree than the one
/// named with `-C`.
const GIT_ENV: &[&str] = &[
    "GIT_DIR",
    "GIT_WORK_TREE",
    "GIT_INDEX_FILE",
    "GIT_OBJECT_DIRECTORY",
    "GIT_ALTERNATE_OBJECT_DIRECTORIES",
    "GIT_COMMON_DIR",
    "GIT_NAMESPACE",
    "GIT_CEILING_DIRECTORIES",
];

/// A git command run in `dir`.
pub fn command(dir: &Path) -> Command {
    let mut c = Command::new("git");
    c.arg("-C").arg(dir);
    for v in GIT_ENV {
        c.env_remove(v);
    }
    c.env("GIT_TERMINAL_PROMPT", "0")
        .env("LC_ALL", "C")
        .stdin(Stdio::null());
    c
}

/// Runs `git -C dir args…` with `input` on stdin; returns stdout, or an error naming the
/// command and carrying git's stderr.
pub fn run_with_input(dir: &Path, args: &[&str], input: &[u8]) -> Result<Vec<u8>, WorkspaceError> {
    let fail = |detail: String| WorkspaceError::Git {
        path: dir.to_path_buf(),
        args: args.join(" "),
        detail,
    };
    let mut cmd = command(dir);
    cmd.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| fail(format!("cannot run git: {e} (is git installed?)")))?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    let data = input.to_vec();
    // Written from a thread so a large output cannot deadlock against a large input.
    let writer = std::thread::spawn(move || stdin.write_all(&data));
    let out = child
        .wait_with_output()
        .map_err(|e| fail(format!("waiting for git: {e}")))?;
    let written = writer.join().unwrap_or(Ok(()));
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
        return Err(fail(if err.is_empty() {
            format!("exited with {}", out.status)
        } else {
            err
        }));
    }
    written.map_err(|e| fail(format!("writing to git: {e}")))?;
    Ok(out.stdout)
}

/// Runs `git -C dir args…`; returns stdout.
pub fn run(dir: &Path, args: &[&str]) -> Result<Vec<u8>, WorkspaceError> {
    run_with_input(dir, args, &[])
}

/// Like [`run`], trimmed text.
pub fn text(dir: &Path, args: &[&str]) -> Result<String, WorkspaceError> {
    Ok(String::from_utf8_lossy(&run(dir, args)?).trim().to_string())
}

/// `git config --get key`: `None` when unset.
pub fn config(dir: &Path, key: &str) -> Result<Option<String>, WorkspaceError> {
    let out = command(dir)
        .args(["config", "--get", key])
        .output()
        .map_err(|e| WorkspaceError::Git {
            path: dir.to_path_buf(),
            args: format!("config --get {key}"),
            detail: format!("cannot run git: {e}"),
        })?;
    match out.status.code() {
        Some(0) => Ok(Some(
            String::from_utf8_lossy(&out.stdout)
                .trim_end_matches('\n')
                .to_string(),
        )),
        // 1: the key is not set.
        Some(1) => Ok(None),
        _ => Err(WorkspaceError::Git {
            path: dir.to_path_buf(),
            args: format!("config --get {key}"),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        }),
    }
}

/// Splits NUL-terminated git output.
pub fn split_z(out: &[u8]) -> impl Iterator<Item = &[u8]> {
    out.split(|b| *b == 0).filter(|s| !s.is_empty())
}
