//! The flat form of an item ([`ItemRecord`]): the Go SDK's JSON fields,
//! with `status` beside an optional `lease_until`. It is what the API
//! shows, what JSON decodes into, and what stores that keep the flat form
//! (the files' JSON, SQLite's columns) build items from: the state enum is
//! rebuilt from it here, in one place.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::ser::SerializeStruct;
use serde::{Deserialize, Serialize};

use super::{ItemId, ItemState, ItemStatus, ItemType, Payload, QueueItem};

/// An item as its fields are written down. Field names and meanings are
/// the Go SDK's `QueueItem`'s; `lease_until`, `lease_owner` and
/// `attributes` are ours (the Go SDK ignores them).
#[derive(Debug, Clone, PartialEq, Deserialize, utoipa::ToSchema)]
pub struct ItemRecord {
    /// A UUIDv7 unless the caller chose one (see [`ItemId`]).
    #[schema(value_type = String)]
    pub id: ItemId,
    /// What kind of report it is (`findings`, `assets`, `heartbeat`, or
    /// any other name).
    #[serde(rename = "type")]
    #[schema(value_type = String)]
    pub item_type: ItemType,
    /// Identity of the content for deduplication (SHA-256 of the payload by default).
    pub fingerprint: String,
    /// Where the item is in its life.
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
    /// `None` before the first attempt.
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
    /// While `processing`: the time the claim expires and the item returns
    /// to pending. Ignored beside any other status.
    #[serde(default)]
    pub lease_until: Option<DateTime<Utc>>,
    /// While `processing`: the instance that claimed it (see
    /// [`crate::store::owner`]).
    #[serde(default)]
    pub lease_owner: Option<String>,
    /// Free-form attributes for transports (headers, routing...).
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
}

impl From<ItemRecord> for QueueItem {
    fn from(r: ItemRecord) -> Self {
        QueueItem {
            state: ItemState::from_stored(r.status, r.lease_until, r.lease_owner, r.updated_at),
            id: r.id,
            item_type: r.item_type,
            fingerprint: r.fingerprint,
            report: r.report,
            attempts: r.attempts,
            max_attempts: r.max_attempts,
            last_error: r.last_error,
            last_attempt: r.last_attempt,
            next_retry: r.next_retry,
            created_at: r.created_at,
            updated_at: r.updated_at,
            agent_id: r.agent_id,
            scanner_name: r.scanner_name,
            target_path: r.target_path,
            attributes: r.attributes,
        }
    }
}

// The one listing of an item's flat fields read from the item: the files
// backend writes its JSON from this (see `store::file::record`).
impl From<&QueueItem> for ItemRecord {
    fn from(item: &QueueItem) -> Self {
        ItemRecord {
            id: item.id.clone(),
            item_type: item.item_type.clone(),
            fingerprint: item.fingerprint.clone(),
            status: item.status(),
            report: item.report.clone(),
            attempts: item.attempts,
            max_attempts: item.max_attempts,
            last_error: item.last_error.clone(),
            last_attempt: item.last_attempt,
            next_retry: item.next_retry,
            created_at: item.created_at,
            updated_at: item.updated_at,
            agent_id: item.agent_id.clone(),
            scanner_name: item.scanner_name.clone(),
            target_path: item.target_path.clone(),
            lease_until: item.lease_until(),
            lease_owner: item.lease_owner().map(str::to_owned),
            attributes: item.attributes.clone(),
        }
    }
}

// By hand rather than through an `ItemRecord` copy: the API and the plugin
// host serialize every item they show or send.
impl Serialize for QueueItem {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut out = s.serialize_struct("QueueItem", 18)?;
        out.serialize_field("id", &self.id)?;
        out.serialize_field("type", &self.item_type)?;
        out.serialize_field("fingerprint", &self.fingerprint)?;
        out.serialize_field("status", &self.status())?;
        out.serialize_field("report", &self.report)?;
        out.serialize_field("attempts", &self.attempts)?;
        out.serialize_field("max_attempts", &self.max_attempts)?;
        out.serialize_field("last_error", &self.last_error)?;
        out.serialize_field("last_attempt", &self.last_attempt)?;
        out.serialize_field("next_retry", &self.next_retry)?;
        out.serialize_field("created_at", &self.created_at)?;
        out.serialize_field("updated_at", &self.updated_at)?;
        out.serialize_field("agent_id", &self.agent_id)?;
        out.serialize_field("scanner_name", &self.scanner_name)?;
        out.serialize_field("target_path", &self.target_path)?;
        match &self.state {
            ItemState::Processing { lease_until, owner } => {
                out.serialize_field("lease_until", lease_until)?;
                match owner {
                    Some(owner) => out.serialize_field("lease_owner", owner)?,
                    None => out.skip_field("lease_owner")?,
                }
            }
            ItemState::Pending | ItemState::Failed => {
                out.skip_field("lease_until")?;
                out.skip_field("lease_owner")?;
            }
        }
        if self.attributes.is_empty() {
            out.skip_field("attributes")?;
        } else {
            out.serialize_field("attributes", &self.attributes)?;
        }
        out.end()
    }
}

impl<'de> Deserialize<'de> for QueueItem {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        ItemRecord::deserialize(d).map(QueueItem::from)
    }
}

// The API documents the flat form, under the item's name.
impl utoipa::PartialSchema for QueueItem {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        <ItemRecord as utoipa::PartialSchema>::schema()
    }
}

impl utoipa::ToSchema for QueueItem {
    fn name() -> std::borrow::Cow<'static, str> {
        "QueueItem".into()
    }

    fn schemas(
        schemas: &mut Vec<(
            String,
            utoipa::openapi::RefOr<utoipa::openapi::schema::Schema>,
        )>,
    ) {
        <ItemRecord as utoipa::ToSchema>::schemas(schemas);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::item::NewItem;

    fn t(secs: i64) -> DateTime<Utc> {
        DateTime::<Utc>::UNIX_EPOCH + chrono::Duration::seconds(1_800_000_000 + secs)
    }

    #[test]
    fn json_keeps_the_flat_fields_and_reads_back_the_same_item() {
        let mut item = NewItem::from_json(br#"{"a":1}"#)
            .unwrap()
            .with_id(ItemId::parse("w-1").unwrap())
            .with_attribute("k", "v")
            .into_item(t(0), 3)
            .unwrap();
        let pending = serde_json::to_value(&item).unwrap();
        assert_eq!(pending["status"], "pending");
        assert!(pending.get("lease_until").is_none(), "{pending}");
        assert!(pending.get("lease_owner").is_none(), "{pending}");
        assert_eq!(pending["attributes"]["k"], "v");
        assert_eq!(pending["type"], "findings");
        item.claim(t(30), "me", t(1)).unwrap();
        let text = serde_json::to_string(&item).unwrap();
        let claimed: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(claimed["status"], "processing");
        assert_eq!(claimed["lease_owner"], "me");
        assert_eq!(claimed["lease_until"], serde_json::to_value(t(30)).unwrap());
        let back: QueueItem = serde_json::from_str(&text).unwrap();
        assert_eq!(back, item);
    }

    #[test]
    fn the_flat_form_of_an_item_builds_the_same_item() {
        let mut item = NewItem::from_json(br#"{"a":1}"#)
            .unwrap()
            .with_attribute("k", "v")
            .into_item(t(0), 3)
            .unwrap();
        assert_eq!(QueueItem::from(ItemRecord::from(&item)), item);
        item.claim(t(30), "me", t(1)).unwrap();
        let record = ItemRecord::from(&item);
        assert_eq!(
            (
                record.status,
                record.lease_until,
                record.lease_owner.as_deref()
            ),
            (ItemStatus::Processing, Some(t(30)), Some("me"))
        );
        assert_eq!(QueueItem::from(record), item);
    }

    #[test]
    fn decoding_checks_the_id_and_drops_a_lease_beside_another_status() {
        let mut value = serde_json::to_value(
            NewItem::from_json(b"{}")
                .unwrap()
                .into_item(t(0), 3)
                .unwrap(),
        )
        .unwrap();
        value["lease_until"] = serde_json::to_value(t(9)).unwrap();
        let item: QueueItem = serde_json::from_value(value.clone()).unwrap();
        assert_eq!(item.state(), &ItemState::Pending);
        value["id"] = "../escape".into();
        assert!(serde_json::from_value::<QueueItem>(value).is_err());
    }
}
