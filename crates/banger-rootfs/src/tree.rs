//! The flattened tree: the scratch directory plus the metadata table describing it.

use std::collections::{HashSet, VecDeque};
use std::path::{Path, PathBuf};

use crate::fsutil;
use crate::table::{Node, NodeKind, Table};

/// Where an sshd, an init and a package manager are looked for (also by [`crate::inspect_dir`]).
pub(crate) const SSHD_PATHS: [&str; 3] = ["/usr/sbin/sshd", "/sbin/sshd", "/usr/bin/sshd"];
pub(crate) const INIT_PATHS: [&str; 3] = [
    "/sbin/init",
    "/lib/systemd/systemd",
    "/usr/lib/systemd/systemd",
];
pub(crate) const PACKAGE_MANAGERS: [(&str, &[&str]); 6] = [
    ("apt", &["apt-get", "apt"]),
    ("apk", &["apk"]),
    ("dnf", &["dnf", "dnf5", "dnf-3"]),
    ("yum", &["yum"]),
    ("zypper", &["zypper"]),
    ("pacman", &["pacman"]),
];
pub(crate) const BIN_DIRS: [&str; 4] = ["/usr/bin", "/bin", "/usr/sbin", "/sbin"];

/// Result of [`crate::flatten`]: content in a scratch directory owned by the current user,
/// the metadata the layers asked for in memory.
#[derive(Debug)]
pub struct Tree {
    pub(crate) root: PathBuf,
    pub(crate) table: Table,
    pub(crate) skipped: Vec<String>,
}

/// Size figures used for the report and for sizing the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stats {
    pub entries: u64,
    pub content_bytes: u64,
    pub alloc_bytes: u64,
}

const BLOCK: u64 = 4096;

fn round_block(n: u64) -> u64 {
    n.div_ceil(BLOCK) * BLOCK
}

impl Tree {
    /// The scratch directory holding the content.
    pub fn dir(&self) -> &Path {
        &self.root
    }

    /// Number of paths, the root excluded.
    pub fn len(&self) -> usize {
        self.table.nodes().len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.nodes().is_empty()
    }

    /// The root directory's node (metadata from a `./` entry, else 0755 root:root).
    pub fn root_node(&self) -> &Node {
        self.table.root()
    }

    /// The node at a relative path such as `"etc/passwd"` (no resolution of symlinks;
    /// `""` is the root).
    pub fn get(&self, path: &str) -> Option<&Node> {
        self.table.get(path.trim_start_matches('/').as_bytes())
    }

    /// Every path (relative, byte strings) with its node, in byte order.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &Node)> {
        self.table.nodes().iter().map(|(k, v)| (k.as_slice(), v))
    }

    /// Things left out of the image, e.g. `"/dev/null (char device 1:3)"`.
    pub fn skipped(&self) -> &[String] {
        &self.skipped
    }

    /// Removes the scratch directory.
    pub fn remove(self) -> std::io::Result<()> {
        fsutil::remove_tree(&self.root)
    }

    /// Resolves a guest path the way the guest kernel would, following symlinks (also the
    /// last component) purely lexically inside the table: absolute targets restart at the
    /// image root, `..` at the root stays there. Never touches the host. Returns the
    /// resolved relative path and its node.
    pub fn resolve(&self, path: &str) -> Option<(Vec<u8>, &Node)> {
        let mut pending: VecDeque<Vec<u8>> = split(path.as_bytes()).collect();
        let mut cur: Vec<Vec<u8>> = Vec::new();
        let mut hops = 0;
        while let Some(comp) = pending.pop_front() {
            match comp.as_slice() {
                b"" | b"." => continue,
                b".." => {
                    cur.pop();
                    continue;
                }
                _ => {}
            }
            let mut candidate = cur.join(&b'/');
            if !candidate.is_empty() {
                candidate.push(b'/');
            }
            candidate.extend_from_slice(&comp);
            let node = self.table.get(&candidate)?;
            match &node.kind {
                NodeKind::Symlink { target } => {
                    hops += 1;
                    if hops > 40 {
                        return None; // ELOOP
                    }
                    if target.first() == Some(&b'/') {
                        cur.clear();
                    }
                    for c in split(target).rev() {
                        pending.push_front(c);
                    }
                }
                NodeKind::Dir => cur.push(comp),
                _ if pending.iter().all(|c| c.is_empty() || c == b".") => cur.push(comp),
                _ => return None, // ENOTDIR
            }
        }
        let path = cur.join(&b'/');
        let node = self.table.get(&path)?;
        Some((path, node))
    }

    fn resolves_to_file(&self, path: &str) -> bool {
        matches!(self.resolve(path), Some((_, n)) if matches!(n.kind, NodeKind::File { .. }))
    }

    pub(crate) fn stats(&self) -> Stats {
        let mut seen = HashSet::new();
        let mut s = Stats {
            entries: 0,
            content_bytes: 0,
            alloc_bytes: BLOCK,
        };
        for (path, node) in self.table.nodes() {
            s.entries += 1;
            if !seen.insert(node.inode) {
                continue; // another name of an inode already counted
            }
            if !node.meta.xattrs.is_empty() {
                s.alloc_bytes += BLOCK; // may not fit in the inode
            }
            match &node.kind {
                NodeKind::File { size } => {
                    s.content_bytes += size;
                    s.alloc_bytes += round_block(*size);
                }
                NodeKind::Dir => s.alloc_bytes += BLOCK,
                // Targets of 60 bytes or more do not fit in the inode.
                NodeKind::Symlink { target } if target.len() >= 60 => s.alloc_bytes += BLOCK,
                _ => {}
            }
            // The directory entry in the parent: 8 bytes + name, 4-byte aligned.
            let name = crate::name::split_last(path).1.len() as u64;
            s.alloc_bytes += (8 + name).div_ceil(4) * 4;
        }
        s
    }

    pub(crate) fn has_sshd(&self) -> bool {
        SSHD_PATHS.iter().any(|p| self.resolves_to_file(p))
    }

    pub(crate) fn init(&self) -> Option<String> {
        INIT_PATHS
            .iter()
            .find(|p| self.resolves_to_file(p))
            .map(|p| p.to_string())
    }

    pub(crate) fn package_manager(&self) -> Option<String> {
        PACKAGE_MANAGERS
            .iter()
            .find(|(_, bins)| {
                bins.iter().any(|b| {
                    BIN_DIRS
                        .iter()
                        .any(|d| self.resolves_to_file(&format!("{d}/{b}")))
                })
            })
            .map(|(name, _)| name.to_string())
    }

    /// Entries below `/root` (recursively), after resolving `/root` itself.
    pub(crate) fn root_home_entries(&self) -> u64 {
        match self.resolve("/root") {
            Some((path, node)) if node.kind.is_dir() => {
                self.table.descendants(&path).count() as u64
            }
            _ => 0,
        }
    }
}

fn split(path: &[u8]) -> impl DoubleEndedIterator<Item = Vec<u8>> + '_ {
    path.split(|&b| b == b'/').map(|c| c.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::{Meta, New};

    fn tree(entries: &[(&str, Option<&str>)]) -> Tree {
        let mut table = Table::default();
        let mut ops = Vec::new();
        for (path, link) in entries {
            let new = match link {
                Some(t) => New::Symlink {
                    target: t.as_bytes().to_vec(),
                },
                None if path.ends_with('/') => New::Dir,
                None => New::File { size: 10 },
            };
            let p = crate::name::normalize(path.as_bytes()).unwrap();
            table
                .add(0, &p, new, Meta::implicit_dir(), &mut ops)
                .unwrap();
        }
        Tree {
            root: PathBuf::from("/nonexistent"),
            table,
            skipped: Vec::new(),
        }
    }

    #[test]
    fn merged_usr_resolution() {
        let t = tree(&[
            ("usr/sbin/sshd", None),
            ("usr/lib/systemd/systemd", None),
            ("usr/bin/apt-get", None),
            ("sbin", Some("usr/sbin")),
            ("lib", Some("usr/lib")),
            ("bin", Some("/usr/bin")),
            ("sbin2", Some("/../../usr/sbin")),
            ("usr/sbin/init", Some("../lib/systemd/systemd")),
            ("root/.bashrc", None),
            ("root/.ssh/authorized_keys", None),
        ]);
        assert!(t.has_sshd());
        assert_eq!(t.init().as_deref(), Some("/sbin/init"));
        assert_eq!(t.package_manager().as_deref(), Some("apt"));
        assert_eq!(t.root_home_entries(), 3);
        assert_eq!(t.resolve("/bin/apt-get").unwrap().0, b"usr/bin/apt-get");
        // `..` above the root stays at the root, as in the guest.
        assert_eq!(t.resolve("/sbin2/sshd").unwrap().0, b"usr/sbin/sshd");
        assert!(t.resolve("/usr/sbin/sshd/x").is_none());
    }

    #[test]
    fn loops_and_absent() {
        let t = tree(&[("a", Some("b")), ("b", Some("a")), ("bin/busybox", None)]);
        assert!(t.resolve("/a").is_none());
        assert!(!t.has_sshd());
        assert_eq!(t.init(), None);
        assert_eq!(t.package_manager(), None);
        assert_eq!(t.root_home_entries(), 0);
    }

    #[test]
    fn alpine_like() {
        let t = tree(&[
            ("bin/busybox", None),
            ("sbin/init", Some("/bin/busybox")),
            ("sbin/apk", None),
            ("usr/bin/dnf", Some("/nowhere")),
        ]);
        assert_eq!(t.init().as_deref(), Some("/sbin/init"));
        assert_eq!(t.package_manager().as_deref(), Some("apk"));
    }
}
