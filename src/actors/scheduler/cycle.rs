//! The claim cycle: gates checked, a batch claimed and registered in
//! flight, delivered, and what it proved told to the store's health; and
//! the actor's side, which starts cycles (overlapping while a healthy
//! upstream has a backlog) and schedules the next one from each result.

use actix::prelude::*;

use super::outcomes::{deliver, record_unapplied_writes};
use super::{Io, SchedulerActor};
use crate::actors::messages::{NextDue, Wake};
use crate::delivery::types::{EventKind, RetryResult};
use crate::delivery::{Gate, Shared, MAX_OVERLAPPING_CYCLES};
use crate::error::QueueResult;
use crate::item::ItemId;

/// Runs one delivery cycle and returns what happened to each claimed item.
pub async fn run_cycle(shared: &Shared, io: &Io) -> QueueResult<Vec<RetryResult>> {
    record_unapplied_writes(shared, io).await?;
    let now = shared.clock.now();
    let (limit, probing) = match shared.gate(now) {
        Gate::Closed => return Ok(Vec::new()),
        Gate::Probe => (1, true),
        Gate::Open => (shared.config.batch_size, false),
    };
    let registering = shared.claim_gate.read().await;
    let items = io.claim(limit, shared.config.lease).await?;
    if items.is_empty() {
        return Ok(Vec::new());
    }
    shared
        .in_flight()
        .extend(items.iter().map(|i| i.id.clone()));
    drop(registering);
    let ids: Vec<ItemId> = items.iter().map(|i| i.id.clone()).collect();
    let outcome = deliver(shared, io, items, probing).await;
    shared.settle_in_flight(&ids);
    outcome
}

/// Tells the store's health what a cycle proved: a failure of the medium,
/// or a write that went through (it claimed and recorded something). A
/// cycle with nothing to do proves nothing: while the store is failing,
/// it asks the store for a probe write instead, so delivery and `readyz`
/// notice by themselves when space returns.
pub(super) async fn observe_cycle(
    shared: &Shared,
    io: &Io,
    results: &QueueResult<Vec<RetryResult>>,
) {
    match results {
        Err(_) => shared.observe_store(results),
        Ok(done) if !done.is_empty() => shared.observe_store(results),
        Ok(_) if shared.state().store_health.is_failing() => match io.probe_writable().await {
            Ok(false) => {}
            probed => shared.observe_store(&probed),
        },
        Ok(_) => {}
    }
}

impl SchedulerActor {
    /// Starts delivery cycles: one, or while a healthy upstream has a
    /// backlog, up to [`MAX_OVERLAPPING_CYCLES`], so the next batch is
    /// claimed while the last one is still being pushed.
    pub(super) fn start_cycle(&mut self, ctx: &mut Context<Self>) {
        let limit =
            if self.backlog && matches!(self.shared.gate(self.shared.clock.now()), Gate::Open) {
                MAX_OVERLAPPING_CYCLES
            } else {
                1
            };
        if self.cycles_running >= limit {
            self.rerun = true;
            return;
        }
        while self.cycles_running < limit && !self.shutting_down {
            self.spawn_cycle(ctx);
        }
    }

    pub(super) fn spawn_cycle(&mut self, ctx: &mut Context<Self>) {
        self.cycles_running += 1;
        self.rerun = false;
        let shared = self.shared.clone();
        let io = self.io.clone();
        let batch = self.shared.config.batch_size;
        let fut = async move {
            if matches!(shared.gate(shared.clock.now()), Gate::Closed) {
                // Paused or circuit open: nothing is claimed, and the timer
                // goes by the pause, the cool-down or the poll, not by the
                // next due item, so asking the store would be wasted work
                // on its thread (after every enqueue, while paused). What
                // the store refused earlier is still written (no store call
                // when there is none): an acknowledgement must not wait out
                // a pause, by which time its lease may have run out and the
                // item been pushed again, nor a release of a leased item.
                let recorded = record_unapplied_writes(&shared, &io)
                    .await
                    .map(|()| Vec::new());
                if recorded.is_err() {
                    observe_cycle(&shared, &io, &recorded).await;
                }
                return (recorded, None);
            }
            let results = run_cycle(&shared, &io).await;
            observe_cycle(&shared, &io, &results).await;
            let next_due = match &*io {
                Io::Actors { store, .. } => store.send(NextDue).await.ok().and_then(|r| r.ok()),
                Io::Direct { queue, .. } => queue.next_due().ok(),
            }
            .flatten();
            (results, next_due)
        };
        ctx.spawn(
            fut.into_actor(self)
                .map(move |(results, next_due), act, ctx| {
                    act.cycles_running -= 1;
                    let full = match &results {
                        Ok(r) => r.len() >= batch,
                        // Store failures are logged by `observe_store`, at
                        // a bounded rate.
                        Err(e) if e.is_storage() => false,
                        Err(e) => {
                            tracing::error!(error = %e, "delivery cycle failed");
                            false
                        }
                    };
                    act.backlog = full
                        && results.as_ref().is_ok_and(|r| {
                            r.iter().all(|r| {
                                matches!(r.kind, EventKind::Delivered | EventKind::Skipped)
                            })
                        });
                    if act.shutting_down {
                        act.stop_when_idle(ctx);
                        return;
                    }
                    let store_backoff = act.shared.state().store_health.backoff();
                    if let Some(backoff) = store_backoff {
                        // Retrying at once would spin on the full disk.
                        act.arm_timer_after(ctx, backoff);
                    } else if full || act.rerun {
                        ctx.notify(Wake);
                    } else {
                        act.arm_timer(ctx, next_due);
                    }
                }),
        );
    }
}
