//! Pseudo-terminals for `pty-req` sessions: `/dev/ptmx` opened directly (no libutil), the peer
//! opened with `TIOCGPTPEER` (no path lookup, so it cannot race with a devpts remount), both
//! close-on-exec so no other session's child inherits them (a stray copy of a slave would keep
//! the pty alive after the session ends).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use tokio::io::unix::AsyncFd;

/// Window size as the client sends it (`pty-req`, `window-change`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WinSize {
    pub cols: u32,
    pub rows: u32,
    pub px_width: u32,
    pub px_height: u32,
}

impl WinSize {
    fn to_libc(self) -> libc::winsize {
        let clamp = |v: u32| u16::try_from(v).unwrap_or(u16::MAX);
        libc::winsize {
            ws_row: clamp(self.rows),
            ws_col: clamp(self.cols),
            ws_xpixel: clamp(self.px_width),
            ws_ypixel: clamp(self.px_height),
        }
    }
}

/// A freshly allocated pty: the master (non-blocking) and the slave, which becomes the child's
/// stdin/stdout/stderr and controlling terminal.
#[derive(Debug)]
pub struct Pty {
    pub master: OwnedFd,
    pub slave: OwnedFd,
    /// `/dev/pts/N`, for `SSH_TTY`.
    pub name: String,
}

fn cvt(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Opens a new pty with window size `size`.
pub fn open(size: WinSize) -> io::Result<Pty> {
    let flags = libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC;
    // SAFETY: plain open(2) of a static path; the result is checked before use.
    let m = cvt(unsafe { libc::open(c"/dev/ptmx".as_ptr(), flags | libc::O_NONBLOCK) })?;
    // SAFETY: `m` is a fresh descriptor that nothing else owns.
    let master = unsafe { OwnedFd::from_raw_fd(m) };
    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK reads an int from the pointer, which is valid for the call.
    cvt(unsafe { libc::ioctl(m, libc::TIOCSPTLCK, &unlock) })?;
    let mut n: libc::c_uint = 0;
    // SAFETY: TIOCGPTN writes an unsigned int through the pointer, which is valid.
    cvt(unsafe { libc::ioctl(m, libc::TIOCGPTN, &mut n) })?;
    let name = format!("/dev/pts/{n}");
    // SAFETY: TIOCGPTPEER takes open flags by value and returns a new descriptor.
    let s = match cvt(unsafe { libc::ioctl(m, libc::TIOCGPTPEER, flags) }) {
        Ok(fd) => fd,
        // Kernels before 4.13: open the slave by name.
        Err(_) => {
            let c = std::ffi::CString::new(name.clone())
                .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
            // SAFETY: `c` is a valid NUL-terminated path; the result is checked.
            cvt(unsafe { libc::open(c.as_ptr(), flags) })?
        }
    };
    // SAFETY: `s` is a fresh descriptor that nothing else owns.
    let slave = unsafe { OwnedFd::from_raw_fd(s) };
    set_size(m, size)?;
    Ok(Pty {
        master,
        slave,
        name,
    })
}

/// TIOCSWINSZ on either side; the kernel sends SIGWINCH to the foreground process group.
pub fn set_size(fd: RawFd, size: WinSize) -> io::Result<()> {
    let ws = size.to_libc();
    // SAFETY: TIOCSWINSZ reads a winsize from the pointer, which is valid for the call.
    cvt(unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) }).map(drop)
}

/// The master side, readable and writable from async tasks.
#[derive(Debug)]
pub struct Master(AsyncFd<OwnedFd>);

impl Master {
    /// Needs a tokio runtime with IO enabled. The fd must be non-blocking (as [`open`] makes it).
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        // SAFETY: the OwnedFd is moved into the AsyncFd, so the descriptor stays open and the
        // same for the AsyncFd's whole lifetime.
        Ok(Master(unsafe { AsyncFd::register(fd) }?))
    }

    /// Reads what the session wrote; `Ok(0)` once every slave descriptor is closed (the kernel
    /// reports that as EIO on the master).
    pub async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.0.readable().await?;
            let res = guard.try_io(|fd| {
                // SAFETY: buf is valid for writes of buf.len() bytes.
                let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match res {
                Ok(Ok(n)) => return Ok(n),
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Ok(0),
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => {}
            }
        }
    }

    /// Writes all of `buf` (the client's keystrokes) into the terminal.
    pub async fn write_all(&self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            let mut guard = self.0.writable().await?;
            let res = guard.try_io(|fd| {
                // SAFETY: buf is valid for reads of buf.len() bytes.
                let n = unsafe { libc::write(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match res {
                Ok(Ok(n)) => buf = &buf[n..],
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => {}
            }
        }
        Ok(())
    }

    pub fn resize(&self, size: WinSize) -> io::Result<()> {
        set_size(self.0.get_ref().as_raw_fd(), size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_size_is_clamped() {
        let ws = WinSize {
            cols: 80,
            rows: 100_000,
            px_width: 0,
            px_height: 1,
        }
        .to_libc();
        assert_eq!((ws.ws_col, ws.ws_row, ws.ws_ypixel), (80, u16::MAX, 1));
    }

    #[test]
    fn open_sets_size_and_names_the_slave() {
        let size = WinSize {
            cols: 101,
            rows: 37,
            ..Default::default()
        };
        let pty = match open(size) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("SKIP: no ptys here: {e}");
                return;
            }
        };
        assert!(pty.name.starts_with("/dev/pts/"), "{}", pty.name);
        let mut ws: libc::winsize = libc::winsize {
            ws_row: 0,
            ws_col: 0,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCGWINSZ writes a winsize through the valid pointer.
        let rc = unsafe { libc::ioctl(pty.slave.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
        assert_eq!(rc, 0);
        assert_eq!((ws.ws_row, ws.ws_col), (37, 101));
        // SAFETY: fcntl(F_GETFD) on a valid descriptor.
        let fdflags = unsafe { libc::fcntl(pty.master.as_raw_fd(), libc::F_GETFD) };
        assert!(fdflags & libc::FD_CLOEXEC != 0);
        // SAFETY: fcntl(F_GETFD) on a valid descriptor.
        let fdflags = unsafe { libc::fcntl(pty.slave.as_raw_fd(), libc::F_GETFD) };
        assert!(fdflags & libc::FD_CLOEXEC != 0);
    }
}
