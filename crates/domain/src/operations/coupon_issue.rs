//! Issuing a coupon to a user: one unit of the coupon's stock, at most one per user, only
//! while issuing is open. No money moves; the decision is the database's truth (the Redis
//! admission gate in front of it only answers what this would answer, faster).

use crate::idempotency::Fingerprint;
use crate::model::UserCoupon;
use crate::operations::{
    AppliedEffect, Decline, Effect, IssueEffect, Operation, OperationKind, Reads, State,
};
use crate::outcome::{IssuedCoupon, Outcome, Refusal};
use crate::types::{CouponId, IdempotencyKey, Limits, UserId};

/// `POST /api/coupons/{couponId}/issue`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssueCoupon {
    pub user: UserId,
    pub coupon: CouponId,
    pub key: IdempotencyKey,
}

/// The stored fingerprint of a coupon issue.
pub fn fingerprint(user: UserId, coupon: CouponId) -> Fingerprint {
    Fingerprint::from_stored(format!("coupon_issue:user={user}:coupon={coupon}"))
}

/// Why a coupon is not issued to a user, in the order the checks are made (the Redis gate
/// makes them in the same order): the user's own coupon first, then the window, then the
/// stock.
pub fn refusal(state: &State, coupon_id: CouponId) -> Result<(), Decline> {
    let coupon = state.coupon.as_ref().ok_or(Decline::CouponNotFound)?;
    if state.holding.is_some() {
        return Err(Refusal::CouponAlreadyIssued { coupon_id }.into());
    }
    if !coupon.is_open_at(state.now) {
        return Err(Refusal::CouponNotOpen { coupon_id }.into());
    }
    if coupon.is_sold_out() {
        return Err(Refusal::CouponSoldOut { coupon_id }.into());
    }
    Ok(())
}

impl Operation for IssueCoupon {
    fn kind(&self) -> OperationKind {
        OperationKind::CouponIssue
    }

    fn user(&self) -> UserId {
        self.user
    }

    fn key(&self) -> &IdempotencyKey {
        &self.key
    }

    fn fingerprint(&self) -> Fingerprint {
        fingerprint(self.user, self.coupon)
    }

    fn reads(&self) -> Reads {
        Reads {
            coupon: Some(self.coupon),
            ..Reads::default()
        }
    }

    fn decide(&self, state: &State, _limits: &Limits) -> Result<Effect, Decline> {
        refusal(state, self.coupon)?;
        let coupon = state.coupon.as_ref().ok_or(Decline::CouponNotFound)?;
        Ok(Effect::IssueCoupon(IssueEffect {
            coupon: coupon.id,
            discount: coupon.discount,
            expires_at: coupon.expiry_for(state.now),
        }))
    }

    fn outcome(&self, applied: &AppliedEffect) -> Outcome {
        match (&applied.effect, applied.assigned.user_coupon_id) {
            (Effect::IssueCoupon(issued), Some(id)) => Outcome::CouponIssued(IssuedCoupon {
                user_coupon: UserCoupon {
                    id,
                    coupon_id: issued.coupon,
                    user_id: applied.user,
                    discount: issued.discount,
                    payment: None,
                    issued_at: applied.at,
                    expires_at: issued.expires_at,
                    idempotency_key: self.key.clone(),
                },
            }),
            // A store that issued without assigning the user coupon's id broke its port's
            // contract; nothing truthful can name the coupon, so the answer says so.
            _ => Outcome::Refused(Refusal::CouponSoldOut {
                coupon_id: self.coupon,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::Duration;

    use super::*;
    use crate::model::Coupon;
    use crate::operations::test_support::{applied, limits, state, t};
    use crate::types::{Amount, CouponName, UserCouponId};

    fn issue() -> IssueCoupon {
        IssueCoupon {
            user: UserId::new(1).unwrap(),
            coupon: CouponId::new(4).unwrap(),
            key: IdempotencyKey::parse("k").unwrap(),
        }
    }

    fn coupon(total: u32, issued: u32) -> Coupon {
        Coupon {
            id: CouponId::new(4).unwrap(),
            name: CouponName::parse("WELCOME").unwrap(),
            discount: Amount::new(500, &limits()).unwrap(),
            total_quantity: total,
            issued_quantity: issued,
            issue_starts_at: t() - Duration::hours(1),
            issue_ends_at: Some(t() + Duration::hours(1)),
            valid_for_days: 30,
            created_at: t() - Duration::days(1),
        }
    }

    fn with(coupon: Option<Coupon>) -> State {
        let mut state = state(1_000);
        state.coupon = coupon;
        state
    }

    fn refused(state: &State) -> Result<Effect, Decline> {
        issue().decide(state, &limits())
    }

    #[test]
    fn it_issues_one_unit_that_expires_after_its_validity() {
        assert_eq!(issue().reads().coupon, CouponId::new(4).ok());
        let effect = refused(&with(Some(coupon(10, 9)))).unwrap();
        assert_eq!(
            effect,
            Effect::IssueCoupon(IssueEffect {
                coupon: CouponId::new(4).unwrap(),
                discount: Amount::new(500, &limits()).unwrap(),
                expires_at: t() + Duration::days(30),
            })
        );
        assert_eq!(effect.movement(), None, "issuing moves no money");
    }

    #[test]
    fn the_checks_come_in_order_holding_window_stock() {
        let coupon_id = CouponId::new(4).unwrap();
        assert_eq!(refused(&with(None)), Err(Decline::CouponNotFound));
        assert_eq!(
            refused(&with(Some(coupon(10, 10)))),
            Err(Decline::Refused(Refusal::CouponSoldOut { coupon_id }))
        );
        let mut closed = coupon(10, 10);
        closed.issue_ends_at = Some(t());
        assert_eq!(
            refused(&with(Some(closed.clone()))),
            Err(Decline::Refused(Refusal::CouponNotOpen { coupon_id })),
            "the end of the window is excluded, and comes before the stock"
        );
        let mut early = coupon(10, 0);
        early.issue_starts_at = t() + Duration::milliseconds(1);
        assert_eq!(
            refused(&with(Some(early))),
            Err(Decline::Refused(Refusal::CouponNotOpen { coupon_id }))
        );
        let mut holder = with(Some(closed));
        let mut first = state(0);
        first.coupon = Some(coupon(10, 1));
        let effect = refused(&first).unwrap();
        let mut done = applied(effect);
        done.assigned.user_coupon_id = UserCouponId::new(7).ok();
        let Outcome::CouponIssued(issued) = issue().outcome(&done) else {
            panic!("an issue answers CouponIssued");
        };
        holder.holding = Some(issued.user_coupon);
        assert_eq!(
            refused(&holder),
            Err(Decline::Refused(Refusal::CouponAlreadyIssued { coupon_id })),
            "holding one comes before the window and the stock"
        );
    }

    #[test]
    fn its_fingerprint_is_the_stored_one() {
        assert_eq!(
            issue().fingerprint().as_str(),
            "coupon_issue:user=1:coupon=4"
        );
    }
}
