//! The port contract suites of `testkit::contract`, run against every adapter by one
//! macro, [`contracts!`], from one list of suite names per kind of adapter:
//!
//! - each store suite (`UserRepo`, `OrderRepo`, `CouponRepo`, `IdempotencyRepo`,
//!   `BalanceStore`) and each `Auditor` suite as `memory::<suite>` (the in-memory store,
//!   always) and `mysql::<suite>` (MySQL from testkit's harness: `TEST_DATABASE_URL`, else
//!   testcontainers, else skipped, saying so, and failed under `CI=true`);
//! - each `LockManager` suite as `in_process_lock::<suite>` (always), `redis_lock::<suite>`
//!   (Redis from the harness, as MySQL) and `redis_cluster_lock::<suite>` (a Redis Cluster
//!   of this process's own, shared by these tests: `redis-server` on the `PATH`, else
//!   skipped as above).
//!
//! Adding a suite is adding its name to its list. Each MySQL test has a database of its
//! own and each Redis test a key prefix of its own, so they all run in parallel.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use ::memory::{InProcessLockManager, MemoryStore};
use domain::ports::LockManager;
use mysql_repo::MySqlStore;
use testkit::contract::{Audited, Stores};
use testkit::{RedisCluster, TestDatabase, TestRedis};

/// One test per suite and adapter. `stores` suites take a [`Stores`], `auditors` suites an
/// [`Audited`], both on a new, empty store; `locks` suites take two handles on one lock
/// service (two instances sharing it).
macro_rules! contracts {
    (
        stores: [$($store:ident),* $(,)?],
        auditors: [$($auditor:ident),* $(,)?],
        locks: [$($lock:ident),* $(,)?] $(,)?
    ) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $store() {
                    let stores = super::Stores::new(super::MemoryStore::new());
                    testkit::contract::$store(&stores).await;
                }
            )*
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $auditor() {
                    let audited = super::Audited::new(super::MemoryStore::new());
                    testkit::contract::$auditor(&audited).await;
                }
            )*
        }
        mod mysql {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $store() {
                    super::on_mysql(|store| async move {
                        testkit::contract::$store(&super::Stores::new(store)).await;
                    })
                    .await;
                }
            )*
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $auditor() {
                    super::on_mysql(|store| async move {
                        testkit::contract::$auditor(&super::Audited::new(store)).await;
                    })
                    .await;
                }
            )*
        }
        mod in_process_lock {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $lock() {
                    let (first, second) = super::in_process_locks();
                    testkit::contract::$lock(first, second).await;
                }
            )*
        }
        mod redis_lock {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $lock() {
                    let Some(redis) = super::TestRedis::create().await else {
                        return;
                    };
                    let (first, second) = super::redis_locks(&redis).await;
                    testkit::contract::$lock(first, second).await;
                }
            )*
        }
        mod redis_cluster_lock {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $lock() {
                    let Some(cluster) = super::RedisCluster::shared() else {
                        return;
                    };
                    let (first, second) = super::cluster_locks(&cluster).await;
                    testkit::contract::$lock(first, second).await;
                }
            )*
        }
    };
}

contracts! {
    stores: [
        // UserRepo
        user_repo_creates_and_reads,
        user_repo_pages_history_newest_first,
        user_repo_seeds_idempotently,
        user_repo_seeding_skips_created_users,
        user_repo_seeding_a_zero_balance_writes_no_entries,
        // OrderRepo
        order_repo_creates_and_reads,
        // IdempotencyRepo
        idempotency_repo_finds_only_live_records_of_their_user,
        idempotency_repo_purges_only_expired_records,
        idempotency_repo_purges_the_oldest_expired_first,
        idempotency_repo_inserts_a_refusal_only_where_the_key_is_free,
        // BalanceStore
        balance_store_apply_writes_everything_together,
        balance_store_payment_pays_the_order_once,
        balance_store_stale_version_writes_nothing,
        balance_store_live_key_writes_nothing,
        balance_store_unknown_user_writes_nothing,
        balance_store_unpayable_order_writes_nothing,
        balance_store_replaces_an_expired_record,
        balance_store_a_replaced_record_lives_by_its_own_expiry,
        balance_store_checks_the_user_then_the_version_then_the_key,
        balance_store_records_refusals_under_the_guards,
        balance_store_records_say_what_happened,
        balance_store_concurrent_applies_on_one_version_let_exactly_one_win,
        balance_store_concurrent_applies_of_different_users_all_succeed,
        // Refunds, cancellation and the balance at a time
        balance_store_refund_writes_everything_together,
        balance_store_refund_guarded_by_the_payment_writes_nothing,
        order_repo_cancels_only_pending_orders,
        user_repo_balance_at_reads_the_ledger,
        // Coupons: CouponRepo and the coupon branches of the atomic step
        coupon_repo_creates_and_reads,
        balance_store_issue_writes_the_user_coupon,
        balance_store_issue_to_a_holder_is_coupon_changed,
        balance_store_issue_past_the_stock_is_coupon_changed,
        balance_store_concurrent_issues_never_pass_the_stock,
        balance_store_pay_with_a_coupon_uses_it_once,
        balance_store_pay_with_a_foreign_or_expired_coupon_is_coupon_changed,
        balance_store_pay_with_a_coupon_covering_the_order_pays_nothing,
        balance_store_refund_in_full_frees_the_coupon,
    ],
    auditors: [
        balance_store_refuses_to_complete_a_refund_of_an_order_not_paid,
        auditor_finds_refunded_books_clean,
        auditor_finds_a_refunded_payment_whose_order_is_still_paid,
        auditor_finds_a_refunded_total_its_refunds_do_not_add_up_to,
        auditor_finds_an_empty_store_clean,
        auditor_finds_books_written_through_the_ports_clean,
        auditor_accepts_two_payments_of_one_amount_in_one_millisecond,
        auditor_changes_nothing,
        auditor_finds_a_bumped_balance,
        auditor_finds_a_newest_entry_that_disagrees_with_the_balance,
        auditor_finds_ledger_entries_of_a_missing_user,
        auditor_finds_a_deleted_ledger_entry,
        auditor_finds_a_second_entry_of_one_key_at_one_instant,
        auditor_finds_a_key_applied_twice_within_its_retention,
        auditor_finds_a_refusal_turned_success,
        auditor_goes_by_the_recorded_outcome_not_the_status,
        auditor_finds_a_refusal_with_an_effect,
        auditor_finds_a_paid_order_without_a_payment,
        auditor_finds_a_deleted_payment,
        auditor_finds_a_payment_of_an_order_that_is_not_paid,
        auditor_finds_a_payment_without_its_ledger_entry,
        auditor_lists_up_to_the_cap_and_counts_in_full,
        auditor_sees_no_false_breach_during_concurrent_writes,
        auditor_judges_a_reuse_by_its_records_expiry,
        // Coupons
        auditor_finds_coupon_books_clean,
        auditor_finds_an_issued_count_off_its_user_coupons,
        auditor_finds_a_deleted_user_coupon,
        auditor_finds_a_coupon_issue_turned_refusal,
        auditor_finds_a_coupon_issue_with_a_ledger_entry,
        auditor_finds_a_refused_coupon_issue_with_a_coupon,
        auditor_finds_a_used_coupon_set_free,
        auditor_finds_a_coupon_used_by_a_payment_not_its_own,
        auditor_finds_a_deleted_payment_with_a_coupon,
    ],
    locks: [
        lock_is_exclusive,
        lock_waiter_acquires_soon_after_release,
        lock_lease_expiry_frees_the_key_but_not_for_the_old_holder,
        lock_release_is_owner_only,
        lock_serializes_concurrent_increments,
        lock_an_expired_lease_is_taken_without_waiting,
        lock_times_out_soon_after_its_wait,
    ],
}

/// Runs `suite` on the MySQL store of a fresh database from testkit's harness (returning,
/// after the harness's loud skip, when there is none) and drops the database afterwards,
/// also when the suite fails.
async fn on_mysql<Fut>(suite: impl FnOnce(MySqlStore) -> Fut)
where
    Fut: Future<Output = ()> + Send + 'static,
{
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let store = db.store();
    db.run_then_cleanup(suite(store)).await;
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
        ::redis_lock::RedisLockManager::connect(&cluster.url(), &prefix)
            .await
            .expect("a lock manager on the cluster")
    };
    (Arc::new(manager().await), Arc::new(manager().await))
}
