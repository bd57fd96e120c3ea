//! The VM lifecycle engine.
//!
//! All orchestration lives here: create, start (a pipeline of named steps, each with an undo),
//! stop, kill, restart, delete, prune, set, and the reconciliation a restarted daemon runs.
//! Locking: one async mutex per VM, held for a whole lifecycle operation; a global create lock
//! held only while a name and an address are allocated, so creates run in parallel otherwise.

mod artifacts;
mod create;
mod guest;
mod import;
mod lost_handles;
mod nested;
mod ops;
mod provision;
mod pull;
mod reconcile;
mod start;
mod workspace;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use banger_config::Config;
use banger_core::{VmId, VmRecord};
use banger_net::NetOps;
use banger_store::Store;
use banger_sys::CommandRunner;
use banger_vmm::{Vmm, VmmKind};

use crate::error::{OpError, OpResult};
use crate::handles::Handles;
use crate::layout::Layout;
use crate::ssh::SshDir;

pub use pull::{BUNDLE_FORMAT, BundleManifest};
pub use reconcile::ReconcileReport;
pub use start::START_STEPS;

/// Chooses the VMM backend. Behind a trait so tests can hand the engine a fake Firecracker (or a
/// broken provider) without touching config or PATH.
#[async_trait::async_trait]
pub trait VmmProvider: Send + Sync + std::fmt::Debug {
    /// The backend new starts use (`nested`: one that can give the guest hardware
    /// virtualisation); the error says what is missing and how to fix it.
    async fn select(&self, nested: bool) -> Result<Arc<dyn Vmm>, String>;
    /// The backend that owns an existing handle (for stop, kill and re-adoption).
    fn for_kind(&self, kind: VmmKind) -> Option<Arc<dyn Vmm>>;
}

/// Whether a start step should fail; tests inject failures here. Production uses [`NoFaults`].
pub trait StepHook: Send + Sync + std::fmt::Debug {
    /// Called before (`after == false`) and after (`after == true`) each start step's work.
    fn check(&self, vm: &VmRecord, step: &'static str, after: bool) -> Result<(), String>;
}

#[derive(Debug, Default)]
pub struct NoFaults;

impl StepHook for NoFaults {
    fn check(&self, _: &VmRecord, _: &'static str, _: bool) -> Result<(), String> {
        Ok(())
    }
}

/// A running VM's in-memory state: mirrors its handles file.
#[derive(Debug, Clone)]
struct Live {
    handles: Handles,
    /// Distinguishes this run from a later one, so a stale exit watcher does nothing.
    generation: u64,
}

/// The engine's collaborators, each behind a trait so tests can substitute them.
#[derive(Debug, Clone)]
pub struct Deps {
    pub vmms: Arc<dyn VmmProvider>,
    pub runner: Arc<dyn CommandRunner>,
    pub hook: Arc<dyn StepHook>,
    pub net: Arc<dyn NetOps>,
}

/// The lifecycle engine. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: Store,
    config: Arc<Config>,
    layout: Layout,
    vmms: Arc<dyn VmmProvider>,
    runner: Arc<dyn CommandRunner>,
    hook: Arc<dyn StepHook>,
    net: Arc<dyn NetOps>,
    ssh: SshDir,
    vm_locks: Mutex<HashMap<VmId, Arc<tokio::sync::Mutex<()>>>>,
    create_lock: tokio::sync::Mutex<()>,
    artifact_lock: tokio::sync::Mutex<()>,
    live: Mutex<HashMap<VmId, Live>>,
    generation: std::sync::atomic::AtomicU64,
    /// Bumped whenever a VM record is saved or deleted; the DNS/ssh_config task follows it.
    vm_changes: tokio::sync::watch::Sender<u64>,
    /// (agent path, size, mtime) → sha256, see `ensure_initramfs`.
    agent_digest: Mutex<Option<(AgentKey, String)>>,
    pulls: pull::PullState,
    /// The starts in progress, so `vm stop`/`kill`/`rm -f` can cancel one instead of waiting.
    starts: start::StartAborts,
}

type AgentKey = (std::path::PathBuf, u64, Option<std::time::SystemTime>);

impl Engine {
    pub fn new(store: Store, config: Arc<Config>, layout: Layout, deps: Deps) -> Self {
        let ssh = SshDir::new(layout.ssh_dir());
        Engine {
            inner: Arc::new(Inner {
                store,
                config,
                layout,
                vmms: deps.vmms,
                runner: deps.runner,
                hook: deps.hook,
                net: deps.net,
                ssh,
                vm_locks: Mutex::new(HashMap::new()),
                create_lock: tokio::sync::Mutex::new(()),
                artifact_lock: tokio::sync::Mutex::new(()),
                live: Mutex::new(HashMap::new()),
                generation: std::sync::atomic::AtomicU64::new(1),
                agent_digest: Mutex::new(None),
                pulls: pull::PullState::default(),
                starts: start::StartAborts::default(),
                vm_changes: tokio::sync::watch::Sender::new(0),
            }),
        }
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    pub fn layout(&self) -> &Layout {
        &self.inner.layout
    }

    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The pid of a running VM's VMM, if the daemon holds it.
    pub fn vmm_pid(&self, id: &VmId) -> Option<i32> {
        self.live()
            .get(id)
            .and_then(|l| l.handles.vmm.as_ref().map(|h| h.pid))
    }

    /// The host network operations this engine uses (direct, or the root helper's).
    pub fn net(&self) -> &Arc<dyn NetOps> {
        &self.inner.net
    }

    pub fn ssh(&self) -> &SshDir {
        &self.inner.ssh
    }

    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<VmId, Live>> {
        self.inner.live.lock().expect("live map poisoned")
    }

    fn vm_lock(&self, id: &VmId) -> Arc<tokio::sync::Mutex<()>> {
        self.inner
            .vm_locks
            .lock()
            .expect("lock map poisoned")
            .entry(id.clone())
            .or_default()
            .clone()
    }

    /// Finds a VM by name or id, locks it, and re-reads it under the lock (it may have changed
    /// or vanished while we waited).
    async fn lock_vm(
        &self,
        name_or_id: &str,
    ) -> OpResult<(tokio::sync::OwnedMutexGuard<()>, VmRecord)> {
        let vm = self.find_vm(name_or_id)?;
        let guard = self.vm_lock(&vm.id).lock_owned().await;
        match self.inner.store.get_vm(vm.id.as_str())? {
            Some(vm) => Ok((guard, vm)),
            None => Err(OpError::not_found("VM", name_or_id)),
        }
    }

    pub fn find_vm(&self, name_or_id: &str) -> OpResult<VmRecord> {
        if name_or_id.is_empty() {
            return Err(OpError::bad_request("a VM name or id is required"));
        }
        self.inner
            .store
            .get_vm(name_or_id)?
            .ok_or_else(|| OpError::not_found("VM", name_or_id))
    }

    fn save(&self, vm: &mut VmRecord) -> OpResult<()> {
        vm.updated_at = now();
        match self.inner.store.update_vm(vm) {
            // The disk is full (a guest filled it): free the reserve and try once more, so a
            // stop or kill is still recorded.
            Err(e)
                if e.is_disk_full() && crate::reserve::release(&self.layout().space_reserve()) =>
            {
                tracing::warn!(vm = %vm.name, "state disk full; released the space reserve to record the VM");
                self.inner.store.update_vm(vm)?;
            }
            r => r?,
        }
        self.vms_changed();
        Ok(())
    }

    /// Tells the followers of [`Engine::subscribe_vm_changes`] that VM records changed.
    fn vms_changed(&self) {
        self.inner
            .vm_changes
            .send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A receiver that sees a change whenever a VM record is saved or deleted (changes made
    /// while nobody looks coalesce into one).
    pub fn subscribe_vm_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.vm_changes.subscribe()
    }

    fn next_generation(&self) -> u64 {
        self.inner
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }
}

pub(crate) fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Joins cleanup errors into one line; every cleanup step runs even when an earlier one failed.
pub(crate) fn join_errors(errors: &[String]) -> String {
    errors.join("; ")
}
