//! The in-memory metadata table: the authoritative view of the flattened tree.
//!
//! Every layer entry is first applied here, purely in memory, and the table answers with the
//! host operations ([`Op`]) that bring the scratch directory in line. Decisions that matter
//! for safety — "is an ancestor a symlink?", "does the hardlink target exist and is it a
//! regular file?", "which children does an opaque marker hide?" — are taken from the table,
//! never by resolving paths on the host. The scratch tree only ever receives operations on
//! paths whose ancestors the table knows to be real directories.

use std::collections::BTreeMap;
use std::ops::Bound;

use crate::error::{Reject, show};
use crate::name;

/// What a path is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeKind {
    /// A regular file of `size` bytes.
    File {
        size: u64,
    },
    Dir,
    /// A symlink; the target is kept verbatim.
    Symlink {
        target: Vec<u8>,
    },
    Fifo,
}

impl NodeKind {
    /// The `S_IFMT` bits ext4 stores for this kind.
    pub fn type_bits(&self) -> u32 {
        match self {
            NodeKind::File { .. } => 0o100000,
            NodeKind::Dir => 0o040000,
            NodeKind::Symlink { .. } => 0o120000,
            NodeKind::Fifo => 0o010000,
        }
    }

    pub fn is_dir(&self) -> bool {
        matches!(self, NodeKind::Dir)
    }
}

/// One extended attribute, e.g. `security.capability`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Xattr {
    pub name: String,
    pub value: Vec<u8>,
}

/// The metadata the layers asked for (not what the scratch copy has).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    /// Permission bits including setuid, setgid and sticky (`0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Seconds since the epoch.
    pub mtime: i64,
    pub xattrs: Vec<Xattr>,
}

impl Meta {
    /// Metadata for a directory that an entry needs but no entry describes (tar archives may
    /// omit parents); the same default Docker and containerd use.
    pub fn implicit_dir() -> Meta {
        Meta {
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime: 0,
            xattrs: Vec::new(),
        }
    }
}

/// One path of the flattened tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub kind: NodeKind,
    pub meta: Meta,
    /// Index of the layer that last created or updated this path. Whiteouts and opaque
    /// markers only hide nodes of lower layers.
    pub layer: usize,
    /// Identity of the underlying inode: hardlinks share it.
    pub inode: u64,
}

/// What an entry creates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum New {
    File {
        size: u64,
    },
    Dir,
    Symlink {
        target: Vec<u8>,
    },
    /// Target already normalized with [`name::normalize`].
    Hardlink {
        target: Vec<u8>,
    },
    Fifo,
}

/// A host operation, in the order it has to be carried out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Op {
    /// Remove one path; emitted deepest first, so directories are empty by then.
    Remove {
        path: Vec<u8>,
        dir: bool,
    },
    Mkdir {
        path: Vec<u8>,
    },
    /// Create the file and stream the entry's content into it.
    File {
        path: Vec<u8>,
    },
    Symlink {
        path: Vec<u8>,
        target: Vec<u8>,
    },
    Hardlink {
        path: Vec<u8>,
        target: Vec<u8>,
    },
    Fifo {
        path: Vec<u8>,
    },
}

enum Walk {
    /// Every ancestor is a directory.
    Dirs,
    /// The ancestor ending at this byte offset is missing (and so is everything below it).
    Missing(usize),
    /// The ancestor ending at this byte offset is not a directory.
    NotDir(usize),
}

#[derive(Debug, Clone)]
pub(crate) struct Table {
    nodes: BTreeMap<Vec<u8>, Node>,
    root: Node,
    next_inode: u64,
}

/// Key range of everything strictly below `path` (`path/…`). `'0'` is the byte after `'/'`,
/// so `[path/, path0)` is exactly the subtree in byte order.
fn below(path: &[u8]) -> (Bound<Vec<u8>>, Bound<Vec<u8>>) {
    if path.is_empty() {
        return (Bound::Unbounded, Bound::Unbounded);
    }
    let mut lo = path.to_vec();
    lo.push(b'/');
    let mut hi = path.to_vec();
    hi.push(b'0');
    (Bound::Included(lo), Bound::Excluded(hi))
}

impl Default for Table {
    fn default() -> Self {
        Table {
            nodes: BTreeMap::new(),
            root: Node {
                kind: NodeKind::Dir,
                meta: Meta::implicit_dir(),
                layer: 0,
                inode: 0,
            },
            next_inode: 1,
        }
    }
}

impl Table {
    pub fn nodes(&self) -> &BTreeMap<Vec<u8>, Node> {
        &self.nodes
    }

    pub fn root(&self) -> &Node {
        &self.root
    }

    pub fn get(&self, path: &[u8]) -> Option<&Node> {
        if path.is_empty() {
            Some(&self.root)
        } else {
            self.nodes.get(path)
        }
    }

    pub fn has_descendants(&self, path: &[u8]) -> bool {
        self.nodes.range(below(path)).next().is_some()
    }

    pub fn descendants(&self, path: &[u8]) -> impl Iterator<Item = (&Vec<u8>, &Node)> {
        self.nodes.range(below(path))
    }

    fn walk(&self, path: &[u8]) -> Result<Walk, Reject> {
        for (i, &b) in path.iter().enumerate() {
            if b != b'/' {
                continue;
            }
            let prefix = &path[..i];
            match self.nodes.get(prefix).map(|n| &n.kind) {
                None => return Ok(Walk::Missing(i)),
                Some(NodeKind::Dir) => {}
                Some(NodeKind::Symlink { .. }) => return Err(Reject::ThroughSymlink(show(prefix))),
                Some(_) => return Ok(Walk::NotDir(i)),
            }
        }
        Ok(Walk::Dirs)
    }

    fn inode(&mut self) -> u64 {
        let i = self.next_inode;
        self.next_inode += 1;
        i
    }

    /// Applies one creating entry of layer `layer` at normalized `path`.
    pub fn add(
        &mut self,
        layer: usize,
        path: &[u8],
        new: New,
        meta: Meta,
        ops: &mut Vec<Op>,
    ) -> Result<(), Reject> {
        if path.is_empty() {
            // `./` describes the root itself: only its metadata can change.
            if new != New::Dir {
                return Err(Reject::ReplacesRoot);
            }
            // The guest's `/` is always root's: images built by unprivileged tools often
            // carry `./` owned by the builder's uid, which would let that guest user
            // rename `/etc`. Mode, mtime and xattrs are taken from the layer.
            self.root.meta = Meta {
                uid: 0,
                gid: 0,
                ..meta
            };
            self.root.layer = layer;
            return Ok(());
        }
        if let Some(w) = name::whiteout_in_parent(path) {
            return Err(Reject::WhiteoutAsDirectory(show(w)));
        }
        // Validate everything before changing anything.
        let walk = self.walk(path)?;
        if let Walk::NotDir(i) = walk {
            return Err(Reject::ParentNotDir(show(&path[..i])));
        }
        let linked = match &new {
            New::Symlink { target } => {
                name::check_symlink(path, target)?;
                None
            }
            New::Hardlink { target } => Some(self.check_hardlink(path, target)?),
            _ => None,
        };

        match self.nodes.get_mut(path) {
            Some(existing) if existing.kind.is_dir() && new == New::Dir => {
                // A directory over a directory keeps the children and takes the new metadata.
                existing.meta = meta;
                existing.layer = layer;
                return Ok(());
            }
            Some(_) => self.remove_subtree(path, ops),
            None => {}
        }

        if let Walk::Missing(start) = walk {
            for (i, &b) in path.iter().enumerate().skip(start) {
                if b == b'/' {
                    let p = path[..i].to_vec();
                    let inode = self.inode();
                    self.nodes.insert(
                        p.clone(),
                        Node {
                            kind: NodeKind::Dir,
                            meta: Meta::implicit_dir(),
                            layer,
                            inode,
                        },
                    );
                    ops.push(Op::Mkdir { path: p });
                }
            }
        }

        let p = path.to_vec();
        let (kind, op) = match new {
            New::Hardlink { target } => {
                // A hard link is the same inode: it carries the target's metadata, not the
                // link entry's header (which is what `tar` does as well). `linked` was
                // checked above; it is always present here.
                let Some(mut node) = linked else {
                    return Err(Reject::HardlinkMissing(show(&target)));
                };
                node.layer = layer;
                self.nodes.insert(p.clone(), node);
                ops.push(Op::Hardlink { path: p, target });
                return Ok(());
            }
            New::File { size } => (NodeKind::File { size }, Op::File { path: p.clone() }),
            New::Dir => (NodeKind::Dir, Op::Mkdir { path: p.clone() }),
            New::Fifo => (NodeKind::Fifo, Op::Fifo { path: p.clone() }),
            New::Symlink { target } => (
                NodeKind::Symlink {
                    target: target.clone(),
                },
                Op::Symlink {
                    path: p.clone(),
                    target,
                },
            ),
        };
        let inode = self.inode();
        let node = Node {
            kind,
            meta,
            layer,
            inode,
        };
        self.nodes.insert(p, node);
        ops.push(op);
        Ok(())
    }

    /// An entry that is left out of the image (a device node): it still replaces whatever
    /// lower layers had at its path, and it is still refused through a symlink.
    pub fn skip(&mut self, path: &[u8], ops: &mut Vec<Op>) -> Result<(), Reject> {
        if path.is_empty() {
            return Err(Reject::ReplacesRoot);
        }
        if let Some(w) = name::whiteout_in_parent(path) {
            return Err(Reject::WhiteoutAsDirectory(show(w)));
        }
        if let Walk::NotDir(i) = self.walk(path)? {
            return Err(Reject::ParentNotDir(show(&path[..i])));
        }
        if self.nodes.contains_key(path) {
            self.remove_subtree(path, ops);
        }
        Ok(())
    }

    fn check_hardlink(&self, path: &[u8], target: &[u8]) -> Result<Node, Reject> {
        if target.is_empty() {
            return Err(Reject::HardlinkRoot);
        }
        let node = self
            .nodes
            .get(target)
            .ok_or_else(|| Reject::HardlinkMissing(show(target)))?;
        if !matches!(node.kind, NodeKind::File { .. }) {
            return Err(Reject::HardlinkNotFile(show(target)));
        }
        // Replacing `path` removes `path` and its subtree before the link is made; a target
        // in there would be gone by then.
        if target == path || (target.starts_with(path) && target.get(path.len()) == Some(&b'/')) {
            return Err(Reject::HardlinkSelf(show(target)));
        }
        Ok(node.clone())
    }

    /// `.wh.NAME` in layer `layer`: `marker` is the whiteout's own normalized path.
    pub fn whiteout(
        &mut self,
        layer: usize,
        marker: &[u8],
        hidden: &[u8],
        ops: &mut Vec<Op>,
    ) -> Result<(), Reject> {
        match self.walk(marker)? {
            Walk::Dirs => {}
            // Nothing can live below a missing directory or a file: nothing to hide.
            Walk::Missing(_) | Walk::NotDir(_) => return Ok(()),
        }
        let (parent, _) = name::split_last(marker);
        let target = name::join(parent, hidden);
        if self.nodes.contains_key(&target) {
            self.hide_lower(layer, &target, true, ops);
        }
        Ok(())
    }

    /// `.wh..wh..opq` in layer `layer`: `marker` is the marker's own normalized path.
    pub fn opaque(&mut self, layer: usize, marker: &[u8], ops: &mut Vec<Op>) -> Result<(), Reject> {
        match self.walk(marker)? {
            Walk::Dirs => {}
            Walk::Missing(_) | Walk::NotDir(_) => return Ok(()),
        }
        let (dir, _) = name::split_last(marker);
        self.hide_lower(layer, dir, false, ops);
        Ok(())
    }

    /// Removes the nodes of layers below `layer` at (if `include_self`) and under `path`.
    /// A lower directory that still holds entries of this layer stays, as their parent: the
    /// spec says a whiteout never hides what its own layer adds, whatever the tar order.
    fn hide_lower(&mut self, layer: usize, path: &[u8], include_self: bool, ops: &mut Vec<Op>) {
        let mut keys: Vec<Vec<u8>> = self
            .nodes
            .range(below(path))
            .rev()
            .filter(|(_, n)| n.layer < layer)
            .map(|(k, _)| k.clone())
            .collect();
        if include_self && !path.is_empty() {
            keys.push(path.to_vec());
        }
        // Reverse byte order visits every descendant before its ancestors.
        for key in keys {
            let Some(node) = self.nodes.get(&key) else {
                continue;
            };
            if node.layer >= layer {
                continue;
            }
            let dir = node.kind.is_dir();
            if dir && self.has_descendants(&key) {
                continue;
            }
            self.nodes.remove(&key);
            ops.push(Op::Remove { path: key, dir });
        }
    }

    fn remove_subtree(&mut self, path: &[u8], ops: &mut Vec<Op>) {
        let mut keys: Vec<Vec<u8>> = self
            .nodes
            .range(below(path))
            .rev()
            .map(|(k, _)| k.clone())
            .collect();
        keys.push(path.to_vec());
        for key in keys {
            if let Some(node) = self.nodes.remove(&key) {
                ops.push(Op::Remove {
                    path: key,
                    dir: node.kind.is_dir(),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(mode: u32) -> Meta {
        Meta {
            mode,
            uid: 0,
            gid: 0,
            mtime: 0,
            xattrs: Vec::new(),
        }
    }

    struct T {
        t: Table,
        ops: Vec<Op>,
    }

    impl T {
        fn new() -> Self {
            T {
                t: Table::default(),
                ops: Vec::new(),
            }
        }
        fn file(&mut self, layer: usize, p: &str) -> Result<(), Reject> {
            self.t.add(
                layer,
                p.as_bytes(),
                New::File { size: 1 },
                meta(0o644),
                &mut self.ops,
            )
        }
        fn dir(&mut self, layer: usize, p: &str) -> Result<(), Reject> {
            self.t
                .add(layer, p.as_bytes(), New::Dir, meta(0o755), &mut self.ops)
        }
        fn link(&mut self, layer: usize, p: &str, target: &str) -> Result<(), Reject> {
            let new = New::Symlink {
                target: target.as_bytes().to_vec(),
            };
            self.t
                .add(layer, p.as_bytes(), new, meta(0o777), &mut self.ops)
        }
        fn hard(&mut self, layer: usize, p: &str, target: &str) -> Result<(), Reject> {
            let new = New::Hardlink {
                target: target.as_bytes().to_vec(),
            };
            self.t.add(layer, p.as_bytes(), new, meta(0), &mut self.ops)
        }
        fn wh(&mut self, layer: usize, marker: &str) -> Result<(), Reject> {
            let (_, last) = name::split_last(marker.as_bytes());
            match name::classify(last)? {
                name::Whiteout::Hide(h) => {
                    let h = h.to_vec();
                    self.t.whiteout(layer, marker.as_bytes(), &h, &mut self.ops)
                }
                name::Whiteout::Opaque => self.t.opaque(layer, marker.as_bytes(), &mut self.ops),
                other => panic!("not a whiteout: {other:?}"),
            }
        }
        fn paths(&self) -> Vec<String> {
            self.t
                .nodes()
                .keys()
                .map(|k| String::from_utf8(k.clone()).unwrap())
                .collect()
        }
    }

    #[test]
    fn implicit_parents_and_replacement() {
        let mut t = T::new();
        t.file(0, "a/b/c").unwrap();
        assert_eq!(t.paths(), ["a", "a/b", "a/b/c"]);
        assert_eq!(t.t.get(b"a").unwrap().meta, Meta::implicit_dir());
        // A file replacing a directory removes the whole subtree, deepest first.
        t.ops.clear();
        t.file(1, "a").unwrap();
        assert_eq!(t.paths(), ["a"]);
        assert_eq!(
            t.ops,
            vec![
                Op::Remove {
                    path: b"a/b/c".to_vec(),
                    dir: false
                },
                Op::Remove {
                    path: b"a/b".to_vec(),
                    dir: true
                },
                Op::Remove {
                    path: b"a".to_vec(),
                    dir: true
                },
                Op::File {
                    path: b"a".to_vec()
                },
            ]
        );
        // A file below a file is refused.
        assert_eq!(t.file(1, "a/x"), Err(Reject::ParentNotDir("a".into())));
    }

    #[test]
    fn dir_over_dir_only_updates_metadata() {
        let mut t = T::new();
        t.file(0, "d/f").unwrap();
        t.ops.clear();
        t.t.add(1, b"d", New::Dir, meta(0o700), &mut t.ops).unwrap();
        assert!(t.ops.is_empty());
        assert_eq!(t.paths(), ["d", "d/f"]);
        assert_eq!(t.t.get(b"d").unwrap().meta.mode, 0o700);
        assert_eq!(t.t.get(b"d").unwrap().layer, 1);
    }

    #[test]
    fn root_entry_sets_root_metadata_only() {
        let mut t = T::new();
        let m = Meta {
            uid: 1000,
            gid: 1000,
            ..meta(0o700)
        };
        t.t.add(0, b"", New::Dir, m, &mut t.ops).unwrap();
        assert_eq!(t.t.root().meta.mode, 0o700);
        assert_eq!((t.t.root().meta.uid, t.t.root().meta.gid), (0, 0));
        assert_eq!(
            t.t.add(0, b"", New::File { size: 0 }, meta(0), &mut t.ops),
            Err(Reject::ReplacesRoot)
        );
    }

    #[test]
    fn whiteout_hides_lower_file_and_subtree() {
        let mut t = T::new();
        t.file(0, "etc/passwd").unwrap();
        t.file(0, "opt/app/bin/x").unwrap();
        t.wh(1, "etc/.wh.passwd").unwrap();
        t.wh(1, ".wh.opt").unwrap();
        t.wh(1, "etc/.wh.absent").unwrap();
        t.wh(1, "missing/dir/.wh.x").unwrap();
        assert_eq!(t.paths(), ["etc"]);
    }

    #[test]
    fn whiteout_never_hides_its_own_layer() {
        // Entry before the whiteout in the same layer...
        let mut t = T::new();
        t.file(0, "x").unwrap();
        t.file(1, "x").unwrap();
        t.wh(1, ".wh.x").unwrap();
        assert_eq!(t.paths(), ["x"]);
        // ...and after it.
        let mut t = T::new();
        t.file(0, "x").unwrap();
        t.wh(1, ".wh.x").unwrap();
        t.file(1, "x").unwrap();
        assert_eq!(t.paths(), ["x"]);
        assert_eq!(t.t.get(b"x").unwrap().layer, 1);
        // A later layer does hide it.
        t.wh(2, ".wh.x").unwrap();
        assert!(t.paths().is_empty());
    }

    #[test]
    fn whiteout_of_dir_keeps_same_layer_children() {
        let mut t = T::new();
        t.file(0, "d/old").unwrap();
        t.file(1, "d/new").unwrap();
        t.wh(1, ".wh.d").unwrap();
        assert_eq!(t.paths(), ["d", "d/new"]);
    }

    #[test]
    fn opaque_marker_before_or_after_same_layer_entries() {
        for marker_first in [true, false] {
            let mut t = T::new();
            t.file(0, "d/lower").unwrap();
            t.file(0, "d/sub/lower").unwrap();
            t.file(0, "keep/x").unwrap();
            if marker_first {
                t.wh(1, "d/.wh..wh..opq").unwrap();
            }
            t.dir(1, "d").unwrap();
            t.file(1, "d/upper").unwrap();
            t.dir(1, "d/sub").unwrap();
            t.file(1, "d/sub/upper").unwrap();
            if !marker_first {
                t.wh(1, "d/.wh..wh..opq").unwrap();
            }
            assert_eq!(
                t.paths(),
                ["d", "d/sub", "d/sub/upper", "d/upper", "keep", "keep/x"],
                "marker_first={marker_first}"
            );
        }
    }

    #[test]
    fn opaque_root_and_missing_dir() {
        let mut t = T::new();
        t.file(0, "a").unwrap();
        t.file(0, "b/c").unwrap();
        t.file(1, "z").unwrap();
        t.wh(1, ".wh..wh..opq").unwrap();
        assert_eq!(t.paths(), ["z"]);
        t.wh(2, "nope/.wh..wh..opq").unwrap();
        assert_eq!(t.paths(), ["z"]);
    }

    #[test]
    fn nothing_is_written_through_a_symlink() {
        let mut t = T::new();
        t.link(0, "link", "/etc").unwrap();
        assert_eq!(
            t.file(0, "link/passwd"),
            Err(Reject::ThroughSymlink("link".into()))
        );
        assert_eq!(
            t.file(1, "link/a/b"),
            Err(Reject::ThroughSymlink("link".into()))
        );
        assert_eq!(
            t.wh(1, "link/.wh.passwd"),
            Err(Reject::ThroughSymlink("link".into()))
        );
        assert_eq!(
            t.wh(1, "link/.wh..wh..opq"),
            Err(Reject::ThroughSymlink("link".into()))
        );
        // Replacing the link itself is fine.
        t.dir(1, "link").unwrap();
        t.file(1, "link/passwd").unwrap();
    }

    #[test]
    fn symlink_escape_refused() {
        let mut t = T::new();
        assert!(matches!(
            t.link(0, "a/b", "../../../etc/shadow"),
            Err(Reject::SymlinkEscapes(_))
        ));
        assert!(t.paths().is_empty(), "nothing created for a refused entry");
    }

    #[test]
    fn hardlinks_share_inode_and_metadata() {
        let mut t = T::new();
        t.t.add(0, b"bin/a", New::File { size: 5 }, meta(0o4755), &mut t.ops)
            .unwrap();
        t.hard(1, "bin/b", "bin/a").unwrap();
        let a = t.t.get(b"bin/a").unwrap().clone();
        let b = t.t.get(b"bin/b").unwrap().clone();
        assert_eq!(a.inode, b.inode);
        assert_eq!(b.meta.mode, 0o4755);
        assert_eq!(b.layer, 1);
        assert_eq!(
            t.hard(1, "c", "missing"),
            Err(Reject::HardlinkMissing("missing".into()))
        );
        assert_eq!(
            t.hard(1, "c", "bin"),
            Err(Reject::HardlinkNotFile("bin".into()))
        );
        assert_eq!(
            t.hard(1, "bin", "bin/a"),
            Err(Reject::HardlinkSelf("bin/a".into()))
        );
        assert_eq!(
            t.hard(1, "bin/a", "bin/a"),
            Err(Reject::HardlinkSelf("bin/a".into()))
        );
        assert_eq!(t.hard(1, "c", ""), Err(Reject::HardlinkRoot));
        // Removing one name keeps the other.
        t.wh(2, "bin/.wh.a").unwrap();
        assert_eq!(t.paths(), ["bin", "bin/b"]);
    }

    #[test]
    fn whiteout_names_cannot_be_directories() {
        let mut t = T::new();
        assert!(matches!(
            t.file(0, "a/.wh.b/c"),
            Err(Reject::WhiteoutAsDirectory(_))
        ));
    }
}
