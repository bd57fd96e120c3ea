//! Stable error codes shared by the daemon protocol and the CLI's exit codes.

use serde::{Deserialize, Serialize};

/// A stable, machine-readable error class. The wire form is snake_case and never changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    NotFound,
    AlreadyExists,
    BadRequest,
    BadVersion,
    NotRunning,
    Busy,
    UnknownMethod,
    OperationFailed,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 8] = [
        ErrorCode::NotFound,
        ErrorCode::AlreadyExists,
        ErrorCode::BadRequest,
        ErrorCode::BadVersion,
        ErrorCode::NotRunning,
        ErrorCode::Busy,
        ErrorCode::UnknownMethod,
        ErrorCode::OperationFailed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::NotFound => "not_found",
            ErrorCode::AlreadyExists => "already_exists",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::BadVersion => "bad_version",
            ErrorCode::NotRunning => "not_running",
            ErrorCode::Busy => "busy",
            ErrorCode::UnknownMethod => "unknown_method",
            ErrorCode::OperationFailed => "operation_failed",
        }
    }

    /// The CLI's process exit code for this error. 1 is the generic failure; the others let
    /// scripts tell "no such VM" from "try again later" without parsing text.
    pub fn exit_code(self) -> i32 {
        match self {
            ErrorCode::OperationFailed => 1,
            ErrorCode::BadRequest | ErrorCode::UnknownMethod | ErrorCode::BadVersion => 2,
            ErrorCode::NotFound => 3,
            ErrorCode::AlreadyExists => 4,
            ErrorCode::NotRunning => 5,
            ErrorCode::Busy => 6,
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_form_matches_as_str() {
        for code in ErrorCode::ALL {
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
            let back: ErrorCode = serde_json::from_str(&json).unwrap();
            assert_eq!(back, code);
        }
    }

    #[test]
    fn exit_codes_are_nonzero() {
        for code in ErrorCode::ALL {
            assert_ne!(code.exit_code(), 0, "{code}");
        }
    }
}
