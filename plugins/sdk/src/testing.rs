//! A conformance kit for plugin authors (and `retryq plugins check`): loads
//! a plugin, checks its metadata and ABI, feeds it settings it must refuse,
//! and pushes sample items, recording each finding.
//!
//! ```ignore
//! let report = retryq_plugin::testing::check_plugin(path, &serde_json::json!({"base_url": "http://127.0.0.1:9"}));
//! assert!(report.passed(), "{report:#?}");
//! ```

use std::path::Path;
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

/// Runs the conformance checks on the plugin library at `path`, creating
/// instances with `settings`. Pushes go wherever those settings point: give
/// settings for a test upstream.
pub fn check_plugin(path: &Path, settings: &serde_json::Value) -> Report {
    let mut report = Report::default();
    let lib = match load(&path.display().to_string(), path, None) {
        Ok(lib) => lib,
        Err(e) => {
            report.note("load", false, e.to_string());
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
    // Settings that are not even an object must be refused, not crash.
    for (label, bad) in [
        ("refuses a non-object settings value", serde_json::json!(42)),
        (
            "refuses an unknown settings key",
            serde_json::json!({"retryq_conformance_unknown_key": true}),
        ),
    ] {
        if lib.has_pusher() {
            match DynPusher::new(lib, &bad) {
                Err(crate::host::PluginError::BadSettings { .. }) => {
                    report.note(label, true, "refused")
                }
                Err(e) => report.note(label, false, format!("unexpected error: {e}")),
                Ok(_) => report.note(label, false, "accepted settings it should refuse"),
            }
        }
    }
    if lib.has_pusher() {
        match DynPusher::new(lib, settings) {
            Ok(p) => {
                let ctx = CallContext::with_timeout(Duration::from_secs(10));
                let outcome = p.push(
                    &sample_item("conformance-1"),
                    br#"{"conformance":true}"#,
                    &ctx,
                );
                report.note("push returns an outcome", true, outcome.kind());
                let outcome = p.push(&sample_item("conformance-2"), b"", &ctx);
                let ok = !matches!(outcome, PushOutcome::Retryable { ref message, .. } if message.contains("panicked"));
                report.note("push survives an empty payload", ok, outcome.kind());
            }
            Err(e) => report.note(
                "create pusher with the given settings",
                false,
                e.to_string(),
            ),
        }
    }
    if lib.has_checker() {
        match DynChecker::new(lib, settings) {
            Ok(c) => {
                let ctx = CallContext::with_timeout(Duration::from_secs(10));
                match c.check(&["conformance-fp".into()], &ctx) {
                    Ok(r) => report.note(
                        "check answers",
                        r.existing.len() + r.missing.len() <= 1,
                        format!("existing {:?}, missing {:?}", r.existing, r.missing),
                    ),
                    Err(e) => report.note("check answers", true, format!("unavailable: {e}")),
                }
            }
            Err(e) => report.note(
                "create checker with the given settings",
                false,
                e.to_string(),
            ),
        }
    }
    report
}
