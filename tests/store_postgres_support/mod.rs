//! What the PostgreSQL store tests share: where the test server is
//! (`RETRYQ_TEST_PG_URL`, `RETRYQ_TEST_PG_PASSWORD_FILE`, as exported by
//! `scripts/pg-test-server`), a schema of its own per test, and the rule
//! for a missing server: skip with the reason printed, or fail under
//! `RETRYQ_REQUIRE_SERVICES=1`.
//!
//! Include it with `#[path = "store_postgres_support/mod.rs"] mod pg;`.

#![allow(dead_code)] // each test binary uses its own part of it

use std::path::{Path, PathBuf};

use retryq::item::sha256_hex;
use retryq::store::{PostgresOptions, PostgresRetryQueue, RetryQueue, StoreOptions};
use retryq::QueueResult;

/// The variable holding the test server's url (no password in it).
pub const URL_VAR: &str = "RETRYQ_TEST_PG_URL";
/// The variable naming the file that holds the role's password.
pub const PASSWORD_FILE_VAR: &str = "RETRYQ_TEST_PG_PASSWORD_FILE";

/// The server's url and password file, when the environment names them.
pub fn server() -> Result<(String, PathBuf), String> {
    let url = std::env::var(URL_VAR).map_err(|_| format!("{URL_VAR} is not set"))?;
    let file =
        std::env::var(PASSWORD_FILE_VAR).map_err(|_| format!("{PASSWORD_FILE_VAR} is not set"))?;
    Ok((url, PathBuf::from(file)))
}

/// True when a server is configured; otherwise prints why `test` skips,
/// or panics under `RETRYQ_REQUIRE_SERVICES=1`.
pub fn available(test: &str) -> bool {
    match server() {
        Ok(_) => true,
        Err(reason) => {
            if std::env::var("RETRYQ_REQUIRE_SERVICES").as_deref() == Ok("1") {
                panic!("RETRYQ_REQUIRE_SERVICES=1 but {test} has no PostgreSQL server: {reason}");
            }
            eprintln!(
                "skipping {test}: {reason} (start one with `eval \"$(scripts/pg-test-server start)\"`)"
            );
            false
        }
    }
}

/// A schema name of its own for a test's folder: the same folder (a
/// reopen) finds the same schema, parallel tests never share one.
pub fn schema_for(dir: &Path) -> String {
    format!(
        "t_{}",
        &sha256_hex(dir.as_os_str().as_encoded_bytes())[..24]
    )
}

/// Options for `schema` on the test server.
pub fn options(schema: &str) -> PostgresOptions {
    let (url, password_file) = server().unwrap_or_else(|reason| panic!("{reason}"));
    PostgresOptions {
        url,
        password_file: Some(password_file),
        schema: schema.to_owned(),
        pool_size: 4,
        ..PostgresOptions::default()
    }
}

/// Opens the store of the schema belonging to `dir`.
pub fn open_in(dir: &Path, options: StoreOptions) -> QueueResult<PostgresRetryQueue> {
    PostgresRetryQueue::open(&self::options(&schema_for(dir)), options)
}

/// [`open_in`], boxed, for the suites that take any backend.
pub fn open_boxed(dir: &Path, options: StoreOptions) -> QueueResult<Box<dyn RetryQueue>> {
    Ok(Box::new(open_in(dir, options)?))
}

/// A plain client on the test server, for tests that look under the store.
pub fn client() -> postgres::Client {
    let (url, password_file) = server().unwrap_or_else(|reason| panic!("{reason}"));
    let password = std::fs::read_to_string(password_file).unwrap();
    let mut config: postgres::Config = url.parse().unwrap();
    config.password(password.trim_end());
    config.connect(postgres::NoTls).unwrap()
}

/// Replaces the stored payload of `id` in `dir`'s schema without its
/// checksum, as a torn or tampered row would be.
pub fn corrupt(dir: &Path, id: &str) {
    let schema = schema_for(dir);
    let changed = client()
        .execute(
            &format!("UPDATE \"{schema}\".items SET report = '{{\"tampered\":1}}' WHERE id = $1"),
            &[&id],
        )
        .unwrap();
    assert_eq!(changed, 1, "no row for {id}");
}
