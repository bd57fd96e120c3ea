//! Test support: a raw tar writer (so tests can produce hostile names the `tar` crate's
//! builder would refuse), compression helpers, and an ext4 inspector built on debugfs that
//! is independent of the library's own debugfs code.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use banger_rootfs::{Layer, LayerCompression};

/// Returns a reason when e2fsprogs is missing; tests then print `SKIP:` and return.
pub fn tools_missing() -> Option<String> {
    for t in ["mkfs.ext4", "debugfs", "e2fsck"] {
        if banger_rootfs::find_tool(t).is_none() {
            return Some(format!("{t} not installed (e2fsprogs)"));
        }
    }
    None
}

macro_rules! require_tools {
    () => {
        if let Some(reason) = $crate::support::tools_missing() {
            println!("SKIP: {reason}");
            return;
        }
    };
}
pub(crate) use require_tools;

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

// ---------------------------------------------------------------------------------------------
// tar writing

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Long {
    /// GNU `L`/`K` entries for names over 100 bytes.
    Gnu,
    /// PAX `path`/`linkpath` records.
    Pax,
}

#[derive(Clone, Debug)]
pub struct E {
    pub path: Vec<u8>,
    pub kind: u8,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: u64,
    pub data: Vec<u8>,
    pub link: Vec<u8>,
    pub xattrs: Vec<(String, Vec<u8>)>,
    pub dev: (u32, u32),
    pub long: Long,
    /// Put the path in a PAX record even when it is short (so it can hold a NUL).
    pub force_pax: bool,
}

impl E {
    fn new(path: impl AsRef<[u8]>, kind: u8, mode: u32) -> E {
        E {
            path: path.as_ref().to_vec(),
            kind,
            mode,
            uid: 0,
            gid: 0,
            mtime: 1_600_000_000,
            data: Vec::new(),
            link: Vec::new(),
            xattrs: Vec::new(),
            dev: (0, 0),
            long: Long::Gnu,
            force_pax: false,
        }
    }
    pub fn file(path: impl AsRef<[u8]>, data: impl AsRef<[u8]>, mode: u32) -> E {
        let mut e = E::new(path, b'0', mode);
        e.data = data.as_ref().to_vec();
        e
    }
    pub fn dir(path: impl AsRef<[u8]>, mode: u32) -> E {
        E::new(path, b'5', mode)
    }
    pub fn symlink(path: impl AsRef<[u8]>, target: impl AsRef<[u8]>) -> E {
        let mut e = E::new(path, b'2', 0o777);
        e.link = target.as_ref().to_vec();
        e
    }
    pub fn hardlink(path: impl AsRef<[u8]>, target: impl AsRef<[u8]>) -> E {
        let mut e = E::new(path, b'1', 0o644);
        e.link = target.as_ref().to_vec();
        e
    }
    pub fn fifo(path: impl AsRef<[u8]>, mode: u32) -> E {
        E::new(path, b'6', mode)
    }
    pub fn chardev(path: impl AsRef<[u8]>, major: u32, minor: u32) -> E {
        let mut e = E::new(path, b'3', 0o666);
        e.dev = (major, minor);
        e
    }
    pub fn blockdev(path: impl AsRef<[u8]>, major: u32, minor: u32) -> E {
        let mut e = E::new(path, b'4', 0o660);
        e.dev = (major, minor);
        e
    }
    /// An empty regular file, the usual encoding of whiteouts.
    pub fn whiteout(path: impl AsRef<[u8]>) -> E {
        E::file(path, b"", 0o644)
    }
    pub fn owner(mut self, uid: u64, gid: u64) -> E {
        self.uid = uid;
        self.gid = gid;
        self
    }
    pub fn xattr(mut self, name: &str, value: impl AsRef<[u8]>) -> E {
        self.xattrs
            .push((name.to_string(), value.as_ref().to_vec()));
        self
    }
    pub fn pax(mut self) -> E {
        self.long = Long::Pax;
        self
    }
    pub fn pax_path_with_nul(mut self) -> E {
        self.long = Long::Pax;
        self.force_pax = true;
        self
    }
    pub fn mtime(mut self, t: u64) -> E {
        self.mtime = t;
        self
    }
}

fn pax_record(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    let body = key.len() + value.len() + 3;
    let mut len = body + 1;
    while len != body + len.to_string().len() {
        len = body + len.to_string().len();
    }
    out.extend_from_slice(len.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(key);
    out.push(b'=');
    out.extend_from_slice(value);
    out.push(b'\n');
}

#[derive(Default)]
pub struct Tar {
    pub buf: Vec<u8>,
    /// Offsets of every 512-byte header written (for mutation tests).
    pub headers: Vec<usize>,
}

impl Tar {
    pub fn new() -> Tar {
        Tar::default()
    }

    fn raw(&mut self, name: &[u8], link: &[u8], kind: u8, e: &E, data: &[u8]) {
        let mut h = tar::Header::new_gnu();
        {
            let old = h.as_old_mut();
            let n = name.len().min(100);
            old.name[..n].copy_from_slice(&name[..n]);
            let l = link.len().min(100);
            old.linkname[..l].copy_from_slice(&link[..l]);
        }
        h.set_mode(e.mode);
        h.set_uid(e.uid);
        h.set_gid(e.gid);
        h.set_mtime(e.mtime);
        h.set_size(data.len() as u64);
        h.set_entry_type(tar::EntryType::new(kind));
        if kind == b'3' || kind == b'4' {
            h.set_device_major(e.dev.0).unwrap();
            h.set_device_minor(e.dev.1).unwrap();
        }
        h.set_cksum();
        self.headers.push(self.buf.len());
        self.buf.extend_from_slice(h.as_bytes());
        self.buf.extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        self.buf.extend(std::iter::repeat_n(0u8, pad));
    }

    pub fn add(&mut self, e: E) -> &mut Tar {
        let mut pax = Vec::new();
        let long_path = e.path.len() > 100;
        let long_link = e.link.len() > 100;
        if e.long == Long::Pax && (long_path || e.force_pax) {
            pax_record(&mut pax, b"path", &e.path);
        }
        if e.long == Long::Pax && long_link {
            pax_record(&mut pax, b"linkpath", &e.link);
        }
        for (k, v) in &e.xattrs {
            pax_record(&mut pax, format!("SCHILY.xattr.{k}").as_bytes(), v);
        }
        if !pax.is_empty() {
            self.raw(b"././@PaxHeader", b"", b'x', &e, &pax);
        }
        if e.long == Long::Gnu && long_path {
            let mut d = e.path.clone();
            d.push(0);
            self.raw(b"././@LongLink", b"", b'L', &e, &d);
        }
        if e.long == Long::Gnu && long_link {
            let mut d = e.link.clone();
            d.push(0);
            self.raw(b"././@LongLink", b"", b'K', &e, &d);
        }
        let data = e.data.clone();
        self.raw(&e.path, &e.link, e.kind, &e, &data);
        self
    }

    pub fn finish(&mut self) -> Vec<u8> {
        let mut v = std::mem::take(&mut self.buf);
        v.extend_from_slice(&[0u8; 1024]);
        v
    }
}

/// Recomputes the checksum of the header at `off` (after a mutation).
pub fn fix_checksum(buf: &mut [u8], off: usize) {
    let h = &mut buf[off..off + 512];
    h[148..156].fill(b' ');
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    let s = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(s.as_bytes());
}

pub fn tar_of(entries: impl IntoIterator<Item = E>) -> Vec<u8> {
    let mut t = Tar::new();
    for e in entries {
        t.add(e);
    }
    t.finish()
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

pub fn zstd(data: &[u8]) -> Vec<u8> {
    ruzstd::encoding::compress_to_vec(data, ruzstd::encoding::CompressionLevel::Fastest)
}

/// Writes a layer blob into `dir` and describes it.
pub fn layer(dir: &Path, name: &str, bytes: &[u8], compression: LayerCompression) -> Layer {
    let path = dir.join(name);
    fs::write(&path, bytes).unwrap();
    Layer {
        path,
        compression,
        label: format!("sha256:{name}"),
    }
}

// ---------------------------------------------------------------------------------------------
// ext4 inspection

fn debugfs_bin() -> PathBuf {
    banger_rootfs::find_tool("debugfs").expect("debugfs")
}

pub fn quote(path: &[u8]) -> Vec<u8> {
    let mut v = vec![b'"'];
    for &b in path {
        if b == b'"' {
            v.push(b'"');
        }
        v.push(b);
    }
    v.push(b'"');
    v
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listed {
    pub ino: u32,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
}

pub struct Image {
    pub path: PathBuf,
    work: tempfile::TempDir,
}

impl Image {
    pub fn new(path: &Path) -> Image {
        Image {
            path: path.to_path_buf(),
            work: tempfile::tempdir().unwrap(),
        }
    }

    /// Runs a debugfs command script (read-only), returning stdout.
    pub fn script(&self, lines: &[Vec<u8>]) -> Vec<u8> {
        let f = self.work.path().join("cmds");
        let mut body = Vec::new();
        for l in lines {
            body.extend_from_slice(l);
            body.push(b'\n');
        }
        fs::write(&f, body).unwrap();
        let o = Command::new(debugfs_bin())
            .arg("-f")
            .arg(&f)
            .arg(&self.path)
            .output()
            .unwrap();
        assert!(o.status.success(), "debugfs failed: {o:?}");
        o.stdout
    }

    pub fn request(&self, req: &str) -> String {
        let o = Command::new(debugfs_bin())
            .arg("-R")
            .arg(req)
            .arg(&self.path)
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Every path in the image (`/`-prefixed, the root as `/`), breadth first, one debugfs
    /// run per level, each directory listed by its absolute quoted path.
    pub fn walk(&self) -> BTreeMap<Vec<u8>, Listed> {
        let mut all = BTreeMap::new();
        let mut level: Vec<Vec<u8>> = vec![b"/".to_vec()];
        while !level.is_empty() {
            let cmds: Vec<Vec<u8>> = level
                .iter()
                .map(|d| {
                    let mut c = b"ls -p ".to_vec();
                    c.extend(quote(d));
                    c
                })
                .collect();
            let out = self.script(&cmds);
            let mut next = Vec::new();
            let mut idx: isize = -1;
            for line in out.split(|&b| b == b'\n') {
                if line.starts_with(b"debugfs: ") {
                    idx += 1;
                    continue;
                }
                if line.is_empty() {
                    continue;
                }
                let parts: Vec<&[u8]> = line.split(|&b| b == b'/').collect();
                assert_eq!(
                    parts.len(),
                    8,
                    "bad ls line {:?}",
                    String::from_utf8_lossy(line)
                );
                let name = parts[5];
                let s = |b: &[u8]| std::str::from_utf8(b).unwrap().to_string();
                let dir = &level[idx as usize];
                let l = Listed {
                    ino: s(parts[1]).parse().unwrap(),
                    mode: u32::from_str_radix(&s(parts[2]), 8).unwrap(),
                    uid: s(parts[3]).parse::<i64>().unwrap() as u32,
                    gid: s(parts[4]).parse::<i64>().unwrap() as u32,
                    size: s(parts[6]).parse().unwrap_or(0),
                };
                if l.ino == 0 {
                    continue; // unused directory slot
                }
                if name == b"." {
                    if dir == b"/" {
                        all.insert(b"/".to_vec(), l);
                    }
                    continue;
                }
                if name == b".." {
                    continue;
                }
                let mut p = dir.clone();
                if p != b"/" {
                    p.push(b'/');
                }
                p.extend_from_slice(name);
                if l.mode & 0o170000 == 0o040000 {
                    next.push(p.clone());
                }
                all.insert(p, l);
            }
            assert_eq!(idx as usize + 1, level.len());
            level = next;
        }
        all
    }

    /// `rdump /` into a fresh directory (content and symlink targets), made readable.
    pub fn rdump(&self) -> PathBuf {
        let dest = self.work.path().join("rdump");
        let _ = fs::remove_dir_all(&dest);
        fs::create_dir(&dest).unwrap();
        let mut req = b"rdump / ".to_vec();
        req.extend(quote(dest.as_os_str().as_bytes()));
        self.script(&[req]);
        make_readable(&dest);
        dest
    }

    pub fn xattr_names(&self, path: &[u8]) -> Vec<String> {
        let mut c = b"ea_list ".to_vec();
        c.extend(quote(path));
        let out = String::from_utf8_lossy(&self.script(&[c])).into_owned();
        out.lines()
            .filter(|l| l.starts_with("  "))
            .filter_map(|l| l.trim().split(" (").next().map(str::to_string))
            .collect()
    }

    pub fn xattr(&self, path: &[u8], name: &str) -> Vec<u8> {
        let f = self.work.path().join("xattr");
        let _ = fs::remove_file(&f);
        let mut c = b"ea_get -f ".to_vec();
        c.extend(quote(f.as_os_str().as_bytes()));
        c.push(b' ');
        c.extend(quote(path));
        c.push(b' ');
        c.extend_from_slice(name.as_bytes());
        self.script(&[c]);
        fs::read(&f).unwrap_or_default()
    }

    pub fn mtime(&self, path: &[u8]) -> i64 {
        let mut c = b"stat ".to_vec();
        c.extend(quote(path));
        let out = String::from_utf8_lossy(&self.script(&[c])).into_owned();
        let line = out
            .lines()
            .find(|l| l.trim_start().starts_with("mtime:"))
            .unwrap_or_else(|| panic!("no mtime in {out}"));
        let hex = line.trim_start()["mtime: 0x".len()..]
            .split(':')
            .next()
            .unwrap();
        i64::from(u32::from_str_radix(hex, 16).unwrap() as i32)
    }

    pub fn fsck(&self) {
        banger_rootfs::check_image(&self.path).unwrap_or_else(|e| panic!("e2fsck: {e}"));
    }
}

pub fn make_readable(dir: &Path) {
    for entry in fs::read_dir(dir).unwrap().flatten() {
        let t = entry.file_type().unwrap();
        if t.is_dir() {
            let _ = fs::set_permissions(entry.path(), fs::Permissions::from_mode(0o755));
            make_readable(&entry.path());
        } else if t.is_file() {
            let _ = fs::set_permissions(entry.path(), fs::Permissions::from_mode(0o644));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// expected trees

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    File(Vec<u8>),
    Dir,
    Symlink(Vec<u8>),
    Fifo,
}

#[derive(Debug, Clone)]
pub struct Want {
    pub kind: Kind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub xattrs: Vec<(String, Vec<u8>)>,
}

impl Want {
    pub fn file(content: impl AsRef<[u8]>, mode: u32) -> Want {
        Want {
            kind: Kind::File(content.as_ref().to_vec()),
            mode,
            uid: 0,
            gid: 0,
            xattrs: vec![],
        }
    }
    pub fn dir(mode: u32) -> Want {
        Want {
            kind: Kind::Dir,
            mode,
            uid: 0,
            gid: 0,
            xattrs: vec![],
        }
    }
    pub fn symlink(target: impl AsRef<[u8]>) -> Want {
        Want {
            kind: Kind::Symlink(target.as_ref().to_vec()),
            mode: 0o777,
            uid: 0,
            gid: 0,
            xattrs: vec![],
        }
    }
    pub fn fifo(mode: u32) -> Want {
        Want {
            kind: Kind::Fifo,
            mode,
            uid: 0,
            gid: 0,
            xattrs: vec![],
        }
    }
    pub fn owner(mut self, uid: u32, gid: u32) -> Want {
        self.uid = uid;
        self.gid = gid;
        self
    }
    pub fn xattr(mut self, name: &str, value: impl AsRef<[u8]>) -> Want {
        self.xattrs.push((name.into(), value.as_ref().to_vec()));
        self
    }
    fn type_bits(&self) -> u32 {
        match self.kind {
            Kind::File(_) => 0o100000,
            Kind::Dir => 0o040000,
            Kind::Symlink(_) => 0o120000,
            Kind::Fifo => 0o010000,
        }
    }
}

/// Compares the whole image with `want` (keys `/`-prefixed; `/` is the root; `lost+found`
/// ignored): same set of paths, kinds, full modes, owners, file contents, symlink targets,
/// and exactly the expected xattrs. Returns the listing (for inode comparisons).
pub fn assert_image(img: &Image, want: &BTreeMap<String, Want>) -> BTreeMap<Vec<u8>, Listed> {
    let listed = img.walk();
    let dump = img.rdump();
    let got: Vec<String> = listed
        .keys()
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .filter(|k| k != "/lost+found")
        .collect();
    let expected: Vec<String> = want.keys().cloned().collect();
    assert_eq!(got, expected, "set of paths differs");
    for (path, w) in want {
        let l = listed[path.as_bytes()];
        assert_eq!(
            l.mode,
            w.type_bits() | w.mode,
            "{path}: mode {:o} want {:o}",
            l.mode,
            w.type_bits() | w.mode
        );
        assert_eq!((l.uid, l.gid), (w.uid, w.gid), "{path}: owner");
        let host = dump.join(path.trim_start_matches('/'));
        match &w.kind {
            Kind::File(content) => {
                let data = fs::read(&host).unwrap_or_else(|e| panic!("{path}: {e}"));
                assert!(data == *content, "{path}: content differs");
                assert_eq!(l.size, content.len() as u64, "{path}: size");
            }
            Kind::Symlink(target) => {
                let t = fs::read_link(&host).unwrap_or_else(|e| panic!("{path}: {e}"));
                assert_eq!(
                    t.as_os_str().as_bytes(),
                    target.as_slice(),
                    "{path}: target"
                );
            }
            Kind::Dir | Kind::Fifo => {}
        }
        let mut names = img.xattr_names(path.as_bytes());
        names.sort();
        let mut want_names: Vec<String> = w.xattrs.iter().map(|(n, _)| n.clone()).collect();
        want_names.sort();
        assert_eq!(names, want_names, "{path}: xattr names");
        for (name, value) in &w.xattrs {
            assert_eq!(
                &img.xattr(path.as_bytes(), name),
                value,
                "{path}: xattr {name}"
            );
        }
    }
    listed
}
