//! Property test: many small random (and randomly corrupted) layers through `flatten`. Every
//! case must return (no panic, no hang); every accepted case must leave exactly the tree the
//! table describes, inside the tree directory, with no whiteout names. Every 500th accepted
//! case also goes through `write_ext4` and `e2fsck`.
//!
//! `BANGER_FUZZ_SEED=<n>` replays a run; `BANGER_FUZZ_LAYERS=<n>` changes the volume,
//! `BANGER_FUZZ_EXT4_EVERY=<n>` how often an accepted tree goes through ext4.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use banger_rootfs::{BuildOptions, LayerCompression, NodeKind, Tree, flatten, write_ext4};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::support::*;

/// Names that interact: few enough to collide, with whiteout and hostile ones mixed in.
const NAMES: &[&str] = &[
    "a",
    "b",
    "c",
    "d",
    "a",
    "b",
    "c",
    "d",
    ".wh.a",
    ".wh.b",
    ".wh.c",
    ".wh..wh..opq",
    ".wh..wh.plnk",
    "..",
    ".",
    "",
    "x y",
    "q\"t",
    "ü",
    ".wh.",
    "<1>",
    "-n",
];
/// Clean cases: directory components and leaf names from separate pools (collisions still
/// happen, through the occasional crossover), so most clean cases are accepted.
const DIRS: &[&str] = &["a", "b", "c", "x y", "ü"];
const LEAVES: &[&str] = &["f", "g", "h", "q\"t", "<1>", "-n", "sp ace", "a"];

/// One case's generator: `hostile` cases use every kind of bad input, clean ones only
/// valid names and in-tree link targets, so that enough cases get through to check the
/// invariants on interesting trees.
struct Gen {
    rng: StdRng,
    hostile: bool,
    files: Vec<String>,
}

impl Gen {
    fn pick(&mut self, from: &[&str]) -> String {
        from[self.rng.random_range(0..from.len())].to_string()
    }

    /// A clean path: up to two directory components and a leaf (file-like) or directory name.
    fn clean(&mut self, leaf: bool) -> String {
        let mut parts: Vec<String> = (0..self.rng.random_range(0..=2))
            .map(|_| self.pick(DIRS))
            .collect();
        parts.push(if leaf {
            self.pick(LEAVES)
        } else {
            self.pick(DIRS)
        });
        let p = parts.join("/");
        if self.rng.random_bool(0.1) {
            format!("./{p}")
        } else {
            p
        }
    }

    fn component(&mut self) -> String {
        match self.rng.random_range(0..100) {
            0 => "l".repeat(256),
            1 => "n\nl".into(),
            2 => "m".repeat(120),
            _ => NAMES[self.rng.random_range(0..NAMES.len())].into(),
        }
    }

    fn path(&mut self) -> String {
        let depth = self.rng.random_range(1..=3);
        let mut p = (0..depth)
            .map(|_| self.component())
            .collect::<Vec<_>>()
            .join("/");
        match self.rng.random_range(0..40) {
            0 | 1 if self.hostile => p.insert(0, '/'),
            2..=5 => p.insert_str(0, "./"),
            6 | 7 => p.push('/'),
            _ => {}
        }
        p
    }

    fn entry(&mut self) -> E {
        if !self.hostile {
            return self.clean_entry();
        }
        let p = self.path();
        let mut e = match self.rng.random_range(0..100) {
            0..=34 => {
                let len = self.rng.random_range(0..64);
                let data: Vec<u8> = (0..len).map(|_| self.rng.random()).collect();
                self.files.push(p.clone());
                E::file(&p, data, 0o644)
            }
            35..=54 => E::dir(&p, 0o755),
            55..=66 => {
                let target = match self.rng.random_range(0..8) {
                    0 => "a".to_string(),
                    1 => "../a".into(),
                    2 if self.hostile => "../../x".into(),
                    3 => "/etc".into(),
                    4 if self.hostile => "".into(),
                    5 if self.hostile => "a/../../..".into(),
                    _ => self.path().trim_start_matches('/').to_string(),
                };
                E::symlink(&p, target)
            }
            67..=78 => {
                let target = if !self.files.is_empty() && self.rng.random_bool(0.8) {
                    self.files[self.rng.random_range(0..self.files.len())].clone()
                } else {
                    self.path()
                };
                E::hardlink(&p, target)
            }
            79..=90 => {
                // Whiteout-shaped names get extra weight.
                let dir = p.trim_end_matches('/');
                let dir = dir.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
                let last = if self.rng.random_bool(0.3) {
                    ".wh..wh..opq".to_string()
                } else {
                    format!(".wh.{}", self.component())
                };
                E::whiteout(if dir.is_empty() {
                    last
                } else {
                    format!("{dir}/{last}")
                })
            }
            91..=93 => E::fifo(&p, 0o644),
            94..=96 => E::chardev(&p, 1, 3),
            _ if self.hostile => {
                let mut e = E::file(&p, "", 0o644);
                e.kind = [b'V', b'M', b'D', b'N', b'g', b'7', b'S'][self.rng.random_range(0..7)];
                e
            }
            _ => E::dir(&p, 0o700),
        };
        e.mode = match self.rng.random_range(0..6) {
            0 => 0o4755,
            1 => 0,
            2 => 0o1777,
            3 => self.rng.random_range(0..0o10000),
            _ => e.mode,
        };
        if self.rng.random_bool(0.2) {
            e.uid = self.rng.random_range(0..70000);
            e.gid = self.rng.random_range(0..70000);
        }
        if self.rng.random_bool(0.05) {
            e = e.xattr("user.fuzz", [1, 2, 3]);
        }
        if self.rng.random_bool(0.03) {
            e = e.xattr("system.weird", [1]);
        }
        if self.rng.random_bool(0.1) {
            e = e.pax();
        }
        e
    }

    fn clean_entry(&mut self) -> E {
        let mut e = match self.rng.random_range(0..100) {
            0..=39 => {
                let p = self.clean(true);
                let len = self.rng.random_range(0..64);
                let data: Vec<u8> = (0..len).map(|_| self.rng.random()).collect();
                self.files.push(p.trim_start_matches("./").to_string());
                E::file(&p, data, 0o644)
            }
            40..=59 => {
                let p = self.clean(false);
                E::dir(format!("{p}/"), 0o755)
            }
            60..=69 => {
                let p = self.clean(true);
                let target = self.pick(&["f", "a", "/etc", "/a/b", "./g", "a/../f"]);
                E::symlink(&p, target)
            }
            70..=79 if !self.files.is_empty() => {
                let p = self.clean(true);
                let target = self.files[self.rng.random_range(0..self.files.len())].clone();
                E::hardlink(&p, target)
            }
            70..=91 => {
                let dir = if self.rng.random_bool(0.5) {
                    self.clean(false)
                } else {
                    String::new()
                };
                let last = if self.rng.random_bool(0.3) {
                    ".wh..wh..opq".to_string()
                } else if self.rng.random_bool(0.5) {
                    format!(".wh.{}", self.pick(LEAVES))
                } else {
                    format!(".wh.{}", self.pick(DIRS))
                };
                E::whiteout(if dir.is_empty() {
                    last
                } else {
                    format!("{dir}/{last}")
                })
            }
            92..=95 => E::fifo(self.clean(true), 0o640),
            _ => E::chardev(self.clean(true), 1, 3),
        };
        e.mode = match self.rng.random_range(0..8) {
            0 => 0o4755,
            1 => 0,
            2 => 0o1777,
            3 => self.rng.random_range(0..0o10000),
            _ => e.mode,
        };
        if self.rng.random_bool(0.2) {
            e.uid = self.rng.random_range(0..70000);
            e.gid = self.rng.random_range(0..70000);
        }
        if self.rng.random_bool(0.05) {
            e = e.xattr("user.fuzz", [1, 2, 3]);
        }
        if self.rng.random_bool(0.1) {
            e = e.pax();
        }
        e
    }

    fn layer(&mut self) -> (Vec<u8>, LayerCompression) {
        let mut t = Tar::new();
        for _ in 0..self.rng.random_range(1..=12) {
            let e = self.entry();
            t.add(e);
        }
        let headers = t.headers.clone();
        let mut bytes = t.finish();
        let rng = &mut self.rng;
        if self.hostile && rng.random_bool(0.4) {
            for _ in 0..rng.random_range(1..=6) {
                let h = headers[rng.random_range(0..headers.len())];
                let at = if rng.random_bool(0.8) {
                    h + rng.random_range(0..512)
                } else {
                    rng.random_range(0..bytes.len())
                };
                bytes[at] = rng.random();
                if rng.random_bool(0.7) {
                    fix_checksum(&mut bytes, h);
                }
            }
        }
        if self.hostile && rng.random_bool(0.1) {
            let n = rng.random_range(0..bytes.len());
            bytes.truncate(n);
        }
        match rng.random_range(0..20) {
            0 => (gzip(&bytes), LayerCompression::Auto),
            1 => (zstd(&bytes), LayerCompression::Auto),
            _ => (bytes, LayerCompression::None),
        }
    }
}

fn escapes(link: &[u8], target: &[u8]) -> bool {
    if target.first() == Some(&b'/') {
        return false;
    }
    let mut depth = link.split(|&b| b == b'/').count() as i64 - 1;
    for c in target.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                depth -= 1;
                if depth < 0 {
                    return true;
                }
            }
            _ => depth += 1,
        }
    }
    false
}

/// Walks the scratch tree without following anything.
fn host_walk(root: &Path, rel: &[u8], out: &mut BTreeMap<Vec<u8>, fs::Metadata>) {
    let dir = root.join(std::ffi::OsStr::from_bytes(rel));
    for entry in fs::read_dir(&dir).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        let mut p = rel.to_vec();
        if !p.is_empty() {
            p.push(b'/');
        }
        p.extend_from_slice(name.as_bytes());
        let meta = fs::symlink_metadata(entry.path()).unwrap();
        let is_dir = meta.is_dir();
        out.insert(p.clone(), meta);
        if is_dir {
            host_walk(root, &p, out);
        }
    }
}

fn check_invariants(tree: &Tree, case: u64, seed: u64) {
    let ctx = format!("case {case} (BANGER_FUZZ_SEED={seed})");
    let mut host = BTreeMap::new();
    host_walk(tree.dir(), &[], &mut host);
    let table: Vec<&[u8]> = tree.iter().map(|(p, _)| p).collect();
    let host_paths: Vec<&[u8]> = host.keys().map(Vec::as_slice).collect();
    assert_eq!(host_paths, table, "{ctx}: host tree and table differ");
    let mut inodes: HashMap<u64, u64> = HashMap::new();
    for (path, node) in tree.iter() {
        let shown = String::from_utf8_lossy(path);
        assert!(
            !path.split(|&b| b == b'/').any(|c| c.starts_with(b".wh.")),
            "{ctx}: whiteout name {shown} left in the tree"
        );
        let m = &host[path];
        match &node.kind {
            NodeKind::File { size } => {
                assert!(m.is_file(), "{ctx}: {shown} should be a file");
                assert_eq!(m.len(), *size, "{ctx}: {shown} size");
            }
            NodeKind::Dir => assert!(m.is_dir(), "{ctx}: {shown} should be a dir"),
            NodeKind::Symlink { target } => {
                assert!(
                    m.file_type().is_symlink(),
                    "{ctx}: {shown} should be a symlink"
                );
                let t = fs::read_link(tree.dir().join(std::ffi::OsStr::from_bytes(path))).unwrap();
                assert_eq!(
                    t.as_os_str().as_bytes(),
                    target.as_slice(),
                    "{ctx}: {shown}"
                );
                assert!(!escapes(path, target), "{ctx}: {shown} escapes");
            }
            NodeKind::Fifo => {
                use std::os::unix::fs::FileTypeExt;
                assert!(m.file_type().is_fifo(), "{ctx}: {shown} should be a fifo")
            }
        }
        // Hardlinks (shared table inode) are shared host inodes, and only those.
        let prev = inodes.insert(node.inode, m.ino());
        if let Some(prev) = prev {
            assert_eq!(prev, m.ino(), "{ctx}: {shown} hardlink not shared");
        }
    }
}

/// The image holds exactly the tree: paths, types, modes, owners, shared inodes.
fn check_image_matches(tree: &Tree, img: &Path, case: u64, seed: u64) {
    let ctx = format!("case {case} (BANGER_FUZZ_SEED={seed})");
    let listed = Image::new(img).walk();
    let mut want: Vec<Vec<u8>> = tree
        .iter()
        .map(|(p, _)| {
            let mut k = b"/".to_vec();
            k.extend_from_slice(p);
            k
        })
        .collect();
    want.push(b"/".to_vec());
    want.sort();
    let got: Vec<Vec<u8>> = listed
        .keys()
        .filter(|k| k.as_slice() != b"/lost+found" || tree.get("lost+found").is_some())
        .cloned()
        .collect();
    assert_eq!(got, want, "{ctx}: image paths");
    let root = &listed[b"/".as_slice()];
    assert_eq!(
        root.mode,
        0o40000 | tree.root_node().meta.mode,
        "{ctx}: root mode"
    );
    assert_eq!((root.uid, root.gid), (0, 0), "{ctx}: root owner");
    let mut inodes: HashMap<u64, u32> = HashMap::new();
    for (path, node) in tree.iter() {
        let mut k = b"/".to_vec();
        k.extend_from_slice(path);
        let l = listed[&k];
        let shown = String::from_utf8_lossy(path);
        let ty = match node.kind {
            NodeKind::File { .. } => 0o100000,
            NodeKind::Dir => 0o40000,
            NodeKind::Symlink { .. } => 0o120000,
            NodeKind::Fifo => 0o10000,
        };
        assert_eq!(l.mode, ty | node.meta.mode, "{ctx}: {shown} mode");
        assert_eq!(
            (l.uid, l.gid),
            (node.meta.uid, node.meta.gid),
            "{ctx}: {shown} owner"
        );
        if let Some(prev) = inodes.insert(node.inode, l.ino) {
            assert_eq!(prev, l.ino, "{ctx}: {shown} hardlink");
        }
    }
}

#[test]
fn fuzz_flatten() {
    let seed: u64 = std::env::var("BANGER_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    let target_layers: u64 = std::env::var("BANGER_FUZZ_LAYERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000);
    let ext4_every: u64 = std::env::var("BANGER_FUZZ_EXT4_EVERY")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(500)
        .max(1);
    println!("fuzz seed: {seed} (replay with BANGER_FUZZ_SEED={seed})");
    let ext4 = tools_missing().is_none();
    if !ext4 {
        println!(
            "SKIP (ext4 part only): {}",
            tools_missing().unwrap_or_default()
        );
    }

    // Watchdog: a case that takes more than 30 s is a hang.
    let heartbeat = Arc::new(AtomicU64::new(0));
    {
        let hb = heartbeat.clone();
        std::thread::spawn(move || {
            let mut last = (u64::MAX, Instant::now());
            loop {
                std::thread::sleep(Duration::from_secs(1));
                let now = hb.load(Ordering::Relaxed);
                if now == u64::MAX {
                    return;
                }
                if now != last.0 {
                    last = (now, Instant::now());
                } else if last.1.elapsed() > Duration::from_secs(30) {
                    eprintln!("fuzz case {now} hangs (BANGER_FUZZ_SEED={seed})");
                    std::process::abort();
                }
            }
        });
    }

    let mut g = Gen {
        rng: StdRng::seed_from_u64(seed),
        hostile: false,
        files: Vec::new(),
    };
    // Thousands of tiny trees: on a busy shared disk, metadata writes dominate. Use tmpfs
    // when there is one.
    let tmp = match tempfile::tempdir_in("/dev/shm") {
        Ok(t) => t,
        Err(_) => tempfile::tempdir().unwrap(),
    };
    let layers_dir = tmp.path().join("layers");
    let boxdir = tmp.path().join("box");
    fs::create_dir(&layers_dir).unwrap();
    fs::create_dir(&boxdir).unwrap();
    let tree_dir = boxdir.join("tree");
    let img = tmp.path().join("img");
    let opts = BuildOptions {
        max_content_bytes: Some(64 << 20),
        ..Default::default()
    };

    let started = Instant::now();
    let mut ext4_time = Duration::ZERO;
    let (mut layers_total, mut case, mut ok, mut imaged) = (0u64, 0u64, 0u64, 0u64);
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    while layers_total < target_layers {
        case += 1;
        heartbeat.store(case, Ordering::Relaxed);
        let n = g.rng.random_range(1..=3);
        g.hostile = g.rng.random_bool(0.5);
        g.files.clear();
        let layers: Vec<_> = (0..n)
            .map(|i| {
                let (bytes, c) = g.layer();
                layer(&layers_dir, &format!("l{i}"), &bytes, c)
            })
            .collect();
        layers_total += n as u64;
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            flatten(&layers, &tree_dir, &opts, &mut |_| {})
        }))
        .unwrap_or_else(|_| panic!("flatten panicked: case {case} (BANGER_FUZZ_SEED={seed})"));
        match result {
            Ok(tree) => {
                ok += 1;
                check_invariants(&tree, case, seed);
                let inside: Vec<_> = fs::read_dir(&boxdir).unwrap().collect();
                assert_eq!(inside.len(), 1, "case {case}: something beside the tree");
                if ext4 && ok % ext4_every == 1 % ext4_every {
                    let t = Instant::now();
                    imaged += 1;
                    let opts = BuildOptions {
                        force_fixups: imaged % 2 == 0,
                        ..opts.clone()
                    };
                    write_ext4(&tree, &img, &opts, &mut |_| {}).unwrap_or_else(|e| {
                        panic!("case {case} (BANGER_FUZZ_SEED={seed}): write_ext4: {e}")
                    });
                    banger_rootfs::check_image(&img)
                        .unwrap_or_else(|e| panic!("case {case} (BANGER_FUZZ_SEED={seed}): {e}"));
                    check_image_matches(&tree, &img, case, seed);
                    fs::remove_file(&img).unwrap();
                    ext4_time += t.elapsed();
                }
                tree.remove().unwrap();
            }
            Err(e) => {
                assert!(!tree_dir.exists(), "case {case}: tree left after error {e}");
                let kind = match &e {
                    banger_rootfs::RootfsError::Entry { reason, .. } => {
                        let r = format!("{reason:?}");
                        r.split([' ', '(', '{']).next().unwrap_or("").to_string()
                    }
                    other => {
                        let r = format!("{other:?}");
                        r.split([' ', '(', '{']).next().unwrap_or("").to_string()
                    }
                };
                let kind = format!("{}{kind}", if g.hostile { "h:" } else { "c:" });
                *errors.entry(kind).or_default() += 1;
            }
        }
        let mut top: Vec<_> = fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        top.sort();
        assert_eq!(
            top,
            ["box", "layers"],
            "case {case}: files outside the tree"
        );
    }
    heartbeat.store(u64::MAX, Ordering::Relaxed);
    println!(
        "fuzz: {layers_total} layers in {case} cases, {ok} accepted ({imaged} through ext4), \
         errors {errors:?}, {:.1?} ({ext4_time:.1?} in ext4)",
        started.elapsed()
    );
    assert!(
        ok > case / 5,
        "too few accepted cases to mean anything: {ok}/{case}"
    );
}
