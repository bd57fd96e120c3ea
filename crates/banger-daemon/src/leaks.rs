//! The leak checker: every host resource carrying banger's marks that no VM of this store
//! accounts for. Used by `daemon.leaks` (and so `banger doctor`) and by tests.
//!
//! It only reads: `/proc` (process command lines and start times, `self/mountinfo`), `/sys`
//! (loop backing files, device-mapper names, tap masters), `ip`/`nft` listings through
//! [`NetOps`], the store and the handles files. It never removes anything.
//!
//! What accounts for a resource: a VM of the store in a state that may hold host resources
//! (`starting`, `running`, `stopping`: the last two of these are operations in flight), and,
//! for the things a run holds (VMM process, loop devices, mapper), its handles file naming it.
//! Processes the daemon itself spawned (its children: an operation in progress) are never
//! leaks. Resources of other banger installations on the same host are left out where they can
//! be told apart: taps on another bridge, mappers whose loops back files outside this state dir.

use std::collections::{BTreeMap, HashSet};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use banger_config::NetworkMode;
use banger_core::{VmId, VmRecord, VmState};
use banger_net::{NetOps, TapName};

pub use banger_protocol::{Leak, LeakKind, LeakReport};

use crate::engine::Engine;
use crate::handles::{BlockResource, Handles};
use crate::layout::Layout;

/// Where the kernel's pseudo filesystems are, so tests can point the checker at fixtures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRoots {
    /// `/proc`.
    pub proc: PathBuf,
    /// `/sys`.
    pub sys: PathBuf,
}

impl Default for HostRoots {
    fn default() -> Self {
        HostRoots {
            proc: PathBuf::from("/proc"),
            sys: PathBuf::from("/sys"),
        }
    }
}

/// Why a host listing could not be read; names the input.
#[derive(Debug, thiserror::Error)]
pub enum LeakError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} line {line}: {reason}")]
    Parse {
        path: PathBuf,
        line: usize,
        reason: String,
    },
}

/// The leaks of `engine`'s store on this host, with the real `/proc` and `/sys`.
pub async fn find_leaks(engine: &Engine, net: &dyn NetOps) -> Vec<Leak> {
    check(engine, net, &HostRoots::default()).await.leaks
}

/// `daemon.leaks`: the daemon's own network operations (direct or through the root helper, as
/// in [`crate::run`]) and the real `/proc` and `/sys`.
pub async fn host_report(engine: &Engine) -> LeakReport {
    let net = engine.net().clone();
    check(engine, net.as_ref(), &HostRoots::default()).await
}

/// Every leak found, sorted, plus the checks that could not run and why.
pub async fn check(engine: &Engine, net: &dyn NetOps, roots: &HostRoots) -> LeakReport {
    let mut report = LeakReport::default();
    let vms = match engine.store().list_vms() {
        Ok(v) => v,
        Err(e) => {
            report
                .unchecked
                .push(format!("everything: cannot list the store's VMs: {e}"));
            return report;
        }
    };
    let acct = Accounting::new(engine.layout(), &vms, &mut report.unchecked);
    let layout = engine.layout();
    let config = engine.config();

    if config.network == NetworkMode::Bridge {
        check_taps(net, &config.bridge_name, &acct, roots, &mut report).await;
        check_nat(net, &acct, &mut report).await;
    } else {
        report.unchecked.push(
            "taps and NAT rules: network = \"none\" in the config, so this daemon makes none"
                .into(),
        );
    }
    let dirs = VmDirs::new(layout);
    match processes(&roots.proc, &dirs, &acct, std::process::id() as i32) {
        Ok(l) => report.leaks.extend(l),
        Err(e) => report.unchecked.push(format!("processes: {e}")),
    }
    match block_devices(&roots.sys, &dirs.state_roots, &acct) {
        Ok(l) => report.leaks.extend(l),
        Err(e) => report
            .unchecked
            .push(format!("loop and mapper devices: {e}")),
    }
    let mountinfo = roots.proc.join("self/mountinfo");
    match std::fs::read_to_string(&mountinfo) {
        Ok(text) => match parse_mountinfo(&text, &mountinfo) {
            Ok(mounts) => report
                .leaks
                .extend(mount_leaks(&mounts, &dirs.mount_roots())),
            Err(e) => report.unchecked.push(format!("mounts: {e}")),
        },
        Err(source) => report.unchecked.push(format!(
            "mounts: {}",
            LeakError::Read {
                path: mountinfo,
                source
            }
        )),
    }
    report.leaks.extend(dir_leaks(layout, &acct));
    report.leaks.extend(jail_leaks(&dirs, &acct));
    report
        .leaks
        .extend(build_leaks(&layout.build_dir(), std::process::id()));
    report.leaks.extend(temp_repo_leaks(
        &roots.proc,
        &config.cache_dir.join("workspaces/tmp"),
    ));
    report.leaks.sort();
    report.leaks.dedup();
    report
}

/// What the store says: every VM id, and the handles of those that may hold host resources.
#[derive(Debug, Default)]
struct Accounting {
    states: BTreeMap<String, VmState>,
    /// Handles of VMs in a state that may hold a VMM, when readable.
    held: BTreeMap<String, Option<Handles>>,
}

impl Accounting {
    fn new(layout: &Layout, vms: &[VmRecord], unchecked: &mut Vec<String>) -> Self {
        let mut a = Accounting::default();
        for vm in vms {
            a.states.insert(vm.id.to_string(), vm.state);
            if vm.state.may_have_vmm() {
                let handles = match Handles::read(&layout.handles_file(&vm.id)) {
                    Ok(h) => h,
                    Err(e) => {
                        unchecked.push(format!("VM {}: {e}", vm.name));
                        None
                    }
                };
                a.held.insert(vm.id.to_string(), handles);
            }
        }
        a
    }

    fn is_held(&self, id: &str) -> bool {
        self.held.contains_key(id)
    }

    /// Why a VM id does not account for a resource, in words.
    fn why_not(&self, id: &str) -> String {
        match self.states.get(id) {
            None => format!("VM {id} is not in the store"),
            Some(s) => format!("VM {id} is {s}"),
        }
    }

    fn block_held(&self, r: &BlockResource) -> bool {
        self.held
            .values()
            .flatten()
            .any(|h| h.block.iter().any(|b| b == r))
    }

    /// Whether `pid` started at `start_time` is the recorded VMM of held VM `id`.
    fn is_vmm(&self, id: &str, pid: i32, start_time: Option<u64>) -> bool {
        self.held
            .get(id)
            .and_then(|h| h.as_ref())
            .and_then(|h| h.vmm.as_ref())
            .is_some_and(|v| v.pid == pid && Some(v.start_time) == start_time)
    }
}

async fn check_taps(
    net: &dyn NetOps,
    bridge: &str,
    acct: &Accounting,
    roots: &HostRoots,
    report: &mut LeakReport,
) {
    let taps = match net.list_taps().await {
        Ok(t) => t,
        Err(e) => {
            report.unchecked.push(format!("taps: {e}"));
            return;
        }
    };
    for tap in taps {
        if tap.is_pool() {
            continue;
        }
        let master = tap_master(&roots.sys, &tap);
        if master.as_deref().is_some_and(|m| m != bridge) {
            // On another banger bridge: another installation's tap.
            continue;
        }
        let id = tap.as_str().strip_prefix(TapName::PREFIX).unwrap_or("");
        if VmId::parse(id).is_some() && acct.is_held(id) {
            continue;
        }
        let place = match &master {
            Some(m) => format!("on bridge {m}"),
            None => "on no bridge".to_string(),
        };
        let why = if VmId::parse(id).is_some() {
            acct.why_not(id)
        } else {
            "its name holds no VM id".to_string()
        };
        report.leaks.push(Leak {
            kind: LeakKind::Tap,
            name: tap.to_string(),
            detail: format!("tap {place}; {why}"),
        });
    }
}

/// The bridge a tap is a port of, from `<sys>/class/net/<tap>/master`.
fn tap_master(sys: &Path, tap: &TapName) -> Option<String> {
    std::fs::read_link(sys.join("class/net").join(tap.as_str()).join("master"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
}

async fn check_nat(net: &dyn NetOps, acct: &Accounting, report: &mut LeakReport) {
    match net.list_nat_vms().await {
        Ok(ids) => {
            for id in ids {
                if acct.is_held(&id) {
                    continue;
                }
                report.leaks.push(Leak {
                    kind: LeakKind::NatRule,
                    detail: format!(
                        "nftables rules commented banger:{id} in table ip banger; {}",
                        acct.why_not(&id)
                    ),
                    name: id,
                });
            }
        }
        Err(e) => report.unchecked.push(format!("NAT rules: {e}")),
    }
}

/// The `vms` directories a VM's paths live under, as the daemon writes them and canonical.
#[derive(Debug, Clone)]
struct VmDirs {
    /// `<state_dir>/vms/` and `<runtime_dir>/vms/` (both spellings), for command lines.
    vm_roots: Vec<String>,
    /// The state dir (both spellings), for loop backing files.
    state_roots: Vec<PathBuf>,
    /// The runtime dir (both spellings).
    runtime_roots: Vec<PathBuf>,
    /// `<state_dir>/jail`: the jailer's chroot base, `<base>/<exec name>/<VM id>/root`.
    jail_base: PathBuf,
}

impl VmDirs {
    fn new(layout: &Layout) -> Self {
        let both = |p: &Path| {
            let mut v = vec![p.to_path_buf()];
            if let Ok(c) = std::fs::canonicalize(p)
                && c != p
            {
                v.push(c);
            }
            v
        };
        let state_roots = both(&layout.state_dir);
        let runtime_roots = both(&layout.runtime_dir);
        let vm_roots = state_roots
            .iter()
            .chain(&runtime_roots)
            .map(|d| format!("{}/", d.join("vms").display()))
            .collect();
        VmDirs {
            vm_roots,
            state_roots,
            runtime_roots,
            jail_base: layout.state_dir.join("jail"),
        }
    }

    /// Whether a jail of VM `id` exists under this state dir.
    fn jail_has(&self, id: &str) -> bool {
        std::fs::read_dir(&self.jail_base)
            .is_ok_and(|rd| rd.flatten().any(|e| e.path().join(id).exists()))
    }

    /// The jails (`<base>/<exec name>/<id>`) under this state dir, as (id, path).
    fn jails(&self) -> Vec<(String, PathBuf)> {
        let mut out = Vec::new();
        let Ok(rd) = std::fs::read_dir(&self.jail_base) else {
            return out;
        };
        for exec in rd.flatten() {
            if let Ok(ids) = std::fs::read_dir(exec.path()) {
                out.extend(
                    ids.flatten()
                        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path())),
                );
            }
        }
        out
    }

    /// Where a mount is banger's leak: under the state dir (build trees, jails, VM dirs) or
    /// under the runtime dir's per-VM area. Not the whole runtime dir: inside a banger guest it
    /// is `/run/banger`, where the guest agent mounts the image and upper disk of the guest
    /// itself (`/run/banger/lower`, `/run/banger/upper`).
    fn mount_roots(&self) -> Vec<PathBuf> {
        self.state_roots
            .iter()
            .cloned()
            .chain(self.runtime_roots.iter().map(|r| r.join("vms")))
            .collect()
    }
}

/// The VM ids a NUL-separated command line names under any of `vm_roots` (each ending in `/`):
/// `<root><12 hex>` followed by the end of the argument or a character that cannot continue an
/// id. Matches inside arguments too (`--api-sock=…`, `file=…,format=raw`). Sorted, unique.
pub fn vm_ids_in_cmdline(cmdline: &[u8], vm_roots: &[String]) -> Vec<String> {
    let mut ids = Vec::new();
    for arg in cmdline.split(|b| *b == 0) {
        let arg = String::from_utf8_lossy(arg);
        for root in vm_roots {
            let mut rest: &str = &arg;
            while let Some(at) = rest.find(root.as_str()) {
                let after = &rest[at + root.len()..];
                let end = after
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
                    .unwrap_or(after.len());
                if let Some(id) = VmId::parse(&after[..end]) {
                    ids.push(id.to_string());
                }
                rest = after;
            }
        }
    }
    ids.sort();
    ids.dedup();
    ids
}

/// The VM id a jailed Firecracker (or its jailer, before it execs Firecracker) serves: its
/// program is named `firecracker…` or `jailer…` and its arguments hold `--id <VM id>`. Its
/// command line names no banger directory (inside the jail the API socket is
/// `/run/firecracker.socket`), so this is how it is recognised.
pub fn jailed_vm_id(cmdline: &[u8]) -> Option<String> {
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let prog = Path::new(std::ffi::OsStr::from_bytes(args.first()?))
        .file_name()?
        .to_string_lossy()
        .into_owned();
    if !(prog.contains("firecracker") || prog.contains("jailer")) {
        return None;
    }
    args.windows(2)
        .find(|w| w[0] == b"--id")
        .and_then(|w| VmId::parse(&String::from_utf8_lossy(w[1])))
        .map(|id| id.to_string())
}

/// Processes that serve VM `id` of this installation without being recorded anywhere: their
/// command line names the VM's state or runtime dir, or they are a jailed Firecracker for it
/// (see [`jailed_vm_id`]) with a jail under this state dir. A daemon killed between a VMM's
/// fork and the write of its handles file leaves such a process; reconcile kills them.
pub fn unrecorded_vmms(proc_root: &Path, layout: &Layout, id: &VmId, me: i32) -> Vec<i32> {
    let dirs = VmDirs::new(layout);
    let Ok(entries) = std::fs::read_dir(proc_root) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            let Ok(cmdline) = std::fs::read(proc_root.join(pid.to_string()).join("cmdline")) else {
                return false;
            };
            vm_ids_in_cmdline(&cmdline, &dirs.vm_roots).contains(&id.to_string())
                || jailed_vm_id(&cmdline).is_some_and(|j| j == id.as_str() && dirs.jail_has(&j))
        })
        .collect()
}

/// Parent pid (field 4) and start time (field 22) from the text of `/proc/PID/stat`.
pub fn parse_stat_ppid_start(text: &str) -> Option<(i32, u64)> {
    let stat = banger_vmm::process::parse_stat(text)?;
    let rest = &text[text.rfind(')')? + 1..];
    // Field 3 (state) comes first after the comm, so the parent pid is the second.
    let ppid = rest.split_whitespace().nth(1)?.parse().ok()?;
    Some((ppid, stat.start_time))
}

fn processes(
    proc_root: &Path,
    dirs: &VmDirs,
    acct: &Accounting,
    me: i32,
) -> Result<Vec<Leak>, LeakError> {
    let entries = std::fs::read_dir(proc_root).map_err(|source| LeakError::Read {
        path: proc_root.to_path_buf(),
        source,
    })?;
    let mut leaks = Vec::new();
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        // A process can exit at any moment: what cannot be read is skipped.
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let mut ids = vm_ids_in_cmdline(&cmdline, &dirs.vm_roots);
        // A jailed Firecracker names no banger dir; it is ours when its jail is.
        if let Some(id) = jailed_vm_id(&cmdline)
            && dirs.jail_has(&id)
        {
            ids.push(id);
        }
        if ids.is_empty() {
            continue;
        }
        let stat = std::fs::read_to_string(entry.path().join("stat"))
            .ok()
            .and_then(|s| parse_stat_ppid_start(&s));
        if stat.is_some_and(|(ppid, _)| ppid == me) {
            // Spawned by this daemon: an operation in progress, or a VMM it supervises.
            continue;
        }
        let start = stat.map(|(_, s)| s);
        for id in ids {
            if acct.is_vmm(&id, pid, start) {
                continue;
            }
            let why = match acct.held.get(&id) {
                Some(Some(h)) => match &h.vmm {
                    Some(v) => format!("VM {id}'s VMM is pid {}", v.pid),
                    None => format!("VM {id} records no VMM"),
                },
                Some(None) => format!("VM {id} has no handles file"),
                None => acct.why_not(&id),
            };
            let shown = String::from_utf8_lossy(&cmdline)
                .replace('\0', " ")
                .trim()
                .chars()
                .take(160)
                .collect::<String>();
            leaks.push(Leak {
                kind: LeakKind::Process,
                name: pid.to_string(),
                detail: format!("pid {pid} ({shown}); {why}"),
            });
        }
    }
    Ok(leaks)
}

/// The backing file of a loop device from the text of `<sys>/block/loopN/loop/backing_file`:
/// one line, with ` (deleted)` appended by the kernel when the file was unlinked. The flag
/// says whether it was.
pub fn parse_backing_file(text: &str) -> Option<(PathBuf, bool)> {
    let line = text.lines().next()?.trim_end();
    if line.is_empty() {
        return None;
    }
    match line.strip_suffix(" (deleted)") {
        Some(p) => Some((PathBuf::from(p), true)),
        None => Some((PathBuf::from(line), false)),
    }
}

fn under_any(path: &Path, roots: &[PathBuf]) -> bool {
    roots.iter().any(|r| path.starts_with(r) && path != r)
}

/// `loopN` → its backing file, for every attached loop device under `<sys>/block`.
fn loop_backings(sys: &Path) -> Result<BTreeMap<String, (PathBuf, bool)>, LeakError> {
    let block = sys.join("block");
    let entries = std::fs::read_dir(&block).map_err(|source| LeakError::Read {
        path: block.clone(),
        source,
    })?;
    let mut out = BTreeMap::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        // Detached loop devices have no backing_file.
        if let Ok(text) = std::fs::read_to_string(e.path().join("loop/backing_file"))
            && let Some(b) = parse_backing_file(&text)
        {
            out.insert(name, b);
        }
    }
    Ok(out)
}

fn block_devices(
    sys: &Path,
    state_roots: &[PathBuf],
    acct: &Accounting,
) -> Result<Vec<Leak>, LeakError> {
    let loops = loop_backings(sys)?;
    let mut leaks = Vec::new();
    for (name, (file, deleted)) in &loops {
        if !under_any(file, state_roots) {
            continue;
        }
        let dev = format!("/dev/{name}");
        if acct.block_held(&BlockResource::Loop(dev.clone())) {
            continue;
        }
        leaks.push(Leak {
            kind: LeakKind::Loop,
            name: dev,
            detail: format!(
                "backs {}{}; no running VM holds it",
                file.display(),
                if *deleted { " (deleted)" } else { "" }
            ),
        });
    }
    let block = sys.join("block");
    let entries = std::fs::read_dir(&block).map_err(|source| LeakError::Read {
        path: block.clone(),
        source,
    })?;
    for e in entries.flatten() {
        let dm = e.file_name().to_string_lossy().into_owned();
        if !dm.starts_with("dm-") {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(e.path().join("dm/name")) else {
            continue;
        };
        let mapper = text.trim().to_string();
        let Some(id) = mapper.strip_prefix("banger-") else {
            continue;
        };
        if acct.block_held(&BlockResource::Mapper(mapper.clone())) {
            continue;
        }
        // Ours when the store knows the id or one of its loops backs a file of this state dir;
        // otherwise another installation's.
        let slaves: Vec<String> = std::fs::read_dir(e.path().join("slaves"))
            .map(|rd| {
                rd.flatten()
                    .map(|s| s.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        let ours_by_loop = slaves
            .iter()
            .any(|s| loops.get(s).is_some_and(|(f, _)| under_any(f, state_roots)));
        if !ours_by_loop && !acct.states.contains_key(id) {
            continue;
        }
        leaks.push(Leak {
            kind: LeakKind::Mapper,
            name: format!("/dev/mapper/{mapper}"),
            detail: format!(
                "device-mapper {dm} over {}; {}",
                if slaves.is_empty() {
                    "no devices".to_string()
                } else {
                    slaves.join(", ")
                },
                acct.why_not(id)
            ),
        });
    }
    Ok(leaks)
}

/// One line of `/proc/PID/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_point: PathBuf,
    pub fstype: String,
    pub source: String,
}

/// Parses mountinfo text: `ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS [OPTIONAL…] - FSTYPE SOURCE
/// SUPEROPTS`. `path` only names the input in errors.
pub fn parse_mountinfo(text: &str, path: &Path) -> Result<Vec<MountEntry>, LeakError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let err = |reason: &str| LeakError::Parse {
            path: path.to_path_buf(),
            line: i + 1,
            reason: reason.to_string(),
        };
        let fields: Vec<&str> = line.split(' ').collect();
        if fields.len() < 6 {
            return Err(err("fewer than 6 fields"));
        }
        let sep = fields
            .iter()
            .skip(6)
            .position(|f| *f == "-")
            .map(|p| p + 6)
            .ok_or_else(|| err("no \" - \" separator"))?;
        let fstype = fields
            .get(sep + 1)
            .ok_or_else(|| err("no filesystem type"))?;
        let source = fields.get(sep + 2).copied().unwrap_or("");
        out.push(MountEntry {
            mount_point: banger_sys::mounts::unescape(fields[4]),
            fstype: banger_sys::mounts::unescape(fstype)
                .to_string_lossy()
                .into_owned(),
            source: banger_sys::mounts::unescape(source)
                .to_string_lossy()
                .into_owned(),
        });
    }
    Ok(out)
}

/// Mounts strictly under one of `roots` (a state or runtime dir that is itself a mount point
/// is the user's choice, not a leak).
pub fn mount_leaks(mounts: &[MountEntry], roots: &[PathBuf]) -> Vec<Leak> {
    mounts
        .iter()
        .filter(|m| under_any(&m.mount_point, roots))
        .map(|m| Leak {
            kind: LeakKind::Mount,
            name: m.mount_point.display().to_string(),
            detail: format!(
                "{} mount of {} under banger's directories",
                m.fstype, m.source
            ),
        })
        .collect()
}

/// Jails (`<state>/jail/<exec>/<id>`) of VMs that are not running (the jail is removed with
/// the VMM).
fn jail_leaks(dirs: &VmDirs, acct: &Accounting) -> Vec<Leak> {
    dirs.jails()
        .into_iter()
        .filter(|(id, _)| !acct.is_held(id))
        .map(|(id, path)| Leak {
            kind: LeakKind::Dir,
            name: path.display().to_string(),
            detail: format!("jail of VM {id}; {}", acct.why_not(&id)),
        })
        .collect()
}

/// Entries of `<state>/build` made by another daemon process than `me` (each operation names
/// its scratch entry `<what>.<daemon pid>[.ext]`): a daemon that died left them; the next
/// daemon's reconcile removes them.
pub fn build_leaks(build: &Path, me: u32) -> Vec<Leak> {
    let Ok(rd) = std::fs::read_dir(build) else {
        return Vec::new();
    };
    let mine = me.to_string();
    rd.flatten()
        .filter(|e| {
            !e.file_name()
                .to_string_lossy()
                .split('.')
                .any(|part| part == mine)
        })
        .map(|e| Leak {
            kind: LeakKind::Dir,
            name: e.path().display().to_string(),
            detail: "build scratch of an operation no running daemon does".into(),
        })
        .collect()
}

/// The CLI's temporary repositories (`<cache>/workspaces/tmp/banger-ws.<pid>.*`) whose CLI
/// process is gone (the next `vm run` sweeps them).
pub fn temp_repo_leaks(proc_root: &Path, dir: &Path) -> Vec<Leak> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let pid: u32 = name
                .strip_prefix("banger-ws.")?
                .split('.')
                .next()?
                .parse()
                .ok()?;
            (!proc_root.join(pid.to_string()).exists()).then(|| Leak {
                kind: LeakKind::Dir,
                name: e.path().display().to_string(),
                detail: format!(
                    "temporary workspace repository of banger process {pid}, which is gone"
                ),
            })
        })
        .collect()
}

fn dir_leaks(layout: &Layout, acct: &Accounting) -> Vec<Leak> {
    let mut leaks = Vec::new();
    let list = |dir: &Path| -> Vec<(String, PathBuf)> {
        std::fs::read_dir(dir)
            .map(|rd| {
                rd.flatten()
                    .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
                    .collect()
            })
            .unwrap_or_default()
    };
    for (name, path) in list(&layout.vms_dir()) {
        if VmId::parse(&name).is_some() && acct.states.contains_key(&name) {
            continue;
        }
        leaks.push(Leak {
            kind: LeakKind::Dir,
            name: path.display().to_string(),
            detail: if VmId::parse(&name).is_some() {
                format!("VM state dir; {}", acct.why_not(&name))
            } else {
                "not a VM id; nothing in banger makes it".to_string()
            },
        });
    }
    for (name, path) in list(&layout.vm_run_root()) {
        if VmId::parse(&name).is_some() && acct.is_held(&name) {
            continue;
        }
        leaks.push(Leak {
            kind: LeakKind::Dir,
            name: path.display().to_string(),
            detail: if VmId::parse(&name).is_some() {
                format!("VM runtime dir; {}", acct.why_not(&name))
            } else {
                "not a VM id; nothing in banger makes it".to_string()
            },
        });
    }
    let held: HashSet<&String> = acct.held.keys().collect();
    for (id, state) in &acct.states {
        if held.contains(id) {
            continue;
        }
        let Some(vm_id) = VmId::parse(id) else {
            continue;
        };
        let path = layout.handles_file(&vm_id);
        if path.exists() {
            leaks.push(Leak {
                kind: LeakKind::HandlesFile,
                name: path.display().to_string(),
                detail: format!("handles file of VM {id}, which is {state}"),
            });
        }
    }
    leaks
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roots() -> Vec<String> {
        vec!["/s/vms/".into(), "/r/vms/".into()]
    }

    #[test]
    fn cmdline_matching_finds_ids_inside_arguments() {
        let cmd = b"/usr/bin/firecracker\0--api-sock\0/r/vms/0123456789ab/fc.sock\0--log=/s/vms/0123456789ab/vmm.log\0";
        assert_eq!(vm_ids_in_cmdline(cmd, &roots()), vec!["0123456789ab"]);
        let qemu = b"qemu\0-drive\0file=/s/vms/aaaaaaaaaaaa/root.ext4,format=raw\0-qmp\0unix:/r/vms/bbbbbbbbbbbb/qmp.sock,server";
        assert_eq!(
            vm_ids_in_cmdline(qemu, &roots()),
            vec!["aaaaaaaaaaaa", "bbbbbbbbbbbb"]
        );
        // The bare directory, a too-long or non-hex name, another root: no VM.
        for cmd in [
            &b"ls\0/s/vms/"[..],
            b"ls\0/s/vms/0123456789abc/x",
            b"ls\0/s/vms/0123456789AB",
            b"ls\0/other/vms/0123456789ab",
            b"tail\0/s/vmsx/0123456789ab",
        ] {
            assert!(
                vm_ids_in_cmdline(cmd, &roots()).is_empty(),
                "{}",
                String::from_utf8_lossy(cmd)
            );
        }
        // The id at the very end of an argument counts.
        assert_eq!(
            vm_ids_in_cmdline(b"x\0/r/vms/ffffffffffff", &roots()),
            vec!["ffffffffffff"]
        );
    }

    #[test]
    fn jailed_firecracker_is_recognised_by_program_and_id() {
        let id = "0123456789ab";
        let fc = format!("/usr/bin/firecracker\0--id\0{id}\0--api-sock\0/run/firecracker.socket\0");
        assert_eq!(jailed_vm_id(fc.as_bytes()).as_deref(), Some(id));
        let jailer = format!("jailer-v1.16.1\0--id\0{id}\0--exec-file\0/x\0");
        assert_eq!(jailed_vm_id(jailer.as_bytes()).as_deref(), Some(id));
        let other = format!("sleep\0--id\0{id}\0");
        assert_eq!(jailed_vm_id(other.as_bytes()), None);
        assert_eq!(jailed_vm_id(b"firecracker\0--id\0not-an-id\0"), None);
    }

    #[test]
    fn jails_and_build_scratch_of_others_are_leaks() {
        let t = tempfile::tempdir().unwrap();
        let s = t.path();
        std::fs::create_dir_all(s.join("jail/firecracker/0123456789ab/root")).unwrap();
        std::fs::create_dir_all(s.join("jail/firecracker/ba9876543210/root")).unwrap();
        let mut acct = held("ba9876543210", Handles::new(PathBuf::from("/r")));
        acct.states.insert("0123456789ab".into(), VmState::Stopped);
        let dirs = VmDirs {
            vm_roots: roots(),
            state_roots: vec![s.to_path_buf()],
            runtime_roots: vec!["/r".into()],
            jail_base: s.join("jail"),
        };
        let leaks = jail_leaks(&dirs, &acct);
        assert_eq!(leaks.len(), 1, "{leaks:?}");
        assert!(leaks[0].name.ends_with("0123456789ab"), "{leaks:?}");
        assert!(dirs.jail_has("0123456789ab") && !dirs.jail_has("aaaaaaaaaaaa"));
        // Mounts: the runtime dir's VM area counts, the rest of it (the guest agent's
        // /run/banger/lower inside a banger guest) does not.
        let roots = dirs.mount_roots();
        assert!(roots.contains(&PathBuf::from("/r/vms")) && !roots.contains(&PathBuf::from("/r")));

        let build = s.join("build");
        std::fs::create_dir_all(build.join("debian.42")).unwrap();
        std::fs::create_dir_all(build.join("rootfs-x.77")).unwrap();
        std::fs::write(build.join("bundle-y.42.tar.zst"), b"").unwrap();
        let leaks = build_leaks(&build, 42);
        assert_eq!(leaks.len(), 1, "{leaks:?}");
        assert!(leaks[0].name.ends_with("rootfs-x.77"));

        let tmp = s.join("cache/workspaces/tmp");
        let proc_root = s.join("proc");
        std::fs::create_dir_all(proc_root.join("500")).unwrap();
        std::fs::create_dir_all(tmp.join("banger-ws.500.abc")).unwrap();
        std::fs::create_dir_all(tmp.join("banger-ws.501.def")).unwrap();
        let leaks = temp_repo_leaks(&proc_root, &tmp);
        assert_eq!(leaks.len(), 1, "{leaks:?}");
        assert!(leaks[0].name.ends_with("banger-ws.501.def"));
    }

    #[test]
    fn stat_gives_parent_and_start_time() {
        let stat =
            "4242 (fire cracker) S 1 4242 4242 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 98765 1000 10";
        assert_eq!(parse_stat_ppid_start(stat), Some((1, 98765)));
        assert_eq!(parse_stat_ppid_start("garbage"), None);
    }

    #[test]
    fn loop_backing_files() {
        assert_eq!(
            parse_backing_file("/s/vms/0123456789ab/cow.img\n"),
            Some((PathBuf::from("/s/vms/0123456789ab/cow.img"), false))
        );
        assert_eq!(
            parse_backing_file("/s/images/a b.ext4 (deleted)\n"),
            Some((PathBuf::from("/s/images/a b.ext4"), true))
        );
        assert_eq!(parse_backing_file("\n"), None);
        assert_eq!(parse_backing_file(""), None);
    }

    #[test]
    fn mountinfo_lines_parse_with_escapes_and_optional_fields() {
        let text = "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n\
                    90 22 0:50 / /s/vms/0123456789ab/mnt\\040x rw shared:5 master:2 - overlay overlay rw,lowerdir=/a\n\
                    91 22 0:51 / /s rw - tmpfs tmpfs rw\n\
                    92 22 0:52 / /r/vms/0123456789ab/m rw - ext4 /dev/loop3 rw\n";
        let p = Path::new("/proc/self/mountinfo");
        let mounts = parse_mountinfo(text, p).unwrap();
        assert_eq!(mounts.len(), 4);
        assert_eq!(
            mounts[1].mount_point,
            PathBuf::from("/s/vms/0123456789ab/mnt x")
        );
        assert_eq!(mounts[1].fstype, "overlay");
        assert_eq!(mounts[3].source, "/dev/loop3");
        let leaks = mount_leaks(&mounts, &[PathBuf::from("/s"), PathBuf::from("/r")]);
        let names: Vec<&str> = leaks.iter().map(|l| l.name.as_str()).collect();
        // `/s` itself is a mount point the user chose; only what is under it leaks.
        assert_eq!(
            names,
            ["/s/vms/0123456789ab/mnt x", "/r/vms/0123456789ab/m"]
        );
        assert!(leaks.iter().all(|l| l.kind == LeakKind::Mount));

        let err = parse_mountinfo("1 2 3\n", p).unwrap_err().to_string();
        assert!(err.contains("/proc/self/mountinfo line 1"), "{err}");
        let err = parse_mountinfo("22 1 8:1 / / rw - ext4 a rw\n1 2 3:4 / /x rw shared:1\n", p)
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 2: no \" - \" separator"), "{err}");
    }

    fn write(path: &Path, text: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    fn held(id: &str, handles: Handles) -> Accounting {
        let mut a = Accounting::default();
        a.states.insert(id.into(), VmState::Running);
        a.held.insert(id.into(), Some(handles));
        a
    }

    #[test]
    fn loops_and_mappers_from_an_injected_sys() {
        let sys = tempfile::tempdir().unwrap();
        let s = sys.path();
        let state = PathBuf::from("/st");
        let id = "0123456789ab";
        write(
            &s.join("block/loop0/loop/backing_file"),
            "/st/images/base.ext4\n",
        );
        write(
            &s.join("block/loop1/loop/backing_file"),
            &format!("/st/vms/{id}/cow\n"),
        );
        write(
            &s.join("block/loop2/loop/backing_file"),
            "/elsewhere/disk.img\n",
        );
        std::fs::create_dir_all(s.join("block/loop3/loop")).unwrap(); // detached
        write(&s.join("block/dm-0/dm/name"), &format!("banger-{id}\n"));
        std::fs::create_dir_all(s.join("block/dm-0/slaves/loop0")).unwrap();
        std::fs::create_dir_all(s.join("block/dm-0/slaves/loop1")).unwrap();
        // Another installation's mapper: unknown id, loops outside this state dir.
        write(&s.join("block/dm-1/dm/name"), "banger-ffffffffffff\n");
        std::fs::create_dir_all(s.join("block/dm-1/slaves/loop2")).unwrap();
        write(&s.join("block/dm-2/dm/name"), "vg0-root\n");

        // Nothing holds them: both of ours leak, the foreign ones do not.
        let none = Accounting::default();
        let leaks = block_devices(s, std::slice::from_ref(&state), &none).unwrap();
        let got: Vec<(LeakKind, &str)> = leaks.iter().map(|l| (l.kind, l.name.as_str())).collect();
        assert_eq!(
            got,
            [
                (LeakKind::Loop, "/dev/loop0"),
                (LeakKind::Loop, "/dev/loop1"),
                (LeakKind::Mapper, "/dev/mapper/banger-0123456789ab"),
            ]
        );
        assert!(leaks[1].detail.contains("/st/vms/0123456789ab/cow"));

        // A running VM whose handles name them accounts for all three.
        let mut h = Handles::new(PathBuf::from("/run"));
        h.block = vec![
            BlockResource::Loop("/dev/loop0".into()),
            BlockResource::Loop("/dev/loop1".into()),
            BlockResource::Mapper(format!("banger-{id}")),
        ];
        let acct = held(id, h);
        assert!(block_devices(s, &[state], &acct).unwrap().is_empty());
    }

    #[test]
    fn processes_from_an_injected_proc() {
        let proc_dir = tempfile::tempdir().unwrap();
        let p = proc_dir.path();
        let id = "0123456789ab";
        let stat = |pid: i32, ppid: i32, start: u64| {
            format!("{pid} (vmm) S {ppid} 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 {start} 1 1")
        };
        // 100: the live VMM; 101: a stray with the same cmdline; 102: the daemon's child;
        // 103: unrelated; 104: names a VM not in the store.
        let cmd = format!("fc\0--api-sock\0/r/vms/{id}/fc.sock\0");
        for (pid, ppid, start, cmd) in [
            (100, 1, 500, cmd.as_str()),
            (101, 1, 600, cmd.as_str()),
            (102, 7, 700, cmd.as_str()),
            (103, 1, 800, "bash\0"),
            (104, 1, 900, "tail\0/s/vms/aaaaaaaaaaaa/vmm.log\0"),
        ] {
            write(&p.join(format!("{pid}/cmdline")), cmd);
            write(&p.join(format!("{pid}/stat")), &stat(pid, ppid, start));
        }
        write(&p.join("self/mountinfo"), "");
        let mut h = Handles::new(PathBuf::from("/r/vms").join(id));
        h.vmm = Some(banger_vmm::VmmHandle {
            kind: banger_vmm::VmmKind::Firecracker,
            pid: 100,
            start_time: 500,
            control_socket: PathBuf::from(format!("/r/vms/{id}/fc.sock")),
            log_path: PathBuf::from(format!("/s/vms/{id}/vmm.log")),
        });
        let acct = held(id, h);
        let dirs = VmDirs {
            vm_roots: roots(),
            state_roots: vec!["/s".into()],
            runtime_roots: vec!["/r".into()],
            jail_base: "/s/jail".into(),
        };
        let mut leaks = processes(p, &dirs, &acct, 7).unwrap();
        leaks.sort();
        let names: Vec<&str> = leaks.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["101", "104"]);
        assert!(
            leaks[0].detail.contains("VMM is pid 100"),
            "{}",
            leaks[0].detail
        );
        assert!(
            leaks[1].detail.contains("not in the store"),
            "{}",
            leaks[1].detail
        );

        // The recorded VMM restarted under the same pid (a different start time) is not ours.
        let mut acct = acct;
        if let Some(Some(h)) = acct.held.get_mut(id) {
            h.vmm.as_mut().unwrap().start_time = 499;
        }
        let leaks = processes(p, &dirs, &acct, 7).unwrap();
        assert!(leaks.iter().any(|l| l.name == "100"));

        let err = processes(&p.join("missing"), &dirs, &acct, 7).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
    }
}
