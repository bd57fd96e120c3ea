//! The leak checker (`daemon.leaks`) against the real daemon and the fake VMM, and `banger
//! doctor` reporting it.

use std::time::{Duration, Instant};

use banger_core::VmId;
use banger_protocol::{
    LeakKind, LeakReport, Request, VmCreateParams, VmDeleteParams, VmRef, VmStopParams,
};
use banger_testkit::{TestEnv, pid_alive};

fn leaks(env: &TestEnv) -> LeakReport {
    serde_json::from_value(env.request(&Request::DaemonLeaks).ok()).expect("a leak report")
}

/// Creates and boots `name`; returns its id and VMM pid.
fn create(env: &TestEnv, name: &str) -> (String, i32) {
    env.request(&Request::VmCreate(VmCreateParams {
        name: Some(name.into()),
        ..Default::default()
    }))
    .ok();
    let v = env
        .request(&Request::VmShow(VmRef { vm: name.into() }))
        .ok();
    (
        v["id"].as_str().unwrap().to_string(),
        v["pid"].as_i64().unwrap() as i32,
    )
}

#[test]
fn a_clean_lifecycle_leaves_no_leaks() {
    let mut env = TestEnv::new("");
    env.start_daemon();
    env.seed_artifacts();
    assert_eq!(leaks(&env).leaks, [], "fresh daemon");

    let (_, pid) = create(&env, "tidy");
    assert_eq!(
        leaks(&env).leaks,
        [],
        "a running VM accounts for its VMM and dirs"
    );

    // Re-adopted after a daemon restart, the VMM is no longer the daemon's child: it is
    // accounted for by the pid and start time in its handles file.
    env.kill_daemon();
    env.start_daemon();
    assert!(pid_alive(pid));
    assert_eq!(leaks(&env).leaks, [], "re-adopted VMM");

    env.request(&Request::VmStop(VmStopParams {
        vm: "tidy".into(),
        timeout_secs: Some(2),
    }))
    .ok();
    assert_eq!(leaks(&env).leaks, [], "stopped");
    env.request(&Request::VmDelete(VmDeleteParams {
        vm: "tidy".into(),
        force: false,
    }))
    .ok();
    let report = leaks(&env);
    assert_eq!(report.leaks, [], "deleted");
    // network = "none": the network checks say why they did not run.
    assert!(
        report.unchecked.iter().any(|u| u.contains("network")),
        "{:?}",
        report.unchecked
    );
}

#[test]
fn an_orphaned_vmm_and_its_dirs_are_reported() {
    let mut env = TestEnv::new("");
    env.start_daemon();
    env.seed_artifacts();
    let (id, pid) = create(&env, "orphan");
    env.kill_daemon();
    {
        let store = banger_store::Store::open(env.state_dir().join("banger.db")).unwrap();
        assert!(store.delete_vm(&VmId::parse(&id).unwrap()).unwrap());
    }
    env.start_daemon();
    assert!(
        pid_alive(pid),
        "nothing in the store names it, so nothing stopped it"
    );

    let report = leaks(&env);
    let process = report
        .leaks
        .iter()
        .find(|l| l.kind == LeakKind::Process)
        .unwrap_or_else(|| panic!("no process leak in {report:?}"));
    assert_eq!(process.name, pid.to_string());
    assert!(process.detail.contains("not in the store"), "{process:?}");
    let state_dir = env.state_dir().join("vms").join(&id);
    assert!(
        report
            .leaks
            .iter()
            .any(|l| l.kind == LeakKind::Dir && l.name == state_dir.display().to_string()),
        "{report:?}"
    );
    // Reported, never removed: the checker is read-only.
    assert!(pid_alive(pid));
    assert!(state_dir.is_dir());

    // doctor names the same resources as WARN lines.
    let out = env.cli(&["doctor"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    check_doctor_output(&text, out.status.code());
    assert!(
        text.lines()
            .any(|l| l.starts_with(&format!("WARN  leak process {pid}: "))),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("WARN  leak dir ") && l.contains(&id)),
        "{text}"
    );

    // Once the process is gone, only the directory remains.
    // SAFETY: killing the fake VMM this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let t = Instant::now();
    while pid_alive(pid) && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let kinds: Vec<LeakKind> = leaks(&env).leaks.iter().map(|l| l.kind).collect();
    assert_eq!(kinds, [LeakKind::Dir]);
}

/// Every line is `PASS|WARN|FAIL  <check>: <detail>`, and the exit code is 1 exactly when a
/// line is a FAIL.
fn check_doctor_output(text: &str, code: Option<i32>) {
    assert!(!text.is_empty());
    for line in text.lines() {
        let (level, rest) = line.split_at(4.min(line.len()));
        assert!(
            matches!(level, "PASS" | "WARN" | "FAIL") && rest.starts_with("  "),
            "bad line {line:?} in:\n{text}"
        );
        assert!(rest.contains(": "), "bad line {line:?}");
    }
    let failed = text.lines().any(|l| l.starts_with("FAIL"));
    assert_eq!(code, Some(if failed { 1 } else { 0 }), "{text}");
}

#[test]
fn doctor_reports_with_and_without_a_daemon() {
    let mut env = TestEnv::new("");
    // No daemon: doctor does not start one and says so.
    let out = env.cli(&["doctor"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    check_doctor_output(&text, out.status.code());
    assert!(
        text.lines()
            .any(|l| l.starts_with("WARN  daemon: bangerd is not running")),
        "{text}"
    );
    assert!(!env.socket().exists(), "doctor started a daemon");
    for check in [
        "platform",
        "config",
        "firecracker",
        "kvm",
        "root disk",
        "store",
    ] {
        assert!(
            text.lines()
                .any(|l| l[6..].starts_with(&format!("{check}: "))),
            "{check} missing from:\n{text}"
        );
    }

    env.start_daemon();
    let out = env.cli(&["doctor"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    check_doctor_output(&text, out.status.code());
    for line in [
        "PASS  daemon: bangerd ",
        "PASS  vmm: firecracker",
        "PASS  leaks: ",
        "PASS  store: up to date",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(line)),
            "{line} missing from:\n{text}"
        );
    }
    assert!(text.contains("dns: "), "{text}");

    // A config that does not load is a FAIL line and exit code 1, not a bare error.
    let bad = env.root().join("bad.toml");
    std::fs::write(&bad, "vmm = 7\n").unwrap();
    let out = env.cli(&["--config", bad.to_str().unwrap(), "doctor"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    check_doctor_output(&text, out.status.code());
    assert!(
        text.lines()
            .any(|l| l.starts_with("FAIL  config: ") && l.contains("bad.toml")),
        "{text}"
    );
}
