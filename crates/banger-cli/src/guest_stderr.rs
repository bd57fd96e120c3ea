//! The guest's stderr from banger's own ssh runs (workspace and `vm cp` scripts), relayed to
//! the user's stderr through [`crate::sanitize::terminal_safe`]: whatever the guest prints
//! there, no escape sequence reaches the terminal. (Interactive `vm ssh`/`vm exec` sessions are
//! the user's terminal talking to the guest and are not filtered.)

use std::io::{BufRead, BufReader, Write};
use std::ops::{Deref, DerefMut};
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

/// How long dropping a [`Relayed`] waits for the last guest lines to be relayed.
const DRAIN: Duration = Duration::from_secs(2);

/// A command whose stderr goes through the relay. Derefs to the [`Command`]; dropping it
/// drops the command (its copy of the pipe) and waits briefly for the relay to finish, so
/// keep it alive until the child has exited.
pub struct Relayed {
    cmd: Option<Command>,
    done: Option<mpsc::Receiver<()>>,
}

impl std::fmt::Debug for Relayed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relayed").finish_non_exhaustive()
    }
}

/// Routes `cmd`'s stderr through a sanitising relay thread. If no pipe can be made, stderr
/// is dropped rather than shown raw.
pub fn relay(mut cmd: Command) -> Relayed {
    let Ok((reader, writer)) = std::io::pipe() else {
        cmd.stderr(std::process::Stdio::null());
        return Relayed {
            cmd: Some(cmd),
            done: None,
        };
    };
    cmd.stderr(writer);
    let (tx, rx) = mpsc::channel();
    // Our own descriptor for stderr: the main thread holds `std::io::stderr()`'s lock for the
    // whole run (`Ctx::err`), which this thread must not wait for.
    use std::os::fd::AsFd;
    let mut err: Box<dyn Write + Send> = match std::io::stderr().as_fd().try_clone_to_owned() {
        Ok(fd) => Box::new(std::fs::File::from(fd)),
        Err(_) => Box::new(std::io::sink()),
    };
    std::thread::spawn(move || {
        let mut lines = BufReader::new(reader);
        let mut buf = Vec::new();
        while matches!(lines.read_until(b'\n', &mut buf), Ok(n) if n > 0) {
            let text = crate::sanitize::terminal_safe(&String::from_utf8_lossy(&buf));
            let _ = err.write_all(text.as_bytes());
            if !text.ends_with('\n') {
                let _ = err.write_all(b"\n");
            }
            buf.clear();
        }
        let _ = tx.send(());
    });
    Relayed {
        cmd: Some(cmd),
        done: Some(rx),
    }
}

impl Deref for Relayed {
    type Target = Command;
    fn deref(&self) -> &Command {
        self.cmd.as_ref().expect("present until drop")
    }
}

impl DerefMut for Relayed {
    fn deref_mut(&mut self) -> &mut Command {
        self.cmd.as_mut().expect("present until drop")
    }
}

impl Drop for Relayed {
    fn drop(&mut self) {
        // The command holds a write end of the pipe: the relay ends only once it is gone.
        self.cmd.take();
        if let Some(done) = self.done.take() {
            let _ = done.recv_timeout(DRAIN);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_child_runs_and_the_relay_finishes_after_it() {
        let mut c = Command::new("sh");
        c.args(["-c", "printf '\\033]0;title\\007oops\\n' >&2; exit 3"]);
        let mut r = relay(c);
        let status = r.status().unwrap();
        assert_eq!(status.code(), Some(3));
        let t = std::time::Instant::now();
        drop(r);
        assert!(t.elapsed() < DRAIN, "the relay did not end with the child");
    }
}
