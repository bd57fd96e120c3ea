//! The built-in ssh server driven by the real OpenSSH client, on the host: `serve` on
//! 127.0.0.1 with a fresh host key, sessions run as the test's own user.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use banger_guest::SshIdentity;

use crate::support::which;

const TIMEOUT: Duration = Duration::from_secs(60);

/// An ssh target: port on 127.0.0.1, client key, known_hosts with the server's key.
pub struct Server {
    pub port: u16,
    pub dir: tempfile::TempDir,
    pub key: PathBuf,
    pub known_hosts: PathBuf,
}

pub fn keygen(path: &Path) {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "banger-test", "-f"])
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

/// A running server, or `None` (after printing SKIP) without the OpenSSH client.
fn server(env: &[(&str, &str)], workdir: Option<&Path>) -> Option<Server> {
    if which("ssh").is_none() || which("ssh-keygen").is_none() {
        eprintln!("SKIP: the OpenSSH client (ssh, ssh-keygen) is not installed");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let host = dir.path().join("host_key");
    let key = dir.path().join("client_key");
    keygen(&host);
    keygen(&key);
    let read = |p: PathBuf| std::fs::read_to_string(p).unwrap();
    let identity = SshIdentity {
        host_key_ed25519: read(host.clone()),
        host_key_ed25519_pub: read(host.with_extension("pub")).trim().to_string(),
        authorized_keys: vec![read(key.with_extension("pub")).trim().to_string()],
    };
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let workdir = workdir.map(Path::to_path_buf);
    std::thread::spawn(move || {
        let err = banger_agent::sshd::serve(listener, &identity, env, workdir).unwrap_err();
        panic!("server ended: {err}");
    });
    let known_hosts = dir.path().join("known_hosts");
    std::fs::write(
        &known_hosts,
        format!(
            "[127.0.0.1]:{port} {}\n",
            read(host.with_extension("pub")).trim()
        ),
    )
    .unwrap();
    Some(Server {
        port,
        dir,
        key,
        known_hosts,
    })
}

fn default_env() -> Vec<(&'static str, &'static str)> {
    vec![
        ("PATH", banger_guest::DEFAULT_PATH),
        ("BANGER_TEST_VAR", "from config"),
    ]
}

impl Server {
    /// `ssh` with strict host key checking against the server's key and only `key`.
    pub fn ssh_with(&self, key: &Path, user: &str, opts: &[&str]) -> Command {
        let mut c = Command::new("ssh");
        c.args(["-F", "/dev/null", "-p", &self.port.to_string(), "-i"])
            .arg(key)
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", self.known_hosts.display()))
            .args([
                "-o",
                "StrictHostKeyChecking=yes",
                "-o",
                "BatchMode=yes",
                "-o",
                "IdentitiesOnly=yes",
                "-o",
                "IdentityAgent=none",
                "-o",
                "LogLevel=ERROR",
                "-o",
                "ConnectTimeout=20",
            ])
            .args(opts)
            .arg(format!("{user}@127.0.0.1"));
        c
    }

    pub fn ssh(&self, opts: &[&str]) -> Command {
        self.ssh_with(&self.key, "root", opts)
    }

    /// Runs `remote` with `stdin` fed in (or /dev/null).
    pub fn run(&self, opts: &[&str], remote: &str, stdin: Option<&[u8]>) -> Output {
        let mut c = self.ssh(opts);
        c.arg(remote);
        run_with(c, stdin)
    }
}

/// Runs `c` to completion with `stdin`, killing it after [`TIMEOUT`].
pub fn run_with(mut c: Command, stdin: Option<&[u8]>) -> Output {
    c.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let pid = child.id();
    let writer = stdin.map(|data| {
        let mut w = child.stdin.take().unwrap();
        let data = data.to_vec();
        std::thread::spawn(move || {
            let _ = w.write_all(&data);
        })
    });
    let watchdog = std::thread::spawn(move || {
        let start = Instant::now();
        while start.elapsed() < TIMEOUT {
            std::thread::sleep(Duration::from_millis(100));
            if !Path::new(&format!("/proc/{pid}")).exists() {
                return false;
            }
        }
        // SAFETY: kill(2) of our own child.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        true
    });
    let out = child.wait_with_output().unwrap();
    if let Some(w) = writer {
        w.join().unwrap();
    }
    drop(watchdog);
    out
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn assert_ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "ssh failed: {:?}\nstdout: {}\nstderr: {}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

#[test]
fn exec_exit_code_stdout_stderr_and_stdin() {
    let Some(s) = server(&default_env(), None) else {
        return;
    };
    let out = s.run(&[], "echo hi; exit 7", None);
    assert_eq!(text(&out.stdout), "hi\n", "{}", text(&out.stderr));
    assert_eq!(out.status.code(), Some(7));

    let out = s.run(&[], "echo out; echo err >&2; exit 3", None);
    assert_eq!(text(&out.stdout), "out\n");
    assert_eq!(text(&out.stderr), "err\n");
    assert_eq!(out.status.code(), Some(3));

    let out = s.run(&[], "cat | wc -c", Some(b"data"));
    assert_eq!(assert_ok(&out).trim(), "4");

    // A session killed by a signal: OpenSSH's client reports 255.
    let out = s.run(&[], "kill -TERM $$", None);
    assert_eq!(out.status.code(), Some(255), "{out:?}");

    // Arguments arrive as one string for the remote shell, as with OpenSSH.
    let mut c = s.ssh(&[]);
    c.args(["printf", "'%s|'", "a b", "c"]);
    let out = run_with(c, None);
    assert_eq!(assert_ok(&out), "a|b|c|");
}

#[test]
fn five_mib_binary_through_cat() {
    let Some(s) = server(&default_env(), None) else {
        return;
    };
    let mut data = vec![0u8; 5 << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for b in &mut data {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = (x >> 24) as u8;
    }
    let t = Instant::now();
    let out = s.run(&[], "cat", Some(&data));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(out.stdout.len(), data.len());
    assert!(out.stdout == data, "content differs");
    eprintln!("5 MiB round trip through cat: {:?}", t.elapsed());
}

#[test]
fn tar_round_trip() {
    let Some(s) = server(&default_env(), None) else {
        return;
    };
    let src = s.dir.path().join("src");
    std::fs::create_dir_all(src.join("sub/deeper")).unwrap();
    std::fs::create_dir_all(src.join("empty")).unwrap();
    std::fs::write(src.join("a.txt"), "hello\n").unwrap();
    std::fs::write(
        src.join("sub/deeper/bin"),
        (0..=255u8).cycle().take(300_000).collect::<Vec<_>>(),
    )
    .unwrap();
    std::os::unix::fs::symlink("../a.txt", src.join("sub/link")).unwrap();
    let dest = s.dir.path().join("dest/x");
    let ssh = s.ssh(&[]);
    let ssh_words: Vec<String> = std::iter::once(ssh.get_program())
        .chain(ssh.get_args())
        .map(|a| format!("'{}'", a.to_string_lossy()))
        .collect();
    let script = format!(
        "tar -C '{}' -cf - . | {} 'mkdir -p {} && tar -C {} -xf -'",
        src.display(),
        ssh_words.join(" "),
        dest.display(),
        dest.display()
    );
    let mut c = Command::new("sh");
    c.arg("-c").arg(script);
    assert_ok(&run_with(c, None));
    let diff = Command::new("diff")
        .arg("-r")
        .arg("--no-dereference")
        .arg(&src)
        .arg(&dest)
        .output()
        .unwrap();
    assert!(diff.status.success(), "{}", text(&diff.stdout));
    assert_eq!(
        std::fs::read_link(dest.join("sub/link")).unwrap(),
        Path::new("../a.txt")
    );
    assert!(dest.join("empty").is_dir());
}

#[test]
fn environment_workdir_and_accepted_client_variables() {
    let d = tempfile::tempdir().unwrap();
    let workdir = d.path().canonicalize().unwrap();
    let Some(s) = server(&default_env(), Some(&workdir)) else {
        return;
    };
    let mut c = s.ssh(&["-o", "SendEnv=LC_BANGER_TEST", "-o", "SendEnv=NOT_ACCEPTED"]);
    c.env("LC_BANGER_TEST", "sent-by-client")
        .env("NOT_ACCEPTED", "nope")
        .arg(
            "echo \"var=$BANGER_TEST_VAR\"; echo \"path=$PATH\"; echo \"pwd=$(pwd)\"; \
             echo \"lc=$LC_BANGER_TEST\"; echo \"na=${NOT_ACCEPTED-unset}\"; \
             echo \"home=$HOME\"; echo \"conn=$SSH_CONNECTION\"; echo \"term=${TERM-unset}\"",
        );
    let out = assert_ok(&run_with(c, None));
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines.contains(&"var=from config"), "{out}");
    // Debian's bash reads ~/.bashrc when started by an ssh server (it sees SSH_CLIENT), which
    // may prepend to PATH: exactly what OpenSSH's sshd gives too.
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("path=") && l.ends_with(banger_guest::DEFAULT_PATH)),
        "{out}"
    );
    assert!(
        lines.contains(&format!("pwd={}", workdir.display()).as_str()),
        "{out}"
    );
    assert!(lines.contains(&"lc=sent-by-client"), "{out}");
    assert!(lines.contains(&"na=unset"), "{out}");
    // No pty, no TERM from the server (bash itself may set "dumb").
    assert!(
        lines.contains(&"term=unset") || lines.contains(&"term=dumb"),
        "{out}"
    );
    assert!(lines.iter().any(|l| l.starts_with("home=/")), "{out}");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("conn=127.0.0.1 ") && l.ends_with(&format!(" {}", s.port))),
        "{out}"
    );

    // Without a workdir (or with a missing one) sessions start in the home directory.
    let missing = d.path().join("missing");
    let Some(s2) = server(&default_env(), Some(&missing)) else {
        return;
    };
    let out = assert_ok(&s2.run(&[], "pwd; echo $HOME", None));
    let mut l = out.lines();
    let (pwd, home) = (l.next().unwrap(), l.next().unwrap());
    let home_dir = Path::new(home);
    if home_dir.is_dir() {
        assert_eq!(pwd, home, "{out}");
    } else {
        assert_eq!(pwd, "/", "{out}");
    }
}

#[test]
fn login_shell_reads_stdin_without_pty() {
    let Some(s) = server(&default_env(), None) else {
        return;
    };
    let mut c = s.ssh(&["-T"]);
    c.env_remove("LC_ALL");
    let out = run_with(c, Some(b"echo via-shell-$((40+2))\nexit 4\n"));
    assert!(text(&out.stdout).contains("via-shell-42"), "{out:?}");
    assert_eq!(out.status.code(), Some(4), "{out:?}");
}

#[test]
fn refused_keys_users_and_features() {
    let Some(s) = server(&default_env(), None) else {
        return;
    };
    let other = s.dir.path().join("other_key");
    keygen(&other);
    let mut c = s.ssh_with(&other, "root", &[]);
    c.arg("true");
    let out = run_with(c, None);
    assert_eq!(out.status.code(), Some(255));
    assert!(
        text(&out.stderr).contains("Permission denied"),
        "{}",
        text(&out.stderr)
    );

    let mut c = s.ssh_with(&s.key, "nobody", &[]);
    c.arg("true");
    let out = run_with(c, None);
    assert_eq!(out.status.code(), Some(255));
    assert!(text(&out.stderr).contains("Permission denied"));

    // No password or keyboard-interactive fallback is offered.
    let mut c = s.ssh_with(&other, "root", &["-v"]);
    c.arg("true");
    let out = run_with(c, None);
    let err = text(&out.stderr);
    let methods = err
        .lines()
        .find(|l| l.contains("Authentications that can continue:"))
        .unwrap_or_else(|| panic!("{err}"));
    assert!(
        methods.trim_end().ends_with("continue: publickey"),
        "{methods}"
    );

    // sftp subsystem, remote forwarding, stdio forwarding: all refused.
    let mut c = s.ssh(&["-s"]);
    c.arg("sftp");
    let out = run_with(c, None);
    assert!(!out.status.success(), "{out:?}");
    let out = s.run(
        &["-o", "ExitOnForwardFailure=yes", "-R", "0:127.0.0.1:9"],
        "true",
        None,
    );
    assert_eq!(out.status.code(), Some(255), "{out:?}");
    let mut c = s.ssh(&["-W", "127.0.0.1:9"]);
    c.stdin(Stdio::null());
    let out = run_with(c, None);
    assert_eq!(out.status.code(), Some(255), "{out:?}");

    // The server is still fine.
    assert_eq!(
        assert_ok(&s.run(&[], "echo still-here", None)),
        "still-here\n"
    );
}

/// Live (non-zombie) processes whose process group is `pgid`.
fn live_in_group(pgid: i32) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        let Some((_, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        let f: Vec<&str> = rest.split(' ').collect();
        if f.len() > 2 && f[0] != "Z" && f[2] == pgid.to_string() {
            out.push(stat);
        }
    }
    out
}

#[test]
fn killed_client_kills_the_session_process_group() {
    let Some(s) = server(&default_env(), None) else {
        return;
    };
    let mut c = s.ssh(&[]);
    c.arg("echo $$; sleep 100; echo never")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = c.spawn().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while stdout.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
        line.push(b[0]);
    }
    let pgid: i32 = text(&line).trim().parse().unwrap();
    assert!(!live_in_group(pgid).is_empty(), "session not running");
    child.kill().unwrap();
    child.wait().unwrap();
    let start = Instant::now();
    loop {
        let live = live_in_group(pgid);
        if live.is_empty() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "still running: {live:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // ...and the server still serves.
    assert_eq!(assert_ok(&s.run(&[], "echo ok", None)), "ok\n");
}

#[test]
fn control_master_reuses_one_connection() {
    let Some(s) = server(&default_env(), None) else {
        return;
    };
    let cp = s.dir.path().join("cm");
    let cp_opt = format!("ControlPath={}", cp.display());
    let opts = [
        "-o",
        "ControlMaster=auto",
        "-o",
        cp_opt.as_str(),
        "-o",
        "ControlPersist=10",
    ];
    let mut conns = Vec::new();
    for i in 0..5 {
        let out = s.run(&opts, &format!("echo $SSH_CONNECTION; exit {i}"), None);
        assert_eq!(out.status.code(), Some(i), "{out:?}");
        conns.push(text(&out.stdout).trim().to_string());
    }
    assert!(
        conns.iter().all(|c| c == &conns[0] && !c.is_empty()),
        "{conns:?}"
    );

    // Ten concurrent sessions over the same master.
    let t = Instant::now();
    let handles: Vec<_> = (0..10)
        .map(|i| {
            let mut c = s.ssh(&opts);
            c.arg(format!("sleep 1; echo $SSH_CONNECTION; echo n{i}"));
            std::thread::spawn(move || run_with(c, None))
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let out = assert_ok(&h.join().unwrap());
        assert_eq!(out, format!("{}\nn{i}\n", conns[0]));
    }
    assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());

    let mut c = s.ssh(&opts);
    c.args(["-O", "exit"]);
    run_with(c, None);
}

#[test]
fn ten_concurrent_connections() {
    let Some(s) = server(&default_env(), None) else {
        return;
    };
    let t = Instant::now();
    let handles: Vec<_> = (0..10)
        .map(|i| {
            let mut c = s.ssh(&[]);
            c.arg(format!("sleep 1; echo n{i}; exit {i}"));
            std::thread::spawn(move || run_with(c, None))
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let out = h.join().unwrap();
        assert_eq!(text(&out.stdout), format!("n{i}\n"), "{out:?}");
        assert_eq!(out.status.code(), Some(i as i32));
    }
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
}

/// A pty for the ssh client, so it sends a real window size and window changes.
fn openpty(rows: u16, cols: u16) -> (OwnedFd, OwnedFd) {
    let mut m = -1;
    let mut s = -1;
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: openpty writes two descriptors; the termios pointer may be null.
    let rc = unsafe { libc::openpty(&mut m, &mut s, std::ptr::null_mut(), std::ptr::null(), &ws) };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    // SAFETY: both descriptors are fresh and ours; FD_CLOEXEC keeps them out of the processes
    // other tests spawn meanwhile (a stray slave would keep this pty open).
    unsafe {
        libc::fcntl(m, libc::F_SETFD, libc::FD_CLOEXEC);
        libc::fcntl(s, libc::F_SETFD, libc::FD_CLOEXEC);
        (OwnedFd::from_raw_fd(m), OwnedFd::from_raw_fd(s))
    }
}

#[test]
fn pty_session_with_size_and_window_change() {
    let Some(s) = server(&default_env(), None) else {
        return;
    };
    // Without a local terminal, -tt still gets a remote pty.
    let mut c = s.ssh(&["-tt"]);
    c.env("TERM", "xterm-banger")
        .arg("tty; echo \"term=$TERM\"; exit 2");
    let out = run_with(c, None);
    let o = text(&out.stdout).replace('\r', "");
    assert!(o.starts_with("/dev/pts/"), "{o:?}");
    assert!(o.contains("term=xterm-banger\n"), "{o:?}");
    assert_eq!(out.status.code(), Some(2), "{out:?}");

    let (master, slave) = openpty(37, 101);
    let mut c = s.ssh(&["-tt"]);
    c.arg("tty; stty size; read x; stty size; exit 5")
        .env("TERM", "xterm-banger")
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::from(slave.try_clone().unwrap()))
        .stderr(Stdio::from(slave));
    let mut child = c.spawn().unwrap();
    drop(c);
    let seen = Arc::new(Mutex::new(String::new()));
    let reader = {
        let seen = seen.clone();
        let mut f = std::fs::File::from(master.try_clone().unwrap());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = f.read(&mut buf) {
                if n == 0 {
                    break;
                }
                seen.lock()
                    .unwrap()
                    .push_str(&text(&buf[..n]).replace('\r', ""));
            }
        })
    };
    let wait_for = |needle: &str| {
        let start = Instant::now();
        while !seen.lock().unwrap().contains(needle) {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "no {needle:?} in {:?}",
                seen.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait_for("37 101\n");
    let ws = libc::winsize {
        ws_row: 50,
        ws_col: 120,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads the winsize; kill signals our own child.
    unsafe {
        assert_eq!(libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws), 0);
        libc::kill(child.id() as libc::pid_t, libc::SIGWINCH);
    }
    std::thread::sleep(Duration::from_millis(500));
    std::fs::File::from(master.try_clone().unwrap())
        .write_all(b"go\n")
        .unwrap();
    wait_for("50 120\n");
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(5));
    // The reader ends when the pty does; not waited for (nothing more is needed from it).
    drop((master, reader));
    let all = seen.lock().unwrap().clone();
    assert!(all.contains("/dev/pts/"), "{all:?}");
}
