//! Image references (`alpine`, `user/app:1`, `localhost:5000/x@sha256:…`), parsed with the
//! grammar of the distribution project's `reference` package, normalised the way Docker does
//! (`docker.io`, `library/`, `latest`).

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use crate::OciError;

/// The registry that references without a domain point at.
pub const DOCKER_HUB: &str = "docker.io";

/// Longest repository path (registry excluded) the distribution grammar allows.
const MAX_NAME_LEN: usize = 255;
/// Longest tag the grammar allows.
const MAX_TAG_LEN: usize = 128;

/// A fully qualified image reference. At least one of `tag` and `digest` is set; when both are,
/// the digest is what gets pulled and the tag is only informational (as with Docker).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    /// `docker.io`, `ghcr.io`, `localhost:5000`, `[::1]:5000`.
    pub registry: String,
    /// `library/alpine`, `user/app`.
    pub repository: String,
    pub tag: Option<String>,
    /// `sha256:<64 hex>`.
    pub digest: Option<String>,
}

impl Reference {
    /// The registry host without its port (`[::1]` keeps its brackets).
    pub fn host(&self) -> &str {
        split_port(&self.registry).0
    }

    /// Whether the registry is on this machine: `localhost`, 127.0.0.0/8 or `[::1]`.
    pub fn is_loopback(&self) -> bool {
        is_loopback_host(self.host())
    }

    /// The same image pinned to `digest`.
    pub fn with_digest(&self, digest: &str) -> Reference {
        Reference {
            digest: Some(digest.to_string()),
            ..self.clone()
        }
    }

    /// The reference as oci-client wants it.
    pub(crate) fn to_oci(&self) -> oci_client::Reference {
        let registry = self.registry.clone();
        let repository = self.repository.clone();
        match (&self.tag, &self.digest) {
            (Some(tag), Some(digest)) => oci_client::Reference::with_tag_and_digest(
                registry,
                repository,
                tag.clone(),
                digest.clone(),
            ),
            (None, Some(digest)) => {
                oci_client::Reference::with_digest(registry, repository, digest.clone())
            }
            (Some(tag), None) => oci_client::Reference::with_tag(registry, repository, tag.clone()),
            (None, None) => {
                oci_client::Reference::with_tag(registry, repository, "latest".to_string())
            }
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

impl FromStr for Reference {
    type Err = OciError;

    fn from_str(input: &str) -> Result<Reference, OciError> {
        parse(input).map_err(|reason| OciError::InvalidReference {
            input: input.to_string(),
            reason,
        })
    }
}

fn parse(input: &str) -> Result<Reference, String> {
    if input.is_empty() {
        return Err("it is empty".into());
    }
    if let Some(c) = input.chars().find(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("it contains {c:?}"));
    }

    let (name_tag, digest) = match input.split_once('@') {
        Some((n, d)) => (n, Some(parse_digest(d)?)),
        None => (input, None),
    };
    // A tag is a ':' after the last '/': in `localhost:5000/x` the ':' belongs to the domain.
    let last_slash = name_tag.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match name_tag[last_slash..].rfind(':') {
        Some(i) => {
            let at = last_slash + i;
            (&name_tag[..at], Some(parse_tag(&name_tag[at + 1..])?))
        }
        None => (name_tag, None),
    };
    if name.is_empty() {
        return Err("the repository name is empty".into());
    }

    // Like Docker: the first component is a registry only if it looks like a host
    // (has a '.' or a port, is `localhost`, or has uppercase letters, which repository
    // names cannot) and something follows it.
    let (registry, path) = match name.split_once('/') {
        Some((first, rest))
            if first.contains(['.', ':'])
                || first == "localhost"
                || first.starts_with('[')
                || first.chars().any(|c| c.is_ascii_uppercase()) =>
        {
            (first.to_string(), rest)
        }
        _ => (DOCKER_HUB.to_string(), name),
    };
    validate_registry(&registry)?;
    let registry = if registry == "index.docker.io" {
        DOCKER_HUB.to_string()
    } else {
        registry
    };
    validate_path(path)?;
    let repository = if registry == DOCKER_HUB && !path.contains('/') {
        format!("library/{path}")
    } else {
        path.to_string()
    };
    if repository.len() > MAX_NAME_LEN {
        return Err(format!(
            "the repository name is longer than {MAX_NAME_LEN} characters"
        ));
    }
    let tag = match (&tag, &digest) {
        (None, None) => Some("latest".to_string()),
        _ => tag,
    };
    Ok(Reference {
        registry,
        repository,
        tag,
        digest,
    })
}

/// `sha256:` and 64 lowercase hex digits: the cache is keyed by sha256, so other algorithms are
/// refused up front rather than after a download.
fn parse_digest(d: &str) -> Result<String, String> {
    let Some((algo, hex)) = d.split_once(':') else {
        return Err(format!(
            "digest {d:?} has no algorithm (expected sha256:<64 hex>)"
        ));
    };
    if algo != "sha256" {
        return Err(format!(
            "digest algorithm {algo:?} is not supported (only sha256)"
        ));
    }
    if !is_sha256_hex(hex) {
        return Err(format!(
            "digest {d:?} is not sha256:<64 lowercase hex digits>"
        ));
    }
    Ok(d.to_string())
}

pub(crate) fn is_sha256_hex(hex: &str) -> bool {
    hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn parse_tag(tag: &str) -> Result<String, String> {
    let mut chars = tag.chars();
    let ok_first = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
    let ok_rest = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if tag.is_empty() {
        return Err("the tag after ':' is empty".into());
    }
    if !ok_first || !ok_rest || tag.len() > MAX_TAG_LEN {
        return Err(format!(
            "tag {tag:?} is invalid (letters, digits, '_', '.', '-', not starting with '.' or '-', at most {MAX_TAG_LEN})"
        ));
    }
    Ok(tag.to_string())
}

fn validate_registry(registry: &str) -> Result<(), String> {
    let (host, port) = split_port(registry);
    if let Some(port) = port
        && !(port.bytes().all(|b| b.is_ascii_digit()) && port.parse::<u16>().is_ok_and(|p| p != 0))
    {
        return Err(format!("registry port {port:?} is not a number in 1-65535"));
    }
    if let Some(inner) = host.strip_prefix('[') {
        let ok = inner
            .strip_suffix(']')
            .is_some_and(|ip| ip.parse::<Ipv6Addr>().is_ok());
        if !ok {
            return Err(format!("registry {host:?} is not a valid [IPv6] address"));
        }
        return Ok(());
    }
    let ok = !host.is_empty()
        && host.split('.').all(|label| {
            !label.is_empty()
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if !ok {
        return Err(format!("registry host {host:?} is not a valid host name"));
    }
    Ok(())
}

/// Path components: `[a-z0-9]+` joined by `.`, `_`, `__` or runs of `-`.
fn validate_path(path: &str) -> Result<(), String> {
    if path.chars().any(|c| c.is_ascii_uppercase()) {
        return Err(format!("repository {path:?} must be lowercase"));
    }
    for component in path.split('/') {
        if !valid_component(component) {
            return Err(format!(
                "repository component {component:?} is invalid (lowercase letters and digits, separated by '.', '_', '__' or '-')"
            ));
        }
    }
    Ok(())
}

fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    if b.is_empty() || !b[0].is_ascii_alphanumeric() || !b[b.len() - 1].is_ascii_alphanumeric() {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if b[i].is_ascii_lowercase() || b[i].is_ascii_digit() {
            i += 1;
            continue;
        }
        // A separator run: '.', '_', '__' or any number of '-'.
        let start = i;
        while i < b.len() && matches!(b[i], b'.' | b'_' | b'-') {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

/// `host:port` → (`host`, `Some(port)`), keeping the brackets of `[v6]:port`.
pub(crate) fn split_port(registry: &str) -> (&str, Option<&str>) {
    if registry.starts_with('[') {
        return match registry.find(']') {
            Some(end) => {
                let (host, rest) = registry.split_at(end + 1);
                (host, rest.strip_prefix(':'))
            }
            None => (registry, None),
        };
    }
    match registry.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (registry, None),
    }
}

pub(crate) fn is_loopback_host(host: &str) -> bool {
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    if let Ok(v4) = host.parse::<Ipv4Addr>() {
        return v4.is_loopback();
    }
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .and_then(|h| h.parse::<Ipv6Addr>().ok())
        .is_some_and(|v6| v6.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    /// input, registry, repository, tag, digest
    type Case<'a> = (String, &'a str, &'a str, Option<&'a str>, Option<&'a str>);

    #[test]
    fn valid_references() {
        let d = D;
        let table: Vec<Case> = vec![
            (
                "alpine".into(),
                "docker.io",
                "library/alpine",
                Some("latest"),
                None,
            ),
            (
                "alpine:3.20".into(),
                "docker.io",
                "library/alpine",
                Some("3.20"),
                None,
            ),
            (
                "user/app:1".into(),
                "docker.io",
                "user/app",
                Some("1"),
                None,
            ),
            (
                "docker.io/alpine".into(),
                "docker.io",
                "library/alpine",
                Some("latest"),
                None,
            ),
            (
                "index.docker.io/user/app".into(),
                "docker.io",
                "user/app",
                Some("latest"),
                None,
            ),
            (
                "ghcr.io/a/b:tag".into(),
                "ghcr.io",
                "a/b",
                Some("tag"),
                None,
            ),
            (
                "ghcr.io/a/b/c-d.e__f:v_1.2-rc".into(),
                "ghcr.io",
                "a/b/c-d.e__f",
                Some("v_1.2-rc"),
                None,
            ),
            (
                format!("localhost:5000/x@{d}"),
                "localhost:5000",
                "x",
                None,
                Some(d),
            ),
            (
                format!("localhost/x:1@{d}"),
                "localhost",
                "x",
                Some("1"),
                Some(d),
            ),
            (
                "127.0.0.1:5000/ns/x:y".into(),
                "127.0.0.1:5000",
                "ns/x",
                Some("y"),
                None,
            ),
            (
                "[::1]:5000/x".into(),
                "[::1]:5000",
                "x",
                Some("latest"),
                None,
            ),
            (
                "Registry.Example/x".into(),
                "Registry.Example",
                "x",
                Some("latest"),
                None,
            ),
            (
                "localhost:5000".into(),
                "docker.io",
                "library/localhost",
                Some("5000"),
                None,
            ),
            ("a--b/c".into(), "docker.io", "a--b/c", Some("latest"), None),
        ];
        for (input, registry, repo, tag, digest) in table {
            let r: Reference = input.parse().unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(r.registry, registry, "{input}");
            assert_eq!(r.repository, repo, "{input}");
            assert_eq!(r.tag.as_deref(), tag, "{input}");
            assert_eq!(r.digest.as_deref(), digest, "{input}");
        }
    }

    #[test]
    fn display_is_fully_qualified_and_round_trips() {
        for (input, shown) in [
            ("alpine", "docker.io/library/alpine:latest".to_string()),
            ("user/app:1", "docker.io/user/app:1".to_string()),
            (
                &format!("localhost:5000/x@{D}"),
                format!("localhost:5000/x@{D}"),
            ),
        ] {
            let r: Reference = input.parse().unwrap();
            assert_eq!(r.to_string(), shown);
            assert_eq!(shown.parse::<Reference>().unwrap(), r);
        }
    }

    #[test]
    fn invalid_references_name_input_and_problem() {
        let table = [
            ("", "empty"),
            ("Alpine", "lowercase"),
            ("docker.io/User/app", "lowercase"),
            ("alpine:", "tag after ':' is empty"),
            ("alpine:-x", "tag"),
            ("alpine@sha256:abc", "64 lowercase hex"),
            ("alpine@md5:abc", "only sha256"),
            ("alpine@", "no algorithm"),
            ("a b", "contains"),
            ("/x", "invalid"),
            ("x/", "invalid"),
            ("a//b", "invalid"),
            ("a/_b", "invalid"),
            ("a/b___c", "invalid"),
            ("a/b.-c", "invalid"),
            ("localhost:99999/x", "port"),
            ("localhost:abc/x", "port"),
            ("[::zz]:5000/x", "IPv6"),
            ("-bad.example/x", "host name"),
        ];
        for (input, needle) in table {
            let err = input
                .parse::<Reference>()
                .expect_err(&format!("{input:?} must be rejected"))
                .to_string();
            assert!(
                err.contains(&format!("{input:?}")) && err.contains(needle),
                "{input:?}: {err}"
            );
        }
        let long = format!("x/{}", "a".repeat(300));
        assert!(long.parse::<Reference>().is_err());
        let long_tag = format!("x:{}", "a".repeat(129));
        assert!(long_tag.parse::<Reference>().is_err());
    }

    #[test]
    fn loopback_hosts() {
        for (input, lo) in [
            ("localhost:5000/x", true),
            ("127.0.0.1:5000/x", true),
            ("127.1.2.3/x:1", true),
            ("[::1]:5000/x", true),
            ("10.0.0.1:5000/x", false),
            ("registry.example/x", false),
            ("alpine", false),
        ] {
            let r: Reference = input.parse().unwrap();
            assert_eq!(r.is_loopback(), lo, "{input}");
        }
    }
}
