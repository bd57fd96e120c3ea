//! `banger`, the command-line client of bangerd.
//!
//! The CLI parses and validates input ([`cli`]), sends one request per daemon call over the
//! Unix socket ([`client`]), starting the daemon when it is not running ([`autostart`]), shows
//! progress on a terminal ([`progress`]) and renders results ([`render`]). It holds no business
//! logic: every decision is the daemon's, and every daemon error maps to a stable exit code.

pub mod autostart;
pub mod cli;
pub mod client;
pub mod commands;
pub mod doctor;
pub mod error;
mod guest_stderr;
pub mod interrupt;
pub mod json;
pub mod progress;
mod remote;
pub mod render;
pub mod sanitize;
pub mod ssh_config;
mod sshmux;
pub mod system;
mod workspace;

use std::ffi::OsString;
use std::io::{BufRead, IsTerminal, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use banger_config::{Config, HostInfo};
use banger_core::OpId;
use banger_protocol::Request;
use clap::Parser;
use serde::de::DeserializeOwned;

use crate::cli::Cli;
use crate::client::{CallError, FrameSink, Reply};
use crate::error::CliError;
use crate::progress::{PlainSink, Style, TtyProgress};

/// Where the daemon is and how to start it.
#[derive(Debug, Clone)]
pub struct DaemonTarget {
    pub socket: PathBuf,
    /// bangerd's own log, named in errors that need a look at it.
    pub log_file: PathBuf,
    pub runtime_dir: PathBuf,
    /// `--config` as given, passed on to a started daemon.
    pub config: Option<PathBuf>,
    /// Whether a missing daemon may be started (never for `daemon status|stop`).
    pub autostart: bool,
    /// Where workspace sync manifests are kept, one `<vm-id>.json` per VM (the config's
    /// `cache_dir/workspaces`).
    pub workspace_cache: PathBuf,
}

impl DaemonTarget {
    /// Reads the configuration the daemon will read, to find its socket and log.
    pub fn from_config(config: Option<PathBuf>) -> Result<Self, CliError> {
        let host = HostInfo::detect().map_err(|e| CliError::local(e.to_string()))?;
        // Absolute, because a started daemon must find the same file whatever its cwd.
        let config = config.map(|p| std::path::absolute(&p).unwrap_or(p));
        let path = config
            .clone()
            .unwrap_or_else(|| Config::default_path_for(&host));
        let cfg = Config::load(&path, &host).map_err(|e| CliError::local(e.to_string()))?;
        let mut t = Self::for_dirs(&cfg.state_dir, &cfg.runtime_dir, config);
        t.workspace_cache = cfg.cache_dir.join("workspaces");
        Ok(t)
    }

    /// The daemon's files for a state and runtime dir (its `Layout`: `<runtime>/bangerd.sock`,
    /// `<state>/bangerd.log`).
    pub fn for_dirs(
        state_dir: &std::path::Path,
        runtime_dir: &std::path::Path,
        config: Option<PathBuf>,
    ) -> Self {
        DaemonTarget {
            socket: runtime_dir.join("bangerd.sock"),
            log_file: state_dir.join("bangerd.log"),
            runtime_dir: runtime_dir.to_path_buf(),
            config,
            autostart: true,
            workspace_cache: state_dir.join("workspaces"),
        }
    }
}

/// Terminal facts that change how output looks.
#[derive(Debug, Clone, Copy)]
pub struct Term {
    /// Live progress and colour go to stderr only when it is a terminal.
    pub stderr_tty: bool,
    /// `vm prune` asks for confirmation only when it can read an answer.
    pub stdin_tty: bool,
    pub style: Style,
}

impl Term {
    pub fn plain() -> Term {
        Term {
            stderr_tty: false,
            stdin_tty: false,
            style: Style { color: false },
        }
    }
}

/// A successful answer.
#[derive(Debug, Clone)]
pub struct Answer {
    pub result: serde_json::Value,
    line: String,
}

impl Answer {
    /// The result as pretty JSON, in the daemon's key order.
    pub fn pretty_json(&self) -> String {
        json::top_level_value(&self.line, "result")
            .map(json::pretty)
            .unwrap_or_else(|| {
                serde_json::to_string_pretty(&self.result).unwrap_or_else(|_| "null".into())
            })
    }

    /// The result as a protocol type.
    pub fn decode<T: DeserializeOwned>(&self, method: &str) -> Result<T, CliError> {
        serde_json::from_value(self.result.clone()).map_err(|e| {
            CliError::local(format!(
                "the daemon's answer to {method} is not what this banger expects ({e}); are banger and bangerd the same version?"
            ))
        })
    }
}

/// Everything a command runs against: the daemon, the output streams, the clock.
pub struct Ctx<'a> {
    pub daemon: DaemonTarget,
    pub out: &'a mut dyn Write,
    pub err: &'a mut dyn Write,
    pub input: &'a mut dyn BufRead,
    pub term: Term,
    /// Unix seconds, for relative times.
    pub now: i64,
    autostart_tried: bool,
}

impl std::fmt::Debug for Ctx<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctx")
            .field("daemon", &self.daemon)
            .field("term", &self.term)
            .field("now", &self.now)
            .finish_non_exhaustive()
    }
}

impl<'a> Ctx<'a> {
    pub fn new(
        daemon: DaemonTarget,
        out: &'a mut dyn Write,
        err: &'a mut dyn Write,
        input: &'a mut dyn BufRead,
        term: Term,
        now: i64,
    ) -> Self {
        Ctx {
            daemon,
            out,
            err,
            input,
            term,
            now,
            autostart_tried: false,
        }
    }

    /// Writes to stdout; a closed pipe (`banger vm ls | head`) ends quietly.
    pub fn print(&mut self, text: &str) -> Result<(), CliError> {
        self.out
            .write_all(text.as_bytes())
            .and_then(|()| self.out.flush())
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::BrokenPipe => CliError::reported(CliError::FAILURE),
                _ => CliError::local(format!("writing output: {e}")),
            })
    }

    /// Writes one line to stderr (best effort: there is nowhere else to report it).
    pub fn note(&mut self, line: &str) {
        let _ = writeln!(self.err, "{line}");
    }

    /// Connects to the daemon, starting it first if allowed and needed.
    pub fn connect(&mut self) -> Result<UnixStream, CliError> {
        match client::connect(&self.daemon.socket) {
            Ok(s) => Ok(s),
            Err(e) if e.is_not_running() && self.daemon.autostart && !self.autostart_tried => {
                self.autostart_tried = true;
                self.start_daemon()?;
                client::connect(&self.daemon.socket).map_err(|e| self.call_error(e))
            }
            Err(e) => Err(self.call_error(e)),
        }
    }

    /// Starts bangerd and waits for it; returns its pid.
    pub fn start_daemon(&mut self) -> Result<u32, CliError> {
        let exe = std::env::current_exe().ok();
        let path_var = std::env::var_os("PATH");
        let Some(bangerd) = autostart::locate_bangerd(exe.as_deref(), path_var.as_deref()) else {
            let beside = exe
                .as_deref()
                .and_then(|e| e.parent())
                .map(|d| format!("{} or ", d.display()))
                .unwrap_or_default();
            return Err(CliError::local(format!(
                "bangerd is not running and no bangerd executable was found in {beside}PATH"
            )));
        };
        let spec = autostart::StartSpec {
            bangerd,
            config: self.daemon.config.clone(),
            runtime_dir: self.daemon.runtime_dir.clone(),
            socket: self.daemon.socket.clone(),
            timeout: autostart::START_TIMEOUT,
        };
        let live = self.term.stderr_tty;
        if live {
            let _ = write!(self.err, "{}", self.term.style.dim("starting bangerd…"));
            let _ = self.err.flush();
        }
        let result = autostart::start(&spec);
        if live {
            let _ = write!(self.err, "\r\x1b[2K");
            let _ = self.err.flush();
        }
        result
    }

    /// Sends one request and waits for its final answer, showing progress on a terminal.
    pub fn request(&mut self, request: &Request) -> Result<Answer, CliError> {
        let stream = self.connect()?;
        let op_id = OpId::generate();
        let reply = if self.term.stderr_tty {
            let mut sink = TtyProgress::new(&mut *self.err, self.term.style);
            client::exchange(stream, &op_id, request, &mut sink as &mut dyn FrameSink)
        } else {
            let mut sink = PlainSink {
                err: &mut *self.err,
            };
            client::exchange(stream, &op_id, request, &mut sink)
        };
        match reply {
            Ok(Reply::Result { result, line, .. }) => Ok(Answer { result, line }),
            Ok(Reply::Error {
                op_id,
                code,
                message,
            }) => Err(CliError::daemon(&op_id, code, &message)),
            Err(e) => Err(self.call_error(e)),
        }
    }

    fn call_error(&self, e: CallError) -> CliError {
        let log = self.daemon.log_file.display();
        match &e {
            CallError::Untrusted(t) => CliError::local(t.to_string()),
            CallError::Connect(io) if client::not_running(io) => CliError::local(format!(
                "bangerd is not running (no answer on {})",
                self.daemon.socket.display()
            )),
            CallError::Connect(io) => CliError::local(format!(
                "cannot connect to bangerd at {}: {io}",
                self.daemon.socket.display()
            )),
            CallError::Closed { op_id } => CliError::local(format!(
                "the daemon closed the connection before answering (op {op_id}); see {log}"
            )),
            CallError::Io { op_id, .. } | CallError::BadFrame { op_id, .. } => CliError::local(
                format!("{} (op {op_id}); see {log}", describe_call_error(&e)),
            ),
        }
    }
}

/// A call failure in words, without the op id.
pub fn describe_call_error(e: &CallError) -> String {
    match e {
        CallError::Untrusted(t) => t.to_string(),
        CallError::Connect(io) => format!("cannot connect: {io}"),
        CallError::Io { source, .. } => format!("talking to the daemon failed: {source}"),
        CallError::Closed { .. } => "the daemon closed the connection before answering".into(),
        CallError::BadFrame { line, reason, .. } if line.is_empty() => reason.clone(),
        CallError::BadFrame { line, reason, .. } => {
            let shown: String = line.chars().take(200).collect();
            format!("the daemon sent an unreadable line ({reason}): {shown}")
        }
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs() as i64
}

/// Runs the CLI on `args` with the process's real streams; returns the exit code.
pub fn main_with_args(args: impl IntoIterator<Item = OsString>) -> i32 {
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let (text, code, to_stdout) = cli::clap_failure(&e);
            if to_stdout {
                print!("{text}");
            } else {
                eprint!("{text}");
            }
            return code;
        }
    };
    let daemon = match DaemonTarget::from_config(cli.config.clone()) {
        Ok(d) => d,
        Err(e) if matches!(cli.command, cli::Command::Doctor) => {
            return doctor::run_without_config(&e, &mut std::io::stdout().lock());
        }
        Err(e) => {
            if let Some(line) = e.line() {
                eprintln!("{line}");
            }
            return e.code;
        }
    };
    let stderr_tty = std::io::stderr().is_terminal();
    let term = Term {
        stderr_tty,
        stdin_tty: std::io::stdin().is_terminal(),
        style: Style::for_terminal(stderr_tty, std::env::var_os("NO_COLOR").as_deref()),
    };
    let (stdout, stderr, stdin) = (std::io::stdout(), std::io::stderr(), std::io::stdin());
    let (mut out, mut err, mut input) = (stdout.lock(), stderr.lock(), stdin.lock());
    let mut ctx = Ctx::new(daemon, &mut out, &mut err, &mut input, term, unix_now());
    run(cli.command, &mut ctx)
}

/// Runs one parsed command; prints its error, if any, and returns the exit code.
pub fn run(command: cli::Command, ctx: &mut Ctx<'_>) -> i32 {
    match commands::execute(command, ctx) {
        Ok(()) => 0,
        Err(e) => {
            if let Some(line) = e.line() {
                ctx.note(&line);
            }
            e.code
        }
    }
}

#[cfg(test)]
mod tests;
