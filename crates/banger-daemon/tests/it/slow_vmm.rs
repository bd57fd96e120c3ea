//! A VMM that is slow to answer, or never gets the guest ready: a slow host is not a failed
//! start, and a stop or kill of a VM still starting does not wait for the boot timeout.

use std::time::{Duration, Instant};

use banger_core::VmState;
use banger_protocol::{Request, VmCreateParams, VmKillParams, VmRef, VmStopParams};
use banger_testkit::{Reply, TestEnv, pid_alive};

fn show(env: &TestEnv, name: &str) -> serde_json::Value {
    env.request(&Request::VmShow(VmRef { vm: name.into() }))
        .ok()
}

fn create(name: &str) -> Request {
    Request::VmCreate(VmCreateParams {
        name: Some(name.into()),
        ..Default::default()
    })
}

#[test]
fn an_instance_start_slower_than_five_seconds_is_not_a_failed_start() {
    // Real Firecracker's InstanceStart loads the kernel into guest memory: 8-9 s on a nested
    // host. The default VMM timeout follows boot_timeout_secs (180 s -> 60 s).
    let mut env = TestEnv::new("");
    env.start_daemon();
    env.seed_artifacts();
    env.set_control(serde_json::json!({"instance_start_ms": 6500}));
    let t = Instant::now();
    let v = env.request(&create("slow")).ok();
    assert_eq!(v["state"], "running", "{v}");
    assert!(
        t.elapsed() >= Duration::from_millis(6500),
        "{:?}",
        t.elapsed()
    );
    assert!(pid_alive(show(&env, "slow")["pid"].as_i64().unwrap() as i32));
}

#[test]
fn a_configured_vmm_timeout_is_the_limit() {
    let mut env = TestEnv::new("vmm_timeout_secs = 1");
    env.start_daemon();
    env.seed_artifacts();
    env.set_control(serde_json::json!({"instance_start_ms": 3000}));
    let (_, msg) = env.request(&create("impatient")).err();
    assert!(
        msg.contains("vmm_boot") && msg.contains("within 1s"),
        "{msg}"
    );
    assert!(
        env.stray_processes().is_empty(),
        "{:?}",
        env.stray_processes()
    );
}

/// Starts `name` in the background with a guest that never gets ready (InstanceStart never
/// answers), and returns once the start is inside the boot step.
fn start_forever(env: &TestEnv, name: &str) -> std::thread::JoinHandle<Reply> {
    env.request(&Request::VmCreate(VmCreateParams {
        name: Some(name.into()),
        no_start: true,
        ..Default::default()
    }))
    .ok();
    env.set_control(serde_json::json!({"instance_start_ms": 600_000}));
    let socket = env.socket();
    let req = Request::VmStart(VmRef { vm: name.into() });
    let creating = std::thread::spawn(move || banger_testkit::request(&socket, &req));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = env.request(&Request::VmShow(VmRef { vm: name.into() }));
        if let banger_protocol::Frame::Result { result, .. } = r.last()
            && result["state"] == "starting"
            && result["pid"].is_i64()
        {
            break;
        }
        assert!(Instant::now() < deadline, "{name} never reached vmm_spawn");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Past spawn: configure (a few quick calls), then the InstanceStart that never ends.
    std::thread::sleep(Duration::from_millis(1000));
    creating
}

#[test]
fn stop_of_a_starting_vm_cancels_the_start_promptly() {
    let mut env = TestEnv::new("boot_timeout_secs = 300");
    env.start_daemon();
    env.seed_artifacts();
    let creating = start_forever(&env, "booting");
    let pid = show(&env, "booting")["pid"].as_i64().unwrap() as i32;
    let t = Instant::now();
    let v = env
        .request(&Request::VmStop(VmStopParams {
            vm: "booting".into(),
            timeout_secs: None,
        }))
        .ok();
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert_eq!(v["state"], "stopped", "{v}");
    let (_, msg) = creating.join().unwrap().err();
    assert!(msg.contains("cancelled by vm stop"), "{msg}");
    let v = show(&env, "booting");
    let state: VmState = serde_json::from_value(v["state"].clone()).unwrap();
    assert_eq!(state, VmState::Stopped, "{v}");
    assert!(!pid_alive(pid));
    assert!(
        env.stray_processes().is_empty(),
        "{:?}",
        env.stray_processes()
    );
    // And it starts again normally.
    env.set_control(serde_json::json!({}));
    env.request(&Request::VmStart(VmRef {
        vm: "booting".into(),
    }))
    .ok();
}

#[test]
fn kill_of_a_starting_vm_cancels_the_start_at_once() {
    let mut env = TestEnv::new("boot_timeout_secs = 300");
    env.start_daemon();
    env.seed_artifacts();
    let creating = start_forever(&env, "doomed");
    let pid = show(&env, "doomed")["pid"].as_i64().unwrap() as i32;
    let t = Instant::now();
    let v = env
        .request(&Request::VmKill(VmKillParams {
            vm: "doomed".into(),
            signal: None,
        }))
        .ok();
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert_eq!(v["state"], "stopped", "{v}");
    let (_, msg) = creating.join().unwrap().err();
    assert!(msg.contains("cancelled by vm kill"), "{msg}");
    assert!(!pid_alive(pid));
    assert!(
        env.stray_processes().is_empty(),
        "{:?}",
        env.stray_processes()
    );
}

#[test]
fn stop_during_a_create_keeps_the_vm_stopped() {
    let mut env = TestEnv::new("boot_timeout_secs = 300");
    env.start_daemon();
    env.seed_artifacts();
    env.set_control(serde_json::json!({"instance_start_ms": 600_000}));
    let socket = env.socket();
    let creating = std::thread::spawn(move || banger_testkit::request(&socket, &create("young")));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = env.request(&Request::VmShow(VmRef { vm: "young".into() }));
        if let banger_protocol::Frame::Result { result, .. } = r.last()
            && result["state"] == "starting"
            && result["pid"].is_i64()
        {
            break;
        }
        assert!(Instant::now() < deadline, "young never reached vmm_spawn");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(1000));
    let t = Instant::now();
    env.request(&Request::VmStop(VmStopParams {
        vm: "young".into(),
        timeout_secs: None,
    }))
    .ok();
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    let (_, msg) = creating.join().unwrap().err();
    assert!(msg.contains("cancelled by vm stop"), "{msg}");
    // The create does not throw away the VM the user only stopped.
    assert_eq!(show(&env, "young")["state"], "stopped");
    assert!(
        env.stray_processes().is_empty(),
        "{:?}",
        env.stray_processes()
    );
}

#[test]
fn kill_with_another_signal_also_cancels_a_start() {
    let mut env = TestEnv::new("boot_timeout_secs = 300");
    env.start_daemon();
    env.seed_artifacts();
    let creating = start_forever(&env, "termed");
    let t = Instant::now();
    let v = env
        .request(&Request::VmKill(VmKillParams {
            vm: "termed".into(),
            signal: Some("TERM".into()),
        }))
        .ok();
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert_eq!(v["state"], "stopped", "{v}");
    let (_, msg) = creating.join().unwrap().err();
    assert!(msg.contains("cancelled by vm kill"), "{msg}");
    assert!(
        env.stray_processes().is_empty(),
        "{:?}",
        env.stray_processes()
    );
}
