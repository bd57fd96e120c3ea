//! Ctrl-C (SIGINT), SIGTERM and SIGHUP during commands that must clean up after themselves
//! (`vm run`, `vm exec`).
//!
//! While [`Armed`] lives, these signals only set a flag (the handler does nothing else, which
//! is all a handler may safely do); the code in progress notices it at its next wait: a
//! request to the daemon half-closes its connection (the daemon cancels the operation and
//! still answers, see `client.rs`), a workspace copy stops writing, an ssh session has its
//! remote command interrupted. The command then cleans up (the `--rm` VM, the temp repo) and
//! exits with 128 + the signal number (130 for Ctrl-C).

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

static ARMED: AtomicBool = AtomicBool::new(false);
static SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    SIGNAL.store(sig, Ordering::SeqCst);
}

const SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// Signals are caught (not fatal) while this lives; the previous dispositions come back on drop.
pub struct Armed {
    old: Vec<(libc::c_int, libc::sigaction)>,
}

impl std::fmt::Debug for Armed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Armed")
    }
}

/// Starts catching the signals.
pub fn arm() -> Armed {
    let mut old = Vec::new();
    for sig in SIGNALS {
        // SAFETY: sigaction with a handler that only stores to an atomic (async-signal-safe);
        // SA_RESTART keeps ordinary blocking calls going, the waits poll the flag.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            let mut prev: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, &sa, &mut prev) == 0 {
                old.push((sig, prev));
            }
        }
    }
    ARMED.store(true, Ordering::SeqCst);
    Armed { old }
}

impl Drop for Armed {
    fn drop(&mut self) {
        ARMED.store(false, Ordering::SeqCst);
        for (sig, prev) in &self.old {
            // SAFETY: restores the disposition saved by arm().
            unsafe { libc::sigaction(*sig, prev, std::ptr::null_mut()) };
        }
    }
}

/// Whether signals are being caught right now (waits then poll [`caught`]).
pub fn armed() -> bool {
    ARMED.load(Ordering::SeqCst)
}

/// The signal caught while armed, if any.
pub fn caught() -> Option<i32> {
    match SIGNAL.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// The exit code for a command ended by `sig`: 128 + its number.
pub fn exit_code(sig: i32) -> i32 {
    128 + sig
}

/// While this lives, requests are not half-closed on a caught signal (the `--rm` delete after
/// an interruption must run to its end).
#[derive(Debug)]
pub struct Hold {
    was: bool,
}

pub fn hold() -> Hold {
    Hold {
        was: ARMED.swap(false, Ordering::SeqCst),
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        ARMED.store(self.was, Ordering::SeqCst);
    }
}

/// A writer that fails once a signal was caught: a copy in progress stops at the next write.
pub struct StopOnSignal<'a>(pub &'a mut dyn std::io::Write);

impl std::fmt::Debug for StopOnSignal<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StopOnSignal")
    }
}

impl std::io::Write for StopOnSignal<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if caught().is_some() {
            // Not ErrorKind::Interrupted: write_all would retry that.
            return Err(std::io::Error::other("interrupted"));
        }
        self.0.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}
