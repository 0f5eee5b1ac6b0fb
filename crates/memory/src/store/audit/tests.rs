//! What the in-memory audit does beyond the `Auditor` contract (testkit's
//! `contract/auditor.rs`, run on this store and on MySQL alike): it changes nothing in the
//! whole state, private indexes included; it finds a second payment of one order, a row
//! MySQL's unique `order_id` cannot even hold; and it stays free of false breaches while
//! it lets the lock go between its sections (a handful of rows each under `cfg(test)`),
//! with steps committing in between.

use std::collections::BTreeSet;
use std::time::Duration as StdDuration;

use chrono::{DateTime, Duration, Utc};
use domain::idempotency::{Fingerprint, StoredResponse};
use domain::model::{Coupon, CouponUse, EntryKind, NewCoupon};
use domain::operations::{
    Effect, IssueEffect, Movement, OperationKind, RefundEffect, charge, coupon_issue, pay,
    use_balance,
};
use domain::ports::{
    AuditCheck, AuditReport, Auditor, BalanceChange, BalanceStore, CouponRepo, KeyRecord,
    OrderRepo, RefusalRecord, UserRepo,
};
use domain::types::{
    Amount, Balance, CouponId, CouponName, EntryId, IdempotencyKey, OrderId, PaymentId,
    UserCouponId, UserId,
};

use super::super::{MemoryStore, State};

const TTL_SECS: i64 = 60;
const LEASE: StdDuration = StdDuration::from_secs(30);

fn t0() -> DateTime<Utc> {
    DateTime::from_timestamp(1_800_000_000, 123_000_000).unwrap()
}

fn at(secs: i64) -> DateTime<Utc> {
    t0() + Duration::seconds(secs)
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

fn ttl() -> StdDuration {
    StdDuration::from_secs(TTL_SECS.unsigned_abs())
}

fn user(id: i64) -> UserId {
    UserId::new(id).unwrap()
}

fn record(
    raw: &str,
    operation: OperationKind,
    fingerprint: Fingerprint,
    now: DateTime<Utc>,
) -> KeyRecord {
    KeyRecord {
        key: IdempotencyKey::parse(raw).unwrap(),
        fingerprint,
        operation,
        created_at: now,
        expires_at: now + Duration::seconds(TTL_SECS),
    }
}

/// A payment of `order` by `who` (its owner), as the use case would build it.
fn pay_change(
    who: i64,
    version: u64,
    order: OrderId,
    amount: i64,
    new_balance: i64,
    key: &str,
    now: DateTime<Utc>,
) -> BalanceChange {
    let mut change = change(who, version, EntryKind::Use, amount, new_balance, key, now);
    change.effect = effect(
        EntryKind::Payment,
        Amount::from_stored(amount),
        Balance::from_stored(new_balance),
        Some(order),
    );
    change.key.operation = OperationKind::Payment;
    change.key.fingerprint = pay::fingerprint(user(who), order, None);
    change
}

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
    let (operation, fingerprint) = match kind {
        EntryKind::Charge => (OperationKind::Charge, charge::fingerprint(user(who), value)),
        _ => (
            OperationKind::Use,
            use_balance::fingerprint(user(who), value),
        ),
    };
    BalanceChange {
        user_id: user(who),
        expected_version: version,
        effect: effect(kind, value, Balance::from_stored(new_balance), None),
        at: now,
        key: record(key, operation, fingerprint, now),
        respond: Box::new(|_| StoredResponse {
            status: 200,
            body: b"{}".to_vec(),
        }),
    }
}

async fn audit(store: &MemoryStore) -> AuditReport {
    store.audit(ttl(), LEASE, at(1_000)).await.unwrap()
}

/// Real operations through the ports, as in the MySQL tests: seeded users 1..3 (100000
/// each), user 1 charges (`c-1`), uses (`u-1`) and gets a stored refusal (`r-1`), user 2
/// pays order 2 (`p-1`, ledger entry 6, payment 1), user 3 uses key `k` twice exactly its
/// retention apart, user 4 has nothing; user 1's order 1 is PENDING.
async fn books() -> MemoryStore {
    let store = MemoryStore::new();
    store
        .seed_users(3, Balance::from_stored(100_000), at(0))
        .await
        .unwrap();
    store
        .apply(change(1, 0, EntryKind::Charge, 500, 100_500, "c-1", at(1)))
        .await
        .unwrap();
    store
        .apply(change(1, 1, EntryKind::Use, 200, 100_300, "u-1", at(2)))
        .await
        .unwrap();
    store
        .record_refusal(RefusalRecord {
            user_id: user(1),
            expected_version: 2,
            key: record(
                "r-1",
                OperationKind::Use,
                use_balance::fingerprint(user(1), Amount::from_stored(999_999)),
                at(3),
            ),
            response: StoredResponse {
                status: 422,
                body: b"refused".to_vec(),
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
    let pay = pay_change(2, 0, order.id, 300, 99_700, "p-1", at(4));
    let paid = store.apply(pay).await.unwrap();
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

    assert_eq!((pending.id.get(), order.id.get()), (1, 2));
    assert_eq!(paid.assigned.payment_id, Some(PaymentId::new(1).unwrap()));
    assert_eq!(paid.assigned.entry_id, EntryId::new(6).ok());
    store
}

fn breaches(report: &AuditReport) -> BTreeSet<(AuditCheck, String)> {
    report
        .breaches
        .iter()
        .map(|b| (b.check, b.subject.clone()))
        .collect()
}

/// Writes the books, corrupts the state with `corrupt`, audits, and checks that exactly
/// `expected` is found, each once.
async fn corrupted_finds(corrupt: impl FnOnce(&mut State), expected: &[(AuditCheck, &str)]) {
    let store = books().await;
    assert!(audit(&store).await.is_clean(), "the books start clean");
    corrupt(&mut store.state());
    let report = audit(&store).await;
    let expected: BTreeSet<_> = expected
        .iter()
        .map(|(check, subject)| (*check, (*subject).to_owned()))
        .collect();
    assert_eq!(breaches(&report), expected, "{report:#?}");
    assert_eq!(report.total_found(), expected.len() as u64, "{report:#?}");
}

// ---------------------------------------------------------------------------------------
// Beyond the contract
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn the_audit_changes_nothing() {
    let store = books().await;
    let before = store.snapshot();
    audit(&store).await;
    assert_eq!(store.snapshot(), before);
}

#[tokio::test]
async fn a_second_payment_of_one_order_is_found() {
    corrupted_finds(
        |state| {
            let mut second = state.payments[&PaymentId::new(1).unwrap()].clone();
            second.id = PaymentId::new(2).unwrap();
            state.payments.insert(second.id, second);
            state.last_payment_id = 2;
        },
        &[
            (AuditCheck::PaidOrderHasOnePayment, "order 2"),
            (AuditCheck::PaidOrderHasOnePayment, "payment 2"),
        ],
    )
    .await;
}

// ---------------------------------------------------------------------------------------
// Consistency while the store is written
// ---------------------------------------------------------------------------------------

/// The audit lets the lock go between sections; charges, uses and payments committing in
/// between must never show up as a breach.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audits_during_concurrent_writes_see_no_false_breach() {
    let store = MemoryStore::new();
    store
        .seed_users(6, Balance::from_stored(100_000), at(0))
        .await
        .unwrap();
    let writers: Vec<_> = (1..=6_i64)
        .map(|who| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut balance = 100_000;
                for n in 0..60_u64 {
                    let now = at(1) + Duration::milliseconds(i64::try_from(n).unwrap());
                    let key = format!("w-{n}");
                    let step = match n % 3 {
                        0 => {
                            balance += 7;
                            change(who, n, EntryKind::Charge, 7, balance, &key, now)
                        }
                        1 => {
                            balance -= 3;
                            change(who, n, EntryKind::Use, 3, balance, &key, now)
                        }
                        _ => {
                            let order = store
                                .create_order(user(who), Amount::from_stored(2), now)
                                .await
                                .unwrap();
                            balance -= 2;
                            pay_change(who, n, order.id, 2, balance, &key, now)
                        }
                    };
                    store.apply(step).await.unwrap();
                    tokio::task::yield_now().await;
                }
            })
        })
        .collect();
    let mut audits = 0;
    while !writers.iter().all(tokio::task::JoinHandle::is_finished) {
        let report = audit(&store).await;
        assert!(report.is_clean(), "{report:#?}");
        audits += 1;
    }
    for writer in writers {
        writer.await.unwrap();
    }
    let report = audit(&store).await;
    assert!(report.is_clean(), "{report:#?}");
    assert_eq!(report.ledger_entries, 6 + 6 * 60);
    assert_eq!(report.payments, 6 * 20);
    assert!(audits > 0);
}

// ---------------------------------------------------------------------------------------
// Coupons
// ---------------------------------------------------------------------------------------

fn new_coupon(discount: i64, total: i64) -> NewCoupon {
    let name = CouponName::parse("T").unwrap();
    NewCoupon::new(
        name,
        Amount::from_stored(discount),
        total,
        Some(t0()),
        None,
        Some(30),
        t0(),
    )
    .unwrap()
}

/// Issuing `coupon` to `who` at `version`, as the use case would build it.
fn issue_change(
    who: i64,
    version: u64,
    coupon: &Coupon,
    key: &str,
    now: DateTime<Utc>,
) -> BalanceChange {
    let mut change = change(who, version, EntryKind::Charge, 1, 0, key, now);
    change.effect = Effect::IssueCoupon(IssueEffect {
        coupon: coupon.id,
        discount: coupon.discount,
        expires_at: coupon.expiry_for(now),
    });
    change.key.operation = OperationKind::CouponIssue;
    change.key.fingerprint = coupon_issue::fingerprint(user(who), coupon.id);
    change
}

/// Coupon 1 (stock 3) issued to users 1 (`i-1`) and 2 (`i-2`), coupon 2 (stock 1) to
/// user 3 (`i-3`); users 1..3 seeded.
async fn coupon_books() -> MemoryStore {
    let store = MemoryStore::new();
    store
        .seed_users(3, Balance::from_stored(1_000), at(0))
        .await
        .unwrap();
    let first = store
        .create_coupon(new_coupon(300, 3), at(0))
        .await
        .unwrap();
    let second = store
        .create_coupon(new_coupon(300, 1), at(0))
        .await
        .unwrap();
    for (who, coupon, key) in [(1, &first, "i-1"), (2, &first, "i-2"), (3, &second, "i-3")] {
        store
            .apply(issue_change(who, 0, coupon, key, at(1)))
            .await
            .unwrap();
    }
    assert_eq!((first.id.get(), second.id.get()), (1, 2));
    store
}

/// [`corrupted_finds`] over [`coupon_books`].
async fn coupon_corrupted_finds(corrupt: impl FnOnce(&mut State), expected: &[(AuditCheck, &str)]) {
    let store = coupon_books().await;
    let report = audit(&store).await;
    assert!(report.is_clean(), "the books start clean: {report:#?}");
    assert_eq!((report.coupons, report.user_coupons), (2, 3));
    corrupt(&mut store.state());
    let report = audit(&store).await;
    let expected: BTreeSet<_> = expected
        .iter()
        .map(|(check, subject)| (*check, (*subject).to_owned()))
        .collect();
    assert_eq!(breaches(&report), expected, "{report:#?}");
    assert_eq!(report.total_found(), expected.len() as u64, "{report:#?}");
}

fn coupon(raw: i64) -> CouponId {
    CouponId::new(raw).unwrap()
}

/// A second coupon of one kind for one user (under a key of no record, the count kept in
/// step): a row MySQL's unique (coupon_id, user_id) cannot even hold.
#[tokio::test]
async fn a_user_holding_two_of_one_coupon_is_found() {
    coupon_corrupted_finds(
        |state| {
            let held = state.holding[&(coupon(1), user(1))];
            let mut second = state.user_coupons[&held].clone();
            second.id = UserCouponId::new(4).unwrap();
            second.idempotency_key = IdempotencyKey::parse("x").unwrap();
            state.insert_user_coupon(second);
            if let Some(found) = state.coupons.get_mut(&coupon(1)) {
                found.issued_quantity = 3;
            }
        },
        &[(AuditCheck::CouponStockMatchesIssued, "coupon 1 user 1")],
    )
    .await;
}

/// More issued than the stock, the count matching the user coupons (MySQL's check
/// constraint forbids the row).
#[tokio::test]
async fn more_issued_than_the_stock_is_found() {
    coupon_corrupted_finds(
        |state| {
            if let Some(found) = state.coupons.get_mut(&coupon(1)) {
                found.total_quantity = 1;
            }
        },
        &[(AuditCheck::CouponStockMatchesIssued, "coupon 1")],
    )
    .await;
}

/// User coupons of a coupon that does not exist (coupons are never deleted).
#[tokio::test]
async fn user_coupons_of_a_missing_coupon_are_found() {
    coupon_corrupted_finds(
        |state| {
            state.coupons.remove(&coupon(2));
        },
        &[(AuditCheck::CouponStockMatchesIssued, "coupon 2")],
    )
    .await;
}

/// Issues, payments with coupons and refunds that free them, committing between the
/// audit's sections, never show up as a breach: a user's coupons are read with its
/// records, a coupon with its user coupons, a user coupon with its payment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audits_during_concurrent_coupon_steps_see_no_false_breach() {
    const WRITERS: i64 = 6;
    const ROUNDS: u64 = 10;
    let store = MemoryStore::new();
    store
        .seed_users(6, Balance::from_stored(100_000), at(0))
        .await
        .unwrap();
    let mut coupons = Vec::new();
    for _ in 0..ROUNDS {
        coupons.push(
            store
                .create_coupon(new_coupon(3, 100), at(0))
                .await
                .unwrap(),
        );
    }
    let coupons = std::sync::Arc::new(coupons);
    let writers: Vec<_> = (1..=WRITERS)
        .map(|who| {
            let (store, coupons) = (store.clone(), std::sync::Arc::clone(&coupons));
            tokio::spawn(async move {
                let mut balance = 100_000;
                let mut version = 0;
                for (round, coupon) in coupons.iter().enumerate() {
                    let now = at(1) + Duration::milliseconds(i64::try_from(round).unwrap());
                    let issued = store
                        .apply(issue_change(
                            who,
                            version,
                            coupon,
                            &format!("i-{round}"),
                            now,
                        ))
                        .await
                        .unwrap();
                    version += 1;
                    let held = issued.assigned.user_coupon_id.unwrap();
                    let order = store
                        .create_order(user(who), Amount::from_stored(5), now)
                        .await
                        .unwrap();
                    balance -= 2;
                    let mut pay = pay_change(
                        who,
                        version,
                        order.id,
                        2,
                        balance,
                        &format!("p-{round}"),
                        now,
                    );
                    if let Effect::Pay { coupon, .. } = &mut pay.effect {
                        *coupon = Some(CouponUse {
                            user_coupon: held,
                            discount: Amount::from_stored(3),
                        });
                    }
                    let paid = store.apply(pay).await.unwrap();
                    version += 1;
                    tokio::task::yield_now().await;
                    if round % 2 == 0 {
                        balance += 2;
                        let mut refund = change(
                            who,
                            version,
                            EntryKind::Charge,
                            2,
                            balance,
                            &format!("f-{round}"),
                            now,
                        );
                        refund.key.operation = OperationKind::Refund;
                        refund.effect = Effect::Refund(RefundEffect {
                            payment: paid.assigned.payment_id.unwrap(),
                            order: order.id,
                            movement: Movement {
                                amount: Amount::from_stored(2),
                                balance_after: Balance::from_stored(balance),
                            },
                            payment_amount: Amount::from_stored(2),
                            refunded_before: 0,
                            reason: None,
                            coupon: Some(held),
                        });
                        store.apply(refund).await.unwrap();
                        version += 1;
                    }
                    tokio::task::yield_now().await;
                }
            })
        })
        .collect();
    let mut audits = 0;
    while !writers.iter().all(tokio::task::JoinHandle::is_finished) {
        let report = audit(&store).await;
        assert!(report.is_clean(), "{report:#?}");
        audits += 1;
    }
    for writer in writers {
        writer.await.unwrap();
    }
    let report = audit(&store).await;
    assert!(report.is_clean(), "{report:#?}");
    assert_eq!(report.user_coupons, 6 * ROUNDS);
    assert_eq!(report.payments, 6 * ROUNDS);
    assert_eq!(report.refunds, 6 * ROUNDS / 2);
    let freed = store
        .state()
        .user_coupons
        .values()
        .filter(|c| c.payment.is_none())
        .count();
    assert_eq!(
        freed as u64,
        6 * ROUNDS / 2,
        "each full refund freed its coupon"
    );
    assert!(audits > 0);
}
