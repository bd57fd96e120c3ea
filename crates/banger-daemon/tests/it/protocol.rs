//! Bad input gets a clear error with a stable code, and the daemon keeps serving.

use banger_core::ErrorCode;
use banger_protocol::{Frame, Request, VmCreateParams};
use banger_testkit::{TestEnv, raw_request};

fn error_of(frames: &[Frame]) -> (ErrorCode, String) {
    match frames.last() {
        Some(Frame::Error { code, message, .. }) => (*code, message.clone()),
        other => panic!("expected an error frame, got {other:?}"),
    }
}

#[test]
fn bad_names_are_bad_requests_in_daemon_and_cli() {
    let mut env = TestEnv::new("");
    env.start_daemon();
    env.seed_artifacts();
    let long = "a".repeat(64);
    for bad in ["Bad_Name", "-x", long.as_str(), ""] {
        let (code, msg) = env
            .request(&Request::VmCreate(VmCreateParams {
                name: Some(bad.into()),
                ..Default::default()
            }))
            .err();
        assert_eq!(code, ErrorCode::BadRequest, "{bad:?}: {msg}");
        assert_eq!(msg.lines().count(), 1, "{msg}");
        assert!(msg.contains("invalid VM name"), "{msg}");

        let flag = format!("--name={bad}");
        let out = env.cli(&["vm", "create", &flag]);
        assert_eq!(out.status.code(), Some(2), "cli {bad:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        assert!(err.starts_with("banger: "), "{err}");
    }
    // Nothing was created by any of it.
    let list = env.request(&Request::VmList).ok();
    assert_eq!(list["vms"].as_array().unwrap().len(), 0);
}

#[test]
fn malformed_unknown_and_oversized_requests_get_errors_and_the_daemon_keeps_serving() {
    let mut env = TestEnv::new("");
    env.start_daemon();
    let s = env.socket();
    let cases: Vec<(Vec<u8>, ErrorCode)> = vec![
        (
            b"{\"v\":1,\"method\":\"vm.teleport\"}\n".to_vec(),
            ErrorCode::UnknownMethod,
        ),
        (b"this is not json\n".to_vec(), ErrorCode::BadRequest),
        (
            b"{\"v\":1,\"method\":\"vm.start\",\"params\":{}}\n".to_vec(),
            ErrorCode::BadRequest,
        ),
        (
            b"{\"v\":7,\"method\":\"ping\"}\n".to_vec(),
            ErrorCode::BadVersion,
        ),
        (
            b"{\"v\":1,\"method\":\"vm.show\",\"params\":{\"vm\":\"nope\"}}\n".to_vec(),
            ErrorCode::NotFound,
        ),
    ];
    for (input, want) in cases {
        let frames = raw_request(&s, &input).unwrap();
        let (code, msg) = error_of(&frames);
        assert_eq!(code, want, "{}: {msg}", String::from_utf8_lossy(&input));
        assert!(!msg.is_empty());
    }
    // Two MiB without a newline: refused without reading it all into memory.
    let mut huge = b"{\"v\":1,\"method\":\"ping\",\"params\":{\"x\":\"".to_vec();
    huge.resize(2 << 20, b'a');
    let frames = {
        use std::io::{BufRead, Write};
        let stream = std::os::unix::net::UnixStream::connect(&s).unwrap();
        let mut writer = stream.try_clone().unwrap();
        // The daemon answers and hangs up after 1 MiB, so the rest of the write may fail.
        let w = std::thread::spawn(move || {
            let _ = writer.write_all(&huge);
        });
        let mut lines = std::io::BufReader::new(stream).lines();
        let line = lines.next().unwrap().unwrap();
        w.join().unwrap();
        vec![serde_json::from_str::<Frame>(&line).unwrap()]
    };
    let (code, msg) = error_of(&frames);
    assert_eq!(code, ErrorCode::BadRequest);
    assert!(msg.contains("longer than"), "{msg}");
    // A client that connects and leaves without a word.
    drop(std::os::unix::net::UnixStream::connect(&s).unwrap());
    // Still serving.
    let frames = raw_request(
        &s,
        b"{\"v\":1,\"op_id\":\"op-still-here\",\"method\":\"ping\"}\n",
    )
    .unwrap();
    match frames.last() {
        Some(Frame::Result { op_id, .. }) => assert_eq!(op_id.as_str(), "op-still-here"),
        other => panic!("{other:?}"),
    }
    // The op id of a request appears in the daemon's log lines for it.
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert!(
        env.daemon_log().contains("op-still-here"),
        "op id missing from log"
    );
}

#[test]
fn a_client_that_disconnects_cancels_its_create_and_nothing_is_left() {
    let mut env = TestEnv::new("");
    env.start_daemon();
    env.seed_artifacts();
    // Slow the VMM's socket so the start is still in flight when the client leaves.
    env.set_control(serde_json::json!({"socket_delay_ms": 700}));
    {
        use std::io::Write;
        let mut s = std::os::unix::net::UnixStream::connect(env.socket()).unwrap();
        s.write_all(b"{\"v\":1,\"method\":\"vm.create\",\"params\":{\"name\":\"leaver\"}}\n")
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    // The cancel lands at the next step boundary; the rollback then removes everything.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let v = env
            .request(&Request::VmShow(banger_protocol::VmRef {
                vm: "leaver".into(),
            }))
            .ok();
        if v["state"] == "error" {
            assert!(
                v["last_error"].as_str().unwrap().contains("cancelled"),
                "{v}"
            );
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not cancelled: {v}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(
        env.stray_processes().is_empty(),
        "{:?}",
        env.stray_processes()
    );
    assert!(
        !env.runtime_dir()
            .join("vms")
            .read_dir()
            .unwrap()
            .any(|_| true)
    );
}
