//! Delivery history for the console's chart: delivered, failed,
//! dead-lettered and enqueued counts per minute over the last hour, kept in
//! memory as 60 one-minute buckets (nothing is persisted: a restart starts
//! an empty hour), and `GET /v1/stats/history`, which serves it.
//!
//! The buckets are fed by the same events `GET /v1/events` streams (see
//! [`super::events`]); each event is counted in the minute of the history's
//! clock when it is recorded, so a manual clock tests it without sleeping.

use std::collections::VecDeque;

use actix_web::{web, HttpResponse};
use chrono::{DateTime, TimeZone, Utc};
use serde::Serialize;
use utoipa::ToSchema;

use super::auth::Authorized;
use super::{AdminState, ApiError};
use crate::clock::SharedClock;

/// Buckets kept: one hour of minutes.
pub const HISTORY_MINUTES: usize = 60;
/// Width of a bucket, in seconds.
pub const BUCKET_SECONDS: i64 = 60;

/// What one event adds to its minute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tally {
    /// Acknowledged by the upstream (or already there: a fingerprint skip).
    Delivered,
    /// A failed attempt that was rescheduled.
    Failed,
    /// A failed attempt that made the item a dead letter (refused for good
    /// or out of attempts); it counts as failed too.
    DeadLettered,
    /// A new item stored.
    Enqueued,
}

/// One minute's counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default, utoipa::ToSchema)]
pub struct Bucket {
    /// Start of the minute (UTC, whole minute).
    pub start: DateTime<Utc>,
    /// Items delivered (including fingerprint skips).
    pub delivered: u64,
    /// Failed attempts (retried or dead-lettered).
    pub failed: u64,
    /// Items that became dead letters.
    pub dead_lettered: u64,
    /// Items enqueued through the API.
    pub enqueued: u64,
}

/// The last hour in one-minute buckets.
#[derive(Debug)]
pub struct History {
    clock: SharedClock,
    /// Minutes with counts, oldest first, keyed by unix minute; minutes with
    /// nothing are not stored.
    buckets: std::sync::Mutex<VecDeque<(i64, Bucket)>>,
}

fn minute_of(at: DateTime<Utc>) -> i64 {
    at.timestamp().div_euclid(BUCKET_SECONDS)
}

fn minute_start(minute: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(minute.saturating_mul(BUCKET_SECONDS), 0)
        .single()
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

impl History {
    /// An empty history on `clock`.
    pub fn new(clock: SharedClock) -> Self {
        History {
            clock,
            buckets: std::sync::Mutex::new(VecDeque::with_capacity(HISTORY_MINUTES + 1)),
        }
    }

    fn buckets(&self) -> std::sync::MutexGuard<'_, VecDeque<(i64, Bucket)>> {
        // Plain counters: a poisoned lock is still consistent enough to use.
        self.buckets.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts one event in the current minute.
    pub fn record(&self, tally: Tally) {
        let minute = minute_of(self.clock.now());
        let mut buckets = self.buckets();
        // Old minutes go as soon as the hour moves past them, so memory
        // stays at 60 buckets however long the daemon runs.
        while buckets
            .front()
            .is_some_and(|(m, _)| *m <= minute - HISTORY_MINUTES as i64)
        {
            buckets.pop_front();
        }
        let bucket = match buckets.back_mut() {
            Some((m, bucket)) if *m == minute => bucket,
            // A clock that went back: count it in the newest minute rather
            // than reorder the history.
            Some((m, bucket)) if *m > minute => bucket,
            _ => {
                buckets.push_back((
                    minute,
                    Bucket {
                        start: minute_start(minute),
                        ..Bucket::default()
                    },
                ));
                match buckets.back_mut() {
                    Some((_, bucket)) => bucket,
                    None => return,
                }
            }
        };
        match tally {
            Tally::Delivered => bucket.delivered += 1,
            Tally::Failed => bucket.failed += 1,
            Tally::DeadLettered => {
                bucket.failed += 1;
                bucket.dead_lettered += 1;
            }
            Tally::Enqueued => bucket.enqueued += 1,
        }
    }

    /// The last [`HISTORY_MINUTES`] minutes, oldest first, ending with the
    /// current one; minutes without events are zero.
    pub fn snapshot(&self) -> Vec<Bucket> {
        let now = minute_of(self.clock.now());
        let first = now - (HISTORY_MINUTES as i64 - 1);
        let buckets = self.buckets();
        let mut stored = buckets.iter().peekable();
        (first..=now)
            .map(|minute| {
                while stored.peek().is_some_and(|(m, _)| *m < minute) {
                    stored.next();
                }
                match stored.peek() {
                    Some((m, bucket)) if *m == minute => *bucket,
                    _ => Bucket {
                        start: minute_start(minute),
                        ..Bucket::default()
                    },
                }
            })
            .collect()
    }
}

/// `GET /v1/stats/history`.
#[utoipa::path(get, path = "/v1/stats/history", tag = "live",
    responses(
        (status = 200, description = "The last hour in one-minute buckets", body = HistoryView),
        (status = 401, description = "Missing or wrong bearer token", body = super::schema::ErrorBody)))]
pub(super) async fn get_history(
    _auth: Authorized,
    state: web::Data<AdminState>,
) -> Result<HttpResponse, ApiError> {
    let buckets = state.console.feed.history.snapshot();
    let total = |f: fn(&Bucket) -> u64| buckets.iter().map(f).sum::<u64>();
    Ok(HttpResponse::Ok().json(HistoryView {
        bucket_seconds: BUCKET_SECONDS,
        delivered: total(|b| b.delivered),
        failed: total(|b| b.failed),
        dead_lettered: total(|b| b.dead_lettered),
        enqueued: total(|b| b.enqueued),
        buckets,
    }))
}

/// `GET /v1/stats/history`: totals over the hour and the 60 minutes.
#[derive(Debug, Serialize, ToSchema)]
pub struct HistoryView {
    /// Width of a bucket (60).
    pub bucket_seconds: i64,
    /// Delivered in the last hour.
    pub delivered: u64,
    /// Failed attempts in the last hour.
    pub failed: u64,
    /// Dead letters made in the last hour.
    pub dead_lettered: u64,
    /// Enqueued through the API in the last hour.
    pub enqueued: u64,
    /// Oldest first, ending with the current minute.
    pub buckets: Vec<Bucket>,
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::clock::ManualClock;

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .expect("test time parses")
            .with_timezone(&Utc)
    }

    #[test]
    fn counts_land_in_their_minute_and_leave_after_an_hour() {
        let clock = ManualClock::new(at("2026-11-29T12:00:10Z"));
        let history = History::new(Arc::new(clock.clone()));
        history.record(Tally::Delivered);
        history.record(Tally::Delivered);
        history.record(Tally::Failed);
        clock.advance(Duration::from_secs(60));
        history.record(Tally::DeadLettered);
        history.record(Tally::Enqueued);

        let snap = history.snapshot();
        assert_eq!(snap.len(), HISTORY_MINUTES);
        let last = snap[HISTORY_MINUTES - 1];
        assert_eq!(last.start, at("2026-11-29T12:01:00Z"));
        assert_eq!(
            (
                last.delivered,
                last.failed,
                last.dead_lettered,
                last.enqueued
            ),
            (0, 1, 1, 1)
        );
        let previous = snap[HISTORY_MINUTES - 2];
        assert_eq!(previous.start, at("2026-11-29T12:00:00Z"));
        assert_eq!((previous.delivered, previous.failed), (2, 1));
        assert!(snap[..HISTORY_MINUTES - 2]
            .iter()
            .all(|b| b.delivered + b.failed + b.enqueued == 0));
        // Contiguous minutes, oldest first.
        assert!(snap
            .windows(2)
            .all(|w| w[1].start - w[0].start == chrono::Duration::seconds(60)));

        // 59 minutes on, the 12:00 minute is the oldest still shown.
        clock.advance(Duration::from_secs(58 * 60));
        let snap = history.snapshot();
        assert_eq!(snap[0].start, at("2026-11-29T12:00:00Z"));
        assert_eq!(snap[0].delivered, 2);
        // One more minute and it is gone; the 12:01 one is first.
        clock.advance(Duration::from_secs(60));
        let snap = history.snapshot();
        assert_eq!(snap[0].start, at("2026-11-29T12:01:00Z"));
        assert_eq!(snap.iter().map(|b| b.delivered).sum::<u64>(), 0);
        assert_eq!(snap[0].dead_lettered, 1);
    }

    #[test]
    fn memory_stays_at_one_hour() {
        let clock = ManualClock::new(at("2026-11-29T00:00:00Z"));
        let history = History::new(Arc::new(clock.clone()));
        for _ in 0..(3 * HISTORY_MINUTES) {
            history.record(Tally::Delivered);
            clock.advance(Duration::from_secs(60));
        }
        assert!(history.buckets().len() <= HISTORY_MINUTES);
        // The last hour holds one delivery per minute but the current one.
        let snap = history.snapshot();
        assert_eq!(snap.iter().map(|b| b.delivered).sum::<u64>(), 59);
        assert_eq!(snap[HISTORY_MINUTES - 1].delivered, 0);
    }

    #[test]
    fn a_clock_that_goes_back_never_reorders() {
        let clock = ManualClock::new(at("2026-11-29T12:05:00Z"));
        let history = History::new(Arc::new(clock.clone()));
        history.record(Tally::Delivered);
        clock.set(at("2026-11-29T12:03:00Z"));
        history.record(Tally::Delivered);
        clock.set(at("2026-11-29T12:05:30Z"));
        let snap = history.snapshot();
        assert_eq!(snap[HISTORY_MINUTES - 1].delivered, 2);
    }
}
