//! ext4 (and ext2/3) superblock probing: the UUID and label, read straight from the device.
//!
//! The daemon formats per-VM disks with `mkfs.ext4 -U <uuid>` and reads the image's UUID with
//! [`read_ext4_uuid`]; the agent finds each disk in the guest by the same UUID, so nothing depends
//! on the order in which a VMM attaches drives.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// The superblock starts 1024 bytes into the device.
pub const SUPERBLOCK_OFFSET: usize = 1024;
const MAGIC_OFFSET: usize = 56;
const UUID_OFFSET: usize = 104;
const LABEL_OFFSET: usize = 120;
const EXT4_MAGIC: u16 = 0xEF53;
/// How many bytes from the start of a device [`Ext4Info::parse`] needs.
pub const PROBE_LEN: usize = SUPERBLOCK_OFFSET + LABEL_OFFSET + 16;

/// Reading a device or image failed.
#[derive(Debug, thiserror::Error)]
#[error("reading the ext4 superblock of {path}: {source}")]
pub struct Ext4Error {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// What banger needs from an ext superblock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ext4Info {
    /// Canonical lowercase UUID.
    pub uuid: String,
    /// The volume label; empty when unset.
    pub label: String,
}

impl Ext4Info {
    /// Parses the superblock from the first bytes of a device (at least [`PROBE_LEN`]). `None`
    /// when the magic is absent or the input is too short.
    pub fn parse(device_start: &[u8]) -> Option<Ext4Info> {
        let sb = device_start.get(SUPERBLOCK_OFFSET..PROBE_LEN)?;
        let magic = u16::from_le_bytes([sb[MAGIC_OFFSET], sb[MAGIC_OFFSET + 1]]);
        if magic != EXT4_MAGIC {
            return None;
        }
        let uuid: [u8; 16] = sb[UUID_OFFSET..UUID_OFFSET + 16].try_into().ok()?;
        let label = &sb[LABEL_OFFSET..LABEL_OFFSET + 16];
        let label = &label[..label.iter().position(|&b| b == 0).unwrap_or(16)];
        Some(Ext4Info {
            uuid: format_uuid(&uuid),
            label: String::from_utf8_lossy(label).into_owned(),
        })
    }
}

/// Formats 16 bytes as `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` (lowercase), the form `blkid` and
/// `mkfs.ext4 -U` use.
pub fn format_uuid(b: &[u8; 16]) -> String {
    let mut s = String::with_capacity(36);
    for (i, byte) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            s.push('-');
        }
        s.push_str(&format!("{byte:02x}"));
    }
    s
}

/// Reads the superblock of the image file or block device at `path`. `Ok(None)` when it is not
/// an ext2/3/4 filesystem (including a file too short to hold a superblock).
pub fn probe(path: &Path) -> Result<Option<Ext4Info>, Ext4Error> {
    let err = |source| Ext4Error {
        path: path.to_path_buf(),
        source,
    };
    let f = std::fs::File::open(path).map_err(err)?;
    let mut buf = vec![0u8; PROBE_LEN];
    let mut filled = 0;
    while filled < buf.len() {
        match f.read_at(&mut buf[filled..], filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(err(e)),
        }
    }
    Ok(Ext4Info::parse(&buf[..filled]))
}

/// The filesystem UUID of the ext4 image or device at `path`, `None` if it is not ext4.
pub fn read_ext4_uuid(path: &Path) -> Result<Option<String>, Ext4Error> {
    Ok(probe(path)?.map(|i| i.uuid))
}

/// The volume label of the ext4 image or device at `path` (empty if unset), `None` if it is not
/// ext4.
pub fn read_ext4_label(path: &Path) -> Result<Option<String>, Ext4Error> {
    Ok(probe(path)?.map(|i| i.label))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_superblock(uuid: [u8; 16], label: &[u8]) -> Vec<u8> {
        let mut v = vec![0u8; 4096];
        v[1024 + 56..1024 + 58].copy_from_slice(&0xEF53u16.to_le_bytes());
        v[1024 + 104..1024 + 120].copy_from_slice(&uuid);
        v[1024 + 120..1024 + 120 + label.len()].copy_from_slice(label);
        v
    }

    #[test]
    fn parses_synthetic_superblock() {
        let uuid = [
            0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0xfe, 0xdc, 0xba, 0x98, 0x76, 0x54,
            0x32, 0x10,
        ];
        let sb = fake_superblock(uuid, b"banger-work");
        let info = Ext4Info::parse(&sb).unwrap();
        assert_eq!(info.uuid, "01234567-89ab-cdef-fedc-ba9876543210");
        assert!(crate::config::is_canonical_uuid(&info.uuid));
        assert_eq!(info.label, "banger-work");
        let full = fake_superblock(uuid, b"0123456789abcdef");
        assert_eq!(Ext4Info::parse(&full).unwrap().label, "0123456789abcdef");
        assert_eq!(Ext4Info::parse(&[0u8; 4096]), None);
        assert_eq!(Ext4Info::parse(&sb[..1100]), None);
    }

    #[test]
    fn reads_files_and_reports_missing_ones() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("disk.img");
        std::fs::write(&p, fake_superblock([0xaa; 16], b"")).unwrap();
        assert_eq!(
            read_ext4_uuid(&p).unwrap().as_deref(),
            Some("aaaaaaaa-aaaa-aaaa-aaaa-aaaaaaaaaaaa")
        );
        assert_eq!(read_ext4_label(&p).unwrap().as_deref(), Some(""));
        let short = dir.path().join("short.img");
        std::fs::write(&short, b"tiny").unwrap();
        assert_eq!(read_ext4_uuid(&short).unwrap(), None);
        let e = read_ext4_uuid(&dir.path().join("absent.img")).unwrap_err();
        assert!(e.to_string().contains("absent.img"), "{e}");
    }

    #[test]
    fn matches_mkfs_ext4() {
        let Some(mkfs) = ["/usr/sbin/mkfs.ext4", "/sbin/mkfs.ext4"]
            .into_iter()
            .find(|p| Path::new(p).exists())
        else {
            eprintln!("SKIP: mkfs.ext4 not installed");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("fs.ext4");
        std::fs::File::create(&p).unwrap().set_len(8 << 20).unwrap();
        let uuid = "5e1f0a2b-3c4d-4e5f-8a9b-0c1d2e3f4a5b";
        let st = std::process::Command::new(mkfs)
            .args(["-F", "-q", "-L", "banger-up", "-U", uuid])
            .arg(&p)
            .status()
            .unwrap();
        assert!(st.success());
        assert_eq!(read_ext4_uuid(&p).unwrap().as_deref(), Some(uuid));
        assert_eq!(read_ext4_label(&p).unwrap().as_deref(), Some("banger-up"));
    }
}
