//! What the MySQL `Auditor` does beyond the `Auditor` contract (testkit's
//! `contract/auditor.rs`, run on this store and on the in-memory one alike, from
//! `crates/testkit/tests/contracts.rs`): it reads records an instance of the previous
//! version wrote (no operation, no outcome) by the backfill's rule; it finds records stuck
//! in flight, which only this store keeps; and an unreachable database is `Unavailable`.
//! Each test has a database of its own from testkit's harness (`TEST_DATABASE_URL`, else
//! testcontainers, else skipped, saying so, and failed under `CI=true`), dropped afterwards.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::str::FromStr;

use domain::ports::{AuditCheck, Auditor, RepoError};
use mysql_repo::MySqlStore;
use sqlx::mysql::MySqlConnectOptions;
use testkit::TestDatabase;
use testkit::contract::{AUDIT_LEASE, AUDIT_TTL, Audited, assert_finds, sec, write_audit_books};

/// Runs `test` on the store of a fresh database (after the harness's loud skip, not at all
/// when there is no MySQL) and drops the database afterwards, also when the test fails.
async fn with_db<Fut>(test: impl FnOnce(MySqlStore, MySqlConnectOptions) -> Fut)
where
    Fut: Future<Output = ()> + Send + 'static,
{
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let options = MySqlConnectOptions::from_str(&db.url).unwrap();
    let store = db.store();
    db.run_then_cleanup(test(store, options)).await;
}

async fn exec(store: &MySqlStore, sql: &'static str) {
    sqlx::query(sql)
        .execute(store.pool())
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// A record an instance of the previous version wrote during a rolling upgrade has no
/// operation and no outcome: the audit reads it by the backfill's rule (the status class),
/// so such books audit clean, and such a refusal turned 2xx is still found.
#[tokio::test]
async fn records_without_an_outcome_read_by_the_backfill_rule() {
    with_db(|store, _| async move {
        let audited = Audited::new(store.clone());
        write_audit_books(&audited).await;
        exec(
            &store,
            "update idempotency_records set operation = null, outcome = null",
        )
        .await;
        assert_finds(&audited, &[]).await;

        exec(
            &store,
            "update idempotency_records set response_status = 200 \
             where user_id = 1 and idempotency_key = 'r-1'",
        )
        .await;
        let refusal = (AuditCheck::RecordHasOneEffect, "user 1 key r-1".to_owned());
        assert_finds(&audited, &[refusal]).await;
    })
    .await;
}

/// One record in flight since long before the audit, one that started within the lease
/// (the audit runs at +1000 s, the lease is 30 s): only the first is stuck.
#[tokio::test]
async fn a_record_stuck_in_flight_past_the_lease_is_found() {
    with_db(|store, _| async move {
        let audited = Audited::new(store.clone());
        write_audit_books(&audited).await;
        for (key, created) in [("stuck", sec(10)), ("recent", sec(990))] {
            sqlx::query(
                "insert into idempotency_records \
                 (user_id, idempotency_key, fingerprint, status, response_status, \
                  response_body, created_at, expires_at) \
                 values (2, ?, 'charge:user=2:amount=5', 'PROCESSING', 0, '', ?, ?)",
            )
            .bind(key)
            .bind(created.naive_utc())
            .bind((created + chrono::Duration::seconds(60)).naive_utc())
            .execute(store.pool())
            .await
            .unwrap();
        }
        let stuck = (
            AuditCheck::NoRecordStuckInFlight,
            "user 2 key stuck".to_owned(),
        );
        assert_finds(&audited, &[stuck]).await;
    })
    .await;
}

#[tokio::test]
async fn an_unreachable_database_is_unavailable() {
    with_db(|_, options| async move {
        let closed = MySqlStore::new(mysql_repo::connect_with(options, 1));
        closed.pool().close().await;
        let err = closed
            .audit(AUDIT_TTL, AUDIT_LEASE, sec(0))
            .await
            .unwrap_err();
        assert!(matches!(err, RepoError::Unavailable(_)), "{err:?}");

        let nowhere = MySqlStore::new(
            mysql_repo::connect("mysql://root@127.0.0.1:1/none", 1)
                .await
                .unwrap(),
        );
        let err = nowhere
            .audit(AUDIT_TTL, AUDIT_LEASE, sec(0))
            .await
            .unwrap_err();
        assert!(matches!(err, RepoError::Unavailable(_)), "{err:?}");
    })
    .await;
}
