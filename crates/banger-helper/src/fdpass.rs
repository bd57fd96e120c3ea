//! Line I/O on a tokio Unix stream with file descriptors attached (`SCM_RIGHTS`).

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::UnixStream;

/// Writes `data`; when `fd` is given, it rides on the first byte, so the receiver gets it with
/// the start of the line.
pub async fn write_with_fd(
    stream: &mut UnixStream,
    data: &[u8],
    fd: Option<BorrowedFd<'_>>,
) -> io::Result<()> {
    let Some(fd) = fd else {
        return stream.write_all(data).await;
    };
    let raw = [fd.as_raw_fd()];
    let sent = loop {
        stream.writable().await?;
        let r = stream.try_io(Interest::WRITABLE, || {
            let iov = [IoSlice::new(data)];
            let cmsg = [ControlMessage::ScmRights(&raw)];
            sendmsg::<()>(
                stream.as_raw_fd(),
                &iov,
                &cmsg,
                MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
                None,
            )
            .map_err(io::Error::from)
        });
        match r {
            Ok(n) => break n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    };
    stream.write_all(&data[sent..]).await
}

/// Reads up to and excluding the next newline into a line, keeping bytes after it in `buf`
/// for the next call, and collects every descriptor that arrives meanwhile (close-on-exec).
/// `Ok(None)` at a clean end of stream before any byte of a line.
pub async fn read_line_with_fds(
    stream: &UnixStream,
    buf: &mut Vec<u8>,
    max: usize,
    fds: &mut Vec<OwnedFd>,
) -> io::Result<Option<Vec<u8>>> {
    loop {
        if let Some(i) = buf.iter().position(|b| *b == b'\n') {
            let rest = buf.split_off(i + 1);
            let mut line = std::mem::replace(buf, rest);
            line.pop();
            return Ok(Some(line));
        }
        if buf.len() > max {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("line longer than {max} bytes"),
            ));
        }
        stream.readable().await?;
        let mut chunk = [0u8; 16 * 1024];
        let r = stream.try_io(Interest::READABLE, || {
            recv_chunk(stream.as_raw_fd(), &mut chunk)
        });
        let (n, got) = match r {
            Ok(x) => x,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        fds.extend(got);
        if n == 0 {
            if buf.is_empty() {
                return Ok(None);
            }
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the connection closed in the middle of a line",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn recv_chunk(fd: RawFd, chunk: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    // Room for SCM_MAX_FD (253) descriptors: a message can never carry more, so none is
    // ever cut off (and leaked) by a short control buffer.
    let mut space = nix::cmsg_space!([RawFd; 253]);
    let mut iov = [IoSliceMut::new(chunk)];
    let msg = recvmsg::<()>(
        fd,
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
    )
    .map_err(io::Error::from)?;
    let mut fds = Vec::new();
    // Take ownership of every descriptor first, so none leaks even if the message was cut.
    if let Ok(cmsgs) = msg.cmsgs() {
        for c in cmsgs {
            if let ControlMessageOwned::ScmRights(raw) = c {
                for r in raw {
                    // SAFETY: SCM_RIGHTS installed `r` in this process just now; nothing else
                    // owns it.
                    fds.push(unsafe { OwnedFd::from_raw_fd(r) });
                }
            }
        }
    }
    if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "too many file descriptors in one message",
        ));
    }
    Ok((msg.bytes, fds))
}
