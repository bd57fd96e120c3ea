//! Console logging: one line per step, with its duration and the time since the kernel started.

use std::io::Write;
use std::time::Instant;

use crate::error::AgentError;

/// Prints `banger-agent: <text>` on the console.
pub fn line(text: &str) {
    // Ignore write errors: there is nowhere else to report them.
    let _ = writeln!(std::io::stderr().lock(), "banger-agent: {text}");
}

/// Points stdin/stdout/stderr at `/dev/console` from the freshly mounted devtmpfs. The kernel
/// already opened the initramfs' own node for us; this keeps working after that node is freed
/// with the initramfs.
pub fn reopen_console() {
    let path = c"/dev/console";
    // SAFETY: `path` is a valid NUL-terminated string; the fd is checked before use.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_NOCTTY) };
    if fd < 0 {
        return;
    }
    for target in 0..=2 {
        // SAFETY: dup2 onto the standard fds; both fds are valid.
        unsafe { libc::dup2(fd, target) };
    }
    if fd > 2 {
        // SAFETY: fd is ours and no longer needed after the dups.
        unsafe { libc::close(fd) };
    }
}

/// Seconds since boot (CLOCK_BOOTTIME), so agent lines line up with kernel timestamps.
pub fn uptime() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// Runs the boot steps and remembers which one is running, for the FATAL line.
#[derive(Debug)]
pub struct Console {
    start: Instant,
    current: &'static str,
}

impl Default for Console {
    fn default() -> Self {
        Self::new()
    }
}

impl Console {
    pub fn new() -> Self {
        line(&format!("starting (t={:.3}s)", uptime()));
        Console {
            start: Instant::now(),
            current: "start",
        }
    }

    /// Runs a step whose result is a one-line detail for the log.
    pub fn step(
        &mut self,
        name: &'static str,
        f: impl FnOnce() -> Result<String, AgentError>,
    ) -> Result<(), AgentError> {
        self.step_with(name, || f().map(|d| ((), d)))
    }

    /// Runs a step that also yields a value.
    pub fn step_with<T>(
        &mut self,
        name: &'static str,
        f: impl FnOnce() -> Result<(T, String), AgentError>,
    ) -> Result<T, AgentError> {
        self.current = name;
        let t0 = Instant::now();
        let (value, detail) = f()?;
        let sep = if detail.is_empty() { "" } else { ": " };
        line(&format!(
            "{name}{sep}{detail} ({} ms, t={:.3}s)",
            t0.elapsed().as_millis(),
            uptime()
        ));
        Ok(value)
    }

    /// The last line before exec.
    pub fn total(&mut self, what: &str) {
        self.current = "exec";
        line(&format!(
            "{what} (agent total {} ms, t={:.3}s)",
            self.start.elapsed().as_millis(),
            uptime()
        ));
    }

    pub fn fatal(&self, err: &AgentError) {
        line(&format_fatal(self.current, err));
    }
}

/// `FATAL: <step>: <error>`, with the error's source chain.
pub fn format_fatal(step: &str, err: &AgentError) -> String {
    let mut msg = format!("FATAL: {step}: {err}");
    let mut src = std::error::Error::source(err);
    while let Some(s) = src {
        let text = s.to_string();
        if !msg.contains(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        src = s.source();
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fatal_line_names_step_and_cause() {
        let e = AgentError::MissingDisk {
            role: "root upper disk",
            uuid: "66666666-7777-8888-9999-aaaaaaaaaaaa".into(),
            waited_s: 10,
            seen: "vda (config), vdb (ext4 1111...)".into(),
        };
        let s = format_fatal("find disks", &e);
        assert!(
            s.starts_with("FATAL: find disks: root upper disk with ext4 UUID 66666666"),
            "{s}"
        );
        let e = AgentError::io("reading", "/dev/vdb")(std::io::Error::from_raw_os_error(libc::EIO));
        let s = format_fatal("mount root", &e);
        assert!(
            s.contains("reading /dev/vdb") && s.contains("Input/output error"),
            "{s}"
        );
        assert_eq!(s.matches("Input/output error").count(), 1, "{s}");
    }

    #[test]
    fn step_reports_errors_and_values() {
        let mut c = Console::new();
        let v = c.step_with("ok step", || Ok((42, "fine".into()))).unwrap();
        assert_eq!(v, 42);
        let e = c
            .step("failing step", || {
                Err(AgentError::NoInit("/sbin/init".into()))
            })
            .unwrap_err();
        assert_eq!(c.current, "failing step");
        assert!(e.to_string().contains("/sbin/init"));
        assert!(uptime() > 0.0);
    }
}
