//! What the suites share: fixed instants, value builders, a step builder, and a snapshot
//! of everything a failed step must have left alone.

use std::future::Future;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use domain::idempotency::{CompletedRecord, Fingerprint, StoredResponse};
use domain::model::{
    Coupon, CouponUse, EntryKind, LedgerEntry, NewCoupon, Order, Payment, User, UserCoupon,
};
use domain::operations::{
    Effect, IssueEffect, Movement, OperationKind, RefundEffect, coupon_issue, pay,
};
use domain::ports::{Applied, Assigned, BalanceChange, GateSnapshot, KeyRecord, UserRepo};
use domain::types::{
    Amount, Balance, CouponId, CouponName, EntryId, IdempotencyKey, Limits, OrderId, PaymentId,
    RefundReason, UserId,
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
    fn named(id: Option<impl std::fmt::Display>) -> String {
        id.map_or_else(|| "none".to_owned(), |id| id.to_string())
    }
    let mut body = format!(
        "entry={};payment={};refund={};coupon={}",
        named(assigned.entry_id),
        named(assigned.payment_id),
        named(assigned.refund_id),
        named(assigned.user_coupon_id),
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
        movement: movement_of(&change),
        coupon: None,
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
        movement: movement_of(&change),
        payment_amount: payment.amount,
        refunded_before,
        reason: RefundReason::parse("contract").ok(),
        coupon: payment.coupon.map(|used| used.user_coupon),
    });
    change.key.operation = OperationKind::Refund;
    change.key.fingerprint = Fingerprint::from_stored(format!(
        "refund:user={}:payment={}:amount={amount_raw}",
        user.id, payment.id
    ));
    change
}

/// The movement of a step built by [`step`] (a charge or a use: it has one).
fn movement_of(change: &BalanceChange) -> Movement {
    change
        .effect
        .movement()
        .expect("a charge or a use moves money")
}

/// The ledger entry a step that moves money wrote.
pub(crate) fn entry_of(applied: &Applied) -> EntryId {
    applied
        .assigned
        .entry_id
        .expect("a step that moves money writes a ledger entry")
}

/// A coupon to create: `discount` off, `total` in stock, issuing open from [`t0`] on for
/// good, each unit usable for `days` days.
pub(crate) fn new_coupon(name: &str, discount: i64, total: i64, days: i64) -> NewCoupon {
    NewCoupon::new(
        CouponName::parse(name).expect("a valid coupon name"),
        amount(discount),
        total,
        Some(t0()),
        None,
        Some(days),
        t0(),
    )
    .expect("a valid coupon")
}

/// Issuing one unit of `coupon` to `user` at `when`, under `raw_key`, as the use case
/// builds it from `user`'s current state.
pub(crate) fn issue_step(
    user: &User,
    coupon: &Coupon,
    raw_key: &str,
    when: DateTime<Utc>,
) -> BalanceChange {
    let mut key = key_record(
        raw_key,
        coupon_issue::fingerprint(user.id, coupon.id).as_str(),
        when,
        DAY_MS,
    );
    key.operation = OperationKind::CouponIssue;
    BalanceChange {
        user_id: user.id,
        expected_version: user.version,
        effect: Effect::IssueCoupon(IssueEffect {
            coupon: coupon.id,
            discount: coupon.discount,
            expires_at: coupon.expiry_for(when),
        }),
        at: when,
        key,
        respond: Box::new(naming_ids),
    }
}

/// A payment of `order` by its user with `coupon` (its discount off, never below 0), as
/// the use case builds it; the user must hold enough for the rest.
pub(crate) fn coupon_payment_step(
    user: &User,
    order: &Order,
    coupon: &UserCoupon,
    raw_key: &str,
    when: DateTime<Utc>,
) -> BalanceChange {
    let (charged, discount) = order.amount.less(coupon.discount);
    let fingerprint = pay::fingerprint(user.id, order.id, Some(coupon.id));
    let mut key = key_record(raw_key, fingerprint.as_str(), when, DAY_MS);
    key.operation = OperationKind::Payment;
    BalanceChange {
        user_id: user.id,
        expected_version: user.version,
        effect: Effect::Pay {
            order: order.id,
            movement: Movement {
                amount: charged,
                balance_after: balance(user.balance.get() - charged.get()),
            },
            coupon: Some(CouponUse {
                user_coupon: coupon.id,
                discount,
            }),
        },
        at: when,
        key,
        respond: Box::new(naming_ids),
    }
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
    /// Each user with its ledger and its coupons.
    users: Vec<(Option<User>, Vec<LedgerEntry>, Vec<UserCoupon>)>,
    records: Vec<Option<CompletedRecord>>,
    orders: Vec<Option<Order>>,
    /// Payments 1..=[`PAYMENT_IDS_WATCHED`]: a fresh store's payments all have ids in there.
    payments: Vec<Option<Payment>>,
    /// Coupons 1..=[`COUPON_IDS_WATCHED`] with their holders (sorted), likewise.
    coupons: Vec<Option<GateSnapshot>>,
}

/// How many payment ids a snapshot looks at.
pub(crate) const PAYMENT_IDS_WATCHED: i64 = 20;
/// How many coupon ids a snapshot looks at.
pub(crate) const COUPON_IDS_WATCHED: i64 = 5;
/// More coupons than any suite issues to one user.
const COUPONS_PER_USER_WATCHED: u32 = 100;

impl Watch<'_> {
    /// Reads everything watched; records as live at `now`.
    pub(crate) async fn snapshot(&self, stores: &Stores, now: DateTime<Utc>) -> Snapshot {
        let mut users = Vec::new();
        for id in &self.users {
            let user = stores.users.get_user(*id).await.expect("get_user");
            let coupons = stores
                .coupons
                .user_coupons(*id, COUPONS_PER_USER_WATCHED)
                .await
                .expect("user_coupons");
            users.push((
                user,
                full_history(stores.users.as_ref(), *id).await,
                coupons,
            ));
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
        let mut coupons = Vec::new();
        for raw in 1..=COUPON_IDS_WATCHED {
            let id = CouponId::new(raw).expect("a positive coupon id");
            coupons.push(gate_snapshot(stores, id).await);
        }
        Snapshot {
            users,
            records,
            orders,
            payments: payments(stores).await,
            coupons,
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

/// The coupon and its holders as stored, the holders sorted (the port names no order).
pub(crate) async fn gate_snapshot(stores: &Stores, id: CouponId) -> Option<GateSnapshot> {
    let mut found = stores
        .coupons
        .gate_snapshot(id)
        .await
        .expect("gate_snapshot")?;
    found.holders.sort();
    Some(found)
}

/// Awaits `future`, failing the test instead of hanging it when an adapter deadlocks.
pub(crate) async fn bounded<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(30), future)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within 30 s"))
}
