//! Guest bytes onto the host: the one routine that turns a tar stream from a VM into files
//! (`vm cp NAME:PATH DEST`), and the one that writes a guest-made file at a host path
//! (`workspace export -o`).
//!
//! The stream is hostile: whatever its headers say, nothing created here is setuid, setgid or
//! sticky, a device node or a FIFO, or owned by anyone but the user running banger (no chown
//! ever; the process's umask applies). Every entry is created relative to an open directory
//! with `O_NOFOLLOW`/`O_EXCL` (openat-style), so no symbolic link — one that was there before
//! or one the archive made — is ever followed, and absolute names, `..` and hard links are
//! refused. The tar crate parses; it does not unpack (its `unpack` follows existing links in
//! parent paths and honours modes).
//!
//! What it writes is bounded by the stream: GNU sparse entries (whose few bytes can declare
//! terabytes of holes, which the tar crate fills with zeros) are refused, a file gets at most
//! its declared size, and an entry that would leave less than [`RESERVE_PERCENT`] % of the
//! destination filesystem free is refused before anything of it is written. Directories that
//! were already there keep their mode; only directories this extraction made take the
//! archive's permission bits.

use std::cell::RefCell;
use std::collections::HashSet;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{FileStat, Mode, SFlag};
use nix::unistd::UnlinkatFlags;

use crate::WorkspaceError;

/// What [`extract_as`] made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Extracted {
    /// Regular files and symbolic links written.
    pub files: u64,
    /// Entries left out: devices, FIFOs and other special files.
    pub skipped: u64,
}

/// How much of the destination filesystem an extraction leaves free: an entry that would
/// bring the free space below this share is refused, so a guest's stream cannot fill the disk.
pub const RESERVE_PERCENT: u64 = 1;

/// The process's umask, read without changing it (`umask(2)` can only set). Linux ≥ 4.7
/// reports it in /proc; 022 otherwise.
fn current_umask() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Umask:"))
                .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        })
        .unwrap_or(0o022)
}

/// Permission bits only (no setuid/setgid/sticky), minus the umask.
fn safe_mode(mode: u32, umask: u32) -> Mode {
    Mode::from_bits_truncate(mode & 0o777 & !umask)
}

fn errno_io(e: Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

fn lstat_at(dir: &OwnedFd, name: &Path) -> Option<FileStat> {
    nix::sys::stat::fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW).ok()
}

fn is_dir(st: &FileStat) -> bool {
    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR
}

/// Opens `name` in `dir` as a directory, never through a link.
fn open_dir_at(dir: &OwnedFd, name: &Path) -> Result<OwnedFd, Errno> {
    nix::fcntl::openat(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
}

/// Extracts a tar stream into `dest`: the archive's single top-level name becomes `dest`
/// itself (`tar -c -C parent name` on the other side). The directory holding `dest` is the
/// user's choice and is opened as named; below it nothing is followed.
pub fn extract_as(input: impl Read, dest: &Path) -> Result<Extracted, WorkspaceError> {
    let (parent, leaf) = split_dest(dest)?;
    if !parent.as_os_str().is_empty() {
        std::fs::create_dir_all(&parent)
            .map_err(WorkspaceError::io(&parent, "creating directory"))?;
    }
    let parent_dir = nix::fcntl::open(
        if parent.as_os_str().is_empty() {
            Path::new(".")
        } else {
            parent.as_path()
        },
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| WorkspaceError::Io {
        path: parent.clone(),
        detail: format!("opening directory: {e}"),
        source: errno_io(e),
    })?;
    let mut x = Extractor {
        dest: dest.to_path_buf(),
        parent: parent_dir,
        leaf,
        umask: current_umask(),
        dirs: Vec::new(),
        made: RefCell::new(HashSet::new()),
        done: Extracted::default(),
    };
    let mut ar = tar::Archive::new(input);
    let mut top: Option<std::ffi::OsString> = None;
    let entries = ar
        .entries()
        .map_err(WorkspaceError::io(dest, "reading the archive"))?;
    for entry in entries {
        let entry = entry.map_err(WorkspaceError::io(dest, "reading the archive"))?;
        let raw = entry
            .path()
            .map_err(WorkspaceError::io(dest, "reading an entry name"))?
            .into_owned();
        let mut parts = Vec::new();
        for c in raw.components() {
            match c {
                Component::Normal(p) => parts.push(PathBuf::from(p)),
                Component::CurDir => {}
                _ => return Err(x.unsafe_entry(&raw, "absolute or parent-relative path")),
            }
        }
        let Some(first) = parts.first() else {
            continue;
        };
        match &top {
            None => top = Some(first.clone().into_os_string()),
            Some(t) if t.as_os_str() != first.as_os_str() => {
                return Err(x.unsafe_entry(&raw, "more than one top-level name"));
            }
            Some(_) => {}
        }
        x.entry(entry, &raw, &parts[1..])?;
    }
    if top.is_none() {
        return Err(WorkspaceError::UnsafeEntry {
            path: dest.to_path_buf(),
            entry: String::new(),
            detail: "the archive is empty (nothing at that path?)".into(),
        });
    }
    x.finish_dirs()?;
    Ok(x.done)
}

/// `dest` as (the directory it is in, its own name).
fn split_dest(dest: &Path) -> Result<(PathBuf, PathBuf), WorkspaceError> {
    let bad = || WorkspaceError::UnsafeEntry {
        path: dest.to_path_buf(),
        entry: String::new(),
        detail: "the destination needs a file name (not / or ..)".into(),
    };
    match dest.components().next_back() {
        Some(Component::Normal(name)) => Ok((
            dest.parent().map(Path::to_path_buf).unwrap_or_default(),
            PathBuf::from(name),
        )),
        _ => Err(bad()),
    }
}

struct Extractor {
    dest: PathBuf,
    /// The directory holding `dest`.
    parent: OwnedFd,
    /// `dest`'s own name in `parent`.
    leaf: PathBuf,
    umask: u32,
    /// Directories made or reused, with their archive modes: applied last, deepest first, so
    /// a read-only directory can still be filled.
    dirs: Vec<(Vec<PathBuf>, u32)>,
    /// (device, inode) of each directory this extraction created: only these take modes from
    /// the stream; one that was already there keeps its own.
    made: RefCell<HashSet<(u64, u64)>>,
    done: Extracted,
}

impl Extractor {
    fn unsafe_entry(&self, raw: &Path, detail: &str) -> WorkspaceError {
        WorkspaceError::UnsafeEntry {
            path: self.dest.clone(),
            entry: raw.display().to_string(),
            detail: detail.into(),
        }
    }

    fn io_err(&self, rel: &[PathBuf], what: &str, e: Errno) -> WorkspaceError {
        let mut path = self.dest.clone();
        path.extend(rel);
        WorkspaceError::Io {
            path,
            detail: format!("{what}: {e}"),
            source: errno_io(e),
        }
    }

    /// The directory that holds `rel` (relative to `dest`) and `rel`'s last name; `dest`
    /// itself is (parent, leaf). Missing directories on the way are made private; a link or
    /// anything else on the way is refused.
    fn locate(&self, raw: &Path, rel: &[PathBuf]) -> Result<(OwnedFd, PathBuf), WorkspaceError> {
        let Some((last, ancestors)) = rel.split_last() else {
            let dup = self
                .parent
                .try_clone()
                .map_err(WorkspaceError::io(&self.dest, "duplicating a descriptor"))?;
            return Ok((dup, self.leaf.clone()));
        };
        let mut dir = self.step(raw, &self.parent, &self.leaf)?;
        for name in ancestors {
            dir = self.step(raw, &dir, name)?;
        }
        Ok((dir, last.clone()))
    }

    /// Enters (making it if missing) directory `name` in `dir`, never through a link.
    fn step(&self, raw: &Path, dir: &OwnedFd, name: &Path) -> Result<OwnedFd, WorkspaceError> {
        match open_dir_at(dir, name) {
            Ok(fd) => Ok(fd),
            Err(Errno::ENOENT) => {
                let made = match nix::sys::stat::mkdirat(dir, name, Mode::from_bits_truncate(0o700))
                {
                    Ok(()) => true,
                    Err(Errno::EEXIST) => false,
                    Err(e) => return Err(self.io_err(&[], "creating directory", e)),
                };
                let fd = open_dir_at(dir, name)
                    .map_err(|_| self.unsafe_entry(raw, "it lies below a symbolic link"))?;
                if made {
                    self.remember_made(&fd);
                }
                Ok(fd)
            }
            Err(Errno::ELOOP | Errno::ENOTDIR) => Err(self.unsafe_entry(
                raw,
                "it lies below a symbolic link or a file, which is never followed",
            )),
            Err(e) => Err(self.io_err(&[], "opening directory", e)),
        }
    }

    fn remember_made(&self, fd: &OwnedFd) {
        if let Ok(st) = nix::sys::stat::fstat(fd) {
            self.made.borrow_mut().insert((st.st_dev, st.st_ino));
        }
    }

    fn was_made(&self, st: &FileStat) -> bool {
        self.made.borrow().contains(&(st.st_dev, st.st_ino))
    }

    /// Refuses a file of `size` bytes in `dir` if writing it would leave less than
    /// [`RESERVE_PERCENT`] % of that filesystem free.
    fn check_room(
        &self,
        raw: &Path,
        dir: &OwnedFd,
        rel: &[PathBuf],
        size: u64,
    ) -> Result<(), WorkspaceError> {
        let vfs = nix::sys::statvfs::fstatvfs(dir)
            .map_err(|e| self.io_err(rel, "reading the free space", e))?;
        // A filesystem that reports no size at all (some FUSE ones) cannot be judged: allowed.
        if vfs.blocks() == 0 {
            return Ok(());
        }
        let frag = vfs.fragment_size() as u64;
        let avail = (vfs.blocks_available() as u64).saturating_mul(frag);
        let reserve = (vfs.blocks() as u64).saturating_mul(frag) / 100 * RESERVE_PERCENT;
        if size > avail.saturating_sub(reserve) {
            return Err(self.unsafe_entry(
                raw,
                &format!(
                    "it is {size} bytes and the destination has {avail} bytes free \
                     ({RESERVE_PERCENT}% of its filesystem is kept free)"
                ),
            ));
        }
        Ok(())
    }

    /// Makes room for a new non-directory `name` in `dir`: removes a file, link or special
    /// file that is there (never opening it), refuses to replace a directory.
    fn clear(&self, raw: &Path, dir: &OwnedFd, name: &Path) -> Result<(), WorkspaceError> {
        match lstat_at(dir, name) {
            None => Ok(()),
            Some(st) if is_dir(&st) => Err(self.unsafe_entry(raw, "a directory is in the way")),
            Some(_) => match nix::unistd::unlinkat(dir, name, UnlinkatFlags::NoRemoveDir) {
                Ok(()) | Err(Errno::ENOENT) => Ok(()),
                Err(e) => Err(self.io_err(&[], "replacing an existing file", e)),
            },
        }
    }

    fn entry<R: Read>(
        &mut self,
        mut entry: tar::Entry<'_, R>,
        raw: &Path,
        rel: &[PathBuf],
    ) -> Result<(), WorkspaceError> {
        use tar::EntryType as T;
        let kind = entry.header().entry_type();
        let mode = entry.header().mode().unwrap_or(0o644);
        match kind {
            T::Directory => {
                let (dir, name) = self.locate(raw, rel)?;
                let ours = match nix::sys::stat::mkdirat(
                    &dir,
                    &name,
                    Mode::from_bits_truncate(0o700),
                ) {
                    Ok(()) => true,
                    Err(Errno::EEXIST) => match lstat_at(&dir, &name) {
                        // Made earlier by this extraction (as a parent of an earlier entry).
                        Some(st) if is_dir(&st) => self.was_made(&st),
                        _ => {
                            return Err(self.unsafe_entry(
                                raw,
                                "something that is not a directory (maybe a symbolic link) is in the way",
                            ));
                        }
                    },
                    Err(e) => return Err(self.io_err(rel, "creating directory", e)),
                };
                if ours {
                    if let Some(st) = lstat_at(&dir, &name) {
                        self.made.borrow_mut().insert((st.st_dev, st.st_ino));
                    }
                    self.dirs.push((rel.to_vec(), mode));
                }
                Ok(())
            }
            // A few bytes of sparse map can declare terabytes of zeros.
            T::GNUSparse => Err(self.unsafe_entry(raw, "GNU sparse files are not copied")),
            T::Regular | T::Continuous => {
                let size = entry.header().size().unwrap_or(u64::MAX);
                let (dir, name) = self.locate(raw, rel)?;
                self.check_room(raw, &dir, rel, size)?;
                self.clear(raw, &dir, &name)?;
                let fd = nix::fcntl::openat(
                    &dir,
                    &name,
                    OFlag::O_WRONLY
                        | OFlag::O_CREAT
                        | OFlag::O_EXCL
                        | OFlag::O_NOFOLLOW
                        | OFlag::O_CLOEXEC,
                    Mode::from_bits_truncate(0o600),
                )
                .map_err(|e| self.io_err(rel, "creating file", e))?;
                let mut f = File::from(fd);
                // At most the declared size, whatever the reader would give.
                io::copy(&mut (&mut entry).take(size), &mut f).map_err(|e| {
                    let mut path = self.dest.clone();
                    path.extend(rel);
                    WorkspaceError::Io {
                        path,
                        detail: format!("writing: {e}"),
                        source: e,
                    }
                })?;
                nix::sys::stat::fchmod(f.as_fd(), safe_mode(mode, self.umask))
                    .map_err(|e| self.io_err(rel, "setting the mode", e))?;
                if let Ok(mtime) = entry.header().mtime() {
                    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(mtime);
                    let _ = f.set_modified(t);
                }
                self.done.files += 1;
                Ok(())
            }
            T::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(WorkspaceError::io(&self.dest, "reading a link target"))?
                    .ok_or_else(|| self.unsafe_entry(raw, "a symbolic link without a target"))?
                    .into_owned();
                let (dir, name) = self.locate(raw, rel)?;
                self.clear(raw, &dir, &name)?;
                // Stored as the link it is; nothing here or later in this routine follows it.
                nix::unistd::symlinkat(&target, &dir, &name)
                    .map_err(|e| self.io_err(rel, "creating symbolic link", e))?;
                self.done.files += 1;
                Ok(())
            }
            T::Link => Err(self.unsafe_entry(raw, "hard links are not copied")),
            // Devices, FIFOs and anything unknown never become host files.
            _ => {
                self.done.skipped += 1;
                Ok(())
            }
        }
    }

    /// Gives directories their archive permissions (never set-id or sticky bits), deepest
    /// first.
    fn finish_dirs(&mut self) -> Result<(), WorkspaceError> {
        let mut dirs = std::mem::take(&mut self.dirs);
        dirs.sort_by_key(|(rel, _)| std::cmp::Reverse(rel.len()));
        for (rel, mode) in dirs {
            let raw = PathBuf::from_iter(&rel);
            let (dir, name) = self.locate(&raw, &rel)?;
            let fd = open_dir_at(&dir, &name)
                .map_err(|_| self.unsafe_entry(&raw, "the directory was replaced"))?;
            nix::sys::stat::fchmod(&fd, safe_mode(mode, self.umask))
                .map_err(|e| self.io_err(&rel, "setting the mode", e))?;
        }
        Ok(())
    }
}

/// Writes `data` (guest-made) at `path` without ever writing through what is there: a new
/// file next to it, renamed over it, so a link at `path` is replaced, not followed. Mode
/// 0666 minus the umask, like a shell redirection.
pub fn write_file(path: &Path, data: &[u8]) -> Result<(), WorkspaceError> {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    let (parent, _) = split_dest(path)?;
    let dir = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent.as_path()
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".banger-")
        .tempfile_in(dir)
        .map_err(WorkspaceError::io(dir, "creating a file"))?;
    tmp.write_all(data)
        .and_then(|()| tmp.flush())
        .map_err(WorkspaceError::io(path, "writing"))?;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o666 & !current_umask()))
        .map_err(WorkspaceError::io(path, "setting the mode"))?;
    tmp.persist(path)
        .map_err(|e| WorkspaceError::io(path, "replacing")(e.error))?;
    Ok(())
}
