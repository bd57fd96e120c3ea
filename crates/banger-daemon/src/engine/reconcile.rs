//! What a (re)starting daemon does first: make the store agree with what really exists.
//!
//! For every VM the store thinks may have a VMM: a live VMM that is provably ours (pid and start
//! time from the handles file) is re-adopted when the VM was running; anything else is torn
//! down and the VM marked stopped. Runtime dirs that no VM accounts for are removed.

use banger_core::{VmId, VmState};
use serde::Serialize;
use tracing::{info, warn};

use super::{Engine, Live, join_errors};
use crate::handles::Handles;

/// What reconciliation did, one line per action (logged and returned by `daemon.status`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReconcileReport {
    pub actions: Vec<String>,
}

impl Engine {
    pub async fn reconcile(&self) -> ReconcileReport {
        let mut report = ReconcileReport::default();
        let vms = match self.store().list_vms() {
            Ok(v) => v,
            Err(e) => {
                report.actions.push(format!("could not list VMs: {e}"));
                return report;
            }
        };
        for mut vm in vms {
            if !vm.state.may_have_vmm() {
                continue;
            }
            let lock = self.vm_lock(&vm.id);
            let _guard = lock.lock().await;
            let handles_path = self.layout().handles_file(&vm.id);
            let handles = match Handles::read(&handles_path) {
                Ok(h) => h,
                Err(e) => {
                    report
                        .actions
                        .push(format!("VM {}: {e}; treating its VMM as gone", vm.name));
                    None
                }
            };
            let vmm = handles
                .as_ref()
                .and_then(|h| h.vmm.as_ref())
                .and_then(|h| self.inner.vmms.for_kind(h.kind));
            let alive = match (&handles, &vmm) {
                (Some(Handles { vmm: Some(h), .. }), Some(v)) => v.is_alive(h),
                _ => false,
            };
            let live = handles.map(|h| Live {
                handles: h,
                generation: self.next_generation(),
            });
            if alive && vm.state == VmState::Running {
                let live = live.expect("alive implies handles");
                let handle = live
                    .handles
                    .vmm
                    .clone()
                    .expect("alive implies a VMM handle");
                self.live().insert(vm.id.clone(), live.clone());
                self.watch_exit(
                    vm.id.clone(),
                    vmm.clone().expect("alive implies a backend"),
                    handle.clone(),
                    live.generation,
                );
                report.actions.push(format!(
                    "VM {}: re-adopted running VMM pid {}",
                    vm.name, handle.pid
                ));
                continue;
            }
            let was = vm.state;
            let errors = self.teardown(&vm.id, live.as_ref()).await;
            vm.state = VmState::Stopped;
            let mut note = match (was, alive) {
                (VmState::Running, _) => "its VMM died while the daemon was away".to_string(),
                (s, true) => format!("the daemon died while the VM was {s}; its VMM was killed"),
                (s, false) => format!("the daemon died while the VM was {s}"),
            };
            if !errors.is_empty() {
                note.push_str(&format!("; cleanup errors: {}", join_errors(&errors)));
            }
            report
                .actions
                .push(format!("VM {}: marked stopped: {note}", vm.name));
            vm.last_error = Some(note);
            if let Err(e) = self.save(&mut vm) {
                report
                    .actions
                    .push(format!("VM {}: could not save: {e}", vm.name));
            }
        }
        self.remove_orphan_run_dirs(&mut report);
        for a in &report.actions {
            info!(action = %a, "reconcile");
        }
        report
    }

    fn remove_orphan_run_dirs(&self, report: &mut ReconcileReport) {
        let root = self.layout().vm_run_root();
        let Ok(entries) = std::fs::read_dir(&root) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let keep = VmId::parse(&name).is_some_and(|id| self.live().contains_key(&id));
            if keep {
                continue;
            }
            match std::fs::remove_dir_all(entry.path()) {
                Ok(()) => report.actions.push(format!(
                    "removed stale runtime dir {}",
                    entry.path().display()
                )),
                Err(e) => {
                    warn!(path = %entry.path().display(), error = %e, "could not remove stale runtime dir")
                }
            }
        }
    }
}
