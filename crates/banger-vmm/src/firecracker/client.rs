//! A typed client for Firecracker's HTTP API over its Unix socket.
//!
//! The request and response types mirror the Firecracker v1.16.1 API spec field for field. Every
//! optional field is skipped when `None`, because Firecracker rejects `null` where it expects a
//! value. One connection is opened per request: the API is used a handful of times per VM
//! lifecycle, and a fresh connection can never be left in a half-read state by a timed-out call.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::UnixStream;

use crate::VmmError;

/// How long one API call (connect, request, full response) may take by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// `BootSource`: the kernel, initrd and command line. Pre-boot only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootSource {
    pub kernel_image_path: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
}

/// `CpuTemplate` (deprecated upstream, kept for completeness).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CpuTemplate {
    C3,
    T2,
    T2S,
    T2CL,
    T2A,
    V1N1,
    None,
}

/// `MachineConfiguration.huge_pages`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HugePages {
    None,
    #[serde(rename = "2M")]
    TwoMiB,
}

/// `MachineConfiguration`: vCPUs, memory and CPU features. Pre-boot only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineConfiguration {
    pub vcpu_count: u32,
    pub mem_size_mib: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smt: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub track_dirty_pages: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<CpuTemplate>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<HugePages>,
}

/// `TokenBucket` of a rate limiter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenBucket {
    pub size: i64,
    pub refill_time: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_time_burst: Option<i64>,
}

/// `RateLimiter`: independent bandwidth and ops buckets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimiter {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<TokenBucket>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<TokenBucket>,
}

/// `Drive.cache_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CacheType {
    Unsafe,
    Writeback,
}

/// `Drive.io_engine`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum IoEngine {
    Sync,
    Async,
}

/// `Drive`: a virtio-block (or vhost-user-block) device. Pre-boot only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drive {
    pub drive_id: String,
    pub is_root_device: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_type: Option<CacheType>,
    /// Required for virtio-block, omitted for vhost-user-block.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_read_only: Option<bool>,
    /// Required for virtio-block, omitted for vhost-user-block.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_engine: Option<IoEngine>,
    /// vhost-user-block backend socket; omitted for virtio-block.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
}

/// `NetworkInterface`: a virtio-net device backed by a host tap. Pre-boot only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkInterface {
    pub iface_id: String,
    pub host_dev_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiter>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiter>,
}

/// `Vsock`: a virtio-vsock device whose host side is the Unix socket `uds_path`. Pre-boot only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vsock {
    pub guest_cid: u32,
    pub uds_path: PathBuf,
    /// Deprecated upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_id: Option<String>,
}

/// `InstanceActionInfo.action_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActionType {
    FlushMetrics,
    InstanceStart,
    SendCtrlAltDel,
}

/// `InstanceActionInfo`: the body of `PUT /actions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceActionInfo {
    pub action_type: ActionType,
}

/// `Vm.state`: the state requested with `PATCH /vm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmRunState {
    Paused,
    Resumed,
}

/// `Vm`: the body of `PATCH /vm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vm {
    pub state: VmRunState,
}

/// `SnapshotCreateParams.snapshot_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotType {
    Full,
    Diff,
}

/// `SnapshotCreateParams`: the body of `PUT /snapshot/create` (the VM must be paused).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotCreateParams {
    pub mem_file_path: PathBuf,
    pub snapshot_path: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_type: Option<SnapshotType>,
}

/// `MemoryBackend.backend_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemoryBackendType {
    File,
    Uffd,
}

/// `MemoryBackend`: where a restored VM's memory comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryBackend {
    pub backend_type: MemoryBackendType,
    pub backend_path: PathBuf,
}

/// `NetworkOverride`: a new tap for an interface of a restored VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkOverride {
    pub iface_id: String,
    pub host_dev_name: String,
}

/// `VsockOverride`: a new host socket for the vsock device of a restored VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockOverride {
    pub uds_path: PathBuf,
}

/// `SnapshotLoadParams`: the body of `PUT /snapshot/load`. Exactly one of `mem_file_path` and
/// `mem_backend` must be set.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SnapshotLoadParams {
    pub snapshot_path: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_file_path: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_backend: Option<MemoryBackend>,
    /// Deprecated upstream in favour of `track_dirty_pages`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enable_diff_snapshots: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub track_dirty_pages: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume_vm: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_overrides: Option<Vec<NetworkOverride>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_override: Option<VsockOverride>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock_realtime: Option<bool>,
}

/// `InstanceInfo.state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum InstanceState {
    #[serde(rename = "Not started")]
    NotStarted,
    Running,
    Paused,
}

/// `InstanceInfo`: the answer of `GET /`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceInfo {
    pub app_name: String,
    pub id: String,
    pub state: InstanceState,
    pub vmm_version: String,
}

/// `FirecrackerVersion`: the answer of `GET /version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirecrackerVersion {
    pub firecracker_version: String,
}

/// `Error`: the body of every non-2xx answer.
#[derive(Debug, Clone, Default, Deserialize)]
struct ApiErrorBody {
    #[serde(default)]
    fault_message: Option<String>,
}

/// A client for one Firecracker instance's API socket.
#[derive(Debug, Clone)]
pub struct FirecrackerClient {
    socket: PathBuf,
    timeout: Duration,
}

impl FirecrackerClient {
    /// A client for the API socket at `socket`, with the [`DEFAULT_TIMEOUT`] per request.
    pub fn new(socket: PathBuf) -> Self {
        FirecrackerClient {
            socket,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// The same client with another per-request timeout (snapshots of large guests take longer
    /// than the default).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// `PUT /machine-config`.
    pub async fn put_machine_config(&self, config: &MachineConfiguration) -> Result<(), VmmError> {
        self.send_json(Method::PUT, "/machine-config", config).await
    }

    /// `PUT /boot-source`.
    pub async fn put_boot_source(&self, source: &BootSource) -> Result<(), VmmError> {
        self.send_json(Method::PUT, "/boot-source", source).await
    }

    /// `PUT /drives/{drive_id}`, the id taken from `drive.drive_id`.
    pub async fn put_drive(&self, drive: &Drive) -> Result<(), VmmError> {
        check_path_id("drive_id", &drive.drive_id)?;
        let path = format!("/drives/{}", drive.drive_id);
        self.send_json(Method::PUT, &path, drive).await
    }

    /// `PUT /network-interfaces/{iface_id}`, the id taken from `iface.iface_id`.
    pub async fn put_network_interface(&self, iface: &NetworkInterface) -> Result<(), VmmError> {
        check_path_id("iface_id", &iface.iface_id)?;
        let path = format!("/network-interfaces/{}", iface.iface_id);
        self.send_json(Method::PUT, &path, iface).await
    }

    /// `PUT /vsock`.
    pub async fn put_vsock(&self, vsock: &Vsock) -> Result<(), VmmError> {
        self.send_json(Method::PUT, "/vsock", vsock).await
    }

    /// `PUT /actions`.
    pub async fn action(&self, action_type: ActionType) -> Result<(), VmmError> {
        self.send_json(Method::PUT, "/actions", &InstanceActionInfo { action_type })
            .await
    }

    /// `PATCH /vm` with state `Paused`.
    pub async fn pause(&self) -> Result<(), VmmError> {
        let body = Vm {
            state: VmRunState::Paused,
        };
        self.send_json(Method::PATCH, "/vm", &body).await
    }

    /// `PATCH /vm` with state `Resumed`.
    pub async fn resume(&self) -> Result<(), VmmError> {
        let body = Vm {
            state: VmRunState::Resumed,
        };
        self.send_json(Method::PATCH, "/vm", &body).await
    }

    /// `PUT /snapshot/create`.
    pub async fn create_snapshot(&self, params: &SnapshotCreateParams) -> Result<(), VmmError> {
        self.send_json(Method::PUT, "/snapshot/create", params)
            .await
    }

    /// `PUT /snapshot/load`.
    pub async fn load_snapshot(&self, params: &SnapshotLoadParams) -> Result<(), VmmError> {
        self.send_json(Method::PUT, "/snapshot/load", params).await
    }

    /// `GET /`.
    pub async fn instance_info(&self) -> Result<InstanceInfo, VmmError> {
        self.get_json("/").await
    }

    /// `GET /version`.
    pub async fn version(&self) -> Result<FirecrackerVersion, VmmError> {
        self.get_json("/version").await
    }

    async fn send_json<T: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: &T,
    ) -> Result<(), VmmError> {
        let json = serde_json::to_vec(body).map_err(|e| self.transport(&method, path, e))?;
        self.request(method, path, Some(json)).await.map(drop)
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, VmmError> {
        let body = self.request(Method::GET, path, None).await?;
        serde_json::from_slice(&body).map_err(|e| {
            self.transport(
                &Method::GET,
                path,
                format!(
                    "unexpected answer {:?}: {e}",
                    String::from_utf8_lossy(&body)
                ),
            )
        })
    }

    /// Sends one request on a fresh connection and returns the body of a 2xx answer.
    async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Bytes, VmmError> {
        match tokio::time::timeout(self.timeout, self.exchange(&method, path, body)).await {
            Ok(result) => result,
            Err(_) => Err(self.transport(
                &method,
                path,
                format!("no answer within {:?}", self.timeout),
            )),
        }
    }

    async fn exchange(
        &self,
        method: &Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Bytes, VmmError> {
        let stream = UnixStream::connect(&self.socket)
            .await
            .map_err(|e| self.transport(method, path, format!("connect: {e}")))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| self.transport(method, path, format!("handshake: {e}")))?;

        let mut builder = Request::builder()
            .method(method.clone())
            .uri(path)
            .header(header::HOST, "localhost")
            .header(header::ACCEPT, "application/json");
        if body.is_some() {
            builder = builder.header(header::CONTENT_TYPE, "application/json");
        }
        let request = builder
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| self.transport(method, path, format!("building request: {e}")))?;

        // The connection future must be polled while the request runs; joining (rather than
        // spawning) it keeps everything under the caller's timeout. Moving `sender` into the
        // exchange drops it at the end, which lets the connection close.
        let exchange = async move {
            let response = sender.send_request(request).await?;
            let status = response.status();
            let body = response.into_body().collect().await?.to_bytes();
            Ok::<_, hyper::Error>((status, body))
        };
        let (result, _conn) = tokio::join!(exchange, conn);
        let (status, body) = result.map_err(|e| self.transport(method, path, e))?;

        if status.is_success() {
            Ok(body)
        } else {
            Err(VmmError::Api {
                method: method.to_string(),
                path: path.to_string(),
                status: status.as_u16(),
                message: fault_message(status, &body),
            })
        }
    }

    fn transport(&self, method: &Method, path: &str, reason: impl ToString) -> VmmError {
        VmmError::Transport {
            method: method.to_string(),
            path: path.to_string(),
            socket: self.socket.clone(),
            reason: reason.to_string(),
        }
    }
}

/// The `fault_message` of an error answer, else its raw body, else the status's reason phrase.
fn fault_message(status: StatusCode, body: &[u8]) -> String {
    if let Ok(ApiErrorBody {
        fault_message: Some(message),
    }) = serde_json::from_slice(body)
    {
        return message;
    }
    let text = String::from_utf8_lossy(body).trim().to_string();
    if !text.is_empty() {
        return text;
    }
    status
        .canonical_reason()
        .unwrap_or("no error message")
        .to_string()
}

/// Ids that end up in a request path must be non-empty `[A-Za-z0-9_]`, so they cannot change
/// the path or need escaping.
fn check_path_id(what: &str, id: &str) -> Result<(), VmmError> {
    if is_valid_id(id) {
        Ok(())
    } else {
        Err(VmmError::Spec(format!(
            "{what} {id:?} must be non-empty and use only A-Z, a-z, 0-9 and _"
        )))
    }
}

/// Whether `id` is a valid Firecracker drive or interface id: `[A-Za-z0-9_]+`.
pub fn is_valid_id(id: &str) -> bool {
    !id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn optional_fields_are_omitted_not_null() {
        let boot = BootSource {
            kernel_image_path: "/k".into(),
            initrd_path: None,
            boot_args: Some("console=ttyS0".into()),
        };
        assert_eq!(
            serde_json::to_value(&boot).unwrap(),
            json!({"kernel_image_path": "/k", "boot_args": "console=ttyS0"})
        );
        let drive = Drive {
            drive_id: "root".into(),
            is_root_device: false,
            partuuid: None,
            cache_type: None,
            is_read_only: Some(true),
            path_on_host: Some("/img".into()),
            rate_limiter: None,
            io_engine: None,
            socket: None,
        };
        assert_eq!(
            serde_json::to_value(&drive).unwrap(),
            json!({"drive_id": "root", "is_root_device": false, "is_read_only": true,
                   "path_on_host": "/img"})
        );
        let load = SnapshotLoadParams {
            snapshot_path: "/s".into(),
            mem_backend: Some(MemoryBackend {
                backend_type: MemoryBackendType::File,
                backend_path: "/m".into(),
            }),
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_value(&load).unwrap(),
            json!({"snapshot_path": "/s",
                   "mem_backend": {"backend_type": "File", "backend_path": "/m"}})
        );
    }

    #[test]
    fn enums_use_the_spec_spelling() {
        assert_eq!(
            serde_json::to_value(InstanceActionInfo {
                action_type: ActionType::SendCtrlAltDel
            })
            .unwrap(),
            json!({"action_type": "SendCtrlAltDel"})
        );
        assert_eq!(
            serde_json::to_value(Vm {
                state: VmRunState::Paused
            })
            .unwrap(),
            json!({"state": "Paused"})
        );
        assert_eq!(
            serde_json::to_value(HugePages::TwoMiB).unwrap(),
            json!("2M")
        );
        let info: InstanceInfo = serde_json::from_value(json!({
            "app_name": "Firecracker", "id": "abc", "state": "Not started",
            "vmm_version": "1.16.1"
        }))
        .unwrap();
        assert_eq!(info.state, InstanceState::NotStarted);
    }

    #[test]
    fn machine_config_and_net_shapes() {
        let mc = MachineConfiguration {
            vcpu_count: 2,
            mem_size_mib: 1024,
            smt: Some(false),
            track_dirty_pages: None,
            cpu_template: None,
            huge_pages: None,
        };
        assert_eq!(
            serde_json::to_value(&mc).unwrap(),
            json!({"vcpu_count": 2, "mem_size_mib": 1024, "smt": false})
        );
        let net = NetworkInterface {
            iface_id: "eth0".into(),
            host_dev_name: "tap0".into(),
            guest_mac: Some("06:00:00:00:00:01".into()),
            mtu: None,
            rx_rate_limiter: None,
            tx_rate_limiter: None,
        };
        assert_eq!(
            serde_json::to_value(&net).unwrap(),
            json!({"iface_id": "eth0", "host_dev_name": "tap0",
                   "guest_mac": "06:00:00:00:00:01"})
        );
    }

    #[test]
    fn fault_message_falls_back_to_body_then_reason() {
        assert_eq!(
            fault_message(StatusCode::BAD_REQUEST, br#"{"fault_message":"bad drive"}"#),
            "bad drive"
        );
        assert_eq!(
            fault_message(StatusCode::BAD_REQUEST, b"plain text"),
            "plain text"
        );
        assert_eq!(
            fault_message(StatusCode::INTERNAL_SERVER_ERROR, b""),
            "Internal Server Error"
        );
    }

    #[test]
    fn ids_are_checked() {
        assert!(is_valid_id("rootfs_1"));
        assert!(is_valid_id("Work"));
        assert!(!is_valid_id(""));
        assert!(!is_valid_id("a/b"));
        assert!(!is_valid_id("a-b"));
        assert!(!is_valid_id("a b"));
    }

    #[tokio::test]
    async fn a_missing_socket_is_a_transport_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("nope.sock");
        let err = FirecrackerClient::new(sock.clone())
            .instance_info()
            .await
            .unwrap_err();
        match &err {
            VmmError::Transport {
                method,
                path,
                socket,
                ..
            } => {
                assert_eq!(method, "GET");
                assert_eq!(path, "/");
                assert_eq!(socket, &sock);
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(err.to_string().contains("nope.sock"), "{err}");
    }

    #[tokio::test]
    async fn a_silent_server_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("silent.sock");
        // Accepts connections but never answers.
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        let server = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        let err = FirecrackerClient::new(sock)
            .with_timeout(Duration::from_millis(100))
            .version()
            .await
            .unwrap_err();
        assert!(err.to_string().contains("no answer within"), "{err}");
        server.abort();
    }

    /// Serves one connection: records the raw request, answers with `response`.
    async fn one_shot_server(
        sock: &Path,
        response: &'static str,
    ) -> tokio::task::JoinHandle<String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::UnixListener::bind(sock).unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut raw = Vec::new();
            let mut buf = [0u8; 4096];
            // Read headers, then Content-Length bytes of body.
            loop {
                let n = stream.read(&mut buf).await.unwrap();
                raw.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&raw).to_string();
                if let Some(end) = text.find("\r\n\r\n") {
                    let len = text
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse::<usize>().unwrap())
                        })
                        .unwrap_or(0);
                    if raw.len() >= end + 4 + len {
                        break;
                    }
                }
                assert!(n > 0, "client closed early");
            }
            stream.write_all(response.as_bytes()).await.unwrap();
            stream.shutdown().await.unwrap();
            String::from_utf8(raw).unwrap()
        })
    }

    #[tokio::test]
    async fn sends_the_request_the_spec_describes() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("fc.sock");
        let server = one_shot_server(&sock, "HTTP/1.1 204 No Content\r\n\r\n").await;
        FirecrackerClient::new(sock)
            .put_drive(&Drive {
                drive_id: "work_1".into(),
                is_root_device: false,
                partuuid: None,
                cache_type: None,
                is_read_only: Some(false),
                path_on_host: Some("/w.ext4".into()),
                rate_limiter: None,
                io_engine: None,
                socket: None,
            })
            .await
            .unwrap();
        let raw = server.await.unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        assert!(
            head.starts_with("PUT /drives/work_1 HTTP/1.1\r\n"),
            "{head}"
        );
        let head = head.to_ascii_lowercase();
        assert!(head.contains("content-type: application/json"), "{head}");
        assert!(head.contains("host: localhost"), "{head}");
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(body).unwrap(),
            json!({"drive_id": "work_1", "is_root_device": false, "is_read_only": false,
                   "path_on_host": "/w.ext4"})
        );
    }

    #[tokio::test]
    async fn pause_is_a_patch_of_vm() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("fc.sock");
        let server = one_shot_server(&sock, "HTTP/1.1 204 No Content\r\n\r\n").await;
        FirecrackerClient::new(sock).pause().await.unwrap();
        let raw = server.await.unwrap();
        assert!(raw.starts_with("PATCH /vm HTTP/1.1\r\n"), "{raw}");
        assert!(raw.ends_with(r#"{"state":"Paused"}"#), "{raw}");
    }

    #[tokio::test]
    async fn error_answers_carry_the_fault_message() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("fc.sock");
        let _server = one_shot_server(
            &sock,
            "HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n\
             Content-Length: 35\r\n\r\n{\"fault_message\": \"Invalid kernel\"}",
        )
        .await;
        let err = FirecrackerClient::new(sock)
            .put_boot_source(&BootSource {
                kernel_image_path: "/k".into(),
                initrd_path: None,
                boot_args: None,
            })
            .await
            .unwrap_err();
        match &err {
            VmmError::Api {
                method,
                path,
                status,
                message,
            } => {
                assert_eq!((method.as_str(), path.as_str()), ("PUT", "/boot-source"));
                assert_eq!(*status, 400);
                assert_eq!(message, "Invalid kernel");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[tokio::test]
    async fn get_parses_the_answer() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("fc.sock");
        let _server = one_shot_server(
            &sock,
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
             Content-Length: 34\r\n\r\n{\"firecracker_version\": \"1.16.1\"}\n",
        )
        .await;
        let v = FirecrackerClient::new(sock).version().await.unwrap();
        assert_eq!(v.firecracker_version, "1.16.1");
    }
}
