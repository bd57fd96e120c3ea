//! Interruptions *inside* long operations, not only at step boundaries: the daemon SIGKILLed at
//! points spread over an operation's measured duration, or a fixed time after a progress event
//! (the VMM process appearing), then restarted. After each case: the leak checker finds
//! nothing, no process of this environment runs that a running VM does not account for, every
//! VM the user did not delete is still there, and the next command works.
//!
//! Each group prints how many cases it ran (`interruption cases: <group> <n>`).

use std::path::Path;
use std::time::{Duration, Instant};

use banger_protocol::{
    Envelope, LeakReport, PROTOCOL_VERSION, Request, VmCreateParams, VmDeleteParams, VmRef,
};
use banger_testkit::{TestEnv, pid_alive, processes_mentioning};

fn leaks(env: &TestEnv) -> LeakReport {
    serde_json::from_value(env.request(&Request::DaemonLeaks).ok()).expect("a leak report")
}

fn list(env: &TestEnv) -> Vec<serde_json::Value> {
    env.request(&Request::VmList).ok()["vms"]
        .as_array()
        .unwrap()
        .clone()
}

fn create_params(name: &str, no_start: bool) -> Request {
    Request::VmCreate(VmCreateParams {
        name: Some(name.into()),
        no_start,
        ..Default::default()
    })
}

/// Sends `req` on its own thread (the daemon may die under it; whatever comes back is ignored).
fn send_in_background(env: &TestEnv, req: &Request) -> std::thread::JoinHandle<()> {
    let op = banger_core::OpId::generate();
    let line = Envelope {
        v: PROTOCOL_VERSION,
        op_id: &op,
        request: req,
    }
    .to_line();
    let socket = env.socket();
    std::thread::spawn(move || {
        let _ = banger_testkit::raw_request(&socket, line.as_bytes());
    })
}

/// The fake Firecracker processes of this environment.
fn vmm_pids(env: &TestEnv) -> Vec<i32> {
    processes_mentioning(env.root())
        .into_iter()
        .filter(|(_, cmd)| cmd.contains("fake-firecracker"))
        .map(|(p, _)| p)
        .collect()
}

/// What every case must show after the daemon is back: no leak, no stray process, the VMs in
/// `kept` still there (the ones in `maybe` may or may not be), and a new VM made, run and
/// deleted without a trace.
fn check_after(env: &TestEnv, label: &str, kept: &[&str], maybe: &[&str]) {
    let report = leaks(env);
    assert!(
        report.leaks.is_empty(),
        "{label}: leaks {:#?}; log:\n{}",
        report.leaks,
        env.daemon_log()
    );
    let vms = list(env);
    let running: Vec<i64> = vms
        .iter()
        .filter_map(|v| {
            env.request(&Request::VmShow(VmRef {
                vm: v["name"].as_str().unwrap().into(),
            }))
            .ok()["pid"]
                .as_i64()
        })
        .collect();
    for (pid, cmd) in env.stray_processes() {
        assert!(
            running.contains(&i64::from(pid)),
            "{label}: process {pid} ({cmd}) runs for no running VM; VMs {vms:#?}; log:\n{}",
            env.daemon_log()
        );
    }
    let names: Vec<&str> = vms.iter().filter_map(|v| v["name"].as_str()).collect();
    for k in kept {
        assert!(names.contains(k), "{label}: VM {k} is gone: {vms:#?}");
    }
    for n in &names {
        assert!(
            kept.contains(n) || maybe.contains(n),
            "{label}: unexpected VM {n}"
        );
    }
    // The next command works.
    env.request(&create_params("probe", false)).ok();
    env.request(&Request::VmDelete(VmDeleteParams {
        vm: "probe".into(),
        force: true,
    }))
    .ok();
}

/// Deletes every VM, leaving an empty installation for the next case.
fn reset(env: &TestEnv) {
    for v in list(env) {
        env.request(&Request::VmDelete(VmDeleteParams {
            vm: v["name"].as_str().unwrap().into(),
            force: true,
        }))
        .ok();
    }
    assert!(env.vm_leftovers().is_empty(), "{:?}", env.vm_leftovers());
}

fn kill_and_restart(env: &mut TestEnv, bg: std::thread::JoinHandle<()>) {
    env.kill_daemon();
    let _ = bg.join();
    env.start_daemon();
}

/// SIGKILL of the daemon while the VMM is starting up (after fork/exec, before its API socket
/// answers; the fake takes 2.5 s to bind it, as a slow real one can): the VMM must be recorded
/// and killed by the next daemon, never orphaned. Points: a fixed delay after the VMM process
/// appears.
#[test]
fn sigkill_while_the_vmm_starts_up() {
    let mut env = TestEnv::new("");
    env.start_daemon();
    env.seed_artifacts();
    let delays = [0u64, 200, 700, 1500, 2300];
    for ms in delays {
        let label = format!("vmm_spawn +{ms}ms");
        env.request(&create_params("box", true)).ok();
        env.set_control(serde_json::json!({ "socket_delay_ms": 2500 }));
        let bg = send_in_background(&env, &Request::VmStart(VmRef { vm: "box".into() }));
        let t = Instant::now();
        let pid = loop {
            if let Some(p) = vmm_pids(&env).first() {
                break *p;
            }
            assert!(t.elapsed() < Duration::from_secs(10), "{label}: no VMM");
            std::thread::sleep(Duration::from_millis(5));
        };
        std::thread::sleep(Duration::from_millis(ms));
        kill_and_restart(&mut env, bg);
        assert!(!pid_alive(pid), "{label}: the VMM {pid} was orphaned");
        env.set_control(serde_json::json!({}));
        check_after(&env, &label, &["box"], &[]);
        // The interrupted VM itself starts and goes.
        env.request(&Request::VmStart(VmRef { vm: "box".into() }))
            .ok();
        reset(&env);
    }
    println!("interruption cases: vmm_spawn {}", delays.len());
}

/// Runs `op` once to measure it, then `points` times with the daemon SIGKILLed at fractions of
/// that duration spread over it, calling `setup` before each run and `check` after each restart.
fn over_duration(
    env: &mut TestEnv,
    group: &str,
    points: usize,
    setup: &dyn Fn(&TestEnv),
    op: &dyn Fn() -> Request,
    check: &dyn Fn(&TestEnv, &str),
) -> usize {
    setup(env);
    let t = Instant::now();
    env.request(&op());
    let took = t.elapsed();
    reset(env);
    for i in 0..points {
        let at = took.mul_f64(i as f64 / (points - 1).max(1) as f64);
        let label = format!("{group} at {at:?} of {took:?}");
        setup(env);
        let bg = send_in_background(env, &op());
        std::thread::sleep(at);
        kill_and_restart(env, bg);
        check(env, &label);
        reset(env);
    }
    points
}

/// `vm create` (with its start) and `vm rm -f` of a running VM, the daemon SIGKILLed at points
/// spread over each. A delete is either finished by the next daemon or not begun: never a VM
/// dir without a VM (the delete mark goes last), never a VMM without a record.
#[test]
fn sigkill_inside_create_and_delete() {
    let mut env = TestEnv::new("");
    env.start_daemon();
    env.seed_artifacts();
    // A slower VMM start spreads the points over the boot too.
    env.set_control(serde_json::json!({ "socket_delay_ms": 300 }));
    let mut n = over_duration(
        &mut env,
        "create",
        6,
        &|_| {},
        &|| create_params("box", false),
        &|env, label| check_after(env, label, &[], &["box"]),
    );
    n += over_duration(
        &mut env,
        "delete",
        6,
        &|env| {
            env.request(&create_params("box", false)).ok();
            // Bulk in the VM dir, so the delete takes a while.
            let id = list(env)[0]["id"].as_str().unwrap().to_string();
            let dir = env.state_dir().join("vms").join(id).join("bulk");
            std::fs::create_dir_all(&dir).unwrap();
            for i in 0..3000 {
                std::fs::write(dir.join(i.to_string()), b"x").unwrap();
            }
        },
        &|| {
            Request::VmDelete(VmDeleteParams {
                vm: "box".into(),
                force: true,
            })
        },
        &|env, label| {
            check_after(env, label, &[], &["box"]);
            // Whatever remains of the VM is a whole VM (its disks are there).
            for v in list(env) {
                let id = v["id"].as_str().unwrap();
                let root = env.state_dir().join("vms").join(id);
                assert!(
                    dir_has_disks(&root),
                    "{label}: VM {id} survived without its disks"
                );
            }
        },
    );
    println!("interruption cases: create+delete {n}");
}

fn dir_has_disks(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|rd| {
        rd.flatten()
            .any(|e| e.file_name().to_string_lossy().ends_with(".ext4"))
    })
}

/// Mount points strictly under `dir` (canonical) in this mount namespace.
fn mounts_under(dir: &Path) -> Vec<String> {
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let prefix = format!("{}/", dir.display());
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| p.starts_with(&prefix))
        .map(str::to_string)
        .collect()
}

/// Processes working (cwd or root) inside `dir`.
fn processes_in(dir: &Path) -> Vec<i32> {
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    banger_daemon::build_dir::processes_in(Path::new("/proc"), &dir)
}

/// `image build` (a real mmdebstrap, as root) interrupted while mmdebstrap runs: the client
/// going away (what Ctrl-C of the CLI does) during the download and while the host's `/proc`,
/// `/sys`, `/dev/pts`, `/dev/shm` are mounted in its tree, and the daemon SIGKILLed there. After
/// each: no process of the build left, nothing mounted under the state dir, `build/` empty,
/// no image registered, a file in the host's `/dev/shm` still there, no leak.
#[test]
fn image_build_interrupted() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("SKIP: image build needs root");
        return;
    }
    if !banger_testkit::have_program("mmdebstrap") {
        println!("SKIP: mmdebstrap is not installed");
        return;
    }
    let mut env = TestEnv::new("");
    env.start_daemon();
    let canary = Path::new("/dev/shm").join(format!("banger-canary-{}", std::process::id()));
    std::fs::write(&canary, b"host file").unwrap();
    let build = env.state_dir().join("build");
    let state = env.state_dir();
    // (label, wait for mounts?, delay after the trigger, SIGKILL the daemon instead of leaving)
    let cases = [
        ("client gone while downloading", false, 3000u64, false),
        (
            "client gone with /proc,/sys,/dev mounted",
            true,
            1000,
            false,
        ),
        (
            "daemon SIGKILLed with /proc,/sys,/dev mounted",
            true,
            3000,
            true,
        ),
    ];
    for (label, wait_mounts, delay, sigkill) in cases {
        let op = banger_core::OpId::generate();
        let req = Request::ImageBuild(banger_protocol::ImageBuildParams {
            name: Some("deb".into()),
            suite: None,
        });
        let line = Envelope {
            v: PROTOCOL_VERSION,
            op_id: &op,
            request: &req,
        }
        .to_line();
        let mut conn = std::os::unix::net::UnixStream::connect(env.socket()).unwrap();
        std::io::Write::write_all(&mut conn, line.as_bytes()).unwrap();
        let t = Instant::now();
        loop {
            let ready = if wait_mounts {
                !mounts_under(&build).is_empty()
            } else {
                !banger_testkit::processes_mentioning(&build).is_empty()
            };
            if ready {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(300),
                "{label}: mmdebstrap never got there; log:\n{}",
                env.daemon_log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        std::thread::sleep(Duration::from_millis(delay));
        if sigkill {
            env.kill_daemon();
            drop(conn);
            env.start_daemon();
        } else {
            drop(conn);
            // The daemon cleans up as the request unwinds.
            let t = Instant::now();
            while std::fs::read_dir(&build).is_ok_and(|mut rd| rd.next().is_some()) {
                assert!(
                    t.elapsed() < Duration::from_secs(60),
                    "{label}: build dir not cleaned: {:?}; mounts {:?}; log:\n{}",
                    banger_testkit::files_under(&build),
                    mounts_under(&state),
                    env.daemon_log()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        assert!(
            mounts_under(&state).is_empty(),
            "{label}: mounts left {:?}",
            mounts_under(&state)
        );
        assert!(
            processes_in(&state).is_empty(),
            "{label}: processes left {:?}",
            processes_in(&state)
        );
        assert!(
            std::fs::read_dir(&build).map_or(true, |mut rd| rd.next().is_none()),
            "{label}: build dir not empty"
        );
        assert!(
            canary.exists(),
            "{label}: a file in the host's /dev/shm was deleted"
        );
        assert!(
            env.request(&Request::ImageList).ok()["images"]
                .as_array()
                .is_none_or(|a| a.is_empty()),
            "{label}: an image was registered"
        );
        let report = leaks(&env);
        assert!(report.leaks.is_empty(), "{label}: {:#?}", report.leaks);
        println!("{label}: ok after {:.1}s", t.elapsed().as_secs_f64());
    }
    let _ = std::fs::remove_file(&canary);
    println!("interruption cases: image build {}", cases.len());
}

/// `banger ARGS` of this environment, started (not waited for), output captured.
fn spawn_cli(env: &TestEnv, args: &[&str]) -> std::process::Child {
    std::process::Command::new(banger_testkit::bin("banger"))
        .args(args)
        .env("BANGER_CONFIG", &env.config)
        .env("HOME", env.home())
        .env("FAKE_FIRECRACKER_CONTROL", &env.control)
        .env("FAKE_FIRECRACKER_RECORD", &env.record)
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run banger")
}

/// A small git repository with one commit.
fn make_repo(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("README"), "hello\n").unwrap();
    for args in [
        &["init", "-q"][..],
        &["add", "README"],
        &[
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "commit",
            "-q",
            "-m",
            "one",
        ],
    ] {
        let o = std::process::Command::new("git")
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(o.status.success(), "git {args:?}: {o:?}");
    }
}

/// Temporary repositories of CLI process `pid` (in banger's scratch dir or the system's).
fn temp_repos(env: &TestEnv, pid: u32) -> Vec<std::path::PathBuf> {
    let prefix = format!("banger-ws.{pid}.");
    [
        env.root().join("cache/workspaces/tmp"),
        std::env::temp_dir(),
    ]
    .iter()
    .filter_map(|d| std::fs::read_dir(d).ok())
    .flat_map(|rd| rd.flatten().map(|e| e.path()))
    .filter(|p| {
        p.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with(&prefix))
    })
    .collect()
}

/// Waits up to 15 s for `check` to hold.
fn eventually(what: &str, check: impl Fn() -> bool) {
    let t = Instant::now();
    while !check() {
        assert!(t.elapsed() < Duration::from_secs(15), "{what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `vm run --rm`: a start that fails deletes the VM; SIGINT to the CLI (Ctrl-C) at points
/// spread over the boot (driven by the VMM process appearing) exits 130 and leaves no VM, no
/// temp repo, no leak.
#[test]
fn vm_run_rm_cleans_up_on_failure_and_ctrl_c() {
    let mut env = TestEnv::new("");
    env.start_daemon();
    env.seed_artifacts();
    let repo = env.root().join("repo");
    make_repo(&repo);
    let repo_s = repo.display().to_string();

    // A failed start with --rm leaves nothing.
    env.set_control(serde_json::json!({
        "fail": [{"method": "PUT", "path": "/actions", "action_type": "InstanceStart"}]
    }));
    let o = env.cli(&["vm", "run", "--rm", "--name", "failing", "--", "true"]);
    assert!(!o.status.success(), "{o:?}");
    assert!(
        list(&env).is_empty(),
        "failed start with --rm left {:#?}",
        list(&env)
    );
    assert!(env.vm_leftovers().is_empty(), "{:?}", env.vm_leftovers());

    let delays = [0u64, 400, 1200, 1800];
    for ms in delays {
        let label = format!("SIGINT to vm run --rm +{ms}ms after the VMM appeared");
        env.set_control(serde_json::json!({ "socket_delay_ms": 2000 }));
        let cli = spawn_cli(&env, &["vm", "run", "--rm", &repo_s, "--", "true"]);
        let pid = cli.id();
        let t = Instant::now();
        while vmm_pids(&env).is_empty() {
            assert!(t.elapsed() < Duration::from_secs(15), "{label}: no VMM");
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(ms));
        // SAFETY: kill(2) on the CLI child this test started.
        unsafe { libc::kill(pid as i32, libc::SIGINT) };
        let out = cli.wait_with_output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(130),
            "{label}: {out:?}; log:\n{}",
            env.daemon_log()
        );
        eventually(&format!("{label}: VM left {:#?}", list(&env)), || {
            list(&env).is_empty() && env.vm_leftovers().is_empty()
        });
        assert!(
            temp_repos(&env, pid).is_empty(),
            "{label}: temp repo left: {:?}",
            temp_repos(&env, pid)
        );
        env.set_control(serde_json::json!({}));
        check_after(&env, &label, &[], &[]);
    }
    println!(
        "interruption cases: vm run --rm (fake VMM) {}",
        delays.len() + 1
    );
}

/// SIGINT to a CLI once `ready` holds (polled every 20 ms), `delay` later; its exit status.
fn sigint_when(
    mut cli: std::process::Child,
    ready: impl Fn(&str) -> bool,
    delay: Duration,
    label: &str,
) -> std::process::Output {
    use std::io::BufRead;
    let stderr = cli.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            all.push_str(&line);
            all.push('\n');
            let _ = tx.send(all.clone());
        }
        all
    });
    let t = Instant::now();
    let mut seen = String::new();
    while !ready(&seen) {
        assert!(
            t.elapsed() < Duration::from_secs(400),
            "{label}: never ready; stderr: {seen}"
        );
        while let Ok(s) = rx.try_recv() {
            seen = s;
        }
        if matches!(cli.try_wait(), Ok(Some(_))) {
            panic!("{label}: the CLI ended before the interrupt; stderr: {seen}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(delay);
    // SAFETY: kill(2) on the CLI child this test started.
    unsafe { libc::kill(cli.id() as i32, libc::SIGINT) };
    let mut out = cli.wait_with_output().unwrap();
    out.stderr = reader.join().unwrap().into_bytes();
    out
}

/// Real guests (QEMU, the Debian image with OpenSSH), on running VM `vm` of `env` (called from
/// `real_guest::real_guest_end_to_end`, to share its provisioning): `vm exec VM -- sleep 1000`
/// plus SIGINT exits 130 and leaves no `sleep` in the guest; a command killed by SIGKILL exits
/// 137; `vm run --rm` interrupted while booting and while copying the workspace leaves no VM
/// and no temp repo.
pub fn real_guest_interrupts_in(env: &TestEnv, vm: &str) {
    let run = |args: &[&str]| {
        let o = env.cli(args);
        assert!(
            o.status.success(),
            "banger {args:?}: {o:?}\n{}",
            env.daemon_log()
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let vms_before = list(env).len();
    let sleeps = || {
        run(&[
            "vm", "exec", vm, "--", "sh", "-c",
            "n=0; for c in /proc/[0-9]*/comm; do [ \"$(cat $c 2>/dev/null)\" = sleep ] && n=$((n+1)); done; echo $n",
        ])
        .trim()
        .to_string()
    };
    assert_eq!(sleeps(), "0");

    // Ctrl-C on vm exec: 130, the guest command is gone.
    let cli = spawn_cli(env, &["vm", "exec", vm, "--", "sleep", "1000"]);
    let t = Instant::now();
    let o = sigint_when(
        cli,
        |_| t.elapsed() > Duration::from_secs(4),
        Duration::ZERO,
        "vm exec sleep",
    );
    assert_eq!(o.status.code(), Some(130), "vm exec + SIGINT: {o:?}");
    assert_eq!(sleeps(), "0", "the guest command survived the interrupt");

    // A command killed by a signal: 128 + N.
    let o = env.cli(&["vm", "exec", vm, "--", "sh", "-c", "kill -9 $$"]);
    assert_eq!(o.status.code(), Some(137), "{o:?}");
    let o = env.cli(&["vm", "exec", vm, "--", "sh", "-c", "exit 7"]);
    assert_eq!(o.status.code(), Some(7), "{o:?}");

    // vm run --rm interrupted while booting, and while copying the workspace (a repo big
    // enough for the copy to take a while).
    let repo = env.root().join("repo");
    make_repo(&repo);
    let mut big = vec![0u8; 48 << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for b in big.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    std::fs::write(repo.join("blob"), &big).unwrap();
    let o = std::process::Command::new("git")
        .args(["add", "blob"])
        .current_dir(&repo)
        .output()
        .unwrap();
    assert!(o.status.success());
    let o = std::process::Command::new("git")
        .args([
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "commit",
            "-q",
            "-m",
            "blob",
        ])
        .current_dir(&repo)
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    let repo_s = repo.display().to_string();
    let root = env.root().to_path_buf();
    let qemu_count = || {
        processes_mentioning(&root)
            .iter()
            .filter(|(_, c)| c.contains("qemu-system"))
            .count()
    };
    type Ready<'a> = &'a dyn Fn(&str) -> bool;
    let cases: [(&str, Ready<'_>, Duration); 2] = [
        (
            "booting",
            // box's VMM plus the new one.
            &|_: &str| qemu_count() >= 2,
            Duration::from_secs(3),
        ),
        (
            "copying the workspace",
            &|s: &str| s.contains("ready in"),
            Duration::from_millis(300),
        ),
    ];
    for (phase, ready, delay) in cases {
        let label = format!("vm run --rm interrupted while {phase}");
        let cli = spawn_cli(env, &["vm", "run", "--rm", &repo_s, "--", "true"]);
        let pid = cli.id();
        let o = sigint_when(cli, ready, delay, &label);
        assert_eq!(o.status.code(), Some(130), "{label}: {o:?}");
        eventually(&format!("{label}: VMs {:#?}", list(env)), || {
            list(env).len() == vms_before
        });
        assert!(
            temp_repos(env, pid).is_empty(),
            "{label}: temp repo left: {:?}",
            temp_repos(env, pid)
        );
        println!("{label}: ok");
    }
    // Taps are host-wide: another installation's tap caught between its creation and its
    // attachment to its bridge shows up as "on no bridge" for a moment. A leak of ours stays.
    let mut report = leaks(env);
    for _ in 0..5 {
        if report.leaks.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
        report = leaks(env);
    }
    assert!(report.leaks.is_empty(), "{:#?}", report.leaks);
    println!("interruption cases: real guest 3");
}

fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn images(env: &TestEnv) -> Vec<String> {
    env.request(&Request::ImageList).ok()["images"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|i| i["name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// After a SIGKILL inside an image operation: no leak, no staging or build scratch left, the
/// image either complete (then removed for the next case) or absent.
fn check_image_after(env: &TestEnv, label: &str, name: &str) {
    let report = leaks(env);
    assert!(report.leaks.is_empty(), "{label}: {:#?}", report.leaks);
    let build = env.state_dir().join("build");
    assert!(
        std::fs::read_dir(&build).map_or(true, |mut rd| rd.next().is_none()),
        "{label}: build scratch left: {:?}",
        banger_testkit::files_under(&build)
    );
    let staging: Vec<_> = std::fs::read_dir(env.state_dir().join("images"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default();
    assert!(staging.is_empty(), "{label}: staging left: {staging:?}");
    if images(env).iter().any(|n| n == name) {
        let show = env.request(&Request::ImageShow(banger_protocol::NameParams {
            name: name.into(),
        }));
        let v = show.ok();
        let rootfs = v["rootfs"].as_str().map(std::path::PathBuf::from);
        assert!(
            rootfs.as_ref().is_some_and(|p| p.is_file()),
            "{label}: image {name} registered without its rootfs: {v}"
        );
        env.request(&Request::ImageDelete(banger_protocol::NameForceParams {
            name: name.into(),
            force: true,
        }))
        .ok();
    }
}

/// `image pull` (from a local registry, throttled) and `image import` (a tarball) with the
/// daemon SIGKILLed at points spread over each one's measured duration.
#[test]
fn sigkill_inside_pull_and_import() {
    let reg = match banger_testkit::registry::LocalRegistry::start() {
        Ok(r) => r,
        Err(why) => {
            println!("SKIP: {why}");
            return;
        }
    };
    let mut env = TestEnv::new("");
    env.start_daemon();
    let layer = banger_testkit::layers::LayerBuilder::new()
        .dir("etc", 0o755)
        .file("etc/os-release", 0o644, b"ID=banger-test\n")
        .dir("data", 0o755)
        .file("data/big", 0o644, &noise(12 << 20, 7))
        .build();
    let tarball = env.root().join("rootfs.tar");
    std::fs::write(&tarball, &layer).unwrap();
    reg.push(
        "big/img",
        "1",
        &[layer],
        serde_json::json!({"Cmd": ["/bin/sh"]}),
    );
    reg.set_throttle(12 << 20);
    let reference = format!("{}/big/img:1", reg.addr());
    let pull = || {
        Request::ImagePull(banger_protocol::ImagePullParams {
            reference: reference.clone(),
            name: Some("pulled".into()),
            insecure: true,
            ..Default::default()
        })
    };
    let import = || {
        Request::ImageImport(banger_protocol::ImageImportParams {
            name: Some("imported".into()),
            source: tarball.clone(),
            kernel: None,
        })
    };
    let mut n = 0;
    for (group, name, op) in [
        ("pull", "pulled", &pull as &dyn Fn() -> Request),
        ("import", "imported", &import),
    ] {
        let t = Instant::now();
        env.request(&op()).ok();
        let took = t.elapsed();
        check_image_after(&env, group, name);
        // The pull's blobs are cached after the first run: clear the cache so every run
        // downloads (the interesting part).
        let points = 4;
        for i in 0..points {
            let at = took.mul_f64((i as f64 + 0.5) / points as f64);
            let label = format!("{group} at {at:?} of {took:?}");
            let _ = std::fs::remove_dir_all(env.root().join("cache"));
            let bg = send_in_background(&env, &op());
            std::thread::sleep(at);
            kill_and_restart(&mut env, bg);
            check_image_after(&env, &label, name);
            n += 1;
        }
        // The next one works.
        env.request(&op()).ok();
        check_image_after(&env, group, name);
    }
    println!("interruption cases: pull+import {n}");
}
