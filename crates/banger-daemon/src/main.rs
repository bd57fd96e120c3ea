//! `bangerd`: the banger daemon binary. Usually started by the `banger` CLI on first use.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use banger_config::{Config, HostInfo};
use banger_store::{MigrationStatus, check_migrations};
use clap::Parser;

#[derive(Debug, Parser)]
#[command(name = "bangerd", version, about = "The banger daemon")]
struct Args {
    /// Config file (default: $XDG_CONFIG_HOME/banger/config.toml, or /etc/banger/config.toml).
    #[arg(long, env = "BANGER_CONFIG")]
    config: Option<PathBuf>,
    /// Report whether the state store needs migrating, without changing it: exit 0 if up to
    /// date, 1 if this binary would migrate it, 2 if it is newer than this binary.
    #[arg(long)]
    check_migrations: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match real_main(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("bangerd: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn real_main(args: Args) -> anyhow::Result<ExitCode> {
    let host = HostInfo::detect().context("detecting the host")?;
    let path = args
        .config
        .unwrap_or_else(|| Config::default_path_for(&host));
    let config = Config::load(&path, &host)?;
    let layout = banger_daemon::layout_for(&config);
    if args.check_migrations {
        let status = check_migrations(layout.db())?;
        match &status {
            MigrationStatus::UpToDate { version } => {
                println!("up to date (schema version {version})")
            }
            MigrationStatus::WouldMigrate { from, to } => {
                println!("would migrate from version {from} to {to}")
            }
            MigrationStatus::TooNew { found, supported } => println!(
                "store schema version {found} is newer than this binary supports ({supported}): upgrade banger"
            ),
        }
        return Ok(ExitCode::from(status.exit_code() as u8));
    }
    // Everything the daemon creates (sockets, disks, logs) is owner-only from the start.
    // SAFETY: umask only changes this process's file mode mask.
    unsafe { libc::umask(0o077) };
    // Make or take over banger's own directories, never re-moding one that is not banger's.
    use banger_config::dirs;
    // Judge the runtime dir's path before touching it: a link another user planted there
    // (`/tmp/banger-<uid>` -> the state dir) must not get it re-moded, marked or cleaned.
    banger_config::trust::check_dir_chain(&config.runtime_dir, nix::unistd::geteuid().as_raw())?;
    for (key, dir, ours) in [
        ("state_dir", &config.state_dir, dirs::STATE_ENTRIES),
        ("runtime_dir", &config.runtime_dir, dirs::RUNTIME_ENTRIES),
        ("cache_dir", &config.cache_dir, dirs::CACHE_ENTRIES),
    ] {
        dirs::prepare_private_dir(key, dir, ours)?;
    }
    layout.ensure().with_context(|| {
        format!(
            "creating {} and {}",
            layout.state_dir.display(),
            layout.runtime_dir.display()
        )
    })?;
    let log_file = layout.log_file();
    let _guard = banger_daemon::logging::init(&log_file, config.log_level.as_str())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let result = rt.block_on(banger_daemon::run(config, log_file));
    // Dropping the runtime would wait for every blocking task and worker; one stuck in a
    // system call that never returns would keep a stopped daemon alive (and its socket gone).
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    result?;
    Ok(ExitCode::SUCCESS)
}
