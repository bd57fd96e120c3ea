//! One ssh session: the child process of an `exec` or `shell` request and the plumbing between
//! it and its channel.
//!
//! - Output: stdout and stderr (pipes), or the pty master, are read in 32 KiB chunks and sent
//!   through the connection's [`Handle`]. russh stops taking new messages while the client's
//!   window is full, so a client that does not read stops the child (it blocks writing), and
//!   memory stays bounded.
//! - Input: channel data is queued to a writer task. The queue is bounded
//!   ([`STDIN_BUFFER`](super::STDIN_BUFFER) bytes): when it is full, the connection waits for
//!   the child to read. russh grants the client more window as soon as data arrives rather than
//!   when the child consumes it, so this wait, which holds up the whole connection, is the only
//!   back-pressure there is. Waiting without limit could deadlock (a child that only reads more
//!   after its output is sent, while the connection is stuck waiting for it), so after
//!   [`STDIN_STALL`](super::STDIN_STALL) the data is queued anyway: progress is guaranteed, and
//!   a child that never reads costs at most one packet per stall.
//! - End: once the child has exited and its output is drained, `exit-status` (or
//!   `exit-signal`), EOF and close are sent, in that order behind the data.
//! - A channel (or connection) that goes away before the child exited kills the child's process
//!   group (each session is its own session and process group, via `setsid`, like OpenSSH).

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use russh::server::Handle;
use russh::{ChannelId, Sig};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::AbortHandle;

use super::pty::{self, Master, Pty};
use super::user::User;
use super::{STDIN_BUFFER, STDIN_STALL, Settings};

/// Output is read and sent in chunks of this size (the channel's packets are 32 KiB).
const CHUNK: usize = 32 * 1024;
/// After the child exits, how long the pty may stay quiet before the session ends even though
/// a background process still holds the terminal (OpenSSH closes the pty at that point too).
const PTY_DRAIN: Duration = Duration::from_millis(100);

/// What a session asked for before it started.
#[derive(Debug, Default)]
pub struct Request {
    /// `exec`'s command, or `None` for a login shell.
    pub command: Option<Vec<u8>>,
    /// The terminal from `pty-req`, with its `TERM`.
    pub pty: Option<(Pty, String)>,
    /// Accepted `env` requests.
    pub env: Vec<(String, String)>,
    /// `SSH_CONNECTION`'s value: `client_ip client_port server_ip server_port`.
    pub connection: Option<String>,
}

/// The child's process group; killed when the session ends before the child did.
#[derive(Debug)]
struct ProcGroup {
    pgid: libc::pid_t,
    /// Set the moment the child is reaped: after that its pid (our pgid) may be reused.
    reaped: AtomicBool,
}

impl ProcGroup {
    fn signal(&self, sig: libc::c_int) {
        if !self.reaped.load(Ordering::SeqCst) {
            // SAFETY: kill(2) on our own child's process group, which exists until reaped.
            unsafe { libc::kill(-self.pgid, sig) };
        }
    }
}

/// A chunk of input and the queue room it holds (given back once written).
type Chunk = (Vec<u8>, u32);

/// The client's input, queued for the child.
#[derive(Debug)]
pub struct Stdin {
    tx: mpsc::UnboundedSender<Chunk>,
    room: Arc<Semaphore>,
}

impl Stdin {
    fn new() -> (Self, mpsc::UnboundedReceiver<Chunk>, Arc<Semaphore>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let room = Arc::new(Semaphore::new(STDIN_BUFFER));
        (
            Stdin {
                tx,
                room: room.clone(),
            },
            rx,
            room,
        )
    }

    /// Queues `data` for the child, waiting (bounded, see the module docs) while the queue is
    /// full. Data for a child that closed its stdin is dropped, as a pipe would.
    pub async fn push(&self, data: &[u8]) {
        if self.tx.is_closed() || data.is_empty() {
            return;
        }
        let want = u32::try_from(data.len().min(STDIN_BUFFER)).unwrap_or(u32::MAX);
        let held =
            match tokio::time::timeout(STDIN_STALL, self.room.clone().acquire_many_owned(want))
                .await
            {
                Ok(Ok(permit)) => {
                    // Given back by the writer once the bytes are written.
                    permit.forget();
                    want
                }
                _ => 0,
            };
        let _ = self.tx.send((data.to_vec(), held));
    }
}

/// A started session, owned by its channel's state in the connection handler.
#[derive(Debug)]
pub struct Running {
    /// `None` after the client's EOF.
    pub stdin: Option<Stdin>,
    pty: Option<Arc<Master>>,
    group: Arc<ProcGroup>,
    task: AbortHandle,
}

impl Running {
    /// Applies a `window-change`.
    pub fn resize(&self, size: pty::WinSize) {
        if let Some(m) = &self.pty {
            let _ = m.resize(size);
        }
    }

    /// Delivers a client's `signal` request to the session's process group.
    pub fn signal(&self, sig: &Sig) {
        if let Some(n) = signal_number(sig) {
            self.group.signal(n);
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // The channel is gone: nobody can read the output or send input any more.
        self.group.signal(libc::SIGKILL);
        self.task.abort();
    }
}

/// The environment of a session: the image's (with PATH), then what OpenSSH sets, then the
/// client's accepted variables, then the terminal.
pub fn session_env(
    settings: &Settings,
    user: &User,
    req: &Request,
    tty: Option<(&str, &str)>,
) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = settings.env.clone();
    let mut set = |k: &str, v: &str| match env.iter_mut().find(|(ek, _)| ek == k) {
        Some(slot) => slot.1 = v.to_string(),
        None => env.push((k.to_string(), v.to_string())),
    };
    set("HOME", &user.home.to_string_lossy());
    set("USER", &user.name);
    set("LOGNAME", &user.name);
    set("SHELL", &user.shell.to_string_lossy());
    if let Some(c) = &req.connection {
        set("SSH_CONNECTION", c);
        let mut f = c.split(' ');
        if let (Some(ip), Some(port), Some(_), Some(lport)) =
            (f.next(), f.next(), f.next(), f.next())
        {
            set("SSH_CLIENT", &format!("{ip} {port} {lport}"));
        }
    }
    for (k, v) in &req.env {
        set(k, v);
    }
    if let Some((term, name)) = tty {
        set("TERM", term);
        set("SSH_TTY", name);
    }
    env
}

/// The working directory: the configured one, else the home, else `/` (OpenSSH, too, falls back
/// to `/` when the home is missing).
pub fn session_cwd(workdir: Option<&Path>, home: &Path) -> PathBuf {
    [workdir, Some(home)]
        .into_iter()
        .flatten()
        .find(|d| d.is_dir())
        .map_or_else(|| PathBuf::from("/"), Path::to_path_buf)
}

/// argv[0]: the shell's name, with a leading `-` for a login shell.
pub fn shell_argv0(shell: &Path, login: bool) -> String {
    let base = shell
        .file_name()
        .map_or_else(|| "sh".into(), |b| b.to_string_lossy());
    if login {
        format!("-{base}")
    } else {
        base.into_owned()
    }
}

/// Starts the session's child and the tasks that connect it to channel `id`.
pub fn start(
    settings: &Settings,
    user: &User,
    req: Request,
    handle: Handle,
    id: ChannelId,
) -> std::io::Result<Running> {
    let tty = req
        .pty
        .as_ref()
        .map(|(p, term)| (term.as_str(), p.name.as_str()));
    let env = session_env(settings, user, &req, tty);
    let mut cmd = tokio::process::Command::new(&user.shell);
    match &req.command {
        Some(c) => {
            // OpenSSH semantics: the command string goes to the user's shell as is; the client
            // side (banger) quotes arguments for that shell.
            cmd.arg0(shell_argv0(&user.shell, false))
                .arg("-c")
                .arg(OsStr::from_bytes(c));
        }
        None => {
            cmd.arg0(shell_argv0(&user.shell, true));
        }
    }
    cmd.env_clear()
        .envs(env)
        .current_dir(session_cwd(settings.workdir.as_deref(), &user.home))
        .kill_on_drop(false);

    let (stdin, stdin_rx, room) = Stdin::new();
    let with_pty = req.pty.is_some();
    let mut master = None;
    if let Some((pty, _)) = req.pty {
        let Pty {
            master: m, slave, ..
        } = pty;
        cmd.stdin(Stdio::from(slave.try_clone()?))
            .stdout(Stdio::from(slave.try_clone()?))
            .stderr(Stdio::from(slave));
        master = Some(Arc::new(Master::new(m)?));
    } else {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
    }
    // SAFETY: the closure runs in the forked child before exec and only makes async-signal-safe
    // calls (setsid, ioctl).
    unsafe {
        cmd.pre_exec(move || {
            // Its own session and process group, so the whole session can be signalled and a
            // terminal can become its controlling tty.
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if with_pty && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    // Our copies of the slave must go, or the master never sees the session end.
    drop(cmd);
    let pid = child
        .id()
        .and_then(|p| libc::pid_t::try_from(p).ok())
        .ok_or_else(|| std::io::Error::other("child has no pid"))?;
    let group = Arc::new(ProcGroup {
        pgid: pid,
        reaped: AtomicBool::new(false),
    });

    let io = match &master {
        Some(m) => {
            tokio::spawn(stdin_writer(Sink::Pty(m.clone()), stdin_rx, room));
            Io::Pty(m.clone())
        }
        None => {
            let (Some(i), Some(o), Some(e)) =
                (child.stdin.take(), child.stdout.take(), child.stderr.take())
            else {
                return Err(std::io::Error::other("child pipes missing"));
            };
            tokio::spawn(stdin_writer(Sink::Pipe(i), stdin_rx, room));
            Io::Pipes(o, e)
        }
    };
    let task = tokio::spawn(run(child, io, handle, id, group.clone())).abort_handle();
    Ok(Running {
        stdin: Some(stdin),
        pty: master,
        group,
        task,
    })
}

enum Io {
    Pipes(tokio::process::ChildStdout, tokio::process::ChildStderr),
    Pty(Arc<Master>),
}

/// Waits for the child and its output, then reports the exit and closes the channel.
async fn run(
    mut child: tokio::process::Child,
    io: Io,
    handle: Handle,
    id: ChannelId,
    group: Arc<ProcGroup>,
) {
    let (exited_tx, exited_rx) = tokio::sync::oneshot::channel();
    let wait = async {
        let status = child.wait().await;
        // Same poll as the reaping: nothing can signal a reused pid in between (the runtime
        // has a single thread).
        group.reaped.store(true, Ordering::SeqCst);
        let _ = exited_tx.send(());
        status
    };
    let status = match io {
        Io::Pipes(out, err) => {
            let (status, (), ()) = tokio::join!(
                wait,
                pump(out, &handle, id, None),
                pump(err, &handle, id, Some(1))
            );
            status
        }
        Io::Pty(master) => {
            let (status, ()) = tokio::join!(wait, pty_pump(&master, &handle, id, exited_rx));
            status
        }
    };
    match status {
        Ok(s) => report_exit(&handle, id, s).await,
        // Cannot happen for our own child; end the channel without a status (the client
        // reports 255), never hang it.
        Err(e) => crate::console::line(&format!("sshd: waiting for a session: {e}")),
    }
    let _ = handle.eof(id).await;
    let _ = handle.close(id).await;
}

async fn report_exit(handle: &Handle, id: ChannelId, s: ExitStatus) {
    if let Some(code) = s.code() {
        let _ = handle.exit_status_request(id, code as u32).await;
    } else if let Some(sig) = s.signal() {
        let _ = handle
            .exit_signal_request(
                id,
                signal_name(sig),
                s.core_dumped(),
                String::new(),
                String::new(),
            )
            .await;
    }
}

/// Copies `r` to the channel (`ext` 1 = stderr) until EOF or until the connection is gone.
async fn pump(mut r: impl AsyncRead + Unpin, handle: &Handle, id: ChannelId, ext: Option<u32>) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let data = buf[..n].to_vec();
        let sent = match ext {
            None => handle.data(id, data).await,
            Some(code) => handle.extended_data(id, code, data).await,
        };
        if sent.is_err() {
            return;
        }
    }
}

/// Copies the terminal's output to the channel until every holder of the slave closed it, or
/// until it stays quiet for [`PTY_DRAIN`] after the child exited.
async fn pty_pump(
    master: &Master,
    handle: &Handle,
    id: ChannelId,
    mut exited: tokio::sync::oneshot::Receiver<()>,
) {
    let mut buf = vec![0u8; CHUNK];
    let mut child_done = false;
    loop {
        let read = if child_done {
            match tokio::time::timeout(PTY_DRAIN, master.read(&mut buf)).await {
                Ok(r) => r,
                Err(_quiet) => return,
            }
        } else {
            tokio::select! {
                r = master.read(&mut buf) => r,
                _ = &mut exited => {
                    child_done = true;
                    continue;
                }
            }
        };
        match read {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if handle.data(id, buf[..n].to_vec()).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Where a session's input goes.
enum Sink {
    Pipe(tokio::process::ChildStdin),
    Pty(Arc<Master>),
}

impl Sink {
    async fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        match self {
            Sink::Pipe(p) => {
                p.write_all(buf).await?;
                p.flush().await
            }
            Sink::Pty(m) => m.write_all(buf).await,
        }
    }
}

/// Writes queued input to the child; gives the queue's room back as it goes. Ends (closing the
/// child's stdin, for pipes; a terminal stays open, as with OpenSSH) when the client's EOF
/// dropped the sender and everything queued is written, or at the first write error (the child
/// closed its stdin).
async fn stdin_writer(
    mut sink: Sink,
    mut rx: mpsc::UnboundedReceiver<Chunk>,
    room: Arc<Semaphore>,
) {
    while let Some((buf, held)) = rx.recv().await {
        let ok = sink.write_all(&buf).await.is_ok();
        room.add_permits(held as usize);
        if !ok {
            break;
        }
    }
    // Anyone waiting for room must not wait for a writer that is gone.
    room.close();
}

const SIGNALS: &[(libc::c_int, &str)] = &[
    (libc::SIGABRT, "ABRT"),
    (libc::SIGALRM, "ALRM"),
    (libc::SIGFPE, "FPE"),
    (libc::SIGHUP, "HUP"),
    (libc::SIGILL, "ILL"),
    (libc::SIGINT, "INT"),
    (libc::SIGKILL, "KILL"),
    (libc::SIGPIPE, "PIPE"),
    (libc::SIGQUIT, "QUIT"),
    (libc::SIGSEGV, "SEGV"),
    (libc::SIGTERM, "TERM"),
    (libc::SIGUSR1, "USR1"),
    (libc::SIGUSR2, "USR2"),
    (libc::SIGBUS, "BUS"),
    (libc::SIGTRAP, "TRAP"),
    (libc::SIGSYS, "SYS"),
    (libc::SIGXCPU, "XCPU"),
    (libc::SIGXFSZ, "XFSZ"),
    (libc::SIGCONT, "CONT"),
    (libc::SIGSTOP, "STOP"),
    (libc::SIGTSTP, "TSTP"),
    (libc::SIGWINCH, "WINCH"),
];

/// The RFC 4254 name of signal `n` (without `SIG`).
pub fn signal_name(n: libc::c_int) -> Sig {
    match SIGNALS.iter().find(|(num, _)| *num == n).map(|(_, s)| *s) {
        Some("ABRT") => Sig::ABRT,
        Some("ALRM") => Sig::ALRM,
        Some("FPE") => Sig::FPE,
        Some("HUP") => Sig::HUP,
        Some("ILL") => Sig::ILL,
        Some("INT") => Sig::INT,
        Some("KILL") => Sig::KILL,
        Some("PIPE") => Sig::PIPE,
        Some("QUIT") => Sig::QUIT,
        Some("SEGV") => Sig::SEGV,
        Some("TERM") => Sig::TERM,
        Some("USR1") => Sig::USR1,
        Some(other) => Sig::Custom(other.to_string()),
        None => Sig::Custom(format!("SIG{n}")),
    }
}

/// The signal number for a client's `signal` request, if it names one we know.
pub fn signal_number(sig: &Sig) -> Option<libc::c_int> {
    let name = match sig {
        Sig::ABRT => "ABRT",
        Sig::ALRM => "ALRM",
        Sig::FPE => "FPE",
        Sig::HUP => "HUP",
        Sig::ILL => "ILL",
        Sig::INT => "INT",
        Sig::KILL => "KILL",
        Sig::PIPE => "PIPE",
        Sig::QUIT => "QUIT",
        Sig::SEGV => "SEGV",
        Sig::TERM => "TERM",
        Sig::USR1 => "USR1",
        Sig::Custom(c) => c.as_str(),
    };
    SIGNALS.iter().find(|(_, s)| *s == name).map(|(n, _)| *n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(env: &[(&str, &str)], workdir: Option<&str>) -> Settings {
        Settings::for_tests(
            env.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            workdir.map(PathBuf::from),
        )
    }

    fn root() -> User {
        User {
            name: "root".into(),
            home: "/root".into(),
            shell: "/bin/bash".into(),
        }
    }

    #[test]
    fn env_layers_image_then_login_then_client_then_tty() {
        let s = settings(
            &[("PATH", "/x"), ("HOME", "/image-home"), ("LANG", "C")],
            None,
        );
        let req = Request {
            env: vec![("LANG".into(), "de_DE.UTF-8".into())],
            connection: Some("10.0.0.1 50000 10.0.0.2 22".into()),
            ..Default::default()
        };
        let env = session_env(&s, &root(), &req, Some(("xterm", "/dev/pts/3")));
        let get = |k: &str| env.iter().find(|(ek, _)| ek == k).map(|(_, v)| v.as_str());
        assert_eq!(get("PATH"), Some("/x"));
        assert_eq!(get("HOME"), Some("/root"));
        assert_eq!(get("USER"), Some("root"));
        assert_eq!(get("LOGNAME"), Some("root"));
        assert_eq!(get("SHELL"), Some("/bin/bash"));
        assert_eq!(get("LANG"), Some("de_DE.UTF-8"));
        assert_eq!(get("TERM"), Some("xterm"));
        assert_eq!(get("SSH_TTY"), Some("/dev/pts/3"));
        assert_eq!(get("SSH_CONNECTION"), Some("10.0.0.1 50000 10.0.0.2 22"));
        assert_eq!(get("SSH_CLIENT"), Some("10.0.0.1 50000 22"));
        assert_eq!(env.iter().filter(|(k, _)| k == "HOME").count(), 1);
        let plain = session_env(&s, &root(), &Request::default(), None);
        assert!(!plain.iter().any(|(k, _)| k == "TERM" || k == "SSH_TTY"));
    }

    #[test]
    fn cwd_falls_back_from_workdir_to_home_to_root() {
        let d = tempfile::tempdir().unwrap();
        let missing = d.path().join("missing");
        assert_eq!(session_cwd(Some(d.path()), Path::new("/")), d.path());
        assert_eq!(session_cwd(Some(&missing), d.path()), d.path());
        assert_eq!(session_cwd(None, &missing), Path::new("/"));
    }

    #[test]
    fn full_stdin_queue_waits_for_the_writer_but_not_forever() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (stdin, mut rx, room) = Stdin::new();
            // Fills the queue exactly.
            let big = vec![0u8; STDIN_BUFFER];
            stdin.push(&big).await;
            assert_eq!(room.available_permits(), 0);
            // Nobody reads: the next push waits STDIN_STALL, then queues without room.
            let t = std::time::Instant::now();
            stdin.push(b"more").await;
            assert!(t.elapsed() >= STDIN_STALL, "{:?}", t.elapsed());
            let (first, held) = rx.recv().await.unwrap();
            assert_eq!((first.len(), held as usize), (STDIN_BUFFER, STDIN_BUFFER));
            assert_eq!(rx.recv().await.unwrap(), (b"more".to_vec(), 0));
            // A writer giving the room back lets the next push through at once.
            room.add_permits(held as usize);
            let t = std::time::Instant::now();
            stdin.push(b"x").await;
            assert!(t.elapsed() < STDIN_STALL / 2);
            // A closed child (writer gone) drops input without waiting.
            drop(rx);
            let t = std::time::Instant::now();
            stdin.push(&big).await;
            assert!(t.elapsed() < STDIN_STALL / 2);
        });
    }

    #[test]
    fn argv0_and_signal_names() {
        assert_eq!(shell_argv0(Path::new("/bin/bash"), true), "-bash");
        assert_eq!(shell_argv0(Path::new("/bin/sh"), false), "sh");
        assert!(matches!(signal_name(libc::SIGTERM), Sig::TERM));
        assert!(matches!(signal_name(libc::SIGUSR2), Sig::Custom(ref s) if s == "USR2"));
        assert!(matches!(signal_name(64), Sig::Custom(ref s) if s == "SIG64"));
        assert_eq!(signal_number(&Sig::INT), Some(libc::SIGINT));
        assert_eq!(
            signal_number(&Sig::Custom("WINCH".into())),
            Some(libc::SIGWINCH)
        );
        assert_eq!(signal_number(&Sig::Custom("NOPE".into())), None);
    }
}
