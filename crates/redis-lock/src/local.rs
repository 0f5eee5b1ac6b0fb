//! What this process knows about its keys: per-key FIFO turns for its waiters, and the
//! keys it holds in Redis, so a release can hand a key straight to the next local waiter.
//!
//! **Turns.** Within one process only the waiter whose turn it is contends for a key; the
//! others queue here. Under a hot key this turns N pollers per process into one.
//!
//! **Hand-off.** While this process holds a key, its turn holder does not poll Redis: it
//! waits for the local release. The releasing holder then, instead of deleting the key and
//! letting the waiter `SET` it again (two Redis round trips inside the hot key's critical
//! path), *parks* the key: it stays in Redis under the same value and the waiter takes it
//! over with a token of its own. A hand-off is allowed only while the chain of holders that
//! began with the `SET` is young and short ([`HandoffPolicy`]): the key's Redis lease was
//! set when the chain began, so every holder still has most of its lease, and holders in
//! other processes get their chance to `SET` the key whenever a chain ends.
//!
//! A parked key nobody takes (its waiters timed out or were cancelled) is sent to the
//! manager's reaper, which deletes it from Redis.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::{Mutex as TurnLock, Notify, OwnedMutexGuard};
use tokio::time::Instant;

/// When a release may hand its key to a local waiter instead of deleting it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandoffPolicy {
    /// Hand-offs in a row before the key is released in Redis for everybody (0: never).
    pub max_handoffs: u32,
    /// Age of the chain (since its `SET`) after which the key is released in Redis; it is
    /// also capped at half the lease, so a holder always has at least half its lease left.
    pub max_age: Duration,
}

impl HandoffPolicy {
    fn allows(&self, chain: &Chain) -> bool {
        !chain.others_wait && chain.handoffs < self.max_handoffs && chain.is_young(self.max_age)
    }
}

/// A run of local holders of one key, begun by one `SET NX PX` in Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Chain {
    /// The value stored in Redis for the whole chain.
    redis_token: String,
    /// The current holder's token; `None` while the key is parked for the next waiter.
    holder: Option<String>,
    /// Taken before the `SET` was sent, so the Redis lease ends no earlier than
    /// `started + lease`.
    started: Instant,
    lease: Duration,
    handoffs: u32,
    /// Another process was waiting when the chain began: it hands nothing off, so that
    /// process gets the key at the next release.
    others_wait: bool,
}

impl Chain {
    /// A chain begun by a `SET` of `token`, sent at `started`, held by that token.
    pub(crate) fn begun(token: &str, started: Instant, lease: Duration, others_wait: bool) -> Self {
        Self {
            redis_token: token.to_owned(),
            holder: Some(token.to_owned()),
            started,
            lease,
            handoffs: 0,
            others_wait,
        }
    }

    fn is_young(&self, max_age: Duration) -> bool {
        self.started.elapsed() < max_age.min(self.lease / 2)
    }
}

/// What the turn holder found for its key.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Claim {
    /// Nobody in this process holds the key: contend for it in Redis.
    Free,
    /// Somebody in this process holds it until at most this instant (its lease's end): wait
    /// for its release, which hands it over or wakes (and look again now and then: a
    /// release whose delete failed or was cancelled wakes nobody).
    HeldHere(Instant),
    /// A parked key was taken over: the caller holds it under its own token.
    Taken,
}

/// What a release must still do.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ReleaseStep {
    /// The key was handed to a local waiter: nothing to do in Redis.
    HandedOff,
    /// The token does not hold the key here any more (released already, or handed off by
    /// an earlier holder of the chain): nothing to delete.
    NotHolder,
    /// Delete the key in Redis if it still holds this token.
    Delete(String),
}

/// One key's local queue: whose turn it is to contend, and a bell rung by local releases.
#[derive(Debug, Default)]
pub(crate) struct Slot {
    turn: Arc<TurnLock<()>>,
    released: Notify,
    /// Set by a release that found another process waiting: the local turn holder does
    /// not contend before this instant, so that process gets its chance first.
    courtesy: Mutex<Option<Instant>>,
}

/// One key's queue and how many waiters (turn holder included) are in it. The count is
/// only changed under the state lock, so the last one out is known for sure.
#[derive(Debug, Default)]
struct Waiting {
    slot: Arc<Slot>,
    members: usize,
}

#[derive(Debug, Default)]
struct State {
    /// Keys somebody here waits for; an entry lives only while it has a member.
    waiting: HashMap<String, Waiting>,
    /// Keys this process holds (or has parked) in Redis.
    held: HashMap<String, Chain>,
}

/// The reaper's inbox: a parked key nobody took, as (Redis key, token).
pub(crate) type Orphans = UnboundedSender<(String, String)>;

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    orphans: Orphans,
}

/// The queues and holds of every key of this process.
#[derive(Debug)]
pub(crate) struct KeyQueues {
    shared: Arc<Shared>,
}

impl KeyQueues {
    pub(crate) fn new(orphans: Orphans) -> Self {
        Self {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                orphans,
            }),
        }
    }

    /// Waits in `key`'s queue until it is this caller's turn, or `None` at `deadline`.
    /// tokio's mutex is fair, so turns are handed out in arrival order.
    pub(crate) async fn take_turn(&self, key: &str, deadline: Instant) -> Option<Turn> {
        let member = self.join(key);
        let waited =
            tokio::time::timeout_at(deadline, Arc::clone(&member.slot.turn).lock_owned()).await;
        match waited {
            Ok(guard) => Some(Turn {
                _guard: guard,
                member,
            }),
            Err(_elapsed) => None,
        }
    }

    fn join(&self, key: &str) -> Member {
        let mut state = lock(&self.shared);
        let entry = state.waiting.entry(key.to_owned()).or_default();
        entry.members += 1;
        let slot = Arc::clone(&entry.slot);
        Member {
            key: key.to_owned(),
            slot,
            shared: Arc::clone(&self.shared),
        }
    }

    /// Decides what releasing `token`'s hold on `key` takes: a hand-off to the local
    /// waiter when there is one and `policy` allows it, else a delete in Redis.
    pub(crate) fn release(&self, key: &str, token: &str, policy: HandoffPolicy) -> ReleaseStep {
        let mut state = lock(&self.shared);
        let State { waiting, held } = &mut *state;
        let Some(chain) = held.get_mut(key) else {
            // Not known here (taken before a restart of this manager, say): the token's own.
            return ReleaseStep::Delete(token.to_owned());
        };
        if chain.holder.as_deref() != Some(token) {
            return ReleaseStep::NotHolder;
        }
        if let Some(waiting) = waiting.get(key)
            && policy.allows(chain)
        {
            chain.holder = None;
            chain.handoffs += 1;
            waiting.slot.released.notify_one();
            return ReleaseStep::HandedOff;
        }
        let redis_token = chain.redis_token.clone();
        held.remove(key);
        ReleaseStep::Delete(redis_token)
    }

    /// Wakes the local waiter contending for `key`, if there is one: this process has
    /// just deleted it. With `courtesy`, that waiter holds back until then (another process
    /// waits too). A bell rung with nobody listening is kept for the next waiter
    /// (`Notify::notify_one`), so a release between two polls is not missed.
    pub(crate) fn wake(&self, key: &str, courtesy: Option<Instant>) {
        if let Some(waiting) = lock(&self.shared).waiting.get(key) {
            *waiting
                .slot
                .courtesy
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = courtesy;
            waiting.slot.released.notify_one();
        }
    }

    /// Whether somebody in this process waits for `key`.
    pub(crate) fn is_awaited(&self, key: &str) -> bool {
        lock(&self.shared).waiting.contains_key(key)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        lock(&self.shared).waiting.len()
    }

    #[cfg(test)]
    fn held(&self, key: &str) -> Option<Chain> {
        lock(&self.shared).held.get(key).cloned()
    }
}

/// The state is only touched in short non-async sections that cannot leave it
/// half-updated, so a panic elsewhere while it was locked does not make it wrong.
fn lock(shared: &Shared) -> MutexGuard<'_, State> {
    shared.state.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One waiter's (or turn holder's) membership of its key's queue. The last one to leave
/// removes the key from the map, whether the waiter got its turn, timed out or was
/// cancelled; a key parked for waiters that are all gone goes to the reaper.
struct Member {
    key: String,
    slot: Arc<Slot>,
    shared: Arc<Shared>,
}

impl Drop for Member {
    fn drop(&mut self) {
        let mut state = lock(&self.shared);
        let last = match state.waiting.get_mut(&self.key) {
            Some(waiting) if Arc::ptr_eq(&waiting.slot, &self.slot) => {
                waiting.members -= 1;
                waiting.members == 0
            }
            _ => false,
        };
        if !last {
            return;
        }
        state.waiting.remove(&self.key);
        let parked = state
            .held
            .get(&self.key)
            .is_some_and(|chain| chain.holder.is_none());
        if parked && let Some(chain) = state.held.remove(&self.key) {
            // If the reaper is gone (the manager was dropped) the lease expires by itself.
            let _ = self
                .shared
                .orphans
                .send((self.key.clone(), chain.redis_token));
        }
    }
}

/// The right to contend for a key; the next local waiter's turn starts on drop.
pub(crate) struct Turn {
    _guard: OwnedMutexGuard<()>,
    member: Member,
}

impl Turn {
    /// Looks at the key's hold in this process; takes a parked key over as `token`.
    pub(crate) fn claim(&self, token: &str) -> Claim {
        let mut state = lock(&self.member.shared);
        let Some(chain) = state.held.get_mut(&self.member.key) else {
            return Claim::Free;
        };
        if chain.holder.is_some() {
            let lease_end = chain.started + chain.lease;
            // A holder past its lease no longer holds the key in Redis: contend for it
            // there, as other processes do (a new chain replaces this one).
            return if Instant::now() < lease_end {
                Claim::HeldHere(lease_end)
            } else {
                Claim::Free
            };
        }
        // Parked: the releaser checked the chain's age, but this waiter may have been
        // slow to run; a holder must still have most of the lease.
        if chain.is_young(chain.lease) {
            chain.holder = Some(token.to_owned());
            return Claim::Taken;
        }
        // Too old to take over: the reaper deletes it in Redis, and this waiter contends
        // there like everybody else (its attempts fail until the key is gone).
        if let Some(chain) = state.held.remove(&self.member.key) {
            let _ = self
                .member
                .shared
                .orphans
                .send((self.member.key.clone(), chain.redis_token));
        }
        Claim::Free
    }

    /// The instant before which this turn should not contend, set by the last release.
    pub(crate) fn take_courtesy(&self) -> Option<Instant> {
        self.member
            .slot
            .courtesy
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    /// Records that this turn's `SET` took the key, beginning a chain.
    pub(crate) fn hold(&self, chain: Chain) {
        lock(&self.member.shared)
            .held
            .insert(self.member.key.clone(), chain);
    }

    /// Completes when this process releases or hands over the key (or already has, since
    /// the last look).
    pub(crate) async fn released(&self) {
        self.member.slot.released.notified().await;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn queues() -> KeyQueues {
        KeyQueues::new(tokio::sync::mpsc::unbounded_channel().0)
    }

    fn later(ms: u64) -> Instant {
        Instant::now() + Duration::from_millis(ms)
    }

    #[tokio::test]
    async fn a_turn_is_exclusive_and_its_entry_goes_with_it() {
        let queues = queues();
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
        let queues = Arc::new(queues());
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
            while Arc::strong_count(&lock(&queues.shared).waiting.get("k").unwrap().slot.turn)
                < i + 3
            {
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
        let queues = Arc::new(queues());
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

    /// Ages are tested with paused time; elsewhere the age limit is out of reach.
    const POLICY: HandoffPolicy = HandoffPolicy {
        max_handoffs: 2,
        max_age: Duration::from_secs(3_600),
    };

    /// A turn that took `key` with a `SET` of `token`, as the manager does.
    async fn holding(queues: &KeyQueues, key: &str, token: &str) {
        let turn = queues.take_turn(key, later(1_000)).await.expect("turn");
        assert_eq!(turn.claim(token), Claim::Free);
        turn.hold(Chain::begun(
            token,
            Instant::now(),
            Duration::from_secs(30),
            false,
        ));
    }

    #[tokio::test]
    async fn a_release_with_nobody_waiting_deletes_the_chains_redis_value() {
        let queues = queues();
        holding(&queues, "k", "t1").await;
        assert_eq!(
            queues.release("k", "t1", POLICY),
            ReleaseStep::Delete("t1".into())
        );
        assert_eq!(queues.held("k"), None);
        assert_eq!(
            queues.release("k", "t1", POLICY),
            ReleaseStep::Delete("t1".into()),
            "unknown here: the compare-and-delete decides"
        );
    }

    #[tokio::test]
    async fn a_waiter_takes_a_released_key_over_and_the_old_token_releases_nothing() {
        let queues = queues();
        holding(&queues, "k", "t1").await;
        let turn = queues.take_turn("k", later(1_000)).await.expect("turn");
        assert!(matches!(turn.claim("t2"), Claim::HeldHere(_)), "held by t1");

        assert_eq!(queues.release("k", "t1", POLICY), ReleaseStep::HandedOff);
        tokio::time::timeout(Duration::from_secs(5), turn.released())
            .await
            .expect("the hand-off rings the bell");
        assert_eq!(turn.claim("t2"), Claim::Taken);
        drop(turn);
        let chain = queues.held("k").expect("still held here");
        assert_eq!(chain.redis_token, "t1", "Redis keeps the chain's value");
        assert_eq!(chain.holder.as_deref(), Some("t2"));

        assert_eq!(queues.release("k", "t1", POLICY), ReleaseStep::NotHolder);
        assert_eq!(
            queues.release("k", "t2", POLICY),
            ReleaseStep::Delete("t1".into()),
            "the last holder deletes the chain's value"
        );
    }

    #[tokio::test]
    async fn a_chain_ends_after_its_hand_offs_and_releases_in_redis() {
        let queues = queues();
        holding(&queues, "k", "t0").await;
        let mut holder = "t0".to_owned();
        for next in ["t1", "t2"] {
            let turn = queues.take_turn("k", later(1_000)).await.expect("turn");
            assert_eq!(queues.release("k", &holder, POLICY), ReleaseStep::HandedOff);
            assert_eq!(turn.claim(next), Claim::Taken);
            holder = next.to_owned();
        }
        let _waiting = queues.take_turn("k", later(1_000)).await.expect("turn");
        assert_eq!(
            queues.release("k", &holder, POLICY),
            ReleaseStep::Delete("t0".into()),
            "two hand-offs is the policy's limit, waiter or not"
        );
        assert_eq!(queues.held("k"), None);
    }

    #[tokio::test(start_paused = true)]
    async fn an_old_chain_is_not_handed_off_nor_taken_over() {
        let (orphans, mut reaper) = tokio::sync::mpsc::unbounded_channel();
        let queues = KeyQueues::new(orphans);
        let young = HandoffPolicy {
            max_age: Duration::from_millis(100),
            ..POLICY
        };
        holding(&queues, "k", "t1").await;
        let turn = queues.take_turn("k", later(60_000)).await.expect("turn");
        tokio::time::advance(Duration::from_millis(150)).await;
        assert_eq!(
            queues.release("k", "t1", young),
            ReleaseStep::Delete("t1".into()),
            "older than max_age"
        );
        assert_eq!(turn.claim("t2"), Claim::Free);

        // Parked while young, taken over only while the lease has at least half left.
        turn.hold(Chain::begun(
            "t2",
            Instant::now(),
            Duration::from_secs(30),
            false,
        ));
        let waiter = queues.take_turn("k", later(60_000));
        let release = async {
            tokio::task::yield_now().await;
            let relaxed = HandoffPolicy {
                max_handoffs: 5,
                max_age: Duration::from_secs(3_600),
            };
            assert_eq!(queues.release("k", "t2", relaxed), ReleaseStep::HandedOff);
            drop(turn);
        };
        let (waiter, ()) = tokio::join!(waiter, release);
        let waiter = waiter.expect("turn");
        tokio::time::advance(Duration::from_secs(16)).await;
        assert_eq!(waiter.claim("t3"), Claim::Free, "not taken over");
        assert_eq!(queues.held("k"), None);
        assert_eq!(
            reaper.try_recv().ok(),
            Some(("k".into(), "t2".into())),
            "the reaper deletes it in Redis"
        );
    }

    #[tokio::test]
    async fn a_key_parked_for_a_waiter_that_left_goes_to_the_reaper() {
        let (orphans, mut reaper) = tokio::sync::mpsc::unbounded_channel();
        let queues = KeyQueues::new(orphans);
        holding(&queues, "k", "t1").await;
        let turn = queues.take_turn("k", later(1_000)).await.expect("turn");
        assert_eq!(queues.release("k", "t1", POLICY), ReleaseStep::HandedOff);
        drop(turn);
        assert_eq!(reaper.try_recv().ok(), Some(("k".into(), "t1".into())));
        assert_eq!(queues.held("k"), None);
        assert_eq!(queues.len(), 0);
    }

    #[tokio::test]
    async fn a_chain_begun_while_another_process_waited_hands_nothing_off() {
        let queues = queues();
        let turn = queues.take_turn("k", later(1_000)).await.expect("turn");
        turn.hold(Chain::begun(
            "t1",
            Instant::now(),
            Duration::from_secs(30),
            true,
        ));
        drop(turn);
        let _waiting = queues.take_turn("k", later(1_000)).await.expect("turn");
        assert_eq!(
            queues.release("k", "t1", POLICY),
            ReleaseStep::Delete("t1".into())
        );
    }

    #[tokio::test]
    async fn a_courtesy_pause_is_handed_to_the_next_turn_once() {
        let queues = queues();
        let turn = queues.take_turn("k", later(1_000)).await.expect("turn");
        let until = later(25);
        queues.wake("k", Some(until));
        assert_eq!(turn.take_courtesy(), Some(until));
        assert_eq!(turn.take_courtesy(), None, "taken once");
        queues.wake("k", None);
        assert_eq!(turn.take_courtesy(), None);
    }

    /// Two members leaving at once (on two threads) must still leave no entry behind:
    /// an entry without members would make a release park the key for nobody.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn members_leaving_together_leave_no_entry() {
        let queues = Arc::new(queues());
        for _ in 0..200 {
            let held = queues.take_turn("k", later(1_000)).await.expect("turn");
            let waiter = {
                let queues = Arc::clone(&queues);
                tokio::spawn(async move { queues.take_turn("k", later(60_000)).await.is_some() })
            };
            while lock(&queues.shared).waiting.get("k").map(|w| w.members) != Some(2) {
                tokio::task::yield_now().await;
            }
            let (a, b) = (
                tokio::spawn(async move { drop(held) }),
                tokio::spawn(async move { waiter.abort() }),
            );
            a.await.expect("drop");
            b.await.expect("abort");
            // The aborted waiter may still be unwinding; it must leave, not linger.
            for _ in 0..100_000 {
                if queues.len() == 0 {
                    break;
                }
                tokio::task::yield_now().await;
            }
            assert_eq!(queues.len(), 0, "an entry outlived its members");
        }
    }
}
