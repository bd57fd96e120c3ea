//! Pieces both backends need: socket path rules, stale socket removal, MAC syntax, killing a
//! VMM by pid and start time.

use std::ffi::OsString;
use std::path::Path;
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::{SpawnRecorder, VmmError, VmmHandle, VmmKind, process};

/// How long an error report waits for an exited VMM's console output to reach its log.
pub(crate) const PUMP_DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// How many log lines an error about a VMM quotes.
pub(crate) const LOG_TAIL_LINES: usize = 20;

/// Longest Unix socket path (`sun_path` holds 108 bytes including the NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// How waiting for a freshly spawned VMM's control socket ended.
pub(crate) enum Waited {
    Exited,
    Timeout,
}

pub(crate) fn check_socket_path(what: &str, path: &Path) -> Result<(), VmmError> {
    let len = path.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err(VmmError::Spec(format!(
            "{what} {} is {len} bytes long; Unix socket paths are limited to {MAX_SOCKET_PATH} bytes",
            path.display()
        )));
    }
    Ok(())
}

/// Removes a Unix socket left at `path` by an earlier VMM (binding would fail on it). Anything
/// else at that path is left alone and reported.
pub(crate) fn remove_stale_socket(path: &Path) -> Result<(), VmmError> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(VmmError::Io {
            path: path.to_path_buf(),
            source,
        }),
        Ok(meta) if meta.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(|source| VmmError::Io {
                path: path.to_path_buf(),
                source,
            })
        }
        Ok(_) => Err(VmmError::Spec(format!(
            "{} exists and is not a socket; refusing to replace it with the VM's socket",
            path.display()
        ))),
    }
}

/// `aa:bb:cc:dd:ee:ff`, hex digits only.
pub(crate) fn is_valid_mac(mac: &str) -> bool {
    let parts: Vec<&str> = mac.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// SIGKILLs the process if it is still the one we launched, and waits up to `timeout` for it to
/// be gone. A process that is already gone is not an error.
pub(crate) async fn kill_pid(pid: i32, start_time: u64, timeout: Duration) -> Result<(), VmmError> {
    if !process::signal_process(pid, start_time, Signal::SIGKILL)? {
        return Ok(());
    }
    if process::wait_gone(pid, start_time, timeout).await {
        Ok(())
    } else {
        Err(VmmError::Signal {
            pid,
            reason: format!("still running {timeout:?} after SIGKILL"),
        })
    }
}

/// Runs `<bin> --version` (5 s at most) and returns its standard output; a failure or a hang
/// is an error naming the binary.
pub(crate) async fn version_output(
    bin: &Path,
    env: &[(OsString, OsString)],
) -> Result<String, VmmError> {
    let run = tokio::process::Command::new(bin)
        .arg("--version")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .map_err(|_| VmmError::Binary {
            path: bin.to_path_buf(),
            reason: "--version did not finish within 5s".into(),
        })?
        .map_err(|source| VmmError::Spawn {
            program: bin.to_path_buf(),
            source,
        })?;
    if !output.status.success() {
        return Err(VmmError::Binary {
            path: bin.to_path_buf(),
            reason: format!(
                "--version failed with {}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The handle of a VMM process that was just spawned, passed to `record` (see
/// [`crate::Vmm::spawn_recorded`]); if recording fails the process is killed.
pub(crate) async fn record_spawned(
    handle: VmmHandle,
    record: &SpawnRecorder,
    kill_timeout: Duration,
) -> Result<(), VmmError> {
    if let Err(reason) = record(&handle) {
        if let Err(e) = kill_pid(handle.pid, handle.start_time, kill_timeout).await {
            tracing::warn!(pid = handle.pid, error = %e, "killing an unrecorded VMM failed");
        }
        return Err(VmmError::Record {
            pid: handle.pid,
            reason,
        });
    }
    Ok(())
}

/// Turns the outcome of waiting for a new VMM's control socket into its handle or an error;
/// a VMM that never answered is killed first, so a failed spawn leaves no process behind.
pub(crate) async fn finish_spawn(
    kind: VmmKind,
    spawned: process::Spawned,
    socket: std::path::PathBuf,
    log_path: &Path,
    waited: Result<(), Waited>,
    socket_timeout: Duration,
    kill_timeout: Duration,
) -> Result<VmmHandle, VmmError> {
    match waited {
        Ok(()) => Ok(VmmHandle {
            kind,
            pid: spawned.pid,
            start_time: spawned.start_time,
            control_socket: socket,
            log_path: log_path.to_path_buf(),
        }),
        Err(Waited::Exited) => {
            // Its last words may still be in the log pump's pipe.
            crate::logpump::drained(log_path, PUMP_DRAIN_TIMEOUT).await;
            Err(VmmError::Exited {
                pid: spawned.pid,
                log_tail: process::tail_file(log_path, LOG_TAIL_LINES),
            })
        }
        Err(Waited::Timeout) => {
            if let Err(e) = kill_pid(spawned.pid, spawned.start_time, kill_timeout).await {
                tracing::warn!(pid = spawned.pid, error = %e, "killing an unresponsive VMM failed");
            }
            crate::logpump::drained(log_path, PUMP_DRAIN_TIMEOUT).await;
            Err(VmmError::SocketTimeout {
                socket,
                timeout: socket_timeout,
                log_tail: process::tail_file(log_path, LOG_TAIL_LINES),
            })
        }
    }
}

/// A failed spawn's error quotes only what this start wrote to the log (from byte `mark`, see
/// [`process::log_mark`]): the log is appended across starts, and an older run's lines would
/// blame the wrong start.
pub(crate) fn own_log_tail(err: VmmError, log_path: &Path, mark: u64) -> VmmError {
    let tail = || process::tail_file_since(log_path, mark, LOG_TAIL_LINES);
    match err {
        VmmError::Exited { pid, .. } => VmmError::Exited {
            pid,
            log_tail: tail(),
        },
        VmmError::SocketTimeout {
            socket, timeout, ..
        } => VmmError::SocketTimeout {
            socket,
            timeout,
            log_tail: tail(),
        },
        other => other,
    }
}

/// Waits for a VMM to exit after a shutdown request (Ctrl-Alt-Del, ACPI power button) was sent
/// with outcome `requested`. `Ok(true)`: gone within `timeout`; `Ok(false)`: still running.
/// A failed request still counts as a shutdown when the process is gone anyway: it may have
/// exited between the liveness check and the request, and a refused or reset connection
/// (a transport error) may mean it is exiting right now, so that one gets a short grace.
pub(crate) async fn await_shutdown(
    handle: &VmmHandle,
    timeout: Duration,
    requested: Result<(), VmmError>,
) -> Result<bool, VmmError> {
    if let Err(e) = requested {
        let grace = match e {
            VmmError::Transport { .. } => timeout.min(Duration::from_millis(500)),
            _ => Duration::ZERO,
        };
        if process::wait_gone(handle.pid, handle.start_time, grace).await {
            return Ok(true);
        }
        return Err(e);
    }
    Ok(process::wait_gone(handle.pid, handle.start_time, timeout).await)
}
