//! One valid request per op, through [`HelperClient`] and the real server: each is accepted and
//! reaches the fake with exactly the arguments sent.

use std::net::Ipv4Addr;
use std::os::unix::fs::MetadataExt;

use banger_config::Ipv4Cidr;
use banger_core::OpId;
use banger_core::ids::VmId;
use banger_helper::{HelperError, HostCall, ServeOptions};
use banger_net::{BridgeName, NetCall, NetOps, TapName};

use crate::common::{Env, FAKE_TAR, VM_ID, s, test_owner};

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_op_reaches_the_fakes_with_its_exact_arguments() {
    let env = Env::start(true, ServeOptions::default()).await;
    let c = env
        .client()
        .with_op_id(OpId::from_client("op-valid").unwrap());
    let br = BridgeName::default();
    let tap = TapName::parse(&format!("bgt{VM_ID}")).unwrap();
    let cidr = Ipv4Cidr::parse("172.30.0.0/24").unwrap();
    let owner = test_owner();

    assert_eq!(c.ping().await.unwrap(), 1);

    // The network ops, through the inherent methods...
    c.ensure_bridge(&br, ip("172.30.0.1"), 24).await.unwrap();
    c.create_tap(&tap, &br, Some(owner)).await.unwrap();
    assert_eq!(c.list_taps().await.unwrap(), std::slice::from_ref(&tap));
    c.ensure_nat(&br, &cidr).await.unwrap();
    c.add_vm_nat(VM_ID, ip("172.30.0.2"), &tap).await.unwrap();
    assert_eq!(c.list_nat_vms().await.unwrap(), [VM_ID]);
    c.forget_neighbor(&br, ip("172.30.0.2")).await.unwrap();
    // ...and through NetOps, as the daemon will use it.
    let net: &dyn NetOps = &c;
    net.remove_vm_nat(VM_ID).await.unwrap();
    net.delete_tap(&tap).await.unwrap();
    net.remove_all(Some(&br)).await.unwrap();
    assert_eq!(
        env.net.calls(),
        [
            NetCall::EnsureBridge {
                bridge: br.clone(),
                gateway: ip("172.30.0.1"),
                prefix: 24
            },
            NetCall::CreateTap {
                tap: tap.clone(),
                bridge: br.clone(),
                owner_uid: Some(owner)
            },
            NetCall::ListTaps,
            NetCall::EnsureNat {
                bridge: br.clone(),
                cidr
            },
            NetCall::AddVmNat {
                vm_id: VM_ID.into(),
                ip: ip("172.30.0.2"),
                tap: tap.clone()
            },
            NetCall::ListNatVms,
            NetCall::ForgetNeighbor {
                bridge: br.clone(),
                ip: ip("172.30.0.2")
            },
            NetCall::RemoveVmNat(VM_ID.into()),
            NetCall::DeleteTap(tap.clone()),
            NetCall::RemoveAll(Some(br.clone())),
        ]
    );

    // OpenTap: the fake hands out /dev/null; it must arrive as a descriptor.
    let fd = c.open_tap(&tap).await.unwrap();
    let st = nix::sys::stat::fstat(&fd).unwrap();
    assert_eq!(
        st.st_rdev,
        std::fs::metadata("/dev/null").unwrap().rdev(),
        "the passed descriptor is the one the helper opened"
    );
    // Through NetOps too (the daemon's view): always Some via the helper.
    let fd2 = NetOps::open_tap(&c, &tap)
        .await
        .unwrap()
        .expect("the helper always hands back the descriptor");
    assert_eq!(nix::sys::stat::fstat(&fd2).unwrap().st_rdev, st.st_rdev);
    assert_eq!(
        env.host.calls(),
        [
            HostCall::OpenTap(tap.clone()),
            HostCall::OpenTap(tap.clone())
        ]
    );

    // Loop and device-mapper ops: exact argv.
    let image = env.state.join("images/base/rootfs.ext4");
    let cow = env.state.join(format!("vms/{VM_ID}/cow"));
    env.host.set_loop(7, &image);
    env.host.set_loop(8, &cow);
    assert_eq!(c.loop_attach(&image, true).await.unwrap(), "/dev/loop7");
    let vm = VmId::parse(VM_ID).unwrap();
    assert_eq!(
        c.dm_snapshot_create(&vm, "/dev/loop7", "/dev/loop8")
            .await
            .unwrap(),
        format!("/dev/mapper/banger-{VM_ID}")
    );
    // The mapping exists on this installation's loops: it may be removed.
    env.host
        .set_dm(&format!("banger-{VM_ID}"), &["loop7", "loop8"]);
    c.dm_remove(&vm).await.unwrap();
    c.loop_detach("/dev/loop7").await.unwrap();
    // Not attached: nothing to do, nothing run.
    c.loop_detach("/dev/loop42").await.unwrap();

    // Debootstrap: the fixed argv into a private scratch dir, then the tar lands in build/.
    let out = env.state.join("build/debian-bookworm.tar");
    let pkgs = vec!["openssh-server".to_string(), "systemd-sysv".to_string()];
    let d = c
        .debootstrap("bookworm", "http://deb.debian.org/debian", &pkgs, &out)
        .await
        .unwrap();
    assert_eq!(d.output, out);
    assert_eq!(d.bytes, FAKE_TAR.len() as u64);
    assert_eq!(std::fs::read(&out).unwrap(), FAKE_TAR);
    let m = std::fs::symlink_metadata(&out).unwrap();
    assert!(m.is_file());
    assert_eq!(m.uid(), owner, "the tar belongs to the owner");
    assert_eq!(m.mode() & 0o777, 0o600);

    let argvs = env.scripted.argvs();
    let strs = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    assert_eq!(argvs.len(), 5, "{argvs:#?}");
    assert_eq!(
        argvs[0],
        strs(&["losetup", "--find", "--show", "--read-only", &s(&image)])
    );
    assert_eq!(
        argvs[1],
        strs(&[
            "dmsetup",
            "create",
            &format!("banger-{VM_ID}"),
            "--table",
            "0 131072 snapshot /dev/loop7 /dev/loop8 P 8"
        ])
    );
    assert_eq!(
        argvs[2],
        strs(&["dmsetup", "remove", &format!("banger-{VM_ID}")])
    );
    assert_eq!(argvs[3], strs(&["losetup", "--detach", "/dev/loop7"]));
    let mm = &argvs[4];
    assert_eq!(
        mm[..8],
        strs(&[
            "mmdebstrap",
            "--variant=minbase",
            "--mode=root",
            "--format=tar",
            "--dpkgopt=path-exclude=/usr/share/doc/*",
            "--dpkgopt=path-exclude=/usr/share/man/*",
            "--dpkgopt=path-exclude=/usr/share/locale/*",
            "--include=openssh-server,systemd-sysv",
        ])
    );
    assert_eq!(mm[8], "bookworm");
    let scratch = std::path::Path::new(&mm[9]);
    assert!(
        scratch.starts_with(env.dir.path().join("scratch")) && scratch.ends_with("rootfs.tar"),
        "{scratch:?}"
    );
    assert!(!scratch.exists(), "the scratch dir is cleaned up");
    assert_eq!(mm[10], "http://deb.debian.org/debian");
    assert_eq!(mm.len(), 11);

    // A second build to the same output is refused: it exists now.
    let e = c
        .debootstrap("bookworm", "http://deb.debian.org/debian", &pkgs, &out)
        .await
        .unwrap_err();
    assert!(matches!(e, HelperError::Forbidden(_)), "{e}");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_swapped_during_losetup_is_detached_again() {
    let env = Env::start(true, ServeOptions::default()).await;
    let image = env.state.join("images/base/rootfs.ext4");
    // The kernel "attached" another file than the one validated.
    env.host.set_loop(7, "/etc/passwd");
    let e = env.client().loop_attach(&image, false).await.unwrap_err();
    assert!(matches!(e, HelperError::Forbidden(_)), "{e}");
    assert!(
        e.to_string()
            .contains("changed while it was being attached"),
        "{e}"
    );
    let argvs = env.scripted.argvs();
    assert_eq!(argvs.len(), 2, "{argvs:?}");
    assert_eq!(argvs[0][..3], ["losetup", "--find", "--show"]);
    assert_eq!(argvs[1], ["losetup", "--detach", "/dev/loop7"]);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_come_back_as_failed_with_the_reason() {
    let env = Env::start(true, ServeOptions::default()).await;
    let c = env.client();
    let br = BridgeName::default();
    env.net.fail_on(Some("ensure_bridge"));
    let e = c
        .ensure_bridge(&br, ip("172.30.0.1"), 24)
        .await
        .unwrap_err();
    assert!(matches!(e, HelperError::Failed(_)), "{e}");
    assert!(e.to_string().contains("injected failure"), "{e}");
    // The NetOps view keeps the helper's code and message.
    let n = NetOps::ensure_bridge(&c, &br, ip("172.30.0.1"), 24)
        .await
        .unwrap_err();
    assert!(n.to_string().contains("banger-helper EnsureBridge"), "{n}");
    assert!(n.to_string().contains("injected failure"), "{n}");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_carry_several_requests_up_to_a_limit() {
    use std::io::{BufRead, BufReader, Write};
    let opts = ServeOptions {
        max_requests_per_connection: 3,
        ..ServeOptions::default()
    };
    let env = Env::start(true, opts).await;
    let mut st = std::os::unix::net::UnixStream::connect(&env.socket).unwrap();
    let mut rd = BufReader::new(st.try_clone().unwrap());
    let ping = b"{\"v\":1,\"op_id\":\"op-a\",\"request\":{\"op\":\"Ping\"}}\n";
    // Pipelined: all four lines at once.
    st.write_all(&ping.repeat(4)).unwrap();
    let mut lines = Vec::new();
    for _ in 0..4 {
        let mut l = String::new();
        rd.read_line(&mut l).unwrap();
        lines.push(l);
    }
    for l in &lines[..3] {
        assert_eq!(l, "{\"ok\":{\"version\":1}}\n");
    }
    assert!(lines[3].contains("more than 3 requests"), "{}", lines[3]);
    let mut rest = String::new();
    assert_eq!(
        rd.read_line(&mut rest).unwrap(),
        0,
        "closed after the limit"
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_clients_are_served_within_the_connection_limit() {
    let opts = ServeOptions {
        max_connections: 4,
        ..ServeOptions::default()
    };
    let env = Env::start(true, opts).await;
    let mut tasks = Vec::new();
    for _ in 0..40 {
        let c = env.client();
        tasks.push(tokio::spawn(async move { c.ping().await }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), 1);
    }
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_socket_is_the_owners_and_a_stale_one_is_replaced() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::start(true, ServeOptions::default()).await;
    let m = std::fs::symlink_metadata(&env.socket).unwrap();
    assert_eq!(m.uid(), test_owner());
    // The test env binds 0666 to reach the uid check; production uses 0600.
    assert_eq!(m.permissions().mode() & 0o777, 0o666);

    // A regular file where the socket should go is never replaced.
    let d = env.dir.path().join("sock2");
    std::fs::create_dir(&d).unwrap();
    std::fs::write(d.join("helper.sock"), b"precious").unwrap();
    let e = banger_helper::bind(&d.join("helper.sock"), &env.cfg, 0o600).unwrap_err();
    assert!(e.to_string().contains("not a stale socket"), "{e}");
    assert_eq!(std::fs::read(d.join("helper.sock")).unwrap(), b"precious");
    // Nor is a symlink followed.
    std::os::unix::fs::symlink("/etc/passwd", d.join("l.sock")).unwrap();
    let e = banger_helper::bind(&d.join("l.sock"), &env.cfg, 0o600).unwrap_err();
    assert!(e.to_string().contains("symlink"), "{e}");
    // A socket directory reached through a symlink is refused.
    std::os::unix::fs::symlink(&d, env.dir.path().join("sock3")).unwrap();
    let e = banger_helper::bind(&env.dir.path().join("sock3/x.sock"), &env.cfg, 0o600).unwrap_err();
    assert!(e.to_string().contains("symlink"), "{e}");
    // A stale socket is replaced; production mode is 0600.
    let stale = d.join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let l = banger_helper::bind(&stale, &env.cfg, banger_helper::DEFAULT_SOCKET_MODE).unwrap();
    let m = std::fs::symlink_metadata(&stale).unwrap();
    assert_eq!(m.permissions().mode() & 0o777, 0o600);
    assert_eq!(m.uid(), test_owner());
    drop(l);
    // A missing runtime dir is created for the owner, 0700.
    std::fs::remove_dir(&env.run).unwrap();
    let l = banger_helper::bind(&env.run.join("helper.sock"), &env.cfg, 0o600).unwrap();
    let m = std::fs::metadata(&env.run).unwrap();
    assert_eq!(
        (m.uid(), m.permissions().mode() & 0o777),
        (test_owner(), 0o700)
    );
    drop(l);
    env.stop().await;
}
