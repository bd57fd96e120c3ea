//! NAT end to end, with no traffic leaving the machine: three namespaces stand in for a VM,
//! the host and the outside world. The outside even has a route back to the VM network, so
//! only banger's forward rules keep a VM without NAT in, and the peer address the outside
//! sees tells whether the host masqueraded.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::Duration;

use banger_config::Ipv4Cidr;
use banger_net::{BridgeName, NetOps, TapName};

use crate::common::{NetNs, ip};
use crate::skip_unless_capable;

/// Runs `f` on a fresh thread that has joined namespace `ns` (setns is per thread).
fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let file = File::open(format!("/run/netns/{ns}")).unwrap();
    std::thread::spawn(move || {
        // SAFETY: a valid namespace fd; setns only changes this thread's namespace.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .unwrap()
}

/// Connects from `vm_ns` to `server`; returns the peer address the server saw, or None.
fn probe(vm_ns: &str, listener: &TcpListener, server: SocketAddr) -> Option<Ipv4Addr> {
    let connected = in_ns(vm_ns, move || {
        TcpStream::connect_timeout(&server, Duration::from_millis(700))
            .and_then(|mut s| s.write_all(b"x"))
            .is_ok()
    });
    if !connected {
        return None;
    }
    let (mut s, peer) = listener.accept().unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).unwrap();
    match peer {
        SocketAddr::V4(v4) => Some(*v4.ip()),
        SocketAddr::V6(_) => None,
    }
}

/// The three namespaces wired up: the host's bridge (with banger's firewall) and NAT table,
/// the "VM" at 172.30.0.5 on a bridge port, and the "outside" at 10.99.0.2 behind the host's
/// uplink 10.99.0.1, routing the VM network back to the host.
struct Topology {
    host: NetNs,
    vm: NetNs,
    world: NetNs,
}

async fn topology() -> Topology {
    let host = NetNs::new("host");
    let vm = NetNs::new("vm");
    let world = NetNs::new("world");
    let ops = host.ops();
    let br = BridgeName::default();
    ops.ensure_bridge(&br, ip("172.30.0.1"), 24).await.unwrap();
    ops.ensure_nat(&br, &Ipv4Cidr::parse("172.30.0.0/24").unwrap())
        .await
        .unwrap();

    // The "VM": a veth whose host end is a bridge port, as a tap would be.
    host.ok(&[
        "ip", "link", "add", "bgvmport", "type", "veth", "peer", "name", "eth0", "netns", &vm.name,
    ]);
    host.ok(&["ip", "link", "set", "bgvmport", "master", "br-banger", "up"]);
    vm.ok(&["ip", "addr", "add", "172.30.0.5/24", "dev", "eth0"]);
    vm.ok(&["ip", "link", "set", "eth0", "up"]);
    vm.ok(&["ip", "link", "set", "lo", "up"]);
    vm.ok(&["ip", "route", "add", "default", "via", "172.30.0.1"]);

    host.ok(&[
        "ip",
        "link",
        "add",
        "uplink",
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        &world.name,
    ]);
    host.ok(&["ip", "addr", "add", "10.99.0.1/24", "dev", "uplink"]);
    host.ok(&["ip", "link", "set", "uplink", "up"]);
    world.ok(&["ip", "addr", "add", "10.99.0.2/24", "dev", "eth0"]);
    world.ok(&["ip", "link", "set", "eth0", "up"]);
    world.ok(&["ip", "route", "add", "172.30.0.0/24", "via", "10.99.0.1"]);
    Topology { host, vm, world }
}

#[tokio::test]
async fn masquerade_works_only_for_nat_vms() {
    skip_unless_capable!(true);
    let Topology { host, vm, world } = topology().await;
    let ops = host.ops();

    let listener = in_ns(&world.name, || TcpListener::bind("10.99.0.2:0").unwrap());
    let server = listener.local_addr().unwrap();

    // Without --nat the VM stays on the host.
    assert_eq!(probe(&vm.name, &listener, server), None);

    let id = "0123456789ab";
    ops.add_vm_nat(id, ip("172.30.0.5"), &TapName::pool(0))
        .await
        .unwrap();
    assert_eq!(
        probe(&vm.name, &listener, server),
        Some(ip("10.99.0.1")),
        "the outside must see the host's address"
    );

    ops.remove_vm_nat(id).await.unwrap();
    assert_eq!(probe(&vm.name, &listener, server), None);
}

/// Issue 10 item 2 at the packet level: host services on 0.0.0.0, on the gateway address and
/// on the host's other address are closed to the VM with and without NAT, while the host can
/// still connect to the VM (ssh) and a NAT VM still reaches the outside. IPv6 is off on the
/// bridge, so no link-local address offers another way in.
#[tokio::test]
async fn guests_reach_nothing_on_the_host() {
    skip_unless_capable!(true);
    let Topology { host, vm, world } = topology().await;
    let ops = host.ops();
    assert_eq!(
        host.ok(&["cat", "/proc/sys/net/ipv6/conf/br-banger/disable_ipv6"])
            .trim(),
        "1"
    );

    let any = in_ns(&host.name, || TcpListener::bind("0.0.0.0:0").unwrap());
    let port = any.local_addr().unwrap().port();
    let gw = in_ns(&host.name, || TcpListener::bind("172.30.0.1:0").unwrap());
    let gw_addr = gw.local_addr().unwrap();
    let outside = in_ns(&world.name, || TcpListener::bind("10.99.0.2:0").unwrap());
    let outside_addr = outside.local_addr().unwrap();
    let closed = |nat: &str| {
        for target in [
            SocketAddr::from((ip("172.30.0.1"), port)),
            SocketAddr::from((ip("10.99.0.1"), port)),
        ] {
            assert_eq!(
                probe(&vm.name, &any, target),
                None,
                "{nat}: the VM reached the host's 0.0.0.0 listener at {target}"
            );
        }
        assert_eq!(
            probe(&vm.name, &gw, gw_addr),
            None,
            "{nat}: the VM reached the host's listener on the gateway address"
        );
    };
    closed("without NAT");

    let id = "0123456789ab";
    ops.add_vm_nat(id, ip("172.30.0.5"), &TapName::pool(0))
        .await
        .unwrap();
    closed("with NAT");
    assert_eq!(
        probe(&vm.name, &outside, outside_addr),
        Some(ip("10.99.0.1")),
        "a NAT VM still reaches the outside"
    );

    // Another local user cannot open a connection into the VM network (the ops here have no
    // owner, so only root may); the guest's port is open, as root sees below.
    let guest = in_ns(&vm.name, || TcpListener::bind("0.0.0.0:0").unwrap());
    let guest_port = guest.local_addr().unwrap().port();
    let probe_as = |uid: &str| {
        host.run(&[
            "setpriv",
            &format!("--reuid={uid}"),
            &format!("--regid={uid}"),
            "--clear-groups",
            "timeout",
            "3",
            "bash",
            "-c",
            &format!("exec 3<>/dev/tcp/172.30.0.5/{guest_port}"),
        ])
        .0
    };
    assert!(
        !probe_as("65534"),
        "another local user reached the guest's port"
    );
    assert!(probe_as("0"), "root reaches the guest's port");
    drop(guest.accept().unwrap());

    // The host still connects into the VM (banger's ssh) and hears the answer.
    let reply = std::thread::spawn(move || {
        let (mut s, _) = guest.accept().unwrap();
        s.write_all(b"SSH-2.0-guest\r\n").unwrap();
    });
    let greeting = in_ns(&host.name, move || {
        let mut s = TcpStream::connect_timeout(
            &SocketAddr::from((ip("172.30.0.5"), guest_port)),
            Duration::from_secs(2),
        )
        .expect("host to guest");
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut b = [0u8; 7];
        s.read_exact(&mut b).map(|_| b)
    });
    reply.join().unwrap();
    assert_eq!(&greeting.expect("the guest's answer"), b"SSH-2.0");
}
