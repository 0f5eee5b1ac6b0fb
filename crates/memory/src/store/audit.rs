//! `Auditor` over the in-memory state: the checks of the MySQL audit, in short critical
//! sections of the store's mutex.
//!
//! Holding the mutex for a whole audit would stop every balance change for as long as it
//! runs (seconds for millions of ledger entries), so the audit goes a bounded amount of
//! work at a time, letting the lock go in between. It stays free of false breaches
//! because every subject is read whole within one section, and every step writes all of
//! a subject's rows within one section too:
//!
//! - a user's balance, ledger and records (`BalanceMatchesLedger`, `RecordHasOneEffect`,
//!   `KeyAppliedOnce`) are read together, user by user;
//! - an order and its payment, a payment and its order, likewise;
//! - payments are paired with PAYMENT ledger entries among the rows that existed when the
//!   audit began: both are immutable and their ids grow, so the ids handed out by then
//!   mark that instant exactly, whenever each row is read;
//! - a user's coupons are read with its records (an issue writes both in one step), a
//!   coupon with all its user coupons (and its count), a user coupon with the payment
//!   that uses it and a payment with its user coupon (a payment, and a refund that
//!   completes one, write both in one step).
//!
//! The counters are taken when the audit begins. Two checks read less here than on MySQL,
//! because the in-memory store keeps less: no in-flight state is ever stored (claims live
//! in the use case), so [`AuditCheck::NoRecordStuckInFlight`] never finds anything; and a
//! payment does not keep its idempotency key, so payments and PAYMENT ledger entries are
//! matched by user, amount and instant only (as many of each).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use domain::idempotency::RecordOutcome;
use domain::model::{Coupon, EntryKind, OrderStatus, Payment, PaymentStatus, User, UserCoupon};
use domain::operations::OperationKind;
use domain::ports::{AuditCheck, AuditReport, Auditor, Breach, RepoError};
use domain::time::format_rfc3339_millis;
use domain::types::{
    CouponId, EntryId, IdempotencyKey, OrderId, PaymentId, RefundId, UserCouponId, UserId,
};

use super::{MemoryStore, State};

/// Rows looked at in one critical section before the lock is let go (a handful in the
/// unit tests, so they cross section boundaries).
const WORK_PER_SECTION: usize = if cfg!(test) { 5 } else { 10_000 };

/// The pause between two sections: long enough for the threads that queued on the lock
/// meanwhile to get it (the mutex is not fair: without a pause the audit takes it back
/// before a woken waiter runs).
const PAUSE: Duration = Duration::from_micros(500);

#[async_trait]
impl Auditor for MemoryStore {
    async fn audit(
        &self,
        key_ttl: Duration,
        _lease: Duration,
        _now: DateTime<Utc>,
    ) -> Result<AuditReport, RepoError> {
        let mut audit = Audit::begin(&self.state(), key_ttl);
        let mut next = Some(1);
        while let Some(from) = next {
            next = audit.users(&self.state(), from);
            tokio::time::sleep(PAUSE).await;
        }
        audit.orphan_ledgers(&self.state());
        let mut next = Some(1);
        while let Some(from) = next {
            next = audit.orders(&self.state(), from);
            tokio::time::sleep(PAUSE).await;
        }
        let mut next = Some(1);
        while let Some(from) = next {
            next = audit.payments(&self.state(), from);
            tokio::time::sleep(PAUSE).await;
        }
        let mut next = Some(1);
        while let Some(from) = next {
            next = audit.coupons(&self.state(), from);
            tokio::time::sleep(PAUSE).await;
        }
        let mut next = Some(1);
        while let Some(from) = next {
            next = audit.user_coupons(&self.state(), from);
            tokio::time::sleep(PAUSE).await;
        }
        Ok(audit.finish())
    }
}

fn breach(check: AuditCheck, subject: String, detail: String) -> Breach {
    Breach {
        check,
        subject,
        detail,
    }
}

fn at(t: DateTime<Utc>) -> String {
    format_rfc3339_millis(t)
}

/// What the order a payment pays is for: what the balance paid and the coupon's discount.
fn charged_for(payment: &Payment) -> i64 {
    let discount = payment.coupon.map_or(0, |used| used.discount.get());
    payment.amount.get().saturating_add(discount)
}

/// What a payment and its PAYMENT ledger entry share (and a refund and its REFUND entry).
type PaymentFacts = (UserId, i64, DateTime<Utc>);

/// Rows gathered for pairing by their facts: the rows (payments, refunds) and the ledger
/// entries.
type Pairs<Id> = HashMap<PaymentFacts, (Vec<Id>, Vec<EntryId>)>;

/// An audit under way: the report so far, the ids handed out when it began, and the
/// payments and PAYMENT entries gathered for pairing.
struct Audit {
    report: AuditReport,
    key_ttl: Duration,
    last_user: i64,
    last_order: i64,
    last_payment: i64,
    last_refund: i64,
    last_entry: i64,
    last_coupon: i64,
    last_user_coupon: i64,
    pairs: Pairs<PaymentId>,
    refund_pairs: Pairs<RefundId>,
    /// User coupons of coupons that do not exist, by coupon (coupons are never deleted,
    /// so this is no race).
    orphan_coupons: BTreeMap<CouponId, u64>,
}

impl Audit {
    fn begin(state: &State, key_ttl: Duration) -> Self {
        let report = AuditReport {
            users: state.users.len() as u64,
            ledger_entries: state.ledgers.values().map(Vec::len).sum::<usize>() as u64,
            records: state.keys.values().map(HashMap::len).sum::<usize>() as u64,
            orders: state.orders.len() as u64,
            payments: state.payments.len() as u64,
            refunds: state.refunds.values().map(Vec::len).sum::<usize>() as u64,
            coupons: state.coupons.len() as u64,
            user_coupons: state.user_coupons.len() as u64,
            ..AuditReport::default()
        };
        Self {
            report,
            key_ttl,
            last_user: state.last_user_id,
            last_order: state.last_order_id,
            last_payment: state.last_payment_id,
            last_refund: state.last_refund_id,
            last_entry: state.last_entry_id,
            last_coupon: state.last_coupon_id,
            last_user_coupon: state.last_user_coupon_id,
            pairs: HashMap::new(),
            refund_pairs: HashMap::new(),
            orphan_coupons: BTreeMap::new(),
        }
    }

    /// Audits users from id `from` on, for one section's work; where to go on, if anywhere.
    fn users(&mut self, state: &State, from: i64) -> Option<i64> {
        let mut work = 0;
        let mut id = from;
        while id <= self.last_user {
            if work >= WORK_PER_SECTION {
                return Some(id);
            }
            if let Some(user) = UserId::new(id).ok().and_then(|id| state.users.get(&id)) {
                work += self.user(state, user);
            }
            work += 1;
            id += 1;
        }
        None
    }

    /// The checks of one user; returns how many rows it looked at.
    fn user(&mut self, state: &State, user: &User) -> usize {
        let entries = state.ledgers.get(&user.id).map_or(&[][..], Vec::as_slice);

        // BalanceMatchesLedger
        let sum: i64 = entries
            .iter()
            .map(|entry| entry.kind.sign() * entry.amount.get())
            .sum();
        let balance = user.balance.get();
        let newest = entries.last();
        let newest_wrong = newest.is_some_and(|entry| entry.balance_after.get() != balance);
        if sum != balance || newest_wrong {
            let mut detail = format!(
                "balance {balance}, ledger sum {sum} over {} entries",
                entries.len()
            );
            if let Some(entry) = newest.filter(|_| newest_wrong) {
                detail.push_str(&format!(
                    "; newest entry {} has balance_after {}",
                    entry.id, entry.balance_after
                ));
            }
            self.report.add(breach(
                AuditCheck::BalanceMatchesLedger,
                format!("user {}", user.id),
                detail,
            ));
        }

        // The keyed entries in (key, instant, id) order, and the PAYMENT and REFUND entries to
        // pair.
        let mut keyed: Vec<(&IdempotencyKey, DateTime<Utc>, EntryId)> = Vec::new();
        for entry in entries {
            if let Some(key) = &entry.idempotency_key {
                keyed.push((key, entry.created_at, entry.id));
            }
            // Entries written since the audit began may pair with rows it does not read.
            let facts = (entry.user_id, entry.amount.get(), entry.created_at);
            if entry.id.get() <= self.last_entry {
                match entry.kind {
                    EntryKind::Payment => self.pairs.entry(facts).or_default().1.push(entry.id),
                    EntryKind::Refund => {
                        self.refund_pairs.entry(facts).or_default().1.push(entry.id);
                    }
                    EntryKind::Charge | EntryKind::Use => {}
                }
            }
        }
        keyed.sort_unstable();

        // KeyAppliedOnce: no entry while an earlier record of its key was live. Each
        // entry's record expiry is the one it was written with; `key_ttl` stands in only
        // where none was kept.
        let ttl = chrono::Duration::from_std(self.key_ttl).unwrap_or(chrono::Duration::MAX);
        let expiry = |at: DateTime<Utc>, id: &EntryId| {
            state.key_expiry.get(id).copied().unwrap_or_else(|| {
                at.checked_add_signed(ttl)
                    .unwrap_or(DateTime::<Utc>::MAX_UTC)
            })
        };
        // (key, instant of the latest earlier entry, latest expiry of the earlier records)
        let mut earlier: Option<(&IdempotencyKey, DateTime<Utc>, DateTime<Utc>)> = None;
        for (key, entry_at, id) in &keyed {
            match earlier {
                Some((seen, prev_at, live_until)) if seen == *key => {
                    if *entry_at < live_until {
                        let apart = *entry_at - prev_at;
                        self.report.add(breach(
                            AuditCheck::KeyAppliedOnce,
                            format!("user {} key {key}", user.id),
                            // Worded as the MySQL audit words it.
                            format!(
                                "ledger entry {id} ({}) is {:.3} s after an earlier entry of this key ({}), while an earlier record of the key was live (until {})",
                                at(*entry_at),
                                apart.num_milliseconds() as f64 / 1000.0,
                                at(prev_at),
                                at(live_until)
                            ),
                        ));
                    }
                    earlier = Some((key, *entry_at, live_until.max(expiry(*entry_at, id))));
                }
                _ => earlier = Some((key, *entry_at, expiry(*entry_at, id))),
            }
        }

        // RecordHasOneEffect: a step's effect is its ledger entry, or for a coupon issue
        // its user coupon (and no entry); both carry the key and the step's instant.
        let coupons: Vec<&UserCoupon> = state
            .coupons_of_user
            .get(&user.id)
            .into_iter()
            .flatten()
            .filter_map(|id| state.user_coupons.get(id))
            .collect();
        let mut issued: Vec<(&IdempotencyKey, DateTime<Utc>)> = coupons
            .iter()
            .map(|coupon| (&coupon.idempotency_key, coupon.issued_at))
            .collect();
        issued.sort_unstable();
        let records = state.keys.get(&user.id);
        let mut wrong: Vec<_> = records
            .into_iter()
            .flat_map(HashMap::values)
            .filter_map(|record| {
                // The entries of this key and instant: a run of the sorted list.
                let this = (&record.key, record.created_at);
                let effects = keyed.partition_point(|(key, t, _)| (*key, *t) <= this)
                    - keyed.partition_point(|(key, t, _)| (*key, *t) < this);
                let held = issued.partition_point(|(key, t)| (*key, *t) <= this)
                    - issued.partition_point(|(key, t)| (*key, *t) < this);
                let status = record.response.status;
                // What the record says happened, never what its HTTP status suggests.
                let success = record.outcome == RecordOutcome::Applied;
                let issue = record.operation == OperationKind::CouponIssue;
                let ok = match (success, issue) {
                    (true, false) => effects == 1 && held == 0,
                    (true, true) => effects == 0 && held == 1,
                    (false, _) => effects == 0 && held == 0,
                };
                (!ok).then_some((record, status, success, issue, effects, held))
            })
            .collect();
        wrong.sort_unstable_by(|a, b| a.0.key.cmp(&b.0.key));
        for (record, status, success, issue, effects, held) in wrong {
            let (what, expected) = match (success, issue) {
                (true, false) => ("stored success", "exactly 1 entry and no coupon"),
                (true, true) => ("stored coupon issue", "exactly 1 coupon and no entry"),
                (false, _) => ("stored refusal", "none"),
            };
            self.report.add(breach(
                AuditCheck::RecordHasOneEffect,
                format!("user {} key {}", user.id, record.key),
                format!(
                    "{what} ({status}) of {}: {effects} ledger entries and {held} user coupons with this key and instant, expected {expected}",
                    at(record.created_at)
                ),
            ));
        }

        entries.len() + records.map_or(0, HashMap::len) + coupons.len()
    }

    /// Ledger entries of users that do not exist.
    fn orphan_ledgers(&mut self, state: &State) {
        let mut orphans: Vec<_> = state
            .ledgers
            .iter()
            .filter(|(user, entries)| !entries.is_empty() && !state.users.contains_key(user))
            .collect();
        orphans.sort_unstable_by_key(|(user, _)| **user);
        for (user, entries) in orphans {
            let sum: i64 = entries
                .iter()
                .map(|entry| entry.kind.sign() * entry.amount.get())
                .sum();
            self.report.add(breach(
                AuditCheck::BalanceMatchesLedger,
                format!("user {user}"),
                format!(
                    "no such user, but {} ledger entries summing to {sum}",
                    entries.len()
                ),
            ));
        }
    }

    /// PAID orders without a payment, from id `from` on, for one section's work.
    fn orders(&mut self, state: &State, from: i64) -> Option<i64> {
        let end = from.saturating_add(WORK_PER_SECTION as i64);
        for id in from..end.min(self.last_order.saturating_add(1)) {
            let Some(order) = OrderId::new(id).ok().and_then(|id| state.orders.get(&id)) else {
                continue;
            };
            let paid_by = state
                .payment_of_order
                .get(&order.id)
                .filter(|payment| state.payments.contains_key(payment));
            let needs_payment = matches!(order.status, OrderStatus::Paid | OrderStatus::Refunded);
            if needs_payment && paid_by.is_none() {
                self.report.add(breach(
                    AuditCheck::PaidOrderHasOnePayment,
                    format!("order {}", order.id),
                    format!(
                        "{} (user {}, amount {}) but has no payment",
                        order.status.as_str(),
                        order.user_id,
                        order.amount
                    ),
                ));
            }
        }
        (end <= self.last_order).then_some(end)
    }

    /// Payments whose order is missing, not PAID, someone else's or of another amount,
    /// or that is paid by another payment, from id `from` on, for one section's work;
    /// gathers the payments to pair.
    fn payments(&mut self, state: &State, from: i64) -> Option<i64> {
        const CHECK: AuditCheck = AuditCheck::PaidOrderHasOnePayment;
        let end = from.saturating_add(WORK_PER_SECTION as i64);
        for id in from..end.min(self.last_payment.saturating_add(1)) {
            let Some(payment) = PaymentId::new(id)
                .ok()
                .and_then(|id| state.payments.get(&id))
            else {
                continue;
            };
            self.pairs
                .entry((payment.user_id, payment.amount.get(), payment.paid_at))
                .or_default()
                .0
                .push(payment.id);
            self.refunds_of(state, payment);
            self.coupon_of(state, payment);
            let order_id = payment.order_id;
            // The order is REFUNDED exactly when the payment is refunded in full.
            let expected = if payment.status() == PaymentStatus::Refunded {
                OrderStatus::Refunded
            } else {
                OrderStatus::Paid
            };
            let detail = match state.orders.get(&order_id) {
                None => format!("pays order {order_id}, which does not exist"),
                Some(order) if order.status != expected => {
                    format!(
                        "pays order {order_id}, which is {}; a payment {} has its order {}",
                        order.status.as_str(),
                        payment.status().as_str(),
                        expected.as_str()
                    )
                }
                Some(order)
                    if order.user_id != payment.user_id
                        || order.amount.get() != charged_for(payment) =>
                {
                    format!(
                        "pays order {order_id} of user {} for {}, but is user {}'s for {} (with a discount of {})",
                        order.user_id,
                        order.amount,
                        payment.user_id,
                        payment.amount,
                        charged_for(payment) - payment.amount.get()
                    )
                }
                Some(_) => match state.payment_of_order.get(&order_id) {
                    Some(other) if *other != payment.id => {
                        self.report.add(breach(
                            CHECK,
                            format!("order {order_id}"),
                            format!(
                                "paid twice: by payment {other} and by payment {}",
                                payment.id
                            ),
                        ));
                        continue;
                    }
                    _ => continue,
                },
            };
            self.report
                .add(breach(CHECK, format!("payment {}", payment.id), detail));
        }
        (end <= self.last_payment).then_some(end)
    }

    /// `CouponUseMatchesPayment` from the payment's side: a payment with a coupon that is
    /// not refunded in full is what its user coupon is used by.
    fn coupon_of(&mut self, state: &State, payment: &Payment) {
        let Some(used) = payment.coupon else {
            return;
        };
        if payment.status() == PaymentStatus::Refunded {
            return;
        }
        let held = state.user_coupons.get(&used.user_coupon);
        if held.and_then(|coupon| coupon.payment) == Some(payment.id) {
            return;
        }
        let found = match held {
            None => "which does not exist".to_owned(),
            Some(coupon) => match coupon.payment {
                None => "which is not used".to_owned(),
                Some(other) => format!("which payment {other} uses"),
            },
        };
        self.report.add(breach(
            AuditCheck::CouponUseMatchesPayment,
            format!("payment {}", payment.id),
            format!(
                "{} with user coupon {} (not refunded in full), {found}",
                payment.status().as_str(),
                used.user_coupon
            ),
        ));
    }

    /// Coupons from id `from` on, for one section's work: each read whole with its user
    /// coupons (`CouponStockMatchesIssued`).
    fn coupons(&mut self, state: &State, from: i64) -> Option<i64> {
        let mut work = 0;
        let mut id = from;
        while id <= self.last_coupon {
            if work >= WORK_PER_SECTION {
                return Some(id);
            }
            if let Some(coupon) = CouponId::new(id).ok().and_then(|id| state.coupons.get(&id)) {
                work += self.coupon(state, coupon);
            }
            work += 1;
            id += 1;
        }
        None
    }

    /// The checks of one coupon; returns how many rows it looked at.
    fn coupon(&mut self, state: &State, coupon: &Coupon) -> usize {
        const CHECK: AuditCheck = AuditCheck::CouponStockMatchesIssued;
        let issued: Vec<&UserCoupon> = state
            .issued_of
            .get(&coupon.id)
            .into_iter()
            .flatten()
            .filter_map(|id| state.user_coupons.get(id))
            .collect();
        let rows = issued.len();
        let count = u64::from(coupon.issued_quantity);
        if count != rows as u64 || coupon.issued_quantity > coupon.total_quantity {
            self.report.add(breach(
                CHECK,
                format!("coupon {}", coupon.id),
                format!(
                    "issued {} of {}, with {rows} user coupons",
                    coupon.issued_quantity, coupon.total_quantity
                ),
            ));
        }
        let mut per_user: HashMap<UserId, Vec<UserCouponId>> = HashMap::new();
        for held in &issued {
            per_user.entry(held.user_id).or_default().push(held.id);
        }
        let mut twice: Vec<_> = per_user
            .into_iter()
            .filter(|(_, ids)| ids.len() > 1)
            .collect();
        twice.sort_unstable();
        for (user, ids) in twice {
            let ids: Vec<String> = ids.iter().map(ToString::to_string).collect();
            self.report.add(breach(
                CHECK,
                format!("coupon {} user {user}", coupon.id),
                format!(
                    "user {user} holds {} of coupon {}, at most 1 allowed: user coupons {}",
                    ids.len(),
                    coupon.id,
                    ids.join(", ")
                ),
            ));
        }
        rows
    }

    /// User coupons from id `from` on, for one section's work: of a coupon that exists
    /// (gathered, reported by coupon at the end), and used only by a live payment of
    /// their user that names them.
    fn user_coupons(&mut self, state: &State, from: i64) -> Option<i64> {
        let end = from.saturating_add(WORK_PER_SECTION as i64);
        for id in from..end.min(self.last_user_coupon.saturating_add(1)) {
            let Some(held) = UserCouponId::new(id)
                .ok()
                .and_then(|id| state.user_coupons.get(&id))
            else {
                continue;
            };
            if !state.coupons.contains_key(&held.coupon_id) {
                *self.orphan_coupons.entry(held.coupon_id).or_default() += 1;
            }
            let Some(payment_id) = held.payment else {
                continue;
            };
            let wrong = match state.payments.get(&payment_id) {
                None => Some("which does not exist".to_owned()),
                Some(payment) if payment.user_id != held.user_id => Some(format!(
                    "which is user {}'s, not user {}'s",
                    payment.user_id, held.user_id
                )),
                Some(payment) if payment.coupon.map(|used| used.user_coupon) != Some(held.id) => {
                    Some(match payment.coupon {
                        None => "which names no coupon".to_owned(),
                        Some(used) => format!("which names user coupon {}", used.user_coupon),
                    })
                }
                Some(payment) if payment.status() == PaymentStatus::Refunded => {
                    Some("which is refunded in full".to_owned())
                }
                Some(_) => None,
            };
            if let Some(wrong) = wrong {
                self.report.add(breach(
                    AuditCheck::CouponUseMatchesPayment,
                    format!("user coupon {}", held.id),
                    format!("used by payment {payment_id}, {wrong}"),
                ));
            }
        }
        (end <= self.last_user_coupon).then_some(end)
    }

    /// The payment's refunds (read in the same section as the payment, and written in one
    /// with it): they add up to its refunded total, which is within its amount, and are
    /// its user's and order's; gathers the refunds to pair with their REFUND entries.
    fn refunds_of(&mut self, state: &State, payment: &Payment) {
        const CHECK: AuditCheck = AuditCheck::RefundsMatchPayment;
        let refunds = state
            .refunds
            .get(&payment.id)
            .map_or(&[][..], Vec::as_slice);
        let sum: i64 = refunds.iter().map(|refund| refund.amount.get()).sum();
        if sum != payment.refunded_total || payment.refunded_total > payment.amount.get() {
            self.report.add(breach(
                CHECK,
                format!("payment {}", payment.id),
                format!(
                    "amount {}, refunded total {}, its {} refund(s) sum to {sum}",
                    payment.amount,
                    payment.refunded_total,
                    refunds.len()
                ),
            ));
        }
        for refund in refunds {
            if refund.user_id != payment.user_id || refund.order_id != payment.order_id {
                self.report.add(breach(
                    CHECK,
                    format!("refund {}", refund.id),
                    format!(
                        "refunds payment {} of user {} and order {} as user {} and order {}",
                        payment.id,
                        payment.user_id,
                        payment.order_id,
                        refund.user_id,
                        refund.order_id
                    ),
                ));
            }
            if refund.id.get() <= self.last_refund {
                self.refund_pairs
                    .entry((refund.user_id, refund.amount.get(), refund.created_at))
                    .or_default()
                    .0
                    .push(refund.id);
            }
        }
    }

    /// Pairs the payments with their PAYMENT ledger entries, and the refunds with their
    /// REFUND entries, by (user, amount, instant): as many of each. Without the row's key,
    /// two payments of one user and amount within one millisecond (legitimate: the clock
    /// has that precision) share their facts, so a group of two payments and two entries
    /// is as right as one of each.
    fn finish(mut self) -> AuditReport {
        let payments = std::mem::take(&mut self.pairs);
        self.pair(
            payments,
            AuditCheck::PaidOrderHasOnePayment,
            "payment",
            "PAYMENT",
        );
        let refunds = std::mem::take(&mut self.refund_pairs);
        self.pair(refunds, AuditCheck::RefundsMatchPayment, "refund", "REFUND");
        for (coupon, held) in std::mem::take(&mut self.orphan_coupons) {
            self.report.add(breach(
                AuditCheck::CouponStockMatchesIssued,
                format!("coupon {coupon}"),
                format!("no such coupon, but {held} user coupons of it"),
            ));
        }
        self.report
    }

    fn pair<Id: Ord + Copy + std::fmt::Display>(
        &mut self,
        pairs: Pairs<Id>,
        check: AuditCheck,
        row: &str,
        kind: &str,
    ) {
        let mut unpaired: Vec<_> = pairs
            .into_iter()
            .filter(|(_, (payments, entries))| payments.len() != entries.len())
            .map(|(facts, (payments, entries))| {
                let payment = payments.iter().max().copied();
                let entry = entries.iter().max().copied();
                (facts, payments.len(), entries.len(), payment, entry)
            })
            .collect();
        unpaired.sort_unstable_by_key(|((user, _, paid_at), _, _, payment, entry)| {
            (*user, *paid_at, *payment, *entry)
        });
        for ((user, amount, paid_at), rows, entries, newest_row, entry) in unpaired {
            let what = format!("user {user}, amount {amount}, at {}", at(paid_at));
            let found = match (newest_row, entry) {
                (None, Some(entry)) => breach(
                    check,
                    format!("ledger entry {entry}"),
                    format!("a {kind} entry ({what}) without a {row}"),
                ),
                (Some(id), _) if rows > entries => breach(
                    check,
                    format!("{row} {id}"),
                    format!(
                        "{rows} {row}(s) and {entries} {kind} ledger entries share {what}; expected as many of each"
                    ),
                ),
                (_, Some(entry)) => breach(
                    check,
                    format!("ledger entry {entry}"),
                    format!(
                        "{rows} {row}(s) and {entries} {kind} ledger entries share {what}; expected as many of each"
                    ),
                ),
                (_, None) => continue,
            };
            self.report.add(found);
        }
    }
}

#[cfg(test)]
mod tests;
