//! `PostgresRetryQueue`: the [`RetryQueue`] contract on a PostgreSQL
//! server that several daemons share (a fleet draining one backlog).
//!
//! # Layout
//! One schema (the `schema` option, quoted everywhere) holds `items` (one
//! row per item, the payload's CRC-32 beside it), `quarantine` (rows that
//! failed their checks, kept as JSON), `fleet_settings` (state every
//! daemon obeys) and `schema_version` (see [`schema`]).
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
//!   whose lock no session holds. Expired leases are still returned by
//!   `release_expired_leases`, from any daemon.
//! - **Wake-ups.** Enqueues and released leases `NOTIFY` the channel named
//!   after the schema, at commit. [`PostgresRetryQueue::subscribe`] gives a
//!   receiver fed by the session's `LISTEN`.
//!
//! # Durability and faults
//! A call returns `Ok` after its transaction committed; with
//! `synchronous_commit = on` (the server default) that is after the WAL
//! reached disk (and the synchronous standbys, if any). A lost connection
//! is a `Storage` error naming the server; nothing is reported applied
//! unless its commit returned. The pool reconnects on the next call.
//!
//! Time comes from `StoreOptions::clock`, never from the server, so leases
//! assume the daemons' clocks agree (as NTP keeps them). Times are stored
//! with PostgreSQL's microsecond precision.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, SubsecRound, Utc};
use postgres::{GenericClient, Transaction};
use r2d2_postgres::PostgresConnectionManager;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::backoff::add_saturating;
use crate::error::{QueueError, QueueResult};
use crate::item::{ItemStatus, NewItem, QueueItem};
use crate::store::{
    importable, CleanupReport, ListFilter, OrderBy, OverflowPolicy, PendingSync, QueueStats,
    RetryQueue, StoreOptions, WriteOp, WriteOutcome,
};

mod admit;
pub mod options;
mod row;
pub mod schema;
mod session;
#[cfg(test)]
mod tests;

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

    // ------------------------------------------------------------ plumbing

    /// Now, at the precision PostgreSQL keeps.
    fn now(&self) -> DateTime<Utc> {
        self.options.clock.now().trunc_subsecs(6)
    }

    fn check_open(&self) -> QueueResult<()> {
        if self.closed.load(Ordering::SeqCst) {
            Err(QueueError::QueueClosed)
        } else {
            Ok(())
        }
    }

    fn sql_err(
        &self,
        op: &'static str,
        e: impl std::error::Error + Send + Sync + 'static,
    ) -> QueueError {
        QueueError::storage(
            op,
            PgUnavailable {
                endpoint: self.endpoint.clone(),
                source: Box::new(e),
            },
        )
    }

    fn conn(&self, op: &'static str) -> QueueResult<Conn> {
        self.check_open()?;
        self.pool.get().map_err(|e| self.sql_err(op, e))
    }

    /// Runs `f` in one transaction and commits; any error rolls back.
    fn write<T>(
        &self,
        op: &'static str,
        f: impl FnOnce(&mut Transaction<'_>) -> Result<T, TxError>,
    ) -> QueueResult<T> {
        let mut conn = self.conn(op)?;
        let mut tx = conn.transaction().map_err(|e| self.sql_err(op, e))?;
        let value = match f(&mut tx) {
            Ok(value) => value,
            Err(TxError::Sql(e)) => return Err(self.sql_err(op, e)),
            Err(TxError::Queue(e @ QueueError::Corrupt { .. })) => {
                // The row was moved to the quarantine, which must stand.
                tx.commit().map_err(|e| self.sql_err(op, e))?;
                return Err(e);
            }
            Err(TxError::Queue(e)) => return Err(e),
        };
        tx.commit().map_err(|e| self.sql_err(op, e))?;
        Ok(value)
    }

    /// Takes the schema's admission lock for the rest of the transaction.
    fn lock_admission(&self, tx: &mut Transaction<'_>) -> Result<(), postgres::Error> {
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&self.admission_key])
            .map(|_| ())
    }

    /// Sends a wake-up to every listening daemon when `tx` commits.
    fn notify(&self, tx: &mut Transaction<'_>, what: &str) -> Result<(), postgres::Error> {
        tx.execute("SELECT pg_notify($1, $2)", &[&self.names.schema, &what])
            .map(|_| ())
    }

    /// Moves a row that failed its checks into the quarantine.
    fn quarantine(
        &self,
        client: &mut impl GenericClient,
        bad: &row::CorruptRow,
    ) -> Result<(), postgres::Error> {
        tracing::error!(id = %bad.id, detail = %bad.detail, "quarantining a corrupt PostgreSQL row");
        let items = &self.names.items;
        let quarantine = &self.names.quarantine;
        let now = self.now();
        client.execute(
            &format!(
                "WITH gone AS (DELETE FROM {items} WHERE id = $1 RETURNING row_to_json({items}.*)::text AS record) \
                 INSERT INTO {quarantine} (item_id, reason, quarantined_at, record) \
                 SELECT $1, $2, $3, record FROM gone"
            ),
            &[&bad.id, &bad.detail, &now],
        )?;
        Ok(())
    }

    /// Decodes rows; corrupt ones are quarantined through `client` and left out.
    fn decode_all(
        &self,
        client: &mut impl GenericClient,
        rows: &[postgres::Row],
    ) -> Result<Vec<QueueItem>, postgres::Error> {
        let mut items = Vec::with_capacity(rows.len());
        for r in rows {
            match row::decode(r) {
                Ok(item) => items.push(item),
                Err(bad) => self.quarantine(client, &bad)?,
            }
        }
        Ok(items)
    }

    /// The row of `id`, locked for this transaction; `ItemNotFound` when
    /// absent, `Corrupt` (after quarantining it) when it fails its checks.
    fn locked_item(&self, tx: &mut Transaction<'_>, id: &str) -> Result<QueueItem, TxError> {
        self.item_in(tx, id, true)
    }

    /// The row of `id`, read (and locked when `for_update`) in `tx`.
    fn item_in(
        &self,
        tx: &mut Transaction<'_>,
        id: &str,
        for_update: bool,
    ) -> Result<QueueItem, TxError> {
        let row = tx.query_opt(
            &format!(
                "SELECT {} FROM {} WHERE id = $1{}",
                row::COLUMNS,
                self.names.items,
                if for_update { " FOR UPDATE" } else { "" }
            ),
            &[&id],
        )?;
        let Some(r) = row else {
            return Err(QueueError::not_found(id).into());
        };
        match row::decode(&r) {
            Ok(item) => Ok(item),
            Err(bad) => {
                self.quarantine(tx, &bad)?;
                Err(QueueError::Corrupt {
                    what: bad.id,
                    detail: bad.detail,
                }
                .into())
            }
        }
    }

    /// Reads `id`, applies `change` (a state change of the item) and writes
    /// it back; returns the item as stored.
    fn change_in(
        &self,
        tx: &mut Transaction<'_>,
        id: &str,
        change: impl FnOnce(&mut QueueItem, DateTime<Utc>) -> QueueResult<bool>,
    ) -> Result<QueueItem, TxError> {
        let now = self.now();
        let mut item = self.locked_item(tx, id)?;
        if change(&mut item, now)? {
            item.updated_at = now;
            row::write_back(tx, &self.names.update_sql, &item)?;
        }
        Ok(item)
    }

    fn requeue_in(
        &self,
        tx: &mut Transaction<'_>,
        id: &str,
        error: &str,
        next_retry: DateTime<Utc>,
    ) -> Result<QueueItem, TxError> {
        let next_retry = next_retry.trunc_subsecs(6);
        self.change_in(tx, id, |item, now| {
            item.record_retry(error, next_retry, now);
            Ok(true)
        })
    }

    fn mark_failed_in(
        &self,
        tx: &mut Transaction<'_>,
        id: &str,
        reason: &str,
    ) -> Result<QueueItem, TxError> {
        self.change_in(tx, id, |item, now| {
            item.record_dead_letter(reason, now);
            Ok(true)
        })
    }

    fn release_in(&self, tx: &mut Transaction<'_>, id: &str) -> Result<(), TxError> {
        let mut released = false;
        self.change_in(tx, id, |item, _| {
            if item.status != ItemStatus::Processing {
                return Ok(false);
            }
            item.status = ItemStatus::Pending;
            item.lease_until = None;
            item.lease_owner = None;
            released = true;
            Ok(true)
        })?;
        if released {
            self.notify(tx, "release")?;
        }
        Ok(())
    }

    fn delete_in(&self, tx: &mut Transaction<'_>, id: &str) -> Result<(), TxError> {
        let n = tx.execute(
            &format!("DELETE FROM {} WHERE id = $1", self.names.items),
            &[&id],
        )?;
        if n == 0 {
            return Err(QueueError::not_found(id).into());
        }
        Ok(())
    }

    /// Validates new items (claimed for `lease` when given) at `now`.
    fn prepare_new(
        &self,
        items: Vec<NewItem>,
        lease: Option<Duration>,
    ) -> Vec<QueueResult<QueueItem>> {
        let now = self.now();
        items
            .into_iter()
            .map(|mut new| {
                new.next_retry = new.next_retry.map(|t| t.trunc_subsecs(6));
                let mut item = new.into_item(now, self.options.default_max_attempts)?;
                if let Some(lease) = lease {
                    let until = add_saturating(now, lease).trunc_subsecs(6);
                    item.record_claim(until, &self.options.instance_id, now);
                }
                Ok(item)
            })
            .collect()
    }

    /// Admits a run of new items inside `tx` (taking the admission lock)
    /// and notifies when any was stored.
    fn admit_in(
        &self,
        tx: &mut Transaction<'_>,
        items: Vec<QueueResult<QueueItem>>,
    ) -> Result<Vec<QueueResult<QueueItem>>, postgres::Error> {
        if items.iter().all(Result::is_err) {
            return Ok(items);
        }
        self.lock_admission(tx)?;
        let items_table = self.names.items.clone();
        let admitted = admit::admit_run(
            &mut admit::DbView {
                tx,
                items_table: &items_table,
            },
            &self.options,
            items,
        )?;
        if admitted.evicted > 0 {
            self.evicted.fetch_add(admitted.evicted, Ordering::Relaxed);
        }
        if admitted.results.iter().any(Result::is_ok) {
            self.notify(tx, "enqueue")?;
        }
        Ok(admitted.results)
    }

    /// Admits items in one transaction; the evictions are counted only once
    /// it committed.
    fn admit(
        &self,
        op: &'static str,
        items: Vec<QueueResult<QueueItem>>,
    ) -> QueueResult<Vec<QueueResult<QueueItem>>> {
        let before = self.evicted.load(Ordering::Relaxed);
        let result = self.write(op, |tx| Ok(self.admit_in(tx, items)?));
        if result.is_err() {
            // Nothing committed: nothing was evicted.
            self.evicted.store(before, Ordering::Relaxed);
        }
        result
    }

    /// The ops of one group commit, in one transaction: each run of
    /// enqueues admitted together, the other ops one by one.
    fn apply_ops(&self, ops: Vec<WriteOp>) -> QueueResult<Vec<QueueResult<WriteOutcome>>> {
        self.check_open()?;
        let before = self.evicted.load(Ordering::Relaxed);
        let result = self.write("apply_batch", |tx| {
            let mut results: Vec<QueueResult<WriteOutcome>> = Vec::with_capacity(ops.len());
            let mut ops = ops.into_iter().peekable();
            while let Some(op) = ops.next() {
                match op {
                    WriteOp::Enqueue(_) | WriteOp::EnqueueClaimed { .. } => {
                        // The run: this op and the enqueues right after it.
                        let mut run = vec![op];
                        while let Some(WriteOp::Enqueue(_) | WriteOp::EnqueueClaimed { .. }) =
                            ops.peek()
                        {
                            run.extend(ops.next());
                        }
                        let mut claimed = Vec::with_capacity(run.len());
                        let mut prepared = Vec::with_capacity(run.len());
                        for op in run {
                            match op {
                                WriteOp::Enqueue(item) => {
                                    claimed.push(false);
                                    prepared.extend(self.prepare_new(vec![item], None));
                                }
                                WriteOp::EnqueueClaimed { item, lease } => {
                                    claimed.push(true);
                                    prepared.extend(self.prepare_new(vec![item], Some(lease)));
                                }
                                _ => {}
                            }
                        }
                        let admitted = self.admit_in(tx, prepared)?;
                        for (result, claimed) in admitted.into_iter().zip(claimed) {
                            results.push(result.map(|item| {
                                if claimed {
                                    WriteOutcome::Claimed(Box::new(item))
                                } else {
                                    WriteOutcome::Enqueued(item.id)
                                }
                            }));
                        }
                    }
                    other => {
                        let outcome = self.apply_one(tx, other);
                        match outcome {
                            Ok(()) => results.push(Ok(WriteOutcome::Applied)),
                            Err(TxError::Queue(e)) => results.push(Err(e)),
                            Err(TxError::Sql(e)) => return Err(TxError::Sql(e)),
                        }
                    }
                }
            }
            Ok(results)
        });
        if result.is_err() {
            self.evicted.store(before, Ordering::Relaxed);
        }
        result
    }

    /// One op that is not an enqueue. Its refusal must leave the
    /// transaction usable: every check is a read, never a failed statement.
    fn apply_one(&self, tx: &mut Transaction<'_>, op: WriteOp) -> Result<(), TxError> {
        match op {
            WriteOp::Delete { id } => self.delete_in(tx, &id),
            WriteOp::Requeue {
                id,
                error,
                next_retry,
            } => self.requeue_in(tx, &id, &error, next_retry).map(|_| ()),
            WriteOp::MarkFailed { id, reason } => self.mark_failed_in(tx, &id, &reason).map(|_| ()),
            WriteOp::Release { id } => self.release_in(tx, &id),
            WriteOp::Enqueue(_) | WriteOp::EnqueueClaimed { .. } => {
                Err(QueueError::storage("apply_batch", "an enqueue reached the one-op path").into())
            }
        }
    }

    /// Ready items in claim order, up to `limit`, locked for `tx` (skipping
    /// rows other daemons hold) when `lock`.
    fn ready_sql(&self, lock: bool) -> String {
        format!(
            "SELECT {} FROM {} WHERE status = 'pending' AND next_retry <= $1 \
             ORDER BY next_retry, created_at, id LIMIT $2{}",
            row::COLUMNS,
            self.names.items,
            if lock { " FOR UPDATE SKIP LOCKED" } else { "" }
        )
    }

    /// The ops shared by `update`: the stored row replaced by `item`.
    fn update_in(&self, tx: &mut Transaction<'_>, item: &QueueItem) -> Result<(), TxError> {
        let stored = self.locked_item(tx, &item.id)?;
        let mut replaced = item.clone();
        replaced.created_at = stored.created_at;
        replaced.updated_at = self.now();
        replaced.next_retry = replaced.next_retry.trunc_subsecs(6);
        replaced.last_attempt = replaced.last_attempt.map(|t| t.trunc_subsecs(6));
        replaced.lease_until = replaced.lease_until.map(|t| t.trunc_subsecs(6));
        row::write_back(tx, &self.names.update_sql, &replaced)?;
        Ok(())
    }

    /// Evicts in `drop_oldest` order until within the limits; how many.
    fn evict_to_limits_in(&self, tx: &mut Transaction<'_>) -> Result<usize, postgres::Error> {
        let items = &self.names.items;
        let totals = tx.query_one(
            &format!("SELECT count(*), coalesce(sum(size_bytes), 0)::bigint FROM {items}"),
            &[],
        )?;
        let (mut count, mut bytes): (i64, i64) = (totals.get(0), totals.get(1));
        let max_items = i64::try_from(self.options.max_items).unwrap_or(i64::MAX);
        let max_bytes = i64::try_from(self.options.max_bytes).unwrap_or(i64::MAX);
        if count <= max_items && bytes <= max_bytes {
            return Ok(0);
        }
        let rows = tx.query(
            &format!(
                "SELECT id, size_bytes FROM {items} ORDER BY status <> 'failed', created_at, id"
            ),
            &[],
        )?;
        let mut victims: Vec<String> = Vec::new();
        for r in rows {
            if count <= max_items && bytes <= max_bytes {
                break;
            }
            let size: i64 = r.get(1);
            victims.push(r.get(0));
            count -= 1;
            bytes -= size;
        }
        tx.execute(
            &format!("DELETE FROM {items} WHERE id = ANY($1)"),
            &[&victims],
        )?;
        Ok(victims.len())
    }
}

impl RetryQueue for PostgresRetryQueue {
    fn enqueue(&self, item: NewItem) -> QueueResult<String> {
        self.check_open()?;
        let prepared = self.prepare_new(vec![item], None);
        let mut results = self.admit("enqueue", prepared)?;
        results
            .pop()
            .unwrap_or_else(|| Err(QueueError::storage("enqueue", "no result for the item")))
            .map(|item| item.id)
    }

    fn enqueue_batch(&self, items: Vec<NewItem>) -> QueueResult<Vec<QueueResult<String>>> {
        self.check_open()?;
        let prepared = self.prepare_new(items, None);
        Ok(self
            .admit("enqueue_batch", prepared)?
            .into_iter()
            .map(|r| r.map(|item| item.id))
            .collect())
    }

    fn enqueue_claimed(
        &self,
        items: Vec<NewItem>,
        lease: Duration,
    ) -> QueueResult<Vec<QueueResult<QueueItem>>> {
        self.check_open()?;
        let prepared = self.prepare_new(items, Some(lease));
        self.admit("enqueue_claimed", prepared)
    }

    fn dequeue(&self) -> QueueResult<Option<QueueItem>> {
        Ok(self.claim(1, self.options.default_lease)?.pop())
    }

    fn peek(&self) -> QueueResult<Option<QueueItem>> {
        let now = self.now();
        self.write("peek", |tx| loop {
            let rows = tx.query(&self.ready_sql(false), &[&now, &1i64])?;
            let Some(r) = rows.first() else {
                return Ok(None);
            };
            match row::decode(r) {
                Ok(item) => return Ok(Some(item)),
                Err(bad) => self.quarantine(tx, &bad)?,
            }
        })
    }

    fn get(&self, id: &str) -> QueueResult<QueueItem> {
        self.write("get", |tx| self.item_in(tx, id, false))
    }

    fn update(&self, item: &QueueItem) -> QueueResult<()> {
        self.write("update", |tx| self.update_in(tx, item))
    }

    fn delete(&self, id: &str) -> QueueResult<()> {
        self.write("delete", |tx| self.delete_in(tx, id))
    }

    fn mark_failed(&self, id: &str, reason: &str) -> QueueResult<QueueItem> {
        self.write("mark_failed", |tx| self.mark_failed_in(tx, id, reason))
    }

    fn requeue(&self, id: &str, error: &str, next_retry: DateTime<Utc>) -> QueueResult<QueueItem> {
        self.write("requeue", |tx| self.requeue_in(tx, id, error, next_retry))
    }

    fn revive(&self, id: &str) -> QueueResult<QueueItem> {
        self.write("revive", |tx| {
            let item = self.change_in(tx, id, |item, now| {
                item.revive(now)?;
                Ok(true)
            })?;
            self.notify(tx, "enqueue")?;
            Ok(item)
        })
    }

    fn release(&self, id: &str) -> QueueResult<()> {
        self.write("release", |tx| self.release_in(tx, id))
    }

    fn claim(&self, limit: usize, lease: Duration) -> QueueResult<Vec<QueueItem>> {
        self.check_open()?;
        if limit == 0 {
            return Ok(Vec::new());
        }
        let now = self.now();
        let lease_until = add_saturating(now, lease).trunc_subsecs(6);
        let owner = self.options.instance_id.clone();
        self.write("claim", |tx| {
            let mut claimed: Vec<QueueItem> = Vec::new();
            loop {
                let want = i64::try_from(limit - claimed.len()).unwrap_or(i64::MAX);
                let rows = tx.query(&self.ready_sql(true), &[&now, &want])?;
                let fetched = rows.len();
                let mut corrupt = 0;
                for r in &rows {
                    match row::decode(r) {
                        Ok(mut item) => {
                            item.record_claim(lease_until, &owner, now);
                            claimed.push(item);
                        }
                        Err(bad) => {
                            corrupt += 1;
                            self.quarantine(tx, &bad)?;
                        }
                    }
                }
                if corrupt == 0 || fetched == 0 || claimed.len() >= limit {
                    break;
                }
            }
            if !claimed.is_empty() {
                let ids: Vec<&str> = claimed.iter().map(|i| i.id.as_str()).collect();
                tx.execute(
                    &format!(
                        "UPDATE {} SET status = 'processing', lease_until = $2, \
                         lease_owner = $3, updated_at = $4 WHERE id = ANY($1)",
                        self.names.items
                    ),
                    &[&ids, &lease_until, &owner, &now],
                )?;
            }
            Ok(claimed)
        })
    }

    fn release_expired_leases(&self) -> QueueResult<usize> {
        let now = self.now();
        self.write("release_expired_leases", |tx| {
            let n = tx.execute(
                &format!(
                    "UPDATE {} SET status = 'pending', lease_until = NULL, lease_owner = NULL, \
                     updated_at = $1 \
                     WHERE status = 'processing' AND (lease_until IS NULL OR lease_until <= $1)",
                    self.names.items
                ),
                &[&now],
            )?;
            if n > 0 {
                self.notify(tx, "release")?;
            }
            Ok(usize::try_from(n).unwrap_or(usize::MAX))
        })
    }

    /// On a shared database other instances may be alive: only the leases
    /// of instances whose session lock is free (dead, or disconnected) are
    /// released, besides those with no owner. On a database one daemon
    /// uses alone this is the contract's "every owner but `owner`".
    fn release_leases_except(&self, owner: &str) -> QueueResult<usize> {
        let now = self.now();
        self.write("release_leases_except", |tx| {
            let n = tx.execute(
                &format!(
                    "UPDATE {} SET status = 'pending', lease_until = NULL, lease_owner = NULL, \
                     updated_at = $1 \
                     WHERE status = 'processing' AND (lease_owner IS NULL OR (lease_owner <> $2 \
                       AND NOT EXISTS (SELECT 1 FROM pg_locks l \
                         WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 \
                           AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                           AND l.classid = ($3::int4)::oid \
                           AND l.objid = (hashtext(lease_owner))::oid)))",
                    self.names.items
                ),
                &[&now, &owner, &self.lock_class],
            )?;
            if n > 0 {
                self.notify(tx, "release")?;
            }
            Ok(usize::try_from(n).unwrap_or(usize::MAX))
        })
    }

    fn next_due(&self) -> QueueResult<Option<DateTime<Utc>>> {
        let mut conn = self.conn("next_due")?;
        let items = &self.names.items;
        let row = conn
            .query_one(
                &format!(
                    "SELECT (SELECT min(next_retry) FROM {items} WHERE status = 'pending'), \
                            (SELECT min(lease_until) FROM {items} WHERE status = 'processing'), \
                            EXISTS (SELECT 1 FROM {items} WHERE status = 'processing' AND lease_until IS NULL)"
                ),
                &[],
            )
            .map_err(|e| self.sql_err("next_due", e))?;
        let pending: Option<DateTime<Utc>> = row.get(0);
        let lease: Option<DateTime<Utc>> = row.get(1);
        let unleased: bool = row.get(2);
        if unleased {
            // A processing item without a lease is actionable at once.
            return Ok(Some(DateTime::<Utc>::MIN_UTC));
        }
        Ok(match (pending, lease) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        })
    }

    fn size(&self) -> QueueResult<usize> {
        let mut conn = self.conn("size")?;
        let n: i64 = conn
            .query_one(&format!("SELECT count(*) FROM {}", self.names.items), &[])
            .map_err(|e| self.sql_err("size", e))?
            .get(0);
        Ok(usize::try_from(n).unwrap_or(0))
    }

    fn stats(&self) -> QueueResult<QueueStats> {
        let mut conn = self.conn("stats")?;
        let items = &self.names.items;
        let row = conn
            .query_one(
                &format!(
                    "SELECT count(*), \
                            count(*) FILTER (WHERE status = 'pending'), \
                            count(*) FILTER (WHERE status = 'processing'), \
                            count(*) FILTER (WHERE status = 'failed'), \
                            min(created_at), max(created_at), \
                            coalesce(sum(attempts), 0)::bigint, max(last_attempt), \
                            coalesce(sum(size_bytes), 0)::bigint, \
                            (SELECT count(*) FROM {q}), \
                            (SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0)::bigint \
                               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                              WHERE n.nspname = $1 AND c.relkind = 'r') \
                     FROM {items}",
                    q = self.names.quarantine
                ),
                &[&self.names.schema],
            )
            .map_err(|e| self.sql_err("stats", e))?;
        let n = |i: usize| -> u64 { u64::try_from(row.get::<_, i64>(i)).unwrap_or(0) };
        Ok(QueueStats {
            total_items: n(0) as usize,
            pending_items: n(1) as usize,
            processing_items: n(2) as usize,
            failed_items: n(3) as usize,
            oldest_item: row.get(4),
            newest_item: row.get(5),
            total_retries: n(6),
            last_retry: row.get(7),
            total_bytes: n(8),
            quarantined: n(9),
            bytes_on_disk: n(10),
            evicted: self.evicted.load(Ordering::Relaxed),
            ..QueueStats::default()
        })
    }

    fn cleanup(&self, ttl: Duration) -> QueueResult<CleanupReport> {
        let now = self.now();
        let dead_ttl = self.options.dead_letter_ttl.unwrap_or(ttl);
        // Created before the cutoff = older than the TTL; a TTL too large
        // to represent expires nothing.
        let cutoff = |ttl: Duration| {
            chrono::Duration::from_std(ttl)
                .ok()
                .and_then(|d| now.checked_sub_signed(d))
        };
        let items = &self.names.items;
        let quarantine = &self.names.quarantine;
        let max_quarantined = i64::try_from(self.options.max_quarantined).unwrap_or(i64::MAX);
        self.write("cleanup", |tx| {
            let mut report = CleanupReport::default();
            if let Some(cut) = cutoff(ttl) {
                report.expired = tx.execute(
                    &format!("DELETE FROM {items} WHERE status <> 'failed' AND created_at < $1"),
                    &[&cut],
                )? as usize;
            }
            if let Some(cut) = cutoff(dead_ttl) {
                report.dead_letters_expired = tx.execute(
                    &format!("DELETE FROM {items} WHERE status = 'failed' AND created_at < $1"),
                    &[&cut],
                )? as usize;
            }
            report.quarantine_trimmed = tx.execute(
                &format!(
                    "DELETE FROM {quarantine} WHERE seq IN \
                     (SELECT seq FROM {quarantine} ORDER BY seq DESC OFFSET $1)"
                ),
                &[&max_quarantined],
            )? as usize;
            Ok(report)
        })
    }

    fn enforce_limits(&self) -> QueueResult<usize> {
        self.check_open()?;
        if self.options.overflow == OverflowPolicy::Reject {
            return Ok(0);
        }
        let evicted = self.write("enforce_limits", |tx| {
            self.lock_admission(tx)?;
            Ok(self.evict_to_limits_in(tx)?)
        })?;
        self.evicted.fetch_add(evicted as u64, Ordering::Relaxed);
        Ok(evicted)
    }

    fn list(&self, filter: &ListFilter) -> QueueResult<Vec<QueueItem>> {
        let now = self.now();
        let mut clauses: Vec<String> = Vec::new();
        let mut params: Vec<Box<dyn postgres::types::ToSql + Sync>> = Vec::new();
        if let Some(status) = filter.status {
            params.push(Box::new(status.as_str().to_owned()));
            clauses.push(format!("status = ${}", params.len()));
        }
        if let Some(t) = &filter.item_type {
            params.push(Box::new(t.as_str().to_owned()));
            clauses.push(format!("item_type = ${}", params.len()));
        }
        if filter.ready_only {
            params.push(Box::new(now));
            clauses.push(format!(
                "status = 'pending' AND next_retry <= ${}",
                params.len()
            ));
        }
        let column = match filter.order_by {
            OrderBy::CreatedAt => "created_at",
            OrderBy::NextRetry => "next_retry",
            OrderBy::Attempts => "attempts",
        };
        let dir = if filter.descending { "DESC" } else { "ASC" };
        params.push(Box::new(i64::try_from(filter.offset).unwrap_or(i64::MAX)));
        let offset = params.len();
        let limit = match filter.limit {
            Some(limit) => {
                params.push(Box::new(i64::try_from(limit).unwrap_or(i64::MAX)));
                format!(" LIMIT ${}", params.len())
            }
            None => String::new(),
        };
        let sql = format!(
            "SELECT {} FROM {} {} ORDER BY {column} {dir}, id {dir} OFFSET ${offset}{limit}",
            row::COLUMNS,
            self.names.items,
            if clauses.is_empty() {
                String::new()
            } else {
                format!("WHERE {}", clauses.join(" AND "))
            }
        );
        let refs: Vec<&(dyn postgres::types::ToSql + Sync)> =
            params.iter().map(|p| p.as_ref()).collect();
        self.write("list", |tx| {
            let rows = tx.query(&sql, &refs)?;
            Ok(self.decode_all(tx, &rows)?)
        })
    }

    fn apply_batch(&self, ops: Vec<WriteOp>) -> QueueResult<Vec<QueueResult<WriteOutcome>>> {
        self.apply_ops(ops)
    }

    fn import_batch(&self, items: Vec<QueueItem>) -> QueueResult<Vec<QueueResult<()>>> {
        self.check_open()?;
        let prepared = items
            .into_iter()
            .map(|item| {
                let mut item = importable(item)?;
                for t in [
                    &mut item.next_retry,
                    &mut item.created_at,
                    &mut item.updated_at,
                ] {
                    *t = t.trunc_subsecs(6);
                }
                item.last_attempt = item.last_attempt.map(|t| t.trunc_subsecs(6));
                Ok(item)
            })
            .collect();
        Ok(self
            .admit("import", prepared)?
            .into_iter()
            .map(|r| r.map(|_| ()))
            .collect())
    }

    fn apply_batch_deferred(
        &self,
        ops: Vec<WriteOp>,
    ) -> QueueResult<(Vec<QueueResult<WriteOutcome>>, Option<PendingSync>)> {
        // A commit here is durable when it returns (synchronous_commit).
        Ok((self.apply_ops(ops)?, None))
    }

    fn probe_writable(&self) -> QueueResult<bool> {
        let mut conn = self.conn("probe_writable")?;
        // A transaction that writes (a transaction ID, WAL) and commits,
        // leaving no row behind.
        let mut tx = conn
            .transaction()
            .map_err(|e| self.sql_err("probe_writable", e))?;
        tx.execute(
            &format!(
                "UPDATE {} SET value = value WHERE key = '' ",
                self.names.settings
            ),
            &[],
        )
        .and_then(|_| tx.query_one("SELECT pg_current_xact_id()", &[]))
        .map_err(|e| self.sql_err("probe_writable", e))?;
        tx.commit().map_err(|e| self.sql_err("probe_writable", e))?;
        Ok(true)
    }

    fn close(&self) -> QueueResult<()> {
        self.closed.store(true, Ordering::SeqCst);
        let session = self
            .session
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(mut session) = session {
            session.stop();
        }
        Ok(())
    }
}

impl Drop for PostgresRetryQueue {
    fn drop(&mut self) {
        let _ = self.close();
    }
}
