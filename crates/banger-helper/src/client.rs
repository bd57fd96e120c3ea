//! [`HelperClient`]: the daemon's side of the socket. One typed method per op, and
//! [`NetOps`] on top, so the daemon can swap [`banger_net::RealNetOps`] for the helper without
//! touching the code that uses it.

use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use banger_config::Ipv4Cidr;
use banger_core::OpId;
use banger_core::ids::VmId;
use banger_net::{BridgeName, NetError, NetOps, TapName};
use banger_sys::RunError;
use serde::Deserialize;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;

use crate::error::HelperError;
use crate::fdpass::read_line_with_fds;
use crate::protocol::{HelperRequest, MAX_REPLY_LINE, PROTOCOL_VERSION, Reply, RequestEnvelope};

/// Where the helper listens by default.
pub const DEFAULT_SOCKET: &str = "/run/banger/helper.sock";

tokio::task_local! {
    static CURRENT_OP: OpId;
}

/// Runs `fut` with `op_id` as the op id every [`HelperClient`] call inside it sends (instead
/// of the client's own), so a daemon sharing one client tags each helper call with the request
/// that caused it.
pub async fn scope_op_id<F: std::future::Future>(op_id: OpId, fut: F) -> F::Output {
    CURRENT_OP.scope(op_id, fut).await
}

/// A client of the helper. Cheap to clone; every call is one short connection.
///
/// `op_id` is sent with every request and appears in the helper's log line for it: set it to
/// the id of the daemon request being served ([`HelperClient::with_op_id`]) so one id follows
/// an operation across both processes.
#[derive(Debug, Clone)]
pub struct HelperClient {
    pub socket: PathBuf,
    pub op_id: OpId,
}

/// What `Debootstrap` answers.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct DebootstrapOutput {
    /// The tar, now owned by the owner.
    pub output: PathBuf,
    pub bytes: u64,
}

fn owned<T: AsRef<str>>(s: T) -> String {
    s.as_ref().to_string()
}

impl HelperClient {
    /// A client of the helper at `socket`, with a freshly generated op_id.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        HelperClient {
            socket: socket.into(),
            op_id: OpId::generate(),
        }
    }

    /// The same client, sending `op_id` instead.
    pub fn with_op_id(&self, op_id: OpId) -> Self {
        HelperClient {
            socket: self.socket.clone(),
            op_id,
        }
    }

    fn io(&self, source: std::io::Error) -> HelperError {
        HelperError::Io {
            socket: self.socket.clone(),
            source,
        }
    }

    fn protocol(&self, reason: impl Into<String>) -> HelperError {
        HelperError::Protocol {
            socket: self.socket.clone(),
            reason: reason.into(),
        }
    }

    /// Sends one request; returns the `ok` value and any descriptors that came with it.
    pub async fn call(
        &self,
        request: &HelperRequest,
    ) -> Result<(serde_json::Value, Vec<OwnedFd>), HelperError> {
        let mut stream = UnixStream::connect(&self.socket)
            .await
            .map_err(|e| self.io(e))?;
        // The daemon request being served, when the caller scoped one (see `scope_op_id`):
        // one id then follows an operation through both processes' logs.
        let scoped = CURRENT_OP.try_with(|op| op.clone()).ok();
        let op_id = scoped.as_ref().unwrap_or(&self.op_id);
        let line = RequestEnvelope {
            v: PROTOCOL_VERSION,
            op_id: op_id.as_str(),
            request,
        }
        .to_line();
        // A helper that refuses the caller answers without reading; its reply is still
        // worth reading after a failed write.
        let wrote = stream.write_all(line.as_bytes()).await;
        let mut buf = Vec::new();
        let mut fds = Vec::new();
        let read = read_line_with_fds(&stream, &mut buf, MAX_REPLY_LINE, &mut fds).await;
        let reply = match (read, wrote) {
            (Ok(Some(r)), _) => r,
            (_, Err(e)) => return Err(self.io(e)),
            (Ok(None), Ok(())) => {
                return Err(self.protocol("the helper closed the connection without replying"));
            }
            (Err(e), Ok(())) => return Err(self.io(e)),
        };
        let reply: Reply =
            serde_json::from_slice(&reply).map_err(|e| self.protocol(format!("{e}")))?;
        match reply {
            Reply::Ok(v) => Ok((v, fds)),
            Reply::Error(b) => Err(HelperError::from_wire(b.code, b.message)),
        }
    }

    async fn call_value<T: serde::de::DeserializeOwned>(
        &self,
        request: &HelperRequest,
    ) -> Result<T, HelperError> {
        let (v, _fds) = self.call(request).await?;
        serde_json::from_value(v.clone())
            .map_err(|e| self.protocol(format!("{} answered {v}: {e}", request.op())))
    }

    async fn call_unit(&self, request: &HelperRequest) -> Result<(), HelperError> {
        self.call(request).await.map(drop)
    }

    /// `Ping`: the helper's protocol version.
    pub async fn ping(&self) -> Result<u32, HelperError> {
        #[derive(Deserialize)]
        struct Pong {
            version: u32,
        }
        let p: Pong = self.call_value(&HelperRequest::Ping {}).await?;
        Ok(p.version)
    }

    pub async fn ensure_bridge(
        &self,
        bridge: &BridgeName,
        gateway: Ipv4Addr,
        prefix: u8,
    ) -> Result<(), HelperError> {
        self.call_unit(&HelperRequest::EnsureBridge {
            bridge: owned(bridge.as_str()),
            gateway: gateway.to_string(),
            prefix,
        })
        .await
    }

    /// The helper refuses any `owner_uid` but the owner's (and `None`).
    pub async fn create_tap(
        &self,
        tap: &TapName,
        bridge: &BridgeName,
        owner_uid: Option<u32>,
    ) -> Result<(), HelperError> {
        self.call_unit(&HelperRequest::CreateTap {
            tap: owned(tap.as_str()),
            bridge: owned(bridge.as_str()),
            owner_uid,
        })
        .await
    }

    pub async fn delete_tap(&self, tap: &TapName) -> Result<(), HelperError> {
        self.call_unit(&HelperRequest::DeleteTap {
            tap: owned(tap.as_str()),
        })
        .await
    }

    pub async fn list_taps(&self) -> Result<Vec<TapName>, HelperError> {
        let names: Vec<String> = self.call_value(&HelperRequest::ListTaps {}).await?;
        names
            .iter()
            .map(|n| TapName::parse(n).map_err(|e| self.protocol(format!("ListTaps answered {e}"))))
            .collect()
    }

    pub async fn ensure_nat(
        &self,
        bridge: &BridgeName,
        cidr: &Ipv4Cidr,
    ) -> Result<(), HelperError> {
        self.call_unit(&HelperRequest::EnsureNat {
            bridge: owned(bridge.as_str()),
            cidr: cidr.to_string(),
        })
        .await
    }

    pub async fn add_vm_nat(
        &self,
        vm_id: &str,
        ip: Ipv4Addr,
        tap: &TapName,
    ) -> Result<(), HelperError> {
        self.call_unit(&HelperRequest::AddVmNat {
            vm_id: owned(vm_id),
            ip: ip.to_string(),
            tap: owned(tap.as_str()),
        })
        .await
    }

    pub async fn remove_vm_nat(&self, vm_id: &str) -> Result<(), HelperError> {
        self.call_unit(&HelperRequest::RemoveVmNat {
            vm_id: owned(vm_id),
        })
        .await
    }

    pub async fn list_nat_vms(&self) -> Result<Vec<String>, HelperError> {
        self.call_value(&HelperRequest::ListNatVms {}).await
    }

    pub async fn forget_neighbor(
        &self,
        bridge: &BridgeName,
        ip: Ipv4Addr,
    ) -> Result<(), HelperError> {
        self.call_unit(&HelperRequest::ForgetNeighbor {
            bridge: owned(bridge.as_str()),
            ip: ip.to_string(),
        })
        .await
    }

    pub async fn remove_all(&self, bridge: Option<&BridgeName>) -> Result<(), HelperError> {
        self.call_unit(&HelperRequest::RemoveAll {
            bridge: bridge.map(|b| owned(b.as_str())),
        })
        .await
    }

    /// `OpenTap`: a descriptor of the tap, opened `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, for a
    /// VMM to inherit (`-netdev tap,fd=N`). It is close-on-exec here; clear that (or dup it
    /// to the number the VMM expects) when spawning the VMM.
    pub async fn open_tap(&self, tap: &TapName) -> Result<OwnedFd, HelperError> {
        let (_, mut fds) = self
            .call(&HelperRequest::OpenTap {
                tap: owned(tap.as_str()),
            })
            .await?;
        if fds.len() != 1 {
            return Err(self.protocol(format!(
                "OpenTap answered with {} descriptors, expected 1",
                fds.len()
            )));
        }
        fds.pop()
            .ok_or_else(|| self.protocol("OpenTap answered without a descriptor"))
    }

    /// `LoopAttach`: the loop device (`/dev/loopN`) now backed by `path`.
    pub async fn loop_attach(&self, path: &Path, read_only: bool) -> Result<String, HelperError> {
        let path = path
            .to_str()
            .ok_or_else(|| HelperError::bad_request(format!("path: {path:?} is not UTF-8")))?;
        self.call_value(&HelperRequest::LoopAttach {
            path: owned(path),
            read_only,
        })
        .await
    }

    /// `LoopDetach`; a device that is not attached is fine.
    pub async fn loop_detach(&self, device: &str) -> Result<(), HelperError> {
        self.call_unit(&HelperRequest::LoopDetach {
            device: owned(device),
        })
        .await
    }

    /// `DmSnapshotCreate`: the snapshot's device path, `/dev/mapper/banger-<vm id>`.
    pub async fn dm_snapshot_create(
        &self,
        vm_id: &VmId,
        origin_loop: &str,
        cow_loop: &str,
    ) -> Result<String, HelperError> {
        self.call_value(&HelperRequest::DmSnapshotCreate {
            vm_id: owned(vm_id.as_str()),
            origin_loop: owned(origin_loop),
            cow_loop: owned(cow_loop),
        })
        .await
    }

    /// `DmRemove`; a mapping that does not exist is fine.
    pub async fn dm_remove(&self, vm_id: &VmId) -> Result<(), HelperError> {
        self.call_unit(&HelperRequest::DmRemove {
            vm_id: owned(vm_id.as_str()),
        })
        .await
    }

    /// `Debootstrap`: builds a Debian root filesystem tar at `output` (a new file directly in
    /// `<state_dir>/build`), owned by the owner.
    pub async fn debootstrap(
        &self,
        suite: &str,
        mirror: &str,
        packages: &[String],
        output: &Path,
    ) -> Result<DebootstrapOutput, HelperError> {
        let output = output
            .to_str()
            .ok_or_else(|| HelperError::bad_request(format!("output: {output:?} is not UTF-8")))?;
        self.call_value(&HelperRequest::Debootstrap {
            suite: owned(suite),
            mirror: owned(mirror),
            packages: packages.to_vec(),
            output: owned(output),
        })
        .await
    }
}

/// A helper error as the [`NetError`] a [`NetOps`] caller expects: a failed "command"
/// `banger-helper <Op>` whose status is the error code and whose stderr is the message.
fn net_error(op: &'static str, target: String, e: HelperError) -> NetError {
    let cmd = format!("banger-helper {op}");
    let source = match e {
        HelperError::Io { source, .. } => RunError::Spawn { cmd, source },
        other => RunError::Failed {
            cmd,
            status: other.code().to_string(),
            stderr: other.message(),
        },
    };
    NetError::Command { op, target, source }
}

#[async_trait::async_trait]
impl NetOps for HelperClient {
    async fn ensure_bridge(
        &self,
        bridge: &BridgeName,
        gateway: Ipv4Addr,
        prefix: u8,
    ) -> Result<(), NetError> {
        HelperClient::ensure_bridge(self, bridge, gateway, prefix)
            .await
            .map_err(|e| net_error("EnsureBridge", bridge.to_string(), e))
    }

    async fn create_tap(
        &self,
        tap: &TapName,
        bridge: &BridgeName,
        owner_uid: Option<u32>,
    ) -> Result<(), NetError> {
        HelperClient::create_tap(self, tap, bridge, owner_uid)
            .await
            .map_err(|e| net_error("CreateTap", tap.to_string(), e))
    }

    async fn delete_tap(&self, tap: &TapName) -> Result<(), NetError> {
        HelperClient::delete_tap(self, tap)
            .await
            .map_err(|e| net_error("DeleteTap", tap.to_string(), e))
    }

    async fn list_taps(&self) -> Result<Vec<TapName>, NetError> {
        HelperClient::list_taps(self)
            .await
            .map_err(|e| net_error("ListTaps", "interfaces".into(), e))
    }

    async fn ensure_nat(&self, bridge: &BridgeName, cidr: &Ipv4Cidr) -> Result<(), NetError> {
        HelperClient::ensure_nat(self, bridge, cidr)
            .await
            .map_err(|e| net_error("EnsureNat", format!("{bridge} {cidr}"), e))
    }

    async fn add_vm_nat(&self, vm_id: &str, ip: Ipv4Addr, tap: &TapName) -> Result<(), NetError> {
        HelperClient::add_vm_nat(self, vm_id, ip, tap)
            .await
            .map_err(|e| net_error("AddVmNat", vm_id.to_string(), e))
    }

    async fn remove_vm_nat(&self, vm_id: &str) -> Result<(), NetError> {
        HelperClient::remove_vm_nat(self, vm_id)
            .await
            .map_err(|e| net_error("RemoveVmNat", vm_id.to_string(), e))
    }

    async fn list_nat_vms(&self) -> Result<Vec<String>, NetError> {
        HelperClient::list_nat_vms(self)
            .await
            .map_err(|e| net_error("ListNatVms", "banger".into(), e))
    }

    async fn forget_neighbor(&self, bridge: &BridgeName, ip: Ipv4Addr) -> Result<(), NetError> {
        HelperClient::forget_neighbor(self, bridge, ip)
            .await
            .map_err(|e| net_error("ForgetNeighbor", ip.to_string(), e))
    }

    /// Always `Some`: through the helper the tap comes back open, so the VMM (running as the
    /// owner) needs no access to `/dev/net/tun`.
    async fn open_tap(&self, tap: &TapName) -> Result<Option<OwnedFd>, NetError> {
        HelperClient::open_tap(self, tap)
            .await
            .map(Some)
            .map_err(|e| net_error("OpenTap", tap.to_string(), e))
    }

    async fn remove_all(&self, bridge: Option<&BridgeName>) -> Result<(), NetError> {
        HelperClient::remove_all(self, bridge).await.map_err(|e| {
            net_error(
                "RemoveAll",
                bridge.map_or_else(|| "banger".to_string(), |b| b.to_string()),
                e,
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_absent_helper_is_an_io_error_naming_the_socket() {
        let d = tempfile::tempdir().unwrap();
        let c = HelperClient::new(d.path().join("nope.sock"));
        let e = c.ping().await.unwrap_err();
        assert!(matches!(e, HelperError::Io { .. }), "{e:?}");
        assert!(e.to_string().contains("nope.sock"), "{e}");
        let n = NetOps::list_taps(&c).await.unwrap_err();
        assert!(n.to_string().contains("banger-helper ListTaps"), "{n}");
    }

    #[test]
    fn op_ids_are_generated_or_given() {
        let a = HelperClient::new("/x");
        let b = HelperClient::new("/x");
        assert_ne!(a.op_id, b.op_id);
        assert!(a.op_id.as_str().starts_with("op-"));
        let id = OpId::from_client("op-mine").unwrap();
        assert_eq!(a.with_op_id(id.clone()).op_id, id);
    }

    #[test]
    fn helper_refusals_keep_code_and_message_as_net_errors() {
        let e = net_error(
            "CreateTap",
            "bgt1".into(),
            HelperError::forbidden("owner_uid: uid 5 is not the owner (uid 1000)"),
        );
        let s = e.to_string();
        assert!(
            s.contains("bgt1") && s.contains("forbidden") && s.contains("uid 5"),
            "{s}"
        );
    }
}
