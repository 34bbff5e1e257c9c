//! Where an item is in its life ([`ItemState`], with the lease inside the
//! one state that has one) and every change of it, as methods on
//! [`QueueItem`] that every backend shares: each checks the state it starts
//! from and stamps `updated_at`.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::QueueItem;
use crate::error::{QueueError, QueueResult};

/// The tag of an [`ItemState`]: what filters, the API and the on-disk
/// forms name (`"pending"`, `"processing"`, `"failed"`).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum ItemStatus {
    /// Waiting for its `next_retry`, or due.
    Pending,
    /// Claimed by a worker under a lease; returns to pending if the lease expires.
    Processing,
    /// A dead letter: retries exhausted or refused for good by the upstream.
    Failed,
}

impl ItemStatus {
    /// The seed's string for the status.
    pub fn as_str(self) -> &'static str {
        match self {
            ItemStatus::Pending => "pending",
            ItemStatus::Processing => "processing",
            ItemStatus::Failed => "failed",
        }
    }

    /// All statuses, in life order.
    pub const ALL: [ItemStatus; 3] = [
        ItemStatus::Pending,
        ItemStatus::Processing,
        ItemStatus::Failed,
    ];
}

impl fmt::Display for ItemStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for ItemStatus {
    type Err = QueueError;
    fn from_str(s: &str) -> QueueResult<Self> {
        match s {
            "pending" => Ok(ItemStatus::Pending),
            "processing" => Ok(ItemStatus::Processing),
            "failed" => Ok(ItemStatus::Failed),
            other => Err(QueueError::invalid(format!(
                "unknown status {other:?} (expected pending, processing or failed)"
            ))),
        }
    }
}

/// Where an item is in its life, with what that state needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ItemState {
    /// Waiting for its `next_retry`, or due.
    Pending,
    /// Claimed for delivery; back to pending once `lease_until` has passed.
    Processing {
        /// When the claim runs out; from then on anyone may release it.
        lease_until: DateTime<Utc>,
        /// The instance that claimed it (see [`crate::store::owner`]);
        /// `None` for a claim written by the Go SDK, which records none.
        owner: Option<String>,
    },
    /// A dead letter: kept, never delivered, until revived or expired.
    Failed,
}

impl ItemState {
    /// The tag that filters, the API and the stored forms use.
    pub fn status(&self) -> ItemStatus {
        match self {
            ItemState::Pending => ItemStatus::Pending,
            ItemState::Processing { .. } => ItemStatus::Processing,
            ItemState::Failed => ItemStatus::Failed,
        }
    }

    /// The end of the claim, while processing.
    pub fn lease_until(&self) -> Option<DateTime<Utc>> {
        match self {
            ItemState::Processing { lease_until, .. } => Some(*lease_until),
            _ => None,
        }
    }

    /// The claiming instance, while processing and if recorded.
    pub fn lease_owner(&self) -> Option<&str> {
        match self {
            ItemState::Processing { owner, .. } => owner.as_deref(),
            _ => None,
        }
    }

    /// Rebuilds a state from its flat stored form (a status column or
    /// field beside an optional lease). A lease beside any status but
    /// `processing` means nothing and is dropped. A `processing` record
    /// without one (the Go SDK writes none) is a claim nobody can renew:
    /// its lease is taken to have ended at `updated_at`, so the next
    /// release of expired leases returns it to pending.
    pub fn from_stored(
        status: ItemStatus,
        lease_until: Option<DateTime<Utc>>,
        owner: Option<String>,
        updated_at: DateTime<Utc>,
    ) -> Self {
        match status {
            ItemStatus::Pending => ItemState::Pending,
            ItemStatus::Processing => ItemState::Processing {
                lease_until: lease_until.unwrap_or(updated_at),
                owner,
            },
            ItemStatus::Failed => ItemState::Failed,
        }
    }
}

impl QueueItem {
    /// The state's tag.
    pub fn status(&self) -> ItemStatus {
        self.state.status()
    }

    /// Where the item is in its life.
    pub fn state(&self) -> &ItemState {
        &self.state
    }

    /// The end of the claim, while processing.
    pub fn lease_until(&self) -> Option<DateTime<Utc>> {
        self.state.lease_until()
    }

    /// The instance holding the claim, while processing and if recorded.
    pub fn lease_owner(&self) -> Option<&str> {
        self.state.lease_owner()
    }

    /// True when the item is processing and its lease has ended at `now`.
    pub fn lease_expired(&self, now: DateTime<Utc>) -> bool {
        self.lease_until().is_some_and(|until| until <= now)
    }

    fn wrong_state(&self, rule: &'static str) -> QueueError {
        QueueError::WrongState {
            id: self.id.to_string(),
            status: self.status().as_str(),
            rule,
        }
    }

    /// Claims a pending item for instance `owner` until `lease_until`
    /// (`RetryQueue::claim`, and new items stored already claimed).
    pub fn claim(
        &mut self,
        lease_until: DateTime<Utc>,
        owner: &str,
        now: DateTime<Utc>,
    ) -> QueueResult<()> {
        if self.state != ItemState::Pending {
            return Err(self.wrong_state("only a pending item can be claimed"));
        }
        self.state = ItemState::Processing {
            lease_until,
            owner: Some(owner.to_owned()),
        };
        self.updated_at = now;
        Ok(())
    }

    /// Returns a processing item to pending without counting an attempt;
    /// `next_retry` is unchanged (`RetryQueue::release`, a graceful stop, an
    /// expired or orphaned lease).
    pub fn release(&mut self, now: DateTime<Utc>) -> QueueResult<()> {
        if self.status() != ItemStatus::Processing {
            return Err(self.wrong_state("only a processing item can be released"));
        }
        self.state = ItemState::Pending;
        self.updated_at = now;
        Ok(())
    }

    /// Records a failed attempt and schedules the next one
    /// (`RetryQueue::requeue`). Every state is a valid start: a delivery
    /// that outlived its lease still reports its attempt, and an operator
    /// may schedule a dead letter again.
    pub fn requeue(&mut self, error: &str, next_retry: DateTime<Utc>, now: DateTime<Utc>) {
        self.record_attempt(error, now);
        self.next_retry = next_retry;
        self.state = ItemState::Pending;
    }

    /// Records a final failed attempt and makes the item a dead letter
    /// (`RetryQueue::mark_failed`). Every state is a valid start: the
    /// poison check and an operator condemn pending items too.
    pub fn dead_letter(&mut self, reason: &str, now: DateTime<Utc>) {
        self.record_attempt(reason, now);
        self.state = ItemState::Failed;
    }

    fn record_attempt(&mut self, error: &str, now: DateTime<Utc>) {
        self.attempts = self.attempts.saturating_add(1);
        self.last_error = error.to_owned();
        self.last_attempt = Some(now);
        self.updated_at = now;
    }

    /// Brings a dead letter back, due at `now` with its attempts reset and
    /// its last error kept (`RetryQueue::revive`).
    pub fn revive(&mut self, now: DateTime<Utc>) -> QueueResult<()> {
        if self.state != ItemState::Failed {
            return Err(self.wrong_state("only a failed item (a dead letter) can be revived"));
        }
        self.state = ItemState::Pending;
        self.attempts = 0;
        self.next_retry = now;
        self.updated_at = now;
        Ok(())
    }

    /// Forgets a claim without it counting as a change: an item imported
    /// from another store keeps its times, but nobody holds its claim here.
    pub(crate) fn drop_claim(&mut self) {
        if self.status() == ItemStatus::Processing {
            self.state = ItemState::Pending;
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::Duration;

    use super::*;
    use crate::item::{ItemId, NewItem};

    fn t(secs: i64) -> DateTime<Utc> {
        DateTime::<Utc>::UNIX_EPOCH + Duration::seconds(1_800_000_000 + secs)
    }

    fn pending() -> QueueItem {
        NewItem::from_json(b"{}")
            .unwrap()
            .with_id(ItemId::parse("it-1").unwrap())
            .into_item(t(0), 5)
            .unwrap()
    }

    fn wrong_state(err: QueueError) -> (String, &'static str) {
        match err {
            QueueError::WrongState { id, status, .. } => (id, status),
            other => panic!("expected a wrong-state error, got {other:?}"),
        }
    }

    #[test]
    fn claim_then_release_is_a_round_trip_without_an_attempt() {
        let mut item = pending();
        item.claim(t(60), "me", t(1)).unwrap();
        assert_eq!(
            item.state(),
            &ItemState::Processing {
                lease_until: t(60),
                owner: Some("me".into())
            }
        );
        assert_eq!(
            (item.lease_until(), item.lease_owner()),
            (Some(t(60)), Some("me"))
        );
        assert_eq!(item.updated_at, t(1));
        assert!(!item.lease_expired(t(59)));
        assert!(item.lease_expired(t(60)));
        item.release(t(2)).unwrap();
        assert_eq!(item.state(), &ItemState::Pending);
        assert_eq!(
            (item.attempts, item.next_retry, item.updated_at),
            (0, t(0), t(2))
        );
        assert_eq!(item.lease_until(), None);
    }

    #[test]
    fn each_change_refuses_a_state_it_cannot_start_from_and_names_it() {
        let mut item = pending();
        let err = item.release(t(1)).unwrap_err();
        assert_eq!(err.kind(), "wrong_state");
        assert!(err.to_string().contains("it-1 is pending"), "{err}");
        assert_eq!(
            wrong_state(item.revive(t(1)).unwrap_err()),
            ("it-1".into(), "pending")
        );
        item.claim(t(60), "me", t(1)).unwrap();
        let err = item.claim(t(90), "other", t(2)).unwrap_err();
        assert_eq!(wrong_state(err), ("it-1".into(), "processing"));
        assert_eq!(
            item.lease_owner(),
            Some("me"),
            "a refused claim changes nothing"
        );
        item.dead_letter("400", t(3));
        assert_eq!(
            wrong_state(item.claim(t(90), "me", t(4)).unwrap_err()).1,
            "failed"
        );
        assert_eq!(wrong_state(item.release(t(4)).unwrap_err()).1, "failed");
        assert_eq!(item.updated_at, t(3), "refusals stamp nothing");
    }

    #[test]
    fn requeue_and_dead_letter_count_an_attempt_and_drop_the_claim() {
        let mut item = pending();
        item.claim(t(60), "me", t(1)).unwrap();
        item.requeue("503", t(100), t(5));
        assert_eq!(item.state(), &ItemState::Pending);
        assert_eq!((item.attempts, item.last_error.as_str()), (1, "503"));
        assert_eq!(
            (item.last_attempt, item.next_retry, item.updated_at),
            (Some(t(5)), t(100), t(5))
        );
        item.claim(t(160), "me", t(101)).unwrap();
        item.dead_letter("422", t(102));
        assert_eq!(item.state(), &ItemState::Failed);
        assert_eq!((item.attempts, item.updated_at), (2, t(102)));
        item.attempts = u32::MAX;
        item.requeue("again", t(200), t(103));
        assert_eq!(item.attempts, u32::MAX, "attempts saturate");
    }

    #[test]
    fn revive_resets_attempts_keeps_the_error_and_is_due_at_once() {
        let mut item = pending();
        item.dead_letter("410 gone", t(5));
        item.revive(t(9)).unwrap();
        assert_eq!(item.state(), &ItemState::Pending);
        assert_eq!(
            (item.attempts, item.next_retry, item.updated_at),
            (0, t(9), t(9))
        );
        assert_eq!(item.last_error, "410 gone");
    }

    #[test]
    fn stored_forms_map_onto_states() {
        let go_claim = ItemState::from_stored(ItemStatus::Processing, None, None, t(7));
        assert_eq!(
            go_claim,
            ItemState::Processing {
                lease_until: t(7),
                owner: None
            }
        );
        let stray = ItemState::from_stored(ItemStatus::Pending, Some(t(9)), Some("x".into()), t(7));
        assert_eq!(stray, ItemState::Pending);
        assert_eq!(
            ItemState::from_stored(ItemStatus::Failed, Some(t(9)), None, t(7)).status(),
            ItemStatus::Failed
        );
    }
}
