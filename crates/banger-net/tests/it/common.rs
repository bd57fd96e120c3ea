//! Namespaces and small probes shared by the tests.

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use banger_net::RealNetOps;
use banger_sys::RealRunner;

/// Why the kernel-backed tests cannot run here, if they cannot.
pub fn skip_reason(need_nft: bool) -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root".into());
    }
    if banger_sys::find_in_path("ip").is_none() {
        return Some("`ip` (iproute2) not installed".into());
    }
    if need_nft && banger_sys::find_in_path("nft").is_none() {
        return Some("`nft` not installed".into());
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Some("/dev/net/tun missing".into());
    }
    None
}

/// Returns early from a test, printing why, when the environment cannot run it.
#[macro_export]
macro_rules! skip_unless_capable {
    ($need_nft:expr) => {
        if let Some(reason) = $crate::common::skip_reason($need_nft) {
            println!("SKIP: {reason}");
            return;
        }
    };
}

/// A network namespace deleted (with every interface in it) on drop.
#[derive(Debug)]
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn new(tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "bgtest-{}-{tag}{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let st = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("run ip netns add");
        assert!(st.success(), "ip netns add {name} failed");
        NetNs { name }
    }

    /// banger's real implementation, confined to this namespace.
    pub fn ops(&self) -> RealNetOps {
        RealNetOps::new(Arc::new(RealRunner))
            .in_netns(&self.name)
            .expect("valid netns name")
    }

    /// Runs argv inside the namespace; returns (success, stdout, stderr).
    pub fn run(&self, argv: &[&str]) -> (bool, String, String) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(argv)
            .output()
            .expect("run ip netns exec");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Runs argv inside the namespace and returns stdout, panicking on failure.
    pub fn ok(&self, argv: &[&str]) -> String {
        let (ok, out, err) = self.run(argv);
        assert!(ok, "{argv:?} in {} failed: {err}", self.name);
        out
    }

    /// `ip -d -j link show dev <name>`, or None when there is no such link.
    pub fn link(&self, name: &str) -> Option<serde_json::Value> {
        let (ok, out, _) = self.run(&["ip", "-d", "-j", "link", "show", "dev", name]);
        ok.then(|| serde_json::from_str::<serde_json::Value>(&out).unwrap()[0].clone())
    }

    /// Rule comments of banger's table, or None when the table does not exist.
    pub fn rule_comments(&self) -> Option<Vec<String>> {
        let (ok, out, _) = self.run(&["nft", "-j", "-a", "list", "table", "ip", "banger"]);
        if !ok {
            return None;
        }
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        Some(
            v["nftables"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|i| i["rule"]["comment"].as_str().map(str::to_string))
                .collect(),
        )
    }

    pub fn count_rules_of(&self, vm_id: &str) -> usize {
        let tag = format!("banger:{vm_id}");
        self.rule_comments()
            .unwrap_or_default()
            .iter()
            .filter(|c| **c == tag)
            .count()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

pub fn ip(s: &str) -> std::net::Ipv4Addr {
    s.parse().unwrap()
}
