//! The VMM's console log, capped: a tiny per-VM pump process between the VMM's stdout/stderr
//! and `vmm.log`, which keeps the file under `max` bytes by renaming it to `vmm.log.1` (the one
//! rotated file, replaced each time) and starting a new one.
//!
//! Why a separate process: the VMM lives in its own session and outlives the daemon, so the
//! daemon cannot be the reader of its output (a dead reader would block or kill the VMM). The
//! pump is forked from the daemon (double fork, its own session, every other descriptor closed)
//! and never calls `exec`: there is no extra binary to install or find, and between fork and
//! exit it makes only async-signal-safe system calls on memory prepared before the fork (no
//! allocation, no locks), as a forked child of a multi-threaded process must. It exits when
//! the last writer (the VMM) closes the pipe. A write that fails (disk full) drops that chunk
//! and goes on reading, so the console never blocks the guest.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::VmmError;

/// The smallest cap accepted: a pump write (16 KiB) must fit in an empty file.
pub const MIN_LOG_MAX: u64 = 64 * 1024;
/// Bytes read from the pipe at a time.
const CHUNK: usize = 16 * 1024;

fn io_err(path: &Path, source: std::io::Error) -> VmmError {
    VmmError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The rotated file's path: `vmm.log` → `vmm.log.1`.
pub fn rotated_path(log_path: &Path) -> std::path::PathBuf {
    let mut s = log_path.as_os_str().to_os_string();
    s.push(".1");
    s.into()
}

/// Starts a pump appending to `log_path` (created 0600), capped at `max` bytes per file, and
/// returns the pipe's write end (close-on-exec) for the VMM's stdout and stderr.
pub fn start(log_path: &Path, max: u64) -> Result<OwnedFd, VmmError> {
    use std::os::unix::fs::OpenOptionsExt;
    let max = max.max(MIN_LOG_MAX);
    let name = log_path
        .file_name()
        .ok_or_else(|| io_err(log_path, std::io::Error::other("log path has no file name")))?;
    let dir_path = match log_path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(log_path)
        .map_err(|e| io_err(log_path, e))?;
    let size = log.metadata().map_err(|e| io_err(log_path, e))?.len();
    let dir = std::fs::File::open(dir_path).map_err(|e| io_err(dir_path, e))?;
    // The pump holds a shared lock on the log's directory for as long as it lives (this open
    // file description is its fd 2), so a reader can tell when the output of an exited VMM
    // has all reached the file ([`drained`]).
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_SH) } == -1 {
        return Err(io_err(dir_path, std::io::Error::last_os_error()));
    }
    let bad_name = |_| io_err(log_path, std::io::Error::other("NUL in log path"));
    let cur = CString::new(name.as_bytes()).map_err(bad_name)?;
    let mut old_name = name.as_bytes().to_vec();
    old_name.extend_from_slice(b".1");
    let old = CString::new(old_name).map_err(bad_name)?;
    let comm = c"banger-logpump";

    let mut fds = [0i32; 2];
    // SAFETY: pipe2 writes two descriptors into the array it is given.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } == -1 {
        return Err(io_err(log_path, std::io::Error::last_os_error()));
    }
    // SAFETY: pipe2 succeeded, so both are open descriptors owned by nobody else.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };

    let args = PumpArgs {
        pipe: read_end.as_raw_fd(),
        log: log.as_raw_fd(),
        dir: dir.as_raw_fd(),
        cur: cur.as_ptr(),
        old: old.as_ptr(),
        comm: comm.as_ptr(),
        size,
        max,
    };
    // SAFETY: fork(2). The child runs only `detach_and_pump`, which makes async-signal-safe
    // system calls on `args` (plain integers and C strings that outlive the fork in the
    // child's copy of this stack frame) and never returns.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => return Err(io_err(log_path, std::io::Error::last_os_error())),
        // SAFETY: in the child; see detach_and_pump.
        0 => unsafe { detach_and_pump(&args) },
        _ => {}
    }
    // The intermediate child exits at once (the pump is its child, adopted by init).
    let mut status = 0;
    loop {
        // SAFETY: waits for the child forked above, which is ours to reap.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            break;
        }
    }
    if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        return Err(io_err(
            log_path,
            std::io::Error::other("the console log pump could not start"),
        ));
    }
    drop((read_end, log, dir));
    Ok(write_end)
}

/// Whether no pump is writing into `log_path` any more (true also when there never was one).
fn is_drained(log_path: &Path) -> bool {
    let dir = match log_path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let Ok(d) = std::fs::File::open(dir) else {
        return true;
    };
    // SAFETY: flock on a descriptor we own; the lock goes with it when `d` is dropped.
    unsafe { libc::flock(d.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

/// Waits (at most `timeout`) until the pump of an exited VMM has written everything and
/// gone, so a log tail quoted in an error is complete. Returns whether it has.
pub async fn drained(log_path: &Path, timeout: std::time::Duration) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if is_drained(log_path) {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// [`drained`] for callers outside async code (blocks the thread, briefly).
pub fn drained_blocking(log_path: &Path, timeout: std::time::Duration) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while !is_drained(log_path) {
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    true
}

/// What the pump needs, all prepared before the fork.
struct PumpArgs {
    pipe: i32,
    log: i32,
    dir: i32,
    cur: *const libc::c_char,
    old: *const libc::c_char,
    comm: *const libc::c_char,
    size: u64,
    max: u64,
}

/// In the forked child: a new session, a second fork (the intermediate exits 0 at once), then
/// the pump. Never returns.
///
/// # Safety
/// Only in a child just forked from [`start`]; `a`'s pointers must be valid there.
unsafe fn detach_and_pump(a: &PumpArgs) -> ! {
    // SAFETY: (the whole body) only async-signal-safe system calls, no allocation, no locks.
    unsafe {
        if libc::setsid() == -1 {
            libc::_exit(1);
        }
        match libc::fork() {
            -1 => libc::_exit(1),
            0 => {}
            _ => libc::_exit(0),
        }
        // Descriptors to 0/1/2 via high numbers, so none overwrites another on the way.
        let pipe = libc::fcntl(a.pipe, libc::F_DUPFD, 100);
        let log = libc::fcntl(a.log, libc::F_DUPFD, 100);
        let dir = libc::fcntl(a.dir, libc::F_DUPFD, 100);
        if pipe < 0 || log < 0 || dir < 0 {
            libc::_exit(1);
        }
        libc::dup2(pipe, 0);
        libc::dup2(log, 1);
        libc::dup2(dir, 2);
        // Everything else the daemon had open (its sockets, its lock, other VMs' pipes) is
        // closed: the pump must hold nothing but its own three.
        if libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) != 0 {
            for fd in 3..65536 {
                libc::close(fd);
            }
        }
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGQUIT, libc::SIGPIPE] {
            libc::signal(sig, libc::SIG_DFL);
        }
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
        libc::prctl(libc::PR_SET_NAME, a.comm, 0, 0, 0);
        pump(a.cur, a.old, a.size, a.max)
    }
}

/// Copies fd 0 to fd 1, rotating (fd 2 is the log's directory) before a write would take the
/// file past `max`. Exits 0 at end of input.
///
/// # Safety
/// fds 0, 1, 2 as set up by [`detach_and_pump`]; `cur`/`old` valid C strings.
unsafe fn pump(cur: *const libc::c_char, old: *const libc::c_char, mut size: u64, max: u64) -> ! {
    let mut buf = [0u8; CHUNK];
    // SAFETY: (the whole body) read/write/fstat/renameat/openat/dup2/close/ftruncate/_exit are
    // async-signal-safe; `buf` is this frame's.
    unsafe {
        loop {
            let n = libc::read(0, buf.as_mut_ptr().cast(), CHUNK);
            if n == 0 {
                libc::_exit(0);
            }
            if n < 0 {
                if *libc::__errno_location() == libc::EINTR {
                    continue;
                }
                libc::_exit(1);
            }
            let n = n as usize;
            if size + n as u64 > max {
                // Someone may have truncated or replaced the file: trust its real size.
                let mut st: libc::stat = std::mem::zeroed();
                if libc::fstat(1, &mut st) == 0 {
                    size = st.st_size as u64;
                }
            }
            if size > 0 && size + n as u64 > max {
                libc::renameat(2, cur, 2, old);
                let fd = libc::openat(
                    2,
                    cur,
                    libc::O_WRONLY
                        | libc::O_CREAT
                        | libc::O_TRUNC
                        | libc::O_APPEND
                        | libc::O_NOFOLLOW,
                    0o600,
                );
                if fd >= 0 {
                    libc::dup2(fd, 1);
                    libc::close(fd);
                } else {
                    // Cannot start a new file: empty this one rather than grow it.
                    libc::ftruncate(1, 0);
                }
                size = 0;
            }
            let mut off = 0usize;
            while off < n {
                let w = libc::write(1, buf.as_ptr().add(off).cast(), n - off);
                if w < 0 && *libc::__errno_location() == libc::EINTR {
                    continue;
                }
                if w <= 0 {
                    // Disk full or similar: this chunk is lost, the guest goes on.
                    break;
                }
                off += w as usize;
            }
            size += off as u64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A writer far faster than the cap: both files stay under it, the newest bytes survive,
    /// and the pump exits when the writer closes.
    #[test]
    fn a_flood_stays_under_the_cap() {
        let t = tempfile::tempdir().unwrap();
        let log = t.path().join("vmm.log");
        std::fs::write(&log, b"earlier boot\n").unwrap();
        let max = MIN_LOG_MAX;
        let w = start(&log, max).unwrap();
        // The pump is not our child and not in our session: it outlives its maker, as it must
        // outlive a daemon that dies.
        let find = || {
            std::fs::read_dir("/proc")
                .unwrap()
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
                .find(|pid| {
                    std::fs::read_link(format!("/proc/{pid}/fd/1")).is_ok_and(|p| p == log)
                        && std::fs::read_to_string(format!("/proc/{pid}/comm"))
                            .is_ok_and(|c| c.trim() == "banger-logpump")
                })
        };
        // It may not have run its first instructions yet.
        let since = std::time::Instant::now();
        let pump = loop {
            match find() {
                Some(pid) => break pid,
                None if since.elapsed() < std::time::Duration::from_secs(5) => {
                    std::thread::sleep(std::time::Duration::from_millis(10))
                }
                None => panic!("no banger-logpump process writing {}", log.display()),
            }
        };
        let stat = crate::process::proc_stat(pump).unwrap();
        let ours = crate::process::proc_stat(std::process::id() as i32).unwrap();
        assert_ne!(
            stat.session, ours.session,
            "the pump is in a session of its own"
        );
        let status = std::fs::read_to_string(format!("/proc/{pump}/status")).unwrap();
        let ppid: i32 = status
            .lines()
            .find_map(|l| l.strip_prefix("PPid:"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_ne!(ppid, std::process::id() as i32, "the pump is not our child");
        let mut f = std::fs::File::from(w);
        let line = b"\x1b[31mspam spam spam spam spam spam spam spam spam spam spam spam\x1b[0m\n";
        for _ in 0..(16 * 1024 * 1024 / line.len()) {
            f.write_all(line).unwrap();
        }
        f.write_all(b"LAST LINE\n").unwrap();
        drop(f);
        // The pump drains and exits on end of input.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let text = std::fs::read(&log).unwrap_or_default();
            if text.ends_with(b"LAST LINE\n") {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "pump did not finish");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let cur = std::fs::metadata(&log).unwrap().len();
        let old = std::fs::metadata(rotated_path(&log)).unwrap().len();
        assert!(
            cur <= max && old <= max,
            "vmm.log {cur} + .1 {old} > cap {max}"
        );
        assert!(
            old > max / 2,
            "the rotated file holds the previous output: {old}"
        );
        assert!(
            drained_blocking(&log, std::time::Duration::from_secs(5)),
            "the pump outlived its input"
        );
        let since = std::time::Instant::now();
        while crate::process::proc_stat(pump).is_some_and(|s| s.state != 'Z') {
            assert!(
                since.elapsed() < std::time::Duration::from_secs(5),
                "pump still runs"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&log).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
    }
}
