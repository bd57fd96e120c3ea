//! Host files the user names as input (`image import` sources, `[[file_sync]]` host files):
//! only regular files (and, where the caller allows, directories), opened so nothing can make
//! the daemon wait forever, and read with a cap.
//!
//! The open uses `O_NONBLOCK`: opening a FIFO for reading otherwise waits for a writer that may
//! never come, on a thread the daemon needs for other requests. The type is then checked on the
//! opened fd (`fstat`), so what is checked is what is read. Symlinks are followed: these paths
//! are the owner's own (a dotfile linked into a dotfiles repo is normal); the target must still
//! be a regular file.

use std::fs::{File, Metadata};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("{path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is {what}, not a regular file{dirs}", dirs = if *.dir_ok { " or a directory" } else { "" })]
    NotRegular {
        path: PathBuf,
        what: &'static str,
        dir_ok: bool,
    },
    #[error("{path} is larger than the {cap} bytes allowed here")]
    TooLarge { path: PathBuf, cap: u64 },
}

impl InputError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, InputError::Open { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

/// An opened input: a regular file (with its metadata, taken from the fd) or a directory.
#[derive(Debug)]
pub enum Input {
    File(File, Metadata),
    Dir,
}

/// Opens `path` without blocking and checks on the fd that it is a regular file, or a
/// directory when `dir_ok`.
pub fn open_input(path: &Path, dir_ok: bool) -> Result<Input, InputError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|source| InputError::Open {
            path: path.to_path_buf(),
            source,
        })?;
    checked(file, path, dir_ok)
}

/// Opens `name`, one path component, inside the opened directory `dir` (named `dir_path` in
/// errors) as [`open_input`] does, but never through a symlink (`O_NOFOLLOW`, and `..` or a
/// `/` in `name` refused): what is read is in that directory, not wherever a link points.
pub fn open_regular_in(dir: &File, dir_path: &Path, name: &str) -> Result<File, InputError> {
    use std::os::fd::AsRawFd;
    let path = dir_path.join(name);
    if name.is_empty() || name == "." || name == ".." || name.contains('/') {
        return Err(InputError::NotRegular {
            path,
            what: "not a plain file name",
            dir_ok: false,
        });
    }
    // The directory's fd link reaches the opened directory itself, whatever its path now names.
    let at = PathBuf::from(format!("/proc/self/fd/{}/{name}", dir.as_raw_fd()));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_NOFOLLOW)
        .open(at)
        .map_err(|source| match source.raw_os_error() {
            Some(libc::ELOOP) => InputError::NotRegular {
                path: path.clone(),
                what: "a symlink",
                dir_ok: false,
            },
            _ => InputError::Open {
                path: path.clone(),
                source,
            },
        })?;
    match checked(file, &path, false)? {
        Input::File(f, _) => Ok(f),
        Input::Dir => unreachable!("directories are refused when dir_ok is false"),
    }
}

/// A path that reopens the opened `file` itself (`/proc/self/fd/N`), for code that takes a
/// path: whatever is renamed over the original path after the check, this reaches the checked
/// inode. Valid while `file` stays open.
pub fn fd_path(file: &File) -> PathBuf {
    use std::os::fd::AsRawFd;
    PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

/// The type check on the opened fd.
fn checked(file: File, path: &Path, dir_ok: bool) -> Result<Input, InputError> {
    let meta = file.metadata().map_err(|source| InputError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    let ft = meta.file_type();
    if ft.is_file() {
        return Ok(Input::File(file, meta));
    }
    if ft.is_dir() && dir_ok {
        return Ok(Input::Dir);
    }
    let what = if ft.is_dir() {
        "a directory"
    } else if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_block_device() {
        "a block device"
    } else {
        "not a plain file"
    };
    Err(InputError::NotRegular {
        path: path.to_path_buf(),
        what,
        dir_ok,
    })
}

/// Reads the regular file at `path` whole, refusing anything else and anything over `cap`
/// bytes (checked on the size and again while reading: the file may grow meanwhile).
pub fn read_regular_capped(path: &Path, cap: u64) -> Result<Vec<u8>, InputError> {
    let Input::File(file, _) = open_input(path, false)? else {
        unreachable!("directories are refused when dir_ok is false")
    };
    read_file_capped(file, path, cap)
}

/// [`read_regular_capped`] on an already checked file (`path` names it in errors).
pub fn read_file_capped(file: File, path: &Path, cap: u64) -> Result<Vec<u8>, InputError> {
    let meta = file.metadata().map_err(|source| InputError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    let too_large = || InputError::TooLarge {
        path: path.to_path_buf(),
        cap,
    };
    if meta.len() > cap {
        return Err(too_large());
    }
    let mut data = Vec::with_capacity(meta.len() as usize);
    file.take(cap + 1)
        .read_to_end(&mut data)
        .map_err(|source| InputError::Open {
            path: path.to_path_buf(),
            source,
        })?;
    if data.len() as u64 > cap {
        return Err(too_large());
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_regular_files_of_bounded_size() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        // Returns at once (no writer needed) and names the path and what it is.
        let e = read_regular_capped(&fifo, 10).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("{} is a FIFO, not a regular file", fifo.display())
        );
        let e = read_regular_capped(Path::new("/dev/zero"), 10).unwrap_err();
        assert!(e.to_string().contains("character device"), "{e}");
        let e = read_regular_capped(dir.path(), 10).unwrap_err();
        assert!(e.to_string().contains("a directory"), "{e}");
        assert!(matches!(open_input(dir.path(), true), Ok(Input::Dir)));
        let e = open_input(&fifo, true).unwrap_err();
        assert!(
            e.to_string().ends_with("not a regular file or a directory"),
            "{e}"
        );
        let f = dir.path().join("f");
        std::fs::write(&f, b"0123456789").unwrap();
        assert_eq!(read_regular_capped(&f, 10).unwrap(), b"0123456789");
        let e = read_regular_capped(&f, 9).unwrap_err();
        assert!(matches!(e, InputError::TooLarge { cap: 9, .. }), "{e}");
        let e = read_regular_capped(&dir.path().join("missing"), 9).unwrap_err();
        assert!(e.is_not_found());
        // A symlink to a regular file is read; one to a FIFO is refused.
        let l = dir.path().join("l");
        std::os::unix::fs::symlink(&fifo, &l).unwrap();
        assert!(read_regular_capped(&l, 9).is_err());
    }

    #[test]
    fn open_regular_in_stays_in_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let d = File::open(dir.path()).unwrap();
        std::fs::write(dir.path().join("a.ko"), b"x").unwrap();
        assert!(open_regular_in(&d, dir.path(), "a.ko").is_ok());
        // A link, even to a regular file in the same dir, is not followed.
        std::os::unix::fs::symlink("a.ko", dir.path().join("l.ko")).unwrap();
        let e = open_regular_in(&d, dir.path(), "l.ko").unwrap_err();
        assert!(e.to_string().contains("a symlink"), "{e}");
        std::os::unix::fs::symlink("/dev/zero", dir.path().join("z")).unwrap();
        assert!(open_regular_in(&d, dir.path(), "z").is_err());
        nix::unistd::mkfifo(
            &dir.path().join("f"),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .unwrap();
        let e = open_regular_in(&d, dir.path(), "f").unwrap_err();
        assert!(e.to_string().contains("FIFO"), "{e}");
        for bad in ["..", "../a.ko", ""] {
            assert!(open_regular_in(&d, dir.path(), bad).is_err(), "{bad}");
        }
    }
}
