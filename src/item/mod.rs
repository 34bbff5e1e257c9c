//! The queue item: what is stored, its identity (ID, fingerprint) and its
//! delivery state.
//!
//! Field names follow the Go SDK's `QueueItem` so JSON written by either side
//! reads on the other ([`wire`]). The payload (the seed's `report`) lives in
//! [`payload`], the ID rule and generator in [`id`], the state and every
//! change of it in [`state`].

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Duration as ChronoDuration, Utc};
use serde::{Deserialize, Serialize};

use crate::error::{QueueError, QueueResult};

pub mod id;
pub mod payload;
pub mod sealed_form;
pub mod state;
pub mod wire;

pub use id::{ItemId, MAX_ID_LEN};
pub use payload::{compact_json, payload_checksum, sha256_hex, Payload};
pub use state::{ItemState, ItemStatus};
pub use wire::ItemRecord;

/// Default number of delivery attempts before an item becomes a dead letter.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 10;

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

/// One report waiting for delivery, with its delivery state.
///
/// JSON shows it in the flat form of the Go SDK ([`ItemRecord`]); its
/// state changes only through the methods in [`state`].
#[derive(Debug, Clone, PartialEq)]
pub struct QueueItem {
    /// A UUIDv7 unless the caller chose one.
    pub id: ItemId,
    /// What kind of report it is.
    pub item_type: ItemType,
    /// Identity of the content for deduplication (SHA-256 of the payload by default).
    pub fingerprint: String,
    state: ItemState,
    /// The JSON document the producer handed in, sent upstream as is.
    pub report: Payload,
    /// Delivery attempts made so far (every failed push counts one).
    pub attempts: u32,
    /// Attempts allowed before the item becomes a dead letter.
    pub max_attempts: u32,
    /// The reason of the last failure, empty if none.
    pub last_error: String,
    /// `None` before the first attempt.
    pub last_attempt: Option<DateTime<Utc>>,
    /// When the item is next due.
    pub next_retry: DateTime<Utc>,
    /// When it was enqueued.
    pub created_at: DateTime<Utc>,
    /// When its state last changed.
    pub updated_at: DateTime<Utc>,
    /// The producing agent, free text.
    pub agent_id: String,
    /// The producing scanner, free text.
    pub scanner_name: String,
    /// What was scanned, free text.
    pub target_path: String,
    /// Free-form attributes for transports (headers, routing...).
    pub attributes: BTreeMap<String, String>,
}

impl QueueItem {
    /// True when the item is pending and due at `now`.
    pub fn is_ready_for_retry(&self, now: DateTime<Utc>) -> bool {
        self.state == ItemState::Pending && self.next_retry <= now
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
    /// The JSON document to deliver.
    pub report: Payload,
    /// Report type (default `findings`).
    pub item_type: ItemType,
    /// A caller-chosen ID; a UUIDv7 when `None`.
    pub id: Option<ItemId>,
    /// A caller-chosen fingerprint; SHA-256 of the payload when `None`.
    pub fingerprint: Option<String>,
    /// Attempts allowed; the store's default when `None`.
    pub max_attempts: Option<u32>,
    /// Free text naming the agent that produced the report.
    pub agent_id: String,
    /// Free text naming the scanner that produced the report.
    pub scanner_name: String,
    /// What the scanner looked at (a path or a host), as free text for the upstream.
    pub target_path: String,
    /// First due time; now when `None`.
    pub next_retry: Option<DateTime<Utc>>,
    /// Free-form attributes for transports (headers, routing...), stored as given.
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
    pub fn with_id(mut self, id: ItemId) -> Self {
        self.id = Some(id);
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
        let id = self.id.unwrap_or_else(ItemId::generate);
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
            state: ItemState::Pending,
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
