//! End-to-end tests of the `fake-firecracker` binary over its API socket.

mod harness;

use std::path::Path;
use std::time::{Duration, Instant};

use fake_firecracker::control::read_records;
use harness::{Fake, keep_alive, request, run_bin};
use serde_json::{Value, json};

fn touch(dir: &Path, name: &str) -> String {
    let p = dir.join(name);
    // Kernels are ELF, as Firecracker requires on x86_64.
    let data: &[u8] = if name.starts_with("vmlinux") {
        b"\x7fELF kernel bytes"
    } else {
        b"image bytes"
    };
    std::fs::write(&p, data).unwrap();
    p.to_string_lossy().into_owned()
}

/// Configures a minimal bootable VM: machine, kernel, root drive.
fn configure_minimal(fake: &Fake, dir: &Path) {
    let kernel = touch(dir, "vmlinux");
    let rootfs = touch(dir, "rootfs.ext4");
    for (path, body) in [
        (
            "/machine-config",
            json!({"vcpu_count": 1, "mem_size_mib": 256}),
        ),
        (
            "/boot-source",
            json!({"kernel_image_path": kernel, "boot_args": "console=ttyS0 reboot=k panic=1"}),
        ),
        (
            "/drives/rootfs",
            json!({"drive_id": "rootfs", "path_on_host": rootfs, "is_root_device": true, "is_read_only": false}),
        ),
    ] {
        let a = fake.call("PUT", path, Some(body));
        assert_eq!(a.status, 204, "PUT {path}: {a:?}");
    }
}

fn start(fake: &Fake) {
    let a = fake.call(
        "PUT",
        "/actions",
        Some(json!({"action_type": "InstanceStart"})),
    );
    assert_eq!(a.status, 204, "InstanceStart: {a:?}");
}

fn write_control(path: &Path, control: Value) {
    std::fs::write(path, control.to_string()).unwrap();
}

#[test]
fn happy_boot_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let fake = Fake::start(d, "vm-happy", &[]);

    let info = fake.call("GET", "/", None);
    assert_eq!(info.status, 200);
    assert_eq!(
        info.body.unwrap(),
        json!({"app_name": "Firecracker", "id": "vm-happy", "state": "Not started", "vmm_version": "1.16.1"})
    );
    assert_eq!(
        fake.call("GET", "/version", None).body.unwrap(),
        json!({"firecracker_version": "1.16.1"})
    );
    assert_eq!(
        fake.call("GET", "/machine-config", None).body.unwrap(),
        json!({"vcpu_count": 1, "mem_size_mib": 128, "smt": false, "track_dirty_pages": false, "huge_pages": "None"})
    );

    let kernel = touch(d, "vmlinux");
    let rootfs = touch(d, "rootfs.ext4");
    let work = touch(d, "work.ext4");
    let vsock = d.join("vsock.sock");
    let steps = [
        (
            "/machine-config",
            json!({"vcpu_count": 2, "mem_size_mib": 1024, "smt": false}),
        ),
        (
            "/boot-source",
            json!({"kernel_image_path": kernel, "boot_args": "console=ttyS0 reboot=k panic=1 pci=off"}),
        ),
        (
            "/drives/rootfs",
            json!({"drive_id": "rootfs", "path_on_host": rootfs, "is_root_device": true, "is_read_only": false}),
        ),
        (
            "/drives/work",
            json!({"drive_id": "work", "path_on_host": work, "is_root_device": false, "is_read_only": true}),
        ),
        (
            "/network-interfaces/eth0",
            json!({"iface_id": "eth0", "host_dev_name": "tap-happy", "guest_mac": "06:00:ac:10:00:02"}),
        ),
        ("/vsock", json!({"guest_cid": 3, "uds_path": vsock})),
        ("/actions", json!({"action_type": "InstanceStart"})),
    ];
    for (path, body) in steps {
        let a = fake.call("PUT", path, Some(body));
        assert_eq!(a.status, 204, "PUT {path}: {a:?}");
        assert!(a.body.is_none());
    }
    assert!(vsock.exists(), "the vsock host socket is bound");

    let info = fake.call("GET", "/", None).body.unwrap();
    assert_eq!(info["state"], "Running");
    let config = fake.call("GET", "/vm/config", None).body.unwrap();
    assert_eq!(config["machine-config"]["vcpu_count"], 2);
    assert_eq!(config["boot-source"]["kernel_image_path"], kernel.as_str());
    assert_eq!(config["drives"].as_array().unwrap().len(), 2);
    assert_eq!(
        config["network-interfaces"][0]["host_dev_name"],
        "tap-happy"
    );
    assert_eq!(config["vsock"]["guest_cid"], 3);

    let log = fake.stderr();
    assert!(
        log.contains("fake-firecracker[vm-happy]: PUT /boot-source -> 204"),
        "{log}"
    );
}

#[test]
fn ordering_rules_are_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let fake = Fake::start(d, "vm-order", &[]);

    let a = fake.call(
        "PUT",
        "/actions",
        Some(json!({"action_type": "InstanceStart"})),
    );
    assert_eq!(a.status, 400);
    assert!(
        a.fault()
            .contains("Cannot start microvm without kernel configuration."),
        "{a:?}"
    );
    let a = fake.call("PATCH", "/vm", Some(json!({"state": "Paused"})));
    assert_eq!(a.status, 400);
    assert_eq!(
        a.fault(),
        "The requested operation is not supported before starting the microVM."
    );

    configure_minimal(&fake, d);
    start(&fake);

    let kernel = touch(d, "vmlinux2");
    let a = fake.call(
        "PUT",
        "/boot-source",
        Some(json!({"kernel_image_path": kernel})),
    );
    assert_eq!(a.status, 400);
    assert_eq!(
        a.fault(),
        "The requested operation is not supported after starting the microVM."
    );
    let a = fake.call(
        "PUT",
        "/actions",
        Some(json!({"action_type": "InstanceStart"})),
    );
    assert_eq!(a.status, 400);
    assert_eq!(
        a.fault(),
        "The requested operation is not supported after starting the microVM."
    );

    let snap = d.join("snap.state");
    let mem = d.join("snap.mem");
    let create = json!({"snapshot_path": snap, "mem_file_path": mem});
    let a = fake.call("PUT", "/snapshot/create", Some(create.clone()));
    assert_eq!(a.status, 400);
    assert!(a.fault().contains("paused"), "{a:?}");
    assert!(!snap.exists());

    assert_eq!(
        fake.call("PATCH", "/vm", Some(json!({"state": "Paused"})))
            .status,
        204
    );
    assert_eq!(fake.call("GET", "/", None).body.unwrap()["state"], "Paused");
    assert_eq!(
        fake.call("PUT", "/snapshot/create", Some(create)).status,
        204
    );
    assert!(snap.is_file() && mem.is_file());
    assert_eq!(
        fake.call("PATCH", "/vm", Some(json!({"state": "Resumed"})))
            .status,
        204
    );
    assert_eq!(
        fake.call("GET", "/", None).body.unwrap()["state"],
        "Running"
    );

    // The snapshot loads into a fresh fake, but not into a configured one.
    let fresh = Fake::start(d, "vm-restore", &[]);
    let load = json!({"snapshot_path": snap, "mem_backend": {"backend_type": "File", "backend_path": mem}, "resume_vm": true});
    let a = fresh.call("PUT", "/snapshot/load", Some(load.clone()));
    assert_eq!(a.status, 204, "{a:?}");
    assert_eq!(
        fresh.call("GET", "/", None).body.unwrap()["state"],
        "Running"
    );
    let configured = Fake::start(d, "vm-configured", &[]);
    configure_minimal(&configured, d);
    let a = configured.call("PUT", "/snapshot/load", Some(load));
    assert_eq!(a.status, 400);
    assert!(a.fault().contains("not allowed after configuring"), "{a:?}");
}

#[test]
fn invalid_requests_are_rejected_with_the_field_named() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let fake = Fake::start(d, "vm-invalid", &[]);

    let a = fake.call("PUT", "/boot-source", Some(json!({"boot_args": "quiet"})));
    assert_eq!(a.status, 400);
    assert!(
        a.fault()
            .contains("body: missing required field \"kernel_image_path\""),
        "{a:?}"
    );
    let kernel = touch(d, "vmlinux");
    let a = fake.call(
        "PUT",
        "/boot-source",
        Some(json!({"kernel_image_path": kernel, "foo": true})),
    );
    assert_eq!(a.status, 400);
    assert!(a.fault().contains("body: unknown field \"foo\""), "{a:?}");
    let a = fake.call(
        "PUT",
        "/machine-config",
        Some(json!({"vcpu_count": "2", "mem_size_mib": 128})),
    );
    assert!(
        a.fault()
            .contains("body.vcpu_count: expected integer, got string"),
        "{a:?}"
    );
    let a = fake.call(
        "PUT",
        "/boot-source",
        Some(json!({"kernel_image_path": d.join("no-such-kernel")})),
    );
    assert_eq!(a.status, 400);
    assert!(a.fault().contains("no-such-kernel"), "{a:?}");
    let a = fake.call(
        "PUT",
        "/drives/rootfs",
        Some(json!({"drive_id": "root", "path_on_host": kernel, "is_root_device": true})),
    );
    assert_eq!(
        a.fault(),
        "The id from the path does not match the id from the body!"
    );

    let a = fake.call("GET", "/no/such/path", None);
    assert_eq!(a.status, 400);
    assert!(
        a.fault()
            .starts_with("Invalid request method and/or path: GET /no/such/path"),
        "{a:?}"
    );
    let a = fake.call(
        "POST",
        "/actions",
        Some(json!({"action_type": "InstanceStart"})),
    );
    assert_eq!(a.status, 400);
    assert!(
        a.fault()
            .starts_with("Invalid request method and/or path: POST /actions"),
        "{a:?}"
    );
    let a = request(&fake.sock, "PUT", "/boot-source", Some("{not json"));
    assert_eq!(a.status, 400);
    assert!(a.fault().contains("deserializing"), "{a:?}");
    // Nothing above changed the instance.
    let config = fake.call("GET", "/vm/config", None).body.unwrap();
    assert_eq!(config["boot-source"], Value::Null);
}

#[test]
fn control_file_injects_failures_and_is_reread() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let control = d.join("control.json");
    let a_fake = Fake::start(d, "vm-a", &[("FAKE_FIRECRACKER_CONTROL", &control)]);
    let b_fake = Fake::start(d, "vm-b", &[("FAKE_FIRECRACKER_CONTROL", &control)]);
    let kernel = touch(d, "vmlinux");
    let boot = json!({"kernel_image_path": kernel});

    write_control(
        &control,
        json!({"fail": [{"method": "PUT", "path": "/boot-source", "status": 400, "message": "injected"}]}),
    );
    let a = a_fake.call("PUT", "/boot-source", Some(boot.clone()));
    assert_eq!(a.status, 400);
    assert_eq!(a.fault(), "injected");

    // Only the InstanceStart of vm-b fails, with a custom status.
    write_control(
        &control,
        json!({"fail": [{"method": "PUT", "path": "/actions", "action_type": "InstanceStart",
                         "vm_id": "vm-b", "status": 500, "message": "kvm exploded"}]}),
    );
    for fake in [&a_fake, &b_fake] {
        assert_eq!(
            fake.call("PUT", "/boot-source", Some(boot.clone())).status,
            204
        );
    }
    start(&a_fake);
    let a = b_fake.call(
        "PUT",
        "/actions",
        Some(json!({"action_type": "InstanceStart"})),
    );
    assert_eq!(a.status, 500);
    assert_eq!(a.fault(), "kvm exploded");
    assert_eq!(
        b_fake.call("GET", "/", None).body.unwrap()["state"],
        "Not started"
    );

    // Removing the file restores normal behaviour without a restart.
    std::fs::remove_file(&control).unwrap();
    start(&b_fake);

    // A failure rule can name a path template.
    write_control(
        &control,
        json!({"fail": [{"path": "/drives/{drive_id}", "message": "disk gone"}]}),
    );
    let fresh = Fake::start(d, "vm-c", &[("FAKE_FIRECRACKER_CONTROL", &control)]);
    let a = fresh.call(
        "PUT",
        "/drives/data",
        Some(json!({"drive_id": "data", "path_on_host": kernel, "is_root_device": false})),
    );
    assert_eq!((a.status, a.fault()), (400, "disk gone"));
}

#[test]
fn exit_after_start_crashes_the_guest() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let control = d.join("control.json");
    write_control(&control, json!({"exit_after_start_ms": 150}));
    let mut fake = Fake::start(d, "vm-crash", &[("FAKE_FIRECRACKER_CONTROL", &control)]);
    configure_minimal(&fake, d);
    // Configuration alone does not trigger it.
    std::thread::sleep(Duration::from_millis(300));
    assert!(fake.child.try_wait().unwrap().is_none());
    start(&fake);
    let status = fake
        .wait_exit(Duration::from_secs(10))
        .expect("the fake exits after the injected crash");
    assert_eq!(status.code(), Some(1));
    assert!(
        fake.stderr()
            .contains("fake-firecracker: guest crashed (injected)"),
        "{}",
        fake.stderr()
    );
}

#[test]
fn ctrl_alt_del_ends_the_process() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut fake = Fake::start(d, "vm-reboot", &[]);
    let a = fake.call(
        "PUT",
        "/actions",
        Some(json!({"action_type": "SendCtrlAltDel"})),
    );
    assert_eq!(a.status, 400, "not before boot");
    configure_minimal(&fake, d);
    start(&fake);
    let a = fake.call(
        "PUT",
        "/actions",
        Some(json!({"action_type": "SendCtrlAltDel"})),
    );
    assert_eq!(a.status, 204);
    let status = fake
        .wait_exit(Duration::from_secs(10))
        .expect("the fake exits after Ctrl+Alt+Del");
    assert_eq!(status.code(), Some(0));
    // Like Firecracker, the API socket is left behind.
    assert!(fake.sock.exists());
}

#[test]
fn ignored_ctrl_alt_del_keeps_running_until_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let control = d.join("control.json");
    write_control(&control, json!({"ignore_ctrl_alt_del": true}));
    let mut fake = Fake::start(d, "vm-stubborn", &[("FAKE_FIRECRACKER_CONTROL", &control)]);
    configure_minimal(&fake, d);
    start(&fake);
    let a = fake.call(
        "PUT",
        "/actions",
        Some(json!({"action_type": "SendCtrlAltDel"})),
    );
    assert_eq!(a.status, 204);
    assert!(fake.wait_exit(Duration::from_millis(500)).is_none());
    assert_eq!(
        fake.call("GET", "/", None).body.unwrap()["state"],
        "Running"
    );
    fake.signal(libc::SIGTERM);
    let status = fake
        .wait_exit(Duration::from_secs(10))
        .expect("exits on SIGTERM");
    assert_eq!(status.code(), Some(0));
}

#[test]
fn sigint_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let mut fake = Fake::start(dir.path(), "vm-int", &[]);
    fake.signal(libc::SIGINT);
    let status = fake
        .wait_exit(Duration::from_secs(10))
        .expect("exits on SIGINT");
    assert_eq!(status.code(), Some(0));
}

#[test]
fn calls_are_recorded_from_several_fakes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let record = d.join("calls.jsonl");
    let one = Fake::start(d, "vm-one", &[("FAKE_FIRECRACKER_RECORD", &record)]);
    // The second one names the record file in its control file instead.
    let control = d.join("control.json");
    write_control(&control, json!({"record": record}));
    let two = Fake::start(d, "vm-two", &[("FAKE_FIRECRACKER_CONTROL", &control)]);

    configure_minimal(&one, d);
    let a = two.call(
        "PUT",
        "/boot-source",
        Some(json!({"kernel_image_path": "/nope"})),
    );
    assert_eq!(a.status, 400);
    two.call("GET", "/", None);

    let calls = read_records(&record).unwrap();
    let one_calls: Vec<_> = calls.iter().filter(|c| c.id == "vm-one").collect();
    let two_calls: Vec<_> = calls.iter().filter(|c| c.id == "vm-two").collect();
    assert_eq!(calls.len(), 5, "{calls:?}");
    assert_eq!(
        one_calls
            .iter()
            .map(|c| c.path.as_str())
            .collect::<Vec<_>>(),
        ["/machine-config", "/boot-source", "/drives/rootfs"]
    );
    assert!(
        one_calls
            .iter()
            .all(|c| c.method == "PUT" && c.status == 204)
    );
    assert_eq!(one_calls[0].body["mem_size_mib"], 256);
    assert_eq!(two_calls[0].status, 400);
    assert_eq!(two_calls[0].body, json!({"kernel_image_path": "/nope"}));
    assert_eq!(
        (two_calls[1].method.as_str(), two_calls[1].body.clone()),
        ("GET", Value::Null)
    );
}

#[test]
fn socket_delay_postpones_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let control = d.join("control.json");
    write_control(&control, json!({"socket_delay_ms": 400}));
    let started = Instant::now();
    let fake = Fake::spawn(d, "vm-slow", &[("FAKE_FIRECRACKER_CONTROL", &control)]);
    fake.wait_for_socket(Duration::from_secs(10));
    assert!(started.elapsed() >= Duration::from_millis(400));
}

#[test]
fn version_flag_and_override() {
    let out = run_bin(&["--version"], &[]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "Firecracker v1.16.1"
    );

    let out = run_bin(&["--version"], &[("FAKE_FIRECRACKER_VERSION", "1.4.0")]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "Firecracker v1.4.0"
    );
    // A leading `v` in the override is not doubled.
    let out = run_bin(&["--version"], &[("FAKE_FIRECRACKER_VERSION", "v1.4.0")]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "Firecracker v1.4.0"
    );
}

#[test]
fn version_override_reaches_the_api() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let sock = d.join("api.sock");
    let mut child = std::process::Command::new(harness::BIN)
        .arg("--api-sock")
        .arg(&sock)
        .env("FAKE_FIRECRACKER_VERSION", "1.20.0")
        .env_remove("FAKE_FIRECRACKER_CONTROL")
        .env_remove("FAKE_FIRECRACKER_RECORD")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // The socket file appears at bind(), a moment before listen(): wait until it accepts.
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(&sock).is_err() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let a = request(&sock, "GET", "/", None);
    let info = a.body.unwrap();
    assert_eq!(info["vmm_version"], "1.20.0");
    assert_eq!(info["id"], "anonymous-instance");
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn bad_arguments_are_refused() {
    let out = run_bin(&["--api-sock", "/tmp/x.sock", "--frobnicate"], &[]);
    assert_eq!(out.status.code(), Some(153));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("'--frobnicate'"), "{err}");

    let out = run_bin(
        &["--api-sock", "/tmp/x.sock", "--id", "has_underscore"],
        &[],
    );
    assert_eq!(out.status.code(), Some(153));
    assert!(String::from_utf8_lossy(&out.stderr).contains("has_underscore"));
}

#[test]
fn existing_socket_path_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let sock = d.join("taken.sock");
    std::fs::write(&sock, b"").unwrap();
    let out = run_bin(&["--api-sock", sock.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Address already in use"), "{err}");
    assert!(err.contains("taken.sock"), "{err}");
}

#[test]
fn one_connection_serves_many_requests() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let fake = Fake::start(d, "vm-pool", &[]);
    let kernel = touch(d, "vmlinux");
    let answers = keep_alive(
        &fake.sock,
        &[
            (
                "PUT",
                "/machine-config",
                Some(json!({"vcpu_count": 1, "mem_size_mib": 128})),
            ),
            (
                "PUT",
                "/boot-source",
                Some(json!({"kernel_image_path": kernel})),
            ),
            ("PUT", "/bogus", Some(json!({}))),
            (
                "PUT",
                "/actions",
                Some(json!({"action_type": "InstanceStart"})),
            ),
            ("GET", "/", None),
        ],
    );
    let statuses: Vec<u16> = answers.iter().map(|a| a.status).collect();
    assert_eq!(statuses, [204, 204, 400, 204, 200]);
    assert_eq!(answers[4].body.as_ref().unwrap()["state"], "Running");
}

#[test]
fn slow_instance_start_blocks_the_whole_api() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let control = d.join("control.json");
    write_control(&control, json!({"instance_start_ms": 1500}));
    let fake = Fake::start(d, "vm-slowstart", &[("FAKE_FIRECRACKER_CONTROL", &control)]);
    configure_minimal(&fake, d);
    let sock = d.join("vm-slowstart.sock");
    let started = Instant::now();
    let starter = std::thread::spawn(move || {
        request(
            &sock,
            "PUT",
            "/actions",
            Some(r#"{"action_type": "InstanceStart"}"#),
        )
    });
    std::thread::sleep(Duration::from_millis(300));
    // Asked while InstanceStart runs, `GET /` waits for it, as in Firecracker (one API thread
    // waiting on the VMM thread), and then sees the guest running.
    let info = fake.call("GET", "/", None);
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(info.body.unwrap()["state"], "Running");
    assert_eq!(starter.join().unwrap().status, 204);
}
