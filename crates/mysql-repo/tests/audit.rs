//! The MySQL `Auditor` against a real server: books written through the real atomic step
//! audit clean, and each kind of corruption, made with raw SQL, is found as its check's
//! breach of exactly the corrupted subject. Each test creates its own database
//! (`t_<uuid>`), migrates it, runs and drops it. The server comes from testkit:
//! `TEST_DATABASE_URL`, else testcontainers, else the test is skipped, saying so (and fails
//! under `CI=true`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::future::Future;
use std::str::FromStr;
use std::time::Duration as StdDuration;

use chrono::{DateTime, Duration, TimeZone, Utc};
use domain::idempotency::{Fingerprint, StoredResponse, legacy_operation};
use domain::model::EntryKind;
use domain::operations::{OperationKind, charge, pay, use_balance};
use domain::ports::{
    AuditCheck, AuditReport, Auditor, BalanceChange, BalanceStore, KeyRecord, OrderRepo,
    RefusalRecord, RepoError, UserRepo,
};
use domain::types::{Amount, Balance, IdempotencyKey, OrderId, UserId};
use mysql_repo::MySqlStore;
use sqlx::MySqlPool;
use sqlx::mysql::MySqlConnectOptions;
use testkit::{TestDatabase, steps};

/// The idempotency retention the books are written and audited with.
const TTL_SECS: i64 = 60;
/// The lock lease the audit is given.
const LEASE: StdDuration = StdDuration::from_secs(30);

struct Db {
    store: MySqlStore,
    pool: MySqlPool,
    options: MySqlConnectOptions,
}

impl Db {
    async fn exec(&self, sql: &'static str) -> u64 {
        sqlx::query(sql)
            .execute(&self.pool)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .rows_affected()
    }

    async fn audit(&self) -> AuditReport {
        self.store
            .audit(ttl(), LEASE, at(1_000))
            .await
            .expect("the audit runs")
    }
}

/// Runs `test` on a fresh database from testkit (skipped, saying so, when there is no
/// MySQL) and drops the database afterwards, also when the test panics.
async fn with_db<F, Fut>(test: F)
where
    F: FnOnce(Db) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let Some(database) = TestDatabase::create_with_pool(8).await else {
        return;
    };
    let db = Db {
        store: database.store(),
        pool: database.pool().clone(),
        options: MySqlConnectOptions::from_str(&database.url).unwrap(),
    };
    database.run_then_cleanup(test(db)).await;
}

fn at(secs: i64) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 22, 14, 0, 0).unwrap()
        + Duration::milliseconds(123)
        + Duration::seconds(secs)
}

fn ttl() -> StdDuration {
    StdDuration::from_secs(TTL_SECS.unsigned_abs())
}

fn user(id: i64) -> UserId {
    UserId::new(id).unwrap()
}

fn record(raw: &str, fingerprint: Fingerprint, now: DateTime<Utc>) -> KeyRecord {
    KeyRecord {
        key: IdempotencyKey::parse(raw).unwrap(),
        operation: legacy_operation(fingerprint.as_str()).unwrap_or(OperationKind::Charge),
        fingerprint,
        created_at: now,
        expires_at: now + Duration::seconds(TTL_SECS),
    }
}

/// One charge or use as the use case would hand it to the store.
fn change(
    who: i64,
    version: u64,
    kind: EntryKind,
    amount: i64,
    new_balance: i64,
    key: &str,
    now: DateTime<Utc>,
) -> BalanceChange {
    let value = Amount::from_stored(amount);
    let fingerprint = match kind {
        EntryKind::Charge => charge::fingerprint(user(who), value),
        _ => use_balance::fingerprint(user(who), value),
    };
    let (effect, operation) = steps::effect(kind, value, Balance::from_stored(new_balance), None);
    let mut key = record(key, fingerprint, now);
    key.operation = operation;
    BalanceChange {
        user_id: user(who),
        expected_version: version,
        effect,
        at: now,
        key,
        respond: Box::new(|_| StoredResponse {
            status: 200,
            body: b"{}".to_vec(),
        }),
    }
}

/// The payment of `order` (of `amount`) as the use case would hand it to the store.
fn payment(
    who: i64,
    version: u64,
    order: OrderId,
    amount: i64,
    new_balance: i64,
    key: &str,
    now: DateTime<Utc>,
) -> BalanceChange {
    let mut step = change(who, version, EntryKind::Use, amount, new_balance, key, now);
    let (effect, operation) = steps::effect(
        EntryKind::Payment,
        Amount::from_stored(amount),
        Balance::from_stored(new_balance),
        Some(order),
    );
    step.effect = effect;
    step.key.operation = operation;
    step.key.fingerprint = pay::fingerprint(user(who), order);
    step
}

/// What the books hold after [`write_books`]: the ids a corruption needs.
struct Books {
    /// User 2's PAID order and the ledger entry of its payment.
    paid_order: i64,
    payment_entry: i64,
    /// User 1's order, still PENDING.
    pending_order: i64,
    /// User 1's newest ledger entry (its use, key `u-1`).
    newest_of_user_1: i64,
}

/// Real operations through the ports: seeded users 1..3 (100000 each), user 1 charges,
/// uses and gets a stored refusal, user 2 pays an order, user 3 uses one key twice exactly
/// its retention apart, user 4 is created with nothing; user 1 has a PENDING order.
async fn write_books(db: &Db) -> Books {
    let store = &db.store;
    store
        .seed_users(3, Balance::from_stored(100_000), at(0))
        .await
        .unwrap();

    store
        .apply(change(1, 0, EntryKind::Charge, 500, 100_500, "c-1", at(1)))
        .await
        .unwrap();
    let used = store
        .apply(change(1, 1, EntryKind::Use, 200, 100_300, "u-1", at(2)))
        .await
        .unwrap();
    store
        .record_refusal(RefusalRecord {
            user_id: user(1),
            expected_version: 2,
            key: record(
                "r-1",
                use_balance::fingerprint(user(1), Amount::from_stored(999_999)),
                at(3),
            ),
            response: StoredResponse {
                status: 422,
                body: b"{\"code\":\"INSUFFICIENT_BALANCE\"}".to_vec(),
            },
        })
        .await
        .unwrap();
    let pending = store
        .create_order(user(1), Amount::from_stored(50), at(3))
        .await
        .unwrap();

    let order = store
        .create_order(user(2), Amount::from_stored(300), at(1))
        .await
        .unwrap();
    let paid = store
        .apply(payment(2, 0, order.id, 300, 99_700, "p-1", at(4)))
        .await
        .unwrap();

    // The key's record expires at its retention; the same key then runs again, exactly
    // that far apart, which is legitimate.
    store
        .apply(change(3, 0, EntryKind::Charge, 10, 100_010, "k", at(5)))
        .await
        .unwrap();
    store
        .apply(change(
            3,
            1,
            EntryKind::Charge,
            10,
            100_020,
            "k",
            at(5 + TTL_SECS),
        ))
        .await
        .unwrap();

    store.create_user(at(6)).await.unwrap();

    // The ids the expectations below name.
    assert_eq!((pending.id.get(), order.id.get()), (1, 2));
    assert_eq!(paid.assigned.payment_id.map(|p| p.get()), Some(1));
    assert_eq!(paid.assigned.entry_id.get(), 6);

    Books {
        paid_order: order.id.get(),
        payment_entry: paid.assigned.entry_id.get(),
        pending_order: pending.id.get(),
        newest_of_user_1: used.assigned.entry_id.get(),
    }
}

/// Every (check, subject) the report lists.
fn breaches(report: &AuditReport) -> BTreeSet<(AuditCheck, String)> {
    report
        .breaches
        .iter()
        .map(|b| (b.check, b.subject.clone()))
        .collect()
}

fn expect(pairs: &[(AuditCheck, &str)]) -> BTreeSet<(AuditCheck, String)> {
    pairs
        .iter()
        .map(|(check, subject)| (*check, (*subject).to_owned()))
        .collect()
}

/// Writes the books, runs `corrupt` on them, audits, and checks that exactly `expected`
/// is found (each once).
async fn corrupted_finds<F, Fut>(corrupt: F, expected: &'static [(AuditCheck, &'static str)])
where
    F: FnOnce(Db, Books) -> Fut + Send + 'static,
    Fut: Future<Output = Db> + Send + 'static,
{
    with_db(move |db| async move {
        let books = write_books(&db).await;
        assert!(db.audit().await.is_clean(), "the books start clean");
        let db = corrupt(db, books).await;
        let report = db.audit().await;
        assert_eq!(breaches(&report), expect(expected), "{report:#?}");
        assert_eq!(report.total_found(), expected.len() as u64, "{report:#?}");
        for breach in &report.breaches {
            assert!(!breach.detail.is_empty());
        }
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// Clean books
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn books_written_by_real_operations_audit_clean() {
    with_db(|db| async move {
        write_books(&db).await;
        let report = db.audit().await;
        assert!(report.is_clean(), "{report:#?}");
        assert_eq!(report.breaches, vec![]);
        for check in AuditCheck::ALL {
            assert_eq!(report.found(check), 0, "{check:?}");
        }
        assert_eq!(report.users, 4);
        // 3 openings, user 1's charge and use, user 2's payment, user 3's two charges.
        assert_eq!(report.ledger_entries, 8);
        // c-1, u-1, r-1, p-1 and k (its second use replaced the expired record).
        assert_eq!(report.records, 5);
        assert_eq!(report.orders, 2);
        assert_eq!(report.payments, 1);

        // Each entry carries its record's expiry: an auditor configured with a longer
        // retention than the service ran with finds no double application in user 3's
        // reuse of `k` after its record expired.
        let longer = db
            .store
            .audit(ttl() + StdDuration::from_millis(1), LEASE, at(1_000))
            .await
            .unwrap();
        assert_eq!(breaches(&longer), expect(&[]));
    })
    .await;
}

#[tokio::test]
async fn two_payments_of_one_amount_in_one_millisecond_audit_clean() {
    with_db(|db| async move {
        write_books(&db).await;
        let mut balance = 100_300;
        for (version, key) in [(2, "pa"), (3, "pb")] {
            let order = db
                .store
                .create_order(user(1), Amount::from_stored(40), at(7))
                .await
                .unwrap();
            balance -= 40;
            db.store
                .apply(payment(1, version, order.id, 40, balance, key, at(8)))
                .await
                .unwrap();
        }
        let report = db.audit().await;
        assert!(report.is_clean(), "{report:#?}");
        assert_eq!(report.payments, 3);
    })
    .await;
}

#[tokio::test]
async fn an_empty_database_audits_clean() {
    with_db(|db| async move {
        let report = db.audit().await;
        assert!(report.is_clean());
        assert_eq!(report, AuditReport::default());
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// One corruption per check
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_bumped_balance_is_found() {
    corrupted_finds(
        |db, _| async move {
            db.exec("update users set balance = balance + 1 where id = 1")
                .await;
            db
        },
        &[(AuditCheck::BalanceMatchesLedger, "user 1")],
    )
    .await;
}

#[tokio::test]
async fn a_newest_entry_that_disagrees_with_the_balance_is_found() {
    corrupted_finds(
        |db, books| async move {
            // The sum still matches; only the newest entry's balance_after is wrong.
            sqlx::query("update ledger_entries set balance_after = balance_after + 7 where id = ?")
                .bind(books.newest_of_user_1)
                .execute(&db.pool)
                .await
                .unwrap();
            db
        },
        &[(AuditCheck::BalanceMatchesLedger, "user 1")],
    )
    .await;
}

#[tokio::test]
async fn ledger_entries_of_a_missing_user_are_found() {
    corrupted_finds(
        |db, _| async move {
            db.exec("delete from users where id = 4").await;
            db.exec(
                "insert into ledger_entries \
                 (user_id, kind, amount, balance_after, idempotency_key, created_at) \
                 values (4, 'CHARGE', 5, 5, null, '2026-11-22 14:00:00.123')",
            )
            .await;
            db
        },
        &[(AuditCheck::BalanceMatchesLedger, "user 4")],
    )
    .await;
}

#[tokio::test]
async fn a_deleted_ledger_entry_is_found() {
    corrupted_finds(
        |db, books| async move {
            sqlx::query("delete from ledger_entries where id = ?")
                .bind(books.newest_of_user_1)
                .execute(&db.pool)
                .await
                .unwrap();
            db
        },
        &[
            (AuditCheck::BalanceMatchesLedger, "user 1"),
            (AuditCheck::RecordHasOneEffect, "user 1 key u-1"),
        ],
    )
    .await;
}

#[tokio::test]
async fn a_second_entry_of_one_key_at_the_same_instant_is_found() {
    corrupted_finds(
        |db, _| async move {
            // The charge `c-1` applied twice in one step.
            db.exec(
                "insert into ledger_entries \
                 (user_id, kind, amount, balance_after, idempotency_key, created_at) \
                 select user_id, kind, amount, balance_after, idempotency_key, created_at \
                 from ledger_entries where user_id = 1 and idempotency_key = 'c-1'",
            )
            .await;
            db
        },
        &[
            (AuditCheck::BalanceMatchesLedger, "user 1"),
            (AuditCheck::RecordHasOneEffect, "user 1 key c-1"),
            (AuditCheck::KeyAppliedOnce, "user 1 key c-1"),
        ],
    )
    .await;
}

#[tokio::test]
async fn a_key_applied_twice_within_its_retention_is_found_even_with_balanced_books() {
    corrupted_finds(
        |db, _| async move {
            // User 3 charged `k` once more 30 s after its second use (while that use's
            // record still lived), with the balance and the ledger kept in step.
            db.exec(
                "insert into ledger_entries \
                 (user_id, kind, amount, balance_after, idempotency_key, created_at) \
                 values (3, 'CHARGE', 10, 100030, 'k', '2026-11-22 14:01:35.123')",
            )
            .await;
            db.exec("update users set balance = 100030 where id = 3")
                .await;
            // The newest entry by id is this one, so balance_after agrees too.
            db
        },
        &[(AuditCheck::KeyAppliedOnce, "user 3 key k")],
    )
    .await;
}

#[tokio::test]
async fn a_refusal_turned_success_without_an_effect_is_found() {
    corrupted_finds(
        |db, _| async move {
            db.exec(
                "update idempotency_records set outcome = 'APPLIED' \
                 where user_id = 1 and idempotency_key = 'r-1'",
            )
            .await;
            db
        },
        &[(AuditCheck::RecordHasOneEffect, "user 1 key r-1")],
    )
    .await;
}

/// What a record did is its `outcome` column: a refusal answered with a 2xx status (or a
/// success with any other) is no breach as long as its effects match what it says.
#[tokio::test]
async fn the_audit_goes_by_the_recorded_outcome_not_the_status() {
    corrupted_finds(
        |db, _| async move {
            db.exec(
                "update idempotency_records set response_status = 200 \
                 where user_id = 1 and idempotency_key = 'r-1'",
            )
            .await;
            db.exec(
                "update idempotency_records set response_status = 409 \
                 where user_id = 1 and idempotency_key = 'c-1'",
            )
            .await;
            db
        },
        &[],
    )
    .await;
}

/// A record an instance of the previous version wrote during a rolling upgrade has no
/// operation and no outcome: the audit reads it by the backfill's rule (the status class),
/// so such books audit clean, and such a refusal turned 2xx is still found.
#[tokio::test]
async fn records_without_an_outcome_read_by_the_backfill_rule() {
    corrupted_finds(
        |db, _| async move {
            db.exec("update idempotency_records set operation = null, outcome = null")
                .await;
            db
        },
        &[],
    )
    .await;
    corrupted_finds(
        |db, _| async move {
            db.exec(
                "update idempotency_records set operation = null, outcome = null, \
                 response_status = 200 where user_id = 1 and idempotency_key = 'r-1'",
            )
            .await;
            db
        },
        &[(AuditCheck::RecordHasOneEffect, "user 1 key r-1")],
    )
    .await;
}

#[tokio::test]
async fn a_refusal_with_an_effect_is_found() {
    corrupted_finds(
        |db, _| async move {
            // A use stored as refused, whose money moved all the same.
            db.exec(
                "insert into ledger_entries \
                 (user_id, kind, amount, balance_after, idempotency_key, created_at) \
                 values (1, 'USE', 100, 100200, 'r-1', '2026-11-22 14:00:03.123')",
            )
            .await;
            db.exec("update users set balance = 100200 where id = 1")
                .await;
            db
        },
        &[(AuditCheck::RecordHasOneEffect, "user 1 key r-1")],
    )
    .await;
}

#[tokio::test]
async fn a_record_stuck_in_flight_past_the_lease_is_found() {
    corrupted_finds(
        |db, _| async move {
            // One in flight since long before the audit, one that started within the
            // lease (the audit runs at +1000 s, the lease is 30 s).
            db.exec(
                "insert into idempotency_records \
                 (user_id, idempotency_key, fingerprint, status, response_status, \
                  response_body, created_at, expires_at) \
                 values (2, 'stuck', 'charge:user=2:amount=5', 'PROCESSING', 0, '', \
                         '2026-11-22 14:00:10.123', '2026-11-22 14:01:10.123'), \
                        (2, 'recent', 'charge:user=2:amount=5', 'PROCESSING', 0, '', \
                         '2026-11-22 14:16:30.123', '2026-11-22 14:17:30.123')",
            )
            .await;
            db
        },
        &[(AuditCheck::NoRecordStuckInFlight, "user 2 key stuck")],
    )
    .await;
}

#[tokio::test]
async fn a_paid_order_without_a_payment_is_found() {
    corrupted_finds(
        |db, books| async move {
            sqlx::query("update orders set status = 'PAID', paid_at = created_at where id = ?")
                .bind(books.pending_order)
                .execute(&db.pool)
                .await
                .unwrap();
            db
        },
        &[(AuditCheck::PaidOrderHasOnePayment, "order 1")],
    )
    .await;
}

#[tokio::test]
async fn a_deleted_payment_is_found() {
    with_db(|db| async move {
        let books = write_books(&db).await;
        sqlx::query("delete from payments where order_id = ?")
            .bind(books.paid_order)
            .execute(&db.pool)
            .await
            .unwrap();
        let report = db.audit().await;
        let order = format!("order {}", books.paid_order);
        let entry = format!("ledger entry {}", books.payment_entry);
        assert_eq!(
            breaches(&report),
            expect(&[
                (AuditCheck::PaidOrderHasOnePayment, &order),
                (AuditCheck::PaidOrderHasOnePayment, &entry),
            ]),
            "{report:#?}"
        );
        assert_eq!(report.found(AuditCheck::PaidOrderHasOnePayment), 2);
    })
    .await;
}

#[tokio::test]
async fn a_payment_of_an_order_that_is_not_paid_is_found() {
    corrupted_finds(
        |db, books| async move {
            sqlx::query("update orders set status = 'PENDING', paid_at = null where id = ?")
                .bind(books.paid_order)
                .execute(&db.pool)
                .await
                .unwrap();
            db
        },
        &[(AuditCheck::PaidOrderHasOnePayment, "payment 1")],
    )
    .await;
}

#[tokio::test]
async fn a_payment_without_its_ledger_entry_is_found() {
    corrupted_finds(
        |db, books| async move {
            // The entry moved one millisecond: no longer the payment's instant.
            sqlx::query(
                "update ledger_entries set created_at = created_at + interval 1000 microsecond \
                 where id = ?",
            )
            .bind(books.payment_entry)
            .execute(&db.pool)
            .await
            .unwrap();
            db
        },
        &[
            (AuditCheck::RecordHasOneEffect, "user 2 key p-1"),
            (AuditCheck::PaidOrderHasOnePayment, "payment 1"),
            (AuditCheck::PaidOrderHasOnePayment, "ledger entry 6"),
        ],
    )
    .await;
}

// ---------------------------------------------------------------------------------------
// Scale, consistency, errors
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_broken_database_is_listed_up_to_the_cap_and_counted_in_full() {
    with_db(|db| async move {
        db.store
            .seed_users(250, Balance::from_stored(1_000), at(0))
            .await
            .unwrap();
        assert!(db.audit().await.is_clean());
        assert_eq!(db.exec("update users set balance = balance + 1").await, 250);

        let report = db.audit().await;
        assert_eq!(report.users, 250);
        assert_eq!(report.found(AuditCheck::BalanceMatchesLedger), 250);
        assert_eq!(report.total_found(), 250);
        let listed: Vec<_> = report.listed(AuditCheck::BalanceMatchesLedger).collect();
        assert_eq!(listed.len(), AuditReport::LISTED_PER_CHECK);
        // The lowest ids first.
        assert_eq!(listed[0].subject, "user 1");
        assert_eq!(
            listed[0].detail,
            "balance 1001, ledger sum 1000 over 1 entries; newest entry 1 has balance_after 1000"
        );
    })
    .await;
}

#[tokio::test]
async fn audits_during_concurrent_writes_see_no_false_breach() {
    with_db(|db| async move {
        db.store
            .seed_users(4, Balance::from_stored(1_000), at(0))
            .await
            .unwrap();
        let writers: Vec<_> = (1..=4_i64)
            .map(|who| {
                let store = db.store.clone();
                tokio::spawn(async move {
                    for n in 0..40_u64 {
                        let key = format!("w-{n}");
                        let balance = 1_000 + 5 * (i64::try_from(n).unwrap() + 1);
                        store
                            .apply(change(
                                who,
                                n,
                                EntryKind::Charge,
                                5,
                                balance,
                                &key,
                                at(1) + Duration::milliseconds(i64::try_from(n).unwrap()),
                            ))
                            .await
                            .unwrap();
                    }
                })
            })
            .collect();
        let mut audits = 0;
        while !writers.iter().all(tokio::task::JoinHandle::is_finished) {
            let report = db.audit().await;
            assert!(report.is_clean(), "{report:#?}");
            audits += 1;
        }
        for writer in writers {
            writer.await.unwrap();
        }
        let report = db.audit().await;
        assert!(report.is_clean(), "{report:#?}");
        assert_eq!(report.ledger_entries, 4 + 4 * 40);
        assert!(audits > 0);
    })
    .await;
}

#[tokio::test]
async fn an_unreachable_database_is_unavailable() {
    with_db(|db| async move {
        let closed = MySqlStore::new(mysql_repo::connect_with(db.options.clone(), 1));
        closed.pool().close().await;
        let err = closed.audit(ttl(), LEASE, at(0)).await.unwrap_err();
        assert!(matches!(err, RepoError::Unavailable(_)), "{err:?}");

        let nowhere = MySqlStore::new(
            mysql_repo::connect("mysql://root@127.0.0.1:1/none", 1)
                .await
                .unwrap(),
        );
        let err = nowhere.audit(ttl(), LEASE, at(0)).await.unwrap_err();
        assert!(matches!(err, RepoError::Unavailable(_)), "{err:?}");
    })
    .await;
}
