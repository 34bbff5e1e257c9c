//! Unit tests of the PostgreSQL backend's refusals: each bad input gets a
//! clear error naming what is wrong, and no secret in it. The ones that
//! need a server use the test server (`RETRYQ_TEST_PG_URL`,
//! `RETRYQ_TEST_PG_PASSWORD_FILE`) and skip without one, unless
//! `RETRYQ_REQUIRE_SERVICES=1`.

use std::path::PathBuf;
use std::time::Duration;

use super::options::{quote_ident, validate_schema_name};
use super::*;
use crate::store::{ListFilter, WriteOp};

fn opts(url: &str) -> PostgresOptions {
    PostgresOptions {
        url: url.to_owned(),
        ..PostgresOptions::default()
    }
}

fn test_server(test: &str) -> Option<(String, PathBuf)> {
    match (
        std::env::var("RETRYQ_TEST_PG_URL"),
        std::env::var("RETRYQ_TEST_PG_PASSWORD_FILE"),
    ) {
        (Ok(url), Ok(file)) => Some((url, PathBuf::from(file))),
        _ => {
            if std::env::var("RETRYQ_REQUIRE_SERVICES").as_deref() == Ok("1") {
                panic!("RETRYQ_REQUIRE_SERVICES=1 but {test} has no PostgreSQL test server");
            }
            eprintln!("skipping {test}: RETRYQ_TEST_PG_URL is not set (scripts/pg-test-server)");
            None
        }
    }
}

fn fresh_schema() -> String {
    format!("u_{}", uuid::Uuid::new_v4().simple())
}

#[test]
fn a_url_with_a_password_is_refused_without_quoting_it() {
    for url in [
        "postgres://retryq:hunter2-secret@db.example:5432/retryq",
        "host=db.example user=retryq password=hunter2-secret dbname=retryq",
    ] {
        let err = opts(url).validate().unwrap_err();
        assert_eq!(err.field, "url");
        let text = err.to_string();
        assert!(text.contains("password_file"), "{text}");
        assert!(!text.contains("hunter2"), "the secret leaked: {text}");
    }
    let fine = opts("postgres://retryq@db.example:5432/retryq");
    assert_eq!(fine.validate(), Ok(()));
    assert_eq!(fine.endpoint(), "db.example:5432");
}

#[test]
fn an_unparsable_url_is_refused_without_quoting_it() {
    let err = opts("postgres://retryq@db.example:notaport/x?password=hunter2")
        .validate()
        .unwrap_err();
    assert_eq!(err.field, "url");
    assert!(!err.to_string().contains("hunter2"), "{err}");
    assert_eq!(opts("").validate().unwrap_err().field, "url");
}

#[test]
fn a_schema_that_is_not_an_identifier_is_refused() {
    for bad in [
        "",
        "1abc",
        "a-b",
        "a\"; DROP TABLE x; --",
        "with space",
        "pg_catalog",
        "été",
        &"s".repeat(64),
    ] {
        let options = PostgresOptions {
            schema: bad.to_owned(),
            ..opts("postgres://u@h/db")
        };
        let err = options.validate().unwrap_err();
        assert_eq!(err.field, "schema", "{bad:?}: {err}");
        assert!(err.to_string().starts_with("postgres `schema`"), "{err}");
    }
    for good in ["retryq", "_q", "Fleet_2", &"s".repeat(63)] {
        assert_eq!(validate_schema_name(good), Ok(()), "{good:?}");
    }
    assert_eq!(quote_ident("Fleet_2"), "\"Fleet_2\"");
}

#[test]
fn other_fields_name_themselves() {
    let base = opts("postgres://u@h/db");
    let both = PostgresOptions {
        password_file: Some("/x".into()),
        password_env: Some("X".into()),
        ..base.clone()
    };
    assert_eq!(both.validate().unwrap_err().field, "password_env");
    let zero = PostgresOptions {
        pool_size: 0,
        ..base.clone()
    };
    assert_eq!(zero.validate().unwrap_err().field, "pool_size");
    let root_without_verify = PostgresOptions {
        sslrootcert: Some("/ca.pem".into()),
        sslmode: Some(SslMode::Require),
        ..base.clone()
    };
    assert_eq!(
        root_without_verify.validate().unwrap_err().field,
        "sslrootcert"
    );
    let no_user = opts("postgres://h/db");
    assert_eq!(no_user.validate().unwrap_err().field, "url");
}

#[test]
fn sslmode_comes_from_the_option_then_the_url() {
    let from_url = opts("postgres://u@h/db?sslmode=require");
    assert_eq!(from_url.effective_sslmode(), Ok(SslMode::Require));
    assert_eq!(
        opts("postgres://u@h/db").effective_sslmode(),
        Ok(SslMode::Prefer)
    );
    let option = PostgresOptions {
        sslmode: Some(SslMode::VerifyFull),
        ..from_url
    };
    assert_eq!(option.effective_sslmode(), Ok(SslMode::VerifyFull));
    let parsed: PostgresOptions =
        toml::from_str("url = \"postgres://u@h/db\"\nsslmode = \"verify-ca\"\n").unwrap();
    assert_eq!(parsed.sslmode, Some(SslMode::VerifyCa));
    // The config file cannot carry a password at all.
    assert!(toml::from_str::<PostgresOptions>("password = \"x\"\n").is_err());
}

#[test]
fn a_missing_password_source_is_named() {
    let options = PostgresOptions {
        password_env: Some("RETRYQ_TEST_SURELY_UNSET_VAR".into()),
        ..opts("postgres://u@127.0.0.1:1/db")
    };
    let err = PostgresRetryQueue::open(&options, StoreOptions::default()).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("password_env") && text.contains("RETRYQ_TEST_SURELY_UNSET_VAR"),
        "{text}"
    );
}

#[test]
fn an_unreachable_server_is_named_by_host_and_port() {
    // Port 1 on loopback: nothing listens, the connection is refused.
    let options = PostgresOptions {
        connect_timeout: Duration::from_secs(2),
        ..opts("postgres://retryq@127.0.0.1:1/retryq")
    };
    let err = PostgresRetryQueue::open(&options, StoreOptions::default()).unwrap_err();
    assert!(err.is_storage(), "{err:?}");
    let text = format!("{err}");
    assert!(text.contains("127.0.0.1:1"), "{text}");
    assert_ne!(err.kind(), "item_not_found");
}

#[test]
fn a_wrong_password_fails_without_the_secret_in_the_error() {
    let Some((url, _)) = test_server("a_wrong_password_fails_without_the_secret_in_the_error")
    else {
        return;
    };
    let var = format!("RETRYQ_TEST_WRONG_PW_{}", std::process::id());
    std::env::set_var(&var, "wrong-secret-4242");
    let options = PostgresOptions {
        password_env: Some(var),
        schema: fresh_schema(),
        ..opts(&url)
    };
    let err = PostgresRetryQueue::open(&options, StoreOptions::default()).unwrap_err();
    let text = format!("{err} {err:?}");
    assert!(
        !text.contains("wrong-secret-4242"),
        "the secret leaked: {text}"
    );
    assert!(text.contains(&options.endpoint()), "{text}");
}

#[test]
fn a_schema_newer_than_the_binary_is_refused_naming_both_versions() {
    let Some((url, password_file)) =
        test_server("a_schema_newer_than_the_binary_is_refused_naming_both_versions")
    else {
        return;
    };
    let options = PostgresOptions {
        password_file: Some(password_file),
        schema: fresh_schema(),
        ..opts(&url)
    };
    let store = PostgresRetryQueue::open(&options, StoreOptions::default()).unwrap();
    let mut conn = store.conn("test").unwrap();
    conn.execute(
        &format!(
            "INSERT INTO {}.schema_version (version) VALUES (99)",
            quote_ident(&options.schema)
        ),
        &[],
    )
    .unwrap();
    drop(conn);
    store.close().unwrap();
    let err = PostgresRetryQueue::open(&options, StoreOptions::default()).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("version 99") && text.contains(&format!("({SCHEMA_VERSION})")),
        "{text}"
    );
    assert!(text.contains(&options.schema), "{text}");
}

/// What `totals` adds up to, and what the table itself holds.
fn kept_and_real(store: &PostgresRetryQueue) -> ((i64, i64), (i64, i64)) {
    let mut conn = store.conn("test").unwrap();
    let kept = conn
        .query_one(
            &format!(
                "SELECT coalesce(sum(items), 0)::bigint, coalesce(sum(bytes), 0)::bigint FROM {}",
                store.names.totals
            ),
            &[],
        )
        .unwrap();
    let real = conn
        .query_one(
            &format!(
                "SELECT count(*), coalesce(sum(size_bytes), 0)::bigint FROM {}",
                store.names.items
            ),
            &[],
        )
        .unwrap();
    ((kept.get(0), kept.get(1)), (real.get(0), real.get(1)))
}

fn totals_rows(store: &PostgresRetryQueue) -> i64 {
    let mut conn = store.conn("test").unwrap();
    conn.query_one(&format!("SELECT count(*) FROM {}", store.names.totals), &[])
        .unwrap()
        .get(0)
}

fn new_item(name: &str) -> crate::item::NewItem {
    crate::item::NewItem::new(
        crate::item::Payload::from_json_str(&format!("{{\"for\":\"{name}\"}}")).unwrap(),
    )
    .with_id(crate::item::ItemId::parse(name).unwrap())
}

fn server_options(test: &str) -> Option<PostgresOptions> {
    let (url, password_file) = test_server(test)?;
    Some(PostgresOptions {
        password_file: Some(password_file),
        schema: fresh_schema(),
        ..opts(&url)
    })
}

#[test]
fn the_kept_totals_follow_every_write() {
    let Some(options) = server_options("the_kept_totals_follow_every_write") else {
        return;
    };
    let capped = StoreOptions {
        max_items: 6,
        overflow: crate::store::OverflowPolicy::DropOldest,
        ..StoreOptions::default()
    };
    let store = PostgresRetryQueue::open(&options, capped.clone()).unwrap();
    let check = |step: &str| {
        let (kept, real) = kept_and_real(&store);
        assert_eq!(kept, real, "after {step}: kept totals, then the table's");
    };
    check("open");
    store
        .enqueue_batch((0..5).map(|n| new_item(&format!("a{n}"))).collect())
        .unwrap();
    check("a batch");
    for n in 0..4 {
        store.enqueue(new_item(&format!("b{n}"))).unwrap();
    }
    check("enqueues that evict");
    assert!(store.stats().unwrap().evicted > 0);
    let claimed = store.claim(4, Duration::from_secs(60)).unwrap();
    check("a claim");
    let long = "x".repeat(500);
    store
        .requeue(&claimed[0].id, &long, chrono::Utc::now())
        .unwrap();
    check("a requeue that grows the item");
    store.mark_failed(&claimed[1].id, "short").unwrap();
    check("a dead letter");
    store.release(&claimed[2].id).unwrap();
    store.delete(&claimed[3].id).unwrap();
    check("a release and a delete");
    let mut grown = store.get(&claimed[2].id).unwrap();
    grown.last_error = "y".repeat(300);
    store.update(&grown).unwrap();
    check("an update");
    let outcomes = store
        .apply_batch(vec![
            WriteOp::Delete {
                id: claimed[2].id.clone(),
            },
            WriteOp::Enqueue(new_item("c0")),
            WriteOp::Delete {
                id: claimed[0].id.clone(),
            },
            WriteOp::Enqueue(new_item("c1")),
        ])
        .unwrap();
    assert!(outcomes.iter().all(Result::is_ok), "{outcomes:?}");
    check("a group commit");
    let lowered = PostgresRetryQueue::open(
        &options,
        StoreOptions {
            max_items: 2,
            instance_id: "lowered".into(),
            ..capped.clone()
        },
    )
    .unwrap();
    assert!(lowered.enforce_limits().unwrap() > 0);
    check("lowered limits");
    lowered.close().unwrap();
    store.cleanup(Duration::ZERO).unwrap();
    check("a cleanup");
    assert_eq!(kept_and_real(&store).1 .0, 0, "the cleanup left items");
    // Many single writes, then one admission: the rows are folded, the
    // sum kept.
    let roomy = PostgresRetryQueue::open(
        &options,
        StoreOptions {
            instance_id: "roomy".into(),
            ..StoreOptions::default()
        },
    )
    .unwrap();
    for n in 0..(admit::FOLD_AT + 10) {
        roomy.enqueue(new_item(&format!("d{n}"))).unwrap();
        if n % 2 == 0 {
            roomy
                .delete(&crate::item::ItemId::parse(&format!("d{n}")).unwrap())
                .unwrap();
        }
    }
    check("many writes");
    // At most a fold's row, then the rows up to the next fold, then the
    // two writes of the last round.
    assert!(totals_rows(&roomy) <= admit::FOLD_AT + 2, "never folded");
    // A drain appends a row per delete, with no admission to fold them:
    // the janitor's cleanup does.
    for item in roomy.list(&ListFilter::default()).unwrap() {
        roomy.delete(&item.id).unwrap();
    }
    assert!(totals_rows(&roomy) > admit::FOLD_AT / 2, "the drain's rows");
    roomy.cleanup(Duration::from_secs(3600)).unwrap();
    check("a cleanup after a drain");
    assert_eq!(totals_rows(&roomy), 1, "the cleanup did not fold");
    roomy.close().unwrap();
    store.close().unwrap();
}

#[test]
fn a_schema_at_version_1_gets_totals_counted_from_its_rows() {
    let Some(options) = server_options("a_schema_at_version_1_gets_totals_counted_from_its_rows")
    else {
        return;
    };
    let store = PostgresRetryQueue::open(&options, StoreOptions::default()).unwrap();
    store
        .enqueue_batch((0..7).map(|n| new_item(&format!("e{n}"))).collect())
        .unwrap();
    let q = quote_ident(&options.schema);
    // Back to what version 1 left: no totals, no triggers.
    store
        .conn("test")
        .unwrap()
        .batch_execute(&format!(
            "DROP TABLE {q}.totals;
             DROP FUNCTION {q}.retryq_items_added, {q}.retryq_items_removed,
                 {q}.retryq_items_resized, {q}.retryq_items_truncated CASCADE;
             DELETE FROM {q}.schema_version WHERE version > 1;"
        ))
        .unwrap();
    store.close().unwrap();
    drop(store);
    let capped = StoreOptions {
        max_items: 8,
        ..StoreOptions::default()
    };
    let store = PostgresRetryQueue::open(&options, capped).unwrap();
    let (kept, real) = kept_and_real(&store);
    assert_eq!(kept, real);
    assert_eq!(real.0, 7);
    // The cap counts what was there before the migration.
    store.enqueue(new_item("f0")).unwrap();
    let err = store.enqueue(new_item("f1")).unwrap_err();
    assert!(matches!(err, QueueError::QueueFull { .. }), "{err}");
    store.close().unwrap();
}

/// A claim, an enqueue stored claimed and a group commit holding one, each
/// committed with its answer lost: the caller saw a storage error, and the
/// next transaction of the handle returns exactly what they leased to
/// pending, touching neither a lease it was told about nor another
/// instance's, nor a row leased anew since the lost answer.
#[test]
fn leases_whose_commit_went_unanswered_are_released_by_the_next_transaction() {
    use crate::item::ItemStatus;
    use std::sync::atomic::Ordering;

    let test = "leases_whose_commit_went_unanswered_are_released_by_the_next_transaction";
    let Some(options) = server_options(test) else {
        return;
    };
    let lease = Duration::from_secs(60);
    let store = PostgresRetryQueue::open(&options, StoreOptions::default()).unwrap();
    // Another daemon's handle: it looks without settling anything of `store`.
    let other = PostgresRetryQueue::open(&options, StoreOptions::default()).unwrap();
    store
        .enqueue_batch((0..4).map(|n| new_item(&format!("p{n}"))).collect())
        .unwrap();
    let answered = store.claim(1, lease).unwrap().remove(0);
    let others = other.claim(1, lease).unwrap().remove(0);
    let leased_by_store = || -> Vec<String> {
        other
            .list(&ListFilter {
                status: Some(ItemStatus::Processing),
                ..ListFilter::default()
            })
            .unwrap()
            .into_iter()
            .filter(|i| i.lease_owner() == Some(store.options.instance_id.as_str()))
            .map(|i| i.id.to_string())
            .filter(|id| *id != answered.id.as_str())
            .collect()
    };

    type LostWrite<'a> = Box<dyn Fn() -> QueueResult<()> + 'a>;
    let writes: Vec<(&str, usize, LostWrite)> = vec![
        ("claim", 2, Box::new(|| store.claim(2, lease).map(drop))),
        (
            "enqueue_claimed",
            1,
            Box::new(|| store.enqueue_claimed(vec![new_item("c0")], lease).map(drop)),
        ),
        (
            "a group commit",
            1,
            Box::new(|| {
                let group = vec![
                    WriteOp::Enqueue(new_item("e0")),
                    WriteOp::EnqueueClaimed {
                        item: new_item("c1"),
                        lease,
                    },
                ];
                store.apply_batch(group).map(drop)
            }),
        ),
    ];
    for (what, leases, write) in writes {
        store
            .unanswered
            .lose_next_answer
            .store(true, Ordering::SeqCst);
        let e = write().unwrap_err();
        assert!(e.is_storage(), "{what}: {e}");
        let committed = leased_by_store();
        assert_eq!(committed.len(), leases, "{what} committed: {committed:?}");
        // The next transaction of the handle, whatever it is for.
        store.get(&answered.id).unwrap();
        assert_eq!(leased_by_store(), Vec::<String>::new(), "{what} released");
        for id in committed {
            let item = other
                .get(&crate::item::ItemId::parse(&id).unwrap())
                .unwrap();
            assert_eq!(item.status(), ItemStatus::Pending, "{what}: {id}");
            assert_eq!(item.attempts, 0, "{what}: no attempt counted for {id}");
        }
        assert!(store.unanswered.pending().is_empty(), "{what}: forgotten");
    }

    // A lease remembered as unanswered but with another `lease_until` (the
    // row was leased anew since) is not the lost write's: left alone, as is
    // another instance's lease.
    store.unanswered.remember(vec![unanswered::TakenLease::new(
        answered.id.to_string(),
        answered.lease_until().unwrap() - chrono::Duration::seconds(1),
    )]);
    store.get(&answered.id).unwrap();
    for held in [&answered, &others] {
        let item = other.get(&held.id).unwrap();
        assert_eq!(item.status(), ItemStatus::Processing, "{}", held.id);
        assert_eq!(item.lease_until(), held.lease_until());
    }
}
