//! A helper server in a temp dir, with recording fakes behind it, and raw socket clients.

use std::ffi::CString;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use banger_config::Ipv4Cidr;
use banger_helper::{FakeHost, Helper, HelperClient, HelperConfig, HostOps, ServeOptions};
use banger_net::{BridgeName, NetOps, RecordingNetOps};
use banger_sys::{Cmd, CommandRunner, RunError};
use tokio::sync::oneshot;

pub const VM_ID: &str = "0123456789ab";

/// Whether this process is root.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// The owner for tests: uid 4242 when we are root (so root and the owner are two uids), else
/// ourselves (so the files we make are the owner's).
pub fn test_owner() -> u32 {
    if is_root() {
        4242
    } else {
        nix::unistd::geteuid().as_raw()
    }
}

/// A runner that records every command and answers like the real programs would:
/// `losetup --find --show` prints `/dev/loop7`, `mmdebstrap` writes a small tar to its output.
#[derive(Debug, Default)]
pub struct ScriptedRunner {
    pub calls: Mutex<Vec<Cmd>>,
}

impl ScriptedRunner {
    pub fn argvs(&self) -> Vec<Vec<String>> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .map(|c| {
                std::iter::once(c.program.display().to_string())
                    .chain(c.args.iter().map(|a| a.to_string_lossy().into_owned()))
                    .collect()
            })
            .collect()
    }
}

pub const FAKE_TAR: &[u8] = b"not really a tar, but bytes all the same";

#[async_trait::async_trait]
impl CommandRunner for ScriptedRunner {
    async fn run(&self, cmd: &Cmd) -> Result<Vec<u8>, RunError> {
        self.calls.lock().unwrap().push(cmd.clone());
        let program = cmd.program.display().to_string();
        let args: Vec<String> = cmd
            .args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        match program.as_str() {
            "losetup" if args.first().map(String::as_str) == Some("--find") => {
                Ok(b"/dev/loop7\n".to_vec())
            }
            "mmdebstrap" => {
                let out = &args[args.len() - 2];
                std::fs::write(out, FAKE_TAR).map_err(|source| RunError::Spawn {
                    cmd: cmd.display(),
                    source,
                })?;
                Ok(Vec::new())
            }
            _ => Ok(Vec::new()),
        }
    }
}

/// One test installation: directories, the fakes and a running server.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub state: PathBuf,
    pub run: PathBuf,
    pub socket: PathBuf,
    pub cfg: HelperConfig,
    pub net: Arc<RecordingNetOps>,
    pub host: Arc<FakeHost>,
    pub recording: Arc<banger_sys::RecordingRunner>,
    pub scripted: Arc<ScriptedRunner>,
    stop: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
}

pub fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

impl Env {
    /// Builds `<tmp>/state/{images/base/rootfs.ext4, vms/<id>/{cow,root.ext4}, build/}`,
    /// `<tmp>/run/`, and serves `<tmp>/sock/helper.sock` (mode 0666, so a foreign uid reaches
    /// the SO_PEERCRED check). With `scripted`, commands go to a [`ScriptedRunner`];
    /// otherwise to banger-sys's `RecordingRunner`.
    pub async fn start(scripted: bool, opts: ServeOptions) -> Env {
        Self::start_with(scripted, None, opts).await
    }

    /// [`Env::start`], with `runner` (when given) running the commands.
    pub async fn start_with(
        scripted: bool,
        runner: Option<Arc<dyn CommandRunner>>,
        opts: ServeOptions,
    ) -> Env {
        let dir = tempfile::tempdir().unwrap();
        // Traversable, so a client running as another uid can reach the socket.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        let state = dir.path().join("state");
        let run = dir.path().join("run");
        for d in [
            state.join("images/base"),
            state.join(format!("vms/{VM_ID}")),
            state.join("build"),
            run.clone(),
        ] {
            std::fs::create_dir_all(&d).unwrap();
        }
        for d in [&state, &run] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700)).unwrap();
        }
        std::fs::write(state.join("images/base/rootfs.ext4"), b"ext4").unwrap();
        std::fs::write(state.join(format!("vms/{VM_ID}/cow")), b"cow").unwrap();
        std::fs::write(state.join(format!("vms/{VM_ID}/root.ext4")), b"root").unwrap();
        let sockdir = dir.path().join("sock");
        std::fs::create_dir(&sockdir).unwrap();
        std::fs::set_permissions(&sockdir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let socket = sockdir.join("helper.sock");
        let cfg = HelperConfig {
            owner_uid: test_owner(),
            state_dir: state.clone(),
            runtime_dir: run.clone(),
            bridge_name: BridgeName::default(),
            bridge_cidr: Ipv4Cidr::parse("172.30.0.0/24").unwrap(),
        };
        cfg.check().expect("the test config is valid");

        let net = Arc::new(RecordingNetOps::new());
        let host = Arc::new(FakeHost::new());
        let recording = Arc::new(banger_sys::RecordingRunner::default());
        let scripted_runner = Arc::new(ScriptedRunner::default());
        let runner: Arc<dyn CommandRunner> = match runner {
            Some(r) => r,
            None if scripted => scripted_runner.clone(),
            None => recording.clone(),
        };
        let scratch = dir.path().join("scratch");
        std::fs::create_dir(&scratch).unwrap();
        let helper = Helper::new(
            cfg.clone(),
            net.clone() as Arc<dyn NetOps>,
            runner,
            host.clone() as Arc<dyn HostOps>,
        )
        .with_scratch_dir(&scratch);
        let listener = banger_helper::bind(&socket, &cfg, 0o666).expect("bind");
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(banger_helper::serve(
            listener,
            Arc::new(helper),
            opts,
            async move {
                let _ = stopped.await;
            },
        ));
        Env {
            dir,
            state,
            run,
            socket,
            cfg,
            net,
            host,
            recording,
            scripted: scripted_runner,
            stop: Some(stop),
            server: Some(server),
        }
    }

    pub fn client(&self) -> HelperClient {
        HelperClient::new(&self.socket)
    }

    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(h) = self.server.take() {
            h.await.unwrap();
        }
    }
}

/// A raw connection: writes `line` (a newline is added), reads one reply line. Returns the
/// reply and whether the connection was then closed by the helper (checked by sending a Ping).
pub fn raw_exchange(socket: &Path, line: &[u8]) -> (String, bool) {
    let mut st = std::os::unix::net::UnixStream::connect(socket).unwrap();
    st.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    let mut data = line.to_vec();
    data.push(b'\n');
    // The helper may answer and close before reading all of a huge line: ignore EPIPE.
    let _ = st.write_all(&data);
    let reply = read_line(&mut st);
    let ping = b"{\"v\":1,\"op_id\":\"op-probe\",\"request\":{\"op\":\"Ping\"}}\n";
    let closed = match st.write_all(ping) {
        Err(_) => true,
        Ok(()) => {
            let r = read_line(&mut st);
            if r.is_empty() {
                true
            } else {
                assert!(r.contains("\"ok\""), "ping after a refusal: {r}");
                false
            }
        }
    };
    (reply, closed)
}

fn read_line(st: &mut std::os::unix::net::UnixStream) -> String {
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match st.read(&mut b) {
            Ok(0) | Err(_) => break,
            Ok(_) if b[0] == b'\n' => break,
            Ok(_) => out.push(b[0]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Sends `line` from a child process running as `uid` (fork, setgroups/setgid/setuid, then
/// raw system calls on buffers prepared before the fork) and returns the reply line.
pub fn exchange_as_uid(uid: u32, socket: &Path, line: &[u8]) -> String {
    let path = CString::new(socket.as_os_str().as_bytes()).unwrap();
    // SAFETY: sockaddr_un is plain old data; all-zero is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, b) in addr.sun_path.iter_mut().zip(path.as_bytes_with_nul()) {
        *d = *b as libc::c_char;
    }
    let mut data = line.to_vec();
    data.push(b'\n');
    let mut buf = vec![0u8; 4096];
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: fds has room for the two descriptors pipe writes.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    let (r, w) = (fds[0], fds[1]);
    // SAFETY: the child only makes raw system calls on memory prepared above and ends with
    // _exit; it allocates nothing and takes no locks, so forking a threaded process is sound.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        // SAFETY: see above; every pointer refers to memory owned by this (copied) process.
        unsafe {
            libc::close(r);
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(uid) != 0
                || libc::setuid(uid) != 0
            {
                libc::_exit(10);
            }
            let sock = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
            if sock < 0 {
                libc::_exit(11);
            }
            let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
            if libc::connect(sock, &addr as *const _ as *const libc::sockaddr, len) != 0 {
                libc::_exit(12);
            }
            libc::write(sock, data.as_ptr().cast(), data.len());
            let mut got = 0usize;
            loop {
                let n = libc::read(sock, buf.as_mut_ptr().add(got).cast(), buf.len() - got);
                if n <= 0 {
                    break;
                }
                got += n as usize;
                if buf[..got].contains(&b'\n') || got == buf.len() {
                    break;
                }
            }
            libc::write(w, buf.as_ptr().cast(), got);
            libc::_exit(0);
        }
    }
    // SAFETY: closing our copy of the write end, which we own.
    unsafe { libc::close(w) };
    // SAFETY: `r` is the pipe's read end, owned here from now on.
    let mut f = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(r) };
    let mut out = String::new();
    f.read_to_string(&mut out).unwrap();
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "child as uid {uid} failed: status {status:#x}"
    );
    out.trim_end().to_string()
}
