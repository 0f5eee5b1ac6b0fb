//! `balance-service migrate` started several times at once on one fresh database: every
//! process must exit 0 and leave the schema complete. Skipped (saying so) without MySQL.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::{Command, Stdio};

use sqlx::AssertSqlSafe;
use testkit::TestDatabase;

/// Processes at once: unserialised, two of them collide every time.
const PROCESSES: usize = 6;

#[tokio::test]
async fn concurrent_migrate_processes_on_a_fresh_database_all_succeed() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    // The harness migrated it: empty it again, as a new database is.
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

    let children: Vec<_> = (0..PROCESSES)
        .map(|_| {
            Command::new(env!("CARGO_BIN_EXE_balance-service"))
                .arg("migrate")
                .env("DATABASE_URL", &db.url)
                .env("RUST_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outputs: Vec<_> = tokio::task::spawn_blocking(move || {
        children
            .into_iter()
            .map(|child| child.wait_with_output().unwrap())
            .collect()
    })
    .await
    .unwrap();
    for (i, output) in outputs.iter().enumerate() {
        assert!(
            output.status.success(),
            "process {i} exited {:?}: {}",
            output.status.code(),
            String::from_utf8_lossy(&output.stderr)
        );
    }

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
    db.cleanup().await;
}
