//! The QEMU backend: one `qemu-system-x86_64 -M microvm` process per VM, with virtio-mmio
//! devices and a QMP control socket.
//!
//! Unlike Firecracker, QEMU takes its whole machine description on the command line, so
//! [`Qemu::argv`] builds everything at spawn and the VMM starts paused (`-S`): `configure` only
//! checks that the paused VMM is the one `spec` describes, and `boot` lets the vCPUs run (QMP
//! `cont`). The process is launched by [`crate::process::spawn_detached`] in its own session and
//! found again from the [`VmmHandle`] after a daemon restart, exactly as the Firecracker backend
//! does. The guest serial console (`ttyS0`) goes to QEMU's stdout, so into the VMM log.
//!
//! With KVM (hardware virtualisation, see [`detect_accel`]) guests run at native speed; with TCG
//! QEMU emulates the CPU, which is slow but boots the same kernel and disks anywhere. Under TCG
//! the kernel command line gets [`tcg_boot_args`]: without a known TSC frequency the guest
//! kernel's TSC calibration against emulated timers is unreliable and boots can stall, and with
//! a wrong one the guest's clock runs fast or slow.

pub mod accel;
pub mod qmp;
pub mod tsc;

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::unistd::AccessFlags;

pub use accel::{Accel, AccelPaths, AccelProbe, detect_accel, detect_accel_with};
pub use qmp::{KvmInfo, QmpClient, QmpConnection, QmpGreeting, StatusInfo};

use crate::common::{
    self, LOG_TAIL_LINES, Waited, check_socket_path, is_valid_mac, remove_stale_socket,
};
pub use crate::firecracker::Version;
use crate::process::{self, DetachedCommand};
use crate::{LaunchSpec, SpawnRecorder, Vmm, VmmError, VmmHandle, VmmKind};

/// The QMP socket's file name inside the VM's run directory.
pub const QMP_SOCKET_NAME: &str = "qmp.sock";

/// The binary's name, looked up in `PATH`.
pub const BIN_NAME: &str = "qemu-system-x86_64";

/// Where distributions install it, tried after `PATH`.
pub const DEFAULT_BIN: &str = "/usr/bin/qemu-system-x86_64";

/// The oldest QEMU banger works with: 6.1 is the first whose microvm machine has ACPI (needed
/// for the power button that `shutdown` presses).
pub const MIN_VERSION: Version = Version::new(6, 1, 0);

/// Appended to the guest command line under TCG: tells the kernel the TSC frequency instead of
/// letting it calibrate against emulated timers, which makes TCG boots unreliable. The
/// frequency is the host's ([`tsc::host_tsc`]): a TCG guest's TSC ticks at the host's rate.
pub fn tcg_boot_args(tsc_khz: u32) -> String {
    format!("tsc_early_khz={tsc_khz} tsc=reliable")
}

/// The microvm machine: no option ROMs (direct kernel boot), the ISA serial port for the console,
/// an RTC for wall-clock time, ACPI for the power button (and device discovery).
pub const MACHINE: &str = "microvm,x-option-roms=off,isa-serial=on,rtc=on,acpi=on";

/// The device the vhost-vsock device needs on the host.
pub const VHOST_VSOCK_DEVICE: &str = "/dev/vhost-vsock";

/// The longest Unix socket path (`sun_path` holds 108 bytes including the terminating NUL).
pub use crate::common::MAX_SOCKET_PATH;

/// The most vCPUs banger gives a QEMU guest.
pub const MAX_VCPUS: u32 = 255;

/// QEMU's netdev id for the guest interface.
const NETDEV_ID: &str = "net0";
/// The descriptor number an inherited tap gets in the QEMU process.
const TAP_CHILD_FD: i32 = 3;

/// Parses the first line of `qemu-system-x86_64 --version`, `QEMU emulator version 7.2.22
/// (Debian 1:7.2+dfsg-7+deb12u18)`. A missing patch number counts as 0; text after the version
/// is ignored.
pub fn parse_version_output(output: &str) -> Option<Version> {
    let line = output.lines().find(|l| !l.trim().is_empty())?;
    let rest = line.trim().strip_prefix("QEMU emulator version ")?;
    let word = rest.split_whitespace().next()?;
    // Cut a "-rc0" / "+build" suffix.
    let core = word.split(['-', '+']).next().unwrap_or(word);
    let mut parts = core.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    let patch = match parts.next() {
        Some(p) => p.parse().ok()?,
        None => 0,
    };
    if parts.next().is_some() {
        return None;
    }
    Some(Version::new(major, minor, patch))
}

/// Escapes a value for QEMU's `key=value,...` option syntax: a comma inside a value is written
/// as two commas.
pub fn escape_opt_value(value: &OsStr) -> OsString {
    let mut out = Vec::with_capacity(value.len());
    for &b in value.as_bytes() {
        out.push(b);
        if b == b',' {
            out.push(b',');
        }
    }
    OsString::from_vec(out)
}

/// The words for a guest QEMU stopped on an I/O error, from `query-block`'s reply: which
/// banger drive (`drive-root` is the root disk) and whether the host disk is full.
fn io_error_reason(blocks: Option<&serde_json::Value>) -> String {
    let mut parts = Vec::new();
    for dev in blocks.and_then(|b| b.as_array()).into_iter().flatten() {
        let status = dev["io-status"].as_str().unwrap_or("ok");
        if status == "ok" {
            continue;
        }
        let name = dev["device"].as_str().unwrap_or("?");
        let drive = name.strip_prefix("drive-").unwrap_or(name);
        parts.push(match status {
            "nospace" => format!("host disk full under the {drive} disk"),
            _ => format!("I/O error on the {drive} disk"),
        });
    }
    if parts.is_empty() {
        "I/O error on a disk".to_string()
    } else {
        parts.join(", ")
    }
}

/// The QEMU id of a banger drive: QEMU ids must start with a letter, banger's drive ids need not.
pub fn qemu_drive_id(id: &str) -> String {
    format!("drive-{id}")
}

/// `name=value` with `value` escaped, for building option strings out of paths.
fn opt(name: &str, value: &OsStr) -> OsString {
    let mut s = OsString::from(name);
    s.push("=");
    s.push(escape_opt_value(value));
    s
}

/// The QEMU backend.
#[derive(Debug, Clone)]
pub struct Qemu {
    bin: PathBuf,
    accel: Accel,
    env: Vec<(OsString, OsString)>,
    socket_timeout: Duration,
    qmp_timeout: Duration,
    kill_timeout: Duration,
    vhost_vsock_device: PathBuf,
    /// The guest's `tsc_early_khz` under TCG.
    tsc_khz: u32,
}

impl Qemu {
    /// A backend running the QEMU binary at `bin` (which must be an executable file) with
    /// accelerator `accel` (usually [`detect_accel`]'s choice).
    pub fn new(bin: PathBuf, accel: Accel) -> Result<Self, VmmError> {
        let meta = std::fs::metadata(&bin).map_err(|e| VmmError::Binary {
            path: bin.clone(),
            reason: e.to_string(),
        })?;
        if !meta.is_file() {
            return Err(VmmError::Binary {
                path: bin,
                reason: "not a regular file".into(),
            });
        }
        if let Err(e) = nix::unistd::access(&bin, AccessFlags::X_OK) {
            return Err(VmmError::Binary {
                path: bin,
                reason: format!("not executable: {e}"),
            });
        }
        Ok(Self::with_bin(bin, accel))
    }

    /// A backend that can only control VMMs already running (stop, kill, inspect), for a
    /// daemon that finds live QEMU VMs after the binary was removed. Spawning fails clearly.
    pub fn control_only(accel: Accel) -> Self {
        Self::with_bin(
            PathBuf::from("/nonexistent/qemu-system-x86_64 (no binary configured)"),
            accel,
        )
    }

    fn with_bin(bin: PathBuf, accel: Accel) -> Self {
        Qemu {
            bin,
            accel,
            env: Vec::new(),
            socket_timeout: Duration::from_secs(10),
            qmp_timeout: qmp::DEFAULT_TIMEOUT,
            kill_timeout: Duration::from_secs(5),
            vhost_vsock_device: VHOST_VSOCK_DEVICE.into(),
            // Measured once per process, and only for TCG, which alone uses it.
            tsc_khz: match accel {
                Accel::Tcg => tsc::host_tsc().khz,
                Accel::Kvm => tsc::FALLBACK_KHZ,
            },
        }
    }

    /// The TSC frequency TCG guests are told (default: the host's, [`tsc::host_tsc`]).
    pub fn with_tsc_khz(mut self, khz: u32) -> Self {
        self.tsc_khz = khz;
        self
    }

    /// The TSC frequency TCG guests are told.
    pub fn tsc_khz(&self) -> u32 {
        self.tsc_khz
    }

    /// `qemu-system-x86_64` from `PATH`, else [`DEFAULT_BIN`], if either is an executable file.
    pub fn find_binary() -> Option<PathBuf> {
        find_binary_in(std::env::var_os("PATH").as_deref(), Path::new(DEFAULT_BIN))
    }

    /// Adds an environment variable for every process this backend runs.
    pub fn with_env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// How long `spawn` waits for the QMP socket to answer (default 10 s).
    pub fn with_socket_timeout(mut self, timeout: Duration) -> Self {
        self.socket_timeout = timeout;
        self
    }

    /// The limit for each QMP command (default 5 s).
    pub fn with_qmp_timeout(mut self, timeout: Duration) -> Self {
        self.qmp_timeout = timeout;
        self
    }

    /// The host device whose presence vsock needs (default [`VHOST_VSOCK_DEVICE`]).
    pub fn with_vhost_vsock_device(mut self, path: PathBuf) -> Self {
        self.vhost_vsock_device = path;
        self
    }

    pub fn bin(&self) -> &Path {
        &self.bin
    }

    pub fn accel(&self) -> Accel {
        self.accel
    }

    /// Runs `<bin> --version` and refuses versions older than [`MIN_VERSION`].
    pub async fn version(&self) -> Result<Version, VmmError> {
        let stdout = common::version_output(&self.bin, &self.env).await?;
        let version = parse_version_output(&stdout).ok_or_else(|| VmmError::Binary {
            path: self.bin.clone(),
            reason: format!(
                "unexpected --version output {:?} (expected \"QEMU emulator version X.Y.Z\")",
                stdout.lines().next().unwrap_or("")
            ),
        })?;
        if version < MIN_VERSION {
            return Err(VmmError::TooOld {
                program: "QEMU",
                found: version.to_string(),
                path: self.bin.clone(),
                min: MIN_VERSION.to_string(),
            });
        }
        Ok(version)
    }

    /// A QMP client for the VMM behind `handle`.
    pub fn qmp(&self, handle: &VmmHandle) -> QmpClient {
        QmpClient::new(handle.control_socket.clone()).with_timeout(self.qmp_timeout)
    }

    /// Pauses the guest's vCPUs (QMP `stop`).
    pub async fn pause(&self, handle: &VmmHandle) -> Result<(), VmmError> {
        check_kind(handle)?;
        self.qmp(handle).stop().await
    }

    /// Resumes a paused guest (QMP `cont`).
    pub async fn resume(&self, handle: &VmmHandle) -> Result<(), VmmError> {
        check_kind(handle)?;
        self.qmp(handle).cont().await
    }

    /// The QEMU arguments (without the program) for `spec`. Pure: the same spec and backend
    /// always give the same arguments, which `configure` relies on to recognise the process.
    /// Assumes `spec` passed [`validate_spec`].
    pub fn argv(&self, spec: &LaunchSpec) -> Vec<OsString> {
        let mut args: Vec<OsString> = Vec::new();
        let mut push = |a: OsString| args.push(a);
        let socket = spec.run_dir.join(QMP_SOCKET_NAME);

        for a in ["-M", MACHINE] {
            push(a.into());
        }
        let (accel, cpu) = match self.accel {
            Accel::Kvm => ("kvm", "host"),
            Accel::Tcg => ("tcg,thread=multi", "max"),
        };
        for a in ["-accel", accel, "-cpu", cpu] {
            push(a.into());
        }
        push("-m".into());
        push(format!("{}M", spec.memory_mib).into());
        push("-smp".into());
        push(spec.vcpu.to_string().into());
        // No default devices, no config files, no display, no monitor: the serial console is
        // the only thing on stdout. A guest reboot ends QEMU (as it ends Firecracker), and the
        // guest does not run before `boot`.
        for a in [
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-monitor",
            "none",
            "-serial",
            "stdio",
            "-no-reboot",
            "-S",
        ] {
            push(a.into());
        }
        push("-qmp".into());
        let mut qmp = OsString::from("unix:");
        qmp.push(escape_opt_value(socket.as_os_str()));
        qmp.push(",server=on,wait=off");
        push(qmp);

        // -kernel, -initrd and -append take their argument verbatim (no option parsing).
        push("-kernel".into());
        push(spec.kernel.clone().into_os_string());
        if let Some(initrd) = &spec.initrd {
            push("-initrd".into());
            push(initrd.clone().into_os_string());
        }
        let mut cmdline = spec.boot_args.trim().to_string();
        if self.accel == Accel::Tcg {
            if !cmdline.is_empty() {
                cmdline.push(' ');
            }
            cmdline.push_str(&tcg_boot_args(self.tsc_khz));
        }
        push("-append".into());
        push(cmdline.into());

        // Attach order decides the guest device names (/dev/vda, /dev/vdb, ...).
        for drive in &spec.drives {
            let id = qemu_drive_id(&drive.id);
            let mut d = OsString::from(format!("id={id},"));
            d.push(opt("file", drive.path.as_os_str()));
            // writeback: the host page cache serves the shared read-only images once for all
            // VMs, guest flushes still reach the disk, and it works on every filesystem
            // (cache=none needs O_DIRECT).
            d.push(",format=raw,if=none,cache=writeback");
            if drive.read_only {
                d.push(",readonly=on");
            } else {
                d.push(",readonly=off,discard=unmap");
            }
            push("-drive".into());
            push(d);
            push("-device".into());
            push(format!("virtio-blk-device,drive={id}").into());
        }
        if let Some(net) = &spec.net {
            push("-netdev".into());
            push(match &net.tap_fd {
                // Opened by banger's root helper: QEMU inherits it as TAP_CHILD_FD.
                Some(_) => format!("tap,id={NETDEV_ID},fd={TAP_CHILD_FD}").into(),
                None => format!(
                    "tap,id={NETDEV_ID},ifname={},script=no,downscript=no",
                    net.tap
                )
                .into(),
            });
            push("-device".into());
            push(format!("virtio-net-device,netdev={NETDEV_ID},mac={}", net.mac).into());
        }
        if let Some(vsock) = &spec.vsock {
            push("-device".into());
            push(format!("vhost-vsock-device,guest-cid={}", vsock.guest_cid).into());
        }
        args
    }

    /// Polls until the QMP socket greets us and accepts `qmp_capabilities`.
    async fn wait_ready(&self, spawned: process::Spawned, socket: &Path) -> Result<(), Waited> {
        let deadline = tokio::time::Instant::now() + self.socket_timeout;
        loop {
            if !process::is_alive(spawned.pid, spawned.start_time) {
                return Err(Waited::Exited);
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(Waited::Timeout);
            }
            // Connecting fails fast until QEMU has bound the socket.
            let probe = QmpClient::new(socket.to_path_buf())
                .with_timeout((deadline - now).min(Duration::from_secs(1)));
            if probe.connect().await.is_ok() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn exited(&self, handle: &VmmHandle) -> VmmError {
        VmmError::Exited {
            pid: handle.pid,
            log_tail: self.log_tail(handle, LOG_TAIL_LINES),
        }
    }

    /// Checks that the live process behind `handle` was launched with `argv(spec)`.
    fn check_cmdline(&self, handle: &VmmHandle, spec: &LaunchSpec) -> Result<(), VmmError> {
        let path = format!("/proc/{}/cmdline", handle.pid);
        let raw = std::fs::read(&path).map_err(|_| self.exited(handle))?;
        let running: Vec<&[u8]> = raw
            .strip_suffix(b"\0")
            .unwrap_or(&raw)
            .split(|&b| b == 0)
            .skip(1)
            .collect();
        let expected = self.argv(spec);
        let expected: Vec<&[u8]> = expected.iter().map(|a| a.as_bytes()).collect();
        if running == expected {
            return Ok(());
        }
        let first_difference = running
            .iter()
            .zip(&expected)
            .position(|(a, b)| a != b)
            .unwrap_or(running.len().min(expected.len()));
        let show = |args: &[&[u8]]| {
            args.get(first_difference)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .unwrap_or_else(|| "(end)".into())
        };
        Err(VmmError::State {
            pid: handle.pid,
            reason: format!(
                "launched for a different spec than VM {}: argument {} is {:?}, expected {:?}",
                spec.vm_id,
                first_difference + 1,
                show(&running),
                show(&expected)
            ),
        })
    }
}

fn find_binary_in(path_var: Option<&OsStr>, fallback: &Path) -> Option<PathBuf> {
    let is_exe = |p: &Path| p.is_file() && nix::unistd::access(p, AccessFlags::X_OK).is_ok();
    path_var
        .into_iter()
        .flat_map(std::env::split_paths)
        .filter(|dir| dir.is_absolute())
        .map(|dir| dir.join(BIN_NAME))
        .find(|p| is_exe(p))
        .or_else(|| is_exe(fallback).then(|| fallback.to_path_buf()))
}

fn check_kind(handle: &VmmHandle) -> Result<Accel, VmmError> {
    Accel::from_kind(handle.kind).ok_or_else(|| {
        VmmError::Spec(format!(
            "handle of VMM process {} is a {} handle, not a qemu one",
            handle.pid,
            handle.kind.as_str()
        ))
    })
}

fn is_valid_drive_id(id: &str) -> bool {
    !id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Checks everything [`Qemu::argv`] puts on the command line, so a bad spec fails before QEMU
/// runs. Paths may contain commas (they are escaped); values QEMU cannot escape are refused.
pub fn validate_spec(spec: &LaunchSpec) -> Result<(), VmmError> {
    if !(1..=MAX_VCPUS).contains(&spec.vcpu) {
        return Err(VmmError::Spec(format!(
            "vcpu count {} for VM {} is outside 1-{MAX_VCPUS}",
            spec.vcpu, spec.vm_id
        )));
    }
    if spec.memory_mib == 0 {
        return Err(VmmError::Spec(format!(
            "memory size 0 MiB for VM {}",
            spec.vm_id
        )));
    }
    if spec.boot_args.contains('\0') {
        return Err(VmmError::Spec(format!(
            "kernel command line of VM {} contains a NUL byte",
            spec.vm_id
        )));
    }
    let mut paths: Vec<(String, &Path)> = vec![("kernel".into(), &spec.kernel)];
    if let Some(initrd) = &spec.initrd {
        paths.push(("initrd".into(), initrd));
    }
    let mut seen = std::collections::HashSet::new();
    for drive in &spec.drives {
        if !is_valid_drive_id(&drive.id) {
            return Err(VmmError::Spec(format!(
                "drive id {:?} must be non-empty and use only A-Z, a-z, 0-9 and _",
                drive.id
            )));
        }
        if !seen.insert(drive.id.as_str()) {
            return Err(VmmError::Spec(format!(
                "drive id {:?} is used twice",
                drive.id
            )));
        }
        paths.push((format!("drive {} path", drive.id), &drive.path));
    }
    paths.push(("run directory".into(), &spec.run_dir));
    for (what, path) in paths {
        if path.as_os_str().is_empty() || path.as_os_str().as_bytes().contains(&0) {
            return Err(VmmError::Spec(format!(
                "{what} {:?} is empty or contains a NUL byte",
                path
            )));
        }
    }
    check_socket_path("QMP socket path", &spec.run_dir.join(QMP_SOCKET_NAME))?;
    if let Some(net) = &spec.net {
        if net.tap.is_empty()
            || net.tap.len() > 15
            || net.tap.contains(|c: char| {
                c == '/' || c == ',' || c == '=' || c.is_whitespace() || c.is_control()
            })
        {
            return Err(VmmError::Spec(format!(
                "tap name {:?} is not a valid interface name",
                net.tap
            )));
        }
        if !is_valid_mac(&net.mac) {
            return Err(VmmError::Spec(format!(
                "guest MAC {:?} is not of the form aa:bb:cc:dd:ee:ff",
                net.mac
            )));
        }
    }
    if let Some(vsock) = &spec.vsock
        && !(3..u32::MAX).contains(&vsock.guest_cid)
    {
        return Err(VmmError::Spec(format!(
            "vsock guest CID {} is reserved (must be 3 to {})",
            vsock.guest_cid,
            u32::MAX - 1
        )));
    }
    Ok(())
}

/// Checks that the files QEMU opens at startup exist, so a typo is reported by name rather than
/// by QEMU's exit.
fn check_inputs(spec: &LaunchSpec) -> Result<(), VmmError> {
    let mut files: Vec<(String, &Path)> = vec![("kernel".into(), &spec.kernel)];
    if let Some(initrd) = &spec.initrd {
        files.push(("initrd".into(), initrd));
    }
    for drive in &spec.drives {
        files.push((format!("drive {}", drive.id), &drive.path));
    }
    for (what, path) in files {
        match std::fs::metadata(path) {
            Ok(meta) if meta.is_dir() => {
                return Err(VmmError::Spec(format!(
                    "{what} {} is a directory",
                    path.display()
                )));
            }
            Ok(_) => {}
            Err(e) => {
                return Err(VmmError::Spec(format!("{what} {}: {e}", path.display())));
            }
        }
    }
    Ok(())
}

#[async_trait::async_trait]
impl Vmm for Qemu {
    fn kind(&self) -> VmmKind {
        self.accel.kind()
    }

    async fn spawn_recorded(
        &self,
        spec: &LaunchSpec,
        record: &SpawnRecorder,
    ) -> Result<VmmHandle, VmmError> {
        validate_spec(spec)?;
        check_inputs(spec)?;
        if spec.vsock.is_some() && !self.vhost_vsock_device.exists() {
            return Err(VmmError::Spec(format!(
                "VM {} asks for vsock, but {} does not exist: QEMU's vhost-vsock device needs \
                 the vhost_vsock kernel module (modprobe vhost_vsock)",
                spec.vm_id,
                self.vhost_vsock_device.display()
            )));
        }
        let socket = spec.run_dir.join(QMP_SOCKET_NAME);
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&spec.run_dir)
                .map_err(|source| VmmError::Io {
                    path: spec.run_dir.clone(),
                    source,
                })?;
        }
        // A socket left by a previous run could be mistaken for this VMM's.
        remove_stale_socket(&socket)?;

        let inherit_fds = spec
            .net
            .as_ref()
            .and_then(|n| n.tap_fd.as_ref())
            .map(|fd| {
                use std::os::fd::AsRawFd;
                vec![(fd.0.as_raw_fd(), TAP_CHILD_FD)]
            })
            .unwrap_or_default();
        let log_mark = process::log_mark(&spec.log_path);
        let spawned = process::spawn_detached(&DetachedCommand {
            inherit_fds,
            program: self.bin.clone(),
            args: self.argv(spec),
            env: self.env.clone(),
            log_path: spec.log_path.clone(),
            log_max_bytes: Some(spec.log_max_bytes),
        })?;
        tracing::debug!(pid = spawned.pid, vm_id = %spec.vm_id, accel = %self.accel, socket = %socket.display(), "qemu spawned");
        common::record_spawned(
            VmmHandle {
                kind: self.kind(),
                pid: spawned.pid,
                start_time: spawned.start_time,
                control_socket: socket.clone(),
                log_path: spec.log_path.clone(),
            },
            record,
            self.kill_timeout,
        )
        .await?;

        let waited = self.wait_ready(spawned, &socket).await;
        common::finish_spawn(
            self.kind(),
            spawned,
            socket,
            &spec.log_path,
            waited,
            self.socket_timeout,
            self.kill_timeout,
        )
        .await
        .map_err(|e| common::own_log_tail(e, &spec.log_path, log_mark))
    }

    /// QEMU got its whole configuration on the command line at spawn; this checks that the
    /// process is alive, was launched for exactly `spec`, and is paused before its first run.
    async fn configure(&self, handle: &VmmHandle, spec: &LaunchSpec) -> Result<(), VmmError> {
        check_kind(handle)?;
        validate_spec(spec)?;
        if !self.is_alive(handle) {
            return Err(self.exited(handle));
        }
        self.check_cmdline(handle, spec)?;
        let status = self.qmp(handle).query_status().await?;
        match status.status.as_str() {
            "prelaunch" | "paused" => Ok(()),
            other => Err(VmmError::State {
                pid: handle.pid,
                reason: format!("guest is {other:?}; configure expects it not yet started"),
            }),
        }
    }

    async fn boot(&self, handle: &VmmHandle) -> Result<(), VmmError> {
        check_kind(handle)?;
        let qmp = self.qmp(handle);
        let outcome = async {
            let mut conn = qmp.connect().await?;
            conn.execute("cont", None).await?;
            conn.query_status().await
        }
        .await;
        match outcome {
            Ok(status) if status.running => Ok(()),
            // The guest may already have shut down or crashed (QEMU then exits: -no-reboot).
            Ok(_) | Err(VmmError::Transport { .. })
                if !process::is_alive(handle.pid, handle.start_time) =>
            {
                Err(self.exited(handle))
            }
            Ok(status) => Err(VmmError::State {
                pid: handle.pid,
                reason: format!("guest is {:?} after cont, expected running", status.status),
            }),
            Err(e) => Err(e),
        }
    }

    fn is_alive(&self, handle: &VmmHandle) -> bool {
        process::is_alive(handle.pid, handle.start_time)
    }

    /// Presses the guest's ACPI power button and waits for QEMU to exit. A VMM whose guest never
    /// ran (`prelaunch`) has nothing to shut down and is told to quit instead.
    async fn shutdown(&self, handle: &VmmHandle, timeout: Duration) -> Result<bool, VmmError> {
        check_kind(handle)?;
        if !self.is_alive(handle) {
            return Ok(true);
        }
        // The request itself may not use up more than the stop's own timeout.
        let qmp = self
            .qmp(handle)
            .with_timeout(self.qmp_timeout.min(timeout.max(Duration::from_secs(1))));
        let request = async {
            let mut conn = qmp.connect().await?;
            if conn.query_status().await?.status == "prelaunch" {
                conn.quit().await
            } else {
                conn.execute("system_powerdown", None).await.map(drop)
            }
        }
        .await;
        common::await_shutdown(handle, timeout, request).await
    }

    /// QEMU stops the guest (run state `io-error`) when a write to a drive fails with ENOSPC
    /// (`werror=enospc`, the default) and keeps it stopped until told to continue; which drive
    /// and why is each device's `io-status` in `query-block`.
    async fn paused_reason(&self, handle: &VmmHandle) -> Option<String> {
        if check_kind(handle).is_err() || !self.is_alive(handle) {
            return None;
        }
        let mut conn = self.qmp(handle).connect().await.ok()?;
        if conn.query_status().await.ok()?.status != "io-error" {
            return None;
        }
        let blocks = conn.execute("query-block", None).await.ok();
        Some(io_error_reason(blocks.as_ref()))
    }

    async fn kill(&self, handle: &VmmHandle) -> Result<(), VmmError> {
        check_kind(handle)?;
        common::kill_pid(handle.pid, handle.start_time, self.kill_timeout).await
    }

    async fn wait_exit(&self, handle: &VmmHandle) {
        process::wait_exit(handle.pid, handle.start_time).await
    }
}

#[cfg(test)]
mod tests;
