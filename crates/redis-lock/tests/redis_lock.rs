//! The Redis lock against a real Redis from testkit (`TEST_REDIS_URL`, else testcontainers,
//! else skipped, saying so), plus a redis-server this suite starts and kills itself for the
//! outage tests (skipped, saying so, when the binary is missing). Every skip fails under
//! `CI=true`. Every test uses its own key prefix, so they all run in parallel.
//!
//! What every lock manager must do (exclusion and timeouts, hand-over to a waiter, lease
//! expiry, owner-only release) is asserted once by the port contract suites,
//! `testkit::contract::lock_*`, run on this manager as `redis_lock::*` and
//! `redis_cluster_lock::*` in `crates/testkit/tests/contracts.rs`. These keep what only
//! Redis shows: what is stored under the key, the local hand-off and the waiting marker,
//! many processes at once, and outages.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use domain::ports::{LockError, LockKey, LockLease, LockManager, Release};
use domain::types::UserId;
use fred::prelude::{Builder, Client, ClientLike, Config, KeysInterface};
use fred::types::CustomCommand;
use redis_lock::{HandoffPolicy, RedisLockConfig, RedisLockManager};
use testkit::{RedisServer, TestRedis};

const WAIT: Duration = Duration::from_secs(10);
const LEASE: Duration = Duration::from_secs(30);
/// An upper bound for anything that should be quick, so a broken build fails instead of hanging.
const BOUND: Duration = Duration::from_secs(20);

fn unique_prefix() -> String {
    format!("test:{}:", uuid::Uuid::new_v4().simple())
}

fn user(id: i64) -> LockKey {
    LockKey::user_balance(UserId::new(id).unwrap())
}

async fn manager(url: &str, prefix: &str) -> RedisLockManager {
    RedisLockManager::connect(url, prefix).await.unwrap()
}

/// A plain fred client, separate from the manager, to look at what is really in Redis.
async fn inspector(url: &str) -> Client {
    let client = Builder::from_config(Config::from_url(url).unwrap())
        .build()
        .unwrap();
    client.init().await.unwrap();
    client
}

async fn stored(inspector: &Client, prefix: &str, key: &LockKey) -> Option<String> {
    inspector
        .get(format!("{prefix}{}", key.as_str()))
        .await
        .unwrap()
}

async fn bounded<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(BOUND, future)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {BOUND:?}"))
}

#[tokio::test]
async fn the_key_holds_the_token_while_held_and_is_gone_after_release() {
    let Some(redis) = TestRedis::create().await else {
        return;
    };
    let (url, prefix) = (redis.url.clone(), redis.prefix.clone());
    let locks = manager(&url, &prefix).await;
    let redis = inspector(&url).await;
    let key = user(7);

    let lease = locks.acquire(&key, WAIT, LEASE).await.unwrap();
    assert_eq!(lease.key, key);
    assert!(!lease.token.is_empty());
    assert_eq!(
        stored(&redis, &prefix, &key).await,
        Some(lease.token.clone())
    );
    let ttl_ms: i64 = redis.pttl(format!("{prefix}balance:user:7")).await.unwrap();
    assert!(
        ttl_ms > 0 && ttl_ms <= 30_000,
        "the lease is the key's TTL: {ttl_ms}"
    );

    assert_eq!(locks.release(&lease).await.unwrap(), Release::Released);
    assert_eq!(stored(&redis, &prefix, &key).await, None);
    assert_eq!(
        locks.release(&lease).await.unwrap(),
        Release::LeaseLost,
        "a second release finds nothing"
    );
}

/// A release made by this process wakes its local waiter at once, whatever its backoff:
/// with pauses of up to 60 s, only the wake-up can hand the lock over within the bound.
#[tokio::test]
async fn a_local_release_wakes_the_local_waiter_at_once() {
    let Some(redis) = TestRedis::create().await else {
        return;
    };
    let url = redis.url.clone();
    let config = RedisLockConfig {
        retry_initial: Duration::from_secs(60),
        retry_max: Duration::from_secs(60),
        // A real release every time: this is about the wake-up, not the hand-off.
        handoff: HandoffPolicy {
            max_handoffs: 0,
            ..RedisLockConfig::default().handoff
        },
        ..RedisLockConfig::default()
    };
    let locks = Arc::new(
        RedisLockManager::connect_with(&url, &unique_prefix(), config)
            .await
            .unwrap(),
    );
    let key = user(4);
    // Several rounds, so a lucky short random pause cannot make the test pass by chance.
    for _ in 0..5 {
        let lease = locks.acquire(&key, WAIT, LEASE).await.unwrap();
        let waiter = {
            let (locks, key) = (Arc::clone(&locks), key.clone());
            tokio::spawn(async move { locks.acquire(&key, Duration::from_secs(120), LEASE).await })
        };
        // Let the waiter make its first attempt and start its pause.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(locks.release(&lease).await.unwrap(), Release::Released);
        let taken = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken by the release, not by its 60 s pause")
            .unwrap()
            .unwrap();
        assert_eq!(locks.release(&taken).await.unwrap(), Release::Released);
    }
}

/// A release with a local waiter next in line hands the key over without touching Redis:
/// the key keeps its value, the new holder has a token of its own, the old token can no
/// longer release anything, and the chain's last holder deletes the key.
#[tokio::test]
async fn a_local_waiter_takes_the_key_over_without_a_new_set() {
    let Some(redis) = TestRedis::create().await else {
        return;
    };
    let (url, prefix) = (redis.url.clone(), redis.prefix.clone());
    // An age limit out of reach, so a slow machine cannot end the chain before the hand-off.
    let config = RedisLockConfig {
        handoff: HandoffPolicy {
            max_age: Duration::from_secs(600),
            ..RedisLockConfig::default().handoff
        },
        ..RedisLockConfig::default()
    };
    let locks = Arc::new(
        RedisLockManager::connect_with(&url, &prefix, config)
            .await
            .unwrap(),
    );
    let redis = inspector(&url).await;
    let key = user(5);

    let first = locks.acquire(&key, WAIT, LEASE).await.unwrap();
    let waiter = {
        let (locks, key) = (Arc::clone(&locks), key.clone());
        tokio::spawn(async move { locks.acquire(&key, WAIT, LEASE).await })
    };
    // The waiter must have queued: with nobody waiting, a release deletes the key.
    bounded("the waiter queueing", async {
        while !locks.has_local_waiter(&key) {
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert_eq!(locks.release(&first).await.unwrap(), Release::Released);
    let second = bounded("the waiter", waiter).await.unwrap().unwrap();
    assert_ne!(second.token, first.token);
    assert_eq!(
        stored(&redis, &prefix, &key).await,
        Some(first.token.clone()),
        "handed over: the key was neither deleted nor set again"
    );
    assert_eq!(
        locks.release(&first).await.unwrap(),
        Release::LeaseLost,
        "the first holder's token releases nothing now"
    );
    assert_eq!(
        stored(&redis, &prefix, &key).await,
        Some(first.token.clone())
    );
    let elsewhere = manager(&url, &prefix).await;
    assert!(
        matches!(
            elsewhere
                .acquire(&key, Duration::from_millis(100), LEASE)
                .await,
            Err(LockError::Timeout)
        ),
        "still held for every other process"
    );

    assert_eq!(locks.release(&second).await.unwrap(), Release::Released);
    assert_eq!(stored(&redis, &prefix, &key).await, None);
}

/// A release that finds another process waiting (its marker, left by a failed attempt)
/// holds the local waiter back, so the other process gets the key first: with a courtesy
/// of 60 s on this side, the other process can only win through it.
#[tokio::test]
async fn a_release_lets_a_waiting_process_go_before_the_local_waiter() {
    let Some(redis) = TestRedis::create().await else {
        return;
    };
    let (url, prefix) = (redis.url.clone(), redis.prefix.clone());
    let redis = inspector(&url).await;
    let key = user(6);
    let here = Arc::new(
        RedisLockManager::connect_with(
            &url,
            &prefix,
            RedisLockConfig {
                retry_max: Duration::from_secs(60),
                handoff: HandoffPolicy {
                    max_handoffs: 0,
                    ..RedisLockConfig::default().handoff
                },
                ..RedisLockConfig::default()
            },
        )
        .await
        .unwrap(),
    );
    let elsewhere = Arc::new(manager(&url, &prefix).await);

    let first = here.acquire(&key, WAIT, LEASE).await.unwrap();
    let remote = {
        let (locks, key) = (Arc::clone(&elsewhere), key.clone());
        tokio::spawn(async move { locks.acquire(&key, WAIT, LEASE).await })
    };
    let marker = format!("{prefix}{}:waiting", key.as_str());
    bounded("the other process's marker", async {
        while redis
            .get::<Option<String>, _>(&marker)
            .await
            .unwrap()
            .is_none()
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    let local = {
        let (locks, key) = (Arc::clone(&here), key.clone());
        tokio::spawn(async move { locks.acquire(&key, Duration::from_secs(120), LEASE).await })
    };
    bounded("the local waiter queueing", async {
        while !here.has_local_waiter(&key) {
            tokio::task::yield_now().await;
        }
    })
    .await;

    assert_eq!(here.release(&first).await.unwrap(), Release::Released);
    let taken = bounded("the other process", remote).await.unwrap().unwrap();
    assert!(!local.is_finished(), "the local waiter held back");
    assert_eq!(
        stored(&redis, &prefix, &key).await,
        Some(taken.token.clone())
    );
    assert_eq!(elsewhere.release(&taken).await.unwrap(), Release::Released);
    local.abort();
}

#[tokio::test]
async fn an_expired_lease_can_be_taken_and_its_old_holder_cannot_delete_the_new_one() {
    let Some(redis) = TestRedis::create().await else {
        return;
    };
    let (url, prefix) = (redis.url.clone(), redis.prefix.clone());
    let redis = inspector(&url).await;
    let key = user(4);

    for same_process in [true, false] {
        let first_locks = manager(&url, &prefix).await;
        let second_locks = if same_process {
            None
        } else {
            Some(manager(&url, &prefix).await)
        };
        let second_locks = second_locks.as_ref().unwrap_or(&first_locks);

        let old = first_locks
            .acquire(&key, WAIT, Duration::from_millis(300))
            .await
            .unwrap();
        let new = bounded(
            "acquire after expiry",
            second_locks.acquire(&key, WAIT, LEASE),
        )
        .await
        .expect("the lease expires and the key is free again");
        assert_ne!(old.token, new.token);

        assert_eq!(first_locks.release(&old).await.unwrap(), Release::LeaseLost);
        assert_eq!(
            stored(&redis, &prefix, &key).await,
            Some(new.token.clone()),
            "the new holder's key is untouched"
        );
        assert_eq!(second_locks.release(&new).await.unwrap(), Release::Released);
        assert_eq!(stored(&redis, &prefix, &key).await, None);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hundred_tasks_in_four_processes_never_overlap() {
    let Some(redis) = TestRedis::create().await else {
        return;
    };
    let (url, prefix) = (redis.url.clone(), redis.prefix.clone());
    // Several managers, so exclusion is proven in Redis and not only by the local queue.
    let mut managers = Vec::new();
    for _ in 0..4 {
        managers.push(Arc::new(manager(&url, &prefix).await));
    }
    let counter = Arc::new(AtomicU64::new(0));
    let key = user(8);

    let mut tasks = Vec::new();
    for i in 0..100 {
        let (locks, counter, key) = (
            Arc::clone(&managers[i % 4]),
            Arc::clone(&counter),
            key.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let lease = locks
                .acquire(&key, Duration::from_secs(60), LEASE)
                .await
                .unwrap();
            // A read-modify-write split by a yield: overlapping holders would lose updates.
            let seen = counter.load(Ordering::SeqCst);
            tokio::task::yield_now().await;
            counter.store(seen + 1, Ordering::SeqCst);
            assert_eq!(locks.release(&lease).await.unwrap(), Release::Released);
        }));
    }
    tokio::time::timeout(Duration::from_secs(90), async {
        for task in tasks {
            task.await.unwrap();
        }
    })
    .await
    .expect("all tasks finish");
    assert_eq!(counter.load(Ordering::SeqCst), 100);
}

#[tokio::test]
async fn an_unreachable_redis_is_unavailable_quickly() {
    // Nothing listens on port 1: the manager starts anyway and answers Unavailable.
    let locks = tokio::time::timeout(
        Duration::from_secs(5),
        RedisLockManager::connect("redis://127.0.0.1:1", &unique_prefix()),
    )
    .await
    .expect("connect does not hang")
    .expect("connect succeeds while Redis is down");

    let acquired =
        tokio::time::timeout(Duration::from_secs(5), locks.acquire(&user(1), WAIT, LEASE))
            .await
            .expect("acquire fails fast instead of waiting 10 s");
    assert!(
        matches!(acquired, Err(LockError::Unavailable(_))),
        "got {acquired:?}"
    );

    let lease = LockLease {
        key: user(1),
        token: "t".to_owned(),
    };
    let released = tokio::time::timeout(Duration::from_secs(5), locks.release(&lease))
        .await
        .expect("release fails fast");
    assert!(
        matches!(released, Err(LockError::Unavailable(_))),
        "got {released:?}"
    );
    assert!(
        tokio::time::timeout(Duration::from_secs(5), locks.ping())
            .await
            .expect("ping fails fast")
            .is_err()
    );
}

#[tokio::test]
async fn an_invalid_url_is_an_error() {
    assert!(RedisLockManager::connect("not a url", "").await.is_err());
    let empty_pool = RedisLockConfig {
        pool_size: 0,
        ..RedisLockConfig::default()
    };
    assert!(
        RedisLockManager::connect_with("redis://127.0.0.1:6379", "", empty_pool)
            .await
            .is_err()
    );
}

#[tokio::test]
async fn the_manager_fails_fast_while_redis_is_down_and_recovers_when_it_returns() {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let locks = RedisLockManager::connect(&redis.url(), &unique_prefix())
        .await
        .unwrap();
    let key = user(1);

    let lease = bounded("acquire", locks.acquire(&key, WAIT, LEASE))
        .await
        .unwrap();
    assert_eq!(locks.release(&lease).await.unwrap(), Release::Released);
    locks.ping().await.unwrap();

    redis.kill();
    let started = Instant::now();
    let down = tokio::time::timeout(Duration::from_secs(5), locks.acquire(&key, WAIT, LEASE))
        .await
        .expect("acquire fails fast while Redis is down");
    assert!(
        matches!(down, Err(LockError::Unavailable(_))),
        "got {down:?}"
    );
    assert!(started.elapsed() < WAIT, "did not wait for the lock");
    assert!(locks.ping().await.is_err());

    // Same port, a fresh (empty) Redis: the manager reconnects by itself.
    redis.restart();
    let lease = bounded("recovery", async {
        loop {
            match locks.acquire(&key, WAIT, LEASE).await {
                Ok(lease) => break lease,
                Err(LockError::Unavailable(_)) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(other) => panic!("unexpected error while reconnecting: {other:?}"),
            }
        }
    })
    .await;
    assert_eq!(locks.release(&lease).await.unwrap(), Release::Released);
    locks.ping().await.unwrap();
}

#[tokio::test]
async fn an_acquire_whose_reply_never_came_does_not_leave_the_key_locked() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let prefix = unique_prefix();
    let config = RedisLockConfig {
        command_timeout: Duration::from_secs(1),
        ..RedisLockConfig::default()
    };
    let locks = RedisLockManager::connect_with(&redis.url(), &prefix, config)
        .await
        .unwrap();
    let admin = inspector(&redis.url()).await;
    let (timed_out_key, cancelled_key) = (user(1), user(2));

    // Redis takes the SETs but runs them only after 1.5 s: after the manager gave up on
    // one (1 s command timeout) and the caller dropped the other, yet before fred would
    // call the connection unresponsive (2 s) and drop them unrun.
    let _: String = admin
        .custom(
            CustomCommand::new_static("CLIENT", None::<u16>, false),
            vec!["PAUSE", "1500", "WRITE"],
        )
        .await
        .unwrap();
    let (timed_out, cancelled) = tokio::join!(
        locks.acquire(&timed_out_key, WAIT, LEASE),
        tokio::time::timeout(
            Duration::from_millis(200),
            locks.acquire(&cancelled_key, WAIT, LEASE)
        ),
    );
    assert!(
        matches!(timed_out, Err(LockError::Unavailable(_))),
        "got {timed_out:?}"
    );
    assert!(cancelled.is_err(), "the caller gave up first");

    // A write of our own runs only once the pause is over, after the manager's SETs that
    // Redis postponed first: from here on, only the cleanups can have freed the keys.
    let _: () = bounded(
        "the pause to end",
        admin.set(format!("{prefix}barrier"), "1", None, None, false),
    )
    .await
    .unwrap();
    // The compare-and-deletes queued behind the late SETs free the keys long before the
    // 30 s lease would have.
    bounded("the keys to be freed", async {
        while stored(&admin, &prefix, &timed_out_key).await.is_some()
            || stored(&admin, &prefix, &cancelled_key).await.is_some()
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let lease = bounded(
        "acquire",
        locks.acquire(&timed_out_key, Duration::ZERO, LEASE),
    )
    .await
    .unwrap();
    assert_eq!(locks.release(&lease).await.unwrap(), Release::Released);
}
