//! The `LockManager` contract: mutual exclusion with a lease, shared by every instance on
//! the same backend, and a release that only the holder's token can do.
//!
//! Each suite takes two managers on one backend, as two service instances would have them
//! (for the in-process manager, two handles on the same manager), and plays its scenario
//! within one instance and across the two.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use domain::ports::{LockError, LockKey, LockLease, LockManager, Release};
use domain::types::UserId;

use super::support::bounded;

/// Long enough never to run out during a suite.
const LEASE: Duration = Duration::from_secs(30);
/// A wait that is sure to be over while a key is still held.
const SHORT_WAIT: Duration = Duration::from_millis(100);
/// A wait that is sure to outlast whatever a suite waits for.
const LONG_WAIT: Duration = Duration::from_secs(5);

fn lock_key(raw: i64) -> LockKey {
    LockKey::user_balance(UserId::new(raw).expect("a positive user id"))
}

type Locks = Arc<dyn LockManager>;

/// The two ways to pair the managers: within one instance, and across two.
fn pairs(first: &Locks, second: &Locks) -> [(&'static str, Locks, Locks); 2] {
    [
        ("one instance", Arc::clone(first), Arc::clone(first)),
        ("two instances", Arc::clone(first), Arc::clone(second)),
    ]
}

async fn acquire_ok(
    locks: &dyn LockManager,
    key: &LockKey,
    wait: Duration,
    lease: Duration,
) -> LockLease {
    bounded("acquire", locks.acquire(key, wait, lease))
        .await
        .unwrap_or_else(|e| panic!("acquiring {key:?}: {e:?}"))
}

async fn release(locks: &dyn LockManager, lease: &LockLease) -> Release {
    bounded("release", locks.release(lease))
        .await
        .unwrap_or_else(|e| panic!("releasing {:?}: {e:?}", lease.key))
}

/// Asserts that `key` is held by somebody: an acquire waiting `wait` times out, and not
/// before the wait is (about) over.
async fn assert_held(locks: &dyn LockManager, key: &LockKey, wait: Duration, context: &str) {
    let started = Instant::now();
    let attempt = bounded("acquire", locks.acquire(key, wait, LEASE)).await;
    let waited = started.elapsed();
    match attempt {
        Err(LockError::Timeout) => {}
        other => panic!("{context}: {key:?} is held, so the acquire must time out; got {other:?}"),
    }
    // A tenth of slack for timer granularity; the point is that it waited at all.
    assert!(
        waited >= wait.mul_f64(0.9),
        "{context}: a timeout after {waited:?} of a {wait:?} wait"
    );
}

/// While a key is held, no other acquire gets it, from this instance or another, with a
/// short wait or none (`Timeout`), whereas other keys are free; after the release the key
/// is free at once, and a second release of the same lease finds it lost.
pub async fn lock_is_exclusive(first: Arc<dyn LockManager>, second: Arc<dyn LockManager>) {
    for (n, (how, holder, other)) in (0_i64..).zip(pairs(&first, &second)) {
        let key = lock_key(100 + n);
        let lease = acquire_ok(holder.as_ref(), &key, SHORT_WAIT, LEASE).await;
        assert!(!lease.token.is_empty(), "{how}: a lease has a token");
        assert_eq!(lease.key, key);

        assert_held(other.as_ref(), &key, SHORT_WAIT, how).await;
        assert_held(other.as_ref(), &key, Duration::ZERO, how).await;

        let elsewhere = lock_key(200 + n);
        let free = acquire_ok(other.as_ref(), &elsewhere, Duration::ZERO, LEASE).await;
        assert_ne!(
            free.token, lease.token,
            "{how}: every lease has its own token"
        );
        assert_eq!(
            release(other.as_ref(), &free).await,
            Release::Released,
            "{how}"
        );

        assert_eq!(
            release(holder.as_ref(), &lease).await,
            Release::Released,
            "{how}"
        );
        assert_eq!(
            release(holder.as_ref(), &lease).await,
            Release::LeaseLost,
            "{how}: a lease released already is no longer held"
        );
        let again = acquire_ok(other.as_ref(), &key, Duration::ZERO, LEASE).await;
        assert_ne!(again.token, lease.token, "{how}: a new lease, a new token");
        assert_eq!(
            release(other.as_ref(), &again).await,
            Release::Released,
            "{how}"
        );
    }
}

/// A waiter gets the key soon after it is released, long before its own wait runs out.
pub async fn lock_waiter_acquires_soon_after_release(
    first: Arc<dyn LockManager>,
    second: Arc<dyn LockManager>,
) {
    for (n, (how, holder, waiter_locks)) in (0_i64..).zip(pairs(&first, &second)) {
        let key = lock_key(300 + n);
        let lease = acquire_ok(holder.as_ref(), &key, SHORT_WAIT, LEASE).await;
        let waiter = {
            let key = key.clone();
            tokio::spawn(async move {
                let taken = waiter_locks.acquire(&key, LONG_WAIT, LEASE).await;
                (taken, Instant::now(), waiter_locks)
            })
        };
        // Time for the waiter to start waiting (the outcome does not depend on it).
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            !waiter.is_finished(),
            "{how}: the waiter cannot have the key yet"
        );

        let released = Instant::now();
        assert_eq!(
            release(holder.as_ref(), &lease).await,
            Release::Released,
            "{how}"
        );
        let (taken, at, waiter_locks) = bounded("the waiter", waiter).await.unwrap();
        let taken = taken.unwrap_or_else(|e| panic!("{how}: the waiter gets the key, got {e:?}"));
        let after = at.saturating_duration_since(released);
        assert!(
            after < LONG_WAIT / 2,
            "{how}: acquired {after:?} after the release, with a {LONG_WAIT:?} wait"
        );
        assert_ne!(taken.token, lease.token);
        assert_eq!(
            release(waiter_locks.as_ref(), &taken).await,
            Release::Released,
            "{how}"
        );
    }
}

/// A lease that runs out frees the key: another acquire takes it. The old holder's release
/// is then `LeaseLost` and deletes nothing (a third acquire still times out on the new
/// holder's lock). A lease that ran out with nobody taking the key over is lost too.
pub async fn lock_lease_expiry_frees_the_key_but_not_for_the_old_holder(
    first: Arc<dyn LockManager>,
    second: Arc<dyn LockManager>,
) {
    for (n, (how, old_locks, new_locks)) in (0_i64..).zip(pairs(&first, &second)) {
        let key = lock_key(400 + n);
        let old = acquire_ok(
            old_locks.as_ref(),
            &key,
            SHORT_WAIT,
            Duration::from_millis(200),
        )
        .await;
        let started = Instant::now();
        let new = acquire_ok(new_locks.as_ref(), &key, LONG_WAIT, LEASE).await;
        assert!(
            started.elapsed() < LONG_WAIT / 2,
            "{how}: the key came free when the 200 ms lease ran out, not {:?} later",
            started.elapsed()
        );
        assert_ne!(new.token, old.token);

        assert_eq!(
            release(old_locks.as_ref(), &old).await,
            Release::LeaseLost,
            "{how}: the old holder's lease ran out"
        );
        assert_held(old_locks.as_ref(), &key, SHORT_WAIT, how).await;
        assert_held(new_locks.as_ref(), &key, Duration::ZERO, how).await;
        assert_eq!(
            release(new_locks.as_ref(), &new).await,
            Release::Released,
            "{how}"
        );

        // Run out with nobody waiting: lost as well, and the key is free.
        let lapsed = acquire_ok(
            old_locks.as_ref(),
            &key,
            SHORT_WAIT,
            Duration::from_millis(100),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            release(old_locks.as_ref(), &lapsed).await,
            Release::LeaseLost,
            "{how}"
        );
        let free = acquire_ok(new_locks.as_ref(), &key, Duration::ZERO, LEASE).await;
        assert_eq!(
            release(new_locks.as_ref(), &free).await,
            Release::Released,
            "{how}"
        );
    }
}

/// Only the holder's token releases a lock: a forged token, or the holder's token on
/// another key, is `LeaseLost` and leaves the lock in place.
pub async fn lock_release_is_owner_only(first: Arc<dyn LockManager>, second: Arc<dyn LockManager>) {
    for (n, (how, holder, other)) in (0_i64..).zip(pairs(&first, &second)) {
        let key = lock_key(500 + n);
        let lease = acquire_ok(holder.as_ref(), &key, SHORT_WAIT, LEASE).await;

        let forged = LockLease {
            key: key.clone(),
            token: "forged-token".to_owned(),
        };
        assert_eq!(
            release(other.as_ref(), &forged).await,
            Release::LeaseLost,
            "{how}"
        );
        assert_eq!(
            release(holder.as_ref(), &forged).await,
            Release::LeaseLost,
            "{how}"
        );
        let empty = LockLease {
            key: key.clone(),
            token: String::new(),
        };
        assert_eq!(
            release(other.as_ref(), &empty).await,
            Release::LeaseLost,
            "{how}"
        );
        let wrong_key = LockLease {
            key: lock_key(600 + n),
            token: lease.token.clone(),
        };
        assert_eq!(
            release(other.as_ref(), &wrong_key).await,
            Release::LeaseLost,
            "{how}"
        );

        assert_held(other.as_ref(), &key, SHORT_WAIT, how).await;
        assert_eq!(
            release(holder.as_ref(), &lease).await,
            Release::Released,
            "{how}"
        );
    }
}

/// Tasks incrementing a counter the unsafe way (read, yield, write the value read plus
/// one) under the lock never overlap, so no increment is lost.
pub async fn lock_serializes_concurrent_increments(
    first: Arc<dyn LockManager>,
    second: Arc<dyn LockManager>,
) {
    const TASKS: usize = 24;
    let key = lock_key(700);
    let counter = Arc::new(Mutex::new(0_usize));
    let inside = Arc::new(AtomicUsize::new(0));
    let overlaps = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..TASKS {
        let locks = if i % 2 == 0 {
            Arc::clone(&first)
        } else {
            Arc::clone(&second)
        };
        let (key, counter, inside, overlaps) = (
            key.clone(),
            Arc::clone(&counter),
            Arc::clone(&inside),
            Arc::clone(&overlaps),
        );
        tasks.push(tokio::spawn(async move {
            let lease = locks
                .acquire(&key, Duration::from_secs(20), LEASE)
                .await
                .unwrap_or_else(|e| panic!("task {i}: {e:?}"));
            if inside.fetch_add(1, Ordering::SeqCst) != 0 {
                overlaps.fetch_add(1, Ordering::SeqCst);
            }
            // The std mutex only makes each read and each write safe, never the pair.
            let read = *counter.lock().unwrap();
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(1)).await;
            *counter.lock().unwrap() = read + 1;
            inside.fetch_sub(1, Ordering::SeqCst);
            locks
                .release(&lease)
                .await
                .unwrap_or_else(|e| panic!("task {i}: {e:?}"))
        }));
    }
    for task in tasks {
        let released = bounded("an incrementing task", task).await.unwrap();
        assert_eq!(
            released,
            Release::Released,
            "every lease was still held at its release"
        );
    }
    assert_eq!(overlaps.load(Ordering::SeqCst), 0, "two holders at once");
    assert_eq!(*counter.lock().unwrap(), TASKS, "an increment was lost");
}

/// A lease that ran out is no lock at all: an acquire that does not wait takes the key at
/// once, even though its old holder never released it; that holder's late release is then
/// `LeaseLost` and leaves the new lock alone.
pub async fn lock_an_expired_lease_is_taken_without_waiting(
    first: Arc<dyn LockManager>,
    second: Arc<dyn LockManager>,
) {
    for (n, (how, old_locks, new_locks)) in (0_i64..).zip(pairs(&first, &second)) {
        let key = lock_key(800 + n);
        let old = acquire_ok(
            old_locks.as_ref(),
            &key,
            SHORT_WAIT,
            Duration::from_millis(100),
        )
        .await;
        // Let the 100 ms lease run out (what is asserted does not depend on how long).
        tokio::time::sleep(Duration::from_millis(300)).await;

        let new = acquire_ok(new_locks.as_ref(), &key, Duration::ZERO, LEASE).await;
        assert_ne!(new.token, old.token, "{how}");
        assert_eq!(
            release(old_locks.as_ref(), &old).await,
            Release::LeaseLost,
            "{how}: the old lease ran out"
        );
        assert_held(old_locks.as_ref(), &key, Duration::ZERO, how).await;
        assert_eq!(
            release(new_locks.as_ref(), &new).await,
            Release::Released,
            "{how}"
        );
    }
}

/// An acquire of a held key gives up when its wait is over: not before (see
/// [`lock_is_exclusive`]) and not long after, within this instance and from another.
pub async fn lock_times_out_soon_after_its_wait(
    first: Arc<dyn LockManager>,
    second: Arc<dyn LockManager>,
) {
    const WAIT: Duration = Duration::from_millis(200);
    for (n, (how, holder, other)) in (0_i64..).zip(pairs(&first, &second)) {
        let key = lock_key(900 + n);
        let lease = acquire_ok(holder.as_ref(), &key, SHORT_WAIT, LEASE).await;
        let started = Instant::now();
        let attempt = bounded("acquire", other.acquire(&key, WAIT, LEASE)).await;
        let waited = started.elapsed();
        assert!(
            matches!(attempt, Err(LockError::Timeout)),
            "{how}: {attempt:?}"
        );
        assert!(
            waited >= WAIT.mul_f64(0.9) && waited < WAIT + Duration::from_secs(3),
            "{how}: a {WAIT:?} wait timed out after {waited:?}"
        );
        assert_eq!(
            release(holder.as_ref(), &lease).await,
            Release::Released,
            "{how}"
        );
    }
}
