//! `retryq plugins check`: load a plugin and run the SDK's conformance kit.

use std::path::{Path, PathBuf};

use retryq::config::Settings;
use retryq::plugin::effective_search_path;
use retryq_plugin::testing::{check_plugin_with, CheckOptions, Report};
use serde::Serialize;

/// What `plugins check` prints.
#[derive(Debug, Serialize)]
pub struct CheckReport {
    /// The plugin as given.
    pub plugin: String,
    /// The library file checked.
    pub path: PathBuf,
    /// Whether every check passed.
    pub passed: bool,
    /// Metadata and every finding.
    #[serde(flatten)]
    pub report: Report,
}

/// Loads `plugin` (a name on the search path, or a path) with `settings`
/// and runs the conformance checks, each call into the plugin bounded by
/// `worker.push_timeout` (what the daemon would allow a push), so a plugin
/// that hangs ends the check with a verdict naming the call. A failed check
/// is an error (exit 1) after the report is printed.
pub fn check(
    plugin: &str,
    settings: serde_json::Map<String, serde_json::Value>,
    config: &Settings,
) -> anyhow::Result<CheckReport> {
    let path = if plugin.contains(std::path::MAIN_SEPARATOR) || Path::new(plugin).is_file() {
        PathBuf::from(plugin)
    } else {
        retryq_plugin::host::resolve(plugin, &effective_search_path(&config.plugins.search_path))?
    };
    let options = CheckOptions {
        call_deadline: config.worker.push_timeout,
    };
    // In a child process (this binary again), so a plugin that crashes or
    // hangs yields a verdict instead of a dead CLI; the child runs the kit
    // in-process.
    let in_child = std::env::var_os(retryq::plugin_process::check::CHILD_ENV).is_none();
    let report = match std::env::current_exe() {
        Ok(exe) if in_child => retryq::plugin_process::check::check_in_child(
            &exe,
            &path,
            &settings,
            options.call_deadline,
        ),
        _ => check_plugin_with(&path, &serde_json::Value::Object(settings), &options),
    };
    Ok(CheckReport {
        plugin: plugin.to_owned(),
        path,
        passed: report.passed(),
        report,
    })
}
