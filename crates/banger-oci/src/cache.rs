//! The content-addressed blob cache: `<cache_dir>/blobs/sha256/<hex>`.
//!
//! A blob file only ever appears by `rename` of a fully written, fsynced and verified partial
//! file, so a file named `<hex>` holds exactly the bytes of `sha256:<hex>` (barring someone
//! editing the cache by hand: see [`BlobCache::verify`]). Next to the blobs live
//! `<hex>.partial-<random>` files (downloads in progress, never read) and `<hex>.lock` files
//! (an flock that keeps two processes from downloading the same blob at once).

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;

use crate::OciError;
use crate::reference::is_sha256_hex;

/// Partial files and lock files older than this are left over from a crashed or killed process
/// (a live download touches its partial file continuously) and are removed by [`BlobCache::open`].
const STALE_AGE: Duration = Duration::from_secs(3600);
/// How often a process waiting for another process's download retries the lock.
const LOCK_POLL: Duration = Duration::from_millis(50);
/// Chunks queued between the network task and the hashing/writing thread: enough to keep both
/// busy, small enough to bound memory (reqwest chunks are at most a few tens of KiB).
const WRITER_QUEUE: usize = 64;

/// What [`BlobCache::prune`] removed (or would remove, in a dry run).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PruneReport {
    pub blobs: usize,
    pub bytes: u64,
}

/// The blob cache under a cache directory. Cheap to open; several [`BlobCache`]s (and several
/// processes) can share one directory.
#[derive(Debug, Clone)]
pub struct BlobCache {
    dir: PathBuf,
}

impl BlobCache {
    /// Opens (creating it if needed) the cache under `cache_dir`, and removes partial and lock
    /// files that a crashed process left behind more than an hour ago. Younger ones may belong to
    /// a download running in another process, so they stay.
    pub fn open(cache_dir: &Path) -> Result<BlobCache, OciError> {
        let dir = cache_dir.join("blobs").join("sha256");
        fs::create_dir_all(&dir)
            .map_err(|e| OciError::io(format!("creating blob cache {}", dir.display()), e))?;
        let cache = BlobCache { dir };
        cache.clean_stale()?;
        Ok(cache)
    }

    /// `<cache_dir>/blobs/sha256`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the blob `sha256:<hex>` is (or would be) stored. Errors for anything but a sha256
    /// digest, so an untrusted digest can never name a path outside the cache.
    pub fn path(&self, digest: &str) -> Result<PathBuf, OciError> {
        Ok(self.dir.join(digest_hex(digest)?))
    }

    /// Whether the blob is in the cache.
    pub fn contains(&self, digest: &str) -> bool {
        self.path(digest)
            .is_ok_and(|p| p.metadata().is_ok_and(|m| m.is_file()))
    }

    /// Re-hashes a cached blob: `Ok(false)` if it is missing or its content does not match its
    /// name. Pulls do not do this (see the crate docs); it is for a `doctor`-style check.
    pub fn verify(&self, digest: &str) -> Result<bool, OciError> {
        let path = self.path(digest)?;
        let mut f = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(OciError::io(format!("opening {}", path.display()), e)),
        };
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f
                .read(&mut buf)
                .map_err(|e| OciError::io(format!("reading {}", path.display()), e))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        Ok(format!("sha256:{}", hex::encode(hasher.finalize())) == digest)
    }

    /// Removes every blob whose digest (`sha256:<hex>`, or the bare hex) is not in `keep`, or
    /// with `dry_run` only counts them. Partial and lock files are left to their owners (and to
    /// [`BlobCache::open`]'s stale cleanup).
    ///
    /// The caller must not prune while a pull whose result is not yet recorded in `keep` is
    /// running: its freshly cached blobs would look unreferenced.
    pub fn prune(&self, keep: &HashSet<String>, dry_run: bool) -> Result<PruneReport, OciError> {
        let mut report = PruneReport::default();
        let entries = fs::read_dir(&self.dir)
            .map_err(|e| OciError::io(format!("reading {}", self.dir.display()), e))?;
        for entry in entries {
            let entry =
                entry.map_err(|e| OciError::io(format!("reading {}", self.dir.display()), e))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if !is_sha256_hex(name)
                || keep.contains(name)
                || keep.contains(&format!("sha256:{name}"))
            {
                continue;
            }
            let path = entry.path();
            let size = match entry.metadata() {
                Ok(m) if m.is_file() => m.len(),
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(OciError::io(format!("inspecting {}", path.display()), e)),
            };
            if !dry_run {
                match fs::remove_file(&path) {
                    Ok(()) => {}
                    // Another prune got there first.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(OciError::io(format!("removing {}", path.display()), e)),
                }
            }
            report.blobs += 1;
            report.bytes += size;
        }
        Ok(report)
    }

    fn clean_stale(&self) -> Result<(), OciError> {
        let entries = fs::read_dir(&self.dir)
            .map_err(|e| OciError::io(format!("reading {}", self.dir.display()), e))?;
        let now = SystemTime::now();
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| now.duration_since(t).is_ok_and(|age| age > STALE_AGE));
            if !old {
                continue;
            }
            if name.contains(".partial-") {
                let _ = fs::remove_file(entry.path());
            } else if let Some(hex) = name.strip_suffix(".lock")
                && is_sha256_hex(hex)
            {
                // Only a lock nobody holds; taking it and dropping it unlinks it safely.
                if let TryLock::Acquired(lock) = self.try_lock(hex)? {
                    drop(lock);
                }
            }
        }
        Ok(())
    }

    /// The cached blob `hex` if it is there with the expected size. A blob of the wrong size is
    /// corrupt (truncated by a disk error, edited by hand); it is removed when `remove_bad` (the
    /// caller holds the blob's lock, so nobody is writing it).
    pub(crate) fn lookup(
        &self,
        hex: &str,
        size: u64,
        remove_bad: bool,
    ) -> Result<Option<PathBuf>, OciError> {
        let path = self.dir.join(hex);
        match path.metadata() {
            Ok(m) if m.is_file() && m.len() == size => Ok(Some(path)),
            Ok(_) => {
                if remove_bad {
                    tracing::warn!(
                        path = %path.display(),
                        "cached blob has the wrong size; downloading it again"
                    );
                    fs::remove_file(&path)
                        .map_err(|e| OciError::io(format!("removing {}", path.display()), e))?;
                }
                Ok(None)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(OciError::io(format!("inspecting {}", path.display()), e)),
        }
    }

    /// Takes the cross-process lock of blob `hex`, polling while another process holds it. The
    /// wait ends when the caller drops this future (cancellation).
    pub(crate) async fn lock(&self, hex: &str) -> Result<BlobLock, OciError> {
        loop {
            match self.try_lock(hex)? {
                TryLock::Acquired(lock) => return Ok(lock),
                TryLock::Orphaned => continue,
                TryLock::Busy => tokio::time::sleep(LOCK_POLL).await,
            }
        }
    }

    fn try_lock(&self, hex: &str) -> Result<TryLock, OciError> {
        let path = self.dir.join(format!("{hex}.lock"));
        let ctx = || format!("locking {}", path.display());
        // The cache dir may have been removed since `open` (a user clearing ~/.cache): the
        // next pull recreates it instead of failing.
        fs::create_dir_all(&self.dir).map_err(|e| OciError::io(ctx(), e))?;
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| OciError::io(ctx(), e))?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(flock) => {
                // Holders unlink the lock file when they finish. If that happened between our
                // open and our flock, we locked an inode nobody else will ever open: start over
                // on the path, or two processes would both think they hold the lock.
                let ours = flock.metadata().map_err(|e| OciError::io(ctx(), e))?;
                match path.metadata() {
                    Ok(m) if m.ino() == ours.ino() && m.dev() == ours.dev() => {
                        Ok(TryLock::Acquired(BlobLock {
                            path,
                            _flock: flock,
                        }))
                    }
                    Ok(_) => Ok(TryLock::Orphaned),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(TryLock::Orphaned),
                    Err(e) => Err(OciError::io(ctx(), e)),
                }
            }
            Err((_, Errno::EWOULDBLOCK)) => Ok(TryLock::Busy),
            Err((_, errno)) => Err(OciError::io(ctx(), io::Error::from(errno))),
        }
    }

    /// Starts writing blob `hex`: a fresh partial file and the thread that hashes and writes the
    /// chunks handed to it.
    pub(crate) fn writer(&self, hex: &str) -> Result<BlobWriter, OciError> {
        let path = self
            .dir
            .join(format!("{hex}.partial-{:016x}", rand::random::<u64>()));
        let file = OpenOptions::new()
            .create_new(true)
            .write(true)
            .open(&path)
            .map_err(|e| OciError::io(format!("creating {}", path.display()), e))?;
        let partial = PartialFile {
            path,
            committed: false,
        };
        let (tx, rx) = mpsc::channel(WRITER_QUEUE);
        // Hashing and writing run on a blocking thread so the async task keeps receiving from
        // the network meanwhile (two cores busy instead of one).
        let task = tokio::task::spawn_blocking(move || write_and_hash(file, rx));
        Ok(BlobWriter {
            tx,
            task,
            partial,
            final_path: self.dir.join(hex),
            dir: self.dir.clone(),
        })
    }
}

/// Extracts the hex of a `sha256:<64 lowercase hex>` digest.
pub(crate) fn digest_hex(digest: &str) -> Result<&str, OciError> {
    digest
        .strip_prefix("sha256:")
        .filter(|h| is_sha256_hex(h))
        .ok_or_else(|| OciError::InvalidDigest {
            digest: digest.to_string(),
        })
}

enum TryLock {
    Acquired(BlobLock),
    /// Locked a file its holder had just unlinked: retry at once.
    Orphaned,
    /// Another process holds it.
    Busy,
}

/// The held lock of one blob. Dropping it unlinks the lock file (while still holding the lock,
/// so a waiter notices with its inode check) and releases the lock.
#[derive(Debug)]
pub(crate) struct BlobLock {
    path: PathBuf,
    _flock: Flock<File>,
}

impl Drop for BlobLock {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// A partial file, removed when dropped unless it was renamed into place. Dropping happens on
/// every error path and when a cancelled pull's future is dropped, so no partial file outlives
/// its download.
#[derive(Debug)]
struct PartialFile {
    path: PathBuf,
    committed: bool,
}

impl Drop for PartialFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.path);
        }
    }
}

enum WriterMsg {
    Data(Bytes),
    Finish,
}

/// Digest and length of what a [`BlobWriter`] wrote.
#[derive(Debug)]
pub(crate) struct Written {
    pub digest: String,
    pub size: u64,
}

/// Streams one blob into a partial file, hashing it on the way.
#[derive(Debug)]
pub(crate) struct BlobWriter {
    tx: mpsc::Sender<WriterMsg>,
    task: tokio::task::JoinHandle<io::Result<Option<Written>>>,
    partial: PartialFile,
    final_path: PathBuf,
    dir: PathBuf,
}

impl BlobWriter {
    /// Queues a chunk. Fails only when the writing thread failed (disk full, I/O error).
    pub(crate) async fn write(&mut self, chunk: Bytes) -> Result<(), OciError> {
        if self.tx.send(WriterMsg::Data(chunk)).await.is_ok() {
            return Ok(());
        }
        // The thread has stopped, which it only does early on an error: report that.
        Err(self.join_error().await)
    }

    async fn join_error(&mut self) -> OciError {
        let ctx = format!("writing {}", self.partial.path.display());
        match (&mut self.task).await {
            Ok(Err(e)) => OciError::io(ctx, e),
            Ok(Ok(_)) => OciError::io(ctx, io::Error::other("writer stopped early")),
            Err(e) => OciError::io(ctx, io::Error::other(e.to_string())),
        }
    }

    /// Flushes and fsyncs the partial file and returns what was written.
    pub(crate) async fn finish(&mut self) -> Result<Written, OciError> {
        if self.tx.send(WriterMsg::Finish).await.is_err() {
            return Err(self.join_error().await);
        }
        let ctx = format!("writing {}", self.partial.path.display());
        match (&mut self.task).await {
            Ok(Ok(Some(w))) => Ok(w),
            Ok(Ok(None)) => Err(OciError::io(ctx, io::Error::other("writer aborted"))),
            Ok(Err(e)) => Err(OciError::io(ctx, e)),
            Err(e) => Err(OciError::io(ctx, io::Error::other(e.to_string()))),
        }
    }

    /// Renames the (finished, verified) partial file to the blob's name and fsyncs the
    /// directory so the rename survives a crash.
    pub(crate) fn commit(mut self) -> Result<PathBuf, OciError> {
        fs::rename(&self.partial.path, &self.final_path).map_err(|e| {
            OciError::io(
                format!(
                    "renaming {} to {}",
                    self.partial.path.display(),
                    self.final_path.display()
                ),
                e,
            )
        })?;
        self.partial.committed = true;
        if let Ok(d) = File::open(&self.dir) {
            let _ = d.sync_all();
        }
        Ok(std::mem::take(&mut self.final_path))
    }
}

/// The writing thread: hashes and writes every chunk; on `Finish` flushes and fsyncs. When the
/// channel closes without `Finish` (the download failed or was cancelled) it stops without the
/// fsync: the file is about to be removed anyway.
fn write_and_hash(file: File, mut rx: mpsc::Receiver<WriterMsg>) -> io::Result<Option<Written>> {
    let mut out = io::BufWriter::with_capacity(1 << 20, file);
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    while let Some(msg) = rx.blocking_recv() {
        match msg {
            WriterMsg::Data(chunk) => {
                hasher.update(&chunk);
                out.write_all(&chunk)?;
                size += chunk.len() as u64;
            }
            WriterMsg::Finish => {
                let file = out.into_inner().map_err(|e| e.into_error())?;
                file.sync_all()?;
                return Ok(Some(Written {
                    digest: format!("sha256:{}", hex::encode(hasher.finalize())),
                    size,
                }));
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX_A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

    fn sha(data: &[u8]) -> String {
        format!("sha256:{}", hex::encode(Sha256::digest(data)))
    }

    #[test]
    fn paths_only_for_sha256_digests() {
        let dir = tempfile::tempdir().unwrap();
        let c = BlobCache::open(dir.path()).unwrap();
        let p = c.path(&format!("sha256:{HEX_A}")).unwrap();
        assert_eq!(p, dir.path().join("blobs/sha256").join(HEX_A));
        for bad in [
            "sha256:../../etc/passwd",
            "sha512:aa",
            HEX_A,
            "sha256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        ] {
            assert!(c.path(bad).is_err(), "{bad}");
            assert!(!c.contains(bad));
        }
    }

    #[test]
    fn prune_keeps_listed_blobs_and_ignores_other_files() {
        let dir = tempfile::tempdir().unwrap();
        let c = BlobCache::open(dir.path()).unwrap();
        let blobs: Vec<(String, Vec<u8>)> = (0..3u8)
            .map(|i| {
                let data = vec![i; 100 * (i as usize + 1)];
                (sha(&data), data)
            })
            .collect();
        for (d, data) in &blobs {
            fs::write(c.path(d).unwrap(), data).unwrap();
        }
        fs::write(c.dir().join(format!("{HEX_A}.partial-0123")), b"x").unwrap();
        fs::write(c.dir().join(format!("{HEX_A}.lock")), b"").unwrap();
        fs::write(c.dir().join("README"), b"x").unwrap();

        let keep: HashSet<String> = [blobs[0].0.clone()].into();
        let dry = c.prune(&keep, true).unwrap();
        assert_eq!(
            dry,
            PruneReport {
                blobs: 2,
                bytes: 500
            }
        );
        assert!(
            blobs.iter().all(|(d, _)| c.contains(d)),
            "dry run removes nothing"
        );
        let real = c.prune(&keep, false).unwrap();
        assert_eq!(real, dry);
        assert!(c.contains(&blobs[0].0));
        assert!(!c.contains(&blobs[1].0) && !c.contains(&blobs[2].0));
        assert!(c.dir().join(format!("{HEX_A}.partial-0123")).exists());
        assert!(c.dir().join("README").exists());
        // Bare hex works as a keep entry too.
        let bare: HashSet<String> = [digest_hex(&blobs[0].0).unwrap().to_string()].into();
        assert_eq!(c.prune(&bare, false).unwrap(), PruneReport::default());
    }

    #[test]
    fn open_removes_only_stale_partials_and_locks() {
        let dir = tempfile::tempdir().unwrap();
        let c = BlobCache::open(dir.path()).unwrap();
        let old = c.dir().join(format!("{HEX_A}.partial-old"));
        let fresh = c.dir().join(format!("{HEX_A}.partial-fresh"));
        let old_lock = c.dir().join(format!("{HEX_A}.lock"));
        for p in [&old, &fresh, &old_lock] {
            fs::write(p, b"x").unwrap();
        }
        let two_hours_ago = SystemTime::now() - Duration::from_secs(7200);
        for p in [&old, &old_lock] {
            File::options()
                .write(true)
                .open(p)
                .unwrap()
                .set_modified(two_hours_ago)
                .unwrap();
        }
        BlobCache::open(dir.path()).unwrap();
        assert!(!old.exists() && !old_lock.exists());
        assert!(fresh.exists());
    }

    #[test]
    fn verify_rehashes() {
        let dir = tempfile::tempdir().unwrap();
        let c = BlobCache::open(dir.path()).unwrap();
        let d = sha(b"hello");
        assert!(!c.verify(&d).unwrap());
        fs::write(c.path(&d).unwrap(), b"hello").unwrap();
        assert!(c.verify(&d).unwrap());
        fs::write(c.path(&d).unwrap(), b"hellp").unwrap();
        assert!(!c.verify(&d).unwrap());
    }

    #[tokio::test]
    async fn lock_excludes_and_is_removed_on_release() {
        let dir = tempfile::tempdir().unwrap();
        let c = BlobCache::open(dir.path()).unwrap();
        let a = c.lock(HEX_A).await.unwrap();
        assert!(matches!(c.try_lock(HEX_A).unwrap(), TryLock::Busy));
        let c2 = c.clone();
        let waiter = tokio::spawn(async move { c2.lock(HEX_A).await.map(|_| ()) });
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert!(!waiter.is_finished(), "the second locker waits");
        drop(a);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("waiter got the lock")
            .unwrap()
            .unwrap();
        assert!(!c.dir().join(format!("{HEX_A}.lock")).exists());
    }

    #[tokio::test]
    async fn writer_hashes_and_commits_or_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let c = BlobCache::open(dir.path()).unwrap();
        let data = b"some blob content";
        let d = sha(data);
        let hex = digest_hex(&d).unwrap();

        let mut w = c.writer(hex).unwrap();
        w.write(Bytes::from_static(&data[..4])).await.unwrap();
        w.write(Bytes::from_static(&data[4..])).await.unwrap();
        let written = w.finish().await.unwrap();
        assert_eq!(written.digest, d);
        assert_eq!(written.size, data.len() as u64);
        let path = w.commit().unwrap();
        assert_eq!(fs::read(&path).unwrap(), data);

        // A dropped writer leaves nothing behind.
        let mut w = c.writer(HEX_A).unwrap();
        w.write(Bytes::from_static(b"partial")).await.unwrap();
        drop(w);
        let left: Vec<_> = fs::read_dir(c.dir())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .filter(|n| n.to_string_lossy().contains("partial"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }
}
