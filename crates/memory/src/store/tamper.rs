//! Test support (feature `tamper`): writes to the state that no port makes, so the audit's
//! contract suites (`testkit::contract`) can corrupt the in-memory books the way a bug
//! would, as they corrupt MySQL's with raw SQL. Each write changes exactly the one thing
//! it names and keeps the store's own indexes consistent with it (the ledger sorted by id,
//! `payment_of_order` mirroring `payments`, the user coupons' indexes mirroring them), so
//! the audit sees the corruption and nothing else. Each returns whether its subject
//! existed.

use std::sync::MutexGuard;

use chrono::{DateTime, Utc};
use domain::idempotency::RecordOutcome;
use domain::model::{EntryKind, LedgerEntry, OrderStatus, UserCoupon};
use domain::types::{
    Amount, Balance, CouponId, EntryId, IdempotencyKey, OrderId, PaymentId, UserCouponId, UserId,
};

use super::{MemoryStore, State, next_id};

/// The store's state, held (its mutex locked) while the test tampers with it.
pub struct Tamper<'a>(MutexGuard<'a, State>);

impl std::fmt::Debug for Tamper<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tamper").finish_non_exhaustive()
    }
}

impl MemoryStore {
    /// The state, to tamper with; every port waits until the `Tamper` is dropped.
    pub fn tamper(&self) -> Tamper<'_> {
        Tamper(self.state())
    }
}

impl Tamper<'_> {
    /// Sets `user`'s balance; its ledger and version stay.
    pub fn set_balance(&mut self, user: UserId, balance: i64) -> bool {
        self.0
            .users
            .get_mut(&user)
            .map(|found| found.balance = Balance::from_stored(balance))
            .is_some()
    }

    /// Deletes `user`'s row; its ledger, records, orders and payments stay.
    pub fn delete_user(&mut self, user: UserId) -> bool {
        self.0.users.remove(&user).is_some()
    }

    /// Appends a ledger entry no step wrote, with the next id and no record expiry kept
    /// for it (as an entry written before expiries were kept); returns its id.
    pub fn insert_entry(
        &mut self,
        user: UserId,
        kind: EntryKind,
        amount: i64,
        balance_after: i64,
        key: Option<IdempotencyKey>,
        created_at: DateTime<Utc>,
    ) -> Option<EntryId> {
        let id = next_id(self.0.last_entry_id, EntryId::new).ok()?;
        self.0.last_entry_id = id.get();
        // The next id is the highest: pushing keeps the ledger sorted by id.
        self.0.ledgers.entry(user).or_default().push(LedgerEntry {
            id,
            user_id: user,
            kind,
            amount: Amount::from_stored(amount),
            balance_after: Balance::from_stored(balance_after),
            idempotency_key: key,
            created_at,
        });
        Some(id)
    }

    /// Deletes ledger entry `id`.
    pub fn delete_entry(&mut self, id: EntryId) -> bool {
        for entries in self.0.ledgers.values_mut() {
            if let Some(at) = entries.iter().position(|entry| entry.id == id) {
                entries.remove(at);
                self.0.key_expiry.remove(&id);
                return true;
            }
        }
        false
    }

    /// Adds `by` to ledger entry `id`'s `balance_after`.
    pub fn shift_balance_after(&mut self, id: EntryId, by: i64) -> bool {
        self.entry(id)
            .map(|entry| {
                entry.balance_after = Balance::from_stored(entry.balance_after.get() + by);
            })
            .is_some()
    }

    /// Moves ledger entry `id` by `by` in time.
    pub fn shift_entry_time(&mut self, id: EntryId, by: chrono::Duration) -> bool {
        self.entry(id).map(|entry| entry.created_at += by).is_some()
    }

    /// Rewrites what the record of (`user`, `key`) says happened; its effects stay.
    pub fn set_record_outcome(&mut self, user: UserId, key: &str, outcome: RecordOutcome) -> bool {
        self.record(user, key)
            .map(|record| record.outcome = outcome)
            .is_some()
    }

    /// Rewrites the HTTP status stored in the record of (`user`, `key`).
    pub fn set_record_status(&mut self, user: UserId, key: &str, status: u16) -> bool {
        self.record(user, key)
            .map(|record| record.response.status = status)
            .is_some()
    }

    /// Sets order `id`'s status; its payment, if any, stays.
    pub fn set_order_status(&mut self, id: OrderId, status: OrderStatus) -> bool {
        self.0
            .orders
            .get_mut(&id)
            .map(|order| order.status = status)
            .is_some()
    }

    /// Deletes payment `id`; its order and ledger entry stay.
    pub fn delete_payment(&mut self, id: PaymentId) -> bool {
        let Some(payment) = self.0.payments.remove(&id) else {
            return false;
        };
        if self.0.payment_of_order.get(&payment.order_id) == Some(&id) {
            self.0.payment_of_order.remove(&payment.order_id);
        }
        true
    }

    /// Sets payment `id`'s refunded total; its refunds stay.
    pub fn set_refunded_total(&mut self, id: PaymentId, total: i64) -> bool {
        self.0
            .payments
            .get_mut(&id)
            .map(|payment| payment.refunded_total = total)
            .is_some()
    }

    /// Sets coupon `id`'s issued count; its user coupons stay.
    pub fn set_issued_quantity(&mut self, id: CouponId, issued: u32) -> bool {
        self.0
            .coupons
            .get_mut(&id)
            .map(|coupon| coupon.issued_quantity = issued)
            .is_some()
    }

    /// Sets coupon `id`'s stock; its count and user coupons stay.
    pub fn set_total_quantity(&mut self, id: CouponId, total: u32) -> bool {
        self.0
            .coupons
            .get_mut(&id)
            .map(|coupon| coupon.total_quantity = total)
            .is_some()
    }

    /// Deletes user coupon `id`; its coupon's count, its record and any payment that
    /// names it stay.
    pub fn delete_user_coupon(&mut self, id: UserCouponId) -> bool {
        let state = &mut *self.0;
        let Some(gone) = state.user_coupons.remove(&id) else {
            return false;
        };
        let holder = (gone.coupon_id, gone.user_id);
        if state.holding.get(&holder) == Some(&id) {
            state.holding.remove(&holder);
            // A second coupon of the same user (only ever tampered in) holds it now.
            let next = state
                .issued_of
                .get(&gone.coupon_id)
                .into_iter()
                .flatten()
                .filter(|other| **other != id)
                .find(|other| {
                    state
                        .user_coupons
                        .get(other)
                        .is_some_and(|c| c.user_id == gone.user_id)
                })
                .copied();
            if let Some(next) = next {
                state.holding.insert(holder, next);
            }
        }
        if let Some(ids) = state.issued_of.get_mut(&gone.coupon_id) {
            ids.retain(|other| *other != id);
        }
        if let Some(ids) = state.coupons_of_user.get_mut(&gone.user_id) {
            ids.retain(|other| *other != id);
        }
        true
    }

    /// Adds a user coupon no step wrote, with the next id (a second one of a (coupon,
    /// user) included: a row MySQL's unique key cannot hold); its coupon's count stays.
    /// Returns its id.
    pub fn insert_user_coupon(&mut self, mut coupon: UserCoupon) -> Option<UserCouponId> {
        let id = next_id(self.0.last_user_coupon_id, UserCouponId::new).ok()?;
        coupon.id = id;
        self.0.insert_user_coupon(coupon);
        Some(id)
    }

    /// Sets which payment uses user coupon `id` (`None`: free); the payments stay.
    pub fn set_user_coupon_payment(
        &mut self,
        id: UserCouponId,
        payment: Option<PaymentId>,
    ) -> bool {
        self.0
            .user_coupons
            .get_mut(&id)
            .map(|coupon| coupon.payment = payment)
            .is_some()
    }

    fn entry(&mut self, id: EntryId) -> Option<&mut LedgerEntry> {
        self.0
            .ledgers
            .values_mut()
            .flat_map(|entries| entries.iter_mut())
            .find(|entry| entry.id == id)
    }

    fn record(
        &mut self,
        user: UserId,
        key: &str,
    ) -> Option<&mut domain::idempotency::CompletedRecord> {
        self.0.keys.get_mut(&user)?.get_mut(key)
    }
}
