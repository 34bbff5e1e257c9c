//! `RetryWorker`: the host's handle on delivery (the seed's name, fixed).
//!
//! It starts the actors either inside the host's running actix System or,
//! for a plain tokio program, on a dedicated thread running its own System.
//! Its methods are plain async Rust: no actix type appears in them.
//!
//! Used as a write-ahead outbox: `enqueue` returns once the item is durable
//! (through the store actor's group commit), then the first attempt follows
//! immediately. While delivery is open (running, not paused, circuit
//! closed) and the outbox has room (two cycles' worth of batches in
//! flight and as many waiting), a new item is stored already claimed, in
//! the enqueue's own commit, and handed straight to the scheduler: it is
//! never claimed back, which saves the claim's read, its write and its
//! commit for every such item (about a fifth of the store thread's CPU per
//! delivered item, measured). Everything else, and everything while a gate is shut, is stored
//! pending and claimed as usual. A handed-off item is leased like any
//! claim, so a crash delivers it again once the lease expires, and `stop`
//! releases what it did not push.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;
use retryq_plugin::{FingerprintChecker, Pusher};
use tokio::sync::broadcast;

use crate::actors::checker::CheckerActor;
use crate::actors::janitor::JanitorActor;
use crate::actors::messages::{MaintenanceReport, Pause, Resume, Shutdown, Wake};
use crate::actors::pusher::PusherActor;
use crate::actors::scheduler::{blocking, run_cycle, store_and_hand_off, Io, SchedulerActor};
use crate::actors::store::{StoreActor, StoreHandle};
use crate::delivery::{Callbacks, DeliveryState, Shared};
use crate::error::{QueueError, QueueResult};
use crate::item::{ItemId, NewItem};
use crate::store::maintenance::run_maintenance;
use crate::store::{QueueStats, RetryQueue, WriteOp};

pub use crate::delivery::types::{
    CircuitConfig, EventKind, RetryResult, RetryWorkerConfig, WorkerError, WorkerEvent, WorkerStats,
};
pub use crate::delivery::CircuitState;

struct Running {
    scheduler: Addr<SchedulerActor>,
    janitor: Addr<JanitorActor>,
    io: Arc<Io>,
    store: StoreHandle,
    system: Option<ActorThread>,
}

/// The dedicated actor thread: its stop signal and its handle.
type ActorThread = (
    tokio::sync::oneshot::Sender<()>,
    std::thread::JoinHandle<()>,
);

impl Running {
    /// Tells the scheduler and the janitor to stop and lets go of their
    /// addresses at once: a supervised actor that stops while an address to
    /// it lives is restarted by its supervisor straight away. Returns the
    /// dedicated actor thread's stop signal and handle, if it has one.
    fn shut_down_actors(self) -> Option<ActorThread> {
        self.scheduler.do_send(Shutdown);
        self.janitor.do_send(Shutdown);
        self.system
    }
}

/// The delivery worker. See the module documentation.
pub struct RetryWorker {
    shared: Arc<Shared>,
    queue: Arc<dyn RetryQueue>,
    pusher: Arc<dyn Pusher>,
    checker: Option<Arc<dyn FingerprintChecker>>,
    running: Mutex<Option<Running>>,
}

impl std::fmt::Debug for RetryWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RetryWorker")
            .field("running", &self.is_running())
            .finish()
    }
}

impl RetryWorker {
    /// A worker delivering `queue`'s items through `pusher`.
    pub fn new(
        config: RetryWorkerConfig,
        queue: Arc<dyn RetryQueue>,
        pusher: Arc<dyn Pusher>,
    ) -> Result<Self, WorkerError> {
        config.validate()?;
        let (events, _) = broadcast::channel(4096);
        Ok(RetryWorker {
            shared: Arc::new(Shared {
                clock: config.clock.clone(),
                push_slots: tokio::sync::Semaphore::new(config.concurrency.max(1)),
                config,
                state: Mutex::new(DeliveryState::default()),
                in_flight: Mutex::new(Default::default()),
                events,
                callbacks: Default::default(),
                shutdown: Default::default(),
                wake_queued: Default::default(),
                handed_off: Default::default(),
                unapplied_writes: Default::default(),
                in_flight_settled: Default::default(),
                claim_gate: Default::default(),
            }),
            queue,
            pusher,
            checker: None,
            running: Mutex::new(None),
        })
    }

    /// Adds a fingerprint checker (call before `start`).
    pub fn with_checker(mut self, checker: Arc<dyn FingerprintChecker>) -> Self {
        self.checker = Some(checker);
        self
    }

    /// The configuration as validated by [`RetryWorker::new`].
    pub fn config(&self) -> &RetryWorkerConfig {
        &self.shared.config
    }

    /// The store this worker delivers from; the API reads it directly.
    pub fn queue(&self) -> &Arc<dyn RetryQueue> {
        &self.queue
    }

    fn running(&self) -> std::sync::MutexGuard<'_, Option<Running>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts delivery: inside the current actix System if called from one,
    /// otherwise on a dedicated thread running its own System.
    pub async fn start(&self) -> Result<(), WorkerError> {
        if self.is_running() {
            return Err(WorkerError::AlreadyRunning);
        }
        self.shared.shutdown.store(false, Ordering::SeqCst);
        let store = StoreHandle::spawn(self.queue.clone())
            .map_err(|e| WorkerError::Start(format!("store thread: {e}")))?;
        let parts = Parts {
            shared: self.shared.clone(),
            store: store.clone(),
            pusher: self.pusher.clone(),
            checker: self.checker.clone(),
        };
        let in_actix =
            actix::System::try_current().is_some() && actix_rt::Arbiter::try_current().is_some();
        let running = if in_actix {
            let (scheduler, janitor, io) = parts.start();
            Running {
                scheduler,
                janitor,
                io,
                store,
                system: None,
            }
        } else {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
            let thread = std::thread::Builder::new()
                .name("retryq-actors".into())
                .spawn(move || {
                    let system = actix::System::new();
                    // The System lives until `stop` (or the handle's drop)
                    // says so; then the runtime and its actors are dropped.
                    system.block_on(async move {
                        let started = parts.start();
                        if tx.send(started).is_ok() {
                            let _ = stop_rx.await;
                        }
                        actix::System::current().stop();
                    });
                })
                .map_err(|e| WorkerError::Start(format!("actor thread: {e}")))?;
            let (scheduler, janitor, io) = rx
                .await
                .map_err(|_| WorkerError::Start("the actor thread died while starting".into()))?;
            let system = (stop_tx, thread);
            Running {
                scheduler,
                janitor,
                io,
                store,
                system: Some(system),
            }
        };
        *self.running() = Some(running);
        tracing::info!("retry worker started");
        Ok(())
    }

    /// True exactly while the worker runs (false once stopped, or if its
    /// actor system was stopped by someone else).
    pub fn is_running(&self) -> bool {
        self.running()
            .as_ref()
            .is_some_and(|r| r.scheduler.connected())
    }

    /// Stops gracefully: no new claims, waits up to `timeout` for pushes in
    /// flight, then releases the leases of whatever did not finish. Nothing
    /// is lost. Idempotent.
    pub async fn stop(&self, timeout: Duration) -> Result<(), WorkerError> {
        let Some(running) = self.running().take() else {
            return Ok(());
        };
        self.shared.shutdown.store(true, Ordering::SeqCst);
        let system = running.shut_down_actors();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // Registered before the check, so an emptying in between wakes it.
            let mut settled = std::pin::pin!(self.shared.in_flight_settled.notified());
            settled.as_mut().enable();
            if self.in_flight_ids().is_empty()
                || tokio::time::timeout_at(deadline, settled).await.is_err()
            {
                break;
            }
        }
        // A claim still running registers its items first: they are in
        // flight too.
        let leftover = {
            let _claims = self.shared.claim_gate.write().await;
            self.in_flight_ids()
        };
        if !leftover.is_empty() {
            tracing::warn!(
                count = leftover.len(),
                "pushes still in flight at stop; releasing their leases"
            );
            let ops = leftover
                .into_iter()
                .map(|id| WriteOp::Release { id })
                .collect();
            let queue = self.queue.clone();
            blocking(move || queue.apply_batch(ops)).await?;
        }
        // Outcomes the store refused earlier: one last try, so a restart
        // does not send delivered items again.
        let ops = std::mem::take(&mut *self.shared.unapplied_writes());
        if !ops.is_empty() {
            let count = ops.len();
            let queue = self.queue.clone();
            if let Err(e) = blocking(move || queue.apply_batch(ops)).await {
                tracing::warn!(error = %e, count, "could not record outcomes at stop; those items are delivered again after a restart");
            }
        }
        if let Some((stop, thread)) = system {
            let _ = stop.send(());
            // Bounded: a transport call stuck past its deadline must not hold
            // up the host's shutdown; its item was released above.
            let joined = tokio::time::timeout(
                Duration::from_secs(2),
                tokio::task::spawn_blocking(move || thread.join()),
            )
            .await;
            if joined.is_err() {
                tracing::warn!("actor thread still busy after stop; detaching it");
            }
        }
        tracing::info!("retry worker stopped");
        Ok(())
    }

    fn in_flight_ids(&self) -> Vec<ItemId> {
        self.shared
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    fn io(&self) -> Arc<Io> {
        match self.running().as_ref() {
            Some(r) => r.io.clone(),
            None => Arc::new(Io::Direct {
                queue: self.queue.clone(),
                pusher: self.pusher.clone(),
                checker: self.checker.clone(),
                timeout: self.shared.config.push_timeout,
            }),
        }
    }

    /// Processes what is due now and returns the results. Works whether or
    /// not the worker runs; leases guarantee no item is pushed twice at once
    /// even while the scheduler runs too.
    pub async fn process_now(&self) -> QueueResult<Vec<RetryResult>> {
        let io = self.io();
        let mut all = Vec::new();
        // "What is due now": at most what the queue holds at the start, so
        // items enqueued meanwhile, or requeued due at once, cannot keep
        // the call going. It also stops once less than a batch was due or
        // delivery became gated.
        let queue = self.queue.clone();
        let held = blocking(move || queue.size()).await?;
        let batch = self.shared.config.batch_size.max(1);
        for _ in 0..held.div_ceil(batch).max(1) {
            let results = run_cycle(&self.shared, &io).await?;
            let more = results.len() >= self.shared.config.batch_size
                && results
                    .iter()
                    .all(|r| !matches!(r.kind, EventKind::Paused | EventKind::Released));
            all.extend(results);
            if !more {
                break;
            }
        }
        Ok(all)
    }

    /// Stores one item durably (through the store actor's group commit while
    /// running) and wakes delivery. Returns its ID.
    pub async fn enqueue(&self, item: NewItem) -> QueueResult<ItemId> {
        let mut ids = self.enqueue_batch(vec![item]).await?;
        ids.pop().unwrap_or(Err(QueueError::QueueClosed))
    }

    /// Stores many items in one durable commit and wakes delivery (or, on
    /// the outbox path described in the module doc, hands them straight to
    /// it).
    pub async fn enqueue_batch(
        &self,
        items: Vec<NewItem>,
    ) -> QueueResult<Vec<QueueResult<ItemId>>> {
        let max_attempts = self.shared.config.max_attempts;
        let items: Vec<NewItem> = items
            .into_iter()
            .map(|mut i| {
                i.max_attempts.get_or_insert(max_attempts);
                // Hash here, on the caller's task: the store applies every
                // producer's items on one committer thread, where a SHA-256
                // per report was a tenth of each enqueue.
                if i.fingerprint.is_none() {
                    i.fingerprint = Some(i.report.fingerprint());
                }
                i
            })
            .collect();
        // Sealing too ([store.encryption]), for the same reason.
        let items = self.queue.prepare_new(items)?;
        let running = self
            .running()
            .as_ref()
            .map(|r| (r.store.clone(), r.scheduler.clone()));
        let results = self.store_items(running, items).await;
        self.shared.observe_store(&results);
        results
    }

    async fn store_items(
        &self,
        running: Option<(StoreHandle, Addr<SchedulerActor>)>,
        items: Vec<NewItem>,
    ) -> QueueResult<Vec<QueueResult<ItemId>>> {
        let results = match running {
            Some((store, scheduler)) => {
                let handoff = self.shared.reserve_handoff(items.len());
                let stored = store_and_hand_off(
                    self.shared.clone(),
                    store,
                    scheduler,
                    self.queue.clone(),
                    items,
                    handoff,
                );
                if handoff == 0 {
                    stored.await?
                } else {
                    // The outbox path, in a task of its own: a caller that
                    // gives up waiting cannot strand items stored claimed.
                    tokio::spawn(stored)
                        .await
                        .map_err(|e| QueueError::internal("outbox enqueue task", e))??
                }
            }
            None => {
                let queue = self.queue.clone();
                blocking(move || queue.enqueue_batch(items)).await?
            }
        };
        Ok(results)
    }

    /// Wakes the scheduler (something may be due).
    pub fn wake(&self) {
        if let Some(r) = self.running().as_ref() {
            self.shared.wake_with(|| r.scheduler.do_send(Wake));
        }
    }

    /// Stops claiming until `resume`.
    pub fn pause(&self) {
        self.pause_because("paused by the host");
    }

    /// Stops claiming until `resume`, recording `reason` for `stats`.
    pub fn pause_because(&self, reason: impl Into<String>) {
        {
            let mut state = self.shared.state();
            if !state.paused {
                state.paused_since = Some(self.shared.clock.now());
            }
            state.paused = true;
            state.pause_reason = Some(reason.into());
        }
        if let Some(r) = self.running().as_ref() {
            r.scheduler.do_send(Pause);
        }
    }

    /// Lifts only the host's pause: an unauthorized pause and an open
    /// circuit stay, because they are this worker's own (a fleet's resume
    /// asked through another daemon, see [`crate::fleet`]).
    pub fn lift_host_pause(&self) {
        {
            let mut state = self.shared.state();
            state.paused = false;
            state.pause_reason = None;
            state.paused_since = None;
        }
        self.wake();
    }

    /// Resumes after `pause`, an unauthorized pause or an open circuit.
    pub fn resume(&self) {
        self.shared.state().open_gates();
        if let Some(r) = self.running().as_ref() {
            r.scheduler.do_send(Resume);
        }
    }

    /// Counters, gates and the store's health, read at once.
    pub fn stats(&self) -> WorkerStats {
        let circuit_state = self.shared.circuit_state();
        let is_running = self.is_running();
        let state = self.shared.state();
        let (pause_reason, paused_since) = state.pause_reason();
        WorkerStats {
            is_running,
            paused: state.paused || state.unauthorized_since.is_some(),
            pause_reason,
            paused_since,
            circuit_state,
            store_error: state.store_health.failure().map(|f| f.error.clone()),
            store_failing_since: state.store_health.failure().map(|f| f.since),
            ..state.stats.clone()
        }
    }

    /// A snapshot of the queue.
    pub async fn queue_stats(&self) -> QueueResult<QueueStats> {
        let queue = self.queue.clone();
        blocking(move || queue.stats()).await
    }

    /// Runs the janitor's pass now: TTL expiry, limits, lease recovery.
    pub async fn trigger_cleanup(&self) -> QueueResult<MaintenanceReport> {
        let queue = self.queue.clone();
        let ttl = self.shared.config.ttl;
        let report = blocking(move || run_maintenance(queue.as_ref(), ttl)).await?;
        self.shared.record_maintenance(&report);
        Ok(report)
    }

    /// A stream of every outcome from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<crate::worker::WorkerEvent> {
        self.shared.events.subscribe()
    }

    fn callbacks(&self) -> std::sync::RwLockWriteGuard<'_, Callbacks> {
        self.shared
            .callbacks
            .write()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Called for every delivered or skipped item.
    pub fn on_success(&self, f: impl Fn(&WorkerEvent) + Send + Sync + 'static) {
        self.callbacks().on_success.push(Box::new(f));
    }

    /// Called for every failed attempt (retried, dead-lettered, exhausted,
    /// released).
    pub fn on_fail(&self, f: impl Fn(&WorkerEvent) + Send + Sync + 'static) {
        self.callbacks().on_fail.push(Box::new(f));
    }

    /// Called when an item runs out of attempts.
    pub fn on_exhaust(&self, f: impl Fn(&WorkerEvent) + Send + Sync + 'static) {
        self.callbacks().on_exhaust.push(Box::new(f));
    }
}

impl Drop for RetryWorker {
    fn drop(&mut self) {
        if let Some(running) = self.running().take() {
            // Not graceful (no await in drop): stop claiming; leases of
            // anything in flight expire and the items are delivered again.
            self.shared.shutdown.store(true, Ordering::SeqCst);
            if let Some((stop, _)) = running.shut_down_actors() {
                let _ = stop.send(());
            }
        }
    }
}

struct Parts {
    shared: Arc<Shared>,
    store: StoreHandle,
    pusher: Arc<dyn Pusher>,
    checker: Option<Arc<dyn FingerprintChecker>>,
}

impl Parts {
    /// Starts the actors; must run inside an actix System.
    fn start(self) -> (Addr<SchedulerActor>, Addr<JanitorActor>, Arc<Io>) {
        let config = &self.shared.config;
        let timeout = config.push_timeout;
        let store = StoreActor::new(self.store).start();
        let pusher = self.pusher;
        let pusher_pool = PusherActor::new(pusher, timeout).start();
        let checker = self
            .checker
            .map(|c| SyncArbiter::start(1, move || CheckerActor::new(c.clone(), timeout)));
        let io = Arc::new(Io::Actors {
            store: store.clone(),
            pusher: pusher_pool,
            checker,
        });
        let scheduler = {
            let shared = self.shared.clone();
            let io = io.clone();
            Supervisor::start(move |_| SchedulerActor::new(shared, io))
        };
        let shared = self.shared;
        let janitor = Supervisor::start(move |_| JanitorActor::new(shared, store));
        (scheduler, janitor, io)
    }
}
