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
