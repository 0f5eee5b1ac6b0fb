//! `balance-service audit` with the default retention (a day) on books written by a
//! service that ran with `IDEMPOTENCY_TTL_SECS=60` and reused keys after they expired: the
//! books reconcile (exit 0), because each ledger entry is judged by its own record's
//! expiry. Skipped (saying so) without MySQL.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use domain::ports::{Clock, UserRepo};
use domain::types::{Amount, Balance, IdempotencyKey, UserId};
use domain::{BalanceService, Charge, Ports, Settings};
use http_actix::JsonEncoder;
use serde_json::Value;
use testkit::TestDatabase;

const SERVICE_TTL: Duration = Duration::from_secs(60);

struct ManualClock(Mutex<DateTime<Utc>>);

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.0.lock().unwrap()
    }
}

#[tokio::test]
async fn the_audit_cli_with_the_default_retention_accepts_keys_reused_after_a_shorter_one() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let store = db.store();
    // In the past, so that by the audit every record written has expired, as in production.
    let start = Utc::now() - chrono::Duration::minutes(10);
    let start = Utc.timestamp_millis_opt(start.timestamp_millis()).unwrap();
    let clock = Arc::new(ManualClock(Mutex::new(start)));
    let service = BalanceService::new(
        Ports {
            users: Arc::new(store.clone()),
            orders: Arc::new(store.clone()),
            coupons: Arc::new(store.clone()),
            keys: Arc::new(store.clone()),
            store: Arc::new(store.clone()),
            locks: Arc::new(memory::InProcessLockManager::new()),
            encoder: Arc::new(JsonEncoder),
            clock: Arc::clone(&clock) as Arc<dyn Clock>,
            gate: None,
        },
        Settings {
            idempotency_ttl: SERVICE_TTL,
            ..Settings::default()
        },
    );
    store
        .seed_users(1, Balance::from_stored(0), start)
        .await
        .unwrap();
    let user = UserId::new(1).unwrap();
    for _ in 0..3 {
        let done = service
            .execute(Arc::new(Charge {
                user,
                amount: Amount::from_stored(10),
                key: IdempotencyKey::parse("reused-after-expiry").unwrap(),
            }))
            .await
            .unwrap();
        assert!(!done.replayed);
        *clock.0.lock().unwrap() +=
            chrono::Duration::from_std(SERVICE_TTL).unwrap() + chrono::Duration::seconds(1);
    }

    let output = tokio::task::spawn_blocking({
        let url = db.url.clone();
        move || {
            Command::new(env!("CARGO_BIN_EXE_balance-service"))
                .args(["audit", "--json"])
                .env_clear()
                .env("RUST_LOG", "warn")
                .env("DATABASE_URL", url)
                .stdin(Stdio::null())
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let report: Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "not a JSON report ({e}): {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    });
    assert_eq!(output.status.code(), Some(0), "{report:#}");
    assert_eq!(report["clean"], true, "{report:#}");
    db.cleanup().await;
}
