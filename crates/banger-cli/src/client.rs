//! A small blocking client for bangerd's socket: one request per connection.
//!
//! The request goes out as one [`Envelope`] line; frames come back one per line until the final
//! `result` or `error`. Progress and warning frames are handed to a [`FrameSink`] as they
//! arrive, so the caller decides how (and whether) to show them.

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use banger_core::{ErrorCode, OpId};
use banger_protocol::{Envelope, Frame, PROTOCOL_VERSION, Request};

/// Receives the non-final frames of one request.
pub trait FrameSink {
    /// A stage of the operation began.
    fn progress(&mut self, stage: &str, detail: Option<&str>);
    /// The daemon wants the user to see something; the operation goes on.
    fn warning(&mut self, message: &str);
    /// How often [`FrameSink::tick`] should be called while waiting; `None` for never.
    fn tick_interval(&self) -> Option<Duration> {
        None
    }
    /// Called every [`FrameSink::tick_interval`] while no frame arrives (spinners); returning
    /// `false` gives up waiting (the request is then cancelled by closing the connection).
    fn tick(&mut self) -> bool {
        true
    }
    /// The final frame arrived (`ok` tells which kind) or the exchange failed.
    fn finish(&mut self, _ok: bool) {}
}

/// Ignores progress and drops warnings: for internal calls such as the auto-start ping.
#[derive(Debug, Default)]
pub struct NullSink;

impl FrameSink for NullSink {
    fn progress(&mut self, _stage: &str, _detail: Option<&str>) {}
    fn warning(&mut self, _message: &str) {}
}

/// The final answer to a request.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Result {
        op_id: OpId,
        result: serde_json::Value,
        /// The frame's text, so `--json` can print the result in the daemon's key order.
        line: String,
    },
    Error {
        op_id: OpId,
        code: ErrorCode,
        message: String,
    },
}

/// Why no final answer was obtained.
#[derive(Debug)]
pub enum CallError {
    /// The socket or a directory above it could have been planted by another user: nothing
    /// was sent.
    Untrusted(banger_config::trust::TrustError),
    /// The socket could not be connected to.
    Connect(std::io::Error),
    /// Reading or writing failed after connecting.
    Io { op_id: OpId, source: std::io::Error },
    /// The daemon closed the connection before a final frame.
    Closed { op_id: OpId },
    /// A line that is not a frame.
    BadFrame {
        op_id: OpId,
        line: String,
        reason: String,
    },
}

impl CallError {
    /// Whether the error means "no daemon is listening" (so starting one may help).
    pub fn is_not_running(&self) -> bool {
        matches!(self, CallError::Connect(e) if not_running(e))
    }
}

/// `ENOENT` (no socket file) and `ECONNREFUSED` (a stale socket file) both mean nobody listens.
pub fn not_running(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused)
}

/// Connects to the daemon's socket, once it and its directories are known to be the user's
/// or root's (see [`banger_config::trust`]), and keeps the connection only if the daemon
/// listening runs as the user or root (`SO_PEERCRED`): a socket another user planted never
/// hears a request, and never answers one.
pub fn connect(socket: &Path) -> Result<UnixStream, CallError> {
    use banger_config::trust;
    let uid = trust::current_uid();
    trust::check_socket(socket, uid).map_err(CallError::Untrusted)?;
    let stream = UnixStream::connect(socket).map_err(CallError::Connect)?;
    // The path may have been swapped between the check and the connect: who listens decides.
    trust::check_peer(&stream, socket, uid).map_err(CallError::Untrusted)?;
    Ok(stream)
}

/// Connects, sends `request` under a fresh op id and reads frames until the final one.
pub fn call(
    socket: &Path,
    request: &Request,
    sink: &mut dyn FrameSink,
) -> Result<Reply, CallError> {
    let stream = connect(socket)?;
    exchange(stream, &OpId::generate(), request, sink)
}

/// Sends `request` on an open connection and reads its answer.
pub fn exchange(
    mut stream: UnixStream,
    op_id: &OpId,
    request: &Request,
    sink: &mut dyn FrameSink,
) -> Result<Reply, CallError> {
    let io_err = |source| CallError::Io {
        op_id: op_id.clone(),
        source,
    };
    let line = Envelope {
        v: PROTOCOL_VERSION,
        op_id,
        request,
    }
    .to_line();
    stream.write_all(line.as_bytes()).map_err(io_err)?;
    stream.flush().map_err(io_err)?;
    let tick = sink.tick_interval();
    // While signals are caught (`interrupt`), the wait wakes up often enough to notice one.
    let poll = if crate::interrupt::armed() {
        Some(tick.map_or(INTERRUPT_POLL, |t| t.min(INTERRUPT_POLL)))
    } else {
        tick
    };
    stream.set_read_timeout(poll).map_err(io_err)?;

    let result = read_frames(BufReader::new(stream), op_id, sink, tick);
    sink.finish(matches!(result, Ok(Reply::Result { .. })));
    result
}

/// How often a wait checks for a caught signal.
const INTERRUPT_POLL: Duration = Duration::from_millis(100);

fn read_frames(
    mut reader: BufReader<UnixStream>,
    op_id: &OpId,
    sink: &mut dyn FrameSink,
    tick: Option<Duration>,
) -> Result<Reply, CallError> {
    // One buffer across timeouts: `read_until` keeps what it consumed before a timeout, so a
    // line split across a tick is completed by the next call.
    let mut buf = Vec::new();
    let mut last_tick = std::time::Instant::now();
    let mut half_closed = false;
    loop {
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) => {
                return Err(CallError::Closed {
                    op_id: op_id.clone(),
                });
            }
            Ok(_) if buf.last() != Some(&b'\n') => {
                // EOF in the middle of a line: the daemon went away mid-answer.
                return Err(CallError::Closed {
                    op_id: op_id.clone(),
                });
            }
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if !half_closed && crate::interrupt::caught().is_some() {
                    // Our EOF makes the daemon cancel the request (and undo what it did); it
                    // still answers on its half, so the outcome is known.
                    let _ = reader.get_ref().shutdown(std::net::Shutdown::Write);
                    half_closed = true;
                }
                // A timeout may end a hair early: a few ms of slack keep ticks at their interval.
                let due = tick.is_some_and(|t| last_tick.elapsed() + Duration::from_millis(5) >= t);
                if !due {
                    continue;
                }
                last_tick = std::time::Instant::now();
                if sink.tick() {
                    continue;
                }
                return Err(CallError::Io {
                    op_id: op_id.clone(),
                    source: std::io::Error::new(ErrorKind::TimedOut, "no answer from the daemon"),
                });
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(source) => {
                return Err(CallError::Io {
                    op_id: op_id.clone(),
                    source,
                });
            }
        }
        let line = std::mem::take(&mut buf);
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end();
        if text.is_empty() {
            continue;
        }
        let frame: Frame = serde_json::from_str(text).map_err(|e| CallError::BadFrame {
            op_id: op_id.clone(),
            line: text.to_string(),
            reason: e.to_string(),
        })?;
        match frame {
            Frame::Progress { stage, detail, .. } => sink.progress(&stage, detail.as_deref()),
            Frame::Warning { message, .. } => sink.warning(&message),
            Frame::Result { op_id, result } => {
                return Ok(Reply::Result {
                    op_id,
                    result,
                    line: text.to_string(),
                });
            }
            Frame::Error {
                op_id,
                code,
                message,
            } => {
                return Ok(Reply::Error {
                    op_id,
                    code,
                    message,
                });
            }
        }
    }
}

/// Pings the daemon; `Ok` when it answers. A read timeout keeps a wedged daemon from hanging
/// the caller.
pub fn ping(socket: &Path, timeout: Duration) -> Result<(), CallError> {
    let stream = connect(socket)?;
    let op_id = OpId::generate();
    stream
        .set_write_timeout(Some(timeout))
        .map_err(|source| CallError::Io {
            op_id: op_id.clone(),
            source,
        })?;
    let mut sink = TimeoutSink(timeout);
    match exchange(stream, &op_id, &Request::Ping, &mut sink)? {
        Reply::Result { .. } => Ok(()),
        Reply::Error { op_id, message, .. } => Err(CallError::BadFrame {
            op_id,
            line: String::new(),
            reason: format!("ping failed: {message}"),
        }),
    }
}

/// A sink whose only job is a read timeout: the first tick aborts the ping.
struct TimeoutSink(Duration);

impl FrameSink for TimeoutSink {
    fn progress(&mut self, _stage: &str, _detail: Option<&str>) {}
    fn warning(&mut self, _message: &str) {}
    fn tick_interval(&self) -> Option<Duration> {
        Some(self.0)
    }
    fn tick(&mut self) -> bool {
        false
    }
}
