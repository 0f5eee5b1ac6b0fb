//! Multi-primary on a MariaDB Galera cluster: one service instance per node, all writing
//! the same hot users at once. A write that lost to a concurrent write committed on another
//! node fails certification at COMMIT (reported as deadlock 1213) or is brute-force aborted
//! by the applier; either must come back as a retried conflict, never a 500 or a lost
//! update.
//!
//! Opt-in (`#[ignore]`): `python3 chaos/galera.py up` (or `just galera up`), then
//! `TEST_GALERA_URLS=$(python3 chaos/galera.py urls) cargo test -p app --test galera -- --ignored`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use app::config::RedisDownPolicy;
use app::startup;
use common::{TestApp, config, new_key};
use reqwest::StatusCode;
use serde_json::Value;
use sqlx::{Connection, MySqlConnection};

const HOT_USERS: usize = 2;
const CLIENTS_PER_INSTANCE: usize = 12;
const OPS_PER_CLIENT: usize = 8;
/// Tries of one operation (same key) before the test gives up on it.
const MAX_TRIES: usize = 60;

/// The tests of this file one at a time: the cluster's conflict counters are global, and
/// each test reads how many conflicts its own load caused.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// One service instance per Galera node on one fresh database, the lock on `redis_url`
/// (a live Redis, or a closed port for "Redis down") with `policy`.
async fn one_instance_per_node(
    db: &testkit::TestDatabase,
    redis_url: &str,
    prefix: &str,
    policy: RedisDownPolicy,
) -> Vec<TestApp> {
    let mut apps = Vec::new();
    for (node, url) in db.nodes.iter().enumerate() {
        let mut cfg = config();
        cfg.db.database_url = Some(url.clone().into());
        cfg.redis_url = Some(redis_url.to_owned().into());
        cfg.redis_key_prefix = prefix.to_owned();
        cfg.migrate_on_start = false;
        cfg.lock_on_redis_down = policy;
        // A short wait: under "Redis down" there is no queue, and under contention a
        // request that waits long is the test's slowest part, not its subject.
        cfg.lock_wait_ms = 2_000;
        let (locks, dependency) = startup::lock_from_config(&cfg).await.unwrap();
        let wiring = startup::wire_with_locks(&cfg, Arc::clone(&locks), dependency)
            .await
            .unwrap();
        let mut app = TestApp::start_with(cfg, wiring, locks, None, None).await;
        app.node = node;
        apps.push(app);
    }
    apps
}

/// What one operation ended on, and every answer it got on the way.
#[derive(Debug, Clone)]
struct Outcome {
    user: i64,
    key: String,
    effect: i64,
    final_status: StatusCode,
    final_code: Option<String>,
    /// Every non-final answer: (status, code, had Retry-After).
    retried: Vec<(StatusCode, Option<String>, bool)>,
}

/// Sends one charge (`amount > 0`) or use (`amount < 0`) until it gets a final answer,
/// with the same key: 5xx and 409 IDEMPOTENCY_KEY_IN_USE are retried, as a client would.
async fn run_op(app: &TestApp, user: i64, amount: i64) -> Outcome {
    let key = new_key();
    let mut retried = Vec::new();
    for _ in 0..MAX_TRIES {
        let res = if amount > 0 {
            app.charge(user, amount, &key).await
        } else {
            app.use_balance(user, -amount, &key).await
        };
        let status = res.status();
        let retry_after = res.headers().get("retry-after").is_some();
        let body: Value = res.json().await.unwrap_or(Value::Null);
        let code = body["code"].as_str().map(str::to_owned);
        let again = status.is_server_error()
            || (status == StatusCode::CONFLICT
                && code.as_deref() == Some("IDEMPOTENCY_KEY_IN_USE"));
        if !again {
            return Outcome {
                user,
                key,
                effect: amount,
                final_status: status,
                final_code: code,
                retried,
            };
        }
        retried.push((status, code, retry_after));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("operation {key} on user {user} never got a final answer: {retried:?}");
}

/// A Galera status counter summed over the nodes.
async fn wsrep_counter(db: &testkit::TestDatabase, name: &str) -> u64 {
    let mut total = 0;
    for url in &db.nodes {
        let mut conn = MySqlConnection::connect(url).await.unwrap();
        let row: (String, String) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "show global status like '{name}'"
        )))
        .fetch_one(&mut conn)
        .await
        .unwrap();
        total += row.1.parse::<u64>().unwrap();
        let _ = conn.close().await;
    }
    total
}

/// A connection to `url` whose reads wait until the node has applied every write the
/// cluster committed before them (Galera's causality check), so a node's books are read
/// complete.
async fn causal(url: &str) -> MySqlConnection {
    let mut conn = MySqlConnection::connect(url).await.unwrap();
    sqlx::query("set session wsrep_sync_wait = 1")
        .execute(&mut conn)
        .await
        .unwrap();
    conn
}

/// A sum of one metric over the instances.
async fn metric(apps: &[TestApp], name: &str) -> f64 {
    let mut total = 0.0;
    for app in apps {
        let text = app.get("/metrics").await.text().await.unwrap();
        total += text
            .lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>();
    }
    total
}

/// Every instance on its own node writes the same hot users at once; then the books are
/// checked on every node.
async fn hot_users_through_every_node(policy: RedisDownPolicy, redis_up: bool) {
    let _serial = SERIAL.lock().await;
    let Some(db) = testkit::TestDatabase::create_on_galera(0).await else {
        return;
    };
    let Some(redis) = testkit::TestRedis::create().await else {
        return;
    };
    // "Redis down": a port nothing listens on (bound, then closed, so it is free).
    let redis_url = if redis_up {
        redis.url.clone()
    } else {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        format!("redis://127.0.0.1:{port}")
    };
    let apps = Arc::new(one_instance_per_node(&db, &redis_url, &redis.prefix, policy).await);
    assert_eq!(apps.len(), db.nodes.len(), "one instance per node");
    let mut users = Vec::new();
    for _ in 0..HOT_USERS {
        users.push(apps[0].create_user().await);
    }
    // Each node's view of the new users before the load starts (no 404 from a lagging
    // node: the cluster is virtually synchronous, not synchronous).
    for url in &db.nodes {
        let mut conn = causal(url).await;
        let (n,): (i64,) = sqlx::query_as("select count(*) from users")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_eq!(n, HOT_USERS as i64);
    }
    let conflicts_before = wsrep_counter(&db, "wsrep_local_cert_failures").await
        + wsrep_counter(&db, "wsrep_local_bf_aborts").await;

    let mut tasks = Vec::new();
    for i in 0..apps.len() {
        for c in 0..CLIENTS_PER_INSTANCE {
            let apps = Arc::clone(&apps);
            let users = users.clone();
            tasks.push(tokio::spawn(async move {
                let mut outcomes = Vec::new();
                for n in 0..OPS_PER_CLIENT {
                    let user = users[(c + n) % users.len()];
                    // Mostly charges, every third a use that may find the balance short.
                    let amount = if n % 3 == 2 {
                        -((c * 7 + n * 13) as i64 % 400 + 1)
                    } else {
                        (c * 11 + n * 17) as i64 % 1000 + 1
                    };
                    outcomes.push(run_op(&apps[i], user, amount).await);
                }
                outcomes
            }));
        }
    }
    let mut outcomes: Vec<Outcome> = Vec::new();
    for t in tasks {
        outcomes.extend(t.await.unwrap());
    }

    // Every operation ended on a 200 or a stored refusal; every retried answer was a 503
    // with Retry-After or a 409 IN_USE; nothing was a 500.
    let mut expected: BTreeMap<i64, i64> = users.iter().map(|u| (*u, 0)).collect();
    let mut acked = BTreeMap::new();
    let mut refused = Vec::new();
    for o in &outcomes {
        match (o.final_status, o.final_code.as_deref()) {
            (StatusCode::OK, _) => {
                *expected.get_mut(&o.user).unwrap() += o.effect;
                acked.insert((o.user, o.key.clone()), o.effect);
            }
            (StatusCode::UNPROCESSABLE_ENTITY, Some("INSUFFICIENT_BALANCE")) => {
                refused.push((o.user, o.key.clone()));
            }
            other => panic!("operation {} ended on {other:?}", o.key),
        }
        for (status, code, retry_after) in &o.retried {
            assert!(
                (*status == StatusCode::SERVICE_UNAVAILABLE && *retry_after)
                    || *status == StatusCode::CONFLICT,
                "a retried answer was {status} {code:?} (Retry-After: {retry_after})"
            );
        }
    }
    let mut retried: BTreeMap<String, usize> = BTreeMap::new();
    for (status, code, _) in outcomes.iter().flat_map(|o| &o.retried) {
        *retried
            .entry(format!(
                "{} {}",
                status.as_u16(),
                code.as_deref().unwrap_or("-")
            ))
            .or_default() += 1;
    }
    let conflicts = wsrep_counter(&db, "wsrep_local_cert_failures").await
        + wsrep_counter(&db, "wsrep_local_bf_aborts").await
        - conflicts_before;
    let optimistic = metric(&apps, "balance_optimistic_conflicts_total").await;
    eprintln!(
        "galera {policy:?} redis_up={redis_up}: {} operations, {} acknowledged, {} refused, \
         retried answers {retried:?}; certification failures + BF aborts {conflicts}; \
         balance_optimistic_conflicts_total {optimistic}",
        outcomes.len(),
        acked.len(),
        refused.len()
    );
    if !redis_up {
        // Without the lock the only guard is the database: the cluster must have seen
        // conflicting commits on different nodes, and the service retried them.
        assert!(
            conflicts > 0,
            "no Galera conflict happened: the test proved nothing"
        );
        assert!(optimistic > 0.0, "the service saw no conflict to retry");
    }

    // The books, on every node: every acknowledged operation once, no refused one, and
    // every balance equal to the acknowledged effects; the audit clean through each node.
    for (node, url) in db.nodes.iter().enumerate() {
        let mut conn = causal(url).await;
        for (user, want) in &expected {
            let (balance,): (i64,) = sqlx::query_as("select balance from users where id = ?")
                .bind(user)
                .fetch_one(&mut conn)
                .await
                .unwrap();
            assert_eq!(balance, *want, "node {}: user {user}", node + 1);
        }
        let entries: Vec<(i64, String, String, i64)> = sqlx::query_as(
            "select user_id, idempotency_key, kind, amount from ledger_entries \
             where idempotency_key is not null",
        )
        .fetch_all(&mut conn)
        .await
        .unwrap();
        let mut seen = BTreeMap::new();
        for (user, key, kind, amount) in entries {
            let signed = if kind == "CHARGE" { amount } else { -amount };
            assert!(
                seen.insert((user, key.clone()), signed).is_none(),
                "node {}: key {key} applied twice",
                node + 1
            );
        }
        assert_eq!(
            seen,
            acked,
            "node {}: the ledger is not the acknowledged operations",
            node + 1
        );
        // Ids come from each node's own sequence (auto_increment_increment = nodes), yet a
        // user's entries in id order are its history in commit order: each balance_after
        // is the one before plus the entry's effect.
        for user in expected.keys() {
            let rows: Vec<(String, i64, i64)> = sqlx::query_as(
                "select kind, amount, balance_after from ledger_entries where user_id = ? order by id",
            )
            .bind(user)
            .fetch_all(&mut conn)
            .await
            .unwrap();
            let mut running = 0;
            for (kind, amount, after) in rows {
                running += if kind == "CHARGE" { amount } else { -amount };
                assert_eq!(
                    after,
                    running,
                    "node {}: user {user}'s entries out of order",
                    node + 1
                );
            }
        }
        let _ = conn.close().await;
    }
    for app in apps.iter() {
        app.assert_books_reconcile().await;
    }
    for app in Arc::into_inner(apps).unwrap() {
        app.stop().await;
    }
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs a Galera cluster: python3 chaos/galera.py up, then TEST_GALERA_URLS=$(python3 chaos/galera.py urls) cargo test -p app --test galera -- --ignored"]
async fn galera_hot_users_on_every_node_with_the_redis_lock() {
    hot_users_through_every_node(RedisDownPolicy::Degrade, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs a Galera cluster: python3 chaos/galera.py up, then TEST_GALERA_URLS=$(python3 chaos/galera.py urls) cargo test -p app --test galera -- --ignored"]
async fn galera_hot_users_on_every_node_with_redis_down_degrade() {
    hot_users_through_every_node(RedisDownPolicy::Degrade, false).await;
}

/// Deploying on Galera: the schema is migrated once, through one node (`balance-service
/// migrate`), and then every instance starts with MIGRATE_ON_START through its own node at
/// the same time: those runs find the schema current and write nothing, so they neither
/// fail nor disturb each other. (Concurrent runs that do apply migrations through different
/// nodes are not safe: `GET_LOCK` is node-local on Galera; see docs/operations.md.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs a Galera cluster: python3 chaos/galera.py up, then TEST_GALERA_URLS=$(python3 chaos/galera.py urls) cargo test -p app --test galera -- --ignored"]
async fn galera_migrate_once_then_every_node_starts_with_migrate_on_start() {
    let _serial = SERIAL.lock().await;
    // Created and migrated through node 1, present on every node.
    let Some(db) = testkit::TestDatabase::create_on_galera(0).await else {
        return;
    };
    let mut runs = Vec::new();
    for url in db.nodes.clone() {
        runs.push(tokio::spawn(async move {
            let pool = mysql_repo::connect(&url, 2).await.unwrap();
            let run = mysql_repo::migrate(&pool)
                .await
                .map_err(|e| format!("{e:#}"));
            pool.close().await;
            run
        }));
    }
    let mut results = Vec::new();
    for run in runs {
        results.push(run.await.unwrap());
    }
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    // Every migration applied once, and marked done, as every node sees it.
    for url in &db.nodes {
        let mut conn = causal(url).await;
        let (done, failed): (i64, i64) = sqlx::query_as(
            "select cast(sum(success) as signed), cast(sum(not success) as signed) from _sqlx_migrations",
        )
        .fetch_one(&mut conn)
        .await
        .unwrap();
        assert_eq!(
            (done, failed),
            (mysql_repo::MIGRATOR.iter().count() as i64, 0),
            "{url}"
        );
        let _ = conn.close().await;
    }
    db.cleanup().await;
}
