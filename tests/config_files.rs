//! The shipped configuration files: `config/default.toml` is exactly the
//! library's defaults and documents every knob the library types have; the
//! examples load.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use retryq::backoff::BackoffConfig;
use retryq::config::{EnvSource, LoadOptions, Settings, StoreBackend};
use retryq::store::postgres::PostgresOptions;
use retryq::store::StoreOptions;
use retryq::worker::RetryWorkerConfig;

fn config_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config")
}

fn load(files: &[&str]) -> Settings {
    Settings::load(&LoadOptions {
        config_dir: Some(config_dir()),
        files: files.iter().map(|f| config_dir().join(f)).collect(),
        env: EnvSource::None,
    })
    .unwrap_or_else(|e| panic!("{files:?}: {e}"))
}

#[test]
fn default_toml_is_exactly_the_built_in_defaults() {
    assert_eq!(load(&[]), Settings::default());
}

/// The defaults are the library types' own: default.toml disagreeing
/// with `RetryWorkerConfig`, `BackoffConfig`, `CircuitConfig` or
/// `StoreOptions` fails here, not in production.
#[test]
fn default_toml_is_the_library_defaults() {
    let s = load(&[]);
    assert_eq!(s.worker_config(), RetryWorkerConfig::default());
    assert_eq!(s.worker.backoff, BackoffConfig::default());
    // Every option, the two `[worker]` sets included.
    let library = StoreOptions::default();
    let from_file = s.store_options();
    assert_eq!(
        serde_json::to_value(&from_file).unwrap(),
        serde_json::to_value(&library).unwrap()
    );
    assert_eq!(from_file.default_lease, library.default_lease);
    assert_eq!(from_file.default_max_attempts, library.default_max_attempts);
}

/// Every knob: each leaf of the settings as serde writes them (an unset
/// optional key as null), plugin settings tables as one knob each.
fn knobs() -> BTreeSet<String> {
    fn walk(prefix: &str, v: &serde_json::Value, out: &mut BTreeSet<String>) {
        match v {
            serde_json::Value::Object(m) if !prefix.ends_with(".settings") => {
                for (k, v) in m {
                    let path = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&path, v, out);
                }
            }
            _ => {
                out.insert(prefix.to_owned());
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(
        "",
        &serde_json::to_value(Settings::default()).unwrap(),
        &mut out,
    );
    // [store.postgres] is absent from the defaults (it is only set with
    // backend = "postgres"); its knobs are the options type's own.
    walk(
        "store.postgres",
        &serde_json::to_value(PostgresOptions::default()).unwrap(),
        &mut out,
    );
    out
}

/// Keys written in default.toml, commented out or not, with their section.
fn documented_keys(text: &str) -> BTreeSet<String> {
    let mut section = String::new();
    let mut keys = BTreeSet::new();
    for line in text.lines() {
        let line = line.trim();
        // A commented-out table header (`# [store.postgres]`) opens its
        // section as a real one does.
        let header = line.trim_start_matches('#').trim();
        if let Some(name) = header.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_owned();
            keys.insert(section.clone());
            continue;
        }
        let body = line.trim_start_matches('#').trim();
        if let Some((key, _)) = body.split_once('=') {
            let key = key.trim();
            if !key.is_empty()
                && key
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            {
                keys.insert(format!("{section}.{key}"));
            }
        }
    }
    keys
}

#[test]
fn default_toml_documents_every_key() {
    let text = std::fs::read_to_string(config_dir().join("default.toml")).unwrap();
    let documented = documented_keys(&text);
    let knobs = knobs();
    // The walk must see the sections and their optional keys, or this
    // test would pass on nothing.
    for k in [
        "worker.lease",
        "backoff.max",
        "circuit.max_cooldown",
        "store.dead_letter_ttl",
        "pusher.name",
    ] {
        assert!(knobs.contains(k), "{k} not among {knobs:?}");
    }
    let missing: Vec<&String> = knobs.iter().filter(|k| !documented.contains(*k)).collect();
    assert!(
        missing.is_empty(),
        "default.toml does not document {missing:?}"
    );
    // And documents nothing the library does not have.
    let sections: BTreeSet<String> = knobs
        .iter()
        .filter_map(|k| k.rsplit_once('.').map(|(s, _)| s.to_owned()))
        .collect();
    let stale: Vec<&String> = documented
        .iter()
        .filter(|k| !knobs.contains(*k) && !sections.contains(*k))
        .filter(|k| !k.starts_with("pusher.settings.") && !k.starts_with("checker.settings."))
        .collect();
    assert!(
        stale.is_empty(),
        "default.toml documents unknown keys {stale:?}"
    );
}

/// Every knob can be set from a file: each one, written on its own with
/// its default value, loads.
#[test]
fn every_knob_can_be_set_from_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut defaults = serde_json::to_value(Settings::default()).unwrap();
    defaults["store"]["postgres"] = serde_json::to_value(PostgresOptions::default()).unwrap();
    let mut set = 0;
    for knob in knobs() {
        let (section, key) = knob.rsplit_once('.').unwrap();
        let value = section
            .split('.')
            .chain([key])
            .try_fold(&defaults, |n, p| n.get(p))
            .unwrap();
        // Unset optional keys have no default to write; a plugin's
        // settings table is the plugin's.
        if value.is_null() || value.is_object() {
            continue;
        }
        let value = toml::Value::try_from(value).unwrap();
        let file = dir.path().join("one.toml");
        std::fs::write(&file, format!("[{section}]\n{key} = {value}\n")).unwrap();
        Settings::load(&LoadOptions {
            config_dir: None,
            files: vec![file],
            env: EnvSource::None,
        })
        .unwrap_or_else(|e| panic!("{knob}: {e}"));
        set += 1;
    }
    assert!(set >= 30, "only {set} knobs set");
}

#[test]
fn examples_load_and_say_what_they_promise() {
    let openctem = load(&["openctem.toml"]);
    assert_eq!(openctem.pusher.name.as_deref(), Some("http"));
    assert!(openctem.pusher.settings.contains_key("base_url"));
    assert_eq!(openctem.checker.name.as_deref(), Some("http"));
    assert_eq!(openctem.store.backend, StoreBackend::Sqlite);

    let demo = load(&["demo.toml"]);
    assert_eq!(demo.pusher.name.as_deref(), Some("chaos"));

    let production = load(&["production.toml"]);
    assert!(production.admin.token_file.is_some());
    assert!(!production.admin.listen.ip().is_loopback());
    // No secret in the example itself: tokens come from files.
    let redacted = production.redacted();
    assert_eq!(redacted, production);
}
