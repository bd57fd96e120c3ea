//! Per-request context: progress reporting and cancellation.

use banger_core::OpId;
use tokio_util::sync::CancellationToken;

/// Receives the stages of a long operation, for the client's live display.
pub trait Progress: Send + Sync {
    fn stage(&self, stage: &str, detail: Option<String>);
    fn warn(&self, message: String);
}

/// Discards progress (reconcile, background work).
#[derive(Debug, Default)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn stage(&self, _: &str, _: Option<String>) {}
    fn warn(&self, _: String) {}
}

/// What an operation needs from the request that asked for it.
pub struct OpCtx<'a> {
    pub op_id: OpId,
    pub progress: &'a dyn Progress,
    /// Set when the client went away. Long operations stop at the next step boundary and undo
    /// what they did; short or destructive ones (stop, delete) finish regardless.
    pub cancel: CancellationToken,
}

impl std::fmt::Debug for OpCtx<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpCtx").field("op_id", &self.op_id).finish()
    }
}

impl<'a> OpCtx<'a> {
    pub fn new(op_id: OpId, progress: &'a dyn Progress) -> Self {
        OpCtx {
            op_id,
            progress,
            cancel: CancellationToken::new(),
        }
    }
}
