//! The audit judges a key's reuse by the expiry its record was written with, not by the
//! auditing process's retention setting: the in-memory store, as the MySQL one
//! (crates/mysql-repo/tests/retention.rs).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use domain::idempotency::StoredResponse;
use domain::outcome::Outcome;
use domain::ports::{AuditCheck, Auditor, Clock, ResponseEncoder, UserRepo};
use domain::types::{Amount, Balance, IdempotencyKey, UserId};
use domain::{BalanceService, Charge, Operation, Ports, Settings};
use memory::MemoryStore;

/// The service's retention in this test: much shorter than the auditor's default.
const SERVICE_TTL: Duration = Duration::from_secs(60);

struct ManualClock(Mutex<DateTime<Utc>>);

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.0.lock().unwrap()
    }
}

impl ManualClock {
    fn advance(&self, by: Duration) {
        let mut now = self.0.lock().unwrap();
        *now += chrono::Duration::from_std(by).unwrap();
    }
}

struct DebugEncoder;

impl ResponseEncoder for DebugEncoder {
    fn encode(&self, outcome: &Outcome) -> StoredResponse {
        StoredResponse {
            status: 200,
            body: format!("{outcome:?}").into_bytes(),
        }
    }
}

fn charge(user: UserId, key: &str) -> Arc<dyn Operation> {
    Arc::new(Charge {
        user,
        amount: Amount::new(10, &Settings::default().limits).unwrap(),
        key: IdempotencyKey::parse(key).unwrap(),
    })
}

#[tokio::test]
async fn keys_reused_after_a_short_retention_audit_clean_with_the_default_retention() {
    let store = MemoryStore::new();
    let start = Utc.with_ymd_and_hms(2026, 11, 30, 12, 0, 0).unwrap();
    let clock = Arc::new(ManualClock(Mutex::new(start)));
    let settings = Settings {
        idempotency_ttl: SERVICE_TTL,
        ..Settings::default()
    };
    let service = BalanceService::new(
        Ports {
            users: Arc::new(store.clone()),
            orders: Arc::new(store.clone()),
            keys: Arc::new(store.clone()),
            store: Arc::new(store.clone()),
            locks: Arc::new(memory::InProcessLockManager::new()),
            encoder: Arc::new(DebugEncoder),
            clock: Arc::clone(&clock) as Arc<dyn Clock>,
        },
        settings,
    );
    store
        .seed_users(1, Balance::from_stored(0), start)
        .await
        .unwrap();
    let user = UserId::new(1).unwrap();

    // The same key three times, each after the previous record expired: three charges.
    for round in 0..3 {
        let done = service.execute(charge(user, "reused")).await.unwrap();
        assert!(!done.replayed, "round {round}");
        clock.advance(SERVICE_TTL + Duration::from_secs(1));
    }
    assert_eq!(
        store.get_user(user).await.unwrap().unwrap().balance.get(),
        30
    );

    // Audited with the default retention (a day), as `balance-service audit` without
    // IDEMPOTENCY_TTL_SECS does.
    let default = Settings::default();
    let report = store
        .audit(default.idempotency_ttl, default.lock_lease, clock.now())
        .await
        .unwrap();
    assert_eq!(report.found(AuditCheck::KeyAppliedOnce), 0, "{report:#?}");
    assert!(report.is_clean(), "{report:#?}");
}
