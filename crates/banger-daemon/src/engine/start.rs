//! `vm start`: a pipeline of named steps, each registering its undo before it acts.
//!
//! When a step fails (or the client cancels), the registered undos run in reverse order — the
//! failing step's own undo included, since it may have half-acted — every undo runs even if an
//! earlier one fails, their errors are joined, and the VM ends in `error` with `last_error`
//! naming the step. Nothing of the attempt is left on the host.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use banger_config::{NetworkMode, RootDiskStrategy};
use banger_core::{VmRecord, VmState};
use banger_net::{BridgeName, MacAddr, TapName};
use banger_vmm::{DriveSpec, LaunchSpec, NetSpec, Vmm, VmmHandle};
use tracing::{info, warn};

use super::{Engine, Live, join_errors, now};
use crate::disks;
use crate::dm::{self, DmResource};
use crate::error::{OpError, OpResult};
use crate::handles::Handles;
use crate::layout::create_private_dir;
use crate::progress::OpCtx;

/// The start steps, in order. Failure reports and tests refer to these names.
pub const START_STEPS: &[&str] = &[
    "preflight",
    "runtime_dir",
    "root_device",
    "initramfs",
    "config_disk",
    "network",
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

/// The starts in progress, by VM: each can be cancelled by a `vm stop`, `vm kill` or
/// `vm rm --force` of its VM, which would otherwise wait for the VM's lock, i.e. for the whole
/// boot timeout of a guest that never becomes ready.
#[derive(Debug, Default)]
pub(super) struct StartAborts {
    running: std::sync::Mutex<std::collections::HashMap<banger_core::VmId, StartAbort>>,
}

#[derive(Debug, Clone)]
struct StartAbort {
    token: tokio_util::sync::CancellationToken,
    /// The operation that cancelled the start, when one did (not the client going away).
    by: Arc<std::sync::OnceLock<&'static str>>,
}

impl StartAbort {
    fn reason(&self) -> String {
        match self.by.get() {
            Some(op) => format!("cancelled by {op}"),
            None => "cancelled: the client went away".into(),
        }
    }
}

/// Unregisters a start when it ends, however it ends.
struct Registered<'a> {
    aborts: &'a StartAborts,
    id: banger_core::VmId,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.aborts
            .running
            .lock()
            .expect("poisoned")
            .remove(&self.id);
    }
}

impl StartAborts {
    /// Registers the start of `id`; its token is also cancelled when `parent` (the client's) is.
    fn register(
        &self,
        id: &banger_core::VmId,
        parent: &tokio_util::sync::CancellationToken,
    ) -> (StartAbort, Registered<'_>) {
        let abort = StartAbort {
            token: parent.child_token(),
            by: Arc::default(),
        };
        self.running
            .lock()
            .expect("poisoned")
            .insert(id.clone(), abort.clone());
        (
            abort,
            Registered {
                aborts: self,
                id: id.clone(),
            },
        )
    }

    /// Cancels the start of `id` in progress, if any, on behalf of `op`; true when there was one.
    pub(super) fn cancel(&self, id: &banger_core::VmId, op: &'static str) -> bool {
        let Some(abort) = self.running.lock().expect("poisoned").get(id).cloned() else {
            return false;
        };
        let _ = abort.by.set(op);
        abort.token.cancel();
        true
    }
}

/// What the steps pass along.
struct Attempt {
    vmm: Option<Arc<dyn Vmm>>,
    spec: Option<LaunchSpec>,
    handles: Handles,
    handles_path: PathBuf,
    image_rootfs: PathBuf,
    image_meta: banger_core::ImageMeta,
    /// The VMM log's length before this start's VMM was spawned: errors quote only what this
    /// start wrote (the log is appended across starts).
    log_mark: u64,
    /// `--nested`: the kernel's (name, release), whose modules disk the guest gets.
    nested_kernel: Option<(String, String)>,
    /// The modules disk the config disk names.
    modules: Option<banger_guest::ModulesDisk>,
}

impl Attempt {
    /// Persists the handles before anything else learns of a new resource.
    fn save_handles(&self) -> Result<(), String> {
        self.handles
            .write(&self.handles_path)
            .map_err(|e| e.to_string())
    }

    fn handle(&self) -> &VmmHandle {
        self.handles.vmm.as_ref().expect("vmm_spawn ran")
    }

    fn vmm(&self) -> &Arc<dyn Vmm> {
        self.vmm.as_ref().expect("preflight ran")
    }

    fn spec(&mut self) -> &mut LaunchSpec {
        self.spec.as_mut().expect("preflight ran")
    }
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
        let started = Instant::now();
        vm.state = VmState::Starting;
        vm.last_error = None;
        self.save(vm)?;

        let (abort, _registered) = self.inner.starts.register(&vm.id, &ctx.cancel);
        // The steps see the start's own token: the client going away or a stop/kill cancels it.
        let ctx = &OpCtx {
            op_id: ctx.op_id.clone(),
            progress: ctx.progress,
            cancel: abort.token.clone(),
        };
        let mut rollback = Rollback::default();
        let mut attempt = Attempt {
            vmm: None,
            spec: None,
            handles: Handles::new(self.layout().vm_run_dir(&vm.id)),
            handles_path: self.layout().handles_file(&vm.id),
            image_rootfs: PathBuf::new(),
            image_meta: Default::default(),
            log_mark: 0,
            nested_kernel: None,
            modules: None,
        };
        let mut failed: Option<(&'static str, String)> = None;
        for &step in START_STEPS {
            if ctx.cancel.is_cancelled() {
                failed = Some((step, abort.reason()));
                break;
            }
            ctx.progress.stage(step, None);
            let t = Instant::now();
            let result = async {
                crate::failpoint::hit("start", step, false);
                self.inner.hook.check(vm, step, false)?;
                self.run_step(step, vm, &mut attempt, &mut rollback, ctx)
                    .await?;
                crate::failpoint::hit("start", step, true);
                self.inner.hook.check(vm, step, true)
            };
            // Steps are not abandoned half-way (a dropped spawn could orphan a process); a
            // cancel takes effect at the next step boundary, or inside the long waits (the VMM
            // calls and the wait for the guest, whose VMM the rollback then kills).
            if let Err(e) = result.await {
                let e = if ctx.cancel.is_cancelled() {
                    abort.reason()
                } else {
                    e
                };
                failed = Some((step, e));
                break;
            }
            info!(vm = %vm.name, step, elapsed_ms = t.elapsed().as_millis() as u64, "start step done");
        }

        if let Some((step, err)) = failed {
            warn!(vm = %vm.name, step, error = %err, "start failed; rolling back");
            let undo_errors = rollback.unwind().await;
            let mut msg = format!("start of VM {} failed at step {step}: {err}", vm.name);
            if !undo_errors.is_empty() {
                msg.push_str(&format!("; cleanup errors: {}", join_errors(&undo_errors)));
            }
            // A start cancelled by a stop/kill/delete of its VM, cleanly undone, leaves the VM
            // stopped: that is what the user asked for.
            let stopped = abort.by.get().is_some() && undo_errors.is_empty();
            vm.state = if stopped {
                VmState::Stopped
            } else {
                VmState::Error
            };
            vm.last_error = (!stopped).then(|| msg.clone());
            self.save(vm)?;
            return Err(OpError::failed(msg));
        }

        let vmm = attempt.vmm.clone().expect("preflight sets the vmm");
        let handle = attempt.handle().clone();
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
        info!(vm = %vm.name, elapsed_ms = started.elapsed().as_millis() as u64, "VM running");
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
        let bridged = self.config().network == NetworkMode::Bridge;
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
                if bridged && vm.ip.is_none() {
                    return Err("the VM has no address; delete and recreate it".into());
                }
                let vmm = self.inner.vmms.select(vm.nested).await?;
                if vm.nested {
                    attempt.nested_kernel = Some((kernel.name.clone(), kernel.version.clone()));
                }
                let drives = disks::drives(
                    self.config().root_disk,
                    &image.rootfs,
                    &layout.root_disk(&vm.id),
                    &layout.work_disk(&vm.id),
                );
                let boot_args = format!(
                    "console=ttyS0 reboot=k panic=1 pci=off loglevel=4 banger.name={}",
                    vm.name
                );
                attempt.spec = Some(LaunchSpec {
                    vm_id: vm.id.to_string(),
                    run_dir: layout.vm_run_dir(&vm.id),
                    log_path: layout.vmm_log(&vm.id),
                    log_max_bytes: self.config().vmm_log_max_size.bytes(),
                    vcpu: vm.vcpu,
                    memory_mib: vm.memory_mib,
                    kernel: kernel.vmlinux.clone(),
                    initrd: kernel.initrd.clone(),
                    boot_args,
                    drives,
                    net: None,
                    vsock: None,
                });
                attempt.image_rootfs = image.rootfs.clone();
                attempt.image_meta = image.meta.clone();
                attempt.vmm = Some(vmm);
                Ok(())
            }
            "runtime_dir" => {
                let dir = layout.vm_run_dir(&vm.id);
                let undo_dir = dir.clone();
                let undo_handles = attempt.handles_path.clone();
                rollback.push(step, move || async move {
                    let mut errors = Vec::new();
                    if let Err(e) = std::fs::remove_dir_all(&undo_dir)
                        && e.kind() != std::io::ErrorKind::NotFound
                    {
                        errors.push(format!("removing {}: {e}", undo_dir.display()));
                    }
                    if let Err(e) = Handles::remove(&undo_handles) {
                        errors.push(format!("removing {}: {e}", undo_handles.display()));
                    }
                    if errors.is_empty() {
                        Ok(())
                    } else {
                        Err(join_errors(&errors))
                    }
                });
                if dir.exists() {
                    // Leftover of a run that died with its daemon: nothing in it is live, or
                    // reconcile would have re-adopted the VM.
                    std::fs::remove_dir_all(&dir)
                        .map_err(|e| format!("clearing {}: {e}", dir.display()))?;
                }
                create_private_dir(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
                attempt.save_handles()
            }
            "root_device" => {
                if self.config().root_disk != RootDiskStrategy::DmSnapshot {
                    return Ok(());
                }
                // Run here as root, or through the root helper by an unprivileged daemon.
                let ops = dm::block_ops(self.config(), self.inner.runner.clone());
                let undo_ops = ops.clone();
                let made: Arc<std::sync::Mutex<Vec<DmResource>>> = Arc::default();
                let undo_made = made.clone();
                rollback.push(step, move || async move {
                    let items = std::mem::take(&mut *undo_made.lock().expect("poisoned"));
                    let mut errors = Vec::new();
                    for r in items.iter().rev() {
                        if let Err(e) = dm::release(undo_ops.as_ref(), r).await {
                            errors.push(e.to_string());
                        }
                    }
                    if errors.is_empty() {
                        Ok(())
                    } else {
                        Err(join_errors(&errors))
                    }
                });
                let image = attempt.image_rootfs.clone();
                let cow = layout.root_disk(&vm.id);
                let handles_path = attempt.handles_path.clone();
                let mut handles = attempt.handles.clone();
                // Each device is in the handles file before the next command runs.
                let mut record = |r: &DmResource| -> Result<(), String> {
                    made.lock().expect("poisoned").push(r.clone());
                    handles.block.push(r.clone());
                    handles.write(&handles_path).map_err(|e| e.to_string())
                };
                let device = match dm::attach(ops.as_ref(), &vm.id, &image, &cow, &mut record).await
                {
                    Ok(d) => d,
                    Err(e) => {
                        // A failed attach has already released what it made (its error says
                        // if that failed too); releasing again could hit a device reused since.
                        made.lock().expect("poisoned").clear();
                        return Err(e.to_string());
                    }
                };
                attempt.handles = handles;
                // The VM boots from the snapshot instead of the image plus its own disk.
                let spec = attempt.spec();
                spec.drives.retain(|d| d.id != "image");
                if let Some(root) = spec.drives.iter_mut().find(|d| d.id == "root") {
                    root.path = PathBuf::from(device);
                }
                Ok(())
            }
            "initramfs" => {
                if attempt.spec().initrd.is_none() {
                    let kernel_dir = attempt
                        .spec()
                        .kernel
                        .parent()
                        .map(|p| p.to_path_buf())
                        .unwrap_or_default();
                    let initramfs = self.ensure_initramfs(&kernel_dir).await?;
                    attempt.spec().initrd = Some(initramfs);
                }
                if let Some((name, release)) = attempt.nested_kernel.clone() {
                    let kernel_dir = attempt
                        .spec()
                        .kernel
                        .parent()
                        .map(|p| p.to_path_buf())
                        .unwrap_or_default();
                    let (path, disk) = self
                        .ensure_modules_disk(&name, &kernel_dir, &release)
                        .await?;
                    attempt.spec().drives.push(DriveSpec {
                        id: "modules".into(),
                        path,
                        read_only: true,
                    });
                    attempt.modules = Some(disk);
                }
                Ok(())
            }
            "config_disk" => {
                let path = layout.config_disk(&vm.id);
                let image = attempt.image_rootfs.clone();
                let modules = attempt.modules.clone();
                self.write_config_disk(vm, &image, &attempt.image_meta, modules, &path, ctx)
                    .await?;
                attempt.spec().drives.push(DriveSpec {
                    id: "config".into(),
                    path,
                    read_only: true,
                });
                Ok(())
            }
            "network" => {
                if !bridged {
                    return Ok(());
                }
                let cfg = self.config();
                let bridge = BridgeName::parse(&cfg.bridge_name).map_err(|e| e.to_string())?;
                let tap = TapName::for_vm(&vm.id);
                let ip = vm.ip.expect("checked in preflight");
                // Record before creating: a daemon killed right after still cleans these up.
                attempt.handles.tap = Some(tap.as_str().to_string());
                attempt.handles.nat = vm.nat;
                attempt.save_handles()?;
                let net = self.inner.net.clone();
                let (undo_tap, id, nat) = (tap.clone(), vm.id.to_string(), vm.nat);
                rollback.push(step, move || async move {
                    let mut errors = Vec::new();
                    if nat && let Err(e) = net.remove_vm_nat(&id).await {
                        errors.push(e.to_string());
                    }
                    if let Err(e) = net.delete_tap(&undo_tap).await {
                        errors.push(e.to_string());
                    }
                    if errors.is_empty() {
                        Ok(())
                    } else {
                        Err(join_errors(&errors))
                    }
                });
                let net = &self.inner.net;
                // A network the host already routes elsewhere would be cut off by the bridge.
                // banger's own bridge route does not count. Unreadable routes only warn: the
                // bridge commands below need the same tools and report their own failure.
                match net.host_routes().await {
                    Ok(routes) => banger_net::routes::check_cidr_free(
                        &cfg.bridge_cidr,
                        bridge.as_str(),
                        &routes,
                    )
                    .map_err(|e| e.to_string())?,
                    Err(e) => ctx.progress.warn(format!(
                        "cannot check bridge_cidr {} against the host's routes: {e}",
                        cfg.bridge_cidr
                    )),
                }
                net.ensure_bridge(&bridge, cfg.bridge_cidr.gateway(), cfg.bridge_cidr.prefix())
                    .await
                    .map_err(|e| e.to_string())?;
                // The VMM runs as the daemon's user and must be able to open the tap.
                // SAFETY: getuid has no preconditions.
                let uid = unsafe { libc::getuid() };
                net.create_tap(&tap, &bridge, Some(uid))
                    .await
                    .map_err(|e| e.to_string())?;
                // The address may have belonged to another VM (another MAC) moments ago.
                net.forget_neighbor(&bridge, ip)
                    .await
                    .map_err(|e| e.to_string())?;
                if vm.nat {
                    net.ensure_nat(&bridge, &cfg.bridge_cidr)
                        .await
                        .map_err(|e| e.to_string())?;
                    net.add_vm_nat(vm.id.as_str(), ip, &tap)
                        .await
                        .map_err(|e| e.to_string())?;
                }
                // Through the root helper the tap comes back open, for a VMM that may not
                // open /dev/net/tun itself; the spec (and so the fd) lives until the spawn.
                let tap_fd = net
                    .open_tap(&tap)
                    .await
                    .map_err(|e| e.to_string())?
                    .map(|fd| banger_vmm::TapFd(Arc::new(fd)));
                attempt.spec().net = Some(NetSpec {
                    tap_fd,
                    tap: tap.as_str().to_string(),
                    mac: MacAddr::for_vm(vm.id.as_str()).to_string(),
                });
                Ok(())
            }
            "vmm_spawn" => {
                let vmm = attempt.vmm().clone();
                let spec = attempt.spec().clone();
                let engine = self.clone();
                let id = vm.id.clone();
                let undo_vmm = vmm.clone();
                let slot: Arc<std::sync::Mutex<Option<VmmHandle>>> = Arc::default();
                let undo_slot = slot.clone();
                rollback.push(step, move || async move {
                    let handle = undo_slot.lock().expect("poisoned").take();
                    engine.live().remove(&id);
                    match handle {
                        Some(h) => undo_vmm.kill(&h).await.map_err(|e| e.to_string()),
                        None => Ok(()),
                    }
                });
                attempt.log_mark = banger_vmm::process::log_mark(&spec.log_path);
                // The process is recorded (handles file, atomically, and the undo's slot) the
                // moment it exists, before its control socket is waited for: a daemon killed
                // while the VMM starts up leaves a handles file naming it for reconcile.
                let (before, handles_path) =
                    (attempt.handles.clone(), attempt.handles_path.clone());
                let record_slot = slot.clone();
                let record = move |h: &VmmHandle| -> Result<(), String> {
                    *record_slot.lock().expect("poisoned") = Some(h.clone());
                    let mut with = before.clone();
                    with.vmm = Some(h.clone());
                    with.write(&handles_path).map_err(|e| e.to_string())
                };
                let handle = vmm
                    .spawn_recorded(&spec, &record)
                    .await
                    .map_err(|e| e.to_string())?;
                *slot.lock().expect("poisoned") = Some(handle.clone());
                attempt.handles.vmm = Some(handle);
                attempt.save_handles()?;
                let generation = self.next_generation();
                self.live().insert(
                    vm.id.clone(),
                    Live {
                        handles: attempt.handles.clone(),
                        generation,
                    },
                );
                Ok(())
            }
            // API calls may be abandoned: the process is recorded, and the rollback kills it.
            "vmm_configure" => {
                let spec = attempt.spec().clone();
                let configure = attempt.vmm().configure(attempt.handle(), &spec);
                tokio::select! {
                    r = configure => r.map_err(|e| e.to_string()),
                    _ = ctx.cancel.cancelled() => Err("cancelled".into()),
                }
            }
            "vmm_boot" => {
                let boot = attempt.vmm().boot(attempt.handle());
                tokio::select! {
                    r = boot => r.map_err(|e| e.to_string()),
                    _ = ctx.cancel.cancelled() => Err("cancelled".into()),
                }
            }
            "guest_ready" => {
                let vmm = attempt.vmm().clone();
                let handle = attempt.handle().clone();
                if bridged {
                    let ip = vm.ip.expect("checked in preflight");
                    let timeout = Duration::from_secs(self.config().boot_timeout_secs);
                    tokio::select! {
                        r = self.wait_for_ssh(vm, ip, &vmm, (&handle, attempt.log_mark), timeout, ctx) => r?,
                        _ = ctx.cancel.cancelled() => return Err("cancelled".into()),
                    }
                    self.install_sshd_once(vm, ip, &attempt.image_meta, ctx)
                        .await;
                } else {
                    // No network to probe: the VMM staying up through early boot is the signal.
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                        _ = vmm.wait_exit(&handle) => {}
                    }
                    if !vmm.is_alive(&handle) {
                        return Err(format!(
                            "the VMM exited during boot; last log lines: {}",
                            banger_vmm::process::tail_file_since(
                                &handle.log_path,
                                attempt.log_mark,
                                5
                            )
                            .trim()
                        ));
                    }
                }
                ctx.progress.stage("ready", None);
                Ok(())
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
        let tail = live
            .handles
            .vmm
            .as_ref()
            .map(|h| banger_vmm::process::tail_file(&h.log_path, 5))
            .unwrap_or_default();
        let errors = self.teardown(&vm.id, Some(&live), "vmm_exit").await;
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
