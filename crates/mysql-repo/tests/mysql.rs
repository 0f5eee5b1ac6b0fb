//! The MySQL adapter against a real server. Each test creates its own database
//! (`t_<uuid>`), migrates it, runs and drops it, so the tests run in parallel. The server
//! comes from testkit: `TEST_DATABASE_URL`, else testcontainers, else the test is skipped,
//! saying so (and fails under `CI=true`).
//!
//! What every store must do is asserted once by the port contract suites,
//! `testkit::contract`, run on this store as `mysql::*` in `crates/testkit/tests/contracts.rs`
//! (the atomic step and its refusals, expiry, history, seeding, purging, payments). These
//! keep what only a database shows: migrations, engines and collations, constraints,
//! unique keys and rows, gap locks, batched and concurrent seeding, millisecond storage and
//! unreachable servers.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::future::Future;
use std::str::FromStr;

use chrono::{DateTime, Duration, TimeZone, Utc};
use domain::idempotency::{Fingerprint, StoredResponse, legacy_operation};
use domain::model::{EntryKind, OrderStatus};
use domain::operations::{OperationKind, charge, pay, use_balance};
use domain::ports::{
    Assigned, BalanceChange, BalanceStore, KeyRecord, OrderRepo, RepoError, StepError, UserRepo,
};
use domain::types::{Amount, Balance, IdempotencyKey, OrderId, UserId};
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
        "entry={:?} payment={:?}",
        assigned.entry_id.map(|e| e.get()),
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
            (EntryKind::Payment, Some(order)) => pay::fingerprint(self.user, order, None),
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
            vec![1, 2, 3, 4, 5, 6, 7, 8, 9]
        );

        // A second run (another instance starting) changes nothing.
        mysql_repo::migrate(&db.pool).await.unwrap();

        let mut engines: Vec<(String, String)> = sqlx::query_as(
            "select table_name, engine from information_schema.tables \
             where table_schema = database() and table_name <> '_sqlx_migrations' \
             order by table_name",
        )
        .fetch_all(&db.pool)
        .await
        .unwrap();
        // Sorted here: how the server orders names with `_` depends on its collation.
        engines.sort();
        assert_eq!(
            engines,
            [
                "coupons",
                "idempotency_records",
                "ledger_entries",
                "orders",
                "payments",
                "refunds",
                "user_coupons",
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

/// Instants are stored to the millisecond: the sub-millisecond digits of a creation instant
/// are dropped on the way in, so the user read back is the user answered.
#[tokio::test]
async fn create_and_get_user_round_trip_to_the_millisecond() {
    with_db(|db| async move {
        // Sub-millisecond digits are dropped, as MySQL and MariaDB would disagree on them.
        let now = at(0) + Duration::microseconds(456);
        let first = db.store.create_user(now).await.unwrap();
        assert_eq!(first.created_at, at(0));
        let read = db.store.get_user(first.id).await.unwrap().unwrap();
        assert_eq!(read, first);
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// The atomic step
// ---------------------------------------------------------------------------------------

/// A record replacing an expired one takes its row (the key's primary key), rather than
/// adding one beside it: one row for the key afterwards, holding the new record.
#[tokio::test]
async fn an_expired_record_is_replaced_in_its_row() {
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
        assert_eq!(db.record_count(user).await, 1);
        let (created, response): (chrono::NaiveDateTime, Vec<u8>) = sqlx::query_as(
            "select created_at, response_body from idempotency_records where user_id = ?",
        )
        .bind(user.get())
        .fetch_one(&db.pool)
        .await
        .unwrap();
        assert_eq!(
            (created, response),
            (at(5).naive_utc(), applied.response.body)
        );
    })
    .await;
}

/// A PENDING order that somehow already has a payment row: the unique `payments.order_id`
/// refuses the second payment as `OrderNotPending`, and the order's PAID flip, the balance,
/// the entry and the record are rolled back with it.
#[tokio::test]
async fn a_payment_of_an_order_with_a_payment_row_is_refused_by_the_unique_key() {
    with_db(|db| async move {
        let payer = new_user_with(&db, 20_000).await;
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
        let pay = Change {
            kind: EntryKind::Payment,
            key: "p-2",
            order: Some(own.id),
            ..Change::charge(payer, 1, 19_000, 1_000)
        }
        .build();
        let err = db.store.apply(pay).await.unwrap_err();
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

// ---------------------------------------------------------------------------------------
// Idempotency records
// ---------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------
// History
// ---------------------------------------------------------------------------------------

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
