//! The in-flight half of the idempotency state machine: which keys this instance is
//! running right now. A duplicate that arrives while its first request is still running
//! is answered at once (`IDEMPOTENCY_KEY_IN_USE`, or `IDEMPOTENCY_KEY_REUSED` for another
//! fingerprint) instead of queueing behind the user lock.
//!
//! Claims are deliberately not durable: the effect and the completed record commit
//! together, so a crash mid-request leaves nothing to clean up and a retry simply runs.
//! Duplicates that reach two instances at once are serialised by the user lock and, if
//! that is gone, by the unique (user, key) record written in the atomic step.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use chrono::Utc;

use crate::idempotency::{Admission, Fingerprint, KeyState};
use crate::types::{IdempotencyKey, UserId};

type Slot = (UserId, IdempotencyKey);

/// The keys in flight in this instance.
#[derive(Debug, Default, Clone)]
pub struct ClaimRegistry {
    inner: Arc<Mutex<HashMap<Slot, Fingerprint>>>,
}

/// Holds a claim; dropping it releases the key on every path, errors and cancellation included.
#[derive(Debug)]
pub struct Claim {
    registry: ClaimRegistry,
    slot: Option<Slot>,
}

impl ClaimRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Claims `(user, key)` for a request with `fingerprint`.
    ///
    /// # Errors
    /// [`Admission::InUse`] while a request with the same fingerprint holds the key, and
    /// [`Admission::Reused`] while one with another fingerprint does.
    pub fn claim(
        &self,
        user: UserId,
        key: &IdempotencyKey,
        fingerprint: &Fingerprint,
    ) -> Result<Claim, Admission> {
        let slot = (user, key.clone());
        // The map is only touched in short, non-panicking sections; a poisoned lock still
        // holds consistent data.
        let mut map = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let state = match map.get(&slot) {
            Some(held) => KeyState::InFlight {
                fingerprint: held.clone(),
            },
            None => KeyState::Free,
        };
        state.claim(fingerprint.clone(), Utc::now())?;
        map.insert(slot.clone(), fingerprint.clone());
        Ok(Claim {
            registry: self.clone(),
            slot: Some(slot),
        })
    }

    /// Whether a request with `(user, key)` is running in this instance right now.
    pub fn is_in_flight(&self, user: UserId, key: &IdempotencyKey) -> bool {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains_key(&(user, key.clone()))
    }

    /// How many keys are in flight (for tests and diagnostics).
    pub fn in_flight(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            self.registry
                .inner
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&slot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{Amount, Limits};

    fn key(raw: &str) -> IdempotencyKey {
        IdempotencyKey::parse(raw).unwrap()
    }

    fn fp(amount: i64) -> Fingerprint {
        let user = UserId::new(1).unwrap();
        let amount = Amount::new(amount, &Limits::default()).unwrap();
        crate::operations::charge::fingerprint(user, amount)
    }

    #[test]
    fn a_second_claim_is_in_use_until_the_first_is_dropped() {
        let registry = ClaimRegistry::new();
        let user = UserId::new(1).unwrap();
        let first = registry.claim(user, &key("k"), &fp(10));
        assert!(first.is_ok());
        assert_eq!(
            registry.claim(user, &key("k"), &fp(10)).err(),
            Some(Admission::InUse)
        );
        assert_eq!(
            registry.claim(user, &key("k"), &fp(11)).err(),
            Some(Admission::Reused)
        );
        drop(first);
        assert_eq!(registry.in_flight(), 0);
        assert!(registry.claim(user, &key("k"), &fp(11)).is_ok());
    }

    #[test]
    fn keys_are_scoped_to_their_user() {
        let registry = ClaimRegistry::new();
        let one = UserId::new(1).unwrap();
        let two = UserId::new(2).unwrap();
        let _a = registry.claim(one, &key("k"), &fp(10));
        assert!(registry.claim(two, &key("k"), &fp(10)).is_ok());
    }
}
