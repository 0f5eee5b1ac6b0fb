//! Who may do what, over HTTP: the service token, per-user JWTs (HS256, RS256, EdDSA),
//! the route-based check against every spelling of a path, and `/metrics`' own token.
//! Authorization lives in the HTTP layer, above the adapters, so these run on the in-memory
//! backend.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::PathBuf;

use common::{Backend, TestApp, config, new_key, problem};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderValue};
use reqwest::{Client, StatusCode};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ADMIN_TOKEN: &str = "admin-token-for-tests-0123456789";
const SECRET: &[u8] = b"an-hs256-secret-of-at-least-32-bytes!!";

fn key_file(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/keys")
        .join(name)
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

fn client_with(token: &str) -> Client {
    let mut headers = HeaderMap::new();
    headers.insert(
        AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
    );
    Client::builder().default_headers(headers).build().unwrap()
}

fn hs256(claims: &Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(SECRET).unwrap(),
    )
    .unwrap()
}

fn user_token(user: i64) -> String {
    hs256(&json!({"sub": user.to_string(), "exp": now() + 600}))
}

/// The app with `API_TOKEN` and, optionally, an HS256 JWT secret; its own client carries
/// the service token, so the suite's helpers act as an administrator.
async fn spawn(jwt_secret: bool) -> TestApp {
    let mut cfg = config();
    cfg.api_token = Some(ADMIN_TOKEN.to_owned().into());
    if jwt_secret {
        cfg.auth_jwt_secret = Some(String::from_utf8(SECRET.to_vec()).unwrap().into());
    }
    spawn_with(cfg).await
}

async fn spawn_with(cfg: app::Config) -> TestApp {
    let mut app = TestApp::spawn_with_config(Backend::Memory, cfg)
        .await
        .expect("the in-memory backend needs no servers");
    app.client = client_with(ADMIN_TOKEN);
    app
}

/// One raw HTTP/1.1 exchange, bytes as written: no client normalises the path.
async fn raw(app: &TestApp, request: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(app.base.trim_start_matches("http://"))
        .await
        .unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {answer:?}"));
    (status, answer)
}

/// Spellings of `/api/users/{user}/balance…` that a router may or may not take for it.
fn spellings(user: i64, tail: &str) -> Vec<String> {
    let canonical = format!("/api/users/{user}/balance{tail}");
    let rest = canonical.trim_start_matches("/api");
    vec![
        canonical.clone(),
        format!("/%61pi{rest}"),
        format!("/%61%70%69{rest}"),
        format!("/%41PI{rest}"),
        format!("/api/%75sers/{user}/balance{tail}"),
        format!("/api/users/%3{user}/balance{tail}"),
        format!("/api%2F{}", rest.trim_start_matches('/')),
        format!("/api%2f{}", rest.trim_start_matches('/')),
        format!("//api{rest}"),
        format!("/api/{rest}"),
        format!("/./api{rest}"),
        format!("/api/.{rest}"),
        format!("/x/../api{rest}"),
        format!("/api/x/..{rest}"),
        format!("/api/%2e{rest}"),
        format!("/%2e/api{rest}"),
        format!("{canonical}/"),
        format!("{canonical}//"),
        format!("/API{rest}"),
        format!("/Api{rest}"),
        format!("/api{}", rest.to_uppercase()),
        format!("{canonical}?x=1"),
        format!("{canonical}#frag"),
        format!("{canonical};x"),
        format!("/%2561pi{rest}"),
        format!("http://localhost{canonical}"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_spelling_of_a_path_skips_authentication() {
    let app = spawn(true).await;
    // Users 1..9 only: `%3{user}` spells the id's digit percent-encoded.
    let user = app.user_with(10_000).await;
    assert!(user < 10);
    let other = app.user_with(10_000).await;
    let other_token = user_token(other);
    for path in spellings(user, "/use") {
        let body = format!(r#"{{"amount":1000,"idempotencyKey":"{}"}}"#, new_key());
        for auth in [
            String::new(),
            format!("Authorization: Bearer {other_token}\r\n"),
        ] {
            let request = format!(
                "POST {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            let (status, answer) = raw(&app, &request).await;
            assert!(
                matches!(status, 400 | 401 | 404 | 405),
                "{path} ({}) answered {status}: {answer}",
                if auth.is_empty() {
                    "no token"
                } else {
                    "another user's token"
                }
            );
        }
    }
    for path in spellings(user, "") {
        let (status, answer) = raw(
            &app,
            &format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert!(
            matches!(status, 400 | 401 | 404),
            "GET {path} answered {status}: {answer}"
        );
        assert!(
            !answer.contains("\"balance\""),
            "GET {path} leaked {answer}"
        );
    }
    assert_eq!(app.balance(user).await, 10_000, "no spelling moved money");
    // The same request with the service token does go through: the test can fail.
    let body = format!(r#"{{"amount":1000,"idempotencyKey":"{}"}}"#, new_key());
    let (status, _) = raw(
        &app,
        &format!(
            "POST /api/users/{user}/balance/use HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(app.balance(user).await, 9_000);
    app.stop().await;
}

/// Status and bytes of a GET with `client`.
async fn get_with(app: &TestApp, client: &Client, path: &str) -> (StatusCode, Vec<u8>) {
    let res = client.get(app.url(path)).send().await.unwrap();
    (res.status(), res.bytes().await.unwrap().to_vec())
}

async fn post_with(
    app: &TestApp,
    client: &Client,
    path: &str,
    body: &Value,
) -> (StatusCode, Value) {
    let res = client.post(app.url(path)).json(body).send().await.unwrap();
    let status = res.status();
    (status, res.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_token_acts_for_its_user_only() {
    let app = spawn(true).await;
    let mine = app.user_with(50_000).await;
    let theirs = app.user_with(50_000).await;
    let their_order = app.create_order(theirs, 1_000).await;
    let their_unpaid_order = app.create_order(theirs, 1_000).await;
    let paid = app.pay(theirs, their_order, &new_key()).await;
    assert_eq!(paid.status(), StatusCode::OK);
    let their_payment = paid.json::<Value>().await.unwrap()["paymentId"]
        .as_i64()
        .unwrap();
    let admin = app.client.clone();
    let me = client_with(&user_token(mine));
    let coupon = app
        .post_json(
            "/api/coupons",
            &json!({"name": "WELCOME", "discount": 500, "totalQuantity": 10}),
        )
        .await
        .json::<Value>()
        .await
        .unwrap()["couponId"]
        .as_i64()
        .unwrap();

    // Their resources answer exactly what a resource that does not exist answers.
    let missing = 9_999_999;
    for (theirs_path, missing_path) in [
        (
            format!("/api/users/{theirs}/balance"),
            format!("/api/users/{missing}/balance"),
        ),
        (
            format!("/api/users/{theirs}/balance/history"),
            format!("/api/users/{missing}/balance/history"),
        ),
        (
            format!("/api/orders/{their_order}"),
            format!("/api/orders/{missing}"),
        ),
        (
            format!("/api/payments/{their_payment}"),
            format!("/api/payments/{missing}"),
        ),
        (
            format!("/api/payments/{their_payment}/refunds"),
            format!("/api/payments/{missing}/refunds"),
        ),
        (
            format!("/api/users/{theirs}/balance?at=2026-01-01T00:00:00.000Z"),
            format!("/api/users/{missing}/balance?at=2026-01-01T00:00:00.000Z"),
        ),
        (
            format!("/api/users/{theirs}/requests/some-key"),
            format!("/api/users/{missing}/requests/some-key"),
        ),
        (
            format!("/api/users/{theirs}/coupons"),
            format!("/api/users/{missing}/coupons"),
        ),
    ] {
        let (status, body) = get_with(&app, &me, &theirs_path).await;
        let (admin_status, admin_body) = get_with(&app, &admin, &missing_path).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{theirs_path}");
        assert_eq!(
            (status, body),
            (admin_status, admin_body),
            "{theirs_path} must look like {missing_path}"
        );
    }
    for (path, body) in [
        (
            format!("/api/users/{theirs}/balance/charge"),
            json!({"amount": 100, "idempotencyKey": new_key()}),
        ),
        (
            format!("/api/users/{theirs}/balance/use"),
            json!({"amount": 100, "idempotencyKey": new_key()}),
        ),
        (
            "/api/orders".to_owned(),
            json!({"userId": theirs, "amount": 100}),
        ),
        (
            "/api/payments".to_owned(),
            json!({"userId": theirs, "orderId": their_unpaid_order, "idempotencyKey": new_key()}),
        ),
        (
            format!("/api/coupons/{coupon}/issue"),
            json!({"userId": theirs, "idempotencyKey": new_key()}),
        ),
    ] {
        let (status, problem) = post_with(&app, &me, &path, &body).await;
        assert_eq!(
            (status, problem["code"].as_str()),
            (StatusCode::NOT_FOUND, Some("USER_NOT_FOUND")),
            "{path}"
        );
    }
    // Their payment's refund and their order's cancellation look like missing ones.
    for (theirs_path, missing_path, body) in [
        (
            format!("/api/payments/{their_payment}/refunds"),
            format!("/api/payments/{missing}/refunds"),
            json!({"amount": 100, "idempotencyKey": "k-1"}),
        ),
        (
            format!("/api/orders/{their_unpaid_order}/cancel"),
            format!("/api/orders/{missing}/cancel"),
            json!({}),
        ),
    ] {
        let mine_answer = post_with(&app, &me, &theirs_path, &body).await;
        let admin_answer = post_with(&app, &admin, &missing_path, &body).await;
        assert_eq!(mine_answer.0, StatusCode::NOT_FOUND, "{theirs_path}");
        assert_eq!(
            mine_answer, admin_answer,
            "{theirs_path} must look like {missing_path}"
        );
    }
    let order = app.get(&format!("/api/orders/{their_unpaid_order}")).await;
    assert_eq!(order.json::<Value>().await.unwrap()["status"], "PENDING");
    // Their order with my user id: the order is not mine.
    let (status, problem) = post_with(
        &app,
        &me,
        "/api/payments",
        &json!({"userId": mine, "orderId": their_unpaid_order, "idempotencyKey": new_key()}),
    )
    .await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("ORDER_NOT_FOUND"))
    );
    let (status, problem) = post_with(&app, &me, "/api/users", &json!({})).await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("FORBIDDEN"))
    );
    let (status, problem) = post_with(
        &app,
        &me,
        "/api/coupons",
        &json!({"name": "MINE", "discount": 500, "totalQuantity": 10}),
    )
    .await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("FORBIDDEN"))
    );
    // A coupon is no one's: any user reads it, and is issued one for itself.
    let (status, _) = get_with(&app, &me, &format!("/api/coupons/{coupon}")).await;
    assert_eq!(status, StatusCode::OK);
    let (status, issued) = post_with(
        &app,
        &me,
        &format!("/api/coupons/{coupon}/issue"),
        &json!({"userId": mine, "idempotencyKey": new_key()}),
    )
    .await;
    assert_eq!(
        (status, issued["userId"].as_i64()),
        (StatusCode::OK, Some(mine))
    );
    assert_eq!(app.balance(theirs).await, 49_000, "nothing of theirs moved");

    // My own resources work.
    let (status, body) = get_with(&app, &me, &format!("/api/users/{mine}/balance")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        serde_json::from_slice::<Value>(&body).unwrap()["balance"],
        50_000
    );
    let (status, order) = post_with(
        &app,
        &me,
        "/api/orders",
        &json!({"userId": mine, "amount": 2_000}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, payment) = post_with(
        &app,
        &me,
        "/api/payments",
        &json!({"userId": mine, "orderId": order["orderId"], "idempotencyKey": new_key()}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{payment}");
    let (status, _) = get_with(
        &app,
        &me,
        &format!("/api/payments/{}", payment["paymentId"]),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = post_with(
        &app,
        &me,
        &format!("/api/users/{mine}/balance/charge"),
        &json!({"amount": 100, "idempotencyKey": new_key()}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(app.balance(mine).await, 48_100);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_scope_acts_for_every_user() {
    let app = spawn(true).await;
    let user = app.user_with(1_000).await;
    let admin = client_with(&hs256(
        &json!({"scope": "openid balance:admin", "exp": now() + 600}),
    ));
    let (status, created) = post_with(&app, &admin, "/api/users", &json!({})).await;
    assert_eq!(status, StatusCode::CREATED);
    assert!(created["userId"].as_i64().is_some());
    let (status, _) = get_with(&app, &admin, &format!("/api/users/{user}/balance")).await;
    assert_eq!(status, StatusCode::OK);
    // A scope that only contains the word is not the scope.
    let almost = client_with(&hs256(
        &json!({"scope": "balance:admin2 xbalance:admin", "exp": now() + 600}),
    ));
    let (status, _) = post_with(&app, &almost, "/api/users", &json!({})).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    app.stop().await;
}

/// A JWT header and claims signed with HS256 by hand, for the headers the library refuses
/// to write (`alg: none`).
fn unsigned(header: &Value, claims: &Value) -> String {
    use base64_url::encode;
    format!(
        "{}.{}.",
        encode(&serde_json::to_vec(header).unwrap()),
        encode(&serde_json::to_vec(claims).unwrap())
    )
}

mod base64_url {
    /// Base64url without padding (RFC 7515 §2), enough for test tokens.
    pub fn encode(bytes: &[u8]) -> String {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
            for i in 0..=chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        out
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_are_401() {
    let app = spawn(true).await;
    let user = app.user_with(1_000).await;
    let sub = user.to_string();
    let path = format!("/api/users/{user}/balance");
    let forged = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": sub, "exp": now() + 600}),
        &EncodingKey::from_secret(b"another-secret-of-at-least-32-bytes!!!").unwrap(),
    )
    .unwrap();
    let hs384 = jsonwebtoken::encode(
        &Header::new(Algorithm::HS384),
        &json!({"sub": sub, "exp": now() + 600}),
        &EncodingKey::from_secret(SECRET).unwrap(),
    )
    .unwrap();
    let valid = user_token(user);
    let (head, rest) = valid.split_once('.').unwrap();
    let (_, signature) = rest.split_once('.').unwrap();
    let tampered_claims = format!(
        "{head}.{}.{signature}",
        base64_url::encode(&serde_json::to_vec(&json!({"sub": sub, "exp": now() + 6000})).unwrap())
    );
    let cases = [
        (
            "expired past the leeway",
            hs256(&json!({"sub": sub, "exp": now() - 120})),
        ),
        ("no exp", hs256(&json!({"sub": sub}))),
        (
            "exp as a string",
            hs256(&json!({"sub": sub, "exp": (now() + 600).to_string()})),
        ),
        (
            "not yet valid",
            hs256(&json!({"sub": sub, "exp": now() + 600, "nbf": now() + 300})),
        ),
        ("forged signature", forged),
        ("claims changed after signing", tampered_claims),
        (
            "alg none",
            unsigned(
                &json!({"alg": "none", "typ": "JWT"}),
                &json!({"sub": sub, "exp": now() + 600}),
            ),
        ),
        (
            "alg None",
            unsigned(
                &json!({"alg": "None"}),
                &json!({"sub": sub, "exp": now() + 600}),
            ),
        ),
        ("another HMAC algorithm", hs384),
        (
            "no sub and no admin scope",
            hs256(&json!({"exp": now() + 600, "scope": "read"})),
        ),
        (
            "sub not a user id",
            hs256(&json!({"sub": "alice", "exp": now() + 600})),
        ),
        ("sub zero", hs256(&json!({"sub": "0", "exp": now() + 600}))),
        (
            "sub as a number",
            hs256(&json!({"sub": user, "exp": now() + 600})),
        ),
        ("not a JWT", "abc.def".to_owned()),
        (
            "the secret itself",
            String::from_utf8(SECRET.to_vec()).unwrap(),
        ),
    ];
    for (what, token) in cases {
        let res = client_with(&token)
            .get(app.url(&path))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED, "{what}");
        let (status, code, headers, body) = problem(res).await;
        assert_eq!(
            (status, code.as_str()),
            (StatusCode::UNAUTHORIZED, "UNAUTHORIZED"),
            "{what}: {body}"
        );
        assert_eq!(headers.get("www-authenticate").unwrap(), "Bearer");
    }
    // Inside the 30 s leeway: still accepted.
    let late = client_with(&hs256(&json!({"sub": sub, "exp": now() - 10})));
    assert_eq!(get_with(&app, &late, &path).await.0, StatusCode::OK);
    // Two Authorization headers are ambiguous, even if one is right.
    let res = Client::new()
        .get(app.url(&path))
        .header(AUTHORIZATION, format!("Bearer {valid}"))
        .header(AUTHORIZATION, "Bearer x")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    // No token at all.
    let res = Client::new().get(app.url(&path)).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    app.stop().await;
}

fn read_key(name: &str) -> Vec<u8> {
    std::fs::read(key_file(name)).unwrap()
}

async fn spawn_with_public_key(file: &str) -> TestApp {
    let mut cfg = config();
    cfg.api_token = Some(ADMIN_TOKEN.to_owned().into());
    cfg.auth_jwt_public_key_file = Some(key_file(file));
    spawn_with(cfg).await
}

/// A token over `claims` signed the way `signer` names.
fn sign(signer: &str, claims: &Value) -> String {
    let (algorithm, key) = match signer {
        "RS256" => (
            Algorithm::RS256,
            EncodingKey::from_rsa_pem(&read_key("rsa_private.pem")).unwrap(),
        ),
        "EdDSA" => (
            Algorithm::EdDSA,
            EncodingKey::from_ed_pem(&read_key("ed25519_private.pem")).unwrap(),
        ),
        // The classic swap: HS256 "signed" with a public key as the HMAC secret.
        "HS256 with the RSA public key" => (
            Algorithm::HS256,
            EncodingKey::from_secret(&read_key("rsa_public.pem")).unwrap(),
        ),
        "HS256 with the Ed25519 public key" => (
            Algorithm::HS256,
            EncodingKey::from_secret(&read_key("ed25519_public.pem")).unwrap(),
        ),
        other => panic!("no signer {other}"),
    };
    jsonwebtoken::encode(&Header::new(algorithm), claims, &key).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_keys_accept_their_own_algorithm_only() {
    for (key, accepted) in [("rsa_public.pem", "RS256"), ("ed25519_public.pem", "EdDSA")] {
        let app = spawn_with_public_key(key).await;
        let user = app.user_with(1_000).await;
        let path = format!("/api/users/{user}/balance");
        let claims = json!({"sub": user.to_string(), "exp": now() + 600});
        for signer in [
            "RS256",
            "EdDSA",
            "HS256 with the RSA public key",
            "HS256 with the Ed25519 public key",
        ] {
            let expected = if signer == accepted {
                StatusCode::OK
            } else {
                StatusCode::UNAUTHORIZED
            };
            let client = client_with(&sign(signer, &claims));
            assert_eq!(
                get_with(&app, &client, &path).await.0,
                expected,
                "{key}, {signer}"
            );
        }
        app.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audience_and_issuer_when_configured() {
    let mut cfg = config();
    cfg.auth_jwt_secret = Some(String::from_utf8(SECRET.to_vec()).unwrap().into());
    cfg.auth_jwt_audience = Some("balance".to_owned());
    cfg.auth_jwt_issuer = Some("https://id.example".to_owned());
    let app = spawn_with(cfg).await;
    let path = "/api/users/1/balance";
    let exp = now() + 600;
    let good =
        hs256(&json!({"sub": "1", "exp": exp, "aud": "balance", "iss": "https://id.example"}));
    // The user does not exist, but the token is accepted: 404, not 401.
    assert_eq!(
        get_with(&app, &client_with(&good), path).await.0,
        StatusCode::NOT_FOUND
    );
    for token in [
        hs256(&json!({"sub": "1", "exp": exp, "iss": "https://id.example"})),
        hs256(&json!({"sub": "1", "exp": exp, "aud": "other", "iss": "https://id.example"})),
        hs256(&json!({"sub": "1", "exp": exp, "aud": "balance"})),
        hs256(&json!({"sub": "1", "exp": exp, "aud": "balance", "iss": "https://evil.example"})),
    ] {
        assert_eq!(
            get_with(&app, &client_with(&token), path).await.0,
            StatusCode::UNAUTHORIZED
        );
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_token_guards_metrics_only() {
    let mut cfg = config();
    cfg.metrics_token = Some("metrics-token-0123456789abcdef0123456789".to_owned().into());
    let app = spawn_with(cfg).await;
    let open = Client::new();
    let (status, _) = get_with(&app, &open, "/metrics").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let res = open
        .get(app.url("/metrics"))
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    let (status, code, _, _) = problem(res).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::UNAUTHORIZED, "UNAUTHORIZED")
    );
    let (status, _) = get_with(
        &app,
        &client_with("metrics-token-0123456789abcdef0123456789"),
        "/metrics",
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    for path in ["/health/live", "/health/ready", "/api-docs/openapi.json"] {
        assert_eq!(
            get_with(&app, &open, path).await.0,
            StatusCode::OK,
            "{path}"
        );
    }
    // No API_TOKEN and no JWT key: the API itself is open.
    assert_eq!(
        get_with(&app, &open, "/api/users/1/balance").await.0,
        StatusCode::NOT_FOUND
    );
    app.stop().await;
}
