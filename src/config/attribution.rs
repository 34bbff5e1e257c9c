//! Error attribution: which key is wrong, with which value, set by which
//! layer. Type errors come from serde while one layer's key is read on its
//! own; rules come from the one `validate()` of each library type, whose
//! field is mapped here to the key a config file spells and to the layer
//! that set it.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use config::{Value, ValueKind};

use super::Settings;
use crate::admin::AdminError;
use crate::delivery::types::WorkerError;

/// Where a configuration value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layer {
    /// The built-in defaults.
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
        /// The layer that failed to read or parse.
        layer: Layer,
        /// The parser's message.
        message: String,
    },
    /// A key no section has.
    #[error("unknown key `{key}` in {layer}{}", hint.as_ref().map(|h| format!(" (did you mean `{h}`?)")).unwrap_or_default())]
    UnknownKey {
        /// The dotted key.
        key: String,
        /// Where it was set.
        layer: Layer,
        /// A known key with a similar name.
        hint: Option<String>,
    },
    /// A value of the wrong type, or one a `validate()` refuses.
    #[error("invalid value for `{key}` in {layer}: {value} ({reason})")]
    InvalidValue {
        /// The dotted key.
        key: String,
        /// The value as given.
        value: String,
        /// Where it was set.
        layer: Layer,
        /// What is wrong.
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

/// The error of reading key `path` = `value` of `layer` on its own.
pub(super) fn value_error(
    path: &str,
    value: &Value,
    layer: Layer,
    error: &config::ConfigError,
) -> ConfigError {
    let (at, reason) = innermost(error);
    if let Some(rest) = reason.strip_prefix("unknown field `") {
        let name = rest.split('`').next().unwrap_or_default();
        let parent = at.filter(|k| !k.is_empty());
        let join = |n: &str| match &parent {
            Some(p) => format!("{p}.{n}"),
            None => n.to_owned(),
        };
        let hint = closest(name, &expected_fields(rest)).map(|c| join(&c));
        return ConfigError::UnknownKey {
            key: join(name),
            layer,
            hint,
        };
    }
    ConfigError::InvalidValue {
        key: path.to_owned(),
        value: show(value),
        layer,
        reason,
    }
}

/// The key an error is at (as the `config` crate tracks it) and the
/// message without that key appended.
fn innermost(error: &config::ConfigError) -> (Option<String>, String) {
    match error {
        config::ConfigError::At { error, key, .. } => {
            let (_, reason) = innermost(error);
            (key.clone(), reason)
        }
        config::ConfigError::Type {
            unexpected,
            expected,
            key,
            ..
        } => (
            key.clone(),
            format!("invalid type: {unexpected}, expected {expected}"),
        ),
        other => (None, other.to_string()),
    }
}

/// The field names serde lists after "expected" in an unknown-field error.
fn expected_fields(message: &str) -> Vec<String> {
    message
        .split('`')
        .skip(2)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

fn closest(name: &str, candidates: &[String]) -> Option<String> {
    candidates
        .iter()
        .map(|c| (edit_distance(c, name), c))
        .filter(|(d, _)| *d <= 3)
        .min()
        .map(|(_, c)| c.clone())
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

/// A value as the user wrote it, for error messages.
fn show(value: &Value) -> String {
    match &value.kind {
        ValueKind::Nil => "(empty)".to_owned(),
        ValueKind::String(s) => format!("{s:?}"),
        ValueKind::Table(_) => "a table".to_owned(),
        ValueKind::Array(_) => "a list".to_owned(),
        other => other.to_string(),
    }
}

/// Runs every section's `validate()` on the merged settings; a refusal
/// names the key and the layer that set it last.
pub(super) fn check(
    settings: &Settings,
    origins: &BTreeMap<String, Layer>,
) -> Result<(), ConfigError> {
    let refused = |key: String, reason: String| {
        let value = shown_value(settings, &key);
        ConfigError::InvalidValue {
            layer: origins.get(&key).cloned().unwrap_or(Layer::Defaults),
            value,
            key,
            reason,
        }
    };
    if let Err(WorkerError::Config { field, reason }) = settings.worker.validate() {
        return Err(refused(worker_key(&field), reason));
    }
    if let Err(e) = settings.store_options().validate() {
        return Err(refused(store_key(e.field), e.reason.to_owned()));
    }
    // Its own value text: the url may hold a password, never echoed.
    let postgres = settings.store.backend == super::StoreBackend::Postgres;
    if let Err(e) = crate::fleet::check_store_options(postgres, settings.store.postgres.as_ref()) {
        return Err(ConfigError::InvalidValue {
            layer: origins.get(&e.key).cloned().unwrap_or(Layer::Defaults),
            key: e.key,
            value: e.value,
            reason: e.reason,
        });
    }
    match settings.admin.validate() {
        Err(AdminError::InvalidSetting { key, reason, .. }) => {
            return Err(refused(admin_key(key), reason.to_owned()))
        }
        Err(other) => {
            return Err(ConfigError::Parse {
                layer: Layer::Defaults,
                message: other.to_string(),
            })
        }
        Ok(()) => {}
    }
    for (section, result) in [
        ("pusher", settings.pusher.validate()),
        ("checker", settings.checker.validate()),
        ("log", settings.log.validate()),
    ] {
        if let Err(e) = result {
            return Err(refused(format!("{section}.{}", e.field), e.reason));
        }
    }
    Ok(())
}

/// The key of a [`crate::delivery::types::RetryWorkerConfig`] field: its
/// backoff and circuit breaker are sections of their own in a file.
fn worker_key(field: &str) -> String {
    if field.starts_with("backoff.") || field.starts_with("circuit.") {
        field.to_owned()
    } else {
        format!("worker.{field}")
    }
}

/// The key of a [`crate::store::StoreOptions`] field: two of them are set
/// by `[worker]`.
fn store_key(field: &str) -> String {
    match field {
        "default_max_attempts" => "worker.max_attempts".to_owned(),
        "default_lease" => "worker.lease".to_owned(),
        other => format!("store.{other}"),
    }
}

/// The key of an [`crate::admin::AdminConfig`] field.
fn admin_key(field: &str) -> String {
    match field {
        "body_limit" => "admin.max_body".to_owned(),
        other => format!("admin.{other}"),
    }
}

/// The effective value of `key`, as a config file would write it.
fn shown_value(settings: &Settings, key: &str) -> String {
    let Ok(tree) = serde_json::to_value(settings) else {
        return String::new();
    };
    key.split('.')
        .try_fold(&tree, |node, part| node.get(part))
        .map(|v| v.to_string())
        .unwrap_or_default()
}
