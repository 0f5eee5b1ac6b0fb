//! Coupons over HTTP, on both backends (the in-memory store with no gate; MySQL with the
//! Redis admission gate in front of it): creation and its bounds, first come first served
//! under a rush, every refusal stored and replayed, and paying with a coupon.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[macro_use]
mod common;

use std::collections::{BTreeMap, BTreeSet};

use chrono::{Duration, Utc};
use common::{Backend, TestApp, bytes, new_key, problem};
use futures::future::join_all;
use reqwest::StatusCode;
use serde_json::{Value, json};

fn at(offset: Duration) -> String {
    domain::time::format_rfc3339_millis(Utc::now() + offset)
}

async fn create_coupon(app: &TestApp, body: Value) -> Value {
    let res = app.post_json("/api/coupons", &body).await;
    assert_eq!(res.status(), StatusCode::CREATED, "{body}");
    let location = res.headers()["location"].to_str().unwrap().to_owned();
    let coupon: Value = res.json().await.unwrap();
    assert_eq!(
        location,
        format!("/api/coupons/{}", coupon["couponId"].as_i64().unwrap())
    );
    coupon
}

/// A coupon of `total`, open now, never closing.
async fn open_coupon(app: &TestApp, discount: i64, total: i64) -> i64 {
    create_coupon(
        app,
        json!({"name": "WELCOME", "discount": discount, "totalQuantity": total}),
    )
    .await["couponId"]
        .as_i64()
        .unwrap()
}

async fn issue(app: &TestApp, coupon: i64, user: i64, key: &str) -> reqwest::Response {
    app.post_json(
        &format!("/api/coupons/{coupon}/issue"),
        &json!({"userId": user, "idempotencyKey": key}),
    )
    .await
}

async fn issued_quantity(app: &TestApp, coupon: i64) -> i64 {
    let res = app.get(&format!("/api/coupons/{coupon}")).await;
    assert_eq!(res.status(), StatusCode::OK);
    res.json::<Value>().await.unwrap()["issuedQuantity"]
        .as_i64()
        .unwrap()
}

async fn user_coupons(app: &TestApp, user: i64) -> Vec<Value> {
    let res = app.get(&format!("/api/users/{user}/coupons")).await;
    assert_eq!(res.status(), StatusCode::OK);
    res.json::<Value>().await.unwrap()["items"]
        .as_array()
        .unwrap()
        .clone()
}

/// The code of a problem answer, or "" for a success.
fn code_of(status: StatusCode, body: &[u8]) -> String {
    if status.is_success() {
        return String::new();
    }
    serde_json::from_slice::<Value>(body).unwrap()["code"]
        .as_str()
        .unwrap()
        .to_owned()
}

async fn coupons_are_created_read_and_validated(backend: Backend) {
    let Some(app) = TestApp::spawn(backend).await else {
        return;
    };
    let starts = at(Duration::hours(1));
    let ends = at(Duration::hours(2));
    let coupon = create_coupon(
        &app,
        json!({"name": "WELCOME", "discount": 5_000, "totalQuantity": 100,
               "issueStartsAt": starts, "issueEndsAt": ends, "validForDays": 7}),
    )
    .await;
    let id = coupon["couponId"].as_i64().unwrap();
    assert_eq!(
        coupon,
        json!({"couponId": id, "name": "WELCOME", "discount": 5_000, "totalQuantity": 100,
               "issuedQuantity": 0, "issueStartsAt": starts, "issueEndsAt": ends,
               "validForDays": 7})
    );
    let read: Value = app
        .get(&format!("/api/coupons/{id}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(read, coupon);

    // The defaults: open from now, never closing, valid 30 days.
    let before = Utc::now() - Duration::seconds(1);
    let plain = create_coupon(
        &app,
        json!({"name": "쿠폰", "discount": 1, "totalQuantity": 1}),
    )
    .await;
    let opened = chrono::DateTime::parse_from_rfc3339(plain["issueStartsAt"].as_str().unwrap())
        .unwrap()
        .with_timezone(&Utc);
    assert!(opened >= before && opened <= Utc::now(), "{plain}");
    assert_eq!(
        (
            plain["issueEndsAt"].is_null(),
            plain["validForDays"].as_i64()
        ),
        (true, Some(30))
    );

    let valid = json!({"name": "A", "discount": 1, "totalQuantity": 1});
    let with = |field: &str, value: Value| {
        let mut body = valid.clone();
        body[field] = value;
        body
    };
    let bad = [
        with("name", json!("")),
        with("name", json!("x".repeat(101))),
        with("name", json!(7)),
        with("name", Value::Null),
        with("discount", json!(0)),
        with("discount", json!(1_000_000_001_i64)),
        with("discount", json!("5")),
        with("discount", Value::Null),
        with("totalQuantity", json!(0)),
        with("totalQuantity", json!(10_000_001)),
        with("totalQuantity", json!(1.5)),
        with("validForDays", json!(0)),
        with("validForDays", json!(3_651)),
        with("issueStartsAt", json!("tomorrow")),
        with("issueEndsAt", json!(12)),
        json!({"name": "A", "discount": 1, "totalQuantity": 1,
               "issueStartsAt": starts, "issueEndsAt": starts}),
        json!({"name": "A", "discount": 1, "totalQuantity": 1,
               "issueStartsAt": ends, "issueEndsAt": starts}),
    ];
    for body in bad {
        let (status, code, ..) = problem(app.post_json("/api/coupons", &body).await).await;
        assert_eq!(
            (status, code.as_str()),
            (StatusCode::BAD_REQUEST, "VALIDATION_ERROR"),
            "{body}"
        );
    }
    // The upper bounds themselves are accepted.
    create_coupon(
        &app,
        json!({"name": "x".repeat(100), "discount": 1_000_000_000, "totalQuantity": 10_000_000,
               "validForDays": 3_650}),
    )
    .await;

    let (status, code, ..) = problem(app.get("/api/coupons/999999").await).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::NOT_FOUND, "COUPON_NOT_FOUND")
    );
    let (status, code, ..) = problem(app.get("/api/coupons/0").await).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::BAD_REQUEST, "VALIDATION_ERROR")
    );
    app.assert_books_reconcile().await;
    app.stop().await;
}

/// 60 users send 4 issue requests each, all at once, for a coupon of 20: two with one key
/// (a duplicate) and two with keys of their own.
async fn a_rush_of_240_requests_by_60_users_for_20_coupons(backend: Backend) {
    let Some(app) = TestApp::spawn(backend).await else {
        return;
    };
    let coupon = open_coupon(&app, 1_000, 20).await;
    let mut users = Vec::new();
    for _ in 0..60 {
        users.push(app.create_user().await);
    }
    let requests: Vec<(i64, String)> = users
        .iter()
        .flat_map(|&user| {
            let shared = new_key();
            [
                (user, shared.clone()),
                (user, shared),
                (user, new_key()),
                (user, new_key()),
            ]
        })
        .collect();
    let answers = join_all(requests.iter().map(|(user, key)| async {
        let (status, _, body) = bytes(issue(&app, coupon, *user, key).await).await;
        (*user, key.clone(), status, body)
    }))
    .await;

    // Exactly 20 issued, to 20 distinct users, one each.
    let winners: BTreeSet<i64> = answers
        .iter()
        .filter(|(.., status, _)| *status == StatusCode::OK)
        .map(|(user, ..)| *user)
        .collect();
    assert_eq!(winners.len(), 20, "{:?}", summary(&answers));
    assert_eq!(issued_quantity(&app, coupon).await, 20);
    for &user in &users {
        let held = user_coupons(&app, user).await;
        let expected = usize::from(winners.contains(&user));
        assert_eq!(held.len(), expected, "user {user}: {held:?}");
        if let Some(held) = held.first() {
            assert_eq!(
                (held["couponId"].as_i64(), held["status"].as_str()),
                (Some(coupon), Some("AVAILABLE"))
            );
        }
    }
    // The rest: the right refusal for each, or "in use" for a duplicate still running.
    for (user, key, status, body) in &answers {
        let code = code_of(*status, body);
        let allowed: &[&str] = if winners.contains(user) {
            &["", "COUPON_ALREADY_ISSUED", "IDEMPOTENCY_KEY_IN_USE"]
        } else {
            &["COUPON_SOLD_OUT", "IDEMPOTENCY_KEY_IN_USE"]
        };
        assert!(
            allowed.contains(&code.as_str()),
            "user {user} key {key}: {status} {code}"
        );
    }
    // Every key answered twice successfully or refused once answers the same bytes again,
    // marked as a replay; one success per winner.
    let mut first: BTreeMap<&str, (StatusCode, Vec<u8>)> = BTreeMap::new();
    for (_, key, status, body) in &answers {
        if *status != StatusCode::CONFLICT {
            let seen = first.entry(key).or_insert((*status, body.clone()));
            assert_eq!(
                seen,
                &(*status, body.clone()),
                "key {key} answered twice apart"
            );
        }
    }
    let mut successes = BTreeSet::new();
    for (user, key) in &requests {
        let (status, replayed, body) = bytes(issue(&app, coupon, *user, key).await).await;
        assert!(
            replayed,
            "key {key} is replayed: {status} {} first {:?}",
            code_of(status, &body),
            first.get(key.as_str()).map(|(s, b)| (s, code_of(*s, b)))
        );
        if let Some(seen) = first.get(key.as_str()) {
            assert_eq!(seen, &(status, body.clone()), "key {key}'s replay differs");
        }
        if status == StatusCode::OK {
            successes.insert((*user, key.clone()));
        }
    }
    assert_eq!(successes.len(), 20, "one issuing key per winner");
    assert_eq!(
        successes.iter().map(|(u, _)| *u).collect::<BTreeSet<_>>(),
        winners
    );
    assert_eq!(issued_quantity(&app, coupon).await, 20);
    app.assert_books_reconcile().await;
    app.stop().await;
}

fn summary(answers: &[(i64, String, StatusCode, Vec<u8>)]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for (_, _, status, body) in answers {
        *counts
            .entry(format!("{status} {}", code_of(*status, body)))
            .or_insert(0) += 1;
    }
    counts
}

async fn every_issue_refusal_is_stored_and_replayed(backend: Backend) {
    let Some(app) = TestApp::spawn(backend).await else {
        return;
    };
    let user = app.create_user().await;
    let other = app.create_user().await;

    // Issued: the answer, its replay, the listing and the lookup agree.
    let coupon = open_coupon(&app, 2_500, 2).await;
    let key = new_key();
    let res = issue(&app, coupon, user, &key).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert!(res.headers().contains_key("idempotency-expires"));
    let (_, replayed, first) = bytes(res).await;
    assert!(!replayed);
    let body: Value = serde_json::from_slice(&first).unwrap();
    let user_coupon = body["userCouponId"].as_i64().unwrap();
    let issued_at =
        chrono::DateTime::parse_from_rfc3339(body["issuedAt"].as_str().unwrap()).unwrap();
    let expires_at =
        chrono::DateTime::parse_from_rfc3339(body["expiresAt"].as_str().unwrap()).unwrap();
    assert_eq!(expires_at - issued_at, Duration::days(30));
    assert_eq!(
        body,
        json!({"userCouponId": user_coupon, "couponId": coupon, "userId": user,
               "discount": 2_500, "status": "AVAILABLE",
               "issuedAt": body["issuedAt"], "expiresAt": body["expiresAt"]})
    );
    let again = bytes(issue(&app, coupon, user, &key).await).await;
    assert_eq!(again, (StatusCode::OK, true, first.clone()));
    assert_eq!(user_coupons(&app, user).await, vec![body.clone()]);
    let looked_up: Value = app
        .get(&format!("/api/users/{user}/requests/{key}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        (looked_up["operation"].as_str(), &looked_up["response"]),
        (Some("COUPON_ISSUE"), &body)
    );

    // Each refusal: 422, stored, replayed byte for byte, and nothing issued by it.
    let refused = |coupon: i64, user: i64, code: &'static str| {
        let app = &app;
        async move {
            let key = new_key();
            let (status, replayed, body) = bytes(issue(app, coupon, user, &key).await).await;
            assert_eq!(
                (status, replayed, code_of(status, &body).as_str()),
                (StatusCode::UNPROCESSABLE_ENTITY, false, code)
            );
            let again = bytes(issue(app, coupon, user, &key).await).await;
            assert_eq!(again, (status, true, body));
        }
    };
    refused(coupon, user, "COUPON_ALREADY_ISSUED").await;
    assert_eq!(
        issue(&app, coupon, other, &new_key()).await.status(),
        StatusCode::OK
    );
    let third = app.create_user().await;
    refused(coupon, third, "COUPON_SOLD_OUT").await;
    assert_eq!(issued_quantity(&app, coupon).await, 2);
    // Holding one comes before the stock: a holder of a sold-out coupon is told so.
    refused(coupon, user, "COUPON_ALREADY_ISSUED").await;

    let early = create_coupon(
        &app,
        json!({"name": "LATER", "discount": 1, "totalQuantity": 5,
               "issueStartsAt": at(Duration::hours(1))}),
    )
    .await["couponId"]
        .as_i64()
        .unwrap();
    refused(early, user, "COUPON_NOT_OPEN").await;
    let closed = create_coupon(
        &app,
        json!({"name": "PAST", "discount": 1, "totalQuantity": 5,
               "issueStartsAt": at(-Duration::hours(2)), "issueEndsAt": at(-Duration::hours(1))}),
    )
    .await["couponId"]
        .as_i64()
        .unwrap();
    refused(closed, user, "COUPON_NOT_OPEN").await;
    // A refused key is the user's like any other: a charge under it is a reuse, and the
    // request looked up by it is the refusal.
    let refused_key = new_key();
    let (status, _, body) = bytes(issue(&app, closed, user, &refused_key).await).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let (status, code, ..) = problem(app.charge(user, 100, &refused_key).await).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, "IDEMPOTENCY_KEY_REUSED")
    );
    let looked_up: Value = app
        .get(&format!("/api/users/{user}/requests/{refused_key}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        (
            looked_up["operation"].as_str(),
            looked_up["status"].as_u64()
        ),
        (Some("COUPON_ISSUE"), Some(422))
    );
    assert_eq!(
        looked_up["response"],
        serde_json::from_slice::<Value>(&body).unwrap()
    );
    // And a key a charge used is a reuse for an issue, whatever the gate would answer.
    let charged_key = new_key();
    assert_eq!(
        app.charge(user, 100, &charged_key).await.status(),
        StatusCode::OK
    );
    let (status, code, ..) = problem(issue(&app, closed, user, &charged_key).await).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, "IDEMPOTENCY_KEY_REUSED")
    );
    assert_eq!(issued_quantity(&app, early).await, 0);
    assert_eq!(issued_quantity(&app, closed).await, 0);

    // Not found is not stored: the same key then issues.
    let key = new_key();
    let (status, code, ..) = problem(issue(&app, 999_999, user, &key).await).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::NOT_FOUND, "COUPON_NOT_FOUND")
    );
    let fresh = open_coupon(&app, 1, 1).await;
    let (status, code, ..) = problem(issue(&app, fresh, 999_999, &key).await).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::NOT_FOUND, "USER_NOT_FOUND")
    );
    assert_eq!(
        issue(&app, fresh, user, &key).await.status(),
        StatusCode::OK
    );
    // That key is this coupon's now: for another coupon it is reused, one the gate would
    // refuse (not open) and one it would admit alike.
    let (status, code, ..) = problem(issue(&app, early, user, &key).await).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, "IDEMPOTENCY_KEY_REUSED")
    );
    let open = open_coupon(&app, 1, 5).await;
    let (status, code, ..) = problem(issue(&app, open, user, &key).await).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, "IDEMPOTENCY_KEY_REUSED")
    );
    // Bad input changes nothing.
    for body in [
        json!({"idempotencyKey": new_key()}),
        json!({"userId": 0, "idempotencyKey": new_key()}),
        json!({"userId": "1", "idempotencyKey": new_key()}),
    ] {
        let (status, code, ..) = problem(
            app.post_json(&format!("/api/coupons/{fresh}/issue"), &body)
                .await,
        )
        .await;
        assert_eq!(
            (status, code.as_str()),
            (StatusCode::BAD_REQUEST, "VALIDATION_ERROR"),
            "{body}"
        );
    }
    let (status, code, ..) = problem(
        app.post_json(
            &format!("/api/coupons/{fresh}/issue"),
            &json!({"userId": user}),
        )
        .await,
    )
    .await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::BAD_REQUEST, "IDEMPOTENCY_KEY_REQUIRED")
    );
    assert_eq!(user_coupons(&app, user).await.len(), 2);
    assert_eq!(
        issued_quantity(&app, open).await,
        0,
        "the reused key took nothing"
    );
    assert_eq!(
        issue(&app, open, other, &new_key()).await.status(),
        StatusCode::OK
    );
    let (status, code, ..) = problem(app.get("/api/users/999999/coupons").await).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::NOT_FOUND, "USER_NOT_FOUND")
    );
    app.assert_books_reconcile().await;
    app.stop().await;
}

async fn pay_with(
    app: &TestApp,
    user: i64,
    order: i64,
    coupon: i64,
    key: &str,
) -> reqwest::Response {
    app.post_json(
        "/api/payments",
        &json!({"orderId": order, "userId": user, "idempotencyKey": key, "userCouponId": coupon}),
    )
    .await
}

/// Issues one unit of a new coupon of `discount` to `user`; its user coupon id.
async fn coupon_for(app: &TestApp, user: i64, discount: i64) -> i64 {
    let coupon = open_coupon(app, discount, 10).await;
    let res = issue(app, coupon, user, &new_key()).await;
    assert_eq!(res.status(), StatusCode::OK);
    res.json::<Value>().await.unwrap()["userCouponId"]
        .as_i64()
        .unwrap()
}

async fn paying_with_a_coupon(backend: Backend) {
    let Some(app) = TestApp::spawn(backend).await else {
        return;
    };
    let user = app.user_with(100_000).await;
    let other = app.user_with(100_000).await;
    let coupon = coupon_for(&app, user, 5_000).await;

    // The discount off the amount, the coupon USED in the same step, replayed as it was.
    let order = app.create_order(user, 15_000).await;
    let key = new_key();
    let res = pay_with(&app, user, order, coupon, &key).await;
    assert_eq!(res.status(), StatusCode::OK);
    let (_, _, first) = bytes(res).await;
    let paid: Value = serde_json::from_slice(&first).unwrap();
    let payment = paid["paymentId"].as_i64().unwrap();
    assert_eq!(
        (
            paid["amount"].as_i64(),
            paid["balance"].as_i64(),
            paid["discount"].as_i64(),
            paid["userCouponId"].as_i64()
        ),
        (Some(10_000), Some(90_000), Some(5_000), Some(coupon))
    );
    assert_eq!(
        bytes(pay_with(&app, user, order, coupon, &key).await).await,
        (StatusCode::OK, true, first)
    );
    assert_eq!(app.balance(user).await, 90_000);
    assert_eq!(user_coupons(&app, user).await[0]["status"], "USED");
    let shown: Value = app
        .get(&format!("/api/payments/{payment}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        (shown["discount"].as_i64(), shown["userCouponId"].as_i64()),
        (Some(5_000), Some(coupon))
    );
    // Without a coupon the payment answers as in v1: no discount, no coupon.
    let plain = app.create_order(user, 1_000).await;
    let res: Value = app.pay(user, plain, &new_key()).await.json().await.unwrap();
    assert!(
        res.get("discount").is_none() && res.get("userCouponId").is_none(),
        "{res}"
    );

    // A used coupon, another user's, or none at all: COUPON_NOT_USABLE, stored, nothing paid.
    let second = app.create_order(user, 15_000).await;
    let foreign = coupon_for(&app, other, 5_000).await;
    for (coupon, order) in [(coupon, second), (foreign, second), (999_999, second)] {
        let key = new_key();
        let (status, replayed, body) = bytes(pay_with(&app, user, order, coupon, &key).await).await;
        assert_eq!(
            (status, replayed, code_of(status, &body).as_str()),
            (StatusCode::UNPROCESSABLE_ENTITY, false, "COUPON_NOT_USABLE"),
            "coupon {coupon}"
        );
        assert_eq!(
            bytes(pay_with(&app, user, order, coupon, &key).await).await,
            (status, true, body)
        );
    }
    assert_eq!(app.balance(user).await, 89_000);
    assert_eq!(user_coupons(&app, other).await[0]["status"], "AVAILABLE");

    // A partial refund leaves it USED; refunding the rest frees it, and it pays again.
    assert_eq!(
        app.refund(payment, Some(4_000), &new_key()).await.status(),
        StatusCode::OK
    );
    let status_of = |held: Vec<Value>| {
        held.iter()
            .find(|c| c["userCouponId"].as_i64() == Some(coupon))
            .map(|c| c["status"].clone())
    };
    assert_eq!(
        status_of(user_coupons(&app, user).await),
        Some(json!("USED"))
    );
    // A refund never gives back more than the balance paid.
    let (status, code, ..) = problem(app.refund(payment, Some(6_001), &new_key()).await).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, "REFUND_EXCEEDS_PAYMENT")
    );
    let rest: Value = app
        .refund(payment, None, &new_key())
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        (rest["amount"].as_i64(), rest["paymentStatus"].as_str()),
        (Some(6_000), Some("REFUNDED"))
    );
    let held = user_coupons(&app, user).await;
    let freed = held
        .iter()
        .find(|c| c["userCouponId"].as_i64() == Some(coupon))
        .unwrap();
    assert_eq!(freed["status"], "AVAILABLE");
    assert_eq!(app.balance(user).await, 99_000);
    let res = pay_with(&app, user, second, coupon, &new_key()).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(app.balance(user).await, 89_000);

    // A discount at or above the amount: the balance pays 0.
    let big = coupon_for(&app, user, 20_000).await;
    let small = app.create_order(user, 7_000).await;
    let paid: Value = pay_with(&app, user, small, big, &new_key())
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        (
            paid["amount"].as_i64(),
            paid["discount"].as_i64(),
            paid["balance"].as_i64()
        ),
        (Some(0), Some(7_000), Some(89_000))
    );
    assert_eq!(app.ledger_sum(user).await, app.balance(user).await);
    app.assert_books_reconcile().await;
    app.stop().await;
}

on_both_backends!(
    coupons_are_created_read_and_validated,
    a_rush_of_240_requests_by_60_users_for_20_coupons,
    every_issue_refusal_is_stored_and_replayed,
    paying_with_a_coupon,
);
