//! Structured logs to a file and to stderr. Level: `BANGER_LOG` if set (any tracing filter
//! directive, e.g. `debug` or `banger_daemon=trace`), else the config's `log_level`.

use std::path::Path;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Logs go to stderr too when someone watches it (`bangerd` run by hand). Started in the
/// background by the CLI, stderr is a file kept for start-up failures, and the log file has it all.
fn stderr_is_terminal() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal()
}

/// Installs the global subscriber. Keep the returned guard alive: it flushes the file writer.
pub fn init(
    log_file: &Path,
    level: &str,
) -> anyhow::Result<tracing_appender::non_blocking::WorkerGuard> {
    let filter = match std::env::var("BANGER_LOG") {
        Ok(v) if !v.trim().is_empty() => EnvFilter::try_new(v.trim())
            .map_err(|e| anyhow::anyhow!("invalid BANGER_LOG value {v:?}: {e}"))?,
        _ => EnvFilter::try_new(level)
            .map_err(|e| anyhow::anyhow!("invalid log_level {level:?}: {e}"))?,
    };
    let dir = log_file.parent().unwrap_or(Path::new("."));
    let name = log_file
        .file_name()
        .ok_or_else(|| anyhow::anyhow!("log file path {} has no file name", log_file.display()))?;
    let appender = tracing_appender::rolling::never(dir, name);
    let (writer, guard) = tracing_appender::non_blocking(appender);
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(writer)
                .with_ansi(false)
                .with_target(false),
        )
        .with(stderr_is_terminal().then(|| {
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_target(false)
        }))
        .try_init()
        .map_err(|e| anyhow::anyhow!("installing the logger: {e}"))?;
    Ok(guard)
}
