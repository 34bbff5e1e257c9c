//! Layering and attribution, on the library's own config types.

use std::path::PathBuf;
use std::time::Duration;

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
    s.worker_config().validate().unwrap();
    s.store_options().validate().unwrap();
}

/// The sections are the library types: what a file sets is what the
/// worker and the store get, with nothing copied by hand in between.
#[test]
fn sections_reach_the_library_types() {
    let s = load_str(
        "[worker]\npoll_interval = \"250ms\"\nunauthorized_probe_interval = \"2s\"\nlease = \"2m\"\n\
         [circuit]\ncooldown = \"1s\"\nmax_cooldown = \"20s\"\n\
         [backoff]\nbase = \"3s\"\n\
         [store]\nmax_items = 7\ndead_letter_ttl = \"3d\"\n",
        &[],
    )
    .unwrap();
    let w = s.worker_config();
    assert_eq!(w.poll_interval, Duration::from_millis(250));
    assert_eq!(w.unauthorized_probe_interval, Duration::from_secs(2));
    assert_eq!(w.circuit.cooldown, Duration::from_secs(1));
    assert_eq!(w.circuit.max_cooldown, Duration::from_secs(20));
    assert_eq!(w.backoff.base, Duration::from_secs(3));
    w.validate().unwrap();
    let o = s.store_options();
    assert_eq!(o.max_items, 7);
    assert_eq!(o.dead_letter_ttl, Some(Duration::from_secs(3 * 86_400)));
    assert_eq!(o.default_lease, Duration::from_secs(120));
    assert_eq!(o.default_max_attempts, s.worker.max_attempts);
    // A cool-down above the cap is the library's to handle, and it does.
    let s = load_str("[circuit]\ncooldown = \"10m\"\n", &[]).unwrap();
    s.worker_config().validate().unwrap();
}

/// What `config check` accepts, `RetryWorker::new` accepts: both call
/// the worker's one `validate()`, which refuses a lease equal to the
/// push timeout.
#[test]
fn lease_rule_is_the_workers() {
    let e = load_str("[worker]\nlease = \"30s\"\npush_timeout = \"30s\"\n", &[]).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("`worker.lease`"), "{msg}");
    assert!(msg.contains("layer.toml"), "{msg}");
    assert!(msg.contains("push_timeout"), "{msg}");
    load_str("[worker]\nlease = \"31s\"\npush_timeout = \"30s\"\n", &[]).unwrap();
}

#[test]
fn validate_errors_name_the_layer_that_set_the_key() {
    let e = load_str(
        "[worker]\nbatch_size = 5\n",
        &[("RETRYQ__WORKER__BATCH_SIZE", "0")],
    )
    .unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("`worker.batch_size`"), "{msg}");
    assert!(
        msg.contains("environment variable RETRYQ__WORKER__BATCH_SIZE"),
        "{msg}"
    );
    // A store option the worker section sets is blamed on the worker key.
    let e = load_str("[store]\nmax_items = 0\n", &[]).unwrap_err();
    assert!(e.to_string().contains("`store.max_items`"), "{e}");
    let e = load_str("[circuit]\ncooldown = \"0s\"\n", &[]).unwrap_err();
    assert!(e.to_string().contains("`circuit.cooldown`"), "{e}");
    assert!(e.to_string().contains("layer.toml"), "{e}");
}

#[test]
fn unknown_key_names_key_and_layer() {
    let e = load_str("[worker]\nmax_atempts = 3\n", &[]).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("`worker.max_atempts`"), "{msg}");
    assert!(msg.contains("layer.toml"), "{msg}");
    assert!(msg.contains("`worker.max_attempts`"), "{msg}");
    // The worker's backoff lives in [backoff], not inside [worker].
    let e = load_str("[worker.backoff]\nbase = \"1s\"\n", &[]).unwrap_err();
    assert!(e.to_string().contains("worker.backoff"), "{e}");
    // The store's own options sit in [store] beside backend and path.
    let e = load_str("[store]\nmax_itemz = 3\n", &[]).unwrap_err();
    assert!(e.to_string().contains("store.max_itemz"), "{e}");
    // Fields the library keeps out of files stay out.
    let e = load_str("[store]\ninstance_id = \"x\"\n", &[]).unwrap_err();
    assert!(e.to_string().contains("store.instance_id"), "{e}");
}

#[test]
fn env_wins_and_is_typed() {
    let s = load_str(
        "[worker]\nmax_attempts = 4\ninterval = \"1m\"\n",
        &[
            ("RETRYQ__WORKER__MAX_ATTEMPTS", "3"),
            ("RETRYQ__STORE__DEDUPE", "no"),
            ("RETRYQ__LOG__LEVEL", "off"),
            ("RETRYQ__STORE__MAX_ITEMS", "12"),
            ("RETRYQ__BACKOFF__JITTER", "0.5"),
            ("RETRYQ__ADMIN__TOKEN_ENV", "123"),
            ("RETRYQ__PLUGINS__SEARCH_PATH", "/a,/b"),
            ("RETRYQ__PUSHER__SETTINGS__BASE_URL", "http://x"),
            ("RETRYQ__PUSHER__SETTINGS__PORT", "8080"),
        ],
    )
    .unwrap();
    assert_eq!(s.worker.max_attempts, 3);
    assert_eq!(s.worker.interval, Duration::from_secs(60));
    assert!(!s.store.options.dedupe);
    // A word that reads as a boolean stays text where the key takes text.
    assert_eq!(s.log.level, "off");
    assert_eq!(s.store.options.max_items, 12);
    assert_eq!(s.worker.backoff.jitter, 0.5);
    assert_eq!(s.admin.token_env, "123");
    assert_eq!(
        s.plugins.search_path,
        vec![PathBuf::from("/a"), PathBuf::from("/b")]
    );
    assert_eq!(s.pusher.settings["base_url"], "http://x");
    // A plugin's settings reach it as written.
    assert_eq!(s.pusher.settings["port"], "8080");
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
        msg.contains("`backoff.max`") && msg.contains("layer.toml"),
        "{msg}"
    );
    let e = load_str("[pusher]\nname = \"http\"\npath = \"/x.so\"\n", &[]).unwrap_err();
    assert!(e.to_string().contains("`pusher.path`"), "{e}");
    let e = load_str("[checker]\nsha256 = \"00\"\n", &[]).unwrap_err();
    assert!(e.to_string().contains("`checker.sha256`"), "{e}");
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
        ("[worker]\nbatch_size = \"ten\"\n", "`worker.batch_size`"),
        ("[worker]\nbatch_size = 0\n", "`worker.batch_size`"),
        ("[worker]\ninterval = 300\n", "`worker.interval`"),
        ("[store]\nbackend = \"mysql\"\n", "`store.backend`"),
        ("[store]\nmax_bytes = -1\n", "`store.max_bytes`"),
        ("[backoff]\njitter = 2.0\n", "`backoff.jitter`"),
        ("[admin]\nlisten = \"localhost\"\n", "`admin.listen`"),
        ("[log]\nlevel = \"=[\"\n", "`log.level`"),
        ("store = 3\n", "`store`"),
        ("[bogus]\nx = 1\n", "`bogus`"),
    ] {
        let e = load_str(toml, &[]).unwrap_err();
        assert!(e.to_string().contains(key), "{toml}: {e}");
        assert!(e.to_string().contains("layer.toml"), "{toml}: {e}");
    }
}

/// `config show` prints what a file would say: the same sections, and it
/// loads back to the same settings.
#[test]
fn shown_settings_load_back() {
    let s = load_str(
        "[store]\nmax_items = 9\n[backoff]\nbase = \"7s\"\n[circuit]\nthreshold = 2\n",
        &[],
    )
    .unwrap();
    let text = toml::to_string(&s).unwrap();
    assert!(
        text.contains("[backoff]") && text.contains("[circuit]"),
        "{text}"
    );
    assert!(
        !text.contains("clock") && !text.contains("instance_id"),
        "{text}"
    );
    assert_eq!(load_str(&text, &[]).unwrap(), s);
}

/// `[admin]` is the admin API's `AdminConfig`: its knobs load, and its
/// `validate()` names the file's key.
#[test]
fn admin_section_is_the_apis_config() {
    let s = load_str(
        "[admin]\nmax_body = 2048\nworkers = 3\nshutdown_timeout = \"4s\"\nmetrics_require_token = false\n",
        &[],
    )
    .unwrap();
    assert_eq!(s.admin.body_limit, 2048);
    assert_eq!(s.admin.workers, 3);
    assert_eq!(s.admin.shutdown_timeout, Duration::from_secs(4));
    assert!(!s.admin.metrics_require_token);
    let e = load_str("[admin]\nmax_body = 0\n", &[]).unwrap_err();
    assert!(e.to_string().contains("`admin.max_body`"), "{e}");
    let e = load_str("[admin]\ntls_key = \"/k.pem\"\n", &[]).unwrap_err();
    assert!(e.to_string().contains("`admin.tls_key`"), "{e}");
    assert!(e.to_string().contains("tls_cert is not set"), "{e}");
    // The token is read at start, never from a config file.
    let e = load_str("[admin]\ntoken = \"x\"\n", &[]).unwrap_err();
    assert!(e.to_string().contains("unknown key `admin.token`"), "{e}");
}

/// The stores check their options with the same `validate()` that
/// `config check` runs: what one refuses, the other refuses by name.
#[test]
fn stores_refuse_what_config_check_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let options = StoreOptions {
        max_items: 0,
        ..StoreOptions::default()
    };
    for backend in [StoreBackend::Sqlite, StoreBackend::Files] {
        let store = StoreSettings {
            backend,
            path: Some(dir.path().join(backend.as_str())),
            ..StoreSettings::default()
        };
        match open_store(&store, options.clone()) {
            Err(QueueError::InvalidOptions(e)) => assert_eq!(e.field, "max_items"),
            Err(other) => panic!("{backend:?}: {other}"),
            Ok(_) => panic!("{backend:?} opened with max_items = 0"),
        }
    }
}
