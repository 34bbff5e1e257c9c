//! `retryq plugins check` on the real binary: the bundled chaos plugin
//! passes the SDK's conformance kit; a file that is no plugin fails with a
//! clear report and exit code 1.

mod support;

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_retryq");

fn chaos_lib() -> std::path::PathBuf {
    support::plugin_lib("retryq_chaos")
}

#[test]
fn plugins_check_reports_metadata_and_conformance() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["--json", "plugins", "check"])
        .arg(chaos_lib())
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["name"], "chaos");
    assert_eq!(report["passed"], true);
    assert_eq!(report["abi_version"], 1);
    assert!(report["findings"].as_array().unwrap().len() >= 4);
}

#[test]
fn plugins_check_on_a_non_plugin_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("libfake.so");
    std::fs::write(&fake, "not a library").unwrap();
    let out = Command::new(BIN)
        .args(["--json", "plugins", "check"])
        .arg(&fake)
        .current_dir(dir.path())
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let text = format!("{report} {}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("not a loadable library"), "{text}");
    assert_ne!(out.status.code(), Some(0));
}
