//! Entities: what a user, an order, a payment and a ledger entry are.

use chrono::{DateTime, Utc};

use crate::types::{
    Amount, Balance, CouponId, CouponName, EntryId, IdempotencyKey, OrderId, PaymentId, RefundId,
    RefundReason, UserCouponId, UserId,
};

/// A user's account. `version` grows by one with every balance write; a write names the
/// version it read, so a write based on a stale read is refused (the optimistic guard).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub id: UserId,
    pub balance: Balance,
    pub version: u64,
    pub created_at: DateTime<Utc>,
}

/// What a ledger entry did to the balance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EntryKind {
    Charge,
    Use,
    Payment,
    /// Money back from a payment.
    Refund,
}

impl EntryKind {
    pub const ALL: [EntryKind; 4] = [
        EntryKind::Charge,
        EntryKind::Use,
        EntryKind::Payment,
        EntryKind::Refund,
    ];

    /// The name used in the API and in storage.
    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::Charge => "CHARGE",
            EntryKind::Use => "USE",
            EntryKind::Payment => "PAYMENT",
            EntryKind::Refund => "REFUND",
        }
    }

    /// Parses a stored name.
    pub fn parse(raw: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.as_str() == raw)
    }

    /// +1 for money in, -1 for money out: the one place the direction of an entry is
    /// written (the balance arithmetic, the audits and the audit SQL all use it).
    pub fn sign(self) -> i64 {
        match self {
            EntryKind::Charge | EntryKind::Refund => 1,
            EntryKind::Use | EntryKind::Payment => -1,
        }
    }
}

/// One balance change, as written in the same transaction as the change itself. `amount` is
/// always positive; `kind` gives the direction. Seeded opening balances are CHARGE entries
/// without an idempotency key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerEntry {
    pub id: EntryId,
    pub user_id: UserId,
    pub kind: EntryKind,
    pub amount: Amount,
    pub balance_after: Balance,
    pub idempotency_key: Option<IdempotencyKey>,
    pub created_at: DateTime<Utc>,
}

/// A page of history, newest first. `next` is the `before` value for the following page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryPage {
    pub items: Vec<LedgerEntry>,
    pub next: Option<EntryId>,
}

/// Where an order is: created `PENDING`; then `PAID` by its payment, or `CANCELLED` (only a
/// pending order can be); a paid order becomes `REFUNDED` once its payment is refunded in full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderStatus {
    Pending,
    Paid,
    Cancelled,
    Refunded,
}

impl OrderStatus {
    pub const ALL: [OrderStatus; 4] = [
        OrderStatus::Pending,
        OrderStatus::Paid,
        OrderStatus::Cancelled,
        OrderStatus::Refunded,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            OrderStatus::Pending => "PENDING",
            OrderStatus::Paid => "PAID",
            OrderStatus::Cancelled => "CANCELLED",
            OrderStatus::Refunded => "REFUNDED",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|status| status.as_str() == raw)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    pub id: OrderId,
    pub user_id: UserId,
    pub amount: Amount,
    pub status: OrderStatus,
    pub created_at: DateTime<Utc>,
}

/// A completed payment of one order; at most one exists per order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payment {
    pub id: PaymentId,
    pub order_id: OrderId,
    pub user_id: UserId,
    pub amount: Amount,
    /// The user's balance right after this payment.
    pub balance_after: Balance,
    pub paid_at: DateTime<Utc>,
    /// How much of `amount` its refunds gave back: 0..=`amount`.
    pub refunded_total: i64,
    /// The coupon the order was paid with and the part of the order's amount it took off
    /// (`amount` is what the balance paid: the order's amount less this, possibly 0).
    pub coupon: Option<CouponUse>,
}

/// A user coupon spent on a payment, and how much of the order it paid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CouponUse {
    pub user_coupon: UserCouponId,
    /// The discount taken off the order: the coupon's discount, at most the order's amount.
    pub discount: Amount,
}

impl Payment {
    /// What is left to refund.
    pub fn refundable(&self) -> i64 {
        self.amount.get().saturating_sub(self.refunded_total)
    }

    /// The status its refunded total gives it (the status is never stored apart from it).
    pub fn status(&self) -> PaymentStatus {
        PaymentStatus::of(self.amount, self.refunded_total)
    }
}

/// Where a payment is: `COMPLETED`, then `PARTIALLY_REFUNDED`, then `REFUNDED` once the
/// whole amount is back. It follows from the payment's amount and refunded total alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PaymentStatus {
    Completed,
    PartiallyRefunded,
    Refunded,
}

impl PaymentStatus {
    /// The status of a payment of `amount` of which `refunded_total` was given back.
    pub fn of(amount: Amount, refunded_total: i64) -> Self {
        if refunded_total <= 0 {
            PaymentStatus::Completed
        } else if refunded_total >= amount.get() {
            PaymentStatus::Refunded
        } else {
            PaymentStatus::PartiallyRefunded
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            PaymentStatus::Completed => "COMPLETED",
            PaymentStatus::PartiallyRefunded => "PARTIALLY_REFUNDED",
            PaymentStatus::Refunded => "REFUNDED",
        }
    }
}

/// One refund of a payment, written in the same transaction as its REFUND ledger entry
/// and the payment's new refunded total.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refund {
    pub id: RefundId,
    pub payment_id: PaymentId,
    pub order_id: OrderId,
    /// The payment's user, whose balance the refund credits.
    pub user_id: UserId,
    pub amount: Amount,
    /// The user's balance right after this refund.
    pub balance_after: Balance,
    /// The payment's refunded total right after this refund.
    pub refunded_total: i64,
    /// The payment's status right after this refund.
    pub payment_status: PaymentStatus,
    pub reason: Option<RefundReason>,
    pub created_at: DateTime<Utc>,
}

/// The most coupons of one kind (`totalQuantity`).
pub const MAX_COUPON_QUANTITY: u32 = 10_000_000;
/// The longest a coupon stays usable after it was issued (`validForDays`).
pub const MAX_COUPON_VALID_DAYS: u32 = 3_650;
/// `validForDays` when the request leaves it out.
pub const DEFAULT_COUPON_VALID_DAYS: u32 = 30;

/// A kind of coupon: a limited stock, issued first come first served, at most one per
/// user, within its issuing window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Coupon {
    pub id: CouponId,
    pub name: CouponName,
    pub discount: Amount,
    pub total_quantity: u32,
    /// How many were issued: the number of its user coupons, never above `total_quantity`.
    pub issued_quantity: u32,
    pub issue_starts_at: DateTime<Utc>,
    /// `None`: issuing never closes.
    pub issue_ends_at: Option<DateTime<Utc>>,
    pub valid_for_days: u32,
    pub created_at: DateTime<Utc>,
}

impl Coupon {
    /// Whether issuing is open at `now`: from `issue_starts_at`, until (excluded) `issue_ends_at`.
    pub fn is_open_at(&self, now: DateTime<Utc>) -> bool {
        now >= self.issue_starts_at && self.issue_ends_at.is_none_or(|ends| now < ends)
    }

    pub fn is_sold_out(&self) -> bool {
        self.issued_quantity >= self.total_quantity
    }

    /// When a coupon issued at `issued_at` stops being usable.
    pub fn expiry_for(&self, issued_at: DateTime<Utc>) -> DateTime<Utc> {
        issued_at
            .checked_add_signed(chrono::Duration::days(i64::from(self.valid_for_days)))
            .unwrap_or(DateTime::<Utc>::MAX_UTC)
    }
}

/// A coupon to create, validated (`POST /api/coupons`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewCoupon {
    pub name: CouponName,
    pub discount: Amount,
    pub total_quantity: u32,
    pub issue_starts_at: DateTime<Utc>,
    pub issue_ends_at: Option<DateTime<Utc>>,
    pub valid_for_days: u32,
}

impl NewCoupon {
    /// Checks the bounds of the raw numbers and the window (`issue_ends_at` after
    /// `issue_starts_at`); an absent start is `now`, an absent validity 30 days.
    ///
    /// # Errors
    /// A [`crate::types::ValidationError`] naming the field.
    pub fn new(
        name: CouponName,
        discount: Amount,
        total_quantity: i64,
        issue_starts_at: Option<DateTime<Utc>>,
        issue_ends_at: Option<DateTime<Utc>>,
        valid_for_days: Option<i64>,
        now: DateTime<Utc>,
    ) -> Result<Self, crate::types::ValidationError> {
        use crate::types::ValidationError;
        let issue_starts_at = issue_starts_at.unwrap_or(now);
        let valid_for_days = valid_for_days.unwrap_or(i64::from(DEFAULT_COUPON_VALID_DAYS));
        let total_quantity = u32::try_from(total_quantity)
            .ok()
            .filter(|q| (1..=MAX_COUPON_QUANTITY).contains(q))
            .ok_or_else(|| {
                ValidationError(format!(
                    "totalQuantity must be between 1 and {MAX_COUPON_QUANTITY}"
                ))
            })?;
        let valid_for_days = u32::try_from(valid_for_days)
            .ok()
            .filter(|d| (1..=MAX_COUPON_VALID_DAYS).contains(d))
            .ok_or_else(|| {
                ValidationError(format!(
                    "validForDays must be between 1 and {MAX_COUPON_VALID_DAYS}"
                ))
            })?;
        if issue_ends_at.is_some_and(|ends| ends <= issue_starts_at) {
            return Err(ValidationError(
                "issueEndsAt must be after issueStartsAt".to_owned(),
            ));
        }
        Ok(Self {
            name,
            discount,
            total_quantity,
            issue_starts_at,
            issue_ends_at,
            valid_for_days,
        })
    }
}

/// A coupon issued to one user. `payment` is set while a payment uses it (then it is
/// `USED`); a payment refunded in full sets it free again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserCoupon {
    pub id: UserCouponId,
    pub coupon_id: CouponId,
    pub user_id: UserId,
    pub discount: Amount,
    pub payment: Option<PaymentId>,
    pub issued_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    /// The key of the request that issued it.
    pub idempotency_key: IdempotencyKey,
}

impl UserCoupon {
    /// What it is at `now`: `USED` while a payment holds it, else `EXPIRED` from
    /// `expires_at` on, else `AVAILABLE`.
    pub fn status_at(&self, now: DateTime<Utc>) -> CouponStatus {
        if self.payment.is_some() {
            CouponStatus::Used
        } else if now >= self.expires_at {
            CouponStatus::Expired
        } else {
            CouponStatus::Available
        }
    }
}

/// Where a user coupon is, as listings show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CouponStatus {
    Available,
    Used,
    Expired,
}

impl CouponStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CouponStatus::Available => "AVAILABLE",
            CouponStatus::Used => "USED",
            CouponStatus::Expired => "EXPIRED",
        }
    }
}
