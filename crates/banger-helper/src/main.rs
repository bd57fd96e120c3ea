//! `banger-helper`: the root helper's binary. See the library docs and `docs/helper.md`.
//!
//! ```text
//! banger-helper serve --owner UID [--socket /run/banger/helper.sock] [--config /etc/banger/config.toml]
//! banger-helper remove-all [--config /etc/banger/config.toml]
//! ```

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use banger_helper::{
    DEFAULT_CONFIG, DEFAULT_SOCKET, DEFAULT_SOCKET_MODE, Helper, HelperConfig, ServeOptions,
};
use clap::{Parser, Subcommand};
use tracing::{error, info};

#[derive(Debug, Parser)]
#[command(name = "banger-helper", version, about = "banger's root helper")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the helper's socket until SIGTERM or SIGINT.
    Serve {
        /// The socket to create.
        #[arg(long, default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
        /// The uid bangerd runs as: the only caller besides root, and the owner of taps and
        /// image tars.
        #[arg(long)]
        owner: u32,
        /// banger's config (state_dir, runtime_dir, bridge_name, bridge_cidr are used).
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Uninstall the host network state once, as root, without a socket: banger's nftables
    /// table, the taps on the configured bridge and the bridge (`banger system uninstall` runs it).
    RemoveAll {
        /// banger's config (bridge_name is used).
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_target(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BANGER_HELPER_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match cli.command {
        Command::Serve {
            socket,
            owner,
            config,
        } => match serve(socket, owner, config) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                error!("{e}");
                ExitCode::FAILURE
            }
        },
        Command::RemoveAll { config } => match remove_all(config) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                error!("{e}");
                ExitCode::FAILURE
            }
        },
    }
}

fn remove_all(config: PathBuf) -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("banger-helper remove-all must run as root".into());
    }
    let host = banger_config::HostInfo::detect().map_err(|e| e.to_string())?;
    let cfg = banger_config::Config::load(&config, &host)
        .map_err(|e| format!("{}: {e}", config.display()))?;
    let bridge = banger_net::BridgeName::parse(&cfg.bridge_name)
        .map_err(|e| format!("{}: bridge_name: {e}", config.display()))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting the runtime: {e}"))?;
    let net = banger_net::RealNetOps::new(Arc::new(banger_sys::RealRunner)).for_bridge(&bridge);
    rt.block_on(banger_net::NetOps::remove_all(&net, Some(&bridge)))
        .map_err(|e| e.to_string())?;
    info!(
        "op=RemoveAll bridge={bridge:?} result=ok (banger's nftables table, taps and bridge removed)",
        bridge = bridge.as_str()
    );
    Ok(())
}

fn serve(socket: PathBuf, owner: u32, config: PathBuf) -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("banger-helper must run as root (it exists to do what bangerd may not)".into());
    }
    let cfg = HelperConfig::load(&config, owner).map_err(|e| e.to_string())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("starting the runtime: {e}"))?;
    rt.block_on(async move {
        let listener =
            banger_helper::bind(&socket, &cfg, DEFAULT_SOCKET_MODE).map_err(|e| e.to_string())?;
        info!(
            "serving {} for owner uid {} (state {}, bridge {} {})",
            socket.display(),
            cfg.owner_uid,
            cfg.state_dir.display(),
            cfg.bridge_name,
            cfg.bridge_cidr
        );
        let helper = Arc::new(Helper::real(cfg));
        let shutdown = async {
            use tokio::signal::unix::{SignalKind, signal};
            match (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) {
                (Ok(mut term), Ok(mut int)) => {
                    tokio::select! {
                        _ = term.recv() => {},
                        _ = int.recv() => {},
                    }
                }
                _ => std::future::pending::<()>().await,
            }
            info!("shutting down");
        };
        banger_helper::serve(listener, helper, ServeOptions::default(), shutdown).await;
        Ok(())
    })
}
