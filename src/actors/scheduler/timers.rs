//! When the next cycle starts: at the next due item, the poll interval,
//! the end of a circuit's cool-down or of an unauthorized pause, whichever
//! comes first; or after a fixed backoff while the store refuses writes.

use std::time::Duration;

use actix::prelude::*;
use chrono::{DateTime, Utc};

use super::SchedulerActor;
use crate::backoff::add_saturating;

impl SchedulerActor {
    /// Starts the next cycle after exactly `delay`, whatever is due.
    pub(super) fn arm_timer_after(&mut self, ctx: &mut Context<Self>, delay: Duration) {
        if let Some(handle) = self.next_timer.take() {
            ctx.cancel_future(handle);
        }
        self.next_timer = Some(ctx.run_later(delay, |act, ctx| {
            act.next_timer = None;
            act.start_cycle(ctx);
        }));
    }

    /// Sleeps until the next item is due (or the poll interval, whichever
    /// is sooner).
    pub(super) fn arm_timer(&mut self, ctx: &mut Context<Self>, next_due: Option<DateTime<Utc>>) {
        if let Some(handle) = self.next_timer.take() {
            ctx.cancel_future(handle);
        }
        let mut sleep = self.shared.config.interval;
        if let Some(due) = next_due {
            let until = (due - self.shared.clock.now())
                .to_std()
                .unwrap_or(Duration::ZERO);
            sleep = sleep.min(until);
        }
        // Open circuit or pause: wake when the probe is allowed.
        {
            let state = self.shared.state();
            let now = self.shared.clock.now();
            for t in [
                state.circuit.probe_at(),
                state
                    .unauthorized_since
                    .map(|s| add_saturating(s, self.shared.config.unauthorized_probe_interval)),
            ]
            .into_iter()
            .flatten()
            {
                sleep = sleep.min((t - now).to_std().unwrap_or(Duration::ZERO));
            }
        }
        let sleep = sleep.max(Duration::from_millis(1));
        self.next_timer = Some(ctx.run_later(sleep, |act, ctx| {
            act.next_timer = None;
            act.start_cycle(ctx);
        }));
    }
}
