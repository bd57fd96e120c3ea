//! `bridge_cidr` against the host's own routes: a configured network the host routes elsewhere
//! is refused naming both, banger's own bridge route is no collision, and an unset one becomes
//! the first free default candidate, recorded so it stays the same across restarts.

use std::sync::Arc;

use banger_config::{Config, HostInfo, Ipv4Cidr};
use banger_core::VmRecord;
use banger_daemon::engine::{Deps, Engine, StepHook};
use banger_daemon::layout::Layout;
use banger_daemon::progress::{NoProgress, OpCtx};
use banger_daemon::vmms::ConfigVmmProvider;
use banger_net::{HostRoute, RecordingNetOps};
use banger_protocol::VmCreateParams;
use banger_store::Store;
use banger_sys::RealRunner;
use banger_testkit::{TestEnv, make_ext4};

/// Stops every start right after the network step: nothing here boots a guest.
#[derive(Debug)]
struct StopBeforeSpawn;

impl StepHook for StopBeforeSpawn {
    fn check(&self, _vm: &VmRecord, step: &'static str, after: bool) -> Result<(), String> {
        if step == "vmm_spawn" && !after {
            Err("stopped by the test before vmm_spawn".into())
        } else {
            Ok(())
        }
    }
}

fn route(net: &str, prefix: u8, dev: &str) -> HostRoute {
    HostRoute {
        network: net.parse().unwrap(),
        prefix,
        dev: Some(dev.into()),
    }
}

/// A bridged environment (the fake network ops, so no root needed) with `extra` config keys.
fn bridged_env(extra: &str) -> TestEnv {
    let env = TestEnv::new(extra);
    let text = std::fs::read_to_string(&env.config).unwrap();
    std::fs::write(
        &env.config,
        text.replace("network = \"none\"", "network = \"bridge\""),
    )
    .unwrap();
    env
}

fn load(env: &TestEnv) -> (Config, Layout, Store) {
    let host = HostInfo::detect().unwrap();
    let config = Config::load(&env.config, &host).unwrap();
    let layout = Layout::new(config.state_dir.clone(), config.runtime_dir.clone());
    layout.ensure().unwrap();
    let store = Store::open(layout.db()).unwrap();
    (config, layout, store)
}

fn engine(config: Config, layout: Layout, store: Store, net: Arc<RecordingNetOps>) -> Engine {
    let config = Arc::new(config);
    Engine::new(
        store,
        config.clone(),
        layout,
        Deps {
            vmms: Arc::new(ConfigVmmProvider::new(&config)),
            runner: Arc::new(RealRunner),
            hook: Arc::new(StopBeforeSpawn),
            net,
        },
    )
}

async fn seed(engine: &Engine, env: &TestEnv) {
    let kdir = env.root().join("k");
    std::fs::create_dir_all(&kdir).unwrap();
    let mut vmlinux = b"\x7fELF".to_vec();
    vmlinux.resize(1024, 0);
    std::fs::write(kdir.join("vmlinux"), vmlinux).unwrap();
    engine.kernel_import("test-kernel", &kdir).await.unwrap();
    let rootfs = env.root().join("rootfs.ext4");
    make_ext4(&rootfs, 16);
    engine
        .image_register("test-image", &rootfs, None)
        .await
        .unwrap();
}

async fn create(engine: &Engine, name: &str) -> String {
    let progress = NoProgress;
    let ctx = OpCtx::new(banger_core::OpId::generate(), &progress);
    let params = VmCreateParams {
        name: Some(name.into()),
        ..Default::default()
    };
    engine.create(params, &ctx).await.unwrap_err().message
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_bridge_cidr_the_host_routes_elsewhere_is_refused() {
    let env = bridged_env("bridge_cidr = \"172.30.0.0/24\"");
    let (config, layout, store) = load(&env);
    let net = Arc::new(RecordingNetOps::new());
    // banger inside a VM whose own network is 172.30.0.0/24.
    net.set_host_routes(vec![
        route("0.0.0.0", 0, "eth0"),
        route("172.30.0.0", 24, "eth0"),
    ]);
    let engine = engine(config, layout, store, net.clone());
    seed(&engine, &env).await;
    let msg = create(&engine, "clash").await;
    assert!(msg.contains("at step network"), "{msg}");
    assert!(
        msg.contains("bridge_cidr 172.30.0.0/24") && msg.contains("172.30.0.0/24 dev eth0"),
        "{msg}"
    );
    // Nothing was put on the host's network.
    assert!(
        net.calls()
            .iter()
            .all(|c| c.op() != "ensure_bridge" && c.op() != "create_tap"),
        "{:?}",
        net.calls()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn banger_s_own_bridge_route_is_not_an_overlap() {
    let env = bridged_env("bridge_cidr = \"172.30.0.0/24\"");
    let (config, layout, store) = load(&env);
    let net = Arc::new(RecordingNetOps::new());
    net.set_host_routes(vec![
        route("0.0.0.0", 0, "eth0"),
        route("192.0.2.0", 24, "eth0"),
    ]);
    let engine = engine(config, layout, store, net.clone());
    seed(&engine, &env).await;
    // The first start makes the bridge (and so its route); the second finds that route.
    for name in ["one", "two"] {
        let msg = create(&engine, name).await;
        assert!(msg.contains("at step vmm_spawn"), "{name}: {msg}");
    }
    let routes = banger_net::NetOps::host_routes(net.as_ref()).await.unwrap();
    assert!(
        routes
            .iter()
            .any(|r| r.to_string() == "172.30.0.0/24 dev br-banger"),
        "{routes:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unset_bridge_cidr_picks_a_free_network_and_keeps_it() {
    let env = bridged_env("");
    let (mut config, layout, store) = load(&env);
    assert!(!config.bridge_cidr_explicit);
    let net = RecordingNetOps::new();
    net.set_host_routes(vec![
        route("0.0.0.0", 0, "eth0"),
        route("172.30.0.0", 24, "eth0"),
    ]);
    banger_daemon::bridge_cidr::resolve(&mut config, &net, &layout, &store)
        .await
        .unwrap();
    assert_eq!(config.bridge_cidr.to_string(), "172.29.0.0/24");
    let file = banger_daemon::bridge_cidr::chosen_file(&layout);
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "172.29.0.0/24\n");

    // A restart on a host whose routes changed keeps the recorded network (VMs have addresses
    // in it); the start step would report a collision instead.
    let (mut again, _, _) = load(&env);
    let moved = RecordingNetOps::new();
    moved.set_host_routes(vec![route("172.29.0.0", 16, "vpn0")]);
    banger_daemon::bridge_cidr::resolve(&mut again, &moved, &layout, &store)
        .await
        .unwrap();
    assert_eq!(again.bridge_cidr.to_string(), "172.29.0.0/24");

    // A damaged record is an error naming it, not a silent new network.
    std::fs::write(&file, "garbage").unwrap();
    let (mut broken, _, _) = load(&env);
    let e = banger_daemon::bridge_cidr::resolve(&mut broken, &moved, &layout, &store)
        .await
        .unwrap_err();
    assert!(e.contains("bridge_cidr") && e.contains("damaged"), "{e}");

    // A configured network is never replaced.
    let env2 = bridged_env("bridge_cidr = \"10.1.2.0/24\"");
    let (mut explicit, layout2, store2) = load(&env2);
    banger_daemon::bridge_cidr::resolve(&mut explicit, &net, &layout2, &store2)
        .await
        .unwrap();
    assert_eq!(
        explicit.bridge_cidr,
        Ipv4Cidr::parse("10.1.2.0/24").unwrap()
    );
    assert!(!banger_daemon::bridge_cidr::chosen_file(&layout2).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_installation_with_addressed_vms_keeps_the_default() {
    let env = bridged_env("");
    let (config, layout, store) = load(&env);
    let net = Arc::new(RecordingNetOps::new());
    let e = engine(config, layout.clone(), store, net);
    seed(&e, &env).await;
    create(&e, "old").await;
    drop(e);
    let (mut config, _, store) = load(&env);
    let routes = RecordingNetOps::new();
    routes.set_host_routes(vec![route("172.30.0.0", 24, "eth0")]);
    banger_daemon::bridge_cidr::resolve(&mut config, &routes, &layout, &store)
        .await
        .unwrap();
    assert_eq!(config.bridge_cidr.to_string(), Config::DEFAULT_CIDR);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_root_helper_the_configured_network_stays() {
    // The helper's policy is the config file's network; the daemon must not pick another.
    let env = bridged_env("helper_socket = \"/nonexistent/helper.sock\"");
    let (mut config, layout, store) = load(&env);
    let net = RecordingNetOps::new();
    net.set_host_routes(vec![route("172.30.0.0", 24, "eth0")]);
    banger_daemon::bridge_cidr::resolve(&mut config, &net, &layout, &store)
        .await
        .unwrap();
    assert_eq!(config.bridge_cidr.to_string(), Config::DEFAULT_CIDR);
    assert!(!banger_daemon::bridge_cidr::chosen_file(&layout).exists());
}
