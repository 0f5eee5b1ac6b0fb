//! The coupon use cases: creating and reading coupons, a user's coupons, and issuing one
//! first come first served.
//!
//! Issuing is an [`Operation`] like a charge (keyed, locked as the user, one atomic step
//! that the database guards: the issued count only rises below the stock, one user coupon
//! per user and coupon). In front of it, when there is one, sits the [`CouponGate`]: a
//! shared counter of the coupon's stock in Redis that answers "sold out", "already
//! issued" and "not open" (recording them under the key, replaying them) without a
//! database round trip, and lets through at most as many requests as it has units.
//!
//! The gate is never the truth. It is built from the database when it is missing, and
//! rebuilt when it disagrees with it: when the database refuses a request the gate let
//! through, or when a unit has been pending longer than a step can take (its holder was
//! killed). A unit is given back only when nothing can have been issued for it under its
//! key, by this request or a duplicate of it (see `nothing_issued`); otherwise it stays
//! pending, so a retry of that key goes to the database, which knows.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use super::{BalanceService, Execution, LockUnavailablePolicy};
use crate::error::OperationError;
use crate::idempotency::{Admission, KeyState, RecordOutcome, StoredResponse};
use crate::model::{Coupon, NewCoupon, UserCoupon};
use crate::operations::{IssueCoupon, Operation};
use crate::outcome::{Outcome, Refusal};
use crate::ports::{
    AuditCheck, Breach, CouponGate, CouponRepo, GateAnswer, GateError, GateRefusal, GateRequest,
    GateSnapshot, GateView, KeyRecord,
};
use crate::telemetry as m;
use crate::types::{CouponId, IdempotencyKey, UserId};

/// The rebuilds of each coupon's gate in this instance, one at a time, and when the last
/// one finished.
#[derive(Debug, Default, Clone)]
pub(crate) struct Rebuilds {
    coupons: Arc<std::sync::Mutex<HashMap<CouponId, RebuildSlot>>>,
}

/// One coupon's rebuilds: held while one runs; when the last one finished.
type RebuildSlot = Arc<tokio::sync::Mutex<Option<Instant>>>;

impl Rebuilds {
    fn slot(&self, coupon: CouponId) -> RebuildSlot {
        let mut coupons = self
            .coupons
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Arc::clone(coupons.entry(coupon).or_default())
    }
}

/// The most coupons of one user a listing returns.
pub const MAX_LISTED_COUPONS: u32 = 1_000;

/// A user's coupons, newest first, and the instant their status is shown at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CouponListing {
    pub items: Vec<UserCoupon>,
    pub at: DateTime<Utc>,
}

impl BalanceService {
    /// The service's clock: what "now" is for a coupon created without a start.
    pub fn now(&self) -> DateTime<Utc> {
        self.ports.clock.now()
    }

    /// # Errors
    /// A store failure.
    pub async fn create_coupon(&self, coupon: NewCoupon) -> Result<Coupon, OperationError> {
        let now = self.ports.clock.now();
        Ok(self.ports.coupons.create_coupon(coupon, now).await?)
    }

    /// # Errors
    /// `CouponNotFound`, or a store failure.
    pub async fn coupon(&self, id: CouponId) -> Result<Coupon, OperationError> {
        self.ports
            .coupons
            .get_coupon(id)
            .await?
            .ok_or(OperationError::CouponNotFound)
    }

    /// The user's coupons, newest first (at most [`MAX_LISTED_COUPONS`]).
    ///
    /// # Errors
    /// `UserNotFound`, or a store failure.
    pub async fn user_coupons(&self, user: UserId) -> Result<CouponListing, OperationError> {
        self.balance(user).await?;
        let at = self.ports.clock.now();
        let items = self
            .ports
            .coupons
            .user_coupons(user, MAX_LISTED_COUPONS)
            .await?;
        Ok(CouponListing { items, at })
    }

    /// Issues one unit of a coupon to a user, once per key: through the gate when there is
    /// one, else (and whenever the gate cannot answer) by the database step alone.
    ///
    /// # Errors
    /// As [`BalanceService::execute`], and `CouponNotFound`.
    pub async fn issue_coupon(&self, op: IssueCoupon) -> Result<Execution, OperationError> {
        let Some(gate) = self.ports.gate.clone() else {
            return self.execute(Arc::new(op)).await;
        };
        self.ensure_user(op.user).await?;
        let request = self.gate_request(&op);
        let mut rebuilt = false;
        loop {
            let asked = Instant::now();
            let answer = match gate.admit(&request).await {
                Ok(answer) => answer,
                Err(e) => return self.without_gate(op, e).await,
            };
            match answer {
                GateAnswer::Missing | GateAnswer::Refused { stale: true, .. } if !rebuilt => {
                    rebuilt = true;
                    let missing = answer == GateAnswer::Missing;
                    self.rebuild_gate_once(gate.as_ref(), op.coupon, asked, missing)
                        .await?;
                }
                // Dropped again since the rebuild: the database answers this one.
                GateAnswer::Missing | GateAnswer::Pass => {
                    return self.issue_unreserved(gate.as_ref(), op).await;
                }
                GateAnswer::Refused { refusal, .. } => {
                    metrics::counter!(m::COUPON_GATE_ANSWERED_TOTAL, "answer" => refusal_label(refusal))
                        .increment(1);
                    let response = self.gate_refusal_bytes(op.coupon, refusal);
                    return self
                        .store_gate_refusal(gate.as_ref(), &op, &request, response)
                        .await;
                }
                GateAnswer::Replay {
                    response,
                    expires_at,
                } => {
                    metrics::counter!(m::IDEMPOTENT_REPLAYS_TOTAL, "operation" => op.kind().label())
                        .increment(1);
                    return Ok(Execution {
                        response,
                        replayed: true,
                        expires_at,
                    });
                }
                GateAnswer::Reused => {
                    metrics::counter!(m::IDEMPOTENCY_REUSED_TOTAL, "operation" => op.kind().label())
                        .increment(1);
                    return Err(OperationError::KeyReused);
                }
                GateAnswer::Admitted => {
                    return self.issue_reserved(gate.as_ref(), op, &request).await;
                }
            }
        }
    }

    /// Stores the gate's refusal as the key's record in the database (one insert: no lock,
    /// no users row, no coupon row), so the key is answered the same way whatever answers
    /// it next: the gate, the database step (Redis down), or the gate again after Redis
    /// lost its keys; and is a reuse for any other request. Then caches it at the gate, so
    /// its replays need no database round trip. A key the database answered before keeps
    /// that answer.
    async fn store_gate_refusal(
        &self,
        gate: &dyn CouponGate,
        op: &IssueCoupon,
        request: &GateRequest,
        response: StoredResponse,
    ) -> Result<Execution, OperationError> {
        let expires_at = self.record_expiry(request.now);
        let record = KeyRecord {
            key: op.key.clone(),
            fingerprint: request.fingerprint.clone(),
            operation: op.kind(),
            created_at: request.now,
            expires_at,
        };
        match self
            .ports
            .keys
            .insert_refusal(op.user, &record, &response)
            .await?
        {
            None => {
                metrics::counter!(m::OPERATIONS_REFUSED_TOTAL, "operation" => op.kind().label())
                    .increment(1);
                settle(
                    gate.record(
                        op.coupon,
                        op.user,
                        &op.key,
                        &request.fingerprint,
                        &response,
                        request.now,
                        expires_at,
                    )
                    .await,
                );
                Ok(Execution {
                    response,
                    replayed: false,
                    expires_at,
                })
            }
            Some(earlier) => {
                let expires_at = earlier.expires_at;
                match KeyState::Completed(earlier).admit(&request.fingerprint, request.now) {
                    Admission::Replay(response) => {
                        metrics::counter!(m::IDEMPOTENT_REPLAYS_TOTAL, "operation" => op.kind().label())
                            .increment(1);
                        Ok(Execution {
                            response,
                            replayed: true,
                            expires_at,
                        })
                    }
                    Admission::Reused => {
                        metrics::counter!(m::IDEMPOTENCY_REUSED_TOTAL, "operation" => op.kind().label())
                            .increment(1);
                        Err(OperationError::KeyReused)
                    }
                    // A live record is never free nor in flight; answer as busy, safely.
                    Admission::Run | Admission::InUse => Err(OperationError::KeyInUse),
                }
            }
        }
    }

    /// The user exists (a 404 is not recorded, so it must come before the gate records
    /// anything): remembered once seen, so the gate's answers need no database round trip.
    async fn ensure_user(&self, user: UserId) -> Result<(), OperationError> {
        if self.known_users.contains(user) {
            return Ok(());
        }
        self.balance(user).await?;
        self.known_users.insert(user);
        Ok(())
    }

    fn gate_request(&self, op: &IssueCoupon) -> GateRequest {
        GateRequest {
            coupon: op.coupon,
            user: op.user,
            key: op.key.clone(),
            fingerprint: op.fingerprint(),
            token: uuid::Uuid::new_v4().simple().to_string(),
            now: self.ports.clock.now(),
        }
    }

    /// The stored bytes of a refusal of `coupon` the gate decided (encoded only once it
    /// is decided: an admitted request never needs them).
    fn gate_refusal_bytes(&self, coupon: CouponId, refusal: GateRefusal) -> StoredResponse {
        let coupon_id = coupon;
        let refusal = match refusal {
            GateRefusal::SoldOut => Refusal::CouponSoldOut { coupon_id },
            GateRefusal::AlreadyIssued => Refusal::CouponAlreadyIssued { coupon_id },
            GateRefusal::NotOpen => Refusal::CouponNotOpen { coupon_id },
        };
        self.ports.encoder.encode(&Outcome::Refused(refusal))
    }

    /// How long a unit may stay pending before the gate treats its holder as gone: the
    /// longest a step can wait for its lock and then hold it.
    fn pending_lifetime(&self) -> Duration {
        self.settings
            .lock_wait
            .saturating_add(self.settings.lock_lease)
    }

    /// Rebuilds the gate unless, for a gate found `missing`, another request of this
    /// instance finished rebuilding it after `asked` (then it is there: the requests that
    /// find a gate missing together, after Redis lost its keys in a rush, wait for one
    /// rebuild instead of each reading every holder from the database). A stale unit is
    /// always rebuilt for afresh: the rebuild must read the database after it was seen.
    async fn rebuild_gate_once(
        &self,
        gate: &dyn CouponGate,
        coupon: CouponId,
        asked: Instant,
        missing: bool,
    ) -> Result<(), OperationError> {
        let slot = self.rebuilds.slot(coupon);
        let mut finished = slot.lock().await;
        if missing && finished.is_some_and(|at| at >= asked) {
            return Ok(());
        }
        let result = self.rebuild_gate(gate, coupon).await;
        *finished = Some(Instant::now());
        result
    }

    async fn rebuild_gate(
        &self,
        gate: &dyn CouponGate,
        coupon: CouponId,
    ) -> Result<(), OperationError> {
        let snapshot = self
            .ports
            .coupons
            .gate_snapshot(coupon)
            .await?
            .ok_or(OperationError::CouponNotFound)?;
        metrics::counter!(m::COUPON_GATE_REBUILDS_TOTAL).increment(1);
        let now = self.ports.clock.now();
        match gate.load(&snapshot, now, self.pending_lifetime()).await {
            Ok(()) => Ok(()),
            // The next admit finds it missing again and the database answers.
            Err(e) => {
                tracing::warn!(coupon = %coupon, error = %e, "could not rebuild the coupon gate");
                Ok(())
            }
        }
    }

    /// The gate could not be asked: `LOCK_ON_REDIS_DOWN` decides, as for the lock.
    async fn without_gate(
        &self,
        op: IssueCoupon,
        e: GateError,
    ) -> Result<Execution, OperationError> {
        match (e, self.settings.on_lock_unavailable) {
            (GateError::Unavailable(cause), LockUnavailablePolicy::Fail) => {
                metrics::counter!(m::LOCK_UNAVAILABLE_TOTAL).increment(1);
                tracing::warn!(error = %cause, "coupon gate unavailable: refusing the issue");
                Err(OperationError::Unavailable(cause))
            }
            (e, _) => {
                metrics::counter!(m::COUPON_GATE_BYPASSED_TOTAL).increment(1);
                tracing::warn!(error = %format!("{e:#}"),
                    "coupon gate unavailable: issuing under the database guard alone");
                self.execute(Arc::new(op)).await
            }
        }
    }

    /// The database step with no unit reserved at the gate; a unit it issues is confirmed
    /// there (counted once, whether the gate knew of it or not).
    async fn issue_unreserved(
        &self,
        gate: &dyn CouponGate,
        op: IssueCoupon,
    ) -> Result<Execution, OperationError> {
        let (coupon, user, key, fingerprint) =
            (op.coupon, op.user, op.key.clone(), op.fingerprint());
        let (execution, outcome) = self.run(Arc::new(op)).await?;
        match outcome {
            RecordOutcome::Applied => settle(gate.confirm(coupon, user, &key).await),
            RecordOutcome::Refused => {
                let now = self.ports.clock.now();
                settle(
                    gate.record(
                        coupon,
                        user,
                        &key,
                        &fingerprint,
                        &execution.response,
                        now,
                        execution.expires_at,
                    )
                    .await,
                );
            }
        }
        Ok(execution)
    }

    /// The database step for a unit the gate reserved; the unit is confirmed when the step
    /// issued it, given back when nothing can have been issued, and left pending after an
    /// unknown outcome (until the key's retry or a rebuild settles it).
    async fn issue_reserved(
        &self,
        gate: &dyn CouponGate,
        op: IssueCoupon,
        request: &GateRequest,
    ) -> Result<Execution, OperationError> {
        let (coupon, user, key, fingerprint) =
            (op.coupon, op.user, op.key.clone(), op.fingerprint());
        let result = self.run(Arc::new(op)).await;
        match &result {
            Ok((_, RecordOutcome::Applied)) => settle(gate.confirm(coupon, user, &key).await),
            Ok((execution, RecordOutcome::Refused)) => {
                // The database refused what the gate let through: they disagree (or the
                // key was refused before, without the gate). The refusal is recorded there
                // for the key's replays, and the gate rebuilt from the database.
                let now = self.ports.clock.now();
                settle(
                    gate.record(
                        coupon,
                        user,
                        &key,
                        &fingerprint,
                        &execution.response,
                        now,
                        execution.expires_at,
                    )
                    .await,
                );
                // A user the database says holds one (issued under another key, by a step
                // that has not confirmed it yet) keeps its unit: giving it back would let
                // that user's next key be told "sold out" until the confirm.
                let already = self.gate_refusal_bytes(coupon, GateRefusal::AlreadyIssued);
                if execution.response != already {
                    settle(gate.give_back(coupon, user, &request.token).await);
                }
                metrics::counter!(m::COUPON_GATE_DISAGREED_TOTAL).increment(1);
                // Rebuilt in place (not dropped): units other requests hold pending stay,
                // so none of those users is told "sold out" meanwhile.
                if let Err(e) = self.rebuild_gate(gate, coupon).await {
                    tracing::warn!(coupon = %coupon, error = %format!("{e:#}"),
                        "could not rebuild the coupon gate after it disagreed with the database");
                }
            }
            Err(e) if nothing_issued(e) => {
                settle(gate.give_back(coupon, user, &request.token).await);
            }
            Err(_) => {}
        }
        result.map(|(execution, _)| execution)
    }
}

impl BalanceService {
    /// Rebuilds the gate of every coupon from the database (at start: a gate left by an
    /// earlier run may be out of date), keeping what a rebuild keeps (issued holders, units
    /// pending for less than a step can take). Returns how many were rebuilt; no gate, none.
    ///
    /// # Errors
    /// The database cannot be read (a gate that cannot be written is logged and skipped:
    /// it is rebuilt when it is next asked).
    pub async fn rebuild_coupon_gates(&self) -> Result<u64, OperationError> {
        let Some(gate) = self.ports.gate.clone() else {
            return Ok(0);
        };
        let mut rebuilt = 0;
        let mut after = None;
        loop {
            let ids = self.ports.coupons.coupon_ids(after, 500).await?;
            let Some(last) = ids.last().copied() else {
                return Ok(rebuilt);
            };
            after = Some(last);
            for id in ids {
                match self.rebuild_gate(gate.as_ref(), id).await {
                    Ok(()) => rebuilt += 1,
                    // Deleted meanwhile cannot happen (coupons are never deleted); skip it.
                    Err(OperationError::CouponNotFound) => {}
                    Err(e) => return Err(e),
                }
            }
        }
    }

    /// [`audit_coupon_gate`] over this service's store and gate; no gate, no breaches.
    ///
    /// # Errors
    /// The database or the gate cannot be read.
    pub async fn audit_coupon_gate(&self) -> Result<Vec<Breach>, OperationError> {
        match &self.ports.gate {
            Some(gate) => audit_coupon_gate(self.ports.coupons.as_ref(), gate.as_ref()).await,
            None => Ok(Vec::new()),
        }
    }
}

/// Compares the admission gate of every coupon with the database. A coupon the gate has no
/// state for agrees (it is rebuilt when asked).
///
/// # Errors
/// The database or the gate cannot be read.
pub async fn audit_coupon_gate(
    coupons: &dyn CouponRepo,
    gate: &dyn CouponGate,
) -> Result<Vec<Breach>, OperationError> {
    let mut breaches = Vec::new();
    let mut after = None;
    loop {
        let ids = coupons.coupon_ids(after, 500).await?;
        let Some(last) = ids.last().copied() else {
            return Ok(breaches);
        };
        after = Some(last);
        for id in ids {
            let view = gate.inspect(id).await.map_err(|e| match e {
                GateError::Unavailable(cause) => OperationError::Unavailable(cause),
                GateError::Unexpected(cause) => OperationError::Unexpected(cause),
            })?;
            let (Some(view), Some(snapshot)) = (view, coupons.gate_snapshot(id).await?) else {
                continue;
            };
            breaches.extend(gate_breaches(&snapshot, &view));
        }
    }
}

/// How the gate's view of a coupon disagrees with the database's snapshot: its stock or
/// window; a user it holds as issued that the database has not issued (under that key); a
/// user the database issued that it does not hold at all (a unit pending there is still
/// being settled, and agrees); a count that is not what it holds.
pub fn gate_breaches(snapshot: &GateSnapshot, view: &GateView) -> Vec<Breach> {
    let coupon = &snapshot.coupon;
    let subject = format!("coupon {}", coupon.id);
    let breach = |detail: String| Breach {
        check: AuditCheck::CouponGateMatchesDatabase,
        subject: subject.clone(),
        detail,
    };
    let mut found = Vec::new();
    if view.total != coupon.total_quantity
        || view.issue_starts_at != coupon.issue_starts_at
        || view.issue_ends_at != coupon.issue_ends_at
    {
        found.push(breach(format!(
            "the gate has stock {} and window {:?}..{:?}; the database {} and {:?}..{:?}",
            view.total,
            view.issue_starts_at,
            view.issue_ends_at,
            coupon.total_quantity,
            coupon.issue_starts_at,
            coupon.issue_ends_at
        )));
    }
    let issued: HashMap<UserId, &IdempotencyKey> =
        snapshot.holders.iter().map(|(u, k)| (*u, k)).collect();
    for (user, key) in &view.issued {
        if issued.get(user) != Some(&key) {
            found.push(breach(format!(
                "the gate holds user {user} as issued under key {key}; the database does not"
            )));
        }
    }
    let held: HashSet<UserId> = view
        .issued
        .iter()
        .map(|(u, _)| *u)
        .chain(view.pending.iter().map(|(u, _)| *u))
        .collect();
    for (user, _) in &snapshot.holders {
        if !held.contains(user) {
            found.push(breach(format!(
                "the database issued user {user}; the gate does not hold it"
            )));
        }
    }
    if view.taken as usize != held.len() {
        found.push(breach(format!(
            "the gate counts {} taken and holds {}",
            view.taken,
            held.len()
        )));
    }
    found
}

/// Errors after which no unit can have been issued under the request's key, by this
/// request or by a duplicate of it: the user or the coupon does not exist, or the key
/// belongs to another request. (Not "in use" or a lock timeout: a duplicate with the same
/// key may be running the step on this or another instance, and its unit is that one; it
/// stays pending until the duplicate settles it or a rebuild does.)
fn nothing_issued(e: &OperationError) -> bool {
    matches!(
        e,
        OperationError::UserNotFound | OperationError::CouponNotFound | OperationError::KeyReused
    )
}

fn settle(result: Result<(), GateError>) {
    if let Err(e) = result {
        // The unit stays as the gate last knew it: pending until a rebuild, which reads
        // the database.
        tracing::warn!(error = %format!("{e:#}"), "could not settle a unit at the coupon gate");
    }
}

fn refusal_label(refusal: GateRefusal) -> &'static str {
    match refusal {
        GateRefusal::SoldOut => "sold_out",
        GateRefusal::AlreadyIssued => "already_issued",
        GateRefusal::NotOpen => "not_open",
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;
    use crate::types::{Amount, CouponName, Limits};

    fn t(ms: i64) -> DateTime<Utc> {
        Utc.timestamp_millis_opt(1_795_356_000_000 + ms).unwrap()
    }

    fn user(id: i64) -> UserId {
        UserId::new(id).unwrap()
    }

    fn key(raw: &str) -> IdempotencyKey {
        IdempotencyKey::parse(raw).unwrap()
    }

    fn snapshot(holders: &[(i64, &str)]) -> GateSnapshot {
        GateSnapshot {
            coupon: Coupon {
                id: CouponId::new(3).unwrap(),
                name: CouponName::parse("W").unwrap(),
                discount: Amount::new(10, &Limits::default()).unwrap(),
                total_quantity: 5,
                issued_quantity: holders.len() as u32,
                issue_starts_at: t(0),
                issue_ends_at: None,
                valid_for_days: 30,
                created_at: t(0),
            },
            holders: holders.iter().map(|(u, k)| (user(*u), key(k))).collect(),
        }
    }

    fn view(issued: &[(i64, &str)], pending: &[i64], taken: u32) -> GateView {
        GateView {
            total: 5,
            taken,
            issue_starts_at: t(0),
            issue_ends_at: None,
            issued: issued.iter().map(|(u, k)| (user(*u), key(k))).collect(),
            pending: pending.iter().map(|u| (user(*u), t(1))).collect(),
        }
    }

    #[test]
    fn a_gate_that_holds_what_the_database_issued_agrees() {
        let db = snapshot(&[(1, "a"), (2, "b")]);
        assert_eq!(
            gate_breaches(&db, &view(&[(1, "a"), (2, "b")], &[], 2)),
            vec![]
        );
        // A committed unit still pending at the gate, and one pending that may yet commit.
        assert_eq!(gate_breaches(&db, &view(&[(1, "a")], &[2, 3], 3)), vec![]);
    }

    #[test]
    fn every_disagreement_is_named() {
        let db = snapshot(&[(1, "a"), (2, "b")]);
        let details = |v: GateView| {
            gate_breaches(&db, &v)
                .into_iter()
                .map(|b| b.detail)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            details(view(&[(1, "a"), (2, "other")], &[], 2)),
            vec!["the gate holds user 2 as issued under key other; the database does not"]
        );
        assert_eq!(
            details(view(&[(1, "a")], &[], 1)),
            vec!["the database issued user 2; the gate does not hold it"]
        );
        assert_eq!(
            details(view(&[(1, "a"), (2, "b")], &[], 4)),
            vec!["the gate counts 4 taken and holds 2"]
        );
        let mut smaller = view(&[(1, "a"), (2, "b")], &[], 2);
        smaller.total = 4;
        assert_eq!(details(smaller).len(), 1);
    }
}
