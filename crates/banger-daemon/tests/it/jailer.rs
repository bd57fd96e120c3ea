//! Firecracker through the jailer (`jailer_bin`): the fake jailer in front of the fake
//! Firecracker. The VMM runs as the jail user, in its own jail root holding hard links to the
//! VM's files, is told only jail-relative paths, and its jail goes away with it: stop, kill, a
//! failed start, a daemon restart. A real jailer with real Firecracker needs hardware KVM.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use banger_protocol::{Request, VmCreateParams, VmDeleteParams, VmKillParams, VmRef, VmStopParams};
use banger_testkit::{TestEnv, bin, pid_alive};

const JAIL_UID: u32 = 65534;
const JAIL_GID: u32 = 65534;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// An environment whose Firecracker VMMs go through the fake jailer as 65534:65534. `None`
/// (after `SKIP`) when not root: the jailer needs root.
fn jailed_env(extra: &str) -> Option<TestEnv> {
    if !is_root() {
        println!("SKIP: the jailer needs a root daemon (chown, mknod, setuid)");
        return None;
    }
    let env = TestEnv::new(&format!(
        "jailer_bin = \"{}\"\n{extra}",
        bin("fake-jailer").display()
    ));
    // The fake Firecracker runs as the jail user: it must still reach its control and record
    // files in the (0700) temp dir.
    std::fs::set_permissions(env.root(), std::fs::Permissions::from_mode(0o711)).unwrap();
    env.set_control(serde_json::json!({}));
    std::fs::set_permissions(&env.control, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(&env.record, b"").unwrap();
    std::fs::set_permissions(&env.record, std::fs::Permissions::from_mode(0o666)).unwrap();
    Some(env)
}

/// The fake jailer does not chroot (its module docs say why), so the dynamically linked fake
/// Firecracker may run behind it; the daemon is told so.
fn start_daemon(env: &mut TestEnv) {
    env.start_daemon_with_env(&[(banger_daemon::vmms::JAILER_NO_CHROOT_ENV, "1")]);
}

fn with_ids() -> String {
    format!("jailer_uid = {JAIL_UID}\njailer_gid = {JAIL_GID}\n")
}

fn set_control(env: &TestEnv, v: serde_json::Value) {
    env.set_control(v);
    std::fs::set_permissions(&env.control, std::fs::Permissions::from_mode(0o644)).unwrap();
}

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

/// `<state>/jail/fake-firecracker/<id>`: what cleanup must remove.
fn jail_dir(env: &TestEnv, id: &str) -> PathBuf {
    env.state_dir()
        .join("jail")
        .join("fake-firecracker")
        .join(id)
}

/// (real uid, effective uid, real gid, effective gid) of a process.
fn ids_of(pid: i32) -> (u32, u32, u32, u32) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> Vec<u32> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in {status}"))
            .split_whitespace()
            .map(|n| n.parse().unwrap())
            .collect()
    };
    let (u, g) = (field("Uid:"), field("Gid:"));
    (u[0], u[1], g[0], g[1])
}

fn wait_gone(pid: i32) {
    let t = Instant::now();
    while pid_alive(pid) {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "pid {pid} still alive"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn recorded_calls(env: &TestEnv) -> Vec<serde_json::Value> {
    std::fs::read_to_string(&env.record)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn jailed_vmm_runs_as_the_jail_user_in_its_jail_and_the_jail_goes_with_it() {
    let Some(mut env) = jailed_env(&with_ids()) else {
        return;
    };
    start_daemon(&mut env);
    env.seed_artifacts();
    env.request(&create("jailed")).ok();
    let v = show(&env, "jailed");
    assert_eq!(v["state"], "running", "{v}");
    let pid = v["pid"].as_i64().unwrap() as i32;
    let id = v["id"].as_str().unwrap().to_string();

    // The spawned pid is the (fake) Firecracker itself, dropped to the jail user, working in
    // its jail root.
    assert_eq!(ids_of(pid), (JAIL_UID, JAIL_UID, JAIL_GID, JAIL_GID));
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    let jail = jail_dir(&env, &id);
    let root = std::fs::canonicalize(jail.join("root")).unwrap();
    assert_eq!(
        exe,
        root.join("fake-firecracker"),
        "the jail's own copy runs"
    );
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap(),
        root
    );
    let handles: serde_json::Value = serde_json::from_slice(
        &std::fs::read(env.state_dir().join("vms").join(&id).join("handles.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        handles["vmm"]["control_socket"].as_str().map(PathBuf::from),
        Some(root.join("run/firecracker.socket")),
        "{handles}"
    );

    // The base is private; the VM's files are hard links owned for the jail user.
    let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().mode() & 0o7777;
    assert_eq!(mode(&env.state_dir().join("jail")), 0o700);
    for (name, writable) in [
        ("vmlinux", false),
        ("initrd", false),
        ("drive-image", false),
        ("drive-root", true),
        ("drive-work", true),
        ("drive-config", false),
    ] {
        let m = std::fs::symlink_metadata(root.join(name))
            .unwrap_or_else(|e| panic!("{name} not in the jail: {e}"));
        assert!(m.file_type().is_file(), "{name}");
        assert!(m.nlink() >= 2, "{name} is not a hard link");
        if writable {
            assert_eq!(
                (m.uid(), m.gid(), m.mode() & 0o777),
                (JAIL_UID, JAIL_GID, 0o600),
                "{name}"
            );
        } else {
            assert_eq!((m.gid(), m.mode() & 0o777), (JAIL_GID, 0o440), "{name}");
        }
    }
    let root_disk = env.state_dir().join("vms").join(&id).join("root.ext4");
    assert_eq!(
        std::fs::metadata(&root_disk).unwrap().ino(),
        std::fs::metadata(root.join("drive-root")).unwrap().ino()
    );

    // Firecracker was told only jail-relative paths, and accepted every call.
    let calls = recorded_calls(&env);
    assert!(calls.len() >= 6, "{calls:?}");
    for c in &calls {
        let status = c["status"].as_u64().unwrap();
        assert!((200..300).contains(&status), "rejected call: {c}");
    }
    let boot = calls.iter().find(|c| c["path"] == "/boot-source").unwrap();
    assert_eq!(boot["body"]["kernel_image_path"], "vmlinux", "{boot}");
    assert_eq!(boot["body"]["initrd_path"], "initrd", "{boot}");
    let drives: Vec<&str> = calls
        .iter()
        .filter(|c| c["path"].as_str().unwrap().starts_with("/drives/"))
        .map(|c| c["body"]["path_on_host"].as_str().unwrap())
        .collect();
    assert_eq!(
        drives,
        ["drive-image", "drive-root", "drive-work", "drive-config"]
    );

    // Stop: the VMM and its jail are gone.
    env.request(&Request::VmStop(VmStopParams {
        vm: "jailed".into(),
        timeout_secs: Some(2),
    }))
    .ok();
    assert_eq!(show(&env, "jailed")["state"], "stopped");
    assert!(!pid_alive(pid));
    assert!(!jail.exists(), "{} left after stop", jail.display());
    assert!(root_disk.is_file(), "the VM's disk survives its jail");

    // Start again (a fresh jail), then kill: gone again.
    env.request(&Request::VmStart(VmRef {
        vm: "jailed".into(),
    }))
    .ok();
    let pid2 = show(&env, "jailed")["pid"].as_i64().unwrap() as i32;
    assert_eq!(ids_of(pid2).0, JAIL_UID);
    assert!(jail.join("root/run/firecracker.socket").exists());
    env.request(&Request::VmKill(VmKillParams {
        vm: "jailed".into(),
        signal: None,
    }))
    .ok();
    assert!(!pid_alive(pid2));
    assert!(!jail.exists(), "{} left after kill", jail.display());

    env.request(&Request::VmDelete(VmDeleteParams {
        vm: "jailed".into(),
        force: false,
    }))
    .ok();
    assert!(env.vm_leftovers().is_empty(), "{:?}", env.vm_leftovers());
    assert!(
        env.stray_processes().is_empty(),
        "{:?}",
        env.stray_processes()
    );
}

#[test]
fn failed_jailed_starts_leave_no_jail() {
    let Some(mut env) = jailed_env(&with_ids()) else {
        return;
    };
    start_daemon(&mut env);
    env.seed_artifacts();
    for (step, rule) in [
        (
            "vmm_configure",
            serde_json::json!({"method": "PUT", "path": "/boot-source"}),
        ),
        (
            "vmm_boot",
            serde_json::json!({"method": "PUT", "path": "/actions", "action_type": "InstanceStart"}),
        ),
    ] {
        set_control(&env, serde_json::json!({"fail": [rule]}));
        let name = format!("fail-{}", step.replace('_', "-"));
        let (_, msg) = env.request(&create(&name)).err();
        assert!(msg.contains(step), "{msg}");
        let v = show(&env, &name);
        assert_eq!(v["state"], "error", "{v}");
        let id = v["id"].as_str().unwrap();
        assert!(
            !jail_dir(&env, id).exists(),
            "{step}: {} left",
            jail_dir(&env, id).display()
        );
    }
    // Once the fault is gone, the same VM starts and stops cleanly.
    set_control(&env, serde_json::json!({}));
    env.request(&Request::VmStart(VmRef {
        vm: "fail-vmm-boot".into(),
    }))
    .ok();
    let v = show(&env, "fail-vmm-boot");
    assert_eq!(v["state"], "running", "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    assert!(jail_dir(&env, &id).exists());
    env.request(&Request::VmStop(VmStopParams {
        vm: "fail-vmm-boot".into(),
        timeout_secs: Some(2),
    }))
    .ok();
    assert!(!jail_dir(&env, &id).exists());
    assert!(
        env.stray_processes().is_empty(),
        "{:?}",
        env.stray_processes()
    );
}

#[test]
fn restarted_daemon_readopts_jailed_vmms_and_cleans_dead_ones() {
    let Some(mut env) = jailed_env(&with_ids()) else {
        return;
    };
    start_daemon(&mut env);
    env.seed_artifacts();
    env.request(&create("survivor")).ok();
    env.request(&create("casualty")).ok();
    let s = show(&env, "survivor");
    let c = show(&env, "casualty");
    let (live_pid, dead_pid) = (
        s["pid"].as_i64().unwrap() as i32,
        c["pid"].as_i64().unwrap() as i32,
    );
    let (live_id, dead_id) = (
        s["id"].as_str().unwrap().to_string(),
        c["id"].as_str().unwrap().to_string(),
    );

    env.kill_daemon();
    assert!(pid_alive(live_pid), "jailed VMMs outlive the daemon");
    // SAFETY: killing a fake VMM this test started.
    unsafe { libc::kill(dead_pid, libc::SIGKILL) };
    wait_gone(dead_pid);

    start_daemon(&mut env);
    let s = show(&env, "survivor");
    assert_eq!(s["state"], "running", "{s}");
    assert_eq!(
        s["pid"].as_i64(),
        Some(live_pid as i64),
        "same VMM re-adopted"
    );
    assert!(jail_dir(&env, &live_id).exists());
    let c = show(&env, "casualty");
    assert_eq!(c["state"], "stopped", "{c}");
    assert!(
        !jail_dir(&env, &dead_id).exists(),
        "reconcile left the dead VMM's jail"
    );

    // The re-adopted VMM answers on its jailed socket and is cleaned up on stop.
    env.request(&Request::VmStop(VmStopParams {
        vm: "survivor".into(),
        timeout_secs: Some(2),
    }))
    .ok();
    assert!(!pid_alive(live_pid));
    assert!(!jail_dir(&env, &live_id).exists());
    let ctrl_alt_del = recorded_calls(&env).into_iter().any(|c| {
        c["path"] == "/actions"
            && c["body"]["action_type"] == "SendCtrlAltDel"
            && c["status"].as_u64() == Some(204)
    });
    assert!(ctrl_alt_del, "the stop went through the jailed API socket");
    assert!(
        env.stray_processes().is_empty(),
        "{:?}",
        env.stray_processes()
    );
}

#[test]
fn jailer_without_a_user_to_run_as_is_refused() {
    if Path::new(banger_config::INSTALL_RECORD_PATH).exists() {
        println!("SKIP: this host has a system install record, whose owner would be used");
        return;
    }
    let Some(mut env) = jailed_env("") else {
        return;
    };
    start_daemon(&mut env);
    env.seed_artifacts();
    let (_, msg) = env.request(&create("nobody")).err();
    assert!(msg.contains("preflight"), "{msg}");
    assert!(msg.contains("set jailer_uid and jailer_gid"), "{msg}");
    assert!(env.stray_processes().is_empty());
}

/// A real jailer in front of real Firecracker: needs both binaries and hardware KVM.
#[test]
fn real_jailer_boots_real_firecracker() {
    let (Some(fc), Some(jailer)) = (
        banger_sys::find_in_path("firecracker"),
        banger_sys::find_in_path("jailer"),
    ) else {
        println!("SKIP: real jailer + Firecracker: no firecracker and jailer binaries in PATH");
        return;
    };
    let probe = banger_vmm::qemu::detect_accel();
    if probe.accel != banger_vmm::qemu::Accel::Kvm {
        println!(
            "SKIP: real jailer + Firecracker need hardware KVM: {}",
            probe.reason
        );
        return;
    }
    let extra = format!(
        "vmm = \"firecracker\"\nfirecracker_bin = \"{}\"\njailer_bin = \"{}\"\n{}",
        fc.display(),
        jailer.display(),
        with_ids()
    );
    let Some(mut env) = TestEnv::real(&extra) else {
        return;
    };
    env.start_daemon();
    let o = env.cli(&["vm", "create", "--name", "jailed"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v = show(&env, "jailed");
    let pid = v["pid"].as_i64().unwrap() as i32;
    assert_eq!(ids_of(pid).0, JAIL_UID);
    let o = env.cli(&["vm", "exec", "jailed", "--", "true"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = env.cli(&["vm", "rm", "--force", "jailed"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // The jailer names the jail dir after the canonical binary's file name.
    let exec_name = std::fs::canonicalize(&fc).unwrap();
    let jail = env
        .state_dir()
        .join("jail")
        .join(exec_name.file_name().unwrap());
    let left: Vec<_> = std::fs::read_dir(&jail)
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "jails left: {left:?}");
    env.stop_daemon();
}

#[test]
fn a_dynamically_linked_firecracker_is_refused_for_a_jailed_launch_in_preflight() {
    let Some(mut env) = jailed_env(&with_ids()) else {
        return;
    };
    // No "the jailer does not chroot" hint: the daemon checks Firecracker as for the real
    // jailer, and fake-firecracker is dynamically linked.
    env.start_daemon();
    env.seed_artifacts();
    let (_, msg) = env.request(&create("dynamic")).err();
    assert!(msg.contains("at step preflight"), "{msg}");
    assert!(
        msg.contains("dynamically linked") && msg.contains("fake-firecracker"),
        "{msg}"
    );
    assert!(!msg.contains('\n'), "one line: {msg}");
    let v = show(&env, "dynamic");
    assert!(v["pid"].is_null(), "{v}");
    assert!(env.stray_processes().is_empty());
}

#[test]
fn a_missing_parent_cgroup_is_created_so_the_jailer_moves_the_vmm_there() {
    let Some(mut env) = jailed_env(&with_ids()) else {
        return;
    };
    let Some(mount) = banger_vmm::firecracker::jailer::host_cgroup2_mount() else {
        println!("SKIP: no cgroup v2 mount on this host");
        return;
    };
    let parent = mount.join("banger");
    // rmdir only removes an empty cgroup without children: one in use stays, and the test
    // then only shows that an existing parent is used.
    let removed = std::fs::remove_dir(&parent).is_ok() || !parent.exists();
    start_daemon(&mut env);
    env.seed_artifacts();
    let v = env.request(&create("cg")).ok();
    assert_eq!(v["state"], "running", "{v}");
    assert!(parent.is_dir(), "{} was not created", parent.display());
    // The jailer moved the VMM there (it silently does not when the cgroup is missing, and the
    // VMM then stays in the daemon's cgroup, e.g. its systemd service's).
    let pid = show(&env, "cg")["pid"].as_i64().unwrap();
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(
        cgroups.lines().any(|l| l == "0::/banger"),
        "VMM {pid} is not in the banger cgroup: {cgroups}"
    );
    if !removed {
        println!(
            "note: {} was in use, so it was not removed first",
            parent.display()
        );
    }
}

#[test]
fn a_failed_jailed_start_quotes_the_log_of_that_start() {
    let Some(mut env) = jailed_env(&format!("{}vmm_timeout_secs = 1\n", with_ids())) else {
        return;
    };
    start_daemon(&mut env);
    env.seed_artifacts();
    let v = env
        .request(&Request::VmCreate(VmCreateParams {
            name: Some("relog".into()),
            no_start: true,
            ..Default::default()
        }))
        .ok();
    let id = v["id"].as_str().unwrap().to_string();
    // An older run's lines in the VM's (appended) VMM log.
    let log = env.state_dir().join("vms").join(&id).join("vmm.log");
    let old: String = (0..30).map(|i| format!("OLD RUN line {i}\n")).collect();
    std::fs::write(&log, old).unwrap();
    // This start's VMM never opens its API socket.
    set_control(&env, serde_json::json!({"socket_delay_ms": 30_000}));
    let (_, msg) = env
        .request(&Request::VmStart(VmRef { vm: "relog".into() }))
        .err();
    assert!(msg.contains("vmm_spawn"), "{msg}");
    assert!(!msg.contains("OLD RUN"), "{msg}");
    assert!(!jail_dir(&env, &id).exists());
    assert!(env.stray_processes().is_empty());
}
