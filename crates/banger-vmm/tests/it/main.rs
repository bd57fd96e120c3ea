//! Integration tests of the Firecracker backend against the workspace's fake Firecracker
//! (`crates/fake-firecracker`), which validates every request against the v1.16.1 API spec.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use banger_vmm::firecracker::client::{
    InstanceState, MemoryBackend, MemoryBackendType, SnapshotCreateParams, SnapshotLoadParams,
    SnapshotType, VsockOverride,
};
use banger_vmm::firecracker::{Firecracker, Version};
use banger_vmm::process;
use banger_vmm::{DriveSpec, LaunchSpec, NetSpec, Vmm, VmmError, VmmHandle, VsockSpec};
use serde_json::{Value, json};

mod qemu;

/// The fake's binary: `$BANGER_FAKE_FIRECRACKER`, else `<target>/debug/fake-firecracker` next
/// to this test binary (which lives in `<target>/debug/deps/`).
fn fake_bin() -> PathBuf {
    let bin = match std::env::var_os("BANGER_FAKE_FIRECRACKER") {
        Some(path) => PathBuf::from(path),
        None => {
            let exe = std::env::current_exe().expect("current_exe");
            exe.parent()
                .and_then(Path::parent)
                .expect("test binary is in <target>/<profile>/deps")
                .join("fake-firecracker")
        }
    };
    assert!(
        bin.is_file(),
        "fake Firecracker not found at {}: run `cargo build -p fake-firecracker` first \
         (or set BANGER_FAKE_FIRECRACKER to its path)",
        bin.display()
    );
    bin
}

/// One test's world: a temp dir holding the fake's control file, its call record, the guest
/// files and the VM's run dir.
struct Fixture {
    dir: tempfile::TempDir,
    control: PathBuf,
    record: PathBuf,
    vm_id: String,
}

impl Fixture {
    fn new() -> Fixture {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        // Under /tmp so the socket path stays far below 107 bytes.
        let dir = tempfile::Builder::new()
            .prefix("bvmm")
            .tempdir_in("/tmp")
            .unwrap();
        for f in ["initrd.img", "root.ext4", "work.ext4"] {
            std::fs::write(dir.path().join(f), b"x").unwrap();
        }
        // Firecracker loads only ELF kernels on x86_64 (so does the fake).
        std::fs::write(dir.path().join("vmlinux"), b"\x7fELF").unwrap();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let fixture = Fixture {
            control: dir.path().join("control.json"),
            record: dir.path().join("record.jsonl"),
            vm_id: format!("{:08x}{:04x}", std::process::id(), n),
            dir,
        };
        fixture.set_control(json!({}));
        fixture
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes the control file; `record` is always added so every test can check statuses.
    fn set_control(&self, mut control: Value) {
        control["record"] = json!(self.record);
        std::fs::write(&self.control, control.to_string()).unwrap();
    }

    fn backend(&self) -> Firecracker {
        Firecracker::new(fake_bin())
            .unwrap()
            .with_env("FAKE_FIRECRACKER_CONTROL", &self.control)
    }

    fn spec(&self) -> LaunchSpec {
        LaunchSpec {
            vm_id: self.vm_id.clone(),
            run_dir: self.path("run"),
            log_path: self.path("fc.log"),
            log_max_bytes: banger_vmm::DEFAULT_LOG_MAX_BYTES,
            vcpu: 2,
            memory_mib: 512,
            kernel: self.path("vmlinux"),
            initrd: Some(self.path("initrd.img")),
            boot_args: "console=ttyS0 reboot=k panic=1".into(),
            drives: vec![
                DriveSpec {
                    id: "root".into(),
                    path: self.path("root.ext4"),
                    read_only: true,
                },
                DriveSpec {
                    id: "work".into(),
                    path: self.path("work.ext4"),
                    read_only: false,
                },
            ],
            net: Some(NetSpec {
                tap_fd: None,
                tap: "tap-test0".into(),
                mac: "06:00:0a:00:00:02".into(),
            }),
            vsock: Some(VsockSpec {
                guest_cid: 3,
                uds_path: self.path("run/vsock.sock"),
            }),
        }
    }

    /// Every call the fake recorded, as (method, path, status, body).
    fn records(&self) -> Vec<(String, String, u16, Value)> {
        let text = std::fs::read_to_string(&self.record).unwrap_or_default();
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let v: Value = serde_json::from_str(l).unwrap();
                (
                    v["method"].as_str().unwrap().to_string(),
                    v["path"].as_str().unwrap().to_string(),
                    u16::try_from(v["status"].as_u64().unwrap()).unwrap(),
                    v["body"].clone(),
                )
            })
            .collect()
    }

    fn assert_all_accepted(&self) {
        let records = self.records();
        assert!(!records.is_empty(), "the fake recorded no calls");
        for (method, path, status, body) in &records {
            assert!(
                (200..300).contains(status),
                "{method} {path} {body} was answered {status}; log: {}",
                process::tail_file(&self.path("fc.log"), 20)
            );
        }
    }

    /// Pids of live processes whose command line mentions this fixture's directory.
    fn processes(&self) -> Vec<i32> {
        let needle = self.dir.path().to_string_lossy().into_owned();
        let mut found = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<i32>().ok())
            else {
                continue;
            };
            let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            if String::from_utf8_lossy(&cmdline).contains(&needle) {
                found.push(pid);
            }
        }
        found
    }
}

impl Drop for Fixture {
    /// VMMs are detached by design, so a test that fails before its `kill` would leak its fake;
    /// kill whatever still runs from this fixture's directory.
    fn drop(&mut self) {
        for pid in self.processes() {
            let _ = process::signal(pid, nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// Waits until `handle`'s process has left /proc entirely (reaped, not a zombie).
async fn assert_reaped(handle: &VmmHandle) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while process::proc_start_time(handle.pid) == Some(handle.start_time) {
        assert!(
            std::time::Instant::now() < deadline,
            "process {} is still in /proc (zombie?): {:?}",
            handle.pid,
            process::proc_stat(handle.pid)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn full_cycle_spawn_configure_boot_shutdown() {
    let fx = Fixture::new();
    let fc = fx.backend();
    let spec = fx.spec();

    let handle = fc.spawn(&spec).await.unwrap();
    assert_eq!(handle.control_socket, spec.run_dir.join("fc.sock"));
    assert_eq!(handle.log_path, spec.log_path);
    assert!(fc.is_alive(&handle));
    let mode = std::fs::metadata(&spec.run_dir)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o700);
    let info = fc.client(&handle).instance_info().await.unwrap();
    assert_eq!(info.id, spec.vm_id);
    assert_eq!(info.state, InstanceState::NotStarted);
    let version = fc.client(&handle).version().await.unwrap();
    assert_eq!(version.firecracker_version, "1.16.1");

    fc.configure(&handle, &spec).await.unwrap();
    fc.boot(&handle).await.unwrap();
    assert!(fc.is_alive(&handle));
    let info = fc.client(&handle).instance_info().await.unwrap();
    assert_eq!(info.state, InstanceState::Running);

    fc.pause(&handle).await.unwrap();
    assert_eq!(
        fc.client(&handle).instance_info().await.unwrap().state,
        InstanceState::Paused
    );
    fc.snapshot_create(
        &handle,
        &SnapshotCreateParams {
            mem_file_path: fx.path("mem.snap"),
            snapshot_path: fx.path("vm.snap"),
            snapshot_type: Some(SnapshotType::Full),
        },
    )
    .await
    .unwrap();
    fc.resume(&handle).await.unwrap();

    assert!(fc.shutdown(&handle, Duration::from_secs(5)).await.unwrap());
    assert!(!fc.is_alive(&handle));
    // Already gone: shutdown, kill and wait_exit all succeed at once.
    assert!(fc.shutdown(&handle, Duration::from_secs(5)).await.unwrap());
    fc.kill(&handle).await.unwrap();
    tokio::time::timeout(Duration::from_secs(1), fc.wait_exit(&handle))
        .await
        .unwrap();
    assert_reaped(&handle).await;

    fx.assert_all_accepted();
    let calls: Vec<(String, String)> = fx
        .records()
        .into_iter()
        .filter(|(m, ..)| m != "GET")
        .map(|(m, p, ..)| (m, p))
        .collect();
    let expected: Vec<(String, String)> = [
        ("PUT", "/machine-config"),
        ("PUT", "/boot-source"),
        ("PUT", "/drives/root"),
        ("PUT", "/drives/work"),
        ("PUT", "/network-interfaces/eth0"),
        ("PUT", "/vsock"),
        ("PUT", "/actions"),
        ("PATCH", "/vm"),
        ("PUT", "/snapshot/create"),
        ("PATCH", "/vm"),
        ("PUT", "/actions"),
    ]
    .into_iter()
    .map(|(m, p)| (m.to_string(), p.to_string()))
    .collect();
    assert_eq!(calls, expected);

    let bodies: Vec<Value> = fx.records().into_iter().map(|r| r.3).collect();
    assert!(bodies.contains(&json!({"vcpu_count": 2, "mem_size_mib": 512, "smt": false})));
    assert!(bodies.contains(&json!({
        "drive_id": "root", "is_root_device": false, "is_read_only": true,
        "path_on_host": fx.path("root.ext4"),
    })));
    assert!(bodies.contains(&json!({
        "kernel_image_path": fx.path("vmlinux"), "initrd_path": fx.path("initrd.img"),
        "boot_args": "console=ttyS0 reboot=k panic=1",
    })));
    assert!(bodies.contains(&json!({
        "iface_id": "eth0", "host_dev_name": "tap-test0", "guest_mac": "06:00:0a:00:00:02",
    })));
    assert!(bodies.contains(&json!({"action_type": "SendCtrlAltDel"})));
}

#[tokio::test]
async fn minimal_spec_without_initrd_net_or_vsock_is_accepted() {
    let fx = Fixture::new();
    let fc = fx.backend();
    let mut spec = fx.spec();
    spec.initrd = None;
    spec.net = None;
    spec.vsock = None;
    spec.drives.truncate(1);
    let handle = fc.spawn(&spec).await.unwrap();
    fc.configure(&handle, &spec).await.unwrap();
    fc.boot(&handle).await.unwrap();
    fc.kill(&handle).await.unwrap();
    fx.assert_all_accepted();
    let paths: Vec<String> = fx.records().into_iter().map(|r| r.1).collect();
    assert!(
        !paths
            .iter()
            .any(|p| p == "/vsock" || p.starts_with("/network"))
    );
}

#[tokio::test]
async fn kill_leaves_no_process_and_no_zombie() {
    let fx = Fixture::new();
    let fc = fx.backend();
    let spec = fx.spec();
    let handle = fc.spawn(&spec).await.unwrap();
    fc.configure(&handle, &spec).await.unwrap();
    fc.boot(&handle).await.unwrap();

    fc.kill(&handle).await.unwrap();
    assert!(!fc.is_alive(&handle));
    assert_reaped(&handle).await;
    assert_eq!(fx.processes(), Vec::<i32>::new());
    // Killing what is gone is fine.
    fc.kill(&handle).await.unwrap();
    fx.assert_all_accepted();
}

#[tokio::test]
async fn version_check_accepts_current_and_refuses_old() {
    let fx = Fixture::new();
    assert_eq!(
        fx.backend().check_version().await.unwrap(),
        Version::new(1, 16, 1)
    );
    let old = fx.backend().with_env("FAKE_FIRECRACKER_VERSION", "1.4.0");
    let err = old.check_version().await.unwrap_err();
    assert!(matches!(err, VmmError::TooOld { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!(
            "Firecracker 1.4.0 at {} is too old: banger needs 1.5.0 or newer",
            fake_bin().display()
        )
    );
    let oldest_ok = fx.backend().with_env("FAKE_FIRECRACKER_VERSION", "1.5.0");
    assert_eq!(
        oldest_ok.check_version().await.unwrap(),
        Version::new(1, 5, 0)
    );
}

#[tokio::test]
async fn injected_boot_source_failure_is_an_api_error() {
    let fx = Fixture::new();
    fx.set_control(json!({
        "fail": [{"method": "PUT", "path": "/boot-source", "status": 400, "message": "injected"}]
    }));
    let fc = fx.backend();
    let spec = fx.spec();
    let handle = fc.spawn(&spec).await.unwrap();
    let err = fc.configure(&handle, &spec).await.unwrap_err();
    match &err {
        VmmError::Api {
            method,
            path,
            status,
            message,
        } => {
            assert_eq!(method, "PUT");
            assert_eq!(path, "/boot-source");
            assert_eq!(*status, 400);
            assert_eq!(message, "injected");
        }
        other => panic!("expected an API error, got {other:?}"),
    }
    assert_eq!(
        err.to_string(),
        "VMM API PUT /boot-source failed with HTTP 400: injected"
    );
    // configure stops at the first failure.
    let paths: Vec<String> = fx.records().into_iter().map(|r| r.1).collect();
    assert!(!paths.iter().any(|p| p.starts_with("/drives")), "{paths:?}");
    fc.kill(&handle).await.unwrap();
}

#[tokio::test]
async fn a_crashing_guest_is_noticed_by_wait_exit_and_is_alive() {
    let fx = Fixture::new();
    fx.set_control(json!({"exit_after_start_ms": 200}));
    let fc = fx.backend();
    let spec = fx.spec();
    let handle = fc.spawn(&spec).await.unwrap();
    fc.configure(&handle, &spec).await.unwrap();
    fc.boot(&handle).await.unwrap();
    assert!(fc.is_alive(&handle));
    tokio::time::timeout(Duration::from_secs(5), fc.wait_exit(&handle))
        .await
        .expect("wait_exit did not resolve after the fake exited");
    assert!(!fc.is_alive(&handle));
    assert_reaped(&handle).await;
    fx.assert_all_accepted();
}

#[tokio::test]
async fn shutdown_of_a_guest_ignoring_ctrl_alt_del_times_out() {
    let fx = Fixture::new();
    fx.set_control(json!({"ignore_ctrl_alt_del": true}));
    let fc = fx.backend();
    let spec = fx.spec();
    let handle = fc.spawn(&spec).await.unwrap();
    fc.configure(&handle, &spec).await.unwrap();
    fc.boot(&handle).await.unwrap();
    assert!(
        !fc.shutdown(&handle, Duration::from_millis(300))
            .await
            .unwrap()
    );
    assert!(fc.is_alive(&handle));
    fc.kill(&handle).await.unwrap();
    assert!(!fc.is_alive(&handle));
    fx.assert_all_accepted();
}

#[tokio::test]
async fn a_slow_socket_is_waited_for() {
    let fx = Fixture::new();
    fx.set_control(json!({"socket_delay_ms": 300}));
    let fc = fx.backend();
    let spec = fx.spec();
    let started = std::time::Instant::now();
    let handle = fc.spawn(&spec).await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(fc.is_alive(&handle));
    fc.kill(&handle).await.unwrap();
}

#[tokio::test]
async fn socket_timeout_kills_the_process() {
    let fx = Fixture::new();
    fx.set_control(json!({"socket_delay_ms": 3000}));
    let fc = fx.backend().with_socket_timeout(Duration::from_millis(200));
    let spec = fx.spec();
    let err = fc.spawn(&spec).await.unwrap_err();
    match &err {
        VmmError::SocketTimeout { socket, .. } => {
            assert_eq!(socket, &spec.run_dir.join("fc.sock"));
        }
        other => panic!("expected SocketTimeout, got {other:?}"),
    }
    assert_eq!(fx.processes(), Vec::<i32>::new());
}

#[tokio::test]
async fn a_vm_restarts_over_the_sockets_of_its_killed_predecessor() {
    let fx = Fixture::new();
    let fc = fx.backend();
    let spec = fx.spec();
    let first = fc.spawn(&spec).await.unwrap();
    fc.configure(&first, &spec).await.unwrap();
    fc.boot(&first).await.unwrap();
    fc.kill(&first).await.unwrap();
    // SIGKILL leaves both the API and the vsock sockets behind.
    assert!(spec.run_dir.join("fc.sock").exists());

    let second = fc.spawn(&spec).await.unwrap();
    fc.configure(&second, &spec).await.unwrap();
    fc.boot(&second).await.unwrap();
    assert!(fc.is_alive(&second));
    fc.kill(&second).await.unwrap();
    fx.assert_all_accepted();
}

#[tokio::test]
async fn a_non_socket_at_the_api_socket_path_is_not_deleted() {
    let fx = Fixture::new();
    let fc = fx.backend();
    let spec = fx.spec();
    std::fs::create_dir_all(&spec.run_dir).unwrap();
    let path = spec.run_dir.join("fc.sock");
    std::fs::write(&path, b"not a socket").unwrap();
    let err = fc.spawn(&spec).await.unwrap_err();
    assert!(err.to_string().contains("is not a socket"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), b"not a socket");
    assert_eq!(fx.processes(), Vec::<i32>::new());
}

#[tokio::test]
async fn a_too_long_socket_path_is_refused_before_launch() {
    let fx = Fixture::new();
    let fc = fx.backend();
    let mut spec = fx.spec();
    spec.run_dir = fx.path(&"d".repeat(100));
    let err = fc.spawn(&spec).await.unwrap_err();
    assert!(matches!(err, VmmError::Spec(_)), "{err:?}");
    let socket = spec.run_dir.join("fc.sock");
    assert!(
        err.to_string().contains(&*socket.to_string_lossy()),
        "{err}"
    );
    assert!(!spec.run_dir.exists());
    assert_eq!(fx.processes(), Vec::<i32>::new());
}

#[tokio::test]
async fn a_missing_binary_is_a_clear_error() {
    let fx = Fixture::new();
    let missing = fx.path("no-firecracker");
    let err = Firecracker::new(missing.clone()).unwrap_err();
    assert!(matches!(err, VmmError::Binary { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&*missing.to_string_lossy()),
        "{err}"
    );

    // A binary that disappears after the backend was created.
    let script = fx.path("vanishing");
    std::fs::write(&script, "#!/bin/sh\nexit 0\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let fc = Firecracker::new(script.clone()).unwrap();
    std::fs::remove_file(&script).unwrap();
    let err = fc.spawn(&fx.spec()).await.unwrap_err();
    assert!(matches!(err, VmmError::Spawn { .. }), "{err:?}");
    assert!(err.to_string().contains("vanishing"), "{err}");
    assert_eq!(fx.processes(), Vec::<i32>::new());
}

#[tokio::test]
async fn a_vmm_that_exits_at_once_reports_its_log() {
    let fx = Fixture::new();
    let script = fx.path("broken-firecracker");
    std::fs::write(
        &script,
        "#!/bin/sh\necho \"Error creating the VMM: no KVM\" >&2\nexit 1\n",
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let fc = Firecracker::new(script).unwrap();
    let err = fc.spawn(&fx.spec()).await.unwrap_err();
    assert!(matches!(err, VmmError::Exited { .. }), "{err:?}");
    assert!(err.to_string().contains("no KVM"), "{err}");
    assert_eq!(fx.processes(), Vec::<i32>::new());
}

#[tokio::test]
async fn a_failed_spawn_quotes_only_its_own_log_lines() {
    let fx = Fixture::new();
    // An earlier run of the same VM left its lines in the (appended) log.
    let old: String = (0..30).map(|i| format!("OLD RUN line {i}\n")).collect();
    std::fs::write(fx.spec().log_path, old).unwrap();
    let script = fx.path("broken-firecracker");
    std::fs::write(
        &script,
        "#!/bin/sh\necho \"this start: no KVM\" >&2\nexit 1\n",
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let err = Firecracker::new(script)
        .unwrap()
        .spawn(&fx.spec())
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("this start: no KVM"), "{msg}");
    assert!(!msg.contains("OLD RUN"), "{msg}");
    // The log itself keeps both.
    let log = std::fs::read_to_string(fx.spec().log_path).unwrap();
    assert!(log.contains("OLD RUN line 29") && log.contains("this start"));
}

#[tokio::test]
async fn invalid_drive_ids_are_refused_before_any_request() {
    let fx = Fixture::new();
    let fc = fx.backend();
    let mut spec = fx.spec();
    let handle = fc.spawn(&spec).await.unwrap();
    spec.drives[1].id = "work-disk".into();
    let err = fc.configure(&handle, &spec).await.unwrap_err();
    assert!(matches!(err, VmmError::Spec(_)), "{err:?}");
    assert!(err.to_string().contains("work-disk"), "{err}");
    assert!(
        fx.records().iter().all(|r| r.0 == "GET"),
        "no PUT may be sent: {:?}",
        fx.records()
    );
    fc.kill(&handle).await.unwrap();
}

#[tokio::test]
async fn a_second_boot_is_refused_by_the_api() {
    let fx = Fixture::new();
    let fc = fx.backend();
    let spec = fx.spec();
    let handle = fc.spawn(&spec).await.unwrap();
    fc.configure(&handle, &spec).await.unwrap();
    fc.boot(&handle).await.unwrap();
    let err = fc.boot(&handle).await.unwrap_err();
    assert!(matches!(err, VmmError::Api { status: 400, .. }), "{err:?}");
    fc.kill(&handle).await.unwrap();
}

#[tokio::test]
async fn a_snapshot_loads_into_a_fresh_vmm() {
    let fx = Fixture::new();
    let fc = fx.backend();
    let spec = fx.spec();
    let first = fc.spawn(&spec).await.unwrap();
    fc.configure(&first, &spec).await.unwrap();
    fc.boot(&first).await.unwrap();
    fc.pause(&first).await.unwrap();
    let snapshot = SnapshotCreateParams {
        mem_file_path: fx.path("mem.snap"),
        snapshot_path: fx.path("vm.snap"),
        snapshot_type: None,
    };
    fc.snapshot_create(&first, &snapshot).await.unwrap();
    fc.kill(&first).await.unwrap();

    let mut spec2 = spec.clone();
    spec2.run_dir = fx.path("run2");
    let second = fc.spawn(&spec2).await.unwrap();
    fc.snapshot_load(
        &second,
        &SnapshotLoadParams {
            snapshot_path: snapshot.snapshot_path.clone(),
            mem_backend: Some(MemoryBackend {
                backend_type: MemoryBackendType::File,
                backend_path: snapshot.mem_file_path.clone(),
            }),
            resume_vm: Some(true),
            // The first VMM's vsock socket is still on disk; restore onto a fresh path.
            vsock_override: Some(VsockOverride {
                uds_path: spec2.run_dir.join("vsock.sock"),
            }),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(
        fc.client(&second).instance_info().await.unwrap().state,
        InstanceState::Running
    );
    fc.kill(&second).await.unwrap();
    fx.assert_all_accepted();
}
