//! Human sizes: `4GiB`, `8G`, `512M`, `1024` (a bare number means MiB, as in the original).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error(
        "invalid size {0:?}: expected a number with an optional unit (K, M, G, T, KiB, MiB, GiB, TiB; a bare number means MiB)"
    )]
    Syntax(String),
    #[error("invalid size {0:?}: too large")]
    Overflow(String),
}

/// A size in bytes. Serialized as a plain number of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub const KIB: u64 = 1024;
    pub const MIB: u64 = 1024 * 1024;
    pub const GIB: u64 = 1024 * 1024 * 1024;

    pub fn mib(n: u64) -> Self {
        ByteSize(n * Self::MIB)
    }

    pub fn gib(n: u64) -> Self {
        ByteSize(n * Self::GIB)
    }

    pub fn bytes(self) -> u64 {
        self.0
    }

    pub fn as_mib(self) -> u64 {
        self.0 / Self::MIB
    }

    /// Parses `4GiB`, `8G`, `512m`, `1024` (MiB). Units are binary whatever their spelling:
    /// these are disk and memory sizes, where nobody means 10^9.
    pub fn parse(s: &str) -> Result<Self, SizeError> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        if num.is_empty() {
            return Err(SizeError::Syntax(s.to_string()));
        }
        let n: u64 = num
            .parse()
            .map_err(|_| SizeError::Overflow(s.to_string()))?;
        let mult = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "m" | "mb" | "mib" => Self::MIB,
            "b" => 1,
            "k" | "kb" | "kib" => Self::KIB,
            "g" | "gb" | "gib" => Self::GIB,
            "t" | "tb" | "tib" => Self::GIB * 1024,
            _ => return Err(SizeError::Syntax(s.to_string())),
        };
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| SizeError::Overflow(s.to_string()))
    }
}

impl std::str::FromStr for ByteSize {
    type Err = SizeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ByteSize::parse(s)
    }
}

impl std::fmt::Display for ByteSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b = self.0;
        if b >= Self::GIB && b.is_multiple_of(Self::GIB) {
            write!(f, "{}G", b / Self::GIB)
        } else if b >= Self::MIB && b.is_multiple_of(Self::MIB) {
            write!(f, "{}M", b / Self::MIB)
        } else if b >= Self::GIB {
            write!(f, "{:.1}G", b as f64 / Self::GIB as f64)
        } else if b >= Self::MIB {
            write!(f, "{:.1}M", b as f64 / Self::MIB as f64)
        } else {
            write!(f, "{b}B")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        assert_eq!(ByteSize::parse("4GiB").unwrap(), ByteSize::gib(4));
        assert_eq!(ByteSize::parse("8G").unwrap(), ByteSize::gib(8));
        assert_eq!(ByteSize::parse("512m").unwrap(), ByteSize::mib(512));
        assert_eq!(ByteSize::parse("1024").unwrap(), ByteSize::mib(1024));
        assert_eq!(ByteSize::parse("10K").unwrap(), ByteSize(10240));
    }

    #[test]
    fn rejects_garbage() {
        for bad in ["", "G", "4X", "-1", "4.5G", "99999999999999999999"] {
            assert!(ByteSize::parse(bad).is_err(), "{bad}");
        }
        assert!(matches!(
            ByteSize::parse("99999999999T"),
            Err(SizeError::Overflow(_))
        ));
    }

    #[test]
    fn displays_compactly() {
        assert_eq!(ByteSize::gib(8).to_string(), "8G");
        assert_eq!(ByteSize::mib(512).to_string(), "512M");
        assert_eq!(ByteSize(100).to_string(), "100B");
    }
}
