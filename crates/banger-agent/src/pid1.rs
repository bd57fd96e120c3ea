//! The agent as the VM's PID 1 ([`banger_guest::InitMode::Agent`], images without an init
//! system): a small synchronous loop over one `poll(2)`.
//!
//! - **Reaping**: every process whose parent dies is re-parented to PID 1; `waitpid(-1)` after
//!   each SIGCHLD (read from a signalfd) collects them.
//! - **ssh service**: the built-in server (forked, see [`crate::services`]) or the image's sshd,
//!   restarted when it exits, with a back-off from 1 s to 30 s (reset after 10 s of uptime).
//! - **Shutdown** on SIGTERM (busybox `reboot`), SIGINT (Ctrl-Alt-Del: Firecracker's
//!   SendCtrlAltDel, once `RB_DISABLE_CAD` is set), SIGUSR1 (`halt`), SIGUSR2 (`poweroff`),
//!   SIGPWR, or KEY_POWER from an evdev device (the ACPI power button, i.e. QEMU's
//!   `system_powerdown`, when the kernel has the `button` and `evdev` drivers): SIGTERM to every
//!   process, up to [`TERM_GRACE`] for them to exit, SIGKILL, sync, unmount or remount
//!   read-only every disk filesystem, power off ([`sys::power_off`]).
//!
//! PID 1 never exits: the loop has no way out but power-off, errors in it are logged, and a
//! panic powers off (the hook is installed in `main`).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use banger_guest::{GuestConfig, SshServer};

use crate::console::line;
use crate::error::AgentError;
use crate::services::{AgentSshd, ImageSshd};
use crate::{net, sys};

/// Signals PID 1 blocks and reads from its signalfd.
pub const HANDLED_SIGNALS: [libc::c_int; 7] = [
    libc::SIGCHLD,
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGPWR,
    // sysvinit re-reads its config on SIGHUP; here it means nothing, but must not kill us.
    libc::SIGHUP,
];

/// How long processes get between SIGTERM and SIGKILL at shutdown.
pub const TERM_GRACE: Duration = Duration::from_secs(5);
/// How long to wait for SIGKILLed processes to be reaped.
const KILL_GRACE: Duration = Duration::from_secs(2);
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A service that ran this long is considered healthy: its next restart is immediate-ish.
const HEALTHY_AFTER: Duration = Duration::from_secs(10);

/// What PID 1 does with a signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalAction {
    Reap,
    Shutdown(&'static str),
    Ignore,
}

pub fn signal_action(sig: libc::c_int) -> SignalAction {
    match sig {
        libc::SIGCHLD => SignalAction::Reap,
        libc::SIGTERM => SignalAction::Shutdown("SIGTERM (reboot)"),
        libc::SIGINT => SignalAction::Shutdown("SIGINT (ctrl-alt-del)"),
        libc::SIGUSR1 => SignalAction::Shutdown("SIGUSR1 (halt)"),
        libc::SIGUSR2 => SignalAction::Shutdown("SIGUSR2 (poweroff)"),
        libc::SIGPWR => SignalAction::Shutdown("SIGPWR"),
        _ => SignalAction::Ignore,
    }
}

/// Whether a shutdown asked for by `why` (a [`signal_action`] reason) ends in a reboot, as
/// systemd does for them: Ctrl-Alt-Del and busybox `reboot`. This matters under Firecracker,
/// whose only stop request is Ctrl-Alt-Del: it exits on a guest reboot, but it has ACPI
/// without a power-off, so a power-off there only halts the kernel and the VMM runs on until
/// banger's stop timeout kills it (seen with the real Firecracker v1.16.1). QEMU runs with
/// `-no-reboot`, so a reboot ends it as well.
pub fn ends_in_reboot(why: &str) -> bool {
    why.contains("(ctrl-alt-del)") || why.contains("(reboot)")
}

enum Kind {
    // Boxed: the server's settings (keys) are much larger than the sshd path.
    Agent(Box<AgentSshd>),
    Image(ImageSshd),
}

/// The supervised ssh service.
struct Service {
    kind: Kind,
    pid: Option<libc::pid_t>,
    started: Instant,
    restart_at: Option<Instant>,
    backoff: Duration,
}

impl Service {
    fn name(&self) -> String {
        match &self.kind {
            Kind::Agent(_) => "built-in ssh server".into(),
            Kind::Image(s) => s.path.display().to_string(),
        }
    }

    fn start(&mut self) {
        self.restart_at = None;
        self.started = Instant::now();
        let res = match &self.kind {
            Kind::Agent(s) => s.fork(),
            Kind::Image(s) => s.spawn(),
        };
        match res {
            Ok(pid) => self.pid = Some(pid),
            Err(e) => {
                line(&format!("starting {}: {e}", self.name()));
                self.schedule_restart();
            }
        }
    }

    fn schedule_restart(&mut self) {
        self.backoff = next_backoff(self.backoff, self.started.elapsed());
        self.restart_at = Some(Instant::now() + self.backoff);
    }

    fn exited(&mut self, status: libc::c_int) {
        self.pid = None;
        self.schedule_restart();
        line(&format!(
            "{} exited ({}); restarting in {} s",
            self.name(),
            describe_status(status),
            self.backoff.as_secs()
        ));
    }
}

/// The delay before the next restart: short after a healthy run, doubling while it keeps
/// failing fast.
pub fn next_backoff(previous: Duration, ran_for: Duration) -> Duration {
    if ran_for >= HEALTHY_AFTER || previous.is_zero() {
        BACKOFF_MIN
    } else {
        (previous * 2).min(BACKOFF_MAX)
    }
}

pub fn describe_status(status: libc::c_int) -> String {
    if libc::WIFEXITED(status) {
        format!("exit code {}", libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        format!("signal {}", libc::WTERMSIG(status))
    } else {
        format!("status {status:#x}")
    }
}

/// PID 1 after the switch to the image's root.
pub struct Supervisor {
    signals: OwnedFd,
    buttons: Vec<(PathBuf, OwnedFd)>,
    service: Option<Service>,
    mounted: Vec<&'static str>,
}

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl Supervisor {
    /// Sets up what an init provides (see [`sys::mount_agent_init_fs`]), `lo`, signal
    /// handling, the power button, and starts the ssh service.
    pub fn prepare(config: &GuestConfig) -> Result<Self, AgentError> {
        let mounted = sys::mount_agent_init_fs()?;
        net::loopback_up()?;
        sys::disable_ctrl_alt_del()?;
        let signals = block_signals_into_fd()?;
        let buttons = power_buttons(Path::new("/dev/input"));
        let kind = match config.ssh_server {
            SshServer::Agent => Some(Kind::Agent(Box::new(AgentSshd::prepare(config)?))),
            SshServer::Image => {
                let found = ImageSshd::find(Path::new("/"), config);
                if found.is_none() {
                    line(&format!(
                        "no sshd in the image (looked for {}): the VM has no ssh service",
                        crate::services::SSHD_PATHS.join(", ")
                    ));
                }
                found.map(Kind::Image)
            }
        };
        let mut service = kind.map(|kind| Service {
            kind,
            pid: None,
            started: Instant::now(),
            restart_at: None,
            backoff: Duration::ZERO,
        });
        if let Some(s) = &mut service {
            s.start();
        }
        Ok(Supervisor {
            signals,
            buttons,
            service,
            mounted,
        })
    }

    pub fn describe(&self) -> String {
        let ssh = match &self.service {
            Some(s) => match s.pid {
                Some(pid) => format!("{} (pid {pid})", s.name()),
                None => format!("{} (not running)", s.name()),
            },
            None => "none".into(),
        };
        let buttons = if self.buttons.is_empty() {
            "no power button device".to_string()
        } else {
            let names: Vec<String> = self
                .buttons
                .iter()
                .map(|(p, _)| p.display().to_string())
                .collect();
            format!("power button {}", names.join(", "))
        };
        format!("mounted {}; ssh: {ssh}; {buttons}", self.mounted.join(" "))
    }

    /// The PID 1 loop. Never returns.
    pub fn run(mut self) -> ! {
        loop {
            if let Some(s) = &mut self.service
                && s.pid.is_none()
                && s.restart_at.is_some_and(|t| Instant::now() >= t)
            {
                s.start();
            }
            let timeout_ms = self
                .service
                .as_ref()
                .and_then(|s| s.restart_at)
                .map_or(-1, |t| {
                    let ms = t.saturating_duration_since(Instant::now()).as_millis();
                    libc::c_int::try_from(ms).unwrap_or(libc::c_int::MAX)
                });
            let mut fds: Vec<libc::pollfd> = std::iter::once(self.signals.as_raw_fd())
                .chain(self.buttons.iter().map(|(_, fd)| fd.as_raw_fd()))
                .map(|fd| libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                })
                .collect();
            // SAFETY: fds is a valid array of pollfd of the given length.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    line(&format!("poll: {e}"));
                    std::thread::sleep(Duration::from_millis(100));
                }
                continue;
            }
            for sig in read_signals(&self.signals) {
                match signal_action(sig) {
                    SignalAction::Shutdown(why) => self.shutdown(why),
                    SignalAction::Reap | SignalAction::Ignore => {}
                }
            }
            // Cheap, and catches a SIGCHLD coalesced with another signal.
            self.reap();
            let mut pressed = false;
            let mut dead = Vec::new();
            for (i, (path, fd)) in self.buttons.iter().enumerate() {
                match read_button(fd) {
                    ButtonRead::Pressed => pressed = true,
                    ButtonRead::Nothing => {}
                    ButtonRead::Gone(e) => {
                        line(&format!("{}: {e}; no longer watched", path.display()));
                        dead.push(i);
                    }
                }
            }
            for i in dead.into_iter().rev() {
                self.buttons.remove(i);
            }
            if pressed {
                self.shutdown("power button");
            }
        }
    }

    fn reap(&mut self) {
        for (pid, status) in reap_children() {
            if let Some(s) = &mut self.service
                && s.pid == Some(pid)
            {
                s.exited(status);
            }
        }
    }

    /// Stops everything and powers off. Never returns.
    fn shutdown(&mut self, why: &str) -> ! {
        line(&format!("shutdown ({why}): stopping all processes"));
        self.service = None;
        // SAFETY: kill(-1) signals every process but PID 1 itself; SIGCONT wakes stopped ones
        // so they can act on the SIGTERM.
        unsafe {
            libc::kill(-1, libc::SIGTERM);
            libc::kill(-1, libc::SIGCONT);
        }
        if !wait_for_all_children(TERM_GRACE) {
            line(&format!(
                "processes still running after {} s: SIGKILL",
                TERM_GRACE.as_secs()
            ));
            // SAFETY: as above.
            unsafe { libc::kill(-1, libc::SIGKILL) };
            wait_for_all_children(KILL_GRACE);
        }
        // SAFETY: sync has no preconditions.
        unsafe { libc::sync() };
        let notes = sys::teardown_mounts();
        if ends_in_reboot(why) {
            line(&format!("filesystems: {}; rebooting", notes.join(", ")));
            sys::reboot()
        }
        line(&format!("filesystems: {}; powering off", notes.join(", ")));
        sys::power_off()
    }
}

/// Blocks [`HANDLED_SIGNALS`] and returns a signalfd for them. Blocked signals are queued even
/// for PID 1 (which the kernel otherwise shields from signals it has no handler for).
fn block_signals_into_fd() -> Result<OwnedFd, AgentError> {
    // SAFETY: sigset manipulation on a local set; sigprocmask and signalfd with valid pointers.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in HANDLED_SIGNALS {
            libc::sigaddset(&mut set, s);
        }
        if libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err(AgentError::io("sigprocmask", "PID 1")(
                std::io::Error::last_os_error(),
            ));
        }
        let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK);
        if fd < 0 {
            return Err(AgentError::io("signalfd", "PID 1")(
                std::io::Error::last_os_error(),
            ));
        }
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

fn read_signals(fd: &OwnedFd) -> Vec<libc::c_int> {
    let mut out = Vec::new();
    loop {
        // SAFETY: signalfd_siginfo is plain old data; all-zero is valid.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: reading at most `size` bytes into `info`.
        let n = unsafe { libc::read(fd.as_raw_fd(), (&raw mut info).cast(), size) };
        if n != size as isize {
            return out;
        }
        out.push(info.ssi_signo as libc::c_int);
    }
}

/// Collects every exited child without blocking.
fn reap_children() -> Vec<(libc::pid_t, libc::c_int)> {
    let mut out = Vec::new();
    loop {
        let mut status = 0;
        // SAFETY: waitpid with a valid status pointer.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            return out;
        }
        out.push((pid, status));
    }
}

/// Reaps until no child is left (true) or `timeout` passes (false). Every process in the VM is
/// a descendant of PID 1, so "no child left" means "no process left".
fn wait_for_all_children(timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        let mut status = 0;
        // SAFETY: waitpid with a valid status pointer.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid > 0 {
            continue;
        }
        if pid < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ECHILD) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

const EV_KEY: u16 = 1;
const KEY_POWER: u16 = 116;
/// KEY_MAX + 1 bits.
const KEY_BITS_LEN: usize = 0x300 / 8;
/// `struct input_event` on 64-bit: a timeval (16 bytes), type, code (u16 each), value (i32).
const INPUT_EVENT_SIZE: usize = 24;

/// `EVIOCGBIT(EV_KEY, len)`: `_IOC(_IOC_READ, 'E', 0x20 + EV_KEY, len)`.
fn eviocgbit_key(len: usize) -> libc::c_ulong {
    (2 << 30) | ((len as libc::c_ulong) << 16) | ((b'E' as libc::c_ulong) << 8) | (0x20 + 1)
}

/// The evdev devices under `dir` that can report KEY_POWER (the ACPI power button).
pub fn power_buttons(dir: &Path) -> Vec<(PathBuf, OwnedFd)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        if !e.file_name().to_string_lossy().starts_with("event") {
            continue;
        }
        let path = e.path();
        let c = sys::cstr(&path);
        // SAFETY: open(2) with a valid path; the result is checked.
        let fd = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_RDONLY | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            continue;
        }
        // SAFETY: fd is fresh and ours.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut bits = [0u8; KEY_BITS_LEN];
        // SAFETY: EVIOCGBIT writes at most `len` bytes into `bits`, which has that size.
        let rc =
            unsafe { libc::ioctl(fd.as_raw_fd(), eviocgbit_key(bits.len()), bits.as_mut_ptr()) };
        if rc >= 0 && has_key(&bits, KEY_POWER) {
            out.push((path, fd));
        }
    }
    out
}

fn has_key(bits: &[u8], key: u16) -> bool {
    bits.get(usize::from(key / 8))
        .is_some_and(|b| b & (1 << (key % 8)) != 0)
}

/// Whether `buf` (whole `input_event`s) holds a KEY_POWER press.
pub fn power_pressed(buf: &[u8]) -> bool {
    buf.chunks_exact(INPUT_EVENT_SIZE).any(|ev| {
        let ty = u16::from_ne_bytes([ev[16], ev[17]]);
        let code = u16::from_ne_bytes([ev[18], ev[19]]);
        let value = i32::from_ne_bytes([ev[20], ev[21], ev[22], ev[23]]);
        ty == EV_KEY && code == KEY_POWER && value == 1
    })
}

enum ButtonRead {
    Pressed,
    Nothing,
    Gone(std::io::Error),
}

fn read_button(fd: &OwnedFd) -> ButtonRead {
    let mut pressed = false;
    let mut buf = [0u8; INPUT_EVENT_SIZE * 16];
    loop {
        // SAFETY: reading into a buffer of the given length.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            return match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted if pressed => {
                    ButtonRead::Pressed
                }
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted => {
                    ButtonRead::Nothing
                }
                _ => ButtonRead::Gone(e),
            };
        }
        if n == 0 {
            return ButtonRead::Gone(std::io::ErrorKind::UnexpectedEof.into());
        }
        pressed |= power_pressed(&buf[..n as usize]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_map_to_actions() {
        assert_eq!(signal_action(libc::SIGCHLD), SignalAction::Reap);
        for s in [
            libc::SIGTERM,
            libc::SIGINT,
            libc::SIGUSR1,
            libc::SIGUSR2,
            libc::SIGPWR,
        ] {
            assert!(matches!(signal_action(s), SignalAction::Shutdown(_)), "{s}");
        }
        assert_eq!(signal_action(libc::SIGHUP), SignalAction::Ignore);
        // Ctrl-Alt-Del (Firecracker's stop) and reboot reboot; the power button and halt or
        // poweroff requests power off.
        let reboots = |s| match signal_action(s) {
            SignalAction::Shutdown(why) => ends_in_reboot(why),
            _ => panic!("{s}"),
        };
        assert!(reboots(libc::SIGINT) && reboots(libc::SIGTERM));
        assert!(!reboots(libc::SIGUSR1) && !reboots(libc::SIGUSR2) && !reboots(libc::SIGPWR));
        for s in HANDLED_SIGNALS {
            assert!(s > 0);
        }
    }

    #[test]
    fn backoff_doubles_while_failing_and_resets_after_a_healthy_run() {
        let fast = Duration::from_millis(10);
        let mut b = next_backoff(Duration::ZERO, fast);
        assert_eq!(b, BACKOFF_MIN);
        for want in [2, 4, 8, 16, 30, 30] {
            b = next_backoff(b, fast);
            assert_eq!(b, Duration::from_secs(want));
        }
        assert_eq!(next_backoff(b, HEALTHY_AFTER), BACKOFF_MIN);
    }

    #[test]
    fn exit_statuses_are_described() {
        assert_eq!(describe_status(3 << 8), "exit code 3");
        assert_eq!(describe_status(libc::SIGKILL), "signal 9");
    }

    fn event(ty: u16, code: u16, value: i32) -> Vec<u8> {
        let mut v = vec![0u8; 16];
        v.extend(ty.to_ne_bytes());
        v.extend(code.to_ne_bytes());
        v.extend(value.to_ne_bytes());
        v
    }

    #[test]
    fn power_key_press_is_recognised() {
        assert_eq!(std::mem::size_of::<libc::input_event>(), INPUT_EVENT_SIZE);
        let mut buf = event(0, 0, 0); // EV_SYN
        assert!(!power_pressed(&buf));
        buf.extend(event(EV_KEY, KEY_POWER, 0)); // release
        assert!(!power_pressed(&buf));
        buf.extend(event(EV_KEY, 30, 1)); // KEY_A
        assert!(!power_pressed(&buf));
        buf.extend(event(EV_KEY, KEY_POWER, 1));
        assert!(power_pressed(&buf));
        // A partial event is ignored.
        assert!(!power_pressed(&event(EV_KEY, KEY_POWER, 1)[..20]));
    }

    #[test]
    fn evdev_ioctl_and_key_bits() {
        // EVIOCGBIT(EV_KEY, 96) as computed by <linux/input.h>.
        assert_eq!(eviocgbit_key(96), 0x8060_4521);
        let mut bits = [0u8; KEY_BITS_LEN];
        assert!(!has_key(&bits, KEY_POWER));
        bits[14] = 1 << 4; // 116 = 14 * 8 + 4
        assert!(has_key(&bits, KEY_POWER));
        assert!(power_buttons(Path::new("/nonexistent")).is_empty());
    }
}
