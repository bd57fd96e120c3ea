//! External programs in their own process group, so stopping one stops everything it started.
//!
//! `kill_on_drop` reaches only the direct child: an mmdebstrap cancelled that way leaves apt,
//! dpkg and its mounts behind. A program started with [`in_new_group`] leads a group of its
//! own (pgid = its pid); a [`GroupGuard`] SIGKILLs that whole group when dropped (a cancelled
//! request, a dropped future), and [`GroupGuard::terminate`] asks politely first (SIGTERM lets
//! mmdebstrap unmount and clean up), then SIGKILLs what is left.
//!
//! The group id stays ours while its leader is unreaped (alive or a zombie), so signalling it
//! before the leader is waited for can never reach a stranger.

use std::time::Duration;

/// Makes the command the leader of a new process group.
pub fn in_new_group(cmd: &mut tokio::process::Command) -> &mut tokio::process::Command {
    cmd.process_group(0)
}

/// Kills the process group of a child started with [`in_new_group`] unless disarmed.
#[derive(Debug)]
pub struct GroupGuard {
    pgid: Option<i32>,
}

impl GroupGuard {
    /// Guards `child`'s group. A child without a pid (already reaped) guards nothing.
    pub fn new(child: &tokio::process::Child) -> Self {
        GroupGuard {
            pgid: child.id().and_then(|p| i32::try_from(p).ok()),
        }
    }

    /// Sends `sig` to every process of the group; false when none is left.
    pub fn signal(&self, sig: libc::c_int) -> bool {
        match self.pgid {
            // SAFETY: killpg has no memory preconditions.
            Some(g) => (unsafe { libc::killpg(g, sig) }) == 0,
            None => false,
        }
    }

    /// The child finished normally and was reaped: nothing to kill any more (and its pid may
    /// be reused from now on).
    pub fn disarm(&mut self) {
        self.pgid = None;
    }

    /// SIGTERM to the group, up to `grace` for the leader to exit, then SIGKILL to whatever is
    /// left of the group, and the leader reaped.
    pub async fn terminate(mut self, child: &mut tokio::process::Child, grace: Duration) {
        self.signal(libc::SIGTERM);
        // try_wait/wait reap the leader; until then the group id cannot be reused.
        let exited = tokio::time::timeout(grace, async {
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => return,
                    Ok(None) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        })
        .await
        .is_ok();
        // Members that outlived the leader keep the group id alive, so it is still ours.
        self.signal(libc::SIGKILL);
        if !exited {
            let _ = child.wait().await;
        }
        self.disarm();
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        self.signal(libc::SIGKILL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alive(pid: i32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|r| !r.trim_start().starts_with('Z'))
        })
    }

    async fn grandchild_of(script: &str) -> (tokio::process::Child, GroupGuard, i32) {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let mut cmd = tokio::process::Command::new("sh");
        cmd.arg("-c")
            .arg(format!("{script} & echo $! > {}; wait", pidfile.display()))
            .kill_on_drop(true);
        in_new_group(&mut cmd);
        let child = cmd.spawn().unwrap();
        let guard = GroupGuard::new(&child);
        let pid = loop {
            if let Ok(s) = std::fs::read_to_string(&pidfile)
                && let Ok(p) = s.trim().parse::<i32>()
            {
                break p;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        (child, guard, pid)
    }

    async fn gone(pid: i32) -> bool {
        for _ in 0..100 {
            if !alive(pid) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    #[tokio::test]
    async fn dropping_the_guard_kills_the_grandchildren() {
        let (child, guard, pid) = grandchild_of("sleep 1000").await;
        assert!(alive(pid));
        drop(guard);
        drop(child);
        assert!(gone(pid).await, "the grandchild {pid} outlived the guard");
    }

    #[tokio::test]
    async fn terminate_kills_what_ignores_sigterm() {
        let (mut child, guard, pid) = grandchild_of("trap '' TERM; sleep 1000").await;
        guard
            .terminate(&mut child, Duration::from_millis(300))
            .await;
        assert!(gone(pid).await, "the grandchild {pid} outlived terminate");
    }
}
