//! Guarantees that need the real adapters: the Redis lock really held around the commit,
//! several instances on one MySQL and one Redis, and Redis dying mid-run.
//! Skipped (saying so) when there is no MySQL and Redis to use.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[macro_use]
mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use app::startup::{self, Wiring};
use async_trait::async_trait;
use common::{Backend, TestApp, config, new_key};
use domain::ports::{
    Applied, BalanceChange, BalanceStore, BatchRead, BatchStep, BatchTransaction, LockError,
    LockKey, LockLease, LockManager, RefusalRecord, Release, StepError,
};
use domain::{BalanceService, Ports};
use fred::prelude::KeysInterface;
use futures::future::join_all;
use http_actix::{InProcess, JsonEncoder};
use reqwest::StatusCode;
use serde_json::{Value, json};
use testkit::RedisServer;

/// A `BalanceStore` that, at every atomic step, looks in Redis for the user's lock and
/// counts the steps that ran without it, before and after the commit.
struct LockWitness {
    inner: mysql_repo::MySqlStore,
    redis: fred::prelude::Client,
    prefix: String,
    steps: Arc<AtomicUsize>,
    unlocked: Arc<AtomicUsize>,
    conflicts: Arc<AtomicUsize>,
}

impl LockWitness {
    async fn lock_held(&self, user: domain::types::UserId) -> bool {
        lock_held(&self.redis, &self.prefix, user).await
    }
}

async fn lock_held(
    redis: &fred::prelude::Client,
    prefix: &str,
    user: domain::types::UserId,
) -> bool {
    let key = format!("{}{}", prefix, LockKey::user_balance(user).as_str());
    let token: Option<String> = redis.get(key).await.unwrap();
    token.is_some()
}

#[async_trait]
impl BalanceStore for LockWitness {
    async fn apply(&self, change: BalanceChange) -> Result<Applied, StepError> {
        let user = change.user_id;
        self.steps.fetch_add(1, Ordering::SeqCst);
        if !self.lock_held(user).await {
            self.unlocked.fetch_add(1, Ordering::SeqCst);
        }
        let result = self.inner.apply(change).await;
        // After the commit the lock must still be held: it is released only afterwards.
        if !self.lock_held(user).await {
            self.unlocked.fetch_add(1, Ordering::SeqCst);
        }
        if matches!(result, Err(StepError::VersionConflict)) {
            self.conflicts.fetch_add(1, Ordering::SeqCst);
        }
        result
    }

    async fn record_refusal(&self, refusal: RefusalRecord) -> Result<(), StepError> {
        self.inner.record_refusal(refusal).await
    }

    /// A batch holds the lock of every user in it, from before its read to after its
    /// commit, as a single step does.
    async fn begin_batch(
        &self,
        users: &[domain::types::UserId],
        keys: &[(domain::types::UserId, domain::types::IdempotencyKey)],
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<Box<dyn BatchTransaction>, StepError> {
        for user in users {
            if !self.lock_held(*user).await {
                self.unlocked.fetch_add(1, Ordering::SeqCst);
            }
        }
        let inner = self.inner.begin_batch(users, keys, now).await?;
        Ok(Box::new(WitnessedBatch {
            inner,
            redis: self.redis.clone(),
            prefix: self.prefix.clone(),
            steps: Arc::clone(&self.steps),
            unlocked: Arc::clone(&self.unlocked),
            conflicts: Arc::clone(&self.conflicts),
        }))
    }
}

/// A batch's transaction of [`LockWitness`].
struct WitnessedBatch {
    inner: Box<dyn BatchTransaction>,
    redis: fred::prelude::Client,
    prefix: String,
    steps: Arc<AtomicUsize>,
    unlocked: Arc<AtomicUsize>,
    conflicts: Arc<AtomicUsize>,
}

#[async_trait]
impl BatchTransaction for WitnessedBatch {
    fn read(&self) -> &BatchRead {
        self.inner.read()
    }

    async fn commit(self: Box<Self>, batch: &BatchStep) -> Result<(), StepError> {
        self.steps.fetch_add(batch.len(), Ordering::SeqCst);
        for user in &batch.users {
            if !lock_held(&self.redis, &self.prefix, user.user_id).await {
                self.unlocked.fetch_add(1, Ordering::SeqCst);
            }
        }
        let WitnessedBatch {
            inner,
            redis,
            prefix,
            unlocked,
            conflicts,
            ..
        } = *self;
        let result = inner.commit(batch).await;
        for user in &batch.users {
            if !lock_held(&redis, &prefix, user.user_id).await {
                unlocked.fetch_add(1, Ordering::SeqCst);
            }
        }
        if matches!(result, Err(StepError::VersionConflict)) {
            conflicts.fetch_add(1, Ordering::SeqCst);
        }
        result
    }
}

/// A lock manager that grants everything and holds nothing: the original's bug.
struct NoLock;

#[async_trait]
impl LockManager for NoLock {
    async fn acquire(
        &self,
        key: &LockKey,
        _: Duration,
        _: Duration,
    ) -> Result<LockLease, LockError> {
        Ok(LockLease {
            key: key.clone(),
            token: "none".to_owned(),
        })
    }
    async fn release(&self, _: &LockLease) -> Result<Release, LockError> {
        Ok(Release::Released)
    }
}

/// Builds an app whose store is the witness, with the given lock manager.
async fn witnessed_app(locks: Option<Arc<dyn LockManager>>) -> Option<(TestApp, Arc<LockWitness>)> {
    let db = testkit::TestDatabase::create().await?;
    let redis = testkit::TestRedis::create().await?;
    let mut cfg = config();
    cfg.db.database_url = Some(db.url.clone().into());
    cfg.redis_url = Some(redis.url.clone().into());
    cfg.redis_key_prefix = redis.prefix.clone();
    let redis_locks: Arc<dyn LockManager> = Arc::new(redis.lock_manager().await);
    let witness = Arc::new(LockWitness {
        inner: db.store(),
        redis: redis.client().await,
        prefix: redis.prefix.clone(),
        steps: Arc::default(),
        unlocked: Arc::default(),
        conflicts: Arc::default(),
    });
    let store = db.store();
    let locks = locks.unwrap_or(redis_locks);
    let ports = Ports {
        users: Arc::new(store.clone()),
        orders: Arc::new(store.clone()),
        coupons: Arc::new(store.clone()),
        keys: Arc::new(store.clone()),
        store: Arc::clone(&witness) as Arc<dyn BalanceStore>,
        locks: Arc::clone(&locks),
        encoder: Arc::new(JsonEncoder),
        clock: Arc::new(domain::ports::SystemClock),
        gate: None,
    };
    let wiring = Wiring {
        service: BalanceService::new(ports, cfg.settings().unwrap()),
        dependencies: vec![Arc::new(InProcess {
            name: "database",
            kind: "mysql",
        })],
        auditor: Arc::new(store),
    };
    let app = TestApp::start_with(cfg, wiring, locks, Some(db), Some(redis)).await;
    Some((app, witness))
}

async fn concurrent_charges(app: &TestApp, user: i64, n: usize, amount: i64) -> Vec<StatusCode> {
    join_all((0..n).map(|_| async move { app.charge(user, amount, &new_key()).await.status() }))
        .await
}

/// The original's first failure: a lock that silently did nothing. Here every atomic step
/// must find the user's key in Redis, before and after its commit, and no step may lose a
/// version race (with a real lock there is nobody to race).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_lock_is_held_across_every_commit() {
    let Some((app, witness)) = witnessed_app(None).await else {
        return;
    };
    let user = app.create_user().await;
    let statuses = concurrent_charges(&app, user, 60, 100).await;
    assert!(
        statuses.iter().all(|s| *s == StatusCode::OK),
        "{statuses:?}"
    );
    assert_eq!(witness.steps.load(Ordering::SeqCst), 60);
    assert_eq!(
        witness.unlocked.load(Ordering::SeqCst),
        0,
        "a step ran without the lock"
    );
    assert_eq!(
        witness.conflicts.load(Ordering::SeqCst),
        0,
        "a step lost a version race"
    );
    assert_eq!(app.balance(user).await, 6_000);
    // Released after each commit: nothing is left in Redis.
    let redis = app.redis.as_ref().unwrap();
    let key = format!("{}balance:user:{user}", redis.prefix);
    let left: Option<String> = redis.client().await.get(key).await.unwrap();
    assert_eq!(left, None);
    app.stop().await;
}

/// The same witness catches a lock that does nothing: without it, steps run unlocked and
/// race. (If this test ever passes without seeing that, the witness above proves nothing.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_witness_sees_a_lock_that_does_nothing() {
    let Some((app, witness)) = witnessed_app(Some(Arc::new(NoLock))).await else {
        return;
    };
    let user = app.create_user().await;
    let statuses = concurrent_charges(&app, user, 60, 100).await;
    assert!(witness.unlocked.load(Ordering::SeqCst) > 0);
    // The version guard still keeps the books right without the lock.
    let ok = statuses.iter().filter(|s| **s == StatusCode::OK).count() as i64;
    assert_eq!(app.balance(user).await, ok * 100);
    assert_eq!(app.ledger_sum(user).await, ok * 100);
    app.assert_books_reconcile().await;
    app.stop().await;
}

/// Three instances on one database and one Redis; charges, uses and payments on the same
/// few users through all of them, some keys sent to two instances at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_instances_keep_exact_books() {
    let Some(first) = TestApp::spawn(Backend::Real).await else {
        return;
    };
    let second = first.another_instance().await;
    let third = first.another_instance().await;
    let apps = [&first, &second, &third];
    let users = [
        first.user_with(50_000).await,
        first.user_with(50_000).await,
        first.user_with(50_000).await,
    ];
    let mut orders = Vec::new();
    for (i, user) in users.iter().enumerate() {
        for _ in 0..4 {
            orders.push((*user, first.create_order(*user, 1_000 + i as i64).await));
        }
    }

    // (instance, user, kind, amount or order, key)
    let mut plan = Vec::new();
    for i in 0..150usize {
        let user = users[i % users.len()];
        let key = new_key();
        match i % 3 {
            0 => plan.push((i % 3, user, "charge", 1_000 + i as i64, key)),
            1 => plan.push((i % 3, user, "use", 700 + i as i64, key)),
            _ => {
                let (owner, order) = orders[i % orders.len()];
                plan.push((i % 3, owner, "pay", order, key));
            }
        }
    }
    // Every tenth request is also sent, with the same key, to the next instance.
    let duplicates: Vec<_> = plan
        .iter()
        .step_by(10)
        .map(|(inst, user, kind, arg, key)| ((inst + 1) % 3, *user, *kind, *arg, key.clone()))
        .collect();
    plan.extend(duplicates);

    let answers = join_all(plan.iter().map(|(inst, user, kind, arg, key)| {
        let app = apps[*inst];
        async move {
            let res = match *kind {
                "charge" => app.charge(*user, *arg, key).await,
                "use" => app.use_balance(*user, *arg, key).await,
                _ => app.pay(*user, *arg, key).await,
            };
            let status = res.status();
            let replayed = res.headers().get("idempotent-replayed").is_some();
            let body: Value = res.json().await.unwrap();
            (*user, *kind, key.clone(), status, replayed, body)
        }
    }))
    .await;

    // What was applied, once per key, from the answers themselves.
    let mut applied: HashMap<String, (i64, i64)> = HashMap::new();
    let mut bodies: HashMap<String, Value> = HashMap::new();
    for (user, kind, key, status, _, body) in &answers {
        assert!(
            matches!(status.as_u16(), 200 | 409 | 422),
            "{status} {body}"
        );
        if *status != StatusCode::OK {
            continue;
        }
        if let Some(previous) = bodies.insert(key.clone(), body.clone()) {
            assert_eq!(&previous, body, "a key answered two different bodies");
        }
        let delta = match *kind {
            "charge" => body["chargedAmount"].as_i64().unwrap(),
            "use" => -body["usedAmount"].as_i64().unwrap(),
            _ => -body["amount"].as_i64().unwrap(),
        };
        applied.insert(key.clone(), (*user, delta));
    }
    for user in users {
        let expected = 50_000
            + applied
                .values()
                .filter(|(u, _)| *u == user)
                .map(|(_, d)| d)
                .sum::<i64>();
        for app in apps {
            assert_eq!(app.balance(user).await, expected, "user {user}");
        }
        assert_eq!(first.ledger_sum(user).await, expected);
    }
    first.assert_books_reconcile().await;
    // No key applied twice, no order paid twice, every applied key in the ledger once.
    let pool = first.db.as_ref().unwrap().pool();
    let twice: Vec<(Option<String>, i64)> = sqlx::query_as(
        "select idempotency_key, count(*) from ledger_entries where idempotency_key is not null group by user_id, idempotency_key having count(*) > 1",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert!(twice.is_empty(), "{twice:?}");
    let keys: Vec<(String,)> = sqlx::query_as(
        "select idempotency_key from ledger_entries where idempotency_key is not null",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    // (The users' opening charges are not part of the plan.)
    let planned: HashSet<&String> = answers.iter().map(|a| &a.2).collect();
    let in_ledger: HashSet<String> = keys
        .into_iter()
        .map(|(k,)| k)
        .filter(|k| planned.contains(k))
        .collect();
    let acknowledged: HashSet<String> = applied.keys().cloned().collect();
    assert_eq!(
        in_ledger, acknowledged,
        "the ledger holds exactly the acknowledged operations"
    );
    let paid_twice: Vec<(i64, i64)> = sqlx::query_as(
        "select order_id, count(*) from payments group by order_id having count(*) > 1",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert!(paid_twice.is_empty());

    second.stop().await;
    third.stop().await;
    first.stop().await;
}

async fn app_on_own_redis(
    redis: &RedisServer,
    policy: app::config::RedisDownPolicy,
) -> Option<TestApp> {
    let db = testkit::TestDatabase::create().await?;
    let mut cfg = config();
    cfg.db.database_url = Some(db.url.clone().into());
    cfg.redis_url = Some(redis.url().into());
    cfg.lock_on_redis_down = policy;
    let (locks, dependency) = startup::lock_from_config(&cfg).await.unwrap();
    let wiring = startup::wire_with_locks(&cfg, Arc::clone(&locks), dependency)
        .await
        .unwrap();
    Some(TestApp::start_with(cfg, wiring, locks, Some(db), None).await)
}

/// Redis killed in the middle of a load: under `degrade` every change still lands exactly
/// once, under the database guard alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_killed_mid_run_degrades_without_losing_or_doubling() {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let Some(app) = app_on_own_redis(&redis, app::config::RedisDownPolicy::Degrade).await else {
        return;
    };
    let user = app.user_with(10_000).await;
    let app = Arc::new(app);
    let load = {
        let app = Arc::clone(&app);
        tokio::spawn(async move {
            let mut statuses = Vec::new();
            for round in 0..20 {
                let batch = join_all((0..10).map(|_| {
                    let app = Arc::clone(&app);
                    async move {
                        let key = new_key();
                        let first = app.charge(user, 100, &key).await.status();
                        // The client retries 5xx with the same key.
                        let retry = app.charge(user, 100, &key).await.status();
                        (first, retry)
                    }
                }))
                .await;
                statuses.extend(batch);
                if round == 5 {
                    tokio::task::yield_now().await;
                }
            }
            statuses
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    redis.kill();
    let statuses = load.await.unwrap();
    for (first, retry) in &statuses {
        assert_eq!(*retry, StatusCode::OK, "first {first}");
    }
    assert_eq!(app.balance(user).await, 10_000 + 200 * 100);
    assert_eq!(app.ledger_sum(user).await, 10_000 + 200 * 100);
    app.assert_books_reconcile().await;
    let ready = app.get("/health/ready").await;
    assert_eq!(
        ready.status(),
        StatusCode::OK,
        "under degrade Redis is not required"
    );
    let body: Value = ready.json().await.unwrap();
    assert_eq!(body["dependencies"]["lock"]["status"], "DOWN");
    Arc::try_unwrap(app).ok().unwrap().stop().await;
}

/// Under `fail`, with Redis gone, balance changes answer 503 and nothing is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_gone_under_fail_answers_503_and_applies_nothing() {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let Some(app) = app_on_own_redis(&redis, app::config::RedisDownPolicy::Fail).await else {
        return;
    };
    let user = app.user_with(10_000).await;
    redis.kill();
    let order = app.create_order(user, 500).await;
    for res in [
        app.charge(user, 100, &new_key()).await,
        app.use_balance(user, 100, &new_key()).await,
        app.pay(user, order, &new_key()).await,
    ] {
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(res.headers().get("retry-after").is_some());
        let body: Value = res.json().await.unwrap();
        assert_eq!(body["code"], "SERVICE_UNAVAILABLE");
    }
    assert_eq!(app.balance(user).await, 10_000);
    assert_eq!(app.full_history(user).await.len(), 1);
    let ready = app.get("/health/ready").await;
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    let order_state: Value = app
        .get(&format!("/api/orders/{order}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(order_state["status"], "PENDING");
    let _ = json!({});
    app.stop().await;
}
