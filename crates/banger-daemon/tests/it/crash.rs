//! Fault injection by SIGKILL: the daemon kills itself (failpoints, `banger_daemon::failpoint`)
//! before and after every step of create, start, stop and delete — each a case in a fresh
//! environment — and is restarted; the VMM is killed under a running daemon; the daemon is
//! killed while idle with two running VMs. After each case the leak checker finds nothing, no VM
//! that existed before the operation has vanished (a delete past its point of no return is
//! finished instead), nothing of a non-running VM is left on the host, and the VM (or, for a
//! create that was rolled back, a new one of the same name) starts and deletes normally.

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use banger_core::OpId;
use banger_daemon::failpoint::{self, PHASES};
use banger_protocol::{
    Envelope, Frame, LeakReport, PROTOCOL_VERSION, Request, VmCreateParams, VmDeleteParams, VmRef,
    VmStopParams,
};
use banger_testkit::{TestEnv, pid_alive, raw_request};

const NAME: &str = "victim";

#[derive(Debug, Clone, Copy)]
struct Case {
    phase: &'static str,
    step: &'static str,
    after: bool,
}

impl Case {
    fn label(&self) -> String {
        format!(
            "crash@{}:{}:{}",
            self.phase,
            self.step,
            if self.after { "after" } else { "before" }
        )
    }

    fn is(&self, step: &str, after: bool) -> bool {
        self.step == step && self.after == after
    }

    /// Whether this boundary comes after `step` began: `step`'s own `after` boundary or any
    /// boundary of a later step (`step`'s `before` boundary does not count).
    fn past(&self, step: &str) -> bool {
        let steps = PHASES
            .iter()
            .find(|(p, _)| *p == self.phase)
            .map(|(_, s)| *s)
            .unwrap();
        let me = steps.iter().position(|s| *s == self.step).unwrap();
        let at = steps.iter().position(|s| *s == step).unwrap();
        me > at || (me == at && self.after)
    }

    /// What the restarted daemon must show: `None` = no VM, else its state; plus a phrase its
    /// reconcile must have logged.
    fn expect(&self) -> (Option<&'static str>, Option<&'static str>) {
        match self.phase {
            // A create is atomic: complete (commit done, start not begun) or rolled back.
            "create" if self.is("commit", true) => (Some("created"), None),
            "create" if self.past("allocate") => (None, Some("create was interrupted")),
            "create" => (None, None),
            "start" => (Some("stopped"), Some("marked stopped")),
            "stop" if self.is("mark_stopping", false) => (Some("running"), Some("re-adopted")),
            // Saved as stopped: the stop is done, nothing is left to reconcile.
            "stop" if self.is("mark_stopped", true) => (Some("stopped"), None),
            "stop" => (Some("stopped"), Some("marked stopped")),
            // The files (and the mark with them) are gone: the delete is done.
            "delete" if self.is("remove_files", true) => (None, None),
            "delete" if self.past("mark_deleting") => (None, Some("delete was interrupted")),
            "delete" if self.is("vmm_kill", false) => (Some("running"), Some("re-adopted")),
            "delete" => (Some("stopped"), Some("marked stopped")),
            p => panic!("unknown phase {p}"),
        }
    }
}

fn show(env: &TestEnv, name: &str) -> serde_json::Value {
    env.request(&Request::VmShow(VmRef { vm: name.into() }))
        .ok()
}

fn list(env: &TestEnv) -> Vec<serde_json::Value> {
    env.request(&Request::VmList).ok()["vms"]
        .as_array()
        .unwrap()
        .clone()
}

fn leaks(env: &TestEnv) -> LeakReport {
    serde_json::from_value(env.request(&Request::DaemonLeaks).ok()).expect("a leak report")
}

fn create(env: &TestEnv, name: &str, no_start: bool) -> serde_json::Value {
    env.request(&Request::VmCreate(VmCreateParams {
        name: Some(name.into()),
        no_start,
        ..Default::default()
    }))
    .ok();
    show(env, name)
}

fn delete(env: &TestEnv, name: &str) {
    env.request(&Request::VmDelete(VmDeleteParams {
        vm: name.into(),
        force: true,
    }))
    .ok();
}

fn known_hosts(env: &TestEnv) -> String {
    std::fs::read_to_string(env.state_dir().join("ssh/known_hosts")).unwrap_or_default()
}

/// Sends `req` to a daemon that is armed to die during it: the connection must end without a
/// final frame.
fn send_to_doomed(env: &TestEnv, req: &Request, label: &str) {
    let op = OpId::generate();
    let line = Envelope {
        v: PROTOCOL_VERSION,
        op_id: &op,
        request: req,
    }
    .to_line();
    // A reset connection is as good as EOF: either way the daemon is gone.
    if let Ok(frames) = raw_request(&env.socket(), line.as_bytes()) {
        assert!(
            !frames.last().is_some_and(Frame::is_final),
            "{label}: the operation finished instead of crashing: {frames:?}"
        );
    }
}

fn assert_killed_by_sigkill(env: &mut TestEnv, label: &str) {
    let status = env
        .wait_daemon_exit(Duration::from_secs(15))
        .unwrap_or_else(|| panic!("{label}: the daemon did not die"));
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "{label}: daemon exit status {status}; log:\n{}",
        env.daemon_log()
    );
}

fn assert_no_leaks(env: &TestEnv, label: &str) {
    let report = leaks(env);
    assert!(
        report.leaks.is_empty(),
        "{label}: leaks {:#?}; log:\n{}",
        report.leaks,
        env.daemon_log()
    );
}

/// The daemon log eventually contains `phrase` (the log is written by a background thread).
fn assert_logged(env: &TestEnv, phrase: &str, label: &str) {
    let t = Instant::now();
    while !env.daemon_log().contains(phrase) {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "{label}: reconcile did not report {phrase:?}; log:\n{}",
            env.daemon_log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn dir_is_empty_or_missing(p: &Path) -> bool {
    std::fs::read_dir(p).map_or(true, |mut rd| rd.next().is_none())
}

fn run_case(c: Case) {
    let label = c.label();
    let armed = [
        (failpoint::ENV, label.as_str()),
        (failpoint::ENABLE_ENV, "1"),
    ];
    let mut env = TestEnv::new("");
    // The precondition is made by a daemon without the failpoint, which then shuts down; the
    // armed daemon re-adopts a running VM.
    if c.phase == "create" {
        env.start_daemon_with_env(&armed);
    } else {
        env.start_daemon();
    }
    env.seed_artifacts();
    let before = match c.phase {
        "create" => None,
        "start" => Some(create(&env, NAME, true)),
        _ => Some(create(&env, NAME, false)),
    };
    if c.phase != "create" {
        env.stop_daemon();
        env.start_daemon_with_env(&armed);
    }
    if c.phase == "stop" || c.phase == "delete" {
        assert_eq!(before.as_ref().unwrap()["state"], "running", "{label}");
        assert_eq!(
            show(&env, NAME)["pid"],
            before.as_ref().unwrap()["pid"],
            "{label}: re-adopted"
        );
    }
    let before_pid = before.as_ref().and_then(|v| v["pid"].as_i64());

    let req = match c.phase {
        "create" => Request::VmCreate(VmCreateParams {
            name: Some(NAME.into()),
            ..Default::default()
        }),
        "start" => Request::VmStart(VmRef { vm: NAME.into() }),
        "stop" => Request::VmStop(VmStopParams {
            vm: NAME.into(),
            timeout_secs: Some(2),
        }),
        "delete" => Request::VmDelete(VmDeleteParams {
            vm: NAME.into(),
            force: true,
        }),
        p => panic!("unknown phase {p}"),
    };
    send_to_doomed(&env, &req, &label);
    assert_killed_by_sigkill(&mut env, &label);

    // Restart without failpoints; reconcile is done once the daemon answers.
    env.start_daemon();
    assert_no_leaks(&env, &label);
    let (want_state, want_action) = c.expect();
    if let Some(phrase) = want_action {
        assert_logged(&env, phrase, &label);
    }
    let vms = list(&env);
    match want_state {
        None => {
            assert!(vms.is_empty(), "{label}: expected no VM, found {vms:#?}");
            // Nothing of it remains: no dirs, no known_hosts entry, no process.
            assert!(
                env.vm_leftovers().is_empty(),
                "{label}: {:?}",
                env.vm_leftovers()
            );
            assert!(
                !known_hosts(&env).contains(&format!("{NAME}.vm")),
                "{label}: known_hosts still names it:\n{}",
                known_hosts(&env)
            );
            assert!(
                env.stray_processes().is_empty(),
                "{label}: {:?}",
                env.stray_processes()
            );
        }
        Some(state) => {
            assert_eq!(vms.len(), 1, "{label}: {vms:#?}");
            let v = show(&env, NAME);
            assert_eq!(v["state"], state, "{label}: {v}");
            if let Some(b) = &before {
                assert_eq!(v["id"], b["id"], "{label}: the same VM");
            }
            let id = v["id"].as_str().unwrap().to_string();
            let run_dir = env.runtime_dir().join("vms").join(&id);
            let handles = env.state_dir().join("vms").join(&id).join("handles.json");
            if state == "running" {
                let pid = v["pid"].as_i64().expect("a running VM has a pid");
                assert_eq!(Some(pid), before_pid, "{label}: the same VMM re-adopted");
                assert!(pid_alive(pid as i32), "{label}");
                let strays = env.stray_processes();
                assert!(
                    strays.len() == 1 && strays[0].0 as i64 == pid,
                    "{label}: {strays:?}"
                );
            } else {
                assert!(v["pid"].is_null(), "{label}: {v}");
                assert!(!run_dir.exists(), "{label}: run dir of a {state} VM left");
                assert!(
                    !handles.exists(),
                    "{label}: handles file of a {state} VM left"
                );
                assert!(
                    env.stray_processes().is_empty(),
                    "{label}: {:?}",
                    env.stray_processes()
                );
                if let Some(pid) = before_pid {
                    assert!(!pid_alive(pid as i32), "{label}: old VMM {pid} alive");
                }
                // Its files are intact: it starts.
                env.request(&Request::VmStart(VmRef { vm: NAME.into() }))
                    .ok();
                assert_eq!(show(&env, NAME)["state"], "running", "{label}");
                assert_no_leaks(&env, &label);
            }
            delete(&env, NAME);
        }
    }
    // The state is usable: the name (and address) are free again; a VM of that name is made,
    // runs and goes away without a trace.
    let v = create(&env, NAME, false);
    assert_eq!(v["state"], "running", "{label}: {v}");
    delete(&env, NAME);
    assert!(list(&env).is_empty(), "{label}");
    assert!(
        env.vm_leftovers().is_empty(),
        "{label}: {:?}",
        env.vm_leftovers()
    );
    assert!(
        dir_is_empty_or_missing(&env.runtime_dir().join("vms")),
        "{label}"
    );
    assert!(
        env.stray_processes().is_empty(),
        "{label}: {:?}",
        env.stray_processes()
    );
    assert!(
        !known_hosts(&env).contains(&format!("{NAME}.vm")),
        "{label}"
    );
    assert_no_leaks(&env, &label);
}

/// SIGKILL of the VMM under a running daemon: `stopped` with the log tail, everything cleaned,
/// within seconds; the VM starts again.
fn vmm_killed_while_running() {
    let label = "vmm SIGKILL while running";
    let mut env = TestEnv::new("");
    env.start_daemon();
    env.seed_artifacts();
    let v = create(&env, NAME, false);
    let pid = v["pid"].as_i64().unwrap() as i32;
    let id = v["id"].as_str().unwrap().to_string();
    // SAFETY: killing the fake VMM this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let t = Instant::now();
    let v = loop {
        let v = show(&env, NAME);
        if v["state"] == "stopped" {
            break v;
        }
        assert!(t.elapsed() < Duration::from_secs(5), "{label}: {v}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        v["last_error"]
            .as_str()
            .unwrap()
            .contains("exited on its own"),
        "{label}: {v}"
    );
    assert!(v["pid"].is_null(), "{label}: {v}");
    assert!(!env.runtime_dir().join("vms").join(&id).exists(), "{label}");
    assert!(
        !env.state_dir()
            .join("vms")
            .join(&id)
            .join("handles.json")
            .exists(),
        "{label}"
    );
    assert!(env.stray_processes().is_empty(), "{label}");
    assert_no_leaks(&env, label);
    env.request(&Request::VmStart(VmRef { vm: NAME.into() }))
        .ok();
    delete(&env, NAME);
    assert!(env.vm_leftovers().is_empty(), "{label}");
    assert_no_leaks(&env, label);
}

/// SIGKILL of an idle daemon with two running VMs: both re-adopted, same VMMs.
fn daemon_killed_while_idle() {
    let label = "daemon SIGKILL while idle";
    let mut env = TestEnv::new("");
    env.start_daemon();
    env.seed_artifacts();
    let pids: Vec<i64> = ["one", "two"]
        .iter()
        .map(|n| create(&env, n, false)["pid"].as_i64().unwrap())
        .collect();
    env.kill_daemon();
    env.start_daemon();
    for (n, pid) in ["one", "two"].iter().zip(&pids) {
        let v = show(&env, n);
        assert_eq!(v["state"], "running", "{label}: {v}");
        assert_eq!(v["pid"].as_i64(), Some(*pid), "{label}: same VMM");
        assert_logged(&env, &format!("re-adopted running VMM pid {pid}"), label);
    }
    assert_no_leaks(&env, label);
    let mut strays: Vec<i64> = env
        .stray_processes()
        .iter()
        .map(|(p, _)| *p as i64)
        .collect();
    strays.sort();
    let mut want = pids.clone();
    want.sort();
    assert_eq!(strays, want, "{label}");
    for n in ["one", "two"] {
        delete(&env, n);
    }
    assert!(env.vm_leftovers().is_empty(), "{label}");
    assert!(env.stray_processes().is_empty(), "{label}");
    assert_no_leaks(&env, label);
}

#[test]
fn sigkill_at_every_step_leaves_no_leaks_and_loses_no_vm() {
    let started = Instant::now();
    let mut cases = Vec::new();
    for (phase, steps) in PHASES {
        for &step in *steps {
            for after in [false, true] {
                cases.push(Case { phase, step, after });
            }
        }
    }
    let total = cases.len() + 2;
    let queue = Mutex::new(cases);
    let failures = Mutex::new(Vec::<String>::new());
    let threads: usize = std::env::var("BANGER_CRASH_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                loop {
                    let Some(c) = queue.lock().unwrap().pop() else {
                        break;
                    };
                    let t = Instant::now();
                    let r = std::panic::catch_unwind(|| run_case(c));
                    match r {
                        Ok(()) => println!("ok   {} ({:?})", c.label(), t.elapsed()),
                        Err(_) => {
                            println!("FAIL {}", c.label());
                            failures.lock().unwrap().push(c.label());
                        }
                    }
                }
            });
        }
        s.spawn(|| {
            for (name, f) in [
                (
                    "vmm SIGKILL while running",
                    vmm_killed_while_running as fn(),
                ),
                ("daemon SIGKILL while idle", daemon_killed_while_idle),
            ] {
                match std::panic::catch_unwind(f) {
                    Ok(()) => println!("ok   {name}"),
                    Err(_) => failures.lock().unwrap().push(name.to_string()),
                }
            }
        });
    });
    println!("crash cases: {total} in {:?}", started.elapsed());
    let failures = failures.into_inner().unwrap();
    assert!(
        failures.is_empty(),
        "{} of {total} crash cases failed: {failures:#?}",
        failures.len()
    );
}

/// Failpoints are a test facility: without `BANGER_FAILPOINTS_ENABLE=1` they are ignored (and
/// the log says so); with it, a spec naming no real step stops the daemon at start-up.
#[test]
fn failpoints_need_the_enable_switch_and_a_valid_spec() {
    let mut env = TestEnv::new("");
    env.start_daemon_with_env(&[(failpoint::ENV, "crash@create:validate:before")]);
    env.seed_artifacts();
    let v = create(&env, NAME, false);
    assert_eq!(v["state"], "running", "{v}");
    assert_logged(&env, "is set but ignored", "no enable switch");
    env.stop_daemon();

    let out = env
        .daemon_command()
        .env(failpoint::ENV, "crash@create:no_such_step:before")
        .env(failpoint::ENABLE_ENV, "1")
        .stderr(std::process::Stdio::piped())
        .output()
        .expect("run bangerd");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no_such_step"), "{stderr}");
    assert!(stderr.contains("commit"), "lists the real steps: {stderr}");
}
