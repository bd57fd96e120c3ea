//! A few MiB set aside on the state dir's filesystem so the store can still record a stop or
//! kill when that filesystem is full (a guest filled its disk, which lives there too): the
//! first write that fails for lack of space frees the reserve and is retried once.
//!
//! SQLite in WAL mode needs new pages for every commit, so "write state in place" is not an
//! option; a reserve is the simplest thing that works. It is remade at the next daemon start
//! (if there is room again).

use std::io::Write;
use std::path::Path;

/// Big enough for many WAL commits of a few pages each.
pub const RESERVE_BYTES: usize = 4 << 20;

/// Makes the reserve file at `path` (really allocated: written, not sparse) unless it is there.
pub fn ensure(path: &Path) -> std::io::Result<()> {
    if std::fs::metadata(path).is_ok_and(|m| m.len() as usize == RESERVE_BYTES) {
        return Ok(());
    }
    let tmp = path.with_extension("tmp");
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&vec![0u8; RESERVE_BYTES])?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Frees the reserve; whether there was one to free.
pub fn release(path: &Path) -> bool {
    std::fs::remove_file(path).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ensure_then_release() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("reserve");
        ensure(&p).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().len() as usize, RESERVE_BYTES);
        ensure(&p).unwrap();
        assert!(release(&p));
        assert!(!release(&p));
    }
}
