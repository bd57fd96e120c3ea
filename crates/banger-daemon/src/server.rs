//! The protocol server: one request per connection on a 0600 Unix socket.
//!
//! Each request runs in its own task under a tracing span carrying its `op_id`, so every log
//! line of the request names it. The connection is watched while the request runs: a client
//! that goes away cancels the request (which undoes what it had done, see the start pipeline).

use std::sync::Arc;
use std::time::Instant;

use banger_core::{ErrorCode, OpId};
use banger_protocol::{
    DaemonStatus, Frame, ImageList, KernelList, MAX_REQUEST_BYTES, PROTOCOL_VERSION, Rejection,
    Removed, Request, VmList, decode_request,
};
use banger_store::Store;
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, warn};

use crate::engine::{Engine, ReconcileReport};
use crate::error::{OpError, OpResult};
use crate::progress::{OpCtx, Progress};

/// The daemon's shared state.
#[derive(Debug)]
pub struct Daemon {
    pub engine: Engine,
    pub started: Instant,
    pub shutdown: CancellationToken,
    pub reconcile: ReconcileReport,
    pub log_file: std::path::PathBuf,
    /// The `<name>.vm` responder's state, fixed at start-up.
    pub dns: banger_protocol::DnsStatus,
}

/// Serves until `daemon.shutdown` is cancelled, then gives requests in flight up to `grace` to
/// finish and answer (the `daemon.shutdown` request itself among them).
pub async fn serve(listener: UnixListener, daemon: Arc<Daemon>, grace: std::time::Duration) {
    let tracker = tokio_util::task::TaskTracker::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tracker.spawn(handle_connection(stream, daemon.clone()));
                }
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            _ = daemon.shutdown.cancelled() => break,
        }
    }
    drop(listener);
    tracker.close();
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        warn!("requests still running after {grace:?}; exiting anyway");
    }
}

enum LineError {
    TooLong,
    Io(std::io::Error),
}

async fn read_request_line(
    reader: &mut BufReader<tokio::net::unix::OwnedReadHalf>,
) -> Result<Option<Vec<u8>>, LineError> {
    let mut buf = Vec::new();
    let n = (&mut *reader)
        .take(MAX_REQUEST_BYTES as u64 + 1)
        .read_until(b'\n', &mut buf)
        .await
        .map_err(LineError::Io)?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
    } else if buf.len() > MAX_REQUEST_BYTES {
        return Err(LineError::TooLong);
    }
    Ok(Some(buf))
}

async fn write_frame(
    w: &mut tokio::net::unix::OwnedWriteHalf,
    frame: &Frame,
) -> std::io::Result<()> {
    w.write_all(frame.to_line().as_bytes()).await
}

async fn handle_connection(stream: UnixStream, daemon: Arc<Daemon>) {
    let (rd, mut wr) = stream.into_split();
    let mut reader = BufReader::new(rd);
    let line = match read_request_line(&mut reader).await {
        Ok(Some(l)) => l,
        Ok(None) => return,
        Err(LineError::TooLong) => {
            let op_id = OpId::generate();
            warn!(%op_id, "request line too long");
            let _ = write_frame(
                &mut wr,
                &Frame::Error {
                    op_id,
                    code: ErrorCode::BadRequest,
                    message: format!("request line longer than {MAX_REQUEST_BYTES} bytes"),
                },
            )
            .await;
            return;
        }
        Err(LineError::Io(e)) => {
            warn!(error = %e, "reading request failed");
            return;
        }
    };
    let (op_id, request) = match decode_request(&line) {
        Ok(x) => x,
        Err(Rejection {
            op_id,
            code,
            message,
        }) => {
            warn!(%op_id, %code, %message, "request rejected");
            let _ = write_frame(
                &mut wr,
                &Frame::Error {
                    op_id,
                    code,
                    message,
                },
            )
            .await;
            return;
        }
    };

    let (tx, mut rx) = mpsc::unbounded_channel::<Frame>();
    let cancel = CancellationToken::new();
    let span = tracing::info_span!("op", op_id = %op_id, method = request.method());
    // Helper calls made for this request carry its op id (the helper logs it).
    let scoped = banger_helper::client::scope_op_id(
        op_id.clone(),
        run_request(daemon, op_id, request, tx, cancel.clone()),
    );
    tokio::spawn(scoped.instrument(span));

    // Anything the client sends after its request, or its EOF, means it is gone or confused:
    // either way, the request is cancelled.
    let client_gone = async move {
        let mut byte = [0u8; 1];
        let _ = reader.read(&mut byte).await;
    };
    tokio::pin!(client_gone);
    loop {
        tokio::select! {
            frame = rx.recv() => match frame {
                Some(f) => {
                    let last = f.is_final();
                    if write_frame(&mut wr, &f).await.is_err() {
                        cancel.cancel();
                        break;
                    }
                    if last {
                        break;
                    }
                }
                None => break,
            },
            _ = &mut client_gone => {
                cancel.cancel();
                break;
            }
        }
    }
}

struct ChannelProgress {
    op_id: OpId,
    tx: mpsc::UnboundedSender<Frame>,
}

impl Progress for ChannelProgress {
    fn stage(&self, stage: &str, detail: Option<String>) {
        info!(stage, detail = detail.as_deref().unwrap_or(""), "progress");
        let _ = self.tx.send(Frame::Progress {
            op_id: self.op_id.clone(),
            stage: stage.to_string(),
            detail,
        });
    }

    fn warn(&self, message: String) {
        warn!(%message, "warning");
        let _ = self.tx.send(Frame::Warning {
            op_id: self.op_id.clone(),
            message,
        });
    }
}

async fn run_request(
    daemon: Arc<Daemon>,
    op_id: OpId,
    request: Request,
    tx: mpsc::UnboundedSender<Frame>,
    cancel: CancellationToken,
) {
    let started = Instant::now();
    info!("request");
    let progress = ChannelProgress {
        op_id: op_id.clone(),
        tx: tx.clone(),
    };
    let mut ctx = OpCtx::new(op_id.clone(), &progress);
    ctx.cancel = cancel;
    let frame = match dispatch(&daemon, request, &ctx).await {
        Ok(result) => {
            info!(elapsed_ms = started.elapsed().as_millis() as u64, "ok");
            Frame::Result { op_id, result }
        }
        Err(OpError { code, message }) => {
            warn!(%code, %message, elapsed_ms = started.elapsed().as_millis() as u64, "failed");
            Frame::Error {
                op_id,
                code,
                message,
            }
        }
    };
    let _ = tx.send(frame);
}

fn json<T: Serialize>(v: T) -> OpResult<serde_json::Value> {
    serde_json::to_value(v).map_err(|e| OpError::failed(format!("encoding result: {e}")))
}

/// The one place a request becomes an engine call: an exhaustive match over the protocol enum.
async fn dispatch(
    daemon: &Daemon,
    request: Request,
    ctx: &OpCtx<'_>,
) -> OpResult<serde_json::Value> {
    let e = &daemon.engine;
    match request {
        Request::Ping => json(serde_json::json!({"pong": true, "protocol": PROTOCOL_VERSION})),
        Request::DaemonStatus => json(status(daemon)?),
        Request::DaemonShutdown => {
            info!("shutdown requested; VMs keep running");
            daemon.shutdown.cancel();
            json(serde_json::json!({"stopping": true}))
        }
        Request::DaemonLeaks => json(crate::leaks::host_report(e).await),
        Request::VmCreate(p) => json(e.create(p, ctx).await?),
        Request::VmStart(p) => json(e.start(&p.vm, ctx).await?),
        Request::VmStop(p) => json(e.stop(&p.vm, p.timeout_secs, ctx).await?),
        Request::VmRestart(p) => json(e.restart(&p.vm, p.timeout_secs, ctx).await?),
        Request::VmKill(p) => json(e.kill(&p.vm, p.signal.as_deref(), ctx).await?),
        Request::VmDelete(p) => json(e.delete(&p.vm, p.force, ctx).await?),
        Request::VmPrune => json(Removed {
            removed: e.prune(ctx).await?,
        }),
        Request::VmList => json(VmList {
            vms: e.store().list_vms()?,
        }),
        Request::VmShow(p) => json(e.show(&p.vm).await?),
        Request::VmSet(p) => json(e.set(&p.vm, p.vcpu, p.memory_mib).await?),
        Request::VmLogs(p) => json(e.logs(&p.vm, p.lines)?),
        Request::VmSshInfo(p) => json(e.ssh_info(&p.vm)?),
        Request::VmWorkspaceSet(p) => json(e.workspace_set(&p.vm, p.workspace).await?),
        Request::ImageBuild(p) => {
            let suite = p.suite.unwrap_or_else(|| "bookworm".to_string());
            let name = p.name.unwrap_or_else(|| format!("debian-{suite}"));
            json(e.image_build(&name, &suite, ctx).await?)
        }
        Request::ImageImport(p) => json(
            e.image_import(p.name.as_deref(), &p.source, p.kernel, ctx)
                .await?,
        ),
        Request::ImagePull(p) => json(e.image_pull(p, ctx).await?),
        Request::ImageExport(p) => json(serde_json::json!({
            "path": p.output,
            "bytes": e.image_export(&p.name, &p.output, ctx).await?,
        })),
        Request::ImageCachePrune(p) => json(e.image_cache_prune(p.dry_run).await?),
        Request::KernelPull(p) => json(e.kernel_pull(&p.name, ctx).await?),
        Request::KernelBuild(p) => json(e.kernel_build(p.name.as_deref(), ctx).await?),
        Request::ImageRegister(p) => json(e.image_register(&p.name, &p.rootfs, p.kernel).await?),
        Request::ImageList => json(ImageList {
            images: e.store().list_images()?,
        }),
        Request::ImageShow(p) => json(
            e.store()
                .get_image(&p.name)?
                .ok_or_else(|| OpError::not_found("image", &p.name))?,
        ),
        Request::ImageDelete(p) => json(e.image_delete(&p.name, p.force).await?),
        Request::KernelImport(p) => json(e.kernel_import(&p.name, &p.dir).await?),
        Request::KernelList => json(KernelList {
            kernels: e.store().list_kernels()?,
        }),
        Request::KernelShow(p) => json(
            e.store()
                .get_kernel(&p.name)?
                .ok_or_else(|| OpError::not_found("kernel", &p.name))?,
        ),
        Request::KernelDelete(p) => json(e.kernel_delete(&p.name).await?),
    }
}

fn status(daemon: &Daemon) -> OpResult<DaemonStatus> {
    let store: &Store = daemon.engine.store();
    let vms = store.list_vms()?;
    Ok(DaemonStatus {
        version: env!("CARGO_PKG_VERSION").to_string(),
        protocol: PROTOCOL_VERSION,
        pid: std::process::id(),
        socket: daemon.engine.layout().socket(),
        state_dir: daemon.engine.layout().state_dir.clone(),
        log_file: daemon.log_file.clone(),
        vmm: match daemon.engine.config().vmm {
            banger_config::VmmChoice::Auto => format!("auto: {}", crate::vmms::describe_auto()),
            other => other.as_str().to_string(),
        },
        vms_total: vms.len(),
        vms_running: vms
            .iter()
            .filter(|v| v.state == banger_core::VmState::Running)
            .count(),
        uptime_secs: daemon.started.elapsed().as_secs(),
        ssh_config: Some(crate::dns::ssh_config_path(daemon.engine.layout())),
        dns: Some(daemon.dns.clone()),
    })
}
