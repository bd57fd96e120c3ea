//! Runs the built `fake-firecracker` binary and talks raw HTTP/1.1 to it over its socket.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_fake-firecracker");

/// A running fake in its own temporary directory. Killed on drop if still running.
pub struct Fake {
    pub child: Child,
    pub sock: PathBuf,
    pub stderr_path: PathBuf,
}

/// An HTTP answer.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: Option<Value>,
}

impl Answer {
    pub fn fault(&self) -> &str {
        self.body
            .as_ref()
            .and_then(|b| b["fault_message"].as_str())
            .unwrap_or_else(|| panic!("no fault_message in {self:?}"))
    }
}

impl Fake {
    /// Starts a fake with `--id id` on `dir/<id>.sock`, with extra environment variables, and
    /// waits for its socket.
    pub fn start(dir: &Path, id: &str, env: &[(&str, &Path)]) -> Fake {
        let fake = Fake::spawn(dir, id, env);
        fake.wait_for_socket(Duration::from_secs(10));
        fake
    }

    /// Starts a fake without waiting for the socket.
    pub fn spawn(dir: &Path, id: &str, env: &[(&str, &Path)]) -> Fake {
        let sock = dir.join(format!("{id}.sock"));
        let stderr_path = dir.join(format!("{id}.stderr"));
        let stderr = std::fs::File::create(&stderr_path).unwrap();
        let mut cmd = Command::new(BIN);
        cmd.args(["--api-sock"])
            .arg(&sock)
            .args(["--id", id, "--level", "Debug", "--show-level"])
            .env_remove("FAKE_FIRECRACKER_CONTROL")
            .env_remove("FAKE_FIRECRACKER_RECORD")
            .env_remove("FAKE_FIRECRACKER_VERSION")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(stderr));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawning fake-firecracker");
        Fake {
            child,
            sock,
            stderr_path,
        }
    }

    pub fn wait_for_socket(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if UnixStream::connect(&self.sock).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!(
            "socket {} did not appear; stderr: {}",
            self.sock.display(),
            self.stderr()
        );
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    pub fn call(&self, method: &str, path: &str, body: Option<Value>) -> Answer {
        request(
            &self.sock,
            method,
            path,
            body.map(|b| b.to_string()).as_deref(),
        )
    }

    /// Waits for the process to end, up to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    pub fn signal(&self, sig: i32) {
        let pid = self.child.id() as i32;
        // SAFETY: kill(2) with a pid we spawned and still own (not yet reaped); no memory is
        // shared with the callee.
        let rc = unsafe { libc::kill(pid, sig) };
        assert_eq!(rc, 0, "kill({pid}, {sig})");
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One HTTP/1.1 request on a fresh connection (`Connection: close`), raw body text.
pub fn request(sock: &Path, method: &str, path: &str, body: Option<&str>) -> Answer {
    let mut stream = UnixStream::connect(sock)
        .unwrap_or_else(|e| panic!("connecting to {}: {e}", sock.display()));
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let body = body.unwrap_or("");
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    if !body.is_empty() {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(body);
    stream.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, payload) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("malformed response {text:?}"));
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    let body = if payload.trim().is_empty() {
        None
    } else {
        Some(
            serde_json::from_str(payload)
                .unwrap_or_else(|e| panic!("response body {payload:?} is not JSON: {e}")),
        )
    };
    Answer { status, body }
}

/// Runs the binary with `args` to completion.
pub fn run_bin(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args).env_remove("FAKE_FIRECRACKER_VERSION");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("running fake-firecracker")
}

/// Sends `requests` (method, path, body) one after the other on a single kept-alive
/// connection, reading each answer before sending the next, as a pooling client does.
pub fn keep_alive(sock: &Path, requests: &[(&str, &str, Option<Value>)]) -> Vec<Answer> {
    let mut stream = UnixStream::connect(sock).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut answers = Vec::new();
    let mut pending: Vec<u8> = Vec::new();
    for (method, path, body) in requests {
        let body = body.as_ref().map(Value::to_string).unwrap_or_default();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(req.as_bytes()).unwrap();
        loop {
            if let Some((answer, used)) = parse_one(&pending) {
                pending.drain(..used);
                answers.push(answer);
                break;
            }
            let mut buf = [0u8; 4096];
            let n = stream.read(&mut buf).unwrap();
            assert!(
                n > 0,
                "connection closed before the answer to {method} {path}"
            );
            pending.extend_from_slice(&buf[..n]);
        }
    }
    answers
}

/// Parses one complete response framed by Content-Length (or without a body).
fn parse_one(buf: &[u8]) -> Option<(Answer, usize)> {
    let text = std::str::from_utf8(buf).ok()?;
    let head_end = text.find("\r\n\r\n")?;
    let head = &text[..head_end];
    let status: u16 = head.split_whitespace().nth(1)?.parse().ok()?;
    let len = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    let body_start = head_end + 4;
    if buf.len() < body_start + len {
        return None;
    }
    let payload = &text[body_start..body_start + len];
    let body = (!payload.is_empty()).then(|| serde_json::from_str(payload).unwrap());
    Some((Answer { status, body }, body_start + len))
}
