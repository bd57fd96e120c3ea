//! The CLI's one error type: a message for stderr and the process exit code.

use banger_core::{ErrorCode, OpId};

/// A failure to report as `banger: <message>` and exit with `code`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CliError {
    pub code: i32,
    /// `None` when the failure was already reported (e.g. per-VM errors of `vm rm`).
    pub message: Option<String>,
}

impl CliError {
    /// Exit code for local failures: cannot connect, daemon misbehaving, I/O.
    pub const FAILURE: i32 = 1;
    /// Exit code for input the CLI rejects before sending anything.
    pub const BAD_INPUT: i32 = 2;

    pub fn local(message: impl Into<String>) -> Self {
        CliError {
            code: Self::FAILURE,
            message: Some(message.into()),
        }
    }

    pub fn input(message: impl Into<String>) -> Self {
        CliError {
            code: Self::BAD_INPUT,
            message: Some(message.into()),
        }
    }

    /// An `error` frame from the daemon; the op id lets the user find the request in the log.
    pub fn daemon(op_id: &OpId, code: ErrorCode, message: &str) -> Self {
        CliError {
            code: code.exit_code(),
            message: Some(format!("{message} (op {op_id})")),
        }
    }

    /// A failure whose lines were already printed.
    pub fn reported(code: i32) -> Self {
        CliError {
            code,
            message: None,
        }
    }

    /// The line printed on stderr for this error, if any.
    pub fn line(&self) -> Option<String> {
        // Messages quote the daemon and, through it, the guest: never raw escapes.
        self.message
            .as_ref()
            .map(|m| format!("banger: {}", crate::sanitize::terminal_safe(m)))
    }
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.message.as_deref().unwrap_or("(already reported)"))
    }
}

impl std::error::Error for CliError {}
