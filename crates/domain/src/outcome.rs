//! What a balance-changing request ended with, before it is encoded and stored.

use chrono::{DateTime, Utc};

use crate::model::{CouponUse, PaymentStatus, UserCoupon};
use crate::types::{
    Amount, Balance, CouponId, OrderId, PaymentId, RefundId, RefundReason, UserCouponId, UserId,
};

/// The result of a charge or a use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BalanceReceipt {
    pub user_id: UserId,
    pub balance: Balance,
    pub amount: Amount,
    pub at: DateTime<Utc>,
}

/// The result of a payment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaymentReceipt {
    pub payment_id: PaymentId,
    pub order_id: OrderId,
    pub user_id: UserId,
    pub amount: Amount,
    pub balance: Balance,
    pub paid_at: DateTime<Utc>,
    /// The coupon the payment used, if any (the answer then names it and its discount).
    pub coupon: Option<CouponUse>,
}

/// The result of a refund.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefundReceipt {
    pub refund_id: RefundId,
    pub payment_id: PaymentId,
    pub order_id: OrderId,
    pub user_id: UserId,
    pub amount: Amount,
    /// The user's balance right after the refund.
    pub balance: Balance,
    /// The payment's refunded total right after the refund.
    pub refunded_total: i64,
    /// The payment's status right after the refund.
    pub payment_status: PaymentStatus,
    pub reason: Option<RefundReason>,
    pub created_at: DateTime<Utc>,
}

impl From<&crate::model::Refund> for RefundReceipt {
    /// A stored refund reads as the receipt its request was answered with.
    fn from(refund: &crate::model::Refund) -> Self {
        Self {
            refund_id: refund.id,
            payment_id: refund.payment_id,
            order_id: refund.order_id,
            user_id: refund.user_id,
            amount: refund.amount,
            balance: refund.balance_after,
            refunded_total: refund.refunded_total,
            payment_status: refund.payment_status,
            reason: refund.reason.clone(),
            created_at: refund.created_at,
        }
    }
}

/// The result of issuing a coupon: the user coupon as it was issued (`AVAILABLE`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedCoupon {
    pub user_coupon: UserCoupon,
}

/// A business refusal: the request was valid and ran, and the answer is no. Stored under
/// its key like a success, so a retry gets the same answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// A use or payment above the balance.
    InsufficientBalance { balance: Balance, requested: Amount },
    /// A charge that would take the balance above `MAX_BALANCE`.
    BalanceLimitExceeded {
        balance: Balance,
        requested: Amount,
        max_balance: i64,
    },
    /// A refund that would take the balance above `MAX_BALANCE` (`BALANCE_LIMIT_EXCEEDED`,
    /// in a refund's words).
    RefundLimitExceeded {
        balance: Balance,
        requested: Amount,
        max_balance: i64,
    },
    /// Paying an order that is PAID already (or refunded), with a new key.
    OrderAlreadyPaid { order_id: OrderId },
    /// Paying an order that was cancelled.
    OrderCancelled { order_id: OrderId },
    /// A refund above what is left of the payment (`requested` `None`: the rest, and
    /// nothing is left).
    RefundExceedsPayment {
        payment_id: PaymentId,
        requested: Option<Amount>,
        refundable: i64,
    },
    /// Every unit of the coupon was issued (or is being issued) when the request came.
    CouponSoldOut { coupon_id: CouponId },
    /// The user holds this coupon already (issued under whatever key).
    CouponAlreadyIssued { coupon_id: CouponId },
    /// Before the coupon's `issueStartsAt`, or from its `issueEndsAt` on.
    CouponNotOpen { coupon_id: CouponId },
    /// Paying with a user coupon that is used, expired or another user's.
    CouponNotUsable { user_coupon_id: UserCouponId },
}

/// Every outcome that is stored under an idempotency key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Charged(BalanceReceipt),
    Used(BalanceReceipt),
    Paid(PaymentReceipt),
    Refunded(RefundReceipt),
    CouponIssued(IssuedCoupon),
    Refused(Refusal),
}
