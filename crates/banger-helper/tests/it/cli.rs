//! The `banger-helper` binary: argument handling, refusals at start-up, and a real serve run
//! (Ping and refused requests only, so nothing on the host changes) with its log lines.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use banger_core::OpId;
use banger_helper::{HelperClient, HelperError};
use banger_net::TapName;

use crate::common::is_root;

const BIN: &str = env!("CARGO_BIN_EXE_banger-helper");

#[test]
fn help_lists_the_subcommands() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("serve") && text.contains("remove-all"),
        "{text}"
    );
    let out = Command::new(BIN).args(["serve"]).output().unwrap();
    assert!(!out.status.success(), "--owner is required");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--owner"));
}

#[test]
fn only_root_may_run_it() {
    let mut serve = Command::new(BIN);
    serve.args([
        "serve",
        "--owner",
        "4242",
        "--socket",
        "/nonexistent/h.sock",
    ]);
    let mut remove = Command::new(BIN);
    remove.args(["remove-all", "--config", "/nonexistent/config.toml"]);
    for mut cmd in [serve, remove] {
        if is_root() {
            cmd.uid(65534).gid(65534);
        }
        let out = cmd.output().unwrap();
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("must run as root"), "{err}");
    }
}

#[test]
fn a_bad_config_or_owner_stops_it_before_it_listens() {
    if !is_root() {
        println!("SKIP: needs root");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let cfg = d.path().join("config.toml");
    std::fs::write(&cfg, "bogus_key = 1\n").unwrap();
    let sock = d.path().join("h.sock");
    let run = |owner: &str| {
        Command::new(BIN)
            .args(["serve", "--owner", owner, "--socket"])
            .arg(&sock)
            .arg("--config")
            .arg(&cfg)
            .output()
            .unwrap()
    };
    let out = run("4242");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("bogus_key"));
    std::fs::write(
        &cfg,
        format!(
            "state_dir = \"{0}/state\"\nruntime_dir = \"{0}/run\"\n",
            d.path().display()
        ),
    )
    .unwrap();
    let out = run("0");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unprivileged user"));
    assert!(!sock.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_logs_each_op_and_stops_on_sigterm() {
    if !is_root() {
        println!("SKIP: needs root");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    for sub in ["state", "run"] {
        std::fs::create_dir(d.path().join(sub)).unwrap();
    }
    let cfg = d.path().join("config.toml");
    std::fs::write(
        &cfg,
        format!(
            "state_dir = \"{0}/state\"\nruntime_dir = \"{0}/run\"\n",
            d.path().display()
        ),
    )
    .unwrap();
    let sock = d.path().join("helper.sock");
    let mut child = Command::new(BIN)
        .args(["serve", "--owner", "4242", "--socket"])
        .arg(&sock)
        .arg("--config")
        .arg(&cfg)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    // The socket file appears at bind(), a moment before listen(): wait until it accepts.
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(Instant::now() < deadline, "no socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    let c = HelperClient::new(&sock).with_op_id(OpId::from_client("op-clitest").unwrap());
    assert_eq!(c.ping().await.unwrap(), 1);
    // Read-only on the host: `ip -j link show`.
    c.list_taps().await.unwrap();
    let e = c
        .create_tap(
            &TapName::parse("bgt1").unwrap(),
            &banger_net::BridgeName::default(),
            Some(1),
        )
        .await
        .unwrap_err();
    assert!(matches!(e, HelperError::Forbidden(_)), "{e}");

    // SAFETY: signalling the child this test spawned, by its pid.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    let mut log = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    println!("{log}");
    assert!(
        log.contains("op_id=op-clitest uid=0 op=Ping result=ok"),
        "{log}"
    );
    assert!(
        log.contains("op_id=op-clitest uid=0 op=CreateTap tap=\"bgt1\" bridge=\"br-banger\" owner_uid=1 result=error: forbidden: owner_uid: uid 1 is not the owner (uid 4242)"),
        "{log}"
    );
    assert!(
        log.contains("op_id=op-clitest uid=0 op=ListTaps result=ok"),
        "{log}"
    );
    assert!(log.contains("shutting down"), "{log}");
}
