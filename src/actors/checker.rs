//! The checker actor: the optional fingerprint checker on its own blocking
//! thread. A panic inside it is contained and reported as the upstream
//! being unavailable.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use actix::{Actor, Handler, SyncContext};
use retryq_plugin::{CallContext, CheckError, CheckResult, FingerprintChecker};

use super::messages::CheckFingerprints;
use super::pusher::panic_message;

/// Calls the checker, containing panics.
pub fn check_guarded(
    checker: &dyn FingerprintChecker,
    fingerprints: &[String],
    timeout: Duration,
) -> Result<CheckResult, CheckError> {
    let ctx = CallContext::with_timeout(timeout);
    std::panic::catch_unwind(AssertUnwindSafe(|| checker.check(fingerprints, &ctx))).unwrap_or_else(
        |panic| {
            Err(CheckError::Unavailable(format!(
                "checker panicked: {}",
                panic_message(panic.as_ref())
            )))
        },
    )
}

/// Asks the optional fingerprint checker about one claimed batch at a time.
pub struct CheckerActor {
    checker: Arc<dyn FingerprintChecker>,
    timeout: Duration,
}

impl CheckerActor {
    /// An actor calling `checker` with `timeout` per call.
    pub fn new(checker: Arc<dyn FingerprintChecker>, timeout: Duration) -> Self {
        CheckerActor { checker, timeout }
    }
}

impl Actor for CheckerActor {
    type Context = SyncContext<Self>;
}

impl Handler<CheckFingerprints> for CheckerActor {
    type Result = Result<CheckResult, CheckError>;
    fn handle(&mut self, msg: CheckFingerprints, _: &mut SyncContext<Self>) -> Self::Result {
        check_guarded(self.checker.as_ref(), &msg.0, self.timeout)
    }
}
