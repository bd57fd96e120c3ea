//! What each command sends and prints.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use banger_core::{ImageRecord, KernelRecord, VmName, VmRecord};
use banger_protocol::{
    DaemonStatus, ImageRegisterParams, KernelBuildParams, KernelImportParams, Logs,
    NameForceParams, NameParams, Removed, Request, VmDeleteParams, VmKillParams, VmList,
    VmLogsParams, VmRef, VmSetParams, VmStopParams,
};

use crate::cli::{Command, DaemonCmd, ImageCmd, KernelCmd, VmCmd};
use crate::client;
use crate::error::CliError;
use crate::{Ctx, render};

/// How long `daemon stop` waits for the socket to go away.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

pub fn execute(command: Command, ctx: &mut Ctx<'_>) -> Result<(), CliError> {
    match command {
        Command::Vm(c) => vm(c, ctx),
        Command::Image(c) => image(c, ctx),
        Command::Kernel(c) => kernel(c, ctx),
        Command::Daemon(c) => daemon(c, ctx),
        Command::Doctor => crate::doctor::run(ctx),
        Command::System(c) => system(c, ctx),
        Command::SshConfig { install, uninstall } => {
            crate::ssh_config::run(ctx, install, uninstall)
        }
    }
}

fn system(cmd: crate::cli::SystemCmd, ctx: &mut Ctx<'_>) -> Result<(), CliError> {
    use crate::cli::SystemCmd;
    use crate::system::SystemPaths;
    let paths = |root: Option<PathBuf>| {
        root.map(|root| SystemPaths { root })
            .unwrap_or_else(SystemPaths::host)
    };
    // bangerd and banger-helper are installed next to banger.
    let bin_dir = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("/usr/local/bin"));
    match cmd {
        SystemCmd::Install { owner, root } => {
            crate::system::install(ctx.out, &owner, &paths(root), &bin_dir)
        }
        SystemCmd::Uninstall { purge, root } => {
            crate::system::uninstall(ctx.out, purge, &paths(root), &bin_dir)
        }
        SystemCmd::Status { root } => crate::system::status(ctx.out, &paths(root)),
    }
}

fn vm_ref(name: &VmName) -> VmRef {
    VmRef {
        vm: name.to_string(),
    }
}

/// Sends a request whose result is a VM record and prints the one-line summary.
fn vm_summary(ctx: &mut Ctx<'_>, request: Request) -> Result<(), CliError> {
    let started = Instant::now();
    let method = request.method();
    let vm: VmRecord = ctx.request(&request)?.decode(method)?;
    // A new boot: a shared ssh connection to the previous one is dead.
    crate::sshmux::close(vm.id.as_str());
    let line = render::vm_summary(&vm, started.elapsed().as_secs_f64());
    ctx.print(&format!("{line}\n"))
}

/// Prints `--json` verbatim, or the human rendering of the decoded result.
fn show<T: serde::de::DeserializeOwned>(
    ctx: &mut Ctx<'_>,
    request: Request,
    json: bool,
    human: impl FnOnce(&T, i64) -> String,
) -> Result<(), CliError> {
    let answer = ctx.request(&request)?;
    let text = if json {
        format!("{}\n", answer.pretty_json())
    } else {
        human(&answer.decode::<T>(request.method())?, ctx.now)
    };
    ctx.print(&text)
}

fn vm(cmd: VmCmd, ctx: &mut Ctx<'_>) -> Result<(), CliError> {
    match cmd {
        VmCmd::Run(a) => crate::remote::run(ctx, a),
        VmCmd::Ssh { name, tty, command } => crate::remote::ssh(ctx, &name, tty, &command),
        VmCmd::Exec {
            name,
            tty,
            sync,
            command,
        } => crate::workspace::exec(ctx, &name, tty, sync, &command),
        VmCmd::Workspace(c) => crate::workspace::command(ctx, c),
        VmCmd::Cp { src, dest } => crate::workspace::cp(ctx, &src, &dest),
        VmCmd::Create(a) => vm_summary(ctx, Request::VmCreate(a.spec.into_params(a.no_start))),
        VmCmd::Start { name } => vm_summary(ctx, Request::VmStart(vm_ref(&name))),
        VmCmd::Restart(a) => vm_summary(
            ctx,
            Request::VmRestart(VmStopParams {
                vm: a.name.to_string(),
                timeout_secs: a.timeout,
            }),
        ),
        VmCmd::Stop(a) => {
            let vm: VmRecord = ctx
                .request(&Request::VmStop(VmStopParams {
                    vm: a.name.to_string(),
                    timeout_secs: a.timeout,
                }))?
                .decode("vm.stop")?;
            crate::sshmux::close(vm.id.as_str());
            ctx.print(&format!("vm {} {}\n", vm.name, vm.state))
        }
        VmCmd::Kill { name, signal } => {
            let vm: VmRecord = ctx
                .request(&Request::VmKill(VmKillParams {
                    vm: name.to_string(),
                    signal,
                }))?
                .decode("vm.kill")?;
            crate::sshmux::close(vm.id.as_str());
            ctx.print(&format!("vm {} {}\n", vm.name, vm.state))
        }
        VmCmd::Rm { names, force } => vm_rm(ctx, &names, force),
        VmCmd::Prune { force } => vm_prune(ctx, force),
        VmCmd::Ls { json } => show(ctx, Request::VmList, json, |l: &VmList, now| {
            render::vm_table(&l.vms, now)
        }),
        VmCmd::Show { name, json } => show(
            ctx,
            Request::VmShow(vm_ref(&name)),
            json,
            render::vm_details,
        ),
        VmCmd::Set { name, vcpu, memory } => {
            if vcpu.is_none() && memory.is_none() {
                return Err(CliError::input(
                    "nothing to set: give --vcpu and/or --memory",
                ));
            }
            let vm: VmRecord = ctx
                .request(&Request::VmSet(VmSetParams {
                    vm: name.to_string(),
                    vcpu,
                    memory_mib: memory,
                }))?
                .decode("vm.set")?;
            ctx.print(&format!(
                "vm {} updated ({} vcpu, {} MiB)\n",
                vm.name, vm.vcpu, vm.memory_mib
            ))
        }
        VmCmd::Logs { name, lines } => {
            let logs: Logs = ctx
                .request(&Request::VmLogs(VmLogsParams {
                    vm: name.to_string(),
                    lines,
                }))?
                .decode("vm.logs")?;
            // The guest's console: its escape sequences stay out of the user's terminal.
            ctx.print(&crate::sanitize::terminal_safe(&logs.text))
        }
    }
}

/// Deletes each VM in turn; a failure is reported and the rest still go. The exit code is the
/// first failure's.
fn vm_rm(ctx: &mut Ctx<'_>, names: &[VmName], force: bool) -> Result<(), CliError> {
    let mut first_failure = None;
    for name in names {
        let result = ctx.request(&Request::VmDelete(VmDeleteParams {
            vm: name.to_string(),
            force,
        }));
        match result.and_then(|a| a.decode::<VmRecord>("vm.delete")) {
            Ok(vm) => {
                crate::workspace::forget(ctx, &vm);
                ctx.print(&format!("vm {} removed\n", vm.name))?
            }
            Err(e) => {
                if let Some(line) = e.line() {
                    ctx.note(&line);
                }
                first_failure.get_or_insert(e.code);
            }
        }
    }
    match first_failure {
        Some(code) => Err(CliError::reported(code)),
        None => Ok(()),
    }
}

fn vm_prune(ctx: &mut Ctx<'_>, force: bool) -> Result<(), CliError> {
    let list: VmList = ctx.request(&Request::VmList)?.decode("vm.list")?;
    let doomed: Vec<String> = list
        .vms
        .iter()
        .filter(|vm| !vm.state.may_have_vmm())
        .map(|vm| vm.name.to_string())
        .collect();
    if doomed.is_empty() {
        return ctx.print("no stopped VMs to prune\n");
    }
    let what = format!(
        "{} stopped VM{} ({})",
        doomed.len(),
        if doomed.len() == 1 { "" } else { "s" },
        doomed.join(", ")
    );
    if !force {
        if !ctx.term.stdin_tty {
            return Err(CliError::input(format!(
                "vm prune would delete {what}; no terminal to confirm on, pass --force"
            )));
        }
        let _ = write!(ctx.err, "Delete {what}? [y/N] ");
        let _ = ctx.err.flush();
        let mut answer = String::new();
        ctx.input
            .read_line(&mut answer)
            .map_err(|e| CliError::local(format!("reading the answer: {e}")))?;
        if !matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes") {
            return Err(CliError::local("prune cancelled; nothing deleted"));
        }
    }
    let removed: Removed = ctx.request(&Request::VmPrune)?.decode("vm.prune")?;
    for vm in list
        .vms
        .iter()
        .filter(|v| removed.removed.iter().any(|n| n == v.name.as_str()))
    {
        crate::workspace::forget(ctx, vm);
    }
    if removed.removed.is_empty() {
        return ctx.print("no VMs removed\n");
    }
    let text: String = removed
        .removed
        .iter()
        .map(|n| format!("vm {n} removed\n"))
        .collect();
    ctx.print(&text)
}

fn image(cmd: ImageCmd, ctx: &mut Ctx<'_>) -> Result<(), CliError> {
    match cmd {
        ImageCmd::Build { name, suite } => {
            let img: ImageRecord = ctx
                .request(&Request::ImageBuild(banger_protocol::ImageBuildParams {
                    name,
                    suite,
                }))?
                .decode("image.build")?;
            ctx.print(&format!(
                "image {} built ({})\n",
                img.name,
                banger_core::ByteSize(img.size_bytes)
            ))
        }
        ImageCmd::Pull {
            reference,
            name,
            kernel,
            insecure,
        } => {
            let img: ImageRecord = ctx
                .request(&Request::ImagePull(banger_protocol::ImagePullParams {
                    reference,
                    name,
                    kernel,
                    insecure,
                }))?
                .decode("image.pull")?;
            ctx.print(&format!(
                "image {} pulled ({}; {})\n",
                img.name,
                banger_core::ByteSize(img.size_bytes),
                render::image_access(&img.meta)
            ))
        }
        ImageCmd::Export { name, output } => {
            let r: serde_json::Value = ctx
                .request(&Request::ImageExport(banger_protocol::ImageExportParams {
                    name: name.clone(),
                    output: output.clone(),
                }))?
                .decode("image.export")?;
            let bytes = r.get("bytes").and_then(|b| b.as_u64()).unwrap_or(0);
            ctx.print(&format!(
                "image {name} exported to {} ({})\n",
                output.display(),
                banger_core::ByteSize(bytes)
            ))
        }
        ImageCmd::Cache {
            cmd: crate::cli::ImageCacheCmd::Prune { dry_run },
        } => {
            let r: banger_protocol::CachePruneReport = ctx
                .request(&Request::ImageCachePrune(
                    banger_protocol::ImageCachePruneParams { dry_run },
                ))?
                .decode("image.cache.prune")?;
            ctx.print(&format!(
                "{} {} across {} blob(s) in {}\n",
                if r.dry_run { "would free" } else { "freed" },
                banger_core::ByteSize(r.bytes),
                r.blobs,
                r.dir.display()
            ))
        }
        ImageCmd::Import { name, from, kernel } => {
            let img: ImageRecord = ctx
                .request(&Request::ImageImport(banger_protocol::ImageImportParams {
                    name,
                    source: from,
                    kernel,
                }))?
                .decode("image.import")?;
            ctx.print(&format!(
                "image {} imported ({}, {})\n",
                img.name,
                img.rootfs.display(),
                banger_core::ByteSize(img.size_bytes)
            ))
        }
        ImageCmd::Register {
            name,
            rootfs,
            kernel,
        } => {
            let img: ImageRecord = ctx
                .request(&Request::ImageRegister(ImageRegisterParams {
                    name,
                    rootfs,
                    kernel,
                }))?
                .decode("image.register")?;
            ctx.print(&format!(
                "image {} registered ({}, {})\n",
                img.name,
                img.rootfs.display(),
                banger_core::ByteSize(img.size_bytes)
            ))
        }
        ImageCmd::Ls { json } => show(
            ctx,
            Request::ImageList,
            json,
            |l: &banger_protocol::ImageList, now| render::image_table(&l.images, now),
        ),
        ImageCmd::Show { name, json } => show(
            ctx,
            Request::ImageShow(NameParams { name }),
            json,
            render::image_details,
        ),
        ImageCmd::Rm { name, force } => {
            let img: ImageRecord = ctx
                .request(&Request::ImageDelete(NameForceParams { name, force }))?
                .decode("image.delete")?;
            ctx.print(&format!("image {} removed\n", img.name))
        }
    }
}

fn kernel(cmd: KernelCmd, ctx: &mut Ctx<'_>) -> Result<(), CliError> {
    match cmd {
        KernelCmd::Import { name, from } => {
            let k: KernelRecord = ctx
                .request(&Request::KernelImport(KernelImportParams {
                    name,
                    dir: from,
                }))?
                .decode("kernel.import")?;
            ctx.print(&format!("kernel {} imported ({})\n", k.name, k.version))
        }
        KernelCmd::Pull { name } => {
            let k: KernelRecord = ctx
                .request(&Request::KernelPull(NameParams { name }))?
                .decode("kernel.pull")?;
            ctx.print(&format!(
                "kernel {} ready ({}, {})\n",
                k.name, k.version, k.source
            ))
        }
        KernelCmd::Build { name } => {
            let k: KernelRecord = ctx
                .request(&Request::KernelBuild(KernelBuildParams { name }))?
                .decode("kernel.build")?;
            ctx.print(&format!(
                "kernel {} ready ({}, {})\n",
                k.name, k.version, k.source
            ))
        }
        KernelCmd::Ls { json } => show(
            ctx,
            Request::KernelList,
            json,
            |l: &banger_protocol::KernelList, now| render::kernel_table(&l.kernels, now),
        ),
        KernelCmd::Show { name, json } => show(
            ctx,
            Request::KernelShow(NameParams { name }),
            json,
            render::kernel_details,
        ),
        KernelCmd::Rm { name } => {
            let k: KernelRecord = ctx
                .request(&Request::KernelDelete(NameParams { name }))?
                .decode("kernel.delete")?;
            ctx.print(&format!("kernel {} removed\n", k.name))
        }
    }
}

/// Whether a daemon answers on the socket, without starting one.
fn is_running(ctx: &Ctx<'_>) -> Result<bool, CliError> {
    match client::connect(&ctx.daemon.socket) {
        Ok(_) => Ok(true),
        Err(e) if e.is_not_running() => Ok(false),
        Err(client::CallError::Connect(io)) => Err(CliError::local(format!(
            "cannot connect to bangerd at {}: {io}",
            ctx.daemon.socket.display()
        ))),
        Err(e) => Err(CliError::local(crate::describe_call_error(&e))),
    }
}

fn daemon(cmd: DaemonCmd, ctx: &mut Ctx<'_>) -> Result<(), CliError> {
    match cmd {
        DaemonCmd::Status { json } => {
            ctx.daemon.autostart = false;
            if !is_running(ctx)? {
                let socket = ctx.daemon.socket.display().to_string();
                ctx.print(&format!("bangerd is not running (no answer on {socket})\n"))?;
                return Err(CliError::reported(CliError::FAILURE));
            }
            show(ctx, Request::DaemonStatus, json, |s: &DaemonStatus, _| {
                render::daemon_status(s)
            })
        }
        DaemonCmd::Start => {
            let already = is_running(ctx)?;
            if !already {
                ctx.start_daemon()?;
            }
            ctx.daemon.autostart = false;
            let status: DaemonStatus = ctx
                .request(&Request::DaemonStatus)?
                .decode("daemon.status")?;
            let verb = if already {
                "is already running"
            } else {
                "started"
            };
            ctx.print(&format!("bangerd {verb} (pid {})\n", status.pid))
        }
        DaemonCmd::Stop => {
            ctx.daemon.autostart = false;
            if !is_running(ctx)? {
                return ctx.print("bangerd is not running\n");
            }
            // Only for the pid in the messages: a daemon whose status fails (its store went
            // bad under it) must still be stoppable.
            let pid = ctx
                .request(&Request::DaemonStatus)
                .and_then(|r| r.decode::<DaemonStatus>("daemon.status"))
                .map(|s| s.pid.to_string())
                .unwrap_or_else(|_| "unknown".into());
            // The daemon may exit before its answer is written: a connection closed early is
            // as good as a result here, since the socket check below is the real confirmation.
            match client::call(
                &ctx.daemon.socket,
                &Request::DaemonShutdown,
                &mut client::NullSink,
            ) {
                Ok(client::Reply::Result { .. }) | Err(client::CallError::Closed { .. }) => {}
                Ok(client::Reply::Error {
                    op_id,
                    code,
                    message,
                }) => return Err(CliError::daemon(&op_id, code, &message)),
                Err(e) => return Err(CliError::local(crate::describe_call_error(&e))),
            }
            let deadline = Instant::now() + STOP_TIMEOUT;
            while is_running(ctx)? {
                if Instant::now() >= deadline {
                    return Err(CliError::local(format!(
                        "bangerd (pid {}) accepted the shutdown but still answers after {}s; see {}",
                        pid,
                        STOP_TIMEOUT.as_secs(),
                        ctx.daemon.log_file.display()
                    )));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            ctx.print(&format!("bangerd stopped (pid {pid}); VMs keep running\n"))
        }
    }
}
