//! The in-memory audit: books written through the ports audit clean, and each corruption,
//! made directly on the state (the only way the in-memory store can be corrupted), is
//! found as its check's breach of exactly the corrupted subject. The same books and
//! corruptions as the MySQL adapter's tests (`crates/mysql-repo/tests/audit.rs`).

use std::collections::BTreeSet;
use std::time::Duration as StdDuration;

use chrono::{DateTime, Duration, Utc};
use domain::idempotency::{Fingerprint, RecordOutcome, StoredResponse};
use domain::model::{EntryKind, LedgerEntry, OrderStatus};
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
        (EntryKind::Payment, Some(order)) => Effect::Pay { order, movement },
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
    change.key.fingerprint = pay::fingerprint(user(who), order);
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
    assert_eq!(paid.assigned.entry_id, EntryId::new(6).unwrap());
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

fn ledger(state: &mut State, who: i64) -> &mut Vec<LedgerEntry> {
    state.ledgers.get_mut(&user(who)).unwrap()
}

/// An entry as the store would write it, with the next id.
fn push_entry(
    state: &mut State,
    who: i64,
    kind: EntryKind,
    amount: i64,
    after: i64,
    key: Option<&str>,
    created_at: DateTime<Utc>,
) {
    let id = EntryId::new(state.last_entry_id + 1).unwrap();
    state.last_entry_id = id.get();
    state
        .ledgers
        .entry(user(who))
        .or_default()
        .push(LedgerEntry {
            id,
            user_id: user(who),
            kind,
            amount: Amount::from_stored(amount),
            balance_after: Balance::from_stored(after),
            idempotency_key: key.map(|k| IdempotencyKey::parse(k).unwrap()),
            created_at,
        });
}

fn set_balance(state: &mut State, who: i64, balance: i64) {
    state.users.get_mut(&user(who)).unwrap().balance = Balance::from_stored(balance);
}

// ---------------------------------------------------------------------------------------
// Clean books
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn books_written_by_real_operations_audit_clean() {
    let store = books().await;
    let report = audit(&store).await;
    assert!(report.is_clean(), "{report:#?}");
    assert_eq!(report.users, 4);
    assert_eq!(report.ledger_entries, 8);
    assert_eq!(report.records, 5);
    assert_eq!(report.orders, 2);
    assert_eq!(report.payments, 1);

    // Each entry keeps its record's expiry: a longer retention in the auditor does not
    // make user 3's reuse of `k` after its record expired a double application.
    let longer = store
        .audit(ttl() + StdDuration::from_millis(1), LEASE, at(1_000))
        .await
        .unwrap();
    assert_eq!(breaches(&longer), BTreeSet::new());
}

/// Two payments of one user and amount in the same millisecond: legitimate, and to the
/// in-memory audit (which pairs payments and entries without the key) indistinguishable
/// from a swap; as many of each is clean.
#[tokio::test]
async fn two_payments_of_one_amount_in_one_millisecond_audit_clean() {
    let store = books().await;
    let mut balance = 100_300;
    for (version, key) in [(2, "pa"), (3, "pb")] {
        let order = store
            .create_order(user(1), Amount::from_stored(40), at(7))
            .await
            .unwrap();
        balance -= 40;
        let pay = pay_change(1, version, order.id, 40, balance, key, at(8));
        store.apply(pay).await.unwrap();
    }
    let report = audit(&store).await;
    assert!(report.is_clean(), "{report:#?}");
    assert_eq!(report.payments, 3);
}

#[tokio::test]
async fn an_empty_store_audits_clean() {
    let report = audit(&MemoryStore::new()).await;
    assert_eq!(report, AuditReport::default());
}

#[tokio::test]
async fn the_audit_changes_nothing() {
    let store = books().await;
    let before = store.snapshot();
    audit(&store).await;
    assert_eq!(store.snapshot(), before);
}

// ---------------------------------------------------------------------------------------
// One corruption per check
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_bumped_balance_is_found() {
    corrupted_finds(
        |state| set_balance(state, 1, 100_301),
        &[(AuditCheck::BalanceMatchesLedger, "user 1")],
    )
    .await;
}

#[tokio::test]
async fn a_newest_entry_that_disagrees_with_the_balance_is_found() {
    corrupted_finds(
        |state| {
            let newest = ledger(state, 1).last_mut().unwrap();
            newest.balance_after = Balance::from_stored(newest.balance_after.get() + 7);
        },
        &[(AuditCheck::BalanceMatchesLedger, "user 1")],
    )
    .await;
}

#[tokio::test]
async fn ledger_entries_of_a_missing_user_are_found() {
    corrupted_finds(
        |state| {
            state.users.remove(&user(4));
            push_entry(state, 4, EntryKind::Charge, 5, 5, None, at(0));
        },
        &[(AuditCheck::BalanceMatchesLedger, "user 4")],
    )
    .await;
}

#[tokio::test]
async fn a_deleted_ledger_entry_is_found() {
    corrupted_finds(
        |state| {
            ledger(state, 1).pop();
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
        |state| {
            push_entry(
                state,
                1,
                EntryKind::Charge,
                500,
                100_500,
                Some("c-1"),
                at(1),
            )
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
        |state| {
            push_entry(state, 3, EntryKind::Charge, 10, 100_030, Some("k"), at(95));
            set_balance(state, 3, 100_030);
        },
        &[(AuditCheck::KeyAppliedOnce, "user 3 key k")],
    )
    .await;
}

#[tokio::test]
async fn a_refusal_turned_success_without_an_effect_is_found() {
    corrupted_finds(
        |state| {
            let records = state.keys.get_mut(&user(1)).unwrap();
            records.get_mut("r-1").unwrap().outcome = RecordOutcome::Applied;
        },
        &[(AuditCheck::RecordHasOneEffect, "user 1 key r-1")],
    )
    .await;
}

/// What a record did is its `outcome`: a refusal answered with a 2xx status (or a success
/// with any other) is no breach as long as its effects match what it says.
#[tokio::test]
async fn the_audit_goes_by_the_recorded_outcome_not_the_status() {
    corrupted_finds(
        |state| {
            let records = state.keys.get_mut(&user(1)).unwrap();
            records.get_mut("r-1").unwrap().response.status = 200;
            records.get_mut("c-1").unwrap().response.status = 409;
        },
        &[],
    )
    .await;
}

#[tokio::test]
async fn a_refusal_with_an_effect_is_found() {
    corrupted_finds(
        |state| {
            push_entry(state, 1, EntryKind::Use, 100, 100_200, Some("r-1"), at(3));
            set_balance(state, 1, 100_200);
        },
        &[(AuditCheck::RecordHasOneEffect, "user 1 key r-1")],
    )
    .await;
}

#[tokio::test]
async fn a_paid_order_without_a_payment_is_found() {
    corrupted_finds(
        |state| {
            let order = state.orders.get_mut(&OrderId::new(1).unwrap()).unwrap();
            order.status = OrderStatus::Paid;
        },
        &[(AuditCheck::PaidOrderHasOnePayment, "order 1")],
    )
    .await;
}

#[tokio::test]
async fn a_deleted_payment_is_found() {
    corrupted_finds(
        |state| {
            let payment = PaymentId::new(1).unwrap();
            state.payments.remove(&payment);
            state.payment_of_order.remove(&OrderId::new(2).unwrap());
        },
        &[
            (AuditCheck::PaidOrderHasOnePayment, "order 2"),
            (AuditCheck::PaidOrderHasOnePayment, "ledger entry 6"),
        ],
    )
    .await;
}

#[tokio::test]
async fn a_payment_of_an_order_that_is_not_paid_is_found() {
    corrupted_finds(
        |state| {
            let order = state.orders.get_mut(&OrderId::new(2).unwrap()).unwrap();
            order.status = OrderStatus::Pending;
        },
        &[(AuditCheck::PaidOrderHasOnePayment, "payment 1")],
    )
    .await;
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

#[tokio::test]
async fn a_payment_without_its_ledger_entry_is_found() {
    corrupted_finds(
        |state| {
            let entry = ledger(state, 2).last_mut().unwrap();
            entry.created_at += Duration::milliseconds(1);
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
// Scale
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_broken_store_is_listed_up_to_the_cap_and_counted_in_full() {
    let store = MemoryStore::new();
    store
        .seed_users(250, Balance::from_stored(1_000), at(0))
        .await
        .unwrap();
    assert!(audit(&store).await.is_clean());
    for user in store.state().users.values_mut() {
        user.balance = Balance::from_stored(1_001);
    }
    let report = audit(&store).await;
    assert_eq!(report.found(AuditCheck::BalanceMatchesLedger), 250);
    assert_eq!(report.total_found(), 250);
    let listed: Vec<_> = report.listed(AuditCheck::BalanceMatchesLedger).collect();
    assert_eq!(listed.len(), AuditReport::LISTED_PER_CHECK);
    assert_eq!(listed[0].subject, "user 1");
    assert_eq!(
        listed[0].detail,
        "balance 1001, ledger sum 1000 over 1 entries; newest entry 1 has balance_after 1000"
    );
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
