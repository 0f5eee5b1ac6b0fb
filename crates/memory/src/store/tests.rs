//! The store's own tests: what only the in-memory adapter can show (its whole private state
//! after a refusal, its expiry index, its dense ids) and a property test over random steps.
//! The port's behaviour is the contract suites' (`testkit::contract`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use chrono::{DateTime, Duration, Utc};
use domain::idempotency::{Fingerprint, StoredResponse};
use domain::model::{Coupon, CouponUse, EntryKind, NewCoupon, Order, OrderStatus, UserCoupon};
use domain::operations::{Effect, IssueEffect, Movement, OperationKind};
use domain::ports::{
    BalanceChange, BalanceStore, CouponRepo, IdempotencyRepo, KeyRecord, OrderRepo, RefusalRecord,
    StepError, UserRepo,
};
use domain::types::{
    Amount, Balance, CouponId, CouponName, EntryId, IdempotencyKey, OrderId, PaymentId,
    UserCouponId, UserId,
};
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
        (EntryKind::Payment, Some(order)) => Effect::Pay {
            order,
            movement,
            coupon: None,
        },
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
            assigned.entry_id.map_or(0, EntryId::get),
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
    assert_step_refused_without_a_trace(store, change.build(), expected).await;
}

/// [`assert_refused_without_a_trace`] for a step built by hand.
async fn assert_step_refused_without_a_trace(
    store: &MemoryStore,
    mut change: BalanceChange,
    expected: &str,
) {
    let before = store.snapshot();
    let asked = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&asked);
    change.respond = Box::new(move |assigned| {
        flag.store(true, Ordering::SeqCst);
        naming_ids(assigned)
    });
    let result = store.apply(change).await;
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
// What only this adapter can show. What every store must do (the atomic step, its refusals
// and their order, expiry and replacement, history, seeding, orders, purging) is asserted
// once for all adapters by the port contract suites, `testkit::contract`, run on this store
// as `memory::*` in `crates/testkit/tests/contracts.rs`. These tests look inside: at the
// whole private state, the expiry index, and the exact ids this store hands out.
// ----------------------------------------------------------------------------------------

/// Every refused step leaves the whole state as it was (not only what the contract's
/// `Watch` reads through the ports: no stray record, expiry, order or payment anywhere)
/// and never asks for its response.
#[tokio::test]
async fn a_refused_step_writes_nothing_at_all_and_builds_no_response() {
    let store = seeded(2, 100).await;
    store
        .apply(Change::charge(1, 0, 10, 110, "k").build())
        .await
        .unwrap();
    let paid = store.create_order(user(1), amount(30), t0()).await.unwrap();
    store
        .apply(Change::payment(1, 1, paid.id.get(), 30, 80).build())
        .await
        .unwrap();
    let theirs = store.create_order(user(2), amount(30), t0()).await.unwrap();

    let refusals = [
        // A stale version, under a fresh key.
        (Change::charge(1, 0, 10, 90, "fresh"), "VersionConflict"),
        // A live key, a second later, on the current version.
        (
            Change::charge(1, 2, 10, 90, "k").at(t0() + secs(1)),
            "KeyTaken",
        ),
        // Paying an order already paid, another user's order, an order nobody has.
        (
            Change::payment(1, 2, paid.id.get(), 30, 50).key("again"),
            "OrderNotPending",
        ),
        (
            Change::payment(1, 2, theirs.id.get(), 30, 50).key("theirs"),
            "OrderNotPending",
        ),
        (
            Change::payment(1, 2, 999, 30, 50).key("missing"),
            "OrderNotPending",
        ),
        // Nobody; a stale version under a live key; nobody under someone's key.
        (Change::charge(3, 0, 10, 10, "k"), "UserNotFound"),
        (Change::charge(1, 0, 10, 90, "k"), "VersionConflict"),
        (Change::charge(7, 0, 10, 110, "k"), "UserNotFound"),
    ];
    for (change, expected) in refusals {
        assert_refused_without_a_trace(&store, change, expected).await;
    }
}

/// Issuing one unit of `coupon` to `who` at `version`, under `raw`, at `at`.
fn issue(who: i64, version: u64, coupon: &Coupon, raw: &str, at: DateTime<Utc>) -> BalanceChange {
    let mut key = key_record(raw, at, secs(60));
    key.operation = OperationKind::CouponIssue;
    BalanceChange {
        user_id: user(who),
        expected_version: version,
        effect: Effect::IssueCoupon(IssueEffect {
            coupon: coupon.id,
            discount: coupon.discount,
            expires_at: coupon.expiry_for(at),
        }),
        at,
        key,
        respond: Box::new(naming_ids),
    }
}

/// Paying `order` by `who` (holding `funds`, at `version`) with `coupon`, at `at`.
fn pay_with(
    who: i64,
    version: u64,
    funds: i64,
    order: &Order,
    coupon: &UserCoupon,
    at: DateTime<Utc>,
) -> BalanceChange {
    let (charged, discount) = order.amount.less(coupon.discount);
    let mut change = Change::charge(who, version, 1, 1, "pay-with")
        .at(at)
        .build();
    change.key.operation = OperationKind::Payment;
    change.effect = Effect::Pay {
        order: order.id,
        movement: Movement {
            amount: charged,
            balance_after: balance(funds - charged.get()),
        },
        coupon: Some(CouponUse {
            user_coupon: coupon.id,
            discount,
        }),
    };
    change
}

/// Every refused coupon step (a second unit to a holder, a unit past the stock or of no
/// coupon, another user's coupon, an expired one, a used one) leaves the whole state as it
/// was, private indexes included, and builds no response; the ids it would have taken
/// go to the next step that succeeds.
#[tokio::test]
async fn a_refused_coupon_step_writes_nothing_at_all_and_builds_no_response() {
    let store = seeded(2, 1_000).await;
    let name = CouponName::parse("ONE").unwrap();
    let new = NewCoupon::new(name, amount(100), 1, Some(t0()), None, Some(1), t0()).unwrap();
    let coupon = store.create_coupon(new, t0()).await.unwrap();
    let applied = store
        .apply(issue(1, 0, &coupon, "issue", t0()))
        .await
        .unwrap();
    assert_eq!(applied.assigned.user_coupon_id, UserCouponId::new(1).ok());
    let held = store.holding(coupon.id, user(1)).await.unwrap().unwrap();
    let mine = store
        .create_order(user(1), amount(300), t0())
        .await
        .unwrap();
    let theirs = store
        .create_order(user(2), amount(300), t0())
        .await
        .unwrap();
    let mut nothing = coupon.clone();
    nothing.id = CouponId::new(9).unwrap();

    let refusals = [
        issue(1, 1, &coupon, "again", t0()),
        issue(2, 0, &coupon, "sold-out", t0()),
        issue(2, 0, &nothing, "no-coupon", t0()),
        pay_with(2, 0, 1_000, &theirs, &held, t0()),
        pay_with(1, 1, 1_000, &mine, &held, held.expires_at),
    ];
    for change in refusals {
        assert_step_refused_without_a_trace(&store, change, "CouponChanged").await;
    }

    let paid = store
        .apply(pay_with(1, 1, 1_000, &mine, &held, t0()))
        .await
        .unwrap();
    assert_eq!(paid.assigned.payment_id, PaymentId::new(1).ok());
    let other = store
        .create_order(user(1), amount(300), t0())
        .await
        .unwrap();
    let mut used_again = pay_with(1, 2, 800, &other, &held, t0());
    used_again.key = key_record("used-again", t0(), secs(60));
    assert_step_refused_without_a_trace(&store, used_again, "CouponChanged").await;
}

/// A refused refusal (stale version, live key, nobody) leaves the whole state as it was.
#[tokio::test]
async fn a_refused_refusal_writes_nothing_at_all() {
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
}

/// A record that replaces an expired one (by a step or by a refusal) takes its place: one
/// record for the key, and the old expiry leaves the index with it, so nothing is purged
/// at the old instant.
#[tokio::test]
async fn replacing_an_expired_record_keeps_one_record_and_forgets_its_old_expiry() {
    let store = seeded(1, 100).await;
    store
        .apply(Change::charge(1, 0, 10, 110, "k").build())
        .await
        .unwrap();

    let expired_at = t0() + secs(60);
    store
        .apply(Change::charge(1, 1, 20, 130, "k").at(expired_at).build())
        .await
        .unwrap();
    assert_eq!(
        store.record_count(),
        1,
        "the old record is replaced, not kept"
    );
    assert_eq!(store.purge_expired(expired_at, 10).await.unwrap(), 0);

    // And a refusal over the step's record once that has expired in turn.
    store
        .record_refusal(refusal(1, 2, "k", expired_at + secs(60)))
        .await
        .unwrap();
    assert_eq!(store.record_count(), 1);
    assert_eq!(
        store
            .purge_expired(expired_at + secs(60), 10)
            .await
            .unwrap(),
        0
    );
    assert_eq!(store.ledger_sum(user(1)), 130);
}

/// The expiry index holds exactly one entry per record (`record_count` checks it) through
/// writes of one key by two users and through bounded purges.
#[tokio::test]
async fn the_expiry_index_mirrors_the_records_through_writes_and_purges() {
    let store = seeded(2, 100).await;
    store
        .apply(Change::charge(1, 0, 10, 110, "shared").build())
        .await
        .unwrap();
    store
        .apply(Change::charge(2, 0, 10, 110, "shared").build())
        .await
        .unwrap();
    assert_eq!(store.record_count(), 2, "one key, two users, two records");

    // Refusals expiring at t0+10s, +20s, +30s and +40s.
    for (i, raw) in ["a", "b", "c", "d"].into_iter().enumerate() {
        let created = t0() + secs(10 * i64::try_from(i).unwrap());
        let mut record = refusal(1, 1, raw, created);
        record.key.expires_at = created + secs(10);
        store.record_refusal(record).await.unwrap();
    }
    assert_eq!(store.record_count(), 6);
    let at = t0() + secs(30);
    assert_eq!(store.purge_expired(at, 2).await.unwrap(), 2);
    assert_eq!(store.record_count(), 4);
    assert_eq!(store.purge_expired(at, 2).await.unwrap(), 1);
    assert_eq!(store.record_count(), 3);
    // The two charges' records (60 s) and "d" (40 s).
    assert_eq!(store.purge_expired(t0() + secs(60), 10).await.unwrap(), 3);
    assert_eq!(store.record_count(), 0);
}

/// This store's ids are dense: users, entries, orders and payments are numbered 1, 2, ...
/// in creation order, seeding fills the gaps below `count`, and a created user comes
/// right after the highest id. (The contract only asks that ids increase.)
#[tokio::test]
async fn ids_are_dense_and_follow_creation_order() {
    let store = MemoryStore::new();
    assert_eq!(store.seed_users(3, balance(1000), t0()).await.unwrap(), 3);
    for id in 1..=3 {
        let page = store.history(user(id), None, 10).await.unwrap();
        assert_eq!(
            page.items[0].id.get(),
            id,
            "entry ids follow creation order"
        );
    }
    let first = store.create_order(user(1), amount(5), t0()).await.unwrap();
    let second = store.create_order(user(1), amount(6), t0()).await.unwrap();
    assert_eq!((first.id.get(), second.id.get()), (1, 2));
    let applied = store
        .apply(Change::payment(1, 0, first.id.get(), 5, 995).build())
        .await
        .unwrap();
    assert_eq!(applied.assigned.entry_id, EntryId::new(4).ok());
    assert_eq!(applied.assigned.payment_id, PaymentId::new(1).ok());
    assert_eq!(applied.response.body, b"entry=4 payment=Some(1)");

    let store = MemoryStore::new();
    let first = store.create_user(t0()).await.unwrap();
    let second = store.create_user(t0()).await.unwrap();
    assert_eq!((first.id.get(), second.id.get()), (1, 2));
    // Seeding fills the gap 3..=5; a created user then comes right after the seeded ones.
    assert_eq!(store.seed_users(5, balance(10), t0()).await.unwrap(), 3);
    assert_eq!(store.create_user(t0()).await.unwrap().id.get(), 6);
    assert_eq!(store.get_user(user(7)).await.unwrap(), None);
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

/// A batch naming one user twice is refused whole: each part would pass its version check
/// on its own and the second write would overwrite the first (the use case never builds
/// one; the database's guard refuses it too).
#[tokio::test]
async fn a_batch_naming_a_user_twice_writes_nothing() {
    use domain::ports::{BatchStep, BatchWrite, UserBatch};
    let store = seeded(1, 100).await;
    let part = |k: &str, after: i64| UserBatch {
        user_id: user(1),
        expected_version: 0,
        balance_after: balance(after),
        writes: vec![BatchWrite {
            key: KeyRecord {
                key: key(k),
                fingerprint: Fingerprint::from_stored(format!("fp:{k}")),
                operation: OperationKind::Charge,
                created_at: t0(),
                expires_at: t0() + secs(60),
            },
            ledger: Some((
                EntryKind::Charge,
                Movement {
                    amount: amount(after - 100),
                    balance_after: balance(after),
                },
            )),
            response: StoredResponse {
                status: 200,
                body: k.as_bytes().to_vec(),
            },
        }],
    };
    let twice = BatchStep {
        at: t0(),
        users: vec![part("a", 110), part("b", 120)],
    };
    let tx = store.begin_batch(&[user(1)], &[], t0()).await.unwrap();
    let refused = tx.commit(&twice).await;
    assert!(
        matches!(refused, Err(StepError::VersionConflict)),
        "{refused:?}"
    );
    let after = store.get_user(user(1)).await.unwrap().unwrap();
    assert_eq!((after.balance.get(), after.version), (100, 0));
    assert!(
        store
            .find(user(1), &key("a"), t0())
            .await
            .unwrap()
            .is_none()
    );
}
