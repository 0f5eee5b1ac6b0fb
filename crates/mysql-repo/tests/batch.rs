//! The group-commit statements on MySQL/MariaDB: `begin_batch` (a batch's read, in its
//! transaction), its commit and `find_many` against a real server. Each test makes its own database with
//! `testkit::TestDatabase` and skips (saying so) without a server.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use chrono::{DateTime, Duration, Utc};
use domain::idempotency::{Fingerprint, RecordOutcome, StoredResponse};
use domain::model::EntryKind;
use domain::operations::{Movement, OperationKind};
use domain::ports::{
    BalanceStore, BatchRead, BatchStep, BatchWrite, Clock, IdempotencyRepo, KeyRecord, StepError,
    SystemClock, UserBatch, UserRepo,
};
use domain::types::{Amount, Balance, IdempotencyKey, Limits, UserId};
use mysql_repo::MySqlStore;
use testkit::TestDatabase;

/// Keys a client may send that mean something to SQL or to `LIKE`.
const AWKWARD: [&str; 5] = ["it's", "back\\slash", "dq\"x", "%_", "_utf8mb4'x'--"];

fn limits() -> Limits {
    Limits::default()
}

fn id(raw: i64) -> UserId {
    UserId::new(raw).unwrap()
}

fn write(key: &str, at: DateTime<Utc>, ledger: Option<(EntryKind, i64, i64)>) -> BatchWrite {
    BatchWrite {
        key: KeyRecord {
            key: IdempotencyKey::parse(key).unwrap(),
            fingerprint: Fingerprint::from_stored(format!("fp:{key}:é")),
            operation: OperationKind::Charge,
            created_at: at,
            expires_at: at + Duration::hours(1),
        },
        ledger: ledger.map(|(kind, amount, after)| {
            (
                kind,
                Movement {
                    amount: Amount::new(amount, &limits()).unwrap(),
                    balance_after: Balance::new(after, &limits()).unwrap(),
                },
            )
        }),
        response: StoredResponse {
            status: if ledger.is_some() { 200 } else { 422 },
            body: format!("{{\"key\":\"{key}\",\"bytes\":\"\\u0000'\"}}").into_bytes(),
        },
    }
}

async fn seeded(db: &TestDatabase, users: u32) -> MySqlStore {
    let store = db.store();
    store
        .seed_users(
            users,
            Balance::new(1_000, &limits()).unwrap(),
            SystemClock.now(),
        )
        .await
        .unwrap();
    store
}

/// A batch's whole transaction: begun on its users and keys, committed.
async fn apply_batch(store: &MySqlStore, batch: &BatchStep) -> Result<(), StepError> {
    let users: Vec<UserId> = batch.users.iter().map(|u| u.user_id).collect();
    let keys: Vec<(UserId, IdempotencyKey)> = batch
        .users
        .iter()
        .flat_map(|u| u.writes.iter().map(move |w| (u.user_id, w.key.key.clone())))
        .collect();
    let tx = store.begin_batch(&users, &keys, batch.at).await?;
    tx.commit(batch).await
}

/// The users a batch read, as (id, balance, version) in id order.
fn users_read(read: &BatchRead) -> Vec<(i64, i64, u64)> {
    let mut users: Vec<_> = read
        .users
        .iter()
        .map(|u| (u.id.get(), u.balance.get(), u.version))
        .collect();
    users.sort_unstable();
    users
}

async fn ledger_count(db: &TestDatabase) -> i64 {
    let (n,): (i64,) = sqlx::query_as("select count(*) from ledger_entries")
        .fetch_one(db.pool())
        .await
        .unwrap();
    n
}

#[tokio::test]
async fn a_batch_writes_every_user_entry_and_record_and_awkward_keys_read_back() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let store = seeded(&db, 2).await;
    let at = SystemClock.now();
    let batch = BatchStep {
        at,
        users: vec![
            UserBatch {
                user_id: id(1),
                expected_version: 0,
                balance_after: Balance::new(1_000 + 10 + 20, &limits()).unwrap(),
                writes: vec![
                    write(AWKWARD[0], at, Some((EntryKind::Charge, 10, 1_010))),
                    write(AWKWARD[1], at, None),
                    write(AWKWARD[2], at, Some((EntryKind::Charge, 20, 1_030))),
                ],
            },
            UserBatch {
                user_id: id(2),
                expected_version: 0,
                balance_after: Balance::new(1_000 - 5, &limits()).unwrap(),
                writes: vec![
                    write(AWKWARD[3], at, Some((EntryKind::Use, 5, 995))),
                    write(AWKWARD[4], at, None),
                ],
            },
        ],
    };
    apply_batch(&store, &batch).await.unwrap();

    let read = store
        .begin_batch(&[id(1), id(2), id(3)], &[], at)
        .await
        .unwrap();
    assert_eq!(
        users_read(read.read()),
        [(1, 1_030, 1), (2, 995, 1)],
        "one bump each; no user 3"
    );
    read.commit(&BatchStep { at, users: vec![] }).await.unwrap();
    assert_eq!(
        ledger_count(&db).await,
        2 + 3,
        "the seeds' entries and three more"
    );

    let keys: Vec<_> = batch
        .users
        .iter()
        .flat_map(|u| u.writes.iter().map(move |w| (u.user_id, w.key.key.clone())))
        .chain([(id(1), IdempotencyKey::parse(AWKWARD[3]).unwrap())])
        .collect();
    let records = store.find_many(&keys, at).await.unwrap();
    assert_eq!(records.len(), 5, "user 1 does not see user 2's key");
    for user in &batch.users {
        for w in &user.writes {
            let found = store
                .find(user.user_id, &w.key.key, at)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(found.response, w.response, "key {:?}", w.key.key);
            assert_eq!(found.fingerprint, w.key.fingerprint);
            assert_eq!(found.outcome, w.outcome());
            assert!(records.contains(&found));
        }
    }
    let refused = records
        .iter()
        .filter(|r| r.outcome == RecordOutcome::Refused)
        .count();
    assert_eq!(refused, 2);
    assert!(
        store
            .find_many(&keys, at + Duration::hours(2))
            .await
            .unwrap()
            .is_empty(),
        "expired records are not found"
    );
}

#[tokio::test]
async fn a_batch_with_a_taken_key_or_a_moved_version_writes_nothing() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let store = seeded(&db, 2).await;
    let at = SystemClock.now();
    let taken = BatchStep {
        at,
        users: vec![UserBatch {
            user_id: id(2),
            expected_version: 0,
            balance_after: Balance::new(1_001, &limits()).unwrap(),
            writes: vec![write("taken", at, Some((EntryKind::Charge, 1, 1_001)))],
        }],
    };
    apply_batch(&store, &taken).await.unwrap();
    let before = ledger_count(&db).await;

    let one = |user: i64, version: u64, key: &str| UserBatch {
        user_id: id(user),
        expected_version: version,
        balance_after: Balance::new(1_050, &limits()).unwrap(),
        writes: vec![write(key, at, Some((EntryKind::Charge, 50, 1_050)))],
    };
    // User 1 would apply; user 2's key is taken: all or nothing.
    let batch = BatchStep {
        at,
        users: vec![one(1, 0, "fresh"), one(2, 1, "taken")],
    };
    assert!(matches!(
        apply_batch(&store, &batch).await,
        Err(StepError::KeyTaken)
    ));
    // User 2's version moved on since "the read" (it is 1): a conflict, nothing written.
    let batch = BatchStep {
        at,
        users: vec![one(1, 0, "fresh"), one(2, 0, "other")],
    };
    let moved = apply_batch(&store, &batch).await;
    assert!(
        matches!(moved, Err(StepError::VersionConflict)),
        "{moved:?}"
    );

    assert_eq!(ledger_count(&db).await, before);
    let user = store.get_user(id(1)).await.unwrap().unwrap();
    assert_eq!((user.balance.get(), user.version), (1_000, 0));
    let fresh = IdempotencyKey::parse("fresh").unwrap();
    assert!(store.find(id(1), &fresh, at).await.unwrap().is_none());
    // Nothing of the failed batches holds a row: the same batch, right, goes through.
    let batch = BatchStep {
        at,
        users: vec![one(1, 0, "fresh"), one(2, 1, "other")],
    };
    apply_batch(&store, &batch).await.unwrap();
    assert_eq!(ledger_count(&db).await, before + 2);
}

fn charge_of(user: i64, key: &str, at: DateTime<Utc>) -> UserBatch {
    UserBatch {
        user_id: id(user),
        expected_version: 0,
        balance_after: Balance::new(1_010, &limits()).unwrap(),
        writes: vec![write(key, at, Some((EntryKind::Charge, 10, 1_010)))],
    }
}

/// A batch locks its own users rows and no other, whatever plan the optimizer would
/// like: here most of a small table, with the one row outside the batch locked
/// elsewhere (a scan of the whole index would wait for it, `innodb_lock_wait_timeout`).
#[tokio::test]
async fn a_batch_locks_only_its_own_rows() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let store = seeded(&db, 10).await;
    let mut holder = db.hold_user_row(1).await;
    let at = SystemClock.now();
    let batch = BatchStep {
        at,
        users: (2..=10)
            .map(|user| charge_of(user, &format!("k{user}"), at))
            .collect(),
    };
    tokio::time::timeout(
        std::time::Duration::from_secs(20),
        apply_batch(&store, &batch),
    )
    .await
    .expect("the batch waited for a row outside it")
    .unwrap();
    assert_eq!(ledger_count(&db).await, 10 + 9);
    sqlx::raw_sql("rollback")
        .execute(&mut holder)
        .await
        .unwrap();
}

/// A batch whose own users row is locked elsewhere fails at once as a conflict (it never
/// waits for a row lock), writes nothing, and holds none of its other rows after.
#[tokio::test]
async fn a_batch_meeting_its_own_row_locked_fails_at_once_and_holds_nothing() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let store = seeded(&db, 3).await;
    let mut holder = db.hold_user_row(2).await;
    let at = SystemClock.now();
    let batch = BatchStep {
        at,
        users: (1..=3)
            .map(|user| charge_of(user, &format!("k{user}"), at))
            .collect(),
    };
    let failed = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        apply_batch(&store, &batch),
    )
    .await
    .expect("the batch waited for its locked row");
    assert!(
        matches!(failed, Err(StepError::VersionConflict)),
        "{failed:?}"
    );
    assert_eq!(ledger_count(&db).await, 3);
    // Rows 1 and 3 are free again: a batch of them alone goes through.
    let others = BatchStep {
        at,
        users: vec![charge_of(1, "k1", at), charge_of(3, "k3", at)],
    };
    tokio::time::timeout(
        std::time::Duration::from_secs(20),
        apply_batch(&store, &others),
    )
    .await
    .expect("a failed batch kept a row locked")
    .unwrap();
    sqlx::raw_sql("rollback")
        .execute(&mut holder)
        .await
        .unwrap();
    assert_eq!(ledger_count(&db).await, 3 + 2);
}

/// Whether another transaction can lock user `id`'s row at once (`NOWAIT`).
async fn row_free(db: &TestDatabase, id: i64) -> bool {
    let mut other = db.pool().begin().await.unwrap();
    let locked = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "select id from users where id = {id} for update nowait"
    )))
    .execute(&mut *other)
    .await;
    other.rollback().await.unwrap();
    locked.is_ok()
}

/// A batch reads in its own transaction: the users that exist and its keys' live records,
/// with the users rows locked from that read until the transaction ends.
#[tokio::test]
async fn a_batch_reads_its_users_and_records_with_the_rows_locked_until_it_ends() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let store = seeded(&db, 3).await;
    let at = SystemClock.now();
    let first = BatchStep {
        at,
        users: vec![charge_of(1, AWKWARD[0], at)],
    };
    apply_batch(&store, &first).await.unwrap();

    let seen = IdempotencyKey::parse(AWKWARD[0]).unwrap();
    let unseen = IdempotencyKey::parse("unseen").unwrap();
    let tx = store
        .begin_batch(
            &[id(1), id(2), id(4)],
            &[
                (id(1), seen.clone()),
                (id(1), unseen),
                (id(2), seen.clone()),
            ],
            at,
        )
        .await
        .unwrap();
    assert_eq!(
        users_read(tx.read()),
        [(1, 1_010, 1), (2, 1_000, 0)],
        "no user 4"
    );
    let records: Vec<_> = tx
        .read()
        .records
        .iter()
        .map(|r| (r.user_id.get(), r.key.as_str().to_owned()))
        .collect();
    assert_eq!(
        records,
        [(1, AWKWARD[0].to_owned())],
        "user 2 has no such key"
    );
    assert!(!row_free(&db, 1).await, "the batch's row 1 is locked");
    assert!(!row_free(&db, 2).await, "the batch's row 2 is locked");
    assert!(row_free(&db, 3).await, "row 3 is not the batch's");

    tx.commit(&BatchStep { at, users: vec![] }).await.unwrap();
    assert!(
        row_free(&db, 1).await && row_free(&db, 2).await,
        "ended, it holds no row"
    );
    assert_eq!(
        ledger_count(&db).await,
        3 + 1,
        "an empty batch writes nothing"
    );
}
