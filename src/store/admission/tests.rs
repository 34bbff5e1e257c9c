//! The planner's unit tests, on an in-memory read view.

use super::*;
use crate::item::ItemId;
use crate::item::{NewItem, Payload};
use chrono::TimeZone;

fn t(seconds: i64) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap() + chrono::Duration::seconds(seconds)
}

/// An item created at second `at`, with its ID as fingerprint unless
/// `fp` is given.
fn item_fp(id: &str, at: i64, fp: &str) -> QueueItem {
    NewItem::new(Payload::from_json_str("1").unwrap())
        .with_id(ItemId::parse(id).unwrap())
        .with_fingerprint(fp)
        .into_item(t(at), 3)
        .unwrap()
}

fn item(id: &str, at: i64) -> QueueItem {
    item_fp(id, at, id)
}

fn dead(id: &str, at: i64) -> QueueItem {
    let mut item = item(id, at);
    item.dead_letter("gone", t(at));
    item
}

/// A view over a plain list, counting the pages asked for.
#[derive(Default)]
struct ListView {
    items: Vec<QueueItem>,
    pages: usize,
    id_lookups: usize,
}

impl ListView {
    fn of(items: Vec<QueueItem>) -> Self {
        ListView {
            items,
            ..ListView::default()
        }
    }

    /// Persists an admission as an immediate backend does.
    fn store(&mut self, admitted: Admitted) -> Vec<String> {
        let (item, evict) = admitted.into_parts();
        let ids: Vec<String> = evict.into_iter().map(|v| v.id).collect();
        self.items.retain(|i| !ids.iter().any(|v| i.id == *v));
        self.items.push(item);
        ids
    }

    fn ids(&self) -> Vec<&str> {
        let mut ids: Vec<&str> = self.items.iter().map(|i| i.id.as_str()).collect();
        ids.sort();
        ids
    }
}

impl AdmissionView for ListView {
    fn id_exists(&mut self, id: &str) -> QueueResult<bool> {
        self.id_lookups += 1;
        Ok(self.items.iter().any(|i| i.id == id))
    }

    fn live_ids_with_fingerprint(&mut self, fingerprint: &str) -> QueueResult<Vec<String>> {
        Ok(self
            .items
            .iter()
            .filter(|i| i.fingerprint == fingerprint && i.status() != ItemStatus::Failed)
            .map(|i| i.id.to_string())
            .collect())
    }

    fn totals(&mut self) -> QueueResult<Totals> {
        Ok(Totals {
            items: self.items.len() as u64,
            bytes: self.items.iter().map(QueueItem::size_bytes).sum(),
        })
    }

    fn oldest(&mut self, page: &VictimPage<'_>) -> QueueResult<Vec<Victim>> {
        self.pages += 1;
        Ok(oldest_by_scan(&self.items, page))
    }
}

fn limits(max_items: usize, overflow: OverflowPolicy) -> Limits {
    Limits {
        max_items,
        max_bytes: 1 << 20,
        overflow,
        dedupe: true,
    }
}

fn refused(decision: QueueResult<Decision>) -> QueueError {
    match decision {
        Ok(Err(e)) => e,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn admitted(decision: QueueResult<Decision>) -> Admitted {
    match decision {
        Ok(Ok(a)) => a,
        other => panic!("expected an admission, got {other:?}"),
    }
}

fn duplicate_of(decision: QueueResult<Decision>) -> String {
    match refused(decision) {
        QueueError::DuplicateItem { existing_id } => existing_id,
        other => panic!("expected a duplicate, got {other}"),
    }
}

fn victim_ids(a: &Admitted) -> Vec<&str> {
    a.evictions().iter().map(|v| v.id.as_str()).collect()
}

#[test]
fn duplicate_by_id_in_any_status_and_by_live_fingerprint_smallest_id() {
    let l = limits(10, OverflowPolicy::Reject);
    let mut view = ListView::of(vec![
        dead("gone", 0),
        item_fp("b", 0, "fp"),
        item_fp("a", 1, "fp"),
        dead("dead-fp", 0),
    ]);
    assert_eq!(
        duplicate_of(admit(&l, &mut view, item("gone", 2), false)),
        "gone"
    );
    assert_eq!(
        duplicate_of(admit(&l, &mut view, item_fp("c", 2, "fp"), false)),
        "a"
    );
    // A dead letter frees its fingerprint.
    let fp_of_dead = item_fp("d", 2, "dead-fp");
    assert!(admit(&l, &mut view, fp_of_dead, false).unwrap().is_ok());
    // Dedupe off: only the ID counts.
    let off = Limits { dedupe: false, ..l };
    assert!(admit(&off, &mut view, item_fp("c", 2, "fp"), false)
        .unwrap()
        .is_ok());
    assert_eq!(
        duplicate_of(admit(&off, &mut view, item("b", 2), false)),
        "b"
    );
}

#[test]
fn a_fresh_id_is_not_looked_up() {
    let l = limits(10, OverflowPolicy::Reject);
    let mut view = ListView::default();
    let _ = admitted(admit(&l, &mut view, item("x", 0), true));
    assert_eq!(view.id_lookups, 0);
    let _ = admitted(admit(&l, &mut view, item("y", 0), false));
    assert_eq!(view.id_lookups, 1);
}

#[test]
fn refusals_in_order_duplicate_then_too_large_then_full() {
    let l = Limits {
        max_bytes: 100,
        ..limits(1, OverflowPolicy::DropOldest)
    };
    let mut view = ListView::of(vec![item("a", 0)]);
    let big = NewItem::new(Payload::from_json_str(&format!("\"{}\"", "x".repeat(200))).unwrap())
        .with_id(ItemId::parse("a").unwrap())
        .into_item(t(1), 3)
        .unwrap();
    // A big duplicate is a duplicate.
    assert_eq!(duplicate_of(admit(&l, &mut view, big.clone(), false)), "a");
    let mut big = big;
    big.id = ItemId::parse("big").unwrap();
    match refused(admit(&l, &mut view, big, false)) {
        QueueError::TooLarge { size, limit } => {
            assert!(size > 100);
            assert_eq!(limit, 100);
        }
        other => panic!("expected TooLarge, got {other}"),
    }
    // The item that duplicates the one it would evict is refused,
    // and nothing is evicted.
    let same_fp = item_fp("b", 1, "a");
    assert_eq!(duplicate_of(admit(&l, &mut view, same_fp, false)), "a");
    assert_eq!(view.ids(), ["a"]);
}

#[test]
fn reject_gives_the_one_queue_full_text() {
    let l = limits(2, OverflowPolicy::Reject);
    let mut view = ListView::of(vec![item("a", 0), dead("b", 1)]);
    let new = item("c", 2);
    let size = new.size_bytes();
    let bytes = view.totals().unwrap().bytes;
    let e = refused(admit(&l, &mut view, new, false));
    assert_eq!(e.kind(), "queue_full");
    assert_eq!(
        e.to_string(),
        format!(
            "queue is full: 2 of 2 items and {bytes} of {} bytes used; the new item needs {size} bytes",
            1 << 20
        )
    );
    // No item limit leaves no room, even with drop_oldest.
    let zero = limits(0, OverflowPolicy::DropOldest);
    assert_eq!(
        refused(admit(&zero, &mut ListView::default(), item("c", 2), false)).kind(),
        "queue_full"
    );
    // By bytes.
    let by_bytes = Limits {
        max_bytes: bytes + size - 1,
        ..limits(10, OverflowPolicy::Reject)
    };
    assert_eq!(
        refused(admit(&by_bytes, &mut view, item("c", 2), false)).kind(),
        "queue_full"
    );
}

#[test]
fn drop_oldest_takes_dead_letters_first_then_age_then_id() {
    let l = limits(4, OverflowPolicy::DropOldest);
    let mut view = ListView::of(vec![
        item("old", 0),
        item("b-tie", 1),
        item("a-tie", 1),
        dead("dead", 5),
    ]);
    let a = admitted(admit(&l, &mut view, item("n1", 9), false));
    assert_eq!(victim_ids(&a), ["dead"]);
    assert!(a.evictions().iter().all(|v| !v.held));
    view.store(a);
    for (new, expect) in [("n2", "old"), ("n3", "a-tie"), ("n4", "b-tie")] {
        let a = admitted(admit(&l, &mut view, item(new, 9), false));
        assert_eq!(victim_ids(&a), [expect]);
        view.store(a);
    }
    assert_eq!(view.ids(), ["n1", "n2", "n3", "n4"]);
}

#[test]
fn drop_oldest_by_bytes_takes_as_many_as_needed_across_pages() {
    let small: Vec<QueueItem> = (0..20).map(|n| item(&format!("s{n:02}"), n)).collect();
    let size = small[0].size_bytes();
    let l = Limits {
        max_bytes: size * 20,
        ..limits(100, OverflowPolicy::DropOldest)
    };
    let mut view = ListView::of(small);
    let big = NewItem::new(
        Payload::from_json_str(&format!("\"{}\"", "b".repeat(size as usize * 9))).unwrap(),
    )
    .with_id(ItemId::parse("big").unwrap())
    .into_item(t(30), 3)
    .unwrap();
    let need = big.size_bytes().div_ceil(size);
    let a = admitted(admit(&l, &mut view, big, false));
    assert_eq!(a.evictions().len() as u64, need);
    assert_eq!(a.evictions()[0].id, "s00");
    // Pages of 4, 8, ...: a handful of queries, not one per victim.
    assert!(view.pages <= 4, "{} pages", view.pages);
    view.store(a);
    assert!(view.totals().unwrap().bytes <= l.max_bytes);
}

#[test]
fn a_batch_counts_its_own_items_and_refuses_their_duplicates() {
    let l = limits(3, OverflowPolicy::Reject);
    let mut view = ListView::of(vec![item("stored", 0)]);
    let mut planner = Planner::new(l);
    let _ = admitted(planner.decide(&mut view, item_fp("a", 1, "fp"), false));
    assert_eq!(
        duplicate_of(planner.decide(&mut view, item("a", 1), false)),
        "a"
    );
    assert_eq!(
        duplicate_of(planner.decide(&mut view, item_fp("b", 1, "fp"), false)),
        "a"
    );
    let _ = admitted(planner.decide(&mut view, item("c", 1), true));
    // "stored", "a" and "c" fill the three places.
    assert_eq!(
        refused(planner.decide(&mut view, item("d", 1), false)).kind(),
        "queue_full"
    );
    assert!(!planner.is_caught_up());
    // Once they are stored, the view shows them instead.
    view.items.push(item_fp("a", 1, "fp"));
    view.items.push(item("c", 1));
    planner.caught_up();
    assert!(planner.is_caught_up());
    assert_eq!(
        refused(planner.decide(&mut view, item("d", 1), false)).kind(),
        "queue_full"
    );
}

#[test]
fn a_dead_letter_of_the_batch_does_not_hold_its_fingerprint() {
    let l = limits(10, OverflowPolicy::Reject);
    let mut view = ListView::default();
    let mut planner = Planner::new(l);
    let _ = admitted(planner.decide(&mut view, dead("d", 0), false));
    let again = item_fp("e", 0, "d");
    let _ = admitted(planner.decide(&mut view, again, false));
}

#[test]
fn a_later_item_of_a_batch_may_evict_an_earlier_one() {
    // Into an empty queue of two: the third item evicts the first.
    let l = limits(2, OverflowPolicy::DropOldest);
    let mut view = ListView::default();
    let mut planner = Planner::new(l);
    for id in ["x", "y"] {
        let a = admitted(planner.decide(&mut view, item(id, 0), false));
        assert!(a.evictions().is_empty());
    }
    let a = admitted(planner.decide(&mut view, item("z", 0), false));
    assert_eq!(a.evictions().len(), 1);
    assert_eq!(a.evictions()[0].id, "x");
    assert!(a.evictions()[0].held);
    // "x" is gone: its ID is free again, and it is no victim twice.
    let a = admitted(planner.decide(&mut view, item("x", 1), false));
    assert_eq!(victim_ids(&a), ["y"]);
    assert!(a.evictions()[0].held);

    // A held item older than a stored one goes first (tie by ID).
    let mut view = ListView::of(vec![item("c", 0)]);
    let mut planner = Planner::new(l);
    let _ = admitted(planner.decide(&mut view, item("b", 0), false));
    let a = admitted(planner.decide(&mut view, item("a", 0), false));
    assert_eq!(victim_ids(&a), ["b"]);
    assert!(a.evictions()[0].held);
}

#[test]
fn an_id_a_batch_evicted_may_come_back_and_its_fingerprint_is_free() {
    let l = limits(2, OverflowPolicy::DropOldest);
    let mut view = ListView::of(vec![item("old", 0), item("keep", 1)]);
    let mut planner = Planner::new(l);
    let a = admitted(planner.decide(&mut view, item("new", 2), false));
    assert_eq!(victim_ids(&a), ["old"]);
    assert!(!a.evictions()[0].held);
    assert!(planner.evicts("old"));
    // Same ID and same fingerprint as the evicted item: neither is
    // a duplicate any more, and "old" is not evicted twice.
    let a = admitted(planner.decide(&mut view, item("old", 2), false));
    assert_eq!(victim_ids(&a), ["keep"]);
    assert!(!a.evictions()[0].held);
}

#[test]
fn a_duplicate_of_a_held_item_is_checked_before_evicting_it() {
    let l = limits(1, OverflowPolicy::DropOldest);
    let mut view = ListView::default();
    let mut planner = Planner::new(l);
    let _ = admitted(planner.decide(&mut view, item_fp("a", 0, "fp"), false));
    assert_eq!(
        duplicate_of(planner.decide(&mut view, item_fp("b", 1, "fp"), false)),
        "a"
    );
    let a = admitted(planner.decide(&mut view, item("c", 1), false));
    assert_eq!(victim_ids(&a), ["a"]);
    // "a" is gone now, and its fingerprint with it.
    let _ = admitted(planner.decide(&mut view, item_fp("d", 2, "fp"), false));
}

#[test]
fn trim_evicts_to_the_limits_with_drop_oldest_only() {
    let items = vec![item("a", 0), dead("d", 3), item("b", 1), item("c", 2)];
    let mut view = ListView::of(items);
    let victims = trim(&limits(2, OverflowPolicy::DropOldest), &mut view).unwrap();
    let ids: Vec<&str> = victims.iter().map(|v| v.id.as_str()).collect();
    assert_eq!(ids, ["d", "a"]);
    assert!(trim(&limits(2, OverflowPolicy::Reject), &mut view)
        .unwrap()
        .is_empty());
    assert!(trim(&limits(4, OverflowPolicy::DropOldest), &mut view)
        .unwrap()
        .is_empty());
}

#[test]
fn a_view_that_fails_fails_the_decision_and_a_refusal_holds_nothing() {
    /// Fails on `totals`, after the duplicate checks passed.
    struct Broken(ListView);
    impl AdmissionView for Broken {
        fn id_exists(&mut self, id: &str) -> QueueResult<bool> {
            self.0.id_exists(id)
        }
        fn live_ids_with_fingerprint(&mut self, fp: &str) -> QueueResult<Vec<String>> {
            self.0.live_ids_with_fingerprint(fp)
        }
        fn totals(&mut self) -> QueueResult<Totals> {
            Err(QueueError::storage("totals", "disk on fire"))
        }
        fn oldest(&mut self, page: &VictimPage<'_>) -> QueueResult<Vec<Victim>> {
            self.0.oldest(page)
        }
    }
    let l = limits(10, OverflowPolicy::Reject);
    let mut planner = Planner::new(l);
    let mut broken = Broken(ListView::of(vec![item("a", 0)]));
    let failed = planner.decide(&mut broken, item("b", 1), false);
    assert!(matches!(failed, Err(ref e) if e.is_storage()), "{failed:?}");
    // A refusal (here the duplicate, found before `totals`) holds
    // nothing back either.
    assert_eq!(
        duplicate_of(planner.decide(&mut broken, item("a", 1), false)),
        "a"
    );
    assert!(planner.is_caught_up());
}

#[test]
fn every_decision_is_counted() {
    let before = planned_on_this_thread();
    let l = limits(1, OverflowPolicy::Reject);
    let mut view = ListView::default();
    let _ = admit(&l, &mut view, item("a", 0), false);
    let _ = trim(&l, &mut view);
    assert_eq!(planned_on_this_thread() - before, 2);
}
