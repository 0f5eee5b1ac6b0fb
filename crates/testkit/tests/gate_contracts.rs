//! The `CouponGate` contract suites of `testkit::contract::coupon_gate`, run against the
//! Redis gate by one macro, [`gates!`]:
//!
//! - `redis_gate::<suite>`: Redis from testkit's harness (`TEST_REDIS_URL`, else
//!   testcontainers, else skipped, saying so, and failed under `CI=true`);
//! - `redis_cluster_gate::<suite>`: a Redis Cluster of this process's own, shared by these
//!   tests (`redis-server` on the `PATH`, else skipped as above).
//!
//! Each suite gets two gates on one key prefix of its own (two service instances sharing
//! one Redis), so they all run in parallel. Below the suites, what only the Redis adapter
//! shows: its keys and their expiry, and a Redis that cannot be reached.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use domain::ports::CouponGate;
use redis_lock::RedisCouponGate;
use testkit::contract::coupon_gate::GATE_STALE_AFTER;
use testkit::{RedisCluster, RedisServer, TestRedis};

/// One test per suite and backend.
macro_rules! gates {
    ($($suite:ident),* $(,)?) => {
        mod redis_gate {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $suite() {
                    let Some(redis) = super::TestRedis::create().await else {
                        return;
                    };
                    let (first, second) = super::gates(&redis.url, &redis.prefix).await;
                    testkit::contract::coupon_gate::$suite(first, second).await;
                }
            )*
        }
        mod redis_cluster_gate {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $suite() {
                    let Some(cluster) = super::RedisCluster::shared() else {
                        return;
                    };
                    let prefix = format!("t:{}:", uuid::Uuid::new_v4().simple());
                    let (first, second) = super::gates(&cluster.url(), &prefix).await;
                    testkit::contract::coupon_gate::$suite(first, second).await;
                }
            )*
        }
    };
}

gates! {
    coupon_gate_is_missing_until_loaded,
    coupon_gate_admits_until_sold_out,
    coupon_gate_replays_a_recorded_refusal_byte_for_byte,
    coupon_gate_records_what_the_database_answered,
    coupon_gate_admission_records_nothing,
    coupon_gate_refuses_a_second_unit_to_a_holder,
    coupon_gate_passes_a_user_with_a_pending_unit,
    coupon_gate_refuses_outside_the_issue_window,
    coupon_gate_confirm_counts_each_unit_once,
    coupon_gate_give_back_frees_exactly_its_own_unit,
    coupon_gate_load_keeps_fresh_pending_units_and_drops_stale_ones,
    coupon_gate_confirm_after_a_load_that_lost_the_unit_counts_it_once,
    coupon_gate_sold_out_says_when_a_unit_is_pending_too_long,
    coupon_gate_recorded_refusal_expires_with_its_expiry,
    coupon_gate_forget_drops_the_state_but_keeps_the_records,
    coupon_gate_admits_exactly_the_stock_under_concurrency,
    coupon_gate_loads_a_large_snapshot,
}

/// A gate connected before the suite uses it. Suites share one Redis, and another
/// suite's load of 100k holders keeps it busy for a second or more on a loaded machine:
/// a gate connecting meanwhile would come back unconnected after the default 1 s and
/// answer the suite's first call Unavailable, so the test waits up to 30 s for it.
async fn gate(url: &str, prefix: &str) -> RedisCouponGate {
    let config = redis_lock::RedisGateConfig {
        connect_timeout: Duration::from_secs(30),
        ..redis_lock::RedisGateConfig::new(GATE_STALE_AFTER)
    };
    RedisCouponGate::connect_with(url, prefix, config)
        .await
        .unwrap_or_else(|e| panic!("cannot build the Redis coupon gate: {e:#}"))
}

/// Two gates on one prefix: two service instances sharing one Redis.
async fn gates(url: &str, prefix: &str) -> (Arc<dyn CouponGate>, Arc<dyn CouponGate>) {
    (
        Arc::new(gate(url, prefix).await),
        Arc::new(gate(url, prefix).await),
    )
}

mod adapter {
    use std::time::Duration;

    use chrono::{TimeZone, Utc};
    use domain::idempotency::{Fingerprint, StoredResponse};
    use domain::model::Coupon;
    use domain::ports::{
        CouponGate, GateAnswer, GateError, GateRefusal, GateRequest, GateSnapshot,
    };
    use domain::types::{Amount, CouponId, CouponName, IdempotencyKey, Limits, UserId};
    use std::collections::HashMap;

    use fred::prelude::{Client, ClientLike, KeysInterface};
    use fred::types::{CustomCommand, FromValue};

    use super::{RedisServer, TestRedis, gate};

    fn coupon(total: u32) -> Coupon {
        let t0 = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        Coupon {
            id: CouponId::new(42).unwrap(),
            name: CouponName::parse("rush").unwrap(),
            discount: Amount::new(100, &Limits::default()).unwrap(),
            total_quantity: total,
            issued_quantity: 0,
            issue_starts_at: t0,
            issue_ends_at: None,
            valid_for_days: 30,
            created_at: t0,
        }
    }

    fn request(user: i64, raw_key: &str, now_ms: i64) -> GateRequest {
        GateRequest {
            coupon: CouponId::new(42).unwrap(),
            user: UserId::new(user).unwrap(),
            key: IdempotencyKey::parse(raw_key).unwrap(),
            fingerprint: Fingerprint::from_stored("fp"),
            token: "tok".to_owned(),
            now: coupon(1).issue_starts_at + chrono::Duration::milliseconds(now_ms),
        }
    }

    /// A command the workspace's fred features have no method for (hashes, sorted sets).
    async fn command<R: FromValue>(client: &Client, name: &'static str, args: &[&str]) -> R {
        client
            .custom(
                CustomCommand::new_static(name, None::<u16>, false),
                args.to_vec(),
            )
            .await
            .unwrap_or_else(|e| panic!("{name} {args:?}: {e}"))
    }

    /// A load that takes Redis longer than twice a small command's timeout (30k holders,
    /// with a 2 ms bound on small commands) completes: the connection is not cut as
    /// unresponsive while Redis runs it (it was, at 2 × the small commands' timeout, on
    /// a busy machine with the default 500 ms).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_load_longer_than_twice_a_small_commands_timeout_completes() {
        let Some(redis) = TestRedis::create().await else {
            return;
        };
        let config = redis_lock::RedisGateConfig {
            command_timeout: Duration::from_millis(2),
            bulk_timeout: Duration::from_secs(30),
            ..redis_lock::RedisGateConfig::new(Duration::from_secs(10))
        };
        let gate = redis_lock::RedisCouponGate::connect_with(&redis.url, &redis.prefix, config)
            .await
            .unwrap();
        let keys: Vec<IdempotencyKey> = (1..=30_000)
            .map(|u| IdempotencyKey::parse(&format!("key-{u}")).unwrap())
            .collect();
        let snapshot = GateSnapshot {
            coupon: coupon(60_000),
            holders: keys
                .iter()
                .enumerate()
                .map(|(i, key)| (UserId::new(i as i64 + 1).unwrap(), key.clone()))
                .collect(),
        };
        gate.load(&snapshot, request(1, "k", 0).now, Duration::from_secs(10))
            .await
            .unwrap();
        let view = gate
            .inspect(CouponId::new(42).unwrap())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(view.taken, 30_000);
    }

    /// The keys are the documented ones, all under one hash tag, and a recorded refusal
    /// carries a Redis expiry as long as its own.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_gate_keeps_its_documented_keys_and_records_expire_in_redis_too() {
        let Some(redis) = TestRedis::create().await else {
            return;
        };
        let gate = gate(&redis.url, &redis.prefix).await;
        let snapshot = GateSnapshot {
            coupon: coupon(1),
            holders: Vec::new(),
        };
        gate.load(&snapshot, request(1, "k", 0).now, Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(
            gate.admit(&request(7, "k-7", 5)).await.unwrap(),
            GateAnswer::Admitted
        );
        let refused = request(8, "k-8", 6);
        assert_eq!(
            gate.admit(&refused).await.unwrap(),
            GateAnswer::Refused {
                refusal: GateRefusal::SoldOut,
                stale: false
            }
        );
        // As the service does once the database holds the refusal.
        gate.record(
            refused.coupon,
            refused.user,
            &refused.key,
            &refused.fingerprint,
            &StoredResponse {
                status: 409,
                body: b"SOLD_OUT".to_vec(),
            },
            refused.now,
            refused.now + chrono::Duration::milliseconds(60_000),
        )
        .await
        .unwrap();

        let client = redis.client().await;
        let base = format!("{}{{coupon:42}}", redis.prefix);
        let state: HashMap<String, String> =
            command(&client, "HGETALL", &[&format!("{base}:gate")]).await;
        assert_eq!(state["total"], "1");
        assert_eq!(state["taken"], "1");
        assert_eq!(state["ends_ms"], "-1");
        let held: Option<String> =
            command(&client, "HGET", &[&format!("{base}:holders"), "7"]).await;
        assert_eq!(held.as_deref(), Some("P|k-7|tok"));
        let since: Option<String> =
            command(&client, "ZSCORE", &[&format!("{base}:pending"), "7"]).await;
        let admitted_ms = coupon(1).issue_starts_at.timestamp_millis() + 5;
        assert_eq!(since, Some(admitted_ms.to_string()));
        let record = format!("{base}:rec:8:k-8");
        let body: Option<String> = command(&client, "HGET", &[&record, "body"]).await;
        assert_eq!(body.as_deref(), Some("SOLD_OUT"));
        let ttl: i64 = client.pttl(&record).await.unwrap();
        assert!(ttl > 0 && ttl <= 60_000, "PTTL {ttl}");
    }

    /// Redis killed: `Unavailable` at once. Restarted empty (no state, no scripts): the
    /// gate reconnects by itself, its scripts are sent again (EVALSHA's NOSCRIPT, then
    /// EVAL), and the coupon is `Missing` until it is loaded again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_gate_fails_fast_while_redis_is_down_and_recovers_when_it_returns() {
        let Some(mut redis) = RedisServer::start() else {
            return;
        };
        let gate = gate(&redis.url(), "t:restart:").await;
        let snapshot = GateSnapshot {
            coupon: coupon(2),
            holders: Vec::new(),
        };
        let first = request(1, "k-1", 0);
        gate.load(&snapshot, first.now, Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(gate.admit(&first).await.unwrap(), GateAnswer::Admitted);

        redis.kill();
        assert_unavailable(
            "admit while down",
            fast("admit", gate.admit(&request(2, "k-2", 1))).await,
        );

        redis.restart();
        let second = request(2, "k-2", 2);
        let answer = fast("recovery", async {
            loop {
                match gate.admit(&second).await {
                    Err(GateError::Unavailable(_)) => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    other => break other,
                }
            }
        })
        .await;
        assert_eq!(answer.unwrap(), GateAnswer::Missing);
        gate.load(&snapshot, second.now, Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(gate.admit(&second).await.unwrap(), GateAnswer::Admitted);
        assert_eq!(gate.inspect(second.coupon).await.unwrap().unwrap().taken, 1);
    }

    /// Bounds a call that must fail fast.
    async fn fast<T>(what: &str, call: impl Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(10), call)
            .await
            .unwrap_or_else(|_| panic!("{what} does not fail fast"))
    }

    fn assert_unavailable<T: std::fmt::Debug>(what: &str, result: Result<T, GateError>) {
        assert!(
            matches!(result, Err(GateError::Unavailable(_))),
            "{what}: got {result:?}"
        );
    }

    /// A Redis that cannot be reached: the gate is built anyway, and every call answers
    /// `Unavailable` at once.
    #[tokio::test]
    async fn an_unreachable_redis_is_unavailable_quickly() {
        // Nothing listens on port 1.
        // The service's own settings: built after its 1 s wait for a first connection.
        let gate = fast(
            "connect",
            redis_lock::RedisCouponGate::connect(
                "redis://127.0.0.1:1",
                "t:down:",
                testkit::contract::coupon_gate::GATE_STALE_AFTER,
            ),
        )
        .await
        .unwrap();
        let snapshot = GateSnapshot {
            coupon: coupon(1),
            holders: Vec::new(),
        };
        let request = request(1, "k-1", 0);
        let (id, user) = (request.coupon, request.user);
        assert_unavailable("admit", fast("admit", gate.admit(&request)).await);
        assert_unavailable(
            "confirm",
            fast("confirm", gate.confirm(id, user, &request.key)).await,
        );
        assert_unavailable(
            "give_back",
            fast("give_back", gate.give_back(id, user, "tok")).await,
        );
        assert_unavailable(
            "load",
            fast(
                "load",
                gate.load(&snapshot, request.now, Duration::from_secs(1)),
            )
            .await,
        );
        assert_unavailable("forget", fast("forget", gate.forget(id)).await);
        assert_unavailable("inspect", fast("inspect", gate.inspect(id)).await);
    }
}

#[tokio::test]
async fn a_cluster_prefix_with_a_brace_is_refused() {
    let refused = RedisCouponGate::connect(
        "redis-cluster://127.0.0.1:1",
        "a{b}:",
        Duration::from_secs(1),
    )
    .await;
    assert!(refused.is_err());
}
