//! Test harness: the real application on 127.0.0.1:0, driven over HTTP.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use actix_web::dev::ServerHandle;
use app::Config;
use app::startup::{self, Application, Wiring};
use domain::ports::{AuditReport, Auditor, LockManager};
use reqwest::{Client, Response, StatusCode};
use serde_json::{Value, json};

/// Which adapters a test runs on. `Real` is MySQL + Redis from testkit (a fresh database
/// and key prefix per test); it is skipped when there are no servers. `Galera` is the same
/// adapters on the Galera cluster of `TEST_GALERA_URLS`, each test's first instance on the
/// next node and each further instance on the node after it (opt-in: `#[ignore]`d).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Memory,
    Real,
    Galera,
}

/// The node the next Galera test starts on: consecutive tests spread over the nodes.
static NEXT_NODE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Runs each listed `async fn name(backend: Backend)` as three tests: `memory::name`,
/// `real::name` and `galera::name` (ignored unless asked for: see the `#[ignore]` reason). The
/// same test code covers every adapter.
#[allow(unused_macros)]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Backend::Memory).await
                }
            )*
        }
        mod real {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Backend::Real).await
                }
            )*
        }
        mod galera {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                #[ignore = "needs a Galera cluster: python3 chaos/galera.py up, then TEST_GALERA_URLS=$(python3 chaos/galera.py urls) cargo test -p app -- --ignored galera"]
                async fn $name() {
                    super::$name($crate::common::Backend::Galera).await
                }
            )*
        }
    };
}

pub struct TestApp {
    pub base: String,
    pub client: Client,
    pub locks: Arc<dyn LockManager>,
    pub service: domain::BalanceService,
    pub auditor: Arc<dyn Auditor>,
    pub db: Option<testkit::TestDatabase>,
    pub redis: Option<testkit::TestRedis>,
    /// On Galera, the index of the node this instance talks to.
    pub node: usize,
    handle: ServerHandle,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// A configuration with the spec's defaults, on a free port.
pub fn config() -> Config {
    let mut config = Config::defaults();
    config.bind_addr = "127.0.0.1:0".parse().unwrap();
    config.db.database_url = None;
    config.redis_url = None;
    config.api_token = None;
    config.http_workers = Some(2);
    config.shutdown_timeout_secs = 5;
    // No background audits: the tests that want one ask for it, or call `TestApp::audit`.
    config.audit_interval_secs = 0;
    config
}

impl TestApp {
    /// The app on `backend` with the default test configuration; `None` when the backend's
    /// servers are not there (the test then returns, having said so).
    pub async fn spawn(backend: Backend) -> Option<Self> {
        Self::spawn_with_config(backend, config()).await
    }

    pub async fn spawn_with_config(backend: Backend, config: Config) -> Option<Self> {
        Self::spawn_with_locks(backend, config, None).await
    }

    /// As [`TestApp::spawn_with_config`]; `locks` replaces the backend's lock manager.
    pub async fn spawn_with_locks(
        backend: Backend,
        mut config: Config,
        locks: Option<Arc<dyn LockManager>>,
    ) -> Option<Self> {
        match backend {
            Backend::Memory => {
                let locks = locks.unwrap_or_else(|| Arc::new(memory::InProcessLockManager::new()));
                let wiring = startup::in_memory(config.settings().unwrap(), Arc::clone(&locks));
                Some(Self::start_with(config, wiring, locks, None, None).await)
            }
            Backend::Real | Backend::Galera => {
                let db = if backend == Backend::Galera {
                    let node = NEXT_NODE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    testkit::TestDatabase::create_on_galera(node).await?
                } else {
                    testkit::TestDatabase::create().await?
                };
                let redis = testkit::TestRedis::create().await?;
                config.db.database_url = Some(db.url.clone().into());
                config.redis_url = Some(redis.url.clone().into());
                config.redis_key_prefix = redis.prefix.clone();
                config.migrate_on_start = false;
                let (own_locks, dependency) = startup::lock_from_config(&config).await.unwrap();
                let locks = locks.unwrap_or(own_locks);
                let wiring = startup::wire_with_locks(&config, Arc::clone(&locks), dependency)
                    .await
                    .unwrap();
                Some(Self::start_with(config, wiring, locks, Some(db), Some(redis)).await)
            }
        }
    }

    /// One more instance on the same database and Redis prefix (several instances); on
    /// Galera, on the node after this instance's.
    pub async fn another_instance(&self) -> TestApp {
        self.instance_on(self.node + 1).await
    }

    /// One more instance on the same database and Redis prefix; on Galera, on node
    /// `node % nodes` (elsewhere `node` is ignored).
    pub async fn instance_on(&self, node: usize) -> TestApp {
        let mut config = config();
        if let (Some(db), Some(redis)) = (&self.db, &self.redis) {
            let url = if db.nodes.is_empty() {
                db.url.clone()
            } else {
                db.nodes[node % db.nodes.len()].clone()
            };
            config.db.database_url = Some(url.into());
            config.redis_url = Some(redis.url.clone().into());
            config.redis_key_prefix = redis.prefix.clone();
            config.migrate_on_start = false;
        }
        let (locks, dependency) = startup::lock_from_config(&config).await.unwrap();
        let wiring = startup::wire_with_locks(&config, Arc::clone(&locks), dependency)
            .await
            .unwrap();
        let mut app = Self::start_with(config, wiring, locks, None, None).await;
        app.node = node;
        app
    }

    pub async fn start_with(
        config: Config,
        wiring: Wiring,
        locks: Arc<dyn LockManager>,
        db: Option<testkit::TestDatabase>,
        redis: Option<testkit::TestRedis>,
    ) -> Self {
        let auditor = Arc::clone(&wiring.auditor);
        // No seeded users: every test creates its own through the API.
        let app = Application::build_with(config, wiring, Some(0), 0)
            .await
            .expect("the app builds");
        let base = format!("http://127.0.0.1:{}", app.port());
        let handle = app.handle();
        let service = app.service().clone();
        let task = tokio::spawn(app.run_until_stopped(std::future::pending()));
        TestApp {
            base,
            client: Client::new(),
            locks,
            service,
            auditor,
            node: db
                .as_ref()
                .and_then(|db| db.nodes.iter().position(|u| *u == db.url))
                .unwrap_or(0),
            db,
            redis,
            handle,
            task,
        }
    }

    /// Waits (bounded) until `n` balance changes are in flight in the app.
    pub async fn wait_in_flight(&self, n: usize) {
        for _ in 0..2_000 {
            if self.service.in_flight() == n {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        panic!("never saw {n} requests in flight");
    }

    /// Audits the app's store now, with the app's retention and lease.
    pub async fn audit(&self) -> AuditReport {
        let settings = self.service.settings();
        self.auditor
            .audit(
                settings.idempotency_ttl,
                settings.lock_lease,
                domain::ports::Clock::now(&domain::ports::SystemClock),
            )
            .await
            .expect("the audit runs")
    }

    /// Audits the app's store and insists that the books reconcile.
    pub async fn assert_books_reconcile(&self) {
        let report = self.audit().await;
        assert!(report.is_clean(), "the books do not reconcile: {report:#?}");
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub async fn get(&self, path: &str) -> Response {
        self.client.get(self.url(path)).send().await.unwrap()
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> Response {
        self.client
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .unwrap()
    }

    /// A POST with a raw body and content type.
    pub async fn post_raw(
        &self,
        path: &str,
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> Response {
        let mut req = self.client.post(self.url(path)).body(body);
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        req.send().await.unwrap()
    }

    /// Creates a user and returns its id.
    pub async fn create_user(&self) -> i64 {
        let res = self.post_json("/api/users", &json!({})).await;
        assert_eq!(res.status(), StatusCode::CREATED);
        res.json::<Value>().await.unwrap()["userId"]
            .as_i64()
            .unwrap()
    }

    /// Creates a user holding `balance`.
    pub async fn user_with(&self, balance: i64) -> i64 {
        let id = self.create_user().await;
        if balance > 0 {
            let res = self.charge(id, balance, &new_key()).await;
            assert_eq!(res.status(), StatusCode::OK);
        }
        id
    }

    pub async fn charge(&self, user: i64, amount: i64, key: &str) -> Response {
        self.post_json(
            &format!("/api/users/{user}/balance/charge"),
            &json!({"amount": amount, "idempotencyKey": key}),
        )
        .await
    }

    pub async fn use_balance(&self, user: i64, amount: i64, key: &str) -> Response {
        self.post_json(
            &format!("/api/users/{user}/balance/use"),
            &json!({"amount": amount, "idempotencyKey": key}),
        )
        .await
    }

    pub async fn create_order(&self, user: i64, amount: i64) -> i64 {
        let res = self
            .post_json("/api/orders", &json!({"userId": user, "amount": amount}))
            .await;
        assert_eq!(res.status(), StatusCode::CREATED);
        res.json::<Value>().await.unwrap()["orderId"]
            .as_i64()
            .unwrap()
    }

    pub async fn pay(&self, user: i64, order: i64, key: &str) -> Response {
        self.post_json(
            "/api/payments",
            &json!({"orderId": order, "userId": user, "idempotencyKey": key}),
        )
        .await
    }

    pub async fn balance(&self, user: i64) -> i64 {
        let res = self.get(&format!("/api/users/{user}/balance")).await;
        assert_eq!(res.status(), StatusCode::OK);
        res.json::<Value>().await.unwrap()["balance"]
            .as_i64()
            .unwrap()
    }

    /// Every ledger entry of the user, newest first, following `next` page by page.
    pub async fn full_history(&self, user: i64) -> Vec<Value> {
        let mut items = Vec::new();
        let mut before: Option<i64> = None;
        loop {
            let path = match before {
                Some(b) => format!("/api/users/{user}/balance/history?limit=500&before={b}"),
                None => format!("/api/users/{user}/balance/history?limit=500"),
            };
            let res = self.get(&path).await;
            assert_eq!(res.status(), StatusCode::OK);
            let page: Value = res.json().await.unwrap();
            items.extend(page["items"].as_array().unwrap().iter().cloned());
            match page["next"].as_i64() {
                Some(next) => before = Some(next),
                None => return items,
            }
        }
    }

    /// A refund of `payment`: `amount` `None` asks for the rest.
    pub async fn refund(&self, payment: i64, amount: Option<i64>, key: &str) -> Response {
        let body = match amount {
            Some(amount) => json!({"amount": amount, "idempotencyKey": key}),
            None => json!({"idempotencyKey": key}),
        };
        self.post_json(&format!("/api/payments/{payment}/refunds"), &body)
            .await
    }

    /// A paid order of `amount` for `user` (who holds enough): (order id, payment id).
    pub async fn paid_order(&self, user: i64, amount: i64) -> (i64, i64) {
        let order = self.create_order(user, amount).await;
        let res = self.pay(user, order, &new_key()).await;
        assert_eq!(res.status(), StatusCode::OK);
        let payment = res.json::<Value>().await.unwrap()["paymentId"]
            .as_i64()
            .unwrap();
        (order, payment)
    }

    /// The signed sum of the ledger: CHARGE and REFUND add, USE and PAYMENT take away.
    pub async fn ledger_sum(&self, user: i64) -> i64 {
        self.full_history(user)
            .await
            .iter()
            .map(|e| {
                let amount = e["amount"].as_i64().unwrap();
                match e["type"].as_str().unwrap() {
                    "CHARGE" | "REFUND" => amount,
                    "USE" | "PAYMENT" => -amount,
                    other => panic!("unknown entry type {other}"),
                }
            })
            .sum()
    }

    pub async fn stop(mut self) {
        self.handle.stop(true).await;
        let _ = (&mut self.task).await;
        if let Some(db) = self.db.take() {
            db.cleanup().await;
        }
    }
}

pub fn new_key() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Status, code, headers and body of a problem+json answer, checking its shape.
pub async fn problem(res: Response) -> (StatusCode, String, reqwest::header::HeaderMap, Value) {
    let status = res.status();
    let headers = res.headers().clone();
    assert_eq!(
        headers.get("content-type").and_then(|v| v.to_str().ok()),
        Some("application/problem+json"),
        "a problem answer is application/problem+json (status {status})"
    );
    let body: Value = res.json().await.unwrap();
    for field in ["type", "title", "status", "code", "detail"] {
        assert!(
            body.get(field).is_some(),
            "problem body lacks {field}: {body}"
        );
    }
    assert_eq!(body["status"].as_u64(), Some(u64::from(status.as_u16())));
    let code = body["code"].as_str().unwrap().to_owned();
    (status, code, headers, body)
}

/// The status, the replay header and the exact bytes of an answer.
pub async fn bytes(res: Response) -> (StatusCode, bool, Vec<u8>) {
    let status = res.status();
    let replayed = res
        .headers()
        .get("idempotent-replayed")
        .is_some_and(|v| v == "true");
    (status, replayed, res.bytes().await.unwrap().to_vec())
}
