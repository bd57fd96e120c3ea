//! The privilege split end to end: `bangerd` runs as an unprivileged user the test creates (no
//! capabilities, no supplementary groups), `banger-helper` runs as root and does the bridge,
//! the tap (handing QEMU an open descriptor: `/dev/net/tun` is root-only here) and NAT. A real
//! guest from a pulled OCI image runs a command; nothing leaks.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use banger_testkit::registry::LocalRegistry;
use banger_testkit::{TestEnv, bin, bridge_ports};

const USER: &str = "banger-e2e";

/// The test user's (uid, gid), created on first use.
fn test_user() -> Option<(u32, u32)> {
    let id = |flag: &str| -> Option<u32> {
        let o = Command::new("id").args([flag, USER]).output().ok()?;
        String::from_utf8_lossy(&o.stdout).trim().parse().ok()
    };
    if id("-u").is_none() {
        let st = Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                USER,
            ])
            .status()
            .ok()?;
        if !st.success() {
            return None;
        }
    }
    Some((id("-u")?, id("-g")?))
}

struct Helper(Child);

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn status_field(pid: u32, field: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{field}:"))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_default()
}

#[test]
fn daemon_runs_unprivileged_with_the_root_helper() {
    let reg = match LocalRegistry::start() {
        Ok(r) => r,
        Err(why) => {
            println!("SKIP: {why}");
            return;
        }
    };
    let Some(mut env) = TestEnv::real("") else {
        return;
    };
    if !std::path::Path::new("/bin/busybox").is_file() {
        println!("SKIP: /bin/busybox missing (apt-get install busybox-static)");
        return;
    }
    let Some((uid, gid)) = test_user() else {
        println!("SKIP: cannot create the test user {USER} (useradd)");
        return;
    };
    // The helper's socket sits in the environment; the daemon finds it through the config.
    let sock = env.root().join("helper.sock");
    let mut cfg = std::fs::read_to_string(&env.config).unwrap();
    cfg = format!("helper_socket = \"{}\"\n{cfg}", sock.display());
    std::fs::write(&env.config, cfg).unwrap();
    env.run_as(uid, gid);
    let helper = Helper(
        Command::new(bin("banger-helper"))
            .args(["serve", "--owner", &uid.to_string(), "--socket"])
            .arg(&sock)
            .arg("--config")
            .arg(&env.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(env.root().join("helper.log")).unwrap())
            .spawn()
            .expect("spawn banger-helper"),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    // The socket file appears at bind(), a moment before listen(): wait until it accepts.
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(
            Instant::now() < deadline,
            "the helper did not create its socket"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    env.start_daemon();

    // The daemon really is unprivileged.
    let pid: u32 = std::fs::read_to_string(env.runtime_dir().join("bangerd.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let uids = status_field(pid, "Uid");
    assert!(
        uids.split_whitespace().all(|u| u == uid.to_string()),
        "bangerd uids: {uids}"
    );
    assert_eq!(status_field(pid, "CapEff"), "0000000000000000");

    // A tiny image without sshd or init, pulled by the unprivileged daemon.
    let layer = banger_testkit::layers::LayerBuilder::new()
        .dir("bin", 0o755)
        .file(
            "bin/busybox",
            0o755,
            &std::fs::read("/bin/busybox").unwrap(),
        )
        .symlink("bin/sh", "busybox")
        .symlink("bin/id", "busybox")
        .symlink("bin/cat", "busybox")
        .dir("etc", 0o755)
        .file("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n")
        .file_owned("etc/owned", 0o600, 4242, 4242, b"x")
        .dir("root", 0o700)
        .build();
    reg.push(
        "e2e/tiny",
        "1",
        &[layer],
        serde_json::json!({"Env": ["PATH=/bin"]}),
    );
    let reference = format!("{}/e2e/tiny:1", reg.addr());
    let o = env.cli(&["image", "pull", "--insecure", &reference]);
    assert!(
        o.status.success(),
        "pull as {USER}: {}\nlog:\n{}",
        String::from_utf8_lossy(&o.stderr),
        env.daemon_log()
    );
    let o = env.cli(&[
        "vm", "run", "--rm", "--image", &reference, "--", "sh", "-c",
        "id -u; cat /proc/self/status | grep -c Cap; stat -c %u /etc/owned 2>/dev/null || ls -ln /etc/owned; exit 5",
    ]);
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert_eq!(
        o.status.code(),
        Some(5),
        "vm run as {USER}: {out}\n{}\nlog:\n{}\nhelper log:\n{}",
        String::from_utf8_lossy(&o.stderr),
        env.daemon_log(),
        std::fs::read_to_string(env.root().join("helper.log")).unwrap_or_default()
    );
    assert!(out.starts_with("0\n"), "root in the guest: {out}");
    assert!(
        out.contains("4242"),
        "owners from the layer survive the unprivileged build: {out}"
    );

    // The main job on the default image: the helper runs mmdebstrap into a tarball, the
    // unprivileged daemon flattens it into the image (systemd, sshd) and boots it.
    let t = Instant::now();
    let o = env.cli(&[
        "vm",
        "run",
        "--rm",
        "--",
        "sh",
        "-c",
        "id -u; systemctl is-system-running --wait || true",
    ]);
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        o.status.success() && out.starts_with("0\n"),
        "default image as {USER}: {out}\n{}\nlog:\n{}",
        String::from_utf8_lossy(&o.stderr),
        env.daemon_log()
    );
    println!(
        "unprivileged vm run on the default image (built through the helper): {:.1}s",
        t.elapsed().as_secs_f64()
    );

    // Nothing left: no VM, no tap on the bridge, no leak.
    let leaks = env.request(&banger_protocol::Request::DaemonLeaks).ok();
    assert_eq!(leaks["leaks"].as_array().map(Vec::len), Some(0), "{leaks}");
    let (bridge, _) = env.network().unwrap();
    assert!(bridge_ports(&bridge).is_empty());
    let helper_log = std::fs::read_to_string(env.root().join("helper.log")).unwrap_or_default();
    assert!(
        helper_log.contains("CreateTap") || helper_log.contains("create_tap"),
        "the helper did the tap: {helper_log}"
    );
    env.stop_daemon();
    drop(helper);
}
