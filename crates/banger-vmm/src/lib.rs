//! VMM backends behind one trait: [`firecracker`] and [`qemu`] (microvm, KVM or TCG).
//!
//! The lifecycle engine in the daemon drives every backend through [`Vmm`] and never branches on
//! which one it has. A backend launches one process per VM, configures it, boots it, and can find
//! it again by pid after a daemon restart from the [`VmmHandle`] the daemon persisted.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

mod common;
pub mod firecracker;
pub mod logpump;
pub mod process;
pub mod qemu;

/// Which backend runs a VM. Recorded in the VM's handles so a restarted daemon knows how to talk
/// to a VMM it did not launch itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmmKind {
    Firecracker,
    QemuKvm,
    QemuTcg,
}

impl VmmKind {
    pub fn as_str(self) -> &'static str {
        match self {
            VmmKind::Firecracker => "firecracker",
            VmmKind::QemuKvm => "qemu-kvm",
            VmmKind::QemuTcg => "qemu-tcg",
        }
    }
}

/// A block device given to the guest, in attach order (the first is `/dev/vda`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriveSpec {
    /// Short id, `[A-Za-z0-9_]+` (Firecracker's drive_id).
    pub id: String,
    pub path: PathBuf,
    pub read_only: bool,
}

/// The guest's network interface, backed by a host tap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetSpec {
    pub tap: String,
    /// `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    /// The tap already opened (by banger's root helper, for an unprivileged daemon on a host
    /// whose `/dev/net/tun` it may not open). Backends that can inherit it (QEMU) use it
    /// instead of opening the tap by name. Never persisted.
    #[serde(skip)]
    pub tap_fd: Option<TapFd>,
}

/// An open tap file descriptor, shared by the spec's clones; equal when it is the same fd.
#[derive(Debug, Clone)]
pub struct TapFd(pub std::sync::Arc<std::os::fd::OwnedFd>);

impl PartialEq for TapFd {
    fn eq(&self, other: &Self) -> bool {
        use std::os::fd::AsRawFd;
        self.0.as_raw_fd() == other.0.as_raw_fd()
    }
}

impl Eq for TapFd {}

/// A virtio-vsock device; the host side is a Unix socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockSpec {
    pub guest_cid: u32,
    pub uds_path: PathBuf,
}

/// The console log cap when none is configured (the config's `vmm_log_max_size` default).
pub const DEFAULT_LOG_MAX_BYTES: u64 = 4 * 1024 * 1024;

fn default_log_max_bytes() -> u64 {
    DEFAULT_LOG_MAX_BYTES
}

/// Everything a backend needs to run one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchSpec {
    /// The VM id; used as the VMM's instance id.
    pub vm_id: String,
    /// Per-VM directory for the VMM's sockets. Kept short: Unix socket paths are limited to
    /// 107 bytes.
    pub run_dir: PathBuf,
    /// The VMM's own stdout/stderr log, kept for `vm logs` and error reports.
    pub log_path: PathBuf,
    /// The cap on `log_path` (and on its one rotated file, `<log_path>.1`).
    #[serde(default = "default_log_max_bytes")]
    pub log_max_bytes: u64,
    pub vcpu: u32,
    pub memory_mib: u32,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub boot_args: String,
    pub drives: Vec<DriveSpec>,
    pub net: Option<NetSpec>,
    pub vsock: Option<VsockSpec>,
}

/// What identifies a running VMM process; persisted in the VM's handles file before the daemon's
/// in-memory state changes, so a restarted daemon can re-adopt or clean up the process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmmHandle {
    pub kind: VmmKind,
    pub pid: i32,
    /// The process start time (field 22 of /proc/PID/stat), so a recycled pid is never taken
    /// for our VMM.
    pub start_time: u64,
    /// The VMM's control socket (Firecracker API socket, QEMU QMP socket).
    pub control_socket: PathBuf,
    pub log_path: PathBuf,
}

/// Errors from a VMM backend. Each names what failed and on which input.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("VMM binary {path}: {reason}")]
    Binary { path: PathBuf, reason: String },
    #[error("spawning {program} failed: {source}")]
    Spawn {
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("VMM did not create its control socket {socket} within {timeout:?}{}", log_tail_suffix(.log_tail))]
    SocketTimeout {
        socket: PathBuf,
        timeout: Duration,
        log_tail: String,
    },
    #[error("VMM process {pid} exited{}", log_tail_suffix(.log_tail))]
    Exited { pid: i32, log_tail: String },
    #[error("VMM API {method} {path} failed with HTTP {status}: {message}")]
    Api {
        method: String,
        path: String,
        status: u16,
        message: String,
    },
    #[error("VMM API {method} {path} on {socket}: {reason}")]
    Transport {
        method: String,
        path: String,
        socket: PathBuf,
        reason: String,
    },
    #[error("{program} {found} at {path} is too old: banger needs {min} or newer")]
    TooOld {
        program: &'static str,
        found: String,
        path: PathBuf,
        min: String,
    },
    #[error("QMP command {command} on {socket} failed: {desc} ({class})")]
    Qmp {
        command: String,
        socket: PathBuf,
        /// QMP's `error.class`, e.g. `GenericError`, `CommandNotFound`.
        class: String,
        /// QMP's `error.desc`, the human-readable reason.
        desc: String,
    },
    #[error("VMM process {pid}: {reason}")]
    State { pid: i32, reason: String },
    #[error("VMM process {pid} was killed: recording it failed: {reason}")]
    Record { pid: i32, reason: String },
    #[error("invalid launch spec: {0}")]
    Spec(String),
    #[error("signalling VMM process {pid}: {reason}")]
    Signal { pid: i32, reason: String },
    #[error("VMM I/O on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn log_tail_suffix(tail: &str) -> String {
    if tail.trim().is_empty() {
        String::new()
    } else {
        format!("; last log lines: {}", tail.trim())
    }
}

/// Called with a VMM's handle the moment its process exists; see [`Vmm::spawn_recorded`].
pub type SpawnRecorder = dyn for<'h> Fn(&'h VmmHandle) -> Result<(), String> + Send + Sync;

/// One VMM backend. The daemon's start pipeline calls `spawn`, `configure` and `boot` as three
/// separate steps (each with its own undo), so a failure is attributed to the right step.
#[async_trait::async_trait]
pub trait Vmm: Send + Sync + std::fmt::Debug {
    fn kind(&self) -> VmmKind;

    /// Starts the VMM process (in its own session, so it outlives a daemon restart) and waits
    /// until its control socket answers. On error no process is left running.
    async fn spawn(&self, spec: &LaunchSpec) -> Result<VmmHandle, VmmError> {
        self.spawn_recorded(spec, &|_| Ok(())).await
    }

    /// [`Vmm::spawn`], calling `record` with the process's handle the moment the process
    /// exists (right after fork/exec, before waiting for its control socket), so the caller
    /// can persist it before anything else happens: a caller killed while the VMM starts up
    /// leaves a record of it. When `record` fails the process is killed and that is the error.
    async fn spawn_recorded(
        &self,
        spec: &LaunchSpec,
        record: &SpawnRecorder,
    ) -> Result<VmmHandle, VmmError>;

    /// Configures machine, kernel, drives, network and vsock before boot.
    async fn configure(&self, handle: &VmmHandle, spec: &LaunchSpec) -> Result<(), VmmError>;

    /// Boots the guest.
    async fn boot(&self, handle: &VmmHandle) -> Result<(), VmmError>;

    /// Whether the process behind `handle` is alive and is the very process we launched (pid and
    /// start time match, not a zombie).
    fn is_alive(&self, handle: &VmmHandle) -> bool;

    /// Asks the guest to shut down and waits up to `timeout` for the VMM to exit. Returns
    /// `Ok(true)` if it exited, `Ok(false)` if it is still running after the timeout.
    async fn shutdown(&self, handle: &VmmHandle, timeout: Duration) -> Result<bool, VmmError>;

    /// Kills the VMM (SIGKILL) and waits for it to be gone. Killing a process that is already
    /// gone is not an error.
    async fn kill(&self, handle: &VmmHandle) -> Result<(), VmmError>;

    /// Resolves when the process behind `handle` has exited (or immediately if it is gone).
    async fn wait_exit(&self, handle: &VmmHandle);

    /// Why the VMM holds the guest paused on its own, in words (e.g. the host disk under a
    /// guest disk is full), or `None` when it does not (or cannot tell). Only QEMU pauses a
    /// guest by itself (`werror=enospc`, its default); Firecracker passes errors to the guest.
    async fn paused_reason(&self, _handle: &VmmHandle) -> Option<String> {
        None
    }

    /// The last lines of the VMM's log, for error reports.
    fn log_tail(&self, handle: &VmmHandle, lines: usize) -> String {
        // After an exit, the log pump may still be writing the last lines (short wait; none
        // while the VMM runs, since then the tail is whatever is there).
        if !process::is_alive(handle.pid, handle.start_time) {
            logpump::drained_blocking(&handle.log_path, std::time::Duration::from_secs(1));
        }
        process::tail_file(&handle.log_path, lines)
    }
}
