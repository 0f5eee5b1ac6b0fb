//! The use cases: every endpoint's behaviour, over the ports.
//!
//! A balance change (any [`Operation`]: charge, use, payment) runs in this order, written
//! once here for every operation:
//!
//! 1. **replay check**: a live completed record for (user, key) answers its stored
//!    response (or `KEY_REUSED` for another fingerprint) without a lock or a user read;
//! 2. **claim**: the key is marked in flight in this instance, so a concurrent duplicate
//!    is answered `KEY_IN_USE` at once;
//! 3. **lock** `balance:user:{id}`, before the first read of the user;
//! 4. **read, decide, apply**: the user and what the operation's `reads()` names are read,
//!    the operation's pure `decide` says what to write, and one atomic store call writes
//!    the balance (if the version is
//!    still the one read), the ledger entry, the key's record and the order/payment; a
//!    lost optimistic race is retried from a fresh read, a bounded number of times, and a
//!    step the store aborted before its commit once;
//! 5. **release** the lock after the commit, on every path; drop the claim.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use crate::claims::ClaimRegistry;
use crate::error::OperationError;
use crate::idempotency::{
    Admission, CompletedRecord, Fingerprint, KeyState, RecordOutcome, StoredResponse,
};
use crate::model::{HistoryPage, Order, OrderStatus, Payment, Refund, User};
use crate::operations::{AppliedEffect, Decline, Operation, OperationKind, State};
use crate::outcome::Outcome;
use crate::ports::{
    BalanceChange, BalanceStore, Clock, CouponGate, CouponRepo, IdempotencyRepo, KeyRecord,
    LockError, LockKey, LockLease, LockManager, OrderRepo, RefusalRecord, Release, ResponseEncoder,
    StepError, UserRepo,
};
use crate::telemetry as m;
use crate::types::{
    Amount, Balance, EntryId, IdempotencyKey, Limits, OrderId, PageLimit, PaymentId, UserId,
};

mod batch;
mod coupons;
mod known_users;

pub use coupons::{CouponListing, MAX_LISTED_COUPONS, audit_coupon_gate, gate_breaches};

/// The most refunds of one payment a listing returns (a payment of at most `MAX_AMOUNT`
/// won could in principle be refunded one won at a time).
pub const MAX_LISTED_REFUNDS: u32 = 1_000;

/// How many times one balance change is run again after the store aborted its step
/// before the commit (a killed or timed-out statement, a connection lost before COMMIT).
const ABORTED_STEP_RETRIES: u32 = 1;

/// What to do when the lock service cannot be reached (`LOCK_ON_REDIS_DOWN`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LockUnavailablePolicy {
    /// Go on under the database guard alone (version check, unique keys, one transaction).
    #[default]
    Degrade,
    /// Refuse with 503 `SERVICE_UNAVAILABLE`.
    Fail,
}

/// Whether charges and uses share transactions (`GROUP_COMMIT`; see the `batch` module).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GroupCommit {
    /// Every request is its own transaction.
    #[default]
    Off,
    /// Requests that queue while a batch commits are written together in the next one,
    /// at most `max_batch` of them. Each user has its own queue; with `across_users`, one
    /// queue per instance, so the users ready at once share one transaction. A batch never
    /// waits for a row lock: a row locked elsewhere fails it at once, and its requests run
    /// alone, the locked user's off the instance's queue, so it holds up only that user.
    On {
        max_batch: usize,
        across_users: bool,
    },
}

/// The knobs of the use cases (the spec's configuration table).
#[derive(Debug, Clone)]
pub struct Settings {
    pub lock_wait: Duration,
    pub lock_lease: Duration,
    pub optimistic_retries: u32,
    pub on_lock_unavailable: LockUnavailablePolicy,
    pub idempotency_ttl: Duration,
    pub limits: Limits,
    pub group_commit: GroupCommit,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            lock_wait: Duration::from_millis(10_000),
            lock_lease: Duration::from_millis(30_000),
            optimistic_retries: 10,
            on_lock_unavailable: LockUnavailablePolicy::Degrade,
            idempotency_ttl: Duration::from_secs(86_400),
            limits: Limits::default(),
            group_commit: GroupCommit::Off,
        }
    }
}

/// Every adapter the use cases talk to.
#[derive(Clone)]
pub struct Ports {
    pub users: Arc<dyn UserRepo>,
    pub orders: Arc<dyn OrderRepo>,
    pub coupons: Arc<dyn CouponRepo>,
    pub keys: Arc<dyn IdempotencyRepo>,
    pub store: Arc<dyn BalanceStore>,
    pub locks: Arc<dyn LockManager>,
    pub encoder: Arc<dyn ResponseEncoder>,
    pub clock: Arc<dyn Clock>,
    /// The coupon admission gate, when there is a shared backend for it (Redis); without
    /// it every issue goes to the database step, which is exact on its own.
    pub gate: Option<Arc<dyn CouponGate>>,
}

impl std::fmt::Debug for Ports {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ports { .. }")
    }
}

/// The answer to a balance-changing request: the stored status and bytes, whether they
/// were replayed from an earlier request with the same key, and when the key's record
/// expires (after which the key may run afresh).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Execution {
    pub response: StoredResponse,
    pub replayed: bool,
    pub expires_at: DateTime<Utc>,
}

/// The use cases of the service.
#[derive(Debug, Clone)]
pub struct BalanceService {
    ports: Ports,
    settings: Settings,
    claims: ClaimRegistry,
    known_users: known_users::KnownUsers,
    rebuilds: coupons::Rebuilds,
    committer: batch::Committer,
    /// Across users: the users whose failed batch's requests are running one by one.
    detours: batch::Committer,
}

/// What one attempt decided, from one read of the user (and what the operation reads).
enum Plan {
    Apply(BalanceChange),
    Refuse(RefusalRecord),
}

impl BalanceService {
    pub fn new(ports: Ports, settings: Settings) -> Self {
        Self {
            ports,
            settings,
            claims: ClaimRegistry::new(),
            known_users: known_users::KnownUsers::default(),
            rebuilds: coupons::Rebuilds::default(),
            committer: batch::Committer::default(),
            detours: batch::Committer::default(),
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn limits(&self) -> &Limits {
        &self.settings.limits
    }

    /// When a record written at `now` expires.
    fn record_expiry(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        let ttl = chrono::Duration::from_std(self.settings.idempotency_ttl)
            .unwrap_or(chrono::Duration::MAX);
        now.checked_add_signed(ttl)
            .unwrap_or(DateTime::<Utc>::MAX_UTC)
    }

    /// Keys this instance is running right now.
    pub fn in_flight(&self) -> usize {
        self.claims.in_flight()
    }

    /// Requests waiting for their batch (group commit), or to run alone after their
    /// user's failed batch, not counting those running.
    pub fn queued(&self) -> usize {
        self.committer.queued() + self.detours.queued()
    }

    // -----------------------------------------------------------------------------------
    // Queries and creation: no lock, committed state only
    // -----------------------------------------------------------------------------------

    /// # Errors
    /// `Unavailable`/`Unexpected` when the store fails.
    pub async fn create_user(&self) -> Result<User, OperationError> {
        Ok(self.ports.users.create_user(self.ports.clock.now()).await?)
    }

    /// # Errors
    /// `UserNotFound`, or a store failure.
    pub async fn balance(&self, user: UserId) -> Result<User, OperationError> {
        self.ports
            .users
            .get_user(user)
            .await?
            .ok_or(OperationError::UserNotFound)
    }

    /// The balance after the user's last ledger entry at or before `at` (0 before the
    /// first); a time not in the past answers the current balance.
    ///
    /// # Errors
    /// `UserNotFound`, or a store failure.
    pub async fn balance_at(
        &self,
        user: UserId,
        at: DateTime<Utc>,
    ) -> Result<Balance, OperationError> {
        let current = self.balance(user).await?;
        if at >= self.ports.clock.now() {
            return Ok(current.balance);
        }
        Ok(self
            .ports
            .users
            .balance_at(user, at)
            .await?
            .unwrap_or(Balance::ZERO))
    }

    /// What became of the request with `key`: its completed record.
    ///
    /// # Errors
    /// `UserNotFound`; `KeyInUse` while it runs in this instance; `RequestNotFound` when no
    /// live record exists (never sent, expired, or still running elsewhere: re-sending it
    /// with the same key is always safe); or a store failure.
    pub async fn request(
        &self,
        user: UserId,
        key: &IdempotencyKey,
    ) -> Result<CompletedRecord, OperationError> {
        self.balance(user).await?;
        if self.claims.is_in_flight(user, key) {
            return Err(OperationError::KeyInUse);
        }
        self.ports
            .keys
            .find(user, key, self.ports.clock.now())
            .await?
            .ok_or(OperationError::RequestNotFound)
    }

    /// # Errors
    /// `UserNotFound`, or a store failure.
    pub async fn history(
        &self,
        user: UserId,
        before: Option<EntryId>,
        limit: PageLimit,
    ) -> Result<HistoryPage, OperationError> {
        // An unknown user is a 404, not an empty page.
        self.balance(user).await?;
        Ok(self.ports.users.history(user, before, limit.get()).await?)
    }

    /// # Errors
    /// `UserNotFound`, or a store failure.
    pub async fn create_order(
        &self,
        user: UserId,
        amount: Amount,
    ) -> Result<Order, OperationError> {
        self.balance(user).await?;
        let now = self.ports.clock.now();
        Ok(self.ports.orders.create_order(user, amount, now).await?)
    }

    /// # Errors
    /// `OrderNotFound`, or a store failure.
    pub async fn order(&self, id: OrderId) -> Result<Order, OperationError> {
        self.ports
            .orders
            .get_order(id)
            .await?
            .ok_or(OperationError::OrderNotFound)
    }

    /// # Errors
    /// `PaymentNotFound`, or a store failure.
    pub async fn payment(&self, id: PaymentId) -> Result<Payment, OperationError> {
        self.ports
            .orders
            .get_payment(id)
            .await?
            .ok_or(OperationError::PaymentNotFound)
    }

    /// The payment's refunds, oldest first (at most [`MAX_LISTED_REFUNDS`]).
    ///
    /// # Errors
    /// A store failure.
    pub async fn refunds(&self, payment: PaymentId) -> Result<Vec<Refund>, OperationError> {
        Ok(self
            .ports
            .orders
            .refunds(payment, MAX_LISTED_REFUNDS)
            .await?)
    }

    /// Cancels a PENDING order; cancelling a cancelled order answers it as it is. No lock
    /// and no key: the write is guarded by the order's status (a payment that commits
    /// first wins), and doing it twice is doing it once.
    ///
    /// # Errors
    /// `OrderNotFound`; `OrderAlreadyPaid` for a paid or refunded order; a store failure.
    pub async fn cancel_order(&self, id: OrderId) -> Result<Order, OperationError> {
        let order = self
            .ports
            .orders
            .cancel_order(id)
            .await?
            .ok_or(OperationError::OrderNotFound)?;
        match order.status {
            OrderStatus::Cancelled => Ok(order),
            OrderStatus::Paid | OrderStatus::Refunded => Err(OperationError::OrderAlreadyPaid),
            // A store that left a pending order pending broke its port's contract.
            OrderStatus::Pending => Err(OperationError::Unexpected(anyhow::anyhow!(
                "order {id} is still pending after its cancellation"
            ))),
        }
    }

    /// Creates users 1..=`count` with `balance` where they do not exist yet.
    ///
    /// # Errors
    /// A store failure.
    pub async fn seed_users(&self, count: u32, balance: Balance) -> Result<u64, OperationError> {
        let now = self.ports.clock.now();
        Ok(self.ports.users.seed_users(count, balance, now).await?)
    }

    /// Deletes up to `limit` expired idempotency records.
    ///
    /// # Errors
    /// A store failure.
    pub async fn purge_expired_keys(&self, limit: u32) -> Result<u64, OperationError> {
        let purged = self
            .ports
            .keys
            .purge_expired(self.ports.clock.now(), limit)
            .await?;
        metrics::counter!(m::IDEMPOTENCY_PURGED_TOTAL).increment(purged);
        Ok(purged)
    }

    // -----------------------------------------------------------------------------------
    // Balance changes
    // -----------------------------------------------------------------------------------

    /// Runs a balance-changing operation (charge, use, payment) with its idempotency key:
    /// the one path every operation takes.
    ///
    /// # Errors
    /// Only the failures that are not stored: `UserNotFound`, `OrderNotFound`, `KeyInUse`,
    /// `KeyReused`, `LockTimeout`, `Unavailable` and `Unexpected`. Business refusals are
    /// `Ok` with their stored problem response.
    pub async fn execute(&self, op: Arc<dyn Operation>) -> Result<Execution, OperationError> {
        if let GroupCommit::On { .. } = self.settings.group_commit
            && op.batchable()
        {
            return self.submit(op).await;
        }
        self.run(op).await.map(|(execution, _)| execution)
    }

    /// [`BalanceService::execute`], saying also whether the answer is of an applied effect
    /// or a refusal (the coupon gate settles its reservation by it).
    async fn run(
        &self,
        op: Arc<dyn Operation>,
    ) -> Result<(Execution, RecordOutcome), OperationError> {
        let user = op.user();
        let fingerprint = op.fingerprint();

        // 1. A finished request with this key answers from its record, with no lock.
        if let Some(execution) = self.replay_if_completed(op.as_ref(), &fingerprint).await? {
            return Ok(execution);
        }

        // 2. Claim the key in this instance; dropped (released) on every path below.
        let _claim = match self.claims.claim(user, op.key(), &fingerprint) {
            Ok(claim) => claim,
            Err(refusal) => return Err(self.refused_admission(op.kind(), refusal)),
        };

        // 3. The user's lock, held across the read, the decision and the commit.
        let lock = self.lock_user(user).await?;
        let result = self.apply_with_retries(&op, &fingerprint).await;
        // 5. Released after the commit, on success and on failure alike.
        if let Some(lock) = lock {
            lock.release().await;
        }
        result
    }

    async fn replay_if_completed(
        &self,
        op: &dyn Operation,
        fingerprint: &Fingerprint,
    ) -> Result<Option<(Execution, RecordOutcome)>, OperationError> {
        let now = self.ports.clock.now();
        let (state, expires_at, outcome) =
            match self.ports.keys.find(op.user(), op.key(), now).await? {
                Some(record) => {
                    let (expires_at, outcome) = (record.expires_at, record.outcome);
                    (KeyState::Completed(record), expires_at, outcome)
                }
                None => (KeyState::Free, now, RecordOutcome::Refused),
            };
        match state.admit(fingerprint, now) {
            Admission::Run => Ok(None),
            Admission::Replay(response) => {
                metrics::counter!(m::IDEMPOTENT_REPLAYS_TOTAL, "operation" => op.kind().label())
                    .increment(1);
                Ok(Some((
                    Execution {
                        response,
                        replayed: true,
                        expires_at,
                    },
                    outcome,
                )))
            }
            other => Err(self.refused_admission(op.kind(), other)),
        }
    }

    fn refused_admission(&self, kind: OperationKind, admission: Admission) -> OperationError {
        match admission {
            Admission::Reused => {
                metrics::counter!(m::IDEMPOTENCY_REUSED_TOTAL, "operation" => kind.label())
                    .increment(1);
                OperationError::KeyReused
            }
            _ => {
                metrics::counter!(m::IDEMPOTENCY_IN_USE_TOTAL, "operation" => kind.label())
                    .increment(1);
                OperationError::KeyInUse
            }
        }
    }

    /// Takes the user's lock. `Ok(None)` means the lock service is down and the policy
    /// lets the change go on under the database guard alone.
    async fn lock_user(&self, user: UserId) -> Result<Option<HeldLock>, OperationError> {
        let key = LockKey::user_balance(user);
        let started = Instant::now();
        let acquired = self
            .ports
            .locks
            .acquire(&key, self.settings.lock_wait, self.settings.lock_lease)
            .await;
        metrics::histogram!(m::LOCK_WAIT_SECONDS).record(started.elapsed().as_secs_f64());
        match acquired {
            Ok(lease) => {
                metrics::counter!(m::LOCK_ACQUIRED_TOTAL).increment(1);
                Ok(Some(HeldLock {
                    locks: Arc::clone(&self.ports.locks),
                    lease: Some(lease),
                }))
            }
            Err(LockError::Timeout) => {
                metrics::counter!(m::LOCK_TIMEOUTS_TOTAL).increment(1);
                Err(OperationError::LockTimeout)
            }
            Err(LockError::Unavailable(cause)) => self.lock_unavailable(&key, cause),
            Err(LockError::Unexpected(cause)) => Err(OperationError::Unexpected(cause)),
        }
    }

    /// What `LOCK_ON_REDIS_DOWN` says when the lock service cannot be reached: `Ok(None)`,
    /// go on under the database guard alone, or 503.
    fn lock_unavailable(
        &self,
        key: &LockKey,
        cause: anyhow::Error,
    ) -> Result<Option<HeldLock>, OperationError> {
        match self.settings.on_lock_unavailable {
            LockUnavailablePolicy::Degrade => {
                metrics::counter!(m::LOCK_DEGRADED_TOTAL).increment(1);
                tracing::warn!(lock = key.as_str(), error = %cause,
                    "lock service unavailable: going on under the database guard alone");
                Ok(None)
            }
            LockUnavailablePolicy::Fail => {
                metrics::counter!(m::LOCK_UNAVAILABLE_TOTAL).increment(1);
                tracing::warn!(lock = key.as_str(), error = %cause,
                    "lock service unavailable: refusing the balance change");
                Err(OperationError::Unavailable(cause))
            }
        }
    }

    async fn apply_with_retries(
        &self,
        op: &Arc<dyn Operation>,
        fingerprint: &Fingerprint,
    ) -> Result<(Execution, RecordOutcome), OperationError> {
        let label = op.kind().label();
        // Bounded: under the lock a conflict means the lock was bypassed (lease expired,
        // Redis down); a few fresh reads settle it, and an endless loop would hold the
        // lock and the client forever.
        // Two budgets: a conflict and an abort are different causes, and an abort must get
        // its re-run even with OPTIMISTIC_RETRIES=0 or on the last conflict retry.
        let mut conflicts_left = self.settings.optimistic_retries;
        let mut aborts_left = ABORTED_STEP_RETRIES;
        let mut attempt: u32 = 0;
        loop {
            attempt += 1;
            let now = self.ports.clock.now();
            let plan = self.plan(op, fingerprint, now).await?;
            let expires_at = match &plan {
                Plan::Apply(change) => change.key.expires_at,
                Plan::Refuse(refusal) => refusal.key.expires_at,
            };
            let result = match plan {
                Plan::Apply(change) => self.ports.store.apply(change).await.map(|applied| {
                    metrics::counter!(m::OPERATIONS_APPLIED_TOTAL, "operation" => label)
                        .increment(1);
                    (applied.response, RecordOutcome::Applied)
                }),
                Plan::Refuse(refusal) => {
                    let response = refusal.response.clone();
                    self.ports.store.record_refusal(refusal).await.map(|()| {
                        metrics::counter!(m::OPERATIONS_REFUSED_TOTAL, "operation" => label)
                            .increment(1);
                        (response, RecordOutcome::Refused)
                    })
                }
            };
            match result {
                Ok((response, outcome)) => {
                    return Ok((
                        Execution {
                            response,
                            replayed: false,
                            expires_at,
                        },
                        outcome,
                    ));
                }
                Err(
                    StepError::VersionConflict
                    | StepError::OrderNotPending
                    | StepError::PaymentChanged
                    | StepError::CouponChanged,
                ) => {
                    metrics::counter!(m::OPTIMISTIC_CONFLICTS_TOTAL).increment(1);
                    if conflicts_left == 0 {
                        metrics::counter!(m::OPTIMISTIC_EXHAUSTED_TOTAL).increment(1);
                        return Err(OperationError::Unavailable(anyhow::anyhow!(
                            "optimistic retries exhausted after {attempt} attempts"
                        )));
                    }
                    conflicts_left -= 1;
                    metrics::counter!(m::OPTIMISTIC_RETRIES_TOTAL).increment(1);
                    tracing::debug!(attempt, "optimistic conflict; retrying from a fresh read");
                }
                // Nothing was committed (the store says so only then), so a fresh read and
                // a new attempt are exactly a first attempt; once, because a store that
                // aborts twice in a row is better answered 503 than waited on.
                Err(StepError::Aborted(cause)) => {
                    if aborts_left == 0 {
                        return Err(OperationError::Unavailable(cause));
                    }
                    aborts_left -= 1;
                    metrics::counter!(m::STEP_ABORTED_RETRIES_TOTAL).increment(1);
                    tracing::warn!(attempt, error = %format!("{cause:#}"),
                        "the store aborted the step before it committed; retrying from a fresh read");
                }
                Err(StepError::KeyTaken) => {
                    // Another instance finished this key while we ran (the lock was bypassed):
                    // answer what it stored.
                    return match self.replay_if_completed(op.as_ref(), fingerprint).await? {
                        Some(execution) => Ok(execution),
                        None => Err(OperationError::KeyInUse),
                    };
                }
                Err(other) => return Err(other.into()),
            }
        }
    }

    /// Reads the current state (the user, then what the operation reads) and lets the
    /// operation decide what to write.
    async fn plan(
        &self,
        op: &Arc<dyn Operation>,
        fingerprint: &Fingerprint,
        now: DateTime<Utc>,
    ) -> Result<Plan, OperationError> {
        let user = self
            .ports
            .users
            .get_user(op.user())
            .await?
            .ok_or(OperationError::UserNotFound)?;
        let reads = op.reads();
        let order = match reads.order {
            Some(id) => self.ports.orders.get_order(id).await?,
            None => None,
        };
        let payment = match reads.payment {
            Some(id) => self.ports.orders.get_payment(id).await?,
            None => None,
        };
        let (coupon, holding) = match reads.coupon {
            Some(id) => match self.ports.coupons.get_coupon(id).await? {
                Some(coupon) => (Some(coupon), self.ports.coupons.holding(id, user.id).await?),
                None => (None, None),
            },
            None => (None, None),
        };
        let user_coupon = match reads.user_coupon {
            Some(id) => self.ports.coupons.get_user_coupon(id).await?,
            None => None,
        };
        let state = State {
            user,
            order,
            payment,
            coupon,
            holding,
            user_coupon,
            now,
        };
        let key = KeyRecord {
            key: op.key().clone(),
            fingerprint: fingerprint.clone(),
            operation: op.kind(),
            created_at: now,
            expires_at: self.record_expiry(now),
        };
        let user_id = state.user.id;
        let expected_version = state.user.version;
        Ok(match op.decide(&state, &self.settings.limits) {
            Ok(effect) => {
                let encoder = Arc::clone(&self.ports.encoder);
                let op = Arc::clone(op);
                let answered = effect.clone();
                Plan::Apply(BalanceChange {
                    user_id,
                    expected_version,
                    effect,
                    at: now,
                    key,
                    respond: Box::new(move |assigned| {
                        encoder.encode(&op.outcome(&AppliedEffect {
                            user: user_id,
                            effect: answered,
                            at: now,
                            assigned: assigned.clone(),
                        }))
                    }),
                })
            }
            Err(Decline::Refused(refusal)) => Plan::Refuse(RefusalRecord {
                user_id,
                expected_version,
                key,
                response: self.ports.encoder.encode(&Outcome::Refused(refusal)),
            }),
            Err(Decline::OrderNotFound) => return Err(OperationError::OrderNotFound),
            Err(Decline::PaymentNotFound) => return Err(OperationError::PaymentNotFound),
            Err(Decline::CouponNotFound) => return Err(OperationError::CouponNotFound),
        })
    }
}

/// A held user lock. `release` is the normal path; if the holder is dropped without it
/// (a panic, a cancelled future) the release is spawned so the lock does not sit out its
/// whole lease.
struct HeldLock {
    locks: Arc<dyn LockManager>,
    lease: Option<LockLease>,
}

impl HeldLock {
    async fn release(mut self) {
        if let Some(lease) = self.lease.take() {
            release_lease(self.locks.as_ref(), &lease).await;
        }
    }
}

async fn release_lease(locks: &dyn LockManager, lease: &LockLease) {
    match locks.release(lease).await {
        Ok(Release::Released) => {}
        Ok(Release::LeaseLost) => {
            metrics::counter!(m::LOCK_LEASE_LOST_TOTAL).increment(1);
            tracing::warn!(
                lock = lease.key.as_str(),
                "the lock's lease expired before it was released; the version check guarded the write"
            );
        }
        Err(e) => {
            tracing::warn!(lock = lease.key.as_str(), error = %e,
                "could not release the lock; it will expire with its lease");
        }
    }
}

impl Drop for HeldLock {
    fn drop(&mut self) {
        if let Some(lease) = self.lease.take() {
            let locks = Arc::clone(&self.locks);
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(async move { release_lease(locks.as_ref(), &lease).await });
            }
        }
    }
}
