//! Reading a `.deb` without dpkg: the outer `ar` archive, its `data.tar.{xz,zst,gz}` member, and
//! the tar stream inside, with path hardening (no absolute paths, no `..`, no links followed).

use std::io::{self, Read};
use std::path::{Component, Path, PathBuf};

use crate::KernelError;
use crate::compress::{self, Compression};

const AR_MAGIC: &[u8; 8] = b"!<arch>\n";
const AR_HEADER_LEN: usize = 60;

/// One member header of an `ar` archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArMember {
    pub name: String,
    pub size: u64,
}

/// A streaming reader of the common (System V / GNU, short names) `ar` format `.deb` files use.
/// After [`ArReader::next_member`], the reader itself yields that member's bytes.
#[derive(Debug)]
pub struct ArReader<R> {
    inner: R,
    /// Bytes of the current member not yet read.
    remaining: u64,
    /// Members are 2-byte aligned: an odd-sized one is followed by a `\n`.
    pad: bool,
    what: String,
}

impl<R: Read> ArReader<R> {
    /// Checks the global header. `what` names the archive in errors.
    pub fn new(mut inner: R, what: &str) -> Result<Self, KernelError> {
        let mut magic = [0u8; 8];
        inner
            .read_exact(&mut magic)
            .map_err(|e| archive_err(what, format!("reading ar header: {e}")))?;
        if &magic != AR_MAGIC {
            return Err(archive_err(what, "not an ar archive (no !<arch> magic)"));
        }
        Ok(ArReader {
            inner,
            remaining: 0,
            pad: false,
            what: what.to_string(),
        })
    }

    /// Skips what is left of the current member and reads the next header; `None` at the end.
    pub fn next_member(&mut self) -> Result<Option<ArMember>, KernelError> {
        let skip = self.remaining + u64::from(self.pad);
        let skipped = io::copy(&mut (&mut self.inner).take(skip), &mut io::sink())
            .map_err(|e| archive_err(&self.what, format!("skipping member: {e}")))?;
        if skipped != skip {
            return Err(archive_err(&self.what, "truncated inside a member"));
        }
        self.remaining = 0;
        self.pad = false;
        let mut header = [0u8; AR_HEADER_LEN];
        let mut got = 0;
        while got < AR_HEADER_LEN {
            let n = self
                .inner
                .read(&mut header[got..])
                .map_err(|e| archive_err(&self.what, format!("reading member header: {e}")))?;
            if n == 0 {
                break;
            }
            got += n;
        }
        if got == 0 {
            return Ok(None);
        }
        if got < AR_HEADER_LEN {
            return Err(archive_err(&self.what, "truncated member header"));
        }
        if &header[58..60] != b"`\n" {
            return Err(archive_err(&self.what, "bad member header terminator"));
        }
        let field =
            |r: std::ops::Range<usize>| String::from_utf8_lossy(&header[r]).trim_end().to_string();
        // GNU ar ends names with '/'; BSD long names (#1/N) do not occur in .deb files.
        let name = field(0..16).trim_end_matches('/').to_string();
        let size_text = field(48..58);
        let size: u64 = size_text.parse().map_err(|_| {
            archive_err(
                &self.what,
                format!("member {name:?} has bad size {size_text:?}"),
            )
        })?;
        self.remaining = size;
        self.pad = size % 2 == 1;
        Ok(Some(ArMember { name, size }))
    }
}

impl<R: Read> Read for ArReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 || buf.is_empty() {
            return Ok(0);
        }
        let want = buf
            .len()
            .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "ar member truncated",
            ));
        }
        self.remaining -= n as u64;
        Ok(n)
    }
}

fn archive_err(what: &str, message: impl Into<String>) -> KernelError {
    KernelError::Archive {
        path: what.to_string(),
        message: message.into(),
    }
}

/// Turns an archive path into a safe relative path: `./` prefixes are dropped; absolute paths and
/// `..` components are refused.
pub fn safe_relative_path(path: &Path, archive: &str) -> Result<PathBuf, KernelError> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::Normal(p) => out.push(p),
            Component::RootDir | Component::Prefix(_) | Component::ParentDir => {
                return Err(KernelError::UnsafePath {
                    archive: archive.to_string(),
                    path: path.display().to_string(),
                });
            }
        }
    }
    Ok(out)
}

/// What to do with one regular file of the data tarball.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    Skip,
    Extract,
}

/// Streams the `data.tar.*` member of the `.deb` at `deb` and hands every regular file whose
/// (safe, relative) path `select` accepts to `sink` with its contents. Every entry's path is
/// checked, extracted or not, so a hostile archive is refused as a whole. Links and special files
/// are never followed or created.
pub fn for_each_data_file(
    deb: &Path,
    mut select: impl FnMut(&Path) -> Disposition,
    mut sink: impl FnMut(&Path, &mut dyn Read) -> Result<(), KernelError>,
) -> Result<(), KernelError> {
    let what = deb.display().to_string();
    let file = std::fs::File::open(deb).map_err(KernelError::io(deb))?;
    let mut ar = ArReader::new(io::BufReader::new(file), &what)?;
    let mut member = None;
    while let Some(m) = ar.next_member()? {
        if m.name.starts_with("data.tar") {
            member = Some(m);
            break;
        }
    }
    let member = member.ok_or_else(|| archive_err(&what, "no data.tar member"))?;
    let member_what = format!("{what}:{}", member.name);
    let format = match member.name.rsplit_once('.') {
        Some((_, "tar")) if member.name == "data.tar" => None,
        Some((_, ext)) => Some(Compression::from_extension(ext).ok_or_else(|| {
            KernelError::UnsupportedCompression {
                what: member_what.clone(),
                format: ext.to_string(),
            }
        })?),
        None => None,
    };
    let stream: Box<dyn Read + '_> = match format {
        Some(f) => compress::decoder(f, &mut ar, &member_what)?,
        None => Box::new(&mut ar),
    };
    let mut archive = tar::Archive::new(stream);
    let entries = archive
        .entries()
        .map_err(|e| archive_err(&member_what, e.to_string()))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| archive_err(&member_what, e.to_string()))?;
        let raw = entry
            .path()
            .map_err(|e| archive_err(&member_what, e.to_string()))?
            .into_owned();
        let rel = safe_relative_path(&raw, &member_what)?;
        if !entry.header().entry_type().is_file() || rel.as_os_str().is_empty() {
            continue;
        }
        if select(&rel) == Disposition::Extract {
            sink(&rel, &mut entry)?;
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds an ar archive from (name, bytes) members the way dpkg-deb does.
    pub(crate) fn ar_archive(members: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = AR_MAGIC.to_vec();
        for (name, data) in members {
            out.extend_from_slice(
                format!(
                    "{:<16}{:<12}{:<6}{:<6}{:<8}{:<10}`\n",
                    format!("{name}/"),
                    0,
                    0,
                    0,
                    100644,
                    data.len()
                )
                .as_bytes(),
            );
            out.extend_from_slice(data);
            if data.len() % 2 == 1 {
                out.push(b'\n');
            }
        }
        out
    }

    /// A tar with the given regular files (path, contents) and one symlink.
    pub(crate) fn tarball(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_entry_type(tar::EntryType::Regular);
            // Written raw so that hostile paths reach the reader unchanged.
            let name = h.as_old_mut().name.as_mut();
            name[..path.len()].copy_from_slice(path.as_bytes());
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        b.append_link(&mut h, "./boot/link", "/etc/passwd").unwrap();
        b.into_inner().unwrap()
    }

    #[test]
    fn ar_members_are_read_with_odd_padding() {
        let data = ar_archive(&[
            ("debian-binary", b"2.0\n"),
            ("odd", b"abc"),
            ("last", b"xyz!"),
        ]);
        let mut ar = ArReader::new(&data[..], "t.deb").unwrap();
        let m = ar.next_member().unwrap().unwrap();
        assert_eq!(
            m,
            ArMember {
                name: "debian-binary".into(),
                size: 4
            }
        );
        // Skip "odd" without reading it; padding must still be honoured.
        assert_eq!(ar.next_member().unwrap().unwrap().name, "odd");
        assert_eq!(ar.next_member().unwrap().unwrap().name, "last");
        let mut s = String::new();
        ar.read_to_string(&mut s).unwrap();
        assert_eq!(s, "xyz!");
        assert!(ar.next_member().unwrap().is_none());
    }

    #[test]
    fn bad_ar_input_is_refused() {
        assert!(ArReader::new(&b"PK\x03\x04junkjunk"[..], "x.deb").is_err());
        let mut data = ar_archive(&[("data.tar.xz", b"0123456789")]);
        data.truncate(data.len() - 3);
        let mut ar = ArReader::new(&data[..], "x.deb").unwrap();
        ar.next_member().unwrap();
        let mut v = Vec::new();
        assert!(ar.read_to_end(&mut v).is_err());
        let mut bad = ar_archive(&[("m", b"12")]);
        bad[8 + 48] = b'z';
        let mut ar = ArReader::new(&bad[..], "x.deb").unwrap();
        assert!(
            ar.next_member()
                .unwrap_err()
                .to_string()
                .contains("bad size")
        );
    }

    #[test]
    fn safe_paths() {
        let ok = safe_relative_path(Path::new("./boot/vmlinuz-6.1"), "a").unwrap();
        assert_eq!(ok, Path::new("boot/vmlinuz-6.1"));
        for bad in ["/etc/passwd", "boot/../../etc/passwd", "../x", "./a/../b"] {
            let e = safe_relative_path(Path::new(bad), "data.tar.xz").unwrap_err();
            assert!(matches!(e, KernelError::UnsafePath { .. }), "{bad}");
        }
    }

    fn write_deb(dir: &Path, member: &str, tar: &[u8]) -> PathBuf {
        let data = match member.rsplit_once('.').map(|(_, e)| e) {
            Some("tar") => tar.to_vec(),
            Some(ext) => {
                crate::compress::tests::compress(Compression::from_extension(ext).unwrap(), tar)
            }
            None => unreachable!(),
        };
        let deb = ar_archive(&[
            ("debian-binary", b"2.0\n"),
            ("control.tar.xz", b"ignored"),
            (member, &data),
        ]);
        let path = dir.join(format!("{member}.deb"));
        std::fs::write(&path, deb).unwrap();
        path
    }

    #[test]
    fn data_files_are_selected_from_each_compression() {
        let dir = tempfile::tempdir().unwrap();
        let tar = tarball(&[
            ("./boot/vmlinuz-6.1.0-1-cloud-amd64", b"kernel"),
            ("./usr/share/doc/x", b"doc"),
        ]);
        for member in ["data.tar.xz", "data.tar.zst", "data.tar.gz", "data.tar"] {
            let deb = write_deb(dir.path(), member, &tar);
            let mut got = Vec::new();
            for_each_data_file(
                &deb,
                |p| {
                    if p.starts_with("boot") {
                        Disposition::Extract
                    } else {
                        Disposition::Skip
                    }
                },
                |p, r| {
                    let mut s = String::new();
                    r.read_to_string(&mut s).unwrap();
                    got.push((p.to_path_buf(), s));
                    Ok(())
                },
            )
            .unwrap_or_else(|e| panic!("{member}: {e}"));
            // The symlink ./boot/link is never handed out.
            assert_eq!(
                got,
                vec![(
                    PathBuf::from("boot/vmlinuz-6.1.0-1-cloud-amd64"),
                    "kernel".to_string()
                )],
                "{member}"
            );
        }
    }

    #[test]
    fn hostile_entries_refuse_the_whole_archive() {
        let dir = tempfile::tempdir().unwrap();
        for bad in ["../escape", "/etc/cron.d/x", "./lib/../../x"] {
            let tar = tarball(&[("./boot/ok", b"fine"), (bad, b"evil")]);
            let deb = write_deb(dir.path(), "data.tar.gz", &tar);
            let e = for_each_data_file(&deb, |_| Disposition::Skip, |_, _| Ok(())).unwrap_err();
            assert!(matches!(e, KernelError::UnsafePath { .. }), "{bad}: {e}");
        }
    }

    #[test]
    fn deb_without_data_member_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.deb");
        std::fs::write(&path, ar_archive(&[("debian-binary", b"2.0\n")])).unwrap();
        let e = for_each_data_file(&path, |_| Disposition::Skip, |_, _| Ok(())).unwrap_err();
        assert!(e.to_string().contains("no data.tar member"), "{e}");
        assert!(e.to_string().contains("x.deb"), "{e}");
    }
}
