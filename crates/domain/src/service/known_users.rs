//! Users this instance has seen exist. Users are never deleted, so once the store said a
//! user exists that stays true: a request the coupon gate can answer needs no database
//! round trip for its user after the first. The set is bounded; when full it starts over
//! (a forgotten user costs one lookup, never a wrong answer).

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};

use crate::types::UserId;

/// How many users are remembered before the set starts over.
const CAPACITY: usize = 1 << 20;

#[derive(Debug, Default, Clone)]
pub(crate) struct KnownUsers {
    seen: Arc<Mutex<HashSet<UserId>>>,
}

impl KnownUsers {
    pub(crate) fn contains(&self, user: UserId) -> bool {
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&user)
    }

    pub(crate) fn insert(&self, user: UserId) {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        if seen.len() >= CAPACITY {
            seen.clear();
        }
        seen.insert(user);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seen_user_is_known_and_others_are_not() {
        let known = KnownUsers::default();
        let (one, two) = (UserId::new(1).unwrap(), UserId::new(2).unwrap());
        known.insert(one);
        assert!(known.contains(one));
        assert!(!known.contains(two));
    }
}
