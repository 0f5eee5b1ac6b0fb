//! The v2 operations over HTTP, on both backends: refunds, order cancellation, the lookup of
//! a request by its key, the balance at a past time and the `Idempotency-Expires` header.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[macro_use]
mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{Backend, TestApp, bytes, config, new_key, problem};
use domain::ports::LockKey;
use futures::future::join_all;
use reqwest::{Response, StatusCode};
use serde_json::{Value, json};

fn is_rfc3339_millis_utc(s: &str) -> bool {
    s.len() == 24
        && s.ends_with('Z')
        && s.as_bytes()[19] == b'.'
        && chrono::DateTime::parse_from_rfc3339(s).is_ok()
}

fn expires_header(res: &Response) -> String {
    res.headers()
        .get("idempotency-expires")
        .expect("a stored answer carries Idempotency-Expires")
        .to_str()
        .unwrap()
        .to_owned()
}

async fn json_of(res: Response) -> Value {
    res.json().await.unwrap()
}

async fn refunds_follow_the_contract(backend: Backend) {
    let Some(app) = TestApp::spawn(backend).await else {
        return;
    };
    let user = app.user_with(100_000).await;
    let (order, payment) = app.paid_order(user, 15_000).await;
    assert_eq!(app.balance(user).await, 85_000);

    // A partial refund, with a reason.
    let key = new_key();
    let res = app
        .post_json(
            &format!("/api/payments/{payment}/refunds"),
            &json!({"amount": 5_000, "idempotencyKey": key, "reason": "size"}),
        )
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["content-type"], "application/json");
    let expires = expires_header(&res);
    assert!(is_rfc3339_millis_utc(&expires), "{expires}");
    let first = res.bytes().await.unwrap().to_vec();
    let body: Value = serde_json::from_slice(&first).unwrap();
    let refund_id = body["refundId"].as_i64().unwrap();
    assert!(is_rfc3339_millis_utc(body["createdAt"].as_str().unwrap()));
    assert_eq!(
        body,
        json!({
            "refundId": refund_id, "paymentId": payment, "orderId": order, "userId": user,
            "amount": 5_000, "balance": 90_000, "refundedTotal": 5_000,
            "paymentStatus": "PARTIALLY_REFUNDED", "reason": "size",
            "createdAt": body["createdAt"],
        })
    );
    // Replayed byte for byte, with the same expiry; another reason is the same request.
    let again = app
        .post_json(
            &format!("/api/payments/{payment}/refunds"),
            &json!({"amount": 5_000, "idempotencyKey": key, "reason": "other words"}),
        )
        .await;
    assert_eq!(expires_header(&again), expires);
    let again = bytes(again).await;
    assert_eq!((again.0, again.1, &again.2), (StatusCode::OK, true, &first));
    // The payment shows it; the order is still PAID.
    let shown = json_of(app.get(&format!("/api/payments/{payment}")).await).await;
    assert_eq!(
        (shown["status"].as_str(), shown["refundedTotal"].as_i64()),
        (Some("PARTIALLY_REFUNDED"), Some(5_000))
    );
    let shown = json_of(app.get(&format!("/api/orders/{order}")).await).await;
    assert_eq!(shown["status"], "PAID");

    // The rest: no amount.
    let res = app.refund(payment, None, &new_key()).await;
    assert_eq!(res.status(), StatusCode::OK);
    let rest = json_of(res).await;
    assert_eq!(
        (
            rest["amount"].as_i64(),
            rest["balance"].as_i64(),
            rest["refundedTotal"].as_i64(),
            rest["paymentStatus"].as_str(),
            rest["reason"].is_null(),
        ),
        (
            Some(10_000),
            Some(100_000),
            Some(15_000),
            Some("REFUNDED"),
            true
        )
    );
    let shown = json_of(app.get(&format!("/api/payments/{payment}")).await).await;
    assert_eq!(
        (shown["status"].as_str(), shown["refundedTotal"].as_i64()),
        (Some("REFUNDED"), Some(15_000))
    );
    let shown = json_of(app.get(&format!("/api/orders/{order}")).await).await;
    assert_eq!(shown["status"], "REFUNDED");
    // Paying a refunded order again is paid already.
    let (status, code, ..) = problem(app.pay(user, order, &new_key()).await).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::CONFLICT, "ORDER_ALREADY_PAID")
    );

    // The list, oldest first, as the answers were.
    let list = json_of(app.get(&format!("/api/payments/{payment}/refunds")).await).await;
    assert_eq!(list, json!({"items": [body, rest]}));

    // The ledger has them as REFUND entries.
    let history = app.full_history(user).await;
    assert_eq!(
        (
            history[0]["type"].as_str(),
            history[0]["amount"].as_i64(),
            history[1]["type"].as_str(),
            history[1]["idempotencyKey"].as_str(),
        ),
        (
            Some("REFUND"),
            Some(10_000),
            Some("REFUND"),
            Some(key.as_str())
        )
    );
    assert_eq!(app.ledger_sum(user).await, 100_000);

    // Nothing left: refused, stored and replayed; nothing changes.
    let key = new_key();
    let refused = app.refund(payment, Some(1), &key).await;
    let refused_expires = expires_header(&refused);
    let (status, code, _, detail) = problem(refused).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, "REFUND_EXCEEDS_PAYMENT")
    );
    assert!(
        detail["detail"].as_str().unwrap().contains("left"),
        "{detail}"
    );
    let replay = app.refund(payment, Some(1), &key).await;
    assert_eq!(expires_header(&replay), refused_expires);
    let replay = bytes(replay).await;
    assert_eq!(
        (replay.0, replay.1),
        (StatusCode::UNPROCESSABLE_ENTITY, true)
    );
    assert_eq!(serde_json::from_slice::<Value>(&replay.2).unwrap(), detail);
    // The rest of nothing is refused too; the same key without the amount is another request.
    let (_, code, ..) = problem(app.refund(payment, None, &new_key()).await).await;
    assert_eq!(code, "REFUND_EXCEEDS_PAYMENT");
    let (status, code, ..) = problem(app.refund(payment, None, &key).await).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, "IDEMPOTENCY_KEY_REUSED")
    );
    assert_eq!(app.balance(user).await, 100_000);
    app.assert_books_reconcile().await;
    app.stop().await;
}

async fn refunds_refuse_what_they_must(backend: Backend) {
    let mut config = config();
    config.limits.max_balance = 100_000;
    config.limits.max_amount = 100_000;
    let Some(app) = TestApp::spawn_with_config(backend, config).await else {
        return;
    };
    let user = app.user_with(50_000).await;
    let (_, payment) = app.paid_order(user, 20_000).await;

    // Not stored: a retry with the key runs afresh.
    let (status, code, ..) = problem(app.refund(999_999, Some(1), &new_key()).await).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::NOT_FOUND, "PAYMENT_NOT_FOUND")
    );
    let key = new_key();
    for body in [
        json!({"amount": 0, "idempotencyKey": key}),
        json!({"amount": -5, "idempotencyKey": key}),
        json!({"amount": 1.5, "idempotencyKey": key}),
        json!({"amount": "5", "idempotencyKey": key}),
        json!({"amount": 1, "idempotencyKey": key, "reason": 7}),
        json!({"amount": 1, "idempotencyKey": key, "reason": "x".repeat(256)}),
        json!({"amount": 1, "idempotencyKey": key, "reason": "line\nbreak"}),
    ] {
        let res = app
            .post_json(&format!("/api/payments/{payment}/refunds"), &body)
            .await;
        let (status, code, ..) = problem(res).await;
        assert_eq!(
            (status, code.as_str()),
            (StatusCode::BAD_REQUEST, "VALIDATION_ERROR"),
            "{body}"
        );
    }
    let (status, code, ..) = problem(
        app.post_json(
            &format!("/api/payments/{payment}/refunds"),
            &json!({"amount": 1}),
        )
        .await,
    )
    .await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::BAD_REQUEST, "IDEMPOTENCY_KEY_REQUIRED")
    );
    let (status, code, ..) = problem(app.get("/api/payments/abc/refunds").await).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::BAD_REQUEST, "VALIDATION_ERROR")
    );

    // Above the payment: stored.
    let above = new_key();
    let first = bytes(app.refund(payment, Some(20_001), &above).await).await;
    assert_eq!(first.0, StatusCode::UNPROCESSABLE_ENTITY);
    let body: Value = serde_json::from_slice(&first.2).unwrap();
    assert_eq!(body["code"], "REFUND_EXCEEDS_PAYMENT");
    let again = bytes(app.refund(payment, Some(20_001), &above).await).await;
    assert_eq!((again.1, &again.2), (true, &first.2));

    // MAX_BALANCE: charge to the brim, then a refund would pass it.
    assert_eq!(
        app.charge(user, 70_000, &new_key()).await.status(),
        StatusCode::OK
    );
    let limit = new_key();
    let first = bytes(app.refund(payment, Some(1), &limit).await).await;
    let body: Value = serde_json::from_slice(&first.2).unwrap();
    assert_eq!(
        (first.0, body["code"].as_str()),
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("BALANCE_LIMIT_EXCEEDED")
        )
    );
    let again = bytes(app.refund(payment, Some(1), &limit).await).await;
    assert_eq!((again.1, &again.2), (true, &first.2));
    assert_eq!(app.balance(user).await, 100_000);
    let shown = json_of(app.get(&format!("/api/payments/{payment}")).await).await;
    assert_eq!(
        (shown["status"].as_str(), shown["refundedTotal"].as_i64()),
        (Some("COMPLETED"), Some(0))
    );
    let list = json_of(app.get(&format!("/api/payments/{payment}/refunds")).await).await;
    assert_eq!(list, json!({"items": []}));
    let res = app
        .client
        .delete(app.url(&format!("/api/payments/{payment}/refunds")))
        .send()
        .await
        .unwrap();
    let (status, _, headers, _) = problem(res).await;
    assert_eq!(
        (status, headers["allow"].to_str().unwrap()),
        (StatusCode::METHOD_NOT_ALLOWED, "GET, HEAD, POST")
    );
    app.assert_books_reconcile().await;
    app.stop().await;
}

/// 40 refunds of 300 against a payment of 10,000, each with its own key, sent at once (on
/// two instances where the backend shares its database): exactly 33 fit.
async fn forty_concurrent_refunds_of_one_payment(backend: Backend) {
    let Some(app) = TestApp::spawn(backend).await else {
        return;
    };
    let second = match backend {
        Backend::Memory => None,
        Backend::Real | Backend::Galera => Some(app.another_instance().await),
    };
    let user = app.user_with(10_000).await;
    let (_, payment) = app.paid_order(user, 10_000).await;
    let keys: Vec<String> = (0..40).map(|_| new_key()).collect();
    let sends = keys.iter().enumerate().map(|(i, key)| {
        let target = match (&second, i % 2) {
            (Some(other), 1) => other,
            _ => &app,
        };
        async move { bytes(target.refund(payment, Some(300), key).await).await }
    });
    let answers = join_all(sends).await;
    let applied: Vec<&(StatusCode, bool, Vec<u8>)> =
        answers.iter().filter(|a| a.0 == StatusCode::OK).collect();
    assert_eq!(applied.len(), 33, "10,000 holds 33 refunds of 300");
    let totals: HashSet<i64> = applied
        .iter()
        .map(|a| {
            serde_json::from_slice::<Value>(&a.2).unwrap()["refundedTotal"]
                .as_i64()
                .unwrap()
        })
        .collect();
    assert_eq!(totals, (1..=33).map(|n| n * 300).collect::<HashSet<_>>());
    for answer in answers.iter().filter(|a| a.0 != StatusCode::OK) {
        let body: Value = serde_json::from_slice(&answer.2).unwrap();
        assert_eq!(
            (answer.0, body["code"].as_str()),
            (
                StatusCode::UNPROCESSABLE_ENTITY,
                Some("REFUND_EXCEEDS_PAYMENT")
            )
        );
    }
    // Every answer, refusals included, replays byte for byte.
    for (key, answer) in keys.iter().zip(&answers) {
        let again = bytes(app.refund(payment, Some(300), key).await).await;
        assert_eq!((again.0, again.1, &again.2), (answer.0, true, &answer.2));
    }
    let shown = json_of(app.get(&format!("/api/payments/{payment}")).await).await;
    assert_eq!(
        (shown["status"].as_str(), shown["refundedTotal"].as_i64()),
        (Some("PARTIALLY_REFUNDED"), Some(9_900))
    );
    let list = json_of(app.get(&format!("/api/payments/{payment}/refunds")).await).await;
    assert_eq!(list["items"].as_array().unwrap().len(), 33);
    assert_eq!(app.balance(user).await, 9_900);
    app.assert_books_reconcile().await;
    if let Some(second) = second {
        second.stop().await;
    }
    app.stop().await;
}

async fn orders_cancel_once_and_refuse_payment(backend: Backend) {
    let Some(app) = TestApp::spawn(backend).await else {
        return;
    };
    let user = app.user_with(50_000).await;
    let order = app.create_order(user, 5_000).await;
    let cancel = |id: i64| {
        let path = format!("/api/orders/{id}/cancel");
        let app = &app;
        async move { app.post_json(&path, &json!({})).await }
    };

    let first = cancel(order).await;
    assert_eq!(first.status(), StatusCode::OK);
    assert!(first.headers().get("idempotency-expires").is_none());
    let first = json_of(first).await;
    assert_eq!(
        (
            first["orderId"].as_i64(),
            first["status"].as_str(),
            first["amount"].as_i64()
        ),
        (Some(order), Some("CANCELLED"), Some(5_000))
    );
    let again = cancel(order).await;
    assert_eq!(again.status(), StatusCode::OK);
    assert_eq!(json_of(again).await, first);
    // No body at all is `{}` too.
    let res = app
        .client
        .post(app.url(&format!("/api/orders/{order}/cancel")))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let shown = json_of(app.get(&format!("/api/orders/{order}")).await).await;
    assert_eq!(shown, first);

    // Paying it is refused, stored and replayed; nothing is taken.
    let key = new_key();
    let refused = bytes(app.pay(user, order, &key).await).await;
    let body: Value = serde_json::from_slice(&refused.2).unwrap();
    assert_eq!(
        (refused.0, body["code"].as_str()),
        (StatusCode::CONFLICT, Some("ORDER_CANCELLED"))
    );
    let again = bytes(app.pay(user, order, &key).await).await;
    assert_eq!(
        (again.0, again.1, &again.2),
        (StatusCode::CONFLICT, true, &refused.2)
    );
    assert_eq!(app.balance(user).await, 50_000);

    // A paid order cannot be cancelled; a missing one is not found; a field is refused.
    let (paid, _) = app.paid_order(user, 1_000).await;
    let (status, code, ..) = problem(cancel(paid).await).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::CONFLICT, "ORDER_ALREADY_PAID")
    );
    let shown = json_of(app.get(&format!("/api/orders/{paid}")).await).await;
    assert_eq!(shown["status"], "PAID");
    let (status, code, ..) = problem(cancel(999_999).await).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::NOT_FOUND, "ORDER_NOT_FOUND")
    );
    let pending = app.create_order(user, 1_000).await;
    let (status, code, ..) = problem(
        app.post_json(
            &format!("/api/orders/{pending}/cancel"),
            &json!({"reason": "x"}),
        )
        .await,
    )
    .await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::BAD_REQUEST, "VALIDATION_ERROR")
    );
    let shown = json_of(app.get(&format!("/api/orders/{pending}")).await).await;
    assert_eq!(shown["status"], "PENDING");
    app.assert_books_reconcile().await;
    app.stop().await;
}

/// A cancellation and payments racing for one order: exactly one of them wins.
async fn a_cancellation_racing_payments_leaves_one_winner(backend: Backend) {
    let Some(app) = TestApp::spawn(backend).await else {
        return;
    };
    let user = app.user_with(100_000).await;
    for _ in 0..5 {
        let order = app.create_order(user, 1_000).await;
        let path = format!("/api/orders/{order}/cancel");
        let empty = json!({});
        let cancel = app.post_json(&path, &empty);
        let pays =
            join_all((0..4).map(|_| async { bytes(app.pay(user, order, &new_key()).await).await }));
        let (cancelled, paid) = futures::join!(cancel, pays);
        let paid_ok = paid.iter().filter(|p| p.0 == StatusCode::OK).count();
        let shown = json_of(app.get(&format!("/api/orders/{order}")).await).await;
        if cancelled.status() == StatusCode::OK {
            assert_eq!((paid_ok, shown["status"].as_str()), (0, Some("CANCELLED")));
            for p in &paid {
                let body: Value = serde_json::from_slice(&p.2).unwrap();
                assert_eq!(body["code"], "ORDER_CANCELLED");
            }
        } else {
            assert_eq!(cancelled.status(), StatusCode::CONFLICT);
            assert_eq!((paid_ok, shown["status"].as_str()), (1, Some("PAID")));
        }
    }
    app.assert_books_reconcile().await;
    app.stop().await;
}

async fn a_request_is_looked_up_by_its_key(backend: Backend) {
    let Some(app) = TestApp::spawn(backend).await else {
        return;
    };
    let user = app.user_with(1_000).await;
    let other = app.user_with(1_000).await;
    let lookup = |user: i64, encoded: &str| {
        let path = format!("/api/users/{user}/requests/{encoded}");
        let app = &app;
        async move { app.get(&path).await }
    };

    // A success: the stored body itself, byte for byte, and the record's times.
    let key = new_key();
    let res = app.charge(user, 250, &key).await;
    let expires = expires_header(&res);
    let answer = res.bytes().await.unwrap();
    let found = lookup(user, &key).await;
    assert_eq!(found.status(), StatusCode::OK);
    let found = json_of(found).await;
    assert_eq!(
        (
            found["idempotencyKey"].as_str(),
            found["operation"].as_str(),
            found["status"].as_u64(),
            found["expiresAt"].as_str(),
        ),
        (
            Some(key.as_str()),
            Some("CHARGE"),
            Some(200),
            Some(expires.as_str())
        )
    );
    assert_eq!(
        found["response"],
        serde_json::from_slice::<Value>(&answer).unwrap()
    );
    assert!(is_rfc3339_millis_utc(found["createdAt"].as_str().unwrap()));
    // The stored bytes are embedded unchanged (not re-encoded).
    let raw = lookup(user, &key).await.text().await.unwrap();
    assert!(raw.contains(std::str::from_utf8(&answer).unwrap()), "{raw}");

    // A refusal, and a key that needs percent-encoding.
    let odd = "a/b%c+d?e#f&g";
    let encoded = "a%2Fb%25c%2Bd%3Fe%23f%26g";
    let refused = app.use_balance(user, 5_000, odd).await;
    assert_eq!(refused.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let refused = refused.bytes().await.unwrap();
    let found = json_of(lookup(user, encoded).await).await;
    assert_eq!(
        (
            found["idempotencyKey"].as_str(),
            found["operation"].as_str(),
            found["status"].as_u64()
        ),
        (Some(odd), Some("USE"), Some(422))
    );
    assert_eq!(
        found["response"],
        serde_json::from_slice::<Value>(&refused).unwrap()
    );

    // A payment and a refund.
    let (_, payment) = app.paid_order(other, 400).await;
    let refund_key = new_key();
    assert_eq!(
        app.refund(payment, None, &refund_key).await.status(),
        StatusCode::OK
    );
    let found = json_of(lookup(other, &refund_key).await).await;
    assert_eq!(
        (
            found["operation"].as_str(),
            found["response"]["paymentStatus"].as_str()
        ),
        (Some("REFUND"), Some("REFUNDED"))
    );

    // Unknown keys, another user's key, a malformed key, an unknown user.
    for (who, encoded) in [(user, "never-sent"), (other, key.as_str())] {
        let (status, code, ..) = problem(lookup(who, encoded).await).await;
        assert_eq!(
            (status, code.as_str()),
            (StatusCode::NOT_FOUND, "REQUEST_NOT_FOUND")
        );
    }
    let (status, code, ..) = problem(lookup(user, "with%20space").await).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::BAD_REQUEST, "INVALID_IDEMPOTENCY_KEY")
    );
    let (status, code, ..) = problem(lookup(999_999, "k").await).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::NOT_FOUND, "USER_NOT_FOUND")
    );

    // In flight: the user's lock is held elsewhere, so the charge waits with its claim.
    let lease = app
        .locks
        .acquire(
            &LockKey::user_balance(domain::types::UserId::new(user).unwrap()),
            Duration::from_secs(5),
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    let waiting_key = new_key();
    let waiting = {
        let client = app.client.clone();
        let url = app.url(&format!("/api/users/{user}/balance/charge"));
        let key = waiting_key.clone();
        tokio::spawn(async move {
            client
                .post(url)
                .json(&json!({"amount": 5, "idempotencyKey": key}))
                .send()
                .await
                .unwrap()
                .status()
        })
    };
    app.wait_in_flight(1).await;
    let (status, code, headers, _) = problem(lookup(user, &waiting_key).await).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::CONFLICT, "IDEMPOTENCY_KEY_IN_USE")
    );
    assert!(headers.get("retry-after").is_some());
    app.locks.release(&lease).await.unwrap();
    assert_eq!(waiting.await.unwrap(), StatusCode::OK);
    let found = json_of(lookup(user, &waiting_key).await).await;
    assert_eq!(found["status"], 200);
    app.stop().await;
}

async fn the_balance_at_a_time_follows_the_ledger(backend: Backend) {
    let Some(app) = TestApp::spawn(backend).await else {
        return;
    };
    let user = app.create_user().await;
    let before = chrono::Utc::now() - chrono::Duration::seconds(5);
    let at = |t: &str| {
        let path = format!("/api/users/{user}/balance?at={}", t.replace('+', "%2B"));
        let app = &app;
        async move { app.get(&path).await }
    };
    let format = |t: chrono::DateTime<chrono::Utc>| t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string();

    let mut times = Vec::new();
    for (i, amount) in [100, 200, 300, 400].into_iter().enumerate() {
        let res = if i == 2 {
            app.use_balance(user, 50, &new_key()).await
        } else {
            app.charge(user, amount, &new_key()).await
        };
        let body = json_of(res).await;
        times.push(body["transactionTime"].as_str().unwrap().to_owned());
        // Entries a millisecond apart at least, so each instant names one entry.
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    // The expected balance at each entry's instant, from the ledger itself.
    let history = app.full_history(user).await;
    let expected = |t: &str| -> i64 {
        history
            .iter()
            .filter(|e| e["createdAt"].as_str().unwrap() <= t)
            .max_by_key(|e| {
                (
                    e["createdAt"].as_str().unwrap().to_owned(),
                    e["id"].as_i64().unwrap(),
                )
            })
            .map_or(0, |e| e["balanceAfter"].as_i64().unwrap())
    };
    for t in &times {
        let body = json_of(at(t).await).await;
        assert_eq!(
            body,
            json!({"userId": user, "balance": expected(t), "at": t})
        );
    }
    assert_eq!(expected(&times[0]), 100);
    assert_eq!(expected(&times[2]), 250);
    let body = json_of(at(&format(before)).await).await;
    assert_eq!(body["balance"], 0, "before the first entry");
    // Another offset, and more digits than the ledger keeps, name the same instant.
    let first = chrono::DateTime::parse_from_rfc3339(&times[1]).unwrap();
    let seoul = first
        .with_timezone(&chrono::FixedOffset::east_opt(9 * 3600).unwrap())
        .format("%Y-%m-%dT%H:%M:%S%.6f+09:00")
        .to_string();
    let body = json_of(at(&seoul).await).await;
    assert_eq!(
        (body["balance"].as_i64(), body["at"].as_str()),
        (Some(300), Some(times[1].as_str()))
    );
    // The future is now.
    let later = format(chrono::Utc::now() + chrono::Duration::days(1));
    let body = json_of(at(&later).await).await;
    assert_eq!(body["balance"], app.balance(user).await);
    // A leap second is the last millisecond of its minute.
    let minute = &times[3][..17];
    let leap = json_of(at(&format!("{minute}60.5Z")).await).await;
    let last = json_of(at(&format!("{minute}59.999Z")).await).await;
    assert_eq!(leap, last);
    assert_eq!(
        leap["at"].as_str(),
        Some(format!("{minute}59.999Z").as_str())
    );
    for bad in [
        "yesterday",
        "2026-13-01T00:00:00Z",
        "",
        "1700000000",
        "0000-01-01T00:00:00+00:01",
        "9999-12-31T23:59:59-23:59",
    ] {
        let (status, code, ..) = problem(at(bad).await).await;
        assert_eq!(
            (status, code.as_str()),
            (StatusCode::BAD_REQUEST, "VALIDATION_ERROR"),
            "{bad}"
        );
    }
    let (status, code, ..) = problem(
        app.get(&format!(
            "/api/users/{user}/balance?at={}&at={}",
            times[0], times[1]
        ))
        .await,
    )
    .await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::BAD_REQUEST, "VALIDATION_ERROR")
    );
    let (status, code, ..) = problem(
        app.get(&format!("/api/users/999999/balance?at={}", times[0]))
            .await,
    )
    .await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::NOT_FOUND, "USER_NOT_FOUND")
    );
    app.stop().await;
}

on_both_backends!(
    refunds_follow_the_contract,
    refunds_refuse_what_they_must,
    forty_concurrent_refunds_of_one_payment,
    orders_cancel_once_and_refuse_payment,
    a_cancellation_racing_payments_leaves_one_winner,
    a_request_is_looked_up_by_its_key,
    the_balance_at_a_time_follows_the_ledger,
);
