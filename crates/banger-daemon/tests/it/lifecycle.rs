//! The everyday lifecycle through the CLI and the protocol.

use banger_core::{ErrorCode, VmState};
use banger_protocol::{Request, VmCreateParams, VmDeleteParams, VmRef, VmStopParams};
use banger_testkit::{TestEnv, pid_alive};

fn vm_state(env: &TestEnv, name: &str) -> VmState {
    let v = env
        .request(&Request::VmShow(VmRef { vm: name.into() }))
        .ok();
    serde_json::from_value(v["state"].clone()).unwrap()
}

fn create(name: &str) -> Request {
    Request::VmCreate(VmCreateParams {
        name: Some(name.into()),
        ..Default::default()
    })
}

#[test]
fn cli_lifecycle_create_ls_stop_start_restart_kill_rm() {
    let mut env = TestEnv::new("");
    env.start_daemon();
    env.seed_artifacts();

    let out = env.cli(&["vm", "create", "--name", "alpha"]);
    assert!(
        out.status.success(),
        "create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ls = env.cli(&["vm", "ls"]);
    let text = String::from_utf8_lossy(&ls.stdout);
    let row = text
        .lines()
        .find(|l| l.starts_with("alpha"))
        .unwrap_or_else(|| panic!("no alpha in {text}"));
    assert!(row.contains("running"), "{row}");

    let json = env.cli(&["vm", "ls", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["vms"][0]["name"], "alpha");
    assert_eq!(v["vms"][0]["state"], "running");
    assert_eq!(v["vms"][0]["ip"], "172.30.0.2");

    let show = env
        .request(&Request::VmShow(VmRef { vm: "alpha".into() }))
        .ok();
    let pid1 = show["pid"].as_i64().unwrap() as i32;
    assert!(pid_alive(pid1));

    for (args, want) in [
        (vec!["vm", "stop", "alpha"], VmState::Stopped),
        (vec!["vm", "start", "alpha"], VmState::Running),
        (vec!["vm", "restart", "alpha"], VmState::Running),
        (vec!["vm", "kill", "alpha"], VmState::Stopped),
        (vec!["vm", "start", "alpha"], VmState::Running),
        (
            vec!["vm", "kill", "--signal", "TERM", "alpha"],
            VmState::Stopped,
        ),
    ] {
        let out = env.cli(&args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(vm_state(&env, "alpha"), want, "after {args:?}");
    }
    assert!(!pid_alive(pid1), "the first VMM must be gone");
    assert!(
        env.stray_processes().is_empty(),
        "{:?}",
        env.stray_processes()
    );

    let out = env.cli(&["vm", "rm", "alpha"]);
    assert!(
        out.status.success(),
        "rm: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (code, _) = env
        .request(&Request::VmShow(VmRef { vm: "alpha".into() }))
        .err();
    assert_eq!(code, ErrorCode::NotFound);
    assert!(env.vm_leftovers().is_empty(), "{:?}", env.vm_leftovers());

    // The fake validated every API call against the spec: all must have been accepted.
    let calls = std::fs::read_to_string(&env.record).unwrap();
    assert!(calls.lines().count() >= 15, "{calls}");
    for line in calls.lines() {
        let c: serde_json::Value = serde_json::from_str(line).unwrap();
        let status = c["status"].as_u64().unwrap();
        assert!((200..300).contains(&status), "rejected call: {line}");
    }
}

#[test]
fn stop_of_a_guest_that_ignores_shutdown_kills_it_after_the_timeout() {
    let mut env = TestEnv::new("");
    env.start_daemon();
    env.seed_artifacts();
    env.set_control(serde_json::json!({"ignore_ctrl_alt_del": true}));
    env.request(&create("stubborn")).ok();
    let t = std::time::Instant::now();
    let r = env.request(&Request::VmStop(VmStopParams {
        vm: "stubborn".into(),
        timeout_secs: Some(1),
    }));
    r.ok();
    assert!(
        t.elapsed() < std::time::Duration::from_secs(8),
        "{:?}",
        t.elapsed()
    );
    assert!(
        r.frames
            .iter()
            .any(|f| matches!(f, banger_protocol::Frame::Warning { .. })),
        "the user is told the VM was killed: {:?}",
        r.frames
    );
    assert_eq!(vm_state(&env, "stubborn"), VmState::Stopped);
    assert!(env.stray_processes().is_empty());
}

#[test]
fn state_errors_have_stable_codes() {
    let mut env = TestEnv::new("");
    env.start_daemon();
    env.seed_artifacts();
    let r = env.request(&Request::VmCreate(VmCreateParams {
        name: Some("idle".into()),
        no_start: true,
        ..Default::default()
    }));
    assert_eq!(r.ok()["state"], "created");
    let (code, msg) = env
        .request(&Request::VmStop(VmStopParams {
            vm: "idle".into(),
            timeout_secs: None,
        }))
        .err();
    assert_eq!(code, ErrorCode::NotRunning, "{msg}");
    let (code, _) = env
        .request(&Request::VmStart(VmRef { vm: "ghost".into() }))
        .err();
    assert_eq!(code, ErrorCode::NotFound);
    env.request(&Request::VmStart(VmRef { vm: "idle".into() }))
        .ok();
    let (code, msg) = env
        .request(&Request::VmDelete(VmDeleteParams {
            vm: "idle".into(),
            force: false,
        }))
        .err();
    assert_eq!(code, ErrorCode::Busy, "{msg}");
    assert!(msg.contains("--force"), "{msg}");
    let (code, _) = env
        .request(&Request::VmSet(banger_protocol::VmSetParams {
            vm: "idle".into(),
            vcpu: Some(2),
            memory_mib: None,
        }))
        .err();
    assert_eq!(code, ErrorCode::Busy);
    env.request(&Request::VmDelete(VmDeleteParams {
        vm: "idle".into(),
        force: true,
    }))
    .ok();
    assert!(env.stray_processes().is_empty());
    assert!(env.vm_leftovers().is_empty(), "{:?}", env.vm_leftovers());
}

#[test]
fn set_prune_logs_and_missing_artifacts() {
    let mut env = TestEnv::new("");
    env.start_daemon();
    let (code, msg) = env.request(&create("early")).err();
    assert_eq!(code, ErrorCode::NotFound, "{msg}");
    assert!(msg.contains("test-image"), "{msg}");
    env.seed_artifacts();
    for n in ["p1", "p2"] {
        env.request(&Request::VmCreate(VmCreateParams {
            name: Some(n.into()),
            no_start: true,
            ..Default::default()
        }))
        .ok();
    }
    env.request(&create("keep")).ok();
    let v = env
        .request(&Request::VmSet(banger_protocol::VmSetParams {
            vm: "p1".into(),
            vcpu: Some(2),
            memory_mib: Some(512),
        }))
        .ok();
    assert_eq!(
        (v["vcpu"].as_u64(), v["memory_mib"].as_u64()),
        (Some(2), Some(512))
    );
    let (code, _) = env
        .request(&Request::VmSet(banger_protocol::VmSetParams {
            vm: "p1".into(),
            vcpu: Some(0),
            memory_mib: None,
        }))
        .err();
    assert_eq!(code, ErrorCode::BadRequest);
    let logs = env
        .request(&Request::VmLogs(banger_protocol::VmLogsParams {
            vm: "keep".into(),
            lines: None,
        }))
        .ok();
    assert!(
        logs["text"].as_str().unwrap().contains("fake-firecracker"),
        "{logs}"
    );
    let removed = env.request(&Request::VmPrune).ok();
    let mut names: Vec<String> = serde_json::from_value(removed["removed"].clone()).unwrap();
    names.sort();
    assert_eq!(names, ["p1", "p2"]);
    assert_eq!(vm_state(&env, "keep"), VmState::Running);
    // A kernel in use cannot be removed.
    let (code, msg) = env
        .request(&Request::KernelDelete(banger_protocol::NameParams {
            name: "test-kernel".into(),
        }))
        .err();
    assert_eq!(code, ErrorCode::Busy, "{msg}");
}

#[test]
fn parallel_creates_and_name_races() {
    let mut env = TestEnv::new("");
    env.start_daemon();
    env.seed_artifacts();
    let socket = env.socket();
    let handles: Vec<_> = (0..20)
        .map(|i| {
            let socket = socket.clone();
            std::thread::spawn(move || {
                banger_testkit::request(&socket, &create(&format!("par-{i}")))
            })
        })
        .collect();
    for h in handles {
        let r = h.join().unwrap();
        assert_eq!(r.ok()["state"], "running");
    }
    let list = env.request(&Request::VmList).ok();
    let vms = list["vms"].as_array().unwrap();
    assert_eq!(vms.len(), 20);
    let mut ips: Vec<&str> = vms.iter().map(|v| v["ip"].as_str().unwrap()).collect();
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 20, "addresses must be distinct");

    // Two creates of one name: exactly one already_exists.
    let a = {
        let socket = socket.clone();
        std::thread::spawn(move || banger_testkit::request(&socket, &create("twin")))
    };
    let b = {
        let socket = socket.clone();
        std::thread::spawn(move || banger_testkit::request(&socket, &create("twin")))
    };
    let results = [a.join().unwrap(), b.join().unwrap()];
    let errors: Vec<_> = results
        .iter()
        .filter_map(|r| match r.last() {
            banger_protocol::Frame::Error { code, .. } => Some(*code),
            _ => None,
        })
        .collect();
    assert_eq!(errors, [ErrorCode::AlreadyExists], "{results:?}");

    for i in 0..20 {
        env.request(&Request::VmDelete(VmDeleteParams {
            vm: format!("par-{i}"),
            force: true,
        }))
        .ok();
    }
    env.request(&Request::VmDelete(VmDeleteParams {
        vm: "twin".into(),
        force: true,
    }))
    .ok();
    assert!(
        env.stray_processes().is_empty(),
        "{:?}",
        env.stray_processes()
    );
    assert!(env.vm_leftovers().is_empty(), "{:?}", env.vm_leftovers());
}

#[test]
fn image_rm_refuses_used_images_and_force_spares_running_vms() {
    let mut env = TestEnv::new("");
    env.start_daemon();
    env.seed_artifacts();
    env.request(&create("user")).ok();
    let rm = |force| {
        env.request(&Request::ImageDelete(banger_protocol::NameForceParams {
            name: "test-image".into(),
            force,
        }))
    };
    let (code, msg) = rm(false).err();
    assert_eq!(code, ErrorCode::Busy);
    assert!(msg.contains("user") && msg.contains("--force"), "{msg}");
    let (code, msg) = rm(true).err();
    assert_eq!(code, ErrorCode::Busy, "a running VM keeps its base: {msg}");
    assert!(msg.contains("running"), "{msg}");
    env.request(&Request::VmStop(VmStopParams {
        vm: "user".into(),
        timeout_secs: Some(2),
    }))
    .ok();
    rm(true).ok();
    assert!(!env.state_dir().join("images/test-image").exists());
    let (_, msg) = env
        .request(&Request::VmStart(VmRef { vm: "user".into() }))
        .err();
    assert!(
        msg.contains("at step preflight") && msg.contains("test-image"),
        "{msg}"
    );
}
