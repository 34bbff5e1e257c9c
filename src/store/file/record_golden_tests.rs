//! The files backend's on-disk bytes, byte for byte: what `encode` writes
//! for items of every shape is compared with `record_golden.txt`, written
//! by the encoder before the file form was rebuilt on `ItemRecord`. A
//! change here is a change to what the Go SDK and older retryq read.

use chrono::DateTime;

use super::record::{decode, encode};
use crate::item::{ItemId, NewItem, Payload, QueueItem};

/// The golden file, one record after another (each ends in a newline).
const GOLDEN: &str = include_str!("record_golden.txt");

/// Items in every shape the file form distinguishes: never tried,
/// claimed with and without an owner, requeued, dead, with attributes
/// and free text, and a sealed payload held in its binary form.
fn golden_items() -> Vec<QueueItem> {
    let at = |secs: i64, nanos: u32| DateTime::from_timestamp(1_800_000_000 + secs, nanos).unwrap();
    let new = |id: &str, report: &[u8]| {
        NewItem::from_json(report)
            .unwrap()
            .with_id(ItemId::parse(id).unwrap())
    };
    let fresh = new("g-1", br#"{ "b": [1, 2.50, "\u00e9"], "a": null }"#)
        .into_item(at(0, 123_456_789), 10)
        .unwrap();
    let mut claimed = new("g-2", b"[]")
        .with_type("assets")
        .with_attribute("z", "last")
        .with_attribute("a", "first \"quoted\"")
        .into_item(at(1, 0), 3)
        .unwrap();
    claimed.agent_id = "agent-7".into();
    claimed.scanner_name = "scan".into();
    claimed.target_path = "/srv/é".into();
    claimed
        .claim(at(60, 500_000_000), "host-a", at(2, 0))
        .unwrap();
    // Claimed without an owner, as an older retryq's file reads back.
    let mut ownerless =
        serde_json::to_value(new("g-3", b"1").into_item(at(3, 0), 5).unwrap()).unwrap();
    ownerless["status"] = "processing".into();
    ownerless["lease_until"] = serde_json::to_value(at(90, 0)).unwrap();
    let ownerless: QueueItem = serde_json::from_value(ownerless).unwrap();
    let mut requeued = new("g-4", br#"{"x":"y"}"#).into_item(at(5, 0), 5).unwrap();
    requeued.claim(at(65, 0), "host-a", at(6, 0)).unwrap();
    requeued.requeue("upstream said 503\nretry", at(120, 7), at(7, 0));
    let mut dead = new("g-5", br#"{"x":1}"#)
        .with_fingerprint("fp-custom")
        .into_item(at(8, 0), 1)
        .unwrap();
    dead.claim(at(68, 0), "host-a", at(9, 0)).unwrap();
    dead.dead_letter("gone", at(10, 0));
    let sealed_bytes = crate::item::sealed_form::to_binary(
        "0123abcd",
        "g-6",
        &[7; 12],
        &[0xff, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],
    )
    .unwrap();
    let mut sealed = new("g-6", b"{}").into_item(at(11, 0), 2).unwrap();
    sealed.report = Payload::from_stored(sealed_bytes).unwrap();
    vec![fresh, claimed, ownerless, requeued, dead, sealed]
}

#[test]
fn encode_writes_the_golden_bytes() {
    assert_eq!(split(GOLDEN).len(), golden_items().len());
    let written: String = golden_items()
        .iter()
        .map(|item| String::from_utf8(encode(item).unwrap()).unwrap())
        .collect();
    // Compared record by record, so a failure names the first that differs.
    for (got, want) in split(&written).into_iter().zip(split(GOLDEN)) {
        assert_eq!(got, want);
    }
    assert_eq!(written, GOLDEN);
}

#[test]
fn golden_records_read_back_and_write_the_same_bytes() {
    for (item, record) in golden_items().into_iter().zip(split(GOLDEN)) {
        let read = decode(record.as_bytes(), &item.id).unwrap();
        // The sealed payload reads back in its text form (a JSON file holds
        // text); everything else is the item as written.
        let mut want = item.clone();
        want.report = Payload::from_stored(item.report.as_str().as_bytes().to_vec()).unwrap();
        assert_eq!(read, want, "{record}");
        assert_eq!(String::from_utf8(encode(&read).unwrap()).unwrap(), record);
    }
}

/// The records of a concatenation of item files.
fn split(text: &str) -> Vec<&str> {
    text.split_inclusive("\n}\n")
        .filter(|r| r.starts_with('{'))
        .collect()
}
