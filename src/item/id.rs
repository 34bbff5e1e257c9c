//! Item IDs: [`ItemId`], checked once where an ID enters the program (a
//! request path, a command line, a new item, a stored record), and the
//! UUIDv7 generator for the IDs the queue chooses itself.

use std::borrow::Borrow;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::{QueueError, QueueResult};

/// Longest caller-chosen ID that is not a UUID.
pub const MAX_ID_LEN: usize = 64;

/// An item's ID: a UUID, or 1 to 64 of `[A-Za-z0-9_-]`.
///
/// The rule guarantees an ID can never name a path outside the queue
/// directory (no `/`, `.`, `\` or NUL); IDs compare exactly. Holding an
/// `ItemId` means the check was made, so no call site repeats it. Cheap to
/// clone (shared); JSON and SQLite see a plain string.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ItemId(Arc<str>);

impl ItemId {
    /// Checks `id` against the rule above.
    pub fn parse(id: &str) -> QueueResult<Self> {
        check(id)?;
        Ok(ItemId(Arc::from(id)))
    }

    /// A new ID: a UUIDv7, so IDs sort by creation time (strictly, within
    /// this process).
    pub fn generate() -> Self {
        let millis = chrono::Utc::now().timestamp_millis().max(0) as u64;
        let mut ids = ID_STATE.lock().unwrap_or_else(|p| p.into_inner());
        ItemId(Arc::from(ids.next(millis).to_string()))
    }

    /// The ID as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn check(id: &str) -> QueueResult<()> {
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

impl fmt::Display for ItemId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ItemId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl std::str::FromStr for ItemId {
    type Err = QueueError;
    fn from_str(s: &str) -> QueueResult<Self> {
        ItemId::parse(s)
    }
}

impl TryFrom<&str> for ItemId {
    type Error = QueueError;
    fn try_from(s: &str) -> QueueResult<Self> {
        ItemId::parse(s)
    }
}

impl TryFrom<String> for ItemId {
    type Error = QueueError;
    fn try_from(s: String) -> QueueResult<Self> {
        check(&s)?;
        Ok(ItemId(Arc::from(s)))
    }
}

impl From<ItemId> for String {
    fn from(id: ItemId) -> Self {
        id.0.as_ref().to_owned()
    }
}

// Read-only access to the text (`len`, slicing, `&str` arguments): an
// `ItemId` can only be made through the check, never changed after.
impl std::ops::Deref for ItemId {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for ItemId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

// Hash and Eq are those of the text (derived through `Arc<str>`), so maps
// keyed by `ItemId` can be looked up with a `&str`.
impl Borrow<str> for ItemId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl PartialEq<str> for ItemId {
    fn eq(&self, other: &str) -> bool {
        &*self.0 == other
    }
}

impl PartialEq<&str> for ItemId {
    fn eq(&self, other: &&str) -> bool {
        &*self.0 == *other
    }
}

impl PartialEq<String> for ItemId {
    fn eq(&self, other: &String) -> bool {
        *self.0 == **other
    }
}

impl PartialEq<ItemId> for &str {
    fn eq(&self, other: &ItemId) -> bool {
        **self == *other.0
    }
}

impl PartialEq<ItemId> for String {
    fn eq(&self, other: &ItemId) -> bool {
        **self == *other.0
    }
}

impl Serialize for ItemId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for ItemId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        ItemId::try_from(s).map_err(serde::de::Error::custom)
    }
}

impl rusqlite::ToSql for ItemId {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        Ok(rusqlite::types::ToSqlOutput::from(self.as_str()))
    }
}

// A row whose ID breaks the rule is refused like any undecodable column.
impl rusqlite::types::FromSql for ItemId {
    fn column_result(value: rusqlite::types::ValueRef<'_>) -> rusqlite::types::FromSqlResult<Self> {
        let text = value.as_str()?;
        ItemId::parse(text).map_err(|e| rusqlite::types::FromSqlError::Other(Box::new(e)))
    }
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

#[cfg(test)]
mod tests {
    use super::*;

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
        let ids: Vec<ItemId> = (0..10_000).map(|_| ItemId::generate()).collect();
        let after = chrono::Utc::now().timestamp_millis() as u64;
        for id in &ids {
            let uuid = uuid::Uuid::parse_str(id.as_str()).unwrap();
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
            .map(|_| {
                std::thread::spawn(|| (0..5_000).map(|_| ItemId::generate()).collect::<Vec<_>>())
            })
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
        assert!(ItemId::parse("abc-DEF_123").is_ok());
        assert!(ItemId::parse(ItemId::generate().as_str()).is_ok());
        assert!(ItemId::parse("3F1C2B9E-6A4D-4C1E-9B7A-0D2E5F8A1C04").is_ok());
        assert!(ItemId::parse(&"x".repeat(64)).is_ok());
        for bad in [
            "",
            "../etc",
            "a/b",
            "a.b",
            "a\0b",
            "a b",
            "é",
            &"x".repeat(65),
        ] {
            let err = ItemId::parse(bad).unwrap_err();
            assert_eq!(err.kind(), "invalid_item", "{bad:?}");
            assert!(ItemId::try_from(bad.to_owned()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn json_is_a_plain_string_and_decoding_checks_the_rule() {
        let id = ItemId::parse("abc").unwrap();
        assert_eq!(serde_json::to_string(&id).unwrap(), r#""abc""#);
        assert_eq!(serde_json::from_str::<ItemId>(r#""abc""#).unwrap(), id);
        let err = serde_json::from_str::<ItemId>(r#""../x""#).unwrap_err();
        assert!(err.to_string().contains("'.'"), "{err}");
    }

    #[test]
    fn a_map_keyed_by_id_is_looked_up_by_text() {
        let mut map = std::collections::HashMap::new();
        map.insert(ItemId::parse("abc").unwrap(), 1);
        assert_eq!(map.get("abc"), Some(&1));
        assert_eq!(map.get("ab"), None);
        let id = ItemId::parse("abc").unwrap();
        assert!(id == "abc");
        assert!("abc" == id);
        let text: String = "abc".into();
        assert!(id == text);
        assert!(id != "ab");
        assert_eq!(id.to_string(), "abc");
        assert_eq!(format!("{id:?}"), r#""abc""#);
    }

    #[test]
    fn sqlite_reads_back_what_it_stored_and_refuses_a_bad_row() {
        let db = rusqlite::Connection::open_in_memory().unwrap();
        let id = ItemId::parse("row-1").unwrap();
        let back: ItemId = db.query_row("SELECT ?1", [&id], |r| r.get(0)).unwrap();
        assert_eq!(back, id);
        let bad: rusqlite::Result<ItemId> = db.query_row("SELECT 'a/b'", [], |r| r.get(0));
        assert!(bad.is_err());
    }
}
