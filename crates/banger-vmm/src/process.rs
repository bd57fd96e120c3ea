//! Process supervision: launching VMM processes that outlive the daemon, and finding out later
//! whether a recorded process is still the one we launched.
//!
//! A VMM is identified by its pid *and* its start time (field 22 of `/proc/PID/stat`), so a pid
//! recycled by the kernel is never mistaken for our process. Children the daemon spawned are
//! reaped by a background task (so an exited VMM does not linger as a zombie); processes adopted
//! after a daemon restart are not our children, and their exit is noticed by polling `/proc`.

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::Signal;
use nix::unistd::Pid;

use crate::VmmError;

/// The last `lines` lines of a text file, or an empty string if it cannot be read.
pub fn tail_file(path: &Path, lines: usize) -> String {
    let Ok(text) = std::fs::read_to_string(path) else {
        return String::new();
    };
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The current length of the log at `path` (0 when missing): where the next start's lines
/// begin, so its error quotes those and not an older run's.
pub fn log_mark(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// The last `lines` lines of `path` written after byte `from` (a [`log_mark`]); everything when
/// the file is shorter than `from` (it was rotated or truncated meanwhile).
pub fn tail_file_since(path: &Path, from: u64, lines: usize) -> String {
    let Ok(bytes) = std::fs::read(path) else {
        return String::new();
    };
    let start = usize::try_from(from).unwrap_or(usize::MAX);
    let tail = if start <= bytes.len() {
        &bytes[start..]
    } else {
        &bytes[..]
    };
    let text = String::from_utf8_lossy(tail);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// What to launch with [`spawn_detached`].
#[derive(Debug, Clone)]
pub struct DetachedCommand {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    /// Extra environment on top of the daemon's own.
    pub env: Vec<(OsString, OsString)>,
    /// stdout and stderr are appended here; created with mode 0600 if missing.
    pub log_path: PathBuf,
    /// With a cap, output goes through a [`crate::logpump`] that keeps `log_path` and its one
    /// rotated file under it; without, straight into the file.
    pub log_max_bytes: Option<u64>,
    /// Open descriptors the child inherits, as (descriptor in the daemon, number in the child):
    /// a tap opened by the root helper becomes QEMU's `fd=3`.
    pub inherit_fds: Vec<(std::os::fd::RawFd, std::os::fd::RawFd)>,
}

/// A process launched by [`spawn_detached`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spawned {
    pub pid: i32,
    pub start_time: u64,
}

/// Launches a process in a new session (so neither a daemon restart nor a terminal hang-up
/// reaches it), with stdin from /dev/null, stdout and stderr appended to the log file, and umask
/// 077. A background task reaps it when it exits while this daemon runs.
///
/// Must be called within a Tokio runtime.
pub fn spawn_detached(cmd: &DetachedCommand) -> Result<Spawned, VmmError> {
    let log: OwnedFd = match cmd.log_max_bytes {
        Some(max) => crate::logpump::start(&cmd.log_path, max)?,
        None => OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&cmd.log_path)
            .map_err(|source| VmmError::Io {
                path: cmd.log_path.clone(),
                source,
            })?
            .into(),
    };
    let log_err = log.try_clone().map_err(|source| VmmError::Io {
        path: cmd.log_path.clone(),
        source,
    })?;

    let mut command = tokio::process::Command::new(&cmd.program);
    command
        .args(&cmd.args)
        .envs(cmd.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log_err))
        // The VMM must survive the daemon: never kill it when the Child is dropped.
        .kill_on_drop(false);
    let inherit = cmd.inherit_fds.clone();
    // SAFETY: the closure runs in the forked child before exec and calls only setsid(2),
    // umask(2), dup2(2) and fcntl(2), all async-signal-safe; it reads only `inherit`, which
    // was moved into it before the fork, and allocates nothing.
    unsafe {
        command.pre_exec(move || {
            if libc::setsid() == -1 {
                return Err(std::io::Error::last_os_error());
            }
            libc::umask(0o077);
            for &(from, to) in &inherit {
                if from == to {
                    // dup2 onto itself keeps close-on-exec set: clear it instead.
                    if libc::fcntl(from, libc::F_SETFD, 0) == -1 {
                        return Err(std::io::Error::last_os_error());
                    }
                } else if libc::dup2(from, to) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }

    let mut child = command.spawn().map_err(|source| VmmError::Spawn {
        program: cmd.program.clone(),
        source,
    })?;
    let pid = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .ok_or_else(|| VmmError::Spawn {
            program: cmd.program.clone(),
            source: std::io::Error::other("spawned process has no pid"),
        })?;
    // The child is not reaped before the reaper below runs, so its /proc entry exists here even
    // if it already exited (as a zombie).
    let start_time = proc_start_time(pid);
    if start_time.is_none() {
        // Without a start time it could never be identified again: do not leave it running.
        let _ = child.start_kill();
    }

    let program = cmd.program.clone();
    tokio::spawn(async move {
        match child.wait().await {
            Ok(status) => {
                tracing::info!(pid, program = %program.display(), %status, "VMM process exited")
            }
            Err(e) => {
                tracing::warn!(pid, program = %program.display(), error = %e, "waiting for VMM process failed")
            }
        }
    });

    let Some(start_time) = start_time else {
        return Err(VmmError::Spawn {
            program: cmd.program.clone(),
            source: std::io::Error::other(format!(
                "cannot read /proc/{pid}/stat of the spawned process"
            )),
        });
    };
    Ok(Spawned { pid, start_time })
}

/// Parsed bits of `/proc/PID/stat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    /// Field 3: R, S, D, Z, T, X, ...
    pub state: char,
    /// Field 6.
    pub session: i32,
    /// Field 22, in clock ticks since boot.
    pub start_time: u64,
}

/// Parses the text of `/proc/PID/stat`. The comm field (2) is in parentheses and may itself
/// contain spaces and parentheses, so the remaining fields start after the LAST `)`.
pub fn parse_stat(text: &str) -> Option<ProcStat> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 of the file.
    let state = fields.first()?.chars().next()?;
    let session = fields.get(6 - 3)?.parse().ok()?;
    let start_time = fields.get(22 - 3)?.parse().ok()?;
    Some(ProcStat {
        state,
        session,
        start_time,
    })
}

/// The parsed `/proc/PID/stat` of `pid`, or `None` if there is no such process.
pub fn proc_stat(pid: i32) -> Option<ProcStat> {
    if pid <= 0 {
        return None;
    }
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

/// The start time (field 22 of `/proc/PID/stat`) of `pid`, if it exists.
pub fn proc_start_time(pid: i32) -> Option<u64> {
    proc_stat(pid).map(|s| s.start_time)
}

/// Whether `pid` exists, is not a zombie, and started at `start_time`.
pub fn is_alive(pid: i32, start_time: u64) -> bool {
    matches!(proc_stat(pid), Some(s) if s.start_time == start_time && !matches!(s.state, 'Z' | 'X' | 'x'))
}

/// Sends `sig` to `pid` as is. Returns `Ok(false)` if there is no such process.
pub fn signal(pid: i32, sig: Signal) -> Result<bool, VmmError> {
    if pid <= 0 {
        return Err(VmmError::Signal {
            pid,
            reason: "refusing to signal a pid <= 0".into(),
        });
    }
    match nix::sys::signal::kill(Pid::from_raw(pid), sig) {
        Ok(()) => Ok(true),
        Err(Errno::ESRCH) => Ok(false),
        Err(e) => Err(VmmError::Signal {
            pid,
            reason: format!("{sig}: {e}"),
        }),
    }
}

/// Sends `sig` to `pid` only if it is still the process that started at `start_time`. Returns
/// `Ok(false)` if that process is gone.
///
/// The pid is pinned with a pidfd before its start time is checked, so the signal cannot reach a
/// process that took over a recycled pid in between. Falls back to a plain check-then-kill on
/// kernels without pidfds.
pub fn signal_process(pid: i32, start_time: u64, sig: Signal) -> Result<bool, VmmError> {
    if pid <= 0 {
        return Err(VmmError::Signal {
            pid,
            reason: "refusing to signal a pid <= 0".into(),
        });
    }
    let pidfd = match pidfd_open(pid) {
        Ok(fd) => Some(fd),
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return Ok(false),
        Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => None,
        Err(e) => {
            return Err(VmmError::Signal {
                pid,
                reason: format!("pidfd_open: {e}"),
            });
        }
    };
    if !is_alive(pid, start_time) {
        return Ok(false);
    }
    let Some(pidfd) = pidfd else {
        return signal(pid, sig);
    };
    match pidfd_send_signal(&pidfd, sig) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(false),
        Err(e) => Err(VmmError::Signal {
            pid,
            reason: format!("{sig}: {e}"),
        }),
    }
}

fn pidfd_open(pid: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags by value and touches no memory of ours.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(|_| std::io::Error::other("pidfd out of range"))?;
    // SAFETY: the kernel just returned this fd to us and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn pidfd_send_signal(pidfd: &OwnedFd, sig: Signal) -> std::io::Result<()> {
    // SAFETY: a valid open pidfd, a signal number, a null siginfo (allowed: the kernel fills in
    // a default one) and zero flags; no memory of ours is written.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            sig as libc::c_int,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// How often exit is polled: fast at first (a VMM usually exits within milliseconds of being
/// told to), then backing off so long waits cost little.
fn next_poll(current: Duration) -> Duration {
    (current * 2).min(Duration::from_millis(100))
}

const FIRST_POLL: Duration = Duration::from_millis(5);

/// Waits until the process `pid` started at `start_time` is gone (or a zombie). Returns `true`
/// if it went away within `timeout`.
pub async fn wait_gone(pid: i32, start_time: u64, timeout: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut poll = FIRST_POLL;
    loop {
        if !is_alive(pid, start_time) {
            return true;
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return false;
        }
        tokio::time::sleep(poll.min(deadline - now)).await;
        poll = next_poll(poll);
    }
}

/// Resolves when the process `pid` started at `start_time` is gone (or a zombie).
pub async fn wait_exit(pid: i32, start_time: u64) {
    let mut poll = FIRST_POLL;
    while is_alive(pid, start_time) {
        tokio::time::sleep(poll).await;
        poll = next_poll(poll);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_hostile_comm() {
        // comm "a) (b c)" contains spaces and parentheses.
        let line = "1234 (a) (b c)) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 \
                    987654 1000 200 18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 17 1 0 0";
        let stat = parse_stat(line).unwrap();
        assert_eq!(stat.state, 'S');
        assert_eq!(stat.session, 1234);
        assert_eq!(stat.start_time, 987654);
    }

    #[test]
    fn rejects_truncated_stat() {
        assert_eq!(parse_stat("1234 (x) S 1 2 3"), None);
        assert_eq!(parse_stat("garbage without paren"), None);
        assert_eq!(
            parse_stat("1 (x) S 1 1 notanumber 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0"),
            None
        );
    }

    #[test]
    fn own_process_is_alive_and_start_time_matters() {
        let me = std::process::id() as i32;
        let st = proc_start_time(me).unwrap();
        assert!(is_alive(me, st));
        assert!(!is_alive(me, st + 1));
        assert!(!is_alive(0, st));
        assert!(!is_alive(-5, st));
    }

    #[test]
    fn refuses_to_signal_nonpositive_pids() {
        assert!(signal(0, Signal::SIGTERM).is_err());
        assert!(signal_process(-1, 0, Signal::SIGTERM).is_err());
    }

    #[test]
    fn signal_process_with_wrong_start_time_does_nothing() {
        let me = std::process::id() as i32;
        let st = proc_start_time(me).unwrap();
        // SIGKILL would end the test run if it were delivered.
        assert!(!signal_process(me, st + 1, Signal::SIGKILL).unwrap());
    }

    fn sh(dir: &Path, script: &str) -> DetachedCommand {
        DetachedCommand {
            inherit_fds: Vec::new(),
            program: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            env: vec![("BANGER_TEST_VAR".into(), "hello".into())],
            log_path: dir.join("out.log"),
            log_max_bytes: None,
        }
    }

    #[tokio::test]
    async fn detached_child_has_own_session_umask_env_and_log() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let cmd = sh(
            dir.path(),
            "umask; echo \"$BANGER_TEST_VAR\"; echo oops >&2; read x || echo eof; sleep 5",
        );
        let child = spawn_detached(&cmd).unwrap();
        assert!(is_alive(child.pid, child.start_time));
        let stat = proc_stat(child.pid).unwrap();
        assert_eq!(stat.session, child.pid, "child must lead its own session");

        // Wait for the script's output before killing it.
        let log = &cmd.log_path;
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !tail_file(log, 10).contains("eof") {
            assert!(std::time::Instant::now() < deadline, "no output in {log:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(tail_file(log, 10), "0077\nhello\noops\neof");
        let mode = std::fs::metadata(log).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);

        assert!(signal_process(child.pid, child.start_time, Signal::SIGKILL).unwrap());
        assert!(wait_gone(child.pid, child.start_time, Duration::from_secs(5)).await);
        // The reaper task collects it: no zombie remains.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while proc_start_time(child.pid) == Some(child.start_time) {
            assert!(std::time::Instant::now() < deadline, "child left a zombie");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(!signal_process(child.pid, child.start_time, Signal::SIGKILL).unwrap());
    }

    #[tokio::test]
    async fn inherited_descriptors_arrive_under_their_number() {
        use std::os::fd::AsRawFd;
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("marker");
        std::fs::write(&marker, "via fd 7\n").unwrap();
        let file = std::fs::File::open(&marker).unwrap();
        let mut cmd = sh(dir.path(), "cat <&7; cat <&8 2>/dev/null || echo no-8");
        cmd.inherit_fds = vec![(file.as_raw_fd(), 7)];
        let child = spawn_detached(&cmd).unwrap();
        assert!(wait_gone(child.pid, child.start_time, Duration::from_secs(5)).await);
        let out = tail_file(&cmd.log_path, 5);
        assert!(out.starts_with("via fd 7"), "{out}");
        assert!(out.contains("no-8"), "{out}");
    }

    #[tokio::test]
    async fn log_is_appended_not_truncated() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("out.log"), "before\n").unwrap();
        let child = spawn_detached(&sh(dir.path(), "echo after")).unwrap();
        tokio::time::timeout(
            Duration::from_secs(5),
            wait_exit(child.pid, child.start_time),
        )
        .await
        .unwrap();
        assert_eq!(tail_file(&dir.path().join("out.log"), 5), "before\nafter");
    }

    #[tokio::test]
    async fn wait_gone_times_out_on_a_live_process() {
        let dir = tempfile::tempdir().unwrap();
        let child = spawn_detached(&sh(dir.path(), "sleep 5")).unwrap();
        assert!(!wait_gone(child.pid, child.start_time, Duration::from_millis(50)).await);
        assert!(signal_process(child.pid, child.start_time, Signal::SIGKILL).unwrap());
        assert!(wait_gone(child.pid, child.start_time, Duration::from_secs(5)).await);
    }

    #[tokio::test]
    async fn spawning_a_missing_program_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = sh(dir.path(), "");
        cmd.program = dir.path().join("no-such-binary");
        let err = spawn_detached(&cmd).unwrap_err();
        assert!(matches!(err, VmmError::Spawn { .. }), "{err:?}");
        assert!(err.to_string().contains("no-such-binary"), "{err}");
    }

    #[tokio::test]
    async fn unwritable_log_is_an_io_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = sh(dir.path(), "true");
        cmd.log_path = dir.path().join("missing-dir/out.log");
        let err = spawn_detached(&cmd).unwrap_err();
        assert!(err.to_string().contains("missing-dir/out.log"), "{err}");
    }
}
