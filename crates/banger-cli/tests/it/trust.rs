//! Another local user plants the fallback runtime dir and a daemon socket that answers
//! `vm.ssh_info` with an ssh option as the user name: the CLI must refuse before sending
//! anything, naming the path and its owner.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::process::Command;
use std::time::Duration;

#[test]
fn a_runtime_dir_planted_by_another_user_is_refused_before_any_request() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("SKIP: needs root to make a directory owned by another user");
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let marker = t.path().join("pwned");
    // What /tmp/banger-<uid> looks like when uid 65534 made it first.
    let run = t.path().join("banger-0");
    std::fs::create_dir(&run).unwrap();
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o755)).unwrap();
    let sock = run.join("bangerd.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    std::os::unix::fs::chown(&sock, Some(65534), Some(65534)).unwrap();
    std::os::unix::fs::chown(&run, Some(65534), Some(65534)).unwrap();
    listener.set_nonblocking(true).unwrap();
    let hostile = format!(
        "{{\"type\":\"result\",\"op_id\":\"OP\",\"result\":{{\"id\":\"0123456789ab\",\"name\":\"box\",\"ip\":\"127.0.0.1\",\"user\":\"-oProxyCommand=touch {}\",\"key\":\"/nonexistent\",\"known_hosts\":\"/nonexistent\"}}}}\n",
        marker.display()
    );
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let fake = std::thread::spawn(move || {
        let mut requests = Vec::new();
        while stop_rx.try_recv().is_err() {
            match listener.accept() {
                Ok((stream, _)) => {
                    stream.set_nonblocking(false).unwrap();
                    let mut line = String::new();
                    let _ = BufReader::new(&stream).read_line(&mut line);
                    let op = serde_json::from_str::<serde_json::Value>(&line)
                        .ok()
                        .and_then(|v| v["op_id"].as_str().map(String::from))
                        .unwrap_or_default();
                    let _ = (&stream).write_all(hostile.replace("OP", &op).as_bytes());
                    requests.push(line);
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        requests
    });
    let config = t.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = \"{0}/state\"\nruntime_dir = \"{1}\"\ncache_dir = \"{0}/cache\"\n",
            t.path().display(),
            run.display()
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_banger"))
        .args([
            "--config",
            config.to_str().unwrap(),
            "vm",
            "ssh",
            "box",
            "--",
            "true",
        ])
        .env("NO_COLOR", "1")
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .output()
        .unwrap();
    stop_tx.send(()).unwrap();
    let requests = fake.join().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        requests.is_empty(),
        "the CLI talked to the planted daemon: {requests:?}\nstderr: {err}"
    );
    assert!(!marker.exists(), "the planted ProxyCommand ran");
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains(&run.display().to_string()) && err.contains("uid 65534"),
        "{err}"
    );
}

/// Probe finding 3: the path checks pass (here the attacker's listening socket ends up in a
/// private directory of ours, as when a link swap wins the race between check and connect),
/// but the daemon answering runs as another user. The CLI must check who listens
/// (`SO_PEERCRED`) and refuse before sending anything.
#[test]
fn a_daemon_of_another_user_is_refused_after_connecting() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("SKIP: needs root to run a fake daemon as another user");
        return;
    }
    if !std::path::Path::new("/usr/bin/python3").exists() {
        println!("SKIP: the fake daemon needs /usr/bin/python3");
        return;
    }
    let t = tempfile::tempdir().unwrap();
    // uid 65534 must reach its own directory inside.
    std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let evil = t.path().join("evil");
    std::fs::create_dir(&evil).unwrap();
    std::os::unix::fs::chown(&evil, Some(65534), Some(65534)).unwrap();
    let planted = evil.join("bangerd.sock");
    let script = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.bind(sys.argv[1]); s.listen(4); s.settimeout(30)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    line = c.makefile().readline()
    if line:
        sys.stdout.write("REQUEST " + line); sys.stdout.flush()
    c.sendall(b'{"type":"result","op_id":"x","result":{}}\n'); c.close()
"#;
    let mut fake = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .args(["/usr/bin/python3", "-c", script])
        .arg(&planted)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(fake.stdout.take().unwrap());
    let mut ready = String::new();
    out.read_line(&mut ready).unwrap();
    assert_eq!(ready.trim(), "ready");
    let run = t.path().join("run");
    std::fs::create_dir(&run).unwrap();
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o700)).unwrap();
    let sock = run.join("bangerd.sock");
    std::fs::rename(&planted, &sock).unwrap();
    std::os::unix::fs::chown(&sock, Some(0), Some(0)).unwrap();
    let config = t.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = \"{0}/state\"\nruntime_dir = \"{1}\"\ncache_dir = \"{0}/cache\"\n",
            t.path().display(),
            run.display()
        ),
    )
    .unwrap();
    let res = Command::new(env!("CARGO_BIN_EXE_banger"))
        .args(["--config", config.to_str().unwrap(), "vm", "list"])
        .env("NO_COLOR", "1")
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .output()
        .unwrap();
    let _ = fake.kill();
    let _ = fake.wait();
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(&mut out, &mut rest);
    let err = String::from_utf8_lossy(&res.stderr).into_owned();
    assert!(
        !rest.contains("REQUEST"),
        "the CLI talked to another user's daemon: {rest}\nstderr: {err}"
    );
    assert_eq!(res.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains(&sock.display().to_string()) && err.contains("runs as uid 65534"),
        "{err}"
    );
}
