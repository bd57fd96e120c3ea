//! [`RecordingNetOps`]: an in-memory [`NetOps`] for tests of the daemon and the lifecycle code.
//!
//! It keeps the state the real host would have (bridges, taps, NAT rules per VM), enforces the
//! same preconditions (a tap needs its bridge, NAT needs `ensure_nat`), records every call and
//! can be told to fail one operation, so leak checks and undo paths can be tested without root.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::Mutex;

use banger_config::Ipv4Cidr;
use banger_sys::RunError;

use crate::names::{BridgeName, TapName, check_vm_id};
use crate::{NetError, NetOps, check_gateway};

/// One recorded call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetCall {
    EnsureBridge {
        bridge: BridgeName,
        gateway: Ipv4Addr,
        prefix: u8,
    },
    CreateTap {
        tap: TapName,
        bridge: BridgeName,
        owner_uid: Option<u32>,
    },
    DeleteTap(TapName),
    ListTaps,
    EnsureNat {
        bridge: BridgeName,
        cidr: Ipv4Cidr,
    },
    AddVmNat {
        vm_id: String,
        ip: Ipv4Addr,
        tap: TapName,
    },
    RemoveVmNat(String),
    ListNatVms,
    RemoveAll(Option<BridgeName>),
    ForgetNeighbor {
        bridge: BridgeName,
        ip: Ipv4Addr,
    },
}

impl NetCall {
    /// The method name, as used by [`RecordingNetOps::fail_on`].
    pub fn op(&self) -> &'static str {
        match self {
            NetCall::EnsureBridge { .. } => "ensure_bridge",
            NetCall::CreateTap { .. } => "create_tap",
            NetCall::DeleteTap(_) => "delete_tap",
            NetCall::ListTaps => "list_taps",
            NetCall::EnsureNat { .. } => "ensure_nat",
            NetCall::AddVmNat { .. } => "add_vm_nat",
            NetCall::RemoveVmNat(_) => "remove_vm_nat",
            NetCall::ListNatVms => "list_nat_vms",
            NetCall::RemoveAll(_) => "remove_all",
            NetCall::ForgetNeighbor { .. } => "forget_neighbor",
        }
    }
}

#[derive(Debug, Default)]
struct State {
    calls: Vec<NetCall>,
    fail_on: Option<&'static str>,
    bridges: BTreeMap<BridgeName, BTreeSet<(Ipv4Addr, u8)>>,
    /// tap -> (bridge, owner)
    taps: BTreeMap<TapName, (BridgeName, Option<u32>)>,
    nat_ready: bool,
    /// vm id -> (address, tap)
    nat: BTreeMap<String, (Ipv4Addr, TapName)>,
    /// The host's routes besides those of the fake's own bridges.
    host_routes: Vec<crate::routes::HostRoute>,
    /// This installation's bridge, as [`crate::RealNetOps::for_bridge`]; `None`: every bridge.
    own_bridge: Option<BridgeName>,
}

impl State {
    /// Whether `tap` is this installation's, as the real ops decide it (by its bridge).
    fn ours(&self, bridge: &BridgeName) -> bool {
        self.own_bridge.as_ref().is_none_or(|b| b == bridge)
    }
}

/// The recording fake. Starts with no bridge, no taps and no table.
#[derive(Debug, Default)]
pub struct RecordingNetOps {
    state: Mutex<State>,
}

impl RecordingNetOps {
    pub fn new() -> Self {
        Self::default()
    }

    /// Serves only the installation of `bridge`: taps on other bridges are neither listed nor
    /// deleted, as with the real ops.
    pub fn for_bridge(self, bridge: &BridgeName) -> Self {
        self.state().own_bridge = Some(bridge.clone());
        self
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panicking test thread must not hide the state from the assertions that follow.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes every later call of method `op` (`"create_tap"`, `"add_vm_nat"`...) fail, as a
    /// failing command would; `None` clears it.
    pub fn fail_on(&self, op: Option<&'static str>) {
        self.state().fail_on = op;
    }

    /// The host's own routes (the fake adds one per bridge address it holds, as the kernel
    /// does).
    pub fn set_host_routes(&self, routes: Vec<crate::routes::HostRoute>) {
        self.state().host_routes = routes;
    }

    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<NetCall> {
        self.state().calls.clone()
    }

    /// The taps that exist now, with their bridge and owner.
    pub fn taps(&self) -> BTreeMap<TapName, (BridgeName, Option<u32>)> {
        self.state().taps.clone()
    }

    /// The bridges that exist now, with their addresses.
    pub fn bridges(&self) -> BTreeMap<BridgeName, BTreeSet<(Ipv4Addr, u8)>> {
        self.state().bridges.clone()
    }

    /// The VMs with NAT rules now, with their address and tap.
    pub fn nat(&self) -> BTreeMap<String, (Ipv4Addr, TapName)> {
        self.state().nat.clone()
    }

    /// Whether banger's table exists (made by `ensure_bridge`, as the bridge's firewall, and
    /// by `ensure_nat`).
    pub fn nat_ready(&self) -> bool {
        self.state().nat_ready
    }

    /// Records `call` and fails it if asked to.
    fn enter(&self, call: NetCall) -> Result<std::sync::MutexGuard<'_, State>, NetError> {
        let mut st = self.state();
        let op = call.op();
        st.calls.push(call);
        if st.fail_on == Some(op) {
            return Err(NetError::Command {
                op,
                target: "fake".into(),
                source: RunError::Failed {
                    cmd: format!("fake {op}"),
                    status: "exit status: 1".into(),
                    stderr: "injected failure".into(),
                },
            });
        }
        Ok(st)
    }
}

fn missing(op: &'static str, target: &str, what: String) -> NetError {
    NetError::Command {
        op,
        target: target.to_string(),
        source: RunError::Failed {
            cmd: format!("fake {op}"),
            status: "exit status: 1".into(),
            stderr: what,
        },
    }
}

#[async_trait::async_trait]
impl NetOps for RecordingNetOps {
    /// Not recorded as a call: it changes nothing.
    async fn host_routes(&self) -> Result<Vec<crate::routes::HostRoute>, NetError> {
        let st = self.state();
        let mut routes = st.host_routes.clone();
        for (bridge, addrs) in &st.bridges {
            for (gateway, prefix) in addrs {
                let mask = u32::MAX << (32 - u32::from(*prefix));
                routes.push(crate::routes::HostRoute {
                    network: Ipv4Addr::from(u32::from(*gateway) & mask),
                    prefix: *prefix,
                    dev: Some(bridge.to_string()),
                });
            }
        }
        Ok(routes)
    }

    async fn ensure_bridge(
        &self,
        bridge: &BridgeName,
        gateway: Ipv4Addr,
        prefix: u8,
    ) -> Result<(), NetError> {
        check_gateway(bridge, gateway, prefix)?;
        let mut st = self.enter(NetCall::EnsureBridge {
            bridge: bridge.clone(),
            gateway,
            prefix,
        })?;
        st.bridges
            .entry(bridge.clone())
            .or_default()
            .insert((gateway, prefix));
        // The real ops put banger's table (the bridge's firewall) in place first.
        st.nat_ready = true;
        Ok(())
    }

    async fn create_tap(
        &self,
        tap: &TapName,
        bridge: &BridgeName,
        owner_uid: Option<u32>,
    ) -> Result<(), NetError> {
        let mut st = self.enter(NetCall::CreateTap {
            tap: tap.clone(),
            bridge: bridge.clone(),
            owner_uid,
        })?;
        if !st.bridges.contains_key(bridge) {
            return Err(missing(
                "attaching tap",
                tap.as_str(),
                format!("Cannot find device \"{bridge}\""),
            ));
        }
        if let Some((other, _)) = st.taps.get(tap)
            && other != bridge
        {
            return Err(NetError::TapMismatch {
                name: tap.to_string(),
                reason: format!("it is a port of {other}, another installation's bridge"),
            });
        }
        if let Some((_, owner)) = st.taps.get(tap)
            && *owner != owner_uid
        {
            return Err(NetError::TapMismatch {
                name: tap.to_string(),
                reason: format!("it is owned by {owner:?}, not {owner_uid:?}"),
            });
        }
        st.taps.insert(tap.clone(), (bridge.clone(), owner_uid));
        Ok(())
    }

    async fn forget_neighbor(&self, bridge: &BridgeName, ip: Ipv4Addr) -> Result<(), NetError> {
        drop(self.enter(NetCall::ForgetNeighbor {
            bridge: bridge.clone(),
            ip,
        })?);
        Ok(())
    }

    async fn delete_tap(&self, tap: &TapName) -> Result<(), NetError> {
        let mut st = self.enter(NetCall::DeleteTap(tap.clone()))?;
        if st.taps.get(tap).is_some_and(|(b, _)| st.ours(b)) {
            st.taps.remove(tap);
        }
        Ok(())
    }

    async fn list_taps(&self) -> Result<Vec<TapName>, NetError> {
        let st = self.enter(NetCall::ListTaps)?;
        Ok(st
            .taps
            .iter()
            .filter(|(_, (b, _))| st.ours(b))
            .map(|(t, _)| t.clone())
            .collect())
    }

    async fn ensure_nat(&self, bridge: &BridgeName, cidr: &Ipv4Cidr) -> Result<(), NetError> {
        self.enter(NetCall::EnsureNat {
            bridge: bridge.clone(),
            cidr: *cidr,
        })?
        .nat_ready = true;
        Ok(())
    }

    async fn add_vm_nat(&self, vm_id: &str, ip: Ipv4Addr, tap: &TapName) -> Result<(), NetError> {
        check_vm_id(vm_id)?;
        let mut st = self.enter(NetCall::AddVmNat {
            vm_id: vm_id.to_string(),
            ip,
            tap: tap.clone(),
        })?;
        if !st.nat_ready {
            return Err(NetError::NatNotReady {
                vm_id: vm_id.to_string(),
            });
        }
        st.nat.insert(vm_id.to_string(), (ip, tap.clone()));
        Ok(())
    }

    async fn remove_vm_nat(&self, vm_id: &str) -> Result<(), NetError> {
        check_vm_id(vm_id)?;
        self.enter(NetCall::RemoveVmNat(vm_id.to_string()))?
            .nat
            .remove(vm_id);
        Ok(())
    }

    async fn list_nat_vms(&self) -> Result<Vec<String>, NetError> {
        Ok(self
            .enter(NetCall::ListNatVms)?
            .nat
            .keys()
            .cloned()
            .collect())
    }

    async fn remove_all(&self, bridge: Option<&BridgeName>) -> Result<(), NetError> {
        let mut st = self.enter(NetCall::RemoveAll(bridge.cloned()))?;
        st.nat.clear();
        st.nat_ready = false;
        let own = st.own_bridge.clone();
        st.taps
            .retain(|_, (b, _)| own.as_ref().is_some_and(|own| own != b));
        if let Some(b) = bridge {
            st.bridges.remove(b);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[tokio::test]
    async fn mirrors_the_real_preconditions() {
        let f = RecordingNetOps::new();
        let br = BridgeName::default();
        let tap = TapName::pool(0);
        assert!(f.create_tap(&tap, &br, Some(1)).await.is_err());
        assert!(matches!(
            f.add_vm_nat("a", ip("172.30.0.2"), &tap).await,
            Err(NetError::NatNotReady { .. })
        ));
        f.ensure_bridge(&br, ip("172.30.0.1"), 24).await.unwrap();
        assert!(f.nat_ready(), "the bridge comes with its firewall table");
        f.ensure_bridge(&br, ip("172.30.0.1"), 24).await.unwrap();
        assert_eq!(f.bridges()[&br].len(), 1);
        f.create_tap(&tap, &br, Some(1)).await.unwrap();
        f.create_tap(&tap, &br, Some(1)).await.unwrap();
        assert!(matches!(
            f.create_tap(&tap, &br, Some(2)).await,
            Err(NetError::TapMismatch { .. })
        ));
        assert_eq!(f.list_taps().await.unwrap(), std::slice::from_ref(&tap));

        let cidr = Ipv4Cidr::parse("172.30.0.0/24").unwrap();
        f.ensure_nat(&br, &cidr).await.unwrap();
        f.add_vm_nat("a", ip("172.30.0.2"), &tap).await.unwrap();
        f.add_vm_nat("a", ip("172.30.0.2"), &tap).await.unwrap();
        f.add_vm_nat("b", ip("172.30.0.3"), &tap).await.unwrap();
        assert_eq!(f.list_nat_vms().await.unwrap(), ["a", "b"]);
        f.remove_vm_nat("a").await.unwrap();
        f.remove_vm_nat("a").await.unwrap();
        f.remove_vm_nat("never-had-nat").await.unwrap();
        assert_eq!(f.list_nat_vms().await.unwrap(), ["b"]);
        assert!(f.remove_vm_nat("B\"").await.is_err());

        f.remove_all(Some(&br)).await.unwrap();
        assert!(f.taps().is_empty() && f.nat().is_empty() && f.bridges().is_empty());
        assert!(!f.nat_ready());
    }

    #[tokio::test]
    async fn leaves_taps_of_other_bridges_alone() {
        let (mine, other) = (
            BridgeName::default(),
            BridgeName::parse("br-banger-b").unwrap(),
        );
        let f = RecordingNetOps::new().for_bridge(&mine);
        f.ensure_bridge(&mine, ip("172.30.0.1"), 24).await.unwrap();
        f.ensure_bridge(&other, ip("172.31.0.1"), 24).await.unwrap();
        let (a, b) = (TapName::pool(0), TapName::pool(1));
        f.create_tap(&a, &mine, Some(1)).await.unwrap();
        f.create_tap(&b, &other, Some(1)).await.unwrap();
        assert_eq!(f.list_taps().await.unwrap(), std::slice::from_ref(&a));
        f.delete_tap(&b).await.unwrap();
        f.remove_all(None).await.unwrap();
        assert_eq!(f.taps().keys().collect::<Vec<_>>(), [&b]);
    }

    #[tokio::test]
    async fn records_calls_and_injects_failures() {
        let f = RecordingNetOps::new();
        f.fail_on(Some("delete_tap"));
        let e = f.delete_tap(&TapName::pool(2)).await.unwrap_err();
        assert!(e.to_string().contains("injected failure"), "{e}");
        f.fail_on(None);
        f.delete_tap(&TapName::pool(2)).await.unwrap();
        assert_eq!(
            f.calls(),
            [
                NetCall::DeleteTap(TapName::pool(2)),
                NetCall::DeleteTap(TapName::pool(2))
            ]
        );
        assert_eq!(f.calls()[0].op(), "delete_tap");
    }
}
