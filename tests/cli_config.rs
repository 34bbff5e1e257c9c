//! The real `retryq` binary: configuration layering, errors naming key,
//! value and layer, exit codes, `config check|show` and `schedule`.

use std::path::Path;
use std::process::{Command, Output};

fn retryq(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_retryq"));
    cmd.current_dir(dir).args(args);
    // Only the variables a test sets: nothing from the developer's shell.
    for (k, _) in std::env::vars() {
        if k.starts_with("RETRYQ") || k == "RUST_LOG" {
            cmd.env_remove(k);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run retryq")
}

fn stdout_json(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "exit {:?}, stderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_owned()
}

#[test]
fn later_layers_win_files_in_order_then_environment() {
    let dir = tempfile::tempdir().unwrap();
    let a = write(
        dir.path(),
        "a.toml",
        "[worker]\nmax_attempts = 4\nbatch_size = 7\n[backoff]\nbase = \"1m\"\n",
    );
    let b = write(dir.path(), "b.toml", "[worker]\nmax_attempts = 5\n");
    let out = retryq(
        dir.path(),
        &["--json", "--config", &a, "--config", &b, "config", "show"],
        &[],
    );
    let v = stdout_json(&out);
    assert_eq!(v["worker"]["max_attempts"], 5);
    assert_eq!(v["worker"]["batch_size"], 7);
    assert_eq!(v["backoff"]["base"], "1m");
    assert_eq!(
        v["worker"]["interval"], "5m",
        "untouched keys keep the defaults"
    );

    let out = retryq(
        dir.path(),
        &["--json", "-c", &a, "-c", &b, "config", "show"],
        &[
            ("RETRYQ__WORKER__MAX_ATTEMPTS", "3"),
            ("RETRYQ__BACKOFF__JITTER", "0.5"),
            ("RETRYQ__STORE__BACKEND", "files"),
        ],
    );
    let v = stdout_json(&out);
    assert_eq!(v["worker"]["max_attempts"], 3);
    assert_eq!(v["backoff"]["jitter"], 0.5);
    assert_eq!(v["store"]["backend"], "files");
}

#[test]
fn config_dir_default_toml_is_a_layer_below_config_files() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("config")).unwrap();
    write(
        &dir.path().join("config"),
        "default.toml",
        "[worker]\nbatch_size = 11\nmax_attempts = 6\n",
    );
    let over = write(dir.path(), "over.toml", "[worker]\nmax_attempts = 2\n");
    let v = stdout_json(&retryq(
        dir.path(),
        &["--json", "--config", &over, "config", "show"],
        &[],
    ));
    assert_eq!(v["worker"]["batch_size"], 11);
    assert_eq!(v["worker"]["max_attempts"], 2);

    // An explicit --config-dir must hold default.toml.
    let out = retryq(
        dir.path(),
        &["--config-dir", "nowhere", "config", "check"],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("nowhere/default.toml"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn unknown_key_is_a_config_error_naming_key_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(dir.path(), "bad.toml", "[worker]\nmax_atempts = 3\n");
    let out = retryq(dir.path(), &["--config", &f, "config", "check"], &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("worker.max_atempts"), "{err}");
    assert!(err.contains("bad.toml"), "{err}");
    assert!(err.contains("did you mean `worker.max_attempts`"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");

    let out = retryq(
        dir.path(),
        &["config", "check"],
        &[("RETRYQ__WORKER__NOPE", "1")],
    );
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("worker.nope") && err.contains("environment variable RETRYQ__WORKER__NOPE"),
        "{err}"
    );
}

#[test]
fn bad_duration_names_key_value_and_layer() {
    let dir = tempfile::tempdir().unwrap();
    let out = retryq(
        dir.path(),
        &["config", "check"],
        &[("RETRYQ__WORKER__TTL", "seven days-ish")],
    );
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("worker.ttl"), "{err}");
    assert!(err.contains("seven days-ish"), "{err}");
    assert!(
        err.contains("environment variable RETRYQ__WORKER__TTL"),
        "{err}"
    );

    let f = write(dir.path(), "d.toml", "[circuit]\ncooldown = \"soon\"\n");
    let out = retryq(dir.path(), &["-c", &f, "schedule"], &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("circuit.cooldown") && err.contains("\"soon\"") && err.contains("d.toml"),
        "{err}"
    );

    // A wrong type in a file.
    let f = write(dir.path(), "t.toml", "[store]\nmax_items = \"many\"\n");
    let out = retryq(dir.path(), &["-c", &f, "config", "check"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("store.max_items"), "{}", stderr(&out));

    // A file that is not TOML at all.
    let f = write(dir.path(), "broken.toml", "[worker\n");
    let out = retryq(dir.path(), &["-c", &f, "config", "check"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("broken.toml"), "{}", stderr(&out));
}

#[test]
fn missing_config_file_and_usage_errors_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let out = retryq(
        dir.path(),
        &["--config", "absent.toml", "config", "check"],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("absent.toml"), "{}", stderr(&out));

    for args in [
        &["list", "--order-by", "size"][..],
        &["frobnicate"],
        &["retry"],
        &["retry", "x", "--failed"],
        &["cleanup", "--ttl", "forever"],
        &["enqueue", "--attr", "novalue"],
    ] {
        let out = retryq(dir.path(), args, &[]);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        let err = stderr(&out);
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "{args:?}: one line: {err}"
        );
        assert!(err.starts_with("retryq: error: "), "{args:?}: {err}");
    }
}

#[test]
fn config_check_json_and_show_redacts_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        dir.path(),
        "p.toml",
        "[pusher]\nname = \"http\"\n[pusher.settings]\nbase_url = \"https://up\"\napi_token = \"hunter2\"\ntoken_env = \"UP_TOKEN\"\n[pusher.settings.headers]\nAuthorization = \"Bearer hunter3\"\n",
    );
    let v = stdout_json(&retryq(
        dir.path(),
        &["--json", "-c", &f, "config", "check"],
        &[],
    ));
    assert_eq!(v["ok"], true);
    assert_eq!(v["pusher"], "http");
    assert_eq!(v["store"]["backend"], "sqlite");
    let layers = v["layers"].as_array().unwrap();
    assert_eq!(layers[0], "built-in defaults");
    assert!(layers[1].as_str().unwrap().ends_with("p.toml"));

    let out = retryq(dir.path(), &["-c", &f, "config", "show"], &[]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("hunter"), "{text}");
    assert!(
        text.contains("https://up") && text.contains("UP_TOKEN"),
        "{text}"
    );
    let v = stdout_json(&retryq(
        dir.path(),
        &["--json", "-c", &f, "config", "show"],
        &[],
    ));
    assert_eq!(v["pusher"]["settings"]["api_token"], "<redacted>");
    assert_eq!(
        v["pusher"]["settings"]["headers"]["Authorization"],
        "<redacted>"
    );
    // What `config show` prints is itself a valid configuration layer.
    let shown = write(dir.path(), "shown.toml", &text);
    let out = retryq(dir.path(), &["-c", &shown, "config", "check"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn schedule_follows_the_configured_backoff() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        dir.path(),
        "b.toml",
        "[worker]\nmax_attempts = 4\n[backoff]\nstrategy = \"exponential\"\nbase = \"10s\"\nmax = \"25s\"\n",
    );
    let v = stdout_json(&retryq(dir.path(), &["--json", "-c", &f, "schedule"], &[]));
    assert_eq!(v["max_attempts"], 4);
    let delays: Vec<f64> = v["retry_schedule"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["delay_secs"].as_f64().unwrap())
        .collect();
    assert_eq!(delays, vec![10.0, 20.0, 25.0]);
    assert_eq!(v["total_backoff_secs"], 55.0);
    assert_eq!(v["total_backoff_time"], "55s");

    let v = stdout_json(&retryq(
        dir.path(),
        &["--json", "-c", &f, "schedule", "--max-attempts", "2"],
        &[("RETRYQ__BACKOFF__STRATEGY", "linear")],
    ));
    assert_eq!(v["strategy"], "linear");
    assert_eq!(v["retry_schedule"].as_array().unwrap().len(), 1);

    let out = retryq(dir.path(), &["-c", &f, "schedule"], &[]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("55s"));
}

/// `config check` runs the library types' own `validate()`: a lease the
/// worker would refuse (equal to the push timeout) is refused here, naming
/// the key and the file, and the boundary the worker accepts passes.
#[test]
fn config_check_refuses_what_the_worker_would() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        dir.path(),
        "lease.toml",
        "[worker]\nlease = \"30s\"\npush_timeout = \"30s\"\n",
    );
    let out = retryq(dir.path(), &["-c", &f, "config", "check"], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("worker.lease") && err.contains("lease.toml"),
        "{err}"
    );

    let f = write(
        dir.path(),
        "ok.toml",
        "[worker]\nlease = \"31s\"\npush_timeout = \"30s\"\n",
    );
    let out = retryq(dir.path(), &["-c", &f, "config", "check"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));

    // The store's and the admin API's own rules, likewise.
    let f = write(dir.path(), "store.toml", "[store]\nmax_items = 0\n");
    let out = retryq(dir.path(), &["-c", &f, "config", "check"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("store.max_items"), "{}", stderr(&out));
    let out = retryq(
        dir.path(),
        &["config", "check"],
        &[("RETRYQ__ADMIN__TLS_CERT", "/etc/cert.pem")],
    );
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("admin.tls_cert") && err.contains("RETRYQ__ADMIN__TLS_CERT"),
        "{err}"
    );
}
