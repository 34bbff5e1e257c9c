//! The daemon behind `retryq run` (placeholder until the worker lands).

use crate::config::Settings;

/// Why the daemon stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Not yet available.
    #[error("the daemon is not built into this binary yet")]
    NotAvailable,
}

/// Runs the daemon until SIGTERM or SIGINT.
pub fn run_until_signal(_settings: Settings) -> Result<(), DaemonError> {
    Err(DaemonError::NotAvailable)
}
