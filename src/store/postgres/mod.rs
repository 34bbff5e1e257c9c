//! `PostgresRetryQueue`: the [`RetryQueue`] contract on a PostgreSQL
//! server that several daemons share (a fleet draining one backlog).
//!
//! # Layout
//! One schema (the `schema` option, quoted everywhere) holds `items` (one
//! row per item, the payload's CRC-32 beside it), `totals` (the item and
//! byte counts admission caps, kept by triggers on `items` as rows of
//! differences), `quarantine` (rows that failed their checks, kept as
//! JSON), `fleet_settings` (state every daemon obeys) and
//! `schema_version` (see [`schema`]).
//!
//! # Crates
//! `postgres` (the synchronous client over tokio-postgres, by the same
//! maintainers) because the trait is blocking: each client drives its own
//! connection inside the call, with no runtime of ours to share or to
//! start. `r2d2` with `r2d2_postgres` (same author) pools the connections:
//! it checks a connection before lending it, drops broken ones and
//! reconnects, retrying with backoff until `connect_timeout`. TLS is rustls
//! with the ring provider already in the tree, via `tokio-postgres-rustls`.
//!
//! # Concurrency between daemons
//! - **Admission** (dedupe, caps, eviction) is decided over the whole
//!   table, so two daemons admitting at once could both see room for one
//!   item. Every transaction that admits takes a transaction-level advisory
//!   lock keyed by the schema first (`pg_advisory_xact_lock`), and
//!   releases it at commit. We chose the lock over SERIALIZABLE: under
//!   group commit from many daemons SERIALIZABLE aborts whole groups on
//!   predicate conflicts (every enqueue reads the counts every other one
//!   writes), and each abort repeats the group's work; the lock just
//!   queues them, and claims, acknowledgements and reads never take it.
//! - **Claims** select ready rows `FOR UPDATE SKIP LOCKED`, so daemons
//!   claiming at once take disjoint items without waiting on each other,
//!   and record `lease_until` and the claiming instance (`lease_owner`).
//! - **Liveness.** Each handle holds a session-level advisory lock
//!   `(class(schema), hashtext(instance_id))` on a connection of its own
//!   ([`session`]). A daemon that dies loses it with its connection;
//!   [`PostgresRetryQueue::release_orphaned_leases`] (and
//!   `release_leases_except`) return to pending the leases of every owner
//!   whose lock no session holds. A handle claims only while it holds its
//!   lock (after a reconnection, not until it took it back), so a live
//!   daemon's claims are never taken for orphans. Expired leases are still
//!   returned by `release_expired_leases`, from any daemon.
//! - **Wake-ups.** Enqueues and released leases `NOTIFY` the channel named
//!   after the schema, at commit. [`PostgresRetryQueue::subscribe`] gives a
//!   receiver fed by the session's `LISTEN`.
//!
//! # Durability and faults
//! A call returns `Ok` after its transaction committed; with
//! `synchronous_commit = on` (the server default) that is after the WAL
//! reached disk (and the synchronous standbys, if any). A lost connection
//! is a `Storage` error naming the server; nothing is reported applied
//! unless its commit returned. The pool reconnects on the next call. A
//! claim whose commit went unanswered may still have committed; the next
//! transaction releases what it leased ([`unanswered`]), rather than leave
//! it to its lease.
//!
//! Time comes from `StoreOptions::clock`, never from the server, so leases
//! assume the daemons' clocks agree (as NTP keeps them). Times are stored
//! with PostgreSQL's microsecond precision.

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};

use r2d2_postgres::PostgresConnectionManager;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::error::{QueueError, QueueResult};
use crate::store::{RetryQueue, StoreOptions};

mod admit;
mod ops;
pub mod options;
mod row;
pub mod schema;
mod session;
#[cfg(test)]
mod tests;
mod txn;
mod unanswered;

pub use options::{PostgresOptions, PostgresOptionsError, SslMode};
pub use schema::{SchemaError, SCHEMA_VERSION};

type Pool = r2d2::Pool<PostgresConnectionManager<MakeRustlsConnect>>;
type Conn = r2d2::PooledConnection<PostgresConnectionManager<MakeRustlsConnect>>;

/// A server that could not be reached or answered with a failure, named
/// by `host:port` (never by the url, which may carry user details).
#[derive(Debug, thiserror::Error)]
#[error("PostgreSQL at {endpoint}: {source}")]
pub struct PgUnavailable {
    /// `host:port` of the server.
    pub endpoint: String,
    /// What the driver or the pool said.
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

/// Why a transaction's work stopped: the server (the whole call fails,
/// nothing applied), or an answer for the caller (rolled back too).
enum TxError {
    Sql(postgres::Error),
    Queue(QueueError),
}

impl From<postgres::Error> for TxError {
    fn from(e: postgres::Error) -> Self {
        TxError::Sql(e)
    }
}

impl From<QueueError> for TxError {
    fn from(e: QueueError) -> Self {
        TxError::Queue(e)
    }
}

/// Table names, quoted, computed once.
struct Names {
    schema: String,
    items: String,
    quarantine: String,
    settings: String,
    /// What admission caps (see `schema.rs`, version 2).
    totals: String,
    update_sql: String,
}

/// A [`RetryQueue`] in a PostgreSQL schema; see the module doc.
pub struct PostgresRetryQueue {
    options: StoreOptions,
    names: Names,
    endpoint: String,
    pool: Pool,
    closed: AtomicBool,
    evicted: AtomicU64,
    admission_key: i64,
    lock_class: i32,
    session: Mutex<Option<session::Session>>,
    subscribers: session::Subscribers,
    unanswered: unanswered::UnansweredLeases,
}

impl std::fmt::Debug for PostgresRetryQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresRetryQueue")
            .field("endpoint", &self.endpoint)
            .field("schema", &self.names.schema)
            .finish_non_exhaustive()
    }
}

impl PostgresRetryQueue {
    /// Connects, migrates the schema (creating it when missing), returns
    /// expired leases to pending and starts the session (instance lock and
    /// `LISTEN`). Errors name the server as `host:port`, never a secret.
    pub fn open(pg: &PostgresOptions, options: StoreOptions) -> QueueResult<Self> {
        let (config, tls) = pg
            .connect_config()
            .map_err(|e| QueueError::storage("open", e))?;
        let endpoint = options::endpoint_of(&config);
        let unavailable = |source: Box<dyn std::error::Error + Send + Sync>| {
            QueueError::storage(
                "open",
                PgUnavailable {
                    endpoint: endpoint.clone(),
                    source,
                },
            )
        };
        // A direct first connection: its error is the real one (refused,
        // timed out, bad password), where the pool would only time out.
        let mut first = config
            .connect(tls.clone())
            .map_err(|e| unavailable(Box::new(e)))?;
        schema::migrate(&mut first, &pg.schema).map_err(|e| match e {
            SchemaError::Sql { .. } => unavailable(Box::new(e)),
            newer => QueueError::storage("open", newer),
        })?;
        warn_unless_durable(&mut first, &endpoint);
        let _ = first.close();
        let manager = PostgresConnectionManager::new(config.clone(), tls.clone());
        let pool = r2d2::Pool::builder()
            .max_size(pg.pool_size)
            .min_idle(Some(0))
            .connection_timeout(pg.connect_timeout)
            .error_handler(Box::new(r2d2::LoggingErrorHandler))
            .build_unchecked(manager);
        let q = options::quote_ident(&pg.schema);
        let items = format!("{q}.items");
        let names = Names {
            schema: pg.schema.clone(),
            update_sql: row::update_sql(&items),
            items,
            quarantine: format!("{q}.quarantine"),
            settings: format!("{q}.fleet_settings"),
            totals: format!("{q}.totals"),
        };
        let lock_class = schema::instance_lock_class(&pg.schema);
        let subscribers: session::Subscribers = Arc::default();
        let session = session::Session::start(
            session::SessionSpec {
                config,
                tls,
                endpoint: endpoint.clone(),
                channel: pg.schema.clone(),
                lock_class,
                instance_id: options.instance_id.clone(),
            },
            subscribers.clone(),
        )
        .map_err(|e| unavailable(Box::new(e)))?;
        let store = PostgresRetryQueue {
            admission_key: schema::lock_key("admission", &pg.schema),
            lock_class,
            options,
            names,
            endpoint,
            pool,
            closed: AtomicBool::new(false),
            evicted: AtomicU64::new(0),
            session: Mutex::new(Some(session)),
            subscribers,
            unanswered: Default::default(),
        };
        store.release_expired_leases()?;
        Ok(store)
    }

    /// A receiver woken (coalesced, at most one pending) when any daemon
    /// on this schema enqueues or releases a lease, and after the session
    /// reconnected (wake-ups may have been lost meanwhile). For a
    /// scheduler: on a wake-up, look for ready items; keep the poll as a
    /// safety net. Dropping the receiver unsubscribes.
    pub fn subscribe(&self) -> tokio::sync::mpsc::Receiver<()> {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        self.subscribers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(tx);
        rx
    }

    /// Returns to pending, at once, the leases of every instance whose
    /// session lock no live session holds (a daemon that died, or lost its
    /// connection), and those with no owner; returns how many. For every
    /// daemon's janitor: the survivors take over a dead node's items in
    /// seconds instead of waiting for its leases to expire.
    pub fn release_orphaned_leases(&self) -> QueueResult<usize> {
        self.release_leases_except(&self.options.instance_id)
    }

    /// True while this handle holds its instance lock (claims are made
    /// only then; see [`session`]).
    pub fn holds_lock(&self) -> bool {
        self.session
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(session::Session::holds_lock)
    }

    /// `host:port` of the server, for messages.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// A fleet-wide setting (e.g. an operator's pause), `None` when unset.
    pub fn fleet_setting(&self, key: &str) -> QueueResult<Option<String>> {
        let mut conn = self.conn("fleet_setting")?;
        let row = conn
            .query_opt(
                &format!("SELECT value FROM {} WHERE key = $1", self.names.settings),
                &[&key],
            )
            .map_err(|e| self.sql_err("fleet_setting", e))?;
        Ok(row.map(|r| r.get(0)))
    }

    /// Sets (or, with `None`, clears) a fleet-wide setting, durably.
    pub fn set_fleet_setting(&self, key: &str, value: Option<&str>) -> QueueResult<()> {
        let now = self.now();
        let settings = &self.names.settings;
        self.write("set_fleet_setting", |tx| {
            match value {
                Some(v) => tx.execute(
                    &format!(
                        "INSERT INTO {settings} (key, value, updated_at) VALUES ($1, $2, $3) \
                         ON CONFLICT (key) DO UPDATE SET value = $2, updated_at = $3"
                    ),
                    &[&key, &v, &now],
                )?,
                None => tx.execute(&format!("DELETE FROM {settings} WHERE key = $1"), &[&key])?,
            };
            Ok(())
        })
    }
}

/// Logs when the server acknowledges commits before they are durable:
/// with `synchronous_commit = off` an acknowledged enqueue can be lost in
/// a server crash. (`local` waits for the local disk but not for
/// synchronous standbys: a failover, not a crash, may lose it.)
fn warn_unless_durable(client: &mut postgres::Client, endpoint: &str) {
    let setting = client
        .query_one("SELECT current_setting('synchronous_commit')", &[])
        .map(|row| row.get::<_, String>(0));
    if let Ok(setting) = setting {
        if setting == "off" {
            tracing::warn!(
                endpoint,
                synchronous_commit = %setting,
                "PostgreSQL acknowledges commits before they are durable: an enqueue \
                 acknowledged just before a server crash may be lost"
            );
        }
    }
}

impl Drop for PostgresRetryQueue {
    fn drop(&mut self) {
        let _ = self.close();
    }
}
