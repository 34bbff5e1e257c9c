//! Configuration of a retryq deployment: the [`Settings`] a config file
//! describes, made of the library's own types, and how they are layered.
//!
//! The sections are the types the library uses, with serde on them:
//! `[worker]` is [`RetryWorkerConfig`], `[backoff]` is [`BackoffConfig`],
//! `[circuit]` is [`CircuitConfig`], the limits in `[store]` are
//! [`StoreOptions`], `[admin]` is [`crate::admin::AdminConfig`]. Each has one `validate()` naming the field at fault;
//! this module adds no rule of its own to them. It only:
//!
//! - layers the sources (`layers.rs`): built-in defaults, then
//!   `config/default.toml`, then each `--config FILE`, then environment
//!   variables `RETRYQ__SECTION__KEY`;
//! - attributes errors (`attribution.rs`): a type error names the key, the
//!   value and the layer it came from; a field a `validate()` refuses is
//!   mapped to its key and to the layer (file or variable) that set it.
//!
//! The `settings` tables of `[pusher]` and `[checker]` belong to the plugin
//! and are handed to it as they are.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::backoff::BackoffConfig;
use crate::delivery::types::{CircuitConfig, RetryWorkerConfig};
use crate::error::QueueError;
use crate::store::{RetryQueue, StoreOptions};

mod attribution;
mod layers;
#[cfg(test)]
mod tests;

pub use crate::plugin::{Isolation, PluginSettings};
use crate::settings::invalid;
pub use crate::settings::InvalidSetting;
pub use attribution::{ConfigError, Layer};
pub use layers::{EnvSource, LoadOptions, Loaded};

/// Prefix of the environment variables read as configuration.
pub const ENV_PREFIX: &str = "RETRYQ";
/// Separator between the prefix, the section and the key in those variables.
pub const ENV_SEPARATOR: &str = "__";
/// The config directory used when none is given.
pub const DEFAULT_CONFIG_DIR: &str = "config";
/// The file read from the config directory.
pub const DEFAULT_CONFIG_FILE: &str = "default.toml";
/// Database file used by the SQLite backend when `store.path` is not set.
pub const DEFAULT_SQLITE_PATH: &str = "retryq-data/queue.db";
/// Directory used by the files backend when `store.path` is not set.
pub const DEFAULT_FILES_PATH: &str = "retryq-data/queue";

/// The effective configuration of a retryq deployment. Its serde form is
/// the layout of a config file, section by section.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(from = "Sections", into = "Sections")]
pub struct Settings {
    /// `[store]`: where and how items are kept.
    pub store: StoreSettings,
    /// `[worker]`, with `[backoff]` in `worker.backoff` and `[circuit]` in
    /// `worker.circuit`.
    pub worker: RetryWorkerConfig,
    /// `[pusher]`: the transport plugin.
    pub pusher: PluginSettings,
    /// `[checker]`: the optional fingerprint-checker plugin.
    pub checker: PluginSettings,
    /// `[plugins]`: where plugins are looked up by name.
    pub plugins: PluginsSettings,
    /// `[admin]`: the admin and ingest HTTP API.
    pub admin: AdminSettings,
    /// `[log]`: logging.
    pub log: LogSettings,
}

/// A config file's sections. The worker's backoff and circuit breaker are
/// sections of their own in files, as they always were; [`Settings`] keeps
/// them where the worker reads them.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Sections {
    store: StoreSettings,
    worker: RetryWorkerConfig,
    backoff: BackoffConfig,
    circuit: CircuitConfig,
    pusher: PluginSettings,
    checker: PluginSettings,
    plugins: PluginsSettings,
    admin: AdminSettings,
    log: LogSettings,
}

impl From<Sections> for Settings {
    fn from(s: Sections) -> Self {
        Settings {
            store: s.store,
            worker: RetryWorkerConfig {
                backoff: s.backoff,
                circuit: s.circuit,
                ..s.worker
            },
            pusher: s.pusher,
            checker: s.checker,
            plugins: s.plugins,
            admin: s.admin,
            log: s.log,
        }
    }
}

impl From<Settings> for Sections {
    fn from(s: Settings) -> Self {
        Sections {
            store: s.store,
            backoff: s.worker.backoff.clone(),
            circuit: s.worker.circuit.clone(),
            worker: s.worker,
            pusher: s.pusher,
            checker: s.checker,
            plugins: s.plugins,
            admin: s.admin,
            log: s.log,
        }
    }
}

/// Which store backend holds the queue. A new backend is a variant here
/// and, if it needs settings of its own, a `[store.NAME]` table in
/// [`StoreSettings`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreBackend {
    /// Embedded SQLite database (the default).
    #[default]
    Sqlite,
    /// One JSON file per item, compatible with the Go SDK.
    Files,
    /// A schema on a PostgreSQL server shared by a fleet of daemons
    /// (`[store.postgres]`; see [`crate::fleet`]).
    Postgres,
}

impl StoreBackend {
    /// The config word for the backend.
    pub fn as_str(self) -> &'static str {
        match self {
            StoreBackend::Sqlite => "sqlite",
            StoreBackend::Files => "files",
            StoreBackend::Postgres => "postgres",
        }
    }
}

/// `[store]`: the backend and where it keeps its data, then the store's
/// own options (limits and policy) as keys of the same section.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreSettings {
    /// `sqlite`, `files` or `postgres`.
    pub backend: StoreBackend,
    /// The database file (sqlite) or directory (files); relative paths are
    /// relative to the working directory. `None`: [`DEFAULT_SQLITE_PATH`] or
    /// [`DEFAULT_FILES_PATH`].
    pub path: Option<PathBuf>,
    /// Limits and policy; `default_max_attempts` and `default_lease` are
    /// taken from `[worker]` by [`Settings::store_options`].
    #[serde(flatten)]
    pub options: StoreOptions,
    /// `[store.encryption]`: payloads sealed at rest ([`crate::seal`]).
    pub encryption: crate::seal::EncryptionSettings,
    /// `[store.postgres]`: the server, for `backend = "postgres"` (`path`
    /// is then this daemon's own folder: owner lock, poison marker).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub postgres: Option<crate::store::postgres::PostgresOptions>,
}

/// Equal when they describe the same store: the options' clock and
/// instance ID are not settings.
impl PartialEq for StoreSettings {
    fn eq(&self, other: &Self) -> bool {
        self.backend == other.backend
            && self.path == other.path
            && self.postgres == other.postgres
            && serde_json::to_value(&self.options).ok() == serde_json::to_value(&other.options).ok()
            && self.encryption == other.encryption
    }
}

impl StoreSettings {
    /// The database file or directory the store uses.
    pub fn effective_path(&self) -> PathBuf {
        match (&self.path, self.backend) {
            (Some(p), _) => p.clone(),
            (None, StoreBackend::Sqlite) => PathBuf::from(DEFAULT_SQLITE_PATH),
            (None, StoreBackend::Files) => PathBuf::from(DEFAULT_FILES_PATH),
            (None, StoreBackend::Postgres) => PathBuf::from(crate::fleet::DEFAULT_NODE_PATH),
        }
    }

    /// Where the items are, for messages: the file or directory, or the
    /// PostgreSQL server and schema (never the url, which names a user).
    pub fn location(&self) -> String {
        match (&self.postgres, self.backend) {
            (Some(pg), StoreBackend::Postgres) => {
                format!("{} (schema {})", pg.endpoint(), pg.schema)
            }
            _ => self.effective_path().display().to_string(),
        }
    }

    /// The store's owner lock file ([`crate::store::owner`]): beside the
    /// database, or inside the queue directory. A running daemon holds it;
    /// the CLI reads it to find that daemon.
    pub fn owner_lock_path(&self) -> PathBuf {
        crate::store::owner::owner_lock_path(
            &self.effective_path(),
            self.backend != StoreBackend::Sqlite,
        )
    }
}

/// `[plugins]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PluginsSettings {
    /// Directories searched, in order, for a plugin chosen by name.
    pub search_path: Vec<PathBuf>,
}

impl Default for PluginsSettings {
    fn default() -> Self {
        PluginsSettings {
            search_path: vec![PathBuf::from("plugins"), PathBuf::from("target/release")],
        }
    }
}

/// `[admin]`: the admin API's own [`crate::admin::AdminConfig`].
pub type AdminSettings = crate::admin::AdminConfig;

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Pretty,
    /// One JSON object per line.
    Json,
}

/// `[log]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    /// A `tracing` filter (`info`, `retryq=debug,warn`...); `RUST_LOG` overrides it.
    pub level: String,
    /// `pretty` or `json`.
    pub format: LogFormat,
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings {
            level: "info".to_owned(),
            format: LogFormat::Pretty,
        }
    }
}

impl LogSettings {
    /// Checks the filter, naming the field.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        match tracing_subscriber::EnvFilter::try_new(self.level.trim()) {
            Ok(_) => Ok(()),
            Err(e) => invalid(
                "level",
                format!("expected a log filter such as \"info\" or \"retryq=debug,warn\": {e}"),
            ),
        }
    }
}

impl Settings {
    /// The options the store is opened with: `[store]`, with the default
    /// attempts and lease of `[worker]`.
    pub fn store_options(&self) -> StoreOptions {
        StoreOptions {
            default_max_attempts: self.worker.max_attempts,
            default_lease: self.worker.lease,
            ..self.store.options.clone()
        }
    }

    /// The worker configuration: `[worker]`, `[backoff]` and `[circuit]`.
    pub fn worker_config(&self) -> RetryWorkerConfig {
        self.worker.clone()
    }

    /// Opens the configured store.
    pub fn open_store(&self) -> Result<Arc<dyn RetryQueue>, QueueError> {
        open_store(&self.store, self.store_options())
    }

    /// A copy safe to print: plugin settings whose key looks secret (token,
    /// password, secret, key, authorization, credential, cookie) are
    /// replaced by `"<redacted>"`, at any depth.
    pub fn redacted(&self) -> Settings {
        let mut out = self.clone();
        redact_map(&mut out.pusher.settings);
        redact_map(&mut out.checker.settings);
        out
    }
}

/// The text that replaces a secret in [`Settings::redacted`].
pub const REDACTED: &str = "<redacted>";

fn looks_secret(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    // `token_env` / `token_file` name where a secret is, not the secret.
    if k.ends_with("_env") || k.ends_with("_file") || k.ends_with("_path") {
        return false;
    }
    [
        "token",
        "password",
        "passwd",
        "secret",
        "api_key",
        "apikey",
        "authorization",
        "credential",
        "cookie",
        "private_key",
    ]
    .iter()
    .any(|s| k.contains(s))
}

fn redact_map(map: &mut serde_json::Map<String, serde_json::Value>) {
    for (k, v) in map.iter_mut() {
        if looks_secret(k) {
            *v = serde_json::Value::String(REDACTED.to_owned());
        } else {
            redact_value(v);
        }
    }
}

fn redact_value(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(m) => redact_map(m),
        serde_json::Value::Array(items) => items.iter_mut().for_each(redact_value),
        _ => {}
    }
}

/// Opens the store `store` describes with `options`: the SQLite database
/// file or the files-backend directory, creating parent directories;
/// sealed as `[store.encryption]` says ([`crate::seal::wrap_store`]).
pub fn open_store(
    store: &StoreSettings,
    options: StoreOptions,
) -> Result<Arc<dyn RetryQueue>, QueueError> {
    let path = store.effective_path();
    let inner = match store.backend {
        StoreBackend::Sqlite => open_sqlite(&path, options),
        StoreBackend::Files => open_files(&path, options),
        StoreBackend::Postgres => crate::fleet::open_postgres(store.postgres.as_ref(), options),
    }?;
    // A database server has no file beside it for the marker: its open
    // always takes the census.
    let marker = match store.backend {
        StoreBackend::Sqlite => Some(crate::seal::marker::marker_path(&path, false)),
        StoreBackend::Files => Some(crate::seal::marker::marker_path(&path, true)),
        StoreBackend::Postgres => None,
    };
    crate::seal::wrap_store_marked(inner, &store.encryption, marker.as_deref())
}

fn open_sqlite(path: &Path, options: StoreOptions) -> Result<Arc<dyn RetryQueue>, QueueError> {
    Ok(Arc::new(crate::store::SqliteRetryQueue::open(
        path, options,
    )?))
}

fn open_files(path: &Path, options: StoreOptions) -> Result<Arc<dyn RetryQueue>, QueueError> {
    Ok(Arc::new(crate::store::FileRetryQueue::open(path, options)?))
}
