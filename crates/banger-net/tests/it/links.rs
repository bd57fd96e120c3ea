//! The bridge and taps, for real.

use banger_core::VmId;
use banger_net::{BridgeName, MacAddr, NetError, NetOps, TapName};

use crate::common::{NetNs, ip};
use crate::skip_unless_capable;

fn inet_addrs(ns: &NetNs, dev: &str) -> Vec<String> {
    let out = ns.ok(&["ip", "-j", "addr", "show", "dev", dev]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v[0]["addr_info"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["family"] == "inet")
        .map(|a| format!("{}/{}", a["local"].as_str().unwrap(), a["prefixlen"]))
        .collect()
}

fn is_up(link: &serde_json::Value) -> bool {
    link["flags"].as_array().unwrap().iter().any(|f| f == "UP")
}

#[tokio::test]
async fn bridge_is_idempotent_and_has_the_gateway() {
    skip_unless_capable!(false);
    let ns = NetNs::new("br");
    let ops = ns.ops();
    let br = BridgeName::default();
    for _ in 0..3 {
        ops.ensure_bridge(&br, ip("172.30.0.1"), 24).await.unwrap();
    }
    assert_eq!(inet_addrs(&ns, "br-banger"), ["172.30.0.1/24"]);
    let link = ns.link("br-banger").unwrap();
    assert_eq!(link["linkinfo"]["info_kind"], "bridge");
    assert!(is_up(&link), "{link}");
    assert_eq!(
        link["address"].as_str().unwrap(),
        MacAddr::for_bridge(&br).to_string()
    );

    // A second bridge with its own network lives beside the first.
    let br2 = BridgeName::parse("br-banger-b").unwrap();
    ops.ensure_bridge(&br2, ip("10.77.0.1"), 16).await.unwrap();
    assert_eq!(inet_addrs(&ns, "br-banger-b"), ["10.77.0.1/16"]);
}

#[tokio::test]
async fn a_non_bridge_of_that_name_is_refused() {
    skip_unless_capable!(false);
    let ns = NetNs::new("nb");
    ns.ok(&[
        "ip",
        "link",
        "add",
        "br-banger-v",
        "type",
        "veth",
        "peer",
        "name",
        "bgpeer0",
    ]);
    let br = BridgeName::parse("br-banger-v").unwrap();
    let e = ns
        .ops()
        .ensure_bridge(&br, ip("172.30.0.1"), 24)
        .await
        .unwrap_err();
    assert!(
        matches!(e, NetError::NotABridge { ref kind, .. } if kind == "veth"),
        "{e}"
    );
    assert!(inet_addrs(&ns, "br-banger-v").is_empty());
}

#[tokio::test]
async fn tap_lifecycle() {
    skip_unless_capable!(false);
    let ns = NetNs::new("tap");
    let ops = ns.ops();
    let br = BridgeName::default();
    ops.ensure_bridge(&br, ip("172.30.0.1"), 24).await.unwrap();
    // A foreign tap that banger must neither list nor delete.
    ns.ok(&["ip", "tuntap", "add", "dev", "tap0", "mode", "tap"]);

    let tap = TapName::for_vm(&VmId::parse("3fa9c01d2e4b").unwrap());
    ops.create_tap(&tap, &br, Some(4242)).await.unwrap();
    let link = ns.link(tap.as_str()).unwrap();
    assert_eq!(link["master"], "br-banger");
    assert!(is_up(&link), "{link}");
    let data = &link["linkinfo"]["info_data"];
    assert_eq!(data["type"], "tap");
    assert_eq!(data["vnet_hdr"], true);
    assert_eq!(data["pi"], false);
    assert_eq!(data["multi_queue"], false);
    assert_eq!(data["persist"], true);
    // 4242 has no passwd entry here, so iproute2 prints the number.
    assert_eq!(data["user"], 4242);

    // Creating it again reuses it; a different owner is refused and changes nothing.
    ops.create_tap(&tap, &br, Some(4242)).await.unwrap();
    let e = ops.create_tap(&tap, &br, Some(4243)).await.unwrap_err();
    assert!(matches!(e, NetError::TapMismatch { .. }), "{e}");
    assert_eq!(
        ns.link(tap.as_str()).unwrap()["linkinfo"]["info_data"]["user"],
        4242
    );

    let pool = TapName::pool(0);
    ops.create_tap(&pool, &br, None).await.unwrap();
    assert_eq!(ops.list_taps().await.unwrap(), [tap.clone(), pool.clone()]);

    ops.delete_tap(&tap).await.unwrap();
    assert!(ns.link(tap.as_str()).is_none());
    ops.delete_tap(&tap).await.unwrap();
    assert_eq!(ops.list_taps().await.unwrap(), [pool]);
    assert!(ns.link("tap0").is_some());
}

#[tokio::test]
async fn a_tap_on_a_missing_bridge_leaves_nothing() {
    skip_unless_capable!(false);
    let ns = NetNs::new("nobr");
    let ops = ns.ops();
    let e = ops
        .create_tap(&TapName::pool(1), &BridgeName::default(), Some(4242))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("attaching tap bgtpool1"), "{e}");
    assert!(ops.list_taps().await.unwrap().is_empty());
}

/// The routes come from the real kernel: a network the (namespace's) host has on another
/// interface is refused for the bridge, naming both, and skipped when picking a default;
/// banger's own bridge route is not a collision.
#[tokio::test]
async fn host_routes_collide_with_the_bridge_cidr_except_its_own() {
    use banger_config::Ipv4Cidr;
    use banger_net::routes::{check_cidr_free, pick_free_cidr};
    skip_unless_capable!(false);
    let ns = NetNs::new("rt");
    // The "VM's own network" banger runs in: 172.30.0.0/24 on eth-like uplink0.
    ns.ok(&["ip", "link", "add", "uplink0", "type", "bridge"]);
    ns.ok(&["ip", "addr", "add", "172.30.0.5/24", "dev", "uplink0"]);
    ns.ok(&["ip", "link", "set", "uplink0", "up"]);
    let ops = ns.ops();
    let routes = ops.host_routes().await.unwrap();
    let default = Ipv4Cidr::parse("172.30.0.0/24").unwrap();
    let e = check_cidr_free(&default, "br-banger", &routes)
        .unwrap_err()
        .to_string();
    assert!(e.contains("172.30.0.0/24 dev uplink0"), "{e} ({routes:?})");
    let free = pick_free_cidr("br-banger", &routes).unwrap();
    assert_eq!(free.to_string(), "172.29.0.0/24");
    // The bridge on the free network: its own route is no collision, for it.
    let br = BridgeName::default();
    ops.ensure_bridge(&br, free.gateway(), free.prefix())
        .await
        .unwrap();
    let routes = ops.host_routes().await.unwrap();
    assert!(
        routes
            .iter()
            .any(|r| r.to_string() == "172.29.0.0/24 dev br-banger"),
        "{routes:?}"
    );
    check_cidr_free(&free, "br-banger", &routes).unwrap();
    assert!(check_cidr_free(&free, "br-banger-x", &routes).is_err());
}
