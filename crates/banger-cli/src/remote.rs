//! Commands that put the user inside a VM: `vm run`, `vm ssh`, `vm exec`.
//!
//! The daemon answers where the VM is and which key and known_hosts reach it (`vm.ssh_info`);
//! the CLI runs `ssh` itself, because only it has the user's terminal. The remote command's exit
//! status becomes banger's.

use std::time::{Duration, Instant};

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
    let tty = tty || (command.is_empty() && ctx.term.stdin_tty);
    if tty || command.is_empty() {
        return exit_with(run_ssh(&info, tty, command)?);
    }
    let _armed = crate::interrupt::arm();
    exit_with(run_interruptible(&info, command)?)
}

/// `banger vm run [flags] [-- cmd]`: create and boot, then a shell or the command, then (with
/// `--rm`) delete.
pub fn run(ctx: &mut Ctx<'_>, a: RunArgs) -> Result<(), CliError> {
    let started = Instant::now();
    if let Some(path) = &a.path
        && a.dry_run
    {
        return crate::workspace::dry_run(ctx, path, &a.workspace);
    }
    // Ctrl-C, SIGTERM and SIGHUP are caught from here on: whatever phase they arrive in, the
    // temp repo goes, with --rm the VM goes, and banger exits 128 + the signal.
    let _armed = crate::interrupt::arm();
    let interrupted = || crate::interrupt::caught().map(crate::interrupt::exit_code);
    // The repository is inspected (and its history built) before a VM exists, so a bare repo
    // or a submodule fails fast and --dry-run never boots anything.
    let prepared = match &a.path {
        Some(path) => Some(crate::workspace::build(ctx, path, &a.workspace)?),
        None => None,
    };
    if let Some(code) = interrupted() {
        return Err(CliError::reported(code));
    }
    let mut params = a.create.into_params(false);
    // A VM of `vm run --rm` whose start fails, or whose client is interrupted while it boots,
    // is deleted by the daemon.
    params.rm_on_failure = a.rm;
    let created = ctx
        .request(&Request::VmCreate(params))
        .and_then(|r| r.decode::<VmRecord>("vm.create"));
    let vm = match (created, interrupted()) {
        (Ok(vm), Some(code)) => {
            // Interrupted just as the VM came up.
            if a.rm {
                delete_vm(ctx, &vm);
            }
            return Err(CliError::reported(code));
        }
        (Err(_), Some(code)) => return Err(CliError::reported(code)),
        (Ok(vm), None) => vm,
        (Err(e), None) => return Err(e),
    };
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
    let copied = match (copied, interrupted()) {
        (_, Some(code)) => Err(CliError::reported(code)),
        (c, None) => c,
    };
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
        .and_then(|info| {
            if tty || command.is_empty() {
                run_ssh(&info, tty, &command)
            } else {
                run_interruptible(&info, &command)
            }
        })
    });
    // The temp repo goes before the (possibly slow) delete.
    drop(prepared);
    if a.rm {
        delete_vm(ctx, &vm);
    } else if a.command.is_empty() {
        ctx.note(&format!(
            "vm {} is still running: banger vm ssh {} to return, banger vm stop {} or banger vm rm -f {} when done",
            vm.name, vm.name, vm.name, vm.name
        ));
    }
    if let Some(code) = interrupted() {
        return Err(CliError::reported(code));
    }
    exit_with(session?)
}

/// `--rm`: deletes the VM (a second Ctrl-C cannot cut this short: signals are caught).
fn delete_vm(ctx: &mut Ctx<'_>, vm: &VmRecord) {
    // The delete must go through even after a signal: its request is not to be half-closed.
    let _guard = IgnoreInterrupts::new();
    let _hold = crate::interrupt::hold();
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
}

/// Runs the remote command under [`EXEC_WRAPPER`] (its pid and process group recorded in the
/// guest under a random token, its signal death turned into 128 + N); a signal caught by banger
/// meanwhile interrupts that process group in the guest (SIGINT, SIGKILL after 3 s) over a
/// second ssh run and makes banger exit 128 + the signal. Must be called with signals armed.
fn run_interruptible(info: &SshInfo, command: &[String]) -> Result<i32, CliError> {
    let token = random_token();
    let mut remote = vec![
        "sh".to_string(),
        "-c".to_string(),
        EXEC_WRAPPER.to_string(),
        "sh".to_string(),
        token.clone(),
    ];
    remote.extend(command.iter().cloned());
    let mut child = crate::sshmux::command(info, false, &remote)
        .spawn()
        .map_err(|e| CliError::local(format!("running ssh: {e} (install openssh-client)")))?;
    let status = loop {
        if let Some(sig) = crate::interrupt::caught() {
            interrupt_remote(info, &token);
            // The session ends with its command; a stuck ssh is not waited for long.
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(5) {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
            return Ok(crate::interrupt::exit_code(sig));
        }
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(CliError::local(format!("waiting for ssh: {e}"))),
        }
    };
    use std::os::unix::process::ExitStatusExt;
    let code = status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
    if code == 255 || status.signal().is_some() {
        // ssh itself died: a Ctrl-C at the terminal reaches it as well as banger.
        std::thread::sleep(Duration::from_millis(50));
        if let Some(sig) = crate::interrupt::caught() {
            interrupt_remote(info, &token);
            return Ok(crate::interrupt::exit_code(sig));
        }
    }
    Ok(code)
}

/// The guest side of [`run_interruptible`]: `$1` is the token, the rest the command. It
/// records `<pid> <process group>` in `$TMPDIR/.banger-exec-<token>` (the ssh server makes
/// each session its own process group), runs the command in the foreground (not `exec`: its
/// death by a signal must become 128 + N, which ssh cannot report as an exit code), and
/// removes the record.
const EXEC_WRAPPER: &str = r#"f="${TMPDIR:-/tmp}/.banger-exec-$1"; shift; g=$$; read -r _ _ _ _ g _ < /proc/$$/stat 2>/dev/null; echo "$$ $g" > "$f"; "$@"; r=$?; rm -f "$f"; exit $r"#;

/// Interrupts what [`EXEC_WRAPPER`] with token `$1` runs: SIGINT to its process group (to the
/// wrapper alone if the group is not its own), SIGKILL if it is still there after 3 s.
const EXEC_INTERRUPT: &str = r#"f="${TMPDIR:-/tmp}/.banger-exec-$1"; [ -r "$f" ] || exit 0; read -r p g < "$f"; t=$p; [ "${g:-0}" -gt 1 ] && [ "$g" = "$p" ] && t=-$g; kill -INT $t 2>/dev/null; i=0; while kill -0 $t 2>/dev/null && [ $i -lt 30 ]; do sleep 0.1; i=$((i+1)); done; kill -KILL $t 2>/dev/null; rm -f "$f"; exit 0"#;

fn interrupt_remote(info: &SshInfo, token: &str) {
    let remote = [
        "sh".to_string(),
        "-c".to_string(),
        EXEC_INTERRUPT.to_string(),
        "sh".to_string(),
        token.to_string(),
    ];
    let _ = crate::sshmux::command(info, false, &remote)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
}

/// 16 random hex digits (from the kernel; a clock-and-pid fallback only if it cannot be read).
fn random_token() -> String {
    let mut b = [0u8; 8];
    let ok = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .is_ok();
    if !ok {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        b = (t ^ u64::from(std::process::id())).to_le_bytes();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
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
