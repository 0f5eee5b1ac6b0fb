// An integration test's helpers are not `#[test]` functions, so clippy's test allowances
// miss them; a failed assumption here is a failed test all the same.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Group commit under the real use cases, on the in-memory adapters: requests that queue
//! while a batch commits are decided in order and written in one transaction, each with
//! its own answer, record and replay; a failed transaction is run again request by request.
//!
//! A batch is made deterministic without timers: the store holds the first transaction
//! until the test has queued the requests of the next one (`BalanceService::queued`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use domain::idempotency::StoredResponse;
use domain::outcome::{Outcome, Refusal};
use domain::ports::{
    Applied, BalanceChange, BalanceStore, BatchRead, BatchStep, BatchTransaction, LockError,
    LockKey, LockLease, LockManager, RefusalRecord, Release, ResponseEncoder, StepError,
    SystemClock,
};
use domain::types::{Amount, Balance, IdempotencyKey, Limits, UserId};
use domain::{
    BalanceService, Charge, Execution, GroupCommit, LockUnavailablePolicy, Operation,
    OperationError, Ports, Settings, UseBalance,
};
use memory::{InProcessLockManager, MemoryStore};
use tokio::sync::Notify;

struct DebugEncoder;

impl ResponseEncoder for DebugEncoder {
    fn encode(&self, outcome: &Outcome) -> StoredResponse {
        let status = match outcome {
            Outcome::Refused(Refusal::InsufficientBalance { .. }) => 422,
            Outcome::Refused(_) => 409,
            _ => 200,
        };
        StoredResponse {
            status,
            body: format!("{outcome:?}").into_bytes(),
        }
    }
}

/// The memory store, with a hold on its next batch and a record of every step it ran.
#[derive(Default)]
struct Gated {
    inner: MemoryStore,
    hold_next: Arc<Mutex<bool>>,
    entered: Arc<Notify>,
    release: Arc<Notify>,
    fail_batches: Arc<Mutex<Vec<StepError>>>,
    batches: Arc<Mutex<Vec<BatchStep>>>,
    singles: AtomicUsize,
    /// A hold on the next one-request step, as `hold_next` on a batch.
    hold_next_single: Mutex<bool>,
    single_entered: Notify,
    single_release: Notify,
}

#[async_trait]
impl BalanceStore for Gated {
    async fn apply(&self, change: BalanceChange) -> Result<Applied, StepError> {
        self.singles.fetch_add(1, Ordering::SeqCst);
        if std::mem::take(&mut *self.hold_next_single.lock().unwrap()) {
            self.single_entered.notify_one();
            self.single_release.notified().await;
        }
        self.inner.apply(change).await
    }

    async fn record_refusal(&self, refusal: RefusalRecord) -> Result<(), StepError> {
        self.singles.fetch_add(1, Ordering::SeqCst);
        self.inner.record_refusal(refusal).await
    }

    async fn begin_batch(
        &self,
        users: &[UserId],
        keys: &[(UserId, IdempotencyKey)],
        now: DateTime<Utc>,
    ) -> Result<Box<dyn BatchTransaction>, StepError> {
        let inner = self.inner.begin_batch(users, keys, now).await?;
        Ok(Box::new(GatedBatch {
            inner,
            hold_next: Arc::clone(&self.hold_next),
            entered: Arc::clone(&self.entered),
            release: Arc::clone(&self.release),
            fail_batches: Arc::clone(&self.fail_batches),
            batches: Arc::clone(&self.batches),
        }))
    }
}

/// A batch's transaction of [`Gated`]: held, failed or recorded at its commit (when it
/// writes anything).
struct GatedBatch {
    inner: Box<dyn BatchTransaction>,
    hold_next: Arc<Mutex<bool>>,
    entered: Arc<Notify>,
    release: Arc<Notify>,
    fail_batches: Arc<Mutex<Vec<StepError>>>,
    batches: Arc<Mutex<Vec<BatchStep>>>,
}

#[async_trait]
impl BatchTransaction for GatedBatch {
    fn read(&self) -> &BatchRead {
        self.inner.read()
    }

    async fn commit(self: Box<Self>, batch: &BatchStep) -> Result<(), StepError> {
        if batch.is_empty() {
            return self.inner.commit(batch).await;
        }
        let hold = std::mem::take(&mut *self.hold_next.lock().unwrap());
        self.batches.lock().unwrap().push(batch.clone());
        if hold {
            self.entered.notify_one();
            self.release.notified().await;
            return self.inner.commit(batch).await;
        }
        if let Some(failure) = self.fail_batches.lock().unwrap().pop() {
            return Err(failure);
        }
        self.inner.commit(batch).await
    }
}

/// The in-process lock, with a switch that makes it unreachable (Redis down).
#[derive(Default)]
struct Switched {
    inner: InProcessLockManager,
    down: std::sync::atomic::AtomicBool,
}

#[async_trait]
impl LockManager for Switched {
    async fn acquire(
        &self,
        key: &LockKey,
        wait: Duration,
        lease: Duration,
    ) -> Result<LockLease, LockError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(LockError::Unavailable(anyhow::anyhow!("switched off")));
        }
        self.inner.acquire(key, wait, lease).await
    }

    async fn release(&self, lease: &LockLease) -> Result<Release, LockError> {
        self.inner.release(lease).await
    }
}

struct Harness {
    service: BalanceService,
    store: Arc<Gated>,
    locks: Arc<Switched>,
}

fn limits() -> Limits {
    Limits::new(1_000_000, 10_000_000).unwrap()
}

async fn harness(users: u32, balance: i64) -> Harness {
    harness_with(users, balance, false).await
}

async fn harness_with(users: u32, balance: i64, across_users: bool) -> Harness {
    let store = Arc::new(Gated::default());
    let locks = Arc::new(Switched::default());
    let memory = store.inner.clone();
    let ports = Ports {
        users: Arc::new(memory.clone()),
        orders: Arc::new(memory.clone()),
        coupons: Arc::new(memory.clone()),
        keys: Arc::new(memory.clone()),
        store: Arc::clone(&store) as Arc<dyn BalanceStore>,
        locks: Arc::clone(&locks) as Arc<dyn LockManager>,
        encoder: Arc::new(DebugEncoder),
        clock: Arc::new(SystemClock),
        gate: None,
    };
    let settings = Settings {
        limits: limits(),
        on_lock_unavailable: LockUnavailablePolicy::Fail,
        group_commit: GroupCommit::On {
            max_batch: 64,
            across_users,
        },
        ..Settings::default()
    };
    let service = BalanceService::new(ports, settings);
    let harness = Harness {
        service,
        store,
        locks,
    };
    let seeded = harness
        .service
        .seed_users(users, Balance::new(balance, &limits()).unwrap())
        .await
        .unwrap();
    assert_eq!(seeded, u64::from(users));
    harness
}

fn id(raw: i64) -> UserId {
    UserId::new(raw).unwrap()
}

fn charge(user: i64, amount: i64, key: &str) -> Arc<dyn Operation> {
    Arc::new(Charge {
        user: id(user),
        amount: Amount::new(amount, &limits()).unwrap(),
        key: IdempotencyKey::parse(key).unwrap(),
    })
}

fn use_(user: i64, amount: i64, key: &str) -> Arc<dyn Operation> {
    Arc::new(UseBalance {
        user: id(user),
        amount: Amount::new(amount, &limits()).unwrap(),
        key: IdempotencyKey::parse(key).unwrap(),
    })
}

type Running = tokio::task::JoinHandle<Result<Execution, OperationError>>;

fn send(h: &Harness, op: Arc<dyn Operation>) -> Running {
    let service = h.service.clone();
    tokio::spawn(async move { service.execute(op).await })
}

/// Until `n` requests wait for the next batch (no timer: the batch's own tasks run meanwhile).
async fn until_queued(h: &Harness, n: usize) {
    // Bounded by turns, not time: a request that never queues fails the test, not hangs it.
    for _ in 0..100_000 {
        if h.service.queued() >= n {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("{} requests queued, {n} expected", h.service.queued());
}

/// Holds the next transaction: sends `first`, and returns once its batch is in the store.
async fn hold_a_batch(h: &Harness, first: Arc<dyn Operation>) -> Running {
    *h.store.hold_next.lock().unwrap() = true;
    let running = send(h, first);
    h.store.entered.notified().await;
    running
}

/// Queues `ops` behind the held batch, in this order, then lets the held batch go.
async fn queue_then_release(h: &Harness, ops: Vec<Arc<dyn Operation>>) -> Vec<Running> {
    let mut running = Vec::new();
    for (i, op) in ops.into_iter().enumerate() {
        running.push(send(h, op));
        until_queued(h, i + 1).await;
    }
    h.store.release.notify_one();
    running
}

async fn answers(running: Vec<Running>) -> Vec<Execution> {
    let mut out = Vec::new();
    for r in running {
        out.push(r.await.unwrap().unwrap());
    }
    out
}

fn statuses(executions: &[Execution]) -> Vec<u16> {
    executions.iter().map(|e| e.response.status).collect()
}

fn sizes(h: &Harness) -> Vec<usize> {
    h.store
        .batches
        .lock()
        .unwrap()
        .iter()
        .map(BatchStep::len)
        .collect()
}

async fn balance(h: &Harness, user: i64) -> i64 {
    h.service.balance(id(user)).await.unwrap().balance.get()
}

#[tokio::test]
async fn a_mixed_batch_refuses_only_the_overdraw_and_every_answer_replays_byte_for_byte() {
    let h = harness(1, 100).await;
    let first = hold_a_batch(&h, charge(1, 1, "k0")).await;
    let ops = vec![
        charge(1, 50, "k1"),
        use_(1, 120, "k2"),
        use_(1, 40, "k3"),
        charge(1, 5, "k4"),
    ];
    let queued = queue_then_release(&h, ops.clone()).await;
    assert_eq!(first.await.unwrap().unwrap().response.status, 200);
    let got = answers(queued).await;

    assert_eq!(
        sizes(&h),
        [1, 4],
        "the four queued requests share one transaction"
    );
    assert_eq!(
        statuses(&got),
        [200, 200, 422, 200],
        "only the overdraw is refused"
    );
    assert!(got.iter().all(|e| !e.replayed));
    assert_eq!(balance(&h, 1).await, 100 + 1 + 50 - 120 + 5);
    assert_eq!(h.store.singles.load(Ordering::SeqCst), 0);
    let history = h
        .service
        .history(id(1), None, domain::types::PageLimit::DEFAULT)
        .await
        .unwrap();
    assert_eq!(
        history.items.len(),
        1 + 4,
        "the opening entry, k0, k1, k2, k4"
    );

    // Every answer, the refusal too, is stored and replays the same bytes.
    for (op, first) in ops.into_iter().zip(&got) {
        let again = h.service.execute(op).await.unwrap();
        assert!(again.replayed);
        assert_eq!(again.response, first.response);
        assert_eq!(again.expires_at, first.expires_at);
    }
    assert_eq!(balance(&h, 1).await, 36, "replays change nothing");
}

#[tokio::test]
async fn across_users_the_users_of_one_batch_are_written_together_in_id_order() {
    let h = harness_with(3, 1_000, true).await;
    let first = hold_a_batch(&h, charge(1, 1, "a")).await;
    let queued = queue_then_release(
        &h,
        vec![charge(3, 30, "b"), charge(2, 20, "c"), use_(3, 3, "d")],
    )
    .await;
    first.await.unwrap().unwrap();
    let got = answers(queued).await;
    assert_eq!(statuses(&got), [200, 200, 200]);
    let batches = h.store.batches.lock().unwrap().clone();
    assert_eq!(batches.len(), 2);
    let users: Vec<_> = batches[1].users.iter().map(|u| u.user_id.get()).collect();
    assert_eq!(users, [2, 3]);
    assert_eq!(
        batches[1].users[1].writes.len(),
        2,
        "user 3's two, in arrival order"
    );
    assert_eq!(balance(&h, 2).await, 1_020);
    assert_eq!(balance(&h, 3).await, 1_027);
}

#[tokio::test]
async fn a_failed_batch_transaction_runs_each_request_alone_with_the_answer_it_would_get() {
    // Across users, so user 2's request shares the failed transaction too.
    let h = harness_with(2, 100, true).await;
    let first = hold_a_batch(&h, charge(1, 1, "k0")).await;
    // The second batch's transaction fails (as a lost race would); nothing of it is written.
    h.store
        .fail_batches
        .lock()
        .unwrap()
        .push(StepError::VersionConflict);
    let queued = queue_then_release(
        &h,
        vec![
            charge(1, 50, "k1"),
            use_(1, 500, "k2"),
            charge(2, 7, "k3"),
            use_(1, 151, "k4"),
        ],
    )
    .await;
    first.await.unwrap().unwrap();
    let got = answers(queued).await;
    assert_eq!(sizes(&h), [1, 4]);
    assert_eq!(statuses(&got), [200, 422, 200, 200]);
    assert_eq!(
        h.store.singles.load(Ordering::SeqCst),
        4,
        "each request of the failed batch ran alone"
    );
    assert_eq!(balance(&h, 1).await, 0);
    assert_eq!(balance(&h, 2).await, 107);
    let again = h.service.execute(use_(1, 500, "k2")).await.unwrap();
    assert!(again.replayed);
    assert_eq!(again.response, got[1].response);
}

#[tokio::test]
async fn a_user_whose_lock_is_held_elsewhere_waits_alone_and_the_others_go_on() {
    let h = harness(2, 100).await;
    let held = h
        .locks
        .acquire(
            &LockKey::user_balance(id(2)),
            Duration::ZERO,
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    let waiting = send(&h, charge(2, 5, "w"));
    // User 2's request left the queue for its lock; user 1 is not held up by it.
    let done = h.service.execute(charge(1, 5, "x")).await.unwrap();
    assert_eq!(done.response.status, 200);
    assert_eq!(balance(&h, 2).await, 100);
    assert!(!waiting.is_finished());
    h.locks.release(&held).await.unwrap();
    assert_eq!(waiting.await.unwrap().unwrap().response.status, 200);
    assert_eq!(balance(&h, 2).await, 105);
}

#[tokio::test]
async fn an_in_flight_duplicate_is_answered_key_in_use_at_once() {
    let h = harness(1, 100).await;
    let first = hold_a_batch(&h, charge(1, 10, "k")).await;
    let duplicate = h.service.execute(charge(1, 10, "k")).await;
    assert!(
        matches!(duplicate, Err(OperationError::KeyInUse)),
        "{duplicate:?}"
    );
    h.store.release.notify_one();
    assert_eq!(first.await.unwrap().unwrap().response.status, 200);
    let replay = h.service.execute(charge(1, 10, "k")).await.unwrap();
    assert!(replay.replayed);
    assert_eq!(balance(&h, 1).await, 110);
}

#[tokio::test]
async fn by_default_each_user_has_its_own_queue_and_a_held_batch_holds_up_only_its_user() {
    let h = harness(2, 100).await;
    let first = hold_a_batch(&h, charge(1, 1, "a")).await;
    // User 1's next request queues behind its held batch; user 2's runs at once.
    let behind = send(&h, charge(1, 2, "b"));
    until_queued(&h, 1).await;
    let other = h.service.execute(charge(2, 3, "c")).await.unwrap();
    assert_eq!(other.response.status, 200);
    assert_eq!(balance(&h, 2).await, 103);
    assert!(!behind.is_finished());
    h.store.release.notify_one();
    first.await.unwrap().unwrap();
    assert_eq!(behind.await.unwrap().unwrap().response.status, 200);
    assert_eq!(balance(&h, 1).await, 103);
    assert_eq!(sizes(&h), [1, 1, 1]);
}

#[tokio::test]
async fn a_replay_takes_no_lock_it_answers_with_the_lock_service_down_or_the_lock_held() {
    let h = harness(1, 100).await;
    let first = h.service.execute(charge(1, 10, "k")).await.unwrap();

    // The lock service is down and the policy is `fail`: a new change is refused, the
    // replay of a finished one is not.
    h.locks.down.store(true, Ordering::SeqCst);
    let fresh = h.service.execute(charge(1, 10, "other")).await;
    assert!(
        matches!(fresh, Err(OperationError::Unavailable(_))),
        "{fresh:?}"
    );
    let replay = h.service.execute(charge(1, 10, "k")).await.unwrap();
    assert!(replay.replayed);
    assert_eq!(replay.response, first.response);
    let reused = h.service.execute(charge(1, 99, "k")).await;
    assert!(
        matches!(reused, Err(OperationError::KeyReused)),
        "{reused:?}"
    );
    h.locks.down.store(false, Ordering::SeqCst);

    // The user's lock is held elsewhere: the replay answers at once, without waiting.
    let held = h
        .locks
        .acquire(
            &LockKey::user_balance(id(1)),
            Duration::ZERO,
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    let replay = h.service.execute(charge(1, 10, "k")).await.unwrap();
    assert!(replay.replayed);
    assert_eq!(replay.response, first.response);
    h.locks.release(&held).await.unwrap();
    assert_eq!(balance(&h, 1).await, 110);
}

/// After a failed batch its requests run alone, once: the user's requests that the queue
/// takes meanwhile wait for them, then go back to batching, so a busy user does not stay
/// one by one (under a lock nobody renews) for as long as its load lasts.
#[tokio::test]
async fn after_a_failed_batch_the_users_later_requests_are_batched_again() {
    let h = harness_with(1, 1_000, true).await;
    h.store
        .fail_batches
        .lock()
        .unwrap()
        .push(StepError::VersionConflict);
    *h.store.hold_next_single.lock().unwrap() = true;
    // Its batch fails; it runs alone, and is held there.
    let first = send(&h, charge(1, 1, "k0"));
    h.store.single_entered.notified().await;
    let mut later = Vec::new();
    for (i, key) in ["k1", "k2", "k3"].into_iter().enumerate() {
        later.push(send(&h, charge(1, 1, key)));
        until_queued(&h, i + 1).await;
    }
    h.store.single_release.notify_one();
    first.await.unwrap().unwrap();
    let got = answers(later).await;
    assert_eq!(statuses(&got), [200, 200, 200]);
    assert_eq!(
        h.store.singles.load(Ordering::SeqCst),
        1,
        "only the failed batch's request ran alone"
    );
    assert_eq!(sizes(&h), [1, 3], "the failed batch, then the three in one");
    assert_eq!(balance(&h, 1).await, 1_004);
}
