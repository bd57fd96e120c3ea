//! Workspaces: `vm run PATH`, `vm workspace prepare|sync|export`, `vm cp`, and `vm exec` in
//! the workspace directory.
//!
//! The repository work is banger-workspace's; this module runs its guest scripts over ssh
//! (the CLI has the user's repository and ssh, the daemon neither), tells the daemon where the
//! workspace is (`vm.workspace.set`), and keeps the sync manifest in the cache directory.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Instant;

use banger_core::records::WorkspaceInfo;
use banger_core::{VmName, VmRecord};
use banger_protocol::{Request, SshInfo, VmDetails, VmRef, VmWorkspaceSetParams};
use banger_workspace::{
    HistorySpec, Manifest, Options, PrepareSpec, Prepared, WorkspaceError, archive, extract, guest,
    history,
};

use crate::Ctx;
use crate::cli::{WorkspaceCmd, WorkspaceFlags};
use crate::error::CliError;

fn ws_error(e: WorkspaceError) -> CliError {
    match e {
        WorkspaceError::NotARepo { .. }
        | WorkspaceError::Bare { .. }
        | WorkspaceError::NoCommits { .. }
        | WorkspaceError::Submodule { .. }
        | WorkspaceError::NonUtf8Path { .. }
        | WorkspaceError::BadRevision { .. }
        | WorkspaceError::BadBranch { .. } => CliError::input(e.to_string()),
        other => CliError::local(other.to_string()),
    }
}

/// What `vm run PATH` and `workspace prepare` copy.
pub(crate) fn spec(flags: &WorkspaceFlags) -> Result<PrepareSpec, CliError> {
    if let Some(p) = &flags.guest_path {
        guest::validate_guest_path(p).map_err(CliError::input)?;
    }
    Ok(PrepareSpec {
        options: Options {
            include_untracked: flags.include_untracked,
            submodules: flags.submodules,
        },
        history: HistorySpec {
            depth: history::DEFAULT_DEPTH,
            branch: flags.branch.clone(),
            from: flags.from.clone(),
        },
        guest_path: flags.guest_path.clone(),
    })
}

/// Inspects the repository and builds its history, before any VM is touched. The temporary
/// repository goes into banger's own private scratch dir (see [`scratch_dir`]).
pub(crate) fn build(
    ctx: &Ctx<'_>,
    path: &Path,
    flags: &WorkspaceFlags,
) -> Result<Prepared, CliError> {
    let scratch = scratch_dir(ctx);
    banger_workspace::prepare_in(path, &spec(flags)?, scratch.as_deref()).map_err(ws_error)
}

/// `<cache>/workspaces/tmp` (0700, ours), where temporary repositories are made; the ones a
/// killed banger left (their name carries a pid that is gone) are removed first. `None` (the
/// system temp dir is used) when it cannot be made private.
pub(crate) fn scratch_dir(ctx: &Ctx<'_>) -> Option<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let dir = ctx.daemon.workspace_cache.join("tmp");
    let _ = std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir);
    let meta = std::fs::symlink_metadata(&dir).ok()?;
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    if !meta.is_dir() || meta.uid() != uid || meta.mode() & 0o077 != 0 {
        return None;
    }
    sweep_stale(&dir);
    Some(dir)
}

/// Removes temporary repositories whose banger process is gone.
pub(crate) fn sweep_stale(dir: &Path) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = banger_workspace::history::temp_owner(&name) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// `--dry-run`: what would be copied.
pub(crate) fn dry_run(
    ctx: &mut Ctx<'_>,
    path: &Path,
    flags: &WorkspaceFlags,
) -> Result<(), CliError> {
    let p = build(ctx, path, flags)?;
    let mut text = p.repo.listing();
    text.push_str(&format!(
        "{} files, {} bytes, {} deleted, from {} at {} to {}\n",
        p.files().len(),
        p.repo.total_bytes(),
        p.repo.deleted.len(),
        p.repo.root.display(),
        &p.history.head[..12.min(p.history.head.len())],
        p.guest_path
    ));
    ctx.print(&text)
}

pub(crate) fn ssh_info(ctx: &mut Ctx<'_>, name: &str) -> Result<SshInfo, CliError> {
    ctx.request(&Request::VmSshInfo(VmRef { vm: name.into() }))?
        .decode("vm.ssh_info")
}

fn show(ctx: &mut Ctx<'_>, name: &VmName) -> Result<VmRecord, CliError> {
    let d: VmDetails = ctx
        .request(&Request::VmShow(VmRef {
            vm: name.to_string(),
        }))?
        .decode("vm.show")?;
    Ok(d.vm)
}

/// `ssh … -- sh -c SCRIPT`, no terminal, guest errors on our stderr (sanitised: see
/// [`crate::guest_stderr`]; keep the value alive until the child has exited).
fn guest_command(info: &SshInfo, script: &str) -> crate::guest_stderr::Relayed {
    crate::guest_stderr::relay(crate::sshmux::command(
        info,
        false,
        &["sh".to_string(), "-c".to_string(), script.to_string()],
    ))
}

fn manifest_path(ctx: &Ctx<'_>, vm: &VmRecord) -> PathBuf {
    ctx.daemon
        .workspace_cache
        .join(format!("{}.json", vm.id.as_str()))
}

/// Drops a deleted VM's manifest and its shared ssh connection (best effort).
pub(crate) fn forget(ctx: &mut Ctx<'_>, vm: &VmRecord) {
    crate::sshmux::close(vm.id.as_str());
    let _ = std::fs::remove_file(manifest_path(ctx, vm));
}

fn ssh_failed(what: &str, vm: &VmName, status: std::process::ExitStatus) -> CliError {
    match status.code() {
        Some(255) | None => CliError::local(format!(
            "{what} in vm {vm} failed: ssh could not reach it ({status})"
        )),
        Some(code) => CliError::local(format!("{what} in vm {vm} failed (exit {code})")),
    }
}

/// Sends a built workspace into the VM, records it with the daemon and saves its manifest.
pub(crate) fn send(
    ctx: &mut Ctx<'_>,
    vm: &VmRecord,
    prepared: &Prepared,
    force: bool,
) -> Result<WorkspaceInfo, CliError> {
    let info = ssh_info(ctx, vm.name.as_str())?;
    let started = Instant::now();
    let mut cmd = guest_command(&info, &prepared.script(force));
    cmd.stdout(Stdio::null());
    // Ctrl-C while copying (with `vm run`, which catches it) stops the copy at the next write.
    let status = banger_workspace::run_with_stdin(&mut cmd, |w| {
        prepared.write_archive(crate::interrupt::StopOnSignal(w))
    })
    .map_err(ws_error)?;
    if let Some(sig) = crate::interrupt::caught() {
        return Err(CliError::reported(crate::interrupt::exit_code(sig)));
    }
    if status.code() == Some(guest::EXIT_EXISTS) {
        return Err(CliError::input(format!(
            "{} already exists in vm {}; pass --force to replace it, or --guest-path",
            prepared.guest_path, vm.name
        )));
    }
    if !status.success() {
        return Err(ssh_failed("copying the workspace", &vm.name, status));
    }
    let manifest = prepared.manifest().map_err(ws_error)?;
    manifest.save(&manifest_path(ctx, vm)).map_err(ws_error)?;
    let ws = WorkspaceInfo {
        guest_path: prepared.guest_path.clone(),
        host_path: prepared.repo.root.clone(),
        head_commit: prepared.history.head.clone(),
        prepared_at: ctx.now,
        include_untracked: manifest.include_untracked,
    };
    ctx.request(&Request::VmWorkspaceSet(VmWorkspaceSetParams {
        vm: vm.id.to_string(),
        workspace: Some(ws.clone()),
    }))?;
    ctx.note(&format!(
        "workspace {} copied to {}:{} ({} files, {} bytes, {:.1}s)",
        prepared.repo.root.display(),
        vm.name,
        prepared.guest_path,
        prepared.files().len(),
        prepared.repo.total_bytes(),
        started.elapsed().as_secs_f64()
    ));
    Ok(ws)
}

fn load_manifest(ctx: &Ctx<'_>, vm: &VmRecord) -> Result<Manifest, CliError> {
    if vm.workspace.is_none() {
        return Err(CliError::input(format!(
            "vm {} has no workspace: banger vm workspace prepare {} PATH",
            vm.name, vm.name
        )));
    }
    let path = manifest_path(ctx, vm);
    Manifest::load(&path).map_err(ws_error)?.ok_or_else(|| {
        CliError::local(format!(
            "no sync manifest for vm {} at {} (prepared by another user or machine?); prepare it again with --force",
            vm.name,
            path.display()
        ))
    })
}

/// Sends what changed on the host; returns (files sent, files deleted).
fn sync_vm(ctx: &mut Ctx<'_>, vm: &VmRecord) -> Result<(usize, usize), CliError> {
    let mut m = load_manifest(ctx, vm)?;
    let (repo, plan) = banger_workspace::plan_sync(&m).map_err(ws_error)?;
    if repo.head != m.prepared_head && repo.head != m.synced_head {
        ctx.note(&format!(
            "banger: warning: the host HEAD is now {}, the guest's history stays at {}; sync copies files only (prepare --force for the new history)",
            &repo.head[..12.min(repo.head.len())],
            &m.prepared_head[..12.min(m.prepared_head.len())]
        ));
    }
    if !plan.is_empty() {
        let info = ssh_info(ctx, vm.name.as_str())?;
        let scripts = guest::sync_scripts(&m.guest_path, &plan.delete);
        let (last, before) = scripts.split_last().expect("at least one script");
        for s in before {
            let status = guest_command(&info, s)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .status()
                .map_err(|e| CliError::local(format!("running ssh: {e}")))?;
            if !status.success() {
                return Err(ssh_failed("deleting files", &vm.name, status));
            }
        }
        let mut cmd = guest_command(&info, last);
        cmd.stdout(Stdio::null());
        let status = banger_workspace::run_with_stdin(&mut cmd, |w| {
            banger_workspace::write_sync_archive(&repo.root, &plan, w)
        })
        .map_err(ws_error)?;
        if !status.success() {
            return Err(ssh_failed("syncing the workspace", &vm.name, status));
        }
    }
    m.apply(&repo, &plan);
    m.save(&manifest_path(ctx, vm)).map_err(ws_error)?;
    Ok((plan.send.len(), plan.delete.len()))
}

pub(crate) fn command(ctx: &mut Ctx<'_>, cmd: WorkspaceCmd) -> Result<(), CliError> {
    match cmd {
        WorkspaceCmd::Prepare {
            name,
            path,
            flags,
            force,
        } => {
            let prepared = build(ctx, &path, &flags)?;
            let vm = show(ctx, &name)?;
            let ws = send(ctx, &vm, &prepared, force)?;
            ctx.print(&format!("{}:{}\n", vm.name, ws.guest_path))
        }
        WorkspaceCmd::Sync { name } => {
            let vm = show(ctx, &name)?;
            let (sent, deleted) = sync_vm(ctx, &vm)?;
            ctx.print(&format!("sent {sent} files, deleted {deleted}\n"))
        }
        WorkspaceCmd::Export {
            name,
            base_commit,
            output,
        } => export(ctx, &name, base_commit, output),
    }
}

fn export(
    ctx: &mut Ctx<'_>,
    name: &VmName,
    base: Option<String>,
    output: Option<PathBuf>,
) -> Result<(), CliError> {
    let vm = show(ctx, name)?;
    let Some(ws) = vm.workspace.clone() else {
        return Err(CliError::input(format!(
            "vm {name} has no workspace: banger vm workspace prepare {name} PATH"
        )));
    };
    let base = base.unwrap_or(ws.head_commit);
    if base.is_empty() || base.starts_with('-') {
        return Err(CliError::input(format!("invalid --base-commit {base:?}")));
    }
    let info = ssh_info(ctx, vm.name.as_str())?;
    let mut cmd = guest_command(&info, &guest::export_script(&ws.guest_path, &base));
    cmd.stdin(Stdio::null());
    let out = cmd
        .stdout(Stdio::piped())
        .output()
        .map_err(|e| CliError::local(format!("running ssh: {e}")))?;
    if !out.status.success() {
        return Err(ssh_failed("exporting the workspace", name, out.status));
    }
    if out.stdout.is_empty() {
        ctx.note(&format!("banger: no changes in vm {name} since {base}"));
    }
    match output {
        // Replaced, never written through: a link at PATH is not followed.
        Some(path) => extract::write_file(&path, &out.stdout)
            .map_err(|e| CliError::local(format!("writing the patch to {}: {e}", path.display()))),
        None => ctx
            .out
            .write_all(&out.stdout)
            .and_then(|()| ctx.out.flush())
            .map_err(|e| CliError::local(format!("writing the patch: {e}"))),
    }
}

/// `vm exec`: in the workspace directory when there is one, warning when the host moved on.
pub(crate) fn exec(
    ctx: &mut Ctx<'_>,
    name: &VmName,
    tty: bool,
    sync: bool,
    command: &[String],
) -> Result<(), CliError> {
    let vm = show(ctx, name)?;
    let Some(ws) = vm.workspace.clone() else {
        if sync {
            return Err(CliError::input(format!(
                "vm {name} has no workspace to sync: banger vm workspace prepare {name} PATH"
            )));
        }
        return crate::remote::ssh(ctx, name, tty, command);
    };
    if sync {
        let (sent, deleted) = sync_vm(ctx, &vm)?;
        ctx.note(&format!(
            "banger: synced: sent {sent} files, deleted {deleted}"
        ));
    } else {
        let stale = match Manifest::load(&manifest_path(ctx, &vm)) {
            Ok(Some(m)) => banger_workspace::staleness(&m).map_err(|e| e.to_string()),
            Ok(None) => Ok(None),
            Err(e) => Err(e.to_string()),
        };
        match stale {
            Ok(None) => {}
            Ok(Some(why)) => ctx.note(&format!(
                "banger: warning: {} changed since the last sync ({why}); use --sync or banger vm workspace sync {name}",
                ws.host_path.display()
            )),
            Err(e) => ctx.note(&format!(
                "banger: warning: cannot tell whether the workspace is current: {e}"
            )),
        }
    }
    crate::remote::ssh(ctx, name, tty, &guest::in_dir(&ws.guest_path, command))
}

/// `NAME:PATH` → the VM and the guest path; anything else is a host path (write `./a:b` for
/// a host file with a colon).
fn guest_side(s: &str) -> Option<(VmName, String)> {
    let (n, p) = s.split_once(':')?;
    if s.starts_with('/') || s.starts_with('.') || p.is_empty() {
        return None;
    }
    VmName::parse(n).ok().map(|n| (n, p.to_string()))
}

fn base_name(p: &str) -> Option<String> {
    Path::new(p.trim_end_matches('/'))
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
}

/// `vm cp SRC DEST`, one side `NAME:PATH`.
pub(crate) fn cp(ctx: &mut Ctx<'_>, src: &str, dest: &str) -> Result<(), CliError> {
    match (guest_side(src), guest_side(dest)) {
        (Some(_), Some(_)) => Err(CliError::input(
            "vm cp copies between the host and a VM: only one side may be NAME:PATH",
        )),
        (None, None) => Err(CliError::input(
            "vm cp needs one side as NAME:PATH (a VM and a path in it)",
        )),
        (None, Some((vm, gpath))) => cp_in(ctx, Path::new(src), &vm, &gpath),
        (Some((vm, gpath)), None) => cp_out(ctx, &vm, &gpath, Path::new(dest)),
    }
}

fn cp_in(ctx: &mut Ctx<'_>, src: &Path, vm: &VmName, gpath: &str) -> Result<(), CliError> {
    std::fs::symlink_metadata(src)
        .map_err(|e| CliError::input(format!("cannot copy {}: {e}", src.display())))?;
    let src_name = std::fs::canonicalize(src)
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .ok_or_else(|| CliError::input(format!("cannot copy {}: no file name", src.display())))?;
    let info = ssh_info(ctx, vm.as_str())?;
    let probe = guest_command(&info, &guest::probe_dir_script(gpath))
        .stdin(Stdio::null())
        .output()
        .map_err(|e| CliError::local(format!("running ssh: {e}")))?;
    if !probe.status.success() {
        return Err(ssh_failed("looking at the destination", vm, probe.status));
    }
    let (dir, name) = if String::from_utf8_lossy(&probe.stdout).trim() == "dir" {
        (gpath.to_string(), src_name)
    } else {
        let name = base_name(gpath)
            .ok_or_else(|| CliError::input(format!("invalid guest path {gpath:?}")))?;
        let parent = Path::new(gpath.trim_end_matches('/'))
            .parent()
            .map(|p| p.to_string_lossy().into_owned())
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| ".".into());
        (parent, name)
    };
    let mut cmd = guest_command(&info, &guest::unpack_into_script(&dir));
    cmd.stdout(Stdio::null());
    let status = banger_workspace::run_with_stdin(&mut cmd, |w| {
        let mut b = tar::Builder::new(w);
        archive::append_tree(&mut b, Path::new(&name), src)?;
        b.into_inner()
            .and_then(|w| w.flush())
            .map_err(|e| WorkspaceError::Io {
                path: src.to_path_buf(),
                detail: format!("finishing the archive: {e}"),
                source: e,
            })
    })
    .map_err(ws_error)?;
    if !status.success() {
        return Err(ssh_failed("copying in", vm, status));
    }
    Ok(())
}

fn cp_out(ctx: &mut Ctx<'_>, vm: &VmName, gpath: &str, dest: &Path) -> Result<(), CliError> {
    let target = if dest.is_dir() {
        let name = base_name(gpath)
            .ok_or_else(|| CliError::input(format!("invalid guest path {gpath:?}")))?;
        dest.join(name)
    } else {
        dest.to_path_buf()
    };
    let info = ssh_info(ctx, vm.as_str())?;
    let mut pack = guest_command(&info, &guest::pack_script(gpath));
    let mut child = pack
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| CliError::local(format!("running ssh: {e}")))?;
    let stdout = child.stdout.take().expect("piped stdout");
    let extracted = extract::extract_as(std::io::BufReader::new(stdout), &target);
    let status = child
        .wait()
        .map_err(|e| CliError::local(format!("waiting for ssh: {e}")))?;
    drop(pack);
    if !status.success() {
        return Err(ssh_failed("copying out", vm, status));
    }
    let done = extracted.map_err(ws_error)?;
    if done.skipped > 0 {
        ctx.note(&format!(
            "banger: left out {} special files (devices, FIFOs, sockets) from {vm}:{gpath}",
            done.skipped
        ));
    }
    Ok(())
}
