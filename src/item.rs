//! The queue item: what is stored, its identity (ID, fingerprint) and its
//! delivery state.
//!
//! Field names follow the Go SDK's `QueueItem` so JSON written by either side
//! reads on the other. The payload (the seed's `report`) is any JSON document;
//! it is kept as compact JSON text in document order (whitespace outside
//! strings removed, nothing reordered), so the default fingerprint, SHA-256 of
//! those bytes, equals the one the Go SDK computes for the same report.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use chrono::{DateTime, Duration as ChronoDuration, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{QueueError, QueueResult};

/// Default number of delivery attempts before an item becomes a dead letter.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 10;
/// Longest caller-chosen ID that is not a UUID.
pub const MAX_ID_LEN: usize = 64;

/// Where an item is in its life.
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

/// What kind of report an item carries: the seed's three, or any other name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ItemType {
    /// A findings report.
    #[default]
    Findings,
    /// An asset inventory.
    Assets,
    /// An agent heartbeat.
    Heartbeat,
    /// Any other type name.
    Other(String),
}

impl ItemType {
    /// The type's wire name.
    pub fn as_str(&self) -> &str {
        match self {
            ItemType::Findings => "findings",
            ItemType::Assets => "assets",
            ItemType::Heartbeat => "heartbeat",
            ItemType::Other(s) => s,
        }
    }
}

impl From<&str> for ItemType {
    fn from(s: &str) -> Self {
        match s {
            "findings" => ItemType::Findings,
            "assets" => ItemType::Assets,
            "heartbeat" => ItemType::Heartbeat,
            other => ItemType::Other(other.to_owned()),
        }
    }
}

impl From<String> for ItemType {
    fn from(s: String) -> Self {
        ItemType::from(s.as_str())
    }
}

impl fmt::Display for ItemType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for ItemType {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for ItemType {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(ItemType::from(s))
    }
}

/// Checks a caller-chosen item ID: a UUID, or 1 to 64 of `[A-Za-z0-9_-]`.
///
/// The rule guarantees an ID can never name a path outside the queue
/// directory (no `/`, `.`, `\` or NUL) and compares exactly.
pub fn validate_id(id: &str) -> QueueResult<()> {
    if uuid::Uuid::try_parse(id).is_ok() {
        return Ok(());
    }
    if id.is_empty() {
        return Err(QueueError::invalid("id is empty"));
    }
    if id.len() > MAX_ID_LEN {
        return Err(QueueError::invalid(format!(
            "id is {} characters long, the limit is {MAX_ID_LEN}",
            id.len()
        )));
    }
    if let Some(bad) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
    {
        return Err(QueueError::invalid(format!(
            "id {id:?} contains {bad:?}; only A-Z, a-z, 0-9, '_' and '-' are allowed"
        )));
    }
    Ok(())
}

/// A new ID: a UUIDv7, so IDs sort by creation time (strictly, within this
/// process).
pub fn new_id() -> String {
    let millis = chrono::Utc::now().timestamp_millis().max(0) as u64;
    let mut ids = ID_STATE.lock().unwrap_or_else(|p| p.into_inner());
    ids.next(millis).to_string()
}

/// UUIDv7 state: the last timestamp and a counter under it (RFC 9562,
/// section 6.2, method 1), so IDs from one process never repeat and sort in
/// the order they were made. `uuid::Uuid::now_v7` asked the kernel for
/// random bytes on every ID: a syscall per enqueued item, on the store's one
/// committer thread. Here the kernel seeds a fast generator once.
struct IdState {
    millis: u64,
    counter: u64,
    /// The generator and the process it was seeded in: a forked child
    /// reseeds, or it would make its parent's IDs in the same millisecond.
    rng: Option<(u32, fastrand::Rng)>,
}

static ID_STATE: std::sync::Mutex<IdState> = std::sync::Mutex::new(IdState {
    millis: 0,
    counter: 0,
    rng: None,
});

impl IdState {
    /// Bits of the counter: the 12 of `rand_a` and the top 30 of `rand_b`.
    const COUNTER_BITS: u32 = 42;

    fn next(&mut self, now_millis: u64) -> uuid::Uuid {
        let pid = std::process::id();
        let rng = match &mut self.rng {
            Some((seeded_in, rng)) if *seeded_in == pid => rng,
            slot => {
                // A new counter start too: a child must not continue its
                // parent's sequence.
                self.millis = 0;
                &mut slot.insert((pid, fastrand::Rng::with_seed(seed()))).1
            }
        };
        if now_millis > self.millis {
            self.millis = now_millis;
            // A random start (top bit clear, room to count up) keeps two
            // processes apart within one millisecond.
            self.counter = rng.u64(..1 << (Self::COUNTER_BITS - 1));
        } else {
            // Same millisecond, or the clock stepped back: count on under
            // the last timestamp; past the counter's end, borrow the next.
            self.counter += 1;
            if self.counter >> Self::COUNTER_BITS != 0 {
                self.millis += 1;
                self.counter = 0;
            }
        }
        let rand_a = self.counter >> 30;
        let rand_b = ((self.counter & ((1 << 30) - 1)) << 32) | u64::from(rng.u32(..));
        let bits = (u128::from(self.millis & ((1 << 48) - 1)) << 80)
            | (0x7 << 76)
            | (u128::from(rand_a) << 64)
            | (0b10 << 62)
            | u128::from(rand_b);
        uuid::Uuid::from_u128(bits)
    }
}

/// 64 bits from the OS for the ID generator's seed (a random UUIDv4 is the
/// one call for them we already depend on).
fn seed() -> u64 {
    uuid::Uuid::new_v4().as_u64_pair().0
}

/// SHA-256 of `bytes`, as lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digest = Sha256::digest(bytes);
    let mut out = String::with_capacity(64);
    for b in digest.iter() {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0x0f)]));
    }
    out
}

/// CRC-32 of the payload bytes, kept beside each stored payload and verified
/// on every read.
pub fn payload_checksum(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}

/// A JSON document, kept as compact text in document order.
///
/// Cheap to clone (shared). Built only through [`Payload::from_json_bytes`] /
/// [`Payload::from_value`], which validate and compact it.
#[derive(Clone, PartialEq, Eq)]
pub struct Payload(Arc<str>);

impl Payload {
    /// Parses `bytes` as one JSON document and keeps its compact form.
    pub fn from_json_bytes(bytes: &[u8]) -> QueueResult<Self> {
        let text = std::str::from_utf8(bytes)
            .map_err(|e| QueueError::invalid(format!("payload is not UTF-8: {e}")))?;
        Self::from_json_str(text)
    }

    /// Parses `text` as one JSON document and keeps its compact form.
    pub fn from_json_str(text: &str) -> QueueResult<Self> {
        // Validate with serde (exact error position), then compact by hand so
        // key order and number spelling stay as the producer wrote them.
        let mut de = serde_json::Deserializer::from_str(text);
        serde::de::IgnoredAny::deserialize(&mut de)
            .and_then(|_| de.end())
            .map_err(|e| QueueError::invalid(format!("payload is not valid JSON: {e}")))?;
        Ok(Payload(Arc::from(compact_json(text))))
    }

    /// Bytes a store wrote from a `Payload` and has just verified against
    /// their checksum: they were valid compact JSON when written, so only
    /// UTF-8 is checked (parsing every payload again was a tenth of a
    /// claim).
    pub(crate) fn from_stored(bytes: Vec<u8>) -> QueueResult<Self> {
        let text = String::from_utf8(bytes)
            .map_err(|e| QueueError::invalid(format!("payload is not UTF-8: {e}")))?;
        Ok(Payload(Arc::from(text)))
    }

    /// Serializes a JSON value (keys in the value's own order).
    pub fn from_value(value: &serde_json::Value) -> Self {
        // Serializing a Value cannot fail: keys are strings.
        Payload(Arc::from(value.to_string()))
    }

    /// The compact JSON text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The compact JSON bytes: what transports send and fingerprints hash.
    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True for an empty payload (never produced by the constructors).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Parses the payload into a `serde_json::Value`.
    pub fn to_value(&self) -> serde_json::Value {
        // The text was validated at construction.
        serde_json::from_str(&self.0).unwrap_or(serde_json::Value::Null)
    }

    /// SHA-256 hex of the payload bytes: the default fingerprint.
    pub fn fingerprint(&self) -> String {
        sha256_hex(self.as_bytes())
    }
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print payloads in full: they can be large and sensitive.
        write!(f, "Payload({} bytes)", self.0.len())
    }
}

impl Serialize for Payload {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let raw: &serde_json::value::RawValue = serde_json::from_str(&self.0)
            .map_err(|e| serde::ser::Error::custom(format!("payload: {e}")))?;
        raw.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Payload {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw: Box<serde_json::value::RawValue> = Deserialize::deserialize(d)?;
        Ok(Payload(Arc::from(compact_json(raw.get()))))
    }
}

/// Removes whitespace outside strings from valid JSON text, keeping
/// everything else byte for byte.
pub fn compact_json(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                // Copy the whole string literal in one go. Working on bytes
                // is safe: the quote, the backslash and JSON whitespace are
                // ASCII, and no byte of a multi-byte UTF-8 character is.
                let start = i;
                i += 1;
                while i < bytes.len() {
                    match bytes[i] {
                        b'\\' => i += 2,
                        b'"' => {
                            i += 1;
                            break;
                        }
                        _ => i += 1,
                    }
                }
                out.extend_from_slice(&bytes[start..i.min(bytes.len())]);
            }
            b' ' | b'\n' | b'\r' | b'\t' => i += 1,
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    // Only ASCII whitespace between tokens was left out, so `out` is UTF-8;
    // the lossy fallback is never taken.
    String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// One report waiting for delivery, with its delivery state.
///
/// Serialized with the Go SDK's field names (`type`, `report`, ...).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct QueueItem {
    /// Unique ID: a UUIDv7 unless the caller chose one (see [`validate_id`]).
    pub id: String,
    /// Report type.
    #[serde(rename = "type")]
    #[schema(value_type = String)]
    pub item_type: ItemType,
    /// Identity of the content for deduplication (SHA-256 of the payload by default).
    pub fingerprint: String,
    /// Delivery state.
    pub status: ItemStatus,
    /// The report itself (the API shows it only when asked: `?payload=true`).
    #[schema(value_type = serde_json::Value, required = false)]
    pub report: Payload,
    /// Delivery attempts made so far (every failed push counts one).
    pub attempts: u32,
    /// Attempts allowed before the item becomes a dead letter.
    pub max_attempts: u32,
    /// The reason of the last failure, empty if none.
    #[serde(default)]
    pub last_error: String,
    /// When the last attempt was made; `None` before the first.
    #[serde(default)]
    pub last_attempt: Option<DateTime<Utc>>,
    /// When the item is next due.
    pub next_retry: DateTime<Utc>,
    /// When it was enqueued.
    pub created_at: DateTime<Utc>,
    /// When its state last changed.
    pub updated_at: DateTime<Utc>,
    /// The producing agent, free text.
    #[serde(default)]
    pub agent_id: String,
    /// The producing scanner, free text.
    #[serde(default)]
    pub scanner_name: String,
    /// What was scanned, free text.
    #[serde(default)]
    pub target_path: String,
    /// While `processing`: the time the claim expires and the item returns to pending.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_until: Option<DateTime<Utc>>,
    /// While `processing`: the instance that claimed it (see
    /// [`crate::store::owner`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_owner: Option<String>,
    /// Free-form attributes for transports (headers, routing...).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, String>,
}

impl QueueItem {
    /// True when the item is pending and due at `now`.
    pub fn is_ready_for_retry(&self, now: DateTime<Utc>) -> bool {
        self.status == ItemStatus::Pending && self.next_retry <= now
    }

    /// True when no attempt is left.
    pub fn has_exhausted_retries(&self) -> bool {
        self.attempts >= self.max_attempts
    }

    /// True when the item was created more than `ttl` before `now`.
    pub fn is_expired(&self, ttl: std::time::Duration, now: DateTime<Utc>) -> bool {
        match ChronoDuration::from_std(ttl) {
            Ok(ttl) => match self.created_at.checked_add_signed(ttl) {
                Some(deadline) => deadline < now,
                None => false,
            },
            // A TTL too large to represent never expires anything.
            Err(_) => false,
        }
    }

    /// Claims the item for instance `owner` until `lease_until` (the state
    /// change of `RetryQueue::claim`, shared by every backend).
    pub fn record_claim(&mut self, lease_until: DateTime<Utc>, owner: &str, now: DateTime<Utc>) {
        self.status = ItemStatus::Processing;
        self.lease_until = Some(lease_until);
        self.lease_owner = Some(owner.to_owned());
        self.updated_at = now;
    }

    /// Records a failed attempt and schedules the next one (the state change
    /// of `RetryQueue::requeue`, shared by every backend).
    pub fn record_retry(&mut self, error: &str, next_retry: DateTime<Utc>, now: DateTime<Utc>) {
        self.attempts = self.attempts.saturating_add(1);
        self.last_error = error.to_owned();
        self.last_attempt = Some(now);
        self.next_retry = next_retry;
        self.status = ItemStatus::Pending;
        self.lease_until = None;
        self.lease_owner = None;
    }

    /// Records a final failed attempt and makes the item a dead letter (the
    /// state change of `RetryQueue::mark_failed`).
    pub fn record_dead_letter(&mut self, reason: &str, now: DateTime<Utc>) {
        self.attempts = self.attempts.saturating_add(1);
        self.last_error = reason.to_owned();
        self.last_attempt = Some(now);
        self.status = ItemStatus::Failed;
        self.lease_until = None;
        self.lease_owner = None;
    }

    /// Brings a dead letter back, due at `now` with its attempts reset (the
    /// state change of `RetryQueue::revive`); refuses any other status.
    pub fn revive(&mut self, now: DateTime<Utc>) -> QueueResult<()> {
        if self.status != ItemStatus::Failed {
            return Err(QueueError::invalid(format!(
                "item {} is {}, only a failed item (a dead letter) can be revived",
                self.id, self.status
            )));
        }
        self.status = ItemStatus::Pending;
        self.attempts = 0;
        self.next_retry = now;
        self.lease_until = None;
        self.lease_owner = None;
        Ok(())
    }

    /// The item as the API and the CLI show it: its JSON fields plus
    /// `size_bytes`, without the report unless `with_payload`. One
    /// definition, so `retryq show` and `GET /v1/items/{id}` agree.
    pub fn view_json(&self, with_payload: bool) -> serde_json::Result<serde_json::Value> {
        let mut value = serde_json::to_value(self)?;
        if let serde_json::Value::Object(map) = &mut value {
            if !with_payload {
                map.remove("report");
            }
            map.insert("size_bytes".to_owned(), self.size_bytes().into());
        }
        Ok(value)
    }

    /// Bytes the item accounts for against the byte limit: payload plus metadata.
    pub fn size_bytes(&self) -> u64 {
        let meta = self.id.len()
            + self.item_type.as_str().len()
            + self.fingerprint.len()
            + self.last_error.len()
            + self.agent_id.len()
            + self.scanner_name.len()
            + self.target_path.len()
            + self
                .attributes
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>();
        (self.report.len() + meta) as u64
    }
}

/// What a producer hands to `enqueue`: the payload and whatever the caller
/// wants to choose; the store fills in the rest.
#[derive(Debug, Clone, PartialEq)]
pub struct NewItem {
    /// The report.
    pub report: Payload,
    /// Report type (default `findings`).
    pub item_type: ItemType,
    /// A caller-chosen ID; a UUIDv7 when `None`.
    pub id: Option<String>,
    /// A caller-chosen fingerprint; SHA-256 of the payload when `None`.
    pub fingerprint: Option<String>,
    /// Attempts allowed; the store's default when `None`.
    pub max_attempts: Option<u32>,
    /// Producing agent.
    pub agent_id: String,
    /// Producing scanner.
    pub scanner_name: String,
    /// What was scanned.
    pub target_path: String,
    /// First due time; now when `None`.
    pub next_retry: Option<DateTime<Utc>>,
    /// Attributes for transports.
    pub attributes: BTreeMap<String, String>,
}

impl NewItem {
    /// A new item of type `findings` carrying `report`.
    pub fn new(report: Payload) -> Self {
        NewItem {
            report,
            item_type: ItemType::Findings,
            id: None,
            fingerprint: None,
            max_attempts: None,
            agent_id: String::new(),
            scanner_name: String::new(),
            target_path: String::new(),
            next_retry: None,
            attributes: BTreeMap::new(),
        }
    }

    /// A new item from JSON bytes (validated).
    pub fn from_json(bytes: &[u8]) -> QueueResult<Self> {
        Ok(Self::new(Payload::from_json_bytes(bytes)?))
    }

    /// Sets the type.
    pub fn with_type(mut self, t: impl Into<ItemType>) -> Self {
        self.item_type = t.into();
        self
    }

    /// Sets a caller-chosen ID.
    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }

    /// Sets a caller-chosen fingerprint.
    pub fn with_fingerprint(mut self, fp: impl Into<String>) -> Self {
        self.fingerprint = Some(fp.into());
        self
    }

    /// Sets the attempts allowed.
    pub fn with_max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = Some(n);
        self
    }

    /// Adds an attribute.
    pub fn with_attribute(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.attributes.insert(key.into(), value.into());
        self
    }

    /// Validates the caller's choices and builds the stored item at `now`.
    pub fn into_item(
        self,
        now: DateTime<Utc>,
        default_max_attempts: u32,
    ) -> QueueResult<QueueItem> {
        let id = match self.id {
            Some(id) => {
                validate_id(&id)?;
                id
            }
            None => new_id(),
        };
        let fingerprint = match self.fingerprint {
            Some(fp) if fp.trim().is_empty() => {
                return Err(QueueError::invalid("fingerprint is empty"))
            }
            Some(fp) if fp.len() > 256 => {
                return Err(QueueError::invalid(format!(
                    "fingerprint is {} characters long, the limit is 256",
                    fp.len()
                )))
            }
            Some(fp) => fp,
            None => self.report.fingerprint(),
        };
        let max_attempts = self.max_attempts.unwrap_or(default_max_attempts);
        if max_attempts == 0 {
            return Err(QueueError::invalid("max_attempts must be at least 1"));
        }
        if self.item_type.as_str().is_empty() {
            return Err(QueueError::invalid("type is empty"));
        }
        Ok(QueueItem {
            id,
            item_type: self.item_type,
            fingerprint,
            status: ItemStatus::Pending,
            report: self.report,
            attempts: 0,
            max_attempts,
            last_error: String::new(),
            last_attempt: None,
            next_retry: self.next_retry.unwrap_or(now),
            created_at: now,
            updated_at: now,
            agent_id: self.agent_id,
            scanner_name: self.scanner_name,
            target_path: self.target_path,
            lease_until: None,
            lease_owner: None,
            attributes: self.attributes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_view_always_has_its_size_and_the_report_only_when_asked() {
        let item = NewItem::from_json(br#"{"finding":"x"}"#)
            .unwrap()
            .into_item(Utc::now(), 5)
            .unwrap();
        let bare = item.view_json(false).unwrap();
        assert!(bare.get("report").is_none(), "{bare}");
        assert_eq!(bare["size_bytes"], item.size_bytes());
        assert_eq!(bare["id"], item.id.as_str());
        let full = item.view_json(true).unwrap();
        assert_eq!(full["report"]["finding"], "x", "{full}");
        assert_eq!(full["size_bytes"], item.size_bytes());
    }

    fn fresh_ids() -> IdState {
        IdState {
            millis: 0,
            counter: 0,
            rng: Some((std::process::id(), fastrand::Rng::with_seed(7))),
        }
    }

    #[test]
    fn new_ids_are_uuid_v7_with_this_millisecond_and_sort_as_made() {
        let before = chrono::Utc::now().timestamp_millis() as u64;
        let ids: Vec<String> = (0..10_000).map(|_| new_id()).collect();
        let after = chrono::Utc::now().timestamp_millis() as u64;
        for id in &ids {
            let uuid = uuid::Uuid::parse_str(id).unwrap();
            assert_eq!(uuid.get_version_num(), 7, "{id}");
            assert_eq!(uuid.get_variant(), uuid::Variant::RFC4122, "{id}");
            let (secs, nanos) = uuid.get_timestamp().unwrap().to_unix();
            let millis = secs * 1000 + u64::from(nanos) / 1_000_000;
            assert!(millis >= before, "{id} is older than the test");
            // A counter overflow may borrow a millisecond or two ahead.
            assert!(millis <= after + 2, "{id} is from the future");
        }
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "strictly increasing");
    }

    #[test]
    fn ids_keep_their_order_when_the_clock_steps_back_or_stands_still() {
        let mut ids = fresh_ids();
        let a = ids.next(1_000);
        let b = ids.next(1_000);
        let c = ids.next(400); // the clock stepped back
        let d = ids.next(1_001);
        assert!(a < b && b < c && c < d, "{a} {b} {c} {d}");
        assert_eq!(c.get_timestamp().unwrap().to_unix(), (1, 0));
    }

    #[test]
    fn a_full_counter_borrows_the_next_millisecond() {
        let mut ids = fresh_ids();
        ids.next(5_000);
        ids.counter = (1 << IdState::COUNTER_BITS) - 2;
        let last_in_ms = ids.next(5_000); // the counter's last value
        assert_eq!(last_in_ms.get_timestamp().unwrap().to_unix(), (5, 0));
        let borrowed = ids.next(5_000);
        assert!(borrowed > last_in_ms);
        assert_eq!(ids.millis, 5_001);
        assert_eq!(ids.counter, 0);
        assert_eq!(borrowed.get_timestamp().unwrap().to_unix(), (5, 1_000_000));
        assert!(
            ids.next(5_000) > borrowed,
            "still increasing after the borrow"
        );
    }

    #[test]
    fn a_forked_child_reseeds_instead_of_continuing_its_parents_sequence() {
        let mut ids = fresh_ids();
        ids.next(9_000);
        ids.counter = 5;
        // As a child sees its parent's state: seeded in another process.
        ids.rng.as_mut().unwrap().0 = std::process::id().wrapping_add(1);
        let first_in_child = ids.next(9_000);
        assert_eq!(ids.rng.as_ref().unwrap().0, std::process::id(), "reseeded");
        assert_ne!(ids.counter, 6, "the parent's next counter value");
        assert_eq!(first_in_child.get_timestamp().unwrap().to_unix(), (9, 0));
    }

    #[test]
    fn threads_never_share_an_id() {
        let handles: Vec<_> = (0..4)
            .map(|_| std::thread::spawn(|| (0..5_000).map(|_| new_id()).collect::<Vec<_>>()))
            .collect();
        let mut all = std::collections::HashSet::new();
        for h in handles {
            for id in h.join().unwrap() {
                assert!(all.insert(id.clone()), "{id} made twice");
            }
        }
        assert_eq!(all.len(), 20_000);
    }

    #[test]
    fn ids_are_validated_exactly() {
        assert!(validate_id("abc-DEF_123").is_ok());
        assert!(validate_id(&new_id()).is_ok());
        for bad in ["", "../etc", "a/b", "a.b", "a\0b", &"x".repeat(65)] {
            assert!(validate_id(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn payload_is_compacted_in_document_order() {
        let p = Payload::from_json_str("{ \"b\" : 1,\n \"a\": \"x y\\\" z\" }").unwrap();
        assert_eq!(p.as_str(), r#"{"b":1,"a":"x y\" z"}"#);
        assert!(Payload::from_json_str("{").is_err());
        assert!(Payload::from_json_str("{} {}").is_err());
    }

    #[test]
    fn default_fingerprint_is_sha256_of_compact_payload() {
        let p = Payload::from_json_str("{\"a\": 1}").unwrap();
        assert_eq!(p.fingerprint(), sha256_hex(b"{\"a\":1}"));
    }

    #[test]
    fn sha256_hex_is_the_known_digest() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    fn any_json() -> impl proptest::strategy::Strategy<Value = serde_json::Value> {
        use proptest::prelude::*;
        use serde_json::Value;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            // Any text: quotes, backslashes, control characters, whitespace
            // and multi-byte characters, all of which must survive.
            any::<String>().prop_map(Value::String),
            "[ \\t\\n\"\\\\a-zé€😀]{0,12}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                proptest::collection::btree_map("[ a-z\"\\\\]{0,6}", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest::proptest! {
        /// Compacting a pretty-printed document gives exactly what serde
        /// writes compactly: no byte inside a string changes, no whitespace
        /// between tokens stays.
        #[test]
        fn compaction_matches_serde_compact_output(value in any_json()) {
            let pretty = serde_json::to_string_pretty(&value).unwrap();
            let compact = serde_json::to_string(&value).unwrap();
            proptest::prop_assert_eq!(compact_json(&pretty), compact.clone());
            proptest::prop_assert_eq!(compact_json(&compact), compact);
        }
    }

    #[test]
    fn expiry_and_exhaustion() {
        let now = Utc::now();
        let item = NewItem::from_json(b"{}")
            .unwrap()
            .into_item(now, 3)
            .unwrap();
        assert!(item.is_ready_for_retry(now));
        assert!(!item.has_exhausted_retries());
        assert!(!item.is_expired(std::time::Duration::from_secs(60), now));
        assert!(item.is_expired(
            std::time::Duration::from_secs(60),
            now + ChronoDuration::seconds(61)
        ));
        assert!(!item.is_expired(std::time::Duration::MAX, now));
    }
}
