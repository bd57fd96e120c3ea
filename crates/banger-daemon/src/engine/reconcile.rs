//! What a (re)starting daemon does first: make the store agree with what really exists.
//!
//! For every VM the store thinks may have a VMM: a live VMM that is provably ours (pid and start
//! time from the handles file) is re-adopted when the VM was running; anything else is torn
//! down and the VM marked stopped. Runtime dirs that no VM accounts for are removed. A create
//! or delete the previous daemon did not finish (its VM dir still carries the mark it wrote) is
//! rolled back or finished.

use banger_core::{VmId, VmRecord, VmState};
use serde::Serialize;
use tracing::{error, info, warn};

use super::{Engine, Live, join_errors};
use crate::error::{OpError, OpResult};
use crate::handles::Handles;

/// In a VM's state dir while `vm create` builds it (written before the row is inserted, removed
/// once every file is built). Holds the VM's known_hosts names, one a line.
pub(super) const CREATING_MARK: &str = ".creating";
/// In a VM's state dir once `vm delete` is committed (written before the row is deleted, gone
/// with the dir). Holds the VM's known_hosts names, one a line.
pub(super) const DELETING_MARK: &str = ".deleting";

/// What reconciliation did, one line per action (logged and returned by `daemon.status`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReconcileReport {
    pub actions: Vec<String>,
}

impl Engine {
    pub async fn reconcile(&self) -> ReconcileReport {
        // Failpoints (a test facility) are read once, when the daemon starts; this is the
        // first thing a starting daemon does.
        match crate::failpoint::init_from_env() {
            Ok(None) => {}
            Ok(Some(note)) => warn!("{note}"),
            Err(e) => {
                // Only with BANGER_FAILPOINTS_ENABLE=1: a typo must not quietly test nothing.
                error!("{e}");
                eprintln!("bangerd: {e}");
                std::process::exit(2);
            }
        }
        let mut report = ReconcileReport::default();
        // Half-made images and kernels of a daemon that died mid-operation.
        for dir in self.layout().clear_staging() {
            info!(dir = %dir.display(), "removed a staging dir left by an interrupted operation");
        }
        // Scratch trees of builds, pulls and imports a killed daemon left (with mmdebstrap's
        // processes and mounts, for an image build): nothing in build/ is in use yet.
        let (removed, failed) = crate::build_dir::clean_all(&self.layout().build_dir());
        for dir in removed {
            report.actions.push(format!(
                "removed build dir {} left by an interrupted operation",
                dir.display()
            ));
        }
        for e in failed {
            report
                .actions
                .push(format!("could not clean the build dir: {e}"));
        }
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
            let mut recovered = false;
            let handles = match Handles::read(&handles_path) {
                Ok(Some(h)) => Some(h),
                read => {
                    // Unreadable or gone (a truncated file, a deleted VM dir): keep the
                    // evidence and find the VMM by its runtime dir instead of abandoning it.
                    if let Err(e) = read {
                        let kept = super::lost_handles::keep_damaged(&handles_path)
                            .map_or_else(|e| e, |p| format!("kept as {}", p.display()));
                        report.actions.push(format!("VM {}: {e}; {kept}", vm.name));
                    }
                    let found = self.handles_from_marks(&vm);
                    recovered = found.is_some();
                    found
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
            // A VMM found by its marks is stopped, not re-adopted: what else its run held
            // (block devices) is not known without its handles.
            if alive && vm.state == VmState::Running && !recovered {
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
            let mut errors = self.teardown(&vm.id, live.as_ref(), "reconcile").await;
            // A daemon killed between a VMM's fork and the write of its handles file leaves a
            // VMM nothing records; it still names this VM's dirs (or jail), so it is found.
            for pid in crate::leaks::unrecorded_vmms(
                std::path::Path::new("/proc"),
                self.layout(),
                &vm.id,
                std::process::id() as i32,
            ) {
                let start = banger_vmm::process::proc_start_time(pid).unwrap_or(0);
                match banger_vmm::process::signal_process(
                    pid,
                    start,
                    nix::sys::signal::Signal::SIGKILL,
                ) {
                    Ok(_) => {
                        banger_vmm::process::wait_gone(
                            pid,
                            start,
                            std::time::Duration::from_secs(5),
                        )
                        .await;
                        report
                            .actions
                            .push(format!("VM {}: killed unrecorded VMM pid {pid}", vm.name));
                    }
                    Err(e) => errors.push(format!("killing unrecorded VMM pid {pid}: {e}")),
                }
            }
            vm.state = VmState::Stopped;
            let mut note = match (was, alive) {
                (_, true) if recovered => format!(
                    "its handles file was unreadable or missing; its VMM (pid {}, found by its runtime dir) was stopped",
                    live.as_ref()
                        .and_then(|l| l.handles.vmm.as_ref())
                        .map_or(0, |h| h.pid)
                ),
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
        self.finish_marked_vm_dirs(&mut report);
        self.remove_orphan_run_dirs(&mut report);
        for a in &report.actions {
            info!(action = %a, "reconcile");
        }
        report
    }

    /// Writes `mark` (the VM's known_hosts names, one a line) into the VM's state dir, creating
    /// the dir if needed; see [`CREATING_MARK`] and [`DELETING_MARK`].
    pub(super) fn mark_vm_dir(&self, vm: &VmRecord, mark: &str) -> OpResult<()> {
        let dir = self.layout().vm_dir(&vm.id);
        let path = dir.join(mark);
        let mut text = super::ops::known_host_names(vm).join("\n");
        text.push('\n');
        crate::layout::create_private_dir(&dir)
            .and_then(|()| std::fs::write(&path, text))
            .map_err(|e| {
                OpError::failed(format!("VM {}: writing {}: {e}", vm.name, path.display()))
            })
    }

    /// Every VM state dir carrying a create or delete mark belongs to an operation a previous
    /// daemon did not finish: an interrupted create is rolled back (as a failed create is) and
    /// an interrupted delete is finished — row (if still there), known_hosts entry, files.
    fn finish_marked_vm_dirs(&self, report: &mut ReconcileReport) {
        let Ok(entries) = std::fs::read_dir(self.layout().vms_dir()) else {
            return;
        };
        for entry in entries.flatten() {
            let Some(id) = VmId::parse(&entry.file_name().to_string_lossy()) else {
                continue;
            };
            let dir = entry.path();
            let Some((mark, what)) = [
                (CREATING_MARK, "its create was interrupted; rolled it back"),
                (DELETING_MARK, "its delete was interrupted; finished it"),
            ]
            .into_iter()
            .find(|(m, _)| dir.join(m).exists()) else {
                continue;
            };
            if self.live().contains_key(&id) {
                // Cannot happen (a mark never coexists with a run), but never delete a live VM.
                report.actions.push(format!(
                    "VM {id}: running, yet its dir carries {mark}; left alone"
                ));
                continue;
            }
            let mut names: Vec<String> = std::fs::read_to_string(dir.join(mark))
                .unwrap_or_default()
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(str::to_string)
                .collect();
            let mut label = id.to_string();
            match self.store().get_vm(id.as_str()) {
                Ok(Some(vm)) => {
                    label = vm.name.to_string();
                    names.extend(super::ops::known_host_names(&vm));
                    if let Err(e) = self.store().delete_vm(&id) {
                        report.actions.push(format!(
                            "VM {label}: {what}, but deleting its row failed: {e}"
                        ));
                        continue;
                    }
                    self.vms_changed();
                }
                Ok(None) => {}
                Err(e) => {
                    report
                        .actions
                        .push(format!("VM {label}: could not read its row: {e}"));
                    continue;
                }
            }
            let mut errors = Vec::new();
            if !names.is_empty()
                && let Err(e) = self.ssh().remove_known_host(&names)
            {
                errors.push(e.to_string());
            }
            if let Err(e) =
                banger_sys::rmtree::remove_tree_last(&dir, &[std::ffi::OsStr::new(mark)])
            {
                errors.push(format!("removing {}: {e}", dir.display()));
            }
            let mut line = format!("VM {label}: {what}");
            if !errors.is_empty() {
                line.push_str(&format!("; cleanup errors: {}", join_errors(&errors)));
            }
            report.actions.push(line);
        }
    }

    fn remove_orphan_run_dirs(&self, report: &mut ReconcileReport) {
        let root = self.layout().vm_run_root();
        let Ok(entries) = std::fs::read_dir(&root) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(id) = VmId::parse(&name) else {
                // Not a VM's runtime dir: banger did not make it, so it is not banger's to delete.
                continue;
            };
            if self.live().contains_key(&id) {
                continue;
            }
            if let Some(why) = not_a_run_dir(&entry.path()) {
                warn!(path = %entry.path().display(), reason = %why, "left alone: not a VM runtime dir banger made");
                continue;
            }
            match banger_sys::rmtree::remove_tree(&entry.path()) {
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

/// Why `dir` is not a VM runtime dir banger made, if so: a runtime dir is a real directory of
/// the daemon's user, and never holds a VM's disks or records (those live in `<state>/vms`;
/// deleting a runtime dir that held them would lose a VM).
fn not_a_run_dir(dir: &std::path::Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let md = match std::fs::symlink_metadata(dir) {
        Ok(md) => md,
        Err(e) => return Some(e.to_string()),
    };
    if !md.is_dir() {
        return Some("not a directory".into());
    }
    if md.uid() != nix::unistd::geteuid().as_raw() {
        return Some(format!("owned by uid {}", md.uid()));
    }
    const STATE_ONLY: &[&str] = &[
        "root.ext4",
        "work.ext4",
        "handles.json",
        "machine-id",
        "ssh_host_ed25519_key",
    ];
    STATE_ONLY
        .iter()
        .find(|n| dir.join(n).symlink_metadata().is_ok())
        .map(|n| format!("holds {n}, a VM's state"))
}

#[cfg(test)]
mod run_dir_tests {
    use super::not_a_run_dir;

    #[test]
    fn only_bangers_run_dirs_are_deletable() {
        let t = tempfile::tempdir().unwrap();
        let run = t.path().join("0123456789ab");
        std::fs::create_dir(&run).unwrap();
        std::fs::write(run.join("config.img"), b"").unwrap();
        assert_eq!(not_a_run_dir(&run), None);
        // A VM dir of the state dir (reached through a wrong runtime dir) keeps its disks.
        std::fs::write(run.join("root.ext4"), b"disk").unwrap();
        assert!(not_a_run_dir(&run).unwrap().contains("root.ext4"));
        let link = t.path().join("fedcba987654");
        std::os::unix::fs::symlink(t.path(), &link).unwrap();
        assert!(not_a_run_dir(&link).is_some());
    }
}
