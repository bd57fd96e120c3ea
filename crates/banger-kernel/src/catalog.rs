//! Catalog kernels: a tarball at a URL, pinned by its SHA256 (and optionally its size).
//!
//! [`pull_catalog_kernel`] downloads the tarball (HTTP or HTTPS, system trust store) into a
//! `.part` file while hashing it, refuses it unless the hash (and size, when the entry gives one)
//! match, then unpacks it into the usual kernel directory layout. The tarball (`.tar`, `.tar.gz`,
//! `.tar.xz` or `.tar.zst`, recognised by magic bytes) may hold only
//!
//! ```text
//! vmlinux              ELF x86-64 kernel (required)
//! initrd.img           an initrd to boot with instead of banger's initramfs (optional)
//! modules/<name>.ko    uncompressed modules (optional)
//! modules/load-order   their file names, one per line, dependencies first (required with modules)
//! ```
//!
//! plus the directory entries `./` and `modules/`. Any other entry, an absolute path, a `..`, a
//! link, a device or a duplicate refuses the whole tarball with an error naming the entry. Trust
//! rests on the catalog's SHA256 alone.

use std::collections::BTreeSet;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::compress::{self, Compression};
use crate::deb::safe_relative_path;
use crate::{
    KernelError, LOAD_ORDER, PullProgress, PullStage, PulledKernel, pull_staged, stage,
    write_manifest,
};

/// Largest tarball downloaded when the entry gives no size.
pub const MAX_TARBALL: u64 = 4 << 30;
/// Largest single file unpacked from a tarball.
const MAX_FILE: u64 = 2 << 30;
/// Largest total unpacked from a tarball.
const MAX_UNPACKED: u64 = 8 << 30;
/// How far past `Linux version ` the release string may run before the banner is given up on.
const MAX_BANNER: usize = 256;

/// One kernel of a catalog: where its tarball is and what it must hash to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogEntry {
    /// The kernel's name, which becomes its directory name.
    pub name: String,
    /// `http://` or `https://` URL of the tarball.
    pub url: String,
    /// SHA256 of the tarball, 64 hex digits.
    pub sha256: String,
    /// Size of the tarball in bytes; when given, any other size is refused.
    #[serde(default)]
    pub size: Option<u64>,
    /// Kernel release; when absent it is read from the `Linux version` banner in `vmlinux`.
    #[serde(default)]
    pub version: Option<String>,
}

impl CatalogEntry {
    /// Checks the entry's fields: a name usable as a directory name, an http(s) URL, a SHA256 of
    /// 64 hex digits, a non-zero size and a printable version.
    pub fn validate(&self) -> Result<(), KernelError> {
        let err = |message: String| KernelError::Catalog {
            name: self.name.clone(),
            message,
        };
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 128
            && self.name.starts_with(|c: char| c.is_ascii_alphanumeric())
            && !self.name.contains("..")
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-+".contains(c));
        if !name_ok {
            return Err(err(format!(
                "invalid name {:?}: expected 1 to 128 of A-Z a-z 0-9 . _ - +, starting with a letter or digit, no '..'",
                self.name
            )));
        }
        let host = self
            .url
            .strip_prefix("http://")
            .or_else(|| self.url.strip_prefix("https://"));
        let url_ok = host.is_some_and(|h| !h.is_empty() && !h.starts_with('/'))
            && !self
                .url
                .chars()
                .any(|c| c.is_whitespace() || c.is_control());
        if !url_ok {
            return Err(err(format!(
                "url {:?} is not an http:// or https:// URL",
                self.url
            )));
        }
        if self.sha256.len() != 64 || !self.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(err(format!(
                "sha256 {:?} is not 64 hex digits",
                self.sha256
            )));
        }
        if self.size == Some(0) {
            return Err(err("size 0: a kernel tarball is never empty".into()));
        }
        if let Some(v) = &self.version
            && (v.is_empty()
                || v.len() > 128
                || v.chars().any(|c| c.is_whitespace() || c.is_control()))
        {
            return Err(err(format!(
                "version {v:?} must be 1 to 128 characters without spaces"
            )));
        }
        Ok(())
    }
}

/// Pulls the kernel `entry` describes into `dest`, which must not exist. Work happens in
/// [`staging_dir`](crate::staging_dir)`(dest)`, renamed to `dest` only when complete; on any
/// error (download, hash or size mismatch, a refused tarball entry, a vmlinux that is not an
/// x86-64 ELF) nothing is left at `dest` or in the staging directory.
pub fn pull_catalog_kernel(
    entry: &CatalogEntry,
    dest: &Path,
    progress: &mut dyn FnMut(PullProgress),
) -> Result<PulledKernel, KernelError> {
    entry.validate()?;
    pull_staged(dest, |staging| pull_into(entry, staging, progress))
}

fn pull_into(
    entry: &CatalogEntry,
    staging: &Path,
    progress: &mut dyn FnMut(PullProgress),
) -> Result<PulledKernel, KernelError> {
    let work = staging.join(".work");
    std::fs::create_dir_all(&work).map_err(KernelError::io(&work))?;
    let url = entry.url.clone();
    stage(
        progress,
        PullStage::Download,
        match entry.size {
            Some(size) => format!("{} from {url} ({size} bytes)", entry.name),
            None => format!("{} from {url}", entry.name),
        },
    );
    let tarball = work.join("kernel.tar");
    crate::mirror::download_url_verified(
        &url,
        entry.size,
        entry.size.unwrap_or(MAX_TARBALL),
        &entry.sha256,
        &tarball,
        &format!("kernel tarball {}", entry.name),
        &mut |done, total| {
            progress(PullProgress::Download {
                stage: PullStage::Download,
                url: url.clone(),
                done,
                total,
            })
        },
    )?;

    stage(progress, PullStage::Extract, url.clone());
    let unpacked = extract_kernel_tarball(&tarball, &url, staging)?;

    stage(progress, PullStage::Vmlinux, "vmlinux".to_string());
    let vmlinux = staging.join("vmlinux");
    let facts = inspect_vmlinux(&vmlinux, &format!("{url}:vmlinux"))?;

    stage(
        progress,
        PullStage::Modules,
        format!("{} modules", unpacked.modules.len()),
    );
    stage(progress, PullStage::Finish, String::new());
    std::fs::remove_dir_all(&work).map_err(KernelError::io(&work))?;
    let manifest = PulledKernel {
        version: entry
            .version
            .clone()
            .or(facts.release)
            .unwrap_or_else(|| "unknown".to_string()),
        package: entry.name.clone(),
        package_version: entry.version.clone().unwrap_or_default(),
        vmlinux: PathBuf::from("vmlinux"),
        vmlinux_sha256: facts.sha256,
        deb_sha256: entry.sha256.to_ascii_lowercase(),
        modules: unpacked.modules,
        source_url: url,
        config: None,
        built_in: Vec::new(),
        vmlinuz_compression: None,
        suite: None,
        virtio_mmio_cmdline_devices: None,
        initrd: unpacked.initrd.then(|| PathBuf::from("initrd.img")),
    };
    write_manifest(staging, &manifest)?;
    Ok(manifest)
}

/// What [`extract_kernel_tarball`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnpackedTarball {
    /// Whether `initrd.img` was in the tarball.
    pub initrd: bool,
    /// `modules/<name>.ko` paths relative to the output directory, in load order.
    pub modules: Vec<PathBuf>,
}

/// The tar stream of `tarball`: plain, or gzip, xz or zstd compressed, told apart by magic bytes.
fn open_tarball(tarball: &Path, archive: &str) -> Result<Box<dyn Read>, KernelError> {
    let mut file = std::fs::File::open(tarball).map_err(KernelError::io(tarball))?;
    let mut head = Vec::with_capacity(512);
    (&mut file)
        .take(512)
        .read_to_end(&mut head)
        .map_err(KernelError::io(tarball))?;
    let stream = io::Cursor::new(head.clone()).chain(file);
    match Compression::detect(&head) {
        Some(f @ (Compression::Gzip | Compression::Xz | Compression::Zstd)) => {
            compress::decoder(f, stream, archive)
        }
        _ if head.get(257..262) == Some(b"ustar") => Ok(Box::new(stream)),
        _ => Err(KernelError::Archive {
            path: archive.to_string(),
            message: "not a tar archive (expected .tar, .tar.gz, .tar.xz or .tar.zst)".into(),
        }),
    }
}

/// `<name>.ko`, a bare file name of `A-Za-z0-9_-.+`.
fn is_module_file_name(s: &str) -> bool {
    s.len() > 3
        && s.ends_with(".ko")
        && !s.starts_with('.')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.+".contains(c))
}

/// Parses a `load-order` file: one bare `<name>.ko` per line; blank lines and `#` comments are
/// skipped; a name listed twice is refused. `what` names the file in errors.
pub fn parse_load_order(text: &str, what: &str) -> Result<Vec<String>, KernelError> {
    let mut out: Vec<String> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let err = |message: String| KernelError::Archive {
            path: format!("{what} line {}", i + 1),
            message,
        };
        if !is_module_file_name(line) {
            return Err(err(format!("{line:?} is not a bare <name>.ko file name")));
        }
        if out.iter().any(|m| m == line) {
            return Err(err(format!("{line} is listed twice")));
        }
        out.push(line.to_string());
    }
    Ok(out)
}

/// Unpacks a kernel tarball into `out` (an existing, empty directory), accepting only the
/// entries listed in the [module docs](self). `archive` (the URL, say) names the tarball in
/// errors, each entry as `<archive>:<entry path>`. Checks that `vmlinux` is there, that modules
/// come with a `load-order` naming exactly them, and that each module is an (uncompressed) ELF.
pub fn extract_kernel_tarball(
    tarball: &Path,
    archive: &str,
    out: &Path,
) -> Result<UnpackedTarball, KernelError> {
    let stream = open_tarball(tarball, archive)?;
    let mut tar = tar::Archive::new(stream);
    let archive_err = |message: String| KernelError::Archive {
        path: archive.to_string(),
        message,
    };
    let entries = tar.entries().map_err(|e| archive_err(e.to_string()))?;
    let mut seen = BTreeSet::new();
    let mut total = 0u64;
    for entry in entries {
        let mut entry = entry.map_err(|e| archive_err(e.to_string()))?;
        let kind = entry.header().entry_type();
        if kind.is_pax_global_extensions() {
            continue;
        }
        let raw = entry
            .path()
            .map_err(|e| archive_err(e.to_string()))?
            .into_owned();
        let shown = format!("{archive}:{}", raw.display());
        let bad = |message: &str| KernelError::Archive {
            path: shown.clone(),
            message: message.to_string(),
        };
        let rel = safe_relative_path(&raw, archive)?;
        let rel = rel.to_str().ok_or_else(|| bad("path is not UTF-8"))?;
        if kind.is_dir() {
            if rel.is_empty() || rel == "modules" {
                continue;
            }
            return Err(bad(
                "unexpected directory: a kernel tarball holds only vmlinux, initrd.img, modules/<name>.ko and modules/load-order",
            ));
        }
        if kind.is_symlink() || kind.is_hard_link() {
            return Err(bad("links are not accepted in a kernel tarball"));
        }
        if !kind.is_file() {
            return Err(bad(
                "devices, fifos and other special files are not accepted in a kernel tarball",
            ));
        }
        let allowed = matches!(rel, "vmlinux" | "initrd.img")
            || rel == format!("modules/{LOAD_ORDER}")
            || rel
                .strip_prefix("modules/")
                .is_some_and(is_module_file_name);
        if !allowed {
            return Err(bad(
                "not part of a kernel tarball (only vmlinux, initrd.img, modules/<name>.ko and modules/load-order are)",
            ));
        }
        if !seen.insert(rel.to_string()) {
            return Err(bad("appears twice in the tarball"));
        }
        let dest = out.join(rel);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).map_err(KernelError::io(parent))?;
        }
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&dest)
            .map_err(KernelError::io(&dest))?;
        let n = io::copy(&mut (&mut entry).take(MAX_FILE + 1), &mut file)
            .map_err(|e| bad(&format!("unpacking: {e}")))?;
        if n > MAX_FILE {
            return Err(bad(&format!("larger than {MAX_FILE} bytes")));
        }
        total += n;
        if total > MAX_UNPACKED {
            return Err(archive_err(format!(
                "unpacks to more than {MAX_UNPACKED} bytes"
            )));
        }
    }
    if !seen.contains("vmlinux") {
        return Err(archive_err("has no vmlinux".into()));
    }
    let on_disk: BTreeSet<&str> = seen
        .iter()
        .filter_map(|p| p.strip_prefix("modules/"))
        .filter(|n| *n != LOAD_ORDER)
        .collect();
    let order_path = out.join("modules").join(LOAD_ORDER);
    let order = if seen.contains(&format!("modules/{LOAD_ORDER}")) {
        let text = std::fs::read_to_string(&order_path).map_err(KernelError::io(&order_path))?;
        parse_load_order(&text, &format!("{archive}:modules/{LOAD_ORDER}"))?
    } else if let Some(first) = on_disk.first() {
        return Err(KernelError::Archive {
            path: format!("{archive}:modules/{first}"),
            message: format!("modules without modules/{LOAD_ORDER}"),
        });
    } else {
        Vec::new()
    };
    for name in &order {
        if !on_disk.contains(name.as_str()) {
            return Err(KernelError::Archive {
                path: format!("{archive}:modules/{LOAD_ORDER}"),
                message: format!("lists {name}, which is not in the tarball"),
            });
        }
    }
    for name in &on_disk {
        let entry_name = format!("{archive}:modules/{name}");
        if !order.iter().any(|o| o == name) {
            return Err(KernelError::Archive {
                path: entry_name,
                message: format!("not listed in modules/{LOAD_ORDER}"),
            });
        }
        let path = out.join("modules").join(name);
        let mut magic = [0u8; 4];
        let ok = std::fs::File::open(&path)
            .and_then(|mut f| f.read_exact(&mut magic))
            .is_ok()
            && &magic == b"\x7fELF";
        if !ok {
            return Err(KernelError::Archive {
                path: entry_name,
                message: "not an uncompressed ELF module".into(),
            });
        }
    }
    Ok(UnpackedTarball {
        initrd: seen.contains("initrd.img"),
        modules: order
            .iter()
            .map(|n| PathBuf::from("modules").join(n))
            .collect(),
    })
}

/// What [`inspect_vmlinux`] learnt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmlinuxFacts {
    pub sha256: String,
    /// The release from the kernel's `Linux version <release> ...` banner, when found.
    pub release: Option<String>,
}

/// Checks that `path` is a 64-bit little-endian x86-64 ELF file, hashes it and looks for its
/// version banner. `what` names it in errors.
pub fn inspect_vmlinux(path: &Path, what: &str) -> Result<VmlinuxFacts, KernelError> {
    const BANNER: &[u8] = b"Linux version ";
    let err = |message: &str| KernelError::Kernel {
        what: what.to_string(),
        message: message.to_string(),
    };
    let mut f = std::fs::File::open(path).map_err(KernelError::io(path))?;
    let mut head = [0u8; 64];
    f.read_exact(&mut head)
        .map_err(|_| err("too short to be an ELF kernel"))?;
    if !head.starts_with(b"\x7fELF") {
        return Err(err(
            "not an ELF file (an ELF vmlinux is needed, not a bzImage)",
        ));
    }
    if head[4] != 2 || head[5] != 1 {
        return Err(err("not a 64-bit little-endian ELF"));
    }
    if u16::from_le_bytes([head[0x12], head[0x13]]) != 62 {
        return Err(err("not an x86-64 ELF"));
    }
    let mut hasher = Sha256::new();
    hasher.update(head);
    let mut release = None;
    let mut scanning = true;
    // Bytes not yet ruled out as the start of the banner.
    let mut window: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(KernelError::io(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        if !scanning {
            continue;
        }
        window.extend_from_slice(&buf[..n]);
        match window.windows(BANNER.len()).position(|w| w == BANNER) {
            Some(pos) => {
                let rest = &window[pos + BANNER.len()..];
                if let Some(end) = rest.iter().position(|&b| b == b' ' || b == 0) {
                    let r = &rest[..end];
                    if !r.is_empty() && r.iter().all(|b| b.is_ascii_graphic()) {
                        release = Some(String::from_utf8_lossy(r).into_owned());
                    }
                    scanning = false;
                } else if rest.len() > MAX_BANNER {
                    scanning = false;
                } else {
                    window.drain(..pos);
                }
            }
            None => {
                let keep = BANNER.len() - 1;
                if window.len() > keep {
                    window.drain(..window.len() - keep);
                }
            }
        }
    }
    Ok(VmlinuxFacts {
        sha256: hex::encode(hasher.finalize()),
        release,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::tests::compress;

    fn fake_vmlinux(release: &str) -> Vec<u8> {
        let mut elf = vec![0u8; 200_000];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2;
        elf[5] = 1;
        elf[0x12] = 62;
        let banner = format!("Linux version {release} (test@test) #1 SMP\0");
        // Across the 1 MiB read boundary would need a bigger file; mid-file is enough here.
        elf[150_000..150_000 + banner.len()].copy_from_slice(banner.as_bytes());
        elf
    }

    #[derive(Clone, Copy)]
    enum Kind {
        File,
        Dir,
        Symlink,
        HardLink,
        Char,
    }

    fn tar_of(entries: &[(&str, Kind, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, kind, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_mode(0o644);
            let (t, len) = match kind {
                Kind::File => (tar::EntryType::Regular, data.len()),
                Kind::Dir => (tar::EntryType::Directory, 0),
                Kind::Symlink => (tar::EntryType::Symlink, 0),
                Kind::HardLink => (tar::EntryType::Link, 0),
                Kind::Char => (tar::EntryType::Char, 0),
            };
            h.set_entry_type(t);
            h.set_size(len as u64);
            // Raw names, so hostile paths reach the reader unchanged.
            let name = h.as_old_mut().name.as_mut();
            name[..path.len()].copy_from_slice(path.as_bytes());
            if matches!(kind, Kind::Symlink | Kind::HardLink) {
                h.set_link_name("vmlinux").unwrap();
            }
            h.set_cksum();
            b.append(&h, &data[..len]).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn module(name: &str) -> Vec<u8> {
        let mut m = b"\x7fELF\x02\x01\x01".to_vec();
        m.extend_from_slice(name.as_bytes());
        m
    }

    fn good_entries(vmlinux: &[u8]) -> Vec<(String, Kind, Vec<u8>)> {
        vec![
            ("./".into(), Kind::Dir, vec![]),
            ("./vmlinux".into(), Kind::File, vmlinux.to_vec()),
            ("./modules/".into(), Kind::Dir, vec![]),
            ("./modules/virtio.ko".into(), Kind::File, module("virtio")),
            (
                "./modules/virtio_blk.ko".into(),
                Kind::File,
                module("virtio_blk"),
            ),
            (
                "./modules/load-order".into(),
                Kind::File,
                b"# deps first\nvirtio.ko\n\nvirtio_blk.ko\n".to_vec(),
            ),
        ]
    }

    fn build(entries: &[(String, Kind, Vec<u8>)]) -> Vec<u8> {
        let v: Vec<(&str, Kind, &[u8])> = entries
            .iter()
            .map(|(p, k, d)| (p.as_str(), *k, d.as_slice()))
            .collect();
        tar_of(&v)
    }

    fn extract(bytes: &[u8]) -> (tempfile::TempDir, Result<UnpackedTarball, KernelError>) {
        let dir = tempfile::tempdir().unwrap();
        let t = dir.path().join("k.tar");
        std::fs::write(&t, bytes).unwrap();
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        let r = extract_kernel_tarball(&t, "http://h/k.tar", &out);
        (dir, r)
    }

    #[test]
    fn every_format_is_detected_and_unpacked() {
        let tar = build(&good_entries(&fake_vmlinux("6.12.1-test")));
        for (name, bytes) in [
            ("tar", tar.clone()),
            ("gz", compress(Compression::Gzip, &tar)),
            ("xz", compress(Compression::Xz, &tar)),
            ("zst", compress(Compression::Zstd, &tar)),
        ] {
            let (dir, r) = extract(&bytes);
            let u = r.unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(!u.initrd);
            assert_eq!(
                u.modules,
                [
                    PathBuf::from("modules/virtio.ko"),
                    PathBuf::from("modules/virtio_blk.ko")
                ],
                "{name}"
            );
            let out = dir.path().join("out");
            assert_eq!(
                std::fs::read(out.join("modules/virtio_blk.ko")).unwrap(),
                module("virtio_blk")
            );
            let facts = inspect_vmlinux(&out.join("vmlinux"), "v").unwrap();
            assert_eq!(facts.release.as_deref(), Some("6.12.1-test"));
            assert_eq!(
                facts.sha256,
                hex::encode(Sha256::digest(fake_vmlinux("6.12.1-test")))
            );
        }
    }

    #[test]
    fn vmlinux_alone_and_with_initrd_is_enough() {
        let v = fake_vmlinux("6.1");
        let (_d, r) = extract(&build(&[
            ("vmlinux".into(), Kind::File, v.clone()),
            ("initrd.img".into(), Kind::File, b"070701".to_vec()),
        ]));
        assert_eq!(
            r.unwrap(),
            UnpackedTarball {
                initrd: true,
                modules: vec![]
            }
        );
    }

    #[test]
    fn hostile_or_foreign_entries_are_refused_by_name() {
        let v = fake_vmlinux("6.1");
        let cases: Vec<(&str, Kind, &str)> = vec![
            ("../vmlinux", Kind::File, "unsafe path"),
            ("/vmlinux", Kind::File, "unsafe path"),
            ("./modules/../../x.ko", Kind::File, "unsafe path"),
            ("./etc/passwd", Kind::File, "not part of a kernel tarball"),
            (
                "./modules/sub/x.ko",
                Kind::File,
                "not part of a kernel tarball",
            ),
            (
                "./modules/x.ko.xz",
                Kind::File,
                "not part of a kernel tarball",
            ),
            ("./boot/", Kind::Dir, "unexpected directory"),
            ("./initrd.img", Kind::Symlink, "links"),
            ("./initrd.img", Kind::HardLink, "links"),
            ("./modules/null.ko", Kind::Char, "special files"),
            ("./vmlinux", Kind::File, "appears twice"),
        ];
        for (path, kind, needle) in cases {
            let mut e = vec![("./vmlinux".to_string(), Kind::File, v.clone())];
            e.push((path.to_string(), kind, b"evil".to_vec()));
            let (_d, r) = extract(&build(&e));
            let msg = r.unwrap_err().to_string();
            assert!(msg.contains(needle) && msg.contains(path), "{path}: {msg}");
            assert!(msg.contains("http://h/k.tar"), "{path}: {msg}");
        }
    }

    #[test]
    fn module_and_load_order_consistency() {
        let v = fake_vmlinux("6.1");
        let with = |extra: Vec<(&str, &[u8])>| {
            let mut e = vec![("vmlinux".to_string(), Kind::File, v.clone())];
            e.extend(
                extra
                    .into_iter()
                    .map(|(p, d)| (p.to_string(), Kind::File, d.to_vec())),
            );
            let (_d, r) = extract(&build(&e));
            r.unwrap_err().to_string()
        };
        let m = module("a");
        let e = with(vec![("modules/a.ko", &m)]);
        assert!(e.contains("modules/a.ko") && e.contains("without"), "{e}");
        let e = with(vec![
            ("modules/a.ko", &m),
            ("modules/load-order", b"b.ko\n"),
        ]);
        assert!(e.contains("lists b.ko"), "{e}");
        let e = with(vec![
            ("modules/a.ko", &m),
            ("modules/b.ko", &m),
            ("modules/load-order", b"a.ko\n"),
        ]);
        assert!(
            e.contains("modules/b.ko") && e.contains("not listed"),
            "{e}"
        );
        let e = with(vec![
            ("modules/a.ko", b"\x28\xb5\x2f\xfdzstd"),
            ("modules/load-order", b"a.ko\n"),
        ]);
        assert!(e.contains("not an uncompressed ELF"), "{e}");
        let e = with(vec![
            ("modules/a.ko", &m),
            ("modules/load-order", b"a.ko\n../a.ko\n"),
        ]);
        assert!(e.contains("line 2"), "{e}");
        let e = with(vec![
            ("modules/a.ko", &m),
            ("modules/load-order", b"a.ko\na.ko\n"),
        ]);
        assert!(e.contains("twice"), "{e}");
    }

    #[test]
    fn missing_vmlinux_and_non_tar_input_are_refused() {
        let (_d, r) = extract(&build(&[("initrd.img".into(), Kind::File, b"x".to_vec())]));
        assert!(r.unwrap_err().to_string().contains("has no vmlinux"));
        let (_d, r) = extract(b"PK\x03\x04 this is a zip file, not a tarball at all");
        assert!(r.unwrap_err().to_string().contains("not a tar archive"));
        // A compressed stream cut short is an error, not a silently short kernel.
        let gz = compress(
            Compression::Gzip,
            &build(&good_entries(&fake_vmlinux("6.1"))),
        );
        let (_d, r) = extract(&gz[..gz.len() / 2]);
        assert!(r.is_err());
    }

    #[test]
    fn vmlinux_must_be_x86_64_elf() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("vmlinux");
        let mut v = fake_vmlinux("6.1");
        v[0x12] = 183; // aarch64
        std::fs::write(&p, &v).unwrap();
        let e = inspect_vmlinux(&p, "http://h/k.tar:vmlinux").unwrap_err();
        assert!(e.to_string().contains("x86-64") && e.to_string().contains("http://h/k.tar"));
        std::fs::write(&p, b"MZ\x00\x00bzImage").unwrap();
        assert!(inspect_vmlinux(&p, "v").is_err());
        let mut bz = vec![0u8; 1024];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        std::fs::write(&p, &bz).unwrap();
        assert!(
            inspect_vmlinux(&p, "v")
                .unwrap_err()
                .to_string()
                .contains("not an ELF")
        );
    }

    #[test]
    fn banner_across_read_boundary_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("vmlinux");
        let mut v = fake_vmlinux("x");
        v.resize(3 << 20, 0);
        let banner = b"Linux version 6.9.0-split (a@b) #1";
        let at = (1 << 20) + 64 - 5;
        v[at..at + banner.len()].copy_from_slice(banner);
        // The fake banner of fake_vmlinux comes first; drop it.
        v[150_000..150_000 + 14].fill(0);
        std::fs::write(&p, &v).unwrap();
        let facts = inspect_vmlinux(&p, "v").unwrap();
        assert_eq!(facts.release.as_deref(), Some("6.9.0-split"));
    }

    #[test]
    fn entries_are_validated() {
        let good = CatalogEntry {
            name: "generic-6.12".into(),
            url: "https://example.org/k.tar.zst".into(),
            sha256: "A".repeat(64),
            size: Some(10),
            version: Some("6.12.8".into()),
        };
        good.validate().unwrap();
        let bad = |f: &dyn Fn(&mut CatalogEntry), needle: &str| {
            let mut e = good.clone();
            f(&mut e);
            let msg = e.validate().unwrap_err().to_string();
            assert!(msg.contains(needle), "{needle}: {msg}");
        };
        bad(&|e| e.name = "../x".into(), "invalid name");
        bad(&|e| e.name = "a/b".into(), "invalid name");
        bad(&|e| e.name = String::new(), "invalid name");
        bad(
            &|e| e.url = "ftp://example.org/k".into(),
            "ftp://example.org/k",
        );
        bad(
            &|e| e.url = "file:///etc/passwd".into(),
            "file:///etc/passwd",
        );
        bad(&|e| e.url = "http://".into(), "not an http");
        bad(&|e| e.url = "http://a b/".into(), "not an http");
        bad(&|e| e.sha256 = "abc".into(), "64 hex");
        bad(&|e| e.sha256 = "g".repeat(64), "64 hex");
        bad(&|e| e.size = Some(0), "size 0");
        bad(&|e| e.version = Some("6 1".into()), "version");
    }

    #[test]
    fn invalid_entry_is_refused_before_anything_is_created() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("k");
        let e = CatalogEntry {
            name: "k".into(),
            url: "gopher://x".into(),
            sha256: "0".repeat(64),
            size: None,
            version: None,
        };
        let err = pull_catalog_kernel(&e, &dest, &mut |_| {}).unwrap_err();
        assert!(matches!(err, KernelError::Catalog { .. }), "{err}");
        assert!(!crate::staging_dir(&dest).exists() && !dest.exists());
    }
}
