//! banger's nftables table, for real.

use banger_config::Ipv4Cidr;
use banger_core::VmId;
use banger_net::{BridgeName, NetError, NetOps, TapName};

use crate::common::{NetNs, ip};
use crate::skip_unless_capable;

fn cidr() -> Ipv4Cidr {
    Ipv4Cidr::parse("172.30.0.0/24").unwrap()
}

/// Sorted ids, as `list_nat_vms` returns them.
fn sorted(ids: &[&VmId]) -> Vec<String> {
    let mut v: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
    v.sort();
    v
}

#[tokio::test]
async fn nat_rules_per_vm() {
    skip_unless_capable!(true);
    let host_forward = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap();
    let ns = NetNs::new("nat");
    let ops = ns.ops();
    let br = BridgeName::default();
    // Per-VM rules need the installation's table, which the bridge (its firewall) brings.
    let e = ops
        .add_vm_nat(
            VmId::generate().as_str(),
            ip("172.30.0.2"),
            &TapName::pool(0),
        )
        .await
        .unwrap_err();
    assert!(matches!(e, NetError::NatNotReady { .. }), "{e}");
    ops.ensure_bridge(&br, ip("172.30.0.1"), 24).await.unwrap();

    let (a, b, c, d) = (
        VmId::generate(),
        VmId::generate(),
        VmId::generate(),
        VmId::generate(),
    );
    let taps: Vec<TapName> = [&a, &b, &c, &d].map(TapName::for_vm).to_vec();
    for t in &taps {
        ops.create_tap(t, &br, None).await.unwrap();
    }

    ops.ensure_nat(&br, &cidr()).await.unwrap();
    ops.ensure_nat(&br, &cidr()).await.unwrap();
    assert_eq!(ns.ok(&["sysctl", "-n", "net.ipv4.ip_forward"]).trim(), "1");
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap(),
        host_forward,
        "the host's own forwarding setting must not change"
    );
    let base = ns.rule_comments().unwrap();
    // NAT (5) and the bridge's firewall (input, forward, output: 5).
    assert_eq!(base.len(), 10, "{base:?}");
    assert!(base.iter().all(|c| c == "banger-base"));
    assert!(ops.list_nat_vms().await.unwrap().is_empty());

    ops.add_vm_nat(a.as_str(), ip("172.30.0.2"), &taps[0])
        .await
        .unwrap();
    ops.add_vm_nat(a.as_str(), ip("172.30.0.2"), &taps[0])
        .await
        .unwrap();
    ops.add_vm_nat(b.as_str(), ip("172.30.0.3"), &taps[1])
        .await
        .unwrap();
    assert_eq!(
        ns.count_rules_of(a.as_str()),
        3,
        "adding twice leaves one set"
    );
    assert_eq!(ns.count_rules_of(b.as_str()), 3);
    assert_eq!(ops.list_nat_vms().await.unwrap(), sorted(&[&a, &b]));
    let listing = ns.ok(&["nft", "list", "table", "ip", "banger"]);
    assert!(
        listing.contains(&format!(
            "ip saddr 172.30.0.2 masquerade comment \"banger:{a}\""
        )),
        "{listing}"
    );

    // Re-ensuring (a daemon restart) keeps the VMs' rules.
    ops.ensure_nat(&br, &cidr()).await.unwrap();
    assert_eq!(ops.list_nat_vms().await.unwrap(), sorted(&[&a, &b]));

    ops.remove_vm_nat(a.as_str()).await.unwrap();
    assert_eq!(ns.count_rules_of(a.as_str()), 0);
    assert_eq!(ns.count_rules_of(b.as_str()), 3);
    ops.remove_vm_nat(a.as_str()).await.unwrap();
    assert_eq!(ops.list_nat_vms().await.unwrap(), sorted(&[&b]));

    // Bug 22: deleting several VMs, some with NAT and some without.
    ops.add_vm_nat(c.as_str(), ip("172.30.0.4"), &taps[2])
        .await
        .unwrap();
    for vm in [&d, &c, &b] {
        ops.remove_vm_nat(vm.as_str()).await.unwrap();
    }
    assert!(ops.list_nat_vms().await.unwrap().is_empty());

    // Bug 6: the tap is gone (and its name forgotten); the id alone removes the rules.
    ops.add_vm_nat(d.as_str(), ip("172.30.0.5"), &taps[3])
        .await
        .unwrap();
    ops.delete_tap(&taps[3]).await.unwrap();
    ops.remove_vm_nat(d.as_str()).await.unwrap();
    assert_eq!(ns.count_rules_of(d.as_str()), 0);
    assert_eq!(ns.rule_comments().unwrap().len(), base.len());
}

#[tokio::test]
async fn remove_all_leaves_no_table_and_no_tap() {
    skip_unless_capable!(true);
    let ns = NetNs::new("all");
    let ops = ns.ops();
    let br = BridgeName::default();
    ops.ensure_bridge(&br, ip("172.30.0.1"), 24).await.unwrap();
    ns.ok(&["ip", "tuntap", "add", "dev", "tap0", "mode", "tap"]);
    let vm = VmId::generate();
    let tap = TapName::for_vm(&vm);
    ops.create_tap(&tap, &br, Some(4242)).await.unwrap();
    ops.create_tap(&TapName::pool(0), &br, Some(4242))
        .await
        .unwrap();
    ops.ensure_nat(&br, &cidr()).await.unwrap();
    ops.add_vm_nat(vm.as_str(), ip("172.30.0.2"), &tap)
        .await
        .unwrap();

    // Without a bridge argument the bridge stays.
    ops.remove_all(None).await.unwrap();
    assert!(ns.rule_comments().is_none(), "banger's table must be gone");
    assert!(ops.list_taps().await.unwrap().is_empty());
    assert!(ops.list_nat_vms().await.unwrap().is_empty());
    assert!(ns.link("br-banger").is_some());
    assert!(ns.link("tap0").is_some(), "a foreign tap must survive");

    // Again, now with the bridge; nothing left to remove but the bridge is fine.
    ops.remove_all(Some(&br)).await.unwrap();
    assert!(ns.link("br-banger").is_none());
    assert!(ns.link("tap0").is_some());
    ops.remove_all(Some(&br)).await.unwrap();
}

#[tokio::test]
async fn other_tables_are_untouched() {
    skip_unless_capable!(true);
    let ns = NetNs::new("oth");
    ns.ok(&["nft", "add", "table", "inet", "userfw"]);
    ns.ok(&["nft", "add", "chain", "inet", "userfw", "c"]);
    ns.ok(&[
        "nft",
        "add",
        "rule",
        "inet",
        "userfw",
        "c",
        "counter",
        "comment",
        "\"banger:fake\"",
    ]);
    let ops = ns.ops();
    let br = BridgeName::default();
    ops.ensure_nat(&br, &cidr()).await.unwrap();
    // A look-alike comment in someone else's table is not a banger VM.
    assert!(ops.list_nat_vms().await.unwrap().is_empty());
    ops.remove_all(Some(&br)).await.unwrap();
    assert!(
        ns.ok(&["nft", "list", "tables"])
            .contains("table inet userfw")
    );
}
