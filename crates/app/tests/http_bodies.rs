//! What a request body may be: none at all stands for `{}`, anything else must be one JSON
//! object; blanks and cut-off JSON are malformed, and change nothing.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[macro_use]
mod common;

use common::{Backend, TestApp, problem};
use reqwest::StatusCode;
use serde_json::{Value, json};

const BLANKS: [&[u8]; 4] = [b" ", b"   ", b"\n", b" \t\r\n "];

async fn a_new_user_takes_no_body_or_an_empty_object_but_not_blanks(backend: Backend) {
    let Some(app) = TestApp::spawn(backend).await else {
        return;
    };
    app.create_user().await;
    let users_before = app.audit().await.users;
    for blanks in BLANKS {
        let res = app
            .post_raw("/api/users", Some("application/json"), blanks.to_vec())
            .await;
        let (status, code, headers, body) = problem(res).await;
        assert_eq!(
            (status, code.as_str()),
            (StatusCode::BAD_REQUEST, "VALIDATION_ERROR"),
            "{blanks:?}"
        );
        assert_eq!(headers["content-type"], "application/problem+json");
        assert_eq!(body["detail"], "the request body is malformed JSON");
    }
    // No user was created by the refused requests. (Counted, not read off the ids: Galera
    // hands out auto-increment ids in steps of its cluster size.)
    assert_eq!(app.audit().await.users, users_before);

    // No body at all, with or without a JSON content type, is `{}`.
    for content_type in [Some("application/json"), None] {
        let res = app.post_raw("/api/users", content_type, Vec::new()).await;
        assert_eq!(res.status(), StatusCode::CREATED, "{content_type:?}");
        let body: Value = res.json().await.unwrap();
        assert_eq!(body["balance"], 0);
    }
    let res = app
        .post_raw("/api/users", Some("application/json"), b"{}".to_vec())
        .await;
    assert_eq!(res.status(), StatusCode::CREATED);
    // Blanks without a content type are a body that is not declared JSON.
    let (status, code, _, _) =
        problem(app.post_raw("/api/users", None, b"  ".to_vec()).await).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::UNSUPPORTED_MEDIA_TYPE, "UNSUPPORTED_MEDIA_TYPE")
    );
    app.stop().await;
}

async fn blank_and_truncated_bodies_are_malformed_everywhere(backend: Backend) {
    let Some(app) = TestApp::spawn(backend).await else {
        return;
    };
    let user = app.user_with(10_000).await;
    let order = app.create_order(user, 1_000).await;
    let paths = [
        format!("/api/users/{user}/balance/charge"),
        format!("/api/users/{user}/balance/use"),
        "/api/orders".to_owned(),
        "/api/payments".to_owned(),
    ];
    let truncated: [&[u8]; 3] = [b"{\"amount\":", b"{\"amount\":1,", b"{"];
    for path in &paths {
        for body in BLANKS.iter().chain(truncated.iter()) {
            // With the key in the header, so the body is all that is wrong.
            let res = app
                .client
                .post(app.url(path))
                .header("content-type", "application/json")
                .header("idempotency-key", "blank-body")
                .body(body.to_vec())
                .send()
                .await
                .unwrap();
            let (status, code, _, detail) = problem(res).await;
            assert_eq!(
                (status, code.as_str()),
                (StatusCode::BAD_REQUEST, "VALIDATION_ERROR"),
                "{path} {body:?}"
            );
            assert_eq!(
                detail["detail"], "the request body is malformed JSON",
                "{path} {body:?}"
            );
        }
    }
    // A JSON value that is not an object keeps its own words.
    let res = app
        .post_raw(&paths[0], Some("application/json"), b"[1]".to_vec())
        .await;
    assert_eq!(
        problem(res).await.3["detail"],
        "the request body must be a JSON object"
    );
    assert_eq!(app.balance(user).await, 10_000);
    assert_eq!(app.full_history(user).await.len(), 1);
    let order: Value = app
        .get(&format!("/api/orders/{order}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(order["status"], "PENDING");
    app.stop().await;
}

async fn an_unknown_order_is_not_said_to_be_a_users(backend: Backend) {
    let Some(app) = TestApp::spawn(backend).await else {
        return;
    };
    let user = app.user_with(10_000).await;
    let lookup = problem(app.get("/api/orders/999999").await).await;
    let payment = problem(
        app.post_json(
            "/api/payments",
            &json!({"orderId": 999_999, "userId": user, "idempotencyKey": "no-order"}),
        )
        .await,
    )
    .await;
    for (status, code, _, body) in [lookup, payment] {
        assert_eq!(
            (status, code.as_str()),
            (StatusCode::NOT_FOUND, "ORDER_NOT_FOUND")
        );
        assert_eq!(body["detail"], "no order has this id");
    }
    app.stop().await;
}

on_both_backends!(
    a_new_user_takes_no_body_or_an_empty_object_but_not_blanks,
    blank_and_truncated_bodies_are_malformed_everywhere,
    an_unknown_order_is_not_said_to_be_a_users,
);
