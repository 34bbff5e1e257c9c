//! Schema and migrations: the tables in the configured schema, their
//! versions in `schema_version`, and the advisory-lock keys derived from
//! the schema name.
//!
//! Migrations run in one transaction holding a transaction-level advisory
//! lock keyed by the schema: when ten daemons start at once, one migrates
//! and the others wait, then find the version current and do nothing. A
//! database whose version is newer than this binary knows is refused,
//! naming both versions, before anything is written.
//!
//! Version 1 made the tables; version 2 added `totals`, which triggers on
//! `items` keep, counted from the rows already there when it runs.

use postgres::Client;
use sha2::{Digest, Sha256};

use super::options::quote_ident;

/// The schema version this binary writes and reads.
pub const SCHEMA_VERSION: i32 = 2;

/// Why the schema could not be brought to [`SCHEMA_VERSION`].
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// The database was migrated by a newer retryq.
    #[error(
        "schema {schema:?} is at version {found}, newer than this retryq supports ({supported}); \
         upgrade retryq or use another schema"
    )]
    Newer {
        /// The schema name.
        schema: String,
        /// The version recorded in the database.
        found: i32,
        /// The newest version this binary knows.
        supported: i32,
    },
    /// The server refused a statement.
    #[error("migrating schema {schema:?}: {source}")]
    Sql {
        /// The schema name.
        schema: String,
        /// The server's error.
        #[source]
        source: postgres::Error,
    },
}

/// One migration: the version it brings the schema to and its DDL, with
/// `{s}` standing for the quoted schema name.
const MIGRATIONS: &[(i32, &str)] = &[
    (
        1,
        r#"
CREATE TABLE {s}.items (
    id           text COLLATE "C" PRIMARY KEY,
    item_type    text NOT NULL,
    fingerprint  text NOT NULL,
    status       text NOT NULL CHECK (status IN ('pending', 'processing', 'failed')),
    report       text NOT NULL,
    checksum     bigint NOT NULL,
    attempts     bigint NOT NULL,
    max_attempts bigint NOT NULL,
    last_error   text NOT NULL,
    last_attempt timestamptz,
    next_retry   timestamptz NOT NULL,
    created_at   timestamptz NOT NULL,
    updated_at   timestamptz NOT NULL,
    agent_id     text NOT NULL,
    scanner_name text NOT NULL,
    target_path  text NOT NULL,
    lease_until  timestamptz,
    lease_owner  text,
    attributes   text NOT NULL,
    size_bytes   bigint NOT NULL
);
CREATE INDEX items_ready ON {s}.items (next_retry, created_at, id) WHERE status = 'pending';
CREATE INDEX items_live_fingerprint ON {s}.items (fingerprint, id) WHERE status <> 'failed';
CREATE INDEX items_eviction ON {s}.items ((status <> 'failed'), created_at, id);
CREATE INDEX items_leases ON {s}.items (lease_until) WHERE status = 'processing';
CREATE TABLE {s}.quarantine (
    seq            bigserial PRIMARY KEY,
    item_id        text NOT NULL,
    reason         text NOT NULL,
    quarantined_at timestamptz NOT NULL,
    record         text NOT NULL
);
CREATE TABLE {s}.fleet_settings (
    key        text PRIMARY KEY,
    value      text NOT NULL,
    updated_at timestamptz NOT NULL
);
"#,
    ),
    (
        // Version 2: `totals`, what admission caps, kept by triggers so a
        // cap costs a sum over a few rows instead of a count of the table.
        // Every statement that adds or removes rows appends one row of
        // differences (a resize appends its own), so transactions never
        // wait on one another for it; admission folds the rows back into
        // one under its lock (`admit.rs`). Triggers rather than the
        // store's code, so that every writer keeps it: an older retryq of
        // the fleet still running during an upgrade, an operator's psql,
        // the quarantine's `DELETE`.
        //
        // On a table that already holds rows, the `LOCK` keeps out every
        // writer from before the triggers exist until this commits, so the
        // count taken here plus what the triggers record after it is exact.
        2,
        r#"
LOCK TABLE {s}.items IN SHARE ROW EXCLUSIVE MODE;
CREATE TABLE {s}.totals (
    items bigint NOT NULL,
    bytes bigint NOT NULL
);
CREATE FUNCTION {s}.retryq_items_added() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO {s}.totals (items, bytes)
        SELECT count(*), coalesce(sum(size_bytes), 0) FROM added HAVING count(*) > 0;
    RETURN NULL;
END $$;
CREATE FUNCTION {s}.retryq_items_removed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO {s}.totals (items, bytes)
        SELECT -count(*), -coalesce(sum(size_bytes), 0) FROM removed HAVING count(*) > 0;
    RETURN NULL;
END $$;
CREATE FUNCTION {s}.retryq_items_resized() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO {s}.totals (items, bytes) VALUES (0, NEW.size_bytes - OLD.size_bytes);
    RETURN NULL;
END $$;
CREATE FUNCTION {s}.retryq_items_truncated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM {s}.totals;
    RETURN NULL;
END $$;
CREATE TRIGGER totals_added AFTER INSERT ON {s}.items
    REFERENCING NEW TABLE AS added
    FOR EACH STATEMENT EXECUTE FUNCTION {s}.retryq_items_added();
CREATE TRIGGER totals_removed AFTER DELETE ON {s}.items
    REFERENCING OLD TABLE AS removed
    FOR EACH STATEMENT EXECUTE FUNCTION {s}.retryq_items_removed();
CREATE TRIGGER totals_resized AFTER UPDATE OF size_bytes ON {s}.items
    FOR EACH ROW WHEN (OLD.size_bytes IS DISTINCT FROM NEW.size_bytes)
    EXECUTE FUNCTION {s}.retryq_items_resized();
CREATE TRIGGER totals_truncated AFTER TRUNCATE ON {s}.items
    FOR EACH STATEMENT EXECUTE FUNCTION {s}.retryq_items_truncated();
INSERT INTO {s}.totals (items, bytes)
    SELECT count(*), coalesce(sum(size_bytes), 0) FROM {s}.items;
"#,
    ),
];

/// A 64-bit advisory-lock key for `purpose` in `schema`.
pub(super) fn lock_key(purpose: &str, schema: &str) -> i64 {
    let digest = Sha256::digest(format!("retryq:{purpose}:{schema}").as_bytes());
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(bytes)
}

/// The first key of the two-key advisory locks that mark live instances
/// of `schema` (the second is `hashtext(instance_id)`).
pub(super) fn instance_lock_class(schema: &str) -> i32 {
    let digest = Sha256::digest(format!("retryq:instances:{schema}").as_bytes());
    i32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]])
}

/// Brings `schema` to [`SCHEMA_VERSION`], creating it when missing;
/// returns the version found before.
pub(super) fn migrate(client: &mut Client, schema: &str) -> Result<i32, SchemaError> {
    let sql_err = |source| SchemaError::Sql {
        schema: schema.to_owned(),
        source,
    };
    let q = quote_ident(schema);
    let mut tx = client.transaction().map_err(sql_err)?;
    tx.execute(
        "SELECT pg_advisory_xact_lock($1)",
        &[&lock_key("migrate", schema)],
    )
    .map_err(sql_err)?;
    tx.batch_execute(&format!(
        "CREATE SCHEMA IF NOT EXISTS {q};
         CREATE TABLE IF NOT EXISTS {q}.schema_version (
             version    integer PRIMARY KEY,
             applied_at timestamptz NOT NULL DEFAULT now()
         );"
    ))
    .map_err(sql_err)?;
    let found: i32 = tx
        .query_one(
            &format!("SELECT coalesce(max(version), 0) FROM {q}.schema_version"),
            &[],
        )
        .map_err(sql_err)?
        .get(0);
    if found > SCHEMA_VERSION {
        return Err(SchemaError::Newer {
            schema: schema.to_owned(),
            found,
            supported: SCHEMA_VERSION,
        });
    }
    for (version, ddl) in MIGRATIONS.iter().filter(|(v, _)| *v > found) {
        tx.batch_execute(&ddl.replace("{s}", &q)).map_err(sql_err)?;
        tx.execute(
            &format!("INSERT INTO {q}.schema_version (version) VALUES ($1)"),
            &[version],
        )
        .map_err(sql_err)?;
    }
    tx.commit().map_err(sql_err)?;
    Ok(found)
}
