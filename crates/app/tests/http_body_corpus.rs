//! Every way of getting a request body wrong, on every route that reads one, answered
//! exactly as recorded in `golden/body_corpus.txt`: status, content type, and the problem's
//! code and detail. The file was written by the hand-written parser that the serde-derived request
//! types replaced, so this test is the proof that the change kept every answer, detail
//! text and precedence between two faults included. `BLESS_BODY_CORPUS=1` rewrites the
//! file (do that only for an intended change, and read the diff).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::fmt::Write as _;

use common::{Backend, TestApp};
use reqwest::header::HeaderValue;

const GOLDEN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/body_corpus.txt");

/// JSON and not JSON, cut off, repeated names, numbers past every range, bad UTF-8.
fn generic_bodies() -> Vec<Vec<u8>> {
    let mut bodies: Vec<Vec<u8>> = [
        &b""[..],
        b" ",
        b"\t\r\n",
        b"{",
        b"}",
        b"{}",
        b" {} ",
        b"{}x",
        b"{} {}",
        b"[]",
        b"[1",
        b"[1,2]x",
        b"1",
        b"1x",
        b"-",
        b"\"x\"",
        b"\"x",
        b"null",
        b"true",
        b"nul",
        b"{\"a\":1}x",
        b"\xff",
        b"{\"\xff\":1}",
        b"{\"a\":\"\xff\"}",
        b"\xef\xbb\xbf{}",
        b"{\"a\":1,\"a\":2}",
        b"{\"a\":1,\"a\":",
        b"{\"a\":1,\"a\":2,\"b\":",
        b"{\"a\":1,\"b\":2,\"a\"",
        b"{\"a\":1,\"a\":2,\"\xff\":1}",
        b"{\"a\":1e400}",
        b"{\"a\":{\"b\":1,\"b\":2}}",
        b"{\"a\":[1,2,}",
        b"{1:2}",
        b"{\"a\" 1}",
        b"{\"a\":01}",
        b"{\"a\":1,}",
        b"{\"amount\":1,\"amount\":",
        b"{\"amount\":1,\"amount\":1}",
        b"{\"idempotencyKey\":\"a\",\"idempotencyKey\":\"a\"}",
        b"{\"userId\":1,\"userId\":1}",
    ]
    .iter()
    .map(|b| b.to_vec())
    .collect();
    bodies.push("[".repeat(200).into_bytes());
    bodies.push(format!("{{\"a\":{}", "[".repeat(200)).into_bytes());
    bodies
}

const AMOUNTS: [&str; 21] = [
    "",
    "null",
    "0",
    "-1",
    "1",
    "1000000000",
    "1000000001",
    "9223372036854775807",
    "9223372036854775808",
    "18446744073709551616",
    "-9223372036854775808",
    "-9223372036854775809",
    "1.5",
    "10000.0",
    "1e3",
    "-0.0",
    "\"100\"",
    "true",
    "[]",
    "{}",
    "92233720368547758070",
];

const BODY_KEYS: [&str; 10] = [
    "",
    "null",
    "\"{K}\"",
    "\"\"",
    "\" sp\"",
    "42",
    "[]",
    "\"ключ\"",
    "\"{LONG}\"",
    "\"{MAX}\"",
];

const IDS: [&str; 11] = [
    "",
    "null",
    "{ID}",
    "0",
    "-1",
    "\"1\"",
    "1.5",
    "9223372036854775808",
    "999999",
    "true",
    "1e2",
];

/// `{"a":x,"b":y}` from `(name, raw value)` pairs; an empty value leaves the field out.
fn object(fields: &[(&str, &str)]) -> String {
    let inner: Vec<String> = fields
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| format!("\"{k}\":{v}"))
        .collect();
    format!("{{{}}}", inner.join(","))
}

/// One request of the corpus, as a template: `{U}` the user, `{ID}` the id field's own
/// valid value, `{K}` a key of its own, `{O}` a fresh order of `{U}`.
struct Case {
    path: String,
    content_type: Option<&'static str>,
    keys: Vec<&'static [u8]>,
    body: Vec<u8>,
}

fn case(path: &str, content_type: Option<&'static str>, body: impl Into<Vec<u8>>) -> Case {
    Case {
        path: path.to_owned(),
        content_type,
        keys: Vec::new(),
        body: body.into(),
    }
}

fn corpus() -> Vec<Case> {
    const JSON: Option<&str> = Some("application/json");
    let charge = "/api/users/{U}/balance/charge";
    let use_ = "/api/users/{U}/balance/use";
    let mut cases = Vec::new();
    let content_types = [
        JSON,
        None,
        Some("text/plain"),
        Some("application/merge-patch+json"),
        Some("application/json; charset=utf-8"),
        Some("Application/JSON"),
        Some("application/jsonx"),
        Some(""),
        Some("application/x-www-form-urlencoded"),
    ];
    // Every generic body under every content type, on the charge; as JSON elsewhere.
    for body in generic_bodies() {
        for ct in content_types {
            cases.push(case(charge, ct, body.clone()));
        }
        for path in [use_, "/api/orders", "/api/payments", "/api/users"] {
            cases.push(case(path, JSON, body.clone()));
        }
    }
    // A valid body under every content type, on every route.
    for ct in content_types {
        cases.push(case(charge, ct, r#"{"amount":1,"idempotencyKey":"{K}"}"#));
        cases.push(case("/api/orders", ct, r#"{"userId":{U},"amount":1}"#));
        cases.push(case(
            "/api/payments",
            ct,
            r#"{"orderId":{O},"userId":{U},"idempotencyKey":"{K}"}"#,
        ));
        cases.push(case("/api/users", ct, "{}"));
    }
    // Amount and key, every pair, on the charge; amounts alone on the use.
    for amount in AMOUNTS {
        for key in BODY_KEYS {
            let body = object(&[("amount", amount), ("idempotencyKey", key)]);
            cases.push(case(charge, JSON, body));
        }
        let body = object(&[("amount", amount), ("idempotencyKey", "\"{K}\"")]);
        cases.push(case(use_, JSON, body));
        // Unknown fields are ignored on a charge, even repeated ones are not.
        let body = object(&[
            ("amount", amount),
            ("idempotencyKey", "\"{K}\""),
            ("pad", "\"x\""),
        ]);
        cases.push(case(charge, JSON, body));
    }
    // The key in the header, alone, twice, or beside a body key.
    let headers: [&[&[u8]]; 8] = [
        &[],
        &[b"{K}"],
        &[b"{K}", b"{K}"],
        &[b"{K}", b"other"],
        &[b"\x80bad"],
        &[b""],
        &[b"has space"],
        &[b"other"],
    ];
    for keys in headers {
        for body_key in ["", "null", "\"{K}\"", "\"different\"", "42", "\"\""] {
            for amount in ["1", "\"x\"", ""] {
                let body = object(&[("amount", amount), ("idempotencyKey", body_key)]);
                for path in [charge, "/api/payments"] {
                    let body = if path == charge {
                        body.clone()
                    } else {
                        object(&[
                            ("orderId", if amount == "1" { "{O}" } else { amount }),
                            ("userId", "{U}"),
                            ("idempotencyKey", body_key),
                        ])
                    };
                    let mut c = case(path, JSON, body);
                    c.keys = keys.to_vec();
                    cases.push(c);
                }
            }
            let mut empty = case(charge, JSON, "");
            empty.keys = keys.to_vec();
            cases.push(empty);
        }
    }
    // Orders: user id and amount, every pair.
    for id in IDS {
        for amount in AMOUNTS {
            let body = object(&[("userId", &id.replace("{ID}", "{U}")), ("amount", amount)]);
            cases.push(case("/api/orders", JSON, body));
        }
    }
    // Payments: order id, user id and key.
    for order in IDS {
        for user in IDS {
            for key in ["\"{K}\"", "", "42"] {
                let body = object(&[
                    ("orderId", &order.replace("{ID}", "{O}")),
                    ("userId", &user.replace("{ID}", "{U}")),
                    ("idempotencyKey", key),
                ]);
                cases.push(case("/api/payments", JSON, body));
            }
        }
    }
    // New users: no field is accepted, `balance` least of all.
    for body in [
        r#"{"balance":1}"#,
        r#"{"balance":null}"#,
        r#"{"a":1}"#,
        r#"{"b":1,"a":2}"#,
        r#"{"a":1,"balance":1}"#,
        r#"{"zz":1,"balance":2}"#,
        r#"{"Balance":1}"#,
        r#"{"idempotencyKey":"x"}"#,
        r#"{"balance":1,"balance":1}"#,
        r#"{"x\"y":1}"#,
        r#"{"":1}"#,
        r#"{"é":1}"#,
    ] {
        cases.push(case("/api/users", JSON, body));
    }
    for ct in [JSON, None] {
        cases.push(case("/api/users", ct, ""));
    }
    // A bad path beside a bad body: the path is named first.
    for path in [
        "/api/users/abc/balance/charge",
        "/api/users/0/balance/use",
        "/api/users/999999/balance/charge",
    ] {
        for body in [
            &b"{"[..],
            b"{\"amount\":1}",
            b"{\"amount\":1,\"idempotencyKey\":\"{K}\"}",
        ] {
            cases.push(case(path, JSON, body.to_vec()));
            cases.push(case(path, Some("text/plain"), body.to_vec()));
        }
    }
    cases
}

/// Bytes as the golden file shows them: printable ASCII as is, anything else escaped.
fn shown(bytes: &[u8]) -> String {
    let mut out = String::new();
    for &b in bytes {
        if (0x20..0x7f).contains(&b) && b != b'\\' {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_body_fault_is_answered_as_recorded() {
    let app = TestApp::spawn(Backend::Memory).await.unwrap();
    let user = app.user_with(1_000_000).await;
    let mut lines = Vec::new();
    for (n, case) in corpus().into_iter().enumerate() {
        let key = format!("corpus-{n}");
        let order = if case.body.windows(3).any(|w| w == b"{O}") {
            app.create_order(user, 1).await.to_string()
        } else {
            String::new()
        };
        let fill = |bytes: &[u8]| -> Vec<u8> {
            // Only the templates are replaced, so arbitrary bytes go through untouched.
            let mut out = bytes.to_vec();
            for (from, to) in [
                ("{U}", user.to_string()),
                ("{O}", order.clone()),
                ("{K}", key.clone()),
                ("{LONG}", "k".repeat(256)),
                ("{MAX}", "~".repeat(255)),
            ] {
                let from = from.as_bytes();
                let mut replaced = Vec::with_capacity(out.len());
                let mut i = 0;
                while i < out.len() {
                    if out[i..].starts_with(from) {
                        replaced.extend_from_slice(to.as_bytes());
                        i += from.len();
                    } else {
                        replaced.push(out[i]);
                        i += 1;
                    }
                }
                out = replaced;
            }
            out
        };
        let path = String::from_utf8(fill(case.path.as_bytes())).unwrap();
        let mut req = app.client.post(app.url(&path)).body(fill(&case.body));
        if let Some(ct) = case.content_type {
            req = req.header("content-type", ct);
        }
        for k in &case.keys {
            req = req.header(
                "idempotency-key",
                HeaderValue::from_bytes(&fill(k)).unwrap(),
            );
        }
        let res = req.send().await.unwrap();
        let status = res.status().as_u16();
        let content_type = res
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let body = res.bytes().await.unwrap();
        // A problem by its code and detail: its type, title and status follow from the code.
        let answer = if (200..300).contains(&status) {
            String::new()
        } else {
            let problem: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(problem["status"], status, "{problem}");
            format!(
                "{} {}",
                problem["code"].as_str().unwrap(),
                problem["detail"]
            )
        };
        let keys: Vec<String> = case.keys.iter().map(|k| shown(k)).collect();
        lines.push(format!(
            "POST {} ct={} keys=[{}] body={} -> {status} {content_type} {answer}",
            case.path,
            case.content_type.map_or("-".to_owned(), shown_str),
            keys.join(","),
            shown(&case.body),
        ));
    }
    let got = lines.join("\n") + "\n";
    if std::env::var_os("BLESS_BODY_CORPUS").is_some() {
        std::fs::create_dir_all(std::path::Path::new(GOLDEN).parent().unwrap()).unwrap();
        std::fs::write(GOLDEN, &got).unwrap();
    } else {
        let want = std::fs::read_to_string(GOLDEN).unwrap();
        let differing: Vec<String> = want
            .lines()
            .zip(got.lines())
            .filter(|(w, g)| w != g)
            .take(20)
            .map(|(w, g)| format!("want {w}\n got {g}"))
            .collect();
        assert!(
            differing.is_empty() && want.lines().count() == got.lines().count(),
            "{} of {} answers differ from {GOLDEN} (first 20):\n{}",
            want.lines()
                .zip(got.lines())
                .filter(|(w, g)| w != g)
                .count(),
            got.lines().count(),
            differing.join("\n")
        );
    }
    app.stop().await;
}

fn shown_str(s: &str) -> String {
    shown(s.as_bytes())
}

/// Sends `head` and then `body` on a fresh connection, and reads until the service closes
/// it or 10 s pass; the answer's text.
async fn raw(app: &TestApp, head: &str, body: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(app.base.trim_start_matches("http://"))
        .await
        .unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    // The service may answer and close before the whole body is written.
    let _ = stream.write_all(body).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        stream.read_to_end(&mut answer),
    )
    .await;
    String::from_utf8_lossy(&answer).into_owned()
}

/// 413 from the declared length, before a byte of the body is there; and while reading a
/// chunked body, which declares none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_large_by_declaration_and_while_reading_chunks() {
    let app = TestApp::spawn(Backend::Memory).await.unwrap();
    let user = app.user_with(1_000).await;
    let path = format!("/api/users/{user}/balance/charge");
    // Declared: no body follows, yet the answer comes (the 10 s deadline would give 408).
    let started = std::time::Instant::now();
    let answer = raw(
        &app,
        &format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nIdempotency-Key: big\r\nConnection: close\r\nContent-Length: 16385\r\n\r\n"),
        b"",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("\"PAYLOAD_TOO_LARGE\""), "{answer}");
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    // Chunked: two chunks of 9000 bytes.
    let chunk = format!("{:x}\r\n{}\r\n", 9000, " ".repeat(9000));
    let answer = raw(
        &app,
        &format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nIdempotency-Key: big\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n"),
        format!("{chunk}{chunk}0\r\n\r\n").as_bytes(),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(
        answer.contains("the request body must not exceed 16384 bytes"),
        "{answer}"
    );
    // A chunked body within the limit is read whole.
    let body = br#"{"amount":5,"idempotencyKey":"chunked"}"#;
    let answer = raw(
        &app,
        &format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n"),
        format!("{:x}\r\n{}\r\n0\r\n\r\n", body.len(), String::from_utf8_lossy(body)).as_bytes(),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(app.balance(user).await, 1_005);
    app.stop().await;
}
