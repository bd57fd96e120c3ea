//! `bangerd`, the banger daemon.
//!
//! It owns the state store and all orchestration: the lifecycle engine ([`engine`]), the
//! protocol server ([`server`]) and the choice of VMM ([`vmms`]). It runs as the owner user; the
//! privileged steps it will need go through the root helper, never through a shell.

pub mod bridge_cidr;
pub mod build_dir;
pub mod disks;
pub mod dm;
pub mod dns;
pub mod engine;
pub mod error;
pub mod failpoint;
pub mod handles;
pub mod input;
pub mod layout;
pub mod leaks;
pub mod logging;
pub mod progress;
pub mod reserve;
pub mod server;
pub mod ssh;
pub mod vmms;

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use banger_config::Config;
use banger_store::Store;
use tokio_util::sync::CancellationToken;
use tracing::info;

use banger_net::RealNetOps;

use crate::engine::{Deps, Engine, NoFaults};
use crate::layout::Layout;
use crate::server::Daemon;
use crate::vmms::ConfigVmmProvider;
use banger_sys::RealRunner;

pub fn layout_for(config: &Config) -> Layout {
    Layout::new(config.state_dir.clone(), config.runtime_dir.clone())
}

/// Holds the daemon's single-instance lock (an flock on `<runtime_dir>/bangerd.lock`) for the
/// life of the process.
#[derive(Debug)]
pub struct InstanceLock {
    _file: std::fs::File,
}

impl InstanceLock {
    pub fn acquire(layout: &Layout) -> anyhow::Result<Self> {
        let path = layout.runtime_dir.join("bangerd.lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: flock on an fd we own.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let pid = std::fs::read_to_string(layout.pid_file()).unwrap_or_default();
            bail!(
                "another bangerd is already running (pid {}) for {}",
                pid.trim(),
                layout.runtime_dir.display()
            );
        }
        std::fs::write(layout.pid_file(), std::process::id().to_string())
            .with_context(|| format!("writing {}", layout.pid_file().display()))?;
        Ok(InstanceLock { _file: file })
    }
}

/// The host network operations: through the root helper when `helper_socket` is set (the
/// daemon then needs no privilege), else run here (which needs root for bridged networking).
fn net_ops(
    config: &Config,
    runner: Arc<dyn banger_sys::CommandRunner>,
) -> Arc<dyn banger_net::NetOps> {
    match &config.helper_socket {
        Some(sock) => Arc::new(banger_helper::HelperClient::new(sock.clone())),
        None => {
            // SAFETY: getuid has no preconditions. Taps are made for the daemon's user.
            let net = RealNetOps::new(runner).with_tap_owner(unsafe { libc::getuid() });
            // The config loader checked the name; an unparsable one keeps the default table.
            Arc::new(match banger_net::BridgeName::parse(&config.bridge_name) {
                Ok(b) => net.for_bridge(&b),
                Err(_) => net,
            })
        }
    }
}

/// Runs the daemon until SIGTERM/SIGINT or a `daemon.shutdown` request. VMs keep running: their
/// VMMs live in their own sessions, and the next daemon re-adopts them.
pub async fn run(mut config: Config, log_file: PathBuf) -> anyhow::Result<()> {
    let layout = layout_for(&config);
    let _lock = InstanceLock::acquire(&layout)?;
    let store = Store::open(layout.db()).context("opening the state store")?;
    if let Err(e) = reserve::ensure(&layout.space_reserve()) {
        tracing::warn!(path = %layout.space_reserve().display(), error = %e,
            "could not set space aside for recording stops on a full disk");
    }
    let runner: Arc<dyn banger_sys::CommandRunner> = Arc::new(RealRunner);
    let net = net_ops(&config, runner.clone());
    bridge_cidr::resolve(&mut config, net.as_ref(), &layout, &store)
        .await
        .map_err(anyhow::Error::msg)?;
    let config = Arc::new(config);
    let engine = Engine::new(
        store,
        config.clone(),
        layout.clone(),
        Deps {
            vmms: Arc::new(ConfigVmmProvider::new(&config)),
            runner: runner.clone(),
            hook: Arc::new(NoFaults),
            net,
        },
    );
    let reconcile = engine.reconcile().await;
    let shutdown = CancellationToken::new();
    // After reconcile, so the first names are the re-adopted VMs'. Never fails start-up.
    let dns = dns::start(&engine, shutdown.clone()).await;

    let socket = layout.socket();
    // Clients refuse a socket in a directory another user could have made or can write
    // (banger_config::trust); refuse to listen in one, with the same words.
    if let Some(dir) = socket.parent() {
        banger_config::trust::check_dir_chain(dir, nix::unistd::geteuid().as_raw())?;
    }
    match std::fs::remove_file(&socket) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("removing stale socket {}", socket.display()));
        }
        _ => {}
    }
    // umask 077 (set in main) makes the socket 0600 from the moment it exists.
    let listener = tokio::net::UnixListener::bind(&socket)
        .with_context(|| format!("binding {}", socket.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("chmod {}", socket.display()))?;
    }
    let daemon = Arc::new(Daemon {
        engine,
        started: Instant::now(),
        shutdown,
        reconcile,
        log_file,
        dns,
    });
    info!(socket = %socket.display(), pid = std::process::id(), "bangerd listening");

    let shutdown = daemon.shutdown.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        info!("signal received; shutting down (VMs keep running)");
        shutdown.cancel();
    });
    server::serve(listener, daemon, std::time::Duration::from_secs(15)).await;
    let _ = std::fs::remove_file(&socket);
    let _ = std::fs::remove_file(layout.pid_file());
    info!("bangerd stopped");
    Ok(())
}
