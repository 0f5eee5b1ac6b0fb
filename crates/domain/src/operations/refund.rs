//! Refunding a payment: money back to the payment's user, never more than the payment.

use crate::idempotency::Fingerprint;
use crate::model::EntryKind;
use crate::operations::{
    AppliedEffect, Decline, Effect, Movement, Operation, OperationKind, Reads, RefundEffect, State,
};
use crate::outcome::{Outcome, RefundReceipt, Refusal};
use crate::types::{Amount, IdempotencyKey, Limits, PaymentId, RefundReason, UserId};

/// `POST /api/payments/{paymentId}/refunds`, run as the payment's user (its lock, its key
/// space, its balance).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refund {
    /// The payment's user.
    pub user: UserId,
    pub payment: PaymentId,
    /// `None`: everything not yet refunded.
    pub amount: Option<Amount>,
    /// Not part of the fingerprint: a retry that words it differently is the same request.
    pub reason: Option<RefundReason>,
    pub key: IdempotencyKey,
}

/// The stored fingerprint of a refund: the operation, the user, the payment and the amount
/// asked for (`rest` when none was: "the rest" and an explicit amount are different requests).
pub fn fingerprint(user: UserId, payment: PaymentId, amount: Option<Amount>) -> Fingerprint {
    let amount = amount.map_or_else(|| "rest".to_owned(), |amount| amount.to_string());
    Fingerprint::from_stored(format!(
        "refund:user={user}:payment={payment}:amount={amount}"
    ))
}

impl Operation for Refund {
    fn kind(&self) -> OperationKind {
        OperationKind::Refund
    }

    fn user(&self) -> UserId {
        self.user
    }

    fn key(&self) -> &IdempotencyKey {
        &self.key
    }

    fn fingerprint(&self) -> Fingerprint {
        fingerprint(self.user, self.payment, self.amount)
    }

    fn reads(&self) -> Reads {
        Reads {
            payment: Some(self.payment),
            ..Reads::default()
        }
    }

    fn decide(&self, state: &State, limits: &Limits) -> Result<Effect, Decline> {
        let payment = state
            .payment
            .as_ref()
            .filter(|payment| payment.id == self.payment && payment.user_id == state.user.id)
            .ok_or(Decline::PaymentNotFound)?;
        let refundable = payment.refundable();
        let exceeds = || {
            Decline::Refused(Refusal::RefundExceedsPayment {
                payment_id: payment.id,
                requested: self.amount,
                refundable,
            })
        };
        let amount = match self.amount {
            Some(amount) if amount.get() <= refundable => amount,
            Some(_) => return Err(exceeds()),
            // The rest; none left is a refund of nothing, refused like one too large.
            None if refundable > 0 => Amount::from_stored(refundable),
            None => return Err(exceeds()),
        };
        let balance = state.user.balance;
        let movement = Movement::of(EntryKind::Refund, balance, amount, limits).ok_or(
            Decline::Refused(Refusal::RefundLimitExceeded {
                balance,
                requested: amount,
                max_balance: limits.max_balance,
            }),
        )?;
        Ok(Effect::Refund(RefundEffect {
            payment: payment.id,
            order: payment.order_id,
            movement,
            payment_amount: payment.amount,
            refunded_before: payment.refunded_total,
            reason: self.reason.clone(),
            coupon: payment.coupon.map(|used| used.user_coupon),
        }))
    }

    fn outcome(&self, applied: &AppliedEffect) -> Outcome {
        match (&applied.effect, applied.assigned.refund_id) {
            (Effect::Refund(refund), Some(refund_id)) => Outcome::Refunded(RefundReceipt {
                refund_id,
                payment_id: refund.payment,
                order_id: refund.order,
                user_id: applied.user,
                amount: refund.movement.amount,
                balance: refund.movement.balance_after,
                refunded_total: refund.refunded_after(),
                payment_status: refund.status_after(),
                reason: refund.reason.clone(),
                created_at: applied.at,
            }),
            // A store that applied a refund without assigning its id broke its port's
            // contract; the answer still tells the truth about the balance.
            _ => Outcome::Charged(applied.balance_receipt()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Payment, PaymentStatus};
    use crate::operations::test_support::{applied, limits, state, t};
    use crate::types::{Balance, OrderId, RefundId};

    fn refund(amount: Option<i64>) -> Refund {
        Refund {
            user: UserId::new(1).unwrap(),
            payment: PaymentId::new(3).unwrap(),
            amount: amount.map(|a| Amount::new(a, &limits()).unwrap()),
            reason: None,
            key: IdempotencyKey::parse("k").unwrap(),
        }
    }

    /// User 1 with `balance`, and payment 3 of order 5 by `owner` for 400, `refunded` back.
    fn with_payment(balance: i64, owner: i64, refunded: i64) -> State {
        let mut state = state(balance);
        state.payment = Some(Payment {
            id: PaymentId::new(3).unwrap(),
            order_id: OrderId::new(5).unwrap(),
            user_id: UserId::new(owner).unwrap(),
            amount: Amount::new(400, &limits()).unwrap(),
            balance_after: Balance::new(0, &limits()).unwrap(),
            paid_at: t(),
            refunded_total: refunded,
            coupon: None,
        });
        state
    }

    fn refused(refundable: i64, requested: Option<i64>) -> Result<Effect, Decline> {
        Err(Decline::Refused(Refusal::RefundExceedsPayment {
            payment_id: PaymentId::new(3).unwrap(),
            requested: requested.map(|a| Amount::new(a, &limits()).unwrap()),
            refundable,
        }))
    }

    #[test]
    fn it_asks_for_its_payment_and_credits_the_user() {
        assert_eq!(refund(None).reads().payment, PaymentId::new(3).ok());
        let Ok(Effect::Refund(effect)) =
            refund(Some(150)).decide(&with_payment(1_000, 1, 100), &limits())
        else {
            panic!("a refund within the payment applies");
        };
        assert_eq!(
            (
                effect.movement.balance_after.get(),
                effect.refunded_before,
                effect.refunded_after(),
                effect.status_after(),
                effect.order.get()
            ),
            (1_150, 100, 250, PaymentStatus::PartiallyRefunded, 5)
        );
        assert!(!effect.completes_payment());
    }

    #[test]
    fn no_amount_is_the_rest_and_completes_the_payment() {
        let Ok(Effect::Refund(effect)) = refund(None).decide(&with_payment(0, 1, 100), &limits())
        else {
            panic!("the rest of a payment is refundable");
        };
        assert_eq!(effect.movement.amount.get(), 300);
        assert!(effect.completes_payment());
        assert_eq!(effect.status_after(), PaymentStatus::Refunded);
    }

    #[test]
    fn more_than_is_left_is_refused_and_so_is_the_rest_of_nothing() {
        let limits = limits();
        assert_eq!(
            refund(Some(301)).decide(&with_payment(0, 1, 100), &limits),
            refused(300, Some(301))
        );
        assert_eq!(
            refund(None).decide(&with_payment(0, 1, 400), &limits),
            refused(0, None)
        );
        assert_eq!(
            refund(Some(1)).decide(&with_payment(0, 1, 400), &limits),
            refused(0, Some(1))
        );
    }

    #[test]
    fn a_missing_or_foreign_payment_is_not_found_and_not_stored() {
        let limits = limits();
        assert_eq!(
            refund(None).decide(&state(0), &limits),
            Err(Decline::PaymentNotFound)
        );
        assert_eq!(
            refund(None).decide(&with_payment(0, 2, 0), &limits),
            Err(Decline::PaymentNotFound)
        );
    }

    #[test]
    fn a_refund_obeys_the_maximum_balance() {
        let limits = limits();
        let Err(Decline::Refused(Refusal::RefundLimitExceeded { requested, .. })) =
            refund(None).decide(&with_payment(limits.max_balance - 399, 1, 0), &limits)
        else {
            panic!("a refund past MAX_BALANCE is refused");
        };
        assert_eq!(requested.get(), 400);
    }

    #[test]
    fn its_fingerprint_tells_the_rest_from_an_amount_and_ignores_the_reason() {
        assert_eq!(
            refund(None).fingerprint().as_str(),
            "refund:user=1:payment=3:amount=rest"
        );
        assert_eq!(
            refund(Some(400)).fingerprint().as_str(),
            "refund:user=1:payment=3:amount=400"
        );
        let mut worded = refund(None);
        worded.reason = RefundReason::parse("size").ok();
        assert_eq!(worded.fingerprint(), refund(None).fingerprint());
    }

    #[test]
    fn its_outcome_names_the_refund_and_the_payment_after_it() {
        let op = refund(Some(400));
        let effect = op.decide(&with_payment(0, 1, 0), &limits()).unwrap();
        let mut done = applied(effect);
        done.assigned.refund_id = RefundId::new(4).ok();
        let Outcome::Refunded(receipt) = op.outcome(&done) else {
            panic!("a refund answers Refunded");
        };
        assert_eq!(
            (
                receipt.refund_id.get(),
                receipt.payment_id.get(),
                receipt.refunded_total,
                receipt.payment_status,
                receipt.balance.get()
            ),
            (4, 3, 400, PaymentStatus::Refunded, 400)
        );
    }
}
