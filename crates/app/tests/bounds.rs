//! Bounded resources: a body that trickles, the connection cap, metric labels a client
//! cannot grow, HEAD wherever GET answers, and settings refused at start when out of range.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{Backend, TestApp, config};
use reqwest::StatusCode;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

async fn connect(app: &TestApp) -> TcpStream {
    TcpStream::connect(app.base.trim_start_matches("http://"))
        .await
        .unwrap()
}

/// Reads one response head (up to the blank line) and its `Content-Length` body.
async fn read_response(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = stream.read(&mut byte).await.unwrap();
        assert_eq!(n, 1, "connection closed inside a response head: {head:?}");
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    let length = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse::<usize>().unwrap())
        })
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).await.unwrap();
    format!("{head}{}", String::from_utf8_lossy(&body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_does_not_arrive_in_time_is_408_and_closes() {
    let app = TestApp::spawn(Backend::Memory).await.unwrap();
    let user = app.user_with(1_000).await;
    let mut stream = connect(&app).await;
    stream
        .write_all(
            format!(
                "POST /api/users/{user}/balance/charge HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 64\r\n\r\n{{\"amount\""
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    // The service still answers others meanwhile.
    let mut other = connect(&app).await;
    other
        .write_all(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let live = read_response(&mut other).await;
    assert!(live.starts_with("HTTP/1.1 200"), "{live}");
    // The client keeps trickling a byte now and then; the service must not wait for ever.
    let (mut read, mut write) = stream.into_split();
    let trickle = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if write.write_all(b" ").await.is_err() {
                return;
            }
        }
    });
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), read.read_to_end(&mut answer))
        .await
        .expect("the service answers a trickled body within its deadline and closes")
        .unwrap();
    trickle.abort();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("application/problem+json"), "{answer}");
    assert!(answer.contains("\"REQUEST_TIMEOUT\""), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );
    assert!(
        answer.to_ascii_lowercase().contains("x-request-id"),
        "{answer}"
    );
    // The read loop above ended on EOF: the service closed the connection.
    assert_eq!(app.balance(user).await, 1_000);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invented_methods_do_not_grow_the_metrics() {
    let app = TestApp::spawn(Backend::Memory).await.unwrap();
    for i in 0..200 {
        let method = format!("X{i:04}{}", uuid::Uuid::new_v4().simple());
        let mut stream = connect(&app).await;
        stream
            .write_all(
                format!(
                    "{method} /api/users/1/balance HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                )
                .as_bytes(),
            )
            .await
            .unwrap();
        let answer = read_response(&mut stream).await;
        assert!(answer.starts_with("HTTP/1.1 405"), "{answer}");
    }
    let text = app.get("/metrics").await.text().await.unwrap();
    let allowed = [
        "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "OTHER",
    ];
    let mut methods = std::collections::BTreeSet::new();
    for line in text
        .lines()
        .filter(|l| l.starts_with("http_requests_total{"))
    {
        let method = line
            .split("method=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .unwrap();
        methods.insert(method.to_owned());
        // Routes are patterns, never raw paths.
        assert!(!line.contains("/api/users/1/"), "{line}");
    }
    assert!(methods.contains("OTHER"), "{methods:?}");
    assert!(
        methods.iter().all(|m| allowed.contains(&m.as_str())),
        "unbounded method labels: {methods:?}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_answers_wherever_get_does() {
    let app = TestApp::spawn(Backend::Memory).await.unwrap();
    let user = app.user_with(1_000).await;
    let order = app.create_order(user, 100).await;
    for path in [
        format!("/api/users/{user}/balance"),
        format!("/api/users/{user}/balance/history"),
        format!("/api/orders/{order}"),
        "/health/live".to_owned(),
        "/health/ready".to_owned(),
        "/metrics".to_owned(),
    ] {
        let get = app.get(&path).await.status();
        let head = app.client.head(app.url(&path)).send().await.unwrap();
        assert_eq!(head.status(), get, "{path}");
        assert_eq!(head.status(), StatusCode::OK, "{path}");
        assert!(head.bytes().await.unwrap().is_empty(), "{path}");
    }
    let res = app
        .client
        .delete(app.url(&format!("/api/users/{user}/balance")))
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers().get("allow").unwrap(), "GET, HEAD");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_cap_wait_for_a_free_one() {
    let mut cfg = config();
    cfg.http_workers = Some(1);
    cfg.max_connections = 2;
    let app = TestApp::spawn_with_config(Backend::Memory, cfg)
        .await
        .unwrap();
    let request = b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut first = connect(&app).await;
    let mut second = connect(&app).await;
    for stream in [&mut first, &mut second] {
        stream.write_all(request).await.unwrap();
        assert!(read_response(stream).await.starts_with("HTTP/1.1 200"));
    }
    // Both kept alive: a third connection is accepted by the kernel but not served...
    let mut third = connect(&app).await;
    third.write_all(request).await.unwrap();
    let early = tokio::time::timeout(Duration::from_millis(500), read_response(&mut third)).await;
    assert!(
        early.is_err(),
        "a connection past MAX_CONNECTIONS was served"
    );
    // ...until one of the first two goes.
    drop(first);
    let answer = tokio::time::timeout(Duration::from_secs(10), read_response(&mut third))
        .await
        .expect("served once a connection is free");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    app.stop().await;
}

/// Requests actix-http refuses while parsing, before any of our code runs: it answers them
/// itself (empty body, no `X-Request-Id`) and closes; docs/operations.md says so. Pinned
/// here so that a change of that behaviour is seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parser_level_rejections_close_the_connection() {
    let app = TestApp::spawn(Backend::Memory).await.unwrap();
    let many: String = (0..200).map(|i| format!("X-H{i}: v\r\n")).collect();
    for (request, status) in [
        (format!("GET /health/live HTTP/1.1\r\nHost: x\r\n{many}\r\n"), "431"),
        ("POST /api/users HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n".to_owned(), "400"),
        ("POST /api/users HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_owned(), "400"),
        ("GARBAGE\r\n\r\n".to_owned(), "400"),
    ] {
        let mut stream = connect(&app).await;
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
            .await
            .expect("answered and closed")
            .unwrap();
        let answer = String::from_utf8_lossy(&answer).to_ascii_lowercase();
        assert!(answer.starts_with(&format!("http/1.1 {status}")), "{answer}");
        assert!(answer.contains("connection: close"), "{answer}");
    }
    app.stop().await;
}

/// Runs the binary with one setting out of range: it must refuse to start and name it.
#[tokio::test]
async fn settings_out_of_range_stop_the_service_at_start() {
    for (variable, value) in [
        ("LOCK_LEASE_MS", "18446744073709551615"),
        ("LOCK_LEASE_MS", "0"),
        ("LOCK_WAIT_MS", "99999999999"),
        ("OPTIMISTIC_RETRIES", "4000000000"),
        ("IDEMPOTENCY_TTL_SECS", "0"),
        ("IDEMPOTENCY_TTL_SECS", "18446744073709551615"),
        ("MAX_AMOUNT", "0"),
        ("MAX_BALANCE", "9223372036854775807"),
        ("DB_MAX_CONNECTIONS", "0"),
        ("DB_MAX_CONNECTIONS", "100000"),
        ("HTTP_WORKERS", "100000"),
        ("SHUTDOWN_TIMEOUT_SECS", "18446744073709551615"),
        ("AUDIT_INTERVAL_SECS", "18446744073709551615"),
        ("MAX_CONNECTIONS", "0"),
        ("SEED_USERS", "4000000000"),
        ("AUTH_JWT_SECRET", "too-short"),
        ("API_TOKEN", ""),
        ("API_TOKEN", "guessable"),
        ("METRICS_TOKEN", "guessable"),
    ] {
        assert_refused_at_start(variable, value).await;
    }
    // A private key where the public one belongs.
    let private = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/keys/rsa_private.pem");
    assert_refused_at_start("AUTH_JWT_PUBLIC_KEY_FILE", private).await;
}

async fn assert_refused_at_start(variable: &str, value: &str) {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_balance-service"))
        .env_clear()
        .env("BIND_ADDR", "127.0.0.1:0")
        .env(variable, value)
        .stdin(Stdio::null())
        .output();
    let output = tokio::time::timeout(Duration::from_secs(30), output)
        .await
        .expect("refused at once, not served")
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{variable}={value} started");
    assert!(
        stderr.contains(variable),
        "{variable}={value}: the message does not name the variable: {stderr}"
    );
}

/// The binary raises its open-file limit at start and logs what it got.
#[tokio::test]
async fn the_open_file_limit_is_raised_and_logged() {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_balance-service"))
        .env_clear()
        .env("BIND_ADDR", "127.0.0.1:0")
        .env("SEED_USERS", "0")
        .env("LOG_FORMAT", "json")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut limit = None;
    let found = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains("open-file limit") || line.contains("open_files") {
                limit = Some(line.clone());
            }
            if line.contains("listening") {
                return;
            }
        }
    })
    .await;
    child.kill().await.unwrap();
    assert!(found.is_ok(), "the service never said it was listening");
    let line = limit.expect("a log line about the open-file limit");
    let value: serde_json::Value = serde_json::from_str(&line).unwrap();
    let open_files = value["fields"]["open_files"].as_u64().unwrap();
    let hard = rlimit_hard();
    assert_eq!(open_files, hard, "raised to the hard limit: {line}");
}

/// This process's hard limit on open files, which the child inherits.
fn rlimit_hard() -> u64 {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let hard = line.split_whitespace().nth(4).unwrap();
    if hard == "unlimited" {
        u64::MAX
    } else {
        hard.parse().unwrap()
    }
}
