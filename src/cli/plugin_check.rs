//! `retryq plugins check`: load a plugin and run the SDK's conformance kit.

use retryq::config::Settings;
use serde::Serialize;

/// What `plugins check` prints.
#[derive(Debug, Serialize)]
pub struct CheckReport {
    /// The plugin as given.
    pub plugin: String,
}

/// Loads `plugin` (a name on the search path, or a path) with `settings`
/// and runs the conformance checks.
pub fn check(
    plugin: &str,
    _settings: serde_json::Map<String, serde_json::Value>,
    _config: &Settings,
) -> anyhow::Result<CheckReport> {
    anyhow::bail!(
        "cannot check plugin {plugin}: the plugin loader is not built into this binary yet"
    )
}
