//! How outcomes read on the wire. The bytes made here are stored under the idempotency
//! key and replayed unchanged.

use domain::idempotency::StoredResponse;
use domain::outcome::{Outcome, Refusal};
use domain::ports::ResponseEncoder;
use domain::time::format_rfc3339_millis;
use serde::Serialize;

use crate::dto::{
    ChargeResponse, PaymentResponse, RefundResponse, UseResponse, UserCouponResponse,
};
use crate::problem::{Code, Problem};

/// The JSON encoder of the API.
#[derive(Debug, Default, Clone, Copy)]
pub struct JsonEncoder;

fn ok<T: Serialize>(body: &T) -> StoredResponse {
    match serde_json::to_vec(body) {
        Ok(body) => StoredResponse { status: 200, body },
        // Plain structs of integers and strings always serialise; keep the path total.
        Err(_) => refusal_bytes(Code::InternalError, "the response could not be encoded"),
    }
}

fn refusal_bytes(code: Code, detail: impl Into<String>) -> StoredResponse {
    StoredResponse {
        status: code.status(),
        body: Problem::new(code, detail).to_bytes(),
    }
}

impl ResponseEncoder for JsonEncoder {
    fn encode(&self, outcome: &Outcome) -> StoredResponse {
        match outcome {
            Outcome::Charged(r) => ok(&ChargeResponse {
                user_id: r.user_id.get(),
                balance: r.balance.get(),
                charged_amount: r.amount.get(),
                transaction_time: format_rfc3339_millis(r.at),
            }),
            Outcome::Used(r) => ok(&UseResponse {
                user_id: r.user_id.get(),
                balance: r.balance.get(),
                used_amount: r.amount.get(),
                transaction_time: format_rfc3339_millis(r.at),
            }),
            Outcome::Paid(p) => ok(&PaymentResponse {
                payment_id: p.payment_id.get(),
                order_id: p.order_id.get(),
                user_id: p.user_id.get(),
                amount: p.amount.get(),
                balance: p.balance.get(),
                status: "COMPLETED".to_owned(),
                paid_at: format_rfc3339_millis(p.paid_at),
                // The v1 answer, as it always was: a new payment has nothing refunded.
                refunded_total: None,
                discount: p.coupon.map(|used| used.discount.get()),
                user_coupon_id: p.coupon.map(|used| used.user_coupon.get()),
            }),
            // Just issued, so AVAILABLE (the instant is its issue's, before its expiry).
            Outcome::CouponIssued(issued) => ok(&UserCouponResponse::at(
                &issued.user_coupon,
                issued.user_coupon.issued_at,
            )),
            Outcome::Refunded(r) => ok(&RefundResponse::from(r)),
            Outcome::Refused(Refusal::InsufficientBalance { balance, requested }) => refusal_bytes(
                Code::InsufficientBalance,
                format!("the balance {balance} is less than the requested {requested}"),
            ),
            Outcome::Refused(Refusal::BalanceLimitExceeded {
                balance,
                requested,
                max_balance,
            }) => refusal_bytes(
                Code::BalanceLimitExceeded,
                format!(
                    "charging {requested} to the balance {balance} would exceed the maximum balance {max_balance}"
                ),
            ),
            Outcome::Refused(Refusal::OrderAlreadyPaid { order_id }) => refusal_bytes(
                Code::OrderAlreadyPaid,
                format!("order {order_id} is already paid"),
            ),
            Outcome::Refused(Refusal::RefundLimitExceeded {
                balance,
                requested,
                max_balance,
            }) => refusal_bytes(
                Code::BalanceLimitExceeded,
                format!(
                    "refunding {requested} to the balance {balance} would exceed the maximum balance {max_balance}"
                ),
            ),
            Outcome::Refused(Refusal::OrderCancelled { order_id }) => refusal_bytes(
                Code::OrderCancelled,
                format!("order {order_id} is cancelled"),
            ),
            Outcome::Refused(Refusal::RefundExceedsPayment {
                payment_id,
                requested,
                refundable,
            }) => refusal_bytes(
                Code::RefundExceedsPayment,
                match requested {
                    Some(requested) => format!(
                        "refunding {requested} exceeds the {refundable} left to refund of payment {payment_id}"
                    ),
                    None => format!("payment {payment_id} has nothing left to refund"),
                },
            ),
            Outcome::Refused(Refusal::CouponSoldOut { coupon_id }) => refusal_bytes(
                Code::CouponSoldOut,
                format!("coupon {coupon_id} is sold out"),
            ),
            Outcome::Refused(Refusal::CouponAlreadyIssued { coupon_id }) => refusal_bytes(
                Code::CouponAlreadyIssued,
                format!("coupon {coupon_id} was already issued to this user"),
            ),
            Outcome::Refused(Refusal::CouponNotOpen { coupon_id }) => refusal_bytes(
                Code::CouponNotOpen,
                format!("coupon {coupon_id} is not being issued at this time"),
            ),
            Outcome::Refused(Refusal::CouponNotUsable { user_coupon_id }) => refusal_bytes(
                Code::CouponNotUsable,
                format!(
                    "user coupon {user_coupon_id} cannot be used: it is used, expired or not this user's"
                ),
            ),
        }
    }
}
