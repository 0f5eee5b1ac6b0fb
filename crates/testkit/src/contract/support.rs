//! What the suites share: fixed instants, value builders, a step builder, and a snapshot
//! of everything a failed step must have left alone.

use std::future::Future;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use domain::idempotency::{CompletedRecord, Fingerprint, StoredResponse};
use domain::model::{EntryKind, LedgerEntry, Order, Payment, User};
use domain::operations::{Effect, Movement, OperationKind, RefundEffect};
use domain::ports::{Applied, Assigned, BalanceChange, KeyRecord, UserRepo};
use domain::types::{
    Amount, Balance, IdempotencyKey, Limits, OrderId, PaymentId, RefundReason, UserId,
};

use super::Stores;

/// How long a completed record lives when a suite does not say otherwise.
pub(crate) const DAY_MS: i64 = 24 * 3600 * 1000;

/// The suites' epoch: a whole second, so every instant below is exact to the millisecond.
pub(crate) fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0)
        .single()
        .expect("a valid instant")
}

/// `ms` milliseconds after [`t0`].
pub(crate) fn at(ms: i64) -> DateTime<Utc> {
    t0() + chrono::Duration::milliseconds(ms)
}

pub(crate) fn key(raw: &str) -> IdempotencyKey {
    IdempotencyKey::parse(raw).expect("a valid idempotency key")
}

pub(crate) fn user_id(raw: i64) -> UserId {
    UserId::new(raw).expect("a positive user id")
}

pub(crate) fn order_id(raw: i64) -> OrderId {
    OrderId::new(raw).expect("a positive order id")
}

pub(crate) fn amount(raw: i64) -> Amount {
    Amount::new(raw, &Limits::default()).expect("a valid amount")
}

pub(crate) fn balance(raw: i64) -> Balance {
    Balance::new(raw, &Limits::default()).expect("a valid balance")
}

/// The key's record as a step writes it: created at `created`, live for `ttl_ms`, of a
/// charge unless the test says otherwise.
pub(crate) fn key_record(
    raw: &str,
    fingerprint: &str,
    created: DateTime<Utc>,
    ttl_ms: i64,
) -> KeyRecord {
    KeyRecord {
        key: key(raw),
        fingerprint: Fingerprint::from_stored(fingerprint),
        operation: OperationKind::Charge,
        created_at: created,
        expires_at: created + chrono::Duration::milliseconds(ttl_ms),
    }
}

/// The response a step stores: it names the ids the store assigned, and its body is not
/// valid UTF-8 (a zero byte and 0xFF), so only a byte-exact store gives it back unchanged.
pub(crate) fn naming_ids(assigned: &Assigned) -> StoredResponse {
    let mut body = format!(
        "entry={};payment={}",
        assigned.entry_id,
        assigned
            .payment_id
            .map_or_else(|| "none".to_owned(), |p| p.to_string())
    )
    .into_bytes();
    body.extend_from_slice(&[0x00, 0xff, b'\n']);
    StoredResponse { status: 200, body }
}

/// A step on `user`'s current state: `kind` of `amount`, under `raw_key`, at `when`, its
/// record live for a day. Tests change single fields of it to make it fail.
pub(crate) fn step(
    user: &User,
    kind: EntryKind,
    amount_raw: i64,
    raw_key: &str,
    when: DateTime<Utc>,
) -> BalanceChange {
    let movement = Movement {
        amount: amount(amount_raw),
        balance_after: balance(user.balance.get() + kind.sign() * amount_raw),
    };
    let (effect, operation) = match kind {
        EntryKind::Charge => (Effect::Charge(movement), OperationKind::Charge),
        EntryKind::Use => (Effect::Use(movement), OperationKind::Use),
        // Paying needs an order, refunding a payment: `payment_step` and `refund_step`.
        EntryKind::Payment => panic!("a payment step is built by payment_step"),
        EntryKind::Refund => panic!("a refund step is built by refund_step"),
    };
    let mut key = key_record(
        raw_key,
        &format!("{}:user={}:amount={amount_raw}", kind.as_str(), user.id),
        when,
        DAY_MS,
    );
    key.operation = operation;
    BalanceChange {
        user_id: user.id,
        expected_version: user.version,
        effect,
        at: when,
        key,
        respond: Box::new(naming_ids),
    }
}

/// A payment of `order` by its user, who must hold enough.
pub(crate) fn payment_step(
    user: &User,
    order: &Order,
    raw_key: &str,
    when: DateTime<Utc>,
) -> BalanceChange {
    let mut change = step(user, EntryKind::Use, order.amount.get(), raw_key, when);
    change.effect = Effect::Pay {
        order: order.id,
        movement: change.effect.movement(),
    };
    change.key.operation = OperationKind::Payment;
    change.key.fingerprint =
        Fingerprint::from_stored(format!("payment:user={}:order={}", user.id, order.id));
    change
}

/// A refund of `amount_raw` of `payment` by its user, decided on the payment's refunded
/// total `refunded_before`.
pub(crate) fn refund_step(
    user: &User,
    payment: &Payment,
    amount_raw: i64,
    refunded_before: i64,
    raw_key: &str,
    when: DateTime<Utc>,
) -> BalanceChange {
    let mut change = step(user, EntryKind::Charge, amount_raw, raw_key, when);
    change.effect = Effect::Refund(RefundEffect {
        payment: payment.id,
        order: payment.order_id,
        movement: change.effect.movement(),
        payment_amount: payment.amount,
        refunded_before,
        reason: RefundReason::parse("contract").ok(),
    });
    change.key.operation = OperationKind::Refund;
    change.key.fingerprint = Fingerprint::from_stored(format!(
        "refund:user={}:payment={}:amount={amount_raw}",
        user.id, payment.id
    ));
    change
}

/// The user as stored now; it must exist.
pub(crate) async fn current(users: &dyn UserRepo, id: UserId) -> User {
    users
        .get_user(id)
        .await
        .expect("get_user")
        .unwrap_or_else(|| panic!("user {id} exists"))
}

/// Reads `id`, then applies `kind` of `amount` on that state; the step must succeed.
pub(crate) async fn apply_ok(
    stores: &Stores,
    id: UserId,
    kind: EntryKind,
    amount_raw: i64,
    raw_key: &str,
    when: DateTime<Utc>,
) -> Applied {
    let user = current(stores.users.as_ref(), id).await;
    stores
        .balances
        .apply(step(&user, kind, amount_raw, raw_key, when))
        .await
        .unwrap_or_else(|e| panic!("{} of {amount_raw} for user {id}: {e:?}", kind.as_str()))
}

/// A new user with `funds` charged under the key `fund`: balance `funds`, version 1.
pub(crate) async fn funded_user(stores: &Stores, funds: i64, when: DateTime<Utc>) -> User {
    let created = stores.users.create_user(when).await.expect("create_user");
    apply_ok(stores, created.id, EntryKind::Charge, funds, "fund", when).await;
    current(stores.users.as_ref(), created.id).await
}

/// The user's whole ledger, newest first, read page by page.
pub(crate) async fn full_history(users: &dyn UserRepo, id: UserId) -> Vec<LedgerEntry> {
    let mut entries = Vec::new();
    let mut before = None;
    loop {
        let page = users.history(id, before, 500).await.expect("history");
        entries.extend(page.items);
        match page.next {
            Some(next) => before = Some(next),
            None => return entries,
        }
    }
}

/// The ledger's entries summed with their signs: what the balance must be.
pub(crate) fn ledger_sum(entries: &[LedgerEntry]) -> i64 {
    entries
        .iter()
        .map(|entry| entry.kind.sign() * entry.amount.get())
        .sum()
}

/// What a suite watches to prove that a refused step wrote nothing.
#[derive(Debug, Default)]
pub(crate) struct Watch<'a> {
    pub users: Vec<UserId>,
    pub keys: Vec<(UserId, &'a str)>,
    pub orders: Vec<OrderId>,
}

/// Everything [`Watch`] names, as stored at one moment.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Snapshot {
    users: Vec<(Option<User>, Vec<LedgerEntry>)>,
    records: Vec<Option<CompletedRecord>>,
    orders: Vec<Option<Order>>,
    /// Payments 1..=[`PAYMENT_IDS_WATCHED`]: a fresh store's payments all have ids in there.
    payments: Vec<Option<Payment>>,
}

/// How many payment ids a snapshot looks at.
pub(crate) const PAYMENT_IDS_WATCHED: i64 = 20;

impl Watch<'_> {
    /// Reads everything watched; records as live at `now`.
    pub(crate) async fn snapshot(&self, stores: &Stores, now: DateTime<Utc>) -> Snapshot {
        let mut users = Vec::new();
        for id in &self.users {
            let user = stores.users.get_user(*id).await.expect("get_user");
            users.push((user, full_history(stores.users.as_ref(), *id).await));
        }
        let mut records = Vec::new();
        for (user, raw) in &self.keys {
            let found = stores
                .idempotency
                .find(*user, &key(raw), now)
                .await
                .expect("find");
            records.push(found);
        }
        let mut orders = Vec::new();
        for id in &self.orders {
            orders.push(stores.orders.get_order(*id).await.expect("get_order"));
        }
        Snapshot {
            users,
            records,
            orders,
            payments: payments(stores).await,
        }
    }
}

/// Payments 1..=[`PAYMENT_IDS_WATCHED`], as stored.
pub(crate) async fn payments(stores: &Stores) -> Vec<Option<Payment>> {
    let mut found = Vec::new();
    for raw in 1..=PAYMENT_IDS_WATCHED {
        let id = PaymentId::new(raw).expect("a positive payment id");
        found.push(stores.orders.get_payment(id).await.expect("get_payment"));
    }
    found
}

/// Awaits `future`, failing the test instead of hanging it when an adapter deadlocks.
pub(crate) async fn bounded<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(30), future)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within 30 s"))
}
