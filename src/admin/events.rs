//! The live event feed and `GET /v1/events`, which streams it as
//! server-sent events (SSE) to the console and to scripts.
//!
//! # Where events come from
//!
//! - Item outcomes: the worker's callbacks (`on_success`, `on_fail`),
//!   registered by [`LiveFeed::attach`]; the worker's own event type is not
//!   changed, so embedding hosts see nothing new.
//! - `enqueued`: the ingest handler, for every item `POST /v1/items` stored.
//! - Gate changes (`delivery_paused`, `delivery_resumed`, `circuit_opened`,
//!   `circuit_half_open`, `circuit_closed`): each open stream samples the
//!   worker's statistics once a second and sends what changed since its
//!   last sample, so a pause by the API, by a 401 or by the circuit breaker
//!   shows up within about a second.
//!
//! # Wire format
//!
//! `text/event-stream`, one event per block:
//!
//! ```text
//! id: 42
//! event: delivered
//! data: {"kind":"delivered","at":"2026-11-29T12:03:04.5Z","item_id":"0193…","attempts":1,"latency_ms":12}
//!
//! ```
//!
//! `event:` is the same as the data's `kind`. Item events carry `id:` (a
//! sequence number per daemon run; a gap means the stream lost events) and
//! `item_id`, `attempts`, `error` (failures), `latency_ms` (when a push was
//! made), `item_type` (enqueued). Kinds: `enqueued`, `delivered`, `skipped`
//! (the upstream already had it), `retried`, `dead_lettered` (refused for
//! good), `exhausted` (out of attempts), `paused` (the upstream refused the
//! credentials; the item was released), `released` (the fingerprint check
//! failed). Gate events carry no `id:`; their data is the gate state:
//! `{"kind":"delivery_paused","at":…,"paused":true,"pause_reason":"…",
//! "paused_since":…,"circuit_state":"closed"}`. The first event of every
//! stream is `state`, the same gate state, so a client starts from what is
//! true now. A client too slow to keep up gets `lagged` with `{"missed": n}`
//! and should re-read what it shows. A comment line (`: keepalive`) comes
//! every 15 s. The stream ends when the daemon stops.
//!
//! The endpoint takes the same bearer token as the rest of the API, in the
//! `Authorization` header only (never in the URL), so a browser reads it with
//! `fetch()` and a streaming body rather than `EventSource`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix_web::{web, HttpResponse};
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use tokio::sync::{broadcast, watch};

use super::auth::Authorized;
use super::history::{History, Tally};
use super::{AdminState, ApiError};
use crate::clock::SharedClock;
use crate::worker::{EventKind, RetryWorker, WorkerEvent};

/// Events buffered per subscriber before a slow one starts missing them.
const CHANNEL_CAPACITY: usize = 1024;
/// How often a stream samples the worker's gates.
const GATE_SAMPLE: Duration = Duration::from_secs(1);
/// How often an idle stream sends a comment, so proxies and clients see it
/// is alive and a closed connection is noticed.
const KEEPALIVE: Duration = Duration::from_secs(15);

/// One event of the live feed (see the module documentation).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LiveEvent {
    /// Sequence number per daemon run; `None` for gate events.
    #[serde(skip)]
    pub seq: Option<u64>,
    /// What happened (`delivered`, `enqueued`, `circuit_opened`, ...).
    pub kind: &'static str,
    /// When it happened, by the daemon's clock (the console orders by it).
    pub at: DateTime<Utc>,
    /// The item, for item events.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub item_id: Option<String>,
    /// Attempts after this one, for outcomes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u32>,
    /// The failure, for failed outcomes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Transport latency in milliseconds, when a push was made.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<u64>,
    /// The item's type, for `enqueued`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub item_type: Option<String>,
    /// The gate state, for gate events and `state`.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub gates: Option<Gates>,
}

/// The worker's gates as the console shows them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Gates {
    /// Delivery is paused (by an operator or by a 401).
    pub paused: bool,
    /// The operator's reason or the upstream's refusal; `None` while not paused.
    pub pause_reason: Option<String>,
    /// When the pause began, as RFC 3339 text; `null` while not paused.
    pub paused_since: Option<Value>,
    /// `closed`, `open` or `half_open`; `unknown` without a running worker.
    pub circuit_state: String,
}

impl Gates {
    /// The gates from the worker's statistics (`WorkerStats` as JSON).
    fn from_stats(stats: &Value) -> Gates {
        Gates {
            paused: stats
                .get("paused")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            pause_reason: stats
                .get("pause_reason")
                .and_then(Value::as_str)
                .map(str::to_owned),
            paused_since: stats.get("paused_since").filter(|v| !v.is_null()).cloned(),
            circuit_state: stats
                .get("circuit_state")
                .and_then(Value::as_str)
                .unwrap_or("unknown")
                .to_owned(),
        }
    }

    fn unknown() -> Gates {
        Gates {
            paused: false,
            pause_reason: None,
            paused_since: None,
            circuit_state: "unknown".to_owned(),
        }
    }

    /// The events that lead from `self` to `next`.
    fn changes_to(&self, next: &Gates) -> Vec<&'static str> {
        let mut kinds = Vec::new();
        if self.paused != next.paused {
            kinds.push(if next.paused {
                "delivery_paused"
            } else {
                "delivery_resumed"
            });
        }
        if self.circuit_state != next.circuit_state {
            kinds.push(match next.circuit_state.as_str() {
                "open" => "circuit_opened",
                "half_open" => "circuit_half_open",
                _ => "circuit_closed",
            });
        }
        kinds
    }
}

/// The daemon's feed of live events: a broadcast to every open stream, and
/// the per-minute [`History`] fed from the same events.
#[derive(Debug)]
pub struct LiveFeed {
    sender: broadcast::Sender<LiveEvent>,
    seq: AtomicU64,
    clock: SharedClock,
    /// Delivered and failed per minute over the last hour.
    pub history: History,
    closing: watch::Sender<bool>,
}

impl LiveFeed {
    /// A feed with no subscribers and an empty history, on `clock`.
    pub fn new(clock: SharedClock) -> Self {
        let (sender, _) = broadcast::channel(CHANNEL_CAPACITY);
        LiveFeed {
            sender,
            seq: AtomicU64::new(0),
            history: History::new(clock.clone()),
            clock,
            closing: watch::channel(false).0,
        }
    }

    /// Feeds every outcome of `worker` into this feed (call once).
    pub fn attach(self: &Arc<Self>, worker: &RetryWorker) {
        let feed = Arc::clone(self);
        worker.on_success(move |event| feed.outcome(event));
        let feed = Arc::clone(self);
        // `on_fail` also sees exhausted items (once), so `on_exhaust` is not
        // needed.
        worker.on_fail(move |event| feed.outcome(event));
    }

    /// Records and broadcasts one worker outcome. Runs on the worker's
    /// thread: a lock and a channel send, nothing that blocks.
    pub fn outcome(&self, event: &WorkerEvent) {
        let tally = match event.kind {
            EventKind::Delivered | EventKind::Skipped => Some(Tally::Delivered),
            EventKind::Retried => Some(Tally::Failed),
            EventKind::DeadLettered | EventKind::Exhausted => Some(Tally::DeadLettered),
            // Released without an attempt: not a failure of the item.
            EventKind::Paused | EventKind::Released => None,
        };
        if let Some(tally) = tally {
            self.history.record(tally);
        }
        self.publish(LiveEvent {
            seq: None,
            kind: event.kind.as_str(),
            at: event.at,
            item_id: Some(event.item_id.clone()),
            attempts: Some(event.attempts),
            error: event.error.clone(),
            latency_ms: event
                .latency
                .map(|l| u64::try_from(l.as_millis()).unwrap_or(u64::MAX)),
            item_type: None,
            gates: None,
        });
    }

    /// Records and broadcasts an item stored through the API.
    pub fn enqueued(&self, item_id: &str, item_type: &str) {
        self.history.record(Tally::Enqueued);
        self.publish(LiveEvent {
            seq: None,
            kind: "enqueued",
            at: self.clock.now(),
            item_id: Some(item_id.to_owned()),
            attempts: None,
            error: None,
            latency_ms: None,
            item_type: Some(item_type.to_owned()),
            gates: None,
        });
    }

    fn publish(&self, mut event: LiveEvent) {
        event.seq = Some(self.seq.fetch_add(1, Ordering::Relaxed) + 1);
        // No subscriber is not an error: the history has been fed already.
        let _ = self.sender.send(event);
    }

    /// A receiver of every event from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<LiveEvent> {
        self.sender.subscribe()
    }

    /// Ends every open stream (the daemon calls it before stopping the
    /// server, whose graceful stop would otherwise wait for them).
    pub fn close(&self) {
        self.closing.send_replace(true);
    }
}

/// Renders one event as an SSE block.
fn sse_block(event: &LiveEvent) -> web::Bytes {
    let data = serde_json::to_string(event).unwrap_or_else(|_| "{}".to_owned());
    let mut block = String::with_capacity(data.len() + 48);
    if let Some(seq) = event.seq {
        block.push_str(&format!("id: {seq}\n"));
    }
    block.push_str(&format!("event: {}\ndata: {data}\n\n", event.kind));
    web::Bytes::from(block)
}

/// One open stream's state.
struct Stream {
    state: web::Data<AdminState>,
    events: broadcast::Receiver<LiveEvent>,
    closing: watch::Receiver<bool>,
    sample: tokio::time::Interval,
    keepalive: tokio::time::Interval,
    gates: Option<Gates>,
    out: VecDeque<web::Bytes>,
}

impl Stream {
    async fn gates(&self) -> Gates {
        match self.state.worker.stats().await {
            Ok(stats) => Gates::from_stats(&stats),
            Err(_) => Gates::unknown(),
        }
    }

    fn gate_event(&self, kind: &'static str, gates: &Gates) -> LiveEvent {
        LiveEvent {
            seq: None,
            kind,
            at: self.state.clock.now(),
            item_id: None,
            attempts: None,
            error: None,
            latency_ms: None,
            item_type: None,
            gates: Some(gates.clone()),
        }
    }

    /// The next block to send, or `None` when the stream ends.
    async fn next(&mut self) -> Option<web::Bytes> {
        loop {
            if let Some(block) = self.out.pop_front() {
                return Some(block);
            }
            if *self.closing.borrow() {
                return None;
            }
            tokio::select! {
                received = self.events.recv() => match received {
                    Ok(event) => self.out.push_back(sse_block(&event)),
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        self.out.push_back(web::Bytes::from(format!(
                            "event: lagged\ndata: {{\"kind\":\"lagged\",\"missed\":{missed}}}\n\n"
                        )));
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                },
                _ = self.sample.tick() => {
                    let now = self.gates().await;
                    match &self.gates {
                        None => self.out.push_back(sse_block(&self.gate_event("state", &now))),
                        Some(before) => {
                            for kind in before.changes_to(&now) {
                                self.out.push_back(sse_block(&self.gate_event(kind, &now)));
                            }
                        }
                    }
                    self.gates = Some(now);
                }
                _ = self.keepalive.tick() => {
                    self.out.push_back(web::Bytes::from_static(b": keepalive\n\n"));
                }
                _ = self.closing.changed() => {}
            }
        }
    }
}

/// `GET /v1/events`.
#[utoipa::path(get, path = "/v1/events", tag = "live",
    responses(
        (status = 200, description = "Server-sent events until the daemon stops (format in the admin module doc and README)", content_type = "text/event-stream", body = String),
        (status = 401, description = "Missing or wrong bearer token", body = super::schema::ErrorBody)))]
pub(super) async fn get_events(
    _auth: Authorized,
    state: web::Data<AdminState>,
) -> Result<HttpResponse, ApiError> {
    let feed = &state.console.feed;
    let mut keepalive = tokio::time::interval(KEEPALIVE);
    keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick of an interval is immediate: skip it, so a new stream
    // starts with `state`, not a keepalive.
    keepalive.reset();
    let mut sample = tokio::time::interval(GATE_SAMPLE);
    sample.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stream = Stream {
        events: feed.subscribe(),
        closing: feed.closing.subscribe(),
        state: state.clone(),
        sample,
        keepalive,
        gates: None,
        out: VecDeque::new(),
    };
    let body = futures_util::stream::unfold(stream, |mut stream| async move {
        let block = stream.next().await?;
        Some((Ok::<_, actix_web::Error>(block), stream))
    });
    Ok(HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("Cache-Control", "no-cache"))
        // Tells a buffering reverse proxy (nginx) to pass events at once.
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    fn worker_event(kind: EventKind) -> WorkerEvent {
        WorkerEvent {
            item_id: "item-1".to_owned(),
            kind,
            attempts: 2,
            error: Some("503".to_owned()),
            latency: Some(Duration::from_millis(7)),
            at: Utc::now(),
        }
    }

    #[test]
    fn outcomes_are_broadcast_numbered_and_counted() {
        let clock = ManualClock::new(Utc::now());
        let feed = LiveFeed::new(Arc::new(clock));
        let mut rx = feed.subscribe();
        feed.outcome(&worker_event(EventKind::Delivered));
        feed.outcome(&worker_event(EventKind::Exhausted));
        feed.outcome(&worker_event(EventKind::Released));
        feed.enqueued("item-2", "findings");

        let first = rx.try_recv().expect("delivered event");
        assert_eq!((first.kind, first.seq), ("delivered", Some(1)));
        assert_eq!(first.latency_ms, Some(7));
        let block = String::from_utf8(sse_block(&first).to_vec()).expect("utf-8");
        assert!(
            block.starts_with("id: 1\nevent: delivered\ndata: {"),
            "{block}"
        );
        assert!(block.ends_with("}\n\n"), "{block}");
        assert!(block.contains("\"item_id\":\"item-1\""), "{block}");
        assert_eq!(rx.try_recv().expect("exhausted").kind, "exhausted");
        assert_eq!(rx.try_recv().expect("released").kind, "released");
        let enqueued = rx.try_recv().expect("enqueued");
        assert_eq!(enqueued.item_type.as_deref(), Some("findings"));
        assert_eq!(enqueued.seq, Some(4));

        let last = *feed.history.snapshot().last().expect("a bucket");
        assert_eq!(
            (
                last.delivered,
                last.failed,
                last.dead_lettered,
                last.enqueued
            ),
            (1, 1, 1, 1)
        );
    }

    #[test]
    fn gate_changes_name_what_changed() {
        let closed = Gates::from_stats(&serde_json::json!({
            "paused": false, "circuit_state": "closed"
        }));
        let paused = Gates::from_stats(&serde_json::json!({
            "paused": true, "pause_reason": "upstream answered 401",
            "paused_since": "2026-11-29T12:03:00Z", "circuit_state": "open"
        }));
        assert_eq!(
            closed.changes_to(&paused),
            vec!["delivery_paused", "circuit_opened"]
        );
        assert_eq!(
            paused.changes_to(&closed),
            vec!["delivery_resumed", "circuit_closed"]
        );
        assert!(closed.changes_to(&closed.clone()).is_empty());
        let data = serde_json::to_value(LiveEvent {
            seq: None,
            kind: "delivery_paused",
            at: Utc::now(),
            item_id: None,
            attempts: None,
            error: None,
            latency_ms: None,
            item_type: None,
            gates: Some(paused),
        })
        .expect("serializes");
        assert_eq!(data["pause_reason"], "upstream answered 401");
        assert_eq!(data["paused"], true);
        assert!(data.get("item_id").is_none());
    }
}
