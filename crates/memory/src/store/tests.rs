//! The store's own tests: the atomic step writes everything or nothing, keys expire and are
//! replaced, history pages, seeding and purging.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use chrono::{DateTime, Duration, Utc};
use domain::idempotency::{Fingerprint, StoredResponse};
use domain::model::{EntryKind, OrderStatus};
use domain::operations::{Effect, Movement, OperationKind};
use domain::ports::{
    BalanceChange, BalanceStore, IdempotencyRepo, KeyRecord, OrderRepo, RefusalRecord, StepError,
    UserRepo,
};
use domain::types::{Amount, Balance, EntryId, IdempotencyKey, OrderId, PaymentId, UserId};
use proptest::prelude::*;

use super::MemoryStore;

fn t0() -> DateTime<Utc> {
    DateTime::from_timestamp(1_800_000_000, 0).unwrap()
}

fn secs(n: i64) -> Duration {
    Duration::seconds(n)
}

fn user(id: i64) -> UserId {
    UserId::new(id).unwrap()
}

/// The effect of a hand-built step: `kind` of `amount`, leaving `new_balance`, paying `order`.
fn effect(kind: EntryKind, amount: Amount, new_balance: Balance, order: Option<OrderId>) -> Effect {
    let movement = Movement {
        amount,
        balance_after: new_balance,
    };
    match (kind, order) {
        (EntryKind::Charge, None) => Effect::Charge(movement),
        (EntryKind::Use, None) => Effect::Use(movement),
        (EntryKind::Payment, Some(order)) => Effect::Pay { order, movement },
        other => panic!("no effect is {other:?}"),
    }
}

fn key(raw: &str) -> IdempotencyKey {
    IdempotencyKey::parse(raw).unwrap()
}

fn amount(value: i64) -> Amount {
    Amount::from_stored(value)
}

fn balance(value: i64) -> Balance {
    Balance::from_stored(value)
}

/// A key record created at `at` that lives for `ttl`.
fn key_record(raw: &str, at: DateTime<Utc>, ttl: Duration) -> KeyRecord {
    KeyRecord {
        key: key(raw),
        fingerprint: Fingerprint::from_stored(format!("test:{raw}")),
        operation: OperationKind::Charge,
        created_at: at,
        expires_at: at + ttl,
    }
}

/// A response that names the assigned ids, so a test can see what `respond` was given.
fn naming_ids(assigned: &domain::ports::Assigned) -> StoredResponse {
    StoredResponse {
        status: 200,
        body: format!(
            "entry={} payment={:?}",
            assigned.entry_id,
            assigned.payment_id.map(PaymentId::get)
        )
        .into_bytes(),
    }
}

struct Change {
    user: i64,
    version: u64,
    kind: EntryKind,
    amount: i64,
    new_balance: i64,
    at: DateTime<Utc>,
    key: &'static str,
    ttl: Duration,
    pays_order: Option<i64>,
}

impl Change {
    fn charge(user: i64, version: u64, amount: i64, new_balance: i64, key: &'static str) -> Self {
        Self {
            user,
            version,
            kind: EntryKind::Charge,
            amount,
            new_balance,
            at: t0(),
            key,
            ttl: secs(60),
            pays_order: None,
        }
    }

    fn payment(user: i64, version: u64, order: i64, amount: i64, new_balance: i64) -> Self {
        Self {
            kind: EntryKind::Payment,
            pays_order: Some(order),
            ..Self::charge(user, version, amount, new_balance, "pay")
        }
    }

    fn key(self, key: &'static str) -> Self {
        Self { key, ..self }
    }

    fn at(self, at: DateTime<Utc>) -> Self {
        Self { at, ..self }
    }

    fn build(self) -> BalanceChange {
        self.build_with(Box::new(naming_ids))
    }

    fn build_with(self, respond: domain::ports::Responder) -> BalanceChange {
        BalanceChange {
            user_id: user(self.user),
            expected_version: self.version,
            effect: effect(
                self.kind,
                amount(self.amount),
                balance(self.new_balance),
                self.pays_order.map(|id| OrderId::new(id).unwrap()),
            ),
            at: self.at,
            key: key_record(self.key, self.at, self.ttl),
            respond,
        }
    }
}

fn refusal(user_id: i64, version: u64, raw: &'static str, at: DateTime<Utc>) -> RefusalRecord {
    RefusalRecord {
        user_id: user(user_id),
        expected_version: version,
        key: key_record(raw, at, secs(60)),
        response: StoredResponse {
            status: 422,
            body: b"refused".to_vec(),
        },
    }
}

/// A store with users 1..=`users`, each seeded with `each` (one opening entry apiece).
async fn seeded(users: u32, each: i64) -> MemoryStore {
    let store = MemoryStore::new();
    store.seed_users(users, balance(each), t0()).await.unwrap();
    store
}

/// Applies `change` and insists that it fails with `expected`, writes nothing and never
/// asks for a response.
async fn assert_refused_without_a_trace(store: &MemoryStore, change: Change, expected: &str) {
    let before = store.snapshot();
    let asked = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&asked);
    let result = store
        .apply(change.build_with(Box::new(move |assigned| {
            flag.store(true, Ordering::SeqCst);
            naming_ids(assigned)
        })))
        .await;
    match result {
        Err(e) => assert_eq!(format!("{e:?}"), expected),
        Ok(applied) => panic!("expected {expected}, got {applied:?}"),
    }
    assert_eq!(store.snapshot(), before, "a failed step must write nothing");
    assert!(
        !asked.load(Ordering::SeqCst),
        "no response is built for a failed step"
    );
}

// ----------------------------------------------------------------------------------------
// The atomic step
// ----------------------------------------------------------------------------------------

#[tokio::test]
async fn a_charge_writes_the_balance_the_version_the_entry_and_the_record_together() {
    let store = seeded(1, 100).await;

    let applied = store
        .apply(Change::charge(1, 0, 50, 150, "k1").build())
        .await
        .unwrap();

    assert_eq!(applied.assigned.entry_id, EntryId::new(2).unwrap());
    assert_eq!(applied.assigned.payment_id, None);
    assert_eq!(applied.response.body, b"entry=2 payment=None");
    let after = store.get_user(user(1)).await.unwrap().unwrap();
    assert_eq!((after.balance.get(), after.version), (150, 1));
    let page = store.history(user(1), None, 10).await.unwrap();
    let newest = &page.items[0];
    assert_eq!(newest.id, EntryId::new(2).unwrap());
    assert_eq!(newest.kind, EntryKind::Charge);
    assert_eq!((newest.amount.get(), newest.balance_after.get()), (50, 150));
    assert_eq!(newest.idempotency_key, Some(key("k1")));
    assert_eq!(newest.created_at, t0());
    let record = store
        .find(user(1), &key("k1"), t0())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(record.response, applied.response);
    assert_eq!(record.fingerprint.as_str(), "test:k1");
    assert_eq!(store.ledger_sum(user(1)), 150);
}

#[tokio::test]
async fn a_payment_marks_the_order_paid_and_writes_its_payment() {
    let store = seeded(1, 100).await;
    let order = store.create_order(user(1), amount(30), t0()).await.unwrap();

    let applied = store
        .apply(Change::payment(1, 0, order.id.get(), 30, 70).build())
        .await
        .unwrap();

    let payment_id = applied.assigned.payment_id.unwrap();
    assert_eq!(payment_id, PaymentId::new(1).unwrap());
    assert_eq!(applied.response.body, b"entry=2 payment=Some(1)");
    let paid = store.get_order(order.id).await.unwrap().unwrap();
    assert_eq!(paid.status, OrderStatus::Paid);
    let payment = store.get_payment(payment_id).await.unwrap().unwrap();
    assert_eq!(payment.order_id, order.id);
    assert_eq!(payment.user_id, user(1));
    assert_eq!(
        (payment.amount.get(), payment.balance_after.get()),
        (30, 70)
    );
    assert_eq!(payment.paid_at, t0());
    assert_eq!(store.ledger_sum(user(1)), 70);
}

#[tokio::test]
async fn a_stale_version_writes_nothing() {
    let store = seeded(1, 100).await;
    store
        .apply(Change::charge(1, 0, 10, 110, "first").build())
        .await
        .unwrap();

    assert_refused_without_a_trace(
        &store,
        Change::charge(1, 0, 10, 110, "second"),
        "VersionConflict",
    )
    .await;
}

#[tokio::test]
async fn a_live_key_is_taken_and_writes_nothing() {
    let store = seeded(1, 100).await;
    store
        .apply(Change::charge(1, 0, 10, 110, "k").build())
        .await
        .unwrap();

    // A second later the record is still live: the same key cannot be applied twice.
    assert_refused_without_a_trace(
        &store,
        Change::charge(1, 1, 10, 120, "k").at(t0() + secs(1)),
        "KeyTaken",
    )
    .await;
}

#[tokio::test]
async fn a_key_of_another_user_is_not_taken() {
    let store = seeded(2, 100).await;
    store
        .apply(Change::charge(1, 0, 10, 110, "shared").build())
        .await
        .unwrap();

    store
        .apply(Change::charge(2, 0, 10, 110, "shared").build())
        .await
        .unwrap();
    assert!(
        store
            .find(user(2), &key("shared"), t0())
            .await
            .unwrap()
            .is_some()
    );
    assert_eq!(store.record_count(), 2);
}

#[tokio::test]
async fn paying_an_order_twice_writes_nothing_the_second_time() {
    let store = seeded(1, 100).await;
    let order = store.create_order(user(1), amount(30), t0()).await.unwrap();
    store
        .apply(Change::payment(1, 0, order.id.get(), 30, 70).build())
        .await
        .unwrap();

    assert_refused_without_a_trace(
        &store,
        Change::payment(1, 1, order.id.get(), 30, 40).key("again"),
        "OrderNotPending",
    )
    .await;
}

#[tokio::test]
async fn paying_a_missing_order_or_another_users_order_writes_nothing() {
    let store = seeded(2, 100).await;
    let theirs = store.create_order(user(2), amount(30), t0()).await.unwrap();

    assert_refused_without_a_trace(
        &store,
        Change::payment(1, 0, theirs.id.get(), 30, 70),
        "OrderNotPending",
    )
    .await;
    assert_refused_without_a_trace(
        &store,
        Change::payment(1, 0, 999, 30, 70),
        "OrderNotPending",
    )
    .await;
    let untouched = store.get_order(theirs.id).await.unwrap().unwrap();
    assert_eq!(untouched.status, OrderStatus::Pending);
}

#[tokio::test]
async fn an_unknown_user_writes_nothing() {
    let store = seeded(1, 100).await;

    assert_refused_without_a_trace(&store, Change::charge(2, 0, 10, 10, "k"), "UserNotFound").await;
}

#[tokio::test]
async fn the_user_is_checked_before_the_version_and_the_version_before_the_key() {
    let store = seeded(1, 100).await;
    store
        .apply(Change::charge(1, 0, 10, 110, "k").build())
        .await
        .unwrap();

    // Stale version and a taken key at once: the version answers, as in the SQL adapter.
    assert_refused_without_a_trace(
        &store,
        Change::charge(1, 0, 10, 110, "k"),
        "VersionConflict",
    )
    .await;
    assert_refused_without_a_trace(&store, Change::charge(7, 0, 10, 110, "k"), "UserNotFound")
        .await;
}

#[tokio::test]
async fn an_expired_key_is_replaced() {
    let store = seeded(1, 100).await;
    store
        .apply(Change::charge(1, 0, 10, 110, "k").build())
        .await
        .unwrap();

    // A record is live while now < expires_at: at expires_at exactly it is gone.
    let expired_at = t0() + secs(60);
    assert!(
        store
            .find(user(1), &key("k"), expired_at - secs(1))
            .await
            .unwrap()
            .is_some()
    );
    assert!(
        store
            .find(user(1), &key("k"), expired_at)
            .await
            .unwrap()
            .is_none()
    );

    let applied = store
        .apply(Change::charge(1, 1, 20, 130, "k").at(expired_at).build())
        .await
        .unwrap();

    let record = store
        .find(user(1), &key("k"), expired_at)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(record.response, applied.response);
    assert_eq!(record.created_at, expired_at);
    assert_eq!(
        store.record_count(),
        1,
        "the old record is replaced, not kept"
    );
    // The replaced record's expiry is forgotten: nothing is purged at its old instant.
    assert_eq!(store.purge_expired(expired_at, 10).await.unwrap(), 0);
    assert_eq!(store.ledger_sum(user(1)), 130);
}

// ----------------------------------------------------------------------------------------
// Refusals
// ----------------------------------------------------------------------------------------

#[tokio::test]
async fn a_refusal_stores_only_its_record() {
    let store = seeded(1, 100).await;
    let before = store.get_user(user(1)).await.unwrap();

    store
        .record_refusal(refusal(1, 0, "no", t0()))
        .await
        .unwrap();

    assert_eq!(store.get_user(user(1)).await.unwrap(), before);
    assert_eq!(
        store.history(user(1), None, 10).await.unwrap().items.len(),
        1
    );
    let record = store
        .find(user(1), &key("no"), t0())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(record.response.status, 422);
    assert_eq!(record.response.body, b"refused");
}

#[tokio::test]
async fn a_refusal_checks_the_user_the_version_and_the_key_and_writes_nothing_on_failure() {
    let store = seeded(1, 100).await;
    store
        .apply(Change::charge(1, 0, 10, 110, "k").build())
        .await
        .unwrap();
    let before = store.snapshot();

    let stale = store.record_refusal(refusal(1, 0, "other", t0())).await;
    let taken = store.record_refusal(refusal(1, 1, "k", t0())).await;
    let nobody = store.record_refusal(refusal(9, 0, "other", t0())).await;

    assert!(
        matches!(stale, Err(StepError::VersionConflict)),
        "{stale:?}"
    );
    assert!(matches!(taken, Err(StepError::KeyTaken)), "{taken:?}");
    assert!(matches!(nobody, Err(StepError::UserNotFound)), "{nobody:?}");
    assert_eq!(store.snapshot(), before);

    // Once the charge's record has expired, a refusal may take its key.
    store
        .record_refusal(refusal(1, 1, "k", t0() + secs(60)))
        .await
        .unwrap();
    assert_eq!(store.record_count(), 1);
}

// ----------------------------------------------------------------------------------------
// Users, history and seeding
// ----------------------------------------------------------------------------------------

#[tokio::test]
async fn created_users_get_sequential_ids_after_the_highest_one() {
    let store = MemoryStore::new();
    let first = store.create_user(t0()).await.unwrap();
    let second = store.create_user(t0()).await.unwrap();
    assert_eq!((first.id.get(), second.id.get()), (1, 2));
    assert_eq!((first.balance.get(), first.version), (0, 0));

    // Seeding fills the gap 3..=5; a created user then comes after the seeded ones.
    assert_eq!(store.seed_users(5, balance(10), t0()).await.unwrap(), 3);
    assert_eq!(store.create_user(t0()).await.unwrap().id.get(), 6);
    assert_eq!(store.get_user(user(7)).await.unwrap(), None);
}

#[tokio::test]
async fn history_pages_newest_first_until_next_is_none() {
    let store = seeded(2, 100).await; // entries 1 (user 1) and 2 (user 2)
    for (i, raw) in ["a", "b", "c", "d", "e", "f"].into_iter().enumerate() {
        let mine = store.get_user(user(1)).await.unwrap().unwrap();
        let change = Change::charge(1, mine.version, 1, mine.balance.get() + 1, raw);
        store.apply(change.build()).await.unwrap();
        // Another user's entries interleave, so user 1's ids are not contiguous.
        if i % 2 == 0 {
            let other = store.get_user(user(2)).await.unwrap().unwrap();
            let change = Change::charge(2, other.version, 1, other.balance.get() + 1, raw);
            store.apply(change.build()).await.unwrap();
        }
    }
    let ids = |page: &domain::model::HistoryPage| {
        page.items.iter().map(|e| e.id.get()).collect::<Vec<_>>()
    };

    // User 1 owns entries 1, 3, 5, 6, 8, 9, 11: seven in all.
    let first = store.history(user(1), None, 3).await.unwrap();
    assert_eq!(ids(&first), [11, 9, 8]);
    assert_eq!(first.next, Some(EntryId::new(8).unwrap()));
    let second = store.history(user(1), first.next, 3).await.unwrap();
    assert_eq!(ids(&second), [6, 5, 3]);
    assert_eq!(second.next, Some(EntryId::new(3).unwrap()));
    let last = store.history(user(1), second.next, 3).await.unwrap();
    assert_eq!(ids(&last), [1]);
    assert_eq!(last.next, None);

    // A page that ends exactly at the oldest entry has no next page either.
    let exact = store
        .history(user(1), EntryId::new(6).ok(), 3)
        .await
        .unwrap();
    assert_eq!(ids(&exact), [5, 3, 1]);
    assert_eq!(exact.next, None);
    // `before` need not be an id of this user, nor of anyone.
    let above = store
        .history(user(1), EntryId::new(1000).ok(), 2)
        .await
        .unwrap();
    assert_eq!(ids(&above), [11, 9]);
    let below = store
        .history(user(1), EntryId::new(1).ok(), 2)
        .await
        .unwrap();
    assert!(below.items.is_empty() && below.next.is_none());
    let everything = store.history(user(1), None, 500).await.unwrap();
    assert_eq!(ids(&everything), [11, 9, 8, 6, 5, 3, 1]);
    assert_eq!(everything.next, None);
}

#[tokio::test]
async fn history_of_a_user_without_entries_is_empty() {
    let store = MemoryStore::new();
    let created = store.create_user(t0()).await.unwrap();

    for id in [created.id, user(42)] {
        let page = store.history(id, None, 50).await.unwrap();
        assert!(page.items.is_empty());
        assert_eq!(page.next, None);
    }
}

#[tokio::test]
async fn seeding_is_idempotent_and_each_ledger_sums_to_its_balance() {
    let store = MemoryStore::new();

    assert_eq!(store.seed_users(3, balance(1000), t0()).await.unwrap(), 3);
    assert_eq!(store.seed_users(3, balance(1000), t0()).await.unwrap(), 0);
    assert_eq!(store.seed_users(5, balance(1000), t0()).await.unwrap(), 2);

    for id in 1..=5 {
        let seeded = store.get_user(user(id)).await.unwrap().unwrap();
        assert_eq!((seeded.balance.get(), seeded.version), (1000, 0));
        assert_eq!(store.ledger_sum(user(id)), 1000);
        let page = store.history(user(id), None, 10).await.unwrap();
        assert_eq!(page.items.len(), 1, "one opening entry per user");
        let opening = &page.items[0];
        assert_eq!(opening.kind, EntryKind::Charge);
        assert_eq!(opening.idempotency_key, None);
        assert_eq!(opening.balance_after.get(), 1000);
        assert_eq!(opening.id.get(), id, "entry ids follow creation order");
    }
}

#[tokio::test]
async fn seeding_leaves_existing_users_alone() {
    let store = seeded(1, 100).await;
    store
        .apply(Change::charge(1, 0, 5, 105, "k").build())
        .await
        .unwrap();
    let before = store.get_user(user(1)).await.unwrap();

    assert_eq!(store.seed_users(2, balance(100), t0()).await.unwrap(), 1);
    assert_eq!(store.get_user(user(1)).await.unwrap(), before);
    assert_eq!(store.ledger_sum(user(1)), 105);
}

#[tokio::test]
async fn seeding_a_zero_balance_writes_no_entries() {
    let store = MemoryStore::new();

    assert_eq!(store.seed_users(2, Balance::ZERO, t0()).await.unwrap(), 2);

    let page = store.history(user(2), None, 10).await.unwrap();
    assert!(page.items.is_empty());
    assert_eq!(store.ledger_sum(user(2)), 0);
}

// ----------------------------------------------------------------------------------------
// Orders
// ----------------------------------------------------------------------------------------

#[tokio::test]
async fn orders_are_created_pending_with_sequential_ids() {
    let store = seeded(1, 100).await;
    let first = store.create_order(user(1), amount(5), t0()).await.unwrap();
    let second = store.create_order(user(1), amount(6), t0()).await.unwrap();

    assert_eq!((first.id.get(), second.id.get()), (1, 2));
    assert_eq!(first.status, OrderStatus::Pending);
    assert_eq!(store.get_order(second.id).await.unwrap(), Some(second));
    assert_eq!(
        store.get_order(OrderId::new(3).unwrap()).await.unwrap(),
        None
    );
    assert_eq!(
        store.get_payment(PaymentId::new(1).unwrap()).await.unwrap(),
        None
    );
}

// ----------------------------------------------------------------------------------------
// Purging
// ----------------------------------------------------------------------------------------

#[tokio::test]
async fn purge_deletes_at_most_limit_expired_records_oldest_first() {
    let store = seeded(1, 100).await;
    // Records expiring at t0+10s, +20s, +30s and +40s.
    for (i, raw) in ["a", "b", "c", "d"].into_iter().enumerate() {
        let created = t0() + secs(10 * i64::try_from(i).unwrap());
        let mut record = refusal(1, 0, raw, created);
        record.key.expires_at = created + secs(10);
        store.record_refusal(record).await.unwrap();
    }
    let at = t0() + secs(30); // a, b and c (at or before) have expired; d has not

    assert_eq!(store.purge_expired(at, 2).await.unwrap(), 2);
    assert_eq!(store.record_count(), 2);
    assert_eq!(store.purge_expired(at, 2).await.unwrap(), 1);
    assert_eq!(store.purge_expired(at, 2).await.unwrap(), 0);
    assert_eq!(store.record_count(), 1);
    assert!(store.find(user(1), &key("d"), at).await.unwrap().is_some());
    assert_eq!(store.purge_expired(at + secs(10), 0).await.unwrap(), 0);
    assert_eq!(store.purge_expired(at + secs(10), 10).await.unwrap(), 1);
    assert_eq!(store.record_count(), 0);
}

// ----------------------------------------------------------------------------------------
// Properties
// ----------------------------------------------------------------------------------------

/// One attempted step, drawn at random.
#[derive(Debug, Clone)]
enum Op {
    Charge { user: i64, amount: i64, key: u8 },
    Use { user: i64, amount: i64, key: u8 },
    Order { user: i64, amount: i64 },
    Pay { user: i64, order: i64, key: u8 },
    Later { secs: i64 },
    Purge,
}

fn op() -> impl Strategy<Value = Op> {
    let user = 1..=3_i64;
    let amount = 1..=400_i64;
    let key = 0..6_u8;
    prop_oneof![
        (user.clone(), amount.clone(), key.clone()).prop_map(|(user, amount, key)| Op::Charge {
            user,
            amount,
            key
        }),
        (user.clone(), amount.clone(), key.clone()).prop_map(|(user, amount, key)| Op::Use {
            user,
            amount,
            key
        }),
        (user.clone(), amount).prop_map(|(user, amount)| Op::Order { user, amount }),
        (user, 1..=6_i64, key).prop_map(|(user, order, key)| Op::Pay { user, order, key }),
        (0..=40_i64).prop_map(|secs| Op::Later { secs }),
        Just(Op::Purge),
    ]
}

const MAX_BALANCE: i64 = 1000;

/// Plays one op the way the use case does (read, decide, one step); returns the step's
/// result, or `None` when the op is not a balance step.
async fn play(store: &MemoryStore, op: &Op, now: DateTime<Utc>) -> Option<Result<(), StepError>> {
    let (user_id, key_no, kind, wanted, pays_order) = match *op {
        Op::Charge { user, amount, key } => (user, key, EntryKind::Charge, amount, None),
        Op::Use { user, amount, key } => (user, key, EntryKind::Use, amount, None),
        Op::Pay { user, order, key } => {
            let found = store
                .get_order(OrderId::new(order).unwrap())
                .await
                .unwrap()?;
            (
                user,
                key,
                EntryKind::Payment,
                found.amount.get(),
                Some(order),
            )
        }
        Op::Order {
            user: owner,
            amount: value,
        } => {
            store
                .create_order(user(owner), amount(value), now)
                .await
                .unwrap();
            return None;
        }
        Op::Later { .. } | Op::Purge => return None,
    };
    let current = store.get_user(user(user_id)).await.unwrap().unwrap();
    let next = current.balance.get() + kind.sign() * wanted;
    let record = KeyRecord {
        key: key(&format!("k{key_no}")),
        fingerprint: Fingerprint::from_stored("prop"),
        operation: OperationKind::Charge,
        created_at: now,
        expires_at: now + secs(60),
    };
    if !(0..=MAX_BALANCE).contains(&next) {
        let refused = RefusalRecord {
            user_id: current.id,
            expected_version: current.version,
            key: record,
            response: StoredResponse {
                status: 422,
                body: Vec::new(),
            },
        };
        return Some(store.record_refusal(refused).await);
    }
    let change = BalanceChange {
        user_id: current.id,
        expected_version: current.version,
        effect: effect(
            kind,
            amount(wanted),
            balance(next),
            pays_order.map(|id| OrderId::new(id).unwrap()),
        ),
        at: now,
        key: record,
        respond: Box::new(naming_ids),
    };
    Some(store.apply(change).await.map(|_| ()))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Whatever steps are tried, in whatever order, every balance stays in range and equals
    /// its ledger's sum, each entry's `balance_after` follows from the one before, the
    /// version counts the writes, and every PAID order has exactly one payment.
    #[test]
    fn balances_always_match_their_ledgers(ops in proptest::collection::vec(op(), 1..60)) {
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        runtime.block_on(async {
            let store = seeded(3, 100).await;
            let mut now = t0();
            for op in &ops {
                match op {
                    Op::Later { secs: n } => now += secs(*n),
                    Op::Purge => {
                        store.purge_expired(now, 3).await.unwrap();
                    }
                    _ => {}
                }
                match play(&store, op, now).await {
                    None | Some(Ok(())) => {}
                    // A used key, or an order of another user or already paid: refused whole.
                    Some(Err(StepError::KeyTaken | StepError::OrderNotPending)) => {}
                    Some(Err(other)) => panic!("unexpected step error {other:?} for {op:?}"),
                }
            }

            let mut paid = 0;
            for id in 1..=3 {
                let found = store.get_user(user(id)).await.unwrap().unwrap();
                let sum = store.ledger_sum(user(id));
                prop_assert_eq!(found.balance.get(), sum);
                prop_assert!((0..=MAX_BALANCE).contains(&sum));
                let mut entries = store.history(user(id), None, 500).await.unwrap().items;
                entries.reverse();
                prop_assert_eq!(found.version + 1, entries.len() as u64);
                let mut running = 0;
                for entry in &entries {
                    running += entry.kind.sign() * entry.amount.get();
                    prop_assert_eq!(entry.balance_after.get(), running);
                }
                paid += entries.iter().filter(|e| e.kind == EntryKind::Payment).count();
                // A key applies at most once while its record lives (60 s here).
                for (i, earlier) in entries.iter().enumerate() {
                    for later in &entries[i + 1..] {
                        if earlier.idempotency_key.is_some()
                            && earlier.idempotency_key == later.idempotency_key
                        {
                            prop_assert!(later.created_at - earlier.created_at >= secs(60));
                        }
                    }
                }
            }
            let state = store.snapshot();
            let paid_orders = state
                .orders
                .values()
                .filter(|o| o.status == OrderStatus::Paid)
                .count();
            prop_assert_eq!(paid_orders, paid);
            prop_assert_eq!(state.payments.len(), paid);
            for payment in state.payments.values() {
                let order = &state.orders[&payment.order_id];
                prop_assert_eq!(order.status, OrderStatus::Paid);
                prop_assert_eq!(order.user_id, payment.user_id);
                prop_assert_eq!(order.amount, payment.amount);
            }
            Ok(())
        })?;
    }
}
