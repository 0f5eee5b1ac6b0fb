//! The contract's behaviour over HTTP: replays, key scoping, concurrency, payments, the
//! ledger, and the operational endpoints.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[macro_use]
mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use common::{Backend, TestApp, bytes, config, new_key, problem};
use domain::ports::{LockError, LockKey, LockLease, LockManager, Release};
use futures::future::join_all;
use reqwest::StatusCode;
use serde_json::{Value, json};

fn is_rfc3339_millis_utc(s: &str) -> bool {
    // 2026-11-22T14:00:00.123Z
    s.len() == 24
        && s.ends_with('Z')
        && s.as_bytes()[19] == b'.'
        && chrono::DateTime::parse_from_rfc3339(s).is_ok()
}

async fn charge_use_and_read_follow_the_contract(backend: Backend) {
    let Some(app) = TestApp::spawn(backend).await else {
        return;
    };
    let user = app.create_user().await;
    assert_eq!(app.balance(user).await, 0);

    let res = app.charge(user, 10_000, &new_key()).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(
        res.headers().get("content-type").unwrap(),
        "application/json"
    );
    assert!(res.headers().get("idempotent-replayed").is_none());
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["userId"], user);
    assert_eq!(body["balance"], 10_000);
    assert_eq!(body["chargedAmount"], 10_000);
    assert!(
        is_rfc3339_millis_utc(body["transactionTime"].as_str().unwrap()),
        "{body}"
    );
    assert_eq!(body.as_object().unwrap().len(), 4);

    let key = new_key();
    let res = app
        .client
        .post(app.url(&format!("/api/users/{user}/balance/use")))
        .header("Idempotency-Key", &key)
        .json(&json!({"amount": 2_500}))
        .send()
        .await
        .unwrap();
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["balance"], 7_500);
    assert_eq!(body["usedAmount"], 2_500);
    assert!(is_rfc3339_millis_utc(
        body["transactionTime"].as_str().unwrap()
    ));

    let balance: Value = app
        .get(&format!("/api/users/{user}/balance"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(balance, json!({"userId": user, "balance": 7_500}));
    app.stop().await;
}

async fn successes_replay_byte_identical_with_the_header(backend: Backend) {
    let Some(app) = TestApp::spawn(backend).await else {
        return;
    };
    let user = app.user_with(50_000).await;
    let key = new_key();
    let first = bytes(app.charge(user, 1_234, &key).await).await;
    assert_eq!((first.0, first.1), (StatusCode::OK, false));
    for _ in 0..3 {
        let again = bytes(app.charge(user, 1_234, &key).await).await;
        assert_eq!((again.0, again.1), (StatusCode::OK, true));
        assert_eq!(again.2, first.2);
    }
    // Header-only key replays the body-key request too.
    let res = app
        .client
        .post(app.url(&format!("/api/users/{user}/balance/charge")))
        .header("Idempotency-Key", &key)
        .json(&json!({"amount": 1_234}))
        .send()
        .await
        .unwrap();
    let again = bytes(res).await;
    assert_eq!((again.1, &again.2), (true, &first.2));

    let key = new_key();
    let first = bytes(app.use_balance(user, 999, &key).await).await;
    let again = bytes(app.use_balance(user, 999, &key).await).await;
    assert_eq!(
        (again.0, again.1, &again.2),
        (StatusCode::OK, true, &first.2)
    );
    assert_eq!(app.balance(user).await, 50_000 + 1_234 - 999);
    app.stop().await;
}

async fn the_same_key_for_two_users_is_two_keys(backend: Backend) {
    let Some(app) = TestApp::spawn(backend).await else {
        return;
    };
    let a = app.user_with(1_000).await;
    let b = app.user_with(1_000).await;
    let key = new_key();
    let ra = bytes(app.charge(a, 100, &key).await).await;
    let rb = bytes(app.charge(b, 100, &key).await).await;
    assert_eq!(
        (ra.0, ra.1, rb.0, rb.1),
        (StatusCode::OK, false, StatusCode::OK, false)
    );
    assert_ne!(ra.2, rb.2);
    // Another amount for b is b's own reuse; a's record is untouched.
    assert_eq!(
        problem(app.charge(b, 200, &key).await).await.1,
        "IDEMPOTENCY_KEY_REUSED"
    );
    let replay_a = bytes(app.charge(a, 100, &key).await).await;
    assert_eq!((replay_a.1, &replay_a.2), (true, &ra.2));
    assert_eq!((app.balance(a).await, app.balance(b).await), (1_100, 1_100));
    app.stop().await;
}

async fn two_hundred_concurrent_charges_on_one_user(backend: Backend) {
    let Some(app) = TestApp::spawn(backend).await else {
        return;
    };
    let user = app.create_user().await;
    let requests = (0..200).map(|_| {
        let client = app.client.clone();
        let url = app.url(&format!("/api/users/{user}/balance/charge"));
        async move {
            let res = client
                .post(url)
                .json(&json!({"amount": 100, "idempotencyKey": new_key()}))
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), StatusCode::OK);
            res.json::<Value>().await.unwrap()["balance"]
                .as_i64()
                .unwrap()
        }
    });
    let balances: Vec<i64> = join_all(requests).await;
    let distinct: HashSet<i64> = balances.iter().copied().collect();
    assert_eq!(distinct.len(), 200, "every response shows its own balance");
    assert_eq!(distinct, (1..=200).map(|i| i * 100).collect());
    assert_eq!(app.balance(user).await, 20_000);
    assert_eq!(app.ledger_sum(user).await, 20_000);
    app.assert_books_reconcile().await;
    app.stop().await;
}

async fn fifty_concurrent_sends_of_one_key_apply_once(backend: Backend) {
    let Some(app) = TestApp::spawn(backend).await else {
        return;
    };
    let user = app.user_with(1_000).await;
    let key = new_key();
    let requests = (0..50).map(|_| {
        let client = app.client.clone();
        let url = app.url(&format!("/api/users/{user}/balance/charge"));
        let key = key.clone();
        async move {
            let res = client
                .post(url)
                .json(&json!({"amount": 700, "idempotencyKey": key}))
                .send()
                .await
                .unwrap();
            bytes(res).await
        }
    });
    let answers = join_all(requests).await;
    let ok: Vec<_> = answers.iter().filter(|a| a.0 == StatusCode::OK).collect();
    let fresh: Vec<_> = ok.iter().filter(|a| !a.1).collect();
    assert_eq!(fresh.len(), 1, "exactly one request ran");
    assert!(
        ok.iter().all(|a| a.2 == fresh[0].2),
        "every 200 carries the same bytes"
    );
    for other in answers.iter().filter(|a| a.0 != StatusCode::OK) {
        assert_eq!(other.0, StatusCode::CONFLICT);
        let body: Value = serde_json::from_slice(&other.2).unwrap();
        assert_eq!(body["code"], "IDEMPOTENCY_KEY_IN_USE");
    }
    assert_eq!(app.balance(user).await, 1_700);
    assert_eq!(app.full_history(user).await.len(), 2);
    app.assert_books_reconcile().await;
    app.stop().await;
}

async fn concurrent_uses_never_overdraw(backend: Backend) {
    let Some(app) = TestApp::spawn(backend).await else {
        return;
    };
    let user = app.user_with(10_000).await;
    let requests = (0..40).map(|_| {
        let client = app.client.clone();
        let url = app.url(&format!("/api/users/{user}/balance/use"));
        async move {
            let res = client
                .post(url)
                .json(&json!({"amount": 700, "idempotencyKey": new_key()}))
                .send()
                .await
                .unwrap();
            let status = res.status();
            let body: Value = res.json().await.unwrap();
            (status, body)
        }
    });
    let answers = join_all(requests).await;
    let ok = answers.iter().filter(|(s, _)| *s == StatusCode::OK).count();
    assert_eq!(ok, 14, "10000 / 700 = 14 uses fit");
    for (status, body) in answers.iter().filter(|(s, _)| *s != StatusCode::OK) {
        assert_eq!(*status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(body["code"], "INSUFFICIENT_BALANCE");
    }
    assert_eq!(app.balance(user).await, 10_000 - 14 * 700);
    assert_eq!(app.ledger_sum(user).await, 10_000 - 14 * 700);
    app.assert_books_reconcile().await;
    app.stop().await;
}

async fn a_payment_sent_three_times_charges_once(backend: Backend) {
    let Some(app) = TestApp::spawn(backend).await else {
        return;
    };
    let user = app.user_with(100_000).await;
    let order = app.create_order(user, 15_000).await;
    let key = new_key();
    let first = bytes(app.pay(user, order, &key).await).await;
    assert_eq!((first.0, first.1), (StatusCode::OK, false));
    let body: Value = serde_json::from_slice(&first.2).unwrap();
    assert_eq!(body["orderId"], order);
    assert_eq!(body["userId"], user);
    assert_eq!(body["amount"], 15_000);
    assert_eq!(body["balance"], 85_000);
    assert_eq!(body["status"], "COMPLETED");
    assert!(is_rfc3339_millis_utc(body["paidAt"].as_str().unwrap()));
    for _ in 0..2 {
        let again = bytes(app.pay(user, order, &key).await).await;
        assert_eq!(
            (again.0, again.1, &again.2),
            (StatusCode::OK, true, &first.2)
        );
    }
    assert_eq!(app.balance(user).await, 85_000);

    let payment_id = body["paymentId"].as_i64().unwrap();
    let mut fetched: Value = app
        .get(&format!("/api/payments/{payment_id}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        fetched
            .as_object_mut()
            .and_then(|o| o.remove("refundedTotal")),
        Some(json!(0)),
        "GET /api/payments/{{id}} adds the refunded total"
    );
    assert_eq!(
        fetched, body,
        "GET /api/payments/{{id}} has the payment's shape"
    );
    let order_state: Value = app
        .get(&format!("/api/orders/{order}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(order_state["status"], "PAID");
    assert_eq!(order_state["amount"], 15_000);
    assert!(is_rfc3339_millis_utc(
        order_state["createdAt"].as_str().unwrap()
    ));
    let history = app.full_history(user).await;
    assert_eq!(history[0]["type"], "PAYMENT");
    assert_eq!(history[0]["amount"], 15_000);
    assert_eq!(history[0]["balanceAfter"], 85_000);
    assert_eq!(history[0]["idempotencyKey"], key.as_str());
    app.assert_books_reconcile().await;
    app.stop().await;
}

async fn concurrent_payments_of_one_order_pay_it_once(backend: Backend) {
    let Some(app) = TestApp::spawn(backend).await else {
        return;
    };
    let user = app.user_with(100_000).await;
    let order = app.create_order(user, 10_000).await;
    let requests = (0..20).map(|_| {
        let client = app.client.clone();
        let url = app.url("/api/payments");
        async move {
            let res = client
                .post(url)
                .json(&json!({"orderId": order, "userId": user, "idempotencyKey": new_key()}))
                .send()
                .await
                .unwrap();
            let status = res.status();
            (status, res.json::<Value>().await.unwrap())
        }
    });
    let answers = join_all(requests).await;
    assert_eq!(
        answers.iter().filter(|(s, _)| *s == StatusCode::OK).count(),
        1
    );
    for (status, body) in answers.iter().filter(|(s, _)| *s != StatusCode::OK) {
        assert_eq!(
            (*status, body["code"].as_str()),
            (StatusCode::CONFLICT, Some("ORDER_ALREADY_PAID"))
        );
    }
    assert_eq!(app.balance(user).await, 90_000);
    app.assert_books_reconcile().await;
    app.stop().await;
}

async fn mixed_concurrent_operations_keep_the_ledger_equal_to_the_balance(backend: Backend) {
    let Some(app) = TestApp::spawn(backend).await else {
        return;
    };
    let user = app.user_with(5_000).await;
    let mut orders = Vec::new();
    for _ in 0..10 {
        orders.push(app.create_order(user, 300).await);
    }
    let mut tasks = Vec::new();
    for i in 0..60 {
        let client = app.client.clone();
        let base = app.base.clone();
        let order = orders[i % orders.len()];
        tasks.push(tokio::spawn(async move {
            let (url, body) = match i % 3 {
                0 => (
                    format!("{base}/api/users/{user}/balance/charge"),
                    json!({"amount": 250, "idempotencyKey": new_key()}),
                ),
                1 => (
                    format!("{base}/api/users/{user}/balance/use"),
                    json!({"amount": 400, "idempotencyKey": new_key()}),
                ),
                _ => (
                    format!("{base}/api/payments"),
                    json!({"orderId": order, "userId": user, "idempotencyKey": new_key()}),
                ),
            };
            client.post(url).json(&body).send().await.unwrap().status()
        }));
    }
    for t in tasks {
        let status = t.await.unwrap();
        assert!(matches!(status.as_u16(), 200 | 409 | 422), "{status}");
    }
    let balance = app.balance(user).await;
    assert!(balance >= 0);
    assert_eq!(app.ledger_sum(user).await, balance);
    // Every entry's balanceAfter chains: newest first, each one is the previous plus its effect.
    let history = app.full_history(user).await;
    assert_eq!(history[0]["balanceAfter"].as_i64().unwrap(), balance);
    for pair in history.windows(2) {
        let (newer, older) = (&pair[0], &pair[1]);
        let amount = newer["amount"].as_i64().unwrap();
        let delta = if newer["type"] == "CHARGE" {
            amount
        } else {
            -amount
        };
        assert_eq!(
            newer["balanceAfter"].as_i64().unwrap(),
            older["balanceAfter"].as_i64().unwrap() + delta
        );
        assert!(newer["id"].as_i64().unwrap() > older["id"].as_i64().unwrap());
    }
    app.assert_books_reconcile().await;
    app.stop().await;
}

async fn history_pages_newest_first(backend: Backend) {
    let Some(app) = TestApp::spawn(backend).await else {
        return;
    };
    let user = app.create_user().await;
    for i in 1..=7 {
        assert_eq!(
            app.charge(user, i * 10, &new_key()).await.status(),
            StatusCode::OK
        );
    }
    let page: Value = app
        .get(&format!("/api/users/{user}/balance/history?limit=3"))
        .await
        .json()
        .await
        .unwrap();
    let items = page["items"].as_array().unwrap();
    assert_eq!(items.len(), 3);
    assert_eq!(items[0]["amount"], 70);
    assert_eq!(items[2]["amount"], 50);
    assert_eq!(page["next"], items[2]["id"]);
    for item in items {
        assert!(is_rfc3339_millis_utc(item["createdAt"].as_str().unwrap()));
        assert_eq!(item["type"], "CHARGE");
    }
    let next = page["next"].as_i64().unwrap();
    let page: Value = app
        .get(&format!(
            "/api/users/{user}/balance/history?limit=3&before={next}"
        ))
        .await
        .json()
        .await
        .unwrap();
    let amounts: Vec<i64> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["amount"].as_i64().unwrap())
        .collect();
    assert_eq!(amounts, vec![40, 30, 20]);
    let next = page["next"].as_i64().unwrap();
    let page: Value = app
        .get(&format!(
            "/api/users/{user}/balance/history?limit=3&before={next}"
        ))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(page["items"].as_array().unwrap().len(), 1);
    assert!(page["next"].is_null(), "last page");
    // Exactly `limit` entries left: still the last page.
    let page: Value = app
        .get(&format!("/api/users/{user}/balance/history?limit=7"))
        .await
        .json()
        .await
        .unwrap();
    assert!(page["next"].is_null());
    let page: Value = app
        .get(&format!("/api/users/{user}/balance/history"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(page["items"].as_array().unwrap().len(), 7);
    app.stop().await;
}

async fn request_ids_are_echoed_or_made(backend: Backend) {
    let Some(app) = TestApp::spawn(backend).await else {
        return;
    };
    let res = app
        .client
        .get(app.url("/health/live"))
        .header("x-request-id", "client-id-123")
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers().get("x-request-id").unwrap(), "client-id-123");
    let res = app
        .client
        .get(app.url("/nope"))
        .header("x-request-id", "bad id with spaces")
        .send()
        .await
        .unwrap();
    let id = res
        .headers()
        .get("x-request-id")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    assert!(uuid::Uuid::parse_str(&id).is_ok(), "{id}");
    let res = app.charge(987_654, 1, "k").await;
    assert!(res.headers().get("x-request-id").is_some());
    app.stop().await;
}

async fn health_metrics_and_docs_are_served(backend: Backend) {
    let Some(app) = TestApp::spawn(backend).await else {
        return;
    };
    let live: Value = app.get("/health/live").await.json().await.unwrap();
    assert_eq!(live["status"], "UP");
    let ready: Value = app.get("/health/ready").await.json().await.unwrap();
    assert_eq!(ready["status"], "UP");
    assert_eq!(ready["dependencies"]["database"]["status"], "UP");
    let (db_kind, lock_kind) = match backend {
        Backend::Memory => ("memory", "in-process"),
        Backend::Real | Backend::Galera => ("mysql", "redis"),
    };
    assert_eq!(ready["dependencies"]["database"]["kind"], db_kind);
    assert_eq!(ready["dependencies"]["lock"]["kind"], lock_kind);

    let user = app.user_with(100).await;
    let key = new_key();
    app.charge(user, 5, &key).await;
    app.charge(user, 5, &key).await;
    let text = app.get("/metrics").await.text().await.unwrap();
    for name in [
        "http_requests_total",
        "http_request_duration_seconds_bucket",
        "balance_lock_wait_seconds_bucket",
        "balance_lock_acquired_total",
        "balance_idempotent_replays_total",
        "balance_operations_applied_total",
    ] {
        assert!(text.contains(name), "metrics lack {name}");
    }

    let doc: Value = app
        .get("/api-docs/openapi.json")
        .await
        .json()
        .await
        .unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    for path in [
        "/api/users",
        "/api/users/{userId}/balance",
        "/api/users/{userId}/balance/charge",
        "/api/users/{userId}/balance/use",
        "/api/users/{userId}/balance/history",
        "/api/orders",
        "/api/orders/{orderId}",
        "/api/payments",
        "/api/payments/{paymentId}",
        "/health/live",
        "/health/ready",
        "/metrics",
    ] {
        assert!(doc["paths"].get(path).is_some(), "openapi lacks {path}");
    }
    let ui = app.get("/swagger-ui/").await;
    assert_eq!(ui.status(), StatusCode::OK);
    let html = ui.text().await.unwrap();
    assert!(html.contains("swagger-ui"));
    assert!(
        !html.contains("https://"),
        "the UI loads nothing from outside"
    );
    let bundle = app.get("/swagger-ui/swagger-ui-bundle.js").await;
    assert_eq!(bundle.status(), StatusCode::OK);
    app.stop().await;
}

/// A lock service that is down.
struct DownLocks;

#[async_trait]
impl LockManager for DownLocks {
    async fn acquire(&self, _: &LockKey, _: Duration, _: Duration) -> Result<LockLease, LockError> {
        Err(LockError::Unavailable(anyhow::anyhow!(
            "connection refused"
        )))
    }
    async fn release(&self, _: &LockLease) -> Result<Release, LockError> {
        Err(LockError::Unavailable(anyhow::anyhow!(
            "connection refused"
        )))
    }
}

async fn lock_service_down_degrades_or_fails_as_configured(backend: Backend) {
    for (policy, expect_ok) in [
        (app::config::RedisDownPolicy::Degrade, true),
        (app::config::RedisDownPolicy::Fail, false),
    ] {
        let mut cfg = config();
        cfg.lock_on_redis_down = policy;
        let Some(app) = TestApp::spawn_with_locks(backend, cfg, Some(Arc::new(DownLocks))).await
        else {
            return;
        };
        let user = app.create_user().await;
        let key = new_key();
        let res = app.charge(user, 100, &key).await;
        if expect_ok {
            assert_eq!(res.status(), StatusCode::OK);
            assert_eq!(app.balance(user).await, 100);
            let again = bytes(app.charge(user, 100, &key).await).await;
            assert!(again.1, "replayed");
            assert_eq!(app.balance(user).await, 100);
        } else {
            let (status, code, headers, body) = problem(res).await;
            assert_eq!(
                (status, code.as_str()),
                (StatusCode::SERVICE_UNAVAILABLE, "SERVICE_UNAVAILABLE")
            );
            assert!(headers.get("retry-after").is_some());
            assert!(
                !body["detail"].as_str().unwrap().contains("refused"),
                "no internals"
            );
            assert_eq!(app.balance(user).await, 0);
            assert!(app.full_history(user).await.is_empty());
        }
        app.stop().await;
    }
}

on_both_backends!(
    charge_use_and_read_follow_the_contract,
    successes_replay_byte_identical_with_the_header,
    the_same_key_for_two_users_is_two_keys,
    two_hundred_concurrent_charges_on_one_user,
    fifty_concurrent_sends_of_one_key_apply_once,
    concurrent_uses_never_overdraw,
    a_payment_sent_three_times_charges_once,
    concurrent_payments_of_one_order_pay_it_once,
    mixed_concurrent_operations_keep_the_ledger_equal_to_the_balance,
    history_pages_newest_first,
    request_ids_are_echoed_or_made,
    health_metrics_and_docs_are_served,
    lock_service_down_degrades_or_fails_as_configured,
);
