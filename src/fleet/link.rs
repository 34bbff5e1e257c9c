//! A daemon's link to the rest of its fleet, a task beside the worker:
//! - a wake-up from the store's `LISTEN` (another daemon enqueued or
//!   released a lease) wakes this worker's scheduler at once;
//! - every [`ORPHAN_CHECK`], and on a wake-up (the store also wakes after
//!   its session reconnected, when locks may have been lost), the leases
//!   of daemons whose instance lock is gone go back to pending, so a dead
//!   node's items are delivered by the others within seconds, not after
//!   their lease;
//! - every [`PAUSE_SYNC`] the operator's shared pause is applied here: a
//!   pause stops this worker's claims, a resume lifts only that pause (a
//!   401 pause and an open circuit stay this daemon's own).

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::pause::SharedPause;
use crate::store::postgres::PostgresRetryQueue;
use crate::worker::RetryWorker;

/// How often the leases of dead daemons are looked for.
pub const ORPHAN_CHECK: Duration = Duration::from_secs(1);
/// How often the shared pause is read.
pub const PAUSE_SYNC: Duration = Duration::from_millis(500);
/// Shortest time between two looks for dead daemons' leases: wake-ups come
/// with every enqueue on a busy fleet.
const ORPHAN_MIN_GAP: Duration = Duration::from_millis(250);

/// The running link; [`FleetLink::stop`] ends it.
#[derive(Debug)]
pub struct FleetLink {
    task: actix_rt::task::JoinHandle<()>,
}

impl FleetLink {
    /// Starts the link on the current actix runtime. `applied` is the
    /// shared pause's reason already applied to `worker` (at start).
    pub fn start(
        store: Arc<PostgresRetryQueue>,
        worker: Arc<RetryWorker>,
        applied: Option<String>,
    ) -> FleetLink {
        let task = actix_rt::spawn(run(store, worker, applied));
        FleetLink { task }
    }

    /// Stops the link (before the worker stops).
    pub fn stop(self) {
        self.task.abort();
    }
}

async fn run(store: Arc<PostgresRetryQueue>, worker: Arc<RetryWorker>, applied: Option<String>) {
    let mut wakeups = Some(store.subscribe());
    let pause = SharedPause::new(store.clone());
    let mut state = LinkState {
        applied,
        last_orphan_check: Instant::now(),
        failing: false,
    };
    let mut ticks = tokio::time::interval(PAUSE_SYNC);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let woken = match wakeups.as_mut() {
            Some(rx) => tokio::select! {
                got = rx.recv() => Some(got.is_some()),
                _ = ticks.tick() => None,
            },
            None => {
                ticks.tick().await;
                None
            }
        };
        match woken {
            Some(true) => {
                worker.wake();
                if state.last_orphan_check.elapsed() >= ORPHAN_MIN_GAP {
                    state.release_orphans(&store, &worker).await;
                }
            }
            // The store was closed: the daemon is stopping.
            Some(false) => wakeups = None,
            None => {
                state.sync_pause(&pause, &worker).await;
                if state.last_orphan_check.elapsed() >= ORPHAN_CHECK {
                    state.release_orphans(&store, &worker).await;
                }
            }
        }
    }
}

struct LinkState {
    /// The shared pause's reason this link applied, while it holds.
    applied: Option<String>,
    last_orphan_check: Instant,
    /// The database is failing: said once, not every tick.
    failing: bool,
}

impl LinkState {
    async fn release_orphans(&mut self, store: &Arc<PostgresRetryQueue>, worker: &RetryWorker) {
        self.last_orphan_check = Instant::now();
        let store = store.clone();
        match actix_web::web::block(move || store.release_orphaned_leases()).await {
            Ok(Ok(0)) => self.recovered(),
            Ok(Ok(released)) => {
                self.recovered();
                tracing::info!(
                    released,
                    "released the leases of daemons that are gone: their items are pending again"
                );
                worker.wake();
            }
            Ok(Err(e)) => self.failed("release the leases of dead daemons", &e),
            Err(e) => self.failed("release the leases of dead daemons", &e),
        }
    }

    async fn sync_pause(&mut self, pause: &SharedPause, worker: &RetryWorker) {
        let pause = pause.clone();
        let read = match actix_web::web::block(move || pause.get()).await {
            Ok(Ok(read)) => read,
            Ok(Err(e)) => return self.failed("read the fleet's pause", &e),
            Err(e) => return self.failed("read the fleet's pause", &e),
        };
        self.recovered();
        match read {
            Some(p) if self.applied.as_deref() != Some(p.reason.as_str()) => {
                tracing::warn!(reason = %p.reason, by = %p.by, "the fleet is paused: delivery paused");
                worker.pause_because(p.reason.clone());
                self.applied = Some(p.reason);
            }
            None if self.applied.take().is_some() => {
                tracing::info!("the fleet was resumed: delivery resumed");
                worker.lift_host_pause();
            }
            _ => {}
        }
    }

    fn failed(&mut self, what: &str, error: &dyn std::fmt::Display) {
        if !self.failing {
            // The pause in force stays in force; delivery itself reports
            // the store's health.
            tracing::warn!(error = %error, "cannot {what}; retrying");
            self.failing = true;
        }
    }

    fn recovered(&mut self) {
        self.failing = false;
    }
}
