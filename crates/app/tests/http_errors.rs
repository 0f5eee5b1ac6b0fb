//! Every error row of the spec, against the running app: status, code, problem+json shape,
//! the headers that go with it, and that nothing changed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[macro_use]
mod common;

use std::time::Duration;

use common::{Backend, TestApp, bytes, config, new_key, problem};
use domain::ports::LockKey;
use reqwest::StatusCode;
use serde_json::{Value, json};

async fn validation_errors_are_400_and_change_nothing(backend: Backend) {
    let Some(app) = TestApp::spawn(backend).await else {
        return;
    };
    let user = app.user_with(50_000).await;
    let charge = format!("/api/users/{user}/balance/charge");
    let bodies: Vec<(Option<&str>, Vec<u8>)> = vec![
        (Some("application/json"), b"{not json".to_vec()),
        (Some("application/json"), b"[1,2,3]".to_vec()),
        (
            Some("application/json"),
            br#"{"idempotencyKey":"k1"}"#.to_vec(),
        ),
        (
            Some("application/json"),
            br#"{"amount":"100","idempotencyKey":"k1"}"#.to_vec(),
        ),
        (
            Some("application/json"),
            br#"{"amount":10.5,"idempotencyKey":"k1"}"#.to_vec(),
        ),
        (
            Some("application/json"),
            br#"{"amount":0,"idempotencyKey":"k1"}"#.to_vec(),
        ),
        (
            Some("application/json"),
            br#"{"amount":-1,"idempotencyKey":"k1"}"#.to_vec(),
        ),
        (
            Some("application/json"),
            br#"{"amount":1000000001,"idempotencyKey":"k1"}"#.to_vec(),
        ),
        (
            Some("application/json"),
            br#"{"amount":9223372036854775807,"idempotencyKey":"k1"}"#.to_vec(),
        ),
        (
            Some("application/json"),
            br#"{"amount":92233720368547758070,"idempotencyKey":"k1"}"#.to_vec(),
        ),
        (
            Some("application/json"),
            br#"{"amount":1,"amount":2,"idempotencyKey":"k1"}"#.to_vec(),
        ),
    ];
    for (ct, body) in bodies {
        let res = app.post_raw(&charge, ct, body.clone()).await;
        let (status, code, _, detail) = problem(res).await;
        assert_eq!(
            status,
            StatusCode::BAD_REQUEST,
            "{}",
            String::from_utf8_lossy(&body)
        );
        assert_eq!(
            code,
            "VALIDATION_ERROR",
            "{}",
            String::from_utf8_lossy(&body)
        );
        let detail = detail["detail"].as_str().unwrap().to_lowercase();
        assert!(
            !detail.contains("serde") && !detail.contains("line "),
            "{detail}"
        );
    }
    for path in [
        "/api/users/abc/balance",
        "/api/users/-1/balance",
        "/api/users/0/balance",
        "/api/users/1.5/balance",
        "/api/users/99999999999999999999/balance",
        "/api/orders/x",
        "/api/payments/x",
    ] {
        let (status, code, _, _) = problem(app.get(path).await).await;
        assert_eq!(
            (status, code.as_str()),
            (StatusCode::BAD_REQUEST, "VALIDATION_ERROR"),
            "{path}"
        );
    }
    let res = app
        .post_json(
            "/api/users/abc/balance/charge",
            &json!({"amount": 1, "idempotencyKey": "k"}),
        )
        .await;
    assert_eq!(problem(res).await.1, "VALIDATION_ERROR");
    assert_eq!(app.balance(user).await, 50_000);
    assert_eq!(app.full_history(user).await.len(), 1);
    app.stop().await;
}

async fn history_limit_and_before_are_validated(backend: Backend) {
    let Some(app) = TestApp::spawn(backend).await else {
        return;
    };
    let user = app.create_user().await;
    for query in [
        "limit=0",
        "limit=501",
        "limit=abc",
        "limit=",
        "limit=-1",
        "limit=1.5",
        "before=0",
        "before=x",
        "limit=5&limit=6",
    ] {
        let res = app
            .get(&format!("/api/users/{user}/balance/history?{query}"))
            .await;
        let (status, code, _, _) = problem(res).await;
        assert_eq!(
            (status, code.as_str()),
            (StatusCode::BAD_REQUEST, "VALIDATION_ERROR"),
            "{query}"
        );
    }
    for query in ["limit=1", "limit=500", "", "before=5"] {
        let res = app
            .get(&format!("/api/users/{user}/balance/history?{query}"))
            .await;
        assert_eq!(res.status(), StatusCode::OK, "{query}");
    }
    app.stop().await;
}

async fn idempotency_key_required_and_invalid(backend: Backend) {
    let Some(app) = TestApp::spawn(backend).await else {
        return;
    };
    let user = app.user_with(10_000).await;
    let charge = app.url(&format!("/api/users/{user}/balance/charge"));

    let res = app
        .post_json(
            &format!("/api/users/{user}/balance/charge"),
            &json!({"amount": 1}),
        )
        .await;
    assert_eq!(problem(res).await.1, "IDEMPOTENCY_KEY_REQUIRED");
    let res = app
        .post_json("/api/payments", &json!({"orderId": 1, "userId": user}))
        .await;
    assert_eq!(problem(res).await.1, "IDEMPOTENCY_KEY_REQUIRED");

    let long = "k".repeat(256);
    for key in [
        json!(""),
        json!(long),
        json!("has space"),
        json!("tab\there"),
        json!("ключ"),
        json!(42),
    ] {
        let res = app
            .post_json(
                &format!("/api/users/{user}/balance/charge"),
                &json!({"amount": 1, "idempotencyKey": key}),
            )
            .await;
        let (status, code, _, _) = problem(res).await;
        assert_eq!(
            (status, code.as_str()),
            (StatusCode::BAD_REQUEST, "INVALID_IDEMPOTENCY_KEY"),
            "{key}"
        );
    }
    // 255 visible characters are fine, in the header too.
    let max = "~".repeat(255);
    let res = app
        .client
        .post(&charge)
        .header("Idempotency-Key", &max)
        .json(&json!({"amount": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    // Header and body that differ.
    let res = app
        .client
        .post(&charge)
        .header("Idempotency-Key", "a")
        .json(&json!({"amount": 1, "idempotencyKey": "b"}))
        .send()
        .await
        .unwrap();
    let (status, code, _, _) = problem(res).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::BAD_REQUEST, "INVALID_IDEMPOTENCY_KEY")
    );
    // Header and body that agree.
    let res = app
        .client
        .post(&charge)
        .header("Idempotency-Key", "same")
        .json(&json!({"amount": 1, "idempotencyKey": "same"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(app.balance(user).await, 10_002);
    app.stop().await;
}

async fn unknown_user_order_and_payment_are_404_and_not_stored(backend: Backend) {
    let Some(app) = TestApp::spawn(backend).await else {
        return;
    };
    for (path, code) in [
        ("/api/users/999999/balance", "USER_NOT_FOUND"),
        ("/api/users/999999/balance/history", "USER_NOT_FOUND"),
        ("/api/orders/999999", "ORDER_NOT_FOUND"),
        ("/api/payments/999999", "PAYMENT_NOT_FOUND"),
    ] {
        let (status, got, _, _) = problem(app.get(path).await).await;
        assert_eq!(
            (status, got.as_str()),
            (StatusCode::NOT_FOUND, code),
            "{path}"
        );
    }
    let key = new_key();
    let (status, code, _, _) = problem(app.charge(999_999, 100, &key).await).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::NOT_FOUND, "USER_NOT_FOUND")
    );
    let res = app
        .post_json("/api/orders", &json!({"userId": 999_999, "amount": 100}))
        .await;
    assert_eq!(problem(res).await.1, "USER_NOT_FOUND");

    // Paying someone else's order is ORDER_NOT_FOUND, and the key stays free.
    let owner = app.user_with(10_000).await;
    let other = app.user_with(10_000).await;
    let order = app.create_order(owner, 1_000).await;
    let (status, code, _, _) = problem(app.pay(other, order, &key).await).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::NOT_FOUND, "ORDER_NOT_FOUND")
    );
    let (status, code, _, _) = problem(app.pay(other, 987_654, &key).await).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::NOT_FOUND, "ORDER_NOT_FOUND")
    );
    assert_eq!(app.balance(other).await, 10_000);
    // The key was not stored: the same key now runs afresh for a real order of `other`.
    let mine = app.create_order(other, 1_000).await;
    let res = app.pay(other, mine, &key).await;
    assert_eq!(res.status(), StatusCode::OK);
    let order_state: Value = app
        .get(&format!("/api/orders/{order}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(order_state["status"], "PENDING");
    app.stop().await;
}

async fn unknown_routes_and_methods_are_problems(backend: Backend) {
    let Some(app) = TestApp::spawn(backend).await else {
        return;
    };
    let (status, code, _, _) = problem(app.get("/nope").await).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::NOT_FOUND, "NOT_FOUND")
    );
    let res = app
        .client
        .delete(app.url("/api/users/1/balance"))
        .send()
        .await
        .unwrap();
    let (status, code, headers, _) = problem(res).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::METHOD_NOT_ALLOWED, "METHOD_NOT_ALLOWED")
    );
    assert_eq!(headers.get("allow").unwrap(), "GET, HEAD");
    app.stop().await;
}

async fn payload_too_large_and_unsupported_media_type(backend: Backend) {
    let Some(app) = TestApp::spawn(backend).await else {
        return;
    };
    let user = app.user_with(10_000).await;
    let path = format!("/api/users/{user}/balance/charge");
    let mut big = br#"{"amount":1,"idempotencyKey":"k","pad":""#.to_vec();
    big.extend(std::iter::repeat_n(b'x', 16 * 1024));
    big.extend(br#""}"#);
    let (status, code, _, _) =
        problem(app.post_raw(&path, Some("application/json"), big).await).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, "PAYLOAD_TOO_LARGE")
    );

    // Just under the limit is fine.
    let mut fits = br#"{"amount":1,"idempotencyKey":"fits","pad":""#.to_vec();
    let pad = 16 * 1024 - fits.len() - 2;
    fits.extend(std::iter::repeat_n(b'x', pad));
    fits.extend(br#""}"#);
    assert_eq!(fits.len(), 16 * 1024);
    assert_eq!(
        app.post_raw(&path, Some("application/json"), fits)
            .await
            .status(),
        StatusCode::OK
    );

    let body = br#"{"amount":1,"idempotencyKey":"k2"}"#.to_vec();
    for ct in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        None,
    ] {
        let (status, code, _, _) = problem(app.post_raw(&path, ct, body.clone()).await).await;
        assert_eq!(
            (status, code.as_str()),
            (StatusCode::UNSUPPORTED_MEDIA_TYPE, "UNSUPPORTED_MEDIA_TYPE"),
            "{ct:?}"
        );
    }
    assert_eq!(
        app.post_raw(&path, Some("application/json; charset=utf-8"), body)
            .await
            .status(),
        StatusCode::OK
    );
    assert_eq!(app.balance(user).await, 10_002);
    app.stop().await;
}

async fn reused_key_is_422_and_applies_nothing(backend: Backend) {
    let Some(app) = TestApp::spawn(backend).await else {
        return;
    };
    let user = app.user_with(10_000).await;
    let key = new_key();
    assert_eq!(app.charge(user, 1_000, &key).await.status(), StatusCode::OK);
    for res in [
        app.charge(user, 2_000, &key).await,
        app.use_balance(user, 1_000, &key).await,
    ] {
        let (status, code, _, _) = problem(res).await;
        assert_eq!(
            (status, code.as_str()),
            (StatusCode::UNPROCESSABLE_ENTITY, "IDEMPOTENCY_KEY_REUSED")
        );
    }
    let order = app.create_order(user, 500).await;
    assert_eq!(
        problem(app.pay(user, order, &key).await).await.1,
        "IDEMPOTENCY_KEY_REUSED"
    );
    assert_eq!(app.balance(user).await, 11_000);
    assert_eq!(app.full_history(user).await.len(), 2);
    app.stop().await;
}

async fn business_refusals_are_stored_and_replayed_byte_for_byte(backend: Backend) {
    let mut cfg = config();
    cfg.limits.max_balance = 100_000;
    cfg.limits.max_amount = 100_000;
    let Some(app) = TestApp::spawn_with_config(backend, cfg).await else {
        return;
    };
    let user = app.user_with(60_000).await;

    let key = new_key();
    let first = bytes(app.use_balance(user, 70_000, &key).await).await;
    assert_eq!(first.0, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(!first.1);
    let body: Value = serde_json::from_slice(&first.2).unwrap();
    assert_eq!(body["code"], "INSUFFICIENT_BALANCE");
    // The balance changes, and the same key still answers the stored refusal.
    assert_eq!(
        app.charge(user, 20_000, &new_key()).await.status(),
        StatusCode::OK
    );
    let again = bytes(app.use_balance(user, 70_000, &key).await).await;
    assert_eq!((again.0, again.1), (StatusCode::UNPROCESSABLE_ENTITY, true));
    assert_eq!(again.2, first.2);

    let key = new_key();
    let first = bytes(app.charge(user, 30_000, &key).await).await;
    assert_eq!(first.0, StatusCode::UNPROCESSABLE_ENTITY);
    let body: Value = serde_json::from_slice(&first.2).unwrap();
    assert_eq!(body["code"], "BALANCE_LIMIT_EXCEEDED");
    let again = bytes(app.charge(user, 30_000, &key).await).await;
    assert_eq!((again.0, again.1, &again.2), (first.0, true, &first.2));

    // ORDER_ALREADY_PAID with a new key, stored too.
    let order = app.create_order(user, 1_000).await;
    assert_eq!(
        app.pay(user, order, &new_key()).await.status(),
        StatusCode::OK
    );
    let key = new_key();
    let first = bytes(app.pay(user, order, &key).await).await;
    assert_eq!(first.0, StatusCode::CONFLICT);
    let body: Value = serde_json::from_slice(&first.2).unwrap();
    assert_eq!(body["code"], "ORDER_ALREADY_PAID");
    let again = bytes(app.pay(user, order, &key).await).await;
    assert_eq!((again.0, again.1, &again.2), (first.0, true, &first.2));

    assert_eq!(app.balance(user).await, 79_000);
    assert_eq!(app.ledger_sum(user).await, 79_000);
    app.stop().await;
}

async fn key_in_use_while_the_first_request_waits_for_the_lock(backend: Backend) {
    let Some(app) = TestApp::spawn(backend).await else {
        return;
    };
    let user = app.user_with(10_000).await;
    // Hold the user's lock from outside, so the first request stays in flight.
    let held = app
        .locks
        .acquire(
            &LockKey::user_balance(domain::types::UserId::new(user).unwrap()),
            Duration::from_secs(1),
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    let key = new_key();
    let first = {
        let client = app.client.clone();
        let url = app.url(&format!("/api/users/{user}/balance/charge"));
        let key = key.clone();
        tokio::spawn(async move {
            client
                .post(url)
                .json(&json!({"amount": 500, "idempotencyKey": key}))
                .send()
                .await
                .unwrap()
        })
    };
    app.wait_in_flight(1).await;
    let (status, code, headers, _) = problem(app.charge(user, 500, &key).await).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::CONFLICT, "IDEMPOTENCY_KEY_IN_USE")
    );
    assert_eq!(headers.get("retry-after").unwrap(), "1");
    // A different amount with the in-flight key is a reuse, also answered at once.
    let (status, code, _, _) = problem(app.charge(user, 501, &key).await).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, "IDEMPOTENCY_KEY_REUSED")
    );
    app.locks.release(&held).await.unwrap();
    let res = first.await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(app.balance(user).await, 10_500);
    app.stop().await;
}

async fn lock_timeout_is_503_with_retry_after_and_not_stored(backend: Backend) {
    let mut cfg = config();
    cfg.lock_wait_ms = 50;
    let Some(app) = TestApp::spawn_with_config(backend, cfg).await else {
        return;
    };
    let user = app.user_with(10_000).await;
    let held = app
        .locks
        .acquire(
            &LockKey::user_balance(domain::types::UserId::new(user).unwrap()),
            Duration::from_secs(1),
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    let key = new_key();
    let (status, code, headers, _) = problem(app.charge(user, 700, &key).await).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "LOCK_TIMEOUT")
    );
    assert_eq!(headers.get("retry-after").unwrap(), "1");
    assert_eq!(app.balance(user).await, 10_000);
    app.locks.release(&held).await.unwrap();
    // Not stored: the same key runs afresh.
    let (status, replayed, _) = bytes(app.charge(user, 700, &key).await).await;
    assert_eq!((status, replayed), (StatusCode::OK, false));
    assert_eq!(app.balance(user).await, 10_700);
    app.stop().await;
}

async fn bearer_token_guards_the_api_only(backend: Backend) {
    let mut cfg = config();
    cfg.api_token = Some("s3cret-token-of-at-least-32-chars".to_owned().into());
    let Some(app) = TestApp::spawn_with_config(backend, cfg).await else {
        return;
    };
    for auth in [
        None,
        Some("Bearer wrong"),
        Some("Basic s3cret-token-of-at-least-32-chars"),
        Some("Bearer s3cret-token-of-at-least-32-charsX"),
    ] {
        let mut req = app.client.post(app.url("/api/users")).json(&json!({}));
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let (status, code, headers, _) = problem(req.send().await.unwrap()).await;
        assert_eq!(
            (status, code.as_str()),
            (StatusCode::UNAUTHORIZED, "UNAUTHORIZED"),
            "{auth:?}"
        );
        assert!(headers.get("x-request-id").is_some());
    }
    let res = app
        .client
        .post(app.url("/api/users"))
        .header("authorization", "Bearer s3cret-token-of-at-least-32-chars")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    for open in [
        "/health/live",
        "/health/ready",
        "/metrics",
        "/api-docs/openapi.json",
    ] {
        assert_eq!(app.get(open).await.status(), StatusCode::OK, "{open}");
    }
    app.stop().await;
}

async fn initial_balance_cannot_be_set_through_the_api(backend: Backend) {
    let Some(app) = TestApp::spawn(backend).await else {
        return;
    };
    let (status, code, _, _) =
        problem(app.post_json("/api/users", &json!({"balance": 100})).await).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::BAD_REQUEST, "VALIDATION_ERROR")
    );
    let res = app.post_raw("/api/users", None, Vec::new()).await;
    assert_eq!(res.status(), StatusCode::CREATED);
    let location = res
        .headers()
        .get("location")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["balance"], 0);
    assert_eq!(location, format!("/api/users/{}/balance", body["userId"]));
    app.stop().await;
}

on_both_backends!(
    validation_errors_are_400_and_change_nothing,
    history_limit_and_before_are_validated,
    idempotency_key_required_and_invalid,
    unknown_user_order_and_payment_are_404_and_not_stored,
    unknown_routes_and_methods_are_problems,
    payload_too_large_and_unsupported_media_type,
    reused_key_is_422_and_applies_nothing,
    business_refusals_are_stored_and_replayed_byte_for_byte,
    key_in_use_while_the_first_request_waits_for_the_lock,
    lock_timeout_is_503_with_retry_after_and_not_stored,
    bearer_token_guards_the_api_only,
    initial_balance_cannot_be_set_through_the_api,
);
