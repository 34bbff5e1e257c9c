//! One running child as the supervisor holds it ([`Conn`]: its pipes and
//! the calls in flight in it), what its callers and its starter hear from
//! the reader thread ([`Reply`], [`Startup`]), and how a child ended, in
//! words.

use std::collections::HashMap;
use std::process::{Child, ChildStdin, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Mutex};

use retryq_plugin::{CheckError, CheckResult, PushOutcome};

use super::protocol::CreateStatus;

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

/// What the child sends while starting.
pub(super) enum Startup {
    Hello(String),
    Created(CreateStatus, String),
    Fatal(String),
    Died(String),
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
