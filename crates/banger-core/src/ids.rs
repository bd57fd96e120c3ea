//! Opaque identifiers: VM ids and per-request operation ids.

use rand::Rng;
use serde::{Deserialize, Serialize};

fn random_hex(len: usize) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut rng = rand::rng();
    (0..len)
        .map(|_| HEX[rng.random_range(0..16)] as char)
        .collect()
}

/// A VM's immutable id: 12 lowercase hex characters. Names can be reused after delete; ids never.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct VmId(String);

impl VmId {
    pub const LEN: usize = 12;

    pub fn generate() -> Self {
        VmId(random_hex(Self::LEN))
    }

    /// Parses an id as stored or typed; `None` unless it is exactly 12 lowercase hex digits.
    pub fn parse(s: &str) -> Option<Self> {
        (s.len() == Self::LEN
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
        .then(|| VmId(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for VmId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The id of one request, minted by the client (or the daemon when absent) and carried in every
/// log line, error and helper call made for that request.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct OpId(String);

impl OpId {
    pub fn generate() -> Self {
        OpId(format!("op-{}", random_hex(8)))
    }

    /// Accepts a client-supplied id if it is short and printable ASCII (it ends up in logs).
    pub fn from_client(s: &str) -> Option<Self> {
        (!s.is_empty()
            && s.len() <= 64
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
        .then(|| OpId(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for OpId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_ids_are_valid_and_distinct() {
        let a = VmId::generate();
        let b = VmId::generate();
        assert_ne!(a, b);
        assert!(VmId::parse(a.as_str()).is_some());
        assert!(VmId::parse("ABCDEF012345").is_none());
        assert!(VmId::parse("abc").is_none());
    }

    #[test]
    fn op_ids_from_clients_are_sanitised() {
        assert!(OpId::from_client("op-1234abcd").is_some());
        assert!(OpId::from_client("op 1").is_none());
        assert!(OpId::from_client("").is_none());
        assert!(OpId::from_client(&"a".repeat(65)).is_none());
        assert!(OpId::generate().as_str().starts_with("op-"));
    }
}
