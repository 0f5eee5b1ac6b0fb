//! The Redis lock on a Redis Cluster of the suite's own (testkit's `RedisCluster`: six
//! redis-servers on loopback, three primaries and three replicas; skipped, saying so, when
//! `redis-server` is missing, and failed under `CI=true`): both scripts keep their keys in
//! one slot, and a failover that loses a lock key lets a second holder in, which the first
//! holder's release reports.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use domain::ports::{LockError, LockKey, LockLease, LockManager, Release};
use domain::types::UserId;
use fred::prelude::{Builder, Client, ClientLike, Config, KeysInterface};
use fred::util::redis_keyslot;
use redis_lock::{HandoffPolicy, KeyLayout, RedisLockConfig, RedisLockManager};
use testkit::RedisCluster;

const WAIT: Duration = Duration::from_secs(10);
const LEASE: Duration = Duration::from_secs(30);
/// An upper bound for anything that should be quick, so a broken build fails instead of hanging.
const BOUND: Duration = Duration::from_secs(30);

fn unique_prefix() -> String {
    format!("test:{}:", uuid::Uuid::new_v4().simple())
}

fn user(id: i64) -> LockKey {
    LockKey::user_balance(UserId::new(id).unwrap())
}

async fn manager(url: &str, prefix: &str) -> RedisLockManager {
    RedisLockManager::connect(url, prefix).await.unwrap()
}

/// A plain clustered fred client, to look at what is really stored.
async fn inspector(url: &str) -> Client {
    let client = Builder::from_config(Config::from_url(url).unwrap())
        .build()
        .unwrap();
    client.init().await.unwrap();
    client
}

async fn bounded<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(BOUND, future)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {BOUND:?}"))
}

/// Retries `op` while it answers `Unavailable`: the manager reconnects after a failover.
async fn once_reachable<T, F, Fut>(what: &str, op: F) -> T
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<T, LockError>>,
{
    bounded(what, async {
        loop {
            match op().await {
                Ok(value) => break value,
                Err(LockError::Unavailable(_)) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(other) => panic!("{what}: {other:?}"),
            }
        }
    })
    .await
}

#[tokio::test]
async fn on_a_cluster_a_lock_and_its_waiting_marker_share_a_slot() {
    let Some(cluster) = RedisCluster::shared() else {
        return;
    };
    let prefix = unique_prefix();
    let (here, elsewhere) = (
        manager(&cluster.url(), &prefix).await,
        manager(&cluster.url(), &prefix).await,
    );
    assert_eq!(here.layout(), KeyLayout::HashTagged);
    let redis = inspector(&cluster.url()).await;

    // Users whose keys live on every primary: each script runs in one slot whatever it is.
    let mut primaries = std::collections::BTreeSet::new();
    for id in 1..=30 {
        let key = user(id);
        let lock_key = here.redis_key(&key);
        assert_eq!(lock_key, format!("{prefix}{{balance:user:{id}}}"));
        primaries.insert(
            cluster
                .primary_of(redis_keyslot(lock_key.as_bytes()))
                .unwrap(),
        );

        let lease = bounded("acquire", here.acquire(&key, WAIT, LEASE))
            .await
            .unwrap();
        let stored: Option<String> = redis.get(&lock_key).await.unwrap();
        assert_eq!(stored, Some(lease.token.clone()));
        // The other process finds it held and leaves its waiting marker next to it.
        let second = elsewhere
            .acquire(&key, Duration::from_millis(20), LEASE)
            .await;
        assert!(matches!(second, Err(LockError::Timeout)), "got {second:?}");
        let marker: Option<String> = redis.get(KeyLayout::marker_key(&lock_key)).await.unwrap();
        assert!(marker.is_some(), "the waiting marker of {lock_key}");

        assert_eq!(here.release(&lease).await.unwrap(), Release::Released);
        let stored: Option<String> = redis.get(&lock_key).await.unwrap();
        assert_eq!(stored, None);
        let lease = bounded("acquire", elsewhere.acquire(&key, WAIT, LEASE))
            .await
            .unwrap();
        assert_eq!(elsewhere.release(&lease).await.unwrap(), Release::Released);
    }
    assert_eq!(primaries.len(), 3, "the keys spread over every primary");
    here.ping().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_a_cluster_a_hundred_tasks_in_four_processes_never_overlap() {
    let Some(cluster) = RedisCluster::shared() else {
        return;
    };
    let prefix = unique_prefix();
    let mut managers = Vec::new();
    for _ in 0..4 {
        managers.push(Arc::new(manager(&cluster.url(), &prefix).await));
    }
    // Three keys, so the tasks contend on more than one primary at once.
    let counters: Arc<Vec<AtomicU64>> = Arc::new((0..3).map(|_| AtomicU64::new(0)).collect());
    let mut tasks = Vec::new();
    for i in 0..100_usize {
        let locks = Arc::clone(&managers[i % 4]);
        let counters = Arc::clone(&counters);
        tasks.push(tokio::spawn(async move {
            let which = i % 3;
            let key = user(i64::try_from(which).unwrap() + 1);
            let lease = locks.acquire(&key, WAIT, LEASE).await.unwrap();
            // A read-modify-write with a yield in between: lost updates if two overlap.
            let seen = counters[which].load(Ordering::SeqCst);
            tokio::task::yield_now().await;
            counters[which].store(seen + 1, Ordering::SeqCst);
            assert_eq!(locks.release(&lease).await.unwrap(), Release::Released);
        }));
    }
    bounded("all tasks", async {
        for task in tasks {
            task.await.unwrap();
        }
    })
    .await;
    let total: u64 = counters.iter().map(|c| c.load(Ordering::SeqCst)).sum();
    assert_eq!(total, 100);
}

/// The hand-off on a cluster: the key stays in Redis under the first holder's value while
/// a local waiter takes it over, and the chain's last holder deletes it.
#[tokio::test]
async fn on_a_cluster_a_local_waiter_takes_the_key_over_without_a_new_set() {
    let Some(cluster) = RedisCluster::shared() else {
        return;
    };
    let prefix = unique_prefix();
    let config = RedisLockConfig {
        handoff: HandoffPolicy {
            max_age: Duration::from_secs(600),
            ..RedisLockConfig::default().handoff
        },
        ..RedisLockConfig::default()
    };
    let locks = Arc::new(
        RedisLockManager::connect_with(&cluster.url(), &prefix, config)
            .await
            .unwrap(),
    );
    let redis = inspector(&cluster.url()).await;
    let key = user(5);
    let lock_key = locks.redis_key(&key);

    let first = locks.acquire(&key, WAIT, LEASE).await.unwrap();
    let waiter = {
        let (locks, key) = (Arc::clone(&locks), key.clone());
        tokio::spawn(async move { locks.acquire(&key, WAIT, LEASE).await })
    };
    bounded("the waiter queueing", async {
        while !locks.has_local_waiter(&key) {
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert_eq!(locks.release(&first).await.unwrap(), Release::Released);
    let second = bounded("the waiter", waiter).await.unwrap().unwrap();
    assert_ne!(second.token, first.token);
    let stored: Option<String> = redis.get(&lock_key).await.unwrap();
    assert_eq!(
        stored,
        Some(first.token.clone()),
        "handed over, not set again"
    );
    assert_eq!(locks.release(&second).await.unwrap(), Release::Released);
    let stored: Option<String> = redis.get(&lock_key).await.unwrap();
    assert_eq!(stored, None);
}

/// A release whose script finds another process's waiting marker (in the lock's slot)
/// holds the local waiter back, so the other process gets the key first: with a courtesy
/// of 60 s on this side, the other process can only win through it.
#[tokio::test]
async fn on_a_cluster_a_release_lets_a_waiting_process_go_before_the_local_waiter() {
    let Some(cluster) = RedisCluster::shared() else {
        return;
    };
    let prefix = unique_prefix();
    let redis = inspector(&cluster.url()).await;
    let key = user(6);
    let here = Arc::new(
        RedisLockManager::connect_with(
            &cluster.url(),
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
    let elsewhere = Arc::new(manager(&cluster.url(), &prefix).await);
    let lock_key = here.redis_key(&key);

    let first = here.acquire(&key, WAIT, LEASE).await.unwrap();
    let remote = {
        let (locks, key) = (Arc::clone(&elsewhere), key.clone());
        tokio::spawn(async move { locks.acquire(&key, WAIT, LEASE).await })
    };
    let marker = KeyLayout::marker_key(&lock_key);
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
    let stored: Option<String> = redis.get(&lock_key).await.unwrap();
    assert_eq!(stored, Some(taken.token.clone()));
    assert_eq!(elsewhere.release(&taken).await.unwrap(), Release::Released);
    local.abort();
}

#[tokio::test]
async fn an_unreachable_cluster_is_unavailable_quickly() {
    // Nothing listens on ports 1 and 2: the manager starts anyway and answers Unavailable.
    let locks = tokio::time::timeout(
        Duration::from_secs(5),
        RedisLockManager::connect("redis-cluster://127.0.0.1:1?node=127.0.0.1:2", "p:"),
    )
    .await
    .expect("connect does not hang")
    .expect("connect succeeds while the cluster is down");
    let acquired =
        tokio::time::timeout(Duration::from_secs(5), locks.acquire(&user(1), WAIT, LEASE))
            .await
            .expect("acquire fails fast instead of waiting 10 s");
    assert!(
        matches!(acquired, Err(LockError::Unavailable(_))),
        "got {acquired:?}"
    );
    assert!(locks.ping().await.is_err());
}

#[tokio::test]
async fn on_a_cluster_a_key_prefix_with_a_brace_is_refused() {
    // Refused before connecting: no cluster needed.
    let url = "redis-cluster://127.0.0.1:1?node=127.0.0.1:2";
    for prefix in ["a{b}:", "{}", "x}"] {
        assert!(
            RedisLockManager::connect(url, prefix).await.is_err(),
            "prefix {prefix:?}"
        );
    }
    // One Redis keeps accepting any prefix (its key names are unchanged).
    let plain = RedisLockManager::connect("redis://127.0.0.1:1", "a{b}:")
        .await
        .unwrap();
    assert_eq!(plain.layout(), KeyLayout::Plain);
}

/// The fault Redis replication allows: a primary acknowledges a lock's `SET` and dies
/// before its replica has it; the replica takes over without the key, so a second holder
/// gets the lock while the first still holds it. The lock cannot prevent that (the
/// version guard of the store is what keeps the books exact); what it must do is notice:
/// the first holder's release answers `LeaseLost` (the use case counts it in
/// `balance_lock_lease_lost_total`) and deletes nothing of the second holder's.
///
/// The replica is frozen and cut off from its primary before the lock is taken, so the
/// lock's `SET` is certain not to have reached it when the primary is killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_that_lost_a_lock_lets_a_second_holder_in_and_the_first_release_says_lease_lost()
{
    let Some(mut cluster) = RedisCluster::start() else {
        return;
    };
    let prefix = unique_prefix();
    let (first, second) = (
        manager(&cluster.url(), &prefix).await,
        manager(&cluster.url(), &prefix).await,
    );
    let key = user(42);
    let lock_key = first.redis_key(&key);
    let slot = redis_keyslot(lock_key.as_bytes());
    let primary = cluster.primary_of(slot).unwrap();
    let replica = cluster.replica_of(primary).unwrap();

    // Replication works while the replica runs: a lock taken now survives the failover.
    let replicated = user(43);
    let survivor = bounded("acquire", first.acquire(&replicated, WAIT, LEASE))
        .await
        .unwrap();
    let survivor_slot = redis_keyslot(first.redis_key(&replicated).as_bytes());

    cluster.hold_back_replication(primary, replica);
    let lost = bounded("acquire", first.acquire(&key, WAIT, LEASE))
        .await
        .unwrap();
    cluster.kill(primary);
    cluster.signal(replica, "CONT");
    let promoted = cluster.wait_for_failover(slot, primary);
    assert_eq!(promoted, replica);
    assert_eq!(
        cluster.cli(promoted, &["exists", &lock_key]).trim(),
        "0",
        "the promoted replica never got the lock"
    );
    if cluster.primary_of(survivor_slot) == Some(promoted) {
        assert_eq!(
            cluster
                .cli(promoted, &["exists", &first.redis_key(&replicated)])
                .trim(),
            "1",
            "a lock taken before the freeze was replicated"
        );
    }

    // The overlap: the second process takes the lock the first still holds.
    let taken = once_reachable("the second acquire", || {
        second.acquire(&key, Duration::ZERO, LEASE)
    })
    .await;
    assert_ne!(taken.token, lost.token);

    let lost_for_release = LockLease {
        key: key.clone(),
        token: lost.token.clone(),
    };
    let released = once_reachable("the first release", || first.release(&lost_for_release)).await;
    assert_eq!(released, Release::LeaseLost, "the first holder learns it");
    assert_eq!(
        cluster.cli(promoted, &["get", &lock_key]).trim(),
        taken.token,
        "and leaves the second holder's lock alone"
    );
    assert_eq!(second.release(&taken).await.unwrap(), Release::Released);
    let _ = first.release(&survivor).await;
}
