//! A Galera node that lost quorum (isolated from its peers: non-Primary, `wsrep_ready=OFF`)
//! refuses every statement that touches a table with error 1047. The instance on it must
//! say so: unready, and 503 SERVICE_UNAVAILABLE with Retry-After for balance changes and
//! reads, never a 500; the instances on the nodes that kept quorum go on; once the node
//! rejoins, the client's retry with the same key applies once.
//!
//! A file of its own, so no other test runs on the cluster while a node is isolated.
//! Opt-in (`#[ignore]`): `python3 chaos/galera.py up`, then
//! `TEST_GALERA_URLS=$(python3 chaos/galera.py urls) cargo test -p app --test galera_quorum -- --ignored`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use app::startup;
use common::{TestApp, config, new_key, problem};
use reqwest::StatusCode;
use serde_json::Value;
use sqlx::{AssertSqlSafe, Connection, MySqlConnection};

/// `mysql://user@host:port/db` → `mysql://user@host:port/` (the server, no database).
fn server_of(url: &str) -> String {
    let scheme_end = url.find("://").map_or(0, |i| i + 3);
    match url[scheme_end..].find('/') {
        Some(slash) => format!("{}/", &url[..scheme_end + slash]),
        None => format!("{url}/"),
    }
}

async fn set_isolated(server: &str, isolated: bool) {
    let mut conn = MySqlConnection::connect(server).await.unwrap();
    sqlx::query(AssertSqlSafe(format!(
        "set global wsrep_provider_options = 'gmcast.isolate={}'",
        u8::from(isolated)
    )))
    .execute(&mut conn)
    .await
    .unwrap();
    let _ = conn.close().await;
}

/// A node cut off from its peers (`gmcast.isolate=1`) until dropped, also when the test
/// panics: a cluster left with an isolated node would fail every later Galera test.
struct Isolated {
    server: String,
}

impl Isolated {
    async fn new(server: String) -> Self {
        set_isolated(&server, true).await;
        Isolated { server }
    }
}

impl Drop for Isolated {
    fn drop(&mut self) {
        let server = self.server.clone();
        // Drop runs inside the test's runtime, which cannot be blocked on.
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(set_isolated(&server, false));
            }
        })
        .join();
    }
}

/// The node's `wsrep_ready` and `wsrep_cluster_size`.
async fn wsrep_state(server: &str) -> (String, String) {
    let mut conn = MySqlConnection::connect(server).await.unwrap();
    let rows: Vec<(String, String)> = sqlx::query_as(
        "show global status where variable_name in ('wsrep_ready', 'wsrep_cluster_size')",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    let _ = conn.close().await;
    let get = |name: &str| {
        rows.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    (get("wsrep_ready"), get("wsrep_cluster_size"))
}

/// Polls (bounded: Galera's view changes take seconds) until `done` holds.
async fn wait_until<F, Fut>(what: &str, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..600 {
        if done().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("gave up waiting: {what}");
}

async fn instance_on(
    db: &testkit::TestDatabase,
    redis: &testkit::TestRedis,
    node: usize,
) -> TestApp {
    let mut cfg = config();
    cfg.db.database_url = Some(db.nodes[node].clone().into());
    cfg.redis_url = Some(redis.url.clone().into());
    cfg.redis_key_prefix = redis.prefix.clone();
    cfg.migrate_on_start = false;
    let (locks, dependency) = startup::lock_from_config(&cfg).await.unwrap();
    let wiring = startup::wire_with_locks(&cfg, Arc::clone(&locks), dependency)
        .await
        .unwrap();
    let mut app = TestApp::start_with(cfg, wiring, locks, None, None).await;
    app.node = node;
    app
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a Galera cluster: python3 chaos/galera.py up, then TEST_GALERA_URLS=$(python3 chaos/galera.py urls) cargo test -p app --test galera_quorum -- --ignored"]
async fn galera_a_node_without_quorum_is_unready_and_answers_503() {
    let Some(db) = testkit::TestDatabase::create_on_galera(0).await else {
        return;
    };
    let Some(redis) = testkit::TestRedis::create().await else {
        return;
    };
    let last = db.nodes.len() - 1;
    let kept = instance_on(&db, &redis, 0).await;
    let cut = instance_on(&db, &redis, last).await;
    let user = kept.user_with(100).await;
    wait_until("the user reached the last node", || async {
        cut.get(&format!("/api/users/{user}/balance"))
            .await
            .status()
            == StatusCode::OK
    })
    .await;
    let server = server_of(&db.nodes[last]);

    let isolation = Isolated::new(server.clone()).await;
    wait_until("the isolated node lost quorum", || async {
        wsrep_state(&server).await.0 == "OFF"
    })
    .await;

    // The instance on the node without quorum: unready, and 503 with Retry-After.
    let ready = cut.get("/health/ready").await;
    assert_eq!(
        ready.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "readiness on a node without quorum"
    );
    let key = new_key();
    let (status, code, headers, body) = problem(cut.charge(user, 7, &key).await).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "SERVICE_UNAVAILABLE"),
        "{body}"
    );
    assert!(headers.get("retry-after").is_some());
    let text = body.to_string();
    assert!(
        !text.contains("WSREP") && !text.contains("1047"),
        "no internals: {text}"
    );
    let (status, _, headers, _) =
        problem(cut.get(&format!("/api/users/{user}/balance")).await).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(headers.get("retry-after").is_some());

    // The nodes that kept quorum go on.
    let other = new_key();
    assert_eq!(kept.charge(user, 11, &other).await.status(), StatusCode::OK);

    drop(isolation);
    wait_until("the node rejoined", || async {
        let (ready, size) = wsrep_state(&server).await;
        ready == "ON" && size == db.nodes.len().to_string()
    })
    .await;
    wait_until("the instance is ready again", || async {
        cut.get("/health/ready").await.status() == StatusCode::OK
    })
    .await;

    // The client's retry with the same key, through the node that was cut off: applied
    // once, on top of what the other node took meanwhile.
    let res = cut.charge(user, 7, &key).await;
    assert_eq!(res.status(), StatusCode::OK);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["balance"], 118, "{body}");
    assert_eq!(kept.charge(user, 7, &key).await.status(), StatusCode::OK);
    assert_eq!(kept.balance(user).await, 118);
    assert_eq!(kept.ledger_sum(user).await, 118);
    kept.assert_books_reconcile().await;
    cut.assert_books_reconcile().await;
    kept.stop().await;
    cut.stop().await;
    db.cleanup().await;
}
