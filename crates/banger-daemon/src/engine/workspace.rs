//! `vm.workspace.set`: the daemon's record of a workspace copied into a VM.
//!
//! The copy itself is the CLI's (it runs ssh with the user's repository at hand); the daemon
//! keeps only where the workspace is and what it was prepared from, so `vm exec` can start in
//! it and `workspace export` knows its default base. The per-file sync manifest stays with the
//! CLI.

use banger_core::VmRecord;
use banger_core::records::WorkspaceInfo;

use super::Engine;
use crate::error::{OpError, OpResult};

impl Engine {
    /// Records `workspace` for the VM (replacing any earlier one), or forgets it with `None`.
    pub async fn workspace_set(
        &self,
        name: &str,
        workspace: Option<WorkspaceInfo>,
    ) -> OpResult<VmRecord> {
        if let Some(ws) = &workspace {
            ws.validate().map_err(OpError::bad_request)?;
        }
        let (_guard, mut vm) = self.lock_vm(name).await?;
        vm.workspace = workspace;
        self.save(&mut vm)?;
        Ok(vm)
    }
}
