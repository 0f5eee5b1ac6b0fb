//! The lock's tests. Those about timing run on paused time (`start_paused`): the clock only
//! moves when every task waits, straight to the next timer, so elapsed times are exact and
//! no test sleeps for real.
//!
//! What every lock manager must do (exclusion, hand-over, lease expiry, owner-only release)
//! is asserted once by the port contract suites, `testkit::contract::lock_*`, run on this
//! manager as `in_process_lock::*` in `crates/testkit/tests/contracts.rs`, on real time.
//! These keep what only this manager can show: exact timings on paused time, its wake-up
//! hand-over between queued waiters, and that it forgets every key it no longer holds.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use domain::ports::{LockError, LockKey, LockLease, LockManager, Release};
use domain::types::UserId;
use tokio::time::Instant;

use super::InProcessLockManager;

const LEASE: Duration = Duration::from_secs(30);
const WAIT: Duration = Duration::from_secs(10);

fn key(n: i64) -> LockKey {
    LockKey::user_balance(UserId::new(n).unwrap())
}

async fn take(locks: &InProcessLockManager, n: i64) -> LockLease {
    locks.acquire(&key(n), Duration::ZERO, LEASE).await.unwrap()
}

/// Whether `key(n)` is held right now, by whoever.
async fn is_held(locks: &InProcessLockManager, n: i64) -> bool {
    match locks.acquire(&key(n), Duration::ZERO, LEASE).await {
        Ok(lease) => {
            assert_eq!(locks.release(&lease).await.unwrap(), Release::Released);
            false
        }
        Err(LockError::Timeout) => true,
        Err(other) => panic!("unexpected {other:?}"),
    }
}

/// Starts a waiter on `key(n)`; it answers its result and how long it waited.
fn waiter(
    locks: &InProcessLockManager,
    n: i64,
    wait: Duration,
) -> tokio::task::JoinHandle<(Result<LockLease, LockError>, Duration)> {
    let locks = locks.clone();
    tokio::spawn(async move {
        let started = Instant::now();
        let result = locks.acquire(&key(n), wait, LEASE).await;
        (result, started.elapsed())
    })
}

#[tokio::test(start_paused = true)]
async fn a_held_key_times_out_a_second_acquirer_after_its_wait() {
    let locks = InProcessLockManager::new();
    let _held = take(&locks, 1).await;

    let started = Instant::now();
    let second = locks
        .acquire(&key(1), Duration::from_millis(100), LEASE)
        .await;

    assert!(matches!(second, Err(LockError::Timeout)), "{second:?}");
    assert_eq!(started.elapsed(), Duration::from_millis(100));
}

#[tokio::test(start_paused = true)]
async fn a_waiter_wakes_on_release_not_at_its_timeout() {
    let locks = InProcessLockManager::new();
    let held = take(&locks, 1).await;
    let waiting = waiter(&locks, 1, WAIT);

    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(locks.release(&held).await.unwrap(), Release::Released);
    let (result, waited) = waiting.await.unwrap();

    let lease = result.unwrap();
    // Paused time moves only to timers: the waiter got the key at the release, 1 s in.
    assert_eq!(waited, Duration::from_secs(1));
    assert_ne!(lease.token, held.token);
    assert_eq!(locks.release(&lease).await.unwrap(), Release::Released);
}

#[tokio::test(start_paused = true)]
async fn an_expired_lease_lets_a_waiter_in_and_its_release_deletes_nothing() {
    let locks = InProcessLockManager::new();
    let old = locks
        .acquire(&key(1), Duration::ZERO, Duration::from_secs(2))
        .await
        .unwrap();
    let waiting = waiter(&locks, 1, WAIT);

    // Nobody releases: the waiter wakes at the lease's expiry, well before its own deadline.
    let (result, waited) = waiting.await.unwrap();
    let new = result.unwrap();
    assert_eq!(waited, Duration::from_secs(2));

    // The old holder comes back too late: its release is refused and the new lock stays.
    assert_eq!(locks.release(&old).await.unwrap(), Release::LeaseLost);
    assert!(is_held(&locks, 1).await);
    assert_eq!(locks.release(&new).await.unwrap(), Release::Released);
    assert!(!is_held(&locks, 1).await);
}

#[tokio::test(start_paused = true)]
async fn an_expired_lease_released_by_its_holder_is_lost_and_the_key_free() {
    let locks = InProcessLockManager::new();
    let lease = locks
        .acquire(&key(1), Duration::ZERO, Duration::from_secs(1))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;

    assert_eq!(locks.release(&lease).await.unwrap(), Release::LeaseLost);
    assert_eq!(locks.tracked_keys(), 0);
}

#[tokio::test(start_paused = true)]
async fn released_and_timed_out_keys_leave_nothing_behind() {
    let locks = InProcessLockManager::new();
    for n in 1..=50 {
        let lease = take(&locks, n).await;
        assert_eq!(locks.release(&lease).await.unwrap(), Release::Released);
    }
    assert_eq!(locks.tracked_keys(), 0);

    let held = take(&locks, 1).await;
    let timed_out = locks
        .acquire(&key(1), Duration::from_millis(5), LEASE)
        .await;
    assert!(matches!(timed_out, Err(LockError::Timeout)));
    assert_eq!(locks.tracked_keys(), 1);
    locks.release(&held).await.unwrap();
    assert_eq!(locks.tracked_keys(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_wake_up_meant_for_a_cancelled_waiter_passes_to_the_next() {
    let locks = InProcessLockManager::new();
    let held = take(&locks, 1).await;
    // The first waiter is polled once, so it queues first, and is then left unpolled.
    let contended = key(1);
    let mut first = Box::pin(locks.acquire(&contended, WAIT, LEASE));
    let queued = tokio::time::timeout(Duration::ZERO, &mut first).await;
    assert!(queued.is_err(), "the first waiter must be waiting");
    let second = waiter(&locks, 1, WAIT);
    tokio::task::yield_now().await;

    // The release wakes the first in line; dropping it must not swallow that wake-up.
    locks.release(&held).await.unwrap();
    drop(first);
    let (result, waited) = second.await.unwrap();

    result.unwrap();
    assert_eq!(waited, Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn two_hundred_waiters_take_turns_one_at_a_time() {
    let locks = InProcessLockManager::new();
    let holding = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let held = take(&locks, 1).await;

    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let locks = locks.clone();
            let holding = Arc::clone(&holding);
            let most = Arc::clone(&most);
            tokio::spawn(async move {
                let lease = locks
                    .acquire(&key(1), Duration::from_secs(60), LEASE)
                    .await
                    .unwrap();
                let now = holding.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(10)).await;
                holding.fetch_sub(1, Ordering::SeqCst);
                locks.release(&lease).await.unwrap()
            })
        })
        .collect();
    tokio::task::yield_now().await;
    let started = Instant::now();
    locks.release(&held).await.unwrap();

    for task in tasks {
        assert_eq!(task.await.unwrap(), Release::Released);
    }
    assert_eq!(most.load(Ordering::SeqCst), 1, "never two holders at once");
    // Each turn is its holder's 10 ms and nothing more: no waiter sat out a timer.
    assert_eq!(started.elapsed(), Duration::from_millis(2000));
    assert_eq!(locks.tracked_keys(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_tasks_on_real_threads_never_hold_a_key_together() {
    let locks = InProcessLockManager::new();
    let holding = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let locks = locks.clone();
            let holding = Arc::clone(&holding);
            tokio::spawn(async move {
                let lease = locks
                    .acquire(&key(1), Duration::from_secs(30), LEASE)
                    .await
                    .unwrap();
                assert_eq!(holding.fetch_add(1, Ordering::SeqCst), 0);
                tokio::task::yield_now().await;
                holding.fetch_sub(1, Ordering::SeqCst);
                locks.release(&lease).await.unwrap()
            })
        })
        .collect();

    for task in tasks {
        assert_eq!(task.await.unwrap(), Release::Released);
    }
    assert_eq!(locks.tracked_keys(), 0);
}
