//! [`InProcessLockManager`]: the `LockManager` port for the tasks of one process, with the
//! semantics of the Redis lock (a lease that expires, owner-only release by token).
//!
//! Each held key has a slot with its holder and a [`Notify`]. A waiter registers on the
//! `Notify` while it still holds the map's mutex, so a release that comes after the check
//! always finds it; a release wakes exactly one waiter (`notify_one`), so a queue of N
//! waiters costs O(N) wake-ups in all rather than O(N) per release. A waiter also wakes
//! by itself at the holder's lease expiry or at its own deadline, whichever is first.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use domain::ports::{LockError, LockKey, LockLease, LockManager, Release};
use tokio::sync::Notify;
use tokio::sync::futures::OwnedNotified;
use tokio::time::Instant;

/// A lock manager for this process only: it does not guard a second instance.
///
/// Cloning is cheap and every clone shares the same locks.
#[derive(Clone, Default)]
pub struct InProcessLockManager {
    slots: Arc<Mutex<HashMap<String, Slot>>>,
}

impl std::fmt::Debug for InProcessLockManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InProcessLockManager")
            .finish_non_exhaustive()
    }
}

/// One key that is held or waited for. Removed from the map when it is neither.
struct Slot {
    holder: Option<Holder>,
    /// Each waiter's `OwnedNotified` holds a clone of this `Arc`, so its strong count tells
    /// whether anyone waits.
    notify: Arc<Notify>,
}

struct Holder {
    token: String,
    /// `None` for a lease too long to represent: it never expires.
    expires_at: Option<Instant>,
}

impl Holder {
    fn is_live(&self, now: Instant) -> bool {
        self.expires_at.is_none_or(|at| now < at)
    }
}

/// The earlier of two optional instants, where `None` means "never".
fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, None) => a,
        (None, b) => b,
    }
}

impl InProcessLockManager {
    pub fn new() -> Self {
        Self::default()
    }

    fn slots(&self) -> MutexGuard<'_, HashMap<String, Slot>> {
        // Every critical section leaves the map consistent before anything can panic, so
        // a poisoned lock still guards sound data.
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// How many keys are held or waited for (the map must not grow with every key ever used).
    #[cfg(test)]
    pub(crate) fn tracked_keys(&self) -> usize {
        self.slots().len()
    }
}

/// Hands a freed slot on: to the next waiter if there is one, else out of the map.
fn hand_on(slots: &mut HashMap<String, Slot>, key: &str) {
    if let Some(slot) = slots.get(key) {
        if Arc::strong_count(&slot.notify) == 1 {
            slots.remove(key);
        } else {
            slot.notify.notify_one();
        }
    }
}

/// What one look at a key found.
enum Look {
    Acquired(LockLease),
    TimedOut,
    /// Held by someone else: wait for `notified` (already registered) or until `wake_at`.
    Wait {
        notified: Pin<Box<OwnedNotified>>,
        wake_at: Option<Instant>,
    },
}

impl InProcessLockManager {
    /// Takes `key` if it is free (or its lease ran out), else registers as a waiter. Not
    /// async, so the map's guard can never be held across an `.await`.
    fn look(&self, key: &LockKey, lease: Duration, deadline: Option<Instant>) -> Look {
        let mut slots = self.slots();
        let now = Instant::now();
        let slot = slots
            .entry(key.as_str().to_owned())
            .or_insert_with(|| Slot {
                holder: None,
                notify: Arc::new(Notify::new()),
            });
        match &slot.holder {
            Some(holder) if holder.is_live(now) => {
                // Checked only while the key is held: a key that is free when we look is
                // taken, however late the look.
                if deadline.is_some_and(|deadline| now >= deadline) {
                    return Look::TimedOut;
                }
                // Registered before the map's mutex is let go: a release after this look
                // must take that mutex first, and then finds us in the queue.
                let mut notified = Box::pin(Arc::clone(&slot.notify).notified_owned());
                notified.as_mut().enable();
                Look::Wait {
                    notified,
                    wake_at: earliest(holder.expires_at, deadline),
                }
            }
            // Free, or held by a lease that has run out: ours now.
            _ => {
                let token = uuid::Uuid::new_v4().to_string();
                slot.holder = Some(Holder {
                    token: token.clone(),
                    expires_at: now.checked_add(lease),
                });
                Look::Acquired(LockLease {
                    key: key.clone(),
                    token,
                })
            }
        }
    }
}

#[async_trait]
impl LockManager for InProcessLockManager {
    async fn acquire(
        &self,
        key: &LockKey,
        wait: Duration,
        lease: Duration,
    ) -> Result<LockLease, LockError> {
        let deadline = Instant::now().checked_add(wait);
        loop {
            match self.look(key, lease, deadline) {
                Look::Acquired(lease) => return Ok(lease),
                Look::TimedOut => return Err(LockError::Timeout),
                // Notified or woken by the clock, the next look decides; the deadline is
                // checked there, under the mutex, so a release at the last instant counts.
                Look::Wait {
                    notified,
                    wake_at: Some(at),
                } => {
                    let _elapsed = tokio::time::timeout_at(at, notified).await;
                }
                Look::Wait {
                    notified,
                    wake_at: None,
                } => notified.await,
            }
        }
    }

    async fn release(&self, lease: &LockLease) -> Result<Release, LockError> {
        let mut slots = self.slots();
        let now = Instant::now();
        let key = lease.key.as_str();
        let Some(slot) = slots.get_mut(key) else {
            return Ok(Release::LeaseLost);
        };
        let live = match &slot.holder {
            Some(holder) if holder.token == lease.token => holder.is_live(now),
            // Another holder's lock, or nobody's: not ours to delete.
            _ => return Ok(Release::LeaseLost),
        };
        // Our token, live or expired: an expired lease is gone in Redis too, so clearing it
        // changes nothing for anyone but frees the slot now rather than at the next look.
        slot.holder = None;
        hand_on(&mut slots, key);
        Ok(if live {
            Release::Released
        } else {
            Release::LeaseLost
        })
    }
}

#[cfg(test)]
mod tests;
