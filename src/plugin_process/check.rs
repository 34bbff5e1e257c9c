//! `retryq plugins check` in a child process: the conformance kit runs in
//! a copy of this binary (`RETRYQ_PLUGIN_CHECK_CHILD=1`), so a plugin that
//! crashes or hangs ends the check with a verdict instead of a dead CLI.
//! When the child does not come back with a report, the plugin is driven
//! once more under process isolation to name the call that killed it
//! ("plugin host crashed with SIGSEGV in push").

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use retryq_plugin::testing::{sample_item, Finding, Report};
use retryq_plugin::{CallContext, PushOutcome, Pusher};

use super::{PluginTarget, ProcessOptions, ProcessPusher};

/// Set in the child: run the kit in this process.
pub const CHILD_ENV: &str = "RETRYQ_PLUGIN_CHECK_CHILD";

/// Calls the kit makes at most, each bounded by the call deadline; the
/// child gets that many deadlines (and a margin) before it counts as hung.
const KIT_CALLS: u32 = 10;

fn finding(check: &str, passed: bool, detail: impl Into<String>) -> Finding {
    Finding {
        check: check.into(),
        passed,
        detail: detail.into(),
    }
}

/// Reads the report a child printed with `--json`.
fn parse_report(stdout: &[u8]) -> Option<Report> {
    let v: serde_json::Value = serde_json::from_slice(stdout).ok()?;
    let text = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
    let findings = v["findings"]
        .as_array()?
        .iter()
        .map(|f| {
            finding(
                f["check"].as_str().unwrap_or_default(),
                f["passed"].as_bool().unwrap_or(false),
                f["detail"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    Some(Report {
        name: text("name"),
        version: text("version"),
        abi_version: v["abi_version"].as_u64().unwrap_or(0) as u32,
        pusher: v["pusher"].as_bool().unwrap_or(false),
        checker: v["checker"].as_bool().unwrap_or(false),
        findings,
    })
}

/// Runs the kit on `path` in a child (`program plugins check`), each call
/// bounded by `call_deadline`.
pub fn check_in_child(
    program: &Path,
    path: &Path,
    settings: &serde_json::Map<String, serde_json::Value>,
    call_deadline: Duration,
) -> Report {
    let settings_text = serde_json::Value::Object(settings.clone()).to_string();
    let spawned = Command::new(program)
        .arg("--json")
        .args(["plugins", "check"])
        .arg(path)
        .arg("--settings")
        .arg(&settings_text)
        .env(CHILD_ENV, "1")
        .env(
            "RETRYQ__WORKER__PUSH_TIMEOUT",
            format!("{}ms", call_deadline.as_millis().max(1)),
        )
        // The child's configuration must accept that deadline: the lease has
        // to be longer than a push may take.
        .env(
            "RETRYQ__WORKER__LEASE",
            format!("{}ms", call_deadline.as_millis().max(1) * 2 + 1000),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            let mut r = Report::default();
            r.findings.push(finding(
                "start the check process",
                false,
                format!("cannot start {}: {e}", program.display()),
            ));
            return r;
        }
    };
    // Drain the pipes on threads: a chatty child must not block on them.
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let err = drain(child.stderr.take().map(|p| Box::new(p) as _));
    let limit = call_deadline * KIT_CALLS + Duration::from_secs(10);
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if started.elapsed() < limit => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    if let (Some(status), Some(report)) = (status, parse_report(&stdout)) {
        if status.code().is_some() {
            return report;
        }
    }
    // No report: the plugin killed or hung the kit. Say how, then find the
    // call through process isolation.
    let how = match status {
        Some(s) => super::conn::describe(Ok(s), None),
        None => format!("did not finish within {limit:?}"),
    };
    let tail: String = String::from_utf8_lossy(&stderr)
        .lines()
        .rev()
        .take(3)
        .collect::<Vec<_>>()
        .join(" | ");
    let mut report = Report::default();
    report.findings.push(finding(
        "the plugin leaves its host alive",
        false,
        if tail.is_empty() {
            format!("the check process {how}")
        } else {
            format!("the check process {how} (stderr: {tail})")
        },
    ));
    diagnose(program, path, settings, call_deadline, &mut report);
    report
}

/// Creates the pusher and pushes the kit's sample items under process
/// isolation, noting the first call that kills or hangs the plugin host.
fn diagnose(
    program: &Path,
    path: &Path,
    settings: &serde_json::Map<String, serde_json::Value>,
    call_deadline: Duration,
    report: &mut Report,
) {
    let target = PluginTarget {
        label: path.display().to_string(),
        path: PathBuf::from(path),
        sha256: None,
        settings: serde_json::Value::Object(settings.clone()),
    };
    let options = ProcessOptions {
        concurrency: 1,
        start_timeout: call_deadline,
        restart_backoff: Duration::from_millis(10),
        ..ProcessOptions::new(program.to_path_buf())
    };
    let pusher = match ProcessPusher::start(target, options) {
        Ok(p) => p,
        Err(e) => {
            report
                .findings
                .push(finding("create", false, e.to_string()));
            return;
        }
    };
    report.name = pusher.health().plugin;
    for (id, payload) in [
        ("conformance-1", &br#"{"conformance":true}"#[..]),
        ("conformance-2", b""),
    ] {
        let ctx = CallContext::with_timeout(call_deadline);
        match pusher.push(&sample_item(id), payload, &ctx) {
            PushOutcome::Retryable { message, .. } if message.contains("plugin host") => {
                report.findings.push(finding("push", false, message));
                return;
            }
            outcome => {
                report
                    .findings
                    .push(finding("push returns an outcome", true, outcome.kind()))
            }
        }
    }
}
