//! What the PostgreSQL tests share: a fresh schema on the test server
//! (`scripts/pg-test-server`, which `.ci/run` starts), and a dedicated
//! server of their own for a test that restarts it.
//!
//! Without `RETRYQ_TEST_PG_URL` and `RETRYQ_TEST_PG_PASSWORD_FILE` a test
//! skips, printing why and how to get a server; with
//! `RETRYQ_REQUIRE_SERVICES=1` (CI) it fails instead.
//!
//! Include it with `#[path = "pg_support/mod.rs"] mod pg_support;`.

#![allow(dead_code)] // each test binary uses its own part of it

use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;

/// The variable holding the test server's url (no password in it).
pub const URL_VAR: &str = "RETRYQ_TEST_PG_URL";
/// The variable naming the file that holds the role's password.
pub const PASSWORD_FILE_VAR: &str = "RETRYQ_TEST_PG_PASSWORD_FILE";

/// Where the tests find a server, or why they cannot.
fn server_from_env() -> Result<(String, PathBuf), String> {
    let url = std::env::var(URL_VAR).map_err(|_| format!("{URL_VAR} is not set"))?;
    let file =
        std::env::var(PASSWORD_FILE_VAR).map_err(|_| format!("{PASSWORD_FILE_VAR} is not set"))?;
    Ok((url, PathBuf::from(file)))
}

/// Skips (None, with the reason printed) or, under
/// `RETRYQ_REQUIRE_SERVICES=1`, fails.
fn skip<T>(test: &str, reason: &str) -> Option<T> {
    if std::env::var("RETRYQ_REQUIRE_SERVICES").as_deref() == Ok("1") {
        panic!("RETRYQ_REQUIRE_SERVICES=1 but {test} has no PostgreSQL server: {reason}");
    }
    eprintln!(
        "skipping {test}: {reason} (start a server with `eval \"$(scripts/pg-test-server start)\"`)"
    );
    None
}

/// A schema of its own on a server, dropped (with everything in it) when
/// this is dropped. The store creates it on first open.
pub struct PgSchema {
    /// The server's url, without a password.
    pub url: String,
    /// The file holding the password.
    pub password_file: PathBuf,
    /// The schema's name: unique to this test run.
    pub schema: String,
}

impl PgSchema {
    /// A fresh schema on the shared test server, or None (skipped).
    pub fn fresh(test: &str) -> Option<PgSchema> {
        match server_from_env() {
            Ok((url, password_file)) => Some(PgSchema::on(url, password_file, test)),
            Err(reason) => skip(test, &reason),
        }
    }

    /// A fresh schema on the server at `url`.
    pub fn on(url: String, password_file: PathBuf, test: &str) -> PgSchema {
        PgSchema {
            url,
            password_file,
            schema: schema_name(test),
        }
    }

    /// The `[store]` table of a config file using this schema. `path` is
    /// the daemon's own local folder (owner lock, poison marker); `extra`
    /// holds more `[store]` lines (limits). A call waits at most a second
    /// for a connection, so an outage is answered quickly.
    pub fn store_toml(&self, path: &Path, extra: &str) -> String {
        format!(
            "[store]\nbackend = \"postgres\"\npath = \"{}\"\n{extra}\n[store.postgres]\nurl = \"{}\"\npassword_file = \"{}\"\nschema = \"{}\"\nconnect_timeout = \"1s\"\n",
            path.display(),
            self.url,
            self.password_file.display(),
            self.schema
        )
    }

    /// A client on the server as the test role (outside the schema).
    pub fn client(&self) -> postgres::Client {
        connect(&self.url, &self.password_file)
    }

    /// Runs `sql` in this schema and returns the first column of each row as
    /// an i64 (a count, usually).
    pub fn query_i64(&self, sql: &str) -> Vec<i64> {
        let mut client = self.client();
        client
            .batch_execute(&format!("SET search_path TO \"{}\"", self.schema))
            .unwrap();
        client
            .query(sql, &[])
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .iter()
            .map(|row| row.get::<_, i64>(0))
            .collect()
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        // Best effort: the server may be down (a restart test) or gone.
        let config = match postgres_config(&self.url, &self.password_file) {
            Some(config) => config,
            None => return,
        };
        if let Ok(mut client) = config.connect(postgres::NoTls) {
            let _ = client.batch_execute(&format!(
                "DROP SCHEMA IF EXISTS \"{}\" CASCADE",
                self.schema
            ));
        }
    }
}

/// A schema name unique to this run: the test's name (as an identifier)
/// and a random suffix, within PostgreSQL's 63 bytes.
pub fn schema_name(test: &str) -> String {
    let mut name: String = test
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .take(40)
        .collect();
    name.insert_str(0, "t_");
    name.push('_');
    name.push_str(&format!("{:016x}", fastrand::u64(..)));
    name
}

fn postgres_config(url: &str, password_file: &Path) -> Option<postgres::Config> {
    let password = std::fs::read_to_string(password_file).ok()?;
    let mut config = postgres::Config::from_str(url).ok()?;
    config.password(password.trim_end());
    config.connect_timeout(std::time::Duration::from_secs(5));
    Some(config)
}

/// A client on the server at `url`, the password read from `password_file`.
pub fn connect(url: &str, password_file: &Path) -> postgres::Client {
    postgres_config(url, password_file)
        .unwrap_or_else(|| panic!("cannot read {} or parse {url}", password_file.display()))
        .connect(postgres::NoTls)
        .unwrap_or_else(|e| panic!("cannot connect to {url}: {e}"))
}

/// A PostgreSQL server of the test's own (`scripts/pg-test-server start`),
/// for a test that restarts or stops it; stopped and deleted on drop.
pub struct PgServer {
    /// The server's folder (`RETRYQ_TEST_PG_DIR`).
    pub dir: PathBuf,
    /// Its url, without a password.
    pub url: String,
    /// The file holding the password.
    pub password_file: PathBuf,
}

impl PgServer {
    /// Starts one, or None (skipped) when no test server is configured:
    /// the same condition as [`PgSchema::fresh`], so a machine that runs
    /// one runs both.
    pub fn dedicated(test: &str) -> Option<PgServer> {
        if let Err(reason) = server_from_env() {
            return skip(test, &reason);
        }
        let out = script().arg("start").output().unwrap();
        assert!(
            out.status.success(),
            "scripts/pg-test-server start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let var = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("export {name}=")))
                .unwrap_or_else(|| panic!("no {name} in: {text}"))
                .to_owned()
        };
        Some(PgServer {
            dir: PathBuf::from(var("RETRYQ_TEST_PG_DIR")),
            url: var(URL_VAR),
            password_file: PathBuf::from(var(PASSWORD_FILE_VAR)),
        })
    }

    /// A fresh schema on this server.
    pub fn schema(&self, test: &str) -> PgSchema {
        PgSchema::on(self.url.clone(), self.password_file.clone(), test)
    }

    /// `scripts/pg-test-server restart|down|up`.
    pub fn ctl(&self, what: &str) {
        let out = script().arg(what).arg(&self.dir).output().unwrap();
        assert!(
            out.status.success(),
            "scripts/pg-test-server {what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let _ = script().arg("stop").arg(&self.dir).output();
    }
}

fn script() -> Command {
    Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/pg-test-server"))
}
