//! Paying an order from the balance: the order's amount out, the order PAID, a payment row;
//! with a coupon, its discount off the amount and the coupon USED by the payment.

use crate::idempotency::Fingerprint;
use crate::model::{CouponStatus, CouponUse, EntryKind, OrderStatus};
use crate::operations::{
    AppliedEffect, Decline, Effect, Movement, Operation, OperationKind, Reads, State,
};
use crate::outcome::{Outcome, PaymentReceipt, Refusal};
use crate::types::{IdempotencyKey, Limits, OrderId, UserCouponId, UserId};

/// `POST /api/payments`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pay {
    pub user: UserId,
    pub order: OrderId,
    pub key: IdempotencyKey,
    /// The user coupon to pay part of the order with.
    pub coupon: Option<UserCouponId>,
}

/// The stored fingerprint of a payment; records written by every earlier version match it
/// (a payment with a coupon names it: with and without are different requests).
pub fn fingerprint(user: UserId, order: OrderId, coupon: Option<UserCouponId>) -> Fingerprint {
    match coupon {
        None => Fingerprint::from_stored(format!("payment:user={user}:order={order}")),
        Some(coupon) => {
            Fingerprint::from_stored(format!("payment:user={user}:order={order}:coupon={coupon}"))
        }
    }
}

impl Operation for Pay {
    fn kind(&self) -> OperationKind {
        OperationKind::Payment
    }

    fn user(&self) -> UserId {
        self.user
    }

    fn key(&self) -> &IdempotencyKey {
        &self.key
    }

    fn fingerprint(&self) -> Fingerprint {
        fingerprint(self.user, self.order, self.coupon)
    }

    fn reads(&self) -> Reads {
        Reads {
            order: Some(self.order),
            user_coupon: self.coupon,
            ..Reads::default()
        }
    }

    fn decide(&self, state: &State, limits: &Limits) -> Result<Effect, Decline> {
        let order = state
            .order
            .as_ref()
            // Another user's order is "not found": its existence is not leaked.
            .filter(|order| order.id == self.order && order.user_id == state.user.id)
            .ok_or(Decline::OrderNotFound)?;
        match order.status {
            OrderStatus::Pending => {}
            OrderStatus::Paid | OrderStatus::Refunded => {
                return Err(Refusal::OrderAlreadyPaid { order_id: order.id }.into());
            }
            OrderStatus::Cancelled => {
                return Err(Refusal::OrderCancelled { order_id: order.id }.into());
            }
        }
        let (charged, coupon) = match self.coupon {
            None => (order.amount, None),
            Some(id) => {
                // Used, expired, missing or another user's: one refusal, so a coupon's
                // existence is not leaked either.
                let coupon = state
                    .user_coupon
                    .as_ref()
                    .filter(|coupon| coupon.id == id && coupon.user_id == state.user.id)
                    .filter(|coupon| coupon.status_at(state.now) == CouponStatus::Available)
                    .ok_or(Refusal::CouponNotUsable { user_coupon_id: id })?;
                let (charged, discount) = order.amount.less(coupon.discount);
                (
                    charged,
                    Some(CouponUse {
                        user_coupon: id,
                        discount,
                    }),
                )
            }
        };
        let balance = state.user.balance;
        Movement::of(EntryKind::Payment, balance, charged, limits)
            .map(|movement| Effect::Pay {
                order: order.id,
                movement,
                coupon,
            })
            .ok_or(Decline::Refused(Refusal::InsufficientBalance {
                balance,
                requested: charged,
            }))
    }

    fn outcome(&self, applied: &AppliedEffect) -> Outcome {
        match (&applied.effect, applied.assigned.payment_id) {
            (
                Effect::Pay {
                    order,
                    movement,
                    coupon,
                },
                Some(payment_id),
            ) => Outcome::Paid(PaymentReceipt {
                payment_id,
                order_id: *order,
                user_id: applied.user,
                amount: movement.amount,
                balance: movement.balance_after,
                paid_at: applied.at,
                coupon: *coupon,
            }),
            // A store that applied a payment without assigning a payment id broke its port's
            // contract; the answer still tells the truth about the balance (as before).
            _ => Outcome::Used(applied.balance_receipt()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Order;
    use crate::operations::test_support::{applied, limits, state, t};
    use crate::types::{Amount, PaymentId};

    fn pay(order: i64) -> Pay {
        Pay {
            user: UserId::new(1).unwrap(),
            order: OrderId::new(order).unwrap(),
            key: IdempotencyKey::parse("k").unwrap(),
            coupon: None,
        }
    }

    fn with_order(balance: i64, owner: i64, amount: i64, status: OrderStatus) -> State {
        let mut state = state(balance);
        state.order = Some(Order {
            id: OrderId::new(5).unwrap(),
            user_id: UserId::new(owner).unwrap(),
            amount: Amount::new(amount, &limits()).unwrap(),
            status,
            created_at: t(),
        });
        state
    }

    #[test]
    fn it_asks_for_its_order_and_pays_it_from_the_balance() {
        assert_eq!(pay(5).reads().order, OrderId::new(5).ok());
        let effect = pay(5).decide(&with_order(1_000, 1, 400, OrderStatus::Pending), &limits());
        assert_eq!(
            effect.map(|e| e.ledger().map(|(kind, m)| (kind, m.balance_after.get()))),
            Ok(Some((EntryKind::Payment, 600)))
        );
    }

    #[test]
    fn a_missing_or_foreign_order_is_not_found_and_not_stored() {
        let limits = limits();
        assert_eq!(
            pay(5).decide(&state(1_000), &limits),
            Err(Decline::OrderNotFound)
        );
        assert_eq!(
            pay(5).decide(&with_order(1_000, 2, 400, OrderStatus::Pending), &limits),
            Err(Decline::OrderNotFound)
        );
    }

    #[test]
    fn a_paid_order_and_a_short_balance_are_refused() {
        let limits = limits();
        assert_eq!(
            pay(5).decide(&with_order(1_000, 1, 400, OrderStatus::Paid), &limits),
            Err(Decline::Refused(Refusal::OrderAlreadyPaid {
                order_id: OrderId::new(5).unwrap()
            }))
        );
        assert_eq!(
            pay(5).decide(&with_order(399, 1, 400, OrderStatus::Pending), &limits),
            Err(Decline::Refused(Refusal::InsufficientBalance {
                balance: state(399).user.balance,
                requested: Amount::new(400, &limits).unwrap(),
            }))
        );
    }

    #[test]
    fn a_cancelled_order_is_refused_and_a_refunded_one_is_paid_already() {
        let limits = limits();
        let order_id = OrderId::new(5).unwrap();
        assert_eq!(
            pay(5).decide(&with_order(1_000, 1, 400, OrderStatus::Cancelled), &limits),
            Err(Decline::Refused(Refusal::OrderCancelled { order_id }))
        );
        assert_eq!(
            pay(5).decide(&with_order(1_000, 1, 400, OrderStatus::Refunded), &limits),
            Err(Decline::Refused(Refusal::OrderAlreadyPaid { order_id }))
        );
    }

    fn user_coupon(
        owner: i64,
        discount: i64,
        used: bool,
        expires_in_ms: i64,
    ) -> crate::model::UserCoupon {
        crate::model::UserCoupon {
            id: crate::types::UserCouponId::new(7).unwrap(),
            coupon_id: crate::types::CouponId::new(2).unwrap(),
            user_id: UserId::new(owner).unwrap(),
            discount: Amount::new(discount, &limits()).unwrap(),
            payment: used.then(|| PaymentId::new(1).unwrap()),
            issued_at: t() - chrono::Duration::days(1),
            expires_at: t() + chrono::Duration::milliseconds(expires_in_ms),
            idempotency_key: IdempotencyKey::parse("issued").unwrap(),
        }
    }

    fn pay_with_coupon() -> Pay {
        Pay {
            coupon: crate::types::UserCouponId::new(7).ok(),
            ..pay(5)
        }
    }

    #[test]
    fn a_coupon_takes_its_discount_off_never_below_zero() {
        let limits = limits();
        let mut state = with_order(1_000, 1, 400, OrderStatus::Pending);
        assert_eq!(
            pay_with_coupon().reads().user_coupon,
            crate::types::UserCouponId::new(7).ok()
        );
        state.user_coupon = Some(user_coupon(1, 150, false, 1));
        let Ok(Effect::Pay {
            movement, coupon, ..
        }) = pay_with_coupon().decide(&state, &limits)
        else {
            panic!("a usable coupon pays");
        };
        assert_eq!(
            (movement.amount.get(), movement.balance_after.get()),
            (250, 750)
        );
        assert_eq!(
            coupon.map(|c| (c.user_coupon.get(), c.discount.get())),
            Some((7, 150))
        );
        state.user_coupon = Some(user_coupon(1, 900, false, 1));
        let Ok(Effect::Pay {
            movement, coupon, ..
        }) = pay_with_coupon().decide(&state, &limits)
        else {
            panic!("a coupon above the amount pays it all");
        };
        assert_eq!(
            (movement.amount.get(), movement.balance_after.get()),
            (0, 1_000)
        );
        assert_eq!(coupon.map(|c| c.discount.get()), Some(400));
        // The balance needs only what the coupon leaves.
        let mut short = with_order(250, 1, 400, OrderStatus::Pending);
        short.user_coupon = Some(user_coupon(1, 150, false, 1));
        assert!(pay_with_coupon().decide(&short, &limits).is_ok());
    }

    #[test]
    fn a_used_expired_foreign_or_missing_coupon_is_not_usable() {
        let limits = limits();
        let not_usable = Err(Decline::Refused(Refusal::CouponNotUsable {
            user_coupon_id: crate::types::UserCouponId::new(7).unwrap(),
        }));
        for coupon in [
            Some(user_coupon(1, 150, true, 1)),
            Some(user_coupon(1, 150, false, 0)),
            Some(user_coupon(2, 150, false, 1)),
            None,
        ] {
            let mut state = with_order(1_000, 1, 400, OrderStatus::Pending);
            state.user_coupon = coupon.clone();
            assert_eq!(
                pay_with_coupon().decide(&state, &limits),
                not_usable,
                "{coupon:?}"
            );
        }
        assert_eq!(
            pay_with_coupon().fingerprint().as_str(),
            "payment:user=1:order=5:coupon=7"
        );
    }

    #[test]
    fn its_fingerprint_and_outcome_are_the_stored_ones() {
        let op = pay(5);
        assert_eq!(op.fingerprint().as_str(), "payment:user=1:order=5");
        let effect = op
            .decide(&with_order(1_000, 1, 400, OrderStatus::Pending), &limits())
            .unwrap();
        let mut done = applied(effect);
        done.assigned.payment_id = PaymentId::new(3).ok();
        let Outcome::Paid(receipt) = op.outcome(&done) else {
            panic!("a payment answers Paid");
        };
        assert_eq!(
            (
                receipt.payment_id.get(),
                receipt.order_id.get(),
                receipt.balance.get()
            ),
            (3, 5, 600)
        );
    }
}
