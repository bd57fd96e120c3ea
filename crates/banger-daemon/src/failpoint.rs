//! Named failpoints: a **test facility** for crash-recovery tests. Production never arms them.
//!
//! `BANGER_FAILPOINTS` lists points at which the daemon kills itself, for example
//! `crash@start:vmm_spawn:after,crash@delete:remove_files:before`. It is read once, when the
//! daemon starts (reconcile, the first thing a daemon does, calls [`init_from_env`]), and only
//! honoured when `BANGER_FAILPOINTS_ENABLE=1` is set as well; without it the variable is ignored
//! with a warning in the log. With both set, a spec that does not parse, or names a phase or step
//! that does not exist, stops the daemon at start-up: a typo must not quietly test nothing.
//!
//! Grammar: `ACTION@PHASE:STEP:WHEN`, comma separated.
//! - ACTION: `crash` — `kill(getpid(), SIGKILL)`: a real SIGKILL (no unwinding, no destructors,
//!   no log flush), exactly what an OOM kill or `kill -9` does.
//! - PHASE and STEP: one of [`PHASES`] and one of that phase's steps.
//! - WHEN: `before` or `after` the step's work.
//!
//! [`hit`] is called at every step boundary of create, start, stop and delete; while nothing is
//! armed it costs one relaxed atomic load. The step lists are public so the crash test
//! enumerates them: a listed step without a [`hit`] makes that test fail (the daemon does not
//! die), and a [`hit`] of a listed phase with an unlisted step aborts an armed daemon (SIGABRT,
//! not SIGKILL), so no step is silently missed either way.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

/// The variable naming the failpoints.
pub const ENV: &str = "BANGER_FAILPOINTS";
/// Must be `1` for [`ENV`] to be honoured.
pub const ENABLE_ENV: &str = "BANGER_FAILPOINTS_ENABLE";

/// `vm create` (`engine/create.rs`), in order. `allocate` ends with the row inserted (and the
/// VM's dir marked as being created); `commit` removes that mark: a create cut off before
/// `commit` is rolled back by the next daemon's reconcile. The start that follows (unless
/// `--no-start`) is the `start` phase.
pub const CREATE_STEPS: &[&str] = &[
    "validate",
    "image",
    "kernel",
    "allocate",
    "root_disk",
    "work_disk",
    "machine_id",
    "host_key",
    "known_host",
    "commit",
];

/// What a teardown (stop, kill, delete, reconcile, a VMM exit) releases, in order; the stop and
/// delete phases name these steps too.
pub const TEARDOWN_STEPS: &[&str] = &[
    "vmm_kill",
    "block_release",
    "nat_remove",
    "tap_delete",
    "run_dir_remove",
    "handles_remove",
];

/// `vm stop` (`engine/ops.rs`), in order: the state saved as `stopping`, the guest asked to
/// power off over ssh (bridged VMs), the VMM's own shutdown request and wait, the teardown,
/// the state saved as `stopped`.
pub const STOP_STEPS: &[&str] = &[
    "mark_stopping",
    "guest_poweroff",
    "vmm_shutdown",
    "vmm_kill",
    "block_release",
    "nat_remove",
    "tap_delete",
    "run_dir_remove",
    "handles_remove",
    "mark_stopped",
];

/// `vm delete` (`engine/ops.rs`), in order: the teardown (only for a VM that may have a VMM,
/// i.e. `--force` on a running one), then the VM's dir marked as being deleted (the point of no
/// return: a delete cut off after it is finished by the next daemon's reconcile), the row
/// deleted, the known_hosts entry removed, the files removed.
pub const DELETE_STEPS: &[&str] = &[
    "vmm_kill",
    "block_release",
    "nat_remove",
    "tap_delete",
    "run_dir_remove",
    "handles_remove",
    "mark_deleting",
    "delete_row",
    "known_host",
    "remove_files",
];

/// Every phase failpoints can name, with its steps in order.
pub const PHASES: &[(&str, &[&str])] = &[
    ("create", CREATE_STEPS),
    ("start", crate::engine::START_STEPS),
    ("stop", STOP_STEPS),
    ("delete", DELETE_STEPS),
];

/// What a failpoint does when hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// SIGKILL to the daemon itself.
    Crash,
}

/// One armed failpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failpoint {
    pub action: Action,
    pub phase: String,
    pub step: String,
    pub after: bool,
}

impl std::fmt::Display for Failpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let action = match self.action {
            Action::Crash => "crash",
        };
        let when = if self.after { "after" } else { "before" };
        write!(f, "{action}@{}:{}:{when}", self.phase, self.step)
    }
}

/// Whether `step` is one of `phase`'s steps.
pub fn is_known(phase: &str, step: &str) -> bool {
    PHASES
        .iter()
        .any(|(p, steps)| *p == phase && steps.contains(&step))
}

/// Parses a [`ENV`] value; every entry must name a known phase and step.
pub fn parse(spec: &str) -> Result<Vec<Failpoint>, String> {
    let mut out = Vec::new();
    for entry in spec.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let bad = |why: String| format!("{ENV}: bad entry {entry:?}: {why}");
        let (action, point) = entry
            .split_once('@')
            .ok_or_else(|| bad("expected ACTION@PHASE:STEP:WHEN".into()))?;
        let action = match action {
            "crash" => Action::Crash,
            other => return Err(bad(format!("unknown action {other:?} (known: crash)"))),
        };
        let mut parts = point.split(':');
        let (Some(phase), Some(step), Some(when), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad("expected ACTION@PHASE:STEP:WHEN".into()));
        };
        let Some((_, steps)) = PHASES.iter().find(|(p, _)| *p == phase) else {
            let known: Vec<&str> = PHASES.iter().map(|(p, _)| *p).collect();
            return Err(bad(format!(
                "unknown phase {phase:?} (known: {})",
                known.join(", ")
            )));
        };
        if !steps.contains(&step) {
            return Err(bad(format!(
                "{phase} has no step {step:?} (its steps: {})",
                steps.join(", ")
            )));
        }
        let after = match when {
            "before" => false,
            "after" => true,
            other => return Err(bad(format!("expected before or after, not {other:?}"))),
        };
        out.push(Failpoint {
            action,
            phase: phase.to_string(),
            step: step.to_string(),
            after,
        });
    }
    Ok(out)
}

static ARMED: AtomicBool = AtomicBool::new(false);
static POINTS: OnceLock<Vec<Failpoint>> = OnceLock::new();
static INIT: OnceLock<Result<Option<String>, String>> = OnceLock::new();

/// Reads [`ENV`] and [`ENABLE_ENV`], once per process (later calls return the first outcome).
/// `Ok(None)`: nothing configured; `Ok(Some(note))`: something to log (armed, or ignored
/// because [`ENABLE_ENV`] is not `1`); `Err`: armed but invalid — the daemon must not start.
pub fn init_from_env() -> Result<Option<String>, String> {
    INIT.get_or_init(|| {
        let spec = std::env::var(ENV).ok().filter(|s| !s.trim().is_empty());
        let Some(spec) = spec else {
            return Ok(None);
        };
        if std::env::var(ENABLE_ENV).as_deref() != Ok("1") {
            return Ok(Some(format!(
                "{ENV} is set but ignored: failpoints are a test facility and need {ENABLE_ENV}=1"
            )));
        }
        let points = parse(&spec)?;
        let shown: Vec<String> = points.iter().map(|p| p.to_string()).collect();
        let note = format!(
            "failpoints armed (test facility): {}",
            if shown.is_empty() {
                "none".to_string()
            } else {
                shown.join(", ")
            }
        );
        if !points.is_empty() && POINTS.set(points).is_ok() {
            ARMED.store(true, Ordering::Release);
        }
        Ok(Some(note))
    })
    .clone()
}

/// A step boundary: `after == false` just before `phase`'s `step` does its work, `true` just
/// after. Does nothing unless a failpoint is armed.
#[inline]
pub fn hit(phase: &str, step: &str, after: bool) {
    if !ARMED.load(Ordering::Relaxed) {
        return;
    }
    hit_armed(phase, step, after);
}

#[cold]
#[inline(never)]
fn hit_armed(phase: &str, step: &str, after: bool) {
    if PHASES.iter().any(|(p, _)| *p == phase) && !is_known(phase, step) {
        // A boundary the step lists do not name: the crash test could never reach it.
        eprintln!("bangerd: failpoint {phase}:{step} is not in failpoint::PHASES; aborting");
        std::process::abort();
    }
    let Some(points) = POINTS.get() else {
        return;
    };
    if let Some(fp) = points
        .iter()
        .find(|p| p.phase == phase && p.step == step && p.after == after)
    {
        match fp.action {
            Action::Crash => crash(fp),
        }
    }
}

fn crash(fp: &Failpoint) -> ! {
    eprintln!("bangerd: failpoint {fp}: SIGKILL to self");
    // SAFETY: kill(2) on our own pid; SIGKILL cannot be caught, so this does not return in
    // any meaningful sense.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
    // The signal is delivered before kill(2) returns to a single-threaded caller and within
    // moments to a multi-threaded one; never run on past the failpoint meanwhile.
    loop {
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_entries_and_names_what_is_wrong() {
        let fps =
            parse(" crash@start:vmm_spawn:after, crash@delete:remove_files:before ,").unwrap();
        assert_eq!(
            fps,
            vec![
                Failpoint {
                    action: Action::Crash,
                    phase: "start".into(),
                    step: "vmm_spawn".into(),
                    after: true
                },
                Failpoint {
                    action: Action::Crash,
                    phase: "delete".into(),
                    step: "remove_files".into(),
                    after: false
                },
            ]
        );
        assert_eq!(fps[0].to_string(), "crash@start:vmm_spawn:after");
        assert!(parse("").unwrap().is_empty());
        for (bad, why) in [
            ("crash", "ACTION@PHASE:STEP:WHEN"),
            ("panic@start:vmm_spawn:after", "unknown action"),
            ("crash@boot:vmm_spawn:after", "unknown phase"),
            ("crash@start:vmm_spwan:after", "no step"),
            ("crash@start:vmm_spawn:during", "before or after"),
            ("crash@start:vmm_spawn", "ACTION@PHASE:STEP:WHEN"),
            ("crash@start:vmm_spawn:after:x", "ACTION@PHASE:STEP:WHEN"),
        ] {
            let e = parse(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
            assert!(e.contains(ENV), "{bad}: {e}");
        }
    }

    #[test]
    fn step_lists_are_unique_and_share_the_teardown() {
        for (phase, steps) in PHASES {
            let set: std::collections::HashSet<_> = steps.iter().collect();
            assert_eq!(set.len(), steps.len(), "{phase} repeats a step");
        }
        let at = |steps: &[&str]| {
            steps
                .windows(TEARDOWN_STEPS.len())
                .any(|w| w == TEARDOWN_STEPS)
        };
        assert!(at(STOP_STEPS) && at(DELETE_STEPS));
        assert!(is_known("start", "guest_ready") && !is_known("start", "nope"));
    }

    #[test]
    fn unarmed_hits_do_nothing() {
        // The unit-test process never arms failpoints (it never calls init_from_env).
        hit("start", "vmm_spawn", true);
        hit("create", "no_such_step", false);
    }
}
