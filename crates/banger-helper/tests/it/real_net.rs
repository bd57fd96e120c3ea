//! The helper with the real `RealNetOps` and the real kernel, as root: a test-only bridge and
//! tap on the host, opened through `OpenTap` and checked with `TUNGETIFF`, then removed.

use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::Arc;

use banger_config::Ipv4Cidr;
use banger_helper::host::{TAP_FLAGS, tun_get_iff};
use banger_helper::{Helper, HelperConfig, HelperError, RealHost, ServeOptions};
use banger_net::{BridgeName, NetOps, RealNetOps, TapName};
use banger_sys::{CommandRunner, RealRunner};

use crate::common::is_root;

/// Deletes the test's interfaces however the test ends.
struct Cleanup(Vec<String>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for name in &self.0 {
            if Path::new("/sys/class/net").join(name).exists() {
                let _ = std::process::Command::new("ip")
                    .args(["link", "del", "dev", name])
                    .status();
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_bridge_tap_and_open_tap_as_root() {
    if !is_root() {
        println!("SKIP: not root");
        return;
    }
    if banger_sys::find_in_path("ip").is_none() || !Path::new("/dev/net/tun").exists() {
        println!("SKIP: needs iproute2 and /dev/net/tun");
        return;
    }
    let pid = std::process::id();
    let bridge = BridgeName::parse(&format!("br-banger-h{}", pid % 100)).unwrap();
    let tap = TapName::parse(&format!("bgth{pid}")).unwrap();
    let _cleanup = Cleanup(vec![tap.to_string(), bridge.to_string()]);

    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let run = dir.path().join("run");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::create_dir_all(&run).unwrap();
    let owner = 4242;
    let cfg = HelperConfig {
        owner_uid: owner,
        state_dir: state,
        runtime_dir: run,
        bridge_name: bridge.clone(),
        bridge_cidr: Ipv4Cidr::parse("172.31.250.0/24").unwrap(),
    };
    cfg.check().unwrap();
    let runner: Arc<dyn CommandRunner> = Arc::new(RealRunner);
    let helper = Helper::new(
        cfg.clone(),
        Arc::new(
            RealNetOps::new(runner.clone())
                .for_bridge(&bridge)
                .with_tap_owner(owner),
        ),
        runner,
        Arc::new(RealHost::default()),
    );
    let socket = dir.path().join("helper.sock");
    let listener = banger_helper::bind(&socket, &cfg, 0o600).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(banger_helper::serve(
        listener,
        Arc::new(helper),
        ServeOptions::default(),
        async move {
            let _ = stopped.await;
        },
    ));
    let c = banger_helper::HelperClient::new(&socket);

    let gw: Ipv4Addr = "172.31.250.1".parse().unwrap();
    c.ensure_bridge(&bridge, gw, 24).await.unwrap();
    c.create_tap(&tap, &bridge, Some(owner)).await.unwrap();
    let class = Path::new("/sys/class/net").join(tap.as_str());
    assert_eq!(
        std::fs::read_to_string(class.join("owner")).unwrap().trim(),
        owner.to_string()
    );

    let fd = c.open_tap(&tap).await.unwrap();
    let (name, flags) = tun_get_iff(&fd).expect("the passed fd is a tun/tap descriptor");
    assert_eq!(name, tap.as_str());
    assert_eq!(flags & TAP_FLAGS, TAP_FLAGS, "flags {flags:#x}");
    assert_ne!(
        flags & libc::IFF_PERSIST,
        0,
        "the existing persistent tap, not a new one"
    );
    // Single queue: a second VMM cannot attach while the first holds it.
    let e = c.open_tap(&tap).await.unwrap_err();
    assert!(matches!(e, HelperError::Failed(_)), "{e}");
    drop(fd);
    // Free again once the first holder is gone. Other tests in this process fork, and a child
    // holds copies of our descriptors until it execs or exits, so allow it a moment.
    let mut again = c.open_tap(&tap).await;
    for _ in 0..50 {
        if again.is_ok() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        again = c.open_tap(&tap).await;
    }
    drop(again.expect("the tap can be opened again"));

    // A tap that does not exist is not created by opening it.
    let ghost = TapName::parse(&format!("bgtg{pid}")).unwrap();
    let e = c.open_tap(&ghost).await.unwrap_err();
    assert!(e.to_string().contains("does not exist"), "{e}");
    assert!(!Path::new("/sys/class/net").join(ghost.as_str()).exists());

    c.delete_tap(&tap).await.unwrap();
    assert!(!class.exists(), "the tap is gone");
    // DeleteTap of a missing tap is fine.
    c.delete_tap(&tap).await.unwrap();

    let _ = stop.send(());
    server.await.unwrap();
    println!("real bridge {bridge}, tap {tap}: created, opened via SCM_RIGHTS, deleted");
}

/// Whether interface `name` exists, and the bridge it is a port of.
fn master_of(name: &str) -> Option<Option<String>> {
    let class = Path::new("/sys/class/net").join(name);
    class.exists().then(|| {
        std::fs::read_link(class.join("master"))
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
    })
}

/// Issue 10 item 5: two installations on one host, each with its bridge. The helper of one
/// (its `Helper::real`, as `banger-helper serve` builds it) lists, deletes and uninstalls only
/// its own taps: a same-pattern tap on the other bridge, or on no bridge with another owner,
/// survives `ListTaps`, `DeleteTap` and `RemoveAll`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helper_ops_leave_other_installations_taps_alone() {
    if !is_root() {
        println!("SKIP: not root");
        return;
    }
    if banger_sys::find_in_path("ip").is_none()
        || banger_sys::find_in_path("nft").is_none()
        || !Path::new("/dev/net/tun").exists()
    {
        println!("SKIP: needs iproute2, nftables and /dev/net/tun");
        return;
    }
    let pid = std::process::id();
    let n = pid % 1000;
    let (mine, theirs) = (
        BridgeName::parse(&format!("br-banger-a{n}")).unwrap(),
        BridgeName::parse(&format!("br-banger-b{n}")).unwrap(),
    );
    let my_tap = TapName::parse(&format!("bgta{pid}")).unwrap();
    let their_tap = TapName::parse(&format!("bgtb{pid}")).unwrap();
    let stray = TapName::parse(&format!("bgto{pid}")).unwrap();
    let _cleanup = Cleanup(
        [&my_tap, &their_tap, &stray]
            .iter()
            .map(|t| t.to_string())
            .chain([mine.to_string(), theirs.to_string()])
            .collect(),
    );
    let _tables = DropTables(vec![
        banger_net::nft::table_for(&mine),
        banger_net::nft::table_for(&theirs),
    ]);
    let (owner, other_owner) = (4242, 4343);

    // The other installation: its own bridge and tap, made by its own ops.
    let runner: Arc<dyn CommandRunner> = Arc::new(RealRunner);
    let other = RealNetOps::new(runner.clone())
        .for_bridge(&theirs)
        .with_tap_owner(other_owner);
    other
        .ensure_bridge(&theirs, "172.31.249.1".parse().unwrap(), 24)
        .await
        .unwrap();
    other
        .create_tap(&their_tap, &theirs, Some(other_owner))
        .await
        .unwrap();
    // A banger-named tap on no bridge, of another owner (another installation's, mid-attach).
    let st = std::process::Command::new("ip")
        .args([
            "tuntap",
            "add",
            "dev",
            stray.as_str(),
            "mode",
            "tap",
            "vnet_hdr",
        ])
        .args(["user", &other_owner.to_string()])
        .status()
        .unwrap();
    assert!(st.success());

    let dir = tempfile::tempdir().unwrap();
    let (state, run) = (dir.path().join("state"), dir.path().join("run"));
    std::fs::create_dir_all(&state).unwrap();
    std::fs::create_dir_all(&run).unwrap();
    let cfg = HelperConfig {
        owner_uid: owner,
        state_dir: state,
        runtime_dir: run,
        bridge_name: mine.clone(),
        bridge_cidr: Ipv4Cidr::parse("172.31.248.0/24").unwrap(),
    };
    let socket = dir.path().join("helper.sock");
    let listener = banger_helper::bind(&socket, &cfg, 0o600).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(banger_helper::serve(
        listener,
        Arc::new(Helper::real(cfg)),
        ServeOptions::default(),
        async move {
            let _ = stopped.await;
        },
    ));
    let c = banger_helper::HelperClient::new(&socket);
    c.ensure_bridge(&mine, "172.31.248.1".parse().unwrap(), 24)
        .await
        .unwrap();
    c.create_tap(&my_tap, &mine, Some(owner)).await.unwrap();

    assert_eq!(
        c.list_taps().await.unwrap(),
        std::slice::from_ref(&my_tap),
        "only this installation's taps are listed"
    );
    // Taking over the other installation's tap is refused.
    let e = c
        .create_tap(&their_tap, &mine, Some(owner))
        .await
        .unwrap_err();
    assert!(e.to_string().contains(theirs.as_str()), "{e}");

    c.delete_tap(&their_tap).await.unwrap();
    c.delete_tap(&stray).await.unwrap();
    assert_eq!(
        master_of(their_tap.as_str()),
        Some(Some(theirs.to_string())),
        "DeleteTap left the other bridge's tap in place"
    );
    assert_eq!(
        master_of(stray.as_str()),
        Some(None),
        "the stray tap survives"
    );

    c.remove_all(Some(&mine)).await.unwrap();
    assert_eq!(master_of(my_tap.as_str()), None, "our tap is gone");
    assert_eq!(master_of(mine.as_str()), None, "our bridge is gone");
    assert_eq!(
        master_of(their_tap.as_str()),
        Some(Some(theirs.to_string())),
        "RemoveAll left the other installation's tap on its bridge"
    );
    assert!(
        master_of(theirs.as_str()).is_some(),
        "their bridge survives"
    );
    assert_eq!(
        master_of(stray.as_str()),
        Some(None),
        "the stray tap survives"
    );

    let _ = stop.send(());
    server.await.unwrap();
}

/// Deletes the test's nftables tables however the test ends.
struct DropTables(Vec<String>);

impl Drop for DropTables {
    fn drop(&mut self) {
        for t in &self.0 {
            let _ = std::process::Command::new("nft")
                .args(["delete", "table", "ip", t])
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}
