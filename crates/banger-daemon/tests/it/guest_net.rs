//! Issue 10 item 2 with real guests: a guest reaches nothing on the host — not a listener on
//! 0.0.0.0, not one on the bridge address, not the host's other addresses — with or without
//! `--nat`, and not another guest either; the host still reaches the guests over ssh, and other
//! local users do not.
//! (That a `--nat` guest still reaches the outside is shown without leaving the machine by
//! banger-net's `traffic::guests_reach_nothing_on_the_host`; here it is checked in the rule set.)

use std::net::{Ipv4Addr, TcpListener};
use std::process::Command;

use banger_testkit::{TestEnv, nft_banger_table};

use crate::output::text;

fn ok(env: &TestEnv, args: &[&str]) -> String {
    let o = env.cli(args);
    assert!(o.status.success(), "banger {args:?} failed:\n{}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Whether guest `vm` can open a TCP connection to `ip:port` within 6 s (bash's `/dev/tcp`:
/// the default image has bash but no netcat).
fn guest_connects(env: &TestEnv, vm: &str, ip: &str, port: u16) -> bool {
    let script = format!("timeout 6 bash -c 'exec 3<>/dev/tcp/{ip}/{port}'");
    let o = env.cli(&["vm", "exec", vm, "--", "sh", "-c", &script]);
    match o.status.code() {
        Some(0) => true,
        // bash's "connection refused/timed out" (1) or timeout's 124.
        Some(1) | Some(124) => false,
        _ => panic!("probe from {vm} to {ip}:{port} did not run:\n{}", text(&o)),
    }
}

/// An IPv4 address of this host on an interface other than `lo` and `bridge`, if any.
fn other_host_address(bridge: &str) -> Option<Ipv4Addr> {
    let out = Command::new("ip")
        .args(["-j", "-4", "addr", "show"])
        .output()
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v.as_array()?
        .iter()
        .filter(|l| l["ifname"] != "lo" && l["ifname"] != bridge)
        .filter_map(|l| l["addr_info"].as_array())
        .flatten()
        .filter_map(|a| a["local"].as_str()?.parse().ok())
        .find(|ip: &Ipv4Addr| !ip.is_loopback())
}

/// Nothing connected to `l` (it is non-blocking).
fn never_accepted(l: &TcpListener, what: &str) {
    match l.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        Ok((_, peer)) => panic!("{what}: the host accepted a connection from {peer}"),
        Err(e) => panic!("{what}: accept: {e}"),
    }
}

#[test]
fn guests_reach_nothing_on_the_host() {
    let Some(mut env) = TestEnv::real("") else {
        return;
    };
    env.start_daemon();
    let (bridge, cidr) = env.network().expect("a real environment");
    let gateway = cidr.replace(".0/24", ".1");

    // Both guests start (and so the bridge exists) before the listeners bind to it.
    ok(&env, &["vm", "create", "--name", "plain"]);
    ok(&env, &["vm", "create", "--name", "natted", "--nat"]);
    let show: serde_json::Value =
        serde_json::from_str(&ok(&env, &["vm", "show", "natted", "--json"])).unwrap();
    let natted_ip = show["ip"]
        .as_str()
        .expect("natted has an address")
        .to_string();

    let any = TcpListener::bind("0.0.0.0:0").unwrap();
    let any_port = any.local_addr().unwrap().port();
    let on_bridge = TcpListener::bind((gateway.as_str(), 0)).unwrap();
    let bridge_port = on_bridge.local_addr().unwrap().port();
    any.set_nonblocking(true).unwrap();
    on_bridge.set_nonblocking(true).unwrap();
    let other = other_host_address(&bridge);

    for vm in ["plain", "natted"] {
        // The probe itself works: the guest reaches its own sshd.
        assert!(
            guest_connects(&env, vm, "127.0.0.1", 22),
            "{vm}: the probe cannot even reach the guest's own sshd"
        );
        assert!(
            !guest_connects(&env, vm, &gateway, any_port),
            "{vm} reached the host's 0.0.0.0 listener through the bridge address {gateway}"
        );
        assert!(
            !guest_connects(&env, vm, &gateway, bridge_port),
            "{vm} reached the host's listener on the bridge address {gateway}"
        );
        if let Some(ip) = other {
            assert!(
                !guest_connects(&env, vm, &ip.to_string(), any_port),
                "{vm} reached the host's 0.0.0.0 listener through the host's address {ip}"
            );
        }
    }
    never_accepted(&any, "0.0.0.0 listener");
    never_accepted(&on_bridge, "bridge-address listener");
    if other.is_none() {
        println!("note: this host has no address besides lo and the bridge; that case untested");
    }

    // Guests are isolated from each other too (sshd listens in every guest).
    assert!(
        !guest_connects(&env, "plain", &natted_ip, 22),
        "plain reached natted's sshd at {natted_ip}"
    );

    // The rule set: the host's input from the bridge is closed but for replies, and natted's
    // outbound rules exist.
    let rules = nft_banger_table(&bridge);
    assert!(
        rules.contains(&format!("iifname \"{bridge}\" drop")),
        "no input drop for {bridge}:\n{rules}"
    );
    let id: serde_json::Value = show["id"].clone();
    assert!(
        rules.contains(&format!("banger:{}", id.as_str().unwrap())),
        "natted's NAT rules missing:\n{rules}"
    );

    // Another local user cannot open a connection into a guest; root (the owner here) can.
    let host_connects_as = |uid: u32| {
        Command::new("setpriv")
            .args([
                &format!("--reuid={uid}"),
                &format!("--regid={uid}"),
                "--clear-groups",
                "timeout",
                "6",
                "bash",
                "-c",
                &format!("exec 3<>/dev/tcp/{natted_ip}/22"),
            ])
            .status()
            .expect("setpriv")
            .success()
    };
    assert!(
        !host_connects_as(65534),
        "another local user reached natted's sshd"
    );
    assert!(host_connects_as(0), "root cannot reach natted's sshd");

    // The host still reaches both guests over ssh (banger's own path in).
    for vm in ["plain", "natted"] {
        assert_eq!(ok(&env, &["vm", "exec", vm, "--", "echo", "hi"]), "hi\n");
    }

    ok(&env, &["vm", "rm", "--force", "plain", "natted"]);
    env.stop_daemon();
}
