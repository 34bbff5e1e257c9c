//! The on-disk record: the Go SDK's `QueueItem` JSON plus our extra fields,
//! and the file naming rule `{created_at unix nanos}_{id}.json`.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::item::{payload_checksum, ItemId, ItemRecord, ItemStatus, ItemType, Payload, QueueItem};

/// Go's zero `time.Time`, which the Go SDK writes for "never".
pub(crate) const GO_ZERO_TIME: &str = "0001-01-01T00:00:00Z";
/// Unix seconds of [`GO_ZERO_TIME`].
const GO_ZERO_UNIX_SECS: i64 = -62_135_596_800;

/// Suffix of item files.
pub(crate) const ITEM_SUFFIX: &str = ".json";
/// Suffix of temporary files (written, synced, then renamed into place).
pub(crate) const TMP_SUFFIX: &str = ".tmp";

/// Serde for an optional time written the Go way: `None` is the zero time.
mod go_time {
    use super::*;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => t.serialize(s),
            None => s.serialize_str(GO_ZERO_TIME),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<DateTime<Utc>>, D::Error> {
        let t: Option<DateTime<Utc>> = Option::deserialize(d)?;
        Ok(t.filter(|t| !is_go_zero(t)))
    }

    fn is_go_zero(t: &DateTime<Utc>) -> bool {
        t.timestamp() == GO_ZERO_UNIX_SECS && t.timestamp_subsec_nanos() == 0
    }
}

/// One item file's JSON. Field names and order are the Go SDK's; `lease_until`,
/// `attributes` and `checksum` are ours (Go ignores unknown fields).
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct FileRecord {
    /// Checked as it is read: a file naming a bad ID is refused.
    id: ItemId,
    #[serde(rename = "type")]
    item_type: ItemType,
    fingerprint: String,
    status: ItemStatus,
    report: Payload,
    attempts: u32,
    max_attempts: u32,
    #[serde(default)]
    last_error: String,
    #[serde(default, with = "go_time")]
    last_attempt: Option<DateTime<Utc>>,
    next_retry: DateTime<Utc>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    #[serde(default)]
    agent_id: String,
    #[serde(default)]
    scanner_name: String,
    #[serde(default)]
    target_path: String,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "go_time::deserialize"
    )]
    lease_until: Option<DateTime<Utc>>,
    /// retryq's own field (the Go SDK ignores it): the claiming instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    lease_owner: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    attributes: BTreeMap<String, String>,
    /// CRC-32 of the compact report bytes; absent in files the Go SDK wrote.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    checksum: Option<u32>,
}

impl From<&QueueItem> for FileRecord {
    fn from(item: &QueueItem) -> Self {
        FileRecord {
            id: item.id.clone(),
            item_type: item.item_type.clone(),
            fingerprint: item.fingerprint.clone(),
            status: item.status(),
            // JSON files hold JSON: a binary sealed payload is written as
            // its envelope, and checksummed as that text.
            report: item.report.to_text_form(),
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
            checksum: Some(payload_checksum(item.report.as_str().as_bytes())),
        }
    }
}

impl From<FileRecord> for QueueItem {
    fn from(r: FileRecord) -> Self {
        QueueItem::from(ItemRecord {
            id: r.id,
            item_type: r.item_type,
            fingerprint: r.fingerprint,
            status: r.status,
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
            lease_until: r.lease_until,
            lease_owner: r.lease_owner,
            attributes: r.attributes,
        })
    }
}

/// Serializes an item as its file's bytes (indented JSON, like Go's
/// `json.MarshalIndent`).
pub(crate) fn encode(item: &QueueItem) -> Result<Vec<u8>, serde_json::Error> {
    let mut bytes = serde_json::to_vec_pretty(&FileRecord::from(item))?;
    bytes.push(b'\n');
    Ok(bytes)
}

/// Parses and verifies an item file. `expected_id` is the ID in the file
/// name: a record naming another item is foreign and refused.
pub(crate) fn decode(bytes: &[u8], expected_id: &str) -> Result<QueueItem, String> {
    let record: FileRecord =
        serde_json::from_slice(bytes).map_err(|e| format!("not a valid item record: {e}"))?;
    if record.id != expected_id {
        return Err(format!(
            "record holds id {:?} but its file name says {expected_id:?}",
            record.id
        ));
    }
    if let Some(stored) = record.checksum {
        let actual = payload_checksum(record.report.as_bytes());
        if stored != actual {
            return Err(format!(
                "report checksum mismatch: stored {stored:08x}, computed {actual:08x}"
            ));
        }
    }
    if record.max_attempts == 0 || record.fingerprint.is_empty() {
        return Err("record has max_attempts 0 or an empty fingerprint".to_owned());
    }
    Ok(record.into())
}

/// The file name of an item: `{created_at unix nanos}_{id}.json`.
pub(crate) fn file_name(item: &QueueItem) -> String {
    // `created_at` comes from the clock at enqueue; times past 2262 cannot
    // be nanoseconds in an i64, so they saturate (the name stays unique by ID).
    let nanos = item.created_at.timestamp_nanos_opt().unwrap_or(i64::MAX);
    format!("{nanos}_{}{ITEM_SUFFIX}", item.id)
}

/// The ID in an item file name, or `None` for a name that is not an item
/// file (foreign files are left alone).
pub(crate) fn parse_file_name(name: &str) -> Option<&str> {
    let stem = name.strip_suffix(ITEM_SUFFIX)?;
    let (nanos, id) = stem.split_once('_')?;
    let digits = nanos.strip_prefix('-').unwrap_or(nanos);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    ItemId::parse(id).ok()?;
    Some(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::item::NewItem;

    #[test]
    fn round_trip_writes_go_zero_time_and_checksum() {
        let item = NewItem::from_json(br#"{"a": [1, 2]}"#)
            .unwrap()
            .into_item(Utc::now(), 10)
            .unwrap();
        let bytes = encode(&item).unwrap();
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(text.contains(&format!("\"last_attempt\": \"{GO_ZERO_TIME}\"")));
        assert!(text.contains("\"checksum\""));
        assert!(!text.contains("lease_until"));
        assert_eq!(decode(&bytes, &item.id).unwrap(), item);
        assert!(decode(&bytes, "other").is_err());
    }

    #[test]
    fn checksum_mismatch_is_refused() {
        let item = NewItem::from_json(br#"{"a":1}"#)
            .unwrap()
            .into_item(Utc::now(), 10)
            .unwrap();
        let text = String::from_utf8(encode(&item).unwrap()).unwrap();
        let tampered = text.replace(r#"{"a":1}"#, r#"{"a":2}"#);
        assert_ne!(text, tampered);
        let err = decode(tampered.as_bytes(), &item.id).unwrap_err();
        assert!(err.contains("checksum"), "{err}");
    }

    #[test]
    fn file_names_parse_exactly() {
        assert_eq!(parse_file_name("123_abc.json"), Some("abc"));
        assert_eq!(parse_file_name("123_abc.json.tmp"), None);
        assert_eq!(parse_file_name("x_abc.json"), None);
        assert_eq!(parse_file_name("123_a.b.json"), None);
        assert_eq!(parse_file_name("notes.txt"), None);
    }
}
