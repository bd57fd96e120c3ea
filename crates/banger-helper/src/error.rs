//! The helper's errors. Three of them cross the wire as stable codes; the rest only happen on
//! the client's side of the socket.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The stable error codes of the helper protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request could not be understood: malformed JSON, wrong version, unknown op or
    /// field, a value of the wrong type or out of range.
    BadRequest,
    /// The request was understood and refused by policy: a caller that is not root or the
    /// owner, a foreign interface, a path outside banger's state or through a symlink...
    Forbidden,
    /// The operation was allowed but did not succeed (a command failed, the host lacks
    /// device-mapper...).
    Failed,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::Failed => "failed",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a helper operation did not happen. The message of a refusal names the field and the
/// value that caused it (values are shown with `{:?}`, so nothing a caller sends can forge a
/// log line).
#[derive(Debug, thiserror::Error)]
pub enum HelperError {
    #[error("bad_request: {0}")]
    BadRequest(String),
    #[error("forbidden: {0}")]
    Forbidden(String),
    #[error("failed: {0}")]
    Failed(String),
    /// The client could not reach the helper or lost the connection.
    #[error("talking to banger-helper at {}: {source}", socket.display())]
    Io {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The helper's reply did not follow the protocol.
    #[error("banger-helper at {}: malformed reply: {reason}", socket.display())]
    Protocol { socket: PathBuf, reason: String },
}

impl HelperError {
    pub fn bad_request(msg: impl Into<String>) -> Self {
        HelperError::BadRequest(msg.into())
    }

    pub fn forbidden(msg: impl Into<String>) -> Self {
        HelperError::Forbidden(msg.into())
    }

    pub fn failed(msg: impl Into<String>) -> Self {
        HelperError::Failed(msg.into())
    }

    /// The wire code; client-side errors have none of their own and count as `failed`.
    pub fn code(&self) -> ErrorCode {
        match self {
            HelperError::BadRequest(_) => ErrorCode::BadRequest,
            HelperError::Forbidden(_) => ErrorCode::Forbidden,
            HelperError::Failed(_) | HelperError::Io { .. } | HelperError::Protocol { .. } => {
                ErrorCode::Failed
            }
        }
    }

    /// The message without the code prefix, as sent on the wire.
    pub fn message(&self) -> String {
        match self {
            HelperError::BadRequest(m) | HelperError::Forbidden(m) | HelperError::Failed(m) => {
                m.clone()
            }
            other => other.to_string(),
        }
    }

    /// Rebuilds an error received from the helper.
    pub fn from_wire(code: ErrorCode, message: String) -> Self {
        match code {
            ErrorCode::BadRequest => HelperError::BadRequest(message),
            ErrorCode::Forbidden => HelperError::Forbidden(message),
            ErrorCode::Failed => HelperError::Failed(message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip() {
        for e in [
            HelperError::bad_request("x"),
            HelperError::forbidden("y"),
            HelperError::failed("z"),
        ] {
            let back = HelperError::from_wire(e.code(), e.message());
            assert_eq!(back.to_string(), e.to_string());
            assert!(e.to_string().starts_with(e.code().as_str()));
        }
        assert_eq!(
            serde_json::to_string(&ErrorCode::BadRequest).unwrap(),
            "\"bad_request\""
        );
    }
}
