//! Starting bangerd on first use.
//!
//! When the socket does not answer, the CLI finds `bangerd` (next to its own executable first,
//! so an unpacked release or a `target/debug` tree works without PATH changes; then PATH),
//! spawns it in a new session with stdin/stdout on /dev/null and stderr in
//! `<runtime_dir>/bangerd.start.log`, and pings the socket until it answers. If bangerd exits
//! first, the end of that log (usually a config error) is the error message.

use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::client::{self, CallError};
use crate::error::CliError;

/// The daemon binary's file name.
pub const BANGERD: &str = "bangerd";

/// How long to wait for a freshly started daemon to answer a ping.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);

/// How many lines of the start log an error shows.
const LOG_TAIL_LINES: usize = 10;

/// Where bangerd is: `<dir of current_exe>/bangerd`, else the first executable `bangerd` in
/// `path_var`.
pub fn locate_bangerd(current_exe: Option<&Path>, path_var: Option<&OsStr>) -> Option<PathBuf> {
    let beside = current_exe
        .and_then(Path::parent)
        .map(|dir| dir.join(BANGERD));
    let in_path = path_var
        .into_iter()
        .flat_map(std::env::split_paths)
        // An empty PATH entry means the cwd, a classic foot-gun; skip it.
        .filter(|dir| !dir.as_os_str().is_empty())
        .map(|dir| dir.join(BANGERD));
    beside.into_iter().chain(in_path).find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// What starting the daemon needs to know.
#[derive(Debug, Clone)]
pub struct StartSpec {
    pub bangerd: PathBuf,
    /// `--config` to pass on (only when the user gave one).
    pub config: Option<PathBuf>,
    pub runtime_dir: PathBuf,
    pub socket: PathBuf,
    pub timeout: Duration,
}

impl StartSpec {
    pub fn start_log(&self) -> PathBuf {
        self.runtime_dir.join("bangerd.start.log")
    }
}

/// Starts bangerd and waits until it answers a ping. Returns the child's pid.
pub fn start(spec: &StartSpec) -> Result<u32, CliError> {
    // The runtime dir may not exist yet; the daemon would create it, but the start log has to
    // be opened first. Owner-only, as the daemon makes it, and never a directory that is not
    // banger's (the same rule as the daemon's), nor one reached through another user's link.
    banger_config::trust::check_dir_chain(&spec.runtime_dir, banger_config::trust::current_uid())
        .map_err(|e| CliError::local(e.to_string()))?;
    banger_config::dirs::prepare_private_dir(
        "runtime_dir",
        &spec.runtime_dir,
        banger_config::dirs::RUNTIME_ENTRIES,
    )
    .map_err(|e| CliError::local(format!("cannot start bangerd: {e}")))?;
    // Another user may have made the directory between the connect's check and here.
    banger_config::trust::check_dir_chain(&spec.runtime_dir, banger_config::trust::current_uid())
        .map_err(|e| CliError::local(e.to_string()))?;
    let log_path = spec.start_log();
    let mut child = spawn(spec, &log_path)?;
    let pid = child.id();
    wait_ready(spec, &mut child, &log_path)?;
    Ok(pid)
}

fn spawn(spec: &StartSpec, log_path: &Path) -> Result<Child, CliError> {
    let mut attempts = 0;
    loop {
        let log = File::create(log_path)
            .map_err(|e| CliError::local(format!("cannot create {}: {e}", log_path.display())))?;
        let mut cmd = Command::new(&spec.bangerd);
        if let Some(config) = &spec.config {
            cmd.arg("--config").arg(config);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log));
        // SAFETY: setsid is async-signal-safe and touches no memory of the parent; it puts the
        // daemon in its own session so the terminal's hangup and Ctrl-C do not reach it.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        match cmd.spawn() {
            Ok(child) => return Ok(child),
            // A binary just written (an upgrade, a test) may still be open for writing in a
            // forked process for a moment.
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy && attempts < 20 => {
                attempts += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => {
                return Err(CliError::local(format!(
                    "cannot start {}: {e}",
                    spec.bangerd.display()
                )));
            }
        }
    }
}

fn wait_ready(spec: &StartSpec, child: &mut Child, log_path: &Path) -> Result<(), CliError> {
    let deadline = Instant::now() + spec.timeout;
    let mut exited = None;
    loop {
        match client::ping(&spec.socket, Duration::from_secs(2)) {
            Ok(()) => return Ok(()),
            Err(CallError::Connect(e)) if client::not_running(&e) => {}
            Err(e) => {
                return Err(CliError::local(format!(
                    "bangerd started but does not answer on {}: {}",
                    spec.socket.display(),
                    crate::describe_call_error(&e)
                )));
            }
        }
        if exited.is_none()
            && let Ok(Some(status)) = child.try_wait()
        {
            let tail = log_tail(log_path, LOG_TAIL_LINES);
            // Another banger started a daemon at the same moment: that one will answer.
            if !tail.contains("already running") {
                let detail = if tail.is_empty() {
                    format!("see {}", log_path.display())
                } else {
                    tail.replace('\n', "; ")
                };
                return Err(CliError::local(format!(
                    "bangerd exited ({status}): {detail}"
                )));
            }
            exited = Some(status);
        }
        if Instant::now() >= deadline {
            return Err(CliError::local(format!(
                "bangerd did not answer on {} within {}s; see {}",
                spec.socket.display(),
                spec.timeout.as_secs(),
                log_path.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The last `n` non-empty lines of a file, joined by newlines; empty if unreadable.
pub fn log_tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_exe(path: &Path, body: &str, mode: u32) {
        std::fs::write(path, body).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn prefers_the_binary_next_to_banger() {
        let t = tempfile::tempdir().unwrap();
        let (bin, other) = (t.path().join("bin"), t.path().join("other"));
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::create_dir_all(&other).unwrap();
        write_exe(&bin.join("bangerd"), "#!/bin/sh\n", 0o755);
        write_exe(&other.join("bangerd"), "#!/bin/sh\n", 0o755);
        let path_var = std::env::join_paths([&other]).unwrap();
        assert_eq!(
            locate_bangerd(Some(&bin.join("banger")), Some(&path_var)),
            Some(bin.join("bangerd"))
        );
    }

    #[test]
    fn falls_back_to_path_skipping_non_executables() {
        let t = tempfile::tempdir().unwrap();
        let (exe_dir, a, b) = (t.path().join("exe"), t.path().join("a"), t.path().join("b"));
        for d in [&exe_dir, &a, &b] {
            std::fs::create_dir_all(d).unwrap();
        }
        // Not executable, and a directory named bangerd: both skipped.
        write_exe(&exe_dir.join("bangerd"), "#!/bin/sh\n", 0o644);
        std::fs::create_dir(a.join("bangerd")).unwrap();
        write_exe(&b.join("bangerd"), "#!/bin/sh\n", 0o700);
        let path_var = std::env::join_paths([&a, &b]).unwrap();
        assert_eq!(
            locate_bangerd(Some(&exe_dir.join("banger")), Some(&path_var)),
            Some(b.join("bangerd"))
        );
        assert_eq!(locate_bangerd(Some(&exe_dir.join("banger")), None), None);
        assert_eq!(locate_bangerd(None, Some(OsStr::new(""))), None);
    }

    #[test]
    fn a_daemon_that_exits_shows_its_log() {
        let t = tempfile::tempdir().unwrap();
        let fake = t.path().join("bangerd");
        write_exe(
            &fake,
            "#!/bin/sh\necho \"args: $*\" >&2\necho 'bangerd: invalid config file /c.toml: line 1' >&2\nexit 1\n",
            0o755,
        );
        let runtime = t.path().join("run");
        let spec = StartSpec {
            bangerd: fake,
            config: Some(PathBuf::from("/c.toml")),
            socket: runtime.join("bangerd.sock"),
            runtime_dir: runtime.clone(),
            timeout: Duration::from_secs(10),
        };
        let started = Instant::now();
        let err = start(&spec).unwrap_err();
        let msg = err.message.unwrap();
        assert!(msg.contains("invalid config file /c.toml"), "{msg}");
        assert!(msg.contains("args: --config /c.toml"), "{msg}");
        assert!(!msg.contains('\n'), "one line: {msg}");
        assert_eq!(err.code, 1);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "did not wait out the timeout"
        );
        let mode = std::fs::metadata(&runtime).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
    }

    #[test]
    fn log_tail_keeps_the_last_lines() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("log");
        std::fs::write(&p, "a\n\nb\nc\nd\n").unwrap();
        assert_eq!(log_tail(&p, 2), "c\nd");
        assert_eq!(log_tail(&p, 10), "a\nb\nc\nd");
        assert_eq!(log_tail(&t.path().join("missing"), 3), "");
    }
}
