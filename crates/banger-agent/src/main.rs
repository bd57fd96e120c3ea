//! `banger-agent`: PID 1 of banger's initramfs. See the library's documentation for what it
//! does; this is the boot sequence.
//!
//! Each step logs one line to the console with its duration. Any failure prints
//! `banger-agent: FATAL: <step>: <error>` and powers the VM off, so the VMM exits and the daemon
//! can report the console tail.

use std::path::Path;
use std::time::Duration;

use banger_agent::error::AgentError;
use banger_agent::{
    console, disks, identity, modules, nested, net, pid1, root, services, switch, sys,
};
use banger_guest::{InitMode, SshServer};

/// How long to wait for the config disk and every disk it names to appear.
const DISK_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for the network interface after its driver is loaded.
const NIC_TIMEOUT: Duration = Duration::from_secs(5);

fn main() {
    // SAFETY: getpid has no preconditions.
    if unsafe { libc::getpid() } != 1 {
        // The agent mounts over /dev and powers the machine off on failure: never on a host.
        eprintln!(
            "banger-agent: refusing to run: this is banger's guest init and must be PID 1 of its initramfs"
        );
        std::process::exit(2);
    }
    // PID 1 must never exit (the kernel panics when init dies, and the VMM keeps running with a
    // dead guest): a panic powers the VM off instead of unwinding out of main.
    std::panic::set_hook(Box::new(|info| {
        console::line(&format!("FATAL: panic: {info}"));
        sys::power_off();
    }));
    let mut log = console::Console::new();
    let err = match run(&mut log) {
        Ok(never) => match never {},
        Err(e) => e,
    };
    log.fatal(&err);
    sys::power_off();
}

/// The boot sequence. Returns only on failure: on success the process image is replaced by the
/// image's init, or the agent stays PID 1 for good.
fn run(log: &mut console::Console) -> Result<std::convert::Infallible, AgentError> {
    log.step("mount /dev /proc /sys /run", || {
        sys::mount_early()?;
        console::reopen_console();
        Ok(String::new())
    })?;

    log.step("load modules", || {
        let report = modules::load_all(Path::new(banger_guest::initramfs::LOAD_ORDER_FILE))?;
        for (name, err) in &report.failed {
            console::line(&format!("module {name} failed to load: {err}"));
        }
        Ok(report.summary())
    })?;

    let found = log.step_with("find disks", || {
        let found =
            disks::wait_for_disks(Path::new("/sys/block"), Path::new("/dev"), DISK_TIMEOUT)?;
        let detail = found.describe();
        Ok((found, detail))
    })?;
    let config = found.config;

    if let Some(m) = &config.modules {
        log.step("nested modules", || {
            let dev = disks::device_for(&found.by_uuid, &m.uuid, "modules disk")?;
            let report = nested::mount_and_load(dev, Path::new(nested::MODULES_MOUNT))?;
            for (name, err) in &report.failed {
                console::line(&format!("module {name} failed to load: {err}"));
            }
            Ok(report.summary())
        })?;
    }

    log.step("mount root", || {
        let plan = root::root_plan(&config.root, &found.by_uuid, Path::new(root::NEWROOT))?;
        root::execute(&plan)?;
        Ok(root::describe(&config.root, &found.by_uuid))
    })?;

    if let Some(uuid) = &config.work_uuid {
        log.step("mount work disk", || {
            let dev = disks::device_for(&found.by_uuid, uuid, "work disk")?;
            let seeded = root::mount_work(dev, Path::new(root::NEWROOT))?;
            Ok(format!(
                "{} at /root{}",
                dev.display(),
                if seeded {
                    ", seeded from the image's /root"
                } else {
                    ""
                }
            ))
        })?;
    }

    if let Some(netcfg) = &config.network {
        log.step("network", || {
            net::configure(netcfg, Path::new("/sys/class/net"), NIC_TIMEOUT)
        })?;
    }

    log.step("switch_root", || {
        switch::switch_root(Path::new(root::NEWROOT))?;
        Ok(String::new())
    })?;

    // Written after the chroot so every path (and any symlink in it) resolves exactly as the
    // guest itself will see it.
    log.step("identity", || {
        let summary = identity::apply(Path::new("/"), &config)?;
        sys::set_hostname(&config.hostname)?;
        Ok(summary)
    })?;

    if let Some(m) = &config.modules {
        log.step("module tree", || {
            nested::expose_tree(Path::new("/"), Path::new(nested::MODULES_MOUNT), &m.release)
        })?;
    }

    match config.init_mode {
        InitMode::Image => {
            // Chosen before anything is started, so a missing init fails the boot cleanly.
            let init = switch::choose_init(Path::new("/"), &config.init_candidates())?;
            if config.ssh_server == SshServer::Agent {
                log.step("ssh server", || {
                    // The image's init may mount devpts later; ptys are needed as soon as the
                    // server answers.
                    sys::ensure_devpts()?;
                    let server = services::AgentSshd::prepare(&config)?;
                    let pid = server.fork()?;
                    Ok(format!("built-in server on port 22, pid {pid}"))
                })?;
            }
            log.total(&format!("exec {}", init.display()));
            Err(switch::exec(&init))
        }
        InitMode::Agent => {
            let sup = log.step_with("agent init", || {
                let sup = pid1::Supervisor::prepare(&config)?;
                let detail = sup.describe();
                Ok((sup, detail))
            })?;
            log.total("the agent stays PID 1");
            sup.run()
        }
    }
}
