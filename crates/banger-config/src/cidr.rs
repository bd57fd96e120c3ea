//! The bridge's IPv4 network.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// Why a string is not an acceptable bridge network.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    #[error("expected an IPv4 network like 172.30.0.0/24")]
    Syntax,
    #[error("prefix /{0} is outside /8../30 (a /31 or /32 has no room for a gateway and VMs)")]
    Prefix(u8),
    #[error("host bits are set; the network address is {0}")]
    HostBits(String),
}

/// An IPv4 network with a prefix of 8 to 30 bits. The first host address is the bridge's
/// (the VMs' gateway); the others up to the broadcast address are for VMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ipv4Cidr {
    network: Ipv4Addr,
    prefix: u8,
}

impl Ipv4Cidr {
    pub const MIN_PREFIX: u8 = 8;
    pub const MAX_PREFIX: u8 = 30;

    /// A network from its address and prefix; the address must have no host bits set.
    pub fn new(network: Ipv4Addr, prefix: u8) -> Result<Self, CidrError> {
        if !(Self::MIN_PREFIX..=Self::MAX_PREFIX).contains(&prefix) {
            return Err(CidrError::Prefix(prefix));
        }
        let mask = Self::mask_bits(prefix);
        let masked = Ipv4Addr::from(u32::from(network) & mask);
        if masked != network {
            return Err(CidrError::HostBits(format!("{masked}/{prefix}")));
        }
        Ok(Ipv4Cidr { network, prefix })
    }

    pub fn parse(s: &str) -> Result<Self, CidrError> {
        let (addr, prefix) = s.trim().split_once('/').ok_or(CidrError::Syntax)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| CidrError::Syntax)?;
        // Digits only: `u8::from_str` would accept a leading '+'.
        if prefix.is_empty() || prefix.len() > 2 || !prefix.bytes().all(|b| b.is_ascii_digit()) {
            return Err(CidrError::Syntax);
        }
        let prefix: u8 = prefix.parse().map_err(|_| CidrError::Syntax)?;
        Ipv4Cidr::new(addr, prefix)
    }

    fn mask_bits(prefix: u8) -> u32 {
        u32::MAX << (32 - u32::from(prefix))
    }

    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(Self::mask_bits(self.prefix))
    }

    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) | !Self::mask_bits(self.prefix))
    }

    /// The first host address: the bridge's own, and every VM's default route.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 1)
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & Self::mask_bits(self.prefix) == u32::from(self.network)
    }

    /// The addresses available to VMs, ascending: every host address except the gateway.
    pub fn hosts(&self) -> impl Iterator<Item = Ipv4Addr> + Clone + use<> {
        let first = u32::from(self.network) + 2;
        let last = u32::from(self.broadcast()) - 1;
        (first..=last).map(Ipv4Addr::from)
    }

    /// How many addresses [`Ipv4Cidr::hosts`] yields.
    pub fn host_count(&self) -> u32 {
        (1u32 << (32 - u32::from(self.prefix))) - 3
    }
}

impl std::fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl std::str::FromStr for Ipv4Cidr {
    type Err = CidrError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ipv4Cidr::parse(s)
    }
}

impl Serialize for Ipv4Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Ipv4Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ipv4Cidr::parse(&s).map_err(|e| serde::de::Error::custom(format!("{s:?}: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn default_network_layout() {
        let c = Ipv4Cidr::parse("172.30.0.0/24").unwrap();
        assert_eq!(c.network(), ip("172.30.0.0"));
        assert_eq!(c.prefix(), 24);
        assert_eq!(c.netmask(), ip("255.255.255.0"));
        assert_eq!(c.gateway(), ip("172.30.0.1"));
        assert_eq!(c.broadcast(), ip("172.30.0.255"));
        assert_eq!(c.to_string(), "172.30.0.0/24");
        let hosts: Vec<_> = c.hosts().collect();
        assert_eq!(hosts.len(), 253);
        assert_eq!(hosts.len() as u32, c.host_count());
        assert_eq!(hosts[0], ip("172.30.0.2"));
        assert_eq!(*hosts.last().unwrap(), ip("172.30.0.254"));
        assert!(!hosts.contains(&c.network()));
        assert!(!hosts.contains(&c.gateway()));
        assert!(!hosts.contains(&c.broadcast()));
    }

    #[test]
    fn smallest_network_has_one_vm_address() {
        let c = Ipv4Cidr::parse("10.0.0.4/30").unwrap();
        assert_eq!(c.gateway(), ip("10.0.0.5"));
        assert_eq!(c.hosts().collect::<Vec<_>>(), [ip("10.0.0.6")]);
        assert_eq!(c.host_count(), 1);
    }

    #[test]
    fn largest_network_iterates_lazily() {
        let c = Ipv4Cidr::parse("10.0.0.0/8").unwrap();
        assert_eq!(c.host_count(), (1 << 24) - 3);
        assert_eq!(c.hosts().nth(1), Some(ip("10.0.0.3")));
        assert_eq!(c.hosts().last(), Some(ip("10.255.255.254")));
    }

    #[test]
    fn contains() {
        let c = Ipv4Cidr::parse("192.168.64.0/20").unwrap();
        assert!(c.contains(ip("192.168.64.0")));
        assert!(c.contains(ip("192.168.79.255")));
        assert!(!c.contains(ip("192.168.80.0")));
        assert!(!c.contains(ip("192.168.63.255")));
    }

    #[test]
    fn rejects_bad_networks() {
        assert_eq!(Ipv4Cidr::parse("172.30.0.0/31"), Err(CidrError::Prefix(31)));
        assert_eq!(Ipv4Cidr::parse("172.30.0.0/32"), Err(CidrError::Prefix(32)));
        assert_eq!(Ipv4Cidr::parse("10.0.0.0/7"), Err(CidrError::Prefix(7)));
        assert_eq!(
            Ipv4Cidr::parse("172.30.0.1/24"),
            Err(CidrError::HostBits("172.30.0.0/24".into()))
        );
        for bad in [
            "172.30.0.0",
            "172.30.0/24",
            "x/24",
            "172.30.0.0/",
            "172.30.0.0/+24",
            "::1/64",
            "172.30.0.0/024",
        ] {
            assert_eq!(Ipv4Cidr::parse(bad), Err(CidrError::Syntax), "{bad}");
        }
    }
}
