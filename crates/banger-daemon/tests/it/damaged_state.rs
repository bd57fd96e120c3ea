//! Damaged state on disk: a truncated handles file, a deleted VM dir, an empty or garbled
//! state database. The daemon never abandons a running VMM, never takes damage for a fresh
//! install, refuses to start over a damaged store in one line naming it, and keeps the
//! damaged files as they are.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use banger_protocol::{Request, VmCreateParams, VmRef};
use banger_testkit::{TestEnv, pid_alive};

fn create(env: &TestEnv, name: &str) -> (String, i32) {
    let v = env
        .request(&Request::VmCreate(VmCreateParams {
            name: Some(name.into()),
            ..Default::default()
        }))
        .ok();
    let id = v["id"].as_str().unwrap().to_string();
    let h: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(env.state_dir().join("vms").join(&id).join("handles.json"))
            .unwrap(),
    )
    .unwrap();
    (id, h["vmm"]["pid"].as_i64().unwrap() as i32)
}

fn wait_gone(pid: i32, secs: u64) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while pid_alive(pid) {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

#[test]
fn truncated_handles_or_deleted_vm_dir_never_orphan_the_vmm() {
    let mut env = TestEnv::new("");
    env.start_daemon();
    env.seed_artifacts();
    let (a, pid_a) = create(&env, "alpha");
    let (b, pid_b) = create(&env, "beta");
    env.stop_daemon();
    assert!(pid_alive(pid_a) && pid_alive(pid_b), "VMs keep running");

    // alpha's handles file cut in half; beta's whole VM dir gone.
    let handles = env.state_dir().join("vms").join(&a).join("handles.json");
    let text = std::fs::read(&handles).unwrap();
    let cut = text[..text.len() / 2].to_vec();
    std::fs::write(&handles, &cut).unwrap();
    std::fs::remove_dir_all(env.state_dir().join("vms").join(&b)).unwrap();

    env.start_daemon();
    assert!(
        wait_gone(pid_a, 10),
        "alpha's VMM (pid {pid_a}) was abandoned; log:\n{}",
        env.daemon_log()
    );
    assert!(
        wait_gone(pid_b, 10),
        "beta's VMM (pid {pid_b}) was abandoned; log:\n{}",
        env.daemon_log()
    );
    // The damaged file is kept as it was.
    let kept = handles.with_extension("json.damaged");
    assert_eq!(std::fs::read(&kept).unwrap(), cut);
    // Reported: in the VM and in the log.
    for name in ["alpha", "beta"] {
        let v = env
            .request(&Request::VmShow(VmRef { vm: name.into() }))
            .ok();
        assert_eq!(v["state"], "stopped", "{v}");
        let err = v["last_error"].as_str().unwrap_or_default();
        assert!(err.contains("handles file"), "{name}: {err}");
    }
    let log = env.daemon_log();
    assert!(log.contains("kept as"), "{log}");
    assert!(
        env.stray_processes().is_empty(),
        "{:?}",
        env.stray_processes()
    );
    // alpha starts again.
    env.request(&Request::VmStart(VmRef { vm: "alpha".into() }))
        .ok();
}

/// Runs bangerd for this environment and expects it to refuse: its stderr.
fn refused_start(env: &TestEnv) -> String {
    let mut child = env
        .daemon_command()
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn bangerd");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            use std::io::Read;
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            assert!(!status.success(), "bangerd exited 0: {err}");
            return err;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "bangerd started over a damaged store; log:\n{}",
                env.daemon_log()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn files_in(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn empty_or_garbled_store_is_refused_and_kept() {
    let mut env = TestEnv::new("");
    env.start_daemon();
    env.seed_artifacts();
    let (id, pid) = create(&env, "alpha");
    env.stop_daemon();
    let db = env.state_dir().join("banger.db");
    let good = std::fs::read(&db).unwrap();
    let run_dir = env.runtime_dir().join("vms").join(&id);
    let sockets = files_in(&run_dir);
    assert!(!sockets.is_empty());

    // Empty: refused in one line naming the file, not taken for a fresh install.
    std::fs::write(&db, b"").unwrap();
    let err = refused_start(&env);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains(&db.display().to_string()) && err.contains("empty"),
        "{err}"
    );
    assert_eq!(std::fs::metadata(&db).unwrap().len(), 0);
    assert_eq!(
        files_in(&run_dir),
        sockets,
        "the running VM's sockets were touched"
    );
    assert!(pid_alive(pid));

    // Garbage over its pages: refused too; `daemon stop` works; doctor says FAIL store.
    let mut bad = good.clone();
    for b in &mut bad[4096..] {
        *b = 0xa5;
    }
    std::fs::write(&db, &bad).unwrap();
    let err = refused_start(&env);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains(&db.display().to_string()) && err.contains("damaged"),
        "{err}"
    );
    let o = env.cli(&["daemon", "stop"]);
    assert!(
        o.status.success(),
        "daemon stop: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = env.cli(&["doctor"]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let line = out
        .lines()
        .find(|l| l.contains(" store:"))
        .unwrap_or_else(|| panic!("no store line in:\n{out}"));
    assert!(
        line.starts_with("FAIL") && line.contains("damaged"),
        "{line}"
    );
    assert_eq!(std::fs::read(&db).unwrap(), bad, "the evidence was changed");
    assert_eq!(files_in(&run_dir), sockets);
    assert!(pid_alive(pid));

    // With the database restored, the daemon re-adopts the VM.
    std::fs::write(&db, &good).unwrap();
    env.start_daemon();
    let v = env
        .request(&Request::VmShow(VmRef { vm: "alpha".into() }))
        .ok();
    assert_eq!(v["state"], "running", "{v}");
}

/// The same with a real guest (QEMU/TCG) on a bridge: its VMM is found and stopped and its tap
/// is deleted although the handles file naming the tap is truncated.
#[test]
fn truncated_handles_of_a_real_guest_release_its_vmm_and_tap() {
    let Some(kdir) = std::env::var_os("BANGER_TEST_KERNEL_DIR").map(PathBuf::from) else {
        println!("SKIP: BANGER_TEST_KERNEL_DIR not set (a dir with vmlinux and modules/)");
        return;
    };
    let busybox = std::env::var_os("BANGER_TEST_BUSYBOX")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/bin/busybox"));
    if !busybox.is_file() {
        println!("SKIP: no static busybox (BANGER_TEST_BUSYBOX)");
        return;
    }
    let Some(mut env) = TestEnv::real("") else {
        return;
    };
    env.start_daemon();
    env.request(&Request::KernelImport(
        banger_protocol::KernelImportParams {
            name: "k".into(),
            dir: kdir,
        },
    ))
    .ok();
    let tree = env.root().join("tree");
    std::fs::create_dir_all(tree.join("bin")).unwrap();
    std::fs::create_dir_all(tree.join("etc")).unwrap();
    std::fs::copy(&busybox, tree.join("bin/busybox")).unwrap();
    std::os::unix::fs::symlink("busybox", tree.join("bin/sh")).unwrap();
    env.request(&Request::ImageImport(banger_protocol::ImageImportParams {
        name: Some("bb".into()),
        source: tree,
        kernel: Some("k".into()),
    }))
    .ok();
    let v = env
        .request(&Request::VmCreate(VmCreateParams {
            name: Some("real".into()),
            image: Some("bb".into()),
            kernel: Some("k".into()),
            ..Default::default()
        }))
        .ok();
    let id = v["id"].as_str().unwrap().to_string();
    let handles = env.state_dir().join("vms").join(&id).join("handles.json");
    let h: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&handles).unwrap()).unwrap();
    let pid = h["vmm"]["pid"].as_i64().unwrap() as i32;
    let tap = h["tap"]
        .as_str()
        .expect("a bridged VM has a tap")
        .to_string();
    let (bridge, _) = env.network().unwrap();
    assert!(banger_testkit::bridge_ports(&bridge).contains(&tap));
    env.stop_daemon();
    let text = std::fs::read(&handles).unwrap();
    std::fs::write(&handles, &text[..text.len() / 3]).unwrap();
    env.start_daemon();
    assert!(wait_gone(pid, 20), "the VMM {pid} was abandoned");
    assert!(
        !Path::new("/sys/class/net").join(&tap).exists(),
        "tap {tap} leaked; log:\n{}",
        env.daemon_log()
    );
    let v = env
        .request(&Request::VmShow(VmRef { vm: "real".into() }))
        .ok();
    assert_eq!(v["state"], "stopped", "{v}");
    assert!(handles.with_extension("json.damaged").exists());
}
