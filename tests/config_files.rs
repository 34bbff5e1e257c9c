//! The shipped configuration files: `config/default.toml` is exactly the
//! built-in defaults and documents every key; the examples load.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use retryq::config::{EnvSource, LoadOptions, Settings, StoreBackend, SCHEMA};

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

/// Keys written in default.toml, commented out or not, with their section.
fn documented_keys(text: &str) -> BTreeSet<String> {
    let mut section = String::new();
    let mut keys = BTreeSet::new();
    for line in text.lines() {
        let line = line.trim();
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
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
    let missing: Vec<&str> = SCHEMA
        .iter()
        .map(|s| s.key)
        .filter(|k| !documented.contains(*k))
        .collect();
    assert!(
        missing.is_empty(),
        "default.toml does not document {missing:?}"
    );
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
