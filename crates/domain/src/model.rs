//! Entities: what a user, an order, a payment and a ledger entry are.

use chrono::{DateTime, Utc};

use crate::types::{
    Amount, Balance, EntryId, IdempotencyKey, OrderId, PaymentId, RefundId, RefundReason, UserId,
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
