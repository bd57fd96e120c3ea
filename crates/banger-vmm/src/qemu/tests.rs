use std::os::unix::fs::PermissionsExt;

use super::*;
use crate::{DriveSpec, NetSpec, VsockSpec};

fn os(args: &[&str]) -> Vec<OsString> {
    args.iter().map(OsString::from).collect()
}

/// An executable shell script at `dir/name`.
fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn backend(accel: Accel) -> Qemu {
    Qemu::new("/bin/sh".into(), accel)
        .unwrap()
        .with_tsc_khz(2_000_000)
}

fn spec() -> LaunchSpec {
    LaunchSpec {
        vm_id: "0123456789ab".into(),
        run_dir: "/run/banger/0123456789ab".into(),
        log_path: "/tmp/qemu.log".into(),
        log_max_bytes: crate::DEFAULT_LOG_MAX_BYTES,
        vcpu: 2,
        memory_mib: 1024,
        kernel: "/k/vmlinux".into(),
        initrd: Some("/k/initrd.img".into()),
        boot_args: "console=ttyS0 panic=-1".into(),
        drives: vec![
            DriveSpec {
                id: "root".into(),
                path: "/img/rootfs.ext4".into(),
                read_only: true,
            },
            DriveSpec {
                id: "work".into(),
                path: "/vms/work.ext4".into(),
                read_only: false,
            },
        ],
        net: Some(NetSpec {
            tap_fd: None,
            tap: "tap-b0".into(),
            mac: "06:00:0a:00:00:02".into(),
        }),
        vsock: Some(VsockSpec {
            guest_cid: 3,
            uds_path: "/run/banger/0123456789ab/v.sock".into(),
        }),
    }
}

#[test]
fn parses_version_lines() {
    assert_eq!(
        parse_version_output(
            "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\nCopyright (c) 2003-2022 Fabrice Bellard and the QEMU Project developers\n"
        ),
        Some(Version::new(7, 2, 22))
    );
    assert_eq!(
        parse_version_output("QEMU emulator version 6.2.0 (qemu-6.2.0-11.el8)"),
        Some(Version::new(6, 2, 0))
    );
    assert_eq!(
        parse_version_output("QEMU emulator version 9.0.0"),
        Some(Version::new(9, 0, 0))
    );
    assert_eq!(
        parse_version_output("QEMU emulator version 8.0.0-rc1"),
        Some(Version::new(8, 0, 0))
    );
    assert_eq!(
        parse_version_output("\nQEMU emulator version 8.2"),
        Some(Version::new(8, 2, 0))
    );
    assert_eq!(parse_version_output(""), None);
    assert_eq!(parse_version_output("Firecracker v1.16.1"), None);
    assert_eq!(parse_version_output("QEMU emulator version x.y.z"), None);
    assert_eq!(parse_version_output("QEMU emulator version 7"), None);
    assert_eq!(parse_version_output("QEMU emulator version 7.2.1.4"), None);
}

#[test]
fn minimum_is_6_1() {
    assert!(Version::new(6, 0, 1) < MIN_VERSION);
    assert!(Version::new(6, 1, 0) >= MIN_VERSION);
    assert!(Version::new(7, 2, 22) > MIN_VERSION);
}

#[tokio::test]
async fn version_runs_the_binary_and_refuses_old_ones() {
    let dir = tempfile::tempdir().unwrap();
    let new = script(
        dir.path(),
        "new",
        "echo 'QEMU emulator version 7.2.22 (Debian)'",
    );
    let q = Qemu::new(new, Accel::Tcg).unwrap();
    assert_eq!(q.version().await.unwrap(), Version::new(7, 2, 22));

    let old = script(dir.path(), "old", "echo 'QEMU emulator version 5.2.0'");
    let err = Qemu::new(old.clone(), Accel::Tcg)
        .unwrap()
        .version()
        .await
        .unwrap_err();
    assert!(matches!(err, VmmError::TooOld { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!(
            "QEMU 5.2.0 at {} is too old: banger needs 6.1.0 or newer",
            old.display()
        )
    );

    let odd = script(dir.path(), "odd", "echo 'something else'");
    let err = Qemu::new(odd, Accel::Tcg)
        .unwrap()
        .version()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("something else"), "{err}");

    let failing = script(dir.path(), "failing", "echo broken >&2; exit 3");
    let err = Qemu::new(failing, Accel::Tcg)
        .unwrap()
        .version()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("broken"), "{err}");
}

#[test]
fn new_checks_the_binary() {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("qemu-system-x86_64");
    let err = Qemu::new(bin.clone(), Accel::Tcg).unwrap_err();
    assert!(err.to_string().contains(&*bin.to_string_lossy()), "{err}");

    std::fs::write(&bin, "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = Qemu::new(bin.clone(), Accel::Tcg).unwrap_err();
    assert!(err.to_string().contains("not executable"), "{err}");

    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let q = Qemu::new(bin.clone(), Accel::Kvm).unwrap();
    assert_eq!(q.bin(), bin);
    assert_eq!(q.accel(), Accel::Kvm);
    assert_eq!(q.kind(), VmmKind::QemuKvm);
    assert_eq!(Qemu::new(bin, Accel::Tcg).unwrap().kind(), VmmKind::QemuTcg);

    let err = Qemu::new(dir.path().to_path_buf(), Accel::Tcg).unwrap_err();
    assert!(err.to_string().contains("not a regular file"), "{err}");
}

#[test]
fn finds_the_binary_in_path_then_the_fallback() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a");
    let b = dir.path().join("b");
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    let in_b = script(&b, BIN_NAME, "");
    let fallback = script(dir.path(), "fallback", "");
    let path = std::env::join_paths([&a, &b]).unwrap();
    assert_eq!(find_binary_in(Some(&path), &fallback), Some(in_b.clone()));

    // A non-executable file in an earlier directory is skipped.
    let in_a = a.join(BIN_NAME);
    std::fs::write(&in_a, "").unwrap();
    std::fs::set_permissions(&in_a, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert_eq!(find_binary_in(Some(&path), &fallback), Some(in_b.clone()));

    std::fs::remove_file(&in_b).unwrap();
    assert_eq!(
        find_binary_in(Some(&path), &fallback),
        Some(fallback.clone())
    );
    assert_eq!(find_binary_in(None, &fallback), Some(fallback));
    assert_eq!(find_binary_in(None, &dir.path().join("nope")), None);
    // Relative PATH entries are ignored.
    assert_eq!(
        find_binary_in(Some(OsStr::new("b")), &dir.path().join("nope")),
        None
    );
}

#[test]
fn tcg_argv_in_full() {
    let argv = backend(Accel::Tcg).argv(&spec());
    let expected = os(&[
        "-M",
        "microvm,x-option-roms=off,isa-serial=on,rtc=on,acpi=on",
        "-accel",
        "tcg,thread=multi",
        "-cpu",
        "max",
        "-m",
        "1024M",
        "-smp",
        "2",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-monitor",
        "none",
        "-serial",
        "stdio",
        "-no-reboot",
        "-S",
        "-qmp",
        "unix:/run/banger/0123456789ab/qmp.sock,server=on,wait=off",
        "-kernel",
        "/k/vmlinux",
        "-initrd",
        "/k/initrd.img",
        "-append",
        "console=ttyS0 panic=-1 tsc_early_khz=2000000 tsc=reliable",
        "-drive",
        "id=drive-root,file=/img/rootfs.ext4,format=raw,if=none,cache=writeback,readonly=on",
        "-device",
        "virtio-blk-device,drive=drive-root",
        "-drive",
        "id=drive-work,file=/vms/work.ext4,format=raw,if=none,cache=writeback,readonly=off,discard=unmap",
        "-device",
        "virtio-blk-device,drive=drive-work",
        "-netdev",
        "tap,id=net0,ifname=tap-b0,script=no,downscript=no",
        "-device",
        "virtio-net-device,netdev=net0,mac=06:00:0a:00:00:02",
        "-device",
        "vhost-vsock-device,guest-cid=3",
    ]);
    assert_eq!(argv, expected);
}

#[test]
fn kvm_argv_uses_the_host_cpu_and_no_tsc_args() {
    let argv = backend(Accel::Kvm).argv(&spec());
    let pos = |a: &str| argv.iter().position(|x| x == a).unwrap();
    assert_eq!(argv[pos("-accel") + 1], "kvm");
    assert_eq!(argv[pos("-cpu") + 1], "host");
    assert_eq!(argv[pos("-append") + 1], "console=ttyS0 panic=-1");
    assert!(!argv.iter().any(|a| a.to_string_lossy().contains("tsc")));

    // Everything but the accelerator, CPU and command line is the same as under TCG.
    let tcg = backend(Accel::Tcg).argv(&spec());
    assert_eq!(argv.len(), tcg.len());
    let differing: Vec<usize> = (0..argv.len()).filter(|&i| argv[i] != tcg[i]).collect();
    assert_eq!(differing, vec![3, 5, pos("-append") + 1]);
}

#[test]
fn optional_devices_and_empty_boot_args() {
    let mut s = spec();
    s.initrd = None;
    s.drives.clear();
    s.net = None;
    s.vsock = None;
    s.boot_args = "  ".into();
    let argv = backend(Accel::Tcg).argv(&s);
    for absent in ["-initrd", "-drive", "-netdev", "-device"] {
        assert!(!argv.iter().any(|a| a == absent), "{absent} in {argv:?}");
    }
    assert_eq!(argv.last().unwrap(), "tsc_early_khz=2000000 tsc=reliable");
    assert_eq!(argv[argv.len() - 2], "-append");
    assert_eq!(backend(Accel::Kvm).argv(&s).last().unwrap(), "");
}

#[test]
fn drive_order_and_read_only_flags_follow_the_spec() {
    let mut s = spec();
    s.drives.reverse();
    let argv = backend(Accel::Tcg).argv(&s);
    let drives: Vec<String> = argv
        .windows(2)
        .filter(|w| w[0] == "-drive")
        .map(|w| w[1].to_string_lossy().into_owned())
        .collect();
    assert_eq!(drives.len(), 2);
    assert!(drives[0].starts_with("id=drive-work,"), "{drives:?}");
    assert!(drives[0].contains("readonly=off"), "{drives:?}");
    assert!(drives[0].contains("discard=unmap"), "{drives:?}");
    assert!(drives[1].starts_with("id=drive-root,"), "{drives:?}");
    assert!(drives[1].ends_with("readonly=on"), "{drives:?}");
    assert!(!drives[1].contains("discard"), "{drives:?}");
}

#[test]
fn commas_in_option_values_are_doubled() {
    assert_eq!(escape_opt_value(OsStr::new("/a,b,,c")), "/a,,b,,,,c");
    assert_eq!(escape_opt_value(OsStr::new("plain")), "plain");
    // Non-UTF-8 bytes pass through untouched.
    let raw = OsStr::from_bytes(b"/x\xff,y");
    assert_eq!(escape_opt_value(raw).as_bytes(), b"/x\xff,,y");

    let mut s = spec();
    s.run_dir = "/run/a,b".into();
    s.kernel = "/k,1/vmlinux".into();
    s.initrd = Some("/k,1/initrd".into());
    s.drives[0].path = "/img,x/root.ext4".into();
    let argv = backend(Accel::Tcg).argv(&s);
    let after = |flag: &str| {
        let i = argv.iter().position(|a| a == flag).unwrap();
        argv[i + 1].to_string_lossy().into_owned()
    };
    assert_eq!(after("-qmp"), "unix:/run/a,,b/qmp.sock,server=on,wait=off");
    assert_eq!(
        after("-drive"),
        "id=drive-root,file=/img,,x/root.ext4,format=raw,if=none,cache=writeback,readonly=on"
    );
    // -kernel and -initrd are taken verbatim by QEMU: escaping them would break the path.
    assert_eq!(after("-kernel"), "/k,1/vmlinux");
    assert_eq!(after("-initrd"), "/k,1/initrd");
    validate_spec(&s).unwrap();
}

#[test]
fn spec_validation() {
    validate_spec(&spec()).unwrap();

    let bad = |f: &dyn Fn(&mut LaunchSpec), needle: &str| {
        let mut s = spec();
        f(&mut s);
        let err = validate_spec(&s).unwrap_err();
        assert!(matches!(err, VmmError::Spec(_)), "{err:?}");
        assert!(err.to_string().contains(needle), "{err} lacks {needle}");
    };
    bad(&|s| s.drives[0].id = "ro,ot".into(), "\"ro,ot\"");
    bad(&|s| s.drives[0].id = String::new(), "drive id \"\"");
    bad(
        &|s| s.drives.push(s.drives[0].clone()),
        "\"root\" is used twice",
    );
    bad(&|s| s.vcpu = 0, "vcpu count 0");
    bad(&|s| s.vcpu = 256, "vcpu count 256");
    bad(&|s| s.memory_mib = 0, "memory size 0");
    bad(&|s| s.boot_args = "a\0b".into(), "NUL");
    bad(&|s| s.kernel = PathBuf::new(), "kernel");
    bad(
        &|s| s.net.as_mut().unwrap().mac = "06:00:0a:00:00".into(),
        "06:00:0a:00:00",
    );
    bad(
        &|s| s.net.as_mut().unwrap().tap = "a".repeat(16),
        "tap name",
    );
    bad(
        &|s| s.net.as_mut().unwrap().tap = "tap,script=/x".into(),
        "tap,script=/x",
    );
    bad(&|s| s.vsock.as_mut().unwrap().guest_cid = 2, "CID 2");
    bad(
        &|s| s.vsock.as_mut().unwrap().guest_cid = u32::MAX,
        "CID 4294967295",
    );
    bad(
        &|s| s.run_dir = PathBuf::from("/").join("x".repeat(100)),
        "limited to 107 bytes",
    );

    // A leading digit is fine for banger's ids: QEMU gets "drive-<id>".
    let mut s = spec();
    s.drives[0].id = "0".into();
    validate_spec(&s).unwrap();
    assert_eq!(qemu_drive_id("0"), "drive-0");
}

#[test]
fn socket_path_limit_is_107_bytes() {
    let ok = PathBuf::from(format!("/{}", "a".repeat(106)));
    check_socket_path("socket", &ok).unwrap();
    let long = PathBuf::from(format!("/{}", "a".repeat(107)));
    let err = check_socket_path("socket", &long).unwrap_err();
    assert!(err.to_string().contains(&*long.to_string_lossy()), "{err}");
}

/// A spec whose files exist, in `dir`.
fn real_spec(dir: &Path) -> LaunchSpec {
    for f in ["vmlinux", "root.ext4"] {
        std::fs::write(dir.join(f), b"x").unwrap();
    }
    LaunchSpec {
        vm_id: "vm1".into(),
        run_dir: dir.join("run"),
        log_path: dir.join("qemu.log"),
        log_max_bytes: crate::DEFAULT_LOG_MAX_BYTES,
        vcpu: 1,
        memory_mib: 128,
        kernel: dir.join("vmlinux"),
        initrd: None,
        boot_args: "console=ttyS0".into(),
        drives: vec![DriveSpec {
            id: "root".into(),
            path: dir.join("root.ext4"),
            read_only: true,
        }],
        net: None,
        vsock: None,
    }
}

#[tokio::test]
async fn missing_inputs_are_named_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("ran");
    let bin = script(dir.path(), "qemu", &format!("touch {}", marker.display()));
    let q = Qemu::new(bin, Accel::Tcg).unwrap();

    let mut s = real_spec(dir.path());
    s.kernel = dir.path().join("no-such-vmlinux");
    let err = q.spawn(&s).await.unwrap_err();
    assert!(matches!(err, VmmError::Spec(_)), "{err:?}");
    assert!(err.to_string().contains("no-such-vmlinux"), "{err}");

    let mut s = real_spec(dir.path());
    s.drives[0].path = dir.path().join("gone.ext4");
    let err = q.spawn(&s).await.unwrap_err();
    assert!(err.to_string().contains("drive root"), "{err}");
    assert!(err.to_string().contains("gone.ext4"), "{err}");

    let mut s = real_spec(dir.path());
    s.initrd = Some(dir.path().to_path_buf());
    let err = q.spawn(&s).await.unwrap_err();
    assert!(err.to_string().contains("is a directory"), "{err}");

    assert!(!marker.exists(), "QEMU must not have been started");
}

#[tokio::test]
async fn vsock_without_vhost_vsock_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("ran");
    let bin = script(dir.path(), "qemu", &format!("touch {}", marker.display()));
    let device = dir.path().join("vhost-vsock");
    let q = Qemu::new(bin, Accel::Tcg)
        .unwrap()
        .with_vhost_vsock_device(device.clone())
        .with_socket_timeout(Duration::from_millis(200));
    let mut s = real_spec(dir.path());
    s.vsock = Some(VsockSpec {
        guest_cid: 3,
        uds_path: dir.path().join("v.sock"),
    });
    let err = q.spawn(&s).await.unwrap_err();
    assert!(matches!(err, VmmError::Spec(_)), "{err:?}");
    assert!(
        err.to_string().contains(&*device.to_string_lossy()),
        "{err}"
    );
    assert!(err.to_string().contains("vhost_vsock"), "{err}");
    assert!(!marker.exists());

    // With the device present the check passes (and the fake then exits: no QMP socket).
    std::fs::write(&device, "").unwrap();
    let err = q.spawn(&s).await.unwrap_err();
    assert!(matches!(err, VmmError::Exited { .. }), "{err:?}");
    assert!(marker.exists());
}

#[tokio::test]
async fn early_exit_reports_the_log_tail() {
    let dir = tempfile::tempdir().unwrap();
    let bin = script(
        dir.path(),
        "qemu",
        "echo 'qemu-system-x86_64: could not load kernel' >&2; exit 1",
    );
    let q = Qemu::new(bin, Accel::Tcg).unwrap();
    let s = real_spec(dir.path());
    let err = q.spawn(&s).await.unwrap_err();
    assert!(matches!(err, VmmError::Exited { .. }), "{err:?}");
    assert!(err.to_string().contains("could not load kernel"), "{err}");
    // The run dir was created private.
    let mode = std::fs::metadata(&s.run_dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
}

#[tokio::test]
async fn a_vmm_that_never_answers_is_killed() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("pid");
    let bin = script(
        dir.path(),
        "qemu",
        &format!(
            "echo $$ > {}; echo starting; exec sleep 30",
            pid_file.display()
        ),
    );
    let q = Qemu::new(bin, Accel::Tcg)
        .unwrap()
        .with_socket_timeout(Duration::from_millis(300));
    let s = real_spec(dir.path());
    let err = q.spawn(&s).await.unwrap_err();
    match &err {
        VmmError::SocketTimeout {
            socket, log_tail, ..
        } => {
            assert_eq!(socket, &s.run_dir.join(QMP_SOCKET_NAME));
            assert!(log_tail.contains("starting"), "{log_tail}");
        }
        other => panic!("expected a socket timeout, got {other:?}"),
    }
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // kill_pid waited for it to be gone (or a zombie awaiting the reaper).
    assert!(
        !matches!(process::proc_stat(pid), Some(st) if st.state != 'Z'),
        "the unresponsive VMM {pid} was left running"
    );
}

#[tokio::test]
async fn a_stale_non_socket_at_the_qmp_path_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let bin = script(dir.path(), "qemu", "exit 0");
    let q = Qemu::new(bin, Accel::Tcg).unwrap();
    let s = real_spec(dir.path());
    std::fs::create_dir_all(&s.run_dir).unwrap();
    let precious = s.run_dir.join(QMP_SOCKET_NAME);
    std::fs::write(&precious, "data").unwrap();
    let err = q.spawn(&s).await.unwrap_err();
    assert!(err.to_string().contains("is not a socket"), "{err}");
    assert_eq!(std::fs::read_to_string(&precious).unwrap(), "data");
}

fn handle(kind: VmmKind, pid: i32, start_time: u64, dir: &Path) -> VmmHandle {
    VmmHandle {
        kind,
        pid,
        start_time,
        control_socket: dir.join("absent.sock"),
        log_path: dir.join("log"),
    }
}

async fn sh_handle(dir: &Path, script: &str) -> VmmHandle {
    let spawned = process::spawn_detached(&DetachedCommand {
        inherit_fds: Vec::new(),
        program: "/bin/sh".into(),
        args: vec!["-c".into(), script.into()],
        env: Vec::new(),
        log_path: dir.join("log"),
        log_max_bytes: None,
    })
    .unwrap();
    handle(VmmKind::QemuTcg, spawned.pid, spawned.start_time, dir)
}

#[tokio::test]
async fn handles_of_other_backends_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let q = backend(Accel::Tcg);
    let h = handle(VmmKind::Firecracker, 1, 1, dir.path());
    let err = q.boot(&h).await.unwrap_err();
    assert!(err.to_string().contains("firecracker handle"), "{err}");
    assert!(q.kill(&h).await.is_err());
    assert!(q.shutdown(&h, Duration::ZERO).await.is_err());
    assert!(q.configure(&h, &spec()).await.is_err());
}

#[tokio::test]
async fn shutdown_and_kill_of_processes_without_qmp() {
    let dir = tempfile::tempdir().unwrap();
    let q = backend(Accel::Tcg);

    // Exits during the grace period after the failed QMP connection.
    let h = sh_handle(dir.path(), "sleep 0.2").await;
    assert!(q.shutdown(&h, Duration::from_secs(5)).await.unwrap());
    assert!(!q.is_alive(&h));
    // Gone already: every call succeeds at once.
    assert!(q.shutdown(&h, Duration::from_secs(5)).await.unwrap());
    q.kill(&h).await.unwrap();
    tokio::time::timeout(Duration::from_secs(1), q.wait_exit(&h))
        .await
        .unwrap();

    // Alive without a QMP socket: the QMP failure is reported, naming the socket.
    let h = sh_handle(dir.path(), "exec sleep 30").await;
    let err = q
        .shutdown(&h, Duration::from_millis(100))
        .await
        .unwrap_err();
    assert!(matches!(err, VmmError::Transport { .. }), "{err:?}");
    assert!(err.to_string().contains("absent.sock"), "{err}");
    assert!(q.is_alive(&h));
    q.kill(&h).await.unwrap();
    assert!(!q.is_alive(&h));
}

#[tokio::test]
async fn configure_refuses_a_process_launched_for_another_spec() {
    let dir = tempfile::tempdir().unwrap();
    let q = backend(Accel::Tcg);
    let h = sh_handle(dir.path(), "exec sleep 30").await;
    let err = q.configure(&h, &spec()).await.unwrap_err();
    assert!(matches!(err, VmmError::State { .. }), "{err:?}");
    assert!(err.to_string().contains("different spec"), "{err}");
    assert!(err.to_string().contains("\"-M\""), "{err}");
    q.kill(&h).await.unwrap();

    // A dead process is reported as exited.
    let err = q.configure(&h, &spec()).await.unwrap_err();
    assert!(matches!(err, VmmError::Exited { .. }), "{err:?}");
}

#[test]
fn an_inherited_tap_is_passed_by_descriptor() {
    let mut s = spec();
    let fd: std::os::fd::OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
    s.net.as_mut().unwrap().tap_fd = Some(crate::TapFd(std::sync::Arc::new(fd)));
    let argv = backend(Accel::Tcg).argv(&s);
    let pos = argv.iter().position(|x| x == "-netdev").unwrap();
    assert_eq!(argv[pos + 1], "tap,id=net0,fd=3");
    assert!(!argv.iter().any(|a| a.to_string_lossy().contains("ifname")));
}

#[test]
fn io_error_reason_names_the_drive_and_a_full_disk() {
    let blocks = serde_json::json!([
        {"device": "drive-root", "io-status": "nospace"},
        {"device": "drive-work", "io-status": "ok"},
        {"device": "drive-config"},
        {"device": "drive-work2", "io-status": "failed"},
    ]);
    assert_eq!(
        super::io_error_reason(Some(&blocks)),
        "host disk full under the root disk, I/O error on the work2 disk"
    );
    assert_eq!(super::io_error_reason(None), "I/O error on a disk");
}
