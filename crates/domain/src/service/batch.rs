//! Group commit: charges and uses that queue while a transaction commits are written
//! together in the next one.
//!
//! Every batchable request ([`Operation::batchable`]: charges and uses) claims its key
//! in this instance, as any request does, and joins its lane's queue: its user's own, or
//! with `across_users` the instance's one. When no batch is running in the lane,
//! the request's own batch starts at once, alone: nothing waits for company, there is no
//! timer. While a batch runs, arrivals queue; when it has committed, the next batch takes
//! everything queued (at most `max_batch`):
//!
//! 1. **locks**: the lock of each of its users is tried at once, all sent together (one
//!    round trip on a pipelined connection; on a cluster each to its slot's node). A user
//!    whose lock is held elsewhere leaves the batch: its requests wait for that one lock
//!    on their own, holding no other (so two batches never wait on each other);
//! 2. **read**, as the batch's transaction begins
//!    ([`crate::ports::BalanceStore::begin_batch`]): its users (their rows locked, on a
//!    database, without waiting) and its keys' records, together;
//! 3. **decide**: each request in arrival order against its user's running balance; a
//!    replay answers its stored record, a refusal is stored for that request alone, a
//!    second request with a key already in the batch waits for the first and replays it;
//! 4. **write** and commit that transaction ([`crate::ports::BatchTransaction::commit`]):
//!    each user's row once, guarded by the version read in 2, every ledger entry and
//!    record;
//! 5. **answer** each request, then release the locks (held across the commit) while
//!    the next batch takes its own (step 1).
//!
//! A transaction that fails does not fail the requests in it: they are run again one by
//! one under the same locks, on the ordinary path (fresh read, own retries), and each gets
//! the answer it would have got alone. Only a commit of unknown outcome (the store
//! unreachable) is answered 503 to all: the batch may have committed, and each client's
//! retry with its key replays or runs afresh, as after any 503.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures_util::future::{join, join_all};
use tokio::sync::oneshot;

use super::{BalanceService, Execution, GroupCommit, HeldLock};
use crate::claims::Claim;
use crate::error::OperationError;
use crate::idempotency::{
    Admission, CompletedRecord, Fingerprint, KeyState, RecordOutcome, StoredResponse,
};
use crate::model::User;
use crate::operations::{AppliedEffect, Decline, Operation, State};
use crate::outcome::Outcome;
use crate::ports::{
    Assigned, BatchRead, BatchStep, BatchWrite, KeyRecord, LockError, LockKey, ResponseEncoder,
    StepError, UserBatch,
};
use crate::telemetry as m;
use crate::types::{IdempotencyKey, Limits, UserId};

type Reply = Result<Execution, OperationError>;

/// A request waiting for its batch.
#[derive(Debug)]
struct Pending {
    op: Arc<dyn Operation>,
    fingerprint: Fingerprint,
    /// The key's in-flight claim: held until the request is answered.
    _claim: Claim,
    queued_at: Instant,
    reply: oneshot::Sender<Reply>,
}

impl Pending {
    fn answer(self, reply: Reply) {
        let Pending {
            _claim: claim,
            reply: answered,
            ..
        } = self;
        // The key is free again before the client hears of it, so its retry (or a lookup)
        // right after the answer finds the record, not the request in flight.
        drop(claim);
        // The client may have gone away; what was written stays written and replays.
        let _ = answered.send(reply);
    }
}

/// Which queue a request joins: its user's own, or (across users) the instance's one.
type Lane = Option<UserId>;

/// The queues of this instance's batches, one per lane; a lane with no entry has no drain.
#[derive(Debug, Clone, Default)]
pub(super) struct Committer {
    lanes: Arc<Mutex<HashMap<Lane, VecDeque<Pending>>>>,
}

impl Committer {
    fn lanes(&self) -> MutexGuard<'_, HashMap<Lane, VecDeque<Pending>>> {
        // Only short, non-panicking sections hold it; poisoned, the map is still consistent.
        self.lanes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `pending` in `lane`; true when the lane has no drain, so the caller starts one.
    fn push(&self, lane: Lane, pending: Pending) -> bool {
        let mut lanes = self.lanes();
        let mut started = false;
        let queue = lanes.entry(lane).or_insert_with(|| {
            started = true;
            VecDeque::new()
        });
        queue.push_back(pending);
        started
    }

    /// Queues `group` in `lane` when the lane has a drain; gives it back when it has none.
    fn join(&self, lane: Lane, group: Vec<Pending>) -> Option<Vec<Pending>> {
        match self.lanes().get_mut(&lane) {
            Some(queue) => {
                queue.extend(group);
                None
            }
            None => Some(group),
        }
    }

    /// The lane's next batch: what queued, at most `max`. When nothing did and `end` is
    /// true, the lane and its drain end (in the same critical section, so a request queued
    /// after this starts a new one); with `end` false the lane stays, and what queues in it
    /// is for this drain still.
    fn next_batch(&self, lane: Lane, max: usize, end: bool) -> Vec<Pending> {
        let mut lanes = self.lanes();
        let Some(queue) = lanes.get_mut(&lane) else {
            return Vec::new();
        };
        if queue.is_empty() {
            if end {
                lanes.remove(&lane);
            }
            return Vec::new();
        }
        let take = queue.len().min(max.max(1));
        queue.drain(..take).collect()
    }

    /// Ends the lane: its queue, which nobody takes then (a drain that stopped by a panic,
    /// or a detour's one pass done).
    fn abandon(&self, lane: Lane) -> Vec<Pending> {
        self.lanes()
            .remove(&lane)
            .map(Vec::from)
            .unwrap_or_default()
    }

    pub(super) fn queued(&self) -> usize {
        self.lanes().values().map(VecDeque::len).sum()
    }
}

/// Answers what is queued if the drain ends by a panic, so no request waits forever and
/// the next one starts a new drain.
struct DrainGuard {
    committer: Committer,
    lane: Lane,
    finished: bool,
}

impl Drop for DrainGuard {
    fn drop(&mut self) {
        if !self.finished {
            for pending in self.committer.abandon(self.lane) {
                pending.answer(Err(OperationError::Unexpected(anyhow::anyhow!(
                    "the batch runner stopped before this request's batch"
                ))));
            }
        }
    }
}

/// One user's requests of a batch, with the user's lock (`None`: going on without the
/// lock service, as its policy allows).
struct Group {
    user: UserId,
    pending: Vec<Pending>,
    lock: Option<HeldLock>,
}

/// What trying a user's lock without waiting found.
enum TryLock {
    /// Ours (`None`: the lock service is down and the policy goes on without it).
    Held(Option<HeldLock>),
    /// Held by somebody else.
    Busy,
}

/// How a request of a batch is answered.
#[derive(Debug)]
enum Answer {
    /// Decided without a write: a replay, a reused key, a missing user.
    Now(Reply),
    /// Its record (and ledger entry) is in the batch's transaction.
    Written {
        response: StoredResponse,
        outcome: RecordOutcome,
    },
    /// Its key is written by an earlier request of the batch (at this index), with the
    /// same fingerprint: it replays that one's answer.
    SameAs(usize),
}

impl BalanceService {
    /// The path of a batchable request: claim, queue, wait for the batch's answer.
    pub(super) async fn submit(&self, op: Arc<dyn Operation>) -> Reply {
        let fingerprint = op.fingerprint();
        let user = op.user();
        let claim = self
            .claims
            .claim(op.user(), op.key(), &fingerprint)
            .map_err(|refusal| self.refused_admission(op.kind(), refusal))?;
        let (reply, answered) = oneshot::channel();
        let pending = Pending {
            op,
            fingerprint,
            _claim: claim,
            queued_at: Instant::now(),
            reply,
        };
        self.enqueue(user, pending);
        answered.await.unwrap_or_else(|_| {
            Err(OperationError::Unexpected(anyhow::anyhow!(
                "the request's batch ended without answering it"
            )))
        })
    }

    /// Queues `pending` (of `user`) for its lane's next batch, starting the lane's drain
    /// when it has none.
    fn enqueue(&self, user: UserId, pending: Pending) {
        let lane = match self.settings.group_commit {
            GroupCommit::On {
                across_users: true, ..
            } => None,
            _ => Some(user),
        };
        if self.committer.push(lane, pending) {
            // Spawned, so a client that goes away cancels nothing of a batch.
            let service = self.clone();
            tokio::spawn(async move { service.drain(lane).await });
        }
    }

    fn max_batch(&self) -> usize {
        match self.settings.group_commit {
            GroupCommit::On { max_batch, .. } => max_batch,
            GroupCommit::Off => 1,
        }
    }

    /// Runs the lane's batches until nothing is queued in it.
    ///
    /// A batch's locks are released while the next batch takes its own (one round trip
    /// for both, not one after the other): the next batch starts as soon as the last one
    /// is answered. The lock of a user in both is released first and taken again, as
    /// before; when nothing is queued, the locks are released before the lane can end, so
    /// a request that starts the next drain never finds its user's lock still held by this
    /// one (a user's requests running one by one after a failed batch hold their lock in a
    /// task of their own).
    async fn drain(self, lane: Lane) {
        let mut guard = DrainGuard {
            committer: self.committer.clone(),
            lane,
            finished: false,
        };
        let mut held: BTreeMap<UserId, HeldLock> = BTreeMap::new();
        loop {
            let batch = self
                .committer
                .next_batch(lane, self.max_batch(), held.is_empty());
            if !batch.is_empty() {
                held = self.commit_batch(batch, std::mem::take(&mut held)).await;
            } else if held.is_empty() {
                guard.finished = true;
                return;
            } else {
                release_all(std::mem::take(&mut held)).await;
            }
        }
    }

    /// Runs `batch`, releasing the locks of the last one (`previous`) meanwhile; returns
    /// the locks it holds still, for the caller to release.
    async fn commit_batch(
        &self,
        batch: Vec<Pending>,
        mut previous: BTreeMap<UserId, HeldLock>,
    ) -> BTreeMap<UserId, HeldLock> {
        let mut by_user: BTreeMap<UserId, Vec<Pending>> = BTreeMap::new();
        for pending in batch {
            metrics::histogram!(m::BATCH_QUEUED_SECONDS)
                .record(pending.queued_at.elapsed().as_secs_f64());
            by_user.entry(pending.op.user()).or_default().push(pending);
        }
        // A user whose requests run one by one here (its last batch failed) has its new
        // ones wait for that task, which hands them back to the queue when it is done:
        // whether the lock is held or gone (the lock service down under `degrade`), a row
        // held elsewhere costs its user one connection, not one per batch that met it.
        let by_user: BTreeMap<UserId, Vec<Pending>> = by_user
            .into_iter()
            .filter_map(|(user, group)| {
                self.detours
                    .join(Some(user), group)
                    .map(|group| (user, group))
            })
            .collect();
        let again: Vec<(UserId, Option<HeldLock>)> = by_user
            .keys()
            .map(|user| (*user, previous.remove(user)))
            .collect();
        let (tried, ()) = join(
            join_all(again.into_iter().map(|(user, last)| async move {
                if let Some(last) = last {
                    last.release().await;
                }
                self.try_lock_user(user).await
            })),
            release_all(previous),
        )
        .await;
        let mut ready = Vec::with_capacity(by_user.len());
        for ((user, pending), tried) in by_user.into_iter().zip(tried) {
            match tried {
                Ok(TryLock::Held(lock)) => ready.push(Group {
                    user,
                    pending,
                    lock,
                }),
                Ok(TryLock::Busy) => {
                    // Held by another instance (or a request here that is not batched):
                    // replays answer at once; the rest wait for that lock alone, holding
                    // no other.
                    let service = self.clone();
                    tokio::spawn(async move {
                        let rest = service.answer_replays(pending).await;
                        if !rest.is_empty() {
                            service.commit_alone(user, rest).await;
                        }
                    });
                }
                Err(error) => {
                    // The lock cannot be had (its service is down under `fail`): replays
                    // still answer, as they take no lock; the rest get the error.
                    let service = self.clone();
                    tokio::spawn(async move {
                        let rest = service.answer_replays(pending).await;
                        answer_all(rest, &error);
                    });
                }
            }
        }
        self.commit_locked(ready).await
    }

    /// Answers, from a read without the lock, the requests whose key has a stored record
    /// (a replay, or 422 reused), as the one-request path does before its lock; returns
    /// the others. On a failed read all are returned: their own path reads again.
    async fn answer_replays(&self, group: Vec<Pending>) -> Vec<Pending> {
        let now = self.ports.clock.now();
        let keys: Vec<(UserId, IdempotencyKey)> = group
            .iter()
            .map(|p| (p.op.user(), p.op.key().clone()))
            .collect();
        let Ok(records) = self.ports.keys.find_many(&keys, now).await else {
            return group;
        };
        let mut rest = Vec::with_capacity(group.len());
        for pending in group {
            let record = records
                .iter()
                .find(|r| r.user_id == pending.op.user() && &r.key == pending.op.key());
            let Some(record) = record else {
                rest.push(pending);
                continue;
            };
            let label = pending.op.kind().label();
            match KeyState::Completed(record.clone()).admit(&pending.fingerprint, now) {
                Admission::Run => rest.push(pending),
                Admission::Replay(response) => {
                    metrics::counter!(m::IDEMPOTENT_REPLAYS_TOTAL, "operation" => label)
                        .increment(1);
                    let expires_at = record.expires_at;
                    pending.answer(Ok(Execution {
                        response,
                        replayed: true,
                        expires_at,
                    }));
                }
                Admission::Reused | Admission::InUse => {
                    metrics::counter!(m::IDEMPOTENCY_REUSED_TOTAL, "operation" => label)
                        .increment(1);
                    pending.answer(Err(OperationError::KeyReused));
                }
            }
        }
        rest
    }

    /// One user's requests whose lock was busy: waited for as any request waits for it.
    async fn commit_alone(&self, user: UserId, group: Vec<Pending>) {
        match self.lock_user(user).await {
            Ok(lock) => {
                let held = self
                    .commit_locked(vec![Group {
                        user,
                        pending: group,
                        lock,
                    }])
                    .await;
                release_all(held).await;
            }
            Err(error) => answer_all(group, &error),
        }
    }

    /// Takes the user's lock if it is free, without waiting.
    async fn try_lock_user(&self, user: UserId) -> Result<TryLock, OperationError> {
        let key = LockKey::user_balance(user);
        let acquired = self
            .ports
            .locks
            .acquire(&key, Duration::ZERO, self.settings.lock_lease)
            .await;
        match acquired {
            Ok(lease) => {
                metrics::counter!(m::LOCK_ACQUIRED_TOTAL).increment(1);
                Ok(TryLock::Held(Some(HeldLock {
                    locks: Arc::clone(&self.ports.locks),
                    lease: Some(lease),
                })))
            }
            Err(LockError::Timeout) => Ok(TryLock::Busy),
            Err(LockError::Unavailable(cause)) => {
                self.lock_unavailable(&key, cause).map(TryLock::Held)
            }
            Err(LockError::Unexpected(cause)) => Err(OperationError::Unexpected(cause)),
        }
    }

    /// Reads, decides, writes and answers `groups` (one per user, ascending) under their
    /// locks; returns the locks, for the caller to release. When the batch's transaction
    /// failed, the users whose requests are to run alone keep their lock until those have:
    /// across users, off the lane ([`Self::detour`]), so a row held elsewhere holds up only
    /// its own user; in a user's own lane, before this returns.
    async fn commit_locked(&self, groups: Vec<Group>) -> BTreeMap<UserId, HeldLock> {
        let size: usize = groups.iter().map(|g| g.pending.len()).sum();
        if size == 0 {
            return groups
                .into_iter()
                .filter_map(|g| g.lock.map(|lock| (g.user, lock)))
                .collect();
        }
        metrics::histogram!(m::BATCH_SIZE).record(size as f64);
        metrics::counter!(m::BATCHES_TOTAL).increment(1);
        let mut locks = BTreeMap::new();
        let mut batch = Vec::with_capacity(size);
        for group in groups {
            locks.extend(group.lock.map(|lock| (group.user, lock)));
            batch.extend(group.pending);
        }
        let alone = self.write_and_answer(batch).await;
        let mut by_user: BTreeMap<UserId, Vec<Pending>> = BTreeMap::new();
        for pending in alone {
            by_user.entry(pending.op.user()).or_default().push(pending);
        }
        let across_users = matches!(
            self.settings.group_commit,
            GroupCommit::On {
                across_users: true,
                ..
            }
        );
        let mut running = Vec::with_capacity(by_user.len());
        for (user, group) in by_user {
            let lock = locks.remove(&user);
            if across_users {
                self.detour(user, group, lock);
            } else {
                running.push(async move {
                    self.one_by_one(group).await;
                    if let Some(lock) = lock {
                        lock.release().await;
                    }
                });
            }
        }
        join_all(running).await;
        locks
    }

    /// Returns the requests to run again one by one (the batch's transaction failed).
    async fn write_and_answer(&self, batch: Vec<Pending>) -> Vec<Pending> {
        let now = self.ports.clock.now();
        let mut ids: Vec<UserId> = batch.iter().map(|p| p.op.user()).collect();
        ids.dedup();
        let keys: Vec<(UserId, IdempotencyKey)> = batch
            .iter()
            .map(|p| (p.op.user(), p.op.key().clone()))
            .collect();
        let tx = match self.ports.store.begin_batch(&ids, &keys, now).await {
            Ok(tx) => tx,
            Err(StepError::Unavailable(cause)) => {
                // Nothing was written; each client's retry runs afresh.
                answer_all(batch, &OperationError::Unavailable(cause));
                return Vec::new();
            }
            Err(failed) => {
                // A users row held elsewhere, or the transaction aborted before it read:
                // alone, each request waits for its own row and retries on its own.
                return self.fall_back(batch, None, &failed);
            }
        };
        let expires_at = self.record_expiry(now);
        let (step, answers) = {
            let items: Vec<(&dyn Operation, &Fingerprint)> = batch
                .iter()
                .map(|p| (p.op.as_ref(), &p.fingerprint))
                .collect();
            plan(
                &items,
                &Read {
                    data: tx.read(),
                    now,
                    expires_at,
                },
                &self.settings.limits,
                self.ports.encoder.as_ref(),
            )
        };
        if step.is_empty() {
            // Replays and refusals decided without a write: answered before the
            // transaction ends (it wrote nothing; ending it only frees its rows).
            self.answer(batch, answers, expires_at);
            if let Err(e) = tx.commit(&step).await {
                tracing::debug!(error = %e, "ending a batch transaction that wrote nothing failed");
            }
            return Vec::new();
        }
        match tx.commit(&step).await {
            Ok(()) => {
                self.answer(batch, answers, expires_at);
                Vec::new()
            }
            Err(StepError::Unavailable(cause)) => {
                // The commit's outcome is unknown: every written request may have happened.
                let error = OperationError::Unavailable(cause);
                for (pending, answer) in batch.into_iter().zip(answers) {
                    match answer {
                        Answer::Now(reply) => pending.answer(reply),
                        Answer::Written { .. } | Answer::SameAs(_) => {
                            pending.answer(Err(again(&error)));
                        }
                    }
                }
                Vec::new()
            }
            Err(failed) => self.fall_back(batch, Some(answers), &failed),
        }
    }

    /// After a failed batch transaction, which wrote nothing: answers what was decided
    /// without a write (`answers`, when the batch got as far as deciding) and returns the
    /// rest, to run again one by one.
    fn fall_back(
        &self,
        batch: Vec<Pending>,
        answers: Option<Vec<Answer>>,
        failed: &StepError,
    ) -> Vec<Pending> {
        metrics::counter!(m::BATCH_FALLBACKS_TOTAL).increment(1);
        tracing::info!(requests = batch.len(), error = %failed,
            "the batch's transaction failed; running its requests one by one");
        let Some(answers) = answers else {
            return batch;
        };
        let mut alone = Vec::with_capacity(batch.len());
        for (pending, answer) in batch.into_iter().zip(answers) {
            match answer {
                Answer::Now(reply) => pending.answer(reply),
                Answer::Written { .. } | Answer::SameAs(_) => alone.push(pending),
            }
        }
        alone
    }

    /// Answers a committed batch.
    fn answer(&self, batch: Vec<Pending>, answers: Vec<Answer>, expires_at: DateTime<Utc>) {
        let responses: Vec<Option<StoredResponse>> = answers
            .iter()
            .map(|answer| match answer {
                Answer::Written { response, .. } => Some(response.clone()),
                _ => None,
            })
            .collect();
        for (pending, answer) in batch.into_iter().zip(answers) {
            let label = pending.op.kind().label();
            let reply = match answer {
                Answer::Now(reply) => reply,
                Answer::Written { response, outcome } => {
                    let counter = match outcome {
                        RecordOutcome::Applied => m::OPERATIONS_APPLIED_TOTAL,
                        RecordOutcome::Refused => m::OPERATIONS_REFUSED_TOTAL,
                    };
                    metrics::counter!(counter, "operation" => label).increment(1);
                    Ok(Execution {
                        response,
                        replayed: false,
                        expires_at,
                    })
                }
                Answer::SameAs(first) => match responses.get(first).cloned().flatten() {
                    Some(response) => {
                        metrics::counter!(m::IDEMPOTENT_REPLAYS_TOTAL, "operation" => label)
                            .increment(1);
                        Ok(Execution {
                            response,
                            replayed: true,
                            expires_at,
                        })
                    }
                    None => Err(OperationError::Unexpected(anyhow::anyhow!(
                        "a duplicate in a batch points at no written request"
                    ))),
                },
            };
            pending.answer(reply);
        }
    }

    /// Runs `group` one by one in a task of the user's own, off the instance's queue, with
    /// the user's lock; the user's requests that the queue takes meanwhile wait in it (see
    /// `commit_batch`), then go back to the queue when the lock is released.
    fn detour(&self, user: UserId, group: Vec<Pending>, lock: Option<HeldLock>) {
        let lane = Some(user);
        let mut started = false;
        for pending in group {
            started |= self.detours.push(lane, pending);
        }
        if !started {
            // The user's requests run one by one here already (which only two holders of
            // its lock in one instance could bring about: the lock service down, or a
            // lease lost); that task runs these too.
            if let Some(lock) = lock {
                tokio::spawn(lock.release());
            }
            return;
        }
        let service = self.clone();
        tokio::spawn(async move {
            let mut guard = DrainGuard {
                committer: service.detours.clone(),
                lane,
                finished: false,
            };
            let group = service.detours.next_batch(lane, usize::MAX, true);
            service.one_by_one(group).await;
            // One pass: what joined meanwhile goes back to batching (after the lock is
            // free, so its batch can take it), and the detour ends. A detour that took
            // every new request of a busy user would never end, one by one, under a lease
            // nobody renews.
            let joined = service.detours.abandon(lane);
            guard.finished = true;
            if let Some(lock) = lock {
                lock.release().await;
            }
            for pending in joined {
                service.enqueue(user, pending);
            }
        });
    }

    /// After a failed batch transaction: one user's written requests again, alone and in
    /// order, on the ordinary path (each its own fresh read and retries), under the user's
    /// lock still held.
    async fn one_by_one(&self, group: Vec<Pending>) {
        for pending in group {
            let reply = self
                .apply_with_retries(&pending.op, &pending.fingerprint)
                .await
                .map(|(execution, _)| execution);
            pending.answer(reply);
        }
    }
}

/// Releases `locks`, all at once.
async fn release_all(locks: BTreeMap<UserId, HeldLock>) {
    join_all(locks.into_values().map(HeldLock::release)).await;
}

/// Answers every request of `group` with (a copy of) `error`.
fn answer_all(group: Vec<Pending>, error: &OperationError) {
    for pending in group {
        pending.answer(Err(again(error)));
    }
}

/// The same failure for another request of the batch (the errors carry no clone).
fn again(error: &OperationError) -> OperationError {
    match error {
        OperationError::UserNotFound => OperationError::UserNotFound,
        OperationError::OrderNotFound => OperationError::OrderNotFound,
        OperationError::PaymentNotFound => OperationError::PaymentNotFound,
        OperationError::CouponNotFound => OperationError::CouponNotFound,
        OperationError::RequestNotFound => OperationError::RequestNotFound,
        OperationError::OrderAlreadyPaid => OperationError::OrderAlreadyPaid,
        OperationError::KeyInUse => OperationError::KeyInUse,
        OperationError::KeyReused => OperationError::KeyReused,
        OperationError::LockTimeout => OperationError::LockTimeout,
        OperationError::Unavailable(cause) => {
            OperationError::Unavailable(anyhow::anyhow!("{cause:#}"))
        }
        OperationError::Unexpected(cause) => {
            OperationError::Unexpected(anyhow::anyhow!("{cause:#}"))
        }
    }
}

/// What a batch decides on: its users and its keys' live records, read under its locks
/// (in its transaction), at `now`.
struct Read<'a> {
    data: &'a BatchRead,
    now: DateTime<Utc>,
    /// When the records the batch writes expire.
    expires_at: DateTime<Utc>,
}

/// Decides a batch: `items` in order (ascending user, each user's in arrival order)
/// against each user's running balance. Returns what to write and how to answer each item
/// (aligned with `items`). Pure, apart from the metrics of the answers it decides alone.
fn plan(
    items: &[(&dyn Operation, &Fingerprint)],
    read: &Read<'_>,
    limits: &Limits,
    encoder: &dyn ResponseEncoder,
) -> (BatchStep, Vec<Answer>) {
    let users: HashMap<UserId, &User> = read.data.users.iter().map(|u| (u.id, u)).collect();
    let records: HashMap<(UserId, &str), &CompletedRecord> = read
        .data
        .records
        .iter()
        .map(|r| ((r.user_id, r.key.as_str()), r))
        .collect();
    let mut written: HashMap<(UserId, &str), (usize, &Fingerprint)> = HashMap::new();
    let mut step = BatchStep {
        at: read.now,
        users: Vec::new(),
    };
    let mut answers = Vec::with_capacity(items.len());
    // The user being decided, with its running balance.
    let mut running: Option<(User, UserBatch)> = None;

    for (index, (op, fingerprint)) in items.iter().enumerate() {
        let user_id = op.user();
        if running.as_ref().is_some_and(|(user, _)| user.id != user_id) {
            close(&mut step, running.take());
        }
        if running.is_none() {
            running = users.get(&user_id).map(|user| {
                let batch = UserBatch {
                    user_id,
                    expected_version: user.version,
                    balance_after: user.balance,
                    writes: Vec::new(),
                };
                ((*user).clone(), batch)
            });
        }
        let Some((user, batch)) = running.as_mut() else {
            answers.push(Answer::Now(Err(OperationError::UserNotFound)));
            continue;
        };
        let slot = (user_id, op.key().as_str());
        if let Some(record) = records.get(&slot) {
            let state = KeyState::Completed((*record).clone());
            match state.admit(fingerprint, read.now) {
                Admission::Run => {}
                Admission::Replay(response) => {
                    metrics::counter!(m::IDEMPOTENT_REPLAYS_TOTAL, "operation" => op.kind().label())
                        .increment(1);
                    answers.push(Answer::Now(Ok(Execution {
                        response,
                        replayed: true,
                        expires_at: record.expires_at,
                    })));
                    continue;
                }
                Admission::Reused | Admission::InUse => {
                    metrics::counter!(m::IDEMPOTENCY_REUSED_TOTAL, "operation" => op.kind().label())
                        .increment(1);
                    answers.push(Answer::Now(Err(OperationError::KeyReused)));
                    continue;
                }
            }
        }
        if let Some((first, first_fingerprint)) = written.get(&slot) {
            answers.push(if first_fingerprint == fingerprint {
                Answer::SameAs(*first)
            } else {
                metrics::counter!(m::IDEMPOTENCY_REUSED_TOTAL, "operation" => op.kind().label())
                    .increment(1);
                Answer::Now(Err(OperationError::KeyReused))
            });
            continue;
        }
        let state = State {
            user: user.clone(),
            order: None,
            payment: None,
            coupon: None,
            holding: None,
            user_coupon: None,
            now: read.now,
        };
        let (ledger, response) = match op.decide(&state, limits) {
            Ok(effect) => {
                let Some(ledger) = effect.ledger() else {
                    answers.push(Answer::Now(Err(OperationError::Unexpected(
                        anyhow::anyhow!(
                            "a batched operation decided an effect without a ledger entry"
                        ),
                    ))));
                    continue;
                };
                let response = encoder.encode(&op.outcome(&AppliedEffect {
                    user: user_id,
                    effect,
                    at: read.now,
                    assigned: Assigned {
                        entry_id: None,
                        payment_id: None,
                        refund_id: None,
                        user_coupon_id: None,
                    },
                }));
                user.balance = ledger.1.balance_after;
                (Some(ledger), response)
            }
            Err(Decline::Refused(refusal)) => (None, encoder.encode(&Outcome::Refused(refusal))),
            Err(Decline::OrderNotFound) => {
                answers.push(Answer::Now(Err(OperationError::OrderNotFound)));
                continue;
            }
            Err(Decline::PaymentNotFound) => {
                answers.push(Answer::Now(Err(OperationError::PaymentNotFound)));
                continue;
            }
            Err(Decline::CouponNotFound) => {
                answers.push(Answer::Now(Err(OperationError::CouponNotFound)));
                continue;
            }
        };
        let write = BatchWrite {
            key: KeyRecord {
                key: op.key().clone(),
                fingerprint: (*fingerprint).clone(),
                operation: op.kind(),
                created_at: read.now,
                expires_at: read.expires_at,
            },
            ledger,
            response: response.clone(),
        };
        answers.push(Answer::Written {
            outcome: write.outcome(),
            response,
        });
        batch.balance_after = user.balance;
        batch.writes.push(write);
        written.insert(slot, (index, fingerprint));
    }
    close(&mut step, running);
    (step, answers)
}

/// Adds a decided user to the step, if anything of it is to be written.
fn close(step: &mut BatchStep, decided: Option<(User, UserBatch)>) {
    if let Some((_, batch)) = decided
        && !batch.writes.is_empty()
    {
        step.users.push(batch);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::EntryKind;
    use crate::operations::{Charge, UseBalance};
    use crate::types::{Amount, Balance};

    /// Status 200 for a success, 422 for a refusal; the outcome's text as the body.
    struct TextEncoder;

    impl ResponseEncoder for TextEncoder {
        fn encode(&self, outcome: &Outcome) -> StoredResponse {
            let status = match outcome {
                Outcome::Refused(_) => 422,
                _ => 200,
            };
            StoredResponse {
                status,
                body: format!("{outcome:?}").into_bytes(),
            }
        }
    }

    fn t() -> DateTime<Utc> {
        DateTime::from_timestamp_millis(1_795_356_000_123).unwrap()
    }

    fn limits() -> Limits {
        Limits::new(1_000_000, 5_000_000).unwrap()
    }

    fn id(raw: i64) -> UserId {
        UserId::new(raw).unwrap()
    }

    fn key(raw: &str) -> IdempotencyKey {
        IdempotencyKey::parse(raw).unwrap()
    }

    fn user(raw: i64, balance: i64) -> User {
        User {
            id: id(raw),
            balance: Balance::new(balance, &limits()).unwrap(),
            version: 7,
            created_at: t(),
        }
    }

    fn charge(user: i64, amount: i64, k: &str) -> Arc<dyn Operation> {
        Arc::new(Charge {
            user: id(user),
            amount: Amount::new(amount, &limits()).unwrap(),
            key: key(k),
        })
    }

    fn use_(user: i64, amount: i64, k: &str) -> Arc<dyn Operation> {
        Arc::new(UseBalance {
            user: id(user),
            amount: Amount::new(amount, &limits()).unwrap(),
            key: key(k),
        })
    }

    fn decide(ops: &[Arc<dyn Operation>], data: &BatchRead) -> (BatchStep, Vec<Answer>) {
        let fingerprints: Vec<Fingerprint> = ops.iter().map(|op| op.fingerprint()).collect();
        let items: Vec<(&dyn Operation, &Fingerprint)> = ops
            .iter()
            .zip(&fingerprints)
            .map(|(op, fp)| (op.as_ref(), fp))
            .collect();
        let read = Read {
            data,
            now: t(),
            expires_at: t() + chrono::Duration::days(1),
        };
        plan(&items, &read, &limits(), &TextEncoder)
    }

    fn read(users: Vec<User>, records: Vec<CompletedRecord>) -> BatchRead {
        BatchRead { users, records }
    }

    fn status(answer: &Answer) -> Option<u16> {
        match answer {
            Answer::Written { response, .. } => Some(response.status),
            _ => None,
        }
    }

    #[test]
    fn a_mixed_batch_runs_on_the_running_balance_and_refuses_only_the_overdraw() {
        let ops = [
            charge(1, 50, "a"),
            use_(1, 120, "b"),
            use_(1, 40, "c"),
            charge(1, 5, "d"),
        ];
        let (step, answers) = decide(&ops, &read(vec![user(1, 100)], vec![]));
        let statuses: Vec<_> = answers.iter().map(status).collect();
        assert_eq!(statuses, [Some(200), Some(200), Some(422), Some(200)]);
        let [only] = step.users.as_slice() else {
            panic!("one user: {step:?}");
        };
        assert_eq!((only.user_id, only.expected_version), (id(1), 7));
        assert_eq!(only.balance_after.get(), 100 + 50 - 120 + 5);
        let ledger: Vec<_> = only
            .writes
            .iter()
            .map(|w| w.ledger.map(|(kind, m)| (kind, m.balance_after.get())))
            .collect();
        assert_eq!(
            ledger,
            [
                Some((EntryKind::Charge, 150)),
                Some((EntryKind::Use, 30)),
                None,
                Some((EntryKind::Charge, 35)),
            ]
        );
        let keys: Vec<_> = only.writes.iter().map(|w| w.key.key.as_str()).collect();
        assert_eq!(keys, ["a", "b", "c", "d"]);
        assert!(only.writes.iter().all(|w| w.key.created_at == t()));
    }

    #[test]
    fn a_second_request_with_a_key_of_the_batch_replays_the_first() {
        let ops = [charge(1, 50, "a"), charge(1, 50, "a"), charge(1, 60, "a")];
        let (step, answers) = decide(&ops, &read(vec![user(1, 100)], vec![]));
        assert_eq!(step.len(), 1, "the key is written once");
        assert_eq!(step.users[0].balance_after.get(), 150);
        assert!(matches!(answers[1], Answer::SameAs(0)), "{answers:?}");
        assert!(
            matches!(answers[2], Answer::Now(Err(OperationError::KeyReused))),
            "another request under the key: {answers:?}"
        );
    }

    #[test]
    fn a_key_with_a_stored_record_replays_it_and_writes_nothing() {
        let stored = StoredResponse {
            status: 200,
            body: b"earlier".to_vec(),
        };
        let op = charge(1, 50, "a");
        let record = CompletedRecord {
            user_id: id(1),
            key: key("a"),
            fingerprint: op.fingerprint(),
            operation: op.kind(),
            outcome: RecordOutcome::Applied,
            response: stored.clone(),
            created_at: t(),
            expires_at: t() + chrono::Duration::hours(1),
        };
        let ops = [op, charge(1, 70, "a"), charge(1, 5, "b")];
        let (step, answers) = decide(&ops, &read(vec![user(1, 100)], vec![record]));
        match &answers[0] {
            Answer::Now(Ok(execution)) => {
                assert!(execution.replayed);
                assert_eq!(execution.response, stored);
            }
            other => panic!("a replay: {other:?}"),
        }
        assert!(matches!(
            answers[1],
            Answer::Now(Err(OperationError::KeyReused))
        ));
        assert_eq!(step.len(), 1);
        assert_eq!(step.users[0].balance_after.get(), 105);
    }

    #[test]
    fn users_are_written_in_order_and_a_missing_one_is_not_found() {
        // `items` come sorted by user, as the batch groups them.
        let ops = [charge(2, 1, "a"), charge(3, 1, "b"), charge(5, 1, "c")];
        let (step, answers) = decide(&ops, &read(vec![user(5, 10), user(2, 10)], vec![]));
        let users: Vec<_> = step.users.iter().map(|u| u.user_id.get()).collect();
        assert_eq!(users, [2, 5]);
        assert!(matches!(
            answers[1],
            Answer::Now(Err(OperationError::UserNotFound))
        ));
    }

    #[test]
    fn a_user_whose_every_request_is_refused_is_still_written_under_its_version() {
        let ops = [use_(1, 500, "a")];
        let (step, answers) = decide(&ops, &read(vec![user(1, 100)], vec![]));
        assert_eq!(status(&answers[0]), Some(422));
        assert_eq!(step.users.len(), 1);
        assert_eq!(step.users[0].balance_after.get(), 100);
        assert_eq!(step.users[0].writes[0].outcome(), RecordOutcome::Refused);
    }
}
