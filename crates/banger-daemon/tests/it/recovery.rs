//! A daemon killed with SIGKILL and restarted re-adopts live VMMs and cleans up dead ones; a
//! VMM that dies under a running daemon is noticed and cleaned up.

use std::time::{Duration, Instant};

use banger_protocol::{Request, VmCreateParams, VmRef, VmStopParams};
use banger_testkit::{TestEnv, pid_alive};

fn show(env: &TestEnv, name: &str) -> serde_json::Value {
    env.request(&Request::VmShow(VmRef { vm: name.into() }))
        .ok()
}

fn create(env: &TestEnv, name: &str) -> i32 {
    env.request(&Request::VmCreate(VmCreateParams {
        name: Some(name.into()),
        ..Default::default()
    }))
    .ok();
    show(env, name)["pid"].as_i64().unwrap() as i32
}

#[test]
fn kill_9_daemon_then_restart_readopts_live_and_cleans_dead() {
    let mut env = TestEnv::new("");
    env.start_daemon();
    env.seed_artifacts();
    let live_pid = create(&env, "survivor");
    let dead_pid = create(&env, "casualty");

    env.kill_daemon();
    assert!(pid_alive(live_pid), "VMMs outlive the daemon");
    // SAFETY: killing the fake VMM this test started.
    unsafe { libc::kill(dead_pid, libc::SIGKILL) };
    let t = Instant::now();
    while pid_alive(dead_pid) && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
    }

    env.start_daemon();
    let s = show(&env, "survivor");
    assert_eq!(s["state"], "running", "{s}");
    assert_eq!(
        s["pid"].as_i64(),
        Some(live_pid as i64),
        "same VMM re-adopted"
    );
    let c = show(&env, "casualty");
    assert_eq!(c["state"], "stopped", "{c}");
    assert!(c["last_error"].as_str().unwrap().contains("died"), "{c}");
    let casualty_id = c["id"].as_str().unwrap().to_string();
    assert!(!env.runtime_dir().join("vms").join(&casualty_id).exists());

    // The re-adopted VM is fully manageable.
    env.request(&Request::VmStop(VmStopParams {
        vm: "survivor".into(),
        timeout_secs: Some(2),
    }))
    .ok();
    assert!(!pid_alive(live_pid));
    // And the stopped one starts again.
    env.request(&Request::VmStart(VmRef {
        vm: "casualty".into(),
    }))
    .ok();
    assert_eq!(show(&env, "casualty")["state"], "running");
    env.request(&Request::VmKill(banger_protocol::VmKillParams {
        vm: "casualty".into(),
        signal: None,
    }))
    .ok();
    assert!(
        env.stray_processes().is_empty(),
        "{:?}",
        env.stray_processes()
    );
}

#[test]
fn readopted_vm_whose_vmm_dies_later_is_noticed() {
    let mut env = TestEnv::new("");
    env.start_daemon();
    env.seed_artifacts();
    let pid = create(&env, "later");
    env.kill_daemon();
    env.start_daemon();
    assert_eq!(show(&env, "later")["state"], "running");
    // SAFETY: killing the fake VMM this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    wait_for_state(&env, "later", "stopped");
}

#[test]
fn a_vmm_that_crashes_while_running_leaves_the_vm_stopped_and_clean() {
    let mut env = TestEnv::new("");
    env.start_daemon();
    env.seed_artifacts();
    env.set_control(serde_json::json!({"exit_after_start_ms": 400}));
    create(&env, "crashy");
    wait_for_state(&env, "crashy", "stopped");
    let v = show(&env, "crashy");
    assert!(
        v["last_error"].as_str().unwrap().contains("guest crashed"),
        "log tail in {v}"
    );
    assert!(v["pid"].is_null());
    assert!(env.stray_processes().is_empty());
    assert!(
        !env.runtime_dir()
            .join("vms")
            .join(v["id"].as_str().unwrap())
            .exists()
    );
}

fn wait_for_state(env: &TestEnv, name: &str, want: &str) {
    let t = Instant::now();
    loop {
        let v = show(env, name);
        if v["state"] == want {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{name} never reached {want}: {v}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
