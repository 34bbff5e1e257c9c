//! The janitor: on an interval, expires items past their TTL, enforces the
//! item and byte caps, trims the quarantine and recovers expired leases.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use actix::prelude::*;

use super::messages::{Maintain, Tick};
use super::store::StoreActor;
use crate::delivery::Shared;

/// The janitor actor.
pub struct JanitorActor {
    shared: Arc<Shared>,
    store: Addr<StoreActor>,
}

impl JanitorActor {
    /// A janitor maintaining `store`.
    pub fn new(shared: Arc<Shared>, store: Addr<StoreActor>) -> Self {
        JanitorActor { shared, store }
    }
}

impl Actor for JanitorActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        if self.shared.shutdown.load(Ordering::SeqCst) {
            // Stay idle rather than stop: a supervised actor that stops
            // while an address to it lives is restarted at once, and
            // stopping again here would spin that loop on the actor thread.
            return;
        }
        ctx.run_interval(self.shared.config.janitor_interval, |_, ctx| {
            ctx.notify(Tick)
        });
    }
}

impl Supervised for JanitorActor {
    fn restarting(&mut self, _: &mut Context<Self>) {
        if self.shared.shutdown.load(Ordering::SeqCst) {
            return; // stopped on purpose; `started` leaves it idle
        }
        self.shared.state().stats.actor_restarts += 1;
        tracing::warn!("janitor restarted by its supervisor");
    }
}

impl Handler<Tick> for JanitorActor {
    type Result = ResponseActFuture<Self, ()>;
    fn handle(&mut self, _: Tick, _: &mut Context<Self>) -> Self::Result {
        let store = self.store.clone();
        let ttl = self.shared.config.ttl;
        let shared = self.shared.clone();
        Box::pin(
            async move { store.send(Maintain { ttl }).await }
                .into_actor(self)
                .map(move |result, _, _| match result {
                    Ok(Ok(report)) => {
                        shared.record_maintenance(&report);
                        if report.changed_anything() {
                            tracing::info!(
                                expired = report.cleanup.expired,
                                dead_letters_expired = report.cleanup.dead_letters_expired,
                                evicted = report.evicted,
                                leases_released = report.leases_released,
                                "janitor pass"
                            );
                        }
                    }
                    Ok(Err(e)) => tracing::error!(error = %e, "janitor pass failed"),
                    Err(e) => tracing::error!(error = %e, "store actor unreachable"),
                }),
        )
    }
}

impl Handler<super::messages::Shutdown> for JanitorActor {
    type Result = ();
    fn handle(&mut self, _: super::messages::Shutdown, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}
