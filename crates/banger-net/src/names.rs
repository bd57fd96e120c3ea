//! Validated names: banger only ever creates, touches or deletes interfaces whose names it can
//! parse here, so a foreign interface (`eth0`, `docker0`, a user's `br0`) is never harmed and no
//! name can smuggle syntax into an `ip` argument or an nft script.

use banger_core::ids::VmId;
use sha2::{Digest, Sha256};

use crate::NetError;

/// Linux interface names are at most 15 bytes (IFNAMSIZ minus the NUL).
pub const MAX_IFNAME: usize = 15;

fn is_lower_alnum(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// banger's bridge: `br-banger` or `br-banger-<1 to 5 of a-z0-9>`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BridgeName(String);

impl BridgeName {
    pub const DEFAULT: &'static str = "br-banger";

    pub fn parse(s: &str) -> Result<Self, NetError> {
        let err = |reason: &str| NetError::InvalidBridgeName {
            name: s.to_string(),
            reason: reason.to_string(),
        };
        if s.len() > MAX_IFNAME {
            return Err(err(
                "longer than 15 bytes, the limit of Linux interface names",
            ));
        }
        match s.strip_prefix(Self::DEFAULT) {
            Some("") => Ok(BridgeName(s.to_string())),
            Some(rest) => match rest.strip_prefix('-') {
                Some(suffix) if !suffix.is_empty() && is_lower_alnum(suffix) => {
                    Ok(BridgeName(s.to_string()))
                }
                _ => Err(err("expected br-banger or br-banger-<1 to 5 of a-z0-9>")),
            },
            None => Err(err(
                "not a banger bridge: expected br-banger or br-banger-<1 to 5 of a-z0-9>",
            )),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for BridgeName {
    fn default() -> Self {
        BridgeName(Self::DEFAULT.to_string())
    }
}

impl std::fmt::Display for BridgeName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A banger tap: `bgt` followed by 1 to 12 of `a-z0-9`, at most 15 bytes.
///
/// Two schemes share the pattern and cannot collide:
/// - `bgt<vm id>` (`bgt3fa9c01d2e4b`): a tap made for one VM; VM ids are 12 lowercase hex digits.
/// - `bgtpool<n>` (`bgtpool3`): a warm-pool tap, handed to whichever VM starts next; `p`, `o`
///   and `l` are not hex digits, so no VM id produces it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TapName(String);

impl TapName {
    pub const PREFIX: &'static str = "bgt";
    const POOL_PREFIX: &'static str = "bgtpool";

    pub fn parse(s: &str) -> Result<Self, NetError> {
        let err = |reason: &str| NetError::InvalidTapName {
            name: s.to_string(),
            reason: reason.to_string(),
        };
        if s.len() > MAX_IFNAME {
            return Err(err(
                "longer than 15 bytes, the limit of Linux interface names",
            ));
        }
        let Some(rest) = s.strip_prefix(Self::PREFIX) else {
            return Err(err("not a banger tap: expected bgt<1 to 12 of a-z0-9>"));
        };
        if rest.is_empty() || !is_lower_alnum(rest) {
            return Err(err("expected bgt<1 to 12 of a-z0-9>"));
        }
        Ok(TapName(s.to_string()))
    }

    /// The tap made for one VM: `bgt` + its 12-digit id, exactly 15 bytes.
    pub fn for_vm(id: &VmId) -> Self {
        TapName(format!("{}{}", Self::PREFIX, id.as_str()))
    }

    /// Warm-pool tap number `index`; a `u16` keeps the name within 15 bytes.
    pub fn pool(index: u16) -> Self {
        TapName(format!("{}{index}", Self::POOL_PREFIX))
    }

    /// Whether this is a warm-pool tap rather than one named after a VM.
    pub fn is_pool(&self) -> bool {
        self.0
            .strip_prefix(Self::POOL_PREFIX)
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for TapName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The longest VM id accepted in an nft rule comment.
pub const MAX_VM_ID: usize = 64;

/// Checks a VM id before it goes into an nft comment (`banger:<id>`): 1 to 64 of `a-z0-9_-`,
/// so it can hold no quote, space, semicolon or newline. banger's own ids (12 hex digits) pass.
pub fn check_vm_id(id: &str) -> Result<(), NetError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_VM_ID
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(NetError::InvalidVmId {
            id: id.to_string(),
            reason: format!("expected 1 to {MAX_VM_ID} of a-z0-9_-"),
        })
    }
}

/// An Ethernet address, shown as `02:ab:cd:ef:01:23`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// The guest MAC of a VM: `02` (locally administered, unicast) followed by 40 bits of
    /// SHA-256 of the id, so a VM keeps its MAC (and its DHCP-less ARP entries stay valid)
    /// across restarts.
    pub fn for_vm(vm_id: &str) -> Self {
        Self::derived("banger-vm:", vm_id)
    }

    /// A fixed MAC for the bridge. Without one, a Linux bridge takes the lowest MAC of its
    /// ports and changes it as taps come and go, so guests would see their gateway move.
    pub fn for_bridge(bridge: &BridgeName) -> Self {
        Self::derived("banger-bridge:", bridge.as_str())
    }

    fn derived(domain: &str, input: &str) -> Self {
        let mut h = Sha256::new();
        h.update(domain.as_bytes());
        h.update(input.as_bytes());
        let d = h.finalize();
        MacAddr([0x02, d[0], d[1], d[2], d[3], d[4]])
    }

    pub fn is_locally_administered(&self) -> bool {
        self.0[0] & 0x02 != 0
    }

    pub fn is_unicast(&self) -> bool {
        self.0[0] & 0x01 == 0
    }

    /// Parses `aa:bb:cc:dd:ee:ff` (either case).
    pub fn parse(s: &str) -> Result<Self, NetError> {
        let err = || NetError::InvalidMac { mac: s.to_string() };
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            let p = parts.next().ok_or_else(err)?;
            if p.len() != 2 || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(err());
            }
            *byte = u8::from_str_radix(p, 16).map_err(|_| err())?;
        }
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(MacAddr(out))
    }
}

impl std::fmt::Display for MacAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bridge_names() {
        for ok in ["br-banger", "br-banger-a", "br-banger-dev01"] {
            assert_eq!(BridgeName::parse(ok).unwrap().as_str(), ok);
        }
        for bad in [
            "",
            "br0",
            "eth0",
            "br-banger-",
            "br-banger-dev012",
            "br-banger-Dev",
            "br-bangerx",
            "br-banger-a/b",
            "br-banger-a b",
            "xbr-banger",
            "br-fc",
        ] {
            let e = BridgeName::parse(bad).unwrap_err();
            assert!(e.to_string().contains(&format!("{bad:?}")), "{e}");
        }
        assert_eq!(BridgeName::default().as_str(), "br-banger");
    }

    #[test]
    fn tap_names() {
        for ok in ["bgt0", "bgtpool3", "bgt3fa9c01d2e4b", "bgtzzzzzzzzzzzz"] {
            assert_eq!(TapName::parse(ok).unwrap().as_str(), ok);
        }
        for bad in [
            "",
            "bgt",
            "eth0",
            "tap0",
            "bgt../x",
            "bgt-1",
            "bgtA",
            "bgt\"x",
            "bgt3fa9c01d2e4bc", // 16 bytes
            "tap-pool-1",
            "bgt a",
            "bgt\n",
        ] {
            let e = TapName::parse(bad).unwrap_err();
            assert!(matches!(e, NetError::InvalidTapName { .. }), "{bad:?}");
            assert!(e.to_string().contains(&format!("{bad:?}")), "{e}");
        }
    }

    #[test]
    fn tap_schemes_fit_and_round_trip() {
        let id = VmId::parse("3fa9c01d2e4b").unwrap();
        let t = TapName::for_vm(&id);
        assert_eq!(t.as_str(), "bgt3fa9c01d2e4b");
        assert_eq!(t.as_str().len(), MAX_IFNAME);
        assert!(!t.is_pool());
        assert_eq!(TapName::parse(t.as_str()).unwrap(), t);

        let p = TapName::pool(u16::MAX);
        assert_eq!(p.as_str(), "bgtpool65535");
        assert!(p.as_str().len() <= MAX_IFNAME);
        assert!(p.is_pool());
        assert_eq!(TapName::parse(p.as_str()).unwrap(), p);
        assert!(TapName::pool(0).is_pool());
        assert!(!TapName::parse("bgtpool").unwrap().is_pool());
        assert!(!TapName::parse("bgtpoolx").unwrap().is_pool());
        for _ in 0..50 {
            assert!(!TapName::for_vm(&VmId::generate()).is_pool());
        }
    }

    #[test]
    fn vm_ids() {
        for ok in ["3fa9c01d2e4b", "a", "vm-1_x"] {
            check_vm_id(ok).unwrap();
        }
        check_vm_id(&"a".repeat(MAX_VM_ID)).unwrap();
        for bad in ["", "A", "a b", "a\"", "a;b", "a\nb", "a/b", "x:y"] {
            let e = check_vm_id(bad).unwrap_err();
            assert!(e.to_string().contains(&format!("{bad:?}")), "{e}");
        }
        check_vm_id(&"a".repeat(MAX_VM_ID + 1)).unwrap_err();
    }

    #[test]
    fn vm_macs_are_stable_local_unicast_and_distinct() {
        let a = MacAddr::for_vm("3fa9c01d2e4b");
        assert_eq!(a, MacAddr::for_vm("3fa9c01d2e4b"));
        assert_eq!(a.0[0], 0x02);
        assert!(a.is_locally_administered() && a.is_unicast());
        let shown = a.to_string();
        assert_eq!(shown.len(), 17);
        assert!(shown.starts_with("02:"));
        assert_eq!(shown, shown.to_lowercase());
        assert_eq!(MacAddr::parse(&shown).unwrap(), a);

        let mut seen = std::collections::HashSet::new();
        for i in 0..2000 {
            assert!(seen.insert(MacAddr::for_vm(&format!("{i:012x}"))));
        }
        // The bridge's MAC lives in another hash domain than the VMs'.
        let br = MacAddr::for_bridge(&BridgeName::default());
        assert_ne!(br, MacAddr::for_vm("br-banger"));
        assert!(br.is_locally_administered() && br.is_unicast());
    }

    #[test]
    fn mac_parse_rejects_garbage() {
        assert_eq!(
            MacAddr::parse("AA:bb:00:11:22:33").unwrap().to_string(),
            "aa:bb:00:11:22:33"
        );
        for bad in [
            "",
            "aa:bb:cc:dd:ee",
            "aa:bb:cc:dd:ee:ff:00",
            "aa:bb:cc:dd:ee:f",
            "+a:bb:cc:dd:ee:ff",
            "gg:bb:cc:dd:ee:ff",
        ] {
            assert!(MacAddr::parse(bad).is_err(), "{bad}");
        }
    }
}
