//! The port contract suites of `testkit::contract`, run against every adapter: the
//! in-memory store and lock manager (always), MySQL and Redis (when `TEST_DATABASE_URL` /
//! `TEST_REDIS_URL` are set, or Docker can start them; skipped otherwise), and the Redis
//! lock on a Redis Cluster of this process's own (`redis-server` on the `PATH`; skipped
//! otherwise). Each MySQL test has a database of its own and each Redis test a key prefix
//! of its own, so they all run in parallel.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use domain::ports::LockManager;
use memory::{InProcessLockManager, MemoryStore};
use testkit::contract::{self, Stores};
use testkit::{RedisCluster, TestDatabase, TestRedis};

fn memory() -> Stores {
    Stores::new(MemoryStore::new())
}

/// Two handles on one in-process lock manager: its clones share their locks.
fn in_process_locks() -> (Arc<dyn LockManager>, Arc<dyn LockManager>) {
    let locks = InProcessLockManager::new();
    (Arc::new(locks.clone()), Arc::new(locks))
}

/// Two Redis lock managers on one prefix: two service instances sharing one Redis.
async fn redis_locks(redis: &TestRedis) -> (Arc<dyn LockManager>, Arc<dyn LockManager>) {
    (
        Arc::new(redis.lock_manager().await),
        Arc::new(redis.lock_manager().await),
    )
}

/// Two Redis lock managers on one cluster and a fresh prefix: two instances sharing it.
async fn cluster_locks(cluster: &RedisCluster) -> (Arc<dyn LockManager>, Arc<dyn LockManager>) {
    let prefix = format!("t:{}:", uuid::Uuid::new_v4().simple());
    let manager = || async {
        redis_lock::RedisLockManager::connect(&cluster.url(), &prefix)
            .await
            .expect("a lock manager on the cluster")
    };
    (Arc::new(manager().await), Arc::new(manager().await))
}

// ---------------------------------------------------------------------------------------
// UserRepo
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn memory_user_repo_creates_and_reads() {
    contract::user_repo_creates_and_reads(&MemoryStore::new()).await;
}

#[tokio::test]
async fn mysql_user_repo_creates_and_reads() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    contract::user_repo_creates_and_reads(&db.store()).await;
    db.cleanup().await;
}

#[tokio::test]
async fn memory_user_repo_pages_history_newest_first() {
    contract::user_repo_pages_history_newest_first(&memory()).await;
}

#[tokio::test]
async fn mysql_user_repo_pages_history_newest_first() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    contract::user_repo_pages_history_newest_first(&Stores::new(db.store())).await;
    db.cleanup().await;
}

#[tokio::test]
async fn memory_user_repo_seeds_idempotently() {
    contract::user_repo_seeds_idempotently(&memory()).await;
}

#[tokio::test]
async fn mysql_user_repo_seeds_idempotently() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    contract::user_repo_seeds_idempotently(&Stores::new(db.store())).await;
    db.cleanup().await;
}

#[tokio::test]
async fn memory_user_repo_seeding_skips_created_users() {
    contract::user_repo_seeding_skips_created_users(&MemoryStore::new()).await;
}

#[tokio::test]
async fn mysql_user_repo_seeding_skips_created_users() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    contract::user_repo_seeding_skips_created_users(&db.store()).await;
    db.cleanup().await;
}

// ---------------------------------------------------------------------------------------
// OrderRepo
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn memory_order_repo_creates_and_reads() {
    contract::order_repo_creates_and_reads(&memory()).await;
}

#[tokio::test]
async fn mysql_order_repo_creates_and_reads() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    contract::order_repo_creates_and_reads(&Stores::new(db.store())).await;
    db.cleanup().await;
}

// ---------------------------------------------------------------------------------------
// IdempotencyRepo
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn memory_idempotency_repo_finds_only_live_records_of_their_user() {
    contract::idempotency_repo_finds_only_live_records_of_their_user(&memory()).await;
}

#[tokio::test]
async fn mysql_idempotency_repo_finds_only_live_records_of_their_user() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    contract::idempotency_repo_finds_only_live_records_of_their_user(&Stores::new(db.store()))
        .await;
    db.cleanup().await;
}

#[tokio::test]
async fn memory_idempotency_repo_purges_only_expired_records() {
    contract::idempotency_repo_purges_only_expired_records(&memory()).await;
}

#[tokio::test]
async fn mysql_idempotency_repo_purges_only_expired_records() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    contract::idempotency_repo_purges_only_expired_records(&Stores::new(db.store())).await;
    db.cleanup().await;
}

// ---------------------------------------------------------------------------------------
// BalanceStore
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn memory_balance_store_apply_writes_everything_together() {
    contract::balance_store_apply_writes_everything_together(&memory()).await;
}

#[tokio::test]
async fn mysql_balance_store_apply_writes_everything_together() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    contract::balance_store_apply_writes_everything_together(&Stores::new(db.store())).await;
    db.cleanup().await;
}

#[tokio::test]
async fn memory_balance_store_payment_pays_the_order_once() {
    contract::balance_store_payment_pays_the_order_once(&memory()).await;
}

#[tokio::test]
async fn mysql_balance_store_payment_pays_the_order_once() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    contract::balance_store_payment_pays_the_order_once(&Stores::new(db.store())).await;
    db.cleanup().await;
}

#[tokio::test]
async fn memory_balance_store_stale_version_writes_nothing() {
    contract::balance_store_stale_version_writes_nothing(&memory()).await;
}

#[tokio::test]
async fn mysql_balance_store_stale_version_writes_nothing() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    contract::balance_store_stale_version_writes_nothing(&Stores::new(db.store())).await;
    db.cleanup().await;
}

#[tokio::test]
async fn memory_balance_store_live_key_writes_nothing() {
    contract::balance_store_live_key_writes_nothing(&memory()).await;
}

#[tokio::test]
async fn mysql_balance_store_live_key_writes_nothing() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    contract::balance_store_live_key_writes_nothing(&Stores::new(db.store())).await;
    db.cleanup().await;
}

#[tokio::test]
async fn memory_balance_store_unknown_user_writes_nothing() {
    contract::balance_store_unknown_user_writes_nothing(&memory()).await;
}

#[tokio::test]
async fn mysql_balance_store_unknown_user_writes_nothing() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    contract::balance_store_unknown_user_writes_nothing(&Stores::new(db.store())).await;
    db.cleanup().await;
}

#[tokio::test]
async fn memory_balance_store_unpayable_order_writes_nothing() {
    contract::balance_store_unpayable_order_writes_nothing(&memory()).await;
}

#[tokio::test]
async fn mysql_balance_store_unpayable_order_writes_nothing() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    contract::balance_store_unpayable_order_writes_nothing(&Stores::new(db.store())).await;
    db.cleanup().await;
}

#[tokio::test]
async fn memory_balance_store_replaces_an_expired_record() {
    contract::balance_store_replaces_an_expired_record(&memory()).await;
}

#[tokio::test]
async fn mysql_balance_store_replaces_an_expired_record() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    contract::balance_store_replaces_an_expired_record(&Stores::new(db.store())).await;
    db.cleanup().await;
}

#[tokio::test]
async fn memory_balance_store_records_refusals_under_the_guards() {
    contract::balance_store_records_refusals_under_the_guards(&memory()).await;
}

#[tokio::test]
async fn mysql_balance_store_records_refusals_under_the_guards() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    contract::balance_store_records_refusals_under_the_guards(&Stores::new(db.store())).await;
    db.cleanup().await;
}

#[tokio::test]
async fn memory_balance_store_records_say_what_happened() {
    contract::balance_store_records_say_what_happened(&memory()).await;
}

#[tokio::test]
async fn mysql_balance_store_records_say_what_happened() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    contract::balance_store_records_say_what_happened(&Stores::new(db.store())).await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_balance_store_concurrent_applies_on_one_version_let_exactly_one_win() {
    contract::balance_store_concurrent_applies_on_one_version_let_exactly_one_win(&memory()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mysql_balance_store_concurrent_applies_on_one_version_let_exactly_one_win() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    contract::balance_store_concurrent_applies_on_one_version_let_exactly_one_win(&Stores::new(
        db.store(),
    ))
    .await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_balance_store_concurrent_applies_of_different_users_all_succeed() {
    contract::balance_store_concurrent_applies_of_different_users_all_succeed(&memory()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mysql_balance_store_concurrent_applies_of_different_users_all_succeed() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    contract::balance_store_concurrent_applies_of_different_users_all_succeed(&Stores::new(
        db.store(),
    ))
    .await;
    db.cleanup().await;
}

// ---------------------------------------------------------------------------------------
// LockManager
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn memory_lock_is_exclusive() {
    let (first, second) = in_process_locks();
    contract::lock_is_exclusive(first, second).await;
}

#[tokio::test]
async fn redis_lock_is_exclusive() {
    let Some(redis) = TestRedis::create().await else {
        return;
    };
    let (first, second) = redis_locks(&redis).await;
    contract::lock_is_exclusive(first, second).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_lock_waiter_acquires_soon_after_release() {
    let (first, second) = in_process_locks();
    contract::lock_waiter_acquires_soon_after_release(first, second).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_lock_waiter_acquires_soon_after_release() {
    let Some(redis) = TestRedis::create().await else {
        return;
    };
    let (first, second) = redis_locks(&redis).await;
    contract::lock_waiter_acquires_soon_after_release(first, second).await;
}

#[tokio::test]
async fn memory_lock_lease_expiry_frees_the_key_but_not_for_the_old_holder() {
    let (first, second) = in_process_locks();
    contract::lock_lease_expiry_frees_the_key_but_not_for_the_old_holder(first, second).await;
}

#[tokio::test]
async fn redis_lock_lease_expiry_frees_the_key_but_not_for_the_old_holder() {
    let Some(redis) = TestRedis::create().await else {
        return;
    };
    let (first, second) = redis_locks(&redis).await;
    contract::lock_lease_expiry_frees_the_key_but_not_for_the_old_holder(first, second).await;
}

#[tokio::test]
async fn memory_lock_release_is_owner_only() {
    let (first, second) = in_process_locks();
    contract::lock_release_is_owner_only(first, second).await;
}

#[tokio::test]
async fn redis_lock_release_is_owner_only() {
    let Some(redis) = TestRedis::create().await else {
        return;
    };
    let (first, second) = redis_locks(&redis).await;
    contract::lock_release_is_owner_only(first, second).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_lock_serializes_concurrent_increments() {
    let (first, second) = in_process_locks();
    contract::lock_serializes_concurrent_increments(first, second).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_lock_serializes_concurrent_increments() {
    let Some(redis) = TestRedis::create().await else {
        return;
    };
    let (first, second) = redis_locks(&redis).await;
    contract::lock_serializes_concurrent_increments(first, second).await;
}

// The same five on a Redis Cluster (one per process, shared by these tests).

#[tokio::test]
async fn redis_cluster_lock_is_exclusive() {
    let Some(cluster) = RedisCluster::shared() else {
        return;
    };
    let (first, second) = cluster_locks(&cluster).await;
    contract::lock_is_exclusive(first, second).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_cluster_lock_waiter_acquires_soon_after_release() {
    let Some(cluster) = RedisCluster::shared() else {
        return;
    };
    let (first, second) = cluster_locks(&cluster).await;
    contract::lock_waiter_acquires_soon_after_release(first, second).await;
}

#[tokio::test]
async fn redis_cluster_lock_lease_expiry_frees_the_key_but_not_for_the_old_holder() {
    let Some(cluster) = RedisCluster::shared() else {
        return;
    };
    let (first, second) = cluster_locks(&cluster).await;
    contract::lock_lease_expiry_frees_the_key_but_not_for_the_old_holder(first, second).await;
}

#[tokio::test]
async fn redis_cluster_lock_release_is_owner_only() {
    let Some(cluster) = RedisCluster::shared() else {
        return;
    };
    let (first, second) = cluster_locks(&cluster).await;
    contract::lock_release_is_owner_only(first, second).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_cluster_lock_serializes_concurrent_increments() {
    let Some(cluster) = RedisCluster::shared() else {
        return;
    };
    let (first, second) = cluster_locks(&cluster).await;
    contract::lock_serializes_concurrent_increments(first, second).await;
}

// ---------------------------------------------------------------------------------------
// Refunds, cancellation, the balance at a time (BalanceStore, OrderRepo, UserRepo)
// ---------------------------------------------------------------------------------------

/// Each suite on the in-memory store and on MySQL.
macro_rules! on_both_stores {
    ($($suite:ident),* $(,)?) => {
        mod refunds_memory {
            $(
                #[tokio::test]
                async fn $suite() {
                    testkit::contract::$suite(&super::memory()).await;
                }
            )*
        }
        mod refunds_mysql {
            $(
                #[tokio::test]
                async fn $suite() {
                    let Some(db) = testkit::TestDatabase::create().await else {
                        return;
                    };
                    testkit::contract::$suite(&testkit::contract::Stores::new(db.store())).await;
                    db.cleanup().await;
                }
            )*
        }
    };
}

on_both_stores!(
    balance_store_refund_writes_everything_together,
    balance_store_refund_guarded_by_the_payment_writes_nothing,
    order_repo_cancels_only_pending_orders,
    user_repo_balance_at_reads_the_ledger,
);
