//! Logging setup for the binary: `tracing` to stderr, pretty or JSON, the
//! level from `[log] level` unless `RUST_LOG` is set.

use retryq::config::{LogFormat, LogSettings};
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber for `retryq run` (from `[log]`).
pub fn init(log: &LogSettings) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    install(filter, log.format);
}

/// Installs a quiet subscriber for one-shot commands: warnings and errors
/// (a quarantined record, a lock held elsewhere) unless `RUST_LOG` says more.
pub fn init_quiet() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    install(filter, LogFormat::Pretty);
}

fn install(filter: EnvFilter, format: LogFormat) {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second call (tests, or `run` after the quiet setup) keeps the first.
    let _ = match format {
        LogFormat::Pretty => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
