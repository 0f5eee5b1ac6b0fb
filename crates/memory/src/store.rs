//! [`MemoryStore`]: users, ledgers, orders, payments, coupons and idempotency records in
//! one mutex-guarded [`State`]. Every port method is one critical section, so the atomic step
//! is exactly as atomic as a database transaction: it checks everything first, and only
//! then writes, with nothing that can fail in between.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use anyhow::Context as _;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use domain::idempotency::{CompletedRecord, RecordOutcome, StoredResponse};
use domain::model::{
    Coupon, CouponUse, EntryKind, HistoryPage, LedgerEntry, NewCoupon, Order, OrderStatus, Payment,
    Refund, User, UserCoupon,
};
use domain::operations::{Effect, IssueEffect, RefundEffect};
use domain::ports::{
    Applied, Assigned, BalanceChange, BalanceStore, BatchRead, BatchStep, BatchTransaction,
    CouponRepo, GateSnapshot, IdempotencyRepo, KeyRecord, OrderRepo, RefusalRecord, RepoError,
    StepError, UserRepo,
};
use domain::types::{
    Amount, Balance, CouponId, EntryId, IdempotencyKey, OrderId, PaymentId, RefundId, UserCouponId,
    UserId, ValidationError,
};

/// The in-memory store: every repository port and the atomic step over one shared state.
///
/// Cloning is cheap and every clone sees the same state, so one store can be handed out
/// as each of the ports.
#[derive(Clone, Default)]
pub struct MemoryStore {
    state: Arc<Mutex<State>>,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The state can be millions of rows; a debug print of the store must not dump it.
        f.debug_struct("MemoryStore").finish_non_exhaustive()
    }
}

impl MemoryStore {
    /// An empty store: no users, orders, payments or keys; every id sequence starts at 1.
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while the lock was held cannot have left a half-written step (every step
        // checks and builds all it needs before its first write), so the state is sound.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Everything the store holds. Each id sequence remembers the last id it handed out.
#[derive(Default)]
#[cfg_attr(test, derive(Clone, Debug, PartialEq))]
struct State {
    users: HashMap<UserId, User>,
    /// The highest user id in use: a created user takes the next one, so it never collides
    /// with a seeded user (seeding fills ids 1..=count, whatever exists above them).
    last_user_id: i64,
    /// Each user's ledger in id order: ids grow globally, so appending keeps it sorted.
    ledgers: HashMap<UserId, Vec<LedgerEntry>>,
    /// The expiry of the key's record written with each keyed entry, for the audit: the
    /// record is replaced when its key is used again, and the retention may change
    /// between runs of the service.
    key_expiry: HashMap<EntryId, DateTime<Utc>>,
    last_entry_id: i64,
    orders: HashMap<OrderId, Order>,
    last_order_id: i64,
    payments: HashMap<PaymentId, Payment>,
    /// At most one payment per order, like the unique `order_id` of the payments table.
    payment_of_order: HashMap<OrderId, PaymentId>,
    last_payment_id: i64,
    /// Each payment's refunds in id order.
    refunds: HashMap<PaymentId, Vec<Refund>>,
    last_refund_id: i64,
    /// Completed records by user, then by key: a lookup by `&str` needs no allocation.
    keys: HashMap<UserId, HashMap<String, CompletedRecord>>,
    /// The records of `keys` ordered by expiry, so a purge visits only what it deletes
    /// instead of scanning every record under the lock.
    expiries: BTreeSet<(DateTime<Utc>, UserId, String)>,
    coupons: HashMap<CouponId, Coupon>,
    last_coupon_id: i64,
    user_coupons: HashMap<UserCouponId, UserCoupon>,
    last_user_coupon_id: i64,
    /// At most one user coupon per coupon and user, like the unique `(coupon_id, user_id)`
    /// of the user_coupons table.
    holding: HashMap<(CouponId, UserId), UserCouponId>,
    /// Each coupon's user coupons in id order (the gate's snapshot, the audit's count).
    issued_of: HashMap<CouponId, Vec<UserCouponId>>,
    /// Each user's user coupons in id order (listings, newest first, and the audit).
    coupons_of_user: HashMap<UserId, Vec<UserCouponId>>,
}

/// The id after `last`, built by the id type's validating constructor.
fn next_id<T>(last: i64, make: fn(i64) -> Result<T, ValidationError>) -> anyhow::Result<T> {
    let raw = last
        .checked_add(1)
        .context("the id sequence is exhausted")?;
    Ok(make(raw)?)
}

impl State {
    fn create_user(&mut self, now: DateTime<Utc>) -> anyhow::Result<User> {
        let id = next_id(self.last_user_id, UserId::new)?;
        let user = User {
            id,
            balance: Balance::ZERO,
            version: 0,
            created_at: now,
        };
        self.users.insert(id, user.clone());
        self.last_user_id = id.get();
        Ok(user)
    }

    fn history(&self, user: UserId, before: Option<EntryId>, limit: u32) -> HistoryPage {
        let Some(entries) = self.ledgers.get(&user) else {
            return HistoryPage {
                items: Vec::new(),
                next: None,
            };
        };
        // The ledger is sorted by id, so the entries below `before` are a prefix of it.
        let end = before.map_or(entries.len(), |before| {
            entries.partition_point(|entry| entry.id < before)
        });
        let older = entries.get(..end).unwrap_or_default();
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        let items: Vec<LedgerEntry> = older.iter().rev().take(limit).cloned().collect();
        let next = if older.len() > items.len() {
            items.last().map(|entry| entry.id)
        } else {
            None
        };
        HistoryPage { items, next }
    }

    fn seed_users(
        &mut self,
        count: u32,
        balance: Balance,
        now: DateTime<Utc>,
    ) -> anyhow::Result<u64> {
        let mut created = 0;
        for raw in 1..=i64::from(count) {
            let id = UserId::new(raw)?;
            if self.users.contains_key(&id) {
                continue;
            }
            // The opening entry keeps the ledger summing to the balance; a zero balance
            // needs none (an entry's amount is always positive).
            if balance.get() > 0 {
                let entry_id = next_id(self.last_entry_id, EntryId::new)?;
                self.ledgers.entry(id).or_default().push(LedgerEntry {
                    id: entry_id,
                    user_id: id,
                    kind: EntryKind::Charge,
                    amount: Amount::from_stored(balance.get()),
                    balance_after: balance,
                    idempotency_key: None,
                    created_at: now,
                });
                self.last_entry_id = entry_id.get();
            }
            self.users.insert(
                id,
                User {
                    id,
                    balance,
                    version: 0,
                    created_at: now,
                },
            );
            self.last_user_id = self.last_user_id.max(raw);
            created += 1;
        }
        Ok(created)
    }

    fn create_order(
        &mut self,
        user: UserId,
        amount: Amount,
        now: DateTime<Utc>,
    ) -> anyhow::Result<Order> {
        let id = next_id(self.last_order_id, OrderId::new)?;
        let order = Order {
            id,
            user_id: user,
            amount,
            status: OrderStatus::Pending,
            created_at: now,
        };
        self.orders.insert(id, order.clone());
        self.last_order_id = id.get();
        Ok(order)
    }

    /// The record of (user, key) if it is still live at `now`.
    fn live_record(&self, user: UserId, key: &str, now: DateTime<Utc>) -> Option<&CompletedRecord> {
        self.keys
            .get(&user)?
            .get(key)
            .filter(|record| !record.is_expired(now))
    }

    /// The checks every step shares, in the order a transaction meets them: the user, its
    /// version, then the key (free, or taken only by an expired record).
    fn check_step(
        &self,
        user: UserId,
        expected_version: u64,
        key: &KeyRecord,
        now: DateTime<Utc>,
    ) -> Result<(), StepError> {
        let found = self.users.get(&user).ok_or(StepError::UserNotFound)?;
        if found.version != expected_version {
            return Err(StepError::VersionConflict);
        }
        if self.live_record(user, key.key.as_str(), now).is_some() {
            return Err(StepError::KeyTaken);
        }
        Ok(())
    }

    fn apply(&mut self, change: BalanceChange) -> Result<Applied, StepError> {
        let BalanceChange {
            user_id,
            expected_version,
            effect,
            at,
            key,
            respond,
        } = change;

        // Every check and every id first: after the first write nothing may fail. The
        // effect's own guards come after the user, version and key, as in a transaction.
        self.check_step(user_id, expected_version, &key, at)?;
        let new_version = expected_version
            .checked_add(1)
            .context("the user's version overflowed")?;
        // The one place this store looks at what an effect writes besides the balance.
        match &effect {
            Effect::Charge(_) | Effect::Use(_) => {}
            Effect::Pay { order, coupon, .. } => {
                self.check_payable(*order, user_id)?;
                if let Some(coupon) = coupon {
                    self.check_usable(coupon, user_id, at)?;
                }
            }
            Effect::Refund(refund) => self.check_refundable(refund, user_id)?,
            Effect::IssueCoupon(issue) => self.check_issuable(issue, user_id)?,
        }
        let ledger = effect.ledger();
        let entry_id = match ledger {
            Some(_) => Some(next_id(self.last_entry_id, EntryId::new)?),
            None => None,
        };
        let payment_id = match effect {
            Effect::Pay { .. } => Some(next_id(self.last_payment_id, PaymentId::new)?),
            _ => None,
        };
        let refund_id = match effect {
            Effect::Refund(_) => Some(next_id(self.last_refund_id, RefundId::new)?),
            _ => None,
        };
        let user_coupon_id = match effect {
            Effect::IssueCoupon(_) => Some(next_id(self.last_user_coupon_id, UserCouponId::new)?),
            _ => None,
        };
        let assigned = Assigned {
            entry_id,
            payment_id,
            refund_id,
            user_coupon_id,
        };
        // Called before the writes too, so a panicking encoder leaves nothing half-written.
        let response = respond(&assigned);

        if let Some(user) = self.users.get_mut(&user_id) {
            // An effect without a ledger entry (issuing) leaves the balance, not the version.
            if let Some((_, movement)) = ledger {
                user.balance = movement.balance_after;
            }
            user.version = new_version;
        }
        if let (Some((kind, movement)), Some(entry_id)) = (ledger, entry_id) {
            self.ledgers.entry(user_id).or_default().push(LedgerEntry {
                id: entry_id,
                user_id,
                kind,
                amount: movement.amount,
                balance_after: movement.balance_after,
                idempotency_key: Some(key.key.clone()),
                created_at: at,
            });
            self.key_expiry.insert(entry_id, key.expires_at);
            self.last_entry_id = entry_id.get();
        }
        match (&effect, payment_id, refund_id, user_coupon_id) {
            (
                Effect::Pay {
                    order,
                    movement,
                    coupon,
                },
                Some(payment_id),
                _,
                _,
            ) => {
                let payment = Payment {
                    id: payment_id,
                    order_id: *order,
                    user_id,
                    amount: movement.amount,
                    balance_after: movement.balance_after,
                    paid_at: at,
                    refunded_total: 0,
                    coupon: *coupon,
                };
                self.write_payment(payment);
            }
            (Effect::Refund(refund), _, Some(refund_id), _) => {
                self.write_refund(refund, refund_id, user_id, at);
            }
            (Effect::IssueCoupon(issue), _, _, Some(id)) => {
                self.write_issue(issue, id, user_id, &key.key, at);
            }
            _ => {}
        }
        self.put_record(user_id, key, RecordOutcome::Applied, response.clone());
        Ok(Applied { assigned, response })
    }

    /// `CouponChanged` unless the coupon exists, has a unit left and `user` holds none of
    /// it (the guarded update of the coupons row and the unique key of user_coupons).
    fn check_issuable(&self, issue: &IssueEffect, user: UserId) -> Result<(), StepError> {
        let left = self
            .coupons
            .get(&issue.coupon)
            .is_some_and(|coupon| coupon.issued_quantity < coupon.total_quantity);
        if !left || self.holding.contains_key(&(issue.coupon, user)) {
            return Err(StepError::CouponChanged);
        }
        Ok(())
    }

    /// `CouponChanged` unless the user coupon is `user`'s, used by no payment and not
    /// expired at `at` (the guarded update of the user_coupons row).
    fn check_usable(
        &self,
        coupon: &CouponUse,
        user: UserId,
        at: DateTime<Utc>,
    ) -> Result<(), StepError> {
        let usable = self
            .user_coupons
            .get(&coupon.user_coupon)
            .is_some_and(|found| {
                found.user_id == user && found.payment.is_none() && at < found.expires_at
            });
        if !usable {
            return Err(StepError::CouponChanged);
        }
        Ok(())
    }

    /// Writes a payment: its row, its order PAID and its user coupon USED by it. Checked
    /// by [`State::check_payable`] and [`State::check_usable`] first; nothing here fails.
    fn write_payment(&mut self, payment: Payment) {
        if let Some(order) = self.orders.get_mut(&payment.order_id) {
            order.status = OrderStatus::Paid;
        }
        if let Some(used) = payment.coupon
            && let Some(coupon) = self.user_coupons.get_mut(&used.user_coupon)
        {
            coupon.payment = Some(payment.id);
        }
        self.payment_of_order.insert(payment.order_id, payment.id);
        self.last_payment_id = payment.id.get();
        self.payments.insert(payment.id, payment);
    }

    /// Writes one unit of a coupon to `user`: the user coupon and the coupon's count.
    /// Checked by [`State::check_issuable`] first; nothing here fails.
    fn write_issue(
        &mut self,
        issue: &IssueEffect,
        id: UserCouponId,
        user: UserId,
        key: &IdempotencyKey,
        at: DateTime<Utc>,
    ) {
        if let Some(coupon) = self.coupons.get_mut(&issue.coupon) {
            coupon.issued_quantity += 1;
        }
        self.insert_user_coupon(UserCoupon {
            id,
            coupon_id: issue.coupon,
            user_id: user,
            discount: issue.discount,
            payment: None,
            issued_at: at,
            expires_at: issue.expires_at,
            idempotency_key: key.clone(),
        });
    }

    /// Adds a user coupon with the highest id yet to the table and its indexes (pushing
    /// keeps them in id order); the first of a (coupon, user) is the one `holding` names.
    fn insert_user_coupon(&mut self, coupon: UserCoupon) {
        let id = coupon.id;
        self.holding
            .entry((coupon.coupon_id, coupon.user_id))
            .or_insert(id);
        self.issued_of.entry(coupon.coupon_id).or_default().push(id);
        self.coupons_of_user
            .entry(coupon.user_id)
            .or_default()
            .push(id);
        self.last_user_coupon_id = self.last_user_coupon_id.max(id.get());
        self.user_coupons.insert(id, coupon);
    }

    fn create_coupon(&mut self, new: NewCoupon, now: DateTime<Utc>) -> anyhow::Result<Coupon> {
        let id = next_id(self.last_coupon_id, CouponId::new)?;
        let coupon = Coupon {
            id,
            name: new.name,
            discount: new.discount,
            total_quantity: new.total_quantity,
            issued_quantity: 0,
            issue_starts_at: new.issue_starts_at,
            issue_ends_at: new.issue_ends_at,
            valid_for_days: new.valid_for_days,
            created_at: now,
        };
        self.coupons.insert(id, coupon.clone());
        self.last_coupon_id = id.get();
        Ok(coupon)
    }

    /// The user's coupons, newest first, at most `limit`.
    fn user_coupons_of(&self, user: UserId, limit: u32) -> Vec<UserCoupon> {
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        self.coupons_of_user
            .get(&user)
            .into_iter()
            .flat_map(|ids| ids.iter().rev())
            .filter_map(|id| self.user_coupons.get(id))
            .take(limit)
            .cloned()
            .collect()
    }

    /// The coupon and every user it was issued to, with the key, in the order of issue.
    fn gate_snapshot(&self, id: CouponId) -> Option<GateSnapshot> {
        let coupon = self.coupons.get(&id)?.clone();
        let holders = self
            .issued_of
            .get(&id)
            .into_iter()
            .flatten()
            .filter_map(|id| self.user_coupons.get(id))
            .map(|held| (held.user_id, held.idempotency_key.clone()))
            .collect();
        Some(GateSnapshot { coupon, holders })
    }

    /// `OrderNotPending` unless `order` is this user's PENDING order without a payment; an
    /// order of another user is not payable by this one (as the MySQL store's guard has it).
    fn check_payable(&self, order: OrderId, user: UserId) -> Result<(), StepError> {
        match self.orders.get(&order) {
            Some(found)
                if found.user_id == user
                    && found.status == OrderStatus::Pending
                    && !self.payment_of_order.contains_key(&order) =>
            {
                Ok(())
            }
            _ => Err(StepError::OrderNotPending),
        }
    }

    /// `PaymentChanged` unless the refund's payment is this user's and its refunded total is
    /// still the one the refund was decided on, with room for the refund (the MySQL store's
    /// guarded update of the payments row).
    fn check_refundable(&self, refund: &RefundEffect, user: UserId) -> Result<(), StepError> {
        let guarded = self.payments.get(&refund.payment).is_some_and(|found| {
            found.user_id == user
                && found.refunded_total == refund.refunded_before
                && refund.refunded_after() <= found.amount.get()
        });
        if !guarded {
            return Err(StepError::PaymentChanged);
        }
        // As the MySQL store: a completing refund of a payment whose order is not PAID is
        // not a race but a broken row, which no retry mends.
        let order_paid = self
            .orders
            .get(&refund.order)
            .is_some_and(|order| order.status == OrderStatus::Paid);
        if refund.completes_payment() && !order_paid {
            return Err(StepError::Unexpected(anyhow::anyhow!(
                "order {} of payment {} is not PAID, so its payment cannot complete its refund",
                refund.order,
                refund.payment
            )));
        }
        Ok(())
    }

    /// Writes what a refund changes besides the balance: its row, the payment's refunded
    /// total and, once the payment is refunded in full, its order REFUNDED and its user
    /// coupon free again. Checked by [`State::check_refundable`] first; nothing here fails.
    fn write_refund(
        &mut self,
        refund: &RefundEffect,
        id: RefundId,
        user_id: UserId,
        at: DateTime<Utc>,
    ) {
        let refunded_total = refund.refunded_after();
        let mut coupon = None;
        if let Some(payment) = self.payments.get_mut(&refund.payment) {
            payment.refunded_total = refunded_total;
            coupon = payment.coupon.map(|used| used.user_coupon);
        }
        if refund.completes_payment() {
            if let Some(order) = self.orders.get_mut(&refund.order) {
                order.status = OrderStatus::Refunded;
            }
            // The payment row names its coupon; only a coupon this payment holds is freed
            // (`... where payment_id = ?`).
            if let Some(held) = coupon.and_then(|id| self.user_coupons.get_mut(&id))
                && held.payment == Some(refund.payment)
            {
                held.payment = None;
            }
        }
        self.refunds
            .entry(refund.payment)
            .or_default()
            .push(Refund {
                id,
                payment_id: refund.payment,
                order_id: refund.order,
                user_id,
                amount: refund.movement.amount,
                balance_after: refund.movement.balance_after,
                refunded_total,
                payment_status: refund.status_after(),
                reason: refund.reason.clone(),
                created_at: at,
            });
        self.last_refund_id = id.get();
    }

    /// The `balance_after` of the user's newest entry created at or before `at`.
    fn balance_at(&self, user: UserId, at: DateTime<Utc>) -> Option<Balance> {
        self.ledgers
            .get(&user)?
            .iter()
            .filter(|entry| entry.created_at <= at)
            .max_by_key(|entry| (entry.created_at, entry.id))
            .map(|entry| entry.balance_after)
    }

    /// Flips a PENDING order to CANCELLED; the order as it is afterwards.
    fn cancel_order(&mut self, id: OrderId) -> Option<Order> {
        let order = self.orders.get_mut(&id)?;
        if order.status == OrderStatus::Pending {
            order.status = OrderStatus::Cancelled;
        }
        Some(order.clone())
    }

    /// Every check first (each user at its version, every key free or expired), then
    /// every write: all of the batch or none of it.
    fn apply_batch(&mut self, batch: &BatchStep) -> Result<(), StepError> {
        let mut seen = BTreeSet::new();
        for user in &batch.users {
            // A user twice would pass both version checks and its second write would
            // overwrite the first: refused, as the database's write-every-row guard does.
            if !seen.insert(user.user_id) {
                return Err(StepError::VersionConflict);
            }
            let found = self
                .users
                .get(&user.user_id)
                .ok_or(StepError::UserNotFound)?;
            if found.version != user.expected_version {
                return Err(StepError::VersionConflict);
            }
            user.expected_version
                .checked_add(1)
                .context("the user's version overflowed")?;
            for write in &user.writes {
                if self
                    .live_record(user.user_id, write.key.key.as_str(), batch.at)
                    .is_some()
                {
                    return Err(StepError::KeyTaken);
                }
            }
        }
        let entries = batch
            .users
            .iter()
            .flat_map(|u| &u.writes)
            .filter(|w| w.ledger.is_some());
        let last_entry = self
            .last_entry_id
            .checked_add(entries.count() as i64)
            .context("ledger entry ids ran out")?;
        EntryId::new(last_entry).context("ledger entry ids ran out")?;
        for user in &batch.users {
            if let Some(row) = self.users.get_mut(&user.user_id) {
                row.balance = user.balance_after;
                row.version = user.expected_version.saturating_add(1);
            }
            for write in &user.writes {
                if let Some((kind, movement)) = write.ledger {
                    let id = next_id(self.last_entry_id, EntryId::new)?;
                    self.ledgers
                        .entry(user.user_id)
                        .or_default()
                        .push(LedgerEntry {
                            id,
                            user_id: user.user_id,
                            kind,
                            amount: movement.amount,
                            balance_after: movement.balance_after,
                            idempotency_key: Some(write.key.key.clone()),
                            created_at: batch.at,
                        });
                    self.key_expiry.insert(id, write.key.expires_at);
                    self.last_entry_id = id.get();
                }
                self.put_record(
                    user.user_id,
                    write.key.clone(),
                    write.outcome(),
                    write.response.clone(),
                );
            }
        }
        Ok(())
    }

    fn record_refusal(&mut self, refusal: RefusalRecord) -> Result<(), StepError> {
        let RefusalRecord {
            user_id,
            expected_version,
            key,
            response,
        } = refusal;
        // The refusal carries no instant of its own; the key's creation is "now".
        self.check_step(user_id, expected_version, &key, key.created_at)?;
        self.put_record(user_id, key, RecordOutcome::Refused, response);
        Ok(())
    }

    /// Stores the completed record of (user, key), replacing an expired one. The caller
    /// has checked that no live record exists.
    fn put_record(
        &mut self,
        user: UserId,
        key: KeyRecord,
        outcome: RecordOutcome,
        response: StoredResponse,
    ) {
        let name = key.key.as_str().to_owned();
        self.expiries.insert((key.expires_at, user, name.clone()));
        let record = CompletedRecord {
            user_id: user,
            key: key.key,
            fingerprint: key.fingerprint,
            operation: key.operation,
            outcome,
            response,
            created_at: key.created_at,
            expires_at: key.expires_at,
        };
        let replaced = self.keys.entry(user).or_default().insert(name, record);
        if let Some(old) = replaced {
            // Keep the expiry index an exact mirror of `keys`; the new record's own entry
            // is left alone when both happen to expire at the same instant.
            if old.expires_at != key.expires_at {
                self.expiries
                    .remove(&(old.expires_at, user, old.key.as_str().to_owned()));
            }
        }
    }

    fn purge_expired(&mut self, now: DateTime<Utc>, limit: u32) -> u64 {
        let mut purged = 0;
        while purged < u64::from(limit) {
            match self.expiries.first() {
                Some((expires_at, ..)) if *expires_at <= now => {}
                _ => break,
            }
            let Some((_, user, key)) = self.expiries.pop_first() else {
                break;
            };
            if let Some(records) = self.keys.get_mut(&user) {
                records.remove(&key);
                // An empty map per user would otherwise stay behind for every user ever seen.
                if records.is_empty() {
                    self.keys.remove(&user);
                }
            }
            purged += 1;
        }
        purged
    }

    /// Test-only: the user's ledger summed with signs, to compare with the balance.
    #[cfg(test)]
    fn ledger_sum(&self, user: UserId) -> i64 {
        self.ledgers.get(&user).map_or(0, |entries| {
            entries
                .iter()
                .map(|entry| entry.kind.sign() * entry.amount.get())
                .sum()
        })
    }

    /// Test-only: how many records the store holds, live or expired.
    #[cfg(test)]
    fn record_count(&self) -> usize {
        debug_assert_eq!(
            self.expiries.len(),
            self.keys.values().map(HashMap::len).sum::<usize>(),
            "the expiry index must mirror the records"
        );
        self.expiries.len()
    }
}

#[cfg(test)]
impl MemoryStore {
    pub(crate) fn ledger_sum(&self, user: UserId) -> i64 {
        self.state().ledger_sum(user)
    }

    pub(crate) fn record_count(&self) -> usize {
        self.state().record_count()
    }

    /// A copy of the whole state, to prove that a failed step wrote nothing at all.
    fn snapshot(&self) -> State {
        self.state().clone()
    }
}

#[async_trait]
impl UserRepo for MemoryStore {
    async fn create_user(&self, now: DateTime<Utc>) -> Result<User, RepoError> {
        Ok(self.state().create_user(now)?)
    }

    async fn get_user(&self, id: UserId) -> Result<Option<User>, RepoError> {
        Ok(self.state().users.get(&id).cloned())
    }

    async fn history(
        &self,
        id: UserId,
        before: Option<EntryId>,
        limit: u32,
    ) -> Result<HistoryPage, RepoError> {
        Ok(self.state().history(id, before, limit))
    }

    async fn balance_at(
        &self,
        id: UserId,
        at: DateTime<Utc>,
    ) -> Result<Option<Balance>, RepoError> {
        Ok(self.state().balance_at(id, at))
    }

    async fn seed_users(
        &self,
        count: u32,
        balance: Balance,
        now: DateTime<Utc>,
    ) -> Result<u64, RepoError> {
        Ok(self.state().seed_users(count, balance, now)?)
    }
}

#[async_trait]
impl OrderRepo for MemoryStore {
    async fn create_order(
        &self,
        user: UserId,
        amount: Amount,
        now: DateTime<Utc>,
    ) -> Result<Order, RepoError> {
        Ok(self.state().create_order(user, amount, now)?)
    }

    async fn get_order(&self, id: OrderId) -> Result<Option<Order>, RepoError> {
        Ok(self.state().orders.get(&id).cloned())
    }

    async fn get_payment(&self, id: PaymentId) -> Result<Option<Payment>, RepoError> {
        Ok(self.state().payments.get(&id).cloned())
    }

    async fn refunds(&self, payment: PaymentId, limit: u32) -> Result<Vec<Refund>, RepoError> {
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        Ok(self
            .state()
            .refunds
            .get(&payment)
            .map(|refunds| refunds.iter().take(limit).cloned().collect())
            .unwrap_or_default())
    }

    async fn cancel_order(&self, id: OrderId) -> Result<Option<Order>, RepoError> {
        Ok(self.state().cancel_order(id))
    }
}

#[async_trait]
impl CouponRepo for MemoryStore {
    async fn create_coupon(
        &self,
        coupon: NewCoupon,
        now: DateTime<Utc>,
    ) -> Result<Coupon, RepoError> {
        Ok(self.state().create_coupon(coupon, now)?)
    }

    async fn get_coupon(&self, id: CouponId) -> Result<Option<Coupon>, RepoError> {
        Ok(self.state().coupons.get(&id).cloned())
    }

    async fn get_user_coupon(&self, id: UserCouponId) -> Result<Option<UserCoupon>, RepoError> {
        Ok(self.state().user_coupons.get(&id).cloned())
    }

    async fn holding(
        &self,
        coupon: CouponId,
        user: UserId,
    ) -> Result<Option<UserCoupon>, RepoError> {
        let state = self.state();
        Ok(state
            .holding
            .get(&(coupon, user))
            .and_then(|id| state.user_coupons.get(id))
            .cloned())
    }

    async fn user_coupons(&self, user: UserId, limit: u32) -> Result<Vec<UserCoupon>, RepoError> {
        Ok(self.state().user_coupons_of(user, limit))
    }

    async fn coupon_ids(
        &self,
        after: Option<CouponId>,
        limit: u32,
    ) -> Result<Vec<CouponId>, RepoError> {
        let state = self.state();
        let mut ids: Vec<CouponId> = state
            .coupons
            .keys()
            .copied()
            .filter(|id| after.is_none_or(|after| *id > after))
            .collect();
        ids.sort_unstable();
        ids.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
        Ok(ids)
    }

    async fn gate_snapshot(&self, coupon: CouponId) -> Result<Option<GateSnapshot>, RepoError> {
        Ok(self.state().gate_snapshot(coupon))
    }
}

#[async_trait]
impl IdempotencyRepo for MemoryStore {
    async fn find(
        &self,
        user: UserId,
        key: &IdempotencyKey,
        now: DateTime<Utc>,
    ) -> Result<Option<CompletedRecord>, RepoError> {
        Ok(self.state().live_record(user, key.as_str(), now).cloned())
    }

    async fn find_many(
        &self,
        keys: &[(UserId, IdempotencyKey)],
        now: DateTime<Utc>,
    ) -> Result<Vec<CompletedRecord>, RepoError> {
        let state = self.state();
        Ok(keys
            .iter()
            .filter_map(|(user, key)| state.live_record(*user, key.as_str(), now).cloned())
            .collect())
    }

    async fn insert_refusal(
        &self,
        user: UserId,
        key: &KeyRecord,
        response: &StoredResponse,
    ) -> Result<Option<CompletedRecord>, RepoError> {
        let mut state = self.state();
        if let Some(live) = state.live_record(user, key.key.as_str(), key.created_at) {
            return Ok(Some(live.clone()));
        }
        state.put_record(user, key.clone(), RecordOutcome::Refused, response.clone());
        Ok(None)
    }

    async fn purge_expired(&self, now: DateTime<Utc>, limit: u32) -> Result<u64, RepoError> {
        Ok(self.state().purge_expired(now, limit))
    }
}

#[async_trait]
impl BalanceStore for MemoryStore {
    async fn apply(&self, change: BalanceChange) -> Result<Applied, StepError> {
        self.state().apply(change)
    }

    async fn record_refusal(&self, refusal: RefusalRecord) -> Result<(), StepError> {
        self.state().record_refusal(refusal)
    }

    async fn begin_batch(
        &self,
        users: &[UserId],
        keys: &[(UserId, IdempotencyKey)],
        now: DateTime<Utc>,
    ) -> Result<Box<dyn BatchTransaction>, StepError> {
        let read = {
            let state = self.state();
            BatchRead {
                users: users
                    .iter()
                    .filter_map(|id| state.users.get(id).cloned())
                    .collect(),
                records: keys
                    .iter()
                    .filter_map(|(user, key)| state.live_record(*user, key.as_str(), now).cloned())
                    .collect(),
            }
        };
        Ok(Box::new(MemoryBatch {
            store: self.clone(),
            read,
        }))
    }
}

/// A batch's transaction in memory: its read, then its write in one critical section of
/// the store's lock, each row only at the version read (no row is locked in between).
struct MemoryBatch {
    store: MemoryStore,
    read: BatchRead,
}

#[async_trait]
impl BatchTransaction for MemoryBatch {
    fn read(&self) -> &BatchRead {
        &self.read
    }

    async fn commit(self: Box<Self>, batch: &BatchStep) -> Result<(), StepError> {
        self.store.state().apply_batch(batch)
    }
}

mod audit;
#[cfg(feature = "tamper")]
mod tamper;

#[cfg(feature = "tamper")]
pub use tamper::Tamper;

#[cfg(test)]
mod tests;
