//! The on-disk record: the Go SDK's `QueueItem` JSON plus our extra fields,
//! and the file naming rule `{created_at unix nanos}_{id}.json`.

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Utc};
use serde::de::value::{MapAccessDeserializer, StringDeserializer};
use serde::de::{self, DeserializeSeed, IntoDeserializer, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

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
    use serde::Serializer;

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

/// One item file's JSON: the Go SDK's fields ([`GoForm`]), then our
/// `checksum`.
#[derive(Debug, Serialize)]
pub(crate) struct FileRecord {
    // Flattened for writing only: serde_json writes the report's raw JSON
    // straight through. Reading goes by hand (below), because a flattened
    // read buffers every value and the report's `RawValue` cannot be read
    // back from that buffer.
    #[serde(flatten, with = "GoForm")]
    record: ItemRecord,
    /// CRC-32 of the compact report bytes; absent in files the Go SDK wrote.
    #[serde(skip_serializing_if = "Option::is_none")]
    checksum: Option<u32>,
}

/// How an [`ItemRecord`] is written in an item file: the Go SDK's field
/// names and order, and Go's zero time for "never"; `lease_until`,
/// `lease_owner` and `attributes` are ours (Go ignores unknown fields).
/// serde's remote derive writes the conversions to and from `ItemRecord`,
/// so each field is named once here, and a field `ItemRecord` gains does
/// not compile until this form says how it is stored.
#[derive(Serialize, Deserialize)]
#[serde(remote = "ItemRecord")]
struct GoForm {
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
}

impl From<&QueueItem> for FileRecord {
    fn from(item: &QueueItem) -> Self {
        let record = ItemRecord::from(item);
        // JSON files hold JSON: a binary sealed payload is written as its
        // envelope (a payload serializes as its text form, `as_str`), and
        // checksummed as that text.
        let checksum = payload_checksum(record.report.as_str().as_bytes());
        FileRecord {
            record,
            checksum: Some(checksum),
        }
    }
}

impl<'de> Deserialize<'de> for FileRecord {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(FileRecordVisitor)
    }
}

/// Reads an item file in one pass: [`GoForm`] reads the object's keys
/// while [`ChecksumAside`] takes `checksum` out of its way.
struct FileRecordVisitor;

impl<'de> Visitor<'de> for FileRecordVisitor {
    type Value = FileRecord;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an item record")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<FileRecord, A::Error> {
        let mut keys = ChecksumAside {
            map,
            checksum: None,
        };
        let record = GoForm::deserialize(MapAccessDeserializer::new(&mut keys))?;
        Ok(FileRecord {
            record,
            checksum: keys.checksum.flatten(),
        })
    }
}

/// The keys of an item file but `checksum`, whose value it keeps.
struct ChecksumAside<A> {
    map: A,
    /// `Some` once the key was seen (its value may be `null`).
    checksum: Option<Option<u32>>,
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for ChecksumAside<A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, A::Error> {
        while let Some(key) = self.map.next_key::<String>()? {
            if key != "checksum" {
                let key: StringDeserializer<A::Error> = key.into_deserializer();
                return seed.deserialize(key).map(Some);
            }
            if self.checksum.is_some() {
                return Err(de::Error::duplicate_field("checksum"));
            }
            self.checksum = Some(self.map.next_value()?);
        }
        Ok(None)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, A::Error> {
        self.map.next_value_seed(seed)
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
    let FileRecord { record, checksum } = record;
    if record.id != expected_id {
        return Err(format!(
            "record holds id {:?} but its file name says {expected_id:?}",
            record.id
        ));
    }
    if let Some(stored) = checksum {
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

    fn item(report: &[u8]) -> QueueItem {
        NewItem::from_json(report)
            .unwrap()
            .into_item(Utc::now(), 10)
            .unwrap()
    }

    #[test]
    fn round_trip_writes_go_zero_time_and_checksum() {
        let item = item(br#"{"a": [1, 2]}"#);
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
        let item = item(br#"{"a":1}"#);
        let text = String::from_utf8(encode(&item).unwrap()).unwrap();
        let tampered = text.replace(r#"{"a":1}"#, r#"{"a":2}"#);
        assert_ne!(text, tampered);
        let err = decode(tampered.as_bytes(), &item.id).unwrap_err();
        assert!(err.contains("checksum"), "{err}");
    }

    #[test]
    fn checksum_is_read_wherever_it_stands_once_and_may_be_absent() {
        let item = item(br#"{"a":1}"#);
        let text = String::from_utf8(encode(&item).unwrap()).unwrap();
        let mut value: serde_json::Value = serde_json::from_str(&text).unwrap();
        let checksum = value["checksum"].clone();
        let object = value.as_object_mut().unwrap();
        object.remove("checksum");
        // The record as the Go SDK writes it (no checksum), with `fields` first.
        let go_shaped = serde_json::to_string(&object).unwrap();
        let with = |fields: &str| go_shaped.replacen('{', &format!("{{{fields},"), 1);
        let read = |text: String| decode(text.as_bytes(), &item.id);
        // Anywhere, beside a field Go or a later retryq added: still checked.
        let first = format!(r#""checksum":{checksum},"extra":[1]"#);
        assert_eq!(read(with(&first)).unwrap(), item);
        assert!(read(with(r#""checksum":1"#))
            .unwrap_err()
            .contains("checksum"));
        // Absent or null: not checked.
        assert_eq!(read(go_shaped.clone()).unwrap(), item);
        assert_eq!(read(with(r#""checksum":null"#)).unwrap(), item);
        // Twice: refused, like any other field named twice.
        let twice = format!(r#""checksum":{checksum},"checksum":{checksum}"#);
        let err = read(with(&twice)).unwrap_err();
        assert!(err.contains("duplicate field `checksum`"), "{err}");
        let err = read(with(&format!(r#""id":"{}""#, item.id))).unwrap_err();
        assert!(err.contains("duplicate field `id`"), "{err}");
        // Not an object, or missing a field: refused with the reason.
        assert!(read("[]".into()).unwrap_err().contains("an item record"));
        let err = read(r#"{"checksum":5}"#.into()).unwrap_err();
        assert!(err.contains("missing field `id`"), "{err}");
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
