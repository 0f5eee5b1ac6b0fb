//! The MySQL adapter against a real server. Each test creates its own database
//! (`t_<uuid>`), migrates it, runs and drops it, so the tests run in parallel. The server
//! comes from testkit: `TEST_DATABASE_URL`, else testcontainers, else the test is skipped,
//! saying so (and fails under `CI=true`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::future::Future;
use std::str::FromStr;

use chrono::{DateTime, Duration, TimeZone, Utc};
use domain::idempotency::{Fingerprint, StoredResponse, legacy_operation};
use domain::model::{EntryKind, OrderStatus};
use domain::operations::{OperationKind, charge, pay, use_balance};
use domain::ports::{
    Assigned, BalanceChange, BalanceStore, IdempotencyRepo, KeyRecord, OrderRepo, RefusalRecord,
    RepoError, StepError, UserRepo,
};
use domain::types::{Amount, Balance, EntryId, IdempotencyKey, OrderId, UserId};
use mysql_repo::{MIGRATOR, MySqlStore};
use sqlx::MySqlPool;
use sqlx::mysql::MySqlConnectOptions;
use testkit::{TestDatabase, steps};

/// A fresh, migrated database for one test.
struct Db {
    store: MySqlStore,
    pool: MySqlPool,
    options: MySqlConnectOptions,
}

impl Db {
    /// A second store on its own pool: another service instance on the same database.
    fn other_instance(&self) -> MySqlStore {
        MySqlStore::new(mysql_repo::connect_with(self.options.clone(), 4))
    }

    async fn count(&self, sql: &'static str, user: i64) -> i64 {
        let (n,): (i64,) = sqlx::query_as(sql)
            .bind(user)
            .fetch_one(&self.pool)
            .await
            .unwrap();
        n
    }

    async fn ledger_count(&self, user: UserId) -> i64 {
        self.count(
            "select count(*) from ledger_entries where user_id = ?",
            user.get(),
        )
        .await
    }

    async fn record_count(&self, user: UserId) -> i64 {
        self.count(
            "select count(*) from idempotency_records where user_id = ?",
            user.get(),
        )
        .await
    }
}

/// Runs `test` on a fresh database from testkit (skipped, saying so, when there is no
/// MySQL) and drops the database afterwards, also when the test panics.
async fn with_db<F, Fut>(test: F)
where
    F: FnOnce(Db) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let Some(database) = TestDatabase::create_with_pool(16).await else {
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

fn key(raw: &str) -> IdempotencyKey {
    IdempotencyKey::parse(raw).unwrap()
}

fn record(raw: &str, fingerprint: Fingerprint, now: DateTime<Utc>, ttl_secs: i64) -> KeyRecord {
    KeyRecord {
        key: key(raw),
        operation: legacy_operation(fingerprint.as_str()).unwrap_or(OperationKind::Charge),
        fingerprint,
        created_at: now,
        expires_at: now + Duration::seconds(ttl_secs),
    }
}

/// A response whose body names the assigned ids and holds bytes that are not UTF-8, to
/// prove the body is stored byte for byte.
fn respond_with_ids(assigned: &Assigned) -> StoredResponse {
    let mut body = format!(
        "entry={} payment={:?}",
        assigned.entry_id,
        assigned.payment_id.map(|p| p.get())
    )
    .into_bytes();
    body.extend_from_slice(&[0x00, 0xff, 0xfe, b'\n']);
    StoredResponse { status: 200, body }
}

struct Change {
    user: UserId,
    version: u64,
    new_balance: i64,
    kind: EntryKind,
    amount: i64,
    now: DateTime<Utc>,
    key: &'static str,
    ttl_secs: i64,
    order: Option<OrderId>,
}

impl Change {
    fn charge(user: UserId, version: u64, new_balance: i64, amount: i64) -> Self {
        Self {
            user,
            version,
            new_balance,
            kind: EntryKind::Charge,
            amount,
            now: at(0),
            key: "key-1",
            ttl_secs: 86_400,
            order: None,
        }
    }

    fn build(self) -> BalanceChange {
        let fingerprint = match (self.kind, self.order) {
            (EntryKind::Payment, Some(order)) => pay::fingerprint(self.user, order),
            (EntryKind::Charge, _) => {
                charge::fingerprint(self.user, Amount::from_stored(self.amount))
            }
            _ => use_balance::fingerprint(self.user, Amount::from_stored(self.amount)),
        };
        let (effect, operation) = steps::effect(
            self.kind,
            Amount::from_stored(self.amount),
            Balance::from_stored(self.new_balance),
            self.order,
        );
        let mut key = record(self.key, fingerprint, self.now, self.ttl_secs);
        key.operation = operation;
        BalanceChange {
            user_id: self.user,
            expected_version: self.version,
            effect,
            at: self.now,
            key,
            respond: Box::new(respond_with_ids),
        }
    }
}

async fn new_user_with(db: &Db, balance: i64) -> UserId {
    let user = db.store.create_user(at(0)).await.unwrap();
    if balance > 0 {
        db.store
            .apply(
                Change {
                    key: "opening",
                    ..Change::charge(user.id, 0, balance, balance)
                }
                .build(),
            )
            .await
            .unwrap();
    }
    user.id
}

// ---------------------------------------------------------------------------------------
// Schema
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn migrations_apply_cleanly_and_are_idempotent() {
    with_db(|db| async move {
        let applied: Vec<(i64, bool)> =
            sqlx::query_as("select version, success from _sqlx_migrations order by version")
                .fetch_all(&db.pool)
                .await
                .unwrap();
        assert_eq!(applied.len(), MIGRATOR.iter().count());
        assert!(applied.iter().all(|(_, ok)| *ok));
        assert_eq!(
            applied.iter().map(|(v, _)| *v).collect::<Vec<_>>(),
            vec![1, 2, 3, 4, 5, 6, 7, 8]
        );

        // A second run (another instance starting) changes nothing.
        mysql_repo::migrate(&db.pool).await.unwrap();

        let engines: Vec<(String, String)> = sqlx::query_as(
            "select table_name, engine from information_schema.tables \
             where table_schema = database() and table_name <> '_sqlx_migrations' \
             order by table_name",
        )
        .fetch_all(&db.pool)
        .await
        .unwrap();
        assert_eq!(
            engines,
            [
                "idempotency_records",
                "ledger_entries",
                "orders",
                "payments",
                "refunds",
                "users"
            ]
            .iter()
            .map(|t| ((*t).to_owned(), "InnoDB".to_owned()))
            .collect::<Vec<_>>()
        );

        let (collation,): (String,) = sqlx::query_as(
            "select collation_name from information_schema.columns \
             where table_schema = database() and table_name = 'idempotency_records' \
             and column_name = 'idempotency_key'",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        assert_eq!(collation, "ascii_bin");
    })
    .await;
}

#[tokio::test]
async fn check_constraint_rejects_a_negative_balance() {
    with_db(|db| async move {
        let user = db.store.create_user(at(0)).await.unwrap();
        let err = sqlx::query("update users set balance = -1 where id = ?")
            .bind(user.id.get())
            .execute(&db.pool)
            .await
            .unwrap_err();
        assert!(
            err.as_database_error()
                .is_some_and(|e| e.is_check_violation()),
            "{err:?}"
        );

        // Through the port, a negative balance is a bug (Unexpected), and nothing is written.
        let err = db
            .store
            .apply(
                Change {
                    kind: EntryKind::Use,
                    ..Change::charge(user.id, 0, -5, 5)
                }
                .build(),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, StepError::Unexpected(_)), "{err:?}");
        let after = db.store.get_user(user.id).await.unwrap().unwrap();
        assert_eq!((after.balance, after.version), (Balance::ZERO, 0));
        assert_eq!(db.ledger_count(user.id).await, 0);
        assert_eq!(db.record_count(user.id).await, 0);
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// Users
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn create_and_get_user_round_trip_to_the_millisecond() {
    with_db(|db| async move {
        // Sub-millisecond digits are dropped, as MySQL and MariaDB would disagree on them.
        let now = at(0) + Duration::microseconds(456);
        let first = db.store.create_user(now).await.unwrap();
        let second = db.store.create_user(now).await.unwrap();
        assert_eq!(first.balance, Balance::ZERO);
        assert_eq!(first.version, 0);
        assert_eq!(first.created_at, at(0));
        assert!(second.id > first.id);

        let read = db.store.get_user(first.id).await.unwrap().unwrap();
        assert_eq!(read, first);
        assert!(
            db.store
                .get_user(UserId::new(999_999).unwrap())
                .await
                .unwrap()
                .is_none()
        );
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// The atomic step
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn apply_commits_balance_ledger_and_record_together() {
    with_db(|db| async move {
        let user = db.store.create_user(at(0)).await.unwrap().id;
        let applied = db
            .store
            .apply(Change::charge(user, 0, 10_000, 10_000).build())
            .await
            .unwrap();
        assert_eq!(applied.assigned.payment_id, None);
        assert_eq!(applied.response, respond_with_ids(&applied.assigned));

        let after = db.store.get_user(user).await.unwrap().unwrap();
        assert_eq!((after.balance.get(), after.version), (10_000, 1));

        let page = db.store.history(user, None, 50).await.unwrap();
        assert_eq!(page.next, None);
        assert_eq!(page.items.len(), 1);
        let entry = &page.items[0];
        assert_eq!(entry.id, applied.assigned.entry_id);
        assert_eq!(entry.kind, EntryKind::Charge);
        assert_eq!(entry.amount.get(), 10_000);
        assert_eq!(entry.balance_after.get(), 10_000);
        assert_eq!(entry.idempotency_key, Some(key("key-1")));
        assert_eq!(entry.created_at, at(0));

        let found = db
            .store
            .find(user, &key("key-1"), at(1))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(found.response, applied.response);
        assert_eq!(
            found.fingerprint,
            charge::fingerprint(user, Amount::from_stored(10_000))
        );
        assert_eq!(found.created_at, at(0));
        assert_eq!(found.expires_at, at(86_400));

        // A use on top, with the version the charge produced.
        db.store
            .apply(
                Change {
                    kind: EntryKind::Use,
                    key: "key-2",
                    ..Change::charge(user, 1, 7_000, 3_000)
                }
                .build(),
            )
            .await
            .unwrap();
        let after = db.store.get_user(user).await.unwrap().unwrap();
        assert_eq!((after.balance.get(), after.version), (7_000, 2));
        assert_eq!(db.ledger_count(user).await, 2);
    })
    .await;
}

#[tokio::test]
async fn apply_with_a_stale_version_writes_nothing() {
    with_db(|db| async move {
        let user = new_user_with(&db, 5_000).await;
        let err = db
            .store
            .apply(
                Change {
                    key: "stale",
                    ..Change::charge(user, 0, 6_000, 1_000)
                }
                .build(),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, StepError::VersionConflict), "{err:?}");
        let after = db.store.get_user(user).await.unwrap().unwrap();
        assert_eq!((after.balance.get(), after.version), (5_000, 1));
        assert_eq!(db.ledger_count(user).await, 1);
        assert!(
            db.store
                .find(user, &key("stale"), at(1))
                .await
                .unwrap()
                .is_none()
        );
    })
    .await;
}

#[tokio::test]
async fn apply_for_an_unknown_user_writes_nothing() {
    with_db(|db| async move {
        let ghost = UserId::new(424_242).unwrap();
        let err = db
            .store
            .apply(Change::charge(ghost, 0, 1_000, 1_000).build())
            .await
            .unwrap_err();
        assert!(matches!(err, StepError::UserNotFound), "{err:?}");
        assert_eq!(db.ledger_count(ghost).await, 0);
        assert_eq!(db.record_count(ghost).await, 0);
    })
    .await;
}

#[tokio::test]
async fn apply_with_a_live_key_writes_nothing() {
    with_db(|db| async move {
        let user = db.store.create_user(at(0)).await.unwrap().id;
        db.store
            .apply(Change::charge(user, 0, 1_000, 1_000).build())
            .await
            .unwrap();
        let first = db
            .store
            .find(user, &key("key-1"), at(1))
            .await
            .unwrap()
            .unwrap();

        // Same key, current version, still live: refused, and the balance write undone.
        let err = db
            .store
            .apply(
                Change {
                    now: at(10),
                    ..Change::charge(user, 1, 3_000, 2_000)
                }
                .build(),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, StepError::KeyTaken), "{err:?}");
        let after = db.store.get_user(user).await.unwrap().unwrap();
        assert_eq!((after.balance.get(), after.version), (1_000, 1));
        assert_eq!(db.ledger_count(user).await, 1);
        let still = db
            .store
            .find(user, &key("key-1"), at(11))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(still, first);
    })
    .await;
}

#[tokio::test]
async fn an_expired_key_is_replaced() {
    with_db(|db| async move {
        let user = db.store.create_user(at(0)).await.unwrap().id;
        db.store
            .apply(
                Change {
                    ttl_secs: 5,
                    ..Change::charge(user, 0, 1_000, 1_000)
                }
                .build(),
            )
            .await
            .unwrap();
        assert!(
            db.store
                .find(user, &key("key-1"), at(5))
                .await
                .unwrap()
                .is_none(),
            "a record is dead at its expiry instant"
        );

        // Exactly at the old record's expiry, the key is free again.
        let applied = db
            .store
            .apply(
                Change {
                    now: at(5),
                    ..Change::charge(user, 1, 3_000, 2_000)
                }
                .build(),
            )
            .await
            .unwrap();
        let found = db
            .store
            .find(user, &key("key-1"), at(6))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(found.response, applied.response);
        assert_eq!(found.created_at, at(5));
        assert_eq!(
            found.fingerprint,
            charge::fingerprint(user, Amount::from_stored(2_000))
        );
        assert_eq!(db.record_count(user).await, 1);
        assert_eq!(db.ledger_count(user).await, 2);
    })
    .await;
}

#[tokio::test]
async fn a_payment_pays_the_order_once() {
    with_db(|db| async move {
        let user = new_user_with(&db, 20_000).await;
        let order = db
            .store
            .create_order(user, Amount::from_stored(15_000), at(1))
            .await
            .unwrap();
        assert_eq!(order.status, OrderStatus::Pending);
        assert_eq!(order.created_at, at(1));
        assert_eq!(
            db.store.get_order(order.id).await.unwrap(),
            Some(order.clone())
        );

        let pay = |version, key, now| Change {
            kind: EntryKind::Payment,
            key,
            now,
            order: Some(order.id),
            ..Change::charge(user, version, 5_000, 15_000)
        };
        let applied = db
            .store
            .apply(pay(1, "pay-1", at(2)).build())
            .await
            .unwrap();
        let payment_id = applied.assigned.payment_id.unwrap();

        let payment = db.store.get_payment(payment_id).await.unwrap().unwrap();
        assert_eq!(payment.order_id, order.id);
        assert_eq!(payment.user_id, user);
        assert_eq!(payment.amount.get(), 15_000);
        assert_eq!(payment.balance_after.get(), 5_000);
        assert_eq!(payment.paid_at, at(2));
        let paid = db.store.get_order(order.id).await.unwrap().unwrap();
        assert_eq!(paid.status, OrderStatus::Paid);
        let entry = &db.store.history(user, None, 1).await.unwrap().items[0];
        assert_eq!(
            (entry.kind, entry.id),
            (EntryKind::Payment, applied.assigned.entry_id)
        );

        // A second payment with a new key: refused, nothing written.
        let err = db
            .store
            .apply(pay(2, "pay-2", at(3)).build())
            .await
            .unwrap_err();
        assert!(matches!(err, StepError::OrderNotPending), "{err:?}");
        let after = db.store.get_user(user).await.unwrap().unwrap();
        assert_eq!((after.balance.get(), after.version), (5_000, 2));
        assert_eq!(db.ledger_count(user).await, 2);
        assert!(
            db.store
                .find(user, &key("pay-2"), at(4))
                .await
                .unwrap()
                .is_none()
        );
        assert!(
            db.store
                .get_payment(domain::types::PaymentId::new(payment_id.get() + 1).unwrap())
                .await
                .unwrap()
                .is_none()
        );
    })
    .await;
}

#[tokio::test]
async fn a_payment_is_refused_for_another_users_order_or_an_order_with_a_payment_row() {
    with_db(|db| async move {
        let payer = new_user_with(&db, 20_000).await;
        let owner = db.store.create_user(at(0)).await.unwrap().id;
        let foreign = db
            .store
            .create_order(owner, Amount::from_stored(1_000), at(1))
            .await
            .unwrap();
        let pay = |order, key| {
            Change {
                kind: EntryKind::Payment,
                key,
                order: Some(order),
                ..Change::charge(payer, 1, 19_000, 1_000)
            }
            .build()
        };
        let err = db.store.apply(pay(foreign.id, "p-1")).await.unwrap_err();
        assert!(matches!(err, StepError::OrderNotPending), "{err:?}");
        assert_eq!(
            db.store.get_order(foreign.id).await.unwrap().unwrap().status,
            OrderStatus::Pending
        );

        // A PENDING order that somehow already has a payment row: the unique order_id
        // refuses the second payment, and the order's PAID flip is rolled back with it.
        let own = db
            .store
            .create_order(payer, Amount::from_stored(1_000), at(1))
            .await
            .unwrap();
        sqlx::query(
            "insert into payments (order_id, user_id, amount, balance_after, paid_at, idempotency_key) \
             values (?, ?, 1000, 0, ?, 'manual')",
        )
        .bind(own.id.get())
        .bind(payer.get())
        .bind(at(1).naive_utc())
        .execute(&db.pool)
        .await
        .unwrap();
        let err = db.store.apply(pay(own.id, "p-2")).await.unwrap_err();
        assert!(matches!(err, StepError::OrderNotPending), "{err:?}");
        assert_eq!(
            db.store.get_order(own.id).await.unwrap().unwrap().status,
            OrderStatus::Pending
        );
        let after = db.store.get_user(payer).await.unwrap().unwrap();
        assert_eq!((after.balance.get(), after.version), (20_000, 1));
        assert_eq!(db.ledger_count(payer).await, 1);
        assert_eq!(db.record_count(payer).await, 1);
    })
    .await;
}

#[tokio::test]
async fn concurrent_steps_on_one_version_let_exactly_one_win() {
    with_db(|db| async move {
        let user = db.store.create_user(at(0)).await.unwrap().id;
        let other = db.other_instance();
        let (a, b) = tokio::join!(
            db.store.apply(
                Change {
                    key: "a",
                    ..Change::charge(user, 0, 100, 100)
                }
                .build()
            ),
            other.apply(
                Change {
                    key: "b",
                    ..Change::charge(user, 0, 200, 200)
                }
                .build()
            ),
        );
        let wins = [a.is_ok(), b.is_ok()].iter().filter(|ok| **ok).count();
        assert_eq!(wins, 1, "{a:?} {b:?}");
        let loser = a.err().or(b.err()).unwrap();
        assert!(matches!(loser, StepError::VersionConflict), "{loser:?}");
        assert_eq!(db.ledger_count(user).await, 1);
        assert_eq!(db.record_count(user).await, 1);
        other.pool().close().await;
    })
    .await;
}

#[tokio::test]
async fn a_refusal_is_stored_only_on_the_version_it_was_decided_on() {
    with_db(|db| async move {
        let user = new_user_with(&db, 1_000).await;
        let refusal = |version, raw: &str| RefusalRecord {
            user_id: user,
            expected_version: version,
            key: record(
                raw,
                use_balance::fingerprint(user, Amount::from_stored(5_000)),
                at(1),
                60,
            ),
            response: StoredResponse {
                status: 422,
                body: br#"{"code":"INSUFFICIENT_BALANCE"}"#.to_vec(),
            },
        };

        let err = db
            .store
            .record_refusal(refusal(0, "r-1"))
            .await
            .unwrap_err();
        assert!(matches!(err, StepError::VersionConflict), "{err:?}");
        assert!(
            db.store
                .find(user, &key("r-1"), at(2))
                .await
                .unwrap()
                .is_none()
        );

        db.store.record_refusal(refusal(1, "r-1")).await.unwrap();
        let found = db
            .store
            .find(user, &key("r-1"), at(2))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(found.response.status, 422);
        assert_eq!(found.expires_at, at(61));
        let after = db.store.get_user(user).await.unwrap().unwrap();
        assert_eq!((after.balance.get(), after.version), (1_000, 1));

        let err = db
            .store
            .record_refusal(refusal(1, "r-1"))
            .await
            .unwrap_err();
        assert!(matches!(err, StepError::KeyTaken), "{err:?}");

        let ghost = RefusalRecord {
            user_id: UserId::new(777).unwrap(),
            ..refusal(0, "r-2")
        };
        let err = db.store.record_refusal(ghost).await.unwrap_err();
        assert!(matches!(err, StepError::UserNotFound), "{err:?}");
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// Idempotency records
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn find_ignores_expired_records_other_users_and_other_cases() {
    with_db(|db| async move {
        let alice = new_user_with(&db, 1_000).await;
        let bob = new_user_with(&db, 1_000).await;
        let opening = db
            .store
            .find(alice, &key("opening"), at(1))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(opening.user_id, alice);

        // Bob's record under the same key is his own, never Alice's.
        let bobs = db
            .store
            .find(bob, &key("opening"), at(1))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(bobs.user_id, bob);
        assert_ne!(bobs.fingerprint, opening.fingerprint);
        assert!(
            db.store
                .find(UserId::new(999).unwrap(), &key("opening"), at(1))
                .await
                .unwrap()
                .is_none()
        );

        // Keys are case-sensitive.
        assert!(
            db.store
                .find(alice, &key("OPENING"), at(1))
                .await
                .unwrap()
                .is_none()
        );

        // Live up to, not at, its expiry.
        let expiry = opening.expires_at;
        assert!(
            db.store
                .find(alice, &key("opening"), expiry - Duration::milliseconds(1))
                .await
                .unwrap()
                .is_some()
        );
        assert!(
            db.store
                .find(alice, &key("opening"), expiry)
                .await
                .unwrap()
                .is_none()
        );
    })
    .await;
}

#[tokio::test]
async fn purge_deletes_expired_records_in_bounded_batches() {
    with_db(|db| async move {
        let user = db.store.create_user(at(0)).await.unwrap().id;
        // Refusals store records without touching the balance: four with growing ttls.
        for (i, ttl) in [10, 20, 30, 1_000].into_iter().enumerate() {
            db.store
                .record_refusal(RefusalRecord {
                    user_id: user,
                    expected_version: 0,
                    key: record(
                        &format!("k-{i}"),
                        charge::fingerprint(user, Amount::from_stored(1)),
                        at(0),
                        ttl,
                    ),
                    response: StoredResponse {
                        status: 422,
                        body: b"{}".to_vec(),
                    },
                })
                .await
                .unwrap();
        }

        assert_eq!(db.store.purge_expired(at(30), 0).await.unwrap(), 0);
        // The one expiring exactly at `now` counts as expired.
        assert_eq!(db.store.purge_expired(at(30), 2).await.unwrap(), 2);
        assert!(
            db.store
                .find(user, &key("k-2"), at(29))
                .await
                .unwrap()
                .is_some(),
            "the oldest go first"
        );
        assert_eq!(db.store.purge_expired(at(30), 2).await.unwrap(), 1);
        assert_eq!(db.store.purge_expired(at(30), 2).await.unwrap(), 0);
        assert_eq!(db.record_count(user).await, 1);
        assert!(
            db.store
                .find(user, &key("k-3"), at(30))
                .await
                .unwrap()
                .is_some()
        );

        // Two instances purging at once delete each record once.
        let other = db.other_instance();
        let (a, b) = tokio::join!(
            db.store.purge_expired(at(5_000), 10),
            other.purge_expired(at(5_000), 10)
        );
        assert_eq!(a.unwrap() + b.unwrap(), 1);
        assert_eq!(db.record_count(user).await, 0);
        other.pool().close().await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// History
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn history_pages_newest_first_by_id() {
    with_db(|db| async move {
        let user = db.store.create_user(at(0)).await.unwrap().id;
        let other = new_user_with(&db, 50).await;
        let keys = ["h-1", "h-2", "h-3", "h-4", "h-5", "h-6", "h-7"];
        let mut ids = Vec::new();
        for (i, k) in keys.into_iter().enumerate() {
            let n = i as i64 + 1;
            let applied = db
                .store
                .apply(
                    Change {
                        key: k,
                        now: at(n),
                        ..Change::charge(user, i as u64, n * 10, 10)
                    }
                    .build(),
                )
                .await
                .unwrap();
            ids.push(applied.assigned.entry_id);
        }
        ids.reverse();

        let page = db.store.history(user, None, 3).await.unwrap();
        assert_eq!(
            page.items.iter().map(|e| e.id).collect::<Vec<_>>(),
            ids[0..3]
        );
        assert_eq!(page.next, Some(ids[2]));
        assert_eq!(page.items[0].balance_after.get(), 70);

        let page = db.store.history(user, page.next, 3).await.unwrap();
        assert_eq!(
            page.items.iter().map(|e| e.id).collect::<Vec<_>>(),
            ids[3..6]
        );
        assert_eq!(page.next, Some(ids[5]));

        let page = db.store.history(user, page.next, 3).await.unwrap();
        assert_eq!(
            page.items.iter().map(|e| e.id).collect::<Vec<_>>(),
            ids[6..]
        );
        assert_eq!(page.next, None);

        // A last page that is exactly full has no next.
        let page = db.store.history(user, None, 7).await.unwrap();
        assert_eq!(page.items.len(), 7);
        assert_eq!(page.next, None);
        assert!(page.items.iter().all(|e| e.user_id == user));

        // `before` past the oldest entry, and another user's ledger.
        let page = db.store.history(user, Some(ids[6]), 3).await.unwrap();
        assert!(page.items.is_empty() && page.next.is_none());
        let theirs = db
            .store
            .history(other, Some(EntryId::new(i64::MAX).unwrap()), 50)
            .await
            .unwrap();
        assert_eq!(theirs.items.len(), 1);
        assert_eq!(theirs.items[0].user_id, other);
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// Seeding
// ---------------------------------------------------------------------------------------

async fn assert_ledgers_sum_to_balances(db: &Db) {
    let mismatched: Vec<(i64,)> = sqlx::query_as(
        "select u.id from users u \
         left join (select user_id, \
                    sum(case kind when 'CHARGE' then amount else -amount end) as total \
                    from ledger_entries group by user_id) l on l.user_id = u.id \
         where coalesce(l.total, 0) <> u.balance",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert!(mismatched.is_empty(), "{mismatched:?}");
}

#[tokio::test]
async fn seeding_is_idempotent_and_safe_to_run_concurrently() {
    with_db(|db| async move {
        let balance = Balance::from_stored(100_000);
        assert_eq!(db.store.seed_users(10, balance, at(0)).await.unwrap(), 10);
        assert_eq!(db.store.seed_users(10, balance, at(1)).await.unwrap(), 0);

        // A user that changed since is left as it is.
        db.store
            .apply(
                Change {
                    kind: EntryKind::Use,
                    ..Change::charge(UserId::new(3).unwrap(), 0, 90_000, 10_000)
                }
                .build(),
            )
            .await
            .unwrap();

        // Two seeders at once, over more than one batch: every user is created once.
        let other = db.other_instance();
        let (a, b) = tokio::join!(
            db.store.seed_users(1_200, balance, at(2)),
            other.seed_users(1_200, balance, at(2))
        );
        assert_eq!(a.unwrap() + b.unwrap(), 1_190);
        other.pool().close().await;

        let (users, total): (i64, i64) =
            sqlx::query_as("select count(*), cast(sum(balance) as signed) from users")
                .fetch_one(&db.pool)
                .await
                .unwrap();
        assert_eq!(users, 1_200);
        assert_eq!(total, 1_200 * 100_000 - 10_000);
        let (seeded_entries,): (i64,) = sqlx::query_as(
            "select count(*) from ledger_entries where idempotency_key is null and kind = 'CHARGE'",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        assert_eq!(seeded_entries, 1_200);
        assert_ledgers_sum_to_balances(&db).await;

        let user3 = db
            .store
            .get_user(UserId::new(3).unwrap())
            .await
            .unwrap()
            .unwrap();
        assert_eq!((user3.balance.get(), user3.version), (90_000, 1));
        let opening = &db
            .store
            .history(UserId::new(1).unwrap(), None, 5)
            .await
            .unwrap()
            .items;
        assert_eq!(opening.len(), 1);
        assert_eq!(opening[0].idempotency_key, None);
        assert_eq!(opening[0].created_at, at(0));

        // Created users carry on after the seeded ids.
        let next = db.store.create_user(at(3)).await.unwrap();
        assert_eq!(next.id.get(), 1_201);
    })
    .await;
}

#[tokio::test]
async fn seeding_with_a_zero_balance_writes_no_ledger() {
    with_db(|db| async move {
        assert_eq!(
            db.store.seed_users(3, Balance::ZERO, at(0)).await.unwrap(),
            3
        );
        let (entries,): (i64,) = sqlx::query_as("select count(*) from ledger_entries")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert_eq!(entries, 0);
        assert_ledgers_sum_to_balances(&db).await;
        assert_eq!(
            db.store.seed_users(0, Balance::ZERO, at(0)).await.unwrap(),
            0
        );
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// Connection and errors
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn ping_and_unreachable_databases() {
    with_db(|db| async move {
        db.store.ping().await.unwrap();

        assert!(mysql_repo::connect("not a url", 1).await.is_err());

        // Nothing listens on port 1: the lazy pool builds, and the first use reports
        // the store as unavailable rather than as a bug.
        let nowhere = mysql_repo::connect("mysql://root@127.0.0.1:1/none", 1)
            .await
            .unwrap();
        let store = MySqlStore::new(nowhere);
        let err = store.ping().await.unwrap_err();
        assert!(matches!(err, RepoError::Unavailable(_)), "{err:?}");

        // A closed pool is unavailable for every port, including the atomic step.
        let closed = MySqlStore::new(mysql_repo::connect_with(db.options.clone(), 1));
        closed.pool().close().await;
        let err = closed.get_user(UserId::new(1).unwrap()).await.unwrap_err();
        assert!(matches!(err, RepoError::Unavailable(_)), "{err:?}");
        let err = closed
            .apply(Change::charge(UserId::new(1).unwrap(), 0, 1, 1).build())
            .await
            .unwrap_err();
        assert!(matches!(err, StepError::Unavailable(_)), "{err:?}");
    })
    .await;
}

#[tokio::test]
async fn concurrent_steps_of_different_users_do_not_conflict() {
    with_db(|db| async move {
        // Fresh users have no records, so all their new keys fall into one gap of the
        // records' primary key: the step must not lock that gap, or these would deadlock.
        let mut users = Vec::new();
        for _ in 0..16 {
            users.push(db.store.create_user(at(0)).await.unwrap().id);
        }
        for round in 0..3_u64 {
            let steps = users.iter().map(|user| {
                let store = db.store.clone();
                let change = Change {
                    key: ["r-0", "r-1", "r-2"][round as usize],
                    now: at(round as i64),
                    ..Change::charge(*user, round, (round as i64 + 1) * 10, 10)
                }
                .build();
                tokio::spawn(async move { store.apply(change).await })
            });
            for step in steps.collect::<Vec<_>>() {
                let result = step.await.unwrap();
                assert!(result.is_ok(), "{result:?}");
            }
        }
        assert_ledgers_sum_to_balances(&db).await;
    })
    .await;
}
