//! The scheduler: decides when to deliver and what each outcome does to an
//! item.
//!
//! A delivery cycle claims up to `batch_size` ready items (one when probing),
//! asks the checker which fingerprints the upstream already has, pushes the
//! rest concurrently through the pusher pool, and turns every outcome into
//! one state change, all written in one group commit:
//!
//! | outcome                  | state change                                   |
//! |--------------------------|------------------------------------------------|
//! | delivered / fingerprint known | delete (acknowledged)                     |
//! | retryable, attempts left | requeue: attempts+1, backoff (or a later Retry-After, capped) |
//! | retryable, no attempt left | dead letter (exhausted)                      |
//! | permanent                | dead letter at once                            |
//! | unauthorized             | release (no attempt burned), pause delivery    |
//! | checker failed           | release all (no attempt burned), circuit failure |
//!
//! Gates before claiming: a manual pause; an unauthorized pause (a single
//! probe item per `unauthorized_probe_interval`); the circuit breaker (after
//! `threshold` consecutive retryable failures it opens for `cooldown`, then
//! lets one probe through; success closes it).
//!
//! The actor wakes at the earliest `next_due`, on `Wake` (after an enqueue),
//! and on a short poll that notices items written by other processes.
//!
//! The outbox path: items a running worker's enqueue stored already claimed
//! arrive as `DeliverClaimed` and are delivered as a claimed batch would be
//! (up to `batch_size` at a time, as many batches at once as claiming
//! cycles may overlap), with no claim. Producers reserve their room first
//! ([`Shared::reserve_handoff`]), only while the gates are open; one that
//! waited so long for a slot that half its lease is gone, or that finds a
//! gate shut by then, is released to pending instead of pushed.
//!
//! One file a concern: `cycle` (the claim cycle and starting cycles),
//! `outcomes` (pushes, outcomes applied, refused writes kept), `handoff`
//! (the outbox path), `timers` and `io` (the actors, or direct calls).
//! This file holds the actor, its supervision and its messages.

mod cycle;
mod handoff;
mod io;
mod outcomes;
mod timers;

use std::sync::Arc;

use actix::prelude::*;

use super::messages::{DeliverClaimed, Pause, Resume, Shutdown, Wake};
use crate::delivery::Shared;
#[cfg(doc)]
use crate::delivery::MAX_OVERLAPPING_CYCLES;
use crate::item::QueueItem;

pub use cycle::run_cycle;
pub use handoff::store_and_hand_off;
pub(crate) use io::blocking;
pub use io::Io;

/// The scheduler actor. Its state lives in [`Shared`], so a restart by its
/// supervisor loses nothing.
pub struct SchedulerActor {
    shared: Arc<Shared>,
    io: Arc<Io>,
    /// Delivery cycles in flight (at most [`MAX_OVERLAPPING_CYCLES`]).
    cycles_running: usize,
    rerun: bool,
    /// The last cycle claimed a full batch and delivered all of it: more
    /// is due and the upstream is healthy, so cycles may overlap.
    backlog: bool,
    shutting_down: bool,
    next_timer: Option<SpawnHandle>,
    /// Handed-off items waiting for a delivery slot.
    handoff_queue: Vec<QueueItem>,
    /// Handed-off batches being delivered (at most
    /// [`MAX_OVERLAPPING_CYCLES`], beside the claiming cycles).
    handoffs_running: usize,
}

impl SchedulerActor {
    /// A scheduler driving deliveries through `io`.
    pub fn new(shared: Arc<Shared>, io: Arc<Io>) -> Self {
        SchedulerActor {
            shared,
            io,
            cycles_running: 0,
            rerun: false,
            backlog: false,
            shutting_down: false,
            next_timer: None,
            handoff_queue: Vec::new(),
            handoffs_running: 0,
        }
    }

    /// Stops the actor once nothing it started is in flight.
    fn stop_when_idle(&self, ctx: &mut Context<Self>) {
        if self.cycles_running == 0 && self.handoffs_running == 0 {
            ctx.stop();
        }
    }
}

impl Actor for SchedulerActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // A Wake lost with a stopped actor's mailbox must not block the next.
        self.shared
            .wake_queued
            .store(false, std::sync::atomic::Ordering::Release);
        if self
            .shared
            .shutdown
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            // Stay idle rather than stop: a supervised actor that stops
            // while an address to it lives is restarted at once, and
            // stopping again here would spin that loop on the actor thread.
            return;
        }
        // The poll notices items that other processes wrote to a shared store.
        ctx.run_interval(self.shared.config.poll_interval, |act, ctx| {
            if act.cycles_running == 0 {
                act.start_cycle(ctx);
            }
        });
        ctx.notify(Wake);
        // Handed-off items queued before a restart.
        self.start_handoffs(ctx);
    }
}

impl Supervised for SchedulerActor {
    fn restarting(&mut self, _: &mut Context<Self>) {
        self.cycles_running = 0;
        self.handoffs_running = 0;
        if self
            .shared
            .shutdown
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            return; // stopped on purpose; `started` leaves it idle
        }
        self.shared.state().stats.actor_restarts += 1;
        tracing::warn!("scheduler restarted by its supervisor");
    }
}

impl Handler<Wake> for SchedulerActor {
    type Result = ();
    fn handle(&mut self, _: Wake, ctx: &mut Context<Self>) {
        // Cleared before the cycle starts: a wake asked for after this line
        // sends a new message, so no commit goes unnoticed.
        self.shared
            .wake_queued
            .store(false, std::sync::atomic::Ordering::Release);
        self.start_cycle(ctx);
    }
}

impl Handler<DeliverClaimed> for SchedulerActor {
    type Result = ();
    fn handle(&mut self, msg: DeliverClaimed, ctx: &mut Context<Self>) {
        self.handoff_queue.extend(msg.0);
        self.start_handoffs(ctx);
    }
}

impl Handler<Pause> for SchedulerActor {
    type Result = ();
    fn handle(&mut self, _: Pause, _: &mut Context<Self>) {
        self.shared.state().paused = true;
    }
}

impl Handler<Resume> for SchedulerActor {
    type Result = ();
    fn handle(&mut self, _: Resume, ctx: &mut Context<Self>) {
        self.shared.state().open_gates();
        self.start_cycle(ctx);
    }
}

impl Handler<Shutdown> for SchedulerActor {
    type Result = ();
    fn handle(&mut self, _: Shutdown, ctx: &mut Context<Self>) {
        self.shutting_down = true;
        // Queued handed-off items go back to pending now.
        self.start_handoffs(ctx);
        self.stop_when_idle(ctx);
    }
}
