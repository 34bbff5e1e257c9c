//! What the worker holds: a [`Pusher`] and a [`FingerprintChecker`] whose
//! calls go to a supervised child, a failure of the child answered as a
//! retryable outcome (or an unavailable checker) naming the plugin.

use std::io::Write;
use std::process::ChildStdin;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use retryq_plugin::abi::{RQ_KIND_CHECKER, RQ_KIND_PUSHER};
use retryq_plugin::host::PluginError;
use retryq_plugin::{
    CallContext, CheckError, CheckResult, FingerprintChecker, ItemMeta, PushOutcome, Pusher,
};

use super::conn::Reply;
use super::protocol::{self, Request};
use super::supervisor::{lock, Supervisor};
use super::{PluginHealth, PluginTarget, ProcessOptions};

fn deadline_unix_ms(ctx: &CallContext) -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    (now + ctx.remaining()).as_millis() as u64
}

/// A pusher whose plugin runs in a child process.
pub struct ProcessPusher {
    sup: Arc<Supervisor>,
}

impl ProcessPusher {
    /// Starts the child and creates the pusher in it; the errors are those of
    /// loading in process (settings refused, no such kind, not a library).
    pub fn start(target: PluginTarget, options: ProcessOptions) -> Result<Self, PluginError> {
        let sup = Supervisor::new(target, options, RQ_KIND_PUSHER);
        let conn = sup.start_child()?;
        {
            let mut st = lock(&sup.state);
            st.starts += 1;
            st.conn = Some(conn);
        }
        Ok(ProcessPusher { sup })
    }

    /// What the supervisor has seen.
    pub fn health(&self) -> PluginHealth {
        self.sup.health()
    }
}

impl Pusher for ProcessPusher {
    fn push(&self, item: &ItemMeta, payload: &[u8], ctx: &CallContext) -> PushOutcome {
        let meta = match serde_json::to_vec(item) {
            Ok(m) => m,
            Err(e) => return PushOutcome::permanent(format!("cannot encode item metadata: {e}")),
        };
        let deadline = deadline_unix_ms(ctx);
        let send =
            |w: &mut ChildStdin, id: u64| protocol::write_push(w, id, deadline, &meta, payload);
        match self.sup.call("push", ctx, &send) {
            Reply::Pushed(outcome) => {
                self.sup.answered();
                outcome
            }
            other => {
                let message = self.sup.failure(other);
                tracing::error!(item_id = %item.id, plugin = %self.sup.name(), "{message}");
                PushOutcome::retryable(message)
            }
        }
    }
}

/// A fingerprint checker whose plugin runs in a child process.
pub struct ProcessChecker {
    sup: Arc<Supervisor>,
}

impl ProcessChecker {
    /// Starts the child and creates the checker in it.
    pub fn start(target: PluginTarget, options: ProcessOptions) -> Result<Self, PluginError> {
        let sup = Supervisor::new(target, options, RQ_KIND_CHECKER);
        let conn = sup.start_child()?;
        {
            let mut st = lock(&sup.state);
            st.starts += 1;
            st.conn = Some(conn);
        }
        Ok(ProcessChecker { sup })
    }

    /// What the supervisor has seen.
    pub fn health(&self) -> PluginHealth {
        self.sup.health()
    }
}

impl FingerprintChecker for ProcessChecker {
    fn check(&self, fingerprints: &[String], ctx: &CallContext) -> Result<CheckResult, CheckError> {
        let input =
            serde_json::to_vec(fingerprints).map_err(|e| CheckError::Unavailable(e.to_string()))?;
        let deadline = deadline_unix_ms(ctx);
        let send = |w: &mut ChildStdin, id: u64| {
            w.write_all(
                &Request::Check {
                    id,
                    deadline_unix_ms: deadline,
                    fingerprints: input.clone(),
                }
                .encode(),
            )?;
            w.flush()
        };
        match self.sup.call("check", ctx, &send) {
            Reply::Checked(result) => {
                self.sup.answered();
                result
            }
            other => Err(CheckError::Unavailable(self.sup.failure(other))),
        }
    }
}
