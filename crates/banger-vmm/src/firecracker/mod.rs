//! The Firecracker backend: one `firecracker` process per VM, configured over its API socket.
//!
//! The process is launched by [`crate::process::spawn_detached`] in its own session, so it
//! survives a daemon restart; everything the daemon needs to find it again is in the
//! [`VmmHandle`]. The guest's root filesystem is assembled by banger's initramfs, so no drive is
//! ever Firecracker's root device.

pub mod client;
pub mod jailer;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::unistd::AccessFlags;

pub use client::FirecrackerClient;
use client::{
    ActionType, BootSource, Drive, MachineConfiguration, NetworkInterface, SnapshotCreateParams,
    SnapshotLoadParams, Vsock,
};

use crate::common::{self, Waited, check_socket_path, is_valid_mac, remove_stale_socket};
use crate::process::{self, DetachedCommand};
use crate::{LaunchSpec, SpawnRecorder, Vmm, VmmError, VmmHandle, VmmKind};

/// The API socket's file name inside the VM's run directory.
pub const API_SOCKET_NAME: &str = "fc.sock";

/// The oldest Firecracker banger works with.
pub const MIN_VERSION: Version = Version::new(1, 5, 0);

/// The longest Unix socket path (`sun_path` holds 108 bytes including the terminating NUL).
pub use crate::common::MAX_SOCKET_PATH;

/// The guest interface banger configures.
const IFACE_ID: &str = "eth0";

/// A `major.minor.patch` version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl Version {
    pub const fn new(major: u32, minor: u32, patch: u32) -> Self {
        Version {
            major,
            minor,
            patch,
        }
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// Parses the first line of `firecracker --version`, `Firecracker v1.16.1` (a pre-release or
/// build suffix such as `-dev` and any text after the version are tolerated).
pub fn parse_version_output(output: &str) -> Option<Version> {
    let line = output.lines().find(|l| !l.trim().is_empty())?;
    let mut words = line.split_whitespace();
    if words.next()? != "Firecracker" {
        return None;
    }
    let word = words.next()?;
    let digits = word.strip_prefix('v').unwrap_or(word);
    // Cut a "-dev" / "+build" suffix off the patch number.
    let core = digits.split(['-', '+']).next().unwrap_or(digits);
    let mut parts = core.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    let patch = parts.next()?.parse().ok()?;
    if parts.next().is_some() {
        return None;
    }
    Some(Version::new(major, minor, patch))
}

/// The Firecracker backend.
#[derive(Debug, Clone)]
pub struct Firecracker {
    bin: PathBuf,
    env: Vec<(OsString, OsString)>,
    socket_timeout: Duration,
    api_timeout: Duration,
    snapshot_timeout: Duration,
    kill_timeout: Duration,
    /// Set: every VMM is launched through the jailer ([`jailer`]).
    jailer: Option<jailer::JailerConfig>,
    /// Where jails are (`<state_dir>/jail`), also without a jailer configured: a VMM launched
    /// jailed is still recognised by its socket path and its jail removed after it.
    jail_base: Option<PathBuf>,
}

impl Firecracker {
    /// A backend running the Firecracker binary at `bin`, which must be an executable file.
    pub fn new(bin: PathBuf) -> Result<Self, VmmError> {
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
        Ok(Firecracker {
            bin,
            env: Vec::new(),
            socket_timeout: Duration::from_secs(5),
            api_timeout: client::DEFAULT_TIMEOUT,
            snapshot_timeout: Duration::from_secs(300),
            kill_timeout: Duration::from_secs(5),
            jailer: None,
            jail_base: None,
        })
    }

    /// A backend that can only control VMMs already running (stop, kill, inspect), for a
    /// daemon that finds live VMs after the Firecracker binary was removed or moved. Spawning
    /// with it fails with a clear error.
    pub fn control_only() -> Self {
        Firecracker {
            bin: PathBuf::from("/nonexistent/firecracker (no binary configured)"),
            env: Vec::new(),
            socket_timeout: Duration::from_secs(5),
            api_timeout: client::DEFAULT_TIMEOUT,
            snapshot_timeout: Duration::from_secs(300),
            kill_timeout: Duration::from_secs(5),
            jailer: None,
            jail_base: None,
        }
    }

    /// Launches every VMM through the jailer (see [`jailer`]). The jailer binary must be an
    /// executable file and the uid/gid must not be root's.
    pub fn with_jailer(mut self, config: jailer::JailerConfig) -> Result<Self, VmmError> {
        config.validate()?;
        let meta = std::fs::metadata(&config.bin).map_err(|e| VmmError::Binary {
            path: config.bin.clone(),
            reason: e.to_string(),
        })?;
        if !meta.is_file() || nix::unistd::access(&config.bin, AccessFlags::X_OK).is_err() {
            return Err(VmmError::Binary {
                path: config.bin.clone(),
                reason: "not an executable file".into(),
            });
        }
        self.jail_base = Some(config.chroot_base.clone());
        self.jailer = Some(config);
        Ok(self)
    }

    /// Where jails are, for a backend that does not launch jailed VMMs itself but may have to
    /// stop and clean up ones that were (a daemon restarted with another config).
    pub fn with_jail_base(mut self, base: PathBuf) -> Self {
        self.jail_base = Some(base);
        self
    }

    /// The jailer configuration, when VMMs are launched through it.
    pub fn jailer(&self) -> Option<&jailer::JailerConfig> {
        self.jailer.as_ref()
    }

    /// Runs `<jailer> --version` and returns its version (`Jailer vX.Y.Z`).
    pub async fn check_jailer_version(&self) -> Result<Option<Version>, VmmError> {
        let Some(j) = &self.jailer else {
            return Ok(None);
        };
        let stdout = common::version_output(&j.bin, &self.env).await?;
        jailer::parse_version_output(&stdout)
            .map(Some)
            .ok_or_else(|| VmmError::Binary {
                path: j.bin.clone(),
                reason: format!(
                    "unexpected --version output {:?} (expected \"Jailer vX.Y.Z\")",
                    stdout.lines().next().unwrap_or("")
                ),
            })
    }

    /// The jail of a VMM launched through the jailer, recognised by its API socket path.
    fn jail_of(&self, handle: &VmmHandle) -> Option<jailer::JailLayout> {
        let base = self.jail_base.as_ref()?;
        let canonical = std::fs::canonicalize(base).ok();
        canonical
            .iter()
            .chain(std::iter::once(base))
            .find_map(|b| jailer::JailLayout::from_api_socket(b, &handle.control_socket))
    }

    /// Launches the VMM through the jailer: jail root with the VM's files, then
    /// `jailer ... -- --api-sock /run/firecracker.socket`. Anything that fails removes the jail.
    async fn spawn_jailed(
        &self,
        jail: &jailer::JailerConfig,
        spec: &LaunchSpec,
        record: &SpawnRecorder,
    ) -> Result<VmmHandle, VmmError> {
        if spec.vsock.is_some() {
            return Err(VmmError::Spec(
                "vsock is not supported for a jailed Firecracker yet".into(),
            ));
        }
        // The jailer names the jail after the canonical binary's file name.
        let exec_file = std::fs::canonicalize(&self.bin).map_err(|e| VmmError::Binary {
            path: self.bin.clone(),
            reason: e.to_string(),
        })?;
        let exec_name = exec_file
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| VmmError::Binary {
                path: exec_file.clone(),
                reason: "has no UTF-8 file name".into(),
            })?
            .to_string();
        let base = jailer::ensure_base(&jail.chroot_base)?;
        let layout = jailer::JailLayout::new(&base, &exec_name, &spec.vm_id)?;
        let socket = layout.api_socket();
        check_socket_path("Firecracker API socket path (in the jail)", &socket)?;

        let cleanup = |why: &str| {
            if let Err(e) = jailer::remove_jail(&layout, None) {
                tracing::warn!(vm_id = %spec.vm_id, error = %e, "removing the jail after {why} failed");
            }
        };
        let prepared = jailer::ensure_parent_cgroup(jailer::host_cgroup2_mount().as_deref())
            .and_then(|_| jailer::prepare(&layout, &jailer::jail_files(spec), jail.uid, jail.gid))
            .and_then(|()| match &spec.net {
                Some(net) => jailer::set_tap_owner(&net.tap, jail.uid, jail.gid),
                None => Ok(()),
            });
        if let Err(e) = prepared {
            cleanup("a failed jail setup");
            return Err(e);
        }
        let log_mark = process::log_mark(&spec.log_path);
        let spawned = match process::spawn_detached(&DetachedCommand {
            inherit_fds: Vec::new(),
            program: jail.bin.clone(),
            args: jailer::jailer_argv(jail, &exec_file, &layout),
            env: self.env.clone(),
            log_path: spec.log_path.clone(),
            log_max_bytes: Some(spec.log_max_bytes),
        }) {
            Ok(s) => s,
            Err(e) => {
                cleanup("a failed spawn");
                return Err(e);
            }
        };
        tracing::debug!(pid = spawned.pid, vm_id = %spec.vm_id, socket = %socket.display(), uid = jail.uid, "jailed firecracker spawned");
        // The jailer runs without --daemonize and --new-pid-ns: it execs Firecracker in place,
        // so this pid and start time are Firecracker's.
        if let Err(e) = common::record_spawned(
            spawned_handle(VmmKind::Firecracker, spawned, &socket, &spec.log_path),
            record,
            self.kill_timeout,
        )
        .await
        {
            cleanup("a failed record");
            return Err(e);
        }

        let waited = self.wait_ready(spawned, &socket).await;
        let result = common::finish_spawn(
            VmmKind::Firecracker,
            spawned,
            socket,
            &spec.log_path,
            waited,
            self.socket_timeout,
            self.kill_timeout,
        )
        .await
        .map_err(|e| common::own_log_tail(e, &spec.log_path, log_mark));
        if result.is_err() && !process::is_alive(spawned.pid, spawned.start_time) {
            cleanup("a failed start");
        }
        result
    }

    /// Adds an environment variable for every process this backend runs (the VMM and
    /// `--version`).
    pub fn with_env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// How long `spawn` waits for the API socket to answer (default 5 s).
    pub fn with_socket_timeout(mut self, timeout: Duration) -> Self {
        self.socket_timeout = timeout;
        self
    }

    /// The limit for each API call (default [`client::DEFAULT_TIMEOUT`]). InstanceStart loads
    /// the kernel into guest memory and takes seconds on a slow or nested host, so the daemon
    /// derives this from its boot timeout.
    pub fn with_api_timeout(mut self, timeout: Duration) -> Self {
        self.api_timeout = timeout;
        self
    }

    pub fn bin(&self) -> &Path {
        &self.bin
    }

    /// Runs `<bin> --version` and refuses versions older than [`MIN_VERSION`].
    pub async fn check_version(&self) -> Result<Version, VmmError> {
        let stdout = common::version_output(&self.bin, &self.env).await?;
        let version = parse_version_output(&stdout).ok_or_else(|| VmmError::Binary {
            path: self.bin.clone(),
            reason: format!(
                "unexpected --version output {:?} (expected \"Firecracker vX.Y.Z\")",
                stdout.lines().next().unwrap_or("")
            ),
        })?;
        if version < MIN_VERSION {
            return Err(VmmError::TooOld {
                program: "Firecracker",
                found: version.to_string(),
                path: self.bin.clone(),
                min: MIN_VERSION.to_string(),
            });
        }
        Ok(version)
    }

    /// An API client for the VMM behind `handle`.
    pub fn client(&self, handle: &VmmHandle) -> FirecrackerClient {
        FirecrackerClient::new(handle.control_socket.clone()).with_timeout(self.api_timeout)
    }

    /// Pauses the guest's vCPUs.
    pub async fn pause(&self, handle: &VmmHandle) -> Result<(), VmmError> {
        check_kind(handle)?;
        self.client(handle).pause().await
    }

    /// Resumes a paused guest.
    pub async fn resume(&self, handle: &VmmHandle) -> Result<(), VmmError> {
        check_kind(handle)?;
        self.client(handle).resume().await
    }

    /// Writes a snapshot of a paused guest.
    pub async fn snapshot_create(
        &self,
        handle: &VmmHandle,
        params: &SnapshotCreateParams,
    ) -> Result<(), VmmError> {
        check_kind(handle)?;
        self.client(handle)
            .with_timeout(self.snapshot_timeout)
            .create_snapshot(params)
            .await
    }

    /// Loads a snapshot into a freshly spawned, unconfigured VMM (instead of `configure` and
    /// `boot`).
    pub async fn snapshot_load(
        &self,
        handle: &VmmHandle,
        params: &SnapshotLoadParams,
    ) -> Result<(), VmmError> {
        check_kind(handle)?;
        self.client(handle)
            .with_timeout(self.snapshot_timeout)
            .load_snapshot(params)
            .await
    }

    /// Polls until the API socket accepts a connection and `GET /` answers.
    async fn wait_ready(&self, spawned: process::Spawned, socket: &Path) -> Result<(), Waited> {
        let deadline = tokio::time::Instant::now() + self.socket_timeout;
        let probe = FirecrackerClient::new(socket.to_path_buf())
            .with_timeout(self.socket_timeout.min(Duration::from_millis(500)));
        loop {
            if !process::is_alive(spawned.pid, spawned.start_time) {
                return Err(Waited::Exited);
            }
            // Connect first: it fails fast until Firecracker has bound the socket.
            if tokio::net::UnixStream::connect(socket).await.is_ok()
                && probe.instance_info().await.is_ok()
            {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Waited::Timeout);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

fn check_kind(handle: &VmmHandle) -> Result<(), VmmError> {
    if handle.kind == VmmKind::Firecracker {
        Ok(())
    } else {
        Err(VmmError::Spec(format!(
            "handle of VMM process {} is a {} handle, not a firecracker one",
            handle.pid,
            handle.kind.as_str()
        )))
    }
}

/// Firecracker's `--id`: 1 to 64 characters of `[A-Za-z0-9-]`.
fn check_instance_id(id: &str) -> Result<(), VmmError> {
    if !id.is_empty()
        && id.len() <= 64
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        Ok(())
    } else {
        Err(VmmError::Spec(format!(
            "VM id {id:?} is not a valid Firecracker instance id (1-64 of A-Z, a-z, 0-9, -)"
        )))
    }
}

fn check_utf8(what: &str, path: &Path) -> Result<(), VmmError> {
    if path.to_str().is_none() {
        return Err(VmmError::Spec(format!(
            "{what} {} is not valid UTF-8 and cannot be sent to Firecracker",
            path.display()
        )));
    }
    Ok(())
}

/// Checks everything `configure` sends, so a bad spec fails before the VMM is half configured.
fn validate_spec(spec: &LaunchSpec) -> Result<(), VmmError> {
    if !(1..=32).contains(&spec.vcpu) {
        return Err(VmmError::Spec(format!(
            "vcpu count {} for VM {} is outside Firecracker's 1-32",
            spec.vcpu, spec.vm_id
        )));
    }
    if spec.memory_mib == 0 {
        return Err(VmmError::Spec(format!(
            "memory size 0 MiB for VM {}",
            spec.vm_id
        )));
    }
    check_utf8("kernel", &spec.kernel)?;
    if let Some(initrd) = &spec.initrd {
        check_utf8("initrd", initrd)?;
    }
    let mut seen = std::collections::HashSet::new();
    for drive in &spec.drives {
        if !client::is_valid_id(&drive.id) {
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
        check_utf8(&format!("drive {} path", drive.id), &drive.path)?;
    }
    if let Some(net) = &spec.net {
        if net.tap.is_empty() || net.tap.len() > 15 || net.tap.contains(['/', ' ', '\0']) {
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
    if let Some(vsock) = &spec.vsock {
        if vsock.guest_cid < 3 {
            return Err(VmmError::Spec(format!(
                "vsock guest CID {} is reserved (must be 3 or more)",
                vsock.guest_cid
            )));
        }
        check_utf8("vsock socket", &vsock.uds_path)?;
        check_socket_path("vsock socket path", &vsock.uds_path)?;
    }
    Ok(())
}

/// The handle of a process just spawned, before its control socket is up.
fn spawned_handle(
    kind: VmmKind,
    spawned: process::Spawned,
    socket: &std::path::Path,
    log_path: &std::path::Path,
) -> VmmHandle {
    VmmHandle {
        kind,
        pid: spawned.pid,
        start_time: spawned.start_time,
        control_socket: socket.to_path_buf(),
        log_path: log_path.to_path_buf(),
    }
}

#[async_trait::async_trait]
impl Vmm for Firecracker {
    fn kind(&self) -> VmmKind {
        VmmKind::Firecracker
    }

    async fn spawn_recorded(
        &self,
        spec: &LaunchSpec,
        record: &SpawnRecorder,
    ) -> Result<VmmHandle, VmmError> {
        check_instance_id(&spec.vm_id)?;
        if let Some(jail) = &self.jailer {
            return self.spawn_jailed(jail, spec, record).await;
        }
        let socket = spec.run_dir.join(API_SOCKET_NAME);
        check_socket_path("Firecracker API socket path", &socket)?;

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
        // A socket left by a previous run would make Firecracker's bind fail.
        remove_stale_socket(&socket)?;

        let log_mark = process::log_mark(&spec.log_path);
        let spawned = process::spawn_detached(&DetachedCommand {
            inherit_fds: Vec::new(),
            program: self.bin.clone(),
            args: vec![
                "--api-sock".into(),
                socket.clone().into_os_string(),
                "--id".into(),
                spec.vm_id.clone().into(),
            ],
            env: self.env.clone(),
            log_path: spec.log_path.clone(),
            log_max_bytes: Some(spec.log_max_bytes),
        })?;
        tracing::debug!(pid = spawned.pid, vm_id = %spec.vm_id, socket = %socket.display(), "firecracker spawned");
        common::record_spawned(
            spawned_handle(VmmKind::Firecracker, spawned, &socket, &spec.log_path),
            record,
            self.kill_timeout,
        )
        .await?;

        let waited = self.wait_ready(spawned, &socket).await;
        common::finish_spawn(
            VmmKind::Firecracker,
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

    async fn configure(&self, handle: &VmmHandle, spec: &LaunchSpec) -> Result<(), VmmError> {
        check_kind(handle)?;
        validate_spec(spec)?;
        // A jailed Firecracker sees only its jail: it gets the files' names there.
        let jailed;
        let spec = match self.jail_of(handle) {
            Some(_) => {
                jailed = jailer::jailed_spec(spec);
                &jailed
            }
            None => spec,
        };
        let api = self.client(handle);

        api.put_machine_config(&MachineConfiguration {
            vcpu_count: spec.vcpu,
            mem_size_mib: spec.memory_mib,
            smt: Some(false),
            track_dirty_pages: None,
            cpu_template: None,
            huge_pages: None,
        })
        .await?;
        api.put_boot_source(&BootSource {
            kernel_image_path: spec.kernel.clone(),
            initrd_path: spec.initrd.clone(),
            boot_args: Some(spec.boot_args.clone()),
        })
        .await?;
        // Attach order decides the guest device names (/dev/vda, /dev/vdb, ...).
        for drive in &spec.drives {
            api.put_drive(&Drive {
                drive_id: drive.id.clone(),
                // banger's initramfs mounts the root itself.
                is_root_device: false,
                partuuid: None,
                cache_type: None,
                is_read_only: Some(drive.read_only),
                path_on_host: Some(drive.path.clone()),
                rate_limiter: None,
                io_engine: None,
                socket: None,
            })
            .await?;
        }
        if let Some(net) = &spec.net {
            api.put_network_interface(&NetworkInterface {
                iface_id: IFACE_ID.into(),
                host_dev_name: net.tap.clone(),
                guest_mac: Some(net.mac.clone()),
                mtu: None,
                rx_rate_limiter: None,
                tx_rate_limiter: None,
            })
            .await?;
        }
        if let Some(vsock) = &spec.vsock {
            remove_stale_socket(&vsock.uds_path)?;
            api.put_vsock(&Vsock {
                guest_cid: vsock.guest_cid,
                uds_path: vsock.uds_path.clone(),
                vsock_id: None,
            })
            .await?;
        }
        Ok(())
    }

    async fn boot(&self, handle: &VmmHandle) -> Result<(), VmmError> {
        check_kind(handle)?;
        self.client(handle).action(ActionType::InstanceStart).await
    }

    fn is_alive(&self, handle: &VmmHandle) -> bool {
        process::is_alive(handle.pid, handle.start_time)
    }

    async fn shutdown(&self, handle: &VmmHandle, timeout: Duration) -> Result<bool, VmmError> {
        check_kind(handle)?;
        if !self.is_alive(handle) {
            return Ok(true);
        }
        // A guest reboot (which Ctrl-Alt-Del triggers) ends the Firecracker process. The request
        // itself may not use up more than the stop's own timeout.
        let requested = self
            .client(handle)
            .with_timeout(self.api_timeout.min(timeout.max(Duration::from_secs(1))))
            .action(ActionType::SendCtrlAltDel)
            .await;
        common::await_shutdown(handle, timeout, requested).await
    }

    async fn kill(&self, handle: &VmmHandle) -> Result<(), VmmError> {
        check_kind(handle)?;
        common::kill_pid(handle.pid, handle.start_time, self.kill_timeout).await?;
        // Every teardown (stop, kill, a failed start, reconcile) ends here once the VMM is
        // gone: its jail goes with it.
        if let Some(layout) = self.jail_of(handle) {
            let cgroup2 = jailer::host_cgroup2_mount();
            jailer::remove_jail(&layout, cgroup2.as_deref())?;
        }
        Ok(())
    }

    async fn wait_exit(&self, handle: &VmmHandle) {
        process::wait_exit(handle.pid, handle.start_time).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DriveSpec, NetSpec, VsockSpec};

    #[test]
    fn parses_version_lines() {
        assert_eq!(
            parse_version_output("Firecracker v1.16.1\n"),
            Some(Version::new(1, 16, 1))
        );
        assert_eq!(
            parse_version_output(
                "Firecracker v1.5.0\n\nSupported snapshot data format versions: v1.0.0\n"
            ),
            Some(Version::new(1, 5, 0))
        );
        assert_eq!(
            parse_version_output("Firecracker v1.14.0-dev extra words"),
            Some(Version::new(1, 14, 0))
        );
        assert_eq!(
            parse_version_output("Firecracker 1.7.2"),
            Some(Version::new(1, 7, 2))
        );
        assert_eq!(parse_version_output(""), None);
        assert_eq!(parse_version_output("firecracker v1.2.3"), None);
        assert_eq!(parse_version_output("Firecracker vX.Y.Z"), None);
        assert_eq!(parse_version_output("Firecracker v1.2"), None);
        assert_eq!(parse_version_output("Firecracker v1.2.3.4"), None);
        assert_eq!(parse_version_output("QEMU emulator version 8.2.2"), None);
    }

    #[test]
    fn versions_order_numerically() {
        assert!(Version::new(1, 16, 1) > MIN_VERSION);
        assert!(Version::new(1, 4, 9) < MIN_VERSION);
        assert!(Version::new(2, 0, 0) > Version::new(1, 99, 99));
        assert_eq!(Version::new(1, 5, 0).to_string(), "1.5.0");
    }

    #[test]
    fn too_old_message_names_version_path_and_minimum() {
        let err = VmmError::TooOld {
            program: "Firecracker",
            found: "1.4.0".into(),
            path: "/path/to/bin".into(),
            min: MIN_VERSION.to_string(),
        };
        assert_eq!(
            err.to_string(),
            "Firecracker 1.4.0 at /path/to/bin is too old: banger needs 1.5.0 or newer"
        );
    }

    #[test]
    fn new_checks_the_binary() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("firecracker");
        let err = Firecracker::new(missing.clone()).unwrap_err();
        assert!(
            err.to_string().contains(&*missing.to_string_lossy()),
            "{err}"
        );

        std::fs::write(&missing, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&missing, std::fs::Permissions::from_mode(0o644)).unwrap();
        // root can "execute" nothing without an x bit either, so this holds for any user.
        let err = Firecracker::new(missing.clone()).unwrap_err();
        assert!(err.to_string().contains("not executable"), "{err}");

        std::fs::set_permissions(&missing, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(Firecracker::new(missing.clone()).unwrap().bin(), missing);

        let err = Firecracker::new(dir.path().to_path_buf()).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
    }

    fn spec() -> LaunchSpec {
        LaunchSpec {
            vm_id: "0123456789ab".into(),
            run_dir: "/run/banger/0123456789ab".into(),
            log_path: "/tmp/fc.log".into(),
            log_max_bytes: crate::DEFAULT_LOG_MAX_BYTES,
            vcpu: 2,
            memory_mib: 1024,
            kernel: "/k".into(),
            initrd: None,
            boot_args: "console=ttyS0".into(),
            drives: vec![DriveSpec {
                id: "root".into(),
                path: "/r".into(),
                read_only: true,
            }],
            net: Some(NetSpec {
                tap_fd: None,
                tap: "tap-fc0".into(),
                mac: "06:00:0a:00:00:02".into(),
            }),
            vsock: Some(VsockSpec {
                guest_cid: 3,
                uds_path: "/run/banger/0123456789ab/v.sock".into(),
            }),
        }
    }

    #[test]
    fn spec_validation() {
        validate_spec(&spec()).unwrap();

        let bad = |f: &dyn Fn(&mut LaunchSpec), needle: &str| {
            let mut s = spec();
            f(&mut s);
            let err = validate_spec(&s).unwrap_err();
            assert!(err.to_string().contains(needle), "{err} lacks {needle}");
        };
        bad(&|s| s.drives[0].id = "ro/ot".into(), "\"ro/ot\"");
        bad(&|s| s.drives[0].id = String::new(), "drive id \"\"");
        bad(
            &|s| s.drives.push(s.drives[0].clone()),
            "\"root\" is used twice",
        );
        bad(&|s| s.vcpu = 0, "vcpu count 0");
        bad(&|s| s.vcpu = 33, "vcpu count 33");
        bad(&|s| s.memory_mib = 0, "memory size 0");
        bad(
            &|s| s.net.as_mut().unwrap().mac = "06:00:0a:00:00".into(),
            "06:00:0a:00:00",
        );
        bad(
            &|s| s.net.as_mut().unwrap().tap = "a".repeat(16),
            "tap name",
        );
        bad(&|s| s.vsock.as_mut().unwrap().guest_cid = 2, "CID 2");
        bad(
            &|s| s.vsock.as_mut().unwrap().uds_path = PathBuf::from("/").join("x".repeat(120)),
            "limited to 107 bytes",
        );
    }

    #[test]
    fn instance_ids_and_macs() {
        check_instance_id("0123456789ab").unwrap();
        check_instance_id("my-vm-1").unwrap();
        assert!(check_instance_id("").is_err());
        assert!(check_instance_id("a b").is_err());
        assert!(check_instance_id(&"a".repeat(65)).is_err());
        assert!(is_valid_mac("AA:bb:00:11:22:33"));
        assert!(!is_valid_mac("aa:bb:00:11:22:3"));
        assert!(!is_valid_mac("aa-bb-00-11-22-33"));
    }

    #[test]
    fn socket_path_limit_is_107_bytes() {
        let ok = PathBuf::from(format!("/{}", "a".repeat(106)));
        assert_eq!(ok.as_os_str().len(), 107);
        check_socket_path("socket", &ok).unwrap();
        let long = PathBuf::from(format!("/{}", "a".repeat(107)));
        let err = check_socket_path("socket", &long).unwrap_err();
        assert!(err.to_string().contains(&*long.to_string_lossy()), "{err}");
    }

    #[tokio::test]
    async fn handles_of_other_backends_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("fc");
        std::fs::write(&bin, "#!/bin/sh\n").unwrap();
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let fc = Firecracker::new(bin).unwrap();
        let handle = VmmHandle {
            kind: VmmKind::QemuKvm,
            pid: 1,
            start_time: 1,
            control_socket: dir.path().join("qmp.sock"),
            log_path: dir.path().join("log"),
        };
        let err = fc.boot(&handle).await.unwrap_err();
        assert!(err.to_string().contains("qemu-kvm"), "{err}");
    }

    /// A handle for a plain `sh` process whose API socket does not exist.
    async fn sh_handle(dir: &Path, script: &str) -> VmmHandle {
        let spawned = process::spawn_detached(&DetachedCommand {
            inherit_fds: Vec::new(),
            program: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            env: Vec::new(),
            log_path: dir.join("log"),
            log_max_bytes: None,
        })
        .unwrap();
        VmmHandle {
            kind: VmmKind::Firecracker,
            pid: spawned.pid,
            start_time: spawned.start_time,
            control_socket: dir.join("absent.sock"),
            log_path: dir.join("log"),
        }
    }

    #[tokio::test]
    async fn shutdown_counts_a_process_exiting_meanwhile_as_exited() {
        let dir = tempfile::tempdir().unwrap();
        let fc = Firecracker::new("/bin/sh".into()).unwrap();
        let handle = sh_handle(dir.path(), "sleep 0.2").await;
        // The request fails (no socket) while the process is still alive; it exits within the
        // grace period.
        assert!(fc.shutdown(&handle, Duration::from_secs(5)).await.unwrap());
        assert!(!fc.is_alive(&handle));
    }

    #[tokio::test]
    async fn shutdown_reports_the_api_failure_of_a_live_process() {
        let dir = tempfile::tempdir().unwrap();
        let fc = Firecracker::new("/bin/sh".into()).unwrap();
        let handle = sh_handle(dir.path(), "sleep 5").await;
        let err = fc
            .shutdown(&handle, Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(matches!(err, VmmError::Transport { .. }), "{err:?}");
        assert!(err.to_string().contains("absent.sock"), "{err}");
        fc.kill(&handle).await.unwrap();
        assert!(!fc.is_alive(&handle));
    }

    #[test]
    fn only_stale_sockets_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("v.sock");
        remove_stale_socket(&sock).unwrap();
        drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
        assert!(sock.exists());
        remove_stale_socket(&sock).unwrap();
        assert!(!sock.exists());

        let file = dir.path().join("precious");
        std::fs::write(&file, "data").unwrap();
        let err = remove_stale_socket(&file).unwrap_err();
        assert!(err.to_string().contains("precious"), "{err}");
        assert!(file.exists());
    }
}
