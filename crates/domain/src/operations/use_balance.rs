//! Using the balance: money out, never below 0.

use crate::idempotency::Fingerprint;
use crate::model::EntryKind;
use crate::operations::{
    AppliedEffect, Decline, Effect, Movement, Operation, OperationKind, State,
};
use crate::outcome::{Outcome, Refusal};
use crate::types::{Amount, IdempotencyKey, Limits, UserId};

/// `POST /api/users/{userId}/use`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UseBalance {
    pub user: UserId,
    pub amount: Amount,
    pub key: IdempotencyKey,
}

/// The stored fingerprint of a use; records written by every earlier version match it.
pub fn fingerprint(user: UserId, amount: Amount) -> Fingerprint {
    Fingerprint::from_stored(format!("use:user={user}:amount={amount}"))
}

impl Operation for UseBalance {
    fn kind(&self) -> OperationKind {
        OperationKind::Use
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
        Movement::of(EntryKind::Use, balance, self.amount, limits)
            .map(Effect::Use)
            .ok_or(Decline::Refused(Refusal::InsufficientBalance {
                balance,
                requested: self.amount,
            }))
    }

    fn outcome(&self, applied: &AppliedEffect) -> Outcome {
        Outcome::Used(applied.balance_receipt())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operations::test_support::{applied, limits, state};

    fn use_of(amount: i64) -> UseBalance {
        UseBalance {
            user: UserId::new(1).unwrap(),
            amount: Amount::new(amount, &limits()).unwrap(),
            key: IdempotencyKey::parse("k").unwrap(),
        }
    }

    #[test]
    fn a_use_debits_down_to_zero_and_no_further() {
        let limits = limits();
        assert_eq!(
            use_of(900)
                .decide(&state(900), &limits)
                .map(|e| e.ledger().map(|(kind, m)| (kind, m.balance_after.get()))),
            Ok(Some((EntryKind::Use, 0)))
        );
        assert_eq!(
            use_of(901).decide(&state(900), &limits),
            Err(Decline::Refused(Refusal::InsufficientBalance {
                balance: state(900).user.balance,
                requested: Amount::new(901, &limits).unwrap(),
            }))
        );
    }

    #[test]
    fn its_fingerprint_and_outcome_are_the_stored_ones() {
        let op = use_of(250);
        assert_eq!(op.fingerprint().as_str(), "use:user=1:amount=250");
        let effect = op.decide(&state(1_000), &limits()).unwrap();
        let Outcome::Used(receipt) = op.outcome(&applied(effect)) else {
            panic!("a use answers Used");
        };
        assert_eq!((receipt.balance.get(), receipt.amount.get()), (750, 250));
    }
}
