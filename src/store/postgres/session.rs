//! The store handle's own connection, outside the pool: it holds the
//! session-level advisory lock that says "instance X is alive", and it
//! `LISTEN`s on the schema's channel to wake subscribers.
//!
//! Both need a connection that lives as long as the handle: the lock
//! disappears with its connection, so a daemon that dies (however it
//! dies) stops looking alive the moment the server notices, and the other
//! daemons release its leases. A thread owns the connection; when it
//! breaks (server restart, failover) the thread reconnects with backoff,
//! takes the lock again and wakes every subscriber, since notifications
//! sent meanwhile were lost.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use postgres::fallible_iterator::FallibleIterator;
use postgres::Client;
use tokio::sync::mpsc;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::options::quote_ident;

/// How often the thread looks at its stop flag and its lock.
const TICK: Duration = Duration::from_millis(200);
/// Longest wait between two reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// What the session thread needs to (re)connect.
pub(super) struct SessionSpec {
    pub config: postgres::Config,
    pub tls: MakeRustlsConnect,
    pub endpoint: String,
    /// The NOTIFY channel: the schema name.
    pub channel: String,
    pub lock_class: i32,
    pub instance_id: String,
}

/// Subscribers' senders; each gets at most one pending wake-up (they
/// coalesce: a wake-up means "look at the queue", not "one item").
pub(super) type Subscribers = Arc<Mutex<Vec<mpsc::Sender<()>>>>;

/// Wakes every live subscriber and forgets the ones that went away.
pub(super) fn wake_all(subscribers: &Subscribers) {
    let mut subs = subscribers.lock().unwrap_or_else(|p| p.into_inner());
    subs.retain(|tx| !matches!(tx.try_send(()), Err(mpsc::error::TrySendError::Closed(_))));
}

/// The running session thread.
pub(super) struct Session {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// True while this session holds the instance lock.
    holds_lock: Arc<AtomicBool>,
}

impl Session {
    /// Connects (the caller sees an unreachable server at once), starts
    /// listening, takes the instance lock if free, then hands the
    /// connection to a thread that keeps all three.
    pub(super) fn start(
        spec: SessionSpec,
        subscribers: Subscribers,
    ) -> Result<Session, postgres::Error> {
        let mut client = spec.config.connect(spec.tls.clone())?;
        let locked = prepare(&mut client, &spec)?;
        let stop = Arc::new(AtomicBool::new(false));
        let holds_lock = Arc::new(AtomicBool::new(locked));
        let thread_stop = stop.clone();
        let thread_lock = holds_lock.clone();
        let thread = std::thread::Builder::new()
            .name("retryq-pg-session".into())
            .spawn(move || run(spec, client, &thread_lock, &thread_stop, &subscribers))
            .map_err(|e| {
                tracing::error!(error = %e, "cannot start the PostgreSQL session thread");
                e
            })
            .ok();
        Ok(Session {
            stop,
            thread,
            holds_lock,
        })
    }

    /// True while the instance lock is held: other daemons see this
    /// instance alive, so its claims are safe from their orphan release.
    pub(super) fn holds_lock(&self) -> bool {
        self.holds_lock.load(Ordering::SeqCst)
    }

    /// Stops the thread; its connection closes, which frees the lock.
    pub(super) fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.stop();
    }
}

/// LISTENs and tries the instance lock; true when the lock is held.
fn prepare(client: &mut Client, spec: &SessionSpec) -> Result<bool, postgres::Error> {
    client.batch_execute(&format!("LISTEN {}", quote_ident(&spec.channel)))?;
    try_lock(client, spec)
}

fn try_lock(client: &mut Client, spec: &SessionSpec) -> Result<bool, postgres::Error> {
    let row = client.query_one(
        "SELECT pg_try_advisory_lock($1, hashtext($2))",
        &[&spec.lock_class, &spec.instance_id],
    )?;
    Ok(row.get(0))
}

fn run(
    spec: SessionSpec,
    first: Client,
    holds_lock: &AtomicBool,
    stop: &AtomicBool,
    subscribers: &Subscribers,
) {
    let mut locked = holds_lock.load(Ordering::SeqCst);
    let mut client = Some(first);
    let mut backoff = Duration::from_millis(100);
    let mut warned_lock = false;
    while !stop.load(Ordering::SeqCst) {
        let Some(conn) = client.as_mut() else {
            match spec.config.connect(spec.tls.clone()) {
                Ok(mut conn) => match prepare(&mut conn, &spec) {
                    Ok(now_locked) => {
                        tracing::info!(endpoint = %spec.endpoint, "PostgreSQL session reconnected");
                        locked = now_locked;
                        holds_lock.store(locked, Ordering::SeqCst);
                        client = Some(conn);
                        backoff = Duration::from_millis(100);
                        // Notifications sent while we were away are lost.
                        wake_all(subscribers);
                    }
                    Err(e) => {
                        tracing::warn!(endpoint = %spec.endpoint, error = %e, "PostgreSQL session setup failed");
                        sleep_unless_stopped(backoff, stop);
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                },
                Err(e) => {
                    tracing::warn!(
                        endpoint = %spec.endpoint,
                        error = %e,
                        retry_in_ms = backoff.as_millis() as u64,
                        "PostgreSQL unreachable; the session reconnects"
                    );
                    sleep_unless_stopped(backoff, stop);
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
            continue;
        };
        if !locked {
            match try_lock(conn, &spec) {
                Ok(true) => {
                    locked = true;
                    holds_lock.store(true, Ordering::SeqCst);
                    warned_lock = false;
                }
                Ok(false) => {
                    if !warned_lock {
                        tracing::warn!(
                            instance = %spec.instance_id,
                            "another live session holds this instance's lock; retrying"
                        );
                        warned_lock = true;
                    }
                }
                Err(_) => {
                    client = None;
                    holds_lock.store(false, Ordering::SeqCst);
                    continue;
                }
            }
        }
        let mut broken = false;
        {
            let mut notifications = conn.notifications();
            let mut iter = notifications.timeout_iter(TICK);
            loop {
                match iter.next() {
                    Ok(Some(_)) => {
                        wake_all(subscribers);
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(endpoint = %spec.endpoint, error = %e, "PostgreSQL session lost");
                        broken = true;
                        break;
                    }
                }
            }
        }
        if broken || conn.is_closed() {
            // The lock went with the connection.
            client = None;
            locked = false;
            holds_lock.store(false, Ordering::SeqCst);
        }
    }
    if let Some(mut conn) = client {
        // Closing the connection frees the lock too; unlocking first makes
        // it free before close returns, for a handle reopened at once.
        let _ = conn.execute(
            "SELECT pg_advisory_unlock($1, hashtext($2))",
            &[&spec.lock_class, &spec.instance_id],
        );
        let _ = conn.close();
    }
}

fn sleep_unless_stopped(total: Duration, stop: &AtomicBool) {
    let mut left = total;
    while !left.is_zero() && !stop.load(Ordering::SeqCst) {
        let step = left.min(TICK);
        std::thread::sleep(step);
        left -= step;
    }
}
