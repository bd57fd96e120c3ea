//! banger's nftables table: the scripts that build it and the parser that reads it back.
//!
//! Layout of `table ip banger` (see docs/network.md):
//! - `postrouting` (nat hook): traffic leaving through any interface but the bridge jumps to
//!   `nat_vms`, which holds one `ip saddr <vm>/32 masquerade` rule per NAT VM.
//! - `forward` (filter hook): traffic routed from the bridge back to the bridge (one VM to
//!   another through the host) is dropped; bridge-to-outside traffic jumps to `fwd_out`
//!   (per-VM accepts), outside-to-bridge traffic to `fwd_in` (per-VM established/related
//!   accepts); whatever is left from or to the VM network is dropped, so a VM without `--nat`
//!   goes nowhere.
//! - `input` (filter hook): from the bridge, the host accepts only replies to connections it
//!   opened itself (ssh into the guest); every other packet from a guest to any of the host's
//!   own addresses is dropped, with or without `--nat`.
//! - `output` (filter hook): new TCP/UDP connections from the host into the bridge are opened
//!   only by root and the installation's owner, so other local users cannot reach services in
//!   someone else's guests.
//!
//! The base chains are rebuilt (flushed and refilled in one transaction) by every
//! [`ensure_script`]; per-VM rules live in the regular chains, which that never flushes. Every
//! per-VM rule carries the comment `banger:<vm id>`, the only key needed to remove it.
//!
//! Scripts are built only from validated values: [`BridgeName`], [`Ipv4Cidr`], [`Ipv4Addr`], and
//! VM ids checked by [`check_vm_id`](crate::check_vm_id); none can contain a quote, space,
//! semicolon or newline.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use banger_config::Ipv4Cidr;

use crate::names::BridgeName;

pub const FAMILY: &str = "ip";
/// The table of the default bridge (`br-banger`); see [`table_for`].
pub const TABLE: &str = "banger";

/// The table of the installation using `bridge`: `banger` for `br-banger`, `banger_<suffix>`
/// for `br-banger-<suffix>`. Two installations on one host (a user's and a system one, or test
/// environments) each own their table, so neither's leak check or uninstall touches the
/// other's rules.
pub fn table_for(bridge: &BridgeName) -> String {
    match bridge.as_str().strip_prefix("br-banger-") {
        Some(suffix) => format!("{TABLE}_{suffix}"),
        None => TABLE.to_string(),
    }
}
pub const CHAIN_POSTROUTING: &str = "postrouting";
pub const CHAIN_FORWARD: &str = "forward";
pub const CHAIN_INPUT: &str = "input";
pub const CHAIN_OUTPUT: &str = "output";
pub const CHAIN_NAT_VMS: &str = "nat_vms";
pub const CHAIN_FWD_OUT: &str = "fwd_out";
pub const CHAIN_FWD_IN: &str = "fwd_in";
/// Prefix of per-VM rule comments; the VM id follows.
pub const VM_COMMENT_PREFIX: &str = "banger:";
/// Comment of the base rules; it has no `:` so it never reads as a VM id.
pub const BASE_COMMENT: &str = "banger-base";

pub fn vm_comment(vm_id: &str) -> String {
    format!("{VM_COMMENT_PREFIX}{vm_id}")
}

/// Creates banger's table and chains if missing and (re)writes the base rules for `bridge`
/// and `cidr`; per-VM rules are untouched. Safe to apply any number of times. `owner` is the
/// uid that may open connections into the VM network besides root.
pub fn ensure_script(
    table: &str,
    bridge: &BridgeName,
    cidr: &Ipv4Cidr,
    owner: Option<u32>,
) -> String {
    let t = format!("{FAMILY} {table}");
    let br = bridge.as_str();
    let c = BASE_COMMENT;
    let mut s = String::new();
    // `add` of an existing table or chain with the same definition is a no-op.
    let _ = writeln!(s, "add table {t}");
    let _ = writeln!(
        s,
        "add chain {t} {CHAIN_POSTROUTING} {{ type nat hook postrouting priority srcnat; policy accept; }}"
    );
    let _ = writeln!(
        s,
        "add chain {t} {CHAIN_FORWARD} {{ type filter hook forward priority filter; policy accept; }}"
    );
    let _ = writeln!(
        s,
        "add chain {t} {CHAIN_INPUT} {{ type filter hook input priority filter; policy accept; }}"
    );
    let _ = writeln!(
        s,
        "add chain {t} {CHAIN_OUTPUT} {{ type filter hook output priority filter; policy accept; }}"
    );
    for chain in [CHAIN_NAT_VMS, CHAIN_FWD_OUT, CHAIN_FWD_IN] {
        let _ = writeln!(s, "add chain {t} {chain}");
    }
    let _ = writeln!(s, "flush chain {t} {CHAIN_POSTROUTING}");
    let _ = writeln!(s, "flush chain {t} {CHAIN_FORWARD}");
    let _ = writeln!(s, "flush chain {t} {CHAIN_INPUT}");
    let _ = writeln!(s, "flush chain {t} {CHAIN_OUTPUT}");
    let _ = writeln!(
        s,
        "add rule {t} {CHAIN_POSTROUTING} oifname != \"{br}\" jump {CHAIN_NAT_VMS} comment \"{c}\""
    );
    // A drop in any base chain is final, whatever other tables accept; an accept here is not,
    // so the host's own firewall still gets its say.
    let _ = writeln!(
        s,
        "add rule {t} {CHAIN_INPUT} iifname \"{br}\" ct state established,related accept comment \"{c}\""
    );
    let _ = writeln!(
        s,
        "add rule {t} {CHAIN_INPUT} iifname \"{br}\" drop comment \"{c}\""
    );
    // New connections into the VM network: root's and the owner's only. Packets without a
    // socket (no uid to match) are not TCP/UDP connection openings.
    let mut uids = vec![0];
    uids.extend(owner.filter(|&u| u != 0));
    for uid in uids {
        let _ = writeln!(
            s,
            "add rule {t} {CHAIN_OUTPUT} oifname \"{br}\" ct state new meta skuid {uid} accept comment \"{c}\""
        );
    }
    let _ = writeln!(
        s,
        "add rule {t} {CHAIN_OUTPUT} oifname \"{br}\" ct state new meta l4proto {{ tcp, udp }} drop comment \"{c}\""
    );
    let _ = writeln!(
        s,
        "add rule {t} {CHAIN_FORWARD} iifname \"{br}\" oifname \"{br}\" drop comment \"{c}\""
    );
    let _ = writeln!(
        s,
        "add rule {t} {CHAIN_FORWARD} iifname \"{br}\" oifname != \"{br}\" jump {CHAIN_FWD_OUT} comment \"{c}\""
    );
    let _ = writeln!(
        s,
        "add rule {t} {CHAIN_FORWARD} iifname != \"{br}\" oifname \"{br}\" jump {CHAIN_FWD_IN} comment \"{c}\""
    );
    let _ = writeln!(
        s,
        "add rule {t} {CHAIN_FORWARD} iifname \"{br}\" oifname != \"{br}\" ip saddr {cidr} drop comment \"{c}\""
    );
    let _ = writeln!(
        s,
        "add rule {t} {CHAIN_FORWARD} iifname != \"{br}\" oifname \"{br}\" ip daddr {cidr} drop comment \"{c}\""
    );
    s
}

/// Deletes `stale` rules (a previous set for the same VM) and adds the VM's three rules, in one
/// transaction: either the VM ends with exactly one set or nothing changes.
pub fn add_vm_script(table: &str, vm_id: &str, ip: Ipv4Addr, stale: &[RuleRef]) -> String {
    let t = format!("{FAMILY} {table}");
    let c = vm_comment(vm_id);
    let mut s = delete_script(table, stale);
    let _ = writeln!(
        s,
        "add rule {t} {CHAIN_NAT_VMS} ip saddr {ip} masquerade comment \"{c}\""
    );
    let _ = writeln!(
        s,
        "add rule {t} {CHAIN_FWD_OUT} ip saddr {ip} accept comment \"{c}\""
    );
    let _ = writeln!(
        s,
        "add rule {t} {CHAIN_FWD_IN} ip daddr {ip} ct state established,related accept comment \"{c}\""
    );
    s
}

/// Deletes rules by handle.
pub fn delete_script(table: &str, rules: &[RuleRef]) -> String {
    let mut s = String::new();
    for r in rules {
        let _ = writeln!(
            s,
            "delete rule {FAMILY} {table} {} handle {}",
            r.chain, r.handle
        );
    }
    s
}

/// One rule of banger's table as listed by `nft -j -a list table ip banger`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleRef {
    /// A chain name of `A-Za-z0-9_` only (checked by [`parse_rules`]).
    pub chain: String,
    pub handle: u64,
    pub comment: Option<String>,
}

impl RuleRef {
    /// The VM id of a per-VM rule.
    pub fn vm_id(&self) -> Option<&str> {
        self.comment.as_deref()?.strip_prefix(VM_COMMENT_PREFIX)
    }
}

/// Whether `nft -j list tables` output lists banger's table.
pub fn has_table(json: &[u8], table: &str) -> Result<bool, String> {
    let v: serde_json::Value = serde_json::from_slice(json).map_err(|e| e.to_string())?;
    let items = v["nftables"].as_array().ok_or("no \"nftables\" array")?;
    Ok(items.iter().any(|i| {
        let t = &i["table"];
        t["family"] == FAMILY && t["name"] == table
    }))
}

/// The rules of banger's table from `nft -j -a list table ip banger` output.
pub fn parse_rules(json: &[u8], table: &str) -> Result<Vec<RuleRef>, String> {
    let v: serde_json::Value = serde_json::from_slice(json).map_err(|e| e.to_string())?;
    let items = v["nftables"].as_array().ok_or("no \"nftables\" array")?;
    let mut out = Vec::new();
    for item in items {
        let Some(rule) = item.get("rule") else {
            continue;
        };
        if rule["family"] != FAMILY || rule["table"] != table {
            continue;
        }
        let chain = rule["chain"].as_str().ok_or("a rule without a chain")?;
        // The chain name goes back into a delete script; refuse anything but a plain word.
        if chain.is_empty()
            || !chain
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            return Err(format!("unexpected chain name {chain:?}"));
        }
        let handle = rule["handle"]
            .as_u64()
            .ok_or_else(|| format!("a rule in chain {chain} without a handle"))?;
        out.push(RuleRef {
            chain: chain.to_string(),
            handle,
            comment: rule["comment"].as_str().map(str::to_string),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr() -> Ipv4Cidr {
        Ipv4Cidr::parse("172.30.0.0/24").unwrap()
    }

    #[test]
    fn ensure_script_exact() {
        let s = ensure_script(TABLE, &BridgeName::default(), &cidr(), Some(1000));
        let expected = "\
add table ip banger
add chain ip banger postrouting { type nat hook postrouting priority srcnat; policy accept; }
add chain ip banger forward { type filter hook forward priority filter; policy accept; }
add chain ip banger input { type filter hook input priority filter; policy accept; }
add chain ip banger output { type filter hook output priority filter; policy accept; }
add chain ip banger nat_vms
add chain ip banger fwd_out
add chain ip banger fwd_in
flush chain ip banger postrouting
flush chain ip banger forward
flush chain ip banger input
flush chain ip banger output
add rule ip banger postrouting oifname != \"br-banger\" jump nat_vms comment \"banger-base\"
add rule ip banger input iifname \"br-banger\" ct state established,related accept comment \"banger-base\"
add rule ip banger input iifname \"br-banger\" drop comment \"banger-base\"
add rule ip banger output oifname \"br-banger\" ct state new meta skuid 0 accept comment \"banger-base\"
add rule ip banger output oifname \"br-banger\" ct state new meta skuid 1000 accept comment \"banger-base\"
add rule ip banger output oifname \"br-banger\" ct state new meta l4proto { tcp, udp } drop comment \"banger-base\"
add rule ip banger forward iifname \"br-banger\" oifname \"br-banger\" drop comment \"banger-base\"
add rule ip banger forward iifname \"br-banger\" oifname != \"br-banger\" jump fwd_out comment \"banger-base\"
add rule ip banger forward iifname != \"br-banger\" oifname \"br-banger\" jump fwd_in comment \"banger-base\"
add rule ip banger forward iifname \"br-banger\" oifname != \"br-banger\" ip saddr 172.30.0.0/24 drop comment \"banger-base\"
add rule ip banger forward iifname != \"br-banger\" oifname \"br-banger\" ip daddr 172.30.0.0/24 drop comment \"banger-base\"
";
        assert_eq!(s, expected);
    }

    #[test]
    fn vm_script_replaces_stale_rules() {
        let stale = [
            RuleRef {
                chain: "nat_vms".into(),
                handle: 16,
                comment: Some("banger:abc".into()),
            },
            RuleRef {
                chain: "fwd_in".into(),
                handle: 18,
                comment: Some("banger:abc".into()),
            },
        ];
        let s = add_vm_script(TABLE, "abc", "172.30.0.5".parse().unwrap(), &stale);
        let expected = "\
delete rule ip banger nat_vms handle 16
delete rule ip banger fwd_in handle 18
add rule ip banger nat_vms ip saddr 172.30.0.5 masquerade comment \"banger:abc\"
add rule ip banger fwd_out ip saddr 172.30.0.5 accept comment \"banger:abc\"
add rule ip banger fwd_in ip daddr 172.30.0.5 ct state established,related accept comment \"banger:abc\"
";
        assert_eq!(s, expected);
    }

    const LISTING: &str = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
      {"table": {"family": "ip", "name": "banger", "handle": 1}},
      {"chain": {"family": "ip", "table": "banger", "name": "nat_vms", "handle": 3}},
      {"rule": {"family": "ip", "table": "banger", "chain": "postrouting", "handle": 11, "comment": "banger-base", "expr": []}},
      {"rule": {"family": "ip", "table": "banger", "chain": "nat_vms", "handle": 16, "comment": "banger:abc", "expr": []}},
      {"rule": {"family": "ip", "table": "banger", "chain": "fwd_out", "handle": 17, "expr": []}},
      {"rule": {"family": "ip", "table": "other", "chain": "x", "handle": 5, "comment": "banger:zzz", "expr": []}}]}"#;

    #[test]
    fn parses_rules_of_our_table_only() {
        let rules = parse_rules(LISTING.as_bytes(), TABLE).unwrap();
        assert_eq!(rules.len(), 3);
        assert_eq!(rules[0].vm_id(), None);
        assert_eq!(rules[1].vm_id(), Some("abc"));
        assert_eq!(rules[1].handle, 16);
        assert_eq!(rules[2].comment, None);
        assert!(has_table(LISTING.as_bytes(), TABLE).unwrap());
        assert!(!has_table(br#"{"nftables": [{"metainfo": {}}]}"#, TABLE).unwrap());
    }

    #[test]
    fn rejects_odd_listings() {
        assert!(parse_rules(b"not json", TABLE).is_err());
        assert!(parse_rules(b"{}", TABLE).is_err());
        let evil = r#"{"nftables": [{"rule": {"family": "ip", "table": "banger", "chain": "x; flush ruleset", "handle": 1}}]}"#;
        assert!(
            parse_rules(evil.as_bytes(), TABLE)
                .unwrap_err()
                .contains("chain name")
        );
        let no_handle =
            r#"{"nftables": [{"rule": {"family": "ip", "table": "banger", "chain": "fwd_in"}}]}"#;
        assert!(parse_rules(no_handle.as_bytes(), TABLE).is_err());
    }
}
