//! Host networking of banger VMs: one bridge, a tap per VM (or from a warm pool), a firewall
//! keeping guests off the host and off each other, and opt-in outbound NAT, as rules in
//! banger's own nftables table (`table ip banger`).
//!
//! Everything goes through [`NetOps`]. [`RealNetOps`] runs `ip` (iproute2), `nft` and `sysctl`
//! as argv through banger-sys's [`CommandRunner`](banger_sys::CommandRunner); nft scripts are fed
//! on stdin (`nft -f -`) and built only from validated values. [`RecordingNetOps`] is an
//! in-memory fake with a call log, for tests of the code above this crate.
//!
//! banger only touches interfaces whose names parse as [`BridgeName`] or [`TapName`], and only
//! its own nftables table, so host networking it did not create is never changed.

use std::net::Ipv4Addr;

use banger_config::Ipv4Cidr;
use banger_sys::RunError;

mod fake;
mod names;
pub mod nft;
mod real;
pub mod routes;

pub use fake::{NetCall, RecordingNetOps};
pub use names::{BridgeName, MAX_IFNAME, MAX_VM_ID, MacAddr, TapName, check_vm_id};
pub use real::RealNetOps;
pub use routes::HostRoute;

/// Why a network operation failed; every variant names its input.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("invalid bridge name {name:?}: {reason}")]
    InvalidBridgeName { name: String, reason: String },
    #[error("invalid tap name {name:?}: {reason}")]
    InvalidTapName { name: String, reason: String },
    #[error("invalid VM id {id:?}: {reason}")]
    InvalidVmId { id: String, reason: String },
    #[error("invalid MAC address {mac:?}: expected six hex pairs like 02:ab:cd:ef:01:23")]
    InvalidMac { mac: String },
    #[error("invalid network namespace name {name:?}: expected 1 to 64 of A-Za-z0-9_.-")]
    InvalidNetns { name: String },
    #[error("invalid gateway {gateway}/{prefix} for bridge {bridge}: {reason}")]
    InvalidGateway {
        bridge: String,
        gateway: Ipv4Addr,
        prefix: u8,
        reason: String,
    },
    #[error("{name} exists but is not a bridge (its kind is {kind:?})")]
    NotABridge { name: String, kind: String },
    #[error("{name} exists but is not a usable banger tap: {reason}")]
    TapMismatch { name: String, reason: String },
    #[error(
        "banger's nftables table is missing: ensure_bridge/ensure_nat must run before add_vm_nat (VM {vm_id})"
    )]
    NatNotReady { vm_id: String },
    #[error("{op} {target}: {source}")]
    Command {
        op: &'static str,
        target: String,
        #[source]
        source: RunError,
    },
    #[error(
        "bridge_cidr {cidr} overlaps the host's route {route}: banger's bridge would take that \
         network's traffic; set bridge_cidr to a free range (see docs/network.md)"
    )]
    CidrOverlap { cidr: Ipv4Cidr, route: String },
    #[error("{op} {target}: unexpected output: {reason}")]
    Output {
        op: &'static str,
        target: String,
        reason: String,
    },
}

/// Host networking operations. Every method is idempotent where that makes sense, so a retry
/// after a crash or a partial failure converges instead of failing.
#[async_trait::async_trait]
pub trait NetOps: Send + Sync + std::fmt::Debug {
    /// Puts the bridge's firewall in place (banger's table and its base rules: guests reach
    /// nothing on the host but replies to the host's own connections, are not routed to each
    /// other, and only root and the owner may connect into them), creates `bridge` if missing, turns IPv6 off on it, gives it `gateway/prefix`
    /// if it lacks that address, and brings it up. An existing bridge with the address is left
    /// as it is; other addresses on it are kept. Fails if an interface of that name exists and
    /// is not a bridge.
    async fn ensure_bridge(
        &self,
        bridge: &BridgeName,
        gateway: Ipv4Addr,
        prefix: u8,
    ) -> Result<(), NetError>;

    /// Creates a persistent tap (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, single queue, as
    /// Firecracker and QEMU open it) owned by `owner_uid` so an unprivileged VMM can attach, puts
    /// it on `bridge` and brings it up. An existing tap with the same type, flags and owner is
    /// reused; one that differs is an error. The port is isolated (it exchanges frames with the
    /// host, never with another VM's port). On failure a tap created here is deleted again.
    async fn create_tap(
        &self,
        tap: &TapName,
        bridge: &BridgeName,
        owner_uid: Option<u32>,
    ) -> Result<(), NetError>;

    /// Deletes a tap of this installation; a missing one, or another installation's tap of
    /// that name (a port of another bridge), is fine and left alone.
    async fn delete_tap(&self, tap: &TapName) -> Result<(), NetError>;

    /// This installation's taps (banger-named, on its bridge), sorted (leak checks, warm pool).
    async fn list_taps(&self) -> Result<Vec<TapName>, NetError>;

    /// Turns IPv4 forwarding on and creates banger's table with its chains and base rules for
    /// `bridge` and `cidr`. Idempotent; per-VM rules survive it.
    async fn ensure_nat(&self, bridge: &BridgeName, cidr: &Ipv4Cidr) -> Result<(), NetError>;

    /// Gives VM `vm_id` (address `ip`, on `tap`) outbound NAT: a masquerade rule for `ip/32`
    /// leaving through any interface but the bridge and forward accepts both ways (only
    /// established/related back), each commented `banger:<vm_id>`. Adding twice leaves one set.
    /// Needs [`NetOps::ensure_nat`] (or [`NetOps::ensure_bridge`]) first.
    async fn add_vm_nat(&self, vm_id: &str, ip: Ipv4Addr, tap: &TapName) -> Result<(), NetError>;

    /// Deletes every rule commented `banger:<vm_id>`; needs nothing but the id, so it works after
    /// the tap name is lost. No rules (or no table) is fine.
    async fn remove_vm_nat(&self, vm_id: &str) -> Result<(), NetError>;

    /// The ids of the VMs that have NAT rules, sorted.
    async fn list_nat_vms(&self) -> Result<Vec<String>, NetError>;

    /// Forgets the bridge's neighbour (ARP) entry for `ip`, so an address handed to a new VM is
    /// not sent to the MAC of the VM that held it before (a stale entry costs ~30 s of silence).
    async fn forget_neighbor(&self, bridge: &BridgeName, ip: Ipv4Addr) -> Result<(), NetError>;

    /// An open descriptor of `tap` for a VMM that cannot open it by name (an unprivileged
    /// daemon on a host whose `/dev/net/tun` only root may open). `None`: the VMM opens the
    /// tap by name itself, as it does when the daemon runs the network operations directly.
    async fn open_tap(&self, tap: &TapName) -> Result<Option<std::os::fd::OwnedFd>, NetError> {
        let _ = tap;
        Ok(None)
    }

    /// The host's IPv4 routes (main table), to keep the bridge's network clear of them.
    /// Reading them needs no privilege, so by default this runs `ip` here, also for an
    /// implementation that otherwise goes through the root helper.
    async fn host_routes(&self) -> Result<Vec<routes::HostRoute>, NetError> {
        RealNetOps::new(std::sync::Arc::new(banger_sys::RealRunner))
            .host_routes()
            .await
    }

    /// Uninstall: deletes this installation's table and taps, and `bridge` too when given.
    /// Every step runs even if an earlier one fails; the first error is returned.
    async fn remove_all(&self, bridge: Option<&BridgeName>) -> Result<(), NetError>;
}

/// Checks a gateway address for `bridge`: prefix within /8../30 like [`Ipv4Cidr`], and the
/// address neither the network nor the broadcast address of its prefix.
pub(crate) fn check_gateway(
    bridge: &BridgeName,
    gateway: Ipv4Addr,
    prefix: u8,
) -> Result<Ipv4Cidr, NetError> {
    let err = |reason: String| NetError::InvalidGateway {
        bridge: bridge.to_string(),
        gateway,
        prefix,
        reason,
    };
    if !(Ipv4Cidr::MIN_PREFIX..=Ipv4Cidr::MAX_PREFIX).contains(&prefix) {
        return Err(err(format!(
            "prefix outside /{}../{}",
            Ipv4Cidr::MIN_PREFIX,
            Ipv4Cidr::MAX_PREFIX
        )));
    }
    let mask = u32::MAX << (32 - u32::from(prefix));
    let net = Ipv4Cidr::new(Ipv4Addr::from(u32::from(gateway) & mask), prefix)
        .map_err(|e| err(e.to_string()))?;
    if gateway == net.network() || gateway == net.broadcast() {
        return Err(err(
            "the network or broadcast address cannot be a gateway".into()
        ));
    }
    Ok(net)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_checks() {
        let br = BridgeName::default();
        let net = check_gateway(&br, "172.30.0.1".parse().unwrap(), 24).unwrap();
        assert_eq!(net.to_string(), "172.30.0.0/24");
        for (gw, p) in [
            ("172.30.0.0", 24),
            ("172.30.0.255", 24),
            ("172.30.0.1", 31),
            ("172.30.0.1", 7),
        ] {
            let e = check_gateway(&br, gw.parse().unwrap(), p).unwrap_err();
            assert!(e.to_string().contains(&format!("{gw}/{p}")), "{e}");
        }
    }
}
