//! The `Auditor` contract: books written through the ports audit clean, and each kind of
//! corruption (written through [`Corrupt`], the adapter's own way to write a wrong row) is
//! found as its check's breach of exactly the corrupted subject, counted once. A check
//! an adapter cannot be made to breach is tested by that adapter alone:
//! `NoRecordStuckInFlight` (only MySQL stores in-flight records) and a second payment of
//! one order (MySQL's unique `order_id` forbids the row).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Utc};
use domain::idempotency::{Fingerprint, RecordOutcome, StoredResponse};
use domain::model::{EntryKind, OrderStatus};
use domain::operations::{OperationKind, charge, coupon_issue, pay, use_balance};
use domain::outcome::Outcome;
use domain::ports::{
    AuditCheck, AuditReport, Auditor, BalanceChange, BalanceStore, Clock, CouponRepo,
    IdempotencyRepo, KeyRecord, OrderRepo, RefusalRecord, ResponseEncoder, UserRepo,
};
use domain::types::{Amount, Balance, CouponId, EntryId, OrderId, PaymentId, UserCouponId, UserId};
use domain::{BalanceService, Charge, Operation, Ports, Settings};

use super::Stores;
use super::corrupt::{Corrupt, ForgedEntry, ForgedUserCoupon};
use super::support::{Watch, at, bounded, key, user_id};

/// The idempotency retention the books are written and audited with.
pub const AUDIT_TTL: Duration = Duration::from_secs(60);
/// The lock lease the audit is given.
pub const AUDIT_LEASE: Duration = Duration::from_secs(30);

/// [`AUDIT_TTL`] in whole seconds, for instants.
const TTL_SECS: i64 = 60;

/// One store seen as the audit suites need it: its ports, its auditor and its way to
/// write what no port writes.
#[derive(Clone)]
pub struct Audited {
    pub stores: Stores,
    pub auditor: Arc<dyn Auditor>,
    pub corrupt: Arc<dyn Corrupt>,
}

impl Audited {
    /// Every port of `store`, its auditor and its corruption hook, all sharing the store.
    pub fn new<S>(store: S) -> Self
    where
        S: UserRepo + OrderRepo + CouponRepo + IdempotencyRepo + BalanceStore + Auditor + Corrupt,
        S: Clone + 'static,
    {
        Self {
            stores: Stores::new(store.clone()),
            auditor: Arc::new(store.clone()),
            corrupt: Arc::new(store),
        }
    }

    /// The audit as the suites run it: [`AUDIT_TTL`], [`AUDIT_LEASE`], at [`sec`]`(1000)`.
    pub async fn audit(&self) -> AuditReport {
        self.auditor
            .audit(AUDIT_TTL, AUDIT_LEASE, sec(1_000))
            .await
            .expect("the audit runs")
    }
}

impl std::fmt::Debug for Audited {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Audited").finish_non_exhaustive()
    }
}

/// `s` seconds (and 123 ms, so the store must keep milliseconds) after the suites' epoch.
pub fn sec(s: i64) -> DateTime<Utc> {
    at(s * 1_000 + 123)
}

fn user(raw: i64) -> UserId {
    user_id(raw)
}

fn key_record(
    raw: &str,
    operation: OperationKind,
    fingerprint: Fingerprint,
    now: DateTime<Utc>,
) -> KeyRecord {
    KeyRecord {
        key: key(raw),
        fingerprint,
        operation,
        created_at: now,
        expires_at: now + chrono::Duration::seconds(TTL_SECS),
    }
}

/// A charge or use of `amount` by `who` at `version`, leaving `new_balance`, as the use
/// case hands it to the store.
fn change(
    who: i64,
    version: u64,
    kind: EntryKind,
    amount: i64,
    new_balance: i64,
    raw_key: &str,
    now: DateTime<Utc>,
) -> BalanceChange {
    let value = Amount::from_stored(amount);
    let fingerprint = match kind {
        EntryKind::Charge => charge::fingerprint(user(who), value),
        _ => use_balance::fingerprint(user(who), value),
    };
    let (effect, operation) =
        crate::steps::effect(kind, value, Balance::from_stored(new_balance), None);
    BalanceChange {
        user_id: user(who),
        expected_version: version,
        effect,
        at: now,
        key: key_record(raw_key, operation, fingerprint, now),
        respond: Box::new(|_| StoredResponse {
            status: 200,
            body: b"{}".to_vec(),
        }),
    }
}

/// The payment of `order` (of `amount`) by `who`, its owner.
fn payment(
    who: i64,
    version: u64,
    order: OrderId,
    amount: i64,
    new_balance: i64,
    raw_key: &str,
    now: DateTime<Utc>,
) -> BalanceChange {
    let mut step = change(
        who,
        version,
        EntryKind::Use,
        amount,
        new_balance,
        raw_key,
        now,
    );
    let (effect, operation) = crate::steps::effect(
        EntryKind::Payment,
        Amount::from_stored(amount),
        Balance::from_stored(new_balance),
        Some(order),
    );
    step.effect = effect;
    step.key.operation = operation;
    step.key.fingerprint = pay::fingerprint(user(who), order, None);
    step
}

/// What [`write_audit_books`] wrote: the ids a corruption names.
#[derive(Debug, Clone)]
pub struct AuditBooks {
    /// User 1's order, still PENDING.
    pub pending_order: OrderId,
    /// User 2's PAID order, its payment and the payment's ledger entry.
    pub paid_order: OrderId,
    pub payment: PaymentId,
    pub payment_entry: EntryId,
    /// User 1's newest ledger entry (its use, key `u-1`).
    pub newest_of_user_1: EntryId,
}

/// Real operations through the ports, on a new, empty store: seeded users 1..3 (100000
/// each); user 1 charges (`c-1`), uses (`u-1`) and gets a stored refusal (`r-1`) and a
/// PENDING order; user 2 pays an order (`p-1`); user 3 charges with key `k` twice, exactly
/// its retention apart (legitimate: the first record had expired); user 4 has nothing.
pub async fn write_audit_books(audited: &Audited) -> AuditBooks {
    let stores = &audited.stores;
    stores
        .users
        .seed_users(3, Balance::from_stored(100_000), sec(0))
        .await
        .unwrap();
    stores
        .balances
        .apply(change(1, 0, EntryKind::Charge, 500, 100_500, "c-1", sec(1)))
        .await
        .unwrap();
    let used = stores
        .balances
        .apply(change(1, 1, EntryKind::Use, 200, 100_300, "u-1", sec(2)))
        .await
        .unwrap();
    stores
        .balances
        .record_refusal(RefusalRecord {
            user_id: user(1),
            expected_version: 2,
            key: key_record(
                "r-1",
                OperationKind::Use,
                use_balance::fingerprint(user(1), Amount::from_stored(999_999)),
                sec(3),
            ),
            response: StoredResponse {
                status: 422,
                body: b"{\"code\":\"INSUFFICIENT_BALANCE\"}".to_vec(),
            },
        })
        .await
        .unwrap();
    let pending = stores
        .orders
        .create_order(user(1), Amount::from_stored(50), sec(3))
        .await
        .unwrap();
    let order = stores
        .orders
        .create_order(user(2), Amount::from_stored(300), sec(1))
        .await
        .unwrap();
    let paid = stores
        .balances
        .apply(payment(2, 0, order.id, 300, 99_700, "p-1", sec(4)))
        .await
        .unwrap();
    stores
        .balances
        .apply(change(3, 0, EntryKind::Charge, 10, 100_010, "k", sec(5)))
        .await
        .unwrap();
    let again = change(3, 1, EntryKind::Charge, 10, 100_020, "k", sec(5 + TTL_SECS));
    stores.balances.apply(again).await.unwrap();
    stores.users.create_user(sec(6)).await.unwrap();

    AuditBooks {
        pending_order: pending.id,
        paid_order: order.id,
        payment: paid.assigned.payment_id.expect("a payment was written"),
        payment_entry: super::support::entry_of(&paid),
        newest_of_user_1: super::support::entry_of(&used),
    }
}

/// Every (check, subject) the report lists.
pub fn breaches(report: &AuditReport) -> BTreeSet<(AuditCheck, String)> {
    report
        .breaches
        .iter()
        .map(|b| (b.check, b.subject.clone()))
        .collect()
}

/// Writes the books and proves they audit clean: the start of every corruption suite.
async fn clean_books(audited: &Audited) -> AuditBooks {
    let books = write_audit_books(audited).await;
    let report = audited.audit().await;
    assert!(report.is_clean(), "the books start clean: {report:#?}");
    books
}

/// Audits and checks that exactly `expected` is found, each once, each with a detail.
pub async fn assert_finds(audited: &Audited, expected: &[(AuditCheck, String)]) {
    let report = audited.audit().await;
    let expected: BTreeSet<_> = expected.iter().cloned().collect();
    assert_eq!(breaches(&report), expected, "{report:#?}");
    assert_eq!(report.total_found(), expected.len() as u64, "{report:#?}");
    for breach in &report.breaches {
        assert!(!breach.detail.is_empty(), "{breach:?}");
    }
}

fn found(check: AuditCheck, subject: impl Into<String>) -> (AuditCheck, String) {
    (check, subject.into())
}

// ---------------------------------------------------------------------------------------
// Clean books
// ---------------------------------------------------------------------------------------

/// An empty store audits clean and counts nothing.
pub async fn auditor_finds_an_empty_store_clean(audited: &Audited) {
    assert_eq!(audited.audit().await, AuditReport::default());
}

/// Books written through the ports audit clean, with every row counted; and each ledger
/// entry is judged by the expiry its record was written with, so an auditor given a
/// longer retention than the books were written with finds no double application in
/// user 3's reuse of `k` after its record expired.
pub async fn auditor_finds_books_written_through_the_ports_clean(audited: &Audited) {
    write_audit_books(audited).await;
    let report = audited.audit().await;
    assert!(report.is_clean(), "{report:#?}");
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

    let longer = audited
        .auditor
        .audit(
            AUDIT_TTL + Duration::from_millis(1),
            AUDIT_LEASE,
            sec(1_000),
        )
        .await
        .unwrap();
    assert_eq!(breaches(&longer), BTreeSet::new(), "{longer:#?}");
}

/// Two payments of one user and amount in one millisecond are legitimate (the clock has
/// that precision) and audit clean.
pub async fn auditor_accepts_two_payments_of_one_amount_in_one_millisecond(audited: &Audited) {
    write_audit_books(audited).await;
    let stores = &audited.stores;
    let mut balance = 100_300;
    for (version, raw) in [(2, "pa"), (3, "pb")] {
        let order = stores
            .orders
            .create_order(user(1), Amount::from_stored(40), sec(7))
            .await
            .unwrap();
        balance -= 40;
        let pay = payment(1, version, order.id, 40, balance, raw, sec(8));
        stores.balances.apply(pay).await.unwrap();
    }
    let report = audited.audit().await;
    assert!(report.is_clean(), "{report:#?}");
    assert_eq!(report.payments, 3);
}

/// The audit reads; it writes nothing any port can see.
pub async fn auditor_changes_nothing(audited: &Audited) {
    let books = write_audit_books(audited).await;
    let watch = Watch {
        users: (1..=4).map(user).collect(),
        keys: vec![
            (user(1), "c-1"),
            (user(1), "u-1"),
            (user(1), "r-1"),
            (user(2), "p-1"),
            (user(3), "k"),
        ],
        orders: vec![books.pending_order, books.paid_order],
    };
    let before = watch.snapshot(&audited.stores, sec(7)).await;
    assert!(audited.audit().await.is_clean());
    assert_eq!(watch.snapshot(&audited.stores, sec(7)).await, before);
}

// ---------------------------------------------------------------------------------------
// One corruption per breach
// ---------------------------------------------------------------------------------------

/// `BalanceMatchesLedger`: a balance that moved without a ledger entry.
pub async fn auditor_finds_a_bumped_balance(audited: &Audited) {
    clean_books(audited).await;
    audited.corrupt.set_balance(user(1), 100_301).await;
    assert_finds(
        audited,
        &[found(AuditCheck::BalanceMatchesLedger, "user 1")],
    )
    .await;
}

/// `BalanceMatchesLedger`: the sum still matches, but the newest entry's `balance_after`
/// does not.
pub async fn auditor_finds_a_newest_entry_that_disagrees_with_the_balance(audited: &Audited) {
    let books = clean_books(audited).await;
    audited
        .corrupt
        .shift_balance_after(books.newest_of_user_1, 7)
        .await;
    assert_finds(
        audited,
        &[found(AuditCheck::BalanceMatchesLedger, "user 1")],
    )
    .await;
}

/// `BalanceMatchesLedger`: ledger entries of a user that does not exist.
pub async fn auditor_finds_ledger_entries_of_a_missing_user(audited: &Audited) {
    clean_books(audited).await;
    audited.corrupt.delete_user(user(4)).await;
    audited
        .corrupt
        .insert_entry(ForgedEntry {
            user: user(4),
            kind: EntryKind::Charge,
            amount: 5,
            balance_after: 5,
            key: None,
            at: sec(0),
        })
        .await;
    assert_finds(
        audited,
        &[found(AuditCheck::BalanceMatchesLedger, "user 4")],
    )
    .await;
}

/// A deleted ledger entry: the balance disagrees, and its stored success has no effect.
pub async fn auditor_finds_a_deleted_ledger_entry(audited: &Audited) {
    let books = clean_books(audited).await;
    audited.corrupt.delete_entry(books.newest_of_user_1).await;
    assert_finds(
        audited,
        &[
            found(AuditCheck::BalanceMatchesLedger, "user 1"),
            found(AuditCheck::RecordHasOneEffect, "user 1 key u-1"),
        ],
    )
    .await;
}

/// The charge `c-1` applied twice in one step: three checks see it.
pub async fn auditor_finds_a_second_entry_of_one_key_at_one_instant(audited: &Audited) {
    clean_books(audited).await;
    audited
        .corrupt
        .insert_entry(ForgedEntry {
            user: user(1),
            kind: EntryKind::Charge,
            amount: 500,
            balance_after: 100_500,
            key: Some(key("c-1")),
            at: sec(1),
        })
        .await;
    assert_finds(
        audited,
        &[
            found(AuditCheck::BalanceMatchesLedger, "user 1"),
            found(AuditCheck::RecordHasOneEffect, "user 1 key c-1"),
            found(AuditCheck::KeyAppliedOnce, "user 1 key c-1"),
        ],
    )
    .await;
}

/// `KeyAppliedOnce` on its own: user 3 charged `k` once more 30 s after its second use
/// (while that use's record still lived), with balance and ledger kept in step.
pub async fn auditor_finds_a_key_applied_twice_within_its_retention(audited: &Audited) {
    clean_books(audited).await;
    audited
        .corrupt
        .insert_entry(ForgedEntry {
            user: user(3),
            kind: EntryKind::Charge,
            amount: 10,
            balance_after: 100_030,
            key: Some(key("k")),
            at: sec(5 + TTL_SECS + 30),
        })
        .await;
    audited.corrupt.set_balance(user(3), 100_030).await;
    assert_finds(
        audited,
        &[found(AuditCheck::KeyAppliedOnce, "user 3 key k")],
    )
    .await;
}

/// `RecordHasOneEffect`: a refusal rewritten as applied, with no effect behind it.
pub async fn auditor_finds_a_refusal_turned_success(audited: &Audited) {
    clean_books(audited).await;
    audited
        .corrupt
        .set_record_outcome(user(1), "r-1", RecordOutcome::Applied)
        .await;
    assert_finds(
        audited,
        &[found(AuditCheck::RecordHasOneEffect, "user 1 key r-1")],
    )
    .await;
}

/// What a record did is its outcome: a refusal answered with a 2xx status (or a success
/// with any other) is no breach as long as its effects match what it says.
pub async fn auditor_goes_by_the_recorded_outcome_not_the_status(audited: &Audited) {
    clean_books(audited).await;
    audited.corrupt.set_record_status(user(1), "r-1", 200).await;
    audited.corrupt.set_record_status(user(1), "c-1", 409).await;
    assert_finds(audited, &[]).await;
}

/// `RecordHasOneEffect`: a use stored as refused whose money moved all the same.
pub async fn auditor_finds_a_refusal_with_an_effect(audited: &Audited) {
    clean_books(audited).await;
    audited
        .corrupt
        .insert_entry(ForgedEntry {
            user: user(1),
            kind: EntryKind::Use,
            amount: 100,
            balance_after: 100_200,
            key: Some(key("r-1")),
            at: sec(3),
        })
        .await;
    audited.corrupt.set_balance(user(1), 100_200).await;
    assert_finds(
        audited,
        &[found(AuditCheck::RecordHasOneEffect, "user 1 key r-1")],
    )
    .await;
}

/// `PaidOrderHasOnePayment`: an order marked PAID that nobody paid.
pub async fn auditor_finds_a_paid_order_without_a_payment(audited: &Audited) {
    let books = clean_books(audited).await;
    audited
        .corrupt
        .set_order_status(books.pending_order, OrderStatus::Paid)
        .await;
    let order = format!("order {}", books.pending_order);
    assert_finds(audited, &[found(AuditCheck::PaidOrderHasOnePayment, order)]).await;
}

/// `PaidOrderHasOnePayment`: a deleted payment leaves its PAID order and its PAYMENT entry
/// without it.
pub async fn auditor_finds_a_deleted_payment(audited: &Audited) {
    let books = clean_books(audited).await;
    audited.corrupt.delete_payment(books.payment).await;
    assert_finds(
        audited,
        &[
            found(
                AuditCheck::PaidOrderHasOnePayment,
                format!("order {}", books.paid_order),
            ),
            found(
                AuditCheck::PaidOrderHasOnePayment,
                format!("ledger entry {}", books.payment_entry),
            ),
        ],
    )
    .await;
}

/// `PaidOrderHasOnePayment`: a payment of an order that is PENDING again.
pub async fn auditor_finds_a_payment_of_an_order_that_is_not_paid(audited: &Audited) {
    let books = clean_books(audited).await;
    audited
        .corrupt
        .set_order_status(books.paid_order, OrderStatus::Pending)
        .await;
    let payment = format!("payment {}", books.payment);
    assert_finds(
        audited,
        &[found(AuditCheck::PaidOrderHasOnePayment, payment)],
    )
    .await;
}

/// A payment's ledger entry moved one millisecond: no longer the payment's (nor its
/// record's) instant.
pub async fn auditor_finds_a_payment_without_its_ledger_entry(audited: &Audited) {
    let books = clean_books(audited).await;
    audited
        .corrupt
        .shift_entry_time(books.payment_entry, chrono::Duration::milliseconds(1))
        .await;
    assert_finds(
        audited,
        &[
            found(AuditCheck::RecordHasOneEffect, "user 2 key p-1"),
            found(
                AuditCheck::PaidOrderHasOnePayment,
                format!("payment {}", books.payment),
            ),
            found(
                AuditCheck::PaidOrderHasOnePayment,
                format!("ledger entry {}", books.payment_entry),
            ),
        ],
    )
    .await;
}

// ---------------------------------------------------------------------------------------
// Scale, consistency, retention
// ---------------------------------------------------------------------------------------

/// A badly broken store yields a bounded report with exact counts: at most
/// [`AuditReport::LISTED_PER_CHECK`] breaches of a check listed (the lowest ids first),
/// all of them counted.
pub async fn auditor_lists_up_to_the_cap_and_counts_in_full(audited: &Audited) {
    const USERS: i64 = 250;
    audited
        .stores
        .users
        .seed_users(250, Balance::from_stored(1_000), sec(0))
        .await
        .unwrap();
    assert!(audited.audit().await.is_clean());
    for id in 1..=USERS {
        audited.corrupt.set_balance(user(id), 1_001).await;
    }
    let report = audited.audit().await;
    assert_eq!(report.users, 250);
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

/// Audits running while charges, uses and payments commit never report a breach: each
/// sees every step whole or not at all.
pub async fn auditor_sees_no_false_breach_during_concurrent_writes(audited: &Audited) {
    const WRITERS: i64 = 4;
    const STEPS: u64 = 45;
    let stores = audited.stores.clone();
    stores
        .users
        .seed_users(4, Balance::from_stored(100_000), sec(0))
        .await
        .unwrap();
    let writers: Vec<_> = (1..=WRITERS)
        .map(|who| {
            let stores = stores.clone();
            tokio::spawn(async move {
                let mut balance = 100_000;
                for n in 0..STEPS {
                    let now = sec(1) + chrono::Duration::milliseconds(i64::try_from(n).unwrap());
                    let raw = format!("w-{n}");
                    let step = match n % 3 {
                        0 => {
                            balance += 7;
                            change(who, n, EntryKind::Charge, 7, balance, &raw, now)
                        }
                        1 => {
                            balance -= 3;
                            change(who, n, EntryKind::Use, 3, balance, &raw, now)
                        }
                        _ => {
                            let order = stores
                                .orders
                                .create_order(user(who), Amount::from_stored(2), now)
                                .await
                                .unwrap();
                            balance -= 2;
                            payment(who, n, order.id, 2, balance, &raw, now)
                        }
                    };
                    stores.balances.apply(step).await.unwrap();
                    tokio::task::yield_now().await;
                }
            })
        })
        .collect();
    let mut audits = 0;
    bounded("audits while the writers run", async {
        while !writers.iter().all(tokio::task::JoinHandle::is_finished) {
            let report = audited.audit().await;
            assert!(report.is_clean(), "{report:#?}");
            audits += 1;
        }
    })
    .await;
    for writer in writers {
        writer.await.unwrap();
    }
    let report = audited.audit().await;
    assert!(report.is_clean(), "{report:#?}");
    assert_eq!(report.ledger_entries, 4 + 4 * STEPS);
    assert_eq!(report.payments, 4 * (STEPS / 3));
    assert!(audits > 0);
}

/// A clock the suite moves by hand.
struct ManualClock(Mutex<DateTime<Utc>>);

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl ManualClock {
    fn advance(&self, by: Duration) {
        let by = chrono::Duration::from_std(by).expect("a step the clock can take");
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) += by;
    }
}

/// Stores an outcome's debug text: what a response says does not matter here.
struct DebugEncoder;

impl ResponseEncoder for DebugEncoder {
    fn encode(&self, outcome: &Outcome) -> StoredResponse {
        StoredResponse {
            status: 200,
            body: format!("{outcome:?}").into_bytes(),
        }
    }
}

/// The audit judges a key's reuse by the expiry its record was written with, not by the
/// auditing process's retention setting: keys the service reused after a short
/// retention audit clean with the default one (a day), as `balance-service audit`
/// without `IDEMPOTENCY_TTL_SECS` runs.
pub async fn auditor_judges_a_reuse_by_its_records_expiry(audited: &Audited) {
    const SERVICE_TTL: Duration = Duration::from_secs(60);
    let stores = &audited.stores;
    let clock = Arc::new(ManualClock(Mutex::new(sec(0))));
    let service = BalanceService::new(
        Ports {
            users: Arc::clone(&stores.users),
            orders: Arc::clone(&stores.orders),
            coupons: Arc::clone(&stores.coupons),
            keys: Arc::clone(&stores.idempotency),
            store: Arc::clone(&stores.balances),
            locks: Arc::new(memory::InProcessLockManager::new()),
            encoder: Arc::new(DebugEncoder),
            clock: Arc::clone(&clock) as Arc<dyn Clock>,
            gate: None,
        },
        Settings {
            idempotency_ttl: SERVICE_TTL,
            ..Settings::default()
        },
    );
    stores
        .users
        .seed_users(1, Balance::from_stored(0), sec(0))
        .await
        .unwrap();
    let id = user(1);

    // The same key three times, each after the previous record expired: three charges.
    for round in 0..3 {
        let charge: Arc<dyn Operation> = Arc::new(Charge {
            user: id,
            amount: Amount::new(10, &Settings::default().limits).unwrap(),
            key: key("reused"),
        });
        let done = service.execute(charge).await.unwrap();
        assert!(!done.replayed, "round {round}");
        clock.advance(SERVICE_TTL + Duration::from_secs(1));
    }
    let balance = stores.users.get_user(id).await.unwrap().unwrap().balance;
    assert_eq!(balance.get(), 30);

    let default = Settings::default();
    let report = audited
        .auditor
        .audit(default.idempotency_ttl, default.lock_lease, clock.now())
        .await
        .unwrap();
    assert_eq!(report.found(AuditCheck::KeyAppliedOnce), 0, "{report:#?}");
    assert!(report.is_clean(), "{report:#?}");
}

// ---------------------------------------------------------------------------------------
// Refunds
// ---------------------------------------------------------------------------------------

/// A user of 1,000 who paid an order of 300 and had it refunded in two parts, 100 then the
/// rest, through the ports: (the order, the payment).
async fn refunded_books(audited: &Audited) -> (OrderId, PaymentId) {
    let stores = &audited.stores;
    let user = super::support::funded_user(stores, 1_000, sec(1)).await;
    let order = stores
        .orders
        .create_order(user.id, super::support::amount(300), sec(2))
        .await
        .unwrap();
    let paid = stores
        .balances
        .apply(super::support::payment_step(&user, &order, "pay", sec(3)))
        .await
        .unwrap();
    let payment_id = paid.assigned.payment_id.expect("a payment was written");
    for (amount, before, raw_key, when) in [(100, 0, "refund-1", 4), (200, 100, "refund-2", 5)] {
        let user = super::support::current(stores.users.as_ref(), user.id).await;
        let payment = stores
            .orders
            .get_payment(payment_id)
            .await
            .unwrap()
            .unwrap();
        stores
            .balances
            .apply(super::support::refund_step(
                &user,
                &payment,
                amount,
                before,
                raw_key,
                sec(when),
            ))
            .await
            .unwrap();
    }
    (order.id, payment_id)
}

/// Refunds written through the ports audit clean and are counted.
pub async fn auditor_finds_refunded_books_clean(audited: &Audited) {
    refunded_books(audited).await;
    let report = audited.audit().await;
    assert!(report.is_clean(), "{report:#?}");
    assert_eq!((report.payments, report.refunds), (1, 2));
}

/// `PaidOrderHasOnePayment`: the order of a payment refunded in full that is not REFUNDED.
pub async fn auditor_finds_a_refunded_payment_whose_order_is_still_paid(audited: &Audited) {
    let (order, payment) = refunded_books(audited).await;
    assert!(audited.audit().await.is_clean());
    audited
        .corrupt
        .set_order_status(order, OrderStatus::Paid)
        .await;
    assert_finds(
        audited,
        &[found(
            AuditCheck::PaidOrderHasOnePayment,
            format!("payment {payment}"),
        )],
    )
    .await;
}

/// `RefundsMatchPayment`: a refunded total its refunds do not add up to (and the order's
/// status then disagrees with the payment's, too).
pub async fn auditor_finds_a_refunded_total_its_refunds_do_not_add_up_to(audited: &Audited) {
    let (_, payment) = refunded_books(audited).await;
    assert!(audited.audit().await.is_clean());
    audited.corrupt.set_refunded_total(payment, 250).await;
    assert_finds(
        audited,
        &[
            found(
                AuditCheck::RefundsMatchPayment,
                format!("payment {payment}"),
            ),
            found(
                AuditCheck::PaidOrderHasOnePayment,
                format!("payment {payment}"),
            ),
        ],
    )
    .await;
}

/// The atomic step, on a broken row: a refund that would complete a payment whose order is
/// not PAID (data drift; no operation leaves it so) is an unexpected error, not a conflict
/// to retry, and writes nothing.
pub async fn balance_store_refuses_to_complete_a_refund_of_an_order_not_paid(audited: &Audited) {
    let stores = &audited.stores;
    let user = super::support::funded_user(stores, 1_000, sec(1)).await;
    let order = stores
        .orders
        .create_order(user.id, super::support::amount(300), sec(2))
        .await
        .unwrap();
    let paid = stores
        .balances
        .apply(super::support::payment_step(&user, &order, "pay", sec(3)))
        .await
        .unwrap();
    let payment_id = paid.assigned.payment_id.expect("a payment was written");
    audited
        .corrupt
        .set_order_status(order.id, OrderStatus::Cancelled)
        .await;
    let user = super::support::current(stores.users.as_ref(), user.id).await;
    let payment = stores
        .orders
        .get_payment(payment_id)
        .await
        .unwrap()
        .unwrap();
    let watch = Watch {
        users: vec![user.id],
        keys: vec![(user.id, "refund-all")],
        orders: vec![order.id],
    };
    let before = watch.snapshot(stores, sec(10)).await;
    let result = stores
        .balances
        .apply(super::support::refund_step(
            &user,
            &payment,
            300,
            0,
            "refund-all",
            sec(10),
        ))
        .await;
    assert!(
        matches!(result, Err(domain::ports::StepError::Unexpected(_))),
        "{result:?}"
    );
    assert_eq!(watch.snapshot(stores, sec(10)).await, before);
    assert!(
        stores
            .orders
            .refunds(payment_id, 10)
            .await
            .unwrap()
            .is_empty()
    );
    // A partial refund does not touch the order, and goes through.
    stores
        .balances
        .apply(super::support::refund_step(
            &user,
            &payment,
            100,
            0,
            "refund-part",
            sec(11),
        ))
        .await
        .unwrap();
}

// ---------------------------------------------------------------------------------------
// Coupons
// ---------------------------------------------------------------------------------------

/// What [`write_coupon_books`] wrote: the ids a corruption names.
#[derive(Debug, Clone)]
pub struct CouponBooks {
    /// Stock 3, issued to users 1 (`i-1`) and 2 (`i-2`).
    pub coupon: CouponId,
    /// Stock 1, issued to user 3 (`i-3`), sold out.
    pub sold_out: CouponId,
    /// User 1's coupon, used by `paid`.
    pub used: UserCouponId,
    /// User 1's payment of 700 for an order of 1,000 with `used` (300 off), and its order.
    pub paid: PaymentId,
    pub paid_order: OrderId,
    pub paid_entry: EntryId,
    /// User 2's coupon, free again: the payment it paid is refunded in full.
    pub freed: UserCouponId,
    /// User 2's payment with `freed`, refunded in full.
    pub refunded: PaymentId,
    /// User 3's payment of 0 for an order of 200 with its coupon of `sold_out` (500 off).
    pub covered: PaymentId,
    /// Payments without a coupon: user 1's (`q-1`) and user 2's (`q-2`).
    pub plain_of_user_1: PaymentId,
    pub plain_of_user_2: PaymentId,
}

/// Coupons issued, used and freed through the ports, on a new, empty store: seeded users
/// 1..3 (10,000 each); two coupons; user 1 pays with its coupon; user 2 pays with its
/// coupon and is refunded in full; user 3's coupon pays a whole order (a payment of 0), and
/// it has a stored refusal of a coupon issue (`r-3`); users 1 and 2 each pay an order
/// without a coupon.
pub async fn write_coupon_books(audited: &Audited) -> CouponBooks {
    use super::support::{
        coupon_payment_step, current, issue_step, new_coupon, payment_step, refund_step,
    };
    let stores = &audited.stores;
    let users = stores.users.as_ref();
    stores
        .users
        .seed_users(3, Balance::from_stored(10_000), sec(0))
        .await
        .unwrap();
    let coupon = stores
        .coupons
        .create_coupon(new_coupon("A", 300, 3, 30), sec(0))
        .await
        .unwrap();
    let sold_out = stores
        .coupons
        .create_coupon(new_coupon("B", 500, 1, 30), sec(0))
        .await
        .unwrap();
    let mut held = Vec::new();
    for (who, of, raw) in [
        (1, &coupon, "i-1"),
        (2, &coupon, "i-2"),
        (3, &sold_out, "i-3"),
    ] {
        let now = current(users, user(who)).await;
        let applied = stores
            .balances
            .apply(issue_step(&now, of, raw, sec(1)))
            .await
            .unwrap();
        let id = applied.assigned.user_coupon_id.expect("a user coupon");
        held.push(stores.coupons.get_user_coupon(id).await.unwrap().unwrap());
    }
    let now = current(users, user(3)).await;
    stores
        .balances
        .record_refusal(RefusalRecord {
            user_id: now.id,
            expected_version: now.version,
            key: key_record(
                "r-3",
                OperationKind::CouponIssue,
                coupon_issue::fingerprint(now.id, coupon.id),
                sec(2),
            ),
            response: StoredResponse {
                status: 409,
                body: b"{\"code\":\"COUPON_SOLD_OUT\"}".to_vec(),
            },
        })
        .await
        .unwrap();

    // Each user pays an order with its coupon.
    let mut paid = Vec::new();
    for (who, amount, raw) in [(1, 1_000, "p-1"), (2, 500, "p-2"), (3, 200, "p-3")] {
        let order = stores
            .orders
            .create_order(user(who), Amount::from_stored(amount), sec(2))
            .await
            .unwrap();
        let now = current(users, user(who)).await;
        let coupon = &held[usize::try_from(who - 1).unwrap()];
        let applied = stores
            .balances
            .apply(coupon_payment_step(&now, &order, coupon, raw, sec(3)))
            .await
            .unwrap();
        paid.push((order.id, applied));
    }
    let refunded = paid[1].1.assigned.payment_id.expect("a payment");
    let payment = stores.orders.get_payment(refunded).await.unwrap().unwrap();
    let now = current(users, user(2)).await;
    stores
        .balances
        .apply(refund_step(&now, &payment, 200, 0, "f-2", sec(4)))
        .await
        .unwrap();

    let mut plain = Vec::new();
    for (who, raw) in [(1, "q-1"), (2, "q-2")] {
        let order = stores
            .orders
            .create_order(user(who), Amount::from_stored(50), sec(4))
            .await
            .unwrap();
        let now = current(users, user(who)).await;
        let applied = stores
            .balances
            .apply(payment_step(&now, &order, raw, sec(5)))
            .await
            .unwrap();
        plain.push(applied.assigned.payment_id.expect("a payment"));
    }

    CouponBooks {
        coupon: coupon.id,
        sold_out: sold_out.id,
        used: held[0].id,
        paid: paid[0].1.assigned.payment_id.expect("a payment"),
        paid_order: paid[0].0,
        paid_entry: super::support::entry_of(&paid[0].1),
        freed: held[1].id,
        refunded,
        covered: paid[2].1.assigned.payment_id.expect("a payment"),
        plain_of_user_1: plain[0],
        plain_of_user_2: plain[1],
    }
}

/// Writes the coupon books and proves they audit clean.
async fn clean_coupon_books(audited: &Audited) -> CouponBooks {
    let books = write_coupon_books(audited).await;
    let report = audited.audit().await;
    assert!(
        report.is_clean(),
        "the coupon books start clean: {report:#?}"
    );
    books
}

/// Coupons issued, used, covering a whole order and freed by a refund audit clean, with
/// every row counted: an order paid with a coupon is paid by the balance's part and the
/// discount together, a payment of 0 has its PAYMENT entry of 0, a coupon issue's record
/// has its user coupon and no ledger entry.
pub async fn auditor_finds_coupon_books_clean(audited: &Audited) {
    let books = write_coupon_books(audited).await;
    let report = audited.audit().await;
    assert!(report.is_clean(), "{report:#?}");
    assert_eq!((report.coupons, report.user_coupons), (2, 3));
    assert_eq!((report.users, report.orders, report.payments), (3, 5, 5));
    // 3 openings, 5 payments (one of 0) and the refund; issuing writes none.
    assert_eq!((report.ledger_entries, report.refunds), (9, 1));
    // i-1..3, r-3, p-1..3, f-2, q-1, q-2.
    assert_eq!(report.records, 10);
    let covered = audited
        .stores
        .orders
        .get_payment(books.covered)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(covered.amount.get(), 0, "the coupon covered the order");
}

/// `CouponStockMatchesIssued`: an issued count that is not the number of user coupons
/// (still within the stock).
pub async fn auditor_finds_an_issued_count_off_its_user_coupons(audited: &Audited) {
    let books = clean_coupon_books(audited).await;
    audited.corrupt.set_issued_quantity(books.coupon, 3).await;
    assert_finds(
        audited,
        &[found(
            AuditCheck::CouponStockMatchesIssued,
            format!("coupon {}", books.coupon),
        )],
    )
    .await;
    audited.corrupt.set_issued_quantity(books.coupon, 1).await;
    assert_finds(
        audited,
        &[found(
            AuditCheck::CouponStockMatchesIssued,
            format!("coupon {}", books.coupon),
        )],
    )
    .await;
}

/// A deleted user coupon: its coupon counts one more than it holds, and its issue's
/// record has no effect (the payment it paid is refunded in full: nothing else).
pub async fn auditor_finds_a_deleted_user_coupon(audited: &Audited) {
    let books = clean_coupon_books(audited).await;
    audited.corrupt.delete_user_coupon(books.freed).await;
    assert_finds(
        audited,
        &[
            found(
                AuditCheck::CouponStockMatchesIssued,
                format!("coupon {}", books.coupon),
            ),
            found(AuditCheck::RecordHasOneEffect, "user 2 key i-2"),
        ],
    )
    .await;
}

/// `RecordHasOneEffect`: a coupon issue stored as refused whose coupon was issued all
/// the same.
pub async fn auditor_finds_a_coupon_issue_turned_refusal(audited: &Audited) {
    clean_coupon_books(audited).await;
    audited
        .corrupt
        .set_record_outcome(user(2), "i-2", RecordOutcome::Refused)
        .await;
    assert_finds(
        audited,
        &[found(AuditCheck::RecordHasOneEffect, "user 2 key i-2")],
    )
    .await;
}

/// `RecordHasOneEffect`: a coupon issue that also moved money (a ledger entry of its key
/// and instant, the balance kept in step with it).
pub async fn auditor_finds_a_coupon_issue_with_a_ledger_entry(audited: &Audited) {
    clean_coupon_books(audited).await;
    let balance = super::support::current(audited.stores.users.as_ref(), user(2))
        .await
        .balance
        .get();
    audited
        .corrupt
        .insert_entry(ForgedEntry {
            user: user(2),
            kind: EntryKind::Charge,
            amount: 5,
            balance_after: balance + 5,
            key: Some(key("i-2")),
            at: sec(1),
        })
        .await;
    audited.corrupt.set_balance(user(2), balance + 5).await;
    assert_finds(
        audited,
        &[found(AuditCheck::RecordHasOneEffect, "user 2 key i-2")],
    )
    .await;
}

/// `RecordHasOneEffect`: a refused coupon issue whose coupon was issued all the same (the
/// coupon's count kept in step with it).
pub async fn auditor_finds_a_refused_coupon_issue_with_a_coupon(audited: &Audited) {
    let books = clean_coupon_books(audited).await;
    audited
        .corrupt
        .insert_user_coupon(ForgedUserCoupon {
            coupon: books.coupon,
            user: user(3),
            discount: 300,
            payment: None,
            issued_at: sec(2),
            expires_at: sec(2) + chrono::Duration::days(30),
            key: key("r-3"),
        })
        .await;
    audited.corrupt.set_issued_quantity(books.coupon, 3).await;
    assert_finds(
        audited,
        &[found(AuditCheck::RecordHasOneEffect, "user 3 key r-3")],
    )
    .await;
}

/// `CouponUseMatchesPayment`: a coupon set free while the payment it paid stands.
pub async fn auditor_finds_a_used_coupon_set_free(audited: &Audited) {
    let books = clean_coupon_books(audited).await;
    audited
        .corrupt
        .set_user_coupon_payment(books.used, None)
        .await;
    assert_finds(
        audited,
        &[found(
            AuditCheck::CouponUseMatchesPayment,
            format!("payment {}", books.paid),
        )],
    )
    .await;
}

/// `CouponUseMatchesPayment`: a coupon used by a payment that no longer holds it (refunded
/// in full), by one that names no coupon, and by another user's.
pub async fn auditor_finds_a_coupon_used_by_a_payment_not_its_own(audited: &Audited) {
    let books = clean_coupon_books(audited).await;
    let subject = format!("user coupon {}", books.freed);
    for payment in [books.refunded, books.plain_of_user_2, books.plain_of_user_1] {
        audited
            .corrupt
            .set_user_coupon_payment(books.freed, Some(payment))
            .await;
        let report = audited.audit().await;
        assert_eq!(
            breaches(&report),
            BTreeSet::from([(AuditCheck::CouponUseMatchesPayment, subject.clone())]),
            "used by payment {payment}: {report:#?}"
        );
        assert_eq!(report.total_found(), 1, "{report:#?}");
        audited
            .corrupt
            .set_user_coupon_payment(books.freed, None)
            .await;
        assert!(audited.audit().await.is_clean());
    }
}

/// A deleted payment with a coupon: its order and PAYMENT entry lose it, and its coupon is
/// used by a payment that does not exist.
pub async fn auditor_finds_a_deleted_payment_with_a_coupon(audited: &Audited) {
    let books = clean_coupon_books(audited).await;
    audited.corrupt.delete_payment(books.paid).await;
    assert_finds(
        audited,
        &[
            found(
                AuditCheck::PaidOrderHasOnePayment,
                format!("order {}", books.paid_order),
            ),
            found(
                AuditCheck::PaidOrderHasOnePayment,
                format!("ledger entry {}", books.paid_entry),
            ),
            found(
                AuditCheck::CouponUseMatchesPayment,
                format!("user coupon {}", books.used),
            ),
        ],
    )
    .await;
}
