//! `<name>.vm`: the daemon's DNS responder follows the VMs, its ssh config lists them, a taken
//! port is a warning rather than a failed start, and `banger ssh-config --install/--uninstall`
//! edits `~/.ssh/config` reversibly. The last test boots a real guest and uses plain `ssh`.

use std::net::{Ipv4Addr, UdpSocket};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use banger_dns::wire::{self, rcode};
use banger_protocol::{DaemonStatus, Request, VmCreateParams, VmDeleteParams, VmStopParams};
use banger_testkit::{TestEnv, have_program};

/// A UDP port that is free right now on 127.0.0.1.
fn free_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A fake-VMM environment whose responder uses `port`. `TestEnv::new` appends its extra text
/// after the `[vm_defaults]` table, so the top-level key goes first in the file instead.
fn env_with_dns_port(port: u16) -> TestEnv {
    let env = TestEnv::new("");
    let text = std::fs::read_to_string(&env.config).unwrap();
    std::fs::write(&env.config, format!("dns_port = {port}\n{text}")).unwrap();
    env
}

/// Asks 127.0.0.1:`port` for `name`'s A record with a plain blocking UDP socket.
fn query(port: u16, name: &str) -> wire::Reply {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    sock.connect(("127.0.0.1", port)).unwrap();
    let id = 0x4242;
    sock.send(&wire::build_query(id, name, wire::rtype::A, false))
        .unwrap();
    let mut buf = [0u8; 1500];
    let n = sock
        .recv(&mut buf)
        .unwrap_or_else(|e| panic!("no DNS answer from port {port}: {e}"));
    let reply = wire::parse_reply(&buf[..n]).expect("a DNS response");
    assert_eq!(reply.id, id);
    reply
}

/// `dig +short` output, or `None` when dig is not installed.
fn dig(port: u16, name: &str) -> Option<String> {
    if !have_program("dig") {
        return None;
    }
    let o = Command::new("dig")
        .args([
            "@127.0.0.1",
            "-p",
            &port.to_string(),
            name,
            "+short",
            "+tries=1",
            "+time=2",
        ])
        .output()
        .expect("run dig");
    assert!(
        o.status.success(),
        "dig: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    Some(String::from_utf8_lossy(&o.stdout).trim().to_string())
}

/// Polls until `check` holds (the names follow the store through a background task).
fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn status(env: &TestEnv) -> DaemonStatus {
    serde_json::from_value(env.request(&Request::DaemonStatus).ok()).unwrap()
}

use crate::output::text;

fn ok(env: &TestEnv, args: &[&str]) -> String {
    let o = env.cli(args);
    assert!(o.status.success(), "banger {args:?} failed:\n{}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn names_follow_the_vms_and_the_ssh_config_lists_them() {
    let port = free_port();
    let mut env = env_with_dns_port(port);
    env.start_daemon();
    env.seed_artifacts();

    let s = status(&env);
    let dns = s.dns.expect("dns status");
    assert_eq!(dns.listen, Some(([127, 0, 0, 1], port).into()), "{dns:?}");
    assert!(dns.error.is_none(), "{dns:?}");
    assert!(dns.recipe.contains(&port.to_string()), "{dns:?}");
    let ssh_config = s.ssh_config.expect("ssh_config path");
    assert_eq!(ssh_config, env.state_dir().join("ssh/ssh_config"));

    assert_eq!(query(port, "alpha.vm").rcode, rcode::NXDOMAIN);
    env.request(&Request::VmCreate(VmCreateParams {
        name: Some("alpha".into()),
        ..Default::default()
    }))
    .ok();
    let want = Ipv4Addr::new(172, 30, 0, 2);
    eventually("alpha.vm resolves", || {
        query(port, "alpha.vm").addrs == [want]
    });
    let r = query(port, "ALPHA.VM");
    assert_eq!((r.rcode, r.authoritative), (rcode::NOERROR, true));
    assert_eq!(r.addrs, [want], "case-insensitive");
    assert_eq!(query(port, "beta.vm").rcode, rcode::NXDOMAIN);
    assert_eq!(query(port, "example.com").rcode, rcode::REFUSED);
    match dig(port, "alpha.vm") {
        Some(out) => assert_eq!(out, "172.30.0.2"),
        None => println!("SKIP dig part: dig is not installed (apt-get install dnsutils)"),
    }

    let config = std::fs::read_to_string(&ssh_config).unwrap();
    let key = env.state_dir().join("ssh/id_ed25519");
    let known = env.state_dir().join("ssh/known_hosts");
    let block = format!(
        "Host alpha.vm\n    HostName 172.30.0.2\n    User root\n    IdentityFile {}\n    IdentitiesOnly yes\n    UserKnownHostsFile {}\n    StrictHostKeyChecking yes\n",
        key.display(),
        known.display()
    );
    assert!(config.contains(&block), "{config}");
    // banger ssh-config prints the path and the content.
    let shown = ok(&env, &["ssh-config"]);
    assert!(
        shown.starts_with(&format!("# {}\n", ssh_config.display())),
        "{shown}"
    );
    assert!(shown.contains(&block), "{shown}");
    let human = ok(&env, &["daemon", "status"]);
    assert!(human.contains(&format!("127.0.0.1:{port}")), "{human}");

    // Stopped: NXDOMAIN (the address stays the VM's, so its ssh block stays too).
    env.request(&Request::VmStop(VmStopParams {
        vm: "alpha".into(),
        timeout_secs: Some(2),
    }))
    .ok();
    eventually("alpha.vm is gone after stop", || {
        query(port, "alpha.vm").rcode == rcode::NXDOMAIN
    });
    if let Some(out) = dig(port, "alpha.vm") {
        assert_eq!(out, "", "dig +short prints nothing for NXDOMAIN");
    }
    assert!(
        std::fs::read_to_string(&ssh_config)
            .unwrap()
            .contains("Host alpha.vm\n")
    );

    // Deleted: gone from the ssh config as well.
    env.request(&Request::VmDelete(VmDeleteParams {
        vm: "alpha".into(),
        force: false,
    }))
    .ok();
    eventually("alpha leaves the ssh config", || {
        !std::fs::read_to_string(&ssh_config)
            .unwrap()
            .contains("alpha")
    });

    // A restarted daemon binds the port again (bug 16) and serves re-adopted VMs.
    env.request(&Request::VmCreate(VmCreateParams {
        name: Some("beta".into()),
        ..Default::default()
    }))
    .ok();
    eventually("beta.vm resolves", || {
        !query(port, "beta.vm").addrs.is_empty()
    });
    env.stop_daemon();
    env.start_daemon();
    assert!(status(&env).dns.unwrap().listen.is_some());
    eventually("beta.vm resolves after a daemon restart", || {
        !query(port, "beta.vm").addrs.is_empty()
    });
    env.request(&Request::VmDelete(VmDeleteParams {
        vm: "beta".into(),
        force: true,
    }))
    .ok();
    env.stop_daemon();
}

#[test]
fn a_taken_port_is_a_warning_not_a_failed_start() {
    let taken = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let mut env = env_with_dns_port(port);
    env.start_daemon();
    env.seed_artifacts();
    let dns = status(&env).dns.unwrap();
    assert_eq!(dns.listen, None);
    let error = dns.error.expect("an error");
    assert!(
        error.contains(&format!("127.0.0.1:{port}")) && error.contains("in use"),
        "{error}"
    );
    assert!(env.daemon_log().contains("dns responder not started"));
    let human = ok(&env, &["daemon", "status"]);
    assert!(human.contains("off: "), "{human}");
    // Everything else works; the ssh config is still written.
    ok(&env, &["vm", "create", "--name", "nodns"]);
    let path = env.state_dir().join("ssh/ssh_config");
    eventually("the ssh config lists nodns", || {
        std::fs::read_to_string(&path).is_ok_and(|t| t.contains("Host nodns.vm\n"))
    });
    ok(&env, &["vm", "rm", "--force", "nodns"]);
    env.stop_daemon();
}

#[test]
fn ssh_config_install_and_uninstall_through_the_cli() {
    let mut env = env_with_dns_port(free_port());
    env.start_daemon();
    let ssh = env.home().join(".ssh");
    let config = ssh.join("config");
    let include = env.state_dir().join("ssh/ssh_config");

    // No ~/.ssh yet: install creates it; uninstall removes the file it created, not the dir.
    let out = ok(&env, &["ssh-config", "--install"]);
    assert!(out.contains("added"), "{out}");
    let created = std::fs::read_to_string(&config).unwrap();
    assert!(created.starts_with("# >>> banger >>>\n"), "{created}");
    assert!(
        created.contains(&format!("\nInclude {}\n", include.display())),
        "{created}"
    );
    let out = ok(&env, &["ssh-config", "--install"]);
    assert!(out.contains("already"), "{out}");
    assert_eq!(
        std::fs::read_to_string(&config).unwrap(),
        created,
        "install is idempotent"
    );
    ok(&env, &["ssh-config", "--uninstall"]);
    assert!(!config.exists());
    assert!(ssh.is_dir());

    // A user's config and keys (bug 15): byte-identical afterwards, keys untouched.
    let mine = "Host *\n    ServerAliveInterval 30\n\nHost work\n    User me\n";
    std::fs::write(&config, mine).unwrap();
    std::fs::write(ssh.join("id_ed25519"), "PRIVATE").unwrap();
    std::fs::write(ssh.join("known_hosts"), "host key").unwrap();
    ok(&env, &["ssh-config", "--install"]);
    let installed = std::fs::read_to_string(&config).unwrap();
    assert!(installed.starts_with("# >>> banger >>>\n") && installed.ends_with(mine));
    ok(&env, &["ssh-config", "--install"]);
    assert_eq!(std::fs::read_to_string(&config).unwrap(), installed);
    let out = ok(&env, &["ssh-config", "--uninstall"]);
    assert!(out.contains("removed"), "{out}");
    assert_eq!(std::fs::read(&config).unwrap(), mine.as_bytes());
    let out = ok(&env, &["ssh-config", "--uninstall"]);
    assert!(out.contains("nothing to remove"), "{out}");
    assert_eq!(std::fs::read(&config).unwrap(), mine.as_bytes());
    assert_eq!(
        std::fs::read_to_string(ssh.join("id_ed25519")).unwrap(),
        "PRIVATE"
    );
    assert_eq!(
        std::fs::read_to_string(ssh.join("known_hosts")).unwrap(),
        "host key"
    );
    let mut names: Vec<String> = std::fs::read_dir(&ssh)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["config", "id_ed25519", "known_hosts"]);

    // --install and --uninstall together are a usage error.
    let o = env.cli(&["ssh-config", "--install", "--uninstall"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    env.stop_daemon();
}

/// Plain `ssh NAME.vm` against a real guest, through `~/.ssh/config`'s Include. ssh reads the
/// config of the passwd home, not `$HOME`, so the test passes the env's `~/.ssh/config` with
/// `-F` (exactly the file the user's ssh would read).
#[test]
fn real_guest_plain_ssh_by_name() {
    let port = free_port();
    let Some(mut env) = TestEnv::real(&format!("dns_port = {port}\n")) else {
        return;
    };
    env.start_daemon();
    let ssh_dir = env.home().join(".ssh");
    std::fs::create_dir_all(&ssh_dir).unwrap();
    let config = ssh_dir.join("config");
    let mine = "Host elsewhere\n    User nobody\n";
    std::fs::write(&config, mine).unwrap();

    ok(&env, &["vm", "create", "--name", "dnsbox"]);
    ok(&env, &["ssh-config", "--install"]);
    let ssh = |host: &str| -> Output {
        Command::new("ssh")
            .arg("-F")
            .arg(&config)
            .args([
                "-o",
                "BatchMode=yes",
                "-o",
                "ConnectTimeout=20",
                host,
                "true",
            ])
            .env("HOME", env.home())
            .output()
            .expect("run ssh")
    };
    let o = ssh("dnsbox.vm");
    assert!(
        o.status.success(),
        "ssh dnsbox.vm true:\n{}\nconfig:\n{}",
        text(&o),
        std::fs::read_to_string(env.state_dir().join("ssh/ssh_config")).unwrap_or_default()
    );
    // The responder agrees on the address ssh used.
    let r = query(port, "dnsbox.vm");
    assert_eq!(r.addrs.len(), 1, "{r:?}");
    assert!(
        std::fs::read_to_string(env.state_dir().join("ssh/ssh_config"))
            .unwrap()
            .contains(&format!("HostName {}\n", r.addrs[0]))
    );

    ok(&env, &["ssh-config", "--uninstall"]);
    assert_eq!(std::fs::read(&config).unwrap(), mine.as_bytes());
    // Without the Include, the name means nothing to ssh any more.
    assert!(!ssh("dnsbox.vm").status.success());
    ok(&env, &["vm", "rm", "--force", "dnsbox"]);
    env.stop_daemon();
}
