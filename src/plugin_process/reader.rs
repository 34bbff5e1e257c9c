//! The reader thread of one child: answers dispatched to their callers,
//! the plugin's logs forwarded, and when the pipe ends, the child reaped,
//! its death recorded by the supervisor and the calls in flight failed.

use std::io::BufReader;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, Weak};
use std::time::Duration;

use retryq_plugin::{CheckError, PushOutcome};

use super::conn::{describe, Conn, Pending, Reply, Startup};
use super::protocol::{read_frame, Answer, CheckTag, CreateStatus, OutcomeTag};
use super::supervisor::{lock, Supervisor};

fn emit_log(plugin: &str, level: u8, message: &str) {
    match level {
        1 => tracing::error!(target: "retryq::plugin", plugin, "{message}"),
        2 => tracing::warn!(target: "retryq::plugin", plugin, "{message}"),
        3 => tracing::info!(target: "retryq::plugin", plugin, "{message}"),
        _ => tracing::debug!(target: "retryq::plugin", plugin, "{message}"),
    }
}

/// The reader thread of one child: dispatches answers, forwards logs, and
/// when the pipe ends, reaps the child and fails the calls in flight.
pub(super) fn read_answers(
    sup: Weak<Supervisor>,
    conn: Arc<Conn>,
    stdout: std::process::ChildStdout,
    start_tx: mpsc::Sender<Startup>,
) {
    let mut start_tx = Some(start_tx);
    // Only a child that created its instance is "serving"; one that died or
    // was killed while starting is reported to `start_child` alone.
    let mut serving = false;
    let mut input = BufReader::new(stdout);
    let mut plugin = sup.upgrade().map(|s| s.name()).unwrap_or_default();
    let mut broken = None;
    loop {
        let body = match read_frame(&mut input) {
            Ok(Some(body)) => body,
            Ok(None) => break,
            Err(e) => {
                broken = Some(e.to_string());
                break;
            }
        };
        let answer = match Answer::decode(&body) {
            Ok(a) => a,
            Err(e) => {
                broken = Some(e.to_string());
                break;
            }
        };
        match answer {
            Answer::Hello { name, .. } => {
                plugin = name.clone();
                if let Some(tx) = &start_tx {
                    let _ = tx.send(Startup::Hello(name));
                }
            }
            Answer::Created { status, message } => {
                serving = status == CreateStatus::Ok;
                if let Some(tx) = start_tx.take() {
                    let _ = tx.send(Startup::Created(status, message));
                }
            }
            Answer::Fatal { message } => {
                if let Some(tx) = &start_tx {
                    let _ = tx.send(Startup::Fatal(message));
                }
            }
            Answer::Log { level, message } => emit_log(&plugin, level, &message),
            Answer::Pushed {
                id,
                tag,
                retry_after_ms,
                message,
            } => {
                let outcome = match tag {
                    OutcomeTag::Delivered => PushOutcome::Delivered,
                    OutcomeTag::Retryable => PushOutcome::Retryable {
                        message,
                        retry_after: u64::try_from(retry_after_ms)
                            .ok()
                            .map(Duration::from_millis),
                    },
                    OutcomeTag::Permanent => PushOutcome::Permanent { message },
                    OutcomeTag::Unauthorized => PushOutcome::Unauthorized { message },
                };
                if let Some(p) = lock(&conn.pending).remove(&id) {
                    let _ = p.tx.send(Reply::Pushed(outcome));
                }
            }
            Answer::Checked { id, tag, body } => {
                let text = || String::from_utf8_lossy(&body).into_owned();
                let result = match tag {
                    CheckTag::Ok => serde_json::from_slice(&body).map_err(|e| {
                        CheckError::Unavailable(format!(
                            "plugin {plugin} answered malformed JSON: {e}"
                        ))
                    }),
                    CheckTag::Unavailable => Err(CheckError::Unavailable(text())),
                    CheckTag::Unauthorized => Err(CheckError::Unauthorized(text())),
                };
                if let Some(p) = lock(&conn.pending).remove(&id) {
                    let _ = p.tx.send(Reply::Checked(result));
                }
            }
        }
    }
    if let Some(reason) = broken {
        // A child that writes garbage on the pipe cannot be trusted further.
        conn.kill(format!("broke the protocol ({reason})"));
    }
    let status = lock(&conn.child).wait();
    let what = describe(status, lock(&conn.kill_reason).take());
    // A child that never served is reported to `start_child` alone (which
    // may hold the state lock while it waits for this very report).
    let sup = if serving { sup.upgrade() } else { None };
    // The death is recorded (restart backoff set) before the calls in flight
    // hear of it and before anyone can see the connection closed: a caller
    // that finds it closed then also finds the backoff.
    let mut st = sup.as_ref().map(|s| lock(&s.state));
    let in_flight: Vec<Pending> = {
        let mut pending = lock(&conn.pending);
        conn.closed.store(true, Ordering::SeqCst);
        pending.drain().map(|(_, p)| p).collect()
    };
    if !serving {
        if let Some(tx) = start_tx {
            let _ = tx.send(Startup::Died(what));
        }
        return;
    }
    // Killed by us (a hang): the hung call was charged already; whatever
    // else was inside is innocent and is replayed, never blamed.
    let alone = in_flight.len() == 1 && !conn.killed.load(Ordering::SeqCst);
    // Gone when the supervisor itself was dropped: a stop, not a death.
    if let (Some(sup), Some(st)) = (&sup, st.as_mut()) {
        if st.conn.as_ref().is_some_and(|c| Arc::ptr_eq(c, &conn)) {
            st.conn = None;
        }
        let what = match in_flight.first() {
            Some(p) if alone => format!("{what} in {}", p.call),
            _ => what.clone(),
        };
        sup.note_death(st, &what, in_flight.len());
    }
    drop(st);
    for p in &in_flight {
        let _ = p.tx.send(Reply::Died {
            what: format!("{what} in {}", p.call),
            alone,
        });
    }
}
