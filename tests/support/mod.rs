//! Shared by the integration tests that need the bundled plugins built.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

/// The build's output folder: target/debug/deps/<test binary> -> target/debug.
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_path_buf()
}

/// Builds the bundled plugins once per test binary and returns the library
/// of `crate_name` (e.g. "retryq_chaos").
pub fn plugin_lib(crate_name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let ok = Command::new(cargo)
            .args(["build", "-p", "retryq-chaos", "-p", "retryq-http"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .unwrap()
            .success();
        assert!(ok, "building the bundled plugins failed");
    });
    let lib = target_dir().join(format!(
        "{}{crate_name}{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    ));
    assert!(lib.is_file(), "{} missing", lib.display());
    lib
}
