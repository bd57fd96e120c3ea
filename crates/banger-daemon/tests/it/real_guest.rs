//! Real guests under QEMU (TCG here, KVM where it works): the whole `vm run` path with the
//! Debian kernel and image banger provisions itself, ssh, exit codes, persistence, isolation,
//! NAT rules, and nothing left behind. Skips (saying why) where the machine cannot boot guests.

use std::process::Output;
use std::time::Instant;

use banger_testkit::{TestEnv, bridge_ports, nft_banger_table};

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

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
    let rules = nft_banger_table();
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
        !nft_banger_table().contains(&format!("banger:{a}")),
        "NAT rules survive stop"
    );
    ok(&env, &["vm", "start", "alpha"]);
    assert!(
        nft_banger_table().contains(&format!("banger:{a}")),
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

    ok(&env, &["vm", "rm", "--force", "alpha", "beta"]);
    let rules = nft_banger_table();
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
