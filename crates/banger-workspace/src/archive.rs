//! Tar streams built and read in Rust: the workspace copy, `sync`'s changed files, and
//! `vm cp` both ways. File lists never pass through `tar -T` or a shell.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

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

/// Extracts a tar stream into `dest`: the archive's single top-level name becomes `dest`
/// itself (`tar -c -C parent name` on the other side). Refuses absolute paths, `..`,
/// hard links and writes through a symbolic link the archive created.
pub fn extract_as(input: impl Read, dest: &Path) -> Result<u64, WorkspaceError> {
    let mut ar = tar::Archive::new(input);
    ar.set_preserve_permissions(true);
    ar.set_overwrite(true);
    let mut count = 0u64;
    let mut top: Option<std::ffi::OsString> = None;
    let entries = ar
        .entries()
        .map_err(WorkspaceError::io(dest, "reading the archive"))?;
    for entry in entries {
        let mut entry = entry.map_err(WorkspaceError::io(dest, "reading the archive"))?;
        let raw = entry
            .path()
            .map_err(WorkspaceError::io(dest, "reading an entry name"))?
            .into_owned();
        let unsafe_entry = |detail: &str| WorkspaceError::UnsafeEntry {
            path: dest.to_path_buf(),
            entry: raw.display().to_string(),
            detail: detail.into(),
        };
        let mut parts = Vec::new();
        for c in raw.components() {
            match c {
                Component::Normal(p) => parts.push(p.to_os_string()),
                Component::CurDir => {}
                _ => return Err(unsafe_entry("absolute or parent-relative path")),
            }
        }
        let Some(first) = parts.first() else {
            continue;
        };
        match &top {
            None => top = Some(first.clone()),
            Some(t) if t != first => return Err(unsafe_entry("more than one top-level name")),
            Some(_) => {}
        }
        let kind = entry.header().entry_type();
        if !(kind.is_file() || kind.is_dir() || kind.is_symlink()) {
            if kind.is_hard_link() {
                return Err(unsafe_entry("hard links are not copied"));
            }
            continue;
        }
        let mut target: PathBuf = dest.to_path_buf();
        for p in &parts[1..] {
            // No ancestor may be a link: a link from an earlier entry could point anywhere.
            if std::fs::symlink_metadata(&target).is_ok_and(|m| m.file_type().is_symlink()) {
                return Err(unsafe_entry("it lies below a symbolic link"));
            }
            target.push(p);
        }
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)
                .map_err(WorkspaceError::io(parent, "creating directory"))?;
        }
        if !kind.is_dir()
            && std::fs::symlink_metadata(&target).is_ok_and(|m| m.file_type().is_symlink())
        {
            std::fs::remove_file(&target)
                .map_err(WorkspaceError::io(&target, "replacing a symbolic link"))?;
        }
        entry
            .unpack(&target)
            .map_err(WorkspaceError::io(&target, "extracting"))?;
        if !kind.is_dir() {
            count += 1;
        }
    }
    if top.is_none() {
        return Err(WorkspaceError::UnsafeEntry {
            path: dest.to_path_buf(),
            entry: String::new(),
            detail: "the archive is empty (nothing at that path?)".into(),
        });
    }
    Ok(count)
}
