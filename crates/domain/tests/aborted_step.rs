#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! A step the store aborted before its commit (`StepError::Aborted`) is run once more from
//! a fresh read; a second abort, and a commit whose outcome is unknown
//! (`StepError::Unavailable`), are answered unavailable without another attempt.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use chrono::{DateTime, Utc};
use domain::idempotency::StoredResponse;
use domain::model::User;
use domain::outcome::Outcome;
use domain::ports::{
    Applied, Assigned, Clock, LockLease, MockBalanceStore, MockCouponRepo, MockIdempotencyRepo,
    MockLockManager, MockOrderRepo, MockUserRepo, Release, ResponseEncoder, StepError,
};
use domain::types::{Amount, Balance, EntryId, IdempotencyKey, UserId};
use domain::{BalanceService, Charge, Operation, OperationError, Ports, Settings};

fn now() -> DateTime<Utc> {
    DateTime::from_timestamp_millis(1_795_356_000_123).unwrap()
}

struct FixedClock;

impl Clock for FixedClock {
    fn now(&self) -> DateTime<Utc> {
        now()
    }
}

struct TestEncoder;

impl ResponseEncoder for TestEncoder {
    fn encode(&self, outcome: &Outcome) -> StoredResponse {
        StoredResponse {
            status: 200,
            body: format!("{outcome:?}").into_bytes(),
        }
    }
}

fn user_id() -> UserId {
    UserId::new(7).unwrap()
}

/// A service whose store answers each attempt with the next of `answers` (`None`: it
/// commits), counting the reads of the user and the attempts.
fn service(
    answers: Vec<Option<fn() -> StepError>>,
    reads: &Arc<AtomicUsize>,
) -> (BalanceService, Arc<AtomicUsize>) {
    service_with(answers, reads, Settings::default())
}

fn service_with(
    answers: Vec<Option<fn() -> StepError>>,
    reads: &Arc<AtomicUsize>,
    settings: Settings,
) -> (BalanceService, Arc<AtomicUsize>) {
    let mut users = MockUserRepo::new();
    let counted = Arc::clone(reads);
    users.expect_get_user().returning(move |id| {
        counted.fetch_add(1, Ordering::SeqCst);
        Ok(Some(User {
            id,
            balance: Balance::from_stored(1_000),
            version: 3,
            created_at: now(),
        }))
    });
    let mut keys = MockIdempotencyRepo::new();
    keys.expect_find().returning(|_, _, _| Ok(None));
    let mut locks = MockLockManager::new();
    locks.expect_acquire().returning(|key, _, _| {
        Ok(LockLease {
            key: key.clone(),
            token: "t".to_owned(),
        })
    });
    locks.expect_release().returning(|_| Ok(Release::Released));
    let attempts = Arc::new(AtomicUsize::new(0));
    let mut store = MockBalanceStore::new();
    let counted = Arc::clone(&attempts);
    store.expect_apply().returning(move |change| {
        let n = counted.fetch_add(1, Ordering::SeqCst);
        match answers.get(n).copied().flatten() {
            Some(error) => Err(error()),
            None => {
                let assigned = Assigned {
                    entry_id: EntryId::new(1).ok(),
                    payment_id: None,
                    refund_id: None,
                    user_coupon_id: None,
                };
                let response = (change.respond)(&assigned);
                Ok(Applied { assigned, response })
            }
        }
    });
    let service = BalanceService::new(
        Ports {
            users: Arc::new(users),
            orders: Arc::new(MockOrderRepo::new()),
            coupons: Arc::new(MockCouponRepo::new()),
            keys: Arc::new(keys),
            store: Arc::new(store),
            locks: Arc::new(locks),
            encoder: Arc::new(TestEncoder),
            clock: Arc::new(FixedClock),
            gate: None,
        },
        settings,
    );
    (service, attempts)
}

fn charge() -> Arc<dyn Operation> {
    Arc::new(Charge {
        user: user_id(),
        amount: Amount::new(100, &Settings::default().limits).unwrap(),
        key: IdempotencyKey::parse("k-aborted").unwrap(),
    })
}

fn aborted() -> StepError {
    StepError::Aborted(anyhow::anyhow!("statement killed"))
}

fn commit_unknown() -> StepError {
    StepError::Unavailable(anyhow::anyhow!("connection lost at COMMIT"))
}

#[tokio::test]
async fn an_aborted_step_is_run_again_from_a_fresh_read() {
    let reads = Arc::new(AtomicUsize::new(0));
    let (service, attempts) = service(vec![Some(aborted), None], &reads);
    let done = service.execute(charge()).await.unwrap();
    assert!(!done.replayed);
    assert_eq!(done.response.status, 200);
    assert_eq!(attempts.load(Ordering::SeqCst), 2);
    assert_eq!(
        reads.load(Ordering::SeqCst),
        2,
        "the retry reads the user afresh"
    );
}

/// The abort's re-run has a budget of its own: it is not spent by conflicts, nor missing
/// when no conflict retries are configured.
#[tokio::test]
async fn an_aborted_step_is_run_again_even_without_optimistic_retries() {
    let reads = Arc::new(AtomicUsize::new(0));
    let settings = Settings {
        optimistic_retries: 0,
        ..Settings::default()
    };
    let (service, attempts) = service_with(vec![Some(aborted), None], &reads, settings);
    let done = service.execute(charge()).await.unwrap();
    assert_eq!(done.response.status, 200);
    assert_eq!(attempts.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn an_abort_after_the_last_conflict_retry_is_still_run_again() {
    let reads = Arc::new(AtomicUsize::new(0));
    let settings = Settings {
        optimistic_retries: 1,
        ..Settings::default()
    };
    let (service, attempts) = service_with(
        vec![Some(|| StepError::VersionConflict), Some(aborted), None],
        &reads,
        settings,
    );
    let done = service.execute(charge()).await.unwrap();
    assert_eq!(done.response.status, 200);
    assert_eq!(attempts.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn a_step_aborted_twice_is_unavailable() {
    let reads = Arc::new(AtomicUsize::new(0));
    let (service, attempts) = service(vec![Some(aborted), Some(aborted), None], &reads);
    let failed = service.execute(charge()).await;
    assert!(
        matches!(failed, Err(OperationError::Unavailable(_))),
        "{failed:?}"
    );
    assert_eq!(attempts.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_commit_with_an_unknown_outcome_is_not_run_again() {
    let reads = Arc::new(AtomicUsize::new(0));
    let (service, attempts) = service(vec![Some(commit_unknown), None], &reads);
    let failed = service.execute(charge()).await;
    assert!(
        matches!(failed, Err(OperationError::Unavailable(_))),
        "{failed:?}"
    );
    assert_eq!(attempts.load(Ordering::SeqCst), 1);
}
