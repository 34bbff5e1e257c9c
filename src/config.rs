//! Layered configuration: the typed [`Settings`] of a retryq deployment and
//! how they are loaded, validated, shown and turned into a store.
//!
//! # Layers (later wins)
//!
//! 1. **Built-in defaults** ([`Settings::default`]).
//! 2. **`config/default.toml`**: the file `default.toml` in the config
//!    directory, which is `./config` relative to the working directory
//!    unless [`LoadOptions::config_dir`] (the CLI's `--config-dir`) says
//!    otherwise. It is optional when the directory is the implicit `./config`;
//!    an explicitly chosen directory must contain it.
//! 3. **Each `--config FILE`**, in the order given ([`LoadOptions::files`]).
//! 4. **Environment variables** `RETRYQ__SECTION__KEY` (double underscore
//!    between levels, case-insensitive, so `RETRYQ__WORKER__MAX_ATTEMPTS=3`
//!    sets `worker.max_attempts`). Values are parsed by the key's type;
//!    `RETRYQ__PLUGINS__SEARCH_PATH` takes a comma-separated list.
//!
//! # Validation
//!
//! Every layer is checked on its own against the schema ([`SCHEMA`]) before
//! the layers are merged, so an unknown key, a value of the wrong type or an
//! invalid value (a bad duration, a number out of range, an unknown enum
//! word) is reported as a [`ConfigError`] naming the key, the value and the
//! layer it came from: the file path, `environment variable
//! RETRYQ__WORKER__INTERVAL`, or `built-in defaults`. Rules across keys
//! (backoff `max` not below `base`, a plugin chosen by name or path but not
//! both) are checked on the merged result and name the layer that last set
//! the key.
//!
//! The `settings` tables of `[pusher]` and `[checker]` are not checked here:
//! they belong to the plugin and are handed to it as they are.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use config::{FileFormat, Map, Source, Value, ValueKind};
use serde::{Deserialize, Serialize};

use crate::backoff::BackoffConfig;
use crate::error::QueueError;
use crate::item::DEFAULT_MAX_ATTEMPTS;
use crate::store::{
    OverflowPolicy, RetryQueue, StoreOptions, DEFAULT_LEASE, DEFAULT_MAX_BYTES, DEFAULT_MAX_ITEMS,
    DEFAULT_MAX_QUARANTINED,
};

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
/// Default admin API listen address (loopback only).
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:7878";
/// Default environment variable holding the admin API token.
pub const DEFAULT_ADMIN_TOKEN_ENV: &str = "RETRYQ_ADMIN_TOKEN";
/// Default request body limit of the admin API: 10 MiB.
pub const DEFAULT_ADMIN_MAX_BODY: u64 = 10 * 1024 * 1024;

/// The effective configuration of a retryq deployment.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// `[store]`: where and how items are kept.
    pub store: StoreSettings,
    /// `[worker]`: delivery rounds.
    pub worker: WorkerSettings,
    /// `[backoff]`: delays between attempts.
    pub backoff: BackoffConfig,
    /// `[circuit]`: the circuit breaker.
    pub circuit: CircuitSettings,
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

/// Which store backend holds the queue.
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

/// `[store]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreSettings {
    /// `sqlite` or `files`.
    pub backend: StoreBackend,
    /// The database file (sqlite) or directory (files); relative paths are
    /// relative to the working directory. `None`: [`DEFAULT_SQLITE_PATH`] or
    /// [`DEFAULT_FILES_PATH`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// Most items held, all statuses.
    pub max_items: usize,
    /// Most bytes held (payload plus metadata), all statuses.
    pub max_bytes: u64,
    /// `reject` new items when full, or `drop_oldest` (dead letters first).
    pub overflow: OverflowPolicy,
    /// Refuse an item whose fingerprint is already pending or processing.
    pub dedupe: bool,
    /// How long dead letters are kept; `None`: as long as `worker.ttl`.
    #[serde(
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none",
        default
    )]
    pub dead_letter_ttl: Option<Duration>,
    /// Quarantined (corrupt) records kept for inspection.
    pub max_quarantined: usize,
    /// `[store.postgres]`: the server, for `backend = "postgres"` (`path`
    /// is then this daemon's own folder: owner lock, poison marker).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub postgres: Option<crate::store::postgres::PostgresOptions>,
}

impl Default for StoreSettings {
    fn default() -> Self {
        StoreSettings {
            backend: StoreBackend::Sqlite,
            path: None,
            max_items: DEFAULT_MAX_ITEMS,
            max_bytes: DEFAULT_MAX_BYTES,
            overflow: OverflowPolicy::Reject,
            dedupe: true,
            dead_letter_ttl: None,
            max_quarantined: DEFAULT_MAX_QUARANTINED,
            postgres: None,
        }
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

/// `[worker]`: the seed's `RetryWorkerConfig` fields plus delivery limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerSettings {
    /// Safety poll: the longest the scheduler sleeps between rounds.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Items claimed per round.
    pub batch_size: usize,
    /// Attempts before an item becomes a dead letter (items may set their own).
    pub max_attempts: u32,
    /// Items older than this are expired by cleanup.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// Pushes in flight at once (pusher threads).
    pub concurrency: usize,
    /// How long a claimed item stays `processing` before it returns to pending.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// Deadline of one push.
    #[serde(with = "humantime_serde")]
    pub push_timeout: Duration,
    /// Cap on an upstream's Retry-After.
    #[serde(with = "humantime_serde")]
    pub max_retry_after: Duration,
    /// How often the janitor expires items and releases expired leases.
    #[serde(with = "humantime_serde")]
    pub janitor_interval: Duration,
    /// How often the scheduler looks for items other processes wrote.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// While the upstream refuses our credentials (401/403): how often one
    /// item is tried to see whether they work again.
    #[serde(with = "humantime_serde")]
    pub unauthorized_probe_interval: Duration,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        WorkerSettings {
            interval: Duration::from_secs(5 * 60),
            batch_size: 10,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            ttl: Duration::from_secs(7 * 24 * 3600),
            concurrency: 4,
            lease: DEFAULT_LEASE,
            push_timeout: Duration::from_secs(30),
            max_retry_after: Duration::from_secs(3600),
            janitor_interval: Duration::from_secs(60),
            poll_interval: Duration::from_millis(500),
            unauthorized_probe_interval: Duration::from_secs(60),
        }
    }
}

/// `[circuit]`: the circuit breaker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CircuitSettings {
    /// Consecutive retryable failures (across items) that open the circuit.
    pub threshold: u32,
    /// How long delivery stops before one probe item is tried.
    #[serde(with = "humantime_serde")]
    pub cooldown: Duration,
    /// Each failed probe doubles the cool-down, up to this (at least
    /// `cooldown`).
    #[serde(with = "humantime_serde")]
    pub max_cooldown: Duration,
}

impl Default for CircuitSettings {
    fn default() -> Self {
        CircuitSettings {
            threshold: 5,
            cooldown: Duration::from_secs(60),
            max_cooldown: Duration::from_secs(5 * 60),
        }
    }
}

/// `[pusher]` or `[checker]`: a plugin chosen by name or path, with its own
/// settings.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PluginSettings {
    /// Plugin name, looked up on `plugins.search_path` as the platform's
    /// library file name (`libretryq_NAME.so`, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Path of the plugin library.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// SHA-256 (hex) the library file must have, checked before loading.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// The plugin's own settings, handed to it as JSON as they are.
    pub settings: serde_json::Map<String, serde_json::Value>,
    /// Where the plugin runs: in the daemon, or in a child process that may
    /// crash without taking the daemon along.
    pub isolation: Isolation,
    /// With `isolation = "process"`: the child's address-space cap in bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
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

/// `[admin]`: the admin and ingest HTTP API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminSettings {
    /// Listen address; loopback by default. A non-loopback address needs a token.
    pub listen: SocketAddr,
    /// File holding the bearer token (read at startup).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// Environment variable holding the bearer token (when no token file).
    pub token_env: String,
    /// Largest request body accepted, in bytes.
    pub max_body: u64,
    /// PEM certificate chain: with `tls_key`, the listener serves HTTPS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
}

impl Default for AdminSettings {
    fn default() -> Self {
        AdminSettings {
            listen: SocketAddr::from(([127, 0, 0, 1], 7878)),
            token_file: None,
            token_env: DEFAULT_ADMIN_TOKEN_ENV.to_owned(),
            max_body: DEFAULT_ADMIN_MAX_BODY,
            tls_cert: None,
            tls_key: None,
        }
    }
}

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

// ---------------------------------------------------------------------------
// Schema

/// The type and range of one configuration key.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KeyKind {
    /// A human duration string ("30s", "5m", "7d"); `nonzero` refuses zero.
    Duration {
        /// Whether zero is refused.
        nonzero: bool,
    },
    /// An unsigned integer within `min..=max`.
    UInt {
        /// Smallest value accepted.
        min: u64,
        /// Largest value accepted.
        max: u64,
    },
    /// A number within `min..=max`.
    Float {
        /// Smallest value accepted.
        min: f64,
        /// Largest value accepted.
        max: f64,
    },
    /// `true` or `false`.
    Bool,
    /// A non-empty string.
    String,
    /// One of these words.
    Enum(&'static [&'static str]),
    /// A non-empty path.
    Path,
    /// A list of paths.
    PathList,
    /// An IP address and port (`127.0.0.1:7878`).
    SocketAddr,
    /// 64 hex digits.
    Sha256,
    /// A `tracing` filter directive.
    LogFilter,
    /// A table passed as it is (plugin settings).
    FreeTable,
}

impl KeyKind {
    fn expected(&self) -> String {
        match self {
            KeyKind::Duration { nonzero } => format!(
                "a duration such as \"30s\", \"5m\" or \"7d\"{}",
                if *nonzero { ", greater than zero" } else { "" }
            ),
            KeyKind::UInt { min, max } => format!("an integer from {min} to {max}"),
            KeyKind::Float { min, max } => format!("a number from {min} to {max}"),
            KeyKind::Bool => "true or false".to_owned(),
            KeyKind::String => "a non-empty string".to_owned(),
            KeyKind::Enum(words) => format!("one of {}", words.join(", ")),
            KeyKind::Path => "a file or directory path".to_owned(),
            KeyKind::PathList => "a list of directory paths".to_owned(),
            KeyKind::SocketAddr => "an address and port such as \"127.0.0.1:7878\"".to_owned(),
            KeyKind::Sha256 => "64 hexadecimal digits (a SHA-256)".to_owned(),
            KeyKind::LogFilter => {
                "a log filter such as \"info\" or \"retryq=debug,warn\"".to_owned()
            }
            KeyKind::FreeTable => "a table".to_owned(),
        }
    }
}

/// One key of the schema.
#[derive(Debug, Clone, Copy)]
pub struct KeySpec {
    /// Dotted key (`worker.max_attempts`).
    pub key: &'static str,
    /// Its type and range.
    pub kind: KeyKind,
    /// Whether the key may be absent from the built-in defaults (no default value).
    pub optional: bool,
}

const fn key(key: &'static str, kind: KeyKind) -> KeySpec {
    KeySpec {
        key,
        kind,
        optional: false,
    }
}

const fn opt(key: &'static str, kind: KeyKind) -> KeySpec {
    KeySpec {
        key,
        kind,
        optional: true,
    }
}

const DURATION: KeyKind = KeyKind::Duration { nonzero: true };
const COUNT: KeyKind = KeyKind::UInt {
    min: 1,
    max: u32::MAX as u64,
};
const BYTES: KeyKind = KeyKind::UInt {
    min: 1,
    max: i64::MAX as u64,
};

/// Every configuration key, its type and range. `config/default.toml`
/// documents each of them.
pub const SCHEMA: &[KeySpec] = &[
    key(
        "store.backend",
        KeyKind::Enum(&["sqlite", "files", "postgres"]),
    ),
    opt("store.path", KeyKind::Path),
    opt("store.postgres", KeyKind::FreeTable),
    key("store.max_items", COUNT),
    key("store.max_bytes", BYTES),
    key("store.overflow", KeyKind::Enum(&["reject", "drop_oldest"])),
    key("store.dedupe", KeyKind::Bool),
    opt("store.dead_letter_ttl", DURATION),
    key(
        "store.max_quarantined",
        KeyKind::UInt {
            min: 0,
            max: u32::MAX as u64,
        },
    ),
    key("worker.interval", DURATION),
    key("worker.batch_size", COUNT),
    key("worker.max_attempts", COUNT),
    key("worker.ttl", DURATION),
    key("worker.concurrency", KeyKind::UInt { min: 1, max: 1024 }),
    key("worker.lease", DURATION),
    key("worker.push_timeout", DURATION),
    key("worker.max_retry_after", DURATION),
    key("worker.janitor_interval", DURATION),
    key("worker.poll_interval", DURATION),
    key("worker.unauthorized_probe_interval", DURATION),
    key(
        "backoff.strategy",
        KeyKind::Enum(&["exponential", "linear", "constant"]),
    ),
    key("backoff.base", DURATION),
    key("backoff.max", DURATION),
    key("backoff.jitter", KeyKind::Float { min: 0.0, max: 1.0 }),
    key(
        "backoff.jitter_mode",
        KeyKind::Enum(&["proportional", "full"]),
    ),
    key(
        "backoff.multiplier",
        KeyKind::Float {
            min: 1.0,
            max: 1000.0,
        },
    ),
    key("circuit.threshold", COUNT),
    key("circuit.cooldown", DURATION),
    key("circuit.max_cooldown", DURATION),
    opt("pusher.name", KeyKind::String),
    opt("pusher.path", KeyKind::Path),
    opt("pusher.sha256", KeyKind::Sha256),
    key("pusher.settings", KeyKind::FreeTable),
    key(
        "pusher.isolation",
        KeyKind::Enum(&["in_process", "process"]),
    ),
    opt("pusher.memory_limit", BYTES),
    opt("checker.name", KeyKind::String),
    opt("checker.path", KeyKind::Path),
    opt("checker.sha256", KeyKind::Sha256),
    key("checker.settings", KeyKind::FreeTable),
    key(
        "checker.isolation",
        KeyKind::Enum(&["in_process", "process"]),
    ),
    opt("checker.memory_limit", BYTES),
    key("plugins.search_path", KeyKind::PathList),
    key("admin.listen", KeyKind::SocketAddr),
    opt("admin.token_file", KeyKind::Path),
    key("admin.token_env", KeyKind::String),
    key("admin.max_body", BYTES),
    opt("admin.tls_cert", KeyKind::Path),
    opt("admin.tls_key", KeyKind::Path),
    key("log.level", KeyKind::LogFilter),
    key("log.format", KeyKind::Enum(&["pretty", "json"])),
];

/// The spec of a dotted key, if the schema has it.
pub fn key_spec(key: &str) -> Option<&'static KeySpec> {
    SCHEMA.iter().find(|s| s.key == key)
}

fn is_section(path: &str) -> bool {
    SCHEMA.iter().any(|s| {
        s.key.len() > path.len() && s.key.starts_with(path) && s.key[path.len()..].starts_with('.')
    })
}

// ---------------------------------------------------------------------------
// Errors

/// Where a configuration value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layer {
    /// [`Settings::default`].
    Defaults,
    /// A TOML file.
    File(PathBuf),
    /// An environment variable (its full name).
    Env(String),
}

impl fmt::Display for Layer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Layer::Defaults => f.write_str("built-in defaults"),
            Layer::File(p) => write!(f, "config file {}", p.display()),
            Layer::Env(name) => write!(f, "environment variable {name}"),
        }
    }
}

/// Why a configuration could not be loaded. Every variant names the layer.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A config file given explicitly does not exist.
    #[error("{layer}: file not found")]
    FileNotFound {
        /// The missing file.
        layer: Layer,
    },
    /// A file could not be read or parsed as TOML.
    #[error("{layer}: {message}")]
    Parse {
        /// The file.
        layer: Layer,
        /// The parser's message.
        message: String,
    },
    /// A key the schema does not know.
    #[error("unknown key `{key}` in {layer}{}", hint.as_ref().map(|h| format!(" (did you mean `{h}`?)")).unwrap_or_default())]
    UnknownKey {
        /// The dotted key.
        key: String,
        /// Where it was set.
        layer: Layer,
        /// A known key with a similar name.
        hint: Option<String>,
    },
    /// A value of the wrong type or out of range.
    #[error("invalid value for `{key}` in {layer}: {value} ({reason})")]
    InvalidValue {
        /// The dotted key.
        key: String,
        /// The value as given.
        value: String,
        /// Where it was set.
        layer: Layer,
        /// What was expected.
        reason: String,
    },
}

impl ConfigError {
    /// The layer the error is about.
    pub fn layer(&self) -> &Layer {
        match self {
            ConfigError::FileNotFound { layer }
            | ConfigError::Parse { layer, .. }
            | ConfigError::UnknownKey { layer, .. }
            | ConfigError::InvalidValue { layer, .. } => layer,
        }
    }
}

// ---------------------------------------------------------------------------
// Loading

/// Where the environment layer comes from.
#[derive(Debug, Clone, Default)]
pub enum EnvSource {
    /// The process environment.
    #[default]
    Process,
    /// These variables only (tests, embedding hosts).
    Fixed(Vec<(String, String)>),
    /// No environment layer.
    None,
}

/// What [`Settings::load`] reads.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// The directory holding `default.toml`. `None`: `./config`, and a
    /// missing `default.toml` there is fine (built-in defaults suffice).
    /// When set, the directory must contain `default.toml`.
    pub config_dir: Option<PathBuf>,
    /// `--config FILE` layers, in order; each must exist.
    pub files: Vec<PathBuf>,
    /// The environment layer.
    pub env: EnvSource,
}

/// The merged value tree and, for each leaf key, the layer that set it last.
#[derive(Debug, Default)]
struct Merged {
    tree: serde_json::Map<String, serde_json::Value>,
    origins: BTreeMap<String, Layer>,
    layers: Vec<Layer>,
}

/// A loaded configuration with where each value came from.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The effective settings.
    pub settings: Settings,
    /// For each key some layer set, the layer that set it last.
    pub origins: BTreeMap<String, Layer>,
    /// The layers read, in order (built-in defaults first; the environment
    /// appears once per variable used).
    pub layers: Vec<Layer>,
}

impl Settings {
    /// Loads, validates and merges every layer `options` names.
    pub fn load(options: &LoadOptions) -> Result<Settings, ConfigError> {
        Ok(Self::load_with_origins(options)?.settings)
    }

    /// Like [`Settings::load`], also saying which layers were read and which
    /// layer set each key (for `config check`).
    pub fn load_with_origins(options: &LoadOptions) -> Result<Loaded, ConfigError> {
        let mut merged = Merged::default();
        merged.layers.push(Layer::Defaults);

        let defaults =
            serde_json::to_value(Settings::default()).map_err(|e| ConfigError::Parse {
                layer: Layer::Defaults,
                message: e.to_string(),
            })?;
        let defaults = json_to_config(&defaults);
        apply_layer(&mut merged, &defaults, "", &|_| Layer::Defaults)?;

        let (dir, required) = match &options.config_dir {
            Some(d) => (d.clone(), true),
            None => (PathBuf::from(DEFAULT_CONFIG_DIR), false),
        };
        let default_file = dir.join(DEFAULT_CONFIG_FILE);
        if required || default_file.is_file() {
            load_file(&mut merged, &default_file)?;
        }
        for file in &options.files {
            load_file(&mut merged, file)?;
        }

        let vars: Vec<(String, String)> = match &options.env {
            EnvSource::Process => std::env::vars_os()
                .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
                .collect(),
            EnvSource::Fixed(v) => v.clone(),
            EnvSource::None => Vec::new(),
        };
        load_env(&mut merged, &vars)?;

        let settings: Settings = serde_json::from_value(serde_json::Value::Object(
            merged.tree.clone(),
        ))
        .map_err(|e| ConfigError::Parse {
            layer: Layer::Defaults,
            message: format!("merged configuration does not fit the schema: {e}"),
        })?;
        settings.check_rules(&merged.origins)?;
        Ok(Loaded {
            settings,
            origins: merged.origins,
            layers: merged.layers,
        })
    }

    /// Rules across keys, checked on the merged result.
    fn check_rules(&self, origins: &BTreeMap<String, Layer>) -> Result<(), ConfigError> {
        let layer_of = |k: &str| origins.get(k).cloned().unwrap_or(Layer::Defaults);
        let postgres = self.store.backend == StoreBackend::Postgres;
        if let Err(e) = crate::fleet::check_store_options(postgres, self.store.postgres.as_ref()) {
            return Err(ConfigError::InvalidValue {
                layer: layer_of("store.postgres"),
                key: e.key,
                value: e.value,
                reason: e.reason,
            });
        }
        if let Err(e) = self.backoff.validate() {
            let key = format!("backoff.{}", e.field);
            let value = match e.field {
                "base" => humantime::format_duration(self.backoff.base).to_string(),
                "max" => humantime::format_duration(self.backoff.max_interval).to_string(),
                "multiplier" => self.backoff.multiplier.to_string(),
                "jitter" => self.backoff.jitter.to_string(),
                _ => String::new(),
            };
            return Err(ConfigError::InvalidValue {
                layer: layer_of(&key),
                key,
                value: format!("{value:?}"),
                reason: e.reason,
            });
        }
        for section in ["pusher", "checker"] {
            let p = if section == "pusher" {
                &self.pusher
            } else {
                &self.checker
            };
            if p.name.is_some() && p.path.is_some() {
                let key = format!("{section}.path");
                return Err(ConfigError::InvalidValue {
                    layer: layer_of(&key),
                    value: format!("{:?}", p.path.as_deref().unwrap_or(Path::new("")).display()),
                    key,
                    reason: format!(
                        "{section}.name is also set ({:?}); choose the plugin by name or by path, not both",
                        p.name.as_deref().unwrap_or("")
                    ),
                });
            }
            if p.sha256.is_some() && !p.is_configured() {
                let key = format!("{section}.sha256");
                return Err(ConfigError::InvalidValue {
                    layer: layer_of(&key),
                    value: "(set)".to_owned(),
                    key,
                    reason: format!("no plugin chosen: set {section}.name or {section}.path"),
                });
            }
        }
        if self.worker.lease < self.worker.push_timeout {
            let key = "worker.lease".to_owned();
            return Err(ConfigError::InvalidValue {
                layer: layer_of(&key),
                value: format!("{:?}", humantime::format_duration(self.worker.lease).to_string()),
                key,
                reason: format!(
                    "shorter than worker.push_timeout ({}): a lease could expire while its push is in flight",
                    humantime::format_duration(self.worker.push_timeout)
                ),
            });
        }
        Ok(())
    }

    /// The options the store is opened with.
    pub fn store_options(&self) -> StoreOptions {
        StoreOptions {
            max_items: self.store.max_items,
            max_bytes: self.store.max_bytes,
            overflow: self.store.overflow,
            dedupe: self.store.dedupe,
            default_max_attempts: self.worker.max_attempts,
            dead_letter_ttl: self.store.dead_letter_ttl,
            default_lease: self.worker.lease,
            max_quarantined: self.store.max_quarantined,
            ..StoreOptions::default()
        }
    }

    /// The worker configuration `[worker]`, `[backoff]` and `[circuit]` give
    /// (other worker fields keep their defaults).
    pub fn worker_config(&self) -> crate::worker::RetryWorkerConfig {
        let defaults = crate::worker::RetryWorkerConfig::default();
        crate::worker::RetryWorkerConfig {
            interval: self.worker.interval,
            batch_size: self.worker.batch_size,
            max_attempts: self.worker.max_attempts,
            ttl: self.worker.ttl,
            backoff: self.backoff.clone(),
            concurrency: self.worker.concurrency,
            lease: self.worker.lease,
            push_timeout: self.worker.push_timeout,
            max_retry_after: self.worker.max_retry_after,
            janitor_interval: self.worker.janitor_interval,
            poll_interval: self.worker.poll_interval,
            unauthorized_probe_interval: self.worker.unauthorized_probe_interval,
            circuit: crate::worker::CircuitConfig {
                threshold: self.circuit.threshold,
                cooldown: self.circuit.cooldown,
                // A cool-down longer than the cap is kept as it is.
                max_cooldown: self.circuit.max_cooldown.max(self.circuit.cooldown),
            },
            ..defaults
        }
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
/// file or the files-backend directory, creating parent directories.
pub fn open_store(
    store: &StoreSettings,
    options: StoreOptions,
) -> Result<Arc<dyn RetryQueue>, QueueError> {
    let path = store.effective_path();
    match store.backend {
        StoreBackend::Sqlite => open_sqlite(&path, options),
        StoreBackend::Files => open_files(&path, options),
        StoreBackend::Postgres => Ok(crate::fleet::open_postgres(
            store.postgres.as_ref(),
            options,
        )?),
    }
}

fn open_sqlite(path: &Path, options: StoreOptions) -> Result<Arc<dyn RetryQueue>, QueueError> {
    Ok(Arc::new(crate::store::SqliteRetryQueue::open(
        path, options,
    )?))
}

fn open_files(path: &Path, options: StoreOptions) -> Result<Arc<dyn RetryQueue>, QueueError> {
    Ok(Arc::new(crate::store::FileRetryQueue::open(path, options)?))
}

fn load_file(merged: &mut Merged, path: &Path) -> Result<(), ConfigError> {
    let layer = Layer::File(path.to_path_buf());
    if !path.is_file() {
        return Err(ConfigError::FileNotFound { layer });
    }
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Parse {
        layer: layer.clone(),
        message: e.to_string(),
    })?;
    let source = config::File::from_str(&text, FileFormat::Toml);
    let map = source.collect().map_err(|e| ConfigError::Parse {
        layer: layer.clone(),
        message: e.to_string(),
    })?;
    merged.layers.push(layer.clone());
    apply_layer(merged, &map, "", &|_| layer.clone())
}

fn load_env(merged: &mut Merged, vars: &[(String, String)]) -> Result<(), ConfigError> {
    let prefix = format!("{ENV_PREFIX}{ENV_SEPARATOR}");
    let mut ours: Map<String, String> = Map::new();
    let mut names: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in vars {
        if name.len() > prefix.len() && name[..prefix.len()].eq_ignore_ascii_case(&prefix) {
            let key = name[prefix.len()..]
                .split(ENV_SEPARATOR)
                .collect::<Vec<_>>()
                .join(".")
                .to_lowercase();
            names.insert(key, name.clone());
            merged.layers.push(Layer::Env(name.clone()));
            ours.insert(name.clone(), value.clone());
        }
    }
    if ours.is_empty() {
        return Ok(());
    }
    let source = config::Environment::with_prefix(ENV_PREFIX)
        .prefix_separator(ENV_SEPARATOR)
        .separator(ENV_SEPARATOR)
        .source(Some(ours));
    let map = source.collect().map_err(|e| ConfigError::Parse {
        layer: Layer::Env(format!("{prefix}*")),
        message: e.to_string(),
    })?;
    let name_of = |key: &str| -> Layer {
        // A key inside a plugin's settings table maps back to its variable;
        // fall back to the spelled-out name.
        let name = names.get(key).cloned().unwrap_or_else(|| {
            format!(
                "{prefix}{}",
                key.replace('.', ENV_SEPARATOR).to_ascii_uppercase()
            )
        });
        Layer::Env(name)
    };
    apply_layer(merged, &nest(map), "", &name_of)
}

/// Turns the environment source's flat dotted keys into nested tables.
fn nest(flat: Map<String, Value>) -> Map<String, Value> {
    let mut root: Map<String, Value> = Map::new();
    for (key, value) in flat {
        let mut parts: Vec<&str> = key.split('.').collect();
        let last = parts.pop().unwrap_or_default().to_owned();
        let mut node = &mut root;
        for p in parts {
            let entry = node
                .entry(p.to_owned())
                .or_insert_with(|| Value::new(None, ValueKind::Table(Map::new())));
            if !matches!(entry.kind, ValueKind::Table(_)) {
                entry.kind = ValueKind::Table(Map::new());
            }
            node = match &mut entry.kind {
                ValueKind::Table(t) => t,
                _ => return root,
            };
        }
        node.insert(last, value);
    }
    root
}

/// Validates one layer's keys against the schema and merges the normalized
/// values into `merged`.
fn apply_layer(
    merged: &mut Merged,
    map: &Map<String, Value>,
    prefix: &str,
    layer_of: &dyn Fn(&str) -> Layer,
) -> Result<(), ConfigError> {
    for (name, value) in map {
        let path = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}.{name}")
        };
        if let Some(spec) = key_spec(&path) {
            let normalized = normalize(spec, value, &path, &layer_of(&path))?;
            if let Some(normalized) = normalized {
                insert_path(&mut merged.tree, &path, normalized, spec.kind);
                merged.origins.insert(path.clone(), layer_of(&path));
            }
        } else if is_section(&path) {
            match &value.kind {
                ValueKind::Table(t) => apply_layer(merged, t, &path, layer_of)?,
                other => {
                    return Err(ConfigError::InvalidValue {
                        layer: layer_of(&path),
                        value: show_kind(other),
                        key: path,
                        reason: "expected a section (a table of keys)".to_owned(),
                    })
                }
            }
        } else {
            return Err(ConfigError::UnknownKey {
                hint: suggest(&path),
                layer: layer_of(&path),
                key: path,
            });
        }
    }
    Ok(())
}

/// Sets `path` in the tree; plugin settings tables merge key by key.
fn insert_path(
    tree: &mut serde_json::Map<String, serde_json::Value>,
    path: &str,
    value: serde_json::Value,
    kind: KeyKind,
) {
    let mut parts: Vec<&str> = path.split('.').collect();
    let last = parts.pop().unwrap_or_default();
    let mut node = tree;
    for p in parts {
        let entry = node
            .entry(p.to_owned())
            .or_insert_with(|| serde_json::Value::Object(Default::default()));
        if !entry.is_object() {
            *entry = serde_json::Value::Object(Default::default());
        }
        node = match entry {
            serde_json::Value::Object(m) => m,
            _ => return,
        };
    }
    match (kind, node.get_mut(last), value) {
        (
            KeyKind::FreeTable,
            Some(serde_json::Value::Object(old)),
            serde_json::Value::Object(new),
        ) => deep_merge(old, new),
        (_, _, value) => {
            node.insert(last.to_owned(), value);
        }
    }
}

fn deep_merge(
    old: &mut serde_json::Map<String, serde_json::Value>,
    new: serde_json::Map<String, serde_json::Value>,
) {
    for (k, v) in new {
        match (old.get_mut(&k), v) {
            (Some(serde_json::Value::Object(o)), serde_json::Value::Object(n)) => deep_merge(o, n),
            (_, v) => {
                old.insert(k, v);
            }
        }
    }
}

/// Checks a value against its spec and returns it in the form `Settings`
/// deserializes (`None` for an explicit empty value of an optional key).
fn normalize(
    spec: &KeySpec,
    value: &Value,
    key: &str,
    layer: &Layer,
) -> Result<Option<serde_json::Value>, ConfigError> {
    let bad = |reason: String| ConfigError::InvalidValue {
        key: key.to_owned(),
        value: show_kind(&value.kind),
        layer: layer.clone(),
        reason,
    };
    let expected = || format!("expected {}", spec.kind.expected());
    if matches!(value.kind, ValueKind::Nil) {
        return if spec.optional {
            Ok(None)
        } else {
            Err(bad(expected()))
        };
    }
    let as_str = || match &value.kind {
        ValueKind::String(s) => Some(s.clone()),
        _ => None,
    };
    use serde_json::Value as J;
    let out = match spec.kind {
        KeyKind::Duration { nonzero } => {
            let s = as_str().ok_or_else(|| bad(expected()))?;
            let d = humantime::parse_duration(s.trim())
                .map_err(|e| bad(format!("{}: {e}", expected())))?;
            if nonzero && d.is_zero() {
                return Err(bad("must be greater than zero".to_owned()));
            }
            J::String(humantime::format_duration(d).to_string())
        }
        KeyKind::UInt { min, max } => {
            let n: Option<u64> = match &value.kind {
                ValueKind::I64(i) => u64::try_from(*i).ok(),
                ValueKind::I128(i) => u64::try_from(*i).ok(),
                ValueKind::U64(u) => Some(*u),
                ValueKind::U128(u) => u64::try_from(*u).ok(),
                ValueKind::String(s) if matches!(layer, Layer::Env(_)) => {
                    s.trim().replace('_', "").parse().ok()
                }
                _ => None,
            };
            let n = n.ok_or_else(|| bad(expected()))?;
            if n < min || n > max {
                return Err(bad(expected()));
            }
            J::from(n)
        }
        KeyKind::Float { min, max } => {
            let f: Option<f64> = match &value.kind {
                ValueKind::Float(f) => Some(*f),
                ValueKind::I64(i) => Some(*i as f64),
                ValueKind::U64(u) => Some(*u as f64),
                ValueKind::String(s) if matches!(layer, Layer::Env(_)) => s.trim().parse().ok(),
                _ => None,
            };
            let f = f.filter(|f| f.is_finite()).ok_or_else(|| bad(expected()))?;
            if f < min || f > max {
                return Err(bad(expected()));
            }
            serde_json::Number::from_f64(f)
                .map(J::Number)
                .ok_or_else(|| bad(expected()))?
        }
        KeyKind::Bool => match &value.kind {
            ValueKind::Boolean(b) => J::Bool(*b),
            ValueKind::String(s) if matches!(layer, Layer::Env(_)) => {
                match s.trim().to_ascii_lowercase().as_str() {
                    "true" | "1" | "yes" | "on" => J::Bool(true),
                    "false" | "0" | "no" | "off" => J::Bool(false),
                    _ => return Err(bad(expected())),
                }
            }
            _ => return Err(bad(expected())),
        },
        KeyKind::String | KeyKind::Path => {
            let s = as_str().ok_or_else(|| bad(expected()))?;
            if s.trim().is_empty() {
                return Err(bad(expected()));
            }
            J::String(s)
        }
        KeyKind::Enum(words) => {
            let s = as_str().ok_or_else(|| bad(expected()))?;
            let w = s.trim().to_ascii_lowercase();
            if !words.contains(&w.as_str()) {
                return Err(bad(expected()));
            }
            J::String(w)
        }
        KeyKind::PathList => {
            let items: Vec<Value> = match &value.kind {
                ValueKind::Array(a) => a.clone(),
                // An environment variable holds a comma-separated list.
                ValueKind::String(s) if matches!(layer, Layer::Env(_)) => s
                    .split(',')
                    .map(|p| Value::new(None, ValueKind::String(p.trim().to_owned())))
                    .collect(),
                _ => return Err(bad(expected())),
            };
            let mut out = Vec::with_capacity(items.len());
            for item in items {
                match item.kind {
                    ValueKind::String(s) if !s.trim().is_empty() => out.push(J::String(s)),
                    _ => return Err(bad(expected())),
                }
            }
            J::Array(out)
        }
        KeyKind::SocketAddr => {
            let s = as_str().ok_or_else(|| bad(expected()))?;
            let addr: SocketAddr = s.trim().parse().map_err(|_| bad(expected()))?;
            J::String(addr.to_string())
        }
        KeyKind::Sha256 => {
            let s = as_str().ok_or_else(|| bad(expected()))?;
            let s = s.trim().to_ascii_lowercase();
            if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad(expected()));
            }
            J::String(s)
        }
        KeyKind::LogFilter => {
            let s = as_str().ok_or_else(|| bad(expected()))?;
            tracing_subscriber::EnvFilter::try_new(s.trim())
                .map_err(|e| bad(format!("{}: {e}", expected())))?;
            J::String(s.trim().to_owned())
        }
        KeyKind::FreeTable => match &value.kind {
            ValueKind::Table(_) => config_to_json(value),
            _ => return Err(bad(expected())),
        },
    };
    Ok(Some(out))
}

/// A value as the user wrote it, for error messages.
fn show_kind(kind: &ValueKind) -> String {
    match kind {
        ValueKind::Nil => "(empty)".to_owned(),
        ValueKind::Boolean(b) => b.to_string(),
        ValueKind::I64(i) => i.to_string(),
        ValueKind::I128(i) => i.to_string(),
        ValueKind::U64(u) => u.to_string(),
        ValueKind::U128(u) => u.to_string(),
        ValueKind::Float(f) => f.to_string(),
        ValueKind::String(s) => format!("{s:?}"),
        ValueKind::Table(_) => "a table".to_owned(),
        ValueKind::Array(_) => "a list".to_owned(),
    }
}

fn config_to_json(value: &Value) -> serde_json::Value {
    use serde_json::Value as J;
    match &value.kind {
        ValueKind::Nil => J::Null,
        ValueKind::Boolean(b) => J::Bool(*b),
        ValueKind::I64(i) => J::from(*i),
        ValueKind::I128(i) => i64::try_from(*i)
            .map(J::from)
            .unwrap_or_else(|_| J::String(i.to_string())),
        ValueKind::U64(u) => J::from(*u),
        ValueKind::U128(u) => u64::try_from(*u)
            .map(J::from)
            .unwrap_or_else(|_| J::String(u.to_string())),
        ValueKind::Float(f) => serde_json::Number::from_f64(*f)
            .map(J::Number)
            .unwrap_or(J::Null),
        ValueKind::String(s) => J::String(s.clone()),
        ValueKind::Table(t) => J::Object(
            t.iter()
                .map(|(k, v)| (k.clone(), config_to_json(v)))
                .collect(),
        ),
        ValueKind::Array(a) => J::Array(a.iter().map(config_to_json).collect()),
    }
}

fn json_to_config(value: &serde_json::Value) -> Map<String, Value> {
    fn conv(v: &serde_json::Value) -> Value {
        use serde_json::Value as J;
        let kind = match v {
            J::Null => ValueKind::Nil,
            J::Bool(b) => ValueKind::Boolean(*b),
            J::Number(n) => {
                if let Some(u) = n.as_u64() {
                    ValueKind::U64(u)
                } else if let Some(i) = n.as_i64() {
                    ValueKind::I64(i)
                } else {
                    ValueKind::Float(n.as_f64().unwrap_or_default())
                }
            }
            J::String(s) => ValueKind::String(s.clone()),
            J::Array(a) => ValueKind::Array(a.iter().map(conv).collect()),
            J::Object(m) => ValueKind::Table(m.iter().map(|(k, v)| (k.clone(), conv(v))).collect()),
        };
        Value::new(None, kind)
    }
    match conv(value).kind {
        ValueKind::Table(t) => t,
        _ => Map::new(),
    }
}

/// The known key closest to `key` (same section first), if close enough.
fn suggest(key: &str) -> Option<String> {
    SCHEMA
        .iter()
        .map(|s| (edit_distance(s.key, key), s.key))
        .filter(|(d, _)| *d <= 3)
        .min()
        .map(|(_, k)| k.to_owned())
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_str(toml: &str, env: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("layer.toml");
        std::fs::write(&file, toml).unwrap();
        Settings::load(&LoadOptions {
            config_dir: None,
            files: vec![file],
            env: EnvSource::Fixed(
                env.iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
        })
    }

    #[test]
    fn defaults_pass_their_own_validation() {
        let s = Settings::load(&LoadOptions {
            config_dir: Some(PathBuf::from("/nonexistent-retryq")),
            ..Default::default()
        });
        assert!(matches!(s, Err(ConfigError::FileNotFound { .. })));
        let s = load_str("", &[]).unwrap();
        assert_eq!(s, Settings::default());
        // The defaults make a worker configuration the worker accepts.
        s.worker_config().validate().unwrap();
    }

    #[test]
    fn every_schema_key_is_a_settings_field() {
        // Setting each key to a valid value must deserialize (no key the
        // schema knows is missing from Settings).
        let mut d = serde_json::to_value(Settings::default()).unwrap();
        for spec in SCHEMA {
            let mut node = &mut d;
            let parts: Vec<&str> = spec.key.split('.').collect();
            for p in &parts[..parts.len() - 1] {
                node = node.get_mut(*p).unwrap_or_else(|| panic!("{}", spec.key));
            }
            let last = parts[parts.len() - 1];
            assert!(
                spec.optional || node.get(last).is_some(),
                "{} has no default",
                spec.key
            );
        }
    }

    /// Knobs the worker has and the config could not set before.
    #[test]
    fn probe_poll_and_cooldown_cap_reach_the_worker() {
        let s = load_str(
            "[worker]\npoll_interval = \"250ms\"\nunauthorized_probe_interval = \"2s\"\n\
             [circuit]\ncooldown = \"1s\"\nmax_cooldown = \"20s\"\n",
            &[],
        )
        .unwrap();
        let w = s.worker_config();
        assert_eq!(w.poll_interval, Duration::from_millis(250));
        assert_eq!(w.unauthorized_probe_interval, Duration::from_secs(2));
        assert_eq!(w.circuit.cooldown, Duration::from_secs(1));
        assert_eq!(w.circuit.max_cooldown, Duration::from_secs(20));
        w.validate().unwrap();
        // A cool-down above the cap keeps the cool-down as its own cap.
        let s = load_str("[circuit]\ncooldown = \"10m\"\n", &[]).unwrap();
        assert_eq!(
            s.worker_config().circuit.max_cooldown,
            Duration::from_secs(600)
        );
        s.worker_config().validate().unwrap();
    }

    #[test]
    fn unknown_key_names_key_and_layer() {
        let e = load_str("[worker]\nmax_atempts = 3\n", &[]).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("worker.max_atempts"), "{msg}");
        assert!(msg.contains("layer.toml"), "{msg}");
        assert!(msg.contains("worker.max_attempts"), "{msg}");
    }

    #[test]
    fn env_wins_and_is_typed() {
        let s = load_str(
            "[worker]\nmax_attempts = 4\ninterval = \"1m\"\n",
            &[
                ("RETRYQ__WORKER__MAX_ATTEMPTS", "3"),
                ("RETRYQ__STORE__DEDUPE", "false"),
                ("RETRYQ__PLUGINS__SEARCH_PATH", "/a,/b"),
                ("RETRYQ__PUSHER__SETTINGS__BASE_URL", "http://x"),
            ],
        )
        .unwrap();
        assert_eq!(s.worker.max_attempts, 3);
        assert_eq!(s.worker.interval, Duration::from_secs(60));
        assert!(!s.store.dedupe);
        assert_eq!(
            s.plugins.search_path,
            vec![PathBuf::from("/a"), PathBuf::from("/b")]
        );
        assert_eq!(s.pusher.settings["base_url"], "http://x");
    }

    #[test]
    fn bad_env_value_names_the_variable() {
        let e = load_str("", &[("RETRYQ__WORKER__INTERVAL", "5 parsecs")]).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("worker.interval"), "{msg}");
        assert!(msg.contains("5 parsecs"), "{msg}");
        assert!(
            msg.contains("environment variable RETRYQ__WORKER__INTERVAL"),
            "{msg}"
        );
    }

    #[test]
    fn cross_key_rules_name_the_layer() {
        let e = load_str("[backoff]\nbase = \"1h\"\nmax = \"1m\"\n", &[]).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("backoff.max") && msg.contains("layer.toml"),
            "{msg}"
        );
        let e = load_str("[pusher]\nname = \"http\"\npath = \"/x.so\"\n", &[]).unwrap_err();
        assert!(e.to_string().contains("pusher.path"), "{e}");
    }

    #[test]
    fn plugin_settings_keep_case_and_merge_and_redact() {
        let s = load_str(
            "[pusher]\nname = \"http\"\n[pusher.settings]\nbaseUrl = \"u\"\ntoken = \"s3cret\"\ntoken_env = \"TOK\"\n[pusher.settings.headers]\nAuthorization = \"Bearer z\"\n",
            &[],
        )
        .unwrap();
        assert_eq!(s.pusher.settings["baseUrl"], "u");
        let r = s.redacted();
        assert_eq!(r.pusher.settings["token"], REDACTED);
        assert_eq!(r.pusher.settings["token_env"], "TOK");
        assert_eq!(r.pusher.settings["headers"]["Authorization"], REDACTED);
        assert_eq!(r.pusher.settings["baseUrl"], "u");
    }

    #[test]
    fn wrong_types_are_refused() {
        for (toml, key) in [
            ("[worker]\nbatch_size = \"ten\"\n", "worker.batch_size"),
            ("[worker]\nbatch_size = 0\n", "worker.batch_size"),
            ("[worker]\ninterval = 300\n", "worker.interval"),
            ("[store]\nbackend = \"mysql\"\n", "store.backend"),
            ("[backoff]\njitter = 2.0\n", "backoff.jitter"),
            ("[admin]\nlisten = \"localhost\"\n", "admin.listen"),
            ("store = 3\n", "store"),
            ("[bogus]\nx = 1\n", "bogus"),
        ] {
            let e = load_str(toml, &[]).unwrap_err();
            assert!(e.to_string().contains(key), "{toml}: {e}");
        }
    }
}
