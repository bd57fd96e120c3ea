//! The daemon's operation error: a stable code plus a one-line message for the user.

use banger_core::ErrorCode;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct OpError {
    pub code: ErrorCode,
    pub message: String,
}

impl OpError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        OpError {
            code,
            message: message.into(),
        }
    }

    pub fn not_found(what: &str, name: &str) -> Self {
        Self::new(ErrorCode::NotFound, format!("no {what} named {name:?}"))
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }

    pub fn failed(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::OperationFailed, message)
    }

    pub fn busy(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Busy, message)
    }
}

impl From<banger_store::StoreError> for OpError {
    fn from(e: banger_store::StoreError) -> Self {
        let code = match &e {
            banger_store::StoreError::AlreadyExists { .. } => ErrorCode::AlreadyExists,
            banger_store::StoreError::NotFound { .. } => ErrorCode::NotFound,
            _ => ErrorCode::OperationFailed,
        };
        OpError::new(code, e.to_string())
    }
}

pub type OpResult<T> = Result<T, OpError>;
