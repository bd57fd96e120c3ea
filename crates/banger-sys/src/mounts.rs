//! Mounts left under a directory banger owns (an interrupted mmdebstrap leaves `/proc`, `/sys`,
//! `/dev/pts` and `/dev/shm` mounted in its tree): found in `/proc/self/mountinfo` and detached
//! deepest first, so the tree can then be deleted without reaching into them.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Undoes the octal escapes of `/proc/*/mountinfo` and `/proc/mounts` (`\040` for a space,
/// `\011`, `\012`, `\134`).
pub fn unescape(s: &str) -> PathBuf {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..=i + 3].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = u32::from(b[i + 1] - b'0') * 64
                + u32::from(b[i + 2] - b'0') * 8
                + u32::from(b[i + 3] - b'0');
            if let Ok(byte) = u8::try_from(v) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    PathBuf::from(<std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(out))
}

/// Mount points in mountinfo `text` strictly under `root` (which should be canonical: mountinfo
/// shows real paths), deepest first; a point mounted several times is listed as often.
pub fn mounts_under_in(text: &str, root: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape)
        .filter(|p| p != root && p.starts_with(root))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found
}

/// Mount points of this mount namespace strictly under `root`, deepest first.
pub fn mounts_under(root: &Path) -> std::io::Result<Vec<PathBuf>> {
    let root = match std::fs::canonicalize(root) {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let text = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(mounts_under_in(&text, &root))
}

#[derive(Debug, thiserror::Error)]
#[error("unmounting {path}: {source}")]
pub struct UnmountError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// Detaches (`umount2(MNT_DETACH)`: works while busy) every mount under `root`, deepest first,
/// until none is left (stacked mounts take several rounds). Returns what was unmounted; the
/// first failure stops it (unmounting needs root or a mount namespace of one's own).
pub fn unmount_under(root: &Path) -> Result<Vec<PathBuf>, UnmountError> {
    let mut done = Vec::new();
    for _round in 0..16 {
        let found = mounts_under(root).map_err(|source| UnmountError {
            path: root.to_path_buf(),
            source,
        })?;
        if found.is_empty() {
            return Ok(done);
        }
        for p in found {
            let c = CString::new(p.as_os_str().as_bytes()).map_err(|_| UnmountError {
                path: p.clone(),
                source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
            })?;
            // SAFETY: a valid NUL-terminated path; MNT_DETACH|UMOUNT_NOFOLLOW never follows a
            // symlink at the last component.
            let rc = unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH | libc::UMOUNT_NOFOLLOW) };
            if rc != 0 {
                let e = std::io::Error::last_os_error();
                // Already gone with its parent (a detached parent takes its children along).
                if e.raw_os_error() != Some(libc::EINVAL) && e.raw_os_error() != Some(libc::ENOENT)
                {
                    return Err(UnmountError { path: p, source: e });
                }
            } else {
                done.push(p);
            }
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_mounts_strictly_under_deepest_first() {
        let text = "\
22 1 8:1 / / rw - ext4 /dev/sda1 rw
30 22 0:5 / /s/build rw - tmpfs t rw
31 30 0:6 / /s/build/x/proc rw - proc proc rw
32 31 0:7 / /s/build/x/proc/sys/fs/binfmt_misc rw - binfmt_misc b rw
33 30 0:8 / /s/build/with\\040space rw - tmpfs t rw
34 22 0:9 / /s/buildother rw - tmpfs t rw
";
        let got = mounts_under_in(text, Path::new("/s/build"));
        assert_eq!(
            got,
            vec![
                PathBuf::from("/s/build/x/proc/sys/fs/binfmt_misc"),
                PathBuf::from("/s/build/x/proc"),
                PathBuf::from("/s/build/with space"),
            ]
        );
    }
}
