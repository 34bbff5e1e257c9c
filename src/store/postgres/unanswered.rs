//! Leases whose commit went unanswered: a claim, or an enqueue stored
//! claimed, whose `COMMIT` was sent but whose answer never came back (the
//! connection broke: a server restart, a failover, a network cut).
//!
//! # Why
//! The caller was told the write failed, so it pushes nothing; but the
//! server may have committed it, and then the items sit `processing`
//! under this live instance's lease. No orphan release takes them (the
//! instance holds its lock) and nothing else looks at them until the lease
//! runs out, minutes later. A fault the daemon recovers from by itself
//! must not cost that.
//!
//! # How
//! A claiming write that fails at its commit leaves here what it would have
//! leased: each item's ID and the exact `lease_until` it wrote. Before the
//! next transaction of this handle, of any kind, a short transaction of its
//! own returns to pending every one of those rows still `processing` under
//! this instance with that very `lease_until`. If the commit in fact failed, no row matches: a new
//! item's row does not exist, and a claimed item was left pending or has
//! been claimed since under another lease. If it committed, exactly its
//! rows match, and they are released with no attempt counted. An entry is
//! forgotten once a release of it committed; until then each transaction
//! tries again first, which is harmless as the release is idempotent.

use std::sync::Mutex;

use chrono::{DateTime, Utc};
use postgres::Transaction;

use super::{Conn, PostgresRetryQueue};
use crate::item::QueueItem;
use crate::store::WriteOutcome;

/// One lease a write took, as it wrote it.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct TakenLease {
    id: String,
    lease_until: DateTime<Utc>,
}

/// What a write's result says it leased, for [`UnansweredLeases`].
pub(super) trait TakesLeases {
    fn taken_leases(&self) -> Vec<TakenLease>;
}

#[cfg(test)]
impl TakenLease {
    pub(super) fn new(id: String, lease_until: DateTime<Utc>) -> Self {
        TakenLease { id, lease_until }
    }
}

fn lease_of(item: &QueueItem) -> Option<TakenLease> {
    item.lease_until().map(|lease_until| TakenLease {
        id: item.id.to_string(),
        lease_until,
    })
}

impl TakesLeases for Vec<QueueItem> {
    fn taken_leases(&self) -> Vec<TakenLease> {
        self.iter().filter_map(lease_of).collect()
    }
}

impl TakesLeases for Vec<crate::error::QueueResult<QueueItem>> {
    fn taken_leases(&self) -> Vec<TakenLease> {
        self.iter().flatten().filter_map(lease_of).collect()
    }
}

impl TakesLeases for Vec<crate::error::QueueResult<WriteOutcome>> {
    fn taken_leases(&self) -> Vec<TakenLease> {
        self.iter()
            .filter_map(|outcome| match outcome {
                Ok(WriteOutcome::Claimed(item)) => lease_of(item),
                _ => None,
            })
            .collect()
    }
}

/// The leases of claiming writes whose commit went unanswered, until a
/// committed transaction released them.
#[derive(Debug, Default)]
pub(super) struct UnansweredLeases {
    leases: Mutex<Vec<TakenLease>>,
    /// Makes the next commit lose its answer after it committed.
    #[cfg(test)]
    pub(super) lose_next_answer: std::sync::atomic::AtomicBool,
}

impl UnansweredLeases {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<TakenLease>> {
        // A panic elsewhere cannot leave the list half-written: entries
        // are pushed and removed whole.
        self.leases
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Keeps `leases`, taken by a write whose commit went unanswered.
    pub(super) fn remember(&self, leases: Vec<TakenLease>) {
        if !leases.is_empty() {
            tracing::warn!(
                count = leases.len(),
                "a claiming commit went unanswered; its leases are released by the next transaction if it committed"
            );
            self.lock().extend(leases);
        }
    }

    /// The leases to release now; empty (and cheap) almost always.
    pub(super) fn pending(&self) -> Vec<TakenLease> {
        let leases = self.lock();
        if leases.is_empty() {
            Vec::new()
        } else {
            leases.clone()
        }
    }

    /// Forgets `released`, which a committed transaction released.
    pub(super) fn forget(&self, released: &[TakenLease]) {
        if !released.is_empty() {
            self.lock().retain(|lease| !released.contains(lease));
        }
    }
}

impl PostgresRetryQueue {
    /// Releases the unanswered leases, if any, in a transaction of their
    /// own on `conn`, before the transaction the caller came for: that one
    /// may take the admission lock, which must come before any row lock.
    pub(super) fn settle_unanswered(&self, conn: &mut Conn) -> Result<(), postgres::Error> {
        let leases = self.unanswered.pending();
        if leases.is_empty() {
            return Ok(());
        }
        let mut tx = conn.transaction()?;
        self.release_unanswered(&mut tx, &leases)?;
        tx.commit()?;
        self.unanswered.forget(&leases);
        Ok(())
    }

    /// Returns to pending, inside `tx`, the rows of `leases` still leased
    /// exactly as the unanswered write leased them, to this instance.
    fn release_unanswered(
        &self,
        tx: &mut Transaction<'_>,
        leases: &[TakenLease],
    ) -> Result<u64, postgres::Error> {
        let ids: Vec<&str> = leases.iter().map(|l| l.id.as_str()).collect();
        let until: Vec<DateTime<Utc>> = leases.iter().map(|l| l.lease_until).collect();
        let released = tx.execute(
            &format!(
                "UPDATE {items} AS i SET status = 'pending', lease_until = NULL, \
                 lease_owner = NULL, updated_at = $4 \
                 FROM unnest($1::text[], $2::timestamptz[]) AS u(id, until) \
                 WHERE i.id = u.id AND i.status = 'processing' \
                   AND i.lease_owner = $3 AND i.lease_until = u.until",
                items = self.names.items
            ),
            &[&ids, &until, &self.options.instance_id, &self.now()],
        )?;
        if released > 0 {
            tracing::info!(
                released,
                "released items whose claim committed but went unanswered"
            );
            self.notify(tx, "release")?;
        }
        Ok(released)
    }
}
