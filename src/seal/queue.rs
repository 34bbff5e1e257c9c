//! [`SealedQueue`]: the [`RetryQueue`] decorator that seals on the way in
//! and opens on the way out, the key source it reads (re-read when the key
//! file changes), and the census that refuses to open a store whose sealed
//! items cannot be read.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use chrono::{DateTime, Utc};

use super::envelope::{self, ClearFields, Form, Kind, OpenError, Sealer};
use super::keyring;
use super::keyring::Keyring;
use super::marker;
use super::{EncryptionSettings, SealError};
use crate::error::{QueueError, QueueResult};
use crate::item::{ItemId, NewItem, QueueItem};
use crate::store::{
    CleanupReport, ListFilter, PayloadSwap, PendingSync, QueueStats, RetryQueue, WriteOp,
    WriteOutcome,
};

/// How often, at most, a key file is looked at for a change.
const RELOAD_CHECK: Duration = Duration::from_secs(1);
/// Bad heads `peek` and `dequeue` quarantine before they give up for this call.
const MAX_SKIPS: usize = 64;

/// Where the keys come from, and the sealer over the latest of them.
pub struct KeySource {
    file: Option<PathBuf>,
    sealer: RwLock<Arc<Sealer>>,
    /// The key file's modification time when last read.
    mtime: Mutex<Option<SystemTime>>,
    start: Instant,
    /// Milliseconds after `start` of the last look at the key file.
    checked_ms: AtomicU64,
}

impl std::fmt::Debug for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySource")
            .field("file", &self.file)
            .finish()
    }
}

impl KeySource {
    /// Reads the keyring `settings` name (checking the key file).
    pub fn from_settings(settings: &EncryptionSettings) -> Result<KeySource, SealError> {
        settings.validate()?;
        match (&settings.key_file, &settings.key_env) {
            (Some(path), _) => {
                let mtime = std::fs::metadata(path).and_then(|m| m.modified()).ok();
                let ring = Keyring::load_file(path)?;
                let source = Self::fixed(ring)?;
                *source.mtime.lock().unwrap_or_else(|p| p.into_inner()) = mtime;
                Ok(KeySource {
                    file: Some(path.clone()),
                    ..source
                })
            }
            (None, Some(var)) => Self::fixed(Keyring::load_env(var)?),
            (None, None) => Err(SealError::Config(
                "[store.encryption] sets neither key_file nor key_env".to_owned(),
            )),
        }
    }

    /// A source that never changes (tests, benches, `key_env`).
    pub fn fixed(ring: Keyring) -> Result<KeySource, SealError> {
        Ok(KeySource {
            file: None,
            sealer: RwLock::new(Arc::new(Sealer::new(ring)?)),
            mtime: Mutex::new(None),
            start: Instant::now(),
            checked_ms: AtomicU64::new(0),
        })
    }

    /// The sealer over the current keys, re-reading a changed key file at
    /// most once a second.
    pub fn current(&self) -> Arc<Sealer> {
        if self.file.is_some() {
            let now = self.start.elapsed().as_millis() as u64;
            let last = self.checked_ms.load(Ordering::Relaxed);
            if now.saturating_sub(last) >= RELOAD_CHECK.as_millis() as u64
                && self
                    .checked_ms
                    .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
            {
                self.reload(false);
            }
        }
        self.sealer
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Re-reads the key file if it changed (or always, with `force`).
    /// A file that no longer passes its checks is logged and the keys
    /// already loaded stay in use: a bad edit must not stop delivery.
    fn reload(&self, force: bool) -> bool {
        let Some(path) = &self.file else {
            return false;
        };
        let mtime = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        let mut seen = self.mtime.lock().unwrap_or_else(|p| p.into_inner());
        if !force && *seen == mtime {
            return false;
        }
        match Keyring::load_file(path).and_then(|ring| Ok((Sealer::new(ring.clone())?, ring))) {
            Ok((sealer, ring)) => {
                let ids: Vec<&str> = ring.keys().iter().map(|k| k.id.as_str()).collect();
                tracing::info!(key_file = %path.display(), keys = ?ids, sealing = %ring.sealing().id, "keyring re-read");
                *self.sealer.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(sealer);
                *seen = mtime;
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "the key file changed but cannot be used; keeping the keys already loaded");
                *seen = mtime;
                false
            }
        }
    }
}

/// Which key IDs a store's sealed items need, as counted at open.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Census {
    /// Sealed items per key ID.
    pub by_key: BTreeMap<String, usize>,
    /// Envelopes whose key ID is unreadable (damaged records: they are
    /// quarantined when read).
    pub malformed: usize,
}

impl Census {
    /// Sealed items in all (malformed ones included).
    pub fn sealed(&self) -> usize {
        self.by_key.values().sum::<usize>() + self.malformed
    }
}

/// Counts the sealed items per key ID without opening any (nor, on SQLite,
/// reading them into memory: [`RetryQueue::count_payload_prefix`]), in
/// both forms. Envelopes as this build writes them are counted; one
/// re-ordered by a tool is found when it is read.
pub fn census(store: &dyn RetryQueue) -> QueueResult<Census> {
    let mut census = Census::default();
    // Both forms, whatever the store says it keeps: a store moved between
    // backends, or opened through a wrapper, may hold either.
    let counts = store.count_payload_prefix(
        &[envelope::KID_PREFIX, envelope::BINARY_KID_PREFIX],
        keyring::KEY_ID_LEN,
    )?;
    for (kid, n) in counts {
        if keyring::is_key_id(&kid) {
            *census.by_key.entry(kid).or_default() += n;
        } else {
            census.malformed += n;
        }
    }
    Ok(census)
}

/// Refuses a store opened without encryption that holds sealed items.
pub fn refuse_sealed(store: &dyn RetryQueue) -> QueueResult<()> {
    let census = census(store)?;
    if census.sealed() == 0 {
        return Ok(());
    }
    let total = census.sealed();
    let mut by_key = census.by_key;
    if census.malformed > 0 {
        by_key.insert("(unreadable)".to_owned(), census.malformed);
    }
    Err(SealError::SealedWhileOff { total, by_key }.into())
}

/// The store the daemon, the CLI and `retryq migrate` use: `inner` sealed
/// with the keys `settings` name, or `inner` itself when encryption is off.
/// Refuses, closing `inner`, when sealed items cannot be read: encryption
/// off over sealed items, or keys missing for some (naming them).
pub fn wrap_store(
    inner: Arc<dyn RetryQueue>,
    settings: &EncryptionSettings,
) -> QueueResult<Arc<dyn RetryQueue>> {
    wrap_store_marked(inner, settings, None)
}

/// [`wrap_store`] for a store with a file of its own: `marker` (see
/// [`super::marker`]) is created before anything is sealed, and with
/// encryption off its absence proves that nothing is, so the census of
/// every payload is skipped.
pub fn wrap_store_marked(
    inner: Arc<dyn RetryQueue>,
    settings: &EncryptionSettings,
    marker: Option<&Path>,
) -> QueueResult<Arc<dyn RetryQueue>> {
    let wrapped = (|| {
        if !settings.is_enabled() {
            match marker {
                Some(m) if !marker::is_marked(m) => {}
                Some(m) => {
                    refuse_sealed(inner.as_ref())?;
                    marker::unmark(m);
                }
                None => refuse_sealed(inner.as_ref())?,
            }
            return Ok(inner.clone());
        }
        let keys = KeySource::from_settings(settings)?;
        if let Some(m) = marker {
            marker::mark(m)?;
        }
        let queue = SealedQueue::new(inner.clone(), keys);
        queue.check_keys()?;
        Ok(Arc::new(queue) as Arc<dyn RetryQueue>)
    })();
    if wrapped.is_err() {
        let _ = inner.close();
    }
    wrapped
}

/// A [`RetryQueue`] that seals every item it stores into `inner` and opens
/// every item it returns. See the module doc of [`crate::seal`].
pub struct SealedQueue {
    inner: Arc<dyn RetryQueue>,
    keys: KeySource,
    /// The form `inner` keeps sealed payloads in: binary where it stores
    /// bytes, the JSON envelope where it stores JSON.
    form: Form,
    /// Marks an item this queue sealed in [`RetryQueue::prepare_new`]: a
    /// random value in the attribute [`PREPARED_ATTR`] (removed before it
    /// is stored), which no producer can guess, so nobody else's envelope
    /// passes unsealed.
    token: String,
    /// The clear fields of prepared items, by ID, to hand back the items
    /// `enqueue_claimed` stores without opening what was just sealed.
    prepared: Mutex<HashMap<ItemId, Kept>>,
}

/// The attribute that marks a prepared item (see [`SealedQueue`]).
const PREPARED_ATTR: &str = "retryq-prepared-seal";
/// Prepared items remembered at most; beyond, all are forgotten
/// (those are opened instead when they come back claimed).
const MAX_PREPARED: usize = 1 << 16;

impl std::fmt::Debug for SealedQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedQueue")
            .field("keys", &self.keys)
            .finish()
    }
}

/// What the caller's item looked like before sealing, for returning the
/// stored item without opening what was just sealed.
type Kept = ClearFields;

impl SealedQueue {
    /// Seals into `inner` with the keys from `keys`.
    pub fn new(inner: Arc<dyn RetryQueue>, keys: KeySource) -> SealedQueue {
        let mut token = [0u8; 16];
        // Without randomness no item is marked prepared that could match.
        let _ = getrandom::getrandom(&mut token);
        let form = if inner.stores_bytes() {
            Form::Binary
        } else {
            Form::Text
        };
        SealedQueue {
            inner,
            keys,
            form,
            token: token.iter().map(|b| format!("{b:02x}")).collect(),
            prepared: Mutex::new(HashMap::new()),
        }
    }

    /// The store underneath, which sees only envelopes.
    pub fn inner(&self) -> &Arc<dyn RetryQueue> {
        &self.inner
    }

    /// The sealer over the current keys.
    pub fn sealer(&self) -> Arc<Sealer> {
        self.keys.current()
    }

    /// Refuses when some items are sealed under keys the ring lacks,
    /// naming each key ID and how many items need it.
    pub fn check_keys(&self) -> QueueResult<Census> {
        let census = census(self.inner.as_ref())?;
        let sealer = self.keys.current();
        let needed: BTreeMap<String, usize> = census
            .by_key
            .iter()
            .filter(|(kid, _)| sealer.ring().get(kid).is_none())
            .map(|(kid, n)| (kid.clone(), *n))
            .collect();
        if !needed.is_empty() {
            return Err(SealError::MissingKeys {
                source_name: sealer.ring().source().to_owned(),
                needed,
            }
            .into());
        }
        Ok(census)
    }

    /// Seals a new item for the store; an item this queue prepared passes
    /// as it is, with its clear fields when still remembered.
    fn seal_new(&self, sealer: &Sealer, mut item: NewItem) -> QueueResult<(NewItem, Option<Kept>)> {
        let prepared = item.attributes.len() == 1
            && item.attributes.get(PREPARED_ATTR) == Some(&self.token)
            && !self.token.is_empty();
        if prepared {
            item.attributes.clear();
            let kept = item.id.as_ref().and_then(|id| {
                self.prepared
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(id)
            });
            return Ok((item, kept));
        }
        let (item, kept) = self.seal_fresh(sealer, item)?;
        Ok((item, Some(kept)))
    }

    fn seal_fresh(&self, sealer: &Sealer, mut item: NewItem) -> QueueResult<(NewItem, Kept)> {
        // The ID is bound into the seal, so it is chosen here rather than
        // by the store; the fingerprint is taken from the clear payload.
        let id = item.id.get_or_insert_with(ItemId::generate).clone();
        if item.fingerprint.is_none() {
            item.fingerprint = Some(item.report.fingerprint());
        }
        let kept = ClearFields {
            report: Some(item.report.clone()),
            attributes: std::mem::take(&mut item.attributes),
            agent_id: std::mem::take(&mut item.agent_id),
            scanner_name: std::mem::take(&mut item.scanner_name),
            target_path: std::mem::take(&mut item.target_path),
        };
        item.report = sealer.seal(self.form, &id, &kept)?;
        Ok((item, kept))
    }

    /// A stored item handed back to the caller that gave it: restored from
    /// what it was, or opened when that is no longer known.
    fn hand_back(&self, item: QueueItem, kept: Option<Kept>) -> QueueResult<QueueItem> {
        match kept {
            Some(fields) => Ok(restore(item, fields)),
            None => self.open_one(item),
        }
    }

    /// An imported item that is already sealed, in the form `inner`
    /// keeps (`retryq migrate` between a SQLite and a JSON backend): the
    /// parts are unchanged, so it opens as before, without the key.
    fn in_stored_form(&self, item: &QueueItem) -> QueueItem {
        let mut item = item.clone();
        if self.form == Form::Text {
            item.report = item.report.to_text_form();
        } else if let Some(binary) = envelope::to_binary_form(&item.report) {
            item.report = binary;
        }
        item
    }

    fn seal_item(&self, sealer: &Sealer, item: &QueueItem) -> QueueResult<QueueItem> {
        let mut sealed = item.clone();
        let fields = ClearFields {
            report: Some(item.report.clone()),
            attributes: std::mem::take(&mut sealed.attributes),
            agent_id: std::mem::take(&mut sealed.agent_id),
            scanner_name: std::mem::take(&mut sealed.scanner_name),
            target_path: std::mem::take(&mut sealed.target_path),
        };
        sealed.report = sealer.seal(self.form, &item.id, &fields)?;
        Ok(sealed)
    }

    /// Opens one stored item; an item in the clear passes as it is. An
    /// unknown key ID makes the keys be re-read once (a rotation by the
    /// CLI) before it is reported.
    fn open(&self, item: QueueItem) -> Result<QueueItem, (Box<QueueItem>, OpenError)> {
        self.open_with(&self.keys.current(), item)
    }

    /// [`Self::open`] with the sealer already in hand (one look-up per batch).
    fn open_with(
        &self,
        sealer: &Sealer,
        item: QueueItem,
    ) -> Result<QueueItem, (Box<QueueItem>, OpenError)> {
        if !envelope::is_envelope(&item.report) {
            return Ok(item);
        }
        match sealer.open(&item.id, &item.report) {
            Ok(fields) => Ok(restore(item, fields)),
            Err(OpenError::UnknownKey { .. }) if self.keys.reload(true) => {
                match self.keys.current().open(&item.id, &item.report) {
                    Ok(fields) => Ok(restore(item, fields)),
                    Err(e) => Err((Box::new(item), e)),
                }
            }
            Err(e) => Err((Box::new(item), e)),
        }
    }

    /// Moves a damaged item to the quarantine. A backend that cannot leaves
    /// it where it is (logged): it is skipped, never delivered.
    fn quarantine(&self, id: &ItemId, reason: &str) {
        tracing::warn!(
            item_id = id.as_str(),
            reason,
            "quarantining a sealed item that does not open"
        );
        if let Err(e) = self.inner.quarantine(id, reason) {
            tracing::error!(item_id = id.as_str(), reason, error = %e, "cannot quarantine a sealed item that does not open; it is skipped");
        }
    }

    /// Opens claimed items; damaged ones go to quarantine and items under
    /// a missing key keep their claim until the lease runs out (then they
    /// are tried again, maybe with the key by then), untouched.
    fn open_claimed(&self, items: Vec<QueueItem>) -> Vec<QueueItem> {
        let mut out = Vec::with_capacity(items.len());
        for opened in self.open_all(items) {
            match opened {
                Ok(item) => out.push(item),
                Err((item, OpenError::Corrupt(reason))) => self.quarantine(&item.id, &reason),
                Err((item, e @ OpenError::UnknownKey { .. })) => {
                    tracing::error!(item_id = %item.id, error = %e, "cannot deliver a sealed item: its key is missing; it stays claimed until its lease ends");
                }
            }
        }
        out
    }

    /// Opens many items, in order.
    fn open_all(
        &self,
        items: Vec<QueueItem>,
    ) -> Vec<Result<QueueItem, (Box<QueueItem>, OpenError)>> {
        let sealer = self.keys.current();
        items
            .into_iter()
            .map(|item| self.open_with(&sealer, item))
            .collect()
    }

    /// Opens one item for a caller that asked for exactly it.
    fn open_one(&self, item: QueueItem) -> QueueResult<QueueItem> {
        match self.open(item) {
            Ok(item) => Ok(item),
            Err((item, OpenError::Corrupt(reason))) => {
                self.quarantine(&item.id, &reason);
                Err(QueueError::Corrupt {
                    what: item.id.to_string(),
                    detail: format!("{reason}; the item was quarantined"),
                })
            }
            Err((item, OpenError::UnknownKey { kid })) => Err(SealError::MissingKeys {
                source_name: self.keys.current().ring().source().to_owned(),
                needed: BTreeMap::from([(kid, 1)]),
            })
            .map_err(|e| {
                tracing::debug!(item_id = %item.id, "item under a missing key");
                QueueError::from(e)
            }),
        }
    }

    fn restore_outcomes(
        &self,
        results: Vec<QueueResult<WriteOutcome>>,
        kept: Vec<Option<Kept>>,
    ) -> Vec<QueueResult<WriteOutcome>> {
        results
            .into_iter()
            .zip(kept)
            .map(|(result, kept)| match result {
                Ok(WriteOutcome::Claimed(item)) => self
                    .hand_back(*item, kept)
                    .map(|item| WriteOutcome::Claimed(Box::new(item))),
                result => result,
            })
            .collect()
    }

    fn seal_ops(&self, ops: Vec<WriteOp>) -> QueueResult<(Vec<WriteOp>, Vec<Option<Kept>>)> {
        let sealer = self.keys.current();
        let mut kept = Vec::with_capacity(ops.len());
        let mut sealed = Vec::with_capacity(ops.len());
        for op in ops {
            match op {
                WriteOp::Enqueue(item) => {
                    let (item, k) = self.seal_new(&sealer, item)?;
                    kept.push(k);
                    sealed.push(WriteOp::Enqueue(item));
                }
                WriteOp::EnqueueClaimed { item, lease } => {
                    let (item, k) = self.seal_new(&sealer, item)?;
                    kept.push(k);
                    sealed.push(WriteOp::EnqueueClaimed { item, lease });
                }
                other => {
                    kept.push(None);
                    sealed.push(other);
                }
            }
        }
        Ok((sealed, kept))
    }
}

fn restore(mut item: QueueItem, fields: ClearFields) -> QueueItem {
    if let Some(report) = fields.report {
        item.report = report;
    }
    item.attributes = fields.attributes;
    item.agent_id = fields.agent_id;
    item.scanner_name = fields.scanner_name;
    item.target_path = fields.target_path;
    item
}

impl RetryQueue for SealedQueue {
    fn enqueue(&self, item: NewItem) -> QueueResult<ItemId> {
        let (item, _) = self.seal_new(&self.keys.current(), item)?;
        self.inner.enqueue(item)
    }

    fn enqueue_batch(&self, items: Vec<NewItem>) -> QueueResult<Vec<QueueResult<ItemId>>> {
        let sealer = self.keys.current();
        let sealed = items
            .into_iter()
            .map(|item| self.seal_new(&sealer, item).map(|(item, _)| item))
            .collect::<QueueResult<Vec<_>>>()?;
        self.inner.enqueue_batch(sealed)
    }

    fn enqueue_claimed(
        &self,
        items: Vec<NewItem>,
        lease: Duration,
    ) -> QueueResult<Vec<QueueResult<QueueItem>>> {
        let sealer = self.keys.current();
        let (sealed, kept): (Vec<_>, Vec<_>) = items
            .into_iter()
            .map(|item| self.seal_new(&sealer, item))
            .collect::<QueueResult<Vec<_>>>()?
            .into_iter()
            .unzip();
        let results = self.inner.enqueue_claimed(sealed, lease)?;
        Ok(results
            .into_iter()
            .zip(kept)
            .map(|(r, fields)| r.and_then(|item| self.hand_back(item, fields)))
            .collect())
    }

    fn dequeue(&self) -> QueueResult<Option<QueueItem>> {
        for _ in 0..MAX_SKIPS {
            let Some(item) = self.inner.dequeue()? else {
                return Ok(None);
            };
            if let Some(item) = self.open_claimed(vec![item]).pop() {
                return Ok(Some(item));
            }
        }
        Ok(None)
    }

    fn peek(&self) -> QueueResult<Option<QueueItem>> {
        for _ in 0..MAX_SKIPS {
            let Some(item) = self.inner.peek()? else {
                return Ok(None);
            };
            match self.open(item) {
                Ok(item) => return Ok(Some(item)),
                Err((item, OpenError::Corrupt(reason))) => self.quarantine(&item.id, &reason),
                Err((_, e)) => return Err(e.into_queue_error()),
            }
        }
        Ok(None)
    }

    fn get(&self, id: &ItemId) -> QueueResult<QueueItem> {
        self.open_one(self.inner.get(id)?)
    }

    fn update(&self, item: &QueueItem) -> QueueResult<()> {
        let sealed = self.seal_item(&self.keys.current(), item)?;
        self.inner.update(&sealed)
    }

    fn delete(&self, id: &ItemId) -> QueueResult<()> {
        self.inner.delete(id)
    }

    fn mark_failed(&self, id: &ItemId, reason: &str) -> QueueResult<QueueItem> {
        self.open_one(self.inner.mark_failed(id, reason)?)
    }

    fn requeue(
        &self,
        id: &ItemId,
        error: &str,
        next_retry: DateTime<Utc>,
    ) -> QueueResult<QueueItem> {
        self.open_one(self.inner.requeue(id, error, next_retry)?)
    }

    fn revive(&self, id: &ItemId) -> QueueResult<QueueItem> {
        self.open_one(self.inner.revive(id)?)
    }

    fn release(&self, id: &ItemId) -> QueueResult<()> {
        self.inner.release(id)
    }

    fn claim(&self, limit: usize, lease: Duration) -> QueueResult<Vec<QueueItem>> {
        Ok(self.open_claimed(self.inner.claim(limit, lease)?))
    }

    fn release_expired_leases(&self) -> QueueResult<usize> {
        self.inner.release_expired_leases()
    }

    fn release_leases_except(&self, owner: &str) -> QueueResult<usize> {
        self.inner.release_leases_except(owner)
    }

    fn next_due(&self) -> QueueResult<Option<DateTime<Utc>>> {
        self.inner.next_due()
    }

    fn size(&self) -> QueueResult<usize> {
        self.inner.size()
    }

    fn stats(&self) -> QueueResult<QueueStats> {
        self.inner.stats()
    }

    fn cleanup(&self, ttl: Duration) -> QueueResult<CleanupReport> {
        self.inner.cleanup(ttl)
    }

    fn enforce_limits(&self) -> QueueResult<usize> {
        self.inner.enforce_limits()
    }

    fn list(&self, filter: &ListFilter) -> QueueResult<Vec<QueueItem>> {
        let items = self.inner.list(filter)?;
        let mut out = Vec::with_capacity(items.len());
        for opened in self.open_all(items) {
            match opened {
                Ok(item) => out.push(item),
                Err((item, OpenError::Corrupt(reason))) => self.quarantine(&item.id, &reason),
                // Listed as stored (its envelope as the report): the item
                // is there, only its contents cannot be read.
                Err((item, OpenError::UnknownKey { .. })) => out.push(*item),
            }
        }
        Ok(out)
    }

    fn apply_batch(&self, ops: Vec<WriteOp>) -> QueueResult<Vec<QueueResult<WriteOutcome>>> {
        let (ops, kept) = self.seal_ops(ops)?;
        Ok(self.restore_outcomes(self.inner.apply_batch(ops)?, kept))
    }

    fn import_batch(&self, items: Vec<QueueItem>) -> QueueResult<Vec<QueueResult<()>>> {
        let sealer = self.keys.current();
        let sealed = items
            .iter()
            .map(|item| {
                if envelope::is_envelope(&item.report) {
                    Ok(self.in_stored_form(item))
                } else {
                    self.seal_item(&sealer, item)
                }
            })
            .collect::<QueueResult<Vec<_>>>()?;
        self.inner.import_batch(sealed)
    }

    fn apply_batch_deferred(
        &self,
        ops: Vec<WriteOp>,
    ) -> QueueResult<(Vec<QueueResult<WriteOutcome>>, Option<PendingSync>)> {
        let (ops, kept) = self.seal_ops(ops)?;
        let (results, sync) = self.inner.apply_batch_deferred(ops)?;
        Ok((self.restore_outcomes(results, kept), sync))
    }

    fn probe_writable(&self) -> QueueResult<bool> {
        self.inner.probe_writable()
    }

    fn quarantine(&self, id: &ItemId, reason: &str) -> QueueResult<()> {
        self.inner.quarantine(id, reason)
    }

    fn prepare_new(&self, items: Vec<NewItem>) -> QueueResult<Vec<NewItem>> {
        let sealer = self.keys.current();
        let mut out = Vec::with_capacity(items.len());
        let mut kept_all = Vec::with_capacity(items.len());
        for item in items {
            let (mut item, kept) = self.seal_fresh(&sealer, item)?;
            if let Some(id) = &item.id {
                kept_all.push((id.clone(), kept));
            }
            item.attributes
                .insert(PREPARED_ATTR.to_owned(), self.token.clone());
            out.push(item);
        }
        let mut prepared = self.prepared.lock().unwrap_or_else(|p| p.into_inner());
        if prepared.len() + kept_all.len() > MAX_PREPARED {
            // Items prepared but never stored (their enqueue failed on the
            // way) would pile up; those still to come are opened instead.
            prepared.clear();
        }
        prepared.extend(kept_all);
        Ok(out)
    }

    fn replace_payloads(&self, swaps: Vec<PayloadSwap>) -> QueueResult<Vec<bool>> {
        self.inner.replace_payloads(swaps)
    }

    fn stores_bytes(&self) -> bool {
        self.inner.stores_bytes()
    }

    fn close(&self) -> QueueResult<()> {
        self.inner.close()
    }
}

impl OpenError {
    fn into_queue_error(self) -> QueueError {
        match self {
            OpenError::UnknownKey { kid } => SealError::MissingKeys {
                source_name: "the keyring".to_owned(),
                needed: BTreeMap::from([(kid, 1)]),
            }
            .into(),
            OpenError::Corrupt(reason) => QueueError::Corrupt {
                what: "sealed item".to_owned(),
                detail: reason,
            },
        }
    }
}

/// What one [`reseal_batch`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResealReport {
    /// Items now sealed under the newest key.
    pub resealed: usize,
    /// Items whose payload changed (or that went) since they were read:
    /// left alone, to be looked at again.
    pub changed: usize,
    /// Items that do not open (damaged, or under a key the ring lacks).
    pub unreadable: usize,
}

/// Re-seals the sealed items among `items` (as `store` holds them, not
/// opened) that are not under the newest key, as one conditional batch
/// ([`RetryQueue::replace_payloads`]): only the payload changes, and only
/// where it is still what was read, so a delivery running meanwhile is
/// never undone.
pub fn reseal_batch(
    store: &dyn RetryQueue,
    sealer: &Sealer,
    items: &[QueueItem],
) -> QueueResult<ResealReport> {
    let mut report = ResealReport::default();
    let mut swaps = Vec::new();
    for item in items {
        let Kind::Sealed(kid) = envelope::kind(&item.report) else {
            continue;
        };
        if kid == sealer.sealing_kid() {
            continue;
        }
        let Ok(fields) = sealer.open(&item.id, &item.report) else {
            report.unreadable += 1;
            continue;
        };
        swaps.push(PayloadSwap {
            id: item.id.clone(),
            expected: item.report.clone(),
            // The same form, so the same size: a swap keeps the accounting.
            replacement: sealer.seal(Form::of(&item.report), &item.id, &fields)?,
        });
    }
    let tried = swaps.len();
    report.resealed = store
        .replace_payloads(swaps)?
        .into_iter()
        .filter(|done| *done)
        .count();
    report.changed = tried - report.resealed;
    Ok(report)
}
