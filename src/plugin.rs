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

use crate::config::PluginSettings;

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
