//! Commands that put the user inside a VM: `vm run`, `vm ssh`, `vm exec`.
//!
//! The daemon answers where the VM is and which key and known_hosts reach it (`vm.ssh_info`);
//! the CLI runs `ssh` itself, because only it has the user's terminal. The remote command's exit
//! status becomes banger's.

use std::time::Instant;

use banger_core::{VmName, VmRecord};
use banger_protocol::{Request, SshInfo, VmDeleteParams, VmRef};

use crate::Ctx;
use crate::cli::RunArgs;
use crate::error::CliError;

/// How long `--rm` may take to delete the VM after the session.
const RM_TIMEOUT_NOTE: &str = "delete it with: banger vm rm -f";

/// `banger vm ssh NAME [-- cmd]` and `banger vm exec NAME -- cmd`.
pub fn ssh(
    ctx: &mut Ctx<'_>,
    name: &VmName,
    tty: bool,
    command: &[String],
) -> Result<(), CliError> {
    let info: SshInfo = ctx
        .request(&Request::VmSshInfo(VmRef {
            vm: name.to_string(),
        }))?
        .decode("vm.ssh_info")?;
    exit_with(run_ssh(
        &info,
        tty || (command.is_empty() && ctx.term.stdin_tty),
        command,
    )?)
}

/// `banger vm run [flags] [-- cmd]`: create and boot, then a shell or the command, then (with
/// `--rm`) delete.
pub fn run(ctx: &mut Ctx<'_>, a: RunArgs) -> Result<(), CliError> {
    let started = Instant::now();
    // The repository is inspected (and its history built) before a VM exists, so a bare repo
    // or a submodule fails fast and --dry-run never boots anything.
    let prepared = match &a.path {
        Some(path) if a.dry_run => return crate::workspace::dry_run(ctx, path, &a.workspace),
        Some(path) => Some(crate::workspace::build(path, &a.workspace)?),
        None => None,
    };
    let vm: VmRecord = ctx
        .request(&Request::VmCreate(a.create.into_params(false)))?
        .decode("vm.create")?;
    ctx.note(&format!(
        "spec: {} vcpu | {} MiB | {} disk | {}",
        vm.vcpu,
        vm.memory_mib,
        vm.work_disk_size,
        vm.vmm.as_deref().unwrap_or("vmm ?")
    ));
    ctx.note(&format!(
        "vm {} ready in {:.1}s{}",
        vm.name,
        started.elapsed().as_secs_f64(),
        vm.ip.map(|ip| format!(" at {ip}")).unwrap_or_default()
    ));
    if a.detach {
        if let Some(p) = &prepared {
            crate::workspace::send(ctx, &vm, p, false)?;
        }
        return ctx.print(&format!(
            "{}\nconnect: banger vm ssh {}   stop: banger vm stop {}\n",
            vm.name, vm.name, vm.name
        ));
    }
    let copied = match &prepared {
        Some(p) => crate::workspace::send(ctx, &vm, p, false).map(|ws| Some(ws.guest_path)),
        None => Ok(None),
    };
    let tty = a.command.is_empty() && ctx.term.stdin_tty;
    let command = match &copied {
        Ok(Some(dir)) if a.command.is_empty() && tty => banger_workspace::guest::shell_in_dir(dir),
        Ok(Some(dir)) if !a.command.is_empty() => banger_workspace::guest::in_dir(dir, &a.command),
        _ => a.command.clone(),
    };
    let session = copied.and_then(|_| {
        ctx.request(&Request::VmSshInfo(VmRef {
            vm: vm.name.to_string(),
        }))
        .and_then(|answer| answer.decode::<SshInfo>("vm.ssh_info"))
        .and_then(|info| run_ssh(&info, tty, &command))
    });
    if a.rm {
        // The session is over; deleting must not be cut short by a second Ctrl-C.
        let _guard = IgnoreInterrupts::new();
        let deleted = ctx.request(&Request::VmDelete(VmDeleteParams {
            vm: vm.name.to_string(),
            force: true,
        }));
        match deleted.and_then(|a| a.decode::<VmRecord>("vm.delete")) {
            Ok(gone) => crate::workspace::forget(ctx, &gone),
            Err(e) => ctx.note(&format!(
                "banger: could not delete vm {}: {e}; {RM_TIMEOUT_NOTE} {}",
                vm.name, vm.name
            )),
        }
    } else if a.command.is_empty() {
        ctx.note(&format!(
            "vm {} is still running: banger vm ssh {} to return, banger vm stop {} or banger vm rm -f {} when done",
            vm.name, vm.name, vm.name, vm.name
        ));
    }
    exit_with(session?)
}

/// Turns the remote status into banger's exit: 0 is success; anything else exits with it,
/// the remote side having printed whatever it had to say.
fn exit_with(status: i32) -> Result<(), CliError> {
    if status == 0 {
        Ok(())
    } else {
        Err(CliError::reported(status))
    }
}

/// Runs ssh with the user's terminal and returns the remote exit status (ssh's own failures
/// are 255).
fn run_ssh(info: &SshInfo, tty: bool, command: &[String]) -> Result<i32, CliError> {
    // Ctrl-C belongs to the remote command while it runs: banger waits for ssh to report it.
    let _guard = IgnoreInterrupts::new();
    let mut cmd = crate::sshmux::command(info, tty, command);
    // SAFETY: only async-signal-safe calls between fork and exec: restore default SIGINT and
    // SIGQUIT handling in the child, which must not inherit banger's ignore.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            libc::signal(libc::SIGQUIT, libc::SIG_DFL);
            Ok(())
        });
    }
    let status = cmd
        .status()
        .map_err(|e| CliError::local(format!("running ssh: {e} (install openssh-client)")))?;
    use std::os::unix::process::ExitStatusExt;
    Ok(status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
}

/// Ignores SIGINT/SIGQUIT in banger while alive.
struct IgnoreInterrupts {
    int: libc::sighandler_t,
    quit: libc::sighandler_t,
}

impl IgnoreInterrupts {
    fn new() -> Self {
        // SAFETY: signal(2) swapping dispositions; the previous ones are restored on drop.
        unsafe {
            IgnoreInterrupts {
                int: libc::signal(libc::SIGINT, libc::SIG_IGN),
                quit: libc::signal(libc::SIGQUIT, libc::SIG_IGN),
            }
        }
    }
}

impl Drop for IgnoreInterrupts {
    fn drop(&mut self) {
        // SAFETY: restores the dispositions saved in new().
        unsafe {
            libc::signal(libc::SIGINT, self.int);
            libc::signal(libc::SIGQUIT, self.quit);
        }
    }
}
