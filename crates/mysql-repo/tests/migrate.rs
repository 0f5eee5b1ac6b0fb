//! Several migration runs at once on one fresh database: each must succeed and the schema
//! must end complete. Skipped (saying so) without a server.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use sqlx::AssertSqlSafe;
use testkit::TestDatabase;

/// Concurrent runs: enough that, unserialised, two of them always collide.
const RUNS: usize = 8;

/// Empties the harness's (migrated) database, so it is as fresh as a new one.
async fn make_fresh(db: &TestDatabase) {
    let tables: Vec<(String,)> = sqlx::query_as(
        "select table_name from information_schema.tables where table_schema = database()",
    )
    .fetch_all(db.pool())
    .await
    .unwrap();
    for (table,) in tables {
        sqlx::query(AssertSqlSafe(format!("drop table `{table}`")))
            .execute(db.pool())
            .await
            .unwrap();
    }
}

/// Every migration recorded as applied, and every table of the schema there.
async fn assert_schema_complete(db: &TestDatabase) {
    let (applied,): (i64,) =
        sqlx::query_as("select count(*) from _sqlx_migrations where success = 1")
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert_eq!(applied as usize, mysql_repo::MIGRATOR.migrations.len());
    let (tables,): (i64,) = sqlx::query_as(
        "select count(*) from information_schema.tables where table_schema = database() \
         and table_name in ('users', 'ledger_entries', 'idempotency_records', 'orders', 'payments', \
                            'refunds', 'coupons', 'user_coupons')",
    )
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert_eq!(tables, 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_migrations_of_a_fresh_database_all_succeed() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    make_fresh(&db).await;

    // Each run on a pool of its own, as separate processes would be.
    let mut runs = Vec::new();
    for _ in 0..RUNS {
        let pool = mysql_repo::connect(&db.url, 2).await.unwrap();
        runs.push(tokio::spawn(async move {
            let run = mysql_repo::migrate(&pool).await;
            pool.close().await;
            run
        }));
    }
    for (i, run) in runs.into_iter().enumerate() {
        let run = run.await.unwrap();
        assert!(run.is_ok(), "run {i}: {:#}", run.unwrap_err());
    }
    assert_schema_complete(&db).await;

    // And once more on the current schema: a no-op.
    mysql_repo::migrate(db.pool()).await.unwrap();
    assert_schema_complete(&db).await;
    db.cleanup().await;
}

/// A record row as instances before migration 0007 inserted it (no operation, no outcome).
async fn insert_old_record(db: &TestDatabase, key: &str, fingerprint: &str, status: u16) {
    sqlx::query(
        "insert into idempotency_records \
         (user_id, idempotency_key, fingerprint, status, response_status, response_body, \
          created_at, expires_at) \
         values (1, ?, ?, 'COMPLETED', ?, 'old', '2026-11-01 00:00:00.000', '9999-01-01 00:00:00.000')",
    )
    .bind(key)
    .bind(fingerprint)
    .bind(status)
    .execute(db.pool())
    .await
    .unwrap();
}

/// Migration 0007 backfills each old record's operation from its fingerprint's prefix and
/// its outcome from its status class; a row an older instance inserts after it (both null)
/// reads the same way through `find`, and so do the backfilled ones.
#[tokio::test]
async fn migration_0007_backfills_old_records_and_null_rows_read_by_the_same_rule() {
    use domain::idempotency::RecordOutcome;
    use domain::operations::OperationKind;
    use domain::ports::IdempotencyRepo as _;

    let Some(db) = TestDatabase::create().await else {
        return;
    };
    make_fresh(&db).await;
    let (before, from) = mysql_repo::MIGRATOR.migrations.split_at(6);
    assert_eq!(from.first().map(|m| m.version), Some(7));
    for migration in before {
        sqlx::raw_sql(migration.sql.clone())
            .execute(db.pool())
            .await
            .unwrap();
    }
    let old = [
        ("c", "charge:user=1:amount=5", 200, "CHARGE", "APPLIED"),
        ("cr", "charge:user=1:amount=6", 422, "CHARGE", "REFUSED"),
        ("u", "use:user=1:amount=7", 200, "USE", "APPLIED"),
        ("ur", "use:user=1:amount=9", 422, "USE", "REFUSED"),
        ("p", "payment:user=1:order=3", 200, "PAYMENT", "APPLIED"),
        ("pr", "payment:user=1:order=4", 409, "PAYMENT", "REFUSED"),
    ];
    for (key, fingerprint, status, ..) in old {
        insert_old_record(&db, key, fingerprint, status).await;
    }
    sqlx::raw_sql(from[0].sql.clone())
        .execute(db.pool())
        .await
        .unwrap();

    let store = db.store();
    let user = domain::types::UserId::new(1).unwrap();
    let now = chrono::Utc::now();
    for (key, _, _, operation, outcome) in old {
        let (stored_op, stored_outcome): (Option<String>, Option<String>) = sqlx::query_as(
            "select operation, outcome from idempotency_records where idempotency_key = ?",
        )
        .bind(key)
        .fetch_one(db.pool())
        .await
        .unwrap();
        assert_eq!(
            (stored_op.as_deref(), stored_outcome.as_deref()),
            (Some(operation), Some(outcome)),
            "{key}"
        );
        let record = store
            .find(
                user,
                &domain::types::IdempotencyKey::parse(key).unwrap(),
                now,
            )
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (record.operation.as_str(), record.outcome.as_str()),
            (operation, outcome),
            "{key}"
        );
    }

    // Written by an instance of the previous version mid-upgrade: both columns null.
    insert_old_record(&db, "late", "payment:user=1:order=8", 409).await;
    let late = store
        .find(
            user,
            &domain::types::IdempotencyKey::parse("late").unwrap(),
            now,
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (late.operation, late.outcome),
        (OperationKind::Payment, RecordOutcome::Refused)
    );
    db.cleanup().await;
}

/// A database a newer version migrated further (a rollback, an older pod restarting during a
/// rolling upgrade): this binary's `migrate` accepts it instead of refusing to start.
#[tokio::test]
async fn a_database_migrated_further_by_a_newer_version_is_accepted() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    sqlx::query(
        "insert into _sqlx_migrations \
         (version, description, installed_on, success, checksum, execution_time) \
         values (99999999, 'from a newer version', now(), 1, x'00', 1)",
    )
    .execute(db.pool())
    .await
    .unwrap();
    let run = mysql_repo::migrate(db.pool()).await;
    assert!(run.is_ok(), "{:#}", run.unwrap_err());
    db.cleanup().await;
}
