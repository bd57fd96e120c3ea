//! [`NetOps`] over `ip`, `nft` and `sysctl`, run as argv through a [`CommandRunner`].

use std::net::Ipv4Addr;
use std::sync::Arc;

use banger_config::Ipv4Cidr;
use banger_sys::{Cmd, CommandRunner};

use crate::names::{BridgeName, MacAddr, TapName, check_vm_id};
use crate::nft::{self, RuleRef};
use crate::{NetError, NetOps, check_gateway};

/// The real implementation. Cheap to clone; holds no state but the runner and the namespace.
#[derive(Debug, Clone)]
pub struct RealNetOps {
    runner: Arc<dyn CommandRunner>,
    netns: Option<String>,
    /// This installation's nftables table (see [`nft::table_for`]).
    table: String,
    /// This installation's bridge: only taps enslaved to it are listed or deleted.
    bridge: BridgeName,
    /// The owner of this installation's taps; a banger-named tap on no bridge is this
    /// installation's only when it has this owner (see [`RealNetOps::with_tap_owner`]).
    tap_owner: Option<u32>,
}

/// One interface as `ip -d -j link show` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Link {
    name: String,
    /// `linkinfo.info_kind`: `bridge`, `tun`, `veth`...; absent for plain devices.
    kind: Option<String>,
    /// The bridge (or bond) this link is a port of.
    master: Option<String>,
    tun: Option<TunInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct TunInfo {
    /// `tap` or `tun`.
    mode: String,
    pi: bool,
    vnet_hdr: bool,
    multi_queue: bool,
    owner: Option<u32>,
}

impl RealNetOps {
    pub fn new(runner: Arc<dyn CommandRunner>) -> Self {
        RealNetOps {
            runner,
            netns: None,
            table: nft::TABLE.to_string(),
            bridge: BridgeName::default(),
            tap_owner: None,
        }
    }

    /// Serves the installation whose bridge is `bridge`: its nftables table, and only the
    /// taps on that bridge.
    pub fn for_bridge(mut self, bridge: &BridgeName) -> Self {
        self.table = nft::table_for(bridge);
        self.bridge = bridge.clone();
        self
    }

    /// This installation's owner is `uid` (the daemon's user): its taps are owned by `uid`,
    /// and `uid` (besides root) may open connections into the VM network. A banger-named tap
    /// on no bridge at all (its bridge deleted under it, or an attach that never happened)
    /// counts as this installation's only when its owner is `uid`; without this, never.
    pub fn with_tap_owner(mut self, uid: u32) -> Self {
        self.tap_owner = Some(uid);
        self
    }

    /// Why `link` is not one of this installation's taps, if it is not: a port of another
    /// bridge belongs to another installation (or to something that is not banger), and so
    /// does a tap on no bridge that another user owns.
    fn not_ours(&self, link: &Link) -> Option<String> {
        match &link.master {
            Some(m) if m == self.bridge.as_str() => None,
            Some(m) => Some(format!(
                "it is a port of {m}, not of this installation's bridge {}",
                self.bridge
            )),
            None => {
                let owner = link.tun.as_ref().and_then(|t| t.owner);
                match self.tap_owner {
                    Some(me) if owner == Some(me) => None,
                    _ => Some(format!(
                        "it is on no bridge and its owner ({owner:?}) is not this installation's ({:?})",
                        self.tap_owner
                    )),
                }
            }
        }
    }

    /// Runs every command inside network namespace `name` (`ip netns exec <name> ...`), so tests
    /// can work in a private namespace without touching the host's interfaces or rules.
    pub fn in_netns(mut self, name: &str) -> Result<Self, NetError> {
        let ok = !name.is_empty()
            && name.len() <= 64
            && name != "."
            && name != ".."
            && !name.starts_with('-')
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        if !ok {
            return Err(NetError::InvalidNetns {
                name: name.to_string(),
            });
        }
        self.netns = Some(name.to_string());
        Ok(self)
    }

    fn cmd(&self, program: &str, args: &[&str]) -> Cmd {
        match &self.netns {
            None => Cmd::new(program).args(args),
            // `ip netns exec` looks the program up in its own PATH, which may lack /usr/sbin.
            Some(ns) => {
                let path = banger_sys::find_in_path(program)
                    .map(|p| p.into_os_string())
                    .unwrap_or_else(|| program.into());
                Cmd::new("ip")
                    .args(["netns", "exec", ns.as_str()])
                    .arg(path)
                    .args(args)
            }
        }
    }

    async fn run(&self, op: &'static str, target: &str, cmd: Cmd) -> Result<Vec<u8>, NetError> {
        self.runner
            .run(&cmd)
            .await
            .map_err(|source| NetError::Command {
                op,
                target: target.to_string(),
                source,
            })
    }

    async fn nft_script(
        &self,
        op: &'static str,
        target: &str,
        script: String,
    ) -> Result<(), NetError> {
        self.run(op, target, self.cmd("nft", &["-f", "-"]).stdin(script))
            .await
            .map(drop)
    }

    async fn links(&self, op: &'static str, target: &str) -> Result<Vec<Link>, NetError> {
        let out = self
            .run(op, target, self.cmd("ip", &["-d", "-j", "link", "show"]))
            .await?;
        parse_links(&out).map_err(|reason| NetError::Output {
            op,
            target: target.to_string(),
            reason,
        })
    }

    async fn link(&self, op: &'static str, name: &str) -> Result<Option<Link>, NetError> {
        Ok(self
            .links(op, name)
            .await?
            .into_iter()
            .find(|l| l.name == name))
    }

    async fn has_table(&self, op: &'static str, target: &str) -> Result<bool, NetError> {
        let out = self
            .run(op, target, self.cmd("nft", &["-j", "list", "tables"]))
            .await?;
        nft::has_table(&out, &self.table).map_err(|reason| NetError::Output {
            op,
            target: target.to_string(),
            reason,
        })
    }

    /// The rules of banger's table, or `None` when there is no table.
    async fn rules(
        &self,
        op: &'static str,
        target: &str,
    ) -> Result<Option<Vec<RuleRef>>, NetError> {
        if !self.has_table(op, target).await? {
            return Ok(None);
        }
        let out = self
            .run(
                op,
                target,
                self.cmd(
                    "nft",
                    &["-j", "-a", "list", "table", nft::FAMILY, &self.table],
                ),
            )
            .await?;
        nft::parse_rules(&out, &self.table)
            .map(Some)
            .map_err(|reason| NetError::Output {
                op,
                target: target.to_string(),
                reason,
            })
    }

    /// The rules carrying VM `vm_id`'s comment.
    async fn vm_rules(
        &self,
        op: &'static str,
        vm_id: &str,
    ) -> Result<Option<Vec<RuleRef>>, NetError> {
        Ok(self.rules(op, vm_id).await?.map(|rules| {
            rules
                .into_iter()
                .filter(|r| r.vm_id() == Some(vm_id))
                .collect()
        }))
    }

    async fn ensure_bridge_link(&self, bridge: &BridgeName) -> Result<(), NetError> {
        const OP: &str = "creating bridge";
        let name = bridge.as_str();
        let existing = self.link(OP, name).await?;
        let existing = match existing {
            Some(l) => Some(l),
            None => {
                let mac = MacAddr::for_bridge(bridge).to_string();
                let add = self.cmd(
                    "ip",
                    &[
                        "link", "add", "name", name, "address", &mac, "type", "bridge",
                    ],
                );
                match self.run(OP, name, add).await {
                    Ok(_) => None,
                    // Another caller may have created it meanwhile; judge by what is there now.
                    Err(e) => Some(self.link(OP, name).await?.ok_or(e)?),
                }
            }
        };
        if let Some(l) = existing
            && l.kind.as_deref() != Some("bridge")
        {
            return Err(NetError::NotABridge {
                name: name.to_string(),
                kind: l.kind.unwrap_or_default(),
            });
        }
        Ok(())
    }

    /// Deletes `tap` unconditionally; a missing one is fine. Callers decide it is ours.
    async fn delete_link(&self, tap: &TapName) -> Result<(), NetError> {
        const OP: &str = "deleting tap";
        let name = tap.as_str();
        let del = self.cmd("ip", &["link", "del", "dev", name]);
        match self.run(OP, name, del).await {
            Ok(_) => Ok(()),
            // Decide by looking, not by parsing the error text.
            Err(e) => match self.link(OP, name).await? {
                None => Ok(()),
                Some(_) => Err(e),
            },
        }
    }

    /// Why an existing tap cannot be reused, if it cannot.
    fn tap_mismatch(link: &Link, owner_uid: Option<u32>) -> Option<String> {
        let Some(t) = &link.tun else {
            return Some(format!(
                "its kind is {:?}, not a tun/tap device",
                link.kind.as_deref().unwrap_or_default()
            ));
        };
        if t.mode != "tap" {
            Some(format!("it is a {} device, not a tap", t.mode))
        } else if t.pi || !t.vnet_hdr || t.multi_queue {
            Some(format!(
                "its flags are pi={} vnet_hdr={} multi_queue={}; a VMM needs no pi, vnet_hdr, single queue",
                t.pi, t.vnet_hdr, t.multi_queue
            ))
        } else if t.owner != owner_uid {
            Some(format!("it is owned by {:?}, not {:?}", t.owner, owner_uid))
        } else {
            None
        }
    }
}

#[async_trait::async_trait]
impl NetOps for RealNetOps {
    async fn ensure_bridge(
        &self,
        bridge: &BridgeName,
        gateway: Ipv4Addr,
        prefix: u8,
    ) -> Result<(), NetError> {
        let cidr = check_gateway(bridge, gateway, prefix)?;
        let name = bridge.as_str();
        // The firewall first: the bridge never carries a guest packet the host would accept.
        self.nft_script(
            "firewalling bridge",
            name,
            nft::ensure_script(&self.table, bridge, &cidr, self.tap_owner),
        )
        .await?;
        self.ensure_bridge_link(bridge).await?;
        // banger's table is IPv4 only; with IPv6 off on the bridge the kernel drops every IPv6
        // packet a guest sends (no link-local address to reach host services through). `-e`:
        // a host without IPv6 has no such key, and nothing to protect.
        let key = format!("net.ipv6.conf.{name}.disable_ipv6=1");
        self.run(
            "firewalling bridge",
            name,
            self.cmd("sysctl", &["-q", "-e", "-w", &key]),
        )
        .await?;

        const OP: &str = "addressing bridge";
        let out = self
            .run(
                OP,
                name,
                self.cmd("ip", &["-j", "addr", "show", "dev", name]),
            )
            .await?;
        let addrs = parse_ipv4_addrs(&out).map_err(|reason| NetError::Output {
            op: OP,
            target: name.to_string(),
            reason,
        })?;
        if !addrs.contains(&(gateway, prefix)) {
            let cidr = format!("{gateway}/{prefix}");
            self.run(
                OP,
                name,
                self.cmd("ip", &["addr", "add", &cidr, "dev", name]),
            )
            .await?;
        }
        self.run(
            "bringing up bridge",
            name,
            self.cmd("ip", &["link", "set", "dev", name, "up"]),
        )
        .await?;
        Ok(())
    }

    async fn create_tap(
        &self,
        tap: &TapName,
        bridge: &BridgeName,
        owner_uid: Option<u32>,
    ) -> Result<(), NetError> {
        const OP: &str = "creating tap";
        let name = tap.as_str();
        let created = match self.link(OP, name).await? {
            Some(existing) => {
                let elsewhere = existing
                    .master
                    .as_deref()
                    .filter(|m| *m != bridge.as_str())
                    .map(|m| format!("it is a port of {m}, another installation's bridge"));
                if let Some(reason) = elsewhere.or_else(|| Self::tap_mismatch(&existing, owner_uid))
                {
                    return Err(NetError::TapMismatch {
                        name: name.to_string(),
                        reason,
                    });
                }
                false
            }
            None => {
                let uid = owner_uid.map(|u| u.to_string());
                let mut args = vec!["tuntap", "add", "dev", name, "mode", "tap", "vnet_hdr"];
                if let Some(uid) = &uid {
                    args.extend(["user", uid.as_str()]);
                }
                self.run(OP, name, self.cmd("ip", &args)).await?;
                true
            }
        };
        // Enslaved (a new tap is still down), then isolated and up in one step: an isolated
        // port exchanges frames with the host only, never with another VM's port (a port flag
        // needs the port to exist, so it cannot go in the first command).
        let attach = self.cmd(
            "ip",
            &["link", "set", "dev", name, "master", bridge.as_str()],
        );
        let isolate = self.cmd(
            "ip",
            &[
                "link",
                "set",
                "dev",
                name,
                "up",
                "type",
                "bridge_slave",
                "isolated",
                "on",
            ],
        );
        let attached = match self.run("attaching tap", name, attach).await {
            Ok(_) => self.run("isolating tap", name, isolate).await,
            Err(e) => Err(e),
        };
        if let Err(e) = attached {
            if created {
                // Leave nothing behind; the attach error is the one worth reporting.
                let _ = self.delete_link(tap).await;
            }
            return Err(e);
        }
        Ok(())
    }

    async fn delete_tap(&self, tap: &TapName) -> Result<(), NetError> {
        const OP: &str = "deleting tap";
        let name = tap.as_str();
        match self.link(OP, name).await? {
            None => return Ok(()),
            // Another installation's tap of the same name: this installation's is gone.
            Some(l) if self.not_ours(&l).is_some() => return Ok(()),
            Some(_) => {}
        }
        self.delete_link(tap).await
    }

    async fn host_routes(&self) -> Result<Vec<crate::routes::HostRoute>, NetError> {
        const OP: &str = "reading the host's routes";
        let out = self
            .run(
                OP,
                "main table",
                self.cmd("ip", &["-j", "-4", "route", "show", "table", "main"]),
            )
            .await?;
        crate::routes::parse_ip_routes(&out).map_err(|reason| NetError::Output {
            op: OP,
            target: "main table".into(),
            reason,
        })
    }

    async fn list_taps(&self) -> Result<Vec<TapName>, NetError> {
        let mut taps: Vec<TapName> = self
            .links("listing taps", "interfaces")
            .await?
            .into_iter()
            .filter(|l| self.not_ours(l).is_none())
            .filter_map(|l| TapName::parse(&l.name).ok())
            .collect();
        taps.sort();
        Ok(taps)
    }

    async fn ensure_nat(&self, bridge: &BridgeName, cidr: &Ipv4Cidr) -> Result<(), NetError> {
        const OP: &str = "enabling NAT";
        let target = format!("{bridge} {cidr}");
        // Through sysctl rather than a write to /proc here, so it lands in the namespace the
        // command runs in.
        self.run(
            OP,
            &target,
            self.cmd("sysctl", &["-q", "-w", "net.ipv4.ip_forward=1"]),
        )
        .await?;
        self.nft_script(
            OP,
            &target,
            nft::ensure_script(&self.table, bridge, cidr, self.tap_owner),
        )
        .await
    }

    async fn add_vm_nat(&self, vm_id: &str, ip: Ipv4Addr, tap: &TapName) -> Result<(), NetError> {
        check_vm_id(vm_id)?;
        // The rules match the VM's address, not `tap`: routed packets have the bridge as their
        // interface, never the bridge port, so a tap match would never fire.
        let _ = tap;
        const OP: &str = "adding NAT for VM";
        let Some(stale) = self.vm_rules(OP, vm_id).await? else {
            return Err(NetError::NatNotReady {
                vm_id: vm_id.to_string(),
            });
        };
        self.nft_script(
            OP,
            vm_id,
            nft::add_vm_script(&self.table, vm_id, ip, &stale),
        )
        .await
    }

    async fn remove_vm_nat(&self, vm_id: &str) -> Result<(), NetError> {
        check_vm_id(vm_id)?;
        const OP: &str = "removing NAT for VM";
        match self.vm_rules(OP, vm_id).await? {
            Some(rules) if !rules.is_empty() => {
                self.nft_script(OP, vm_id, nft::delete_script(&self.table, &rules))
                    .await
            }
            _ => Ok(()),
        }
    }

    async fn list_nat_vms(&self) -> Result<Vec<String>, NetError> {
        let mut ids: Vec<String> = self
            .rules("listing NAT VMs", &self.table.clone())
            .await?
            .unwrap_or_default()
            .iter()
            .filter_map(|r| r.vm_id().map(str::to_string))
            .collect();
        ids.sort();
        ids.dedup();
        Ok(ids)
    }

    async fn forget_neighbor(&self, bridge: &BridgeName, ip: Ipv4Addr) -> Result<(), NetError> {
        let ip = ip.to_string();
        self.run(
            "forget_neighbor",
            &ip,
            self.cmd("ip", &["neigh", "flush", "to", &ip, "dev", bridge.as_str()]),
        )
        .await
        .map(drop)
    }

    async fn remove_all(&self, bridge: Option<&BridgeName>) -> Result<(), NetError> {
        let mut first_err = None;
        let mut note = |r: Result<(), NetError>| {
            if let Err(e) = r
                && first_err.is_none()
            {
                first_err = Some(e);
            }
        };
        const OP: &str = "removing banger's table";
        let table = async {
            if self.has_table(OP, &self.table).await? {
                let del = self.cmd("nft", &["delete", "table", nft::FAMILY, &self.table]);
                self.run(OP, &self.table, del).await?;
            }
            Ok(())
        };
        note(table.await);
        match self.list_taps().await {
            Ok(taps) => {
                for tap in taps {
                    note(self.delete_tap(&tap).await);
                }
            }
            Err(e) => note(Err(e)),
        }
        if let Some(bridge) = bridge {
            const OP: &str = "deleting bridge";
            let name = bridge.as_str();
            let del = async {
                if self.link(OP, name).await?.is_some() {
                    self.run(OP, name, self.cmd("ip", &["link", "del", "dev", name]))
                        .await?;
                }
                Ok(())
            };
            note(del.await);
        }
        first_err.map_or(Ok(()), Err)
    }
}

fn parse_links(json: &[u8]) -> Result<Vec<Link>, String> {
    let v: serde_json::Value = serde_json::from_slice(json).map_err(|e| e.to_string())?;
    let items = v.as_array().ok_or("expected a JSON array of links")?;
    items
        .iter()
        .map(|l| {
            let name = l["ifname"].as_str().ok_or("a link without \"ifname\"")?;
            let info = &l["linkinfo"];
            let kind = info["info_kind"].as_str().map(str::to_string);
            let tun = (kind.as_deref() == Some("tun"))
                .then(|| parse_tun(name, &info["info_data"]))
                .transpose()?;
            Ok(Link {
                name: name.to_string(),
                kind,
                master: l["master"].as_str().map(str::to_string),
                tun,
            })
        })
        .collect()
}

fn parse_tun(name: &str, data: &serde_json::Value) -> Result<TunInfo, String> {
    let flag = |k: &str| data[k].as_bool().unwrap_or(false);
    // iproute2 prints the owner as a user name when it resolves, else as a number.
    let owner = match &data["user"] {
        serde_json::Value::Null => None,
        serde_json::Value::Number(n) => Some(
            n.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| format!("{name}: owner {n} is not a uid"))?,
        ),
        serde_json::Value::String(user) => Some(
            nix::unistd::User::from_name(user)
                .ok()
                .flatten()
                .ok_or_else(|| format!("{name}: owner {user:?} is not a known user"))?
                .uid
                .as_raw(),
        ),
        other => return Err(format!("{name}: unexpected owner {other}")),
    };
    Ok(TunInfo {
        mode: data["type"].as_str().unwrap_or_default().to_string(),
        pi: flag("pi"),
        vnet_hdr: flag("vnet_hdr"),
        multi_queue: flag("multi_queue"),
        owner,
    })
}

fn parse_ipv4_addrs(json: &[u8]) -> Result<Vec<(Ipv4Addr, u8)>, String> {
    let v: serde_json::Value = serde_json::from_slice(json).map_err(|e| e.to_string())?;
    let links = v.as_array().ok_or("expected a JSON array")?;
    let mut out = Vec::new();
    for info in links
        .iter()
        .filter_map(|l| l["addr_info"].as_array())
        .flatten()
    {
        if info["family"] != "inet" {
            continue;
        }
        let local = info["local"]
            .as_str()
            .ok_or("an address without \"local\"")?;
        let ip: Ipv4Addr = local
            .parse()
            .map_err(|_| format!("bad IPv4 address {local:?}"))?;
        let prefix = info["prefixlen"]
            .as_u64()
            .and_then(|p| u8::try_from(p).ok())
            .ok_or_else(|| format!("{local}: bad prefixlen"))?;
        out.push((ip, prefix));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::Mutex;

    use banger_sys::RunError;

    use super::*;

    /// Replies to commands in order from a script of canned results, recording each command.
    #[derive(Debug, Default)]
    struct Scripted {
        calls: Mutex<Vec<Cmd>>,
        replies: Mutex<VecDeque<Result<String, String>>>,
    }

    impl Scripted {
        fn new(replies: &[Result<&str, &str>]) -> Arc<Self> {
            Arc::new(Scripted {
                calls: Mutex::default(),
                replies: Mutex::new(
                    replies
                        .iter()
                        .map(|r| r.map(str::to_string).map_err(str::to_string))
                        .collect(),
                ),
            })
        }

        /// Each call as one line: argv joined by spaces, then ` <<< ` and stdin if any.
        fn lines(&self) -> Vec<String> {
            self.calls
                .lock()
                .unwrap()
                .iter()
                .map(|c| match &c.stdin {
                    Some(s) => format!("{} <<< {}", c.display(), String::from_utf8_lossy(s)),
                    None => c.display(),
                })
                .collect()
        }
    }

    #[async_trait::async_trait]
    impl CommandRunner for Scripted {
        async fn run(&self, cmd: &Cmd) -> Result<Vec<u8>, RunError> {
            self.calls.lock().unwrap().push(cmd.clone());
            match self.replies.lock().unwrap().pop_front() {
                Some(Ok(out)) => Ok(out.into_bytes()),
                Some(Err(stderr)) => Err(RunError::Failed {
                    cmd: cmd.display(),
                    status: "exit status: 1".into(),
                    stderr,
                }),
                None => panic!("unexpected command {}", cmd.display()),
            }
        }
    }

    fn ops(r: &Arc<Scripted>) -> RealNetOps {
        RealNetOps::new(r.clone())
    }

    const NO_LINKS: &str = r#"[{"ifname":"lo","linkinfo":null},{"ifname":"eth0"}]"#;
    const BRIDGE: &str = r#"[{"ifname":"br-banger","linkinfo":{"info_kind":"bridge"}}]"#;
    const NO_TABLE: &str = r#"{"nftables":[{"metainfo":{}}]}"#;
    const TABLE: &str =
        r#"{"nftables":[{"metainfo":{}},{"table":{"family":"ip","name":"banger"}}]}"#;

    fn tap_link(name: &str, user: &str, vnet_hdr: bool) -> String {
        format!(
            r#"[{{"ifname":"{name}","linkinfo":{{"info_kind":"tun","info_data":{{"type":"tap","pi":false,"vnet_hdr":{vnet_hdr},"multi_queue":false,"persist":true,"user":{user}}}}}}}]"#
        )
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[tokio::test]
    async fn ensure_bridge_creates_addresses_and_raises() {
        let r = Scripted::new(&[
            Ok(""),
            Ok(NO_LINKS),
            Ok(""),
            Ok(""),
            Ok(r#"[{"addr_info":[]}]"#),
            Ok(""),
            Ok(""),
        ]);
        ops(&r)
            .ensure_bridge(&BridgeName::default(), ip("172.30.0.1"), 24)
            .await
            .unwrap();
        let mac = MacAddr::for_bridge(&BridgeName::default());
        let cidr = Ipv4Cidr::parse("172.30.0.0/24").unwrap();
        assert_eq!(
            r.lines(),
            [
                format!(
                    "nft -f - <<< {}",
                    nft::ensure_script(nft::TABLE, &BridgeName::default(), &cidr, None)
                ),
                "ip -d -j link show".to_string(),
                format!("ip link add name br-banger address {mac} type bridge"),
                "sysctl -q -e -w net.ipv6.conf.br-banger.disable_ipv6=1".into(),
                "ip -j addr show dev br-banger".into(),
                "ip addr add 172.30.0.1/24 dev br-banger".into(),
                "ip link set dev br-banger up".into(),
            ]
        );
    }

    #[tokio::test]
    async fn ensure_bridge_keeps_an_existing_address() {
        let addrs = r#"[{"addr_info":[{"family":"inet6","local":"fe80::1","prefixlen":64},{"family":"inet","local":"172.30.0.1","prefixlen":24}]}]"#;
        let r = Scripted::new(&[Ok(""), Ok(BRIDGE), Ok(""), Ok(addrs), Ok("")]);
        ops(&r)
            .ensure_bridge(&BridgeName::default(), ip("172.30.0.1"), 24)
            .await
            .unwrap();
        assert_eq!(
            r.lines()[1..],
            [
                "ip -d -j link show",
                "sysctl -q -e -w net.ipv6.conf.br-banger.disable_ipv6=1",
                "ip -j addr show dev br-banger",
                "ip link set dev br-banger up"
            ]
        );
    }

    #[tokio::test]
    async fn ensure_bridge_refuses_a_non_bridge_and_bad_gateways() {
        let veth = r#"[{"ifname":"br-banger","linkinfo":{"info_kind":"veth"}}]"#;
        let r = Scripted::new(&[Ok(""), Ok(veth)]);
        let e = ops(&r)
            .ensure_bridge(&BridgeName::default(), ip("172.30.0.1"), 24)
            .await
            .unwrap_err();
        assert!(
            matches!(e, NetError::NotABridge { ref kind, .. } if kind == "veth"),
            "{e}"
        );

        let r = Scripted::new(&[]);
        let e = ops(&r)
            .ensure_bridge(&BridgeName::default(), ip("172.30.0.0"), 24)
            .await
            .unwrap_err();
        assert!(matches!(e, NetError::InvalidGateway { .. }));
        assert!(r.lines().is_empty());
    }

    #[tokio::test]
    async fn ensure_bridge_tolerates_a_concurrent_create() {
        let r = Scripted::new(&[
            Ok(""),
            Ok(NO_LINKS),
            Err("RTNETLINK answers: File exists"),
            Ok(BRIDGE),
            Ok(""),
            Ok(r#"[{"addr_info":[{"family":"inet","local":"172.30.0.1","prefixlen":24}]}]"#),
            Ok(""),
        ]);
        ops(&r)
            .ensure_bridge(&BridgeName::default(), ip("172.30.0.1"), 24)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn create_tap_commands() {
        let r = Scripted::new(&[Ok(NO_LINKS), Ok(""), Ok(""), Ok("")]);
        let tap = TapName::pool(3);
        ops(&r)
            .create_tap(&tap, &BridgeName::default(), Some(1000))
            .await
            .unwrap();
        assert_eq!(
            r.lines(),
            [
                "ip -d -j link show",
                "ip tuntap add dev bgtpool3 mode tap vnet_hdr user 1000",
                "ip link set dev bgtpool3 master br-banger",
                "ip link set dev bgtpool3 up type bridge_slave isolated on",
            ]
        );

        let r = Scripted::new(&[Ok(NO_LINKS), Ok(""), Ok(""), Ok("")]);
        ops(&r)
            .create_tap(&tap, &BridgeName::default(), None)
            .await
            .unwrap();
        assert_eq!(r.lines()[1], "ip tuntap add dev bgtpool3 mode tap vnet_hdr");
    }

    #[tokio::test]
    async fn create_tap_reuses_a_matching_tap_and_refuses_others() {
        let tap = TapName::pool(0);
        let br = BridgeName::default();
        let r = Scripted::new(&[Ok(&tap_link("bgtpool0", "1000", true)), Ok(""), Ok("")]);
        ops(&r).create_tap(&tap, &br, Some(1000)).await.unwrap();
        assert_eq!(
            r.lines(),
            [
                "ip -d -j link show",
                "ip link set dev bgtpool0 master br-banger",
                "ip link set dev bgtpool0 up type bridge_slave isolated on",
            ]
        );

        for (link, owner) in [
            (tap_link("bgtpool0", "1001", true), Some(1000)),
            (tap_link("bgtpool0", "1000", false), Some(1000)),
            (tap_link("bgtpool0", "1000", true), None),
            (
                r#"[{"ifname":"bgtpool0","linkinfo":{"info_kind":"veth"}}]"#.to_string(),
                Some(1000),
            ),
        ] {
            let r = Scripted::new(&[Ok(&link)]);
            let e = ops(&r).create_tap(&tap, &br, owner).await.unwrap_err();
            assert!(matches!(e, NetError::TapMismatch { .. }), "{e}");
            assert!(e.to_string().contains("bgtpool0"), "{e}");
        }
    }

    #[tokio::test]
    async fn create_tap_undoes_itself_when_attaching_fails() {
        let r = Scripted::new(&[
            Ok(NO_LINKS),
            Ok(""),
            Err("Cannot find device \"br-banger\""),
            Ok(""),
        ]);
        let e = ops(&r)
            .create_tap(&TapName::pool(1), &BridgeName::default(), None)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("attaching tap bgtpool1"), "{e}");
        assert_eq!(r.lines()[3], "ip link del dev bgtpool1");

        // Isolation failing undoes the tap too: no VM gets a port that can reach other VMs.
        let r = Scripted::new(&[Ok(NO_LINKS), Ok(""), Ok(""), Err("bad attribute"), Ok("")]);
        let e = ops(&r)
            .create_tap(&TapName::pool(1), &BridgeName::default(), None)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("isolating tap bgtpool1"), "{e}");
        assert_eq!(r.lines()[4], "ip link del dev bgtpool1");
    }

    /// `tap_link` as a port of `master`.
    fn port(name: &str, user: &str, master: &str) -> String {
        tap_link(name, user, true).replacen(
            r#""linkinfo""#,
            &format!(r#""master":"{master}","linkinfo""#),
            1,
        )
    }

    #[tokio::test]
    async fn delete_tap_missing_is_fine_but_other_failures_are_not() {
        let r = Scripted::new(&[Ok(NO_LINKS)]);
        ops(&r).delete_tap(&TapName::pool(1)).await.unwrap();
        assert_eq!(r.lines(), ["ip -d -j link show"]);

        let mine = port("bgtpool1", "0", "br-banger");
        let r = Scripted::new(&[Ok(&mine), Err("Operation not permitted"), Ok(&mine)]);
        let e = ops(&r).delete_tap(&TapName::pool(1)).await.unwrap_err();
        assert!(e.to_string().contains("deleting tap bgtpool1"), "{e}");

        // Gone between the look and the delete: fine.
        let r = Scripted::new(&[Ok(&mine), Err("Cannot find device"), Ok(NO_LINKS)]);
        ops(&r).delete_tap(&TapName::pool(1)).await.unwrap();
    }

    #[tokio::test]
    async fn host_routes_come_from_the_main_table_as_json() {
        let r = Scripted::new(&[
            Ok(r#"[{"dst":"default","dev":"eth0"},{"dst":"172.30.0.0/24","dev":"eth0"}]"#),
            Ok("not json"),
        ]);
        let routes = ops(&r).host_routes().await.unwrap();
        assert_eq!(routes[1].to_string(), "172.30.0.0/24 dev eth0");
        assert_eq!(r.lines()[0], "ip -j -4 route show table main");
        let e = ops(&r).host_routes().await.unwrap_err().to_string();
        assert!(e.contains("routes") && e.contains("not JSON"), "{e}");
    }

    #[tokio::test]
    async fn delete_tap_leaves_other_installations_taps_alone() {
        let tap = TapName::pool(1);
        // A port of another bridge, and an orphan of another owner: nothing is deleted.
        for link in [
            port("bgtpool1", "1000", "br-banger-b"),
            tap_link("bgtpool1", "2000", true),
        ] {
            let r = Scripted::new(&[Ok(&link)]);
            ops(&r).with_tap_owner(1000).delete_tap(&tap).await.unwrap();
            assert_eq!(r.lines(), ["ip -d -j link show"], "{link}");
        }
        // An orphan is ours only with our owner, and only when we know our owner.
        let orphan = tap_link("bgtpool1", "1000", true);
        let r = Scripted::new(&[Ok(&orphan)]);
        ops(&r).delete_tap(&tap).await.unwrap();
        assert_eq!(r.lines().len(), 1);
        let r = Scripted::new(&[Ok(&orphan), Ok("")]);
        ops(&r).with_tap_owner(1000).delete_tap(&tap).await.unwrap();
        assert_eq!(r.lines()[1], "ip link del dev bgtpool1");
        // A named installation deletes its own ports.
        let br = BridgeName::parse("br-banger-b").unwrap();
        let r = Scripted::new(&[Ok(&port("bgtpool1", "1000", "br-banger-b")), Ok("")]);
        ops(&r).for_bridge(&br).delete_tap(&tap).await.unwrap();
        assert_eq!(r.lines()[1], "ip link del dev bgtpool1");
    }

    #[tokio::test]
    async fn create_tap_refuses_a_port_of_another_bridge() {
        let r = Scripted::new(&[Ok(&port("bgtpool0", "1000", "br-banger-b"))]);
        let e = ops(&r)
            .create_tap(&TapName::pool(0), &BridgeName::default(), Some(1000))
            .await
            .unwrap_err();
        assert!(matches!(e, NetError::TapMismatch { .. }), "{e}");
        assert!(e.to_string().contains("br-banger-b"), "{e}");
        assert_eq!(r.lines().len(), 1, "nothing may be changed");
    }

    #[tokio::test]
    async fn list_taps_keeps_only_banger_names_on_our_bridge() {
        let links = r#"[{"ifname":"lo"},{"ifname":"eth0","master":"br-banger"},{"ifname":"bgtpool1","master":"br-banger"},{"ifname":"tap0","master":"br-banger"},
            {"ifname":"bgt3fa9c01d2e4b","master":"br-banger","linkinfo":{"info_kind":"tun","info_data":{"type":"tap"}}},{"ifname":"br-banger"},
            {"ifname":"bgtpool2","master":"br-banger-b"},{"ifname":"bgtpool3"},
            {"ifname":"bgtpool4","linkinfo":{"info_kind":"tun","info_data":{"type":"tap","user":1000}}}]"#;
        let r = Scripted::new(&[Ok(links)]);
        let taps = ops(&r).list_taps().await.unwrap();
        let names: Vec<_> = taps.iter().map(TapName::as_str).collect();
        assert_eq!(names, ["bgt3fa9c01d2e4b", "bgtpool1"]);
        let r = Scripted::new(&[Ok(links)]);
        let taps = ops(&r).with_tap_owner(1000).list_taps().await.unwrap();
        let names: Vec<_> = taps.iter().map(TapName::as_str).collect();
        assert_eq!(names, ["bgt3fa9c01d2e4b", "bgtpool1", "bgtpool4"]);
    }

    #[tokio::test]
    async fn ensure_nat_commands() {
        let r = Scripted::new(&[Ok(""), Ok("")]);
        let cidr = Ipv4Cidr::parse("172.30.0.0/24").unwrap();
        ops(&r)
            .ensure_nat(&BridgeName::default(), &cidr)
            .await
            .unwrap();
        let calls = r.calls.lock().unwrap().clone();
        assert_eq!(calls[0].display(), "sysctl -q -w net.ipv4.ip_forward=1");
        assert_eq!(calls[1].display(), "nft -f -");
        assert_eq!(
            calls[1].stdin.as_deref(),
            Some(nft::ensure_script(nft::TABLE, &BridgeName::default(), &cidr, None).as_bytes())
        );
    }

    #[tokio::test]
    async fn add_vm_nat_replaces_the_old_set_in_one_script() {
        let listing = r#"{"nftables":[{"rule":{"family":"ip","table":"banger","chain":"nat_vms","handle":7,"comment":"banger:aaa"}},
            {"rule":{"family":"ip","table":"banger","chain":"nat_vms","handle":8,"comment":"banger:bbb"}}]}"#;
        let r = Scripted::new(&[Ok(TABLE), Ok(listing), Ok("")]);
        ops(&r)
            .add_vm_nat("aaa", ip("172.30.0.9"), &TapName::pool(0))
            .await
            .unwrap();
        let lines = r.lines();
        assert_eq!(lines[0], "nft -j list tables");
        assert_eq!(lines[1], "nft -j -a list table ip banger");
        let stale = [RuleRef {
            chain: "nat_vms".into(),
            handle: 7,
            comment: Some("banger:aaa".into()),
        }];
        assert_eq!(
            lines[2],
            format!(
                "nft -f - <<< {}",
                nft::add_vm_script(nft::TABLE, "aaa", ip("172.30.0.9"), &stale)
            )
        );
        assert!(!lines[2].contains("handle 8"));
    }

    #[tokio::test]
    async fn add_vm_nat_needs_the_table() {
        let r = Scripted::new(&[Ok(NO_TABLE)]);
        let e = ops(&r)
            .add_vm_nat("aaa", ip("172.30.0.9"), &TapName::pool(0))
            .await
            .unwrap_err();
        assert!(matches!(e, NetError::NatNotReady { ref vm_id } if vm_id == "aaa"));
    }

    #[tokio::test]
    async fn vm_ids_cannot_inject_into_scripts() {
        for evil in [
            "x\" ; flush ruleset ; \"",
            "x\nflush ruleset",
            "a b",
            "",
            "X",
        ] {
            let r = Scripted::new(&[]);
            let e = ops(&r)
                .add_vm_nat(evil, ip("172.30.0.9"), &TapName::pool(0))
                .await
                .unwrap_err();
            assert!(matches!(e, NetError::InvalidVmId { .. }), "{evil:?}");
            let e = ops(&r).remove_vm_nat(evil).await.unwrap_err();
            assert!(matches!(e, NetError::InvalidVmId { .. }), "{evil:?}");
            assert!(r.lines().is_empty(), "nothing may run for {evil:?}");
        }
        // Names reaching a script are validated types; a hostile one never gets that far.
        assert!(BridgeName::parse("br-banger\";").is_err());
        assert!(TapName::parse("bgt\" accept").is_err());
    }

    #[tokio::test]
    async fn remove_vm_nat_deletes_by_handle_and_tolerates_nothing() {
        let listing = r#"{"nftables":[{"rule":{"family":"ip","table":"banger","chain":"nat_vms","handle":7,"comment":"banger:aaa"}},
            {"rule":{"family":"ip","table":"banger","chain":"fwd_out","handle":9,"comment":"banger:aaa"}},
            {"rule":{"family":"ip","table":"banger","chain":"fwd_out","handle":10,"comment":"banger:aaab"}}]}"#;
        let r = Scripted::new(&[Ok(TABLE), Ok(listing), Ok("")]);
        ops(&r).remove_vm_nat("aaa").await.unwrap();
        assert_eq!(
            r.lines()[2],
            "nft -f - <<< delete rule ip banger nat_vms handle 7\ndelete rule ip banger fwd_out handle 9\n"
        );

        // No rules for that VM: nothing is run after the listing.
        let r = Scripted::new(&[Ok(TABLE), Ok(listing)]);
        ops(&r).remove_vm_nat("ccc").await.unwrap();
        assert_eq!(r.lines().len(), 2);

        // No table at all.
        let r = Scripted::new(&[Ok(NO_TABLE)]);
        ops(&r).remove_vm_nat("aaa").await.unwrap();
        assert_eq!(r.lines(), ["nft -j list tables"]);
    }

    #[tokio::test]
    async fn list_nat_vms_dedups_and_skips_base_rules() {
        let listing = r#"{"nftables":[{"rule":{"family":"ip","table":"banger","chain":"postrouting","handle":1,"comment":"banger-base"}},
            {"rule":{"family":"ip","table":"banger","chain":"nat_vms","handle":7,"comment":"banger:bbb"}},
            {"rule":{"family":"ip","table":"banger","chain":"fwd_out","handle":9,"comment":"banger:aaa"}},
            {"rule":{"family":"ip","table":"banger","chain":"fwd_in","handle":10,"comment":"banger:bbb"}}]}"#;
        let r = Scripted::new(&[Ok(TABLE), Ok(listing)]);
        assert_eq!(ops(&r).list_nat_vms().await.unwrap(), ["aaa", "bbb"]);
        let r = Scripted::new(&[Ok(NO_TABLE)]);
        assert!(ops(&r).list_nat_vms().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn remove_all_runs_every_step_despite_failures() {
        let links = r#"[{"ifname":"bgtpool0","master":"br-banger"},{"ifname":"bgtpool1","master":"br-banger"},
            {"ifname":"bgtpool2","master":"br-banger-b"},{"ifname":"br-banger","linkinfo":{"info_kind":"bridge"}}]"#;
        let r = Scripted::new(&[
            Ok(TABLE),
            Err("nft exploded"),
            Ok(links),
            Ok(links),
            Ok(""),
            Ok(links),
            Ok(""),
            Ok(links),
            Ok(""),
        ]);
        let e = ops(&r)
            .remove_all(Some(&BridgeName::default()))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("removing banger's table"), "{e}");
        assert_eq!(
            r.lines(),
            [
                "nft -j list tables",
                "nft delete table ip banger",
                "ip -d -j link show",
                "ip -d -j link show",
                "ip link del dev bgtpool0",
                "ip -d -j link show",
                "ip link del dev bgtpool1",
                "ip -d -j link show",
                "ip link del dev br-banger",
            ]
        );
    }

    #[tokio::test]
    async fn netns_prefixes_every_command() {
        let r = Scripted::new(&[Ok(NO_TABLE)]);
        let o = ops(&r).in_netns("bgtest-x").unwrap();
        o.list_nat_vms().await.unwrap();
        let c = r.calls.lock().unwrap()[0].clone();
        assert_eq!(c.program.to_str(), Some("ip"));
        assert_eq!(&c.args[..3], ["netns", "exec", "bgtest-x"]);
        assert!(c.args[3].to_string_lossy().ends_with("nft"));
        assert_eq!(&c.args[4..], ["-j", "list", "tables"]);
        for bad in ["", "..", "-x", "a b", "a/b", &"n".repeat(65)] {
            let e = ops(&r).in_netns(bad).unwrap_err();
            assert!(matches!(e, NetError::InvalidNetns { .. }), "{bad:?}");
        }
    }

    #[test]
    fn parses_tun_owners_by_number_and_name() {
        let links = parse_links(tap_link("bgt1", "\"root\"", true).as_bytes()).unwrap();
        assert_eq!(links[0].tun.as_ref().unwrap().owner, Some(0));
        let links = parse_links(tap_link("bgt1", "4242", true).as_bytes()).unwrap();
        assert_eq!(links[0].tun.as_ref().unwrap().owner, Some(4242));
        assert!(parse_links(tap_link("bgt1", "\"no-such-user-xyz\"", true).as_bytes()).is_err());
        assert!(parse_links(b"{}").is_err());
    }
}
