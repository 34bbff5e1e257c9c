//! The poison-item guard: an item whose push crashes the daemon (an
//! in-process plugin that segfaults on it) must not kill the daemon at every
//! restart, and the items that were merely in flight with it must not be
//! charged for it.
//!
//! It costs nothing per push: claims already record their owner instance,
//! so at start, before the earlier instances' leases are released, the
//! daemon lists what they had in flight ([`stale_in_flight`]). Then, before
//! the worker starts, [`recover`]:
//! - charges a crash to the item that was *alone* in flight when the daemon
//!   died: the only item in flight, or the one a previous recovery was
//!   pushing alone (the marker file says which);
//! - dead-letters an item charged [`CRASH_LIMIT`] crashes, with a
//!   `last_error` saying it crashed the transport;
//! - pushes every other item that was in flight, one at a time (a batch of
//!   one), writing the marker before each, so that a crash now names its
//!   culprit. Their outcomes are applied as the worker would; an innocent
//!   item delivered here loses no attempt to the crash.
//!
//! The pass stops at the first outcome that says the upstream is
//! unavailable (retryable, unauthorized): the items not yet pushed alone go
//! back to normal delivery, uncharged.
//!
//! The marker (`<owner lock>.poison.json`) is written only during this
//! start-up pass; a clean start with nothing stale writes nothing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use retryq_plugin::Pusher;
use serde::{Deserialize, Serialize};

use crate::actors::pusher::push_guarded;
use crate::delivery::decide;
use crate::error::QueueResult;
use crate::item::{ItemId, ItemStatus};
use crate::store::{ListFilter, RetryQueue, WriteOp};
use crate::worker::{EventKind, RetryWorkerConfig};

/// Crashes charged to one item before it is dead-lettered.
pub const CRASH_LIMIT: u32 = 2;

/// Why the guard could not run.
#[derive(Debug, thiserror::Error)]
pub enum PoisonError {
    /// The store refused a read or write.
    #[error("poison-item guard: {0}")]
    Store(#[from] crate::error::QueueError),
    /// The marker file could not be written.
    #[error("poison-item guard: marker {path}: {source}")]
    Marker {
        /// The marker file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// What the start-up pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Items an earlier instance had in flight.
    pub stale: usize,
    /// Items charged a crash this time.
    pub charged: Vec<ItemId>,
    /// Items dead-lettered as poison.
    pub dead_lettered: Vec<ItemId>,
    /// Items pushed alone, and the outcome's kind.
    pub replayed: Vec<(ItemId, &'static str)>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Marker {
    /// The item being pushed alone right now, if any.
    solo: Option<ItemId>,
    /// Crashes charged so far, by item.
    crashes: BTreeMap<ItemId, u32>,
}

/// The marker file for a store whose owner lock is `owner_lock`.
pub fn marker_path(owner_lock: &Path) -> PathBuf {
    let mut name = owner_lock
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_else(|| "retryq".into());
    name.push(".poison.json");
    owner_lock.with_file_name(name)
}

/// IDs of the items other instances than `me` hold claimed: what was in
/// flight when they died. Call before releasing their leases.
pub fn stale_in_flight(queue: &dyn RetryQueue, me: &str) -> QueueResult<Vec<ItemId>> {
    let filter = ListFilter {
        status: Some(ItemStatus::Processing),
        ..ListFilter::default()
    };
    Ok(queue
        .list(&filter)?
        .into_iter()
        .filter(|i| i.lease_owner() != Some(me))
        .map(|i| i.id)
        .collect())
}

fn load(path: &Path) -> Marker {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

fn save(path: &Path, marker: &Marker) -> Result<(), PoisonError> {
    let err = |source| PoisonError::Marker {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("json.tmp");
    let bytes = serde_json::to_vec(marker).unwrap_or_default();
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp).map_err(err)?;
        f.write_all(&bytes).map_err(err)?;
        // The marker must survive the very crash it is there to explain.
        f.sync_all().map_err(err)?;
    }
    std::fs::rename(&tmp, path).map_err(err)
}

/// The start-up pass (see the module doc). `stale` is what
/// [`stale_in_flight`] returned before the leases were released.
pub fn recover(
    queue: &dyn RetryQueue,
    pusher: &Arc<dyn Pusher>,
    config: &RetryWorkerConfig,
    marker_file: &Path,
    stale: Vec<ItemId>,
) -> Result<Recovery, PoisonError> {
    let mut marker = load(marker_file);
    let mut report = Recovery {
        stale: stale.len(),
        ..Recovery::default()
    };
    if stale.is_empty() && marker.solo.is_none() {
        if !marker.crashes.is_empty() {
            // Nothing died since: the earlier suspicions are settled.
            let _ = std::fs::remove_file(marker_file);
        }
        return Ok(report);
    }
    // Who was alone in flight when the process died?
    let alone = match (&marker.solo, stale.as_slice()) {
        (Some(solo), _) => Some(solo.clone()),
        (None, [only]) => Some(only.clone()),
        _ => None,
    };
    let mut suspects: Vec<ItemId> = stale;
    if let Some(id) = &alone {
        *marker.crashes.entry(id.clone()).or_default() += 1;
        report.charged.push(id.clone());
        if !suspects.contains(id) {
            suspects.push(id.clone());
        }
    }
    marker.solo = None;
    for id in suspects {
        let item = match queue.get(&id) {
            Ok(item) => item,
            // Gone (purged, expired) meanwhile: nothing to judge.
            Err(_) => continue,
        };
        if item.status() == ItemStatus::Failed {
            continue;
        }
        let crashes = marker.crashes.get(&id).copied().unwrap_or(0);
        if crashes >= CRASH_LIMIT {
            let reason = format!(
                "crashed the transport: the daemon died {crashes} times with this item alone in flight; dead-lettered as a poison item"
            );
            tracing::error!(item_id = %id, crashes, "{reason}");
            queue.mark_failed(&id, &reason)?;
            marker.crashes.remove(&id);
            report.dead_lettered.push(id);
            continue;
        }
        // Alone, with the marker naming it: a crash now names this item.
        marker.solo = Some(id.clone());
        save(marker_file, &marker)?;
        tracing::warn!(item_id = %id, crashes, "in flight when an earlier daemon died; pushing it alone");
        let pushed = push_guarded(pusher.as_ref(), item, config.push_timeout);
        let (op, result) = decide(config, &pushed.item, &pushed.outcome, config.clock.now());
        apply_one(queue, op)?;
        report.replayed.push((id.clone(), result.kind.as_str()));
        marker.solo = None;
        match result.kind {
            EventKind::Delivered | EventKind::Skipped => {
                marker.crashes.remove(&id);
            }
            EventKind::DeadLettered | EventKind::Exhausted => {}
            // The upstream is unavailable: pushing the rest alone now would
            // only hold the start back by a timeout each. They go back to
            // normal delivery, uncharged.
            _ => {
                tracing::warn!(item_id = %id, outcome = result.kind.as_str(), "the upstream is unavailable; the other items in flight at the crash are delivered normally");
                break;
            }
        }
    }
    // Keep only the counts of items still queued: a poison item that went
    // pending again is charged once more if it crashes the next daemon.
    marker.crashes.retain(|id, _| queue.get(id).is_ok());
    if marker.crashes.is_empty() {
        let _ = std::fs::remove_file(marker_file);
    } else {
        save(marker_file, &marker)?;
    }
    if !report.charged.is_empty() || !report.dead_lettered.is_empty() {
        tracing::warn!(
            stale = report.stale,
            charged = ?report.charged,
            dead_lettered = ?report.dead_lettered,
            "poison-item guard: an earlier daemon died with items in flight"
        );
    }
    Ok(report)
}

fn apply_one(queue: &dyn RetryQueue, op: WriteOp) -> QueueResult<()> {
    for r in queue.apply_batch(vec![op])? {
        r?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use retryq_plugin::{CallContext, ItemMeta, PushOutcome};

    use super::*;
    use crate::store::{MemoryRetryQueue, StoreOptions};
    use crate::NewItem;

    /// Delivers everything, remembering the order of the pushes.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<String>>);

    impl Pusher for Recorder {
        fn push(&self, item: &ItemMeta, _: &[u8], _: &CallContext) -> PushOutcome {
            self.0.lock().unwrap().push(item.id.clone());
            PushOutcome::Delivered
        }
    }

    /// A store where a dead instance "old" left `n` items claimed.
    fn died_with(n: usize) -> (Arc<dyn RetryQueue>, Vec<ItemId>) {
        let queue: Arc<dyn RetryQueue> = Arc::new(MemoryRetryQueue::new(StoreOptions {
            instance_id: "old".into(),
            ..StoreOptions::default()
        }));
        for i in 0..n {
            queue
                .enqueue(NewItem::from_json(format!("{{\"n\":{i}}}").as_bytes()).unwrap())
                .unwrap();
        }
        queue.claim(n, Duration::from_secs(60)).unwrap();
        let stale = stale_in_flight(queue.as_ref(), "new").unwrap();
        assert_eq!(stale.len(), n);
        queue.release_leases_except("new").unwrap();
        (queue, stale)
    }

    #[test]
    fn innocents_in_flight_together_are_pushed_alone_and_charged_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("lock.poison.json");
        let (queue, stale) = died_with(3);
        let rec = Arc::new(Recorder::default());
        let pusher: Arc<dyn Pusher> = rec.clone();
        let report = recover(
            queue.as_ref(),
            &pusher,
            &RetryWorkerConfig::default(),
            &marker,
            stale.clone(),
        )
        .unwrap();
        assert!(report.charged.is_empty(), "{report:?}");
        assert_eq!(*rec.0.lock().unwrap(), stale);
        assert_eq!(queue.size().unwrap(), 0);
        assert!(!marker.exists(), "nothing left to remember");
    }

    #[test]
    fn the_item_alone_in_flight_is_charged_and_dead_lettered_at_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("lock.poison.json");
        let (queue, stale) = died_with(1);
        let id = stale[0].clone();
        // A previous start already charged it once and died pushing it alone.
        save(
            &marker,
            &Marker {
                solo: Some(id.clone()),
                crashes: BTreeMap::from([(id.clone(), 1)]),
            },
        )
        .unwrap();
        let pusher: Arc<dyn Pusher> = Arc::new(Recorder::default());
        let report = recover(
            queue.as_ref(),
            &pusher,
            &RetryWorkerConfig::default(),
            &marker,
            stale,
        )
        .unwrap();
        assert_eq!(report.dead_lettered, vec![id.clone()]);
        let item = queue.get(&id).unwrap();
        assert_eq!(item.status(), ItemStatus::Failed);
        assert!(
            item.last_error.contains("crashed the transport"),
            "{item:?}"
        );
    }

    #[test]
    fn a_clean_start_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("lock.poison.json");
        let (queue, _) = died_with(0);
        let pusher: Arc<dyn Pusher> = Arc::new(Recorder::default());
        let report = recover(
            queue.as_ref(),
            &pusher,
            &RetryWorkerConfig::default(),
            &marker,
            Vec::new(),
        )
        .unwrap();
        assert_eq!(report, Recovery::default());
        assert!(!marker.exists());
    }
}
