//! The host's own IPv4 routes, and choosing a bridge network that none of them overlaps.
//!
//! A bridge address range that the host already routes elsewhere (banger running inside a VM
//! whose own network is `172.30.0.0/24`, a VPN, a docker network) makes the kernel send that
//! traffic to banger's bridge: the host is cut off from that network. So a configured
//! `bridge_cidr` is checked against the main routing table (`ip -j -4 route show table main`),
//! and an unconfigured one is picked from [`DEFAULT_CIDR_CANDIDATES`].

use std::net::Ipv4Addr;

use banger_config::Ipv4Cidr;

use crate::NetError;

/// The networks tried, in order, when `bridge_cidr` is not configured: the first that no host
/// route overlaps is used (and then kept, see the daemon). The first is
/// [`banger_config::Config::DEFAULT_CIDR`].
pub const DEFAULT_CIDR_CANDIDATES: &[&str] = &[
    "172.30.0.0/24",
    "172.29.0.0/24",
    "10.213.0.0/24",
    "10.230.17.0/24",
    "192.168.213.0/24",
];

/// One route of the host's main table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRoute {
    /// The destination network (`default` is `0.0.0.0/0`).
    pub network: Ipv4Addr,
    pub prefix: u8,
    /// The interface it leaves through; none for `unreachable`/`blackhole` routes.
    pub dev: Option<String>,
}

impl HostRoute {
    fn mask(prefix: u8) -> u32 {
        if prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(prefix))
        }
    }

    /// Whether this route and `cidr` share any address.
    pub fn overlaps(&self, cidr: &Ipv4Cidr) -> bool {
        // Two prefixes overlap when they agree on the shorter one's bits.
        let shorter = self.prefix.min(cidr.prefix());
        let m = Self::mask(shorter);
        u32::from(self.network) & m == u32::from(cidr.network()) & m
    }
}

impl std::fmt::Display for HostRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)?;
        match &self.dev {
            Some(dev) => write!(f, " dev {dev}"),
            None => Ok(()),
        }
    }
}

/// Parses `ip -j -4 route show` output. A destination without a prefix is a host route (/32).
pub fn parse_ip_routes(json: &[u8]) -> Result<Vec<HostRoute>, String> {
    let v: serde_json::Value =
        serde_json::from_slice(json).map_err(|e| format!("not JSON: {e}"))?;
    let list = v.as_array().ok_or("not a JSON list")?;
    let mut routes = Vec::with_capacity(list.len());
    for r in list {
        let dst = r["dst"].as_str().ok_or("a route without \"dst\"")?;
        let (network, prefix) = if dst == "default" {
            (Ipv4Addr::UNSPECIFIED, 0)
        } else {
            let (addr, prefix) = dst.split_once('/').unwrap_or((dst, "32"));
            let addr: Ipv4Addr = addr
                .parse()
                .map_err(|_| format!("route destination {dst:?} is not IPv4"))?;
            let prefix: u8 = prefix
                .parse()
                .ok()
                .filter(|p| *p <= 32)
                .ok_or_else(|| format!("route destination {dst:?} has a bad prefix"))?;
            (addr, prefix)
        };
        routes.push(HostRoute {
            network,
            prefix,
            dev: r["dev"].as_str().map(str::to_string),
        });
    }
    Ok(routes)
}

/// The first route that `cidr` would collide with. The default route (it overlaps everything
/// and is only the fallback) and the routes of banger's own bridge `bridge` do not count.
pub fn overlapping_route<'a>(
    cidr: &Ipv4Cidr,
    bridge: &str,
    routes: &'a [HostRoute],
) -> Option<&'a HostRoute> {
    routes
        .iter()
        .filter(|r| r.prefix > 0 && r.dev.as_deref() != Some(bridge))
        .find(|r| r.overlaps(cidr))
}

/// Refuses `cidr` when a host route overlaps it, naming both.
pub fn check_cidr_free(
    cidr: &Ipv4Cidr,
    bridge: &str,
    routes: &[HostRoute],
) -> Result<(), NetError> {
    match overlapping_route(cidr, bridge, routes) {
        None => Ok(()),
        Some(route) => Err(NetError::CidrOverlap {
            cidr: *cidr,
            route: route.to_string(),
        }),
    }
}

/// The first of [`DEFAULT_CIDR_CANDIDATES`] that no host route overlaps.
pub fn pick_free_cidr(bridge: &str, routes: &[HostRoute]) -> Option<Ipv4Cidr> {
    DEFAULT_CIDR_CANDIDATES
        .iter()
        .filter_map(|c| Ipv4Cidr::parse(c).ok())
        .find(|c| overlapping_route(c, bridge, routes).is_none())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(s: &str) -> Ipv4Cidr {
        Ipv4Cidr::parse(s).unwrap()
    }

    const HOST_ON_172_30: &str = r#"[{"dst":"default","gateway":"172.30.0.1","dev":"eth0","flags":[]},
        {"dst":"172.30.0.0/24","dev":"eth0","protocol":"kernel","scope":"link","prefsrc":"172.30.0.2","flags":[]},
        {"dst":"10.9.9.9","dev":"wg0","flags":[]},
        {"dst":"192.168.213.0/24","type":"unreachable","flags":[]}]"#;

    #[test]
    fn parses_ip_json_routes() {
        let r = parse_ip_routes(HOST_ON_172_30.as_bytes()).unwrap();
        assert_eq!(r.len(), 4);
        assert_eq!((r[0].network, r[0].prefix), (Ipv4Addr::UNSPECIFIED, 0));
        assert_eq!(r[1].to_string(), "172.30.0.0/24 dev eth0");
        assert_eq!((r[2].prefix, r[2].dev.as_deref()), (32, Some("wg0")));
        assert_eq!(r[3].dev, None);
        assert!(parse_ip_routes(b"[{\"dst\":\"fe80::/64\"}]").is_err());
        assert!(parse_ip_routes(b"[{\"dst\":\"1.2.3.0/33\"}]").is_err());
        assert!(parse_ip_routes(b"{}").is_err());
        assert_eq!(parse_ip_routes(b"[]").unwrap(), vec![]);
    }

    #[test]
    fn overlap_is_refused_naming_both_and_own_bridge_and_default_do_not_count() {
        let routes = parse_ip_routes(HOST_ON_172_30.as_bytes()).unwrap();
        let e = check_cidr_free(&cidr("172.30.0.0/24"), "br-banger", &routes)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("172.30.0.0/24") && e.contains("dev eth0") && e.contains("bridge_cidr"),
            "{e}"
        );
        // A wider or narrower network overlapping it counts too.
        assert!(check_cidr_free(&cidr("172.30.0.0/16"), "br-banger", &routes).is_err());
        assert!(check_cidr_free(&cidr("172.30.0.128/25"), "br-banger", &routes).is_err());
        // A host route inside the range.
        assert!(check_cidr_free(&cidr("10.9.9.0/24"), "br-banger", &routes).is_err());
        // Only the default route covers it: free.
        check_cidr_free(&cidr("172.29.0.0/24"), "br-banger", &routes).unwrap();
        // banger's own bridge route is not a collision.
        let mut own = routes.clone();
        own.retain(|r| r.dev.as_deref() != Some("eth0") || r.prefix == 0);
        own.push(HostRoute {
            network: "172.30.0.0".parse().unwrap(),
            prefix: 24,
            dev: Some("br-banger".into()),
        });
        check_cidr_free(&cidr("172.30.0.0/24"), "br-banger", &own).unwrap();
        assert!(check_cidr_free(&cidr("172.30.0.0/24"), "br-banger-t1", &own).is_err());
    }

    #[test]
    fn picks_the_first_free_candidate() {
        assert_eq!(
            DEFAULT_CIDR_CANDIDATES[0],
            banger_config::Config::DEFAULT_CIDR
        );
        assert_eq!(
            pick_free_cidr("br-banger", &[]),
            Some(cidr("172.30.0.0/24"))
        );
        let routes = parse_ip_routes(HOST_ON_172_30.as_bytes()).unwrap();
        assert_eq!(
            pick_free_cidr("br-banger", &routes),
            Some(cidr("172.29.0.0/24"))
        );
        // Everything private routed elsewhere: nothing free.
        let all: Vec<HostRoute> = ["10.0.0.0", "172.16.0.0", "192.168.0.0"]
            .iter()
            .zip([8, 12, 16])
            .map(|(n, p)| HostRoute {
                network: n.parse().unwrap(),
                prefix: p,
                dev: Some("vpn0".into()),
            })
            .collect();
        assert_eq!(pick_free_cidr("br-banger", &all), None);
    }
}
