//! The API server: HTTP/1.1 on a Unix socket, one [`Instance`] behind it, plus the test
//! controls (failure injection, recording, timed exits) read from the control file at every
//! request.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::UnixListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

use crate::cli::ServeArgs;
use crate::control::{self, CallInfo, Control, RecordedCall};
use crate::instance::{Event, Instance, Reply};
use crate::spec::{Spec, ValidationError};

/// Firecracker's default limit on an API request body.
pub const MAX_PAYLOAD_BYTES: usize = 51_200;
/// How long after a guest reboot request the process ends.
const REBOOT_EXIT_DELAY: Duration = Duration::from_millis(100);

/// Everything a serving fake needs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub api_sock: PathBuf,
    pub id: String,
    /// The version reported by the API, without the `v`.
    pub version: String,
    pub control_path: Option<PathBuf>,
    pub record_env: Option<PathBuf>,
}

impl ServerConfig {
    /// Builds the configuration from the command line and the `FAKE_FIRECRACKER_*` variables.
    pub fn from_env(args: ServeArgs) -> ServerConfig {
        ServerConfig {
            api_sock: args.api_sock,
            id: args.id,
            version: crate::cli::reported_version(),
            control_path: std::env::var_os(control::CONTROL_ENV).map(PathBuf::from),
            record_env: std::env::var_os(control::RECORD_ENV).map(PathBuf::from),
        }
    }

    fn control(&self) -> Result<Control, control::ControlError> {
        Control::load(self.control_path.as_deref(), self.record_env.as_deref())
    }
}

#[derive(Debug)]
struct Shared {
    cfg: ServerConfig,
    spec: Spec,
    instance: Mutex<Instance>,
    exit: mpsc::UnboundedSender<i32>,
    /// Held for the whole of one request: Firecracker's API thread hands each request to the
    /// VMM thread and waits for its answer before reading the next, so a slow InstanceStart
    /// delays every other call, `GET /` included.
    api: tokio::sync::Mutex<()>,
}

/// Serves until the process should end and returns its exit code: 0 on SIGTERM/SIGINT or a
/// guest reboot, 1 when the socket cannot be created or an injected crash fires.
pub async fn serve(cfg: ServerConfig) -> i32 {
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("fake-firecracker: installing signal handlers: {e}");
            return 1;
        }
    };

    let startup = cfg.control().unwrap_or_else(|e| {
        eprintln!("fake-firecracker: {e}; using defaults");
        Control::default()
    });
    if let Some(ms) = startup.socket_delay_ms {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(ms)) => {}
            _ = term.recv() => return 0,
            _ = int.recv() => return 0,
        }
    }

    // Binding fails on an existing path (EADDRINUSE), as Firecracker's does: it never removes a
    // stale socket, and neither does it remove its socket on exit.
    let listener = match UnixListener::bind(&cfg.api_sock) {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "Failed to open the API socket at: {}. Check that it is not already used: {e}",
                cfg.api_sock.display()
            );
            return 1;
        }
    };
    eprintln!(
        "fake-firecracker[{}]: Running Firecracker v{}, API on {}",
        cfg.id,
        cfg.version,
        cfg.api_sock.display()
    );

    let (exit_tx, mut exit_rx) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        instance: Mutex::new(Instance::new(cfg.id.clone(), cfg.version.clone())),
        spec: Spec::load(),
        cfg,
        exit: exit_tx,
        api: tokio::sync::Mutex::new(()),
    });

    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let shared = Arc::clone(&shared);
                    tokio::spawn(async move {
                        let svc = service_fn(move |req| {
                            let shared = Arc::clone(&shared);
                            async move { Ok::<_, Infallible>(handle(&shared, req).await) }
                        });
                        // A client hanging up mid-request is its own business.
                        let _ = http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), svc)
                            .await;
                    });
                }
                Err(e) => eprintln!("fake-firecracker: accepting an API connection: {e}"),
            },
            code = exit_rx.recv() => return code.unwrap_or(0),
            _ = term.recv() => return 0,
            _ = int.recv() => return 0,
        }
    }
}

async fn handle(shared: &Shared, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let method = req.method().as_str().to_string();
    let path = req.uri().path().to_string();
    let reply = {
        let _serialised = shared.api.lock().await;
        answer(shared, &method, req).await
    };
    let id = &shared.cfg.id;
    eprintln!(
        "fake-firecracker[{id}]: {method} {path} -> {}",
        reply.status
    );

    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::BAD_REQUEST);
    let builder = Response::builder().status(status);
    let response = match reply.body {
        Some(v) => builder
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(v.to_string()))),
        None => builder.body(Full::new(Bytes::new())),
    };
    // Only reachable with a malformed header, which the constants above rule out.
    response.unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

/// Runs one request through the controls, the spec and the instance, and records it.
async fn answer(shared: &Shared, method: &str, req: Request<Incoming>) -> Reply {
    let path = req.uri().path().to_string();
    let raw = match Limited::new(req.into_body(), MAX_PAYLOAD_BYTES)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(e) => {
            let reply = Reply::fault(
                413,
                format!(
                    "Request payload with size over {MAX_PAYLOAD_BYTES} bytes is larger than the \
                     limit allowed by server: {e}"
                ),
            );
            finish(
                shared,
                shared.cfg.control().ok().as_ref(),
                method,
                &path,
                &Value::Null,
                &reply,
            );
            return reply;
        }
    };

    let control = shared.cfg.control();
    let body: Option<Value> = if raw.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        match serde_json::from_slice(&raw) {
            Ok(v) => Some(v),
            Err(e) => {
                let reply = Reply::fault(
                    400,
                    format!("An error occurred when deserializing the json body of a request: {e}"),
                );
                let recorded = Value::String(String::from_utf8_lossy(&raw).into_owned());
                finish(
                    shared,
                    control.as_ref().ok(),
                    method,
                    &path,
                    &recorded,
                    &reply,
                );
                return reply;
            }
        }
    };
    let recorded = body.clone().unwrap_or(Value::Null);

    let control = match control {
        Ok(c) => c,
        Err(e) => {
            // A broken control file is a bug in the test; say so loudly instead of guessing.
            let reply = Reply::fault(500, format!("fake-firecracker: {e}"));
            finish(shared, None, method, &path, &recorded, &reply);
            return reply;
        }
    };

    let reply = match shared.spec.validate(method, &path, body.as_ref()) {
        Err(e) => Reply::fault(400, validation_message(&e)),
        Ok(matched) => {
            let action_type = (matched.operation.operation_id == "createSyncAction")
                .then(|| body.as_ref().and_then(|b| b["action_type"].as_str()))
                .flatten();
            let call = CallInfo {
                method,
                path: &path,
                template: Some(&matched.operation.template),
                action_type,
                vm_id: &shared.cfg.id,
            };
            if action_type == Some("InstanceStart")
                && let Some(ms) = control.instance_start_ms
            {
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            match control.failure_for(&call) {
                Some(rule) => Reply::fault(rule.status(), rule.message()),
                None => match shared.instance.lock() {
                    Ok(mut inst) => inst.handle(&matched, body.as_ref()),
                    Err(_) => Reply::fault(500, "fake-firecracker: instance state poisoned"),
                },
            }
        }
    };
    if let Some(event) = reply.event {
        schedule(shared, &control, event);
    }
    finish(shared, Some(&control), method, &path, &recorded, &reply);
    reply
}

fn validation_message(e: &ValidationError) -> String {
    match e {
        ValidationError::Body { .. } => {
            format!("An error occurred when deserializing the json body of a request: {e}")
        }
        _ => e.to_string(),
    }
}

/// Appends the call to the record file, if one is configured.
fn finish(
    shared: &Shared,
    control: Option<&Control>,
    method: &str,
    path: &str,
    body: &Value,
    reply: &Reply,
) {
    let Some(record) = control
        .and_then(|c| c.record.clone())
        .or_else(|| shared.cfg.record_env.clone())
    else {
        return;
    };
    let call = RecordedCall {
        id: shared.cfg.id.clone(),
        method: method.to_string(),
        path: path.to_string(),
        body: body.clone(),
        status: reply.status,
    };
    if let Err(e) = control::append_record(&record, &call) {
        eprintln!(
            "fake-firecracker[{}]: appending to record file {}: {e}",
            shared.cfg.id,
            record.display()
        );
    }
}

/// Turns an instance event into a timed process exit, as the control file says.
fn schedule(shared: &Shared, control: &Control, event: Event) {
    let (delay, code, message) = match event {
        Event::Started => match control.exit_after_start_ms {
            Some(ms) => (
                Duration::from_millis(ms),
                1,
                Some("fake-firecracker: guest crashed (injected)"),
            ),
            None => return,
        },
        Event::CtrlAltDel => {
            if control.ignore_ctrl_alt_del {
                return;
            }
            (REBOOT_EXIT_DELAY, 0, None)
        }
        Event::RestoreFailed => (
            REBOOT_EXIT_DELAY,
            1,
            Some("fake-firecracker: snapshot restore failed, the VMM cannot continue"),
        ),
    };
    let exit = shared.exit.clone();
    let id = shared.cfg.id.clone();
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        match message {
            Some(m) => eprintln!("{m}"),
            None => eprintln!("fake-firecracker[{id}]: guest rebooted, exiting"),
        }
        let _ = exit.send(code);
    });
}
