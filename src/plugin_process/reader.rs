//! One running child as the supervisor holds it ([`Conn`]: its pipes and
//! the calls in flight in it) and the reader thread that serves it:
//! answers dispatched to their callers, the plugin's logs forwarded, and
//! when the pipe ends, the child reaped, its death described and the calls
//! in flight failed.

use std::collections::HashMap;
use std::io::BufReader;
use std::process::{Child, ChildStdin, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, Weak};
use std::time::Duration;

use retryq_plugin::{CheckError, CheckResult, PushOutcome};

use super::protocol::{read_frame, Answer, CheckTag, CreateStatus, OutcomeTag};
use super::spawn::Startup;
use super::supervisor::{lock, Supervisor};

/// A push outcome, check answer or failure, as delivered to the caller.
pub(super) enum Reply {
    Pushed(PushOutcome),
    Checked(Result<CheckResult, CheckError>),
    /// The child died with this call in flight; `alone` when it was the only one.
    Died {
        what: String,
        alone: bool,
    },
    /// No answer in time: the child was killed.
    Hung(String),
    /// No child could serve the call (restart backoff, crash loop, failed start).
    Down(String),
}

pub(super) struct Pending {
    pub(super) tx: mpsc::SyncSender<Reply>,
    pub(super) call: &'static str,
}

/// One running child.
pub(super) struct Conn {
    pub(super) child: Mutex<Child>,
    pub(super) stdin: Mutex<ChildStdin>,
    pub(super) pending: Mutex<HashMap<u64, Pending>>,
    /// Set (under `pending`) once the child is gone: no more registrations.
    pub(super) closed: AtomicBool,
    /// Why we killed it, when we did.
    pub(super) kill_reason: Mutex<Option<String>>,
    /// Set the moment we decide to kill it: no new call goes to it, and the
    /// calls still in it are not to blame (the culprit was already charged).
    pub(super) killed: AtomicBool,
}

impl Conn {
    pub(super) fn kill(&self, reason: String) {
        self.killed.store(true, Ordering::SeqCst);
        *self.kill_reason.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason);
        let _ = self.child.lock().unwrap_or_else(|p| p.into_inner()).kill();
    }

    /// Whether calls may still be sent to it.
    pub(super) fn usable(&self) -> bool {
        !self.closed.load(Ordering::SeqCst) && !self.killed.load(Ordering::SeqCst)
    }
}

/// `SIGSEGV` for 11, and so on (Linux numbering).
pub fn signal_name(sig: i32) -> String {
    let name = match sig {
        1 => "SIGHUP",
        2 => "SIGINT",
        3 => "SIGQUIT",
        4 => "SIGILL",
        5 => "SIGTRAP",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL",
        11 => "SIGSEGV",
        13 => "SIGPIPE",
        15 => "SIGTERM",
        31 => "SIGSYS",
        other => return format!("signal {other}"),
    };
    name.to_owned()
}

/// How a child ended, in words.
pub(super) fn describe(
    status: std::io::Result<ExitStatus>,
    killed_because: Option<String>,
) -> String {
    use std::os::unix::process::ExitStatusExt;
    if let Some(reason) = killed_because {
        return format!("was killed because it {reason}");
    }
    match status {
        Ok(s) => match (s.signal(), s.code()) {
            (Some(9), _) => "was killed with SIGKILL (out of memory?)".to_owned(),
            (Some(sig), _) => format!("crashed with {}", signal_name(sig)),
            (None, Some(code)) => format!("exited with code {code}"),
            (None, None) => format!("ended: {s}"),
        },
        Err(e) => format!("ended (status unknown: {e})"),
    }
}

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
