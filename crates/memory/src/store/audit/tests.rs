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
use domain::model::EntryKind;
use domain::operations::{Effect, Movement, OperationKind, charge, pay, use_balance};
use domain::ports::{
    AuditCheck, AuditReport, Auditor, BalanceChange, BalanceStore, KeyRecord, OrderRepo,
    RefusalRecord, UserRepo,
};
use domain::types::{Amount, Balance, EntryId, IdempotencyKey, OrderId, PaymentId, UserId};

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
