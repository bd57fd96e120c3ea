//! Per-VM disks: the root disk (copy-on-write over a shared image) and the persistent work disk.
//!
//! Both are created at `vm create` and live until `vm rm`, so everything the guest writes — in
//! `/root` or in `/etc` — survives stop and start. The shared image file is only ever opened
//! read-only.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use banger_config::RootDiskStrategy;
use banger_core::ByteSize;
use banger_vmm::DriveSpec;

use banger_sys::{Cmd, CommandRunner, RunError};

/// Size of the sparse upper disk of the `overlay` strategy. It costs nothing until written.
pub const OVERLAY_UPPER_SIZE: ByteSize = ByteSize(8 * ByteSize::GIB);

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("creating disk {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("formatting disk {path}: {source}")]
    Mkfs {
        path: PathBuf,
        #[source]
        source: RunError,
    },
    #[error(
        "reflink copy of {src} to {dst} failed ({source}); the image and the state dir must be on one XFS or btrfs filesystem, or set root_disk = \"overlay\" or \"copy\""
    )]
    Reflink {
        src: PathBuf,
        dst: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DiskError + '_ {
    move |source| DiskError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Creates a sparse file of `size` and formats it ext4 with lazy inode-table and journal init,
/// which makes creation take milliseconds whatever the size.
pub async fn create_ext4(
    runner: &dyn CommandRunner,
    path: &Path,
    size: ByteSize,
    label: &str,
) -> Result<(), DiskError> {
    {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(io_err(path))?;
        f.set_len(size.bytes()).map_err(io_err(path))?;
    }
    let cmd = Cmd::new("mkfs.ext4")
        .arg("-F")
        .arg("-q")
        .arg("-L")
        .arg(label)
        .arg("-E")
        .arg("lazy_itable_init=1,lazy_journal_init=1,root_owner=0:0")
        .arg(path);
    if let Err(source) = runner.run(&cmd).await {
        let _ = std::fs::remove_file(path);
        return Err(DiskError::Mkfs {
            path: path.to_path_buf(),
            source,
        });
    }
    Ok(())
}

/// Creates the VM's root disk at `dst` from the image at `image` according to `strategy`.
pub async fn create_root_disk(
    runner: &dyn CommandRunner,
    strategy: RootDiskStrategy,
    image: &Path,
    dst: &Path,
) -> Result<(), DiskError> {
    match strategy {
        RootDiskStrategy::Overlay => {
            create_ext4(runner, dst, OVERLAY_UPPER_SIZE, "banger-upper").await
        }
        RootDiskStrategy::Reflink => {
            let (src, dst) = (image.to_path_buf(), dst.to_path_buf());
            tokio::task::spawn_blocking(move || reflink(&src, &dst))
                .await
                .expect("reflink task panicked")
        }
        RootDiskStrategy::Copy => {
            let (src, dst) = (image.to_path_buf(), dst.to_path_buf());
            tokio::task::spawn_blocking(move || sparse_copy(&src, &dst))
                .await
                .expect("copy task panicked")
        }
        // The copy-on-write store of the snapshot: raw and sparse; device-mapper formats it.
        RootDiskStrategy::DmSnapshot => {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(dst)
                .map_err(io_err(dst))?;
            f.set_len(OVERLAY_UPPER_SIZE.bytes()).map_err(io_err(dst))
        }
    }
}

/// The drives a VM boots with, in attach order (`/dev/vda`, `/dev/vdb`, ...). The guest init
/// finds them by this order.
pub fn drives(
    strategy: RootDiskStrategy,
    image: &Path,
    root: &Path,
    work: &Path,
) -> Vec<DriveSpec> {
    let mut v = Vec::new();
    if strategy == RootDiskStrategy::Overlay {
        v.push(DriveSpec {
            id: "image".into(),
            path: image.to_path_buf(),
            read_only: true,
        });
    }
    v.push(DriveSpec {
        id: "root".into(),
        path: root.to_path_buf(),
        read_only: false,
    });
    v.push(DriveSpec {
        id: "work".into(),
        path: work.to_path_buf(),
        read_only: false,
    });
    v
}

fn reflink(src: &Path, dst: &Path) -> Result<(), DiskError> {
    // FICLONE = _IOW(0x94, 9, int)
    const FICLONE: libc::c_ulong = 0x4004_9409;
    let s = std::fs::File::open(src).map_err(io_err(src))?;
    let d = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dst)
        .map_err(io_err(dst))?;
    // SAFETY: both fds are open for the duration of the call; FICLONE takes the source fd as
    // its integer argument and touches no memory of ours.
    let rc = unsafe { libc::ioctl(d.as_raw_fd(), FICLONE, s.as_raw_fd()) };
    if rc != 0 {
        let source = std::io::Error::last_os_error();
        drop(d);
        let _ = std::fs::remove_file(dst);
        return Err(DiskError::Reflink {
            src: src.to_path_buf(),
            dst: dst.to_path_buf(),
            source,
        });
    }
    Ok(())
}

/// Copies only the data extents of `src` (SEEK_DATA/SEEK_HOLE), keeping `dst` as sparse as the
/// image: a mostly empty 4 GiB rootfs costs what it holds, not 4 GiB.
pub fn sparse_copy(src: &Path, dst: &Path) -> Result<(), DiskError> {
    let s = std::fs::File::open(src).map_err(io_err(src))?;
    sparse_copy_from(&s, src, dst)
}

/// [`sparse_copy`] from an already opened (and checked) file; `src` names it in errors.
pub fn sparse_copy_from(s: &std::fs::File, src: &Path, dst: &Path) -> Result<(), DiskError> {
    let d = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dst)
        .map_err(io_err(dst))?;
    // From here on the file is ours: a failed copy removes it.
    let result = sparse_copy_inner(s, src, &d, dst);
    if result.is_err() {
        drop(d);
        let _ = std::fs::remove_file(dst);
    }
    result
}

fn sparse_copy_inner(
    s: &std::fs::File,
    src: &Path,
    d: &std::fs::File,
    dst: &Path,
) -> Result<(), DiskError> {
    use std::os::unix::fs::FileExt;
    let len = s.metadata().map_err(io_err(src))?.len();
    d.set_len(len).map_err(io_err(dst))?;
    let fd = s.as_raw_fd();
    let mut pos: i64 = 0;
    let mut buf = vec![0u8; 1 << 20];
    while (pos as u64) < len {
        // SAFETY: lseek on an fd we own; no memory is passed.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // only a hole remains
            }
            return Err(io_err(src)(e));
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io_err(src)(std::io::Error::last_os_error()));
        }
        let mut off = data as u64;
        while off < hole as u64 {
            let n = ((hole as u64 - off) as usize).min(buf.len());
            s.read_exact_at(&mut buf[..n], off).map_err(io_err(src))?;
            d.write_all_at(&buf[..n], off).map_err(io_err(dst))?;
            off += n as u64;
        }
        pos = hole;
    }
    d.sync_all().map_err(io_err(dst))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use banger_sys::{RealRunner, RecordingRunner};
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn sparse_copy_keeps_holes_and_data() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src.img");
        let f = std::fs::File::create(&src).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(b"head", 0).unwrap();
        f.write_all_at(b"middle", 32 << 20).unwrap();
        f.write_all_at(b"tail", (64 << 20) - 4).unwrap();
        drop(f);
        let dst = dir.path().join("dst.img");
        sparse_copy(&src, &dst).unwrap();
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
        let blocks = std::fs::metadata(&dst).unwrap().blocks();
        assert!(
            blocks * 512 < 4 << 20,
            "copy is not sparse: {blocks} blocks"
        );
        // Refuses to overwrite.
        assert!(sparse_copy(&src, &dst).is_err());
        assert!(
            dst.exists(),
            "a refused copy must not delete the existing file"
        );
    }

    #[tokio::test]
    async fn create_ext4_makes_a_real_filesystem() {
        if which("mkfs.ext4").is_none() {
            eprintln!("SKIP: mkfs.ext4 not installed");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("work.ext4");
        create_ext4(&RealRunner, &p, ByteSize::gib(8), "banger-work")
            .await
            .unwrap();
        let meta = std::fs::metadata(&p).unwrap();
        assert_eq!(meta.len(), 8 << 30);
        assert!(
            meta.blocks() * 512 < 256 << 20,
            "work disk should be sparse"
        );
        let mut magic = [0u8; 2];
        use std::os::unix::fs::FileExt;
        std::fs::File::open(&p)
            .unwrap()
            .read_exact_at(&mut magic, 1024 + 56)
            .unwrap();
        assert_eq!(magic, [0x53, 0xef], "ext4 superblock magic");
    }

    #[tokio::test]
    async fn failed_mkfs_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("work.ext4");
        let runner = RecordingRunner::default();
        *runner.fail_program.lock().unwrap() = Some("mkfs.ext4".into());
        let err = create_ext4(&runner, &p, ByteSize::mib(64), "x")
            .await
            .unwrap_err();
        assert!(err.to_string().contains("work.ext4"), "{err}");
        assert!(!p.exists());
        let calls = runner.calls.lock().unwrap();
        assert_eq!(calls.len(), 1);
        assert!(
            calls[0]
                .args
                .iter()
                .any(|a| a == "lazy_itable_init=1,lazy_journal_init=1,root_owner=0:0")
        );
    }

    #[test]
    fn overlay_attaches_image_read_only_first() {
        let d = drives(
            RootDiskStrategy::Overlay,
            Path::new("/i"),
            Path::new("/r"),
            Path::new("/w"),
        );
        assert_eq!(d.len(), 3);
        assert!(d[0].read_only && d[0].path == Path::new("/i"));
        assert!(!d[1].read_only && !d[2].read_only);
        let d = drives(
            RootDiskStrategy::Copy,
            Path::new("/i"),
            Path::new("/r"),
            Path::new("/w"),
        );
        assert_eq!(d.len(), 2);
        assert!(d.iter().all(|x| x.path != Path::new("/i")));
    }

    fn which(prog: &str) -> Option<PathBuf> {
        std::env::var_os("PATH").and_then(|p| {
            std::env::split_paths(&p)
                .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
                .map(|d| d.join(prog))
                .find(|c| c.exists())
        })
    }
}
