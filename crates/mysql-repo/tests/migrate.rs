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
         and table_name in ('users', 'ledger_entries', 'idempotency_records', 'orders', 'payments')",
    )
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert_eq!(tables, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_migrations_of_a_fresh_database_all_succeed() {
    let Some(db) = TestDatabase::create().await else {
        return testkit::skip("concurrent_migrations_of_a_fresh_database_all_succeed");
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
