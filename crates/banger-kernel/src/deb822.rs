//! Debian's control-file format (deb822) as used by `Release` and `Packages`, dependency fields,
//! and dpkg's version ordering. Pure functions, no I/O.

use std::cmp::Ordering;

/// One paragraph of `Field: value` lines. Values borrow from the parsed text; a multi-line value
/// (continuation lines start with a space) is kept whole, see [`Stanza::get`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stanza<'a> {
    pub fields: Vec<(&'a str, &'a str)>,
}

impl<'a> Stanza<'a> {
    /// The value of `name` (field names are case-insensitive), trimmed. For multi-line fields the
    /// first line (often empty) and the continuation lines are all in it, split by `\n`.
    pub fn get(&self, name: &str) -> Option<&'a str> {
        self.fields
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim())
    }
}

/// A deb822 syntax error, with its 1-based line number.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct Deb822Error {
    pub line: usize,
    pub message: String,
}

/// Iterates the stanzas of `text` without copying it; see [`parse_stanzas`].
#[derive(Debug)]
pub struct Stanzas<'a> {
    text: &'a str,
    pos: usize,
    line: usize,
}

/// Splits `text` into stanzas. Paragraphs are separated by blank lines, `#` lines are comments.
pub fn parse_stanzas(text: &str) -> Stanzas<'_> {
    Stanzas {
        text,
        pos: 0,
        line: 0,
    }
}

impl<'a> Iterator for Stanzas<'a> {
    type Item = Result<Stanza<'a>, Deb822Error>;

    fn next(&mut self) -> Option<Self::Item> {
        let text = self.text;
        let mut stanza = Stanza::default();
        // (field name, value start, value end) of the field being read.
        let mut current: Option<(&'a str, usize, usize)> = None;
        while self.pos < text.len() {
            let start = self.pos;
            let end = text[start..]
                .find('\n')
                .map_or(text.len(), |i| start + i + 1);
            self.pos = end;
            self.line += 1;
            let line = text[start..end].trim_end_matches(['\n', '\r']);
            if line.trim().is_empty() {
                if current.is_some() || !stanza.fields.is_empty() {
                    break;
                }
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            if line.starts_with([' ', '\t']) {
                match current.as_mut() {
                    Some((_, _, value_end)) => *value_end = start + line.len(),
                    None => {
                        return Some(Err(Deb822Error {
                            line: self.line,
                            message: "continuation line without a field".into(),
                        }));
                    }
                }
                continue;
            }
            let Some(colon) = line.find(':') else {
                return Some(Err(Deb822Error {
                    line: self.line,
                    message: format!("expected 'Field: value', got {line:?}"),
                }));
            };
            if let Some((name, s, e)) = current.take() {
                stanza.fields.push((name, &text[s..e]));
            }
            let name = &line[..colon];
            if name.is_empty() || name.contains(char::is_whitespace) {
                return Some(Err(Deb822Error {
                    line: self.line,
                    message: format!("bad field name {name:?}"),
                }));
            }
            current = Some((name, start + colon + 1, start + line.len()));
        }
        if let Some((name, s, e)) = current {
            stanza.fields.push((name, &text[s..e]));
        }
        (!stanza.fields.is_empty()).then_some(Ok(stanza))
    }
}

/// One line of a Release file's `SHA256:` list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexEntry {
    /// Relative to `dists/<suite>/`, e.g. `main/binary-amd64/Packages.xz`.
    pub path: String,
    pub size: u64,
    pub sha256: String,
}

/// The parts of a (verified) Release file banger uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    pub suite: Option<String>,
    pub codename: Option<String>,
    pub date: Option<String>,
    pub valid_until: Option<String>,
    /// Whether index files can be fetched by hash (immune to a mirror update mid-pull).
    pub acquire_by_hash: bool,
    pub sha256: Vec<IndexEntry>,
}

impl Release {
    /// Parses the text of a Release file (the signed part of an InRelease).
    pub fn parse(text: &str) -> Result<Release, Deb822Error> {
        let stanza = parse_stanzas(text)
            .next()
            .unwrap_or(Ok(Stanza::default()))?;
        let owned = |name: &str| stanza.get(name).map(str::to_string);
        let mut sha256 = Vec::new();
        let list = stanza.get("SHA256").ok_or_else(|| Deb822Error {
            line: 0,
            message: "no SHA256 field".into(),
        })?;
        for (i, line) in list.lines().map(str::trim).enumerate() {
            if line.is_empty() {
                continue;
            }
            let parts: Vec<&str> = line.split_whitespace().collect();
            let bad = || Deb822Error {
                line: i,
                message: format!("bad SHA256 line {line:?}"),
            };
            let [hash, size, path] = parts[..] else {
                return Err(bad());
            };
            if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad());
            }
            sha256.push(IndexEntry {
                path: path.to_string(),
                size: size.parse().map_err(|_| bad())?,
                sha256: hash.to_ascii_lowercase(),
            });
        }
        Ok(Release {
            suite: owned("Suite"),
            codename: owned("Codename"),
            date: owned("Date"),
            valid_until: owned("Valid-Until"),
            acquire_by_hash: stanza
                .get("Acquire-By-Hash")
                .is_some_and(|v| v.eq_ignore_ascii_case("yes")),
            sha256,
        })
    }

    pub fn entry(&self, path: &str) -> Option<&IndexEntry> {
        self.sha256.iter().find(|e| e.path == path)
    }
}

/// One alternative of a dependency: `name [(op version)]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub name: String,
    /// e.g. `("=", "6.1.176-1")`.
    pub constraint: Option<(String, String)>,
}

/// Parses a `Depends`-style field: comma-separated groups of `|`-separated alternatives.
/// Architecture qualifiers (`name:any`) and restriction lists are dropped.
pub fn parse_relations(field: &str) -> Vec<Vec<Relation>> {
    field
        .split(',')
        .map(str::trim)
        .filter(|g| !g.is_empty())
        .map(|group| {
            group
                .split('|')
                .filter_map(|alt| {
                    let alt = alt.trim();
                    let name_end = alt.find([' ', '(', '[', '<', ':']).unwrap_or(alt.len());
                    let name = &alt[..name_end];
                    if name.is_empty() {
                        return None;
                    }
                    let constraint = alt.find('(').and_then(|open| {
                        let close = alt[open..].find(')')? + open;
                        let inner = alt[open + 1..close].trim();
                        let op_end = inner.find(|c: char| !"<>=".contains(c))?;
                        Some((
                            inner[..op_end].to_string(),
                            inner[op_end..].trim().to_string(),
                        ))
                    });
                    Some(Relation {
                        name: name.to_string(),
                        constraint,
                    })
                })
                .collect()
        })
        .collect()
}

/// Compares two Debian versions (`[epoch:]upstream[-revision]`) the way dpkg does.
pub fn compare_versions(a: &str, b: &str) -> Ordering {
    fn split(v: &str) -> (u64, &str, &str) {
        let (epoch, rest) = match v.split_once(':') {
            Some((e, r)) if e.bytes().all(|b| b.is_ascii_digit()) => (e.parse().unwrap_or(0), r),
            _ => (0, v),
        };
        match rest.rsplit_once('-') {
            Some((u, r)) => (epoch, u, r),
            None => (epoch, rest, ""),
        }
    }
    let (ea, ua, ra) = split(a);
    let (eb, ub, rb) = split(b);
    ea.cmp(&eb)
        .then_with(|| compare_fragment(ua, ub))
        .then_with(|| compare_fragment(ra, rb))
}

/// dpkg's `verrevcmp`: alternating non-digit and digit runs; in non-digit runs `~` sorts before
/// everything (even the end), letters before other characters.
fn compare_fragment(a: &str, b: &str) -> Ordering {
    fn order(c: Option<u8>) -> i32 {
        match c {
            None => 0,
            Some(b'~') => -1,
            Some(c) if c.is_ascii_digit() => 0,
            Some(c) if c.is_ascii_alphabetic() => i32::from(c),
            Some(c) => i32::from(c) + 256,
        }
    }
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        while (i < a.len() && !a[i].is_ascii_digit()) || (j < b.len() && !b[j].is_ascii_digit()) {
            let (ca, cb) = (order(a.get(i).copied()), order(b.get(j).copied()));
            if ca != cb {
                return ca.cmp(&cb);
            }
            i += 1;
            j += 1;
        }
        while i < a.len() && a[i] == b'0' {
            i += 1;
        }
        while j < b.len() && b[j] == b'0' {
            j += 1;
        }
        let mut first_diff = Ordering::Equal;
        while i < a.len() && a[i].is_ascii_digit() && j < b.len() && b[j].is_ascii_digit() {
            if first_diff == Ordering::Equal {
                first_diff = a[i].cmp(&b[j]);
            }
            i += 1;
            j += 1;
        }
        if i < a.len() && a[i].is_ascii_digit() {
            return Ordering::Greater;
        }
        if j < b.len() && b[j].is_ascii_digit() {
            return Ordering::Less;
        }
        if first_diff != Ordering::Equal {
            return first_diff;
        }
    }
    Ordering::Equal
}

/// Whether `version` satisfies `(op wanted)` from a dependency field.
pub fn satisfies(version: &str, op: &str, wanted: &str) -> bool {
    let c = compare_versions(version, wanted);
    match op {
        "=" => c == Ordering::Equal,
        ">=" => c != Ordering::Less,
        "<=" => c != Ordering::Greater,
        ">>" | ">" => c == Ordering::Greater,
        "<<" | "<" => c == Ordering::Less,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PACKAGES: &str = "\
Package: linux-image-cloud-amd64
Source: linux-signed-amd64 (6.1.176+1)
Version: 6.1.176-1
Depends: linux-image-6.1.0-50-cloud-amd64 (= 6.1.176-1)
Description: Linux for x86-64 cloud (meta-package)
 A second description line.
 .
SHA256: 6f32a25a6ee7b58852de01577ba261fda873c3002c736a2148bf0a6593bd93c8

# a comment between stanzas


Package: linux-image-6.1.0-50-cloud-amd64
Version: 6.1.176-1
Depends: kmod, linux-base (>= 4.3~), initramfs-tools (>= 0.120+deb8u2) | linux-initramfs-tool
Filename: pool/main/l/linux-signed-amd64/linux-image-6.1.0-50-cloud-amd64_6.1.176-1_amd64.deb
Size: 26484304
";

    #[test]
    fn stanzas_split_on_blank_lines_and_keep_multiline_values() {
        let stanzas: Vec<_> = parse_stanzas(PACKAGES).collect::<Result<_, _>>().unwrap();
        assert_eq!(stanzas.len(), 2);
        assert_eq!(stanzas[0].get("package"), Some("linux-image-cloud-amd64"));
        assert_eq!(
            stanzas[0].get("Description"),
            Some("Linux for x86-64 cloud (meta-package)\n A second description line.\n .")
        );
        assert_eq!(stanzas[1].get("Size"), Some("26484304"));
        assert_eq!(stanzas[1].get("SHA256"), None);
    }

    #[test]
    fn crlf_and_missing_final_newline_are_fine() {
        let text = "A: 1\r\nB: two\r\n words\r\n\r\nA: 2";
        let s: Vec<_> = parse_stanzas(text).collect::<Result<_, _>>().unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].get("B"), Some("two\r\n words"));
        assert_eq!(s[1].get("A"), Some("2"));
    }

    #[test]
    fn malformed_lines_are_errors_with_line_numbers() {
        let e = parse_stanzas("A: 1\nno colon here\n")
            .next()
            .unwrap()
            .unwrap_err();
        assert_eq!(e.line, 2);
        let e = parse_stanzas(" leading continuation\n")
            .next()
            .unwrap()
            .unwrap_err();
        assert_eq!(e.line, 1);
    }

    const RELEASE: &str = "\
Origin: Debian
Suite: oldstable
Codename: bookworm
Date: Sat, 11 Jul 2026 10:16:37 UTC
Acquire-By-Hash: yes
MD5Sum:
 f230d61720e789abf5df55d6026230c6 50060337 main/binary-amd64/Packages
SHA256:
 515e692f2c4121c6fcec444ef100cc18f79a991910615f3a88c8b7becfc94d2f 50060337 main/binary-amd64/Packages
 6777ea16514725f9427f48c240d92e0a6b8496138e37a1491d8597e66774e309 12084798 main/binary-amd64/Packages.gz
 9E0B5AABB2465B3D2E7A7FE27F9913846277833F7A2826E7767ACCCFF5B588C5  8790396 main/binary-amd64/Packages.xz
";

    #[test]
    fn release_sha256_section_is_parsed() {
        let r = Release::parse(RELEASE).unwrap();
        assert_eq!(r.codename.as_deref(), Some("bookworm"));
        assert_eq!(r.suite.as_deref(), Some("oldstable"));
        assert!(r.acquire_by_hash);
        assert_eq!(r.sha256.len(), 3);
        let xz = r.entry("main/binary-amd64/Packages.xz").unwrap();
        assert_eq!(xz.size, 8_790_396);
        // Normalised to lower case so it compares with our hex output.
        assert_eq!(
            xz.sha256,
            "9e0b5aabb2465b3d2e7a7fe27f9913846277833f7a2826e7767acccff5b588c5"
        );
        assert!(r.entry("main/binary-arm64/Packages.xz").is_none());
    }

    #[test]
    fn release_without_sha256_or_with_bad_lines_is_refused() {
        assert!(Release::parse("Codename: bookworm\n").is_err());
        assert!(Release::parse("SHA256:\n abc 12 main/x\n").is_err());
        let bad_size = format!("SHA256:\n {} twelve main/x\n", "a".repeat(64));
        assert!(Release::parse(&bad_size).is_err());
    }

    #[test]
    fn relations_are_parsed() {
        let r = parse_relations(
            "kmod, linux-base (>= 4.3~), initramfs-tools (>= 0.120+deb8u2) | linux-initramfs-tool, libc6:any",
        );
        assert_eq!(r.len(), 4);
        assert_eq!(r[0][0].name, "kmod");
        assert_eq!(r[0][0].constraint, None);
        assert_eq!(
            r[1][0].constraint,
            Some((">=".to_string(), "4.3~".to_string()))
        );
        assert_eq!(r[2].len(), 2);
        assert_eq!(r[2][1].name, "linux-initramfs-tool");
        assert_eq!(r[3][0].name, "libc6");
        let r = parse_relations("linux-image-6.1.0-50-cloud-amd64 (= 6.1.176-1)");
        assert_eq!(r[0][0].name, "linux-image-6.1.0-50-cloud-amd64");
        assert_eq!(r[0][0].constraint, Some(("=".into(), "6.1.176-1".into())));
    }

    #[test]
    fn versions_order_like_dpkg() {
        use Ordering::*;
        let cases = [
            ("6.1.176-1", "6.1.176-1", Equal),
            ("6.1.176-1", "6.1.99-1", Greater),
            ("6.1.0-50", "6.1.0-9", Greater),
            ("1.0~rc1-1", "1.0-1", Less),
            ("1.0-1", "1.0-1~bpo12+1", Greater),
            ("1:0.1-1", "9.9-1", Greater),
            ("1.0a-1", "1.0-1", Greater),
            ("1.0+b1", "1.0", Greater),
            ("1.0.0", "1.0", Greater),
            ("6.1.176-1", "6.1.176-1+deb12u1", Less),
            ("007", "7", Equal),
            ("1.2-3", "1.2-10", Less),
        ];
        for (a, b, want) in cases {
            assert_eq!(compare_versions(a, b), want, "{a} vs {b}");
            assert_eq!(compare_versions(b, a), want.reverse(), "{b} vs {a}");
        }
    }

    #[test]
    fn constraints_are_checked() {
        assert!(satisfies("6.1.176-1", "=", "6.1.176-1"));
        assert!(!satisfies("6.1.176-2", "=", "6.1.176-1"));
        assert!(satisfies("4.3", ">=", "4.3~"));
        assert!(satisfies("1.0", "<<", "1.1"));
        assert!(!satisfies("1.0", "??", "1.0"));
    }
}
