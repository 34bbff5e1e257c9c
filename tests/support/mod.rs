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
        let mut build = Command::new(cargo);
        build
            .args(["build", "-p", "retryq-chaos", "-p", "retryq-http"])
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        // What cargo sets for this test process only: build scripts that
        // watch one of them (ring's watches CARGO_MANIFEST_DIR) would
        // otherwise see it change between this build and a build from a
        // shell, and rebuild the TLS stack each time, ten seconds of both
        // cores in the middle of the tests.
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy();
            if name.starts_with("CARGO_PKG_")
                || name.starts_with("CARGO_BIN_")
                || matches!(
                    name.as_ref(),
                    "CARGO_MANIFEST_DIR"
                        | "CARGO_MANIFEST_PATH"
                        | "CARGO_MANIFEST_LINKS"
                        | "CARGO_CRATE_NAME"
                        | "CARGO_PRIMARY_PACKAGE"
                        | "CARGO_TARGET_TMPDIR"
                )
            {
                build.env_remove(name.as_ref());
            }
        }
        let ok = build.status().unwrap().success();
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
