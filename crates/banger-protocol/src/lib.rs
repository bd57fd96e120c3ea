//! The CLI ↔ daemon protocol.
//!
//! One connection carries one request. The client writes a single JSON line:
//! `{"v":1,"op_id":"op-1a2b3c4d","method":"vm.create","params":{...}}`; the daemon answers with
//! zero or more `progress` frames and exactly one `result` or `error` frame, one JSON object per
//! line, then closes. Closing the connection early cancels the request.
//!
//! [`Request`] is the closed set of methods (one enum for the whole boundary, so the dispatcher
//! is an exhaustive `match`); [`decode_request`] turns a line into it, mapping every failure to
//! the stable [`ErrorCode`] the client will see.

use std::path::{Path, PathBuf};

use banger_core::{ByteSize, ErrorCode, ImageRecord, KernelRecord, OpId, VmRecord};
use serde::{Deserialize, Serialize};

/// The protocol version this build speaks. Bumped on any incompatible change.
pub const PROTOCOL_VERSION: u32 = 1;

/// Longest request line the daemon reads; longer ones get a `bad_request` answer.
pub const MAX_REQUEST_BYTES: usize = 1024 * 1024;

/// Parameters that name one VM (by name or id).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmRef {
    pub vm: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmCreateParams {
    /// A DNS label; generated when absent.
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub image: Option<String>,
    #[serde(default)]
    pub kernel: Option<String>,
    #[serde(default)]
    pub vcpu: Option<u32>,
    #[serde(default)]
    pub memory_mib: Option<u32>,
    #[serde(default)]
    pub work_disk_size: Option<ByteSize>,
    #[serde(default)]
    pub nat: bool,
    /// Give the guest `/dev/kvm` (`--nested`); the config's `vm_defaults.nested` when absent.
    #[serde(default)]
    pub nested: Option<bool>,
    #[serde(default)]
    pub no_start: bool,
    /// `vm run --rm`: the VM is only wanted if the whole create succeeds; when its start fails
    /// or the client goes away before the answer, the daemon deletes it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rm_on_failure: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmStopParams {
    pub vm: String,
    /// Seconds to wait for a graceful shutdown before killing; config default when absent.
    #[serde(default)]
    pub timeout_secs: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmKillParams {
    pub vm: String,
    /// Signal name (`KILL`, `TERM`, `INT`, `HUP`, `QUIT`); `KILL` when absent.
    #[serde(default)]
    pub signal: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmDeleteParams {
    pub vm: String,
    /// Delete a running VM (stopping it first).
    #[serde(default)]
    pub force: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSetParams {
    pub vm: String,
    #[serde(default)]
    pub vcpu: Option<u32>,
    #[serde(default)]
    pub memory_mib: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmLogsParams {
    pub vm: String,
    /// Last N lines; all when absent.
    #[serde(default)]
    pub lines: Option<usize>,
}

/// `vm.workspace.set`: records (or, with `null`, forgets) the workspace copied into a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmWorkspaceSetParams {
    pub vm: String,
    #[serde(default)]
    pub workspace: Option<banger_core::records::WorkspaceInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageRegisterParams {
    pub name: String,
    /// An existing ext4 root filesystem; it is never written.
    pub rootfs: PathBuf,
    #[serde(default)]
    pub kernel: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelImportParams {
    pub name: String,
    /// A directory holding `vmlinux` and optionally `initrd.img`.
    pub dir: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageImportParams {
    /// Registered name; required except for a bundle, whose manifest names it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// An image bundle (`image export`'s `.tar.zst`), an ext4 image file, a root filesystem
    /// directory, or a tarball of one (.tar, .tar.gz, .tar.zst, .tar.xz).
    pub source: PathBuf,
    #[serde(default)]
    pub kernel: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageBuildParams {
    /// Registered name; `debian-<suite>` when absent.
    #[serde(default)]
    pub name: Option<String>,
    /// Debian suite; `bookworm` when absent.
    #[serde(default)]
    pub suite: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NameParams {
    pub name: String,
}

/// `kernel.build`: compile banger's guest kernel from Debian's `linux-source-6.1`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelBuildParams {
    /// Kernel name; [`KernelBuildParams::DEFAULT_NAME`] when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl KernelBuildParams {
    pub const DEFAULT_NAME: &'static str = "banger-6.1";
}

/// `image.pull`: an OCI image from a registry, or a bundle named in the image catalog.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImagePullParams {
    /// `alpine`, `docker.io/library/python:3.12`, `localhost:5000/app@sha256:…`, or a catalog
    /// name.
    pub reference: String,
    /// Registered name; derived from the reference when absent (`python-3.12`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    /// Plain HTTP, only for loopback registries or those listed in `insecure_registries`.
    #[serde(default)]
    pub insecure: bool,
}

/// `image.export`: write an image bundle (`.tar.zst` of `manifest.json` and `rootfs.ext4`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageExportParams {
    pub name: String,
    /// Absolute path of the bundle to write; it must not exist.
    pub output: PathBuf,
}

/// `image.cache.prune`: delete cached registry blobs no image needs any more.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageCachePruneParams {
    #[serde(default)]
    pub dry_run: bool,
}

/// What `image.cache.prune` freed (or would free).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachePruneReport {
    pub blobs: usize,
    pub bytes: u64,
    pub dir: PathBuf,
    pub dry_run: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NameForceParams {
    pub name: String,
    #[serde(default)]
    pub force: bool,
}

/// Every method the daemon serves. The wire form is `{"method": "...", "params": {...}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "method", content = "params", deny_unknown_fields)]
pub enum Request {
    #[serde(rename = "ping")]
    Ping,
    #[serde(rename = "daemon.status")]
    DaemonStatus,
    #[serde(rename = "daemon.shutdown")]
    DaemonShutdown,
    #[serde(rename = "daemon.leaks")]
    DaemonLeaks,
    #[serde(rename = "vm.create")]
    VmCreate(VmCreateParams),
    #[serde(rename = "vm.start")]
    VmStart(VmRef),
    #[serde(rename = "vm.stop")]
    VmStop(VmStopParams),
    #[serde(rename = "vm.restart")]
    VmRestart(VmStopParams),
    #[serde(rename = "vm.kill")]
    VmKill(VmKillParams),
    #[serde(rename = "vm.delete")]
    VmDelete(VmDeleteParams),
    #[serde(rename = "vm.prune")]
    VmPrune,
    #[serde(rename = "vm.list")]
    VmList,
    #[serde(rename = "vm.show")]
    VmShow(VmRef),
    #[serde(rename = "vm.set")]
    VmSet(VmSetParams),
    #[serde(rename = "vm.logs")]
    VmLogs(VmLogsParams),
    #[serde(rename = "vm.ssh_info")]
    VmSshInfo(VmRef),
    #[serde(rename = "vm.workspace.set")]
    VmWorkspaceSet(VmWorkspaceSetParams),
    #[serde(rename = "image.register")]
    ImageRegister(ImageRegisterParams),
    #[serde(rename = "image.build")]
    ImageBuild(ImageBuildParams),
    #[serde(rename = "image.import")]
    ImageImport(ImageImportParams),
    #[serde(rename = "image.list")]
    ImageList,
    #[serde(rename = "image.show")]
    ImageShow(NameParams),
    #[serde(rename = "image.delete")]
    ImageDelete(NameForceParams),
    #[serde(rename = "image.pull")]
    ImagePull(ImagePullParams),
    #[serde(rename = "image.export")]
    ImageExport(ImageExportParams),
    #[serde(rename = "image.cache.prune")]
    ImageCachePrune(ImageCachePruneParams),
    #[serde(rename = "kernel.import")]
    KernelImport(KernelImportParams),
    #[serde(rename = "kernel.pull")]
    KernelPull(NameParams),
    #[serde(rename = "kernel.build")]
    KernelBuild(KernelBuildParams),
    #[serde(rename = "kernel.list")]
    KernelList,
    #[serde(rename = "kernel.show")]
    KernelShow(NameParams),
    #[serde(rename = "kernel.delete")]
    KernelDelete(NameParams),
}

/// The method names, in the order of [`Request`]. A test checks this list against the enum.
pub const METHODS: &[&str] = &[
    "ping",
    "daemon.status",
    "daemon.shutdown",
    "daemon.leaks",
    "vm.create",
    "vm.start",
    "vm.stop",
    "vm.restart",
    "vm.kill",
    "vm.delete",
    "vm.prune",
    "vm.list",
    "vm.show",
    "vm.set",
    "vm.logs",
    "vm.ssh_info",
    "vm.workspace.set",
    "image.register",
    "image.build",
    "image.import",
    "image.list",
    "image.show",
    "image.delete",
    "image.pull",
    "image.export",
    "image.cache.prune",
    "kernel.import",
    "kernel.pull",
    "kernel.build",
    "kernel.list",
    "kernel.show",
    "kernel.delete",
];

impl Request {
    pub fn method(&self) -> &'static str {
        match self {
            Request::Ping => "ping",
            Request::DaemonStatus => "daemon.status",
            Request::DaemonShutdown => "daemon.shutdown",
            Request::DaemonLeaks => "daemon.leaks",
            Request::VmCreate(_) => "vm.create",
            Request::VmStart(_) => "vm.start",
            Request::VmStop(_) => "vm.stop",
            Request::VmRestart(_) => "vm.restart",
            Request::VmKill(_) => "vm.kill",
            Request::VmDelete(_) => "vm.delete",
            Request::VmPrune => "vm.prune",
            Request::VmList => "vm.list",
            Request::VmShow(_) => "vm.show",
            Request::VmSet(_) => "vm.set",
            Request::VmLogs(_) => "vm.logs",
            Request::VmSshInfo(_) => "vm.ssh_info",
            Request::VmWorkspaceSet(_) => "vm.workspace.set",
            Request::ImageRegister(_) => "image.register",
            Request::ImageBuild(_) => "image.build",
            Request::ImageImport(_) => "image.import",
            Request::ImageList => "image.list",
            Request::ImageShow(_) => "image.show",
            Request::ImageDelete(_) => "image.delete",
            Request::ImagePull(_) => "image.pull",
            Request::ImageExport(_) => "image.export",
            Request::ImageCachePrune(_) => "image.cache.prune",
            Request::KernelImport(_) => "kernel.import",
            Request::KernelPull(_) => "kernel.pull",
            Request::KernelBuild(_) => "kernel.build",
            Request::KernelList => "kernel.list",
            Request::KernelShow(_) => "kernel.show",
            Request::KernelDelete(_) => "kernel.delete",
        }
    }
}

/// The request line as sent by a client.
#[derive(Debug, Clone, Serialize)]
pub struct Envelope<'a> {
    pub v: u32,
    pub op_id: &'a OpId,
    #[serde(flatten)]
    pub request: &'a Request,
}

impl Envelope<'_> {
    pub fn to_line(&self) -> String {
        let mut s = serde_json::to_string(self).expect("requests always serialize");
        s.push('\n');
        s
    }
}

/// A request the daemon could not accept, with the code and message to answer it with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub op_id: OpId,
    pub code: ErrorCode,
    pub message: String,
}

/// Decodes one request line. Always yields an op id to answer with: the client's when it sent a
/// usable one, a fresh one otherwise.
pub fn decode_request(line: &[u8]) -> Result<(OpId, Request), Rejection> {
    let reject = |op_id: OpId, code, message: String| Rejection {
        op_id,
        code,
        message,
    };
    let value: serde_json::Value = match serde_json::from_slice(line) {
        Ok(v) => v,
        Err(e) => {
            return Err(reject(
                OpId::generate(),
                ErrorCode::BadRequest,
                format!("malformed request: not JSON ({e})"),
            ));
        }
    };
    let serde_json::Value::Object(mut obj) = value else {
        return Err(reject(
            OpId::generate(),
            ErrorCode::BadRequest,
            "malformed request: expected a JSON object".into(),
        ));
    };
    let op_id = match obj.remove("op_id") {
        None | Some(serde_json::Value::Null) => OpId::generate(),
        Some(serde_json::Value::String(s)) => match OpId::from_client(&s) {
            Some(id) => id,
            None => {
                return Err(reject(
                    OpId::generate(),
                    ErrorCode::BadRequest,
                    format!("invalid op_id {s:?}: use 1-64 characters of a-z, A-Z, 0-9, - and _"),
                ));
            }
        },
        Some(other) => {
            return Err(reject(
                OpId::generate(),
                ErrorCode::BadRequest,
                format!("invalid op_id {other}: expected a string"),
            ));
        }
    };
    match obj.remove("v") {
        Some(serde_json::Value::Number(n)) if n.as_u64() == Some(PROTOCOL_VERSION as u64) => {}
        Some(v) => {
            return Err(reject(
                op_id,
                ErrorCode::BadVersion,
                format!(
                    "protocol version {v} is not supported: this daemon speaks version {PROTOCOL_VERSION}; restart the daemon after upgrading (banger daemon stop)"
                ),
            ));
        }
        None => {
            return Err(reject(
                op_id,
                ErrorCode::BadVersion,
                format!(
                    "request has no protocol version \"v\" (this daemon speaks {PROTOCOL_VERSION})"
                ),
            ));
        }
    }
    let method = match obj.get("method") {
        Some(serde_json::Value::String(m)) => m.clone(),
        _ => {
            return Err(reject(
                op_id,
                ErrorCode::BadRequest,
                "malformed request: \"method\" must be a string".into(),
            ));
        }
    };
    if !METHODS.contains(&method.as_str()) {
        return Err(reject(
            op_id,
            ErrorCode::UnknownMethod,
            format!("unknown method {method:?}"),
        ));
    }
    if let Some(key) = obj.keys().find(|k| *k != "method" && *k != "params") {
        return Err(reject(
            op_id,
            ErrorCode::BadRequest,
            format!("malformed request: unknown field {key:?}"),
        ));
    }
    // Methods without parameters accept an absent, null or empty params object.
    if matches!(obj.get("params"), Some(serde_json::Value::Null)) {
        obj.remove("params");
    }
    let unit_method =
        serde_json::from_value::<Request>(serde_json::json!({ "method": method })).is_ok();
    if unit_method {
        match obj.remove("params") {
            None => {}
            Some(serde_json::Value::Object(m)) if m.is_empty() => {}
            Some(_) => {
                return Err(reject(
                    op_id,
                    ErrorCode::BadRequest,
                    format!("method {method} takes no parameters"),
                ));
            }
        }
    }
    match serde_json::from_value::<Request>(serde_json::Value::Object(obj)) {
        Ok(req) => Ok((op_id, req)),
        Err(e) => Err(reject(
            op_id,
            ErrorCode::BadRequest,
            format!("invalid parameters for {method}: {e}"),
        )),
    }
}

/// One line from the daemon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Frame {
    /// A stage of a long operation began (or reports progress).
    Progress {
        op_id: OpId,
        stage: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        detail: Option<String>,
    },
    /// A warning the user should see; the operation goes on.
    Warning { op_id: OpId, message: String },
    /// The operation succeeded; `result` is method-specific.
    Result {
        op_id: OpId,
        result: serde_json::Value,
    },
    /// The operation failed.
    Error {
        op_id: OpId,
        code: ErrorCode,
        message: String,
    },
}

impl Frame {
    pub fn to_line(&self) -> String {
        let mut s = serde_json::to_string(self).expect("frames always serialize");
        s.push('\n');
        s
    }

    pub fn is_final(&self) -> bool {
        matches!(self, Frame::Result { .. } | Frame::Error { .. })
    }
}

/// `daemon.status` result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DaemonStatus {
    pub version: String,
    pub protocol: u32,
    pub pid: u32,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub log_file: PathBuf,
    pub vmm: String,
    pub vms_total: usize,
    pub vms_running: usize,
    pub uptime_secs: u64,
    /// banger's generated ssh config (`Host <name>.vm` blocks), for `banger ssh-config`.
    #[serde(default)]
    pub ssh_config: Option<PathBuf>,
    /// The `<name>.vm` DNS responder.
    #[serde(default)]
    pub dns: Option<DnsStatus>,
}

/// The `<name>.vm` DNS responder, as `daemon.status` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsStatus {
    /// Where it answers, e.g. `127.0.0.1:42069`; absent when it could not start.
    pub listen: Option<std::net::SocketAddr>,
    /// Why it does not run (the daemon works on without it).
    pub error: Option<String>,
    /// One line that sends the host's `.vm` lookups to the responder, for this host's resolver.
    pub recipe: String,
}

/// What kind of host resource a [`Leak`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeakKind {
    /// A `bgt<vm id>` tap.
    Tap,
    /// nftables rules commented `banger:<vm id>` in `table ip banger`.
    NatRule,
    /// A process whose command line names a VM's state or runtime dir.
    Process,
    /// A loop device backed by a file under the state dir.
    Loop,
    /// A `banger-<vm id>` device-mapper device.
    Mapper,
    /// A mount point under the state or runtime dir.
    Mount,
    /// A per-VM directory under `<state_dir>/vms` or `<runtime_dir>/vms`.
    Dir,
    /// A handles file of a VM that is not running.
    HandlesFile,
}

impl LeakKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LeakKind::Tap => "tap",
            LeakKind::NatRule => "nat_rule",
            LeakKind::Process => "process",
            LeakKind::Loop => "loop",
            LeakKind::Mapper => "mapper",
            LeakKind::Mount => "mount",
            LeakKind::Dir => "dir",
            LeakKind::HandlesFile => "handles_file",
        }
    }
}

impl std::fmt::Display for LeakKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A host resource carrying banger's marks that no VM of the store accounts for.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Leak {
    pub kind: LeakKind,
    /// The resource: an interface name, a VM id, a pid, a device or a path.
    pub name: String,
    /// Why it counts as leaked, and what it is.
    pub detail: String,
}

/// `daemon.leaks` result.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeakReport {
    pub leaks: Vec<Leak>,
    /// Checks that could not run (e.g. `nft` needs root), each saying why.
    #[serde(default)]
    pub unchecked: Vec<String>,
}

/// `vm.list` result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmList {
    pub vms: Vec<VmRecord>,
}

/// `vm.show` result: the record plus live details.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmDetails {
    #[serde(flatten)]
    pub vm: VmRecord,
    pub pid: Option<i32>,
    pub dir: PathBuf,
    pub log_file: PathBuf,
    /// Who serves ssh and who is PID 1 in this VM (the image's sshd and init, or banger's
    /// agent), in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access: Option<String>,
    /// Set while the VMM holds a running VM's guest paused on its own, with the reason (QEMU
    /// stops a guest whose disk write failed because the host disk is full).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused: Option<String>,
}

/// `vm.ssh_info` result: what a client needs to run `ssh` into the VM itself (it needs the
/// user's terminal, so the CLI runs ssh, not the daemon).
///
/// Decoding validates every field that reaches ssh's argv ([`SshInfo::validate`]): whatever
/// answered on the socket, a value shaped like an option (`-oProxyCommand=…`) or carrying
/// ssh-config syntax never gets that far.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawSshInfo")]
pub struct SshInfo {
    /// The VM's id: unique for ever, so it can key per-VM client state (ssh connection sharing).
    #[serde(default)]
    pub id: String,
    pub name: String,
    pub ip: std::net::Ipv4Addr,
    pub user: String,
    /// Private key to authenticate with.
    pub key: PathBuf,
    /// banger's known_hosts, holding the VM's host key since its creation.
    pub known_hosts: PathBuf,
}

/// [`SshInfo`] as it comes off the wire, before [`SshInfo::validate`].
#[derive(Deserialize)]
struct RawSshInfo {
    #[serde(default)]
    id: String,
    name: String,
    ip: std::net::Ipv4Addr,
    user: String,
    key: PathBuf,
    known_hosts: PathBuf,
}

impl TryFrom<RawSshInfo> for SshInfo {
    type Error = String;
    fn try_from(r: RawSshInfo) -> Result<Self, String> {
        let info = SshInfo {
            id: r.id,
            name: r.name,
            ip: r.ip,
            user: r.user,
            key: r.key,
            known_hosts: r.known_hosts,
        };
        info.validate()?;
        Ok(info)
    }
}

/// A login name as `useradd` accepts it: a letter or `_` first, then letters, digits, `_`,
/// `.`, `-`; at most 32 bytes. Nothing ssh could read as an option or a `user@host` split.
pub fn valid_ssh_user(user: &str) -> bool {
    let b = user.as_bytes();
    !b.is_empty()
        && b.len() <= 32
        && (b[0].is_ascii_alphabetic() || b[0] == b'_')
        && b[1..]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || b"_.-".contains(c))
}

/// A path safe to hand to ssh as `-i PATH` or `-o UserKnownHostsFile=PATH`: absolute, and free
/// of what ssh's option parser splits on or expands (whitespace, quotes, `\`, `%` tokens,
/// control characters).
pub fn valid_ssh_path(p: &Path) -> bool {
    let Some(s) = p.to_str() else {
        return false;
    };
    p.is_absolute()
        && !s
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || "\"'\\%".contains(c))
}

impl SshInfo {
    /// Checks every field that ends up in ssh's argv; the error names the field and value.
    pub fn validate(&self) -> Result<(), String> {
        if !valid_ssh_user(&self.user) {
            return Err(format!(
                "invalid ssh user {:?} (expected a plain login name)",
                self.user
            ));
        }
        for (what, p) in [("key", &self.key), ("known_hosts", &self.known_hosts)] {
            if !valid_ssh_path(p) {
                return Err(format!(
                    "invalid ssh {what} path {:?} (expected an absolute path without spaces, quotes or %)",
                    p.display().to_string()
                ));
            }
        }
        if self.ip.is_unspecified() || self.ip.is_broadcast() || self.ip.is_multicast() {
            return Err(format!("invalid VM address {}", self.ip));
        }
        Ok(())
    }

    /// The `ssh` arguments (after the program name) that reach this VM: banger's key and
    /// known_hosts only, strict host key checking (the key was recorded when the VM was made),
    /// no prompts, no user ssh config. `command`, if not empty, runs instead of a login shell;
    /// each word is quoted so it reaches the guest unchanged.
    pub fn ssh_args(
        &self,
        tty: bool,
        connect_timeout_secs: u64,
        command: &[String],
    ) -> Vec<String> {
        let mut v: Vec<String> = [
            "-F",
            "/dev/null",
            "-i",
            &self.key.display().to_string(),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            &format!("UserKnownHostsFile={}", self.known_hosts.display()),
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "LogLevel=ERROR",
            "-o",
            &format!("ConnectTimeout={}", connect_timeout_secs.max(1)),
            if tty { "-t" } else { "-T" },
            // The user is an option's argument and the host comes after `--`: neither can be
            // read as an option, whatever they hold.
            "-l",
            &self.user,
            "--",
            &self.ip.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if !command.is_empty() {
            v.push(
                command
                    .iter()
                    .map(|a| shell_quote(a))
                    .collect::<Vec<_>>()
                    .join(" "),
            );
        }
        v
    }
}

/// Quotes one argument for the remote shell ssh hands a command to. ssh joins its arguments
/// with spaces and a shell on the guest splits them again, so each argument is wrapped in single
/// quotes (embedded quotes closed, escaped and reopened) to arrive unchanged.
pub fn shell_quote(arg: &str) -> String {
    if !arg.is_empty()
        && arg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b))
    {
        return arg.to_string();
    }
    format!("'{}'", arg.replace('\'', "'\\''"))
}

/// `vm.prune` / `vm.delete` result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Removed {
    pub removed: Vec<String>,
}

/// `vm.logs` result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Logs {
    pub path: PathBuf,
    pub text: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageList {
    pub images: Vec<ImageRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelList {
    pub kernels: Vec<KernelRecord>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(v: serde_json::Value) -> Vec<u8> {
        serde_json::to_vec(&v).unwrap()
    }

    #[test]
    fn methods_list_matches_enum() {
        // Every listed method decodes to a variant whose method() is that name.
        for m in METHODS {
            let (_, req) = match decode_request(&line(serde_json::json!({"v":1,"method":m}))) {
                Ok(r) => r,
                Err(rej) => {
                    assert_eq!(rej.code, ErrorCode::BadRequest, "{m}: {}", rej.message);
                    continue;
                }
            };
            assert_eq!(req.method(), *m);
        }
        let mut sorted = METHODS.to_vec();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), METHODS.len());
    }

    #[test]
    fn round_trips_through_envelope() {
        let op = OpId::generate();
        let req = Request::VmCreate(VmCreateParams {
            name: Some("box".into()),
            vcpu: Some(2),
            work_disk_size: Some(ByteSize::gib(4)),
            ..Default::default()
        });
        let text = Envelope {
            v: PROTOCOL_VERSION,
            op_id: &op,
            request: &req,
        }
        .to_line();
        let (op2, req2) = decode_request(text.trim_end().as_bytes()).unwrap();
        assert_eq!(op, op2);
        assert_eq!(req, req2);
        let ping = Envelope {
            v: 1,
            op_id: &op,
            request: &Request::Ping,
        }
        .to_line();
        assert_eq!(decode_request(ping.as_bytes()).unwrap().1, Request::Ping);
    }

    #[test]
    fn workspace_set_round_trips_and_clears() {
        let ws = banger_core::records::WorkspaceInfo {
            guest_path: "/root/repo".into(),
            host_path: "/src/repo".into(),
            head_commit: "0".repeat(40),
            prepared_at: 5,
            include_untracked: false,
        };
        let op = OpId::generate();
        for workspace in [Some(ws), None] {
            let req = Request::VmWorkspaceSet(VmWorkspaceSetParams {
                vm: "box".into(),
                workspace,
            });
            let text = Envelope {
                v: PROTOCOL_VERSION,
                op_id: &op,
                request: &req,
            }
            .to_line();
            assert_eq!(decode_request(text.as_bytes()).unwrap().1, req);
        }
    }

    #[test]
    fn rejections_have_stable_codes() {
        let cases = [
            (b"not json".to_vec(), ErrorCode::BadRequest),
            (b"[1,2]".to_vec(), ErrorCode::BadRequest),
            (
                line(serde_json::json!({"method":"ping"})),
                ErrorCode::BadVersion,
            ),
            (
                line(serde_json::json!({"v":99,"method":"ping"})),
                ErrorCode::BadVersion,
            ),
            (
                line(serde_json::json!({"v":1,"method":"vm.fly"})),
                ErrorCode::UnknownMethod,
            ),
            (
                line(serde_json::json!({"v":1,"method":7})),
                ErrorCode::BadRequest,
            ),
            (
                line(serde_json::json!({"v":1,"method":"vm.start"})),
                ErrorCode::BadRequest,
            ),
            (
                line(serde_json::json!({"v":1,"method":"vm.start","params":{"vm":"a","x":1}})),
                ErrorCode::BadRequest,
            ),
            (
                line(serde_json::json!({"v":1,"method":"ping","params":{"x":1}})),
                ErrorCode::BadRequest,
            ),
            (
                line(serde_json::json!({"v":1,"method":"ping","extra":true})),
                ErrorCode::BadRequest,
            ),
            (
                line(serde_json::json!({"v":1,"op_id":"bad id!","method":"ping"})),
                ErrorCode::BadRequest,
            ),
        ];
        for (input, code) in cases {
            let rej = decode_request(&input).unwrap_err();
            assert_eq!(
                rej.code,
                code,
                "{}: {}",
                String::from_utf8_lossy(&input),
                rej.message
            );
            assert!(!rej.message.is_empty());
        }
    }

    #[test]
    fn client_op_id_is_kept_in_rejections() {
        let rej = decode_request(&line(
            serde_json::json!({"v":1,"op_id":"op-abc","method":"nope"}),
        ))
        .unwrap_err();
        assert_eq!(rej.op_id.as_str(), "op-abc");
    }

    #[test]
    fn quoting_survives_a_shell() {
        for arg in [
            "plain",
            "",
            "two words",
            "it's",
            "$(rm -rf /)",
            "a\"b",
            "*",
            "x;y",
            "\n",
        ] {
            let q = shell_quote(arg);
            let out = std::process::Command::new("sh")
                .arg("-c")
                .arg(format!("printf %s {q}"))
                .output()
                .unwrap();
            assert_eq!(String::from_utf8(out.stdout).unwrap(), arg, "{q}");
        }
    }

    #[test]
    fn ssh_args_are_strict_and_quote_the_command() {
        let info = SshInfo {
            id: "0123456789ab".into(),
            name: "box".into(),
            ip: "172.30.0.2".parse().unwrap(),
            user: "root".into(),
            key: "/k".into(),
            known_hosts: "/kh".into(),
        };
        let a = info.ssh_args(false, 5, &["sh".into(), "-c".into(), "exit 7".into()]);
        assert!(
            a.windows(2)
                .any(|w| w == ["-o", "StrictHostKeyChecking=yes"])
        );
        assert!(a.windows(2).any(|w| w == ["-o", "UserKnownHostsFile=/kh"]));
        assert_eq!(
            a[a.len() - 5..],
            ["-l", "root", "--", "172.30.0.2", "sh -c 'exit 7'"]
        );
        assert!(info.ssh_args(true, 5, &[]).ends_with(&[
            "-t".into(),
            "-l".into(),
            "root".into(),
            "--".into(),
            "172.30.0.2".into()
        ]));
    }

    /// What a fake daemon answered in the issue, and its cousins: refused when decoded, and
    /// even when built by hand, never an ssh option.
    #[test]
    fn hostile_ssh_info_never_becomes_an_ssh_option() {
        let good = serde_json::json!({
            "id": "0123456789ab", "name": "box", "ip": "172.30.0.2", "user": "root",
            "key": "/home/u/.local/state/banger/ssh/id_ed25519",
            "known_hosts": "/home/u/.local/state/banger/ssh/known_hosts",
        });
        let ok: SshInfo = serde_json::from_value(good.clone()).unwrap();
        assert_eq!(ok.user, "root");
        for (field, bad) in [
            ("user", "-oProxyCommand=touch /tmp/pwned"),
            ("user", "root@evil"),
            ("user", "a b"),
            ("user", ""),
            ("user", "x\nProxyCommand y"),
            ("ip", "-oProxyCommand=x"),
            ("ip", "evil.example"),
            ("key", "-oProxyCommand=x"),
            ("key", "relative/key"),
            ("known_hosts", "/k ProxyCommand=x"),
            ("known_hosts", "/kh\nProxyCommand x"),
            ("known_hosts", "/%d/kh"),
        ] {
            let mut v = good.clone();
            v[field] = serde_json::Value::String(bad.into());
            let e = serde_json::from_value::<SshInfo>(v).unwrap_err();
            assert!(!e.to_string().is_empty(), "{field}={bad:?}");
        }
        // Built by hand (the daemon's own values): still only an argument of -l.
        let mut info = ok.clone();
        info.user = "-oProxyCommand=touch /tmp/pwned".into();
        assert!(info.validate().is_err());
        let a = info.ssh_args(false, 5, &["true".into()]);
        let at = a.iter().position(|x| x == &info.user).unwrap();
        assert_eq!(a[at - 1], "-l");
        let dashdash = a.iter().position(|x| x == "--").unwrap();
        assert!(at < dashdash);
        assert!(!a[..at - 1].iter().any(|x| x.contains("ProxyCommand")));
    }

    /// 100,000 random and mutated request lines: the decoder never panics, and every
    /// rejection carries a stable code and a non-empty message.
    #[test]
    fn decoder_survives_random_and_mutated_input() {
        // A small deterministic generator (xorshift) keeps failures reproducible.
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let op = OpId::generate();
        let seeds: Vec<Vec<u8>> = [
            Request::Ping,
            Request::VmList,
            Request::VmShow(VmRef { vm: "box".into() }),
            Request::VmStop(VmStopParams {
                vm: "box".into(),
                timeout_secs: Some(3),
            }),
            Request::VmCreate(VmCreateParams {
                name: Some("box".into()),
                vcpu: Some(2),
                ..Default::default()
            }),
            Request::VmDelete(VmDeleteParams {
                vm: "box".into(),
                force: true,
            }),
            Request::KernelShow(NameParams { name: "k".into() }),
        ]
        .iter()
        .map(|r| {
            Envelope {
                v: PROTOCOL_VERSION,
                op_id: &op,
                request: r,
            }
            .to_line()
            .into_bytes()
        })
        .collect();
        let mut accepted = 0;
        for i in 0..100_000 {
            let mut input = if i % 4 == 0 {
                let n = (next() % 200) as usize;
                (0..n).map(|_| next() as u8).collect::<Vec<u8>>()
            } else {
                seeds[(next() as usize) % seeds.len()].clone()
            };
            for _ in 0..(next() % 6) {
                if input.is_empty() {
                    break;
                }
                let at = (next() as usize) % input.len();
                match next() % 4 {
                    0 => input[at] = next() as u8,
                    1 => {
                        input.remove(at);
                    }
                    2 => input.insert(at, b"{}[]\",:0-e\\"[(next() % 10) as usize]),
                    _ => input.truncate(at),
                }
            }
            match decode_request(&input) {
                Ok(_) => accepted += 1,
                Err(rej) => assert!(
                    !rej.message.is_empty(),
                    "{:?}",
                    String::from_utf8_lossy(&input)
                ),
            }
        }
        // Mutations that keep a request valid still decode: the generator is not just noise.
        assert!(accepted > 1_000, "only {accepted} inputs decoded");
    }

    #[test]
    fn frames_round_trip() {
        let op = OpId::generate();
        let frames = [
            Frame::Progress {
                op_id: op.clone(),
                stage: "vmm_boot".into(),
                detail: None,
            },
            Frame::Error {
                op_id: op.clone(),
                code: ErrorCode::NotFound,
                message: "no VM named x".into(),
            },
            Frame::Result {
                op_id: op,
                result: serde_json::json!({"ok": true}),
            },
        ];
        for f in frames {
            let back: Frame = serde_json::from_str(f.to_line().trim_end()).unwrap();
            assert_eq!(back, f);
        }
    }
}
