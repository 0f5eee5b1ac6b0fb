//! The HTTP answer when the database aborts a balance change: a write waiting on a row
//! lock that another session holds has its statement killed (`KILL QUERY`) every time it
//! waits. The answer is 503 `SERVICE_UNAVAILABLE` with `Retry-After`, never a 500, nothing
//! is written, and the client's retry with the same key applies the change exactly once.
//! Skipped (saying so) without MySQL and Redis.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[macro_use]
mod common;

use std::time::{Duration, Instant};

use common::{Backend, TestApp, bytes, problem};
use reqwest::StatusCode;
use sqlx::{AssertSqlSafe, Connection, MySqlConnection};

const PATIENCE: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_balance_change_whose_statement_is_killed_answers_503_with_retry_after() {
    let Some(app) = TestApp::spawn(Backend::Real).await else {
        return;
    };
    let db = app.db.as_ref().unwrap();
    let user = app.user_with(1_000).await;

    let mut holder = db.hold_user_row(user).await;

    let request = {
        let (client, url) = (
            app.client.clone(),
            app.url(&format!("/api/users/{user}/balance/use")),
        );
        tokio::spawn(async move {
            client
                .post(url)
                .header("Idempotency-Key", "killed-use")
                .json(&serde_json::json!({ "amount": 300 }))
                .send()
                .await
                .unwrap()
        })
    };

    // Every time the write waits on the held lock, its statement is killed, until the
    // request is answered.
    let mut admin = MySqlConnection::connect(&db.url).await.unwrap();
    let started = Instant::now();
    let mut kills = 0;
    while !request.is_finished() {
        assert!(started.elapsed() < PATIENCE, "the request was not answered");
        let waiting: Option<(u64,)> = sqlx::query_as(
            "select cast(id as unsigned) from information_schema.processlist \
             where db = ? and info like 'update users set balance%' limit 1",
        )
        .bind(&db.name)
        .fetch_optional(&mut admin)
        .await
        .unwrap();
        if let Some((id,)) = waiting {
            sqlx::query(AssertSqlSafe(format!("kill query {id}")))
                .execute(&mut admin)
                .await
                .unwrap();
            kills += 1;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(kills >= 1);
    let (status, code, headers, _) = problem(request.await.unwrap()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(code, "SERVICE_UNAVAILABLE");
    assert!(headers.get("retry-after").is_some(), "{headers:?}");

    sqlx::raw_sql("commit").execute(&mut holder).await.unwrap();
    assert_eq!(app.balance(user).await, 1_000, "nothing was written");

    // The client's retry with the same key applies it once; a repeat replays it.
    let (status, replayed, first) = bytes(app.use_balance(user, 300, "killed-use").await).await;
    assert_eq!((status, replayed), (StatusCode::OK, false));
    let (status, replayed, again) = bytes(app.use_balance(user, 300, "killed-use").await).await;
    assert_eq!((status, replayed), (StatusCode::OK, true));
    assert_eq!(first, again);
    assert_eq!(app.balance(user).await, 700);
    app.assert_books_reconcile().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_after_the_database_killed_every_connection_succeed() {
    let Some(app) = TestApp::spawn(Backend::Real).await else {
        return;
    };
    let db = app.db.as_ref().unwrap();
    let user = app.user_with(1_000).await;
    // Several requests at once, so the pool holds several connections.
    let path = format!("/api/users/{user}/balance");
    let reads: Vec<_> = (0..6).map(|_| app.get(&path)).collect();
    for read in futures::future::join_all(reads).await {
        assert_eq!(read.status(), StatusCode::OK);
    }

    let mut admin = MySqlConnection::connect(&db.url).await.unwrap();
    let victims: Vec<(u64,)> = sqlx::query_as(
        "select cast(id as unsigned) from information_schema.processlist \
         where db = ? and id <> connection_id()",
    )
    .bind(&db.name)
    .fetch_all(&mut admin)
    .await
    .unwrap();
    assert!(!victims.is_empty());
    for (id,) in &victims {
        sqlx::query(AssertSqlSafe(format!("kill {id}")))
            .execute(&mut admin)
            .await
            .unwrap();
    }

    // One after the other: each would meet a dead pooled connection.
    for round in 0..victims.len() + 1 {
        let read = app.get(&format!("/api/users/{user}/balance")).await;
        assert_eq!(read.status(), StatusCode::OK, "read {round}");
    }
    let (status, replayed, _) = bytes(app.charge(user, 5, "after-the-kill").await).await;
    assert_eq!((status, replayed), (StatusCode::OK, false));
    assert_eq!(app.balance(user).await, 1_005);
    app.stop().await;
}
