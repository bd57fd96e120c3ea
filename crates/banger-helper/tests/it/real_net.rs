//! The helper with the real `RealNetOps` and the real kernel, as root: a test-only bridge and
//! tap on the host, opened through `OpenTap` and checked with `TUNGETIFF`, then removed.

use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::Arc;

use banger_config::Ipv4Cidr;
use banger_helper::host::{TAP_FLAGS, tun_get_iff};
use banger_helper::{Helper, HelperConfig, HelperError, RealHost, ServeOptions};
use banger_net::{BridgeName, RealNetOps, TapName};
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
        Arc::new(RealNetOps::new(runner.clone())),
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
