//! ABI evolution, proven with real C plugins compiled at test time:
//! - a plugin built from the frozen 1.0 header (tests/abi/v1/) loads in this
//!   host and passes the conformance checks, in process and isolated; its
//!   table is shorter than this host's, so the fields appended since read
//!   as absent;
//! - a plugin from a "future" release whose table is longer than this host
//!   knows loads, with the unknown fields ignored.
//!
//! (The other direction for host callbacks, a plugin reading only what the
//! host's `struct_size` reaches, is unit-tested in the SDK's `abi` module.)

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use retryq::plugin_process::{PluginTarget, ProcessOptions, ProcessPusher};
use retryq::plugin_sdk::host::{load, DynPusher};
use retryq::plugin_sdk::testing::{check_plugin_with, sample_item, CheckOptions};
use retryq::plugin_sdk::{CallContext, PushOutcome, Pusher};

fn compile(dir: &Path, source: &str, include: &str, name: &str) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = dir.join(format!("lib{name}.so"));
    let status = Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()))
        .args(["-shared", "-fPIC", "-o"])
        .arg(&out)
        .arg("-I")
        .arg(root.join(include))
        .arg(root.join(source))
        .status()
        .unwrap();
    assert!(status.success(), "cc failed on {source}");
    out
}

fn ctx() -> CallContext {
    CallContext::with_timeout(Duration::from_secs(5))
}

#[test]
fn a_plugin_built_from_the_frozen_v1_header_loads_and_passes_conformance() {
    let dir = tempfile::tempdir().unwrap();
    let lib = compile(
        dir.path(),
        "tests/abi/v1/plugin.c",
        "tests/abi/v1",
        "abi_v1",
    );
    let report = check_plugin_with(&lib, &serde_json::json!({}), &CheckOptions::default());
    assert!(report.passed(), "{report:#?}");
    assert_eq!((report.name.as_str(), report.abi_version), ("abi-v1", 1));
    let loaded = load("abi-v1", &lib, None).unwrap();
    // Its table ends where the 1.0 header ended: what came later is absent.
    assert_eq!(loaded.description, "");
    let pusher = DynPusher::new(loaded, &serde_json::json!({"greeting": "hi"})).unwrap();
    assert_eq!(
        pusher.push(&sample_item("v1"), b"{}", &ctx()),
        PushOutcome::Delivered
    );
}

#[test]
fn a_v1_plugin_delivers_under_process_isolation() {
    let dir = tempfile::tempdir().unwrap();
    let lib = compile(
        dir.path(),
        "tests/abi/v1/plugin.c",
        "tests/abi/v1",
        "abi_v1",
    );
    let pusher = ProcessPusher::start(
        PluginTarget {
            label: "abi-v1".into(),
            path: lib,
            sha256: None,
            settings: serde_json::json!({}),
        },
        ProcessOptions::new(PathBuf::from(env!("CARGO_BIN_EXE_retryq"))),
    )
    .unwrap();
    assert_eq!(
        pusher.push(&sample_item("v1"), b"{}", &ctx()),
        PushOutcome::Delivered
    );
}

#[test]
fn a_longer_table_from_a_newer_plugin_loads_with_unknown_fields_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let lib = compile(
        dir.path(),
        "tests/abi/newer.c",
        "plugins/sdk/include",
        "abi_future",
    );
    let loaded = load("abi-future", &lib, None).unwrap();
    assert_eq!(loaded.name, "abi-future");
    // A field this host knows, read from the longer table.
    assert_eq!(loaded.description, "a plugin from the future");
    let pusher = DynPusher::new(loaded, &serde_json::json!({})).unwrap();
    // The appended hook (which aborts) is never called.
    assert_eq!(
        pusher.push(&sample_item("future"), b"{}", &ctx()),
        PushOutcome::Delivered
    );
}
