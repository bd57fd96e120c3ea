//! Integration tests of banger-net against the real kernel, each in fresh network namespaces
//! (`bgtest-<pid>-<n>`) created and deleted by the test, so the host's own interfaces, rules
//! and sysctls are never touched. Tests print `SKIP: <reason>` and pass when not root or when
//! `ip`, `nft` or /dev/net/tun is missing.

mod common;
mod links;
mod nat;
mod tap_open;
mod traffic;
