//! Shared fixtures for the admin API tests: a small in-memory store and a
//! fake worker that really delivers (deletes) ready items.
#![allow(dead_code)]

use retryq::item::ItemId;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use retryq::admin::{
    AdminConfig, AdminState, AdminToken, ControlError, ControlFuture, WorkerControl,
};
use retryq::clock::{ManualClock, SharedClock};
use retryq::item::ItemStatus;
use retryq::metrics::Metrics;
use retryq::store::{
    filter_matches, sort_and_page, CleanupReport, ListFilter, QueueStats, RetryQueue,
    SqliteRetryQueue, StoreOptions,
};
use retryq::{NewItem, QueueError, QueueItem};

pub type QResult<T> = Result<T, QueueError>;

/// A test token (long enough to be accepted).
pub const TOKEN: &str = "test-token-0123456789abcdef";

/// An in-memory `RetryQueue` with item and byte limits and deduplication.
#[derive(Debug)]
pub struct TestQueue {
    items: Mutex<BTreeMap<String, QueueItem>>,
    closed: AtomicBool,
    max_items: usize,
    max_bytes: u64,
    clock: SharedClock,
}

impl TestQueue {
    pub fn new(max_items: usize, max_bytes: u64, clock: SharedClock) -> Self {
        TestQueue {
            items: Mutex::new(BTreeMap::new()),
            closed: AtomicBool::new(false),
            max_items,
            max_bytes,
            clock,
        }
    }

    fn open(&self) -> QResult<std::sync::MutexGuard<'_, BTreeMap<String, QueueItem>>> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(QueueError::QueueClosed);
        }
        Ok(self.items.lock().unwrap())
    }

    fn modify(
        &self,
        id: &str,
        change: impl FnOnce(&mut QueueItem, DateTime<Utc>) -> QResult<()>,
    ) -> QResult<QueueItem> {
        let now = self.clock.now();
        let mut items = self.open()?;
        let item = items.get_mut(id).ok_or_else(|| QueueError::not_found(id))?;
        change(item, now)?;
        Ok(item.clone())
    }
}

impl RetryQueue for TestQueue {
    fn enqueue(&self, new: NewItem) -> QResult<ItemId> {
        let now = self.clock.now();
        let item = new.into_item(now, 10)?;
        let mut items = self.open()?;
        if items.contains_key(item.id.as_str()) {
            return Err(QueueError::DuplicateItem {
                existing_id: item.id.to_string(),
            });
        }
        if let Some(existing) = items
            .values()
            .find(|i| i.fingerprint == item.fingerprint && i.status() != ItemStatus::Failed)
        {
            return Err(QueueError::DuplicateItem {
                existing_id: existing.id.clone().to_string(),
            });
        }
        if item.size_bytes() > self.max_bytes {
            return Err(QueueError::TooLarge {
                size: item.size_bytes(),
                limit: self.max_bytes,
            });
        }
        let bytes: u64 = items.values().map(QueueItem::size_bytes).sum();
        if items.len() >= self.max_items || bytes + item.size_bytes() > self.max_bytes {
            return Err(QueueError::QueueFull {
                reason: format!("{} items, limit {}", items.len(), self.max_items),
            });
        }
        let id = item.id.clone();
        items.insert(id.clone().to_string(), item);
        Ok(id)
    }

    fn enqueue_batch(&self, items: Vec<NewItem>) -> QResult<Vec<QResult<ItemId>>> {
        Ok(items.into_iter().map(|i| self.enqueue(i)).collect())
    }

    fn enqueue_claimed(
        &self,
        items: Vec<NewItem>,
        lease: Duration,
    ) -> QResult<Vec<QResult<QueueItem>>> {
        let until = self.clock.now() + chrono::Duration::from_std(lease).unwrap();
        Ok(items
            .into_iter()
            .map(|new| {
                let id = self.enqueue(new)?;
                self.modify(&id, |item, now| item.claim(until, "api-test", now))
            })
            .collect())
    }

    fn dequeue(&self) -> QResult<Option<QueueItem>> {
        Ok(self.claim(1, Duration::from_secs(60))?.pop())
    }

    fn peek(&self) -> QResult<Option<QueueItem>> {
        let now = self.clock.now();
        let items = self.open()?;
        Ok(items
            .values()
            .filter(|i| i.is_ready_for_retry(now))
            .min_by_key(|i| (i.next_retry, i.created_at, i.id.clone()))
            .cloned())
    }

    fn get(&self, id: &ItemId) -> QResult<QueueItem> {
        self.open()?
            .get(id.as_str())
            .cloned()
            .ok_or_else(|| QueueError::not_found(id))
    }

    fn update(&self, item: &QueueItem) -> QResult<()> {
        let replacement = item.clone();
        self.modify(&item.id, move |stored, now| {
            let created_at = stored.created_at;
            *stored = replacement;
            stored.created_at = created_at;
            stored.updated_at = now;
            Ok(())
        })
        .map(|_| ())
    }

    fn delete(&self, id: &ItemId) -> QResult<()> {
        self.open()?
            .remove(id.as_str())
            .map(|_| ())
            .ok_or_else(|| QueueError::not_found(id))
    }

    fn mark_failed(&self, id: &ItemId, reason: &str) -> QResult<QueueItem> {
        self.modify(id, |i, now| {
            i.dead_letter(reason, now);
            Ok(())
        })
    }

    fn requeue(&self, id: &ItemId, error: &str, next_retry: DateTime<Utc>) -> QResult<QueueItem> {
        self.modify(id, |i, now| {
            i.requeue(error, next_retry, now);
            Ok(())
        })
    }

    fn revive(&self, id: &ItemId) -> QResult<QueueItem> {
        self.modify(id, |i, now| i.revive(now))
    }

    fn release(&self, id: &ItemId) -> QResult<()> {
        // Releasing an item nobody holds is a no-op, as the contract says.
        self.modify(id, |i, now| match i.status() {
            ItemStatus::Processing => i.release(now),
            _ => Ok(()),
        })
        .map(|_| ())
    }

    fn claim(&self, limit: usize, lease: Duration) -> QResult<Vec<QueueItem>> {
        let now = self.clock.now();
        let mut items = self.open()?;
        let mut ready: Vec<QueueItem> = items
            .values()
            .filter(|i| i.is_ready_for_retry(now))
            .cloned()
            .collect();
        ready.sort_by_key(|i| (i.next_retry, i.created_at, i.id.clone()));
        ready.truncate(limit);
        let until = now + chrono::Duration::from_std(lease).unwrap();
        for item in &mut ready {
            item.claim(until, "api-test", now)?;
            items.insert(item.id.clone().to_string(), item.clone());
        }
        Ok(ready)
    }

    fn release_expired_leases(&self) -> QResult<usize> {
        let now = self.clock.now();
        let mut items = self.open()?;
        let mut released = 0;
        for item in items.values_mut() {
            if item.lease_expired(now) {
                item.release(now)?;
                released += 1;
            }
        }
        Ok(released)
    }

    fn next_due(&self) -> QResult<Option<DateTime<Utc>>> {
        let items = self.open()?;
        Ok(items
            .values()
            .filter_map(|i| match i.status() {
                ItemStatus::Pending => Some(i.next_retry),
                ItemStatus::Processing => i.lease_until(),
                ItemStatus::Failed => None,
            })
            .min())
    }

    fn size(&self) -> QResult<usize> {
        Ok(self.open()?.len())
    }

    fn stats(&self) -> QResult<QueueStats> {
        let items = self.open()?;
        let count = |s: ItemStatus| items.values().filter(|i| i.status() == s).count();
        Ok(QueueStats {
            total_items: items.len(),
            pending_items: count(ItemStatus::Pending),
            processing_items: count(ItemStatus::Processing),
            failed_items: count(ItemStatus::Failed),
            oldest_item: items.values().map(|i| i.created_at).min(),
            newest_item: items.values().map(|i| i.created_at).max(),
            total_retries: items.values().map(|i| u64::from(i.attempts)).sum(),
            last_retry: items.values().filter_map(|i| i.last_attempt).max(),
            total_bytes: items.values().map(QueueItem::size_bytes).sum(),
            ..QueueStats::default()
        })
    }

    fn cleanup(&self, ttl: Duration) -> QResult<CleanupReport> {
        let now = self.clock.now();
        let mut items = self.open()?;
        let before = items.len();
        items.retain(|_, i| !i.is_expired(ttl, now));
        Ok(CleanupReport {
            expired: before - items.len(),
            ..CleanupReport::default()
        })
    }

    fn enforce_limits(&self) -> QResult<usize> {
        Ok(0)
    }

    fn list(&self, filter: &ListFilter) -> QResult<Vec<QueueItem>> {
        let now = self.clock.now();
        let mut items: Vec<QueueItem> = self
            .open()?
            .values()
            .filter(|i| filter_matches(i, filter, now))
            .cloned()
            .collect();
        sort_and_page(&mut items, filter);
        Ok(items)
    }

    fn close(&self) -> QResult<()> {
        self.closed.store(true, Ordering::SeqCst);
        Ok(())
    }
}

/// A worker that delivers by deleting every ready item on `process_now`.
pub struct FakeWorker {
    pub queue: Arc<dyn RetryQueue>,
    pub running: AtomicBool,
    pub nudges: AtomicUsize,
    pub default_ttl: Duration,
    pub cleanup_ttls: Mutex<Vec<Duration>>,
    /// The reason of the pause in force, if any.
    pub pause_reason: Mutex<Option<String>>,
}

impl FakeWorker {
    pub fn new(queue: Arc<dyn RetryQueue>) -> Self {
        FakeWorker {
            queue,
            running: AtomicBool::new(true),
            nudges: AtomicUsize::new(0),
            default_ttl: Duration::from_secs(7 * 24 * 3600),
            cleanup_ttls: Mutex::new(Vec::new()),
            pause_reason: Mutex::new(None),
        }
    }
}

impl WorkerControl for FakeWorker {
    fn process_now(&self) -> ControlFuture<'_, serde_json::Value> {
        Box::pin(async move {
            if !self.running.load(Ordering::SeqCst) {
                return Err(ControlError::NotRunning);
            }
            let claimed = self.queue.claim(usize::MAX, Duration::from_secs(60))?;
            for item in &claimed {
                self.queue.delete(&item.id)?;
            }
            Ok(serde_json::json!({ "processed": claimed.len(), "delivered": claimed.len() }))
        })
    }

    fn stats(&self) -> ControlFuture<'_, serde_json::Value> {
        Box::pin(async move {
            if !self.running.load(Ordering::SeqCst) {
                return Err(ControlError::NotRunning);
            }
            Ok(serde_json::json!({ "nudges": self.nudges.load(Ordering::SeqCst) }))
        })
    }

    fn trigger_cleanup(&self, ttl: Option<Duration>) -> ControlFuture<'_, CleanupReport> {
        Box::pin(async move {
            if !self.running.load(Ordering::SeqCst) {
                return Err(ControlError::NotRunning);
            }
            let ttl = ttl.unwrap_or(self.default_ttl);
            self.cleanup_ttls.lock().unwrap().push(ttl);
            Ok(self.queue.cleanup(ttl)?)
        })
    }

    fn notify_enqueued(&self) {
        self.nudges.fetch_add(1, Ordering::SeqCst);
    }

    fn pause(&self, reason: String) -> ControlFuture<'_, serde_json::Value> {
        Box::pin(async move {
            if !self.running.load(Ordering::SeqCst) {
                return Err(ControlError::NotRunning);
            }
            *self.pause_reason.lock().unwrap() = Some(reason.clone());
            Ok(serde_json::json!({ "paused": true, "pause_reason": reason }))
        })
    }

    fn resume(&self) -> ControlFuture<'_, serde_json::Value> {
        Box::pin(async move {
            if !self.running.load(Ordering::SeqCst) {
                return Err(ControlError::NotRunning);
            }
            *self.pause_reason.lock().unwrap() = None;
            Ok(serde_json::json!({ "paused": false, "pause_reason": null }))
        })
    }

    fn is_running(&self) -> bool {
        self.running.load(Ordering::SeqCst)
    }
}

/// Everything a test needs: the store, the fake worker, the metrics, the
/// clock and the API state over them.
pub struct Fixture {
    pub queue: Arc<dyn RetryQueue>,
    pub worker: Arc<FakeWorker>,
    pub metrics: Arc<Metrics>,
    pub clock: ManualClock,
    pub state: AdminState,
}

impl Fixture {
    /// Over the in-memory [`TestQueue`].
    pub fn new(max_items: usize, max_bytes: u64) -> Self {
        let clock = start_clock();
        let shared: SharedClock = Arc::new(clock.clone());
        let queue = Arc::new(TestQueue::new(max_items, max_bytes, shared.clone()));
        Self::over(queue, clock)
    }

    /// Over a SQLite store in `dir` with these limits and the fixture's clock.
    pub fn sqlite(dir: &std::path::Path, max_items: usize, max_bytes: u64) -> Self {
        let clock = start_clock();
        let options = StoreOptions {
            max_items,
            max_bytes,
            clock: Arc::new(clock.clone()),
            ..StoreOptions::default()
        };
        let queue = Arc::new(SqliteRetryQueue::open(dir.join("queue.db"), options).unwrap());
        Self::over(queue, clock)
    }

    fn over(queue: Arc<dyn RetryQueue>, clock: ManualClock) -> Self {
        let shared: SharedClock = Arc::new(clock.clone());
        let worker = Arc::new(FakeWorker::new(queue.clone()));
        let metrics = Arc::new(Metrics::new());
        let state =
            AdminState::new(queue.clone(), worker.clone(), metrics.clone()).with_clock(shared);
        Fixture {
            queue,
            worker,
            metrics,
            clock,
            state,
        }
    }
}

fn start_clock() -> ManualClock {
    ManualClock::new(
        DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc),
    )
}

/// A loopback config requiring [`TOKEN`].
pub fn config_with_token() -> AdminConfig {
    AdminConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        token: Some(AdminToken::new(TOKEN, "test").unwrap()),
        ..AdminConfig::default()
    }
}

/// The `Authorization` header value for [`TOKEN`].
pub fn bearer() -> (&'static str, String) {
    ("Authorization", format!("Bearer {TOKEN}"))
}

/// Checks the OpenMetrics text format line by line: every sample belongs to
/// a family declared by HELP and TYPE lines before it, values parse.
/// Returns the declared families with their types.
pub fn parse_openmetrics(text: &str) -> BTreeMap<String, String> {
    let mut types = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap();
            assert!(!types.contains_key(name), "{name} declared twice");
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(
                ["counter", "gauge", "histogram"].contains(&kind),
                "unknown type in {line:?}"
            );
            types.insert(name.to_owned(), kind.to_owned());
            current = Some(name.to_owned());
        } else if line == "# EOF" || line.starts_with("# UNIT ") {
            // OpenMetrics: the end marker, and a family's unit.
        } else {
            assert!(!line.starts_with('#'), "stray comment {line:?}");
            let (series, value) = line.rsplit_once(' ').expect("sample has a value");
            let name = series.split('{').next().unwrap();
            let family = current.as_deref().expect("sample before TYPE");
            assert!(
                name == family
                    || (types[family] == "counter" && name == format!("{family}_total"))
                    || (types[family] == "histogram"
                        && [
                            format!("{family}_bucket"),
                            format!("{family}_sum"),
                            format!("{family}_count"),
                        ]
                        .iter()
                        .any(|n| n == name)),
                "sample {name} outside its family {family}"
            );
            assert!(
                value.parse::<f64>().is_ok() || value == "+Inf",
                "bad value in {line:?}"
            );
        }
    }
    types
}
