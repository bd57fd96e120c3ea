//! External programs, behind a trait.
//!
//! Every program banger runs (mkfs.ext4, ip, nft, ssh-keygen...) goes through [`CommandRunner`]
//! as an argv vector, never a shell line, so tests can record calls and inject failures.

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::Mutex;

pub mod elf;
pub mod group;
pub mod mounts;
pub mod rmtree;

/// Looks a program up in PATH, then in the sbin directories a non-login PATH often lacks.
pub fn find_in_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(program))
        .find(|c| is_executable(c))
}

fn is_executable(p: &std::path::Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// A command as argv: program plus arguments. Never interpreted by a shell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cmd {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    /// Bytes fed to the program's stdin (closed when `None`).
    pub stdin: Option<Vec<u8>>,
    /// Extra environment on top of the caller's own.
    pub env: Vec<(OsString, OsString)>,
}

impl Cmd {
    pub fn new(program: impl Into<PathBuf>) -> Self {
        Cmd {
            program: program.into(),
            args: Vec::new(),
            stdin: None,
            env: Vec::new(),
        }
    }

    pub fn arg(mut self, a: impl Into<OsString>) -> Self {
        self.args.push(a.into());
        self
    }

    pub fn args<I, A>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = A>,
        A: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    pub fn stdin(mut self, data: impl Into<Vec<u8>>) -> Self {
        self.stdin = Some(data.into());
        self
    }

    pub fn display(&self) -> String {
        let mut s = self.program.display().to_string();
        for a in &self.args {
            s.push(' ');
            s.push_str(&a.to_string_lossy());
        }
        s
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("running {cmd}: {source}")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{cmd} exited with {status}: {stderr}")]
    Failed {
        cmd: String,
        status: String,
        stderr: String,
    },
}

/// Runs commands to completion.
#[async_trait::async_trait]
pub trait CommandRunner: Send + Sync + std::fmt::Debug {
    /// Runs `cmd`; returns its stdout, or an error carrying its stderr when it fails.
    async fn run(&self, cmd: &Cmd) -> Result<Vec<u8>, RunError>;
}

/// The real runner: `tokio::process`, stdin closed, output captured. Each program leads its own
/// process group, killed whole when the run is dropped unfinished (a cancelled request), so
/// nothing it started outlives it.
#[derive(Debug, Default)]
pub struct RealRunner;

#[async_trait::async_trait]
impl CommandRunner for RealRunner {
    async fn run(&self, cmd: &Cmd) -> Result<Vec<u8>, RunError> {
        // Programs such as mkfs.ext4 live in /usr/sbin, which an unprivileged PATH often lacks.
        let program = match cmd.program.to_str() {
            Some(p) if !p.contains('/') => find_in_path(p).unwrap_or_else(|| cmd.program.clone()),
            _ => cmd.program.clone(),
        };
        let spawn_err = |source| RunError::Spawn {
            cmd: cmd.display(),
            source,
        };
        let mut command = tokio::process::Command::new(&program);
        group::in_new_group(&mut command);
        let mut child = command
            .args(&cmd.args)
            .envs(cmd.env.iter().map(|(k, v)| (k, v)))
            .stdin(if cmd.stdin.is_some() {
                std::process::Stdio::piped()
            } else {
                std::process::Stdio::null()
            })
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(spawn_err)?;
        let mut guard = group::GroupGuard::new(&child);
        if let (Some(data), Some(mut stdin)) = (cmd.stdin.clone(), child.stdin.take()) {
            use tokio::io::AsyncWriteExt;
            stdin.write_all(&data).await.map_err(spawn_err)?;
        }
        let out = child.wait_with_output().await.map_err(spawn_err)?;
        guard.disarm();
        if out.status.success() {
            Ok(out.stdout)
        } else {
            Err(RunError::Failed {
                cmd: cmd.display(),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            })
        }
    }
}

/// A runner for tests: records every command and fails the ones whose program name matches.
#[derive(Debug, Default)]
pub struct RecordingRunner {
    pub calls: Mutex<Vec<Cmd>>,
    pub fail_program: Mutex<Option<String>>,
    /// Delegate to the real runner after recording (for commands that must really happen).
    pub passthrough: bool,
}

#[async_trait::async_trait]
impl CommandRunner for RecordingRunner {
    async fn run(&self, cmd: &Cmd) -> Result<Vec<u8>, RunError> {
        self.calls.lock().expect("poisoned").push(cmd.clone());
        let fail = self.fail_program.lock().expect("poisoned").clone();
        if let Some(p) = fail
            && cmd
                .program
                .file_name()
                .is_some_and(|n| n.to_string_lossy() == p)
        {
            return Err(RunError::Failed {
                cmd: cmd.display(),
                status: "exit status: 1".into(),
                stderr: "injected failure".into(),
            });
        }
        if self.passthrough {
            RealRunner.run(cmd).await
        } else {
            Ok(Vec::new())
        }
    }
}
