//! The ssh service: the agent's built-in server in a forked process, or the image's sshd.
//!
//! The built-in server never runs in PID 1 itself: PID 1 reaps every process in the VM with
//! `waitpid(-1)`, which would steal the exit statuses of the sessions' children, and a fork
//! keeps tokio (and its threads, signal handlers and memory) out of PID 1. The listener is bound
//! before the fork, so a port conflict fails the boot step with a clear error, and PID 1 keeps it
//! across restarts of the server (connections wait in the backlog meanwhile).

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use banger_guest::{GuestConfig, SshIdentity};

use crate::console;
use crate::error::AgentError;
use crate::sshd::Settings;

/// Where images keep sshd, in the order tried.
pub const SSHD_PATHS: [&str; 4] = [
    "/usr/sbin/sshd",
    "/usr/local/sbin/sshd",
    "/sbin/sshd",
    "/usr/bin/sshd",
];

/// The built-in server, ready to fork.
#[derive(Debug)]
pub struct AgentSshd {
    listener: TcpListener,
    settings: Settings,
}

impl AgentSshd {
    /// Parses the keys and binds `0.0.0.0:22`.
    pub fn prepare(config: &GuestConfig) -> Result<Self, AgentError> {
        let ssh = config.ssh.as_ref().ok_or(AgentError::NoSshIdentity)?;
        let settings = Settings::new(
            ssh,
            config.command_env(),
            config.workdir.as_ref().map(PathBuf::from),
        )?;
        let listener =
            TcpListener::bind(("0.0.0.0", 22)).map_err(AgentError::io("binding", "0.0.0.0:22"))?;
        Ok(AgentSshd { listener, settings })
    }

    /// Forks the server. The child detaches (its own session, stdin on /dev/null, default
    /// signal handling) and never returns; the parent gets its pid. Used both before exec'ing
    /// the image's init (the server then lives on as an ordinary child of that init) and by the
    /// agent as PID 1, which restarts it when it exits.
    pub fn fork(&self) -> Result<libc::pid_t, AgentError> {
        // SAFETY: PID 1 is single-threaded here, so the child starts in a consistent state; it
        // only runs the server and then _exits, never returning into the caller's code.
        match unsafe { libc::fork() } {
            -1 => Err(AgentError::io("fork", "ssh server")(
                std::io::Error::last_os_error(),
            )),
            0 => {
                detach_child();
                let code = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    let listener =
                        self.listener
                            .try_clone()
                            .map_err(|source| crate::sshd::SshdError::Io {
                                what: "duplicating the listener",
                                source,
                            })?;
                    self.settings.clone().serve(listener)
                })) {
                    Ok(Ok(never)) => match never {},
                    Ok(Err(e)) => {
                        console::line(&format!("sshd: {e}"));
                        1
                    }
                    Err(_panic) => 101,
                };
                // SAFETY: _exit ends the forked child without running the parent's atexit
                // handlers or unwinding into PID 1's code.
                unsafe { libc::_exit(code) }
            }
            pid => Ok(pid),
        }
    }
}

/// Puts a freshly forked child of PID 1 into a normal process's state.
fn detach_child() {
    // PID 1's hook powers the VM off; a panic here must only end this process.
    std::panic::set_hook(Box::new(|info| {
        console::line(&format!("sshd: panic: {info}"));
    }));
    // SAFETY: signal-mask and disposition changes of this (single-threaded) process; setsid
    // and dup2 on descriptors we own.
    unsafe {
        // PID 1 blocks the signals it reads through a signalfd; they must work normally here
        // (tokio reaps session children on SIGCHLD).
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
        for sig in crate::pid1::HANDLED_SIGNALS {
            libc::signal(sig, libc::SIG_DFL);
        }
        // Out of PID 1's session: no controlling terminal, so the image's init can take the
        // console, and a hangup there never reaches the server.
        libc::setsid();
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
        if null >= 0 {
            libc::dup2(null, 0);
            libc::close(null);
        }
    }
}

/// The image's sshd, run by the agent as PID 1 (`sshd -D -e`: foreground, log to stderr, i.e.
/// the console).
#[derive(Debug)]
pub struct ImageSshd {
    pub path: PathBuf,
    env: Vec<(String, String)>,
    ssh: Option<SshIdentity>,
}

impl ImageSshd {
    /// The image's sshd under `root`, if it has one.
    pub fn find(root: &Path, config: &GuestConfig) -> Option<Self> {
        let path = SSHD_PATHS.iter().map(PathBuf::from).find(|p| {
            std::fs::metadata(root.join(p.strip_prefix("/").unwrap_or(p)))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })?;
        Some(ImageSshd {
            path,
            env: config.command_env(),
            ssh: config.ssh.clone(),
        })
    }

    /// Starts sshd; the caller (PID 1) reaps it.
    pub fn spawn(&self) -> Result<libc::pid_t, AgentError> {
        // sshd's privilege separation directory (Debian's; /run is the agent's fresh tmpfs).
        let privsep = Path::new("/run/sshd");
        crate::sys::mkdir_p(privsep)?;
        std::fs::set_permissions(privsep, std::fs::Permissions::from_mode(0o755))
            .map_err(AgentError::io("chmod", privsep))?;
        // Written at boot; put back if something removed it since (sshd refuses to start
        // without a host key).
        if let Some(ssh) = &self.ssh
            && !Path::new("/etc/ssh/ssh_host_ed25519_key").exists()
        {
            crate::identity::write_ssh(Path::new("/"), ssh)?;
        }
        // std resets the signal mask and SIGPIPE in the child, so sshd starts with default
        // signal handling despite PID 1's blocked signals.
        let child = Command::new(&self.path)
            .args(["-D", "-e"])
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .current_dir("/")
            .stdin(Stdio::null())
            .spawn()
            .map_err(AgentError::io("starting", &self.path))?;
        // Dropping the handle neither waits nor kills; PID 1's waitpid(-1) loop reaps it.
        libc::pid_t::try_from(child.id()).map_err(|_| {
            AgentError::io("starting", &self.path)(std::io::ErrorKind::InvalidData.into())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_image_sshd() {
        let d = tempfile::tempdir().unwrap();
        let cfg = crate::disks::tests::config();
        assert!(ImageSshd::find(d.path(), &cfg).is_none());
        let sbin = d.path().join("usr/local/sbin");
        std::fs::create_dir_all(&sbin).unwrap();
        std::fs::write(sbin.join("sshd"), "#!/bin/sh\n").unwrap();
        // Not executable: not an sshd.
        assert!(ImageSshd::find(d.path(), &cfg).is_none());
        std::fs::set_permissions(sbin.join("sshd"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        let s = ImageSshd::find(d.path(), &cfg).unwrap();
        assert_eq!(s.path, Path::new("/usr/local/sbin/sshd"));
        assert!(s.env.iter().any(|(k, _)| k == "PATH"));
    }
}
