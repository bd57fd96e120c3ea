//! `vm start`: a pipeline of named steps, each registering its undo before it acts.
//!
//! When a step fails (or the client cancels), the registered undos run in reverse order — the
//! failing step's own undo included, since it may have half-acted — every undo runs even if an
//! earlier one fails, their errors are joined, and the VM ends in `error` with `last_error`
//! naming the step. Nothing of the attempt is left on the host.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use banger_core::{VmRecord, VmState};
use banger_vmm::{LaunchSpec, Vmm, VmmHandle};
use tracing::{info, warn};

use super::{Engine, Live, join_errors, now};
use crate::disks;
use crate::error::{OpError, OpResult};
use crate::handles::Handles;
use crate::layout::create_private_dir;
use crate::progress::OpCtx;

/// The start steps, in order. Failure reports and tests refer to these names.
pub const START_STEPS: &[&str] = &[
    "preflight",
    "runtime_dir",
    "vmm_spawn",
    "vmm_configure",
    "vmm_boot",
    "guest_ready",
];

type UndoFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;
type Undo = Box<dyn FnOnce() -> UndoFuture + Send>;

/// The undo stack of one start attempt.
#[derive(Default)]
struct Rollback {
    undos: Vec<(&'static str, Undo)>,
}

impl Rollback {
    fn push<F, Fut>(&mut self, step: &'static str, f: F)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        self.undos.push((step, Box::new(move || Box::pin(f()))));
    }

    /// Runs every undo in reverse; returns the errors, each prefixed with its step.
    async fn unwind(self) -> Vec<String> {
        let mut errors = Vec::new();
        for (step, undo) in self.undos.into_iter().rev() {
            if let Err(e) = undo().await {
                errors.push(format!("undo of {step}: {e}"));
            }
        }
        errors
    }
}

/// What the steps pass along.
struct Attempt {
    vmm: Option<Arc<dyn Vmm>>,
    spec: Option<LaunchSpec>,
    handle: Option<VmmHandle>,
}

impl Engine {
    /// Starts a VM the caller has locked; `vm` is updated in place and in the store.
    pub(super) async fn start_locked(&self, vm: &mut VmRecord, ctx: &OpCtx<'_>) -> OpResult<()> {
        if !vm.state.can_start() {
            return Err(match vm.state {
                VmState::Running => OpError::new(
                    banger_core::ErrorCode::AlreadyExists,
                    format!("VM {} is already running", vm.name),
                ),
                s => OpError::busy(format!("VM {} is {s}; try again when it settles", vm.name)),
            });
        }
        vm.state = VmState::Starting;
        vm.last_error = None;
        self.save(vm)?;

        let mut rollback = Rollback::default();
        let mut attempt = Attempt {
            vmm: None,
            spec: None,
            handle: None,
        };
        let mut failed: Option<(&'static str, String)> = None;
        for &step in START_STEPS {
            if ctx.cancel.is_cancelled() {
                failed = Some((step, "cancelled: the client went away".into()));
                break;
            }
            ctx.progress.stage(step, None);
            let result = async {
                self.inner.hook.check(vm, step, false)?;
                self.run_step(step, vm, &mut attempt, &mut rollback, ctx)
                    .await?;
                self.inner.hook.check(vm, step, true)
            };
            // Steps are not abandoned half-way (a dropped spawn could orphan a process); a
            // cancel takes effect at the next step boundary.
            if let Err(e) = result.await {
                failed = Some((step, e));
                break;
            }
        }

        if let Some((step, err)) = failed {
            warn!(vm = %vm.name, step, error = %err, "start failed; rolling back");
            let undo_errors = rollback.unwind().await;
            let mut msg = format!("start of VM {} failed at step {step}: {err}", vm.name);
            if !undo_errors.is_empty() {
                msg.push_str(&format!("; cleanup errors: {}", join_errors(&undo_errors)));
            }
            vm.state = VmState::Error;
            vm.last_error = Some(msg.clone());
            self.save(vm)?;
            return Err(OpError::failed(msg));
        }

        let handle = attempt.handle.expect("vmm_spawn sets the handle");
        let vmm = attempt.vmm.expect("preflight sets the vmm");
        vm.state = VmState::Running;
        vm.started_at = Some(now());
        vm.vmm = Some(vmm.kind().as_str().to_string());
        self.save(vm)?;
        let generation = self
            .live()
            .get(&vm.id)
            .map(|l| l.generation)
            .expect("vmm_spawn registers the live entry");
        self.watch_exit(vm.id.clone(), vmm, handle, generation);
        info!(vm = %vm.name, "VM running");
        Ok(())
    }

    async fn run_step(
        &self,
        step: &'static str,
        vm: &VmRecord,
        attempt: &mut Attempt,
        rollback: &mut Rollback,
        ctx: &OpCtx<'_>,
    ) -> Result<(), String> {
        let layout = self.layout().clone();
        match step {
            "preflight" => {
                let kernel = self
                    .store()
                    .get_kernel(&vm.kernel)
                    .map_err(|e| e.to_string())?
                    .ok_or_else(|| {
                        format!("kernel {:?} is not installed (banger kernel ls)", vm.kernel)
                    })?;
                let image = self
                    .store()
                    .get_image(&vm.image)
                    .map_err(|e| e.to_string())?
                    .ok_or_else(|| {
                        format!("image {:?} is not installed (banger image ls)", vm.image)
                    })?;
                for p in [&kernel.vmlinux, &image.rootfs] {
                    if !p.is_file() {
                        return Err(format!("{} is missing", p.display()));
                    }
                }
                if let Some(initrd) = &kernel.initrd
                    && !initrd.is_file()
                {
                    return Err(format!("{} is missing", initrd.display()));
                }
                for p in [layout.work_disk(&vm.id), layout.root_disk(&vm.id)] {
                    if !p.is_file() {
                        return Err(format!(
                            "disk {} is missing; delete and recreate the VM",
                            p.display()
                        ));
                    }
                }
                let vmm = self.inner.vmms.select().await?;
                let drives = disks::drives(
                    self.config().root_disk,
                    &image.rootfs,
                    &layout.root_disk(&vm.id),
                    &layout.work_disk(&vm.id),
                );
                attempt.spec = Some(LaunchSpec {
                    vm_id: vm.id.to_string(),
                    run_dir: layout.vm_run_dir(&vm.id),
                    log_path: layout.vmm_log(&vm.id),
                    vcpu: vm.vcpu,
                    memory_mib: vm.memory_mib,
                    kernel: kernel.vmlinux.clone(),
                    initrd: kernel.initrd.clone(),
                    boot_args: boot_args(vm, self.config().root_disk),
                    drives,
                    net: None,
                    vsock: None,
                });
                attempt.vmm = Some(vmm);
                Ok(())
            }
            "runtime_dir" => {
                let dir = layout.vm_run_dir(&vm.id);
                let undo_dir = dir.clone();
                rollback.push(step, move || async move {
                    match std::fs::remove_dir_all(&undo_dir) {
                        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                            Err(format!("removing {}: {e}", undo_dir.display()))
                        }
                        _ => Ok(()),
                    }
                });
                if dir.exists() {
                    // Leftover of a run that died with its daemon: nothing in it is live, or
                    // reconcile would have re-adopted the VM.
                    std::fs::remove_dir_all(&dir)
                        .map_err(|e| format!("clearing {}: {e}", dir.display()))?;
                }
                create_private_dir(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))
            }
            "vmm_spawn" => {
                let vmm = attempt.vmm.clone().expect("preflight ran");
                let spec = attempt.spec.clone().expect("preflight ran");
                let handles_path = layout.handles_file(&vm.id);
                // Write the handles file before the process exists (so a daemon killed right
                // after spawn still finds the run dir) and again once its pid is known.
                let mut handles = Handles::new(spec.run_dir.clone());
                handles.write(&handles_path).map_err(|e| e.to_string())?;
                let engine = self.clone();
                let id = vm.id.clone();
                let undo_vmm = vmm.clone();
                let undo_handles = handles_path.clone();
                let slot: Arc<std::sync::Mutex<Option<VmmHandle>>> = Arc::default();
                let undo_slot = slot.clone();
                rollback.push(step, move || async move {
                    let mut errors = Vec::new();
                    let handle = undo_slot.lock().expect("poisoned").take();
                    if let Some(h) = handle
                        && let Err(e) = undo_vmm.kill(&h).await
                    {
                        errors.push(e.to_string());
                    }
                    engine.live().remove(&id);
                    if let Err(e) = Handles::remove(&undo_handles) {
                        errors.push(format!("removing {}: {e}", undo_handles.display()));
                    }
                    if errors.is_empty() {
                        Ok(())
                    } else {
                        Err(join_errors(&errors))
                    }
                });
                let handle = vmm.spawn(&spec).await.map_err(|e| e.to_string())?;
                *slot.lock().expect("poisoned") = Some(handle.clone());
                handles.vmm = Some(handle.clone());
                handles.write(&handles_path).map_err(|e| e.to_string())?;
                let generation = self.next_generation();
                self.live().insert(
                    vm.id.clone(),
                    Live {
                        handle: handle.clone(),
                        run_dir: spec.run_dir.clone(),
                        generation,
                    },
                );
                attempt.handle = Some(handle);
                Ok(())
            }
            "vmm_configure" => {
                let vmm = attempt.vmm.as_ref().expect("preflight ran");
                let handle = attempt.handle.as_ref().expect("vmm_spawn ran");
                let spec = attempt.spec.as_ref().expect("preflight ran");
                vmm.configure(handle, spec).await.map_err(|e| e.to_string())
            }
            "vmm_boot" => {
                let vmm = attempt.vmm.as_ref().expect("preflight ran");
                let handle = attempt.handle.as_ref().expect("vmm_spawn ran");
                vmm.boot(handle).await.map_err(|e| e.to_string())
            }
            "guest_ready" => {
                let vmm = attempt.vmm.as_ref().expect("preflight ran");
                let handle = attempt.handle.as_ref().expect("vmm_spawn ran");
                // The guest is booting; a VMM that dies right away (bad kernel, crash) is caught
                // here instead of being reported as running.
                let settle = tokio::time::sleep(Duration::from_millis(50));
                tokio::select! {
                    _ = settle => {}
                    _ = vmm.wait_exit(handle) => {}
                }
                if vmm.is_alive(handle) {
                    ctx.progress.stage("ready", None);
                    Ok(())
                } else {
                    Err(format!(
                        "the VMM exited during boot; last log lines: {}",
                        vmm.log_tail(handle, 5).trim()
                    ))
                }
            }
            other => Err(format!("unknown start step {other}")),
        }
    }

    /// Notices a VMM that exits on its own (guest poweroff, crash) and cleans up after it.
    pub(super) fn watch_exit(
        &self,
        id: banger_core::VmId,
        vmm: Arc<dyn Vmm>,
        handle: VmmHandle,
        generation: u64,
    ) {
        let engine = self.clone();
        tokio::spawn(async move {
            vmm.wait_exit(&handle).await;
            engine.on_vmm_exit(&id, generation).await;
        });
    }

    async fn on_vmm_exit(&self, id: &banger_core::VmId, generation: u64) {
        let lock = self.vm_lock(id);
        let _guard = lock.lock().await;
        // A stop/kill/delete that holds the lock removes the live entry first; then this exit
        // is theirs, not a surprise.
        let live = match self.live().get(id) {
            Some(l) if l.generation == generation => l.clone(),
            _ => return,
        };
        let Ok(Some(mut vm)) = self.store().get_vm(id.as_str()) else {
            return;
        };
        let vmm = self.inner.vmms.for_kind(live.handle.kind);
        let tail = vmm
            .as_ref()
            .map(|v| v.log_tail(&live.handle, 5))
            .unwrap_or_default();
        let errors = self.teardown(&vm.id, Some(&live), vmm).await;
        vm.state = VmState::Stopped;
        let mut note = String::from("the VMM exited on its own (guest shutdown or crash)");
        if !tail.trim().is_empty() {
            note.push_str(&format!("; last log lines: {}", tail.trim()));
        }
        if !errors.is_empty() {
            note.push_str(&format!("; cleanup errors: {}", join_errors(&errors)));
        }
        warn!(vm = %vm.name, "{note}");
        vm.last_error = Some(note);
        let _ = self.save(&mut vm);
    }
}

/// The kernel command line. Per-VM identity travels on the config disk (later); here only what
/// the guest init needs to find its disks.
fn boot_args(vm: &VmRecord, strategy: banger_config::RootDiskStrategy) -> String {
    format!(
        "console=ttyS0 reboot=k panic=1 pci=off banger.name={} banger.root={}",
        vm.name,
        strategy.as_str()
    )
}
