//! The agent's built-in ssh server, for images without sshd ([`banger_guest::SshServer::Agent`]).
//!
//! Scope: exactly what banger's host side needs from OpenSSH's sshd, driven by the real OpenSSH
//! client (`ssh host cmd`, `ssh -t`, ControlMaster multiplexing, tar over `exec`):
//!
//! - host key: the VM's ed25519 key from the config disk (the one in the host's known_hosts);
//! - authentication: `publickey` only, user `root` only, only the config's authorized keys;
//! - session channels, several per connection: `exec` (`<shell> -c <command>`, the shell from
//!   `/etc/passwd`, else `/bin/sh`), `shell` (a login shell), `pty-req` and `window-change`
//!   (a real pty as controlling terminal), `env` (`LANG`, `LC_*`, `TERM`), `signal`, stdin EOF,
//!   `exit-status`/`exit-signal`;
//! - refused: other users and auth methods, subsystems (sftp), port and agent forwarding, X11.
//!
//! Sessions run as the server's own user (root in the guest; whoever runs the tests on a host)
//! with the image's environment ([`Settings::env`]) and working directory. Each session is
//! started with `setsid`; its process group is killed when its channel or connection goes away
//! before it exits.
//!
//! Limits: [`MAX_CONNECTIONS`] connections, [`MAX_CHANNELS`] sessions per connection,
//! [`LOGIN_GRACE`] to authenticate. A failing session or connection never ends the server:
//! russh parses the wire in each connection's own task, and every error stays in that task.

mod pty;
mod session;
mod user;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use banger_guest::SshIdentity;
use russh::keys::{PrivateKey, PublicKey};
use russh::server::{Auth, ChannelOpenHandle, Msg, PublicKeyOffer, Session, VerifiedPublicKey};
use russh::{Channel, ChannelId, ChannelOpenFailure, MethodKind, MethodSet, Pty, Sig};
use tokio::sync::Semaphore;

pub use pty::WinSize;
pub use user::User;

/// Connections served at once (authenticated or not); more are closed at once.
pub const MAX_CONNECTIONS: usize = 64;
/// Session channels per connection (ControlMaster puts every session on one connection).
pub const MAX_CHANNELS: usize = 32;
/// Time from accepting a connection to successful authentication.
pub const LOGIN_GRACE: Duration = Duration::from_secs(30);
/// Client input queued per session before the connection waits for the child to read.
pub const STDIN_BUFFER: usize = 1 << 20;
/// The longest such a wait lasts (see `session`'s docs for why it is bounded).
pub const STDIN_STALL: Duration = Duration::from_secs(1);

/// Why the server cannot start. Once it runs, nothing ends it.
#[derive(Debug, thiserror::Error)]
pub enum SshdError {
    #[error("host key: {0}")]
    HostKey(String),
    #[error("none of the {0} authorized key(s) is a usable public key")]
    NoAuthorizedKeys(usize),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Everything the server needs, parsed and checked before it starts (so a bad key fails the
/// boot step with a clear error instead of a server that restarts forever).
#[derive(Clone)]
pub struct Settings {
    host_key: PrivateKey,
    authorized: Vec<PublicKey>,
    /// The sessions' base environment (the image's, with PATH): see
    /// [`banger_guest::GuestConfig::command_env`].
    pub env: Vec<(String, String)>,
    /// The sessions' working directory; `None` (or a missing directory) means the home.
    pub workdir: Option<PathBuf>,
    /// Where the session user is looked up.
    pub passwd: PathBuf,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("host_key", &"***")
            .field("authorized", &self.authorized.len())
            .field("env", &self.env)
            .field("workdir", &self.workdir)
            .finish()
    }
}

impl Settings {
    /// Parses the identity's host key (OpenSSH private key format, what sshd would read) and
    /// authorized keys. Authorized entries that do not parse (options before the key type, an
    /// algorithm this build lacks) are skipped with a console line; none usable is an error.
    pub fn new(
        identity: &SshIdentity,
        env: Vec<(String, String)>,
        workdir: Option<PathBuf>,
    ) -> Result<Self, SshdError> {
        let host_key = PrivateKey::from_openssh(identity.host_key_ed25519.trim())
            .map_err(|e| SshdError::HostKey(e.to_string()))?;
        if host_key.is_encrypted() {
            return Err(SshdError::HostKey("it is passphrase-protected".into()));
        }
        let mut authorized = Vec::new();
        for (i, line) in identity.authorized_keys.iter().enumerate() {
            match PublicKey::from_openssh(line.trim()) {
                Ok(k) => authorized.push(k),
                Err(e) => {
                    crate::console::line(&format!("sshd: authorized key {} skipped: {e}", i + 1))
                }
            }
        }
        if authorized.is_empty() {
            return Err(SshdError::NoAuthorizedKeys(identity.authorized_keys.len()));
        }
        Ok(Settings {
            host_key,
            authorized,
            env,
            workdir,
            passwd: PathBuf::from("/etc/passwd"),
        })
    }

    #[cfg(test)]
    pub(crate) fn for_tests(env: Vec<(String, String)>, workdir: Option<PathBuf>) -> Self {
        Settings::new(&tests::identity(), env, workdir).expect("test identity")
    }

    fn is_authorized(&self, user: &str, key: &PublicKey) -> bool {
        // Compare the key material only: comments differ freely.
        user == "root"
            && self
                .authorized
                .iter()
                .any(|k| k.key_data() == key.key_data())
    }

    /// Serves ssh on `listener` forever, on a current-thread tokio runtime of its own (the
    /// calling thread runs it). Returns only if the runtime cannot be set up.
    pub fn serve(self, listener: std::net::TcpListener) -> Result<Infallible, SshdError> {
        let io = |what| move |source| SshdError::Io { what, source };
        listener
            .set_nonblocking(true)
            .map_err(io("making the listener non-blocking"))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(io("starting the tokio runtime"))?;
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener)
                .map_err(io("registering the listener"))?;
            accept_loop(listener, Arc::new(self)).await
        })
    }
}

/// Parses the identity and serves ssh on `listener` forever (see [`Settings::serve`]). `env` is
/// the sessions' base environment (use [`banger_guest::GuestConfig::command_env`]), `workdir`
/// their working directory.
pub fn serve(
    listener: std::net::TcpListener,
    identity: &SshIdentity,
    env: Vec<(String, String)>,
    workdir: Option<PathBuf>,
) -> Result<Infallible, SshdError> {
    Settings::new(identity, env, workdir)?.serve(listener)
}

fn server_config(settings: &Settings) -> russh::server::Config {
    russh::server::Config {
        server_id: russh::SshId::Standard("SSH-2.0-banger_agent".into()),
        methods: MethodSet::from(&[MethodKind::PublicKey][..]),
        // Key-based auth cannot be guessed, so a long constant rejection time would only slow
        // down clients that offer several keys; the initial "none" probe is answered at once.
        auth_rejection_time: Duration::from_millis(100),
        auth_rejection_time_initial: Some(Duration::ZERO),
        keys: vec![settings.host_key.clone()],
        max_auth_attempts: 6,
        // Sessions may be silent for hours (`sleep`, a quiet build): no idle timeout, but a
        // keepalive so connections of vanished clients end (and their sessions are killed).
        inactivity_timeout: None,
        keepalive_interval: Some(Duration::from_secs(30)),
        keepalive_max: 4,
        nodelay: true,
        ..Default::default()
    }
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    settings: Arc<Settings>,
) -> Result<Infallible, SshdError> {
    let config = Arc::new(server_config(&settings));
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    // The console is shared with the guest: at most one line per 5 s about a persistent problem.
    let mut last_complaint: Option<tokio::time::Instant> = None;
    let mut complain = |msg: String| {
        let now = tokio::time::Instant::now();
        if last_complaint.is_none_or(|t| now - t >= Duration::from_secs(5)) {
            last_complaint = Some(now);
            crate::console::line(&msg);
        }
    };
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // EMFILE, ENOBUFS, ECONNABORTED...: back off rather than spin.
                complain(format!("sshd: accept: {e}"));
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            complain(format!(
                "sshd: refusing {peer}: {MAX_CONNECTIONS} connections already"
            ));
            continue;
        };
        let _ = stream.set_nodelay(true);
        let local = stream.local_addr().ok();
        let config = config.clone();
        let settings = settings.clone();
        tokio::spawn(async move {
            connection(stream, peer, local, config, settings).await;
            drop(slot);
        });
    }
}

/// One connection, from the version exchange to its end.
async fn connection(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    local: Option<SocketAddr>,
    config: Arc<russh::server::Config>,
    settings: Arc<Settings>,
) {
    let authed = Arc::new(AtomicBool::new(false));
    let handler = Conn {
        settings,
        connection: local.map(|l| format!("{} {} {} {}", peer.ip(), peer.port(), l.ip(), l.port())),
        authed: authed.clone(),
        channels: HashMap::new(),
    };
    // run_stream waits for the client's version line: bound that too.
    let session = match tokio::time::timeout(
        LOGIN_GRACE,
        russh::server::run_stream(config, stream, handler),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(_)) | Err(_) => return,
    };
    let handle = session.handle();
    tokio::pin!(session);
    tokio::select! {
        _ = &mut session => return,
        _ = tokio::time::sleep(LOGIN_GRACE) => {}
    }
    if !authed.load(Ordering::SeqCst) {
        let _ = handle
            .disconnect(
                russh::Disconnect::ByApplication,
                "authentication timeout".into(),
                String::new(),
            )
            .await;
    }
    // Errors of a finished connection (a client that vanished, a protocol violation) concern
    // only that connection.
    let _ = session.await;
}

/// A session channel's state before and while its child runs.
#[derive(Debug, Default)]
struct Chan {
    /// From `pty-req`, until the session starts.
    pty: Option<(pty::Pty, String)>,
    /// From `env` requests, until the session starts.
    env: Vec<(String, String)>,
    running: Option<session::Running>,
}

/// The russh handler of one connection.
struct Conn {
    settings: Arc<Settings>,
    /// `SSH_CONNECTION`.
    connection: Option<String>,
    authed: Arc<AtomicBool>,
    channels: HashMap<ChannelId, Chan>,
}

/// Client variables a session accepts, like Debian's `AcceptEnv LANG LC_*` (plus `TERM`).
pub fn accept_env(name: &str, value: &str) -> bool {
    let name_ok = !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    name_ok
        && !value.contains('\0')
        && (name == "LANG" || name == "TERM" || name.starts_with("LC_"))
}

impl Conn {
    /// Starts the session on `channel`: `command` for `exec`, `None` for `shell`.
    fn start(&mut self, channel: ChannelId, command: Option<Vec<u8>>, session: &mut Session) {
        let Some(chan) = self.channels.get_mut(&channel) else {
            let _ = session.channel_failure(channel);
            return;
        };
        if chan.running.is_some() {
            let _ = session.channel_failure(channel);
            return;
        }
        let user = user::current(&self.settings.passwd);
        let req = session::Request {
            command,
            pty: chan.pty.take(),
            env: std::mem::take(&mut chan.env),
            connection: self.connection.clone(),
        };
        match session::start(&self.settings, &user, req, session.handle(), channel) {
            Ok(running) => {
                chan.running = Some(running);
                let _ = session.channel_success(channel);
            }
            Err(e) => {
                // The client prints "exec request failed"; say why on its stderr first.
                let msg = format!(
                    "banger-agent: cannot start {}: {e}\r\n",
                    user.shell.display()
                );
                let _ = session.extended_data(channel, 1, msg.into_bytes());
                let _ = session.channel_failure(channel);
            }
        }
    }
}

impl russh::server::Handler for Conn {
    type Error = russh::Error;

    async fn auth_publickey_offered(
        &mut self,
        user: &str,
        offer: PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        Ok(if self.settings.is_authorized(user, offer.public_key) {
            Auth::Accept
        } else {
            Auth::reject()
        })
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        let ok = self.settings.is_authorized(user, key.public_key);
        Ok(if ok { Auth::Accept } else { Auth::reject() })
    }

    async fn auth_succeeded(&mut self, _session: &mut Session) -> Result<(), Self::Error> {
        self.authed.store(true, Ordering::SeqCst);
        Ok(())
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if self.channels.len() >= MAX_CHANNELS {
            reply.reject(ChannelOpenFailure::ResourceShortage).await;
            return Ok(());
        }
        self.channels.insert(channel.id(), Chan::default());
        // Requests and data reach this handler's callbacks; the channel object is not needed
        // (its queue would only fill up).
        drop(channel);
        reply.accept().await;
        Ok(())
    }

    async fn pty_request(
        &mut self,
        channel: ChannelId,
        term: &str,
        col_width: u32,
        row_height: u32,
        pix_width: u32,
        pix_height: u32,
        _modes: &[(Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let size = WinSize {
            cols: col_width,
            rows: row_height,
            px_width: pix_width,
            px_height: pix_height,
        };
        let ok = match self.channels.get_mut(&channel) {
            Some(chan) if chan.running.is_none() && chan.pty.is_none() => match pty::open(size) {
                Ok(p) => {
                    let term = if term.is_empty() || term.contains('\0') {
                        "dumb"
                    } else {
                        term
                    };
                    chan.pty = Some((p, term.to_string()));
                    true
                }
                Err(e) => {
                    // The client goes on without a terminal ("PTY allocation request failed").
                    crate::console::line(&format!("sshd: allocating a pty: {e}"));
                    false
                }
            },
            _ => false,
        };
        if ok {
            session.channel_success(channel)?;
        } else {
            session.channel_failure(channel)?;
        }
        Ok(())
    }

    async fn window_change_request(
        &mut self,
        channel: ChannelId,
        col_width: u32,
        row_height: u32,
        pix_width: u32,
        pix_height: u32,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let size = WinSize {
            cols: col_width,
            rows: row_height,
            px_width: pix_width,
            px_height: pix_height,
        };
        match self.channels.get(&channel) {
            Some(Chan {
                running: Some(running),
                ..
            }) => running.resize(size),
            // Resized between pty-req and the shell: the terminal exists already.
            Some(Chan {
                pty: Some((p, _)), ..
            }) => {
                let _ = pty::set_size(std::os::fd::AsRawFd::as_raw_fd(&p.master), size);
            }
            _ => {}
        }
        Ok(())
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        variable_name: &str,
        variable_value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        match self.channels.get_mut(&channel) {
            Some(chan) if chan.running.is_none() && accept_env(variable_name, variable_value) => {
                chan.env
                    .push((variable_name.to_string(), variable_value.to_string()));
                session.channel_success(channel)?;
            }
            _ => session.channel_failure(channel)?,
        }
        Ok(())
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.start(channel, Some(data.to_vec()), session);
        Ok(())
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.start(channel, None, session);
        Ok(())
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        _name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        // No sftp server here; banger copies files with tar over exec.
        session.channel_failure(channel)?;
        Ok(())
    }

    async fn x11_request(
        &mut self,
        channel: ChannelId,
        _single_connection: bool,
        _x11_auth_protocol: &str,
        _x11_auth_cookie: &str,
        _x11_screen_number: u32,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_failure(channel)?;
        Ok(())
    }

    async fn signal(
        &mut self,
        channel: ChannelId,
        signal: Sig,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(running) = self.channels.get(&channel).and_then(|c| c.running.as_ref()) {
            running.signal(&signal);
        }
        Ok(())
    }

    async fn data(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let stdin = self
            .channels
            .get(&channel)
            .and_then(|c| c.running.as_ref())
            .and_then(|r| r.stdin.as_ref());
        if let Some(stdin) = stdin {
            stdin.push(data).await;
        }
        Ok(())
    }

    async fn channel_eof(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(running) = self
            .channels
            .get_mut(&channel)
            .and_then(|c| c.running.as_mut())
        {
            // The writer finishes what is queued, then closes the child's stdin.
            running.stdin = None;
        }
        Ok(())
    }

    async fn channel_close(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        // Dropping the state kills a session that is still running.
        self.channels.remove(&channel);
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A throw-away key pair made with `ssh-keygen -t ed25519 -N ''`, used only by these tests.
    const TEST_KEY: &str = "-----BEGIN OPENSSH PRIVATE KEY-----
b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW
QyNTUxOQAAACApiML6qGXtGET429ix1EVngNeJLVkRZHKaC9NbkDy/JwAAAIganSNbGp0j
WwAAAAtzc2gtZWQyNTUxOQAAACApiML6qGXtGET429ix1EVngNeJLVkRZHKaC9NbkDy/Jw
AAAEBVMjqM1hf7EsLaMEI9DeQ//nebAyggz/EdjoyZHg8mLSmIwvqoZe0YRPjb2LHURWeA
14ktWRFkcpoL01uQPL8nAAAABHRlc3QB
-----END OPENSSH PRIVATE KEY-----
";
    const TEST_PUB: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAICmIwvqoZe0YRPjb2LHURWeA14ktWRFkcpoL01uQPL8n test";

    pub(crate) fn identity() -> SshIdentity {
        SshIdentity {
            host_key_ed25519: TEST_KEY.into(),
            host_key_ed25519_pub: TEST_PUB.into(),
            authorized_keys: vec![TEST_PUB.into()],
        }
    }

    #[test]
    fn settings_parse_keys_and_check_users() {
        let mut id = identity();
        id.authorized_keys = vec![
            "garbage".into(),
            format!("{} other-comment", TEST_PUB.rsplit_once(' ').unwrap().0),
        ];
        let s = Settings::new(&id, vec![], None).unwrap();
        assert_eq!(s.authorized.len(), 1);
        let key = PublicKey::from_openssh(TEST_PUB).unwrap();
        assert!(s.is_authorized("root", &key));
        assert!(!s.is_authorized("nobody", &key));
        let other = PublicKey::from_openssh(
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBmZN6eDRs8Ar8DBNw3M8FNzQlq1nOVNsTQikj4xPlfQ x",
        )
        .unwrap();
        assert!(!s.is_authorized("root", &other));
        assert!(!format!("{s:?}").contains("BEGIN"));
    }

    #[test]
    fn bad_identities_are_refused_with_reasons() {
        let mut id = identity();
        id.host_key_ed25519 =
            "-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----\n".into();
        let e = Settings::new(&id, vec![], None).unwrap_err().to_string();
        assert!(e.starts_with("host key:"), "{e}");
        let mut id = identity();
        id.authorized_keys = vec!["ssh-ed25519 !!!".into()];
        let e = Settings::new(&id, vec![], None).unwrap_err().to_string();
        assert!(e.contains("none of the 1 authorized key"), "{e}");
    }

    #[test]
    fn only_lang_lc_and_term_are_accepted() {
        assert!(accept_env("LANG", "C.UTF-8"));
        assert!(accept_env("LC_ALL", "C"));
        assert!(accept_env("TERM", "xterm"));
        assert!(!accept_env("LD_PRELOAD", "/x.so"));
        assert!(!accept_env("PATH", "/tmp"));
        assert!(!accept_env("LC_X=Y", "1"));
        assert!(!accept_env("LANG", "a\0b"));
        assert!(!accept_env("", "x"));
    }
}
