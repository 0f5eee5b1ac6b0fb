//! The audit of the books from the outside: the gauges `serve` keeps on `/metrics`, and
//! `balance-service audit` with its report and exit status.
//!
//! The gauges are process-wide (one Prometheus recorder), so the one test that reads them
//! runs its apps one after the other; the command-line tests run the binary as a child
//! process and share nothing. The MySQL parts are skipped (saying so) without a server.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[macro_use]
mod common;

use std::process::{Command, Output};
use std::time::Duration;

use common::{Backend, TestApp, config};
use domain::ports::{AuditCheck, UserRepo};
use domain::types::Balance;
use serde_json::Value;

/// The value of the gauge line `name{labels}` (or `name`), if the scrape has it.
fn gauge(scrape: &str, series: &str) -> Option<f64> {
    scrape.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        value.trim().parse().ok()
    })
}

fn breaches_series(check: AuditCheck) -> String {
    format!("balance_audit_breaches{{check=\"{}\"}}", check.name())
}

/// Scrapes until `done` holds for the scrape (bounded), and returns that scrape.
async fn scrape_until(app: &TestApp, what: &str, done: impl Fn(&str) -> bool) -> String {
    for _ in 0..100 {
        let scrape = app.get("/metrics").await.text().await.unwrap();
        if done(&scrape) {
            return scrape;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("/metrics never showed {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_audits_periodically_and_shows_the_breaches_on_metrics() {
    let started = chrono::Utc::now().timestamp() as f64;

    // In memory: real operations, every check at 0.
    let mut cfg = config();
    cfg.audit_interval_secs = 1;
    let app = TestApp::spawn_with_config(Backend::Memory, cfg)
        .await
        .unwrap();
    let user = app.user_with(1_000).await;
    assert_eq!(app.use_balance(user, 300, "k-use").await.status(), 200);
    let scrape = scrape_until(&app, "a finished audit", |s| {
        gauge(s, "balance_audit_last_run_timestamp_seconds").is_some_and(|t| t >= started)
    })
    .await;
    for check in AuditCheck::ALL {
        assert_eq!(
            gauge(&scrape, &breaches_series(check)),
            Some(0.0),
            "{check:?} in\n{scrape}"
        );
    }
    assert!(
        scrape.contains("# HELP balance_audit_breaches "),
        "{scrape}"
    );
    assert!(
        scrape.contains("# TYPE balance_audit_breaches gauge"),
        "{scrape}"
    );
    app.stop().await;

    // On MySQL: a bumped balance shows as one breach of its check, within a run or two.
    let mut cfg = config();
    cfg.audit_interval_secs = 1;
    let Some(app) = TestApp::spawn_with_config(Backend::Real, cfg).await else {
        return;
    };
    let user = app.user_with(1_000).await;
    let scrape = scrape_until(&app, "a clean audit of MySQL", |s| {
        gauge(s, &breaches_series(AuditCheck::BalanceMatchesLedger)) == Some(0.0)
    })
    .await;
    assert!(gauge(&scrape, "balance_audit_last_run_timestamp_seconds").is_some());
    sqlx::query("update users set balance = balance + 1 where id = ?")
        .bind(user)
        .execute(app.db.as_ref().unwrap().pool())
        .await
        .unwrap();
    let scrape = scrape_until(&app, "the breach", |s| {
        gauge(s, &breaches_series(AuditCheck::BalanceMatchesLedger)) == Some(1.0)
    })
    .await;
    for check in AuditCheck::ALL
        .into_iter()
        .filter(|c| *c != AuditCheck::BalanceMatchesLedger)
    {
        assert_eq!(
            gauge(&scrape, &breaches_series(check)),
            Some(0.0),
            "{check:?}"
        );
    }
    let report = app.audit().await;
    assert_eq!(report.total_found(), 1);
    assert_eq!(report.breaches[0].subject, format!("user {user}"));
    app.stop().await;
}

// ---------------------------------------------------------------------------------------
// balance-service audit
// ---------------------------------------------------------------------------------------

/// Runs `balance-service audit <args>` with no configuration from the environment.
async fn run_audit(database_url: Option<&str>, args: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_balance-service"));
    command
        .env_clear()
        .env("RUST_LOG", "warn")
        .arg("audit")
        .args(args);
    if let Some(url) = database_url {
        command.env("DATABASE_URL", url);
    }
    tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test]
async fn audit_without_a_database_exits_2_and_says_why() {
    let out = run_audit(None, &[]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
    assert!(
        text(&out.stderr).contains("audit needs DATABASE_URL"),
        "{}",
        text(&out.stderr)
    );
}

#[tokio::test]
async fn audit_of_an_unreachable_database_exits_2() {
    let out = run_audit(Some("mysql://root@127.0.0.1:1/none"), &["--json"]).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(out.stdout.is_empty(), "{}", text(&out.stdout));
    assert!(
        text(&out.stderr).contains("could not audit the database"),
        "{}",
        text(&out.stderr)
    );
}

#[tokio::test]
async fn audit_of_clean_and_broken_books_exits_0_then_1() {
    let Some(db) = testkit::TestDatabase::create().await else {
        return;
    };
    db.store()
        .seed_users(3, Balance::from_stored(1_000), chrono::Utc::now())
        .await
        .unwrap();

    let out = run_audit(Some(&db.url), &[]).await;
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.contains("looked at 3 users, 3 ledger entries,"),
        "{stdout}"
    );
    assert!(stdout.ends_with("CLEAN: every check passed\n"), "{stdout}");

    sqlx::query("update users set balance = balance + 1 where id = 2")
        .execute(db.pool())
        .await
        .unwrap();
    let out = run_audit(Some(&db.url), &[]).await;
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout
            .lines()
            .any(|line| line.starts_with("balance_matches_ledger ") && line.ends_with("  1 breach")),
        "{stdout}"
    );
    assert!(
        stdout.contains("    user 2: balance 1001, ledger sum 1000 over 1 entries"),
        "{stdout}"
    );
    assert!(
        stdout
            .lines()
            .any(|line| line.starts_with("record_has_one_effect ") && line.ends_with("  OK")),
        "{stdout}"
    );
    assert!(stdout.ends_with("NOT CLEAN: 1 breach\n"), "{stdout}");

    let out = run_audit(Some(&db.url), &["--json"]).await;
    assert_eq!(out.status.code(), Some(1));
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["clean"], false);
    assert_eq!(json["totalBreaches"], 1);
    assert_eq!(json["counts"]["users"], 3);
    assert_eq!(json["checks"][0]["check"], "balance_matches_ledger");
    assert_eq!(json["checks"][0]["listed"][0]["subject"], "user 2");
    db.cleanup().await;
}
