//! Layering: reads each source into a tree of values, checks every key of
//! it on its own (so an error names the source), and merges the trees,
//! remembering which source set each key last.
//!
//! # Layers (later wins)
//!
//! 1. **Built-in defaults**: the library types' `Default`s.
//! 2. **`config/default.toml`**: the file `default.toml` in the config
//!    directory, which is `./config` relative to the working directory
//!    unless [`LoadOptions::config_dir`] (the CLI's `--config-dir`) says
//!    otherwise. It is optional when the directory is the implicit `./config`;
//!    an explicitly chosen directory must contain it.
//! 3. **Each `--config FILE`**, in the order given ([`LoadOptions::files`]).
//! 4. **Environment variables** `RETRYQ__SECTION__KEY` (double underscore
//!    between levels, case-insensitive, so `RETRYQ__WORKER__MAX_ATTEMPTS=3`
//!    sets `worker.max_attempts`). Values are read as the key's type asks;
//!    `RETRYQ__PLUGINS__SEARCH_PATH` takes a comma-separated list.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use config::{FileFormat, Map, Source, Value, ValueKind};
use serde::Deserialize;

use super::attribution::{self, ConfigError, Layer};
use super::{Settings, DEFAULT_CONFIG_DIR, DEFAULT_CONFIG_FILE, ENV_PREFIX, ENV_SEPARATOR};

/// Keys whose environment variable holds a comma-separated list.
const ENV_LIST_KEYS: &[&str] = &["plugins.search_path"];

/// Tables handed to a plugin as they are: their values are never retyped.
const FREE_TABLES: &[&str] = &["pusher.settings", "checker.settings"];

type Table = Map<String, Value>;

/// Where the environment layer comes from.
#[derive(Debug, Clone, Default)]
pub enum EnvSource {
    /// `RETRYQ__*` variables of this process (the daemon and CLI).
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
    /// Where the `RETRYQ__*` layer, applied last, comes from.
    pub env: EnvSource,
}

/// A loaded configuration with where each value came from.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The settings after every layer, each section's `validate()` passed.
    pub settings: Settings,
    /// For each key some layer set, the layer that set it last.
    pub origins: BTreeMap<String, Layer>,
    /// The layers read, in order (built-in defaults first; the environment
    /// appears once per variable used).
    pub layers: Vec<Layer>,
}

/// The merged tree and, for each leaf key, the layer that set it last.
#[derive(Debug, Default)]
struct Merged {
    tree: Table,
    origins: BTreeMap<String, Layer>,
    layers: Vec<Layer>,
}

impl Settings {
    /// Loads, checks and merges every layer `options` names.
    pub fn load(options: &LoadOptions) -> Result<Settings, ConfigError> {
        Ok(Self::load_with_origins(options)?.settings)
    }

    /// Like [`Settings::load`], also saying which layers were read and which
    /// layer set each key (for `config check`).
    pub fn load_with_origins(options: &LoadOptions) -> Result<Loaded, ConfigError> {
        let mut merged = Merged::default();
        merged.layers.push(Layer::Defaults);

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

        let settings = deserialize(merged.tree.clone()).map_err(|e| ConfigError::Parse {
            layer: Layer::Defaults,
            message: format!("merged configuration does not fit the schema: {e}"),
        })?;
        attribution::check(&settings, &merged.origins)?;
        Ok(Loaded {
            settings,
            origins: merged.origins,
            layers: merged.layers,
        })
    }
}

fn deserialize(tree: Table) -> Result<Settings, config::ConfigError> {
    Settings::deserialize(Value::new(None, ValueKind::Table(tree)))
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
    let map = config::File::from_str(&text, FileFormat::Toml)
        .collect()
        .map_err(|e| ConfigError::Parse {
            layer: layer.clone(),
            message: e.to_string(),
        })?;
    merged.layers.push(layer.clone());
    apply_layer(merged, map, &|_| layer.clone())
}

fn load_env(merged: &mut Merged, vars: &[(String, String)]) -> Result<(), ConfigError> {
    let prefix = format!("{ENV_PREFIX}{ENV_SEPARATOR}");
    let mut tree = Table::new();
    let mut names: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in vars {
        if name.len() <= prefix.len() || !name[..prefix.len()].eq_ignore_ascii_case(&prefix) {
            continue;
        }
        let key = name[prefix.len()..]
            .split(ENV_SEPARATOR)
            .collect::<Vec<_>>()
            .join(".")
            .to_lowercase();
        merged.layers.push(Layer::Env(name.clone()));
        insert(&mut tree, &key, env_value(&key, value));
        names.insert(key, name.clone());
    }
    let name_of = |key: &str| -> Layer {
        let name = names.get(key).cloned().unwrap_or_else(|| {
            format!(
                "{prefix}{}",
                key.replace('.', ENV_SEPARATOR).to_ascii_uppercase()
            )
        });
        Layer::Env(name)
    };
    apply_layer(merged, tree, &name_of)
}

/// An environment variable's text as the key's type reads it: as text
/// when the key takes it (most do, converting as needed), else as the
/// first of a boolean, an integer or a number that the key accepts. The
/// store's limits need this: they are read through a flattened table,
/// which takes no text for a number.
fn env_value(key: &str, text: &str) -> Value {
    if ENV_LIST_KEYS.contains(&key) {
        let items = text
            .split(',')
            .map(|p| Value::new(None, ValueKind::String(p.trim().to_owned())))
            .collect();
        return Value::new(None, ValueKind::Array(items));
    }
    let as_text = Value::new(None, ValueKind::String(text.to_owned()));
    if FREE_TABLES
        .iter()
        .any(|t| key.starts_with(t) && key[t.len()..].starts_with('.'))
    {
        return as_text;
    }
    let t = text.trim();
    let digits = t.replace('_', "");
    let boolean = match t.to_ascii_lowercase().as_str() {
        "true" | "yes" | "on" | "1" => Some(true),
        "false" | "no" | "off" | "0" => Some(false),
        _ => None,
    };
    let readings = [
        Some(ValueKind::String(text.to_owned())),
        boolean.map(ValueKind::Boolean),
        digits.parse().ok().map(ValueKind::U64),
        digits.parse().ok().map(ValueKind::I64),
        t.parse().ok().map(ValueKind::Float),
    ];
    readings
        .into_iter()
        .flatten()
        .map(|kind| Value::new(None, kind))
        .find(|value| {
            let mut alone = Table::new();
            insert(&mut alone, key, value.clone());
            deserialize(alone).is_ok()
        })
        .unwrap_or(as_text)
}

/// Checks each key of one layer on its own, then merges the layer.
fn apply_layer(
    merged: &mut Merged,
    layer: Table,
    layer_of: &dyn Fn(&str) -> Layer,
) -> Result<(), ConfigError> {
    let mut leaves = Vec::new();
    collect_leaves(&layer, "", &mut leaves);
    for (path, value) in leaves {
        let mut alone = Table::new();
        insert(&mut alone, &path, value.clone());
        if let Err(e) = deserialize(alone) {
            return Err(attribution::value_error(&path, &value, layer_of(&path), &e));
        }
        insert(&mut merged.tree, &path, value);
        merged.origins.insert(path.clone(), layer_of(&path));
    }
    Ok(())
}

/// Every value that is not a table with keys in it, with its dotted path.
fn collect_leaves(table: &Table, prefix: &str, out: &mut Vec<(String, Value)>) {
    for (name, value) in table {
        let path = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}.{name}")
        };
        match &value.kind {
            ValueKind::Table(t) if !t.is_empty() => collect_leaves(t, &path, out),
            _ => out.push((path, value.clone())),
        }
    }
}

/// Sets `path` in `tree`, making the tables on the way. An empty table
/// merges into the one already there rather than clearing it.
fn insert(tree: &mut Table, path: &str, value: Value) {
    let mut parts: Vec<&str> = path.split('.').collect();
    let last = parts.pop().unwrap_or_default();
    let mut node = tree;
    for p in parts {
        let entry = node
            .entry(p.to_owned())
            .or_insert_with(|| Value::new(None, ValueKind::Table(Table::new())));
        if !matches!(entry.kind, ValueKind::Table(_)) {
            entry.kind = ValueKind::Table(Table::new());
        }
        node = match &mut entry.kind {
            ValueKind::Table(t) => t,
            _ => return,
        };
    }
    let keep_existing = matches!(&value.kind, ValueKind::Table(t) if t.is_empty())
        && matches!(node.get(last).map(|v| &v.kind), Some(ValueKind::Table(_)));
    if !keep_existing {
        node.insert(last.to_owned(), value);
    }
}
