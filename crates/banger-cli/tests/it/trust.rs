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
