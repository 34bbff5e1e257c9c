//! The daemon behind `retryq run`: opens the configured store, loads the
//! transport plugins, starts the `RetryWorker` and the admin API in one
//! actix System, and on SIGTERM or SIGINT stops gracefully (the API stops
//! accepting, pushes in flight finish or have their leases released, the
//! store is closed) before returning.

use std::sync::Arc;
use std::time::Duration;

use crate::admin::{self, record_worker_metrics, AdminConfig, AdminState, RetryWorkerControl};
use crate::config::Settings;
use crate::metrics::Metrics;
use crate::plugin::{load_checker, load_pusher, PluginError};
use crate::worker::{RetryWorker, WorkerError};

/// How long a graceful stop waits for pushes in flight.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Why the daemon could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The store could not be opened.
    #[error("cannot open the store: {0}")]
    Store(#[from] crate::error::QueueError),
    /// A plugin could not be loaded.
    #[error("[{section}] {source}")]
    Plugin {
        /// `pusher` or `checker`.
        section: &'static str,
        /// What went wrong.
        source: PluginError,
    },
    /// The worker refused its configuration or failed to start.
    #[error(transparent)]
    Worker(#[from] WorkerError),
    /// The admin API could not start.
    #[error(transparent)]
    Admin(#[from] admin::AdminError),
    /// Signal handling failed.
    #[error("cannot install signal handlers: {0}")]
    Signal(std::io::Error),
}

/// Runs the daemon until SIGTERM or SIGINT.
pub fn run_until_signal(settings: Settings) -> Result<(), DaemonError> {
    actix_rt::System::new().block_on(run(settings))
}

async fn run(settings: Settings) -> Result<(), DaemonError> {
    let queue = settings.open_store()?;
    let search_path = &settings.plugins.search_path;
    let pusher =
        load_pusher(&settings.pusher, search_path).map_err(|source| DaemonError::Plugin {
            section: "pusher",
            source,
        })?;
    let mut worker = RetryWorker::new(settings.worker_config(), queue.clone(), pusher)?;
    if settings.checker.is_configured() {
        let checker =
            load_checker(&settings.checker, search_path).map_err(|source| DaemonError::Plugin {
                section: "checker",
                source,
            })?;
        worker = worker.with_checker(checker);
    }
    let worker = Arc::new(worker);
    let metrics = Arc::new(Metrics::new());
    record_worker_metrics(&worker, metrics.clone());
    let admin_config = AdminConfig::from_settings(&settings.admin)?;
    worker.start().await?;
    let state = AdminState::new(
        queue.clone(),
        Arc::new(RetryWorkerControl::new(worker.clone())),
        metrics,
    );
    let server = match admin::bind(admin_config, state) {
        Ok(server) => server,
        Err(e) => {
            worker.stop(STOP_TIMEOUT).await?;
            return Err(e.into());
        }
    };
    tracing::info!(
        admin = %server.local_addr(),
        store = %settings.store.effective_path().display(),
        pusher = %settings.pusher.describe(),
        "retryq running"
    );
    let handle = server.handle();
    let serving = actix_rt::spawn(server.run());

    let mut terminate =
        actix_rt::signal::unix::signal(actix_rt::signal::unix::SignalKind::terminate())
            .map_err(DaemonError::Signal)?;
    tokio::select! {
        _ = actix_rt::signal::ctrl_c() => tracing::info!("SIGINT: stopping"),
        _ = terminate.recv() => tracing::info!("SIGTERM: stopping"),
    }
    handle.stop(true).await;
    let _ = serving.await;
    worker.stop(STOP_TIMEOUT).await?;
    queue.close()?;
    tracing::info!("retryq stopped; nothing in flight was lost");
    Ok(())
}
