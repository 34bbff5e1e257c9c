//! The worker's state, shared by the `RetryWorker` handle and every actor:
//! configuration, the gates (pause, unauthorized pause, circuit breaker,
//! store health), counters, in-flight items, host callbacks and the event
//! stream. It lives outside the actors so that a supervisor's restart of
//! one loses nothing, and it holds no actix type: the actors and the
//! handle depend on it, never on each other.

use std::collections::HashSet;
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use tokio::sync::broadcast;

use crate::backoff::add_saturating;
use crate::clock::SharedClock;
use crate::delivery::circuit::CircuitPolicy;
use crate::delivery::store_health::StoreHealthLog;
use crate::delivery::types::{EventKind, RetryWorkerConfig, WorkerEvent, WorkerStats};
use crate::delivery::{CircuitBreaker, CircuitState, CircuitTransition, StoreHealth};
use crate::error::QueueResult;
use crate::item::ItemId;
use crate::store::maintenance::MaintenanceReport;
use crate::store::WriteOp;

/// Most delivery cycles in flight at once. Two let one batch be claimed (on
/// the store thread) while another is pushed (on the pusher threads); more
/// would only hold more items under lease.
pub const MAX_OVERLAPPING_CYCLES: usize = 2;

/// What the gates let through now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// Nothing: paused, or the circuit is open.
    Closed,
    /// One probe item: the circuit is half-open, or an unauthorized
    /// pause is due for its probe.
    Probe,
    /// A whole batch.
    Open,
}

/// Callbacks registered by the host.
pub type Callback = Box<dyn Fn(&WorkerEvent) + Send + Sync>;

/// Host callbacks by kind.
#[derive(Default)]
pub struct Callbacks {
    /// On delivery (or a fingerprint skip).
    pub on_success: Vec<Callback>,
    /// On every failed attempt (retried, dead-lettered, released).
    pub on_fail: Vec<Callback>,
    /// When retries are exhausted.
    pub on_exhaust: Vec<Callback>,
}

/// Gate state: pauses, the circuit breaker and the store's health.
#[derive(Debug, Default)]
pub struct DeliveryState {
    /// Paused by the host (or an operator).
    pub paused: bool,
    /// Why the host paused, for `stats`.
    pub pause_reason: Option<String>,
    /// Since when the host's pause holds.
    pub paused_since: Option<DateTime<Utc>>,
    /// Paused by an unauthorized answer since this time.
    pub unauthorized_since: Option<DateTime<Utc>>,
    /// What the upstream said when it refused our credentials.
    pub unauthorized_reason: Option<String>,
    /// Opens after consecutive retryable failures; see [`CircuitBreaker`].
    pub circuit: CircuitBreaker,
    /// Whether the store refuses writes, and the backoff that follows.
    pub store_health: StoreHealth,
    /// What `stats` reports; updated under the same lock as the gates.
    pub stats: WorkerStats,
}

impl DeliveryState {
    /// Why delivery is paused and since when, for `stats`: the host's
    /// pause first, then an unauthorized pause.
    pub fn pause_reason(&self) -> (Option<String>, Option<DateTime<Utc>>) {
        if self.paused {
            return (
                Some(
                    self.pause_reason
                        .clone()
                        .unwrap_or_else(|| "paused by the host".to_owned()),
                ),
                self.paused_since,
            );
        }
        if let Some(since) = self.unauthorized_since {
            let detail = self
                .unauthorized_reason
                .as_deref()
                .unwrap_or("unauthorized");
            return (
                Some(format!("upstream refused our credentials: {detail}")),
                Some(since),
            );
        }
        (None, None)
    }

    /// Lifts every gate: the host's pause, an unauthorized pause and an
    /// open circuit (counters are kept).
    pub fn open_gates(&mut self) {
        self.paused = false;
        self.pause_reason = None;
        self.paused_since = None;
        self.unauthorized_reason = None;
        self.unauthorized_since = None;
        self.circuit.reset();
    }
}

/// State shared by the worker handle and its actors; it outlives actor
/// restarts, which is what keeps a restarted actor's state intact.
pub struct Shared {
    /// Validated once by `RetryWorker::new`; never changes while running.
    pub config: RetryWorkerConfig,
    /// Where "now" comes from.
    pub clock: SharedClock,
    /// Gates and counters, under one lock so a `stats` call sees them agree.
    pub state: Mutex<DeliveryState>,
    /// IDs claimed by this worker and not yet settled.
    pub in_flight: Mutex<HashSet<ItemId>>,
    /// Every outcome, for subscribers; a slow subscriber loses the oldest.
    pub events: broadcast::Sender<WorkerEvent>,
    /// The host's `on_success` / `on_fail` / `on_exhaust` callbacks, run by `Shared::emit`.
    pub callbacks: std::sync::RwLock<Callbacks>,
    /// Set by `stop`: a supervisor restart must not resume delivery.
    pub shutdown: std::sync::atomic::AtomicBool,
    /// A `Wake` is in the scheduler's mailbox and not yet handled. Producers
    /// send one only when none is, so a burst of enqueues costs the actor
    /// thread one cycle start, not one message (and one eventfd write) each.
    pub wake_queued: std::sync::atomic::AtomicBool,
    /// Items handed straight from an enqueue to delivery (stored claimed)
    /// and not yet settled; at most [`Shared::handoff_limit`].
    pub handed_off: std::sync::atomic::AtomicUsize,
    /// Outcomes the store refused to record (a full disk): acknowledgements,
    /// reschedules, dead letters and releases of items this worker still
    /// holds under lease. Written before anything else is claimed, so a
    /// delivered item is not sent again and a rescheduled one is not left
    /// leased once the store accepts writes.
    pub unapplied_writes: Mutex<Vec<WriteOp>>,
    /// Signalled whenever the in-flight set becomes empty (`stop` waits
    /// for it).
    pub in_flight_settled: tokio::sync::Notify,
    /// Held shared by a cycle from its claim until the claimed IDs are in
    /// `in_flight`; `stop` takes it exclusively before it releases what is
    /// in flight, so items a claim returns meanwhile are not left leased.
    pub claim_gate: tokio::sync::RwLock<()>,
    /// `config.concurrency` permits: one per push in flight, across every
    /// cycle and hand-off running at once. A push takes its permit before it
    /// looks at the gates, so one still waiting when the circuit opens (or a
    /// 401 pauses delivery) is held back, not sent into the outage.
    pub push_slots: tokio::sync::Semaphore,
}

impl Shared {
    /// Asks for a delivery cycle through `send_wake` (the scheduler's `Wake`
    /// message), unless one is already queued:
    /// that one is handled after this call returned, so it sees whatever the
    /// caller committed before calling. Nor while delivery is gated (paused,
    /// unauthorized, circuit open): such a cycle does nothing, and a burst
    /// of commits into an outage's backlog would keep waking the actor
    /// thread for it. Callers wake after their commit, so a resume or a
    /// circuit closing later starts its own cycle, which sees it.
    pub fn wake_with(&self, send_wake: impl FnOnce()) {
        if matches!(self.gate(self.clock.now()), Gate::Closed) {
            return;
        }
        if !self
            .wake_queued
            .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            send_wake();
        }
    }

    /// Most items in the outbox path at once: as many batches as the
    /// overlapping cycles push, and as many again waiting for a slot.
    /// Past it, new items wait pending for a claim, so a flood of enqueues
    /// cannot pile up leased items in memory.
    pub fn handoff_limit(&self) -> usize {
        self.config
            .batch_size
            .saturating_mul(MAX_OVERLAPPING_CYCLES * 2)
    }

    /// Reserves outbox slots for up to `wanted` new items: how many of
    /// them may be stored claimed and handed straight to delivery. None
    /// while delivery is gated (paused, unauthorized, circuit open or
    /// probing) or stopping: those items wait pending, as the gates say.
    /// Each slot is given back by [`Shared::unreserve_handoff`] once its
    /// item settled or was not stored.
    pub fn reserve_handoff(&self, wanted: usize) -> usize {
        use std::sync::atomic::Ordering;
        if wanted == 0
            || self.shutdown.load(Ordering::SeqCst)
            || !matches!(self.gate(self.clock.now()), Gate::Open)
        {
            return 0;
        }
        let limit = self.handoff_limit();
        let mut current = self.handed_off.load(Ordering::Acquire);
        loop {
            let take = wanted.min(limit.saturating_sub(current));
            if take == 0 {
                return 0;
            }
            match self.handed_off.compare_exchange_weak(
                current,
                current + take,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return take,
                Err(seen) => current = seen,
            }
        }
    }

    /// Gives back `count` outbox slots.
    pub fn unreserve_handoff(&self, count: usize) {
        use std::sync::atomic::Ordering;
        let _ = self
            .handed_off
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                Some(n.saturating_sub(count))
            });
    }

    /// Records what a store call said about the store's health: a failure
    /// of the medium starts or extends a run of failures (logged at most
    /// once per interval), anything else ends it.
    pub fn observe_store<T>(&self, result: &QueueResult<T>) {
        let now = self.clock.now();
        let line = {
            let mut state = self.state();
            match result {
                Err(e) if e.is_storage() => {
                    state
                        .store_health
                        .record_failure(e.to_string(), now, self.config.interval)
                }
                _ if state.store_health.is_failing() => state.store_health.record_success(now),
                _ => None,
            }
        };
        match line {
            Some(StoreHealthLog::Failing { error }) => {
                tracing::error!(%error, "the store refuses writes; delivery backs off until it accepts them again");
            }
            Some(StoreHealthLog::StillFailing {
                error,
                count,
                unlogged,
            }) => {
                tracing::error!(%error, failures = count, since_last_line = unlogged, "the store still refuses writes");
            }
            Some(StoreHealthLog::Recovered { count, lasted }) => {
                tracing::info!(failures = count, lasted = %humantime::format_duration(lasted), "the store accepts writes again; delivery resumes");
            }
            None => {}
        }
    }

    /// Counts what a maintenance pass removed.
    pub fn record_maintenance(&self, report: &MaintenanceReport) {
        let mut state = self.state();
        state.stats.total_expired += report.cleanup.removed() as u64;
        state.stats.total_evicted += report.evicted as u64;
    }

    /// Locks the delivery state (a poisoned lock is still usable: the state
    /// is plain counters and flags).
    pub fn state(&self) -> std::sync::MutexGuard<'_, DeliveryState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The outcomes waiting for the store (see [`Shared::unapplied_writes`]).
    pub fn unapplied_writes(&self) -> std::sync::MutexGuard<'_, Vec<WriteOp>> {
        self.unapplied_writes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn in_flight(&self) -> std::sync::MutexGuard<'_, HashSet<ItemId>> {
        self.in_flight.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes `ids` out of the in-flight set and, when that empties it,
    /// tells a waiting `stop`.
    pub(crate) fn settle_in_flight<'a>(&self, ids: impl IntoIterator<Item = &'a ItemId>) {
        let mut in_flight = self.in_flight();
        for id in ids {
            in_flight.remove(id);
        }
        if in_flight.is_empty() {
            self.in_flight_settled.notify_waiters();
        }
    }

    /// The circuit as the host sees it now.
    pub fn circuit_state(&self) -> CircuitState {
        self.state().circuit.state(self.clock.now())
    }

    pub(crate) fn emit(&self, event: WorkerEvent) {
        let callbacks = self.callbacks.read().unwrap_or_else(|p| p.into_inner());
        let list = match event.kind {
            EventKind::Delivered | EventKind::Skipped => &callbacks.on_success,
            EventKind::Exhausted => &callbacks.on_exhaust,
            _ => &callbacks.on_fail,
        };
        for cb in list {
            cb(&event);
        }
        if event.kind == EventKind::Exhausted {
            // An exhausted item is also a failure.
            for cb in &callbacks.on_fail {
                cb(&event);
            }
        }
        let _ = self.events.send(event);
    }

    /// What the gates let through at `now`.
    pub fn gate(&self, now: DateTime<Utc>) -> Gate {
        let state = self.state();
        if state.paused {
            return Gate::Closed;
        }
        if let Some(since) = state.unauthorized_since {
            let probe_at = add_saturating(since, self.config.unauthorized_probe_interval);
            return if now >= probe_at {
                Gate::Probe
            } else {
                Gate::Closed
            };
        }
        match state.circuit.state(now) {
            CircuitState::Open => Gate::Closed,
            CircuitState::HalfOpen => Gate::Probe,
            CircuitState::Closed => Gate::Open,
        }
    }

    /// Records a delivered push: closes a half-open circuit and lifts an
    /// unauthorized pause.
    pub fn record_success(&self) {
        let mut state = self.state();
        if state.circuit.record_success() == Some(CircuitTransition::Closed) {
            tracing::info!("upstream answered the probe; circuit closed");
        }
        if state.unauthorized_since.take().is_some() {
            state.unauthorized_reason = None;
            tracing::info!("credentials accepted again; delivery resumed");
        }
    }

    /// Records a failed push (or fingerprint check). `unauthorized` carries
    /// the upstream's message when it refused our credentials.
    pub fn record_failure(&self, probing: bool, unauthorized: Option<&str>) {
        let now = self.clock.now();
        let mut state = self.state();
        if let Some(message) = unauthorized {
            state.unauthorized_since = Some(now);
            state.unauthorized_reason = Some(message.to_owned());
            return;
        }
        if state.unauthorized_since.is_some() && probing {
            // A probe that failed for another reason: keep the pause, retry later.
            state.unauthorized_since = Some(now);
            return;
        }
        let circuit = &self.config.circuit;
        let policy = CircuitPolicy {
            threshold: circuit.threshold,
            cooldown: circuit.cooldown,
            max_cooldown: circuit.max_cooldown,
        };
        match state.circuit.record_failure(&policy, probing, now) {
            Some(CircuitTransition::Opened { failures, cooldown }) => {
                tracing::warn!(
                    failures,
                    cooldown = %humantime::format_duration(cooldown),
                    "circuit opened: upstream looks down"
                );
                state.stats.circuit_opened += 1;
            }
            Some(CircuitTransition::Reopened { cooldown }) => {
                tracing::info!(
                    cooldown = %humantime::format_duration(cooldown),
                    "probe failed; circuit stays open"
                );
            }
            Some(CircuitTransition::Closed) | None => {}
        }
    }
}
