//! A fleet: several `retryq run` daemons on one PostgreSQL store
//! (`[store] backend = "postgres"`), and what makes them one queue beyond
//! the store itself.
//!
//! **Shared, in the database:** the items (so `stats` and every list show
//! the whole fleet's backlog) and the operator's pause ([`pause`]), which
//! every daemon obeys and which survives restarts.
//! **Per daemon:** the circuit breaker, a pause caused by a 401, plugin
//! state, and the local folder (`[store] path`) holding the daemon's owner
//! lock (how the CLI finds it) and its poison-item marker.
//!
//! [`Fleet`] is what the daemon opens in place of a local store: the
//! [`PostgresRetryQueue`], the admin API's [`control::FleetControl`] and
//! the [`link::FleetLink`] task (wake-ups, dead daemons' leases, pause).

pub mod control;
pub mod link;
pub mod pause;

use std::sync::Arc;

use crate::admin::{RetryWorkerControl, WorkerControl};
use crate::error::{QueueError, QueueResult};
use crate::store::postgres::{PostgresOptions, PostgresRetryQueue};
use crate::store::{RetryQueue, StoreOptions};
use crate::worker::RetryWorker;

/// A daemon's own folder on a PostgreSQL store when `[store] path` is
/// not set: its owner lock and poison marker (the items are in the
/// database).
pub const DEFAULT_NODE_PATH: &str = "retryq-data/node";

/// A `[store.postgres]` setting that cannot work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionsFault {
    /// The dotted key (`store.postgres.url`).
    pub key: String,
    /// The value as shown in the error (never a secret).
    pub value: String,
    /// What is wrong.
    pub reason: String,
}

/// Checks `[store.postgres]` for a store whose backend is postgres (or not:
/// then the table, if any, is unused and not checked).
pub fn check_store_options(
    is_postgres: bool,
    options: Option<&PostgresOptions>,
) -> Result<(), OptionsFault> {
    if !is_postgres {
        return Ok(());
    }
    let Some(options) = options else {
        return Err(OptionsFault {
            key: "store.postgres".to_owned(),
            value: "(missing)".to_owned(),
            reason: "backend = \"postgres\" needs a [store.postgres] table with at least `url`"
                .to_owned(),
        });
    };
    options.validate().map_err(|e| OptionsFault {
        key: format!("store.postgres.{}", e.field),
        value: shown_value(options, e.field),
        reason: e.reason,
    })
}

/// A field's value for an error message; the url may hold a password, so
/// only its endpoint is shown.
fn shown_value(options: &PostgresOptions, field: &str) -> String {
    match field {
        "url" => "(not shown)".to_owned(),
        "schema" => format!("{:?}", options.schema),
        "pool_size" => options.pool_size.to_string(),
        "password_env" => format!("{:?}", options.password_env.as_deref().unwrap_or("")),
        "password_file" => format!(
            "{:?}",
            options
                .password_file
                .as_deref()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        ),
        "connect_timeout" => humantime::format_duration(options.connect_timeout).to_string(),
        "sslmode" => options.sslmode.map(|m| m.to_string()).unwrap_or_default(),
        _ => String::new(),
    }
}

fn missing_options() -> QueueError {
    QueueError::invalid("backend = \"postgres\" needs a [store.postgres] table")
}

/// Opens the PostgreSQL store (for the CLI and embedding hosts).
pub fn open_postgres(
    options: Option<&PostgresOptions>,
    store: StoreOptions,
) -> QueueResult<Arc<dyn RetryQueue>> {
    let options = options.ok_or_else(missing_options)?;
    Ok(Arc::new(PostgresRetryQueue::open(options, store)?))
}

/// Connects to the server the way the store would, and asks its version:
/// what `retryq config check` runs. The error names the server as
/// `host:port`, never the password.
pub fn probe(options: &PostgresOptions) -> QueueResult<String> {
    let (config, tls) = options
        .connect_config()
        .map_err(|e| QueueError::invalid(e.to_string()))?;
    let unreachable = |e: postgres::Error| {
        // The driver's own text is generic ("error connecting to server");
        // the cause (refused, timed out, bad password) is in its source.
        let cause = std::error::Error::source(&e)
            .map(|s| format!(": {s}"))
            .unwrap_or_default();
        QueueError::storage(
            "config check",
            format!(
                "cannot reach PostgreSQL at {}: {e}{cause}",
                options.endpoint()
            ),
        )
    };
    let mut client = config.connect(tls).map_err(unreachable)?;
    let version: String = client
        .query_one("SHOW server_version", &[])
        .map_err(unreachable)?
        .get(0);
    let _ = client.close();
    Ok(version)
}

/// Runs `f` on a thread of its own and waits for it. The PostgreSQL
/// client blocks on a runtime of its own, which panics on a thread that
/// already runs one (the daemon's actix runtime).
fn off_runtime<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|scope| {
        scope
            .spawn(f)
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// A daemon's membership of a fleet; see the module doc.
#[derive(Debug)]
pub struct Fleet {
    store: Arc<PostgresRetryQueue>,
    instance: String,
}

impl Fleet {
    /// Opens the shared store as instance `store.instance_id`, then returns
    /// to pending the leases of daemons that are gone (never those of live
    /// ones: each holds its instance lock).
    pub fn open(options: Option<&PostgresOptions>, store: StoreOptions) -> QueueResult<Fleet> {
        let options = options.ok_or_else(missing_options)?.clone();
        off_runtime(move || Fleet::open_here(&options, store))
    }

    fn open_here(options: &PostgresOptions, store: StoreOptions) -> QueueResult<Fleet> {
        let instance = store.instance_id.clone();
        let store = Arc::new(PostgresRetryQueue::open(options, store)?);
        match store.release_orphaned_leases() {
            Ok(0) => {}
            Ok(released) => tracing::info!(
                released,
                "released the leases of daemons that are gone: their items are pending again"
            ),
            Err(e) => {
                let _ = store.close();
                return Err(e);
            }
        }
        tracing::info!(
            server = %store.endpoint(),
            instance = %instance,
            "joined the fleet on PostgreSQL"
        );
        Ok(Fleet { store, instance })
    }

    /// The store, for the worker and the API.
    pub fn queue(&self) -> Arc<dyn RetryQueue> {
        self.store.clone()
    }

    /// Pauses `worker` (before it starts) when the fleet is paused, so a
    /// restarted daemon delivers nothing the operator paused. Returns the
    /// reason applied.
    pub fn apply_pause(&self, worker: &RetryWorker) -> QueueResult<Option<String>> {
        let shared = pause::SharedPause::new(self.store.clone());
        let pause = off_runtime(move || shared.get())?;
        Ok(pause.map(|p| {
            tracing::warn!(reason = %p.reason, by = %p.by, since = %p.since, "the fleet is paused: delivery starts paused");
            worker.pause_because(p.reason.clone());
            p.reason
        }))
    }

    /// The admin API's control of `worker`, with pauses shared.
    pub fn control(&self, worker: Arc<RetryWorker>) -> Arc<dyn WorkerControl> {
        Arc::new(control::FleetControl::new(
            RetryWorkerControl::new(worker),
            pause::SharedPause::new(self.store.clone()),
            self.instance.clone(),
        ))
    }

    /// Starts the link task (call once the worker runs); `applied` is what
    /// [`Fleet::apply_pause`] returned.
    pub fn link(&self, worker: Arc<RetryWorker>, applied: Option<String>) -> link::FleetLink {
        link::FleetLink::start(self.store.clone(), worker, applied)
    }
}
