//! Entities: what a user, an order, a payment and a ledger entry are.

use chrono::{DateTime, Utc};

use crate::types::{Amount, Balance, EntryId, IdempotencyKey, OrderId, PaymentId, UserId};

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
}

impl EntryKind {
    pub const ALL: [EntryKind; 3] = [EntryKind::Charge, EntryKind::Use, EntryKind::Payment];

    /// The name used in the API and in storage.
    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::Charge => "CHARGE",
            EntryKind::Use => "USE",
            EntryKind::Payment => "PAYMENT",
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
            EntryKind::Charge => 1,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderStatus {
    Pending,
    Paid,
}

impl OrderStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            OrderStatus::Pending => "PENDING",
            OrderStatus::Paid => "PAID",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "PENDING" => Some(OrderStatus::Pending),
            "PAID" => Some(OrderStatus::Paid),
            _ => None,
        }
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
}
