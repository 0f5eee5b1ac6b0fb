//! Charging: money into the balance, up to `MAX_BALANCE`.

use crate::idempotency::Fingerprint;
use crate::model::EntryKind;
use crate::operations::{
    AppliedEffect, Decline, Effect, Movement, Operation, OperationKind, State,
};
use crate::outcome::{Outcome, Refusal};
use crate::types::{Amount, IdempotencyKey, Limits, UserId};

/// `POST /api/users/{userId}/charge`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Charge {
    pub user: UserId,
    pub amount: Amount,
    pub key: IdempotencyKey,
}

/// The stored fingerprint of a charge; records written by every earlier version match it.
pub fn fingerprint(user: UserId, amount: Amount) -> Fingerprint {
    Fingerprint::from_stored(format!("charge:user={user}:amount={amount}"))
}

impl Operation for Charge {
    fn kind(&self) -> OperationKind {
        OperationKind::Charge
    }

    fn user(&self) -> UserId {
        self.user
    }

    fn key(&self) -> &IdempotencyKey {
        &self.key
    }

    fn fingerprint(&self) -> Fingerprint {
        fingerprint(self.user, self.amount)
    }

    fn batchable(&self) -> bool {
        true
    }

    fn decide(&self, state: &State, limits: &Limits) -> Result<Effect, Decline> {
        let balance = state.user.balance;
        Movement::of(EntryKind::Charge, balance, self.amount, limits)
            .map(Effect::Charge)
            .ok_or(Decline::Refused(Refusal::BalanceLimitExceeded {
                balance,
                requested: self.amount,
                max_balance: limits.max_balance,
            }))
    }

    fn outcome(&self, applied: &AppliedEffect) -> Outcome {
        Outcome::Charged(applied.balance_receipt())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operations::test_support::{applied, limits, state};

    fn charge(amount: i64) -> Charge {
        Charge {
            user: UserId::new(1).unwrap(),
            amount: Amount::new(amount, &limits()).unwrap(),
            key: IdempotencyKey::parse("k").unwrap(),
        }
    }

    #[test]
    fn a_charge_credits_up_to_the_maximum_balance() {
        let limits = limits();
        let near_the_top = state(limits.max_balance - 900);
        assert_eq!(
            charge(900)
                .decide(&near_the_top, &limits)
                .map(|e| e.ledger().map(|(kind, m)| (kind, m.balance_after.get()))),
            Ok(Some((EntryKind::Charge, limits.max_balance)))
        );
        assert_eq!(
            charge(901).decide(&near_the_top, &limits),
            Err(Decline::Refused(Refusal::BalanceLimitExceeded {
                balance: near_the_top.user.balance,
                requested: Amount::new(901, &limits).unwrap(),
                max_balance: limits.max_balance,
            }))
        );
    }

    #[test]
    fn its_fingerprint_and_outcome_are_the_stored_ones() {
        let op = charge(250);
        assert_eq!(op.fingerprint().as_str(), "charge:user=1:amount=250");
        let effect = op.decide(&state(1_000), &limits()).unwrap();
        let Outcome::Charged(receipt) = op.outcome(&applied(effect)) else {
            panic!("a charge answers Charged");
        };
        assert_eq!((receipt.balance.get(), receipt.amount.get()), (1_250, 250));
    }
}
