//! The microVM state machine behind the API: what is configured, which phase the instance is
//! in, and which requests each phase accepts, following Firecracker's pre-boot and runtime
//! controllers. Requests reach it already validated against the spec; it applies the semantic
//! checks the real VMM makes (host files open, ids agree, limits hold, ordering).

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::{Map, Value, json};

use crate::spec::Matched;

/// The Firecracker version this fake imitates.
pub const FIRECRACKER_VERSION: &str = "1.16.1";

/// The longest kernel command line Firecracker accepts on x86_64 (2048 bytes with the NUL).
const MAX_CMDLINE_LEN: usize = 2047;
/// Linux interface names are at most IFNAMSIZ - 1 bytes; opening a longer tap fails.
const MAX_IFNAME_LEN: usize = 15;
/// Marks the snapshot files this fake writes, so loading something else fails like a real
/// restore of a foreign file would.
const SNAPSHOT_MAGIC: &str = "fake-firecracker-snapshot";

/// The instance phase, as `GET /` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstanceState {
    NotStarted,
    Running,
    Paused,
}

impl InstanceState {
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceState::NotStarted => "Not started",
            InstanceState::Running => "Running",
            InstanceState::Paused => "Paused",
        }
    }
}

/// Something the process around the instance must act on after answering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The guest booted (InstanceStart succeeded).
    Started,
    /// The guest received Ctrl+Alt+Del while running; a Linux guest reboots, which ends the
    /// Firecracker process.
    CtrlAltDel,
    /// A snapshot restore failed; Firecracker treats the process as unusable and exits.
    RestoreFailed,
}

/// The answer to one request.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub status: u16,
    pub body: Option<Value>,
    pub event: Option<Event>,
}

impl Reply {
    pub fn no_content() -> Reply {
        Reply {
            status: 204,
            body: None,
            event: None,
        }
    }

    pub fn json(body: Value) -> Reply {
        Reply {
            status: 200,
            body: Some(body),
            event: None,
        }
    }

    /// An error answer with Firecracker's `{"fault_message": ...}` body.
    pub fn fault(status: u16, message: impl Into<String>) -> Reply {
        Reply {
            status,
            body: Some(json!({ "fault_message": message.into() })),
            event: None,
        }
    }

    fn with_event(mut self, event: Event) -> Reply {
        self.event = Some(event);
        self
    }
}

/// Why the VMM refused a request. The messages follow Firecracker's wording, with the
/// offending path or value added where Firecracker leaves it out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Fault {
    #[error("The requested operation is not supported after starting the microVM.")]
    PostBoot,
    #[error("The requested operation is not supported before starting the microVM.")]
    PreBoot,
    #[error("The id from the path does not match the id from the body!")]
    IdMismatch,
    #[error("Boot source error: {0}")]
    BootSource(String),
    #[error("Machine config error: {0}")]
    MachineConfig(String),
    #[error("Drive config error: {0}")]
    Drive(String),
    #[error("Network config error: {0}")]
    Network(String),
    #[error("Vsock config error: {0}")]
    Vsock(String),
    #[error("Balloon config error: {0}")]
    Balloon(String),
    /// The triple M is Firecracker's own spelling.
    #[error("MMMDS config error: {0}")]
    MmdsConfig(String),
    #[error("Metrics error: {0}")]
    Metrics(String),
    #[error("Start microvm error: {0}")]
    StartMicrovm(String),
    #[error("Create snapshot error: {0}")]
    CreateSnapshot(String),
    #[error("Load snapshot error: {0}")]
    LoadSnapshot(String),
    #[error("The requested operation is not supported: {0}")]
    NotSupported(String),
    #[error("Hotplug error: {0}")]
    Hotplug(String),
    /// A body Firecracker's deserialiser would refuse although the schema allows it.
    #[error("An error occurred when deserializing the json body of a request: {0}")]
    Deserialize(String),
}

/// The machine configuration, with Firecracker's defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineConfig {
    pub vcpu_count: u64,
    pub mem_size_mib: u64,
    pub smt: bool,
    pub track_dirty_pages: bool,
    pub huge_pages: String,
    pub cpu_template: Option<String>,
}

impl Default for MachineConfig {
    fn default() -> Self {
        MachineConfig {
            vcpu_count: 1,
            mem_size_mib: 128,
            smt: false,
            track_dirty_pages: false,
            huge_pages: "None".to_string(),
            cpu_template: None,
        }
    }
}

impl MachineConfig {
    pub fn to_json(&self) -> Value {
        let mut v = json!({
            "vcpu_count": self.vcpu_count,
            "mem_size_mib": self.mem_size_mib,
            "smt": self.smt,
            "track_dirty_pages": self.track_dirty_pages,
            "huge_pages": self.huge_pages,
        });
        if let Some(t) = &self.cpu_template {
            v["cpu_template"] = json!(t);
        }
        v
    }

    /// Applies the fields present in `body` on top of `self`.
    fn merged(&self, body: &Value) -> MachineConfig {
        let mut next = self.clone();
        if let Some(n) = body.get("vcpu_count").and_then(Value::as_u64) {
            next.vcpu_count = n;
        }
        if let Some(n) = body.get("mem_size_mib").and_then(Value::as_u64) {
            next.mem_size_mib = n;
        }
        if let Some(b) = body.get("smt").and_then(Value::as_bool) {
            next.smt = b;
        }
        if let Some(b) = body.get("track_dirty_pages").and_then(Value::as_bool) {
            next.track_dirty_pages = b;
        }
        if let Some(h) = body.get("huge_pages").and_then(Value::as_str) {
            next.huge_pages = h.to_string();
        }
        if let Some(t) = body.get("cpu_template").and_then(Value::as_str) {
            next.cpu_template = (t != "None").then(|| t.to_string());
        }
        next
    }

    fn check(&self) -> Result<(), Fault> {
        if self.vcpu_count == 0 || self.vcpu_count > 32 {
            return Err(Fault::MachineConfig(format!(
                "The vCPU number is invalid! The vCPU number can only be 1 or an even number when \
                 SMT is enabled. (vcpu_count {})",
                self.vcpu_count
            )));
        }
        if self.smt && self.vcpu_count > 1 && self.vcpu_count % 2 == 1 {
            return Err(Fault::MachineConfig(format!(
                "The vCPU number is invalid! The vCPU number can only be 1 or an even number when \
                 SMT is enabled. (vcpu_count {})",
                self.vcpu_count
            )));
        }
        let page_mib = if self.huge_pages == "2M" { 2 } else { 1 };
        if self.mem_size_mib == 0 || !self.mem_size_mib.is_multiple_of(page_mib) {
            return Err(Fault::MachineConfig(format!(
                "The memory size (MiB) is either 0, or not a multiple of the configured page size. \
                 (mem_size_mib {})",
                self.mem_size_mib
            )));
        }
        Ok(())
    }
}

/// The host side of a vsock device: Firecracker binds `uds_path` when the device is
/// configured. With no guest behind it, a host connection is accepted and then closed, the way
/// a guest without a listener on the requested port answers.
#[derive(Debug)]
struct VsockHost {
    path: PathBuf,
    stop: Arc<AtomicBool>,
}

impl VsockHost {
    fn bind(path: &Path) -> std::io::Result<VsockHost> {
        let listener = UnixListener::bind(path)?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = Arc::clone(&stop);
        std::thread::Builder::new()
            .name("vsock-host".to_string())
            .spawn(move || {
                for conn in listener.incoming() {
                    if thread_stop.load(Ordering::SeqCst) {
                        break;
                    }
                    if let Ok(mut conn) = conn {
                        // Read the `CONNECT <port>` line, then hang up: nobody listens there.
                        let _ = conn.set_read_timeout(Some(Duration::from_millis(200)));
                        let mut buf = [0u8; 64];
                        let _ = conn.read(&mut buf);
                    }
                }
            })?;
        Ok(VsockHost {
            path: path.to_path_buf(),
            stop,
        })
    }
}

impl Drop for VsockHost {
    fn drop(&mut self) {
        // Wake the accept loop so it sees the flag and closes the listener. The socket file
        // stays, as Firecracker leaves it too.
        self.stop.store(true, Ordering::SeqCst);
        let _ = UnixStream::connect(&self.path);
    }
}

/// One fake Firecracker instance.
#[derive(Debug)]
pub struct Instance {
    id: String,
    vmm_version: String,
    state: InstanceState,
    /// Set by configuring any boot resource; a snapshot can then no longer be loaded.
    boot_path: bool,
    machine: MachineConfig,
    boot_source: Option<Value>,
    drives: Vec<Value>,
    net: Vec<Value>,
    vsock: Option<Value>,
    vsock_host: Option<VsockHost>,
    logger: Option<Value>,
    metrics: Option<Value>,
    balloon: Option<Value>,
    mmds_config: Option<Value>,
    mmds: Value,
    entropy: Option<Value>,
    cpu_config: Option<Value>,
    serial: Option<Value>,
    memory_hotplug: Option<Value>,
    pmem: Vec<Value>,
    /// Ctrl+Alt+Del sent while paused takes effect when the vCPUs run again.
    ctrl_alt_del_pending: bool,
}

impl Instance {
    pub fn new(id: impl Into<String>, vmm_version: impl Into<String>) -> Instance {
        Instance {
            id: id.into(),
            vmm_version: vmm_version.into(),
            state: InstanceState::NotStarted,
            boot_path: false,
            machine: MachineConfig::default(),
            boot_source: None,
            drives: Vec::new(),
            net: Vec::new(),
            vsock: None,
            vsock_host: None,
            logger: None,
            metrics: None,
            balloon: None,
            mmds_config: None,
            mmds: json!({}),
            entropy: None,
            cpu_config: None,
            serial: None,
            memory_hotplug: None,
            pmem: Vec::new(),
            ctrl_alt_del_pending: false,
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn state(&self) -> InstanceState {
        self.state
    }

    pub fn machine_config(&self) -> &MachineConfig {
        &self.machine
    }

    fn started(&self) -> bool {
        self.state != InstanceState::NotStarted
    }

    fn pre_boot(&self) -> Result<(), Fault> {
        if self.started() {
            Err(Fault::PostBoot)
        } else {
            Ok(())
        }
    }

    fn post_boot(&self) -> Result<(), Fault> {
        if self.started() {
            Ok(())
        } else {
            Err(Fault::PreBoot)
        }
    }

    /// Executes one request that already passed spec validation.
    pub fn handle(&mut self, matched: &Matched<'_>, body: Option<&Value>) -> Reply {
        let null = Value::Null;
        let body = body.unwrap_or(&null);
        match self.dispatch(matched, body) {
            Ok(reply) => reply,
            Err(fault) => Reply::fault(400, fault.to_string()),
        }
    }

    fn dispatch(&mut self, matched: &Matched<'_>, body: &Value) -> Result<Reply, Fault> {
        let op = matched.operation.operation_id.as_str();
        let done = Ok(Reply::no_content());
        match op {
            "describeInstance" => Ok(Reply::json(json!({
                "app_name": "Firecracker",
                "id": self.id,
                "state": self.state.as_str(),
                "vmm_version": self.vmm_version,
            }))),
            "getFirecrackerVersion" => Ok(Reply::json(
                json!({ "firecracker_version": self.vmm_version }),
            )),
            "getMachineConfiguration" => Ok(Reply::json(self.machine.to_json())),
            "getExportVmConfig" => Ok(Reply::json(self.full_config())),
            "createSyncAction" => self.action(body),

            "putGuestBootSource" => {
                self.pre_boot()?;
                self.put_boot_source(body)?;
                done
            }
            "putMachineConfiguration" | "patchMachineConfiguration" => {
                self.pre_boot()?;
                let base = if op == "putMachineConfiguration" {
                    // A PUT resets every optional field to its default.
                    MachineConfig {
                        cpu_template: None,
                        ..MachineConfig::default()
                    }
                } else {
                    self.machine.clone()
                };
                let next = base.merged(body);
                next.check()?;
                self.boot_path = true;
                self.machine = next;
                done
            }
            "putGuestDriveByID" => {
                self.pre_boot()?;
                self.put_drive(path_id(matched, "drive_id"), body)?;
                done
            }
            "patchGuestDriveByID" => {
                self.post_boot()?;
                self.patch_drive(path_id(matched, "drive_id"), body)?;
                done
            }
            "putGuestNetworkInterfaceByID" => {
                self.pre_boot()?;
                self.put_net(path_id(matched, "iface_id"), body)?;
                done
            }
            "patchGuestNetworkInterfaceByID" => {
                self.post_boot()?;
                let id = path_id(matched, "iface_id");
                check_same_id(id, body, "iface_id")?;
                let iface = self
                    .net
                    .iter_mut()
                    .find(|n| n["iface_id"] == id)
                    .ok_or_else(|| Fault::Network(format!("Invalid network interface ID: {id}")))?;
                merge_fields(iface, body, &["rx_rate_limiter", "tx_rate_limiter"]);
                done
            }
            "putGuestVsock" => {
                self.pre_boot()?;
                self.put_vsock(body.clone())?;
                done
            }
            "putLogger" => {
                self.pre_boot()?;
                self.logger = Some(body.clone());
                done
            }
            "putMetrics" => {
                self.pre_boot()?;
                if self.metrics.is_some() {
                    return Err(Fault::Metrics(
                        "Reinitialization of metrics not allowed.".to_string(),
                    ));
                }
                self.metrics = Some(body.clone());
                done
            }
            "putCpuConfiguration" => {
                self.pre_boot()?;
                self.cpu_config = Some(body.clone());
                done
            }
            "putEntropyDevice" => {
                self.pre_boot()?;
                self.boot_path = true;
                self.entropy = Some(body.clone());
                done
            }
            "putSerialDevice" => {
                self.pre_boot()?;
                self.serial = Some(body.clone());
                done
            }
            "putBalloon" => {
                self.pre_boot()?;
                self.boot_path = true;
                self.balloon = Some(body.clone());
                done
            }
            "describeBalloonConfig" => match &self.balloon {
                Some(b) => Ok(Reply::json(b.clone())),
                None => Err(Fault::Balloon("No balloon device found.".to_string())),
            },
            "patchBalloon" => {
                self.post_boot()?;
                let balloon = self.balloon_mut()?;
                merge_fields(balloon, body, &["amount_mib"]);
                done
            }
            "patchBalloonStatsInterval" => {
                self.post_boot()?;
                let balloon = self.balloon_mut()?;
                if balloon["stats_polling_interval_s"].as_u64().unwrap_or(0) == 0 {
                    return Err(Fault::Balloon(
                        "Statistics for the balloon device are not enabled".to_string(),
                    ));
                }
                merge_fields(balloon, body, &["stats_polling_interval_s"]);
                done
            }
            "describeBalloonStats" => {
                self.post_boot()?;
                let balloon = self.balloon_mut()?;
                if balloon["stats_polling_interval_s"].as_u64().unwrap_or(0) == 0 {
                    return Err(Fault::Balloon(
                        "Statistics for the balloon device are not enabled".to_string(),
                    ));
                }
                let target = balloon["amount_mib"].as_u64().unwrap_or(0);
                Ok(Reply::json(json!({
                    "target_pages": target * 256,
                    "actual_pages": target * 256,
                    "target_mib": target,
                    "actual_mib": target,
                })))
            }
            "startBalloonHinting" | "stopBalloonHinting" | "describeBalloonHinting" => {
                self.post_boot()?;
                let balloon = self.balloon_mut()?;
                if balloon["free_page_hinting"].as_bool() != Some(true) {
                    return Err(Fault::Balloon(
                        "Free page hinting was not enabled when the device was configured."
                            .to_string(),
                    ));
                }
                if op == "describeBalloonHinting" {
                    Ok(Reply::json(json!({ "host_cmd": 0 })))
                } else {
                    done
                }
            }
            "putMmdsConfig" => {
                self.pre_boot()?;
                self.put_mmds_config(body)?;
                done
            }
            "putMmds" => {
                self.mmds = body.clone();
                done
            }
            "patchMmds" => {
                merge_patch(&mut self.mmds, body);
                done
            }
            "getMmds" => Ok(Reply::json(self.mmds.clone())),
            "putMemoryHotplug" => {
                self.pre_boot()?;
                self.boot_path = true;
                self.memory_hotplug = Some(body.clone());
                done
            }
            "patchMemoryHotplug" => {
                self.post_boot()?;
                let hp = self.memory_hotplug.as_mut().ok_or_else(|| {
                    Fault::Hotplug("The memory hotplug device is not configured.".to_string())
                })?;
                merge_fields(hp, body, &["requested_size_mib"]);
                done
            }
            "getMemoryHotplug" => {
                let hp = self.memory_hotplug.as_ref().ok_or_else(|| {
                    Fault::Hotplug("The memory hotplug device is not configured.".to_string())
                })?;
                Ok(Reply::json(json!({
                    "total_size_mib": hp.get("total_size_mib").cloned().unwrap_or(json!(0)),
                    "slot_size_mib": hp.get("slot_size_mib").cloned().unwrap_or(json!(128)),
                    "block_size_mib": hp.get("block_size_mib").cloned().unwrap_or(json!(2)),
                    "plugged_size_mib": 0,
                    "requested_size_mib": hp.get("requested_size_mib").cloned().unwrap_or(json!(0)),
                })))
            }
            "putGuestPmemByID" => {
                self.pre_boot()?;
                let id = path_id(matched, "id");
                check_same_id(id, body, "id")?;
                let path = body["path_on_host"].as_str().unwrap_or_default();
                let read_only = body["read_only"].as_bool().unwrap_or(false);
                open_backing(path, read_only).map_err(|e| {
                    Fault::Drive(format!(
                        "Unable to create the pmem device: cannot open backing file {path}: {e}"
                    ))
                })?;
                self.boot_path = true;
                upsert(&mut self.pmem, "id", id, body.clone());
                done
            }
            "patchGuestPmemByID" => {
                self.post_boot()?;
                let id = path_id(matched, "id");
                check_same_id(id, body, "id")?;
                let dev = self
                    .pmem
                    .iter_mut()
                    .find(|p| p["id"] == id)
                    .ok_or_else(|| Fault::Drive(format!("Invalid pmem device ID: {id}")))?;
                merge_fields(dev, body, &["rate_limiter"]);
                done
            }
            "patchVm" => {
                self.post_boot()?;
                match body["state"].as_str() {
                    Some("Paused") => {
                        self.state = InstanceState::Paused;
                        done
                    }
                    _ => {
                        self.state = InstanceState::Running;
                        if std::mem::take(&mut self.ctrl_alt_del_pending) {
                            Ok(Reply::no_content().with_event(Event::CtrlAltDel))
                        } else {
                            done
                        }
                    }
                }
            }
            "createSnapshot" => {
                self.post_boot()?;
                self.create_snapshot(body)?;
                done
            }
            "loadSnapshot" => self.load_snapshot(body),
            other => Err(Fault::NotSupported(format!(
                "operation {other} is not implemented by fake-firecracker"
            ))),
        }
    }

    fn action(&mut self, body: &Value) -> Result<Reply, Fault> {
        match body["action_type"].as_str().unwrap_or_default() {
            "InstanceStart" => {
                self.pre_boot()?;
                let Some(boot) = &self.boot_source else {
                    return Err(Fault::StartMicrovm(
                        "Cannot start microvm without kernel configuration.".to_string(),
                    ));
                };
                // The kernel is loaded now; a path that opened but is not a file (a directory)
                // fails here, as in Firecracker.
                let kernel = boot["kernel_image_path"].as_str().unwrap_or_default();
                if !Path::new(kernel).is_file() {
                    return Err(Fault::StartMicrovm(format!(
                        "Cannot load kernel due to invalid memory configuration or invalid kernel \
                         image: {kernel} is not a regular file"
                    )));
                }
                // On x86_64 Firecracker loads only an uncompressed ELF kernel (vmlinux); a
                // bzImage (vmlinuz) is refused here, at InstanceStart, not at PUT /boot-source.
                if !has_elf_magic(kernel) {
                    return Err(Fault::StartMicrovm(format!(
                        "Cannot load kernel due to invalid memory configuration or invalid kernel \
                         image: Kernel Loader: failed to load ELF kernel image: Invalid Elf magic \
                         number ({kernel})"
                    )));
                }
                if let Some(balloon) = &self.balloon {
                    let amount = balloon["amount_mib"].as_u64().unwrap_or(0);
                    if amount > self.machine.mem_size_mib {
                        return Err(Fault::StartMicrovm(format!(
                            "Cannot create the balloon device: the balloon target of {amount} MiB \
                             exceeds the guest memory of {} MiB",
                            self.machine.mem_size_mib
                        )));
                    }
                }
                self.state = InstanceState::Running;
                Ok(Reply::no_content().with_event(Event::Started))
            }
            "SendCtrlAltDel" => {
                self.post_boot()?;
                if self.state == InstanceState::Paused {
                    self.ctrl_alt_del_pending = true;
                    Ok(Reply::no_content())
                } else {
                    Ok(Reply::no_content().with_event(Event::CtrlAltDel))
                }
            }
            // FlushMetrics
            _ => {
                self.post_boot()?;
                Ok(Reply::no_content())
            }
        }
    }

    fn put_boot_source(&mut self, body: &Value) -> Result<(), Fault> {
        let kernel = body["kernel_image_path"].as_str().unwrap_or_default();
        File::open(kernel).map_err(|e| {
            Fault::BootSource(format!("The kernel file cannot be opened: {e} ({kernel})"))
        })?;
        if let Some(initrd) = body.get("initrd_path").and_then(Value::as_str) {
            File::open(initrd).map_err(|e| {
                Fault::BootSource(format!(
                    "The initrd file cannot be opened due to invalid path or invalid permissions. \
                     {e} ({initrd})"
                ))
            })?;
        }
        if let Some(args) = body.get("boot_args").and_then(Value::as_str) {
            if args.len() > MAX_CMDLINE_LEN {
                return Err(Fault::BootSource(format!(
                    "The kernel command line is invalid: Command line string too large ({} bytes, \
                     at most {MAX_CMDLINE_LEN})",
                    args.len()
                )));
            }
            if let Some(bad) = args.chars().find(|c| !(' '..='~').contains(c)) {
                return Err(Fault::BootSource(format!(
                    "The kernel command line is invalid: String contains an invalid character \
                     ({bad:?})"
                )));
            }
        }
        self.boot_path = true;
        self.boot_source = Some(body.clone());
        Ok(())
    }

    fn put_drive(&mut self, id: &str, body: &Value) -> Result<(), Fault> {
        check_same_id(id, body, "drive_id")?;
        let socket = body.get("socket").and_then(Value::as_str);
        let path = body.get("path_on_host").and_then(Value::as_str);
        let read_only = body["is_read_only"].as_bool().unwrap_or(false);
        match (path, socket) {
            (Some(_), Some(_)) => {
                return Err(Fault::Drive(format!(
                    "drive {id}: path_on_host and socket are mutually exclusive (virtio-block or \
                     vhost-user-block)"
                )));
            }
            (None, None) => {
                return Err(Fault::Drive(format!(
                    "drive {id}: a virtio-block drive needs path_on_host"
                )));
            }
            (Some(path), None) => {
                open_backing(path, read_only).map_err(|e| {
                    Fault::Drive(format!(
                        "Unable to create the virtio block device: Virtio backend error: Error \
                         manipulating the backing file: {e} {path}"
                    ))
                })?;
            }
            (None, Some(socket)) => {
                UnixStream::connect(socket).map_err(|e| {
                    Fault::Drive(format!(
                        "Unable to create the vhost-user-block device: cannot connect to \
                         {socket}: {e}"
                    ))
                })?;
            }
        }
        if body["is_root_device"].as_bool() == Some(true)
            && self
                .drives
                .iter()
                .any(|d| d["is_root_device"] == true && d["drive_id"] != id)
        {
            return Err(Fault::Drive(
                "A root block device already exists!".to_string(),
            ));
        }
        let mut drive = body.clone();
        if socket.is_none() {
            set_default(&mut drive, "is_read_only", json!(false));
            set_default(&mut drive, "io_engine", json!("Sync"));
        }
        set_default(&mut drive, "cache_type", json!("Unsafe"));
        self.boot_path = true;
        upsert(&mut self.drives, "drive_id", id, drive);
        // Firecracker attaches the root device first.
        self.drives
            .sort_by_key(|d| d["is_root_device"].as_bool() != Some(true));
        Ok(())
    }

    fn patch_drive(&mut self, id: &str, body: &Value) -> Result<(), Fault> {
        check_same_id(id, body, "drive_id")?;
        let drive = self
            .drives
            .iter_mut()
            .find(|d| d["drive_id"] == id)
            .ok_or_else(|| Fault::Drive(format!("Invalid block device ID: {id}")))?;
        if let Some(path) = body.get("path_on_host").and_then(Value::as_str) {
            let read_only = drive["is_read_only"].as_bool().unwrap_or(false);
            open_backing(path, read_only).map_err(|e| {
                Fault::Drive(format!(
                    "Unable to patch the block device: Error manipulating the backing file: {e} \
                     {path}"
                ))
            })?;
        }
        merge_fields(drive, body, &["path_on_host", "rate_limiter"]);
        Ok(())
    }

    fn put_net(&mut self, id: &str, body: &Value) -> Result<(), Fault> {
        check_same_id(id, body, "iface_id")?;
        let tap = body["host_dev_name"].as_str().unwrap_or_default();
        if tap.is_empty() || tap.len() > MAX_IFNAME_LEN {
            return Err(Fault::Network(format!(
                "Could not create the network device: Open tap device failed: Invalid interface \
                 name {tap:?} (1 to {MAX_IFNAME_LEN} bytes)"
            )));
        }
        let mac = body.get("guest_mac").and_then(Value::as_str);
        if let Some(mac) = mac
            && !valid_mac(mac)
        {
            return Err(Fault::Deserialize(format!(
                "invalid guest_mac {mac:?}: expected six hex bytes separated by ':'"
            )));
        }
        for other in self.net.iter().filter(|n| n["iface_id"] != id) {
            if other["host_dev_name"] == tap {
                return Err(Fault::Network(format!(
                    "Could not create the network device: Open tap device failed: {tap} is \
                     already used by interface {}",
                    other["iface_id"]
                )));
            }
            if let Some(mac) = mac
                && other["guest_mac"]
                    .as_str()
                    .is_some_and(|m| m.eq_ignore_ascii_case(mac))
            {
                return Err(Fault::Network(format!(
                    "The MAC address is already in use: {mac}"
                )));
            }
        }
        self.boot_path = true;
        upsert(&mut self.net, "iface_id", id, body.clone());
        Ok(())
    }

    fn put_vsock(&mut self, body: Value) -> Result<(), Fault> {
        let uds = PathBuf::from(body["uds_path"].as_str().unwrap_or_default());
        // Replacing the device drops the old backend first, as Firecracker does.
        self.vsock_host = None;
        let host = VsockHost::bind(&uds).map_err(|e| {
            Fault::Vsock(format!(
                "Cannot create backend for vsock device: Error binding to the host-side Unix \
                 socket {}: {e}",
                uds.display()
            ))
        })?;
        self.boot_path = true;
        self.vsock_host = Some(host);
        self.vsock = Some(body);
        Ok(())
    }

    fn put_mmds_config(&mut self, body: &Value) -> Result<(), Fault> {
        let ids = body["network_interfaces"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if ids.is_empty() {
            return Err(Fault::MmdsConfig(
                "The list of network interface IDs that allow forwarding MMDS requests is empty."
                    .to_string(),
            ));
        }
        if let Some(missing) = ids
            .iter()
            .find(|id| !self.net.iter().any(|n| &n["iface_id"] == *id))
        {
            return Err(Fault::MmdsConfig(format!(
                "The list of network interface IDs provided contains at least one ID that does \
                 not correspond to any existing network interface: {missing}"
            )));
        }
        self.boot_path = true;
        self.mmds_config = Some(body.clone());
        Ok(())
    }

    fn balloon_mut(&mut self) -> Result<&mut Value, Fault> {
        self.balloon
            .as_mut()
            .ok_or_else(|| Fault::Balloon("No balloon device found.".to_string()))
    }

    /// `GET /vm/config`: everything configured so far.
    pub fn full_config(&self) -> Value {
        json!({
            "balloon": self.balloon,
            "drives": self.drives,
            "boot-source": self.boot_source,
            "cpu-config": self.cpu_config,
            "logger": self.logger,
            "machine-config": self.machine.to_json(),
            "metrics": self.metrics,
            "memory-hotplug": self.memory_hotplug,
            "mmds-config": self.mmds_config,
            "network-interfaces": self.net,
            "pmem": self.pmem,
            "vsock": self.vsock,
            "entropy": self.entropy,
        })
    }

    fn create_snapshot(&mut self, body: &Value) -> Result<(), Fault> {
        if body["snapshot_type"].as_str() == Some("Diff") && !self.machine.track_dirty_pages {
            return Err(Fault::NotSupported(
                "Diff snapshots are not allowed on uVMs with dirty page tracking disabled."
                    .to_string(),
            ));
        }
        if self.state != InstanceState::Paused {
            return Err(Fault::CreateSnapshot(
                "Cannot save the microVM state: the microVM must be paused first (PATCH /vm \
                 {\"state\": \"Paused\"})."
                    .to_string(),
            ));
        }
        let snapshot_path = body["snapshot_path"].as_str().unwrap_or_default();
        let mem_path = body["mem_file_path"].as_str().unwrap_or_default();
        let state = json!({
            "magic": SNAPSHOT_MAGIC,
            "vmm_version": self.vmm_version,
            "id": self.id,
            "config": self.full_config(),
        });
        write_file(snapshot_path, state.to_string().as_bytes()).map_err(|e| {
            Fault::CreateSnapshot(format!(
                "Cannot write the microVM state to {snapshot_path}: {e}"
            ))
        })?;
        let mem = format!(
            "fake-firecracker guest memory of {}: {} MiB\n",
            self.id, self.machine.mem_size_mib
        );
        write_file(mem_path, mem.as_bytes()).map_err(|e| {
            Fault::CreateSnapshot(format!("Cannot write the guest memory to {mem_path}: {e}"))
        })?;
        Ok(())
    }

    fn load_snapshot(&mut self, body: &Value) -> Result<Reply, Fault> {
        self.pre_boot()?;
        if self.boot_path {
            return Err(Fault::LoadSnapshot(
                "Loading a microVM snapshot not allowed after configuring boot-specific resources."
                    .to_string(),
            ));
        }
        let mem_file = body.get("mem_file_path").and_then(Value::as_str);
        let backend = body.get("mem_backend").filter(|v| !v.is_null());
        let mem_path = match (mem_file, backend) {
            (Some(_), Some(_)) => {
                return Err(Fault::Deserialize(
                    "too many fields: either `mem_backend` or `mem_file_path` exclusively is \
                     required."
                        .to_string(),
                ));
            }
            (None, None) => {
                return Err(Fault::Deserialize(
                    "missing field: either `mem_backend` or `mem_file_path` is required."
                        .to_string(),
                ));
            }
            (Some(p), None) => p.to_string(),
            (None, Some(b)) => b["backend_path"].as_str().unwrap_or_default().to_string(),
        };
        // From here on a failure is a failed restore, which Firecracker does not survive.
        match self.restore(body, &mem_path) {
            Ok(()) => Ok(Reply::no_content()),
            Err(message) => Ok(Reply::fault(
                400,
                Fault::LoadSnapshot(format!("Failed to restore from snapshot: {message}"))
                    .to_string(),
            )
            .with_event(Event::RestoreFailed)),
        }
    }

    fn restore(&mut self, body: &Value, mem_path: &str) -> Result<(), String> {
        let snapshot_path = body["snapshot_path"].as_str().unwrap_or_default();
        let bytes = std::fs::read(snapshot_path)
            .map_err(|e| format!("cannot read the microVM state {snapshot_path}: {e}"))?;
        let state: Value = serde_json::from_slice(&bytes)
            .ok()
            .filter(|s: &Value| s["magic"] == SNAPSHOT_MAGIC)
            .ok_or_else(|| format!("{snapshot_path} is not a microVM state file"))?;
        File::open(mem_path).map_err(|e| format!("cannot open guest memory {mem_path}: {e}"))?;
        let config = &state["config"];

        let mut net: Vec<Value> = config["network-interfaces"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        for o in body["network_overrides"].as_array().into_iter().flatten() {
            let id = &o["iface_id"];
            let iface = net
                .iter_mut()
                .find(|n| &n["iface_id"] == id)
                .ok_or_else(|| format!("network override for unknown interface {id}"))?;
            iface["host_dev_name"] = o["host_dev_name"].clone();
        }
        let mut vsock = config.get("vsock").filter(|v| !v.is_null()).cloned();
        if let Some(o) = body.get("vsock_override").filter(|v| !v.is_null()) {
            let v = vsock
                .as_mut()
                .ok_or_else(|| "vsock override but the snapshot has no vsock device".to_string())?;
            v["uds_path"] = o["uds_path"].clone();
        }
        let vsock_host =
            match &vsock {
                Some(v) => {
                    let uds = PathBuf::from(v["uds_path"].as_str().unwrap_or_default());
                    Some(VsockHost::bind(&uds).map_err(|e| {
                        format!("cannot bind the vsock socket {}: {e}", uds.display())
                    })?)
                }
                None => None,
            };

        let machine = MachineConfig::default().merged(&config["machine-config"]);
        let track = body["track_dirty_pages"]
            .as_bool()
            .or(body["enable_diff_snapshots"].as_bool())
            .unwrap_or(false);
        self.machine = MachineConfig {
            track_dirty_pages: track,
            // Firecracker does not keep SMT or the CPU template across a snapshot.
            smt: false,
            cpu_template: None,
            ..machine
        };
        self.drives = config["drives"].as_array().cloned().unwrap_or_default();
        self.net = net;
        self.vsock = vsock;
        self.vsock_host = vsock_host;
        self.balloon = config.get("balloon").filter(|v| !v.is_null()).cloned();
        self.entropy = config.get("entropy").filter(|v| !v.is_null()).cloned();
        self.mmds_config = config.get("mmds-config").filter(|v| !v.is_null()).cloned();
        self.state = if body["resume_vm"].as_bool() == Some(true) {
            InstanceState::Running
        } else {
            InstanceState::Paused
        };
        Ok(())
    }
}

/// Whether the file at `path` starts with the ELF magic.
fn has_elf_magic(path: &str) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && magic == *b"\x7fELF"
}

fn path_id<'m>(matched: &'m Matched<'_>, name: &str) -> &'m str {
    matched.param(name).unwrap_or_default()
}

fn check_same_id(path_id: &str, body: &Value, field: &str) -> Result<(), Fault> {
    if body[field].as_str() == Some(path_id) {
        Ok(())
    } else {
        Err(Fault::IdMismatch)
    }
}

/// Opens a backing file the way the VMM will use it: writable unless read-only.
fn open_backing(path: &str, read_only: bool) -> std::io::Result<File> {
    OpenOptions::new().read(true).write(!read_only).open(path)
}

fn write_file(path: &str, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = File::create(path)?;
    f.write_all(bytes)
}

fn valid_mac(mac: &str) -> bool {
    let parts: Vec<&str> = mac.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
}

fn set_default(obj: &mut Value, key: &str, value: Value) {
    if let Some(map) = obj.as_object_mut()
        && map.get(key).is_none_or(Value::is_null)
    {
        map.insert(key.to_string(), value);
    }
}

fn upsert(list: &mut Vec<Value>, key: &str, id: &str, value: Value) {
    match list.iter_mut().find(|v| v[key] == id) {
        Some(existing) => *existing = value,
        None => list.push(value),
    }
}

fn merge_fields(target: &mut Value, body: &Value, fields: &[&str]) {
    for f in fields {
        if let Some(v) = body.get(*f).filter(|v| !v.is_null()) {
            target[*f] = v.clone();
        }
    }
}

/// RFC 7396 JSON merge patch, which is what PATCH /mmds applies.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(t) = target {
        for (k, v) in patch {
            if v.is_null() {
                t.remove(k);
            } else {
                merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::Spec;

    struct Harness {
        spec: Spec,
        inst: Instance,
        dir: tempfile::TempDir,
    }

    impl Harness {
        fn new() -> Harness {
            Harness {
                spec: Spec::load(),
                inst: Instance::new("vm1", FIRECRACKER_VERSION),
                dir: tempfile::tempdir().unwrap(),
            }
        }

        fn file(&self, name: &str) -> String {
            let p = self.dir.path().join(name);
            let data: &[u8] = if name.starts_with("vmlinux") {
                b"\x7fELF kernel"
            } else {
                b"data"
            };
            std::fs::write(&p, data).unwrap();
            p.to_string_lossy().into_owned()
        }

        fn call(&mut self, method: &str, path: &str, body: Option<Value>) -> Reply {
            let m = self
                .spec
                .validate(method, path, body.as_ref())
                .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
            self.inst.handle(&m, body.as_ref())
        }

        fn fault(&mut self, method: &str, path: &str, body: Option<Value>) -> String {
            let r = self.call(method, path, body);
            assert_eq!(r.status, 400, "{method} {path} answered {r:?}");
            r.body.unwrap()["fault_message"]
                .as_str()
                .unwrap()
                .to_string()
        }

        fn boot(&mut self) {
            let k = self.file("vmlinux");
            assert_eq!(
                self.call("PUT", "/boot-source", Some(json!({"kernel_image_path": k})))
                    .status,
                204
            );
            let r = self.call(
                "PUT",
                "/actions",
                Some(json!({"action_type": "InstanceStart"})),
            );
            assert_eq!(r.status, 204);
            assert_eq!(r.event, Some(Event::Started));
        }
    }

    #[test]
    fn machine_config_defaults_put_and_patch() {
        let mut h = Harness::new();
        let r = h.call("GET", "/machine-config", None);
        assert_eq!(
            r.body.unwrap(),
            json!({"vcpu_count": 1, "mem_size_mib": 128, "smt": false,
                   "track_dirty_pages": false, "huge_pages": "None"})
        );
        h.call(
            "PUT",
            "/machine-config",
            Some(json!({"vcpu_count": 2, "mem_size_mib": 512, "smt": true})),
        );
        h.call(
            "PATCH",
            "/machine-config",
            Some(json!({"mem_size_mib": 1024})),
        );
        assert_eq!(h.inst.machine_config().vcpu_count, 2);
        assert_eq!(h.inst.machine_config().mem_size_mib, 1024);
        assert!(h.inst.machine_config().smt);
        // A PUT resets what it does not name.
        h.call(
            "PUT",
            "/machine-config",
            Some(json!({"vcpu_count": 1, "mem_size_mib": 256})),
        );
        assert!(!h.inst.machine_config().smt);
        let e = h.fault(
            "PUT",
            "/machine-config",
            Some(json!({"vcpu_count": 1, "mem_size_mib": 0})),
        );
        assert!(e.contains("memory size"), "{e}");
        let e = h.fault(
            "PUT",
            "/machine-config",
            Some(json!({"vcpu_count": 3, "mem_size_mib": 128, "smt": true})),
        );
        assert!(e.contains("vCPU number is invalid"), "{e}");
        let e = h.fault(
            "PUT",
            "/machine-config",
            Some(json!({"vcpu_count": 2, "mem_size_mib": 129, "huge_pages": "2M"})),
        );
        assert!(e.contains("mem_size_mib 129"), "{e}");
    }

    #[test]
    fn boot_source_files_must_open() {
        let mut h = Harness::new();
        let e = h.fault(
            "PUT",
            "/boot-source",
            Some(json!({"kernel_image_path": "/nonexistent/vmlinux"})),
        );
        assert!(
            e.contains("/nonexistent/vmlinux") && e.contains("kernel file"),
            "{e}"
        );
        let k = h.file("k");
        let e = h.fault(
            "PUT",
            "/boot-source",
            Some(json!({"kernel_image_path": k, "initrd_path": "/nonexistent/initrd"})),
        );
        assert!(e.contains("/nonexistent/initrd"), "{e}");
        let long = "a".repeat(3000);
        let e = h.fault(
            "PUT",
            "/boot-source",
            Some(json!({"kernel_image_path": k, "boot_args": long})),
        );
        assert!(e.contains("too large"), "{e}");
    }

    #[test]
    fn start_refuses_a_kernel_that_is_not_elf() {
        let mut h = Harness::new();
        let bz = h.dir.path().join("vmlinuz");
        std::fs::write(&bz, b"MZ\xea\x07 bzImage").unwrap();
        let bz = bz.to_string_lossy().into_owned();
        assert_eq!(
            h.call(
                "PUT",
                "/boot-source",
                Some(json!({"kernel_image_path": bz}))
            )
            .status,
            204
        );
        let e = h.fault(
            "PUT",
            "/actions",
            Some(json!({"action_type": "InstanceStart"})),
        );
        assert!(e.contains("ELF") && e.contains("vmlinuz"), "{e}");
    }

    #[test]
    fn start_requires_kernel_and_happens_once() {
        let mut h = Harness::new();
        let e = h.fault(
            "PUT",
            "/actions",
            Some(json!({"action_type": "InstanceStart"})),
        );
        assert_eq!(
            e,
            "Start microvm error: Cannot start microvm without kernel configuration."
        );
        h.boot();
        assert_eq!(h.inst.state(), InstanceState::Running);
        let e = h.fault(
            "PUT",
            "/actions",
            Some(json!({"action_type": "InstanceStart"})),
        );
        assert_eq!(e, Fault::PostBoot.to_string());
        let k = h.file("k2");
        let e = h.fault("PUT", "/boot-source", Some(json!({"kernel_image_path": k})));
        assert_eq!(
            e,
            "The requested operation is not supported after starting the microVM."
        );
    }

    #[test]
    fn drives_check_ids_files_and_root() {
        let mut h = Harness::new();
        let r = h.file("rootfs.ext4");
        let e = h.fault(
            "PUT",
            "/drives/rootfs",
            Some(json!({"drive_id": "other", "path_on_host": r, "is_root_device": true})),
        );
        assert_eq!(
            e,
            "The id from the path does not match the id from the body!"
        );
        let e = h.fault(
            "PUT",
            "/drives/rootfs",
            Some(json!({"drive_id": "rootfs", "path_on_host": "/nope/r.ext4", "is_root_device": true})),
        );
        assert!(e.contains("/nope/r.ext4"), "{e}");
        let d = h.file("data.ext4");
        let ok = h.call(
            "PUT",
            "/drives/data",
            Some(json!({"drive_id": "data", "path_on_host": d, "is_root_device": false})),
        );
        assert_eq!(ok.status, 204);
        let ok = h.call(
            "PUT",
            "/drives/rootfs",
            Some(json!({"drive_id": "rootfs", "path_on_host": r, "is_root_device": true, "is_read_only": true})),
        );
        assert_eq!(ok.status, 204);
        let e = h.fault(
            "PUT",
            "/drives/second",
            Some(json!({"drive_id": "second", "path_on_host": d, "is_root_device": true})),
        );
        assert_eq!(e, "Drive config error: A root block device already exists!");
        let cfg = h.call("GET", "/vm/config", None).body.unwrap();
        assert_eq!(cfg["drives"][0]["drive_id"], "rootfs");
        assert_eq!(cfg["drives"][1]["drive_id"], "data");
        assert_eq!(cfg["drives"][1]["cache_type"], "Unsafe");
        // Patching is for a running VM only.
        let e = h.fault(
            "PATCH",
            "/drives/data",
            Some(json!({"drive_id": "data", "path_on_host": d})),
        );
        assert_eq!(e, Fault::PreBoot.to_string());
    }

    #[test]
    fn network_interfaces_check_names_and_macs() {
        let mut h = Harness::new();
        let put = |tap: &str, mac: &str, id: &str| json!({"iface_id": id, "host_dev_name": tap, "guest_mac": mac});
        let e = h.fault(
            "PUT",
            "/network-interfaces/eth0",
            Some(put("tap0", "zz:00:00:00:00:01", "eth0")),
        );
        assert!(e.contains("zz:00:00:00:00:01"), "{e}");
        let e = h.fault(
            "PUT",
            "/network-interfaces/eth0",
            Some(put("a-very-long-tap-name", "02:00:00:00:00:01", "eth0")),
        );
        assert!(e.contains("a-very-long-tap-name"), "{e}");
        assert_eq!(
            h.call(
                "PUT",
                "/network-interfaces/eth0",
                Some(put("tap0", "02:00:00:00:00:01", "eth0"))
            )
            .status,
            204
        );
        let e = h.fault(
            "PUT",
            "/network-interfaces/eth1",
            Some(put("tap1", "02:00:00:00:00:01", "eth1")),
        );
        assert!(e.contains("MAC address is already in use"), "{e}");
        let e = h.fault(
            "PUT",
            "/network-interfaces/eth1",
            Some(put("tap1", "02:00:00:00:00:02", "eth2")),
        );
        assert_eq!(e, Fault::IdMismatch.to_string());
        let e = h.fault(
            "PUT",
            "/mmds/config",
            Some(json!({"network_interfaces": ["eth9"]})),
        );
        assert!(e.contains("eth9"), "{e}");
        assert_eq!(
            h.call(
                "PUT",
                "/mmds/config",
                Some(json!({"network_interfaces": ["eth0"]}))
            )
            .status,
            204
        );
    }

    #[test]
    fn vsock_binds_its_host_socket() {
        let mut h = Harness::new();
        let uds = h.dir.path().join("v.sock");
        let body = json!({"guest_cid": 3, "uds_path": uds});
        assert_eq!(h.call("PUT", "/vsock", Some(body)).status, 204);
        assert!(uds.exists());
        // A host connection is accepted and then closed: no guest listens.
        let mut c = UnixStream::connect(&uds).unwrap();
        c.write_all(b"CONNECT 52\n").unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = Vec::new();
        assert_eq!(c.read_to_end(&mut buf).unwrap_or(0), 0);
        let other = h.dir.path().join("missing-dir/v.sock");
        let e = h.fault(
            "PUT",
            "/vsock",
            Some(json!({"guest_cid": 3, "uds_path": other})),
        );
        assert!(e.contains("missing-dir/v.sock"), "{e}");
    }

    #[test]
    fn pause_resume_and_snapshots() {
        let mut h = Harness::new();
        let e = h.fault("PATCH", "/vm", Some(json!({"state": "Paused"})));
        assert_eq!(e, Fault::PreBoot.to_string());
        h.boot();
        let snap = h.dir.path().join("snap").to_string_lossy().into_owned();
        let mem = h.dir.path().join("mem").to_string_lossy().into_owned();
        let create = json!({"snapshot_path": snap, "mem_file_path": mem});
        let e = h.fault("PUT", "/snapshot/create", Some(create.clone()));
        assert!(e.contains("paused"), "{e}");
        h.call("PATCH", "/vm", Some(json!({"state": "Paused"})));
        assert_eq!(h.inst.state(), InstanceState::Paused);
        let e = h.fault(
            "PUT",
            "/snapshot/create",
            Some(json!({"snapshot_path": snap, "mem_file_path": mem, "snapshot_type": "Diff"})),
        );
        assert!(e.contains("Diff snapshots"), "{e}");
        assert_eq!(h.call("PUT", "/snapshot/create", Some(create)).status, 204);
        assert!(Path::new(&snap).is_file() && Path::new(&mem).is_file());
        h.call("PATCH", "/vm", Some(json!({"state": "Resumed"})));
        assert_eq!(h.inst.state(), InstanceState::Running);

        // A fresh instance loads it; a configured one may not.
        let mut fresh = Harness::new();
        let load = json!({"snapshot_path": snap, "mem_backend": {"backend_type": "File", "backend_path": mem}});
        let r = fresh.call("PUT", "/snapshot/load", Some(load.clone()));
        assert_eq!(r.status, 204, "{r:?}");
        assert_eq!(fresh.inst.state(), InstanceState::Paused);
        let mut configured = Harness::new();
        configured.call(
            "PUT",
            "/machine-config",
            Some(json!({"vcpu_count": 1, "mem_size_mib": 128})),
        );
        let e = configured.fault("PUT", "/snapshot/load", Some(load));
        assert!(e.contains("not allowed after configuring"), "{e}");
        // A failed restore is fatal.
        let mut broken = Harness::new();
        let r = broken.call(
            "PUT",
            "/snapshot/load",
            Some(json!({"snapshot_path": "/nope/snap", "mem_file_path": mem})),
        );
        assert_eq!(r.status, 400);
        assert_eq!(r.event, Some(Event::RestoreFailed));
    }

    #[test]
    fn ctrl_alt_del_reboots_running_guest() {
        let mut h = Harness::new();
        let e = h.fault(
            "PUT",
            "/actions",
            Some(json!({"action_type": "SendCtrlAltDel"})),
        );
        assert_eq!(e, Fault::PreBoot.to_string());
        h.boot();
        h.call("PATCH", "/vm", Some(json!({"state": "Paused"})));
        let r = h.call(
            "PUT",
            "/actions",
            Some(json!({"action_type": "SendCtrlAltDel"})),
        );
        assert_eq!(r.event, None);
        let r = h.call("PATCH", "/vm", Some(json!({"state": "Resumed"})));
        assert_eq!(r.event, Some(Event::CtrlAltDel));
        let r = h.call(
            "PUT",
            "/actions",
            Some(json!({"action_type": "SendCtrlAltDel"})),
        );
        assert_eq!(r.event, Some(Event::CtrlAltDel));
    }

    #[test]
    fn mmds_put_patch_get() {
        let mut h = Harness::new();
        h.call("PUT", "/mmds", Some(json!({"a": 1, "b": {"c": 2}})));
        h.call("PATCH", "/mmds", Some(json!({"a": null, "b": {"d": 3}})));
        assert_eq!(
            h.call("GET", "/mmds", None).body.unwrap(),
            json!({"b": {"c": 2, "d": 3}})
        );
    }
}
