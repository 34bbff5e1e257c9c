//! A conformance kit for plugin authors (and `retryq plugins check`): loads
//! a plugin, checks its metadata and ABI, feeds it settings it must refuse,
//! and pushes sample items, recording each finding.
//!
//! ```ignore
//! let report = retryq_plugin::testing::check_plugin(path, &serde_json::json!({"base_url": "http://127.0.0.1:9"}));
//! assert!(report.passed(), "{report:#?}");
//! ```

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::host::{load, DynChecker, DynPusher};
use crate::{CallContext, FingerprintChecker, ItemMeta, PushOutcome, Pusher};

/// One check and how it went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// What was checked.
    pub check: String,
    /// Whether it passed.
    pub passed: bool,
    /// Details.
    pub detail: String,
}

/// What `check_plugin` found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    /// Name the plugin reports.
    pub name: String,
    /// Version it reports.
    pub version: String,
    /// ABI version it reports.
    pub abi_version: u32,
    /// It provides a pusher.
    pub pusher: bool,
    /// It provides a fingerprint checker.
    pub checker: bool,
    /// Every check, in order.
    pub findings: Vec<Finding>,
}

impl Report {
    /// True when every check passed.
    pub fn passed(&self) -> bool {
        !self.findings.is_empty() && self.findings.iter().all(|f| f.passed)
    }

    fn note(&mut self, check: &str, passed: bool, detail: impl Into<String>) {
        self.findings.push(Finding {
            check: check.into(),
            passed,
            detail: detail.into(),
        });
    }
}

/// A sample item for conformance pushes.
pub fn sample_item(id: &str) -> ItemMeta {
    ItemMeta {
        id: id.into(),
        item_type: "findings".into(),
        fingerprint: format!("conformance-{id}"),
        attempts: 0,
        max_attempts: 10,
        created_at: "2026-01-01T00:00:00Z".into(),
        ..ItemMeta::default()
    }
}

/// How [`check_plugin_with`] runs the checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckOptions {
    /// How long each call into the plugin (load, create, push, check,
    /// destroy) may take. A call still running then is abandoned on its
    /// thread and the check ends with a verdict naming it: a hanging plugin
    /// must not hang the checker.
    pub call_deadline: Duration,
}

impl Default for CheckOptions {
    fn default() -> Self {
        CheckOptions {
            call_deadline: Duration::from_secs(10),
        }
    }
}

/// A call that did not return before its deadline.
struct Hung;

/// Runs `f` on its own thread and waits at most `deadline` for it. The
/// thread of a call that hangs is left behind: nothing can stop it, and the
/// kit only needs its own answer in time.
fn bounded<R: Send + 'static>(
    deadline: Duration,
    f: impl FnOnce() -> R + Send + 'static,
) -> Result<R, Hung> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name("retryq-plugin-check".into())
        .spawn(move || {
            let _ = tx.send(f());
        })
        .map_err(|_| Hung)?;
    rx.recv_timeout(deadline).map_err(|_| Hung)
}

impl Report {
    /// Records that `call` hung; the caller stops checking.
    fn hung(&mut self, call: &str, deadline: Duration) {
        self.note(
            &format!("{call} returns before the deadline"),
            false,
            format!("{call} did not return within {deadline:?}; the plugin hangs in {call}"),
        );
    }
}

/// Runs the conformance checks on the plugin library at `path`, creating
/// instances with `settings`, each call bounded by the default
/// [`CheckOptions`]. Pushes go wherever those settings point: give settings
/// for a test upstream.
pub fn check_plugin(path: &Path, settings: &serde_json::Value) -> Report {
    check_plugin_with(path, settings, &CheckOptions::default())
}

/// [`check_plugin`] with explicit options. A call that outlives
/// `options.call_deadline` ends the check: the report's last finding names
/// the call that hung.
pub fn check_plugin_with(
    path: &Path,
    settings: &serde_json::Value,
    options: &CheckOptions,
) -> Report {
    let deadline = options.call_deadline;
    let mut report = Report::default();
    let load_path = path.to_path_buf();
    let loaded = bounded(deadline, move || {
        load(&load_path.display().to_string(), &load_path, None)
    });
    let lib = match loaded {
        Ok(Ok(lib)) => lib,
        Ok(Err(e)) => {
            report.note("load", false, e.to_string());
            return report;
        }
        Err(Hung) => {
            report.hung("load", deadline);
            return report;
        }
    };
    report.name = lib.name.clone();
    report.version = lib.version.clone();
    report.abi_version = lib.abi_version();
    report.pusher = lib.has_pusher();
    report.checker = lib.has_checker();
    report.note("load", true, format!("{} {}", lib.name, lib.version));
    report.note(
        "metadata",
        !lib.name.is_empty() && !lib.version.is_empty() && (lib.has_pusher() || lib.has_checker()),
        "a name, a version and at least one kind",
    );
    // Each instance is destroyed on a bounded call too: `destroy` can hang.
    let destroy = |report: &mut Report, instance: Box<dyn Send>| -> Result<(), Hung> {
        bounded(deadline, move || drop(instance)).inspect_err(|_| report.hung("destroy", deadline))
    };
    // Settings that are not even an object must be refused, not crash.
    for (label, bad) in [
        ("refuses a non-object settings value", serde_json::json!(42)),
        (
            "refuses an unknown settings key",
            serde_json::json!({"retryq_conformance_unknown_key": true}),
        ),
    ] {
        if lib.has_pusher() {
            match bounded(deadline, move || DynPusher::new(lib, &bad)) {
                Err(Hung) => {
                    report.hung("create", deadline);
                    return report;
                }
                Ok(Err(crate::host::PluginError::BadSettings { .. })) => {
                    report.note(label, true, "refused")
                }
                Ok(Err(e)) => report.note(label, false, format!("unexpected error: {e}")),
                Ok(Ok(p)) => {
                    report.note(label, false, "accepted settings it should refuse");
                    if destroy(&mut report, Box::new(p)).is_err() {
                        return report;
                    }
                }
            }
        }
    }
    if lib.has_pusher() {
        let settings = settings.clone();
        match bounded(deadline, move || DynPusher::new(lib, &settings)) {
            Err(Hung) => {
                report.hung("create", deadline);
                return report;
            }
            Ok(Ok(p)) => {
                let p = Arc::new(p);
                for (check, id, payload) in [
                    (
                        "push returns an outcome",
                        "conformance-1",
                        &br#"{"conformance":true}"#[..],
                    ),
                    ("push survives an empty payload", "conformance-2", b""),
                ] {
                    let pusher = p.clone();
                    let pushed = bounded(deadline, move || {
                        let ctx = CallContext::with_timeout(deadline);
                        pusher.push(&sample_item(id), payload, &ctx)
                    });
                    let Ok(outcome) = pushed else {
                        report.hung("push", deadline);
                        return report;
                    };
                    let ok = !matches!(outcome, PushOutcome::Retryable { ref message, .. } if message.contains("panicked"));
                    report.note(check, ok, outcome.kind());
                }
                if destroy(&mut report, Box::new(p)).is_err() {
                    return report;
                }
            }
            Ok(Err(e)) => report.note(
                "create pusher with the given settings",
                false,
                e.to_string(),
            ),
        }
    }
    if lib.has_checker() {
        let settings = settings.clone();
        match bounded(deadline, move || DynChecker::new(lib, &settings)) {
            Err(Hung) => {
                report.hung("create", deadline);
                return report;
            }
            Ok(Ok(c)) => {
                let c = Arc::new(c);
                let checker = c.clone();
                let checked = bounded(deadline, move || {
                    let ctx = CallContext::with_timeout(deadline);
                    checker.check(&["conformance-fp".into()], &ctx)
                });
                match checked {
                    Err(Hung) => {
                        report.hung("check", deadline);
                        return report;
                    }
                    Ok(Ok(r)) => report.note(
                        "check answers",
                        r.existing.len() + r.missing.len() <= 1,
                        format!("existing {:?}, missing {:?}", r.existing, r.missing),
                    ),
                    Ok(Err(e)) => report.note("check answers", true, format!("unavailable: {e}")),
                }
                if destroy(&mut report, Box::new(c)).is_err() {
                    return report;
                }
            }
            Ok(Err(e)) => report.note(
                "create checker with the given settings",
                false,
                e.to_string(),
            ),
        }
    }
    report
}
