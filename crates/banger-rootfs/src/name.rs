//! Pure, byte-level rules for entry names and link targets. Nothing here touches the host:
//! names are checked lexically, and the in-memory table (not the host file system) decides
//! what a path refers to.

use crate::error::Reject;

/// ext4's limit for one directory entry name.
pub const MAX_COMPONENT: usize = 255;
/// PATH_MAX minus the NUL: longer paths cannot be handled by the host's path-based calls.
pub const MAX_PATH: usize = 4095;
/// `symlink(2)` and ext4 (4 KiB blocks) both cap targets at one block minus the NUL.
pub const MAX_SYMLINK: usize = 4095;

/// Whiteout prefix of the OCI image spec (inherited from AUFS).
pub const WH_PREFIX: &[u8] = b".wh.";
/// Opaque-directory marker.
pub const WH_OPAQUE: &[u8] = b".wh..wh..opq";

/// Normalizes a tar entry name into a relative path without `.` or empty components and
/// without a trailing slash. `""` stands for the image root (tar's `./`).
///
/// Rejected: empty names, NUL, absolute paths, any `..` component, components over 255 bytes,
/// paths over 4095 bytes, and `\n` / `\r`, which cannot be written into debugfs's line-based
/// command files (debugfs reads lines with `fgets` and cuts at the first `\r`).
pub fn normalize(raw: &[u8]) -> Result<Vec<u8>, Reject> {
    if raw.is_empty() {
        return Err(Reject::Empty);
    }
    if raw.contains(&0) {
        return Err(Reject::Nul);
    }
    if raw[0] == b'/' {
        return Err(Reject::Absolute);
    }
    let mut out = Vec::with_capacity(raw.len());
    for comp in raw.split(|&b| b == b'/') {
        match comp {
            b"" | b"." => continue,
            b".." => return Err(Reject::DotDot),
            _ => {}
        }
        if comp.len() > MAX_COMPONENT {
            return Err(Reject::ComponentTooLong(comp.len()));
        }
        if let Some(&c) = comp.iter().find(|&&b| b == b'\n' || b == b'\r') {
            return Err(Reject::Unencodable(char::from(c)));
        }
        if !out.is_empty() {
            out.push(b'/');
        }
        out.extend_from_slice(comp);
    }
    if out.len() > MAX_PATH {
        return Err(Reject::PathTooLong(out.len()));
    }
    Ok(out)
}

/// Splits a normalized path into (parent, last component). The root has no parent.
pub fn split_last(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (b"", path),
    }
}

/// Joins a normalized parent (possibly the root `""`) and one component.
pub fn join(parent: &[u8], name: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(parent.len() + 1 + name.len());
    v.extend_from_slice(parent);
    if !parent.is_empty() {
        v.push(b'/');
    }
    v.extend_from_slice(name);
    v
}

/// Checks a symlink target. Absolute targets are kept: they resolve inside the guest, whose
/// root is the image root. A relative target may not lexically climb above the image root
/// from the link's directory — nothing in banger follows links on the host, but a target such
/// as `../../../etc/shadow` is only ever useful to something that resolves it outside the
/// image, so it is refused rather than kept as a trap for later tooling.
pub fn check_symlink(link: &[u8], target: &[u8]) -> Result<(), Reject> {
    if target.is_empty() {
        return Err(Reject::EmptySymlink);
    }
    if target.contains(&0) {
        return Err(Reject::SymlinkNul);
    }
    if target.len() > MAX_SYMLINK {
        return Err(Reject::SymlinkTooLong(target.len()));
    }
    if target[0] == b'/' {
        return Ok(());
    }
    let (parent, _) = split_last(link);
    let mut depth: usize = if parent.is_empty() {
        0
    } else {
        parent.split(|&b| b == b'/').count()
    };
    for comp in target.split(|&b| b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => {
                depth = depth
                    .checked_sub(1)
                    .ok_or_else(|| Reject::SymlinkEscapes(crate::error::show(target)))?;
            }
            _ => depth += 1,
        }
    }
    Ok(())
}

/// What the last component of an entry name means under the OCI whiteout convention.
#[derive(Debug, PartialEq, Eq)]
pub enum Whiteout<'a> {
    /// Not a whiteout.
    None,
    /// `.wh.NAME`: hide NAME of lower layers.
    Hide(&'a [u8]),
    /// `.wh..wh..opq`: hide every lower child of the directory.
    Opaque,
    /// Another `.wh..wh.` name: reserved (AUFS bookkeeping such as `.wh..wh.plnk`), ignored.
    Reserved,
}

pub fn classify(last: &[u8]) -> Result<Whiteout<'_>, Reject> {
    if last == WH_OPAQUE {
        return Ok(Whiteout::Opaque);
    }
    let Some(rest) = last.strip_prefix(WH_PREFIX) else {
        return Ok(Whiteout::None);
    };
    if rest.starts_with(WH_PREFIX) {
        return Ok(Whiteout::Reserved);
    }
    if rest.is_empty() || rest == b"." || rest == b".." {
        return Err(Reject::EmptyWhiteout(crate::error::show(last)));
    }
    Ok(Whiteout::Hide(rest))
}

/// True when any component but the last is a whiteout name: such an entry would create a
/// directory called `.wh.something`, which no layer may leave in the result.
pub fn whiteout_in_parent(path: &[u8]) -> Option<&[u8]> {
    let (parent, _) = split_last(path);
    if parent.is_empty() {
        return None;
    }
    parent
        .split(|&b| b == b'/')
        .find(|c| c.starts_with(WH_PREFIX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> Result<String, Reject> {
        normalize(s.as_bytes()).map(|v| String::from_utf8(v).unwrap())
    }

    #[test]
    fn normalize_strips_dot_slash_and_trailing_slash() {
        assert_eq!(n("./etc/passwd").unwrap(), "etc/passwd");
        assert_eq!(n("etc/").unwrap(), "etc");
        assert_eq!(n("./").unwrap(), "");
        assert_eq!(n(".").unwrap(), "");
        assert_eq!(n("a//b/./c/").unwrap(), "a/b/c");
        assert_eq!(n("././a").unwrap(), "a");
        assert_eq!(
            n("name with \"quotes\" and spaces").unwrap(),
            "name with \"quotes\" and spaces"
        );
        assert_eq!(n("ünïcödé/日本").unwrap(), "ünïcödé/日本");
    }

    #[test]
    fn normalize_rejects_hostile_names() {
        assert_eq!(n(""), Err(Reject::Empty));
        assert_eq!(n("/etc/passwd"), Err(Reject::Absolute));
        assert_eq!(n("../evil"), Err(Reject::DotDot));
        assert_eq!(n("a/../../evil"), Err(Reject::DotDot));
        assert_eq!(n("a/.."), Err(Reject::DotDot));
        assert_eq!(n("a/b\0c"), Err(Reject::Nul));
        assert_eq!(n("a\nb"), Err(Reject::Unencodable('\n')));
        assert_eq!(n("a\rb"), Err(Reject::Unencodable('\r')));
        assert_eq!(n(&"x".repeat(255)).unwrap().len(), 255);
        assert_eq!(n(&"x".repeat(256)), Err(Reject::ComponentTooLong(256)));
        let long = vec!["abcdefgh"; 600].join("/");
        assert!(matches!(n(&long), Err(Reject::PathTooLong(_))));
    }

    #[test]
    fn symlink_escape_is_lexical_from_the_link_directory() {
        assert!(check_symlink(b"a/b", b"../../../etc/shadow").is_err());
        assert!(check_symlink(b"link", b"../etc").is_err());
        assert!(check_symlink(b"a/b", b"../c").is_ok());
        assert!(check_symlink(b"a/b/c", b"../../x").is_ok());
        assert!(check_symlink(b"a/b/c", b"../../../x").is_err());
        // Climbs out and back in: still refused, the climb itself is the problem.
        assert!(check_symlink(b"a/b", b"../../a/x").is_err());
        assert!(check_symlink(b"a/b", b"./x/../../y").is_ok());
        assert!(check_symlink(b"sbin", b"usr/sbin").is_ok());
        assert!(
            check_symlink(b"x", b"/../../etc/shadow").is_ok(),
            "absolute: guest-rooted"
        );
        assert_eq!(check_symlink(b"x", b""), Err(Reject::EmptySymlink));
        assert_eq!(check_symlink(b"x", b"a\0b"), Err(Reject::SymlinkNul));
        assert!(matches!(
            check_symlink(b"x", &[b'a'; 4096]),
            Err(Reject::SymlinkTooLong(4096))
        ));
    }

    #[test]
    fn whiteout_classification() {
        assert_eq!(classify(b"file").unwrap(), Whiteout::None);
        assert_eq!(classify(b".wh.file").unwrap(), Whiteout::Hide(b"file"));
        assert_eq!(classify(b".wh..wh..opq").unwrap(), Whiteout::Opaque);
        assert_eq!(classify(b".wh..wh.plnk").unwrap(), Whiteout::Reserved);
        assert!(classify(b".wh.").is_err());
        assert!(classify(b".wh...").is_err());
        assert_eq!(whiteout_in_parent(b"a/.wh.b/c"), Some(&b".wh.b"[..]));
        assert_eq!(whiteout_in_parent(b"a/.wh.b"), None);
    }

    #[test]
    fn split_and_join() {
        assert_eq!(split_last(b"a/b/c"), (&b"a/b"[..], &b"c"[..]));
        assert_eq!(split_last(b"c"), (&b""[..], &b"c"[..]));
        assert_eq!(join(b"", b"c"), b"c");
        assert_eq!(join(b"a/b", b"c"), b"a/b/c");
    }
}
