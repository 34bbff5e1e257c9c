//! Host-side glue for transport plugins: turns a `[pusher]` or `[checker]`
//! configuration section into a transport the worker can use.
//!
//! The unsafe ABI code lives in the SDK (`retryq_plugin::host`); this module
//! only resolves names, applies the deadline guard and maps settings.

use std::path::PathBuf;
use std::sync::Arc;

pub use retryq_plugin::host::{
    file_sha256, library_file_names, DynChecker, DynPusher, Library, PluginError, WithDeadline,
};
use retryq_plugin::{FingerprintChecker, Pusher};

use serde::{Deserialize, Serialize};

use crate::settings::{invalid, InvalidSetting};

/// The search path used for plugins chosen by name: the configured folders,
/// then the folder of the running executable (where cargo puts the bundled
/// plugins next to the `retryq` binary).
pub fn effective_search_path(configured: &[PathBuf]) -> Vec<PathBuf> {
    let mut path = configured.to_vec();
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|p| p.to_path_buf()))
    {
        if !path.contains(&dir) {
            path.push(dir);
        }
    }
    path
}

/// Finds and loads the library a section names.
pub fn load_library(
    spec: &PluginSettings,
    search_path: &[PathBuf],
) -> Result<&'static Library, PluginError> {
    let (label, path) = match (&spec.name, &spec.path) {
        (_, Some(path)) => (path.display().to_string(), path.clone()),
        (Some(name), None) => (
            name.clone(),
            retryq_plugin::host::resolve(name, &effective_search_path(search_path))?,
        ),
        (None, None) => {
            return Err(PluginError::NotFound {
                plugin: "(none)".into(),
                looked_in: Vec::new(),
            })
        }
    };
    retryq_plugin::host::load(&label, &path, spec.sha256.as_deref())
}

fn settings_value(spec: &PluginSettings) -> serde_json::Value {
    serde_json::Value::Object(spec.settings.clone())
}

/// Loads the pusher a `[pusher]` section names, behind the deadline guard.
pub fn load_pusher(
    spec: &PluginSettings,
    search_path: &[PathBuf],
) -> Result<Arc<dyn Pusher>, PluginError> {
    let lib = load_library(spec, search_path)?;
    let pusher = DynPusher::new(lib, &settings_value(spec))?;
    Ok(Arc::new(WithDeadline::new(Arc::new(pusher))))
}

/// Loads the checker a `[checker]` section names, behind the deadline guard.
pub fn load_checker(
    spec: &PluginSettings,
    search_path: &[PathBuf],
) -> Result<Arc<dyn FingerprintChecker>, PluginError> {
    let lib = load_library(spec, search_path)?;
    let checker = DynChecker::new(lib, &settings_value(spec))?;
    Ok(Arc::new(WithDeadline::new(Arc::new(checker))))
}

/// What the daemon reports about a loaded plugin (`GET /v1/info`, the
/// console): enough for an operator to tell which build is running.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct PluginInfo {
    /// The section that loaded it: `pusher` or `checker`.
    pub role: &'static str,
    /// Name the plugin reports.
    pub name: String,
    /// Version the plugin reports.
    pub version: String,
    /// The file it was loaded from.
    #[schema(value_type = String)]
    pub path: PathBuf,
    /// SHA-256 of that file, lowercase hex; `None` if it could not be read.
    pub sha256: Option<String>,
    /// The C ABI version it reports.
    pub abi_version: u32,
}

/// Describes the library a section names (loaded once: a second call
/// returns the library already loaded).
pub fn describe_plugin(
    role: &'static str,
    spec: &PluginSettings,
    search_path: &[PathBuf],
) -> Result<PluginInfo, PluginError> {
    let lib = load_library(spec, search_path)?;
    Ok(PluginInfo {
        role,
        name: lib.name.clone(),
        version: lib.version.clone(),
        path: lib.path.clone(),
        sha256: file_sha256(&lib.path).ok(),
        abi_version: lib.abi_version(),
    })
}

/// `[pusher]` or `[checker]`: a plugin chosen by name or path, with its own
/// settings.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PluginSettings {
    /// Plugin name, looked up on `plugins.search_path` as the platform's
    /// library file name (`libretryq_NAME.so`, ...).
    pub name: Option<String>,
    /// Path of the plugin library.
    pub path: Option<PathBuf>,
    /// SHA-256 (hex) the library file must have, checked before loading.
    pub sha256: Option<String>,
    /// The plugin's own settings, handed to it as JSON as they are.
    pub settings: serde_json::Map<String, serde_json::Value>,
    /// Where the plugin runs: in the daemon, or in a child process that may
    /// crash without taking the daemon along.
    pub isolation: Isolation,
    /// With `isolation = "process"`: the child's address-space cap in bytes.
    pub memory_limit: Option<u64>,
}

/// `[pusher] isolation` / `[checker] isolation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Isolation {
    /// Loaded into the daemon (fastest; a crash in the plugin is the daemon's).
    #[default]
    InProcess,
    /// Run by a `retryq plugin-host` child (see `crate::plugin_process`).
    Process,
}

impl PluginSettings {
    /// True when a plugin is chosen (by name or path).
    pub fn is_configured(&self) -> bool {
        self.name.is_some() || self.path.is_some()
    }

    /// A short description: the name or the path.
    pub fn describe(&self) -> String {
        match (&self.name, &self.path) {
            (Some(n), _) => n.clone(),
            (None, Some(p)) => p.display().to_string(),
            (None, None) => "(none)".to_owned(),
        }
    }

    /// Checks the choice of plugin, naming the first bad field.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        if self.name.as_deref().is_some_and(|n| n.trim().is_empty()) {
            return invalid("name", "must not be empty");
        }
        if self
            .path
            .as_deref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            return invalid("path", "must not be empty");
        }
        if let (Some(name), Some(_)) = (&self.name, &self.path) {
            return invalid(
                "path",
                format!(
                    "name is also set ({name:?}); choose the plugin by name or by path, not both"
                ),
            );
        }
        if let Some(sha) = &self.sha256 {
            if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
                return invalid("sha256", "expected 64 hexadecimal digits (a SHA-256)");
            }
            if !self.is_configured() {
                return invalid("sha256", "no plugin chosen: set name or path");
            }
        }
        if self.memory_limit == Some(0) {
            return invalid("memory_limit", "must be at least 1 byte");
        }
        Ok(())
    }
}
