//! Tar streams built in Rust: the workspace copy, `sync`'s changed files, and `vm cp` into a
//! VM. File lists never pass through `tar -T` or a shell. Streams coming back from a VM are
//! unpacked by [`crate::extract`].

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use crate::WorkspaceError;
use crate::repo::{FileEntry, Kind};

/// A reader that yields exactly `remaining` bytes or fails: a file that shrank while being
/// archived must not leave a header promising more than the stream carries.
struct Exact<R> {
    inner: R,
    remaining: u64,
}

impl<R: Read> Read for Exact<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 {
            return Ok(0);
        }
        let want = buf.len().min(self.remaining as usize);
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the file shrank while it was being copied",
            ));
        }
        self.remaining -= n as u64;
        Ok(n)
    }
}

fn header(kind: tar::EntryType, mode: u32, size: u64, mtime: i64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(mtime.max(0) as u64);
    h.set_uid(0);
    h.set_gid(0);
    h
}

/// Appends one regular file from disk, under `name`.
fn append_file<W: Write>(
    b: &mut tar::Builder<W>,
    name: &Path,
    src: &Path,
    mode: u32,
) -> Result<(), WorkspaceError> {
    let f = File::open(src).map_err(WorkspaceError::io(src, "opening file"))?;
    let meta = f
        .metadata()
        .map_err(WorkspaceError::io(src, "reading file metadata"))?;
    let mut h = header(tar::EntryType::Regular, mode, meta.len(), meta.mtime());
    b.append_data(
        &mut h,
        name,
        Exact {
            inner: f,
            remaining: meta.len(),
        },
    )
    .map_err(WorkspaceError::io(src, "archiving file"))
}

fn append_symlink<W: Write>(
    b: &mut tar::Builder<W>,
    name: &Path,
    target: &Path,
    src: &Path,
) -> Result<(), WorkspaceError> {
    let mut h = header(tar::EntryType::Symlink, 0o777, 0, 0);
    b.append_link(&mut h, name, target)
        .map_err(WorkspaceError::io(src, "archiving symbolic link"))
}

/// Appends working-tree files of the repository at `root`, by their repository paths.
pub fn append_worktree<W: Write>(
    b: &mut tar::Builder<W>,
    root: &Path,
    files: &[FileEntry],
) -> Result<(), WorkspaceError> {
    for f in files {
        let src = root.join(&f.path);
        match &f.kind {
            Kind::File { exec } => {
                let mode = if *exec { 0o755 } else { 0o644 };
                append_file(b, Path::new(&f.path), &src, mode)?;
            }
            Kind::Symlink { target } => {
                append_symlink(b, Path::new(&f.path), Path::new(target), &src)?;
            }
        }
    }
    Ok(())
}

/// Appends `src` (a file, link or directory tree, links never followed) under `name`.
pub fn append_tree<W: Write>(
    b: &mut tar::Builder<W>,
    name: &Path,
    src: &Path,
) -> Result<(), WorkspaceError> {
    let meta =
        std::fs::symlink_metadata(src).map_err(WorkspaceError::io(src, "reading metadata"))?;
    let mode = meta.permissions().mode() & 0o7777;
    if meta.file_type().is_symlink() {
        let target = std::fs::read_link(src).map_err(WorkspaceError::io(src, "reading link"))?;
        append_symlink(b, name, &target, src)
    } else if meta.is_dir() {
        let mut h = header(tar::EntryType::Directory, mode, 0, meta.mtime());
        b.append_data(&mut h, name, io::empty())
            .map_err(WorkspaceError::io(src, "archiving directory"))?;
        let mut children: Vec<_> = std::fs::read_dir(src)
            .map_err(WorkspaceError::io(src, "listing directory"))?
            .collect::<Result<_, _>>()
            .map_err(WorkspaceError::io(src, "listing directory"))?;
        children.sort_by_key(|e| e.file_name());
        for c in children {
            append_tree(b, &name.join(c.file_name()), &c.path())?;
        }
        Ok(())
    } else if meta.is_file() {
        append_file(b, name, src, mode)
    } else {
        // Sockets, fifos and devices are not copied.
        Ok(())
    }
}
