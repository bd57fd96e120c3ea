//! Real guests under QEMU (TCG here, KVM where it works): the whole `vm run` path with the
//! Debian kernel and image banger provisions itself, ssh, exit codes, persistence, isolation,
//! NAT rules, and nothing left behind. Skips (saying why) where the machine cannot boot guests.

use std::time::Instant;

use banger_testkit::{TestEnv, bridge_ports, nft_banger_table};

use crate::output::text;

fn ok(env: &TestEnv, args: &[&str]) -> String {
    let o = env.cli(args);
    assert!(o.status.success(), "banger {args:?} failed:\n{}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn vm_id(env: &TestEnv, name: &str) -> String {
    let v: serde_json::Value =
        serde_json::from_str(&ok(env, &["vm", "show", name, "--json"])).unwrap();
    v["id"].as_str().unwrap().to_string()
}

fn assert_nothing_left(env: &TestEnv, what: &str) {
    let list = ok(env, &["vm", "ls", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(
        v["vms"].as_array().unwrap().len(),
        0,
        "{what}: VMs left: {list}"
    );
    assert!(
        env.stray_processes().is_empty(),
        "{what}: processes left: {:?}",
        env.stray_processes()
    );
    assert!(
        env.vm_leftovers().is_empty(),
        "{what}: files left: {:?}",
        env.vm_leftovers()
    );
    let (bridge, _) = env.network().expect("a real environment");
    let taps = bridge_ports(&bridge);
    assert!(taps.is_empty(), "{what}: taps left: {taps:?}");
}

#[test]
fn real_guest_end_to_end() {
    let sync =
        "\n[[file_sync]]\nhost = \"~/token\"\nguest = \"~/.config/token\"\nmode = \"0640\"\n";
    let Some(mut env) = TestEnv::real(sync) else {
        return;
    };
    std::fs::write(env.home().join("token"), "s3cret\n").unwrap();
    env.start_daemon();

    // 1. The first run provisions the kernel and the image, boots, runs, and exits with the
    //    guest's answer; --rm leaves nothing.
    let t = Instant::now();
    let o = env.cli(&["vm", "run", "--rm", "--", "uname", "-r"]);
    assert!(
        o.status.success(),
        "first vm run:\n{}\nlog:\n{}",
        text(&o),
        env.daemon_log()
    );
    let release = String::from_utf8_lossy(&o.stdout).trim().to_string();
    let kernels: serde_json::Value =
        serde_json::from_str(&ok(&env, &["kernel", "ls", "--json"])).unwrap();
    assert_eq!(
        kernels["kernels"][0]["version"],
        release.as_str(),
        "guest runs banger's kernel"
    );
    println!(
        "first vm run (provisioning included): {:.1}s",
        t.elapsed().as_secs_f64()
    );
    assert_nothing_left(&env, "after vm run --rm");

    // 2. The guest's exit status becomes banger's.
    let o = env.cli(&["vm", "run", "--rm", "--", "sh", "-c", "exit 7"]);
    assert_eq!(o.status.code(), Some(7), "{}", text(&o));
    assert_nothing_left(&env, "after exit 7");

    // 3. Two VMs from one image; one with NAT.
    ok(&env, &["vm", "create", "--name", "alpha", "--nat"]);
    ok(&env, &["vm", "create", "--name", "beta"]);
    let (a, b) = (vm_id(&env, "alpha"), vm_id(&env, "beta"));
    let rules = nft_banger_table(&env.network().expect("a real environment").0);
    assert!(
        rules.contains(&format!("banger:{a}")),
        "alpha's NAT rules missing:\n{rules}"
    );
    assert!(
        !rules.contains(&format!("banger:{b}")),
        "beta has NAT rules without --nat:\n{rules}"
    );

    ok(
        &env,
        &[
            "vm",
            "exec",
            "alpha",
            "--",
            "sh",
            "-c",
            "echo in-root > /root/keep && echo in-etc > /etc/keep && sync",
        ],
    );
    let o = env.cli(&[
        "vm",
        "exec",
        "beta",
        "--",
        "sh",
        "-c",
        "test ! -e /root/keep && test ! -e /etc/keep",
    ]);
    assert!(o.status.success(), "beta sees alpha's files:\n{}", text(&o));
    let ident = |name: &str| {
        ok(
            &env,
            &[
                "vm",
                "exec",
                name,
                "--",
                "cat",
                "/etc/machine-id",
                "/etc/ssh/ssh_host_ed25519_key.pub",
            ],
        )
    };
    let (ia, ib) = (ident("alpha"), ident("beta"));
    let (la, lb): (Vec<&str>, Vec<&str>) = (ia.lines().collect(), ib.lines().collect());
    assert_eq!((la.len(), lb.len()), (2, 2), "{ia}\n{ib}");
    assert_ne!(la[0], lb[0], "machine-ids must differ");
    assert_ne!(la[1], lb[1], "ssh host keys must differ");

    // 4. Stop removes the NAT rules; files in /root and /etc survive stop/start.
    ok(&env, &["vm", "stop", "alpha"]);
    assert!(
        !nft_banger_table(&env.network().expect("a real environment").0)
            .contains(&format!("banger:{a}")),
        "NAT rules survive stop"
    );
    ok(&env, &["vm", "start", "alpha"]);
    assert!(
        nft_banger_table(&env.network().expect("a real environment").0)
            .contains(&format!("banger:{a}")),
        "NAT rules back after start"
    );
    let kept = ok(
        &env,
        &[
            "vm",
            "exec",
            "alpha",
            "--",
            "cat",
            "/root/keep",
            "/etc/keep",
        ],
    );
    assert_eq!(kept, "in-root\nin-etc\n");
    // Ctrl-C of vm exec and vm run --rm (interrupt.rs), sharing this environment's provisioning.
    crate::interrupt::real_guest_interrupts_in(&env, "alpha");

    ok(&env, &["vm", "rm", "--force", "alpha", "beta"]);
    let rules = nft_banger_table(&env.network().expect("a real environment").0);
    assert!(
        !rules.contains(&format!("banger:{a}")) && !rules.contains(&format!("banger:{b}")),
        "rules left after delete:\n{rules}"
    );
    assert_nothing_left(&env, "after rm");
    env.stop_daemon();
}

/// The same path under real Firecracker: needs its binary and hardware KVM, neither of which
/// this development host has (its /dev/kvm is a software KVM that Firecracker guests crash on).
#[test]
fn real_guest_under_firecracker() {
    let Some(fc) = banger_sys::find_in_path("firecracker") else {
        println!("SKIP: real Firecracker boot: no firecracker binary in PATH");
        return;
    };
    let probe = banger_vmm::qemu::detect_accel();
    if probe.accel != banger_vmm::qemu::Accel::Kvm {
        println!(
            "SKIP: real Firecracker boot needs hardware KVM: {}",
            probe.reason
        );
        return;
    }
    let extra = format!(
        "vmm = \"firecracker\"\nfirecracker_bin = \"{}\"\n",
        fc.display()
    );
    let Some(mut env) = TestEnv::real(&extra) else {
        return;
    };
    env.start_daemon();
    let o = env.cli(&["vm", "run", "--rm", "--", "sh", "-c", "uname -r; exit 7"]);
    assert_eq!(o.status.code(), Some(7), "{}", text(&o));
    assert_nothing_left(&env, "firecracker vm run --rm");
}

/// An Alpine-style image: busybox, a musl loader and a musl-linked program, no init system, no
/// sshd. `None` (after `SKIP`) without busybox-static or musl-gcc.
fn alpine_style_layer(work: &std::path::Path) -> Option<Vec<u8>> {
    let busybox = std::path::Path::new("/bin/busybox");
    if !busybox.is_file() {
        println!("SKIP: Alpine-style image: /bin/busybox missing (apt-get install busybox-static)");
        return None;
    }
    if !banger_testkit::have_program("musl-gcc") {
        println!("SKIP: Alpine-style image: musl-gcc missing (apt-get install musl-tools)");
        return None;
    }
    let src = work.join("hello.c");
    std::fs::write(
        &src,
        "#include <stdio.h>\nint main(void){puts(\"hello from musl\");return 0;}\n",
    )
    .unwrap();
    let hello = work.join("hello-musl");
    let st = std::process::Command::new("musl-gcc")
        .arg("-o")
        .arg(&hello)
        .arg(&src)
        .status()
        .unwrap();
    assert!(st.success(), "musl-gcc failed");
    let loader = std::fs::read("/usr/lib/x86_64-linux-musl/libc.so").expect("musl libc.so");
    let mut b = banger_testkit::layers::LayerBuilder::new()
        .dir("bin", 0o755)
        .file("bin/busybox", 0o755, &std::fs::read(busybox).unwrap())
        .dir("lib", 0o755)
        .file("lib/ld-musl-x86_64.so.1", 0o755, &loader)
        .dir("usr", 0o755)
        .dir("usr/bin", 0o755)
        .file("usr/bin/hello-musl", 0o755, &std::fs::read(&hello).unwrap())
        .dir("etc", 0o755)
        .file("etc/alpine-release", 0o644, b"3.20.0\n")
        .file("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n")
        .file("etc/group", 0o644, b"root:x:0:\n")
        .dir("root", 0o700)
        .file("root/.profile", 0o644, b"export FROM_PROFILE=1\n")
        .dir("tmp", 0o1777);
    for applet in [
        "sh", "ls", "cat", "echo", "uname", "mkdir", "tar", "rm", "sleep", "env", "id", "ps",
        "mount", "grep", "wc", "true", "false", "poweroff", "sync",
    ] {
        b = b.symlink(&format!("bin/{applet}"), "busybox");
    }
    Some(b.build())
}

/// A Debian-style image: Debian's minbase (apt, glibc, bash), no systemd, no sshd — what a
/// `debian:bookworm` container image holds. Cached in /var/tmp between runs.
fn debian_style_layer() -> Option<Vec<u8>> {
    let cached = std::path::Path::new("/var/tmp/banger-test-debian-minbase.tar");
    if !cached.is_file() {
        let tmp = cached.with_extension("tar.part");
        let st = std::process::Command::new("mmdebstrap")
            .args(["--variant=minbase", "--quiet", "--format=tar", "bookworm"])
            .arg(&tmp)
            .arg("http://deb.debian.org/debian")
            .status()
            .unwrap();
        if !st.success() {
            println!("SKIP: Debian-style image: mmdebstrap minbase failed");
            return None;
        }
        std::fs::rename(&tmp, cached).unwrap();
    }
    Some(std::fs::read(cached).unwrap())
}

#[test]
fn real_guest_boots_pulled_oci_images() {
    let reg = match banger_testkit::registry::LocalRegistry::start() {
        Ok(r) => r,
        Err(why) => {
            println!("SKIP: {why}");
            return;
        }
    };
    let Some(mut env) = TestEnv::real("") else {
        return;
    };
    let Some(alpine) = alpine_style_layer(env.root()) else {
        return;
    };
    let Some(debian) = debian_style_layer() else {
        return;
    };
    let cfg = serde_json::json!({
        "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "APP_MODE=oci"],
        "WorkingDir": "/tmp",
        "Cmd": ["/bin/sh"],
    });
    reg.push("test/alpine-style", "1", &[alpine], cfg.clone());
    reg.push("test/debian-style", "bookworm", &[debian], cfg);
    env.start_daemon();

    let alpine_ref = format!("{}/test/alpine-style:1", reg.addr());
    let out = ok(&env, &["image", "pull", "--insecure", &alpine_ref]);
    assert!(out.contains("agent serves ssh"), "{out}");
    let t = Instant::now();
    let o = env.cli(&[
        "vm",
        "run",
        "--rm",
        "--image",
        &alpine_ref,
        "--",
        "sh",
        "-c",
        "cat /etc/alpine-release; hello-musl; echo mode=$APP_MODE; pwd; exit 3",
    ]);
    let so = String::from_utf8_lossy(&o.stdout).to_string();
    assert_eq!(
        o.status.code(),
        Some(3),
        "{}\nlog:\n{}",
        text(&o),
        env.daemon_log()
    );
    assert!(
        so.contains("3.20.0") && so.contains("hello from musl"),
        "{so}"
    );
    assert!(so.contains("mode=oci") && so.contains("/tmp"), "{so}");
    println!("alpine-style vm run: {:.1}s", t.elapsed().as_secs_f64());
    assert_nothing_left(&env, "alpine-style vm run --rm");

    // A kept VM of that image: the agent (PID 1) powers off cleanly on `vm stop` (QEMU's power
    // button), and the work disk keeps what was written.
    ok(
        &env,
        &["vm", "create", "--name", "alp", "--image", &alpine_ref],
    );
    let shown = ok(&env, &["vm", "show", "alp"]);
    assert!(
        shown
            .lines()
            .any(|l| l.starts_with("access:") && l.contains("banger's agent serves ssh")),
        "{shown}"
    );
    ok(
        &env,
        &["vm", "exec", "alp", "--", "sh", "-c", "echo kept > /root/f"],
    );
    let t = Instant::now();
    ok(&env, &["vm", "stop", "alp"]);
    let stop = t.elapsed().as_secs_f64();
    println!("alpine-style vm stop: {stop:.1}s");
    let log = ok(&env, &["vm", "logs", "alp"]);
    assert!(
        stop < 15.0,
        "vm stop took {stop:.1}s (timed out?); console:\n{log}"
    );
    ok(&env, &["vm", "start", "alp"]);
    let got = ok(&env, &["vm", "exec", "alp", "--", "cat", "/root/f"]);
    assert_eq!(got.trim(), "kept");
    ok(&env, &["vm", "rm", "--force", "alp"]);
    assert_nothing_left(&env, "alpine-style vm rm");

    let debian_ref = format!("{}/test/debian-style:bookworm", reg.addr());
    ok(&env, &["image", "pull", "--insecure", &debian_ref]);
    let t = Instant::now();
    let o = env.cli(&[
        "vm",
        "run",
        "--rm",
        "--image",
        &debian_ref,
        "--",
        "bash",
        "-c",
        "cat /etc/debian_version; test ! -e /usr/sbin/sshd && echo no-sshd; echo $APP_MODE",
    ]);
    let so = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        o.status.success(),
        "{}\nlog:\n{}",
        text(&o),
        env.daemon_log()
    );
    assert!(
        so.starts_with("12.") && so.contains("no-sshd") && so.contains("oci"),
        "{so}"
    );
    println!("debian-style vm run: {:.1}s", t.elapsed().as_secs_f64());
    assert_nothing_left(&env, "debian-style vm run --rm");
}
