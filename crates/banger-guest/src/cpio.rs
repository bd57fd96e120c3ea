//! The cpio `newc` format (`070701`), the archive format the Linux kernel unpacks as an
//! initramfs.
//!
//! Each entry is a 110-byte ASCII header (magic and 13 eight-digit hex fields), the NUL-terminated
//! name padded to 4 bytes, then the data padded to 4 bytes; the archive ends with an entry named
//! `TRAILER!!!`. Device nodes are just headers, which is why an unprivileged build can ship
//! `/dev/console`.

use std::io::Write;

const MAGIC: &[u8; 6] = b"070701";
const HEADER_LEN: usize = 110;
/// The name of the entry that ends an archive.
pub const TRAILER: &str = "TRAILER!!!";

/// File type bits (as in `st_mode`).
pub const S_IFDIR: u32 = 0o040000;
pub const S_IFREG: u32 = 0o100000;
pub const S_IFLNK: u32 = 0o120000;
pub const S_IFCHR: u32 = 0o020000;
const S_IFMT: u32 = 0o170000;

/// A problem with an archive being written or read.
#[derive(Debug, thiserror::Error)]
pub enum CpioError {
    #[error("cpio entry name {0:?} must be relative, non-empty, without NUL or '..'")]
    Name(String),
    #[error("cpio entry {name:?} is {len} bytes, more than newc's 4 GiB limit")]
    TooLarge { name: String, len: u64 },
    #[error("writing cpio archive: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed cpio archive at offset {offset}: {reason}")]
    Malformed { offset: usize, reason: String },
}

/// One archive member, as parsed back by [`parse`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub ino: u32,
    /// Type and permission bits, as `st_mode`.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: u32,
    pub nlink: u32,
    pub rdev_major: u32,
    pub rdev_minor: u32,
    /// File contents, or a symlink's target.
    pub data: Vec<u8>,
}

impl Entry {
    pub fn file_type(&self) -> u32 {
        self.mode & S_IFMT
    }
    pub fn perm(&self) -> u32 {
        self.mode & 0o7777
    }
}

/// Writes a newc archive entry by entry; [`finish`](Self::finish) writes the trailer. Every
/// member is owned by root with mtime 0, so the same inputs always give the same bytes.
#[derive(Debug)]
pub struct NewcWriter<W: Write> {
    out: W,
    next_ino: u32,
    written: u64,
}

impl<W: Write> NewcWriter<W> {
    pub fn new(out: W) -> Self {
        NewcWriter {
            out,
            next_ino: 1,
            written: 0,
        }
    }

    /// A directory with permission bits `perm`.
    pub fn dir(&mut self, name: &str, perm: u32) -> Result<(), CpioError> {
        self.entry(name, S_IFDIR | (perm & 0o7777), 2, (0, 0), &[])
    }

    /// A regular file.
    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> Result<(), CpioError> {
        self.entry(name, S_IFREG | (perm & 0o7777), 1, (0, 0), data)
    }

    /// A symbolic link to `target`.
    pub fn symlink(&mut self, name: &str, target: &str) -> Result<(), CpioError> {
        self.entry(name, S_IFLNK | 0o777, 1, (0, 0), target.as_bytes())
    }

    /// A character device node `major:minor`.
    pub fn char_device(
        &mut self,
        name: &str,
        perm: u32,
        major: u32,
        minor: u32,
    ) -> Result<(), CpioError> {
        self.entry(name, S_IFCHR | (perm & 0o7777), 1, (major, minor), &[])
    }

    /// Writes the trailer and returns the sink and the archive's size in bytes.
    pub fn finish(mut self) -> Result<(W, u64), CpioError> {
        self.raw_entry(TRAILER, 0, 1, (0, 0), &[], 0)?;
        self.out.flush()?;
        Ok((self.out, self.written))
    }

    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> Result<(), CpioError> {
        let bad = name.is_empty()
            || name.starts_with('/')
            || name.contains('\0')
            || name == TRAILER
            || name.split('/').any(|c| c.is_empty() || c == "..");
        if bad {
            return Err(CpioError::Name(name.to_string()));
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.raw_entry(name, mode, nlink, rdev, data, ino)
    }

    fn raw_entry(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
        ino: u32,
    ) -> Result<(), CpioError> {
        let size = u32::try_from(data.len()).map_err(|_| CpioError::TooLarge {
            name: name.to_string(),
            len: data.len() as u64,
        })?;
        let fields = [
            ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime
            size,
            0, // devmajor
            0, // devminor
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0, // check (only used by the crc format)
        ];
        let mut header = Vec::with_capacity(HEADER_LEN + name.len() + 4);
        header.extend_from_slice(MAGIC);
        for f in fields {
            header.extend_from_slice(format!("{f:08X}").as_bytes());
        }
        header.extend_from_slice(name.as_bytes());
        header.push(0);
        header.resize(header.len().next_multiple_of(4), 0);
        self.out.write_all(&header)?;
        self.out.write_all(data)?;
        let pad = data.len().next_multiple_of(4) - data.len();
        self.out.write_all(&[0u8; 3][..pad])?;
        self.written += (header.len() + data.len() + pad) as u64;
        Ok(())
    }
}

/// Parses a whole newc archive (up to and excluding the trailer). Used by tests and by callers
/// that want to check what an initramfs holds.
pub fn parse(bytes: &[u8]) -> Result<Vec<Entry>, CpioError> {
    let mut off = 0;
    let mut out = Vec::new();
    let malformed = |offset: usize, reason: &str| CpioError::Malformed {
        offset,
        reason: reason.to_string(),
    };
    loop {
        let header = bytes
            .get(off..off + HEADER_LEN)
            .ok_or_else(|| malformed(off, "truncated header (no trailer)"))?;
        if &header[..6] != MAGIC {
            return Err(malformed(off, "bad magic, expected 070701"));
        }
        let mut fields = [0u32; 13];
        for (i, f) in fields.iter_mut().enumerate() {
            let text = std::str::from_utf8(&header[6 + 8 * i..14 + 8 * i])
                .map_err(|_| malformed(off, "non-ASCII header field"))?;
            *f = u32::from_str_radix(text, 16).map_err(|_| malformed(off, "bad hex field"))?;
        }
        let namesize = fields[11] as usize;
        let name_end = off + HEADER_LEN + namesize;
        let name_bytes = bytes
            .get(off + HEADER_LEN..name_end)
            .ok_or_else(|| malformed(off, "truncated name"))?;
        if namesize == 0 || name_bytes[namesize - 1] != 0 {
            return Err(malformed(off, "name is not NUL-terminated"));
        }
        let name = String::from_utf8(name_bytes[..namesize - 1].to_vec())
            .map_err(|_| malformed(off, "name is not UTF-8"))?;
        let data_start = name_end.next_multiple_of(4);
        let data_end = data_start + fields[6] as usize;
        let data = bytes
            .get(data_start..data_end)
            .ok_or_else(|| malformed(off, "truncated data"))?;
        if name == TRAILER {
            return Ok(out);
        }
        out.push(Entry {
            name,
            ino: fields[0],
            mode: fields[1],
            uid: fields[2],
            gid: fields[3],
            nlink: fields[4],
            mtime: fields[5],
            rdev_major: fields[9],
            rdev_minor: fields[10],
            data: data.to_vec(),
        });
        off = data_end.next_multiple_of(4);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut w = NewcWriter::new(Vec::new());
        w.dir("dev", 0o755).unwrap();
        w.char_device("dev/console", 0o600, 5, 1).unwrap();
        w.file("init", 0o755, b"#!/bin/sh\necho hi\n").unwrap();
        w.file("empty", 0o644, b"").unwrap();
        w.symlink("sbin", "bin").unwrap();
        let (buf, n) = w.finish().unwrap();
        assert_eq!(n as usize, buf.len());
        buf
    }

    #[test]
    fn round_trips_through_parser() {
        let buf = sample();
        assert_eq!(buf.len() % 4, 0);
        assert!(buf.starts_with(b"070701"));
        let e = parse(&buf).unwrap();
        let names: Vec<_> = e.iter().map(|x| x.name.as_str()).collect();
        assert_eq!(names, ["dev", "dev/console", "init", "empty", "sbin"]);
        assert_eq!(e[0].file_type(), S_IFDIR);
        assert_eq!(e[1].file_type(), S_IFCHR);
        assert_eq!(
            (e[1].rdev_major, e[1].rdev_minor, e[1].perm()),
            (5, 1, 0o600)
        );
        assert_eq!(e[2].mode, S_IFREG | 0o755);
        assert_eq!(e[2].data, b"#!/bin/sh\necho hi\n");
        assert!(e[3].data.is_empty());
        assert_eq!(
            (e[4].file_type(), e[4].data.as_slice()),
            (S_IFLNK, &b"bin"[..])
        );
        assert!(e.iter().all(|x| x.uid == 0 && x.gid == 0 && x.mtime == 0));
        // Inode numbers are distinct: the kernel links entries sharing one.
        let mut inos: Vec<_> = e.iter().map(|x| x.ino).collect();
        inos.sort_unstable();
        inos.dedup();
        assert_eq!(inos.len(), e.len());
    }

    #[test]
    fn header_bytes_are_exact() {
        let mut w = NewcWriter::new(Vec::new());
        w.file("a", 0o644, b"xyz").unwrap();
        let (buf, _) = w.finish().unwrap();
        let expected_header = "070701\
            00000001000081A4000000000000000000000001000000000000000300000000\
            0000000000000000000000000000000200000000";
        assert_eq!(&buf[..110], expected_header.as_bytes());
        // name "a\0" -> 112 bytes, already aligned; data "xyz" + 1 pad byte.
        assert_eq!(&buf[110..112], b"a\0");
        assert_eq!(&buf[112..116], b"xyz\0");
        assert_eq!(&buf[116..122], b"070701");
    }

    #[test]
    fn rejects_bad_names_and_archives() {
        let mut w = NewcWriter::new(Vec::new());
        for bad in ["", "/abs", "a/../b", "a//b", "TRAILER!!!", "nul\0"] {
            assert!(
                matches!(w.file(bad, 0o644, b""), Err(CpioError::Name(_))),
                "{bad:?}"
            );
        }
        let buf = sample();
        assert!(matches!(
            parse(&buf[..buf.len() - 130]),
            Err(CpioError::Malformed { .. })
        ));
        let mut bad = buf.clone();
        bad[0] = b'1';
        let err = parse(&bad).unwrap_err().to_string();
        assert!(err.contains("offset 0"), "{err}");
    }

    #[test]
    fn gnu_cpio_reads_it() {
        let Some(cpio) = ["/usr/bin/cpio", "/bin/cpio"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
        else {
            eprintln!("SKIP: cpio not installed");
            return;
        };
        use std::io::Write as _;
        let mut child = std::process::Command::new(cpio)
            .args(["-t", "-v", "--quiet"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&sample()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        let listing = String::from_utf8(out.stdout).unwrap();
        let lines: Vec<&str> = listing.lines().collect();
        assert_eq!(lines.len(), 5, "{listing}");
        assert!(
            lines[1].starts_with("crw-------")
                && lines[1].contains("5,")
                && lines[1].ends_with("dev/console"),
            "{listing}"
        );
        assert!(
            lines[2].starts_with("-rwxr-xr-x") && lines[2].ends_with(" init"),
            "{listing}"
        );
        assert!(
            lines[4].starts_with("lrwxrwxrwx") && lines[4].ends_with("sbin -> bin"),
            "{listing}"
        );
    }
}
