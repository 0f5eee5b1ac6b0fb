//! In-process, per-key FIFO turns. Within one process only the waiter whose turn it is
//! polls Redis for a key; the others queue here. Under a hot key this turns N pollers per
//! process into one, which is most of the Redis round trips a contended lock costs.
//!
//! A turn is held only while its waiter contends on Redis, never while the lock itself is
//! held: the next local waiter then polls with the same backoff as waiters in other
//! processes, so no process can hand the lock to its own queue ahead of the others.
//!
//! A release made by this process wakes the local turn holder at once ([`KeyQueues::wake`]),
//! so under a hot key the next local waiter tries Redis right after the release instead of
//! at the end of its backoff pause.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::{Mutex as TurnLock, Notify, OwnedMutexGuard};
use tokio::time::Instant;

/// One key's local queue: whose turn it is to poll Redis, and a bell rung by local releases.
#[derive(Debug, Default)]
pub(crate) struct Slot {
    turn: Arc<TurnLock<()>>,
    released: Notify,
}

type Slots = Arc<Mutex<HashMap<String, Arc<Slot>>>>;

/// The queues of every key somebody in this process waits for. An entry lives only while
/// it has a waiter, so the map never holds more keys than there are waiting acquires.
#[derive(Debug, Default)]
pub(crate) struct KeyQueues {
    slots: Slots,
}

impl KeyQueues {
    /// Waits in `key`'s queue until it is this caller's turn, or `None` at `deadline`.
    /// tokio's mutex is fair, so turns are handed out in arrival order.
    pub(crate) async fn take_turn(&self, key: &str, deadline: Instant) -> Option<Turn> {
        let member = self.join(key);
        let waited =
            tokio::time::timeout_at(deadline, Arc::clone(&member.slot.turn).lock_owned()).await;
        match waited {
            Ok(guard) => Some(Turn {
                _guard: guard,
                _member: member,
            }),
            Err(_elapsed) => None,
        }
    }

    fn join(&self, key: &str) -> Member {
        let mut slots = lock(&self.slots);
        let slot = Arc::clone(slots.entry(key.to_owned()).or_default());
        Member {
            key: key.to_owned(),
            slot,
            slots: Arc::clone(&self.slots),
        }
    }

    /// Wakes the local waiter polling Redis for `key`, if there is one: this process has
    /// just released it. A bell rung with nobody listening is kept for the next poller
    /// (`Notify::notify_one`), so a release between two polls is not missed.
    pub(crate) fn wake(&self, key: &str) {
        if let Some(slot) = lock(&self.slots).get(key) {
            slot.released.notify_one();
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        lock(&self.slots).len()
    }
}

/// The map is only touched in short non-async sections that cannot leave it half-updated,
/// so a panic elsewhere while it was locked does not make its contents wrong.
fn lock(slots: &Slots) -> MutexGuard<'_, HashMap<String, Arc<Slot>>> {
    slots.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One waiter's (or turn holder's) reference to its key's queue. Dropping the last one
/// removes the key from the map, whether the waiter got its turn, timed out or was cancelled.
struct Member {
    key: String,
    slot: Arc<Slot>,
    slots: Slots,
}

impl Drop for Member {
    fn drop(&mut self) {
        let mut slots = lock(&self.slots);
        // The map's reference plus ours means nobody else waits for or holds this turn, and
        // nobody can join without the map lock held here, so the entry can go safely.
        let unused = slots
            .get(&self.key)
            .is_some_and(|slot| Arc::ptr_eq(slot, &self.slot) && Arc::strong_count(slot) == 2);
        if unused {
            slots.remove(&self.key);
        }
    }
}

/// The right to contend on Redis for a key; the next local waiter's turn starts on drop.
pub(crate) struct Turn {
    // Field order matters: the guard must be released before `Member::drop` counts references.
    _guard: OwnedMutexGuard<()>,
    _member: Member,
}

impl Turn {
    /// Completes when this process releases the key (or already has, since the last poll).
    pub(crate) async fn released(&self) {
        self._member.slot.released.notified().await;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn later(ms: u64) -> Instant {
        Instant::now() + Duration::from_millis(ms)
    }

    #[tokio::test]
    async fn a_turn_is_exclusive_and_its_entry_goes_with_it() {
        let queues = KeyQueues::default();
        let turn = queues
            .take_turn("k", later(1_000))
            .await
            .expect("free turn");
        assert_eq!(queues.len(), 1);
        assert!(
            queues.take_turn("k", later(20)).await.is_none(),
            "turn is taken"
        );
        assert_eq!(
            queues.len(),
            1,
            "the timed-out waiter left, the holder stays"
        );
        assert!(
            queues.take_turn("other", later(20)).await.is_some(),
            "keys are independent"
        );
        drop(turn);
        assert_eq!(queues.len(), 0);
    }

    #[tokio::test]
    async fn turns_pass_in_arrival_order() {
        let queues = Arc::new(KeyQueues::default());
        let first = queues
            .take_turn("k", later(1_000))
            .await
            .expect("free turn");
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut waiters = Vec::new();
        for i in 0..5 {
            let (mine, order) = (Arc::clone(&queues), Arc::clone(&order));
            waiters.push(tokio::spawn(async move {
                let _turn = mine.take_turn("k", later(5_000)).await.expect("turn");
                order.lock().unwrap().push(i);
            }));
            // Let this waiter queue up before the next one is spawned: the turn lock is
            // shared by the slot and the holder's guard (2), then a pending lock future per
            // waiter, which has queued by the time it holds its reference.
            while Arc::strong_count(&lock(&queues.slots).get("k").unwrap().turn) < i + 3 {
                tokio::task::yield_now().await;
            }
        }
        drop(first);
        for waiter in waiters {
            waiter.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3, 4]);
        assert_eq!(queues.len(), 0);
    }

    #[tokio::test]
    async fn a_cancelled_waiter_leaves_no_entry() {
        let queues = Arc::new(KeyQueues::default());
        let held = queues
            .take_turn("k", later(1_000))
            .await
            .expect("free turn");
        let waiter = {
            let queues = Arc::clone(&queues);
            tokio::spawn(async move { queues.take_turn("k", later(60_000)).await.is_some() })
        };
        tokio::task::yield_now().await;
        waiter.abort();
        assert!(waiter.await.is_err(), "aborted");
        drop(held);
        assert_eq!(queues.len(), 0);
    }
}
