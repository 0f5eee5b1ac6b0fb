//! The ports: what the use cases need from the outside world. Each method says which
//! errors an adapter MUST return; anything else is `Unexpected`.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::idempotency::{CompletedRecord, Fingerprint, StoredResponse};
use crate::model::{
    Coupon, EntryKind, HistoryPage, NewCoupon, Order, Payment, Refund, User, UserCoupon,
};
use crate::operations::{Effect, Movement, OperationKind};
use crate::outcome::Outcome;
use crate::types::{
    Amount, Balance, CouponId, EntryId, IdempotencyKey, OrderId, PaymentId, RefundId, UserCouponId,
    UserId,
};

/// A failure of a repository that the use case cannot act on: the database is down, a
/// query failed, stored data is corrupt. Answered as a 5xx and never stored.
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    /// The store cannot be reached right now; a retry may succeed.
    #[error("the store is unavailable")]
    Unavailable(#[source] anyhow::Error),
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

// ---------------------------------------------------------------------------------------
// Locks
// ---------------------------------------------------------------------------------------

/// The name of a lock. Balance changes lock the resource they change, never the request.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LockKey(String);

impl LockKey {
    /// `balance:user:{id}`: every change of this user's balance holds it.
    pub fn user_balance(user: UserId) -> Self {
        Self(format!("balance:user:{user}"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Proof of holding a lock: the key and the random token only the holder knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockLease {
    pub key: LockKey,
    pub token: String,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Somebody else held the lock for the whole wait.
    #[error("the lock was not free within the wait time")]
    Timeout,
    /// The lock service cannot be reached (Redis down, connection refused, timed out).
    #[error("the lock service is unavailable")]
    Unavailable(#[source] anyhow::Error),
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

/// What a release found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    /// The lease was ours and is gone now.
    Released,
    /// The lease had expired (and may be someone else's now); nothing was deleted.
    LeaseLost,
}

/// A mutual-exclusion lock with a lease, shared by every instance that uses the same backend.
#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
#[async_trait]
pub trait LockManager: Send + Sync {
    /// Takes `key` for at most `lease`, waiting up to `wait` for it to be free.
    ///
    /// # Errors
    /// - MUST return [`LockError::Timeout`] when the key stayed held for the whole `wait`;
    /// - MUST return [`LockError::Unavailable`] when the backend cannot be reached.
    async fn acquire(
        &self,
        key: &LockKey,
        wait: Duration,
        lease: Duration,
    ) -> Result<LockLease, LockError>;

    /// Releases `lease` only if it is still the holder's (compare-and-delete on the token).
    ///
    /// # Errors
    /// - MUST return [`LockError::Unavailable`] when the backend cannot be reached;
    /// - MUST NOT delete a lock that another holder took after `lease` expired: that is
    ///   `Ok(Release::LeaseLost)`.
    async fn release(&self, lease: &LockLease) -> Result<Release, LockError>;
}

// ---------------------------------------------------------------------------------------
// Repositories
// ---------------------------------------------------------------------------------------

/// Users, their balances and their ledger (read side and creation).
#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
#[async_trait]
pub trait UserRepo: Send + Sync {
    /// Creates a user with balance 0 and version 0.
    ///
    /// # Errors
    /// MUST return [`RepoError::Unavailable`] when the store cannot be reached.
    async fn create_user(&self, now: DateTime<Utc>) -> Result<User, RepoError>;

    /// The user's committed state, or `None` when there is no such user.
    ///
    /// # Errors
    /// MUST return [`RepoError::Unavailable`] when the store cannot be reached.
    async fn get_user(&self, id: UserId) -> Result<Option<User>, RepoError>;

    /// The user's ledger entries with an id below `before` (all when `None`), newest first,
    /// at most `limit`; `next` is set when older entries remain.
    ///
    /// # Errors
    /// MUST return [`RepoError::Unavailable`] when the store cannot be reached.
    async fn history(
        &self,
        id: UserId,
        before: Option<EntryId>,
        limit: u32,
    ) -> Result<HistoryPage, RepoError>;

    /// The `balance_after` of the user's newest ledger entry created at or before `at`
    /// (newest by creation time, then by id), or `None` when it has none that old. One
    /// index seek, however long the ledger.
    ///
    /// # Errors
    /// MUST return [`RepoError::Unavailable`] when the store cannot be reached.
    async fn balance_at(&self, id: UserId, at: DateTime<Utc>)
    -> Result<Option<Balance>, RepoError>;

    /// Creates users 1..=`count` that do not exist yet, each with `balance` and one opening
    /// CHARGE ledger entry (so the ledger still sums to the balance). Existing users are
    /// left as they are. Returns how many were created.
    ///
    /// # Errors
    /// MUST return [`RepoError::Unavailable`] when the store cannot be reached.
    async fn seed_users(
        &self,
        count: u32,
        balance: Balance,
        now: DateTime<Utc>,
    ) -> Result<u64, RepoError>;
}

/// Orders and payments (read side and order creation).
#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
#[async_trait]
pub trait OrderRepo: Send + Sync {
    /// Creates a PENDING order. The caller has checked that the user exists.
    ///
    /// # Errors
    /// MUST return [`RepoError::Unavailable`] when the store cannot be reached.
    async fn create_order(
        &self,
        user: UserId,
        amount: Amount,
        now: DateTime<Utc>,
    ) -> Result<Order, RepoError>;

    /// # Errors
    /// MUST return [`RepoError::Unavailable`] when the store cannot be reached.
    async fn get_order(&self, id: OrderId) -> Result<Option<Order>, RepoError>;

    /// The payment, with the refunded total committed so far.
    ///
    /// # Errors
    /// MUST return [`RepoError::Unavailable`] when the store cannot be reached.
    async fn get_payment(&self, id: PaymentId) -> Result<Option<Payment>, RepoError>;

    /// The payment's refunds, oldest first, at most `limit`.
    ///
    /// # Errors
    /// MUST return [`RepoError::Unavailable`] when the store cannot be reached.
    async fn refunds(&self, payment: PaymentId, limit: u32) -> Result<Vec<Refund>, RepoError>;

    /// Cancels the order if it is PENDING (a guarded write: `… and status = 'PENDING'`, so
    /// a payment that commits first wins and the cancel sees it). Returns the order as it
    /// is after the call: CANCELLED when it was pending or cancelled already, otherwise as
    /// it was (PAID, REFUNDED); `None` when there is no such order.
    ///
    /// # Errors
    /// MUST return [`RepoError::Unavailable`] when the store cannot be reached.
    async fn cancel_order(&self, id: OrderId) -> Result<Option<Order>, RepoError>;
}

/// Coupons and the user coupons issued of them (read side and coupon creation; issuing
/// and using are atomic steps of [`BalanceStore`]).
#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
#[async_trait]
pub trait CouponRepo: Send + Sync {
    /// Creates a coupon with nothing issued.
    ///
    /// # Errors
    /// MUST return [`RepoError::Unavailable`] when the store cannot be reached.
    async fn create_coupon(
        &self,
        coupon: NewCoupon,
        now: DateTime<Utc>,
    ) -> Result<Coupon, RepoError>;

    /// The coupon with its committed issued count.
    ///
    /// # Errors
    /// MUST return [`RepoError::Unavailable`] when the store cannot be reached.
    async fn get_coupon(&self, id: CouponId) -> Result<Option<Coupon>, RepoError>;

    /// The user coupon, of any user.
    ///
    /// # Errors
    /// MUST return [`RepoError::Unavailable`] when the store cannot be reached.
    async fn get_user_coupon(&self, id: UserCouponId) -> Result<Option<UserCoupon>, RepoError>;

    /// The user's coupon of `coupon`, if it was issued one (at most one exists).
    ///
    /// # Errors
    /// MUST return [`RepoError::Unavailable`] when the store cannot be reached.
    async fn holding(
        &self,
        coupon: CouponId,
        user: UserId,
    ) -> Result<Option<UserCoupon>, RepoError>;

    /// The user's coupons, newest first, at most `limit`.
    ///
    /// # Errors
    /// MUST return [`RepoError::Unavailable`] when the store cannot be reached.
    async fn user_coupons(&self, user: UserId, limit: u32) -> Result<Vec<UserCoupon>, RepoError>;

    /// Coupon ids above `after` (all when `None`), ascending, at most `limit`: the audit
    /// walks every coupon with it.
    ///
    /// # Errors
    /// MUST return [`RepoError::Unavailable`] when the store cannot be reached.
    async fn coupon_ids(
        &self,
        after: Option<CouponId>,
        limit: u32,
    ) -> Result<Vec<CouponId>, RepoError>;

    /// What the admission gate is rebuilt from: the coupon and every user it was issued to,
    /// with the key that issued it, read together (one snapshot); `None` without the coupon.
    ///
    /// # Errors
    /// MUST return [`RepoError::Unavailable`] when the store cannot be reached.
    async fn gate_snapshot(&self, coupon: CouponId) -> Result<Option<GateSnapshot>, RepoError>;
}

/// The durable, completed half of the idempotency state machine.
#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
#[async_trait]
pub trait IdempotencyRepo: Send + Sync {
    /// The completed record of `(user, key)`, or `None` when there is none or it expired
    /// at or before `now`. Keys of other users are never returned.
    ///
    /// # Errors
    /// MUST return [`RepoError::Unavailable`] when the store cannot be reached.
    async fn find(
        &self,
        user: UserId,
        key: &IdempotencyKey,
        now: DateTime<Utc>,
    ) -> Result<Option<CompletedRecord>, RepoError>;

    /// [`IdempotencyRepo::find`] for many keys at once (one round trip): the live
    /// completed records among `keys`, in any order.
    ///
    /// # Errors
    /// MUST return [`RepoError::Unavailable`] when the store cannot be reached.
    async fn find_many(
        &self,
        keys: &[(UserId, IdempotencyKey)],
        now: DateTime<Utc>,
    ) -> Result<Vec<CompletedRecord>, RepoError>;

    /// Stores a refusal that was decided without a balance step (by the coupon gate) as
    /// the completed record of (`user`, `key`), marked REFUSED, replacing an expired one;
    /// one statement, no lock and no users row. When a live record of that key exists,
    /// nothing is written and that record is returned: the key was answered before (a
    /// replay, or another request: reused), and that answer stands.
    ///
    /// # Errors
    /// MUST return [`RepoError::Unavailable`] when the store cannot be reached.
    async fn insert_refusal(
        &self,
        user: UserId,
        key: &KeyRecord,
        response: &StoredResponse,
    ) -> Result<Option<CompletedRecord>, RepoError>;

    /// Deletes at most `limit` records that expired at or before `now`, the oldest expiry
    /// first; returns how many. Safe to run from every instance at once.
    ///
    /// # Errors
    /// MUST return [`RepoError::Unavailable`] when the store cannot be reached.
    async fn purge_expired(&self, now: DateTime<Utc>, limit: u32) -> Result<u64, RepoError>;
}

// ---------------------------------------------------------------------------------------
// The atomic step
// ---------------------------------------------------------------------------------------

/// Ids the store assigned while applying a change, handed to [`BalanceChange::respond`] so
/// the stored response can name them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assigned {
    /// The ledger entry's id, for an effect that moves money.
    pub entry_id: Option<EntryId>,
    /// For [`Effect::Pay`], the new payment's id.
    pub payment_id: Option<PaymentId>,
    /// For [`Effect::Refund`], the new refund's id.
    pub refund_id: Option<RefundId>,
    /// For [`Effect::IssueCoupon`], the new user coupon's id.
    pub user_coupon_id: Option<UserCouponId>,
}

/// Builds the response to store once the store has assigned its ids. The use case builds
/// it (from the operation's outcome and the [`ResponseEncoder`]); the store only calls it,
/// inside its transaction, so the stored bytes can name ids that commit with them and the
/// store never learns what a response looks like.
pub type Responder = Box<dyn FnOnce(&Assigned) -> StoredResponse + Send>;

/// The key's completed record as the atomic step writes it. Its outcome is the step's:
/// [`BalanceStore::apply`] stores it APPLIED, [`BalanceStore::record_refusal`] REFUSED.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    pub key: IdempotencyKey,
    pub fingerprint: Fingerprint,
    pub operation: OperationKind,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

/// One balance change, applied all together or not at all: the users row (only if its
/// version is still `expected_version`), the ledger entry of `effect`, whatever else the
/// effect writes (for a payment, the order's PAID status and the payment row) and the
/// key's completed record with the bytes `respond` builds from the assigned ids.
pub struct BalanceChange {
    pub user_id: UserId,
    pub expected_version: u64,
    pub effect: Effect,
    pub at: DateTime<Utc>,
    pub key: KeyRecord,
    pub respond: Responder,
}

impl std::fmt::Debug for BalanceChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BalanceChange")
            .field("user_id", &self.user_id)
            .field("expected_version", &self.expected_version)
            .field("effect", &self.effect)
            .field("at", &self.at)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

/// A business refusal to store under its key (no balance change), valid only while the
/// user's version is still `expected_version`: the refusal was decided on that state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusalRecord {
    pub user_id: UserId,
    pub expected_version: u64,
    pub key: KeyRecord,
    pub response: StoredResponse,
}

/// Many balance changes of one or more users, decided together under their locks and
/// written in one transaction (group commit): each user's row once (guarded by the version
/// the batch read), every ledger entry and every key's record, committed all together or
/// not at all. Only changes that move money with nothing but a ledger entry (charges and
/// uses) are batched, and their responses name no id the store assigns, so they are built
/// before the step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchStep {
    /// The instant every write of the batch is made at.
    pub at: DateTime<Utc>,
    /// One entry per user, in ascending id order (the order rows are locked in).
    pub users: Vec<UserBatch>,
}

/// One user's part of a [`BatchStep`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserBatch {
    pub user_id: UserId,
    /// The version the batch read; the row is written only while it is still this one,
    /// and moves on by one (also when every request of the user was refused: the
    /// refusals were decided on that version).
    pub expected_version: u64,
    /// The balance after the last of `writes` (the balance read when none moves money).
    pub balance_after: Balance,
    /// The user's requests in the order they were decided.
    pub writes: Vec<BatchWrite>,
}

/// One request of a [`UserBatch`]: its key's record and, when it applied, its ledger entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchWrite {
    pub key: KeyRecord,
    /// The ledger entry of an applied change; `None` for a refusal (stored REFUSED).
    pub ledger: Option<(EntryKind, Movement)>,
    pub response: StoredResponse,
}

impl BatchWrite {
    pub fn outcome(&self) -> crate::idempotency::RecordOutcome {
        match self.ledger {
            Some(_) => crate::idempotency::RecordOutcome::Applied,
            None => crate::idempotency::RecordOutcome::Refused,
        }
    }
}

impl BatchStep {
    /// How many requests the batch writes.
    pub fn len(&self) -> usize {
        self.users.iter().map(|user| user.writes.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// The users row is no longer at `expected_version`: somebody else wrote it first.
    #[error("the user's version changed since it was read")]
    VersionConflict,
    /// A live completed record for this (user, key) exists already.
    #[error("the idempotency key already has a completed record")]
    KeyTaken,
    /// The order to pay is no longer PENDING (or already has a payment).
    #[error("the order is no longer pending")]
    OrderNotPending,
    /// The payment to refund is not this user's, or its refunded total is no longer the
    /// one the refund was decided on (or the refund would take it past the payment).
    #[error("the payment's refunded total changed")]
    PaymentChanged,
    /// For [`Effect::IssueCoupon`]: the coupon sold out, or the user was issued one,
    /// since the decision; for a [`Effect::Pay`] with a coupon: the user coupon is no
    /// longer this user's and free.
    #[error("the coupon's stock or the user's coupon changed")]
    CouponChanged,
    /// The user does not exist.
    #[error("no such user")]
    UserNotFound,
    /// The store aborted the step before it committed (the statement was killed or timed
    /// out, or the connection was lost before the commit was sent): nothing was written,
    /// and a fresh attempt may succeed.
    #[error("the store aborted the step before it committed")]
    Aborted(#[source] anyhow::Error),
    /// The store cannot be reached, or a commit failed with an unknown outcome.
    #[error("the store is unavailable")]
    Unavailable(#[source] anyhow::Error),
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

/// What the step wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub assigned: Assigned,
    pub response: StoredResponse,
}

/// The atomic step of every balance change: one method, one transaction.
#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
#[async_trait]
pub trait BalanceStore: Send + Sync {
    /// Applies `change` in one transaction. An expired record under the same key is
    /// replaced. Nothing is written when an error is returned. The guards are met in the
    /// order a transaction meets them: the user (`UserNotFound`), its version
    /// (`VersionConflict`), then the key (`KeyTaken`).
    ///
    /// # Errors
    /// - MUST return [`StepError::VersionConflict`] when the users row's version is not
    ///   `change.expected_version`;
    /// - MUST return [`StepError::KeyTaken`] when a live record for (user, key) exists;
    /// - MUST return [`StepError::OrderNotPending`] when the order of an
    ///   [`Effect::Pay`] is not this user's, not PENDING or already has a payment;
    /// - MUST return [`StepError::PaymentChanged`] when the payment of an
    ///   [`Effect::Refund`] is not this user's, its refunded total is not the effect's
    ///   `refunded_before`, or the new total would pass the payment's amount;
    /// - MUST return [`StepError::CouponChanged`] when the coupon of an
    ///   [`Effect::IssueCoupon`] has no unit left or this user holds one already, and
    ///   when the user coupon of an [`Effect::Pay`] is not this user's or is used;
    /// - MUST, for an [`Effect::Refund`] that completes its payment, set the payment's
    ///   user coupon free (no payment) in the same transaction;
    /// - MUST, for an effect without a ledger entry ([`Effect::IssueCoupon`]), still move
    ///   the users row's version on (guarded as always) and leave the balance as it is;
    /// - MUST pass the ids it assigned to `change.respond` (for [`Effect::Pay`], the
    ///   payment's id; for [`Effect::Refund`], the refund's; for
    ///   [`Effect::IssueCoupon`], the user coupon's) and store its bytes as the record,
    ///   marked APPLIED;
    /// - MUST return [`StepError::UserNotFound`] when the user does not exist;
    /// - MUST return [`StepError::Unavailable`] when the store cannot be reached, and when
    ///   the commit failed with an unknown outcome (it may have happened);
    /// - MAY return [`StepError::Aborted`] only when nothing was committed.
    async fn apply(&self, change: BalanceChange) -> Result<Applied, StepError>;

    /// Stores a business refusal under its key, marked REFUSED, in one transaction.
    ///
    /// # Errors
    /// As [`BalanceStore::apply`], for the version, the key and the user.
    async fn record_refusal(&self, refusal: RefusalRecord) -> Result<(), StepError>;

    /// Begins a batch's transaction: reads, together, those of `users` that exist and the
    /// live completed records among `keys` (as [`IdempotencyRepo::find_many`] at `now`),
    /// which the batch decides on and then writes with [`BatchTransaction::commit`]. A
    /// store with row locks takes the users rows' here, without waiting, and keeps them
    /// until the transaction ends; dropped without a commit, it ends with nothing written.
    ///
    /// # Errors
    /// - MUST return [`StepError::VersionConflict`] when a users row is locked by another
    ///   transaction (a store that locks rows MUST NOT wait for it);
    /// - MUST return [`StepError::Unavailable`] when the store cannot be reached; MAY
    ///   return [`StepError::Aborted`]. Nothing is written whatever the error.
    async fn begin_batch(
        &self,
        users: &[UserId],
        keys: &[(UserId, IdempotencyKey)],
        now: DateTime<Utc>,
    ) -> Result<Box<dyn BatchTransaction>, StepError>;
}

/// What a batch's transaction read when it began.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchRead {
    /// The batch's users that exist, in any order.
    pub users: Vec<User>,
    /// The live completed records of the batch's keys, in any order.
    pub records: Vec<CompletedRecord>,
}

/// A batch's transaction, begun by [`BalanceStore::begin_batch`].
#[async_trait]
pub trait BatchTransaction: Send {
    /// What the transaction read when it began.
    fn read(&self) -> &BatchRead;

    /// Writes `batch` and commits: every user's row (balance and version), every ledger
    /// entry (in the batch's order) and every key's record (APPLIED with its ledger
    /// entry, REFUSED without one); nothing at all when an error is returned. An empty
    /// `batch` ends the transaction with nothing written.
    ///
    /// # Errors
    /// - MUST return [`StepError::VersionConflict`] (or [`StepError::UserNotFound`]) when a
    ///   users row is missing or not at its `expected_version`;
    /// - MUST return [`StepError::KeyTaken`] when a live record exists for one of the
    ///   keys; MAY return it for an expired one too (the use case then runs the batch's
    ///   requests one by one, and each of those replaces an expired record);
    /// - MUST return [`StepError::Unavailable`] when the store cannot be reached or the
    ///   commit failed with an unknown outcome; MAY return [`StepError::Aborted`] only
    ///   when nothing was committed.
    async fn commit(self: Box<Self>, batch: &BatchStep) -> Result<(), StepError>;
}

// ---------------------------------------------------------------------------------------
// The coupon admission gate
// ---------------------------------------------------------------------------------------

/// What the gate is built from (and checked against): the database's coupon and holders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GateSnapshot {
    pub coupon: Coupon,
    /// Every user issued the coupon, with the key that issued it.
    pub holders: Vec<(UserId, IdempotencyKey)>,
}

/// A request to the gate for one unit of a coupon.
#[derive(Debug, Clone)]
pub struct GateRequest {
    pub coupon: CouponId,
    pub user: UserId,
    pub key: IdempotencyKey,
    pub fingerprint: Fingerprint,
    /// Names this admission, so only it can give its unit back.
    pub token: String,
    pub now: DateTime<Utc>,
}

/// Which refusal the gate decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateRefusal {
    SoldOut,
    AlreadyIssued,
    NotOpen,
}

/// What the gate said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GateAnswer {
    /// The gate has no state for this coupon: rebuild it from the database and ask again.
    Missing,
    /// A unit is reserved for this request (pending under its token): run the database
    /// step, then [`CouponGate::confirm`] or [`CouponGate::give_back`].
    Admitted,
    /// The gate cannot answer for this request (the user holds a unit under this very key,
    /// issued or pending, or a pending one under another key): run the database step
    /// without a reservation; confirm if it issued.
    Pass,
    /// The gate refuses the request (and records nothing: the service stores the refusal
    /// in the database, then [`CouponGate::record`]s it); `stale` says a unit has been
    /// pending longer than it should (its holder may be gone), so the gate should be
    /// rebuilt before it is trusted with a sold-out answer.
    Refused { refusal: GateRefusal, stale: bool },
    /// The key was answered by the gate before: its recorded response.
    Replay {
        response: StoredResponse,
        expires_at: DateTime<Utc>,
    },
    /// The key was answered by the gate before, for another request.
    Reused,
}

#[derive(Debug, thiserror::Error)]
pub enum GateError {
    /// The gate's backend cannot be reached; `LOCK_ON_REDIS_DOWN` decides what happens.
    #[error("the admission gate is unavailable")]
    Unavailable(#[source] anyhow::Error),
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

/// The gate's state of one coupon, for the audit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GateView {
    pub total: u32,
    /// Units issued or pending, as the gate counts them.
    pub taken: u32,
    pub issue_starts_at: DateTime<Utc>,
    pub issue_ends_at: Option<DateTime<Utc>>,
    /// Users the gate holds as issued, with the key that issued them.
    pub issued: Vec<(UserId, IdempotencyKey)>,
    /// Users with a unit pending, and since when.
    pub pending: Vec<(UserId, DateTime<Utc>)>,
}

/// A fast, shared admission gate in front of the database's coupon step: it answers
/// "sold out", "already issued" and "not open" (and replays them) without touching the
/// database, and lets through at most the stock it knows of. It is never the truth: it is
/// built from a [`GateSnapshot`], and the database step decides every unit it admits.
#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
#[async_trait]
pub trait CouponGate: Send + Sync {
    /// Decides `request` atomically: replay or reuse of a key it has a record of, pass, a
    /// refusal (not recorded), or a unit reserved under the token.
    ///
    /// # Errors
    /// MUST return [`GateError::Unavailable`] when the backend cannot be reached.
    async fn admit(&self, request: &GateRequest) -> Result<GateAnswer, GateError>;

    /// The user was issued the coupon under `key` (the step committed): held as issued
    /// from now on, counted once whether or not its unit was pending here.
    ///
    /// # Errors
    /// MUST return [`GateError::Unavailable`] when the backend cannot be reached.
    async fn confirm(
        &self,
        coupon: CouponId,
        user: UserId,
        key: &IdempotencyKey,
    ) -> Result<(), GateError>;

    /// Records `response` under (`user`, `key`) until `expires_at`, as if the gate had
    /// answered it, unless a record is there already: a refusal the database step stored,
    /// so that its replays come from the gate too (the gate would otherwise decide such a
    /// key afresh: the same bytes, not marked as a replay).
    ///
    /// # Errors
    /// MUST return [`GateError::Unavailable`] when the backend cannot be reached.
    #[allow(clippy::too_many_arguments)]
    async fn record(
        &self,
        coupon: CouponId,
        user: UserId,
        key: &IdempotencyKey,
        fingerprint: &Fingerprint,
        response: &StoredResponse,
        now: DateTime<Utc>,
        expires_at: DateTime<Utc>,
    ) -> Result<(), GateError>;

    /// Nothing was issued to the admission of `token`: its unit is free again. A unit
    /// not pending under that token (confirmed, given back, or rebuilt away) is left alone.
    ///
    /// # Errors
    /// MUST return [`GateError::Unavailable`] when the backend cannot be reached.
    async fn give_back(&self, coupon: CouponId, user: UserId, token: &str)
    -> Result<(), GateError>;

    /// Replaces the coupon's state with `snapshot`, keeping units pending for less than
    /// `stale_after` of users the snapshot does not hold (their steps may still commit).
    ///
    /// # Errors
    /// MUST return [`GateError::Unavailable`] when the backend cannot be reached.
    async fn load(
        &self,
        snapshot: &GateSnapshot,
        now: DateTime<Utc>,
        stale_after: Duration,
    ) -> Result<(), GateError>;

    /// Drops the coupon's state (it disagreed with the database); the next request
    /// rebuilds it. Recorded refusals stay.
    ///
    /// # Errors
    /// MUST return [`GateError::Unavailable`] when the backend cannot be reached.
    async fn forget(&self, coupon: CouponId) -> Result<(), GateError>;

    /// The coupon's state, or `None` when the gate has none.
    ///
    /// # Errors
    /// MUST return [`GateError::Unavailable`] when the backend cannot be reached.
    async fn inspect(&self, coupon: CouponId) -> Result<Option<GateView>, GateError>;
}

// ---------------------------------------------------------------------------------------
// Presentation and time
// ---------------------------------------------------------------------------------------

/// Turns an outcome into the exact status and bytes that are sent and stored. Implemented
/// by the HTTP adapter: the domain decides what happened, the adapter how it reads.
#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
pub trait ResponseEncoder: Send + Sync {
    fn encode(&self, outcome: &Outcome) -> StoredResponse;
}

/// The time source. Instants are UTC and truncated to milliseconds, the precision stored.
#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
pub trait Clock: Send + Sync {
    fn now(&self) -> DateTime<Utc>;
}

/// The wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        crate::time::truncate_to_millis(Utc::now())
    }
}

// ---------------------------------------------------------------------------------------
// Reconciliation
// ---------------------------------------------------------------------------------------

/// One broken invariant found by the audit. `subject` names the row(s) (`user 7`,
/// `order 12`, `user 3 key abc`); `detail` says what was expected and what was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Breach {
    pub check: AuditCheck,
    pub subject: String,
    pub detail: String,
}

/// The invariants the audit checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AuditCheck {
    /// A user's balance equals the signed sum of its ledger (CHARGE/REFUND +, USE/PAYMENT −),
    /// and the newest entry's `balance_after` equals the balance.
    BalanceMatchesLedger,
    /// A stored success has exactly one ledger entry (same user, key and instant); a
    /// stored refusal has none.
    RecordHasOneEffect,
    /// No key was applied twice within its retention: two ledger entries of one user and
    /// key are at least the idempotency TTL apart.
    KeyAppliedOnce,
    /// No idempotency record is stuck in flight past the lock lease.
    NoRecordStuckInFlight,
    /// Every PAID or REFUNDED order has exactly one payment (with its PAYMENT ledger
    /// entry), every payment's order is PAID or REFUNDED, and the order is REFUNDED
    /// exactly when its payment is refunded in full; a PENDING or CANCELLED order has none.
    PaidOrderHasOnePayment,
    /// A payment's refunds add up to its refunded total, which is at most its amount, and
    /// each refund has its REFUND ledger entry (same user, key, amount and instant).
    RefundsMatchPayment,
    /// A coupon's issued count equals its user coupons, is at most its stock, and no user
    /// holds two of one coupon. (An APPLIED COUPON_ISSUE record's user coupon is
    /// [`AuditCheck::RecordHasOneEffect`]'s: records expire, user coupons stay.)
    CouponStockMatchesIssued,
    /// A used user coupon belongs to a live payment of its user with that coupon (not
    /// refunded in full), and every payment with a coupon holds it.
    CouponUseMatchesPayment,
    /// The Redis admission gate agrees with the database: its stock and window are the
    /// coupon's, every user it holds as issued is issued under that key, every issued user
    /// is held, and its count is what it holds. (Checked by the service's audit with both
    /// backends at hand; a store's auditor never reports it.)
    CouponGateMatchesDatabase,
}

impl AuditCheck {
    pub const ALL: [AuditCheck; 9] = [
        AuditCheck::BalanceMatchesLedger,
        AuditCheck::RecordHasOneEffect,
        AuditCheck::KeyAppliedOnce,
        AuditCheck::NoRecordStuckInFlight,
        AuditCheck::PaidOrderHasOnePayment,
        AuditCheck::RefundsMatchPayment,
        AuditCheck::CouponStockMatchesIssued,
        AuditCheck::CouponUseMatchesPayment,
        AuditCheck::CouponGateMatchesDatabase,
    ];

    pub fn name(self) -> &'static str {
        match self {
            AuditCheck::BalanceMatchesLedger => "balance_matches_ledger",
            AuditCheck::RecordHasOneEffect => "record_has_one_effect",
            AuditCheck::KeyAppliedOnce => "key_applied_once",
            AuditCheck::NoRecordStuckInFlight => "no_record_stuck_in_flight",
            AuditCheck::PaidOrderHasOnePayment => "paid_order_has_one_payment",
            AuditCheck::RefundsMatchPayment => "refunds_match_payment",
            AuditCheck::CouponStockMatchesIssued => "coupon_stock_matches_issued",
            AuditCheck::CouponUseMatchesPayment => "coupon_use_matches_payment",
            AuditCheck::CouponGateMatchesDatabase => "coupon_gate_matches_database",
        }
    }
}

/// What an audit looked at and what it found.
///
/// A broken database can hold millions of breaches; the report lists at most
/// [`AuditReport::LISTED_PER_CHECK`] of each check in `breaches` and counts them all in
/// `found`. Build it with [`AuditReport::add`] / [`AuditReport::add_found`], which keep
/// both in step.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditReport {
    pub users: u64,
    pub ledger_entries: u64,
    pub records: u64,
    pub orders: u64,
    pub payments: u64,
    pub refunds: u64,
    pub coupons: u64,
    pub user_coupons: u64,
    /// The breaches listed, at most [`AuditReport::LISTED_PER_CHECK`] per check.
    pub breaches: Vec<Breach>,
    /// How many breaches each check found, listed or not. Only checks that found some
    /// have an entry.
    pub found: BTreeMap<AuditCheck, u64>,
}

impl AuditReport {
    /// How many breaches of one check are listed; the rest are only counted.
    pub const LISTED_PER_CHECK: usize = 100;

    pub fn is_clean(&self) -> bool {
        self.breaches.is_empty() && self.found.values().all(|n| *n == 0)
    }

    /// How many breaches `check` found (at least as many as are listed).
    pub fn found(&self, check: AuditCheck) -> u64 {
        let listed = self.listed(check).count() as u64;
        self.found.get(&check).copied().unwrap_or(0).max(listed)
    }

    /// How many breaches all checks found.
    pub fn total_found(&self) -> u64 {
        AuditCheck::ALL.iter().map(|check| self.found(*check)).sum()
    }

    /// The listed breaches of `check`.
    pub fn listed(&self, check: AuditCheck) -> impl Iterator<Item = &Breach> {
        self.breaches.iter().filter(move |b| b.check == check)
    }

    /// Counts one breach, and lists it while its check has found fewer than the cap.
    pub fn add(&mut self, breach: Breach) {
        let found = self.found.entry(breach.check).or_insert(0);
        *found += 1;
        if *found <= Self::LISTED_PER_CHECK as u64 {
            self.breaches.push(breach);
        }
    }

    /// Counts `total` breaches of `check`, of which `listed` are the ones to list (a
    /// query that stopped at the cap; any beyond the cap are dropped). `listed` must be
    /// breaches of `check`.
    pub fn add_found(
        &mut self,
        check: AuditCheck,
        total: u64,
        listed: impl IntoIterator<Item = Breach>,
    ) {
        let room = Self::LISTED_PER_CHECK.saturating_sub(self.listed(check).count());
        let mut shown = 0_u64;
        for breach in listed.into_iter().take(room) {
            debug_assert_eq!(breach.check, check, "a breach added under another check");
            self.breaches.push(breach);
            shown += 1;
        }
        let found = total.max(shown);
        if found > 0 {
            *self.found.entry(check).or_insert(0) += found;
        }
    }
}

/// Reconciliation of the books: reads everything, changes nothing.
#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
#[async_trait]
pub trait Auditor: Send + Sync {
    /// Checks every [`AuditCheck`] over the committed state. `key_ttl` is the idempotency
    /// retention (two uses of one key closer than that are a double application);
    /// `lease` is the lock lease (an in-flight record older than that is stuck).
    ///
    /// # Errors
    /// MUST return [`RepoError::Unavailable`] when the store cannot be reached.
    async fn audit(
        &self,
        key_ttl: Duration,
        lease: Duration,
        now: DateTime<Utc>,
    ) -> Result<AuditReport, RepoError>;
}
