//! The helper's socket server.
//!
//! Each connection is checked with `SO_PEERCRED` before a single byte of it is read: only root
//! and the owner get further. Then requests are read one line at a time (at most
//! [`MAX_LINE`] bytes, at most [`ServeOptions::max_requests_per_connection`] of them), decoded,
//! checked, run and answered; every op, accepted or not, is logged as one line
//! `op_id=… uid=… op=… <args> result=ok|error: …`. A protocol error (bad JSON, version, op or
//! field, an oversized line) is answered and the connection closed; a refused or failed op is
//! answered and the connection stays usable.
//!
//! Ops run in their own task: a client that disconnects does not cut an op short (a tap created
//! but not yet attached to the bridge would be worse than a reply nobody reads), and a panic
//! (there should be none) becomes a `failed` reply instead of taking the helper down.

use std::os::fd::AsFd;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat};
use nix::sys::stat::{Mode, fstatat, mkdirat};
use nix::unistd::{Uid, UnlinkatFlags, fchownat, unlinkat};
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

use crate::config::HelperConfig;
use crate::error::HelperError;
use crate::exec::Helper;
use crate::fdpass::{read_line_with_fds, write_with_fd};
use crate::protocol::{MAX_LINE, Reply, decode_request};
use crate::safepath::{self, WalkError};
use crate::validate;

/// Limits of the server.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Connections handled at once; further ones wait in the listen backlog.
    pub max_connections: usize,
    /// Requests answered on one connection before it is closed.
    pub max_requests_per_connection: usize,
    /// How long a connection may sit without sending a complete request line.
    pub idle_timeout: Duration,
    /// How long a shutdown waits for ops in flight.
    pub shutdown_grace: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            max_connections: 32,
            max_requests_per_connection: 64,
            idle_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

/// The default socket mode: the owner (who owns the socket file) and root only.
pub const DEFAULT_SOCKET_MODE: u32 = 0o600;

fn io_failed(what: String, e: impl std::fmt::Display) -> HelperError {
    HelperError::failed(format!("{what}: {e}"))
}

/// Creates the helper's socket at `socket`, owned by the owner with `mode` (0600 in
/// production), and listens on it.
///
/// The directory is reached by the symlink-proof walk and held open; a stale socket there is
/// removed (anything else is left alone and refused); the socket is bound through
/// `/proc/self/fd/<dir>/<name>` and chowned/chmodded through an `O_PATH` descriptor of what
/// was bound, so a directory the owner can write to cannot redirect any of it. A missing last
/// directory is created: owner-owned 0700 when it is the runtime dir, else root's 0755.
pub fn bind(socket: &Path, cfg: &HelperConfig, mode: u32) -> Result<UnixListener, HelperError> {
    let s = socket
        .to_str()
        .ok_or_else(|| HelperError::bad_request(format!("socket: {socket:?} is not UTF-8")))?;
    let comps = validate::absolute_path("socket", s)?;
    let (name, parent) = comps
        .split_last()
        .ok_or_else(|| HelperError::bad_request("socket: \"/\" is not a socket path"))?;
    if name.len() > 64 {
        return Err(HelperError::bad_request(format!(
            "socket: file name {name:?} is longer than 64 bytes"
        )));
    }
    let owner = cfg.owner_uid;
    let forbid = |e: WalkError| HelperError::forbidden(format!("socket: {e}"));
    let dir = match safepath::walk_dir(parent, owner) {
        Ok(d) => d,
        Err(WalkError::Missing(p)) if p == safepath::join(parent) => {
            let (dname, grand) = parent
                .split_last()
                .ok_or_else(|| HelperError::failed("socket: / is missing?"))?;
            let gfd = safepath::walk_dir(grand, owner).map_err(forbid)?;
            let runtime = Path::new(&p) == cfg.runtime_dir;
            let m = if runtime { 0o700 } else { 0o755 };
            match mkdirat(&gfd, *dname, Mode::from_bits_truncate(m)) {
                Ok(()) | Err(Errno::EEXIST) => {}
                Err(e) => return Err(io_failed(format!("creating {p}"), e.desc())),
            }
            if runtime {
                fchownat(
                    &gfd,
                    *dname,
                    Some(Uid::from_raw(owner)),
                    None,
                    AtFlags::AT_SYMLINK_NOFOLLOW,
                )
                .map_err(|e| io_failed(format!("chowning {p}"), e.desc()))?;
            }
            safepath::walk_dir(parent, owner).map_err(forbid)?
        }
        Err(e) => return Err(forbid(e)),
    };
    match fstatat(&dir, *name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) if safepath::is_socket(&st) => {
            unlinkat(&dir, *name, UnlinkatFlags::NoRemoveDir)
                .map_err(|e| io_failed(format!("removing the stale socket {s}"), e.desc()))?;
        }
        Ok(st) => {
            return Err(HelperError::forbidden(format!(
                "socket: {s:?} exists and is a {}, not a stale socket; refusing to replace it",
                safepath::kind_name(&st)
            )));
        }
        Err(Errno::ENOENT) => {}
        Err(e) => return Err(io_failed(format!("checking {s}"), e.desc())),
    }
    let via = format!("{}/{name}", safepath::proc_path(&dir));
    let listener = std::os::unix::net::UnixListener::bind(&via)
        .map_err(|e| io_failed(format!("binding {s}"), e))?;
    let bound = openat(
        &dir,
        *name,
        OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| io_failed(format!("opening {s}"), e.desc()))?;
    let st =
        nix::sys::stat::fstat(&bound).map_err(|e| io_failed(format!("checking {s}"), e.desc()))?;
    if !safepath::is_socket(&st) {
        return Err(HelperError::forbidden(format!(
            "socket: {s:?} was replaced by a {} right after it was bound",
            safepath::kind_name(&st)
        )));
    }
    let handle = safepath::proc_path(&bound);
    std::os::unix::fs::chown(&handle, Some(owner), None)
        .map_err(|e| io_failed(format!("chowning {s}"), e))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&handle, std::fs::Permissions::from_mode(mode & 0o777))
        .map_err(|e| io_failed(format!("chmodding {s}"), e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| io_failed(format!("configuring {s}"), e))?;
    UnixListener::from_std(listener).map_err(|e| io_failed(format!("registering {s}"), e))
}

/// Serves until `shutdown` completes, then waits up to `shutdown_grace` for ops in flight.
pub async fn serve(
    listener: UnixListener,
    helper: Arc<Helper>,
    opts: ServeOptions,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(opts.max_connections));
    tokio::pin!(shutdown);
    loop {
        // Take a slot before accepting: when all are busy, new connections wait in the
        // kernel's backlog instead of piling up as tasks.
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = &mut shutdown => break,
        };
        match accepted {
            Ok((stream, _)) => {
                let helper = helper.clone();
                let opts = opts.clone();
                tokio::spawn(async move {
                    handle_connection(stream, helper, &opts).await;
                    drop(permit);
                });
            }
            Err(e) => {
                warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    drop(listener);
    let all = u32::try_from(opts.max_connections).unwrap_or(u32::MAX);
    if tokio::time::timeout(opts.shutdown_grace, slots.acquire_many(all))
        .await
        .is_err()
    {
        warn!(
            "ops still running after {:?}; exiting anyway",
            opts.shutdown_grace
        );
    }
}

/// Escapes control characters, so nothing a caller sent can break a log line in two.
pub fn sanitize(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect()
}

fn log_op(op_id: &str, uid: u32, op: &str, args: &str, result: &Result<(), &HelperError>) {
    let args = if args.is_empty() {
        String::new()
    } else {
        format!(" {args}")
    };
    match result {
        Ok(()) => info!(
            "{}",
            sanitize(&format!("op_id={op_id} uid={uid} op={op}{args} result=ok"))
        ),
        Err(e) => warn!(
            "{}",
            sanitize(&format!(
                "op_id={op_id} uid={uid} op={op}{args} result=error: {e}"
            ))
        ),
    }
}

/// Resolves when the caller closes its side of the connection. Bytes it sends meanwhile (a next
/// request) are kept in `buf` for the next read.
async fn caller_gone(stream: &UnixStream, buf: &mut Vec<u8>) {
    loop {
        if stream.readable().await.is_err() {
            return;
        }
        let mut chunk = [0u8; 4096];
        match stream.try_read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
    }
}

async fn reply(stream: &mut UnixStream, r: &Reply) -> std::io::Result<()> {
    stream.write_all(r.to_line().as_bytes()).await
}

async fn handle_connection(mut stream: UnixStream, helper: Arc<Helper>, opts: &ServeOptions) {
    // The caller's identity comes from the kernel (SO_PEERCRED, fixed at connect time),
    // never from anything the caller sends, and is checked before anything is read.
    let uid = match stream.peer_cred() {
        Ok(c) => c.uid(),
        Err(e) => {
            warn!("cannot read the peer's credentials ({e}); closing");
            return;
        }
    };
    let owner = helper.config().owner_uid;
    if uid != 0 && uid != owner {
        let e = HelperError::forbidden(format!("uid {uid} is not the owner"));
        log_op("-", uid, "-", "", &Err(&e));
        let _ = reply(&mut stream, &Reply::error(&e)).await;
        return;
    }
    let mut buf = Vec::new();
    let mut served = 0usize;
    loop {
        let mut fds = Vec::new();
        let read = tokio::time::timeout(
            opts.idle_timeout,
            read_line_with_fds(&stream, &mut buf, MAX_LINE, &mut fds),
        )
        .await;
        // The helper takes no descriptors from callers; anything sent is closed right away.
        drop(fds);
        let line = match read {
            Err(_) => {
                debug!("uid={uid}: idle for {:?}; closing", opts.idle_timeout);
                return;
            }
            Ok(Ok(Some(line))) => line,
            Ok(Ok(None)) => return,
            Ok(Err(_)) if buf.len() > MAX_LINE => {
                let e =
                    HelperError::bad_request(format!("request line longer than {MAX_LINE} bytes"));
                log_op("-", uid, "-", "", &Err(&e));
                let _ = reply(&mut stream, &Reply::error(&e)).await;
                return;
            }
            Ok(Err(e)) => {
                debug!("uid={uid}: reading a request failed: {e}");
                return;
            }
        };
        if line.len() > MAX_LINE {
            let e = HelperError::bad_request(format!("request line longer than {MAX_LINE} bytes"));
            log_op("-", uid, "-", "", &Err(&e));
            let _ = reply(&mut stream, &Reply::error(&e)).await;
            return;
        }
        if served == opts.max_requests_per_connection {
            let e = HelperError::bad_request(format!(
                "more than {} requests on one connection; reconnect",
                opts.max_requests_per_connection
            ));
            log_op("-", uid, "-", "", &Err(&e));
            let _ = reply(&mut stream, &Reply::error(&e)).await;
            return;
        }
        served += 1;
        let (op_id, request) = match decode_request(&line) {
            Ok(x) => x,
            Err(rej) => {
                let id = rej.op_id.as_ref().map_or("-", |i| i.as_str());
                log_op(
                    id,
                    uid,
                    rej.op.as_deref().unwrap_or("-"),
                    "",
                    &Err(&rej.error),
                );
                let _ = reply(&mut stream, &Reply::error(&rej.error)).await;
                return;
            }
        };
        let op = request.op();
        let args = request.log_args();
        // A long build (Debootstrap) is abandoned when its caller goes away (the daemon's
        // request was cancelled): its program group is killed and its scratch dir cleaned.
        // Short ops run to their end (see the module docs).
        let abandonable = matches!(request, crate::protocol::HelperRequest::Debootstrap { .. });
        let result = {
            // Own task: see the module docs.
            let helper = helper.clone();
            let request = request.clone();
            let mut task = tokio::spawn(async move { helper.handle(&request).await });
            let joined = if abandonable {
                tokio::select! {
                    r = &mut task => r,
                    () = caller_gone(&stream, &mut buf) => {
                        task.abort();
                        let _ = task.await;
                        let e = HelperError::failed("cancelled: the caller went away");
                        log_op(op_id.as_str(), uid, op, &args, &Err(&e));
                        return;
                    }
                }
            } else {
                task.await
            };
            joined.unwrap_or_else(|e| Err(HelperError::failed(format!("internal error: {e}"))))
        };
        log_op(op_id.as_str(), uid, op, &args, &result.as_ref().map(|_| ()));
        let sent = match result {
            Ok(out) => {
                let line = Reply::Ok(out.value).to_line();
                write_with_fd(
                    &mut stream,
                    line.as_bytes(),
                    out.fd.as_ref().map(|f| f.as_fd()),
                )
                .await
            }
            Err(e) => reply(&mut stream, &Reply::error(&e)).await,
        };
        if let Err(e) = sent {
            debug!("op_id={op_id} uid={uid}: the caller left before the reply ({e})");
            return;
        }
    }
}
