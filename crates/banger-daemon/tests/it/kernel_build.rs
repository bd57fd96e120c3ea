//! `kernel.build`: banger's guest kernel compiled from Debian's `linux-source-6.1`. The fast
//! tests (names, missing build tools, cache hit) always run; the real build and boot (~10-20
//! minutes of CPU) only with `BANGER_TEST_KERNEL_BUILD=1`.

use std::time::{Duration, Instant};

use banger_core::ErrorCode;
use banger_kernel::DebianMirror;
use banger_protocol::{Frame, KernelBuildParams, KernelImportParams, Request};
use banger_testkit::{TestEnv, raw_request};

use crate::output::text;

fn ok(env: &TestEnv, args: &[&str]) -> String {
    let o = env.cli(args);
    assert!(o.status.success(), "banger {args:?} failed:\n{}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn build(name: Option<&str>) -> Request {
    Request::KernelBuild(KernelBuildParams {
        name: name.map(str::to_string),
    })
}

/// A 64-bit x86-64 ELF header, enough for banger to accept a file as vmlinux.
fn fake_vmlinux() -> Vec<u8> {
    let mut elf = vec![0u8; 4096];
    elf[..4].copy_from_slice(b"\x7fELF");
    elf[4] = 2;
    elf[5] = 1;
    elf[0x12] = 62;
    elf
}

#[test]
fn bad_names_and_taken_names_are_refused_before_any_work() {
    let mut env = TestEnv::new("");
    env.start_daemon();
    for bad in ["../x", "a/b", "", ".hidden"] {
        let (code, msg) = env.request(&build(Some(bad))).err();
        assert_eq!(code, ErrorCode::BadRequest, "{bad:?}: {msg}");
    }
    let (code, msg) = env.request(&build(Some("debian-6.1-cloud"))).err();
    assert_eq!(code, ErrorCode::BadRequest, "{msg}");
    assert!(msg.contains("kernel pull"), "{msg}");

    // An imported kernel is never overwritten by a build.
    let dir = env.root().join("imp");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("vmlinux"), fake_vmlinux()).unwrap();
    env.request(&Request::KernelImport(KernelImportParams {
        name: "banger-6.1".into(),
        dir: dir.clone(),
    }))
    .ok();
    let (code, msg) = env.request(&build(None)).err();
    assert_eq!(code, ErrorCode::AlreadyExists, "{msg}");
    assert!(msg.contains("banger kernel rm banger-6.1"), "{msg}");

    // The CLI's own name check.
    let o = env.cli(&["kernel", "build", "--name", "../x"]);
    assert!(!o.status.success(), "{}", text(&o));
}

#[test]
fn missing_build_tools_are_named_in_one_line() {
    let env = TestEnv::new("");
    // A PATH with the other tools but without gcc.
    let bin = env.root().join("bin-without-gcc");
    std::fs::create_dir(&bin).unwrap();
    for prog in ["make", "flex", "bison", "bc", "perl"] {
        if let Some(p) = banger_sys::find_in_path(prog) {
            std::os::unix::fs::symlink(p, bin.join(prog)).unwrap();
        }
    }
    let mut daemon = env
        .daemon_command()
        .env("PATH", &bin)
        .spawn()
        .expect("spawn bangerd");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !matches!(
        raw_request(&env.socket(), b"{\"v\":1,\"method\":\"ping\"}\n")
            .ok()
            .and_then(|f| f.last().cloned()),
        Some(Frame::Result { .. })
    ) {
        assert!(Instant::now() < deadline, "bangerd did not come up");
        std::thread::sleep(Duration::from_millis(20));
    }
    let started = Instant::now();
    let reply = env.request(&build(None));
    let _ = daemon.kill();
    let _ = daemon.wait();
    let (code, msg) = reply.err();
    assert_eq!(code, ErrorCode::OperationFailed, "{msg}");
    assert!(!msg.contains('\n'), "one line: {msg}");
    assert!(msg.contains("gcc"), "{msg}");
    assert!(msg.contains("apt-get install"), "{msg}");
    if banger_sys::find_in_path("make").is_some() {
        let packages = msg.rsplit("apt-get install").next().unwrap();
        assert!(!packages.split_whitespace().any(|p| p == "make"), "{msg}");
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the check comes before any download"
    );
    assert!(
        !env.state_dir().join("kernels/banger-6.1").exists(),
        "nothing is left behind"
    );
}

#[test]
fn an_unchanged_config_is_a_cache_hit() {
    if let Err(e) = banger_kernel::check_build_tools() {
        println!("SKIP: {e}");
        return;
    }
    let mut env = TestEnv::new("");
    let mirror = DebianMirror {
        extra_suites: vec!["bookworm-updates".into()],
        ..DebianMirror::default()
    };
    if !mirror.reachable() {
        println!("SKIP: {} is not reachable", mirror.base_url);
        return;
    }
    // What the daemon will resolve: the same signed index, the same package version.
    let work = tempfile::tempdir().unwrap();
    let pkg = banger_kernel::build::resolve_source(&mirror, work.path(), &mut |_| {}).unwrap();
    let fragment = banger_kernel::Fragment::parse(banger_kernel::DEFAULT_FRAGMENT).unwrap();
    let hash = banger_kernel::config_hash(&fragment, &pkg.package_version);

    // A finished build whose record was never written (daemon killed at the very end), in a
    // state dir banger made (its mark), which the daemon then takes as its own.
    std::fs::create_dir_all(env.state_dir()).unwrap();
    std::fs::write(env.state_dir().join(banger_config::dirs::MARKER), b"").unwrap();
    let dest = env.state_dir().join("kernels/banger-6.1");
    std::fs::create_dir_all(&dest).unwrap();
    let vmlinux = fake_vmlinux();
    std::fs::write(dest.join("vmlinux"), &vmlinux).unwrap();
    let sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&vmlinux))
    };
    let manifest = banger_kernel::PulledKernel {
        version: "6.1.999-banger".into(),
        package: "linux-source-6.1".into(),
        package_version: pkg.package_version.clone(),
        vmlinux: "vmlinux".into(),
        vmlinux_sha256: sha.clone(),
        deb_sha256: pkg.sha256.clone(),
        modules: Vec::new(),
        source_url: banger_kernel::build::build_source(&hash),
        config: None,
        built_in: Vec::new(),
        vmlinuz_compression: None,
        suite: Some(pkg.suite.clone()),
        virtio_mmio_cmdline_devices: Some(true),
        initrd: None,
    };
    banger_kernel::write_manifest(&dest, &manifest).unwrap();
    env.start_daemon();

    let started = Instant::now();
    let reply = env.request(&build(None));
    let rec = reply.ok();
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "a cache hit builds nothing ({:?})",
        started.elapsed()
    );
    assert_eq!(rec["name"], "banger-6.1");
    assert_eq!(rec["version"], "6.1.999-banger");
    assert_eq!(rec["sha256"], sha.as_str());
    assert_eq!(
        rec["source"],
        format!("build:linux-source-6.1 config {hash}").as_str()
    );
    assert!(rec["initrd"].is_null(), "{rec}");
    let stages = reply.stages();
    assert!(
        !stages
            .iter()
            .any(|s| s == "kernel_build" || s == "kernel_download"),
        "{stages:?}"
    );
    // Again, now with the record: the same kernel.
    let again = env.request(&build(None)).ok();
    assert_eq!(again, rec);
    assert!(!env.state_dir().join("kernels/banger-6.1.staging").exists());
}

/// Wall time of `banger vm run --rm --kernel <kernel> -- true`.
fn run_true(env: &TestEnv, kernel: &str) -> Duration {
    let t = Instant::now();
    ok(
        env,
        &["vm", "run", "--rm", "--kernel", kernel, "--", "true"],
    );
    t.elapsed()
}

#[test]
fn real_kernel_build_boots_a_guest() {
    if std::env::var("BANGER_TEST_KERNEL_BUILD").as_deref() != Ok("1") {
        println!("SKIP: kernel build takes ~10 min; set BANGER_TEST_KERNEL_BUILD=1");
        return;
    }
    if let Err(e) = banger_kernel::check_build_tools() {
        panic!("BANGER_TEST_KERNEL_BUILD=1 but {e}");
    }
    let Some(mut env) = TestEnv::real("default_kernel = \"banger-6.1\"\n") else {
        return;
    };
    env.start_daemon();

    let t = Instant::now();
    let out = ok(&env, &["kernel", "build"]);
    let build_time = t.elapsed();
    println!("kernel build: {build_time:?}: {}", out.trim());
    assert!(out.contains("kernel banger-6.1 ready"), "{out}");
    let k: serde_json::Value =
        serde_json::from_str(&ok(&env, &["kernel", "show", "banger-6.1", "--json"])).unwrap();
    let release = k["version"].as_str().unwrap().to_string();
    assert!(release.ends_with("-banger"), "{k}");
    let dir = env.state_dir().join("kernels/banger-6.1");
    assert!(dir.join("vmlinux").is_file());
    assert!(dir.join("manifest.json").is_file());
    assert!(!dir.join("modules").exists(), "everything is built in");
    assert!(!env.state_dir().join("kernels/banger-6.1.staging").exists());
    assert!(
        std::fs::read_dir(env.state_dir().join("build"))
            .map(|d| d.count())
            .unwrap_or(0)
            == 0,
        "the source tree is removed"
    );

    // Unchanged config: nothing is built.
    let t = Instant::now();
    ok(&env, &["kernel", "build"]);
    assert!(t.elapsed() < Duration::from_secs(60), "{:?}", t.elapsed());

    // The first run also builds the default image.
    let uname = ok(
        &env,
        &[
            "vm",
            "run",
            "--rm",
            "--kernel",
            "banger-6.1",
            "--",
            "uname",
            "-r",
        ],
    );
    assert_eq!(uname.trim(), release, "the guest runs the built kernel");

    // Boot time against Debian's cloud kernel, alternating, after one warm-up each.
    ok(&env, &["kernel", "pull", "debian-6.1-cloud"]);
    run_true(&env, "debian-6.1-cloud");
    let mut times: Vec<(&str, Duration)> = Vec::new();
    for _ in 0..2 {
        for kernel in ["banger-6.1", "debian-6.1-cloud"] {
            times.push((kernel, run_true(&env, kernel)));
        }
    }
    for (kernel, d) in &times {
        println!("vm run --rm -- true with {kernel}: {d:?}");
    }
    env.stop_daemon();
}
