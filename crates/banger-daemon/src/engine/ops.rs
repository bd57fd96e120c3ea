//! Stop, kill, restart, delete, prune, set, show, logs — and the teardown they share.

use std::time::Duration;

use banger_core::{ErrorCode, VmId, VmRecord, VmState};
use banger_protocol::{Logs, VmDetails};
use tracing::info;

use super::{Engine, Live, join_errors};
use crate::error::{OpError, OpResult};
use crate::failpoint::hit;
use crate::handles::Handles;
use crate::progress::OpCtx;

/// How an `std::io::Error` of ENOSPC prints.
const NO_SPACE: &str = "No space left on device";

/// Signals `vm kill` accepts. A closed list: the daemon never forwards arbitrary numbers.
const SIGNALS: &[(&str, i32)] = &[
    ("KILL", libc::SIGKILL),
    ("TERM", libc::SIGTERM),
    ("INT", libc::SIGINT),
    ("HUP", libc::SIGHUP),
    ("QUIT", libc::SIGQUIT),
];

impl Engine {
    pub async fn start(&self, name: &str, ctx: &OpCtx<'_>) -> OpResult<VmRecord> {
        let (_guard, mut vm) = self.lock_vm(name).await?;
        self.start_locked(&mut vm, ctx).await?;
        Ok(vm)
    }

    pub async fn stop(
        &self,
        name: &str,
        timeout: Option<u64>,
        ctx: &OpCtx<'_>,
    ) -> OpResult<VmRecord> {
        let cancelled = self.cancel_start(name, "vm stop");
        let (_guard, mut vm) = self.lock_vm(name).await?;
        if cancelled && vm.state == VmState::Stopped {
            // The start was cancelled and undone: nothing runs any more.
            return Ok(vm);
        }
        self.stop_locked(&mut vm, timeout, ctx).await?;
        Ok(vm)
    }

    /// Cancels a start of `name` in progress (on behalf of `op`), so the caller gets the VM's
    /// lock once the start has undone what it did, instead of after the boot timeout.
    fn cancel_start(&self, name: &str, op: &'static str) -> bool {
        match self.find_vm(name) {
            Ok(vm) => self.inner.starts.cancel(&vm.id, op),
            Err(_) => false,
        }
    }

    pub async fn restart(
        &self,
        name: &str,
        timeout: Option<u64>,
        ctx: &OpCtx<'_>,
    ) -> OpResult<VmRecord> {
        let (_guard, mut vm) = self.lock_vm(name).await?;
        if vm.state == VmState::Running {
            self.stop_locked(&mut vm, timeout, ctx).await?;
        }
        self.start_locked(&mut vm, ctx).await?;
        Ok(vm)
    }

    async fn stop_locked(
        &self,
        vm: &mut VmRecord,
        timeout: Option<u64>,
        ctx: &OpCtx<'_>,
    ) -> OpResult<()> {
        if vm.state != VmState::Running {
            return Err(OpError::new(
                ErrorCode::NotRunning,
                format!("VM {} is not running (state: {})", vm.name, vm.state),
            ));
        }
        let timeout = Duration::from_secs(timeout.unwrap_or(self.config().stop_timeout_secs));
        hit("stop", "mark_stopping", false);
        vm.state = VmState::Stopping;
        // A state that cannot be written (the disk is full even after the reserve) must not
        // keep the VMM running: the stop goes on, and the final save reports the failure.
        if let Err(e) = self.save(vm) {
            ctx.progress.warn(format!(
                "VM {}: recording `stopping` failed ({e}); stopping anyway",
                vm.name
            ));
        }
        hit("stop", "mark_stopping", true);
        let live = self.live_or_handles(&vm.id);
        let handle = live.as_ref().and_then(|l| l.handles.vmm.clone());
        let vmm = handle
            .as_ref()
            .and_then(|h| self.inner.vmms.for_kind(h.kind));
        let paused = match (&handle, &vmm) {
            (Some(h), Some(v)) => v.paused_reason(h).await,
            _ => None,
        };
        if let Some(why) = &paused {
            // A guest the VMM holds paused cannot power off; waiting would only delay.
            ctx.progress
                .warn(format!("VM {} is paused ({why}); killing it", vm.name));
        }
        if let (Some(h), Some(v), None) = (&handle, &vmm, &paused) {
            ctx.progress.stage(
                "shutdown",
                Some(format!(
                    "waiting up to {}s for the guest",
                    timeout.as_secs()
                )),
            );
            // A guest with ssh is asked to power off cleanly (its filesystems synced); the
            // VMM's own shutdown request (Ctrl-Alt-Del, ACPI power button) covers the rest.
            hit("stop", "guest_poweroff", false);
            if live.as_ref().is_some_and(|l| l.handles.tap.is_some())
                && let Some(ip) = vm.ip
            {
                let poweroff = [
                    "sh",
                    "-c",
                    "sync; systemctl --no-block poweroff || poweroff -f",
                ];
                let _ = self
                    .ssh_run(vm, ip, &poweroff, Duration::from_secs(3))
                    .await;
            }
            hit("stop", "guest_poweroff", true);
            hit("stop", "vmm_shutdown", false);
            match v.shutdown(h, timeout).await {
                Ok(true) => {}
                Ok(false) => ctx.progress.warn(format!(
                    "VM {} did not shut down within {}s; killing it",
                    vm.name,
                    timeout.as_secs()
                )),
                Err(e) => ctx.progress.warn(format!(
                    "graceful shutdown of {} failed ({e}); killing it",
                    vm.name
                )),
            }
            hit("stop", "vmm_shutdown", true);
        }
        ctx.progress.stage("cleanup", None);
        let errors = self.teardown(&vm.id, live.as_ref(), "stop").await;
        hit("stop", "mark_stopped", false);
        let done = self.finish_stop(vm, errors);
        hit("stop", "mark_stopped", true);
        done
    }

    /// Ends a stop or kill: `stopped`, with cleanup errors (if any) kept in `last_error`.
    fn finish_stop(&self, vm: &mut VmRecord, errors: Vec<String>) -> OpResult<()> {
        vm.state = VmState::Stopped;
        vm.last_error =
            (!errors.is_empty()).then(|| format!("cleanup errors: {}", join_errors(&errors)));
        self.save(vm)?;
        info!(vm = %vm.name, "VM stopped");
        match &vm.last_error {
            Some(e) => Err(OpError::failed(format!("VM {} stopped, but {e}", vm.name))),
            None => Ok(()),
        }
    }

    pub async fn kill(
        &self,
        name: &str,
        signal: Option<&str>,
        ctx: &OpCtx<'_>,
    ) -> OpResult<VmRecord> {
        let sig_name = signal
            .unwrap_or("KILL")
            .trim_start_matches("SIG")
            .to_ascii_uppercase();
        let Some(&(_, signo)) = SIGNALS.iter().find(|(n, _)| *n == sig_name) else {
            return Err(OpError::bad_request(format!(
                "unsupported signal {:?}: use one of KILL, TERM, INT, HUP, QUIT",
                signal.unwrap_or_default()
            )));
        };
        // Whatever the signal: a start in progress is cancelled, and its undo kills the VMM.
        let cancelled = self.cancel_start(name, "vm kill");
        let (_guard, mut vm) = self.lock_vm(name).await?;
        if cancelled && vm.state == VmState::Stopped {
            return Ok(vm);
        }
        if !vm.state.may_have_vmm() {
            return Err(OpError::new(
                ErrorCode::NotRunning,
                format!("VM {} is not running (state: {})", vm.name, vm.state),
            ));
        }
        let live = self.live_or_handles(&vm.id);
        let handle = live.as_ref().and_then(|l| l.handles.vmm.clone());
        let vmm = handle
            .as_ref()
            .and_then(|h| self.inner.vmms.for_kind(h.kind));
        if let (Some(h), Some(v)) = (&handle, &vmm)
            && signo != libc::SIGKILL
            && v.is_alive(h)
        {
            ctx.progress.stage("signal", Some(sig_name.clone()));
            // is_alive checked pid and start time: the signal goes to our VMM, never a stranger.
            // SAFETY: kill(2) with a pid we verified and a signal from the allow-list.
            unsafe { libc::kill(h.pid, signo) };
            let _ = tokio::time::timeout(Duration::from_secs(5), v.wait_exit(h)).await;
        }
        ctx.progress.stage("cleanup", None);
        let errors = self.teardown(&vm.id, live.as_ref(), "kill").await;
        self.finish_stop(&mut vm, errors)?;
        Ok(vm)
    }

    pub async fn delete(&self, name: &str, force: bool, ctx: &OpCtx<'_>) -> OpResult<VmRecord> {
        if force {
            self.cancel_start(name, "vm rm --force");
        }
        let (_guard, vm) = self.lock_vm(name).await?;
        self.delete_locked(vm, force, ctx).await
    }

    pub(super) async fn delete_locked(
        &self,
        mut vm: VmRecord,
        force: bool,
        ctx: &OpCtx<'_>,
    ) -> OpResult<VmRecord> {
        if vm.state.may_have_vmm() {
            if !force {
                return Err(OpError::busy(format!(
                    "VM {} is {}: stop it first, or delete with --force",
                    vm.name, vm.state
                )));
            }
            let live = self.live_or_handles(&vm.id);
            ctx.progress.stage("kill", None);
            let errors = self.teardown(&vm.id, live.as_ref(), "delete").await;
            if !errors.is_empty() {
                vm.state = VmState::Error;
                vm.last_error = Some(format!("delete: cleanup errors: {}", join_errors(&errors)));
                self.save(&mut vm)?;
                return Err(OpError::failed(format!(
                    "deleting VM {}: {}; it is kept so nothing is lost track of",
                    vm.name,
                    vm.last_error.as_deref().unwrap_or_default()
                )));
            }
        }
        ctx.progress.stage("remove_disks", None);
        // Crash safety: the VM's dir is first marked "being deleted" (the point of no return),
        // then the row goes, then the known_hosts entry, then the files, the mark last. A
        // daemon killed anywhere after the mark leaves a marked dir (with or without its row)
        // whose delete the next daemon's reconcile finishes. Before this, the files went
        // first and a crash before the row's delete left a VM without disks in the store.
        hit("delete", "mark_deleting", false);
        if let Err(e) = self.mark_vm_dir(&vm, super::reconcile::DELETING_MARK) {
            // A full disk has no block for the mark, yet deleting VMs is how a user frees
            // space: the disks go first (the VM is being deleted anyway), then the mark. A crash
            // in between leaves a VM without disks, which `vm rm` still deletes.
            if !e.message.contains(NO_SPACE) {
                return Err(e);
            }
            for disk in [
                self.layout().root_disk(&vm.id),
                self.layout().work_disk(&vm.id),
            ] {
                let _ = std::fs::remove_file(disk);
            }
            self.mark_vm_dir(&vm, super::reconcile::DELETING_MARK)?;
        }
        hit("delete", "mark_deleting", true);
        hit("delete", "delete_row", false);
        if self.store().delete_vm(&vm.id).is_err() {
            // A full disk leaves the store no room even for a delete. Past the mark the files
            // may go before the row (a crash is finished by reconcile): free them, retry.
            for disk in [
                self.layout().root_disk(&vm.id),
                self.layout().work_disk(&vm.id),
            ] {
                let _ = std::fs::remove_file(disk);
            }
            self.store().delete_vm(&vm.id)?;
        }
        self.vms_changed();
        self.inner.vm_locks.lock().expect("poisoned").remove(&vm.id);
        hit("delete", "delete_row", true);
        hit("delete", "known_host", false);
        if let Err(e) = self.ssh().remove_known_host(&known_host_names(&vm)) {
            ctx.progress.warn(format!(
                "VM {} deleted, but its known_hosts entry stays: {e}",
                vm.name
            ));
        }
        hit("delete", "known_host", true);
        hit("delete", "remove_files", false);
        let dir = self.layout().vm_dir(&vm.id);
        // The mark goes last: a daemon killed in the middle leaves a marked dir that the next
        // daemon's reconcile finishes deleting, never an unmarked orphan.
        if let Err(e) = banger_sys::rmtree::remove_tree_last(
            &dir,
            &[std::ffi::OsStr::new(super::reconcile::DELETING_MARK)],
        ) {
            return Err(OpError::failed(format!(
                "VM {} is deleted, but removing {} failed: {e}; the next daemon start retries",
                vm.name,
                dir.display()
            )));
        }
        hit("delete", "remove_files", true);
        info!(vm = %vm.name, "VM deleted");
        Ok(vm)
    }

    /// Deletes every VM that is not running. Each is locked in turn; one that started meanwhile
    /// is skipped.
    pub async fn prune(&self, ctx: &OpCtx<'_>) -> OpResult<Vec<String>> {
        let mut removed = Vec::new();
        for vm in self.store().list_vms()? {
            if vm.state.may_have_vmm() {
                continue;
            }
            let (_guard, vm) = match self.lock_vm(vm.id.as_str()).await {
                Ok(x) => x,
                Err(e) if e.code == ErrorCode::NotFound => continue,
                Err(e) => return Err(e),
            };
            if vm.state.may_have_vmm() {
                continue;
            }
            let name = vm.name.to_string();
            self.delete_locked(vm, false, ctx).await?;
            removed.push(name);
        }
        Ok(removed)
    }

    pub async fn set(
        &self,
        name: &str,
        vcpu: Option<u32>,
        memory_mib: Option<u32>,
    ) -> OpResult<VmRecord> {
        if vcpu.is_none() && memory_mib.is_none() {
            return Err(OpError::bad_request(
                "nothing to set: give --vcpu and/or --memory",
            ));
        }
        validate_shape(vcpu, memory_mib)?;
        let (_guard, mut vm) = self.lock_vm(name).await?;
        if vm.state.may_have_vmm() {
            return Err(OpError::busy(format!(
                "VM {} is {}: stop it before changing vcpu or memory",
                vm.name, vm.state
            )));
        }
        if let Some(v) = vcpu {
            vm.vcpu = v;
        }
        if let Some(m) = memory_mib {
            vm.memory_mib = m;
        }
        self.save(&mut vm)?;
        Ok(vm)
    }

    pub async fn show(&self, name: &str) -> OpResult<VmDetails> {
        let vm = self.find_vm(name)?;
        let access = self.store().get_image(&vm.image)?.map(|img| {
            if img.meta.agent_ssh() && self.layout().sshd_installed(&vm.id).exists() {
                let mut m = img.meta.clone();
                m.has_sshd = Some(true);
                format!("{} (sshd installed at first boot)", m.access_summary())
            } else {
                img.meta.access_summary()
            }
        });
        let paused = match self.live_or_handles(&vm.id) {
            Some(live) if vm.state == VmState::Running => match live.handles.vmm.as_ref() {
                Some(h) => match self.inner.vmms.for_kind(h.kind) {
                    Some(v) => v.paused_reason(h).await,
                    None => None,
                },
                None => None,
            },
            _ => None,
        };
        Ok(VmDetails {
            access,
            paused,
            pid: self.vmm_pid(&vm.id),
            dir: self.layout().vm_dir(&vm.id),
            log_file: self.layout().vmm_log(&vm.id),
            vm,
        })
    }

    pub fn logs(&self, name: &str, lines: Option<usize>) -> OpResult<Logs> {
        let vm = self.find_vm(name)?;
        let path = self.layout().vmm_log(&vm.id);
        // The rotated file first: together they are the console's latest output, in order.
        let mut bytes = Vec::new();
        for p in [banger_vmm::logpump::rotated_path(&path), path.clone()] {
            match std::fs::read(&p) {
                Ok(b) => bytes.extend_from_slice(&b),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(OpError::failed(format!("reading {}: {e}", p.display()))),
            }
        }
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let text = match lines {
            Some(n) => {
                let all: Vec<&str> = text.lines().collect();
                let mut t = all[all.len().saturating_sub(n)..].join("\n");
                if !t.is_empty() {
                    t.push('\n');
                }
                t
            }
            None => text,
        };
        Ok(Logs { path, text })
    }

    /// What `banger vm ssh/exec/run` need to reach a running VM.
    pub fn ssh_info(&self, name: &str) -> OpResult<banger_protocol::SshInfo> {
        let vm = self.find_vm(name)?;
        if vm.state != VmState::Running {
            return Err(OpError::new(
                ErrorCode::NotRunning,
                format!(
                    "VM {} is not running (state: {}): banger vm start {}",
                    vm.name, vm.state, vm.name
                ),
            ));
        }
        let bridged = self
            .live()
            .get(&vm.id)
            .is_some_and(|l| l.handles.tap.is_some());
        let ip = match (bridged, vm.ip) {
            (true, Some(ip)) => ip,
            _ => {
                return Err(OpError::bad_request(format!(
                    "VM {} has no network (network = \"none\"), so there is no ssh into it",
                    vm.name
                )));
            }
        };
        Ok(banger_protocol::SshInfo {
            id: vm.id.to_string(),
            name: vm.name.to_string(),
            ip,
            user: "root".into(),
            key: self.ssh().user_key(),
            known_hosts: self.ssh().known_hosts(),
        })
    }

    /// The live entry, or — after a daemon restart that could not re-adopt — what the handles
    /// file says.
    fn live_or_handles(&self, id: &VmId) -> Option<Live> {
        if let Some(l) = self.live().get(id) {
            return Some(l.clone());
        }
        let handles = Handles::read(&self.layout().handles_file(id)).ok()??;
        Some(Live {
            handles,
            generation: 0,
        })
    }

    /// Releases everything a run holds: the VMM process, NAT rules, the tap, the runtime dir,
    /// the handles file, the live entry. Every step runs; the errors are returned for the
    /// caller to join. Missing resources are not errors. `phase` names the caller for the
    /// failpoints at each step ([`crate::failpoint::TEARDOWN_STEPS`]).
    pub(super) async fn teardown(
        &self,
        id: &VmId,
        live: Option<&Live>,
        phase: &'static str,
    ) -> Vec<String> {
        let mut errors = Vec::new();
        self.live().remove(id);
        let handles = live.map(|l| &l.handles);
        hit(phase, "vmm_kill", false);
        if let Some(h) = handles.and_then(|h| h.vmm.as_ref()) {
            match self.inner.vmms.for_kind(h.kind) {
                Some(v) => {
                    if let Err(e) = v.kill(h).await {
                        errors.push(e.to_string());
                    }
                }
                None => errors.push(format!(
                    "no backend for a {} VMM (pid {})",
                    h.kind.as_str(),
                    h.pid
                )),
            }
        }
        hit(phase, "vmm_kill", true);
        // The snapshot, then its loop devices: only once the VMM no longer holds them.
        hit(phase, "block_release", false);
        let block = handles.map(|h| h.block.as_slice()).unwrap_or_default();
        if !block.is_empty() {
            // As they were made: here as root, or through the root helper.
            let ops = crate::dm::block_ops(self.config(), self.inner.runner.clone());
            for r in block.iter().rev() {
                if let Err(e) = crate::dm::release(ops.as_ref(), r).await {
                    errors.push(e.to_string());
                }
            }
        }
        hit(phase, "block_release", true);
        hit(phase, "nat_remove", false);
        if handles.is_some_and(|h| h.nat)
            && let Err(e) = self.inner.net.remove_vm_nat(id.as_str()).await
        {
            errors.push(e.to_string());
        }
        hit(phase, "nat_remove", true);
        hit(phase, "tap_delete", false);
        if let Some(tap) = handles.and_then(|h| h.tap.as_deref()) {
            match banger_net::TapName::parse(tap) {
                Ok(t) => {
                    if let Err(e) = self.inner.net.delete_tap(&t).await {
                        errors.push(e.to_string());
                    }
                }
                Err(e) => errors.push(format!("handles name tap {tap:?}: {e}")),
            }
        }
        hit(phase, "tap_delete", true);
        hit(phase, "run_dir_remove", false);
        let run_dir = handles
            .map(|h| h.run_dir.clone())
            .unwrap_or_else(|| self.layout().vm_run_dir(id));
        if let Err(e) = std::fs::remove_dir_all(&run_dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            errors.push(format!("removing {}: {e}", run_dir.display()));
        }
        hit(phase, "run_dir_remove", true);
        hit(phase, "handles_remove", false);
        let handles_file = self.layout().handles_file(id);
        if let Err(e) = Handles::remove(&handles_file) {
            errors.push(format!("removing {}: {e}", handles_file.display()));
        }
        hit(phase, "handles_remove", true);
        errors
    }
}

/// The names a VM's host key is known by in banger's known_hosts.
pub(super) fn known_host_names(vm: &VmRecord) -> Vec<String> {
    let mut v = vec![format!("{}.vm", vm.name)];
    if let Some(ip) = vm.ip {
        v.push(ip.to_string());
    }
    v
}

/// Checks vcpu and memory against what a microVM can have.
pub(super) fn validate_shape(vcpu: Option<u32>, memory_mib: Option<u32>) -> OpResult<()> {
    if let Some(v) = vcpu
        && !(1..=32).contains(&v)
    {
        return Err(OpError::bad_request(format!(
            "invalid vcpu count {v}: use 1 to 32"
        )));
    }
    if let Some(m) = memory_mib
        && !(128..=1024 * 1024).contains(&m)
    {
        return Err(OpError::bad_request(format!(
            "invalid memory size {m} MiB: use 128 MiB to 1 TiB"
        )));
    }
    Ok(())
}
