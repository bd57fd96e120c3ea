//! VM names: DNS labels, so that `<name>.vm` always resolves.

use rand::Rng;
use serde::{Deserialize, Serialize};

/// Why a string is not a valid VM name. The message names the offending input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("invalid VM name \"\": a name needs 1 to 63 characters")]
    Empty,
    #[error("invalid VM name {0:?}: longer than 63 characters")]
    TooLong(String),
    #[error("invalid VM name {name:?}: character {ch:?} is not allowed (use a-z, 0-9 and -)")]
    BadChar { name: String, ch: char },
    #[error("invalid VM name {0:?}: it must not start or end with '-'")]
    Hyphen(String),
}

/// A validated VM name: 1–63 characters of `a-z0-9-`, not starting or ending with `-`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct VmName(String);

impl VmName {
    pub const MAX_LEN: usize = 63;

    pub fn parse(s: &str) -> Result<Self, NameError> {
        if s.is_empty() {
            return Err(NameError::Empty);
        }
        if s.len() > Self::MAX_LEN {
            return Err(NameError::TooLong(s.to_string()));
        }
        if let Some(ch) = s
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
        {
            return Err(NameError::BadChar {
                name: s.to_string(),
                ch,
            });
        }
        if s.starts_with('-') || s.ends_with('-') {
            return Err(NameError::Hyphen(s.to_string()));
        }
        Ok(VmName(s.to_string()))
    }

    /// A readable random name such as `brave-otter-42`. Collisions are handled by the caller,
    /// which retries under its allocation lock.
    pub fn generate() -> Self {
        const ADJ: &[&str] = &[
            "amber", "brave", "calm", "clever", "crisp", "eager", "fuzzy", "gentle", "happy",
            "jolly", "keen", "lively", "lucid", "merry", "nimble", "proud", "quick", "quiet",
            "rapid", "sharp", "shiny", "steady", "sunny", "swift", "tidy", "vivid", "witty",
            "zesty",
        ];
        const NOUN: &[&str] = &[
            "badger", "beaver", "bison", "cobra", "crane", "dingo", "eagle", "falcon", "ferret",
            "gecko", "heron", "ibis", "jackal", "koala", "lemur", "lynx", "marten", "newt",
            "otter", "panda", "puffin", "quail", "raven", "seal", "stoat", "tapir", "walrus",
            "wombat", "yak", "zebra",
        ];
        let mut rng = rand::rng();
        let name = format!(
            "{}-{}-{}",
            ADJ[rng.random_range(0..ADJ.len())],
            NOUN[rng.random_range(0..NOUN.len())],
            rng.random_range(10..100)
        );
        VmName(name)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for VmName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        VmName::parse(s)
    }
}

impl<'de> Deserialize<'de> for VmName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        VmName::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl std::fmt::Display for VmName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_dns_labels() {
        for ok in ["a", "sandbox", "a-b", "x1", "0", &"a".repeat(63)] {
            assert!(VmName::parse(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn rejects_bad_names_with_reason() {
        assert_eq!(VmName::parse(""), Err(NameError::Empty));
        assert!(matches!(
            VmName::parse(&"a".repeat(64)),
            Err(NameError::TooLong(_))
        ));
        assert!(matches!(
            VmName::parse("Bad_Name"),
            Err(NameError::BadChar { ch: 'B', .. })
        ));
        assert!(matches!(VmName::parse("-x"), Err(NameError::Hyphen(_))));
        assert!(matches!(VmName::parse("x-"), Err(NameError::Hyphen(_))));
        assert!(matches!(
            VmName::parse("a.b"),
            Err(NameError::BadChar { ch: '.', .. })
        ));
        let msg = VmName::parse("Bad_Name").unwrap_err().to_string();
        assert!(msg.contains("Bad_Name"), "{msg}");
    }

    #[test]
    fn generated_names_are_valid() {
        for _ in 0..200 {
            let n = VmName::generate();
            assert!(VmName::parse(n.as_str()).is_ok(), "{n}");
        }
    }

    #[test]
    fn deserialize_validates() {
        assert!(serde_json::from_str::<VmName>("\"ok-name\"").is_ok());
        assert!(serde_json::from_str::<VmName>("\"Bad_Name\"").is_err());
    }
}

/// Validates an image or kernel name: 1–64 characters of `a-z0-9._-`, starting with a letter or
/// digit. Dots are allowed (`debian-6.1-cloud`); `..` and `/` can never appear, so a name is
/// always safe as a directory name.
pub fn validate_artifact_name(kind: &str, s: &str) -> Result<(), String> {
    let ok_char =
        |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-');
    if s.is_empty() || s.len() > 64 {
        return Err(format!(
            "invalid {kind} name {s:?}: it needs 1 to 64 characters"
        ));
    }
    if let Some(c) = s.chars().find(|c| !ok_char(*c)) {
        return Err(format!(
            "invalid {kind} name {s:?}: character {c:?} is not allowed (use a-z, 0-9, '.', '_' and '-')"
        ));
    }
    if !s.starts_with(|c: char| c.is_ascii_alphanumeric()) || s.contains("..") {
        return Err(format!(
            "invalid {kind} name {s:?}: it must start with a letter or digit and not contain \"..\""
        ));
    }
    Ok(())
}

#[cfg(test)]
mod artifact_tests {
    use super::validate_artifact_name;

    #[test]
    fn artifact_names() {
        for ok in ["debian-bookworm", "debian-6.1-cloud", "a", "x_y"] {
            assert!(validate_artifact_name("image", ok).is_ok(), "{ok}");
        }
        for bad in ["", ".hidden", "a/b", "a..b", "UP", "-x", &"a".repeat(65)] {
            let e = validate_artifact_name("image", bad).unwrap_err();
            assert!(e.contains("image"), "{e}");
        }
    }
}
