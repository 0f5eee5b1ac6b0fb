//! The balance-changing operations, one module each.
//!
//! An operation is a validated command (user, key, parameters) with four pure parts: its
//! [`Fingerprint`], what it needs read under the lock ([`Reads`]), its decision
//! ([`Operation::decide`]: an [`Effect`] to write, or why not) and the [`Outcome`] its
//! success answers. Everything else (replay check, claim, lock, bounded retries, the one
//! atomic step, the stored record, metrics) is the generic path in [`crate::service`],
//! written once for every operation.
//!
//! Adding an operation: a module here (command, fingerprint, `decide`, `outcome`), an
//! [`OperationKind`] and, when it writes something new, an [`Effect`] variant with its
//! branch in each store adapter (and, when it reads something new, a field of [`Reads`]
//! and [`State`]).

use chrono::{DateTime, Utc};

use crate::idempotency::Fingerprint;
use crate::model::{Coupon, CouponUse, EntryKind, Order, Payment, PaymentStatus, User, UserCoupon};
use crate::outcome::{Outcome, Refusal};
use crate::ports::Assigned;
use crate::types::{
    Amount, Balance, CouponId, IdempotencyKey, Limits, OrderId, PaymentId, RefundReason,
    UserCouponId, UserId,
};

pub mod charge;
pub mod coupon_issue;
pub mod pay;
pub mod refund;
pub mod use_balance;

pub use charge::Charge;
pub use coupon_issue::IssueCoupon;
pub use pay::Pay;
pub use refund::Refund;
pub use use_balance::UseBalance;

/// Which operation a request (and its stored record) is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum OperationKind {
    Charge,
    Use,
    Payment,
    Refund,
    CouponIssue,
}

impl OperationKind {
    pub const ALL: [OperationKind; 5] = [
        OperationKind::Charge,
        OperationKind::Use,
        OperationKind::Payment,
        OperationKind::Refund,
        OperationKind::CouponIssue,
    ];

    /// The name used in storage and in the API (`CHARGE`, `USE`, `PAYMENT`, `REFUND`,
    /// `COUPON_ISSUE`).
    pub fn as_str(self) -> &'static str {
        match self {
            OperationKind::Charge => "CHARGE",
            OperationKind::Use => "USE",
            OperationKind::Payment => "PAYMENT",
            OperationKind::Refund => "REFUND",
            OperationKind::CouponIssue => "COUPON_ISSUE",
        }
    }

    /// Parses a stored name.
    pub fn parse(raw: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.as_str() == raw)
    }

    /// The `operation` label of the metrics (kept as it was before operations had a type).
    pub fn label(self) -> &'static str {
        match self {
            OperationKind::Charge => "charge",
            OperationKind::Use => "use",
            OperationKind::Payment => "payment",
            OperationKind::Refund => "refund",
            OperationKind::CouponIssue => "coupon_issue",
        }
    }
}

/// What the generic path reads under the lock besides the user, fresh on every attempt.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reads {
    /// The order the operation is about.
    pub order: Option<OrderId>,
    /// The payment the operation is about.
    pub payment: Option<PaymentId>,
    /// The coupon the operation is about, and the user's own coupon of that kind.
    pub coupon: Option<CouponId>,
    /// The user coupon the operation spends.
    pub user_coupon: Option<UserCouponId>,
}

/// What an operation decides on: the user and whatever its [`Reads`] asked for, all read
/// under the user's lock in one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    pub user: User,
    /// Set when [`Reads::order`] was, and the order exists (of any user: the operation
    /// decides what another user's order means).
    pub order: Option<Order>,
    /// Set when [`Reads::payment`] was, and the payment exists (of any user).
    pub payment: Option<Payment>,
    /// Set when [`Reads::coupon`] was, and the coupon exists.
    pub coupon: Option<Coupon>,
    /// Set when [`Reads::coupon`] was, and this user holds that coupon already.
    pub holding: Option<UserCoupon>,
    /// Set when [`Reads::user_coupon`] was, and it exists (of any user).
    pub user_coupon: Option<UserCoupon>,
    /// When the state was read: the instant the operation is decided (and written) at.
    pub now: DateTime<Utc>,
}

/// A change of the balance: the amount moved (always positive) and the balance after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Movement {
    pub amount: Amount,
    pub balance_after: Balance,
}

impl Movement {
    /// `amount` moved in the direction of `kind` from `balance`, or `None` when the
    /// balance would leave its bounds (below 0, above `MAX_BALANCE`).
    pub fn of(kind: EntryKind, balance: Balance, amount: Amount, limits: &Limits) -> Option<Self> {
        balance
            .moved(kind, amount, limits)
            .map(|balance_after| Movement {
                amount,
                balance_after,
            })
    }
}

/// What the atomic step writes. Each store adapter matches on it once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Money in: the balance and a CHARGE ledger entry.
    Charge(Movement),
    /// Money out: the balance and a USE ledger entry.
    Use(Movement),
    /// Money out for an order: the balance, a PAYMENT ledger entry, the order PAID and its
    /// payment row; with a coupon, the user coupon USED by this payment (the movement is
    /// the order's amount less the coupon's discount, possibly 0).
    Pay {
        order: OrderId,
        movement: Movement,
        coupon: Option<CouponUse>,
    },
    /// Money back from a payment: the balance, a REFUND ledger entry, the refund row, the
    /// payment's refunded total (only over the total the decision read) and, when the
    /// payment is refunded in full, its order REFUNDED.
    Refund(RefundEffect),
    /// One unit of a coupon to the user: the coupon's issued count up by one (only while
    /// below its stock) and the user coupon row (one per user and coupon). No money moves;
    /// the users row's version still moves on (every write in a user's key space does).
    IssueCoupon(IssueEffect),
}

/// What issuing a coupon writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssueEffect {
    pub coupon: CouponId,
    pub discount: Amount,
    pub expires_at: DateTime<Utc>,
}

/// What a refund writes besides the balance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefundEffect {
    pub payment: PaymentId,
    pub order: OrderId,
    pub movement: Movement,
    /// The payment's amount.
    pub payment_amount: Amount,
    /// The payment's refunded total the decision was made on: the step writes the new total
    /// only over this one (the guard in the payment row), and never past `payment_amount`.
    pub refunded_before: i64,
    pub reason: Option<RefundReason>,
    /// The payment's coupon, set free again when this refund completes the payment.
    pub coupon: Option<UserCouponId>,
}

impl RefundEffect {
    /// The payment's refunded total after this refund.
    pub fn refunded_after(&self) -> i64 {
        self.refunded_before
            .saturating_add(self.movement.amount.get())
    }

    /// The payment's status after this refund.
    pub fn status_after(&self) -> PaymentStatus {
        PaymentStatus::of(self.payment_amount, self.refunded_after())
    }

    /// Whether this refund gives back the whole payment (its order becomes REFUNDED).
    pub fn completes_payment(&self) -> bool {
        self.status_after() == PaymentStatus::Refunded
    }
}

impl Effect {
    /// The kind of the ledger entry the effect writes (and so the sign of its amount);
    /// `None` for an effect that moves no money and writes no ledger entry.
    pub fn entry_kind(&self) -> Option<EntryKind> {
        match self {
            Effect::Charge(_) => Some(EntryKind::Charge),
            Effect::Use(_) => Some(EntryKind::Use),
            Effect::Pay { .. } => Some(EntryKind::Payment),
            Effect::Refund(_) => Some(EntryKind::Refund),
            Effect::IssueCoupon(_) => None,
        }
    }

    /// The balance change of an effect that moves money (with its ledger entry), or
    /// `None` (issuing a coupon).
    pub fn movement(&self) -> Option<Movement> {
        match self {
            Effect::Charge(movement) | Effect::Use(movement) | Effect::Pay { movement, .. } => {
                Some(*movement)
            }
            Effect::Refund(refund) => Some(refund.movement),
            Effect::IssueCoupon(_) => None,
        }
    }

    /// The ledger entry's kind and the movement together, for an effect that has them.
    pub fn ledger(&self) -> Option<(EntryKind, Movement)> {
        self.entry_kind().zip(self.movement())
    }
}

/// Why an operation does not run. A refusal is stored under the key and replayed; the
/// others are not stored (a retry runs afresh).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decline {
    /// A business refusal, decided on this state; stored.
    Refused(Refusal),
    /// The order read for the operation is missing, or another user's (404, not stored: its
    /// existence is not leaked).
    OrderNotFound,
    /// The payment read for the operation is missing, or another user's (404, not stored).
    PaymentNotFound,
    /// The coupon read for the operation is missing (404, not stored).
    CouponNotFound,
}

impl From<Refusal> for Decline {
    fn from(refusal: Refusal) -> Self {
        Decline::Refused(refusal)
    }
}

/// An effect as the store committed it, with the ids it assigned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedEffect {
    pub user: UserId,
    pub effect: Effect,
    pub at: DateTime<Utc>,
    pub assigned: Assigned,
}

impl AppliedEffect {
    /// The charge/use receipt of the effect: what moved and the balance after it. (An
    /// effect that moves no money reads as 0 moved and a balance of 0; no operation that
    /// answers with this receipt decides such an effect.)
    pub(crate) fn balance_receipt(&self) -> crate::outcome::BalanceReceipt {
        let movement = self.effect.movement().unwrap_or(Movement {
            amount: Amount::from_stored(0),
            balance_after: Balance::ZERO,
        });
        crate::outcome::BalanceReceipt {
            user_id: self.user,
            balance: movement.balance_after,
            amount: movement.amount,
            at: self.at,
        }
    }
}

/// One balance-changing operation, validated. Object-safe: the generic path takes any.
pub trait Operation: Send + Sync + std::fmt::Debug {
    fn kind(&self) -> OperationKind;

    /// The user whose balance (and lock, and key space) this is.
    fn user(&self) -> UserId;

    fn key(&self) -> &IdempotencyKey;

    /// What the request is, for idempotency; the stored strings never change.
    fn fingerprint(&self) -> Fingerprint;

    /// What the generic path reads under the lock besides the user.
    fn reads(&self) -> Reads {
        Reads::default()
    }

    /// Whether requests of this operation may share a transaction with others (group
    /// commit): true only for an operation that reads nothing but the user, whose effect
    /// moves money with nothing but its ledger entry, and whose outcome names no id the
    /// store assigns (its response can be built before the step).
    fn batchable(&self) -> bool {
        false
    }

    /// Pure: what to write on `state`, or why not.
    ///
    /// # Errors
    /// A [`Decline`]: a stored refusal, or a missing resource that is not stored.
    fn decide(&self, state: &State, limits: &Limits) -> Result<Effect, Decline>;

    /// The success to encode once the store assigned its ids.
    fn outcome(&self, applied: &AppliedEffect) -> Outcome;
}

/// Fixtures of the operations' unit tests.
#[cfg(test)]
mod test_support {
    use chrono::{DateTime, Utc};

    use super::{AppliedEffect, Effect, State};
    use crate::model::User;
    use crate::ports::Assigned;
    use crate::types::{Balance, EntryId, Limits, UserId};

    pub(crate) fn limits() -> Limits {
        Limits::new(1_000_000, 5_000_000).unwrap()
    }

    pub(crate) fn t() -> DateTime<Utc> {
        DateTime::from_timestamp_millis(1_795_356_000_123).unwrap()
    }

    /// User 1 with `balance`, at version 3, nothing else read.
    pub(crate) fn state(balance: i64) -> State {
        State {
            user: User {
                id: UserId::new(1).unwrap(),
                balance: Balance::new(balance, &limits()).unwrap(),
                version: 3,
                created_at: t(),
            },
            order: None,
            payment: None,
            coupon: None,
            holding: None,
            user_coupon: None,
            now: t(),
        }
    }

    pub(crate) fn applied(effect: Effect) -> AppliedEffect {
        AppliedEffect {
            user: UserId::new(1).unwrap(),
            effect,
            at: t(),
            assigned: Assigned {
                entry_id: EntryId::new(9).ok(),
                payment_id: None,
                refund_id: None,
                user_coupon_id: None,
            },
        }
    }
}
