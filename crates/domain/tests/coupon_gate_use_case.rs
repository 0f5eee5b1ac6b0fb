#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! `BalanceService::issue_coupon` over mockall mocks of every port, the coupon gate
//! included, with a small real `ResponseEncoder` and a fixed `Clock`.
//!
//! What is pinned here, rule by rule of `service/coupons.rs`: without a gate the database
//! step alone answers; an unknown user is a 404 before the gate is asked (a known one is
//! looked up once); a missing gate is rebuilt from `CouponRepo::gate_snapshot` and asked
//! again, a stale refusal too (once); the gate's refusals, replays and reuses answer with
//! nothing else touched; an admitted unit is confirmed when the step issued it, given back
//! (with the gate rebuilt and the refusal recorded) when the step refused, except for the
//! already-issued refusal, given back after an error that proves nothing was issued, and
//! left pending after an unknown outcome; a pass runs the step unreserved; an unavailable
//! gate follows `LOCK_ON_REDIS_DOWN`; and no failure to settle the gate changes the answer.
//!
//! A mock method without an expectation panics when called, so each test states only what
//! it expects; `.never()` is spelled out where the absence is the rule.

use std::any::Any;
use std::ops::Deref;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use chrono::{DateTime, Utc};
use mockall::Sequence;
use mockall::predicate::eq;

use domain::idempotency::{CompletedRecord, Fingerprint, RecordOutcome, StoredResponse};
use domain::model::{Coupon, User, UserCoupon};
use domain::operations::Effect;
use domain::outcome::{IssuedCoupon, Outcome, Refusal};
use domain::ports::{
    Applied, Assigned, BalanceChange, Clock, CouponGate, GateAnswer, GateError, GateRefusal,
    GateRequest, GateSnapshot, KeyRecord, LockError, LockKey, LockLease, MockBalanceStore,
    MockCouponGate, MockCouponRepo, MockIdempotencyRepo, MockLockManager, MockOrderRepo,
    MockUserRepo, RefusalRecord, Release, RepoError, ResponseEncoder, StepError,
};
use domain::types::{
    Amount, Balance, CouponId, CouponName, IdempotencyKey, Limits, UserCouponId, UserId,
};
use domain::{
    BalanceService, Execution, IssueCoupon, LockUnavailablePolicy, Operation, OperationError,
    OperationKind, Ports, Settings,
};

// ---------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------

const USER: i64 = 7;
const OTHER_USER: i64 = 8;
const COUPON: i64 = 3;
const OTHER_COUPON: i64 = 4;
const KEY: &str = "issue-5b1e";
const LEASE_TOKEN: &str = "lease-token-1";
const USER_COUPON: i64 = 41;
const VERSION: u64 = 4;
const STOCK: u32 = 5;
const VALID_DAYS: u32 = 30;
const LOCK_WAIT: Duration = Duration::from_millis(250);
const LOCK_LEASE: Duration = Duration::from_millis(2_000);
const TTL_SECS: i64 = 3_600;

fn now() -> DateTime<Utc> {
    DateTime::from_timestamp_millis(1_795_356_000_123).expect("a valid instant")
}

/// When a record written now expires: the expiry of every fresh answer here.
fn expiry() -> DateTime<Utc> {
    now() + chrono::Duration::seconds(TTL_SECS)
}

fn settings(policy: LockUnavailablePolicy) -> Settings {
    Settings {
        lock_wait: LOCK_WAIT,
        lock_lease: LOCK_LEASE,
        optimistic_retries: 3,
        on_lock_unavailable: policy,
        idempotency_ttl: Duration::from_secs(TTL_SECS.unsigned_abs()),
        limits: Limits::default(),
        ..Settings::default()
    }
}

fn user_id() -> UserId {
    UserId::new(USER).unwrap()
}

fn coupon_id() -> CouponId {
    CouponId::new(COUPON).unwrap()
}

fn key() -> IdempotencyKey {
    IdempotencyKey::parse(KEY).unwrap()
}

fn discount() -> Amount {
    Amount::new(500, &Limits::default()).unwrap()
}

fn user() -> User {
    User {
        id: user_id(),
        balance: Balance::from_stored(10_000),
        version: VERSION,
        created_at: now() - chrono::Duration::days(30),
    }
}

/// The request under test: user 7 asks for coupon 3 with the test key.
fn issue() -> IssueCoupon {
    IssueCoupon {
        user: user_id(),
        coupon: coupon_id(),
        key: key(),
    }
}

/// Coupon 3, open since an hour ago, never closing, with `issued` of its stock gone.
fn coupon(issued: u32) -> Coupon {
    Coupon {
        id: coupon_id(),
        name: CouponName::parse("WELCOME").unwrap(),
        discount: discount(),
        total_quantity: STOCK,
        issued_quantity: issued,
        issue_starts_at: now() - chrono::Duration::hours(1),
        issue_ends_at: None,
        valid_for_days: VALID_DAYS,
        created_at: now() - chrono::Duration::days(1),
    }
}

/// The user coupon user 7 already holds, issued under another key.
fn holding() -> UserCoupon {
    UserCoupon {
        id: UserCouponId::new(USER_COUPON - 1).unwrap(),
        coupon_id: coupon_id(),
        user_id: user_id(),
        discount: discount(),
        payment: None,
        issued_at: now() - chrono::Duration::minutes(5),
        expires_at: now() + chrono::Duration::days(29),
        idempotency_key: IdempotencyKey::parse("an-earlier-key").unwrap(),
    }
}

/// What the gate is rebuilt from.
fn snapshot() -> GateSnapshot {
    GateSnapshot {
        coupon: coupon(1),
        holders: vec![(
            UserId::new(OTHER_USER).unwrap(),
            IdempotencyKey::parse("other-user-key").unwrap(),
        )],
    }
}

/// The key record the atomic step must write for this request.
fn key_record() -> KeyRecord {
    KeyRecord {
        key: key(),
        fingerprint: issue().fingerprint(),
        operation: OperationKind::CouponIssue,
        created_at: now(),
        expires_at: expiry(),
    }
}

fn encode(outcome: Outcome) -> StoredResponse {
    TestEncoder.encode(&outcome)
}

fn sold_out() -> StoredResponse {
    encode(Outcome::Refused(Refusal::CouponSoldOut {
        coupon_id: coupon_id(),
    }))
}

fn already_issued() -> StoredResponse {
    encode(Outcome::Refused(Refusal::CouponAlreadyIssued {
        coupon_id: coupon_id(),
    }))
}

fn not_open() -> StoredResponse {
    encode(Outcome::Refused(Refusal::CouponNotOpen {
        coupon_id: coupon_id(),
    }))
}

/// The answer of a step that issued user coupon 41.
fn issued() -> StoredResponse {
    encode(Outcome::CouponIssued(IssuedCoupon {
        user_coupon: UserCoupon {
            id: UserCouponId::new(USER_COUPON).unwrap(),
            coupon_id: coupon_id(),
            user_id: user_id(),
            discount: discount(),
            payment: None,
            issued_at: now(),
            expires_at: now() + chrono::Duration::days(i64::from(VALID_DAYS)),
            idempotency_key: key(),
        },
    }))
}

/// Bytes no encoder would produce, so a replay is visibly the recorded response.
fn recorded_bytes() -> StoredResponse {
    StoredResponse {
        status: 409,
        body: b"recorded by the gate \x00\xff".to_vec(),
    }
}

fn fresh(response: StoredResponse) -> Execution {
    Execution {
        response,
        replayed: false,
        expires_at: expiry(),
    }
}

fn lease() -> LockLease {
    LockLease {
        key: LockKey::user_balance(user_id()),
        token: LEASE_TOKEN.to_owned(),
    }
}

fn down() -> anyhow::Error {
    anyhow::anyhow!("connection refused")
}

fn gate_down() -> GateError {
    GateError::Unavailable(down())
}

/// What a store does on commit: assigns the user coupon's id and builds the response.
fn commit(change: BalanceChange) -> Result<Applied, StepError> {
    let assigned = Assigned {
        entry_id: None,
        payment_id: None,
        refund_id: None,
        user_coupon_id: UserCouponId::new(USER_COUPON).ok(),
    };
    let response = (change.respond)(&assigned);
    Ok(Applied { assigned, response })
}

/// A small, real encoder: a status per outcome and the outcome's debug text as the body.
#[derive(Debug)]
struct TestEncoder;

impl ResponseEncoder for TestEncoder {
    fn encode(&self, outcome: &Outcome) -> StoredResponse {
        let status = match outcome {
            Outcome::CouponIssued(_) => 201,
            Outcome::Refused(_) => 409,
            _ => 200,
        };
        StoredResponse {
            status,
            body: format!("{outcome:?}").into_bytes(),
        }
    }
}

#[derive(Debug)]
struct FixedClock(DateTime<Utc>);

impl Clock for FixedClock {
    fn now(&self) -> DateTime<Utc> {
        self.0
    }
}

/// The request the use case hands the gate for this issue: every field it is built from.
fn is_this_request(request: &GateRequest) -> bool {
    request.coupon == coupon_id()
        && request.user == user_id()
        && request.key == key()
        && request.fingerprint == issue().fingerprint()
        && request.now == now()
        && !request.token.is_empty()
}

// ---------------------------------------------------------------------------------------
// The harness
// ---------------------------------------------------------------------------------------

/// Every port mocked, and the tokens the gate was asked under.
#[derive(Default)]
struct Mocks {
    users: MockUserRepo,
    orders: MockOrderRepo,
    coupons: MockCouponRepo,
    keys: MockIdempotencyRepo,
    store: MockBalanceStore,
    locks: MockLockManager,
    gate: MockCouponGate,
    tokens: Arc<Mutex<Vec<String>>>,
}

/// The service over the mocks. When dropped it drops the service and checks that every
/// mock went with it (mockall checks `times`/`never` when a mock is dropped) and that no
/// key is left claimed.
struct Harness {
    service: Option<BalanceService>,
    mocks: Vec<(&'static str, Weak<dyn Any + Send + Sync>)>,
}

impl Deref for Harness {
    type Target = BalanceService;

    fn deref(&self) -> &BalanceService {
        self.service
            .as_ref()
            .expect("the service lives as long as the harness")
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        let Some(service) = self.service.take() else {
            return;
        };
        let in_flight = service.in_flight();
        drop(service);
        if std::thread::panicking() {
            return;
        }
        assert_eq!(in_flight, 0, "a key is still claimed after the issue");
        for (name, mock) in &self.mocks {
            assert!(
                mock.upgrade().is_none(),
                "the {name} mock outlived the service, so its expectations were never checked"
            );
        }
    }
}

fn watched<T: Any + Send + Sync>(
    name: &'static str,
    mock: &Arc<T>,
) -> (&'static str, Weak<dyn Any + Send + Sync>) {
    let weak: Weak<dyn Any + Send + Sync> = Arc::downgrade(mock) as Weak<dyn Any + Send + Sync>;
    (name, weak)
}

impl Mocks {
    /// The service with the gate.
    fn service(self, policy: LockUnavailablePolicy) -> Harness {
        self.build(policy, true)
    }

    /// The service with no gate at all (the gate mock is dropped unused).
    fn service_without_gate(self) -> Harness {
        self.build(LockUnavailablePolicy::Degrade, false)
    }

    fn build(self, policy: LockUnavailablePolicy, with_gate: bool) -> Harness {
        let users = Arc::new(self.users);
        let orders = Arc::new(self.orders);
        let coupons = Arc::new(self.coupons);
        let keys = Arc::new(self.keys);
        let store = Arc::new(self.store);
        let locks = Arc::new(self.locks);
        let gate = Arc::new(self.gate);
        let mocks = vec![
            watched("UserRepo", &users),
            watched("OrderRepo", &orders),
            watched("CouponRepo", &coupons),
            watched("IdempotencyRepo", &keys),
            watched("BalanceStore", &store),
            watched("LockManager", &locks),
            watched("CouponGate", &gate),
        ];
        let gate: Option<Arc<dyn CouponGate>> = with_gate.then_some(gate as Arc<dyn CouponGate>);
        let ports = Ports {
            users,
            orders,
            coupons,
            keys,
            store,
            locks,
            encoder: Arc::new(TestEncoder),
            clock: Arc::new(FixedClock(now())),
            gate,
        };
        Harness {
            service: Some(BalanceService::new(ports, settings(policy))),
            mocks,
        }
    }

    // --- the user --------------------------------------------------------------------

    /// User 7 exists and is read exactly `times` times (the gate's check, the step's read).
    fn user_read(&mut self, times: usize) -> &mut Self {
        self.users
            .expect_get_user()
            .times(times)
            .with(eq(user_id()))
            .returning(|_| Ok(Some(user())));
        self
    }

    // --- the gate --------------------------------------------------------------------

    /// The next `admit` (of this very request) answers `answer`.
    fn admits(&mut self, answer: Result<GateAnswer, GateError>) -> &mut Self {
        let tokens = Arc::clone(&self.tokens);
        self.gate
            .expect_admit()
            .times(1)
            .withf(is_this_request)
            .return_once(move |request| {
                tokens.lock().unwrap().push(request.token.clone());
                answer
            });
        self
    }

    /// As [`Mocks::admits`], in `seq`.
    fn admits_in(
        &mut self,
        seq: &mut Sequence,
        answer: Result<GateAnswer, GateError>,
    ) -> &mut Self {
        let tokens = Arc::clone(&self.tokens);
        self.gate
            .expect_admit()
            .times(1)
            .in_sequence(seq)
            .withf(is_this_request)
            .return_once(move |request| {
                tokens.lock().unwrap().push(request.token.clone());
                answer
            });
        self
    }

    fn never_admits(&mut self) -> &mut Self {
        self.gate.expect_admit().never();
        self
    }

    /// The gate is rebuilt once, from the database's snapshot, in place, keeping units
    /// pending for less than a step can take (the lock's wait and lease).
    fn rebuilt(&mut self, seq: &mut Sequence, loaded: Result<(), GateError>) -> &mut Self {
        self.coupons
            .expect_gate_snapshot()
            .times(1)
            .in_sequence(seq)
            .with(eq(coupon_id()))
            .return_once(|_| Ok(Some(snapshot())));
        self.gate
            .expect_load()
            .times(1)
            .in_sequence(seq)
            .with(eq(snapshot()), eq(now()), eq(LOCK_WAIT + LOCK_LEASE))
            .return_once(move |_, _, _| loaded);
        self.gate.expect_forget().never();
        self
    }

    fn not_rebuilt(&mut self) -> &mut Self {
        self.coupons.expect_gate_snapshot().never();
        self.gate.expect_load().never();
        self.gate.expect_forget().never();
        self
    }

    fn confirmed(&mut self, result: Result<(), GateError>) -> &mut Self {
        self.gate
            .expect_confirm()
            .times(1)
            .with(eq(coupon_id()), eq(user_id()), eq(key()))
            .return_once(move |_, _, _| result);
        self
    }

    fn never_confirmed(&mut self) -> &mut Self {
        self.gate.expect_confirm().never();
        self
    }

    /// The unit reserved under the token the gate admitted is given back, once.
    fn given_back(&mut self, result: Result<(), GateError>) -> &mut Self {
        let tokens = Arc::clone(&self.tokens);
        self.gate
            .expect_give_back()
            .times(1)
            .withf(move |coupon, user, token| {
                let tokens = tokens.lock().unwrap();
                *coupon == coupon_id()
                    && *user == user_id()
                    && tokens.len() == 1
                    && tokens[0] == token
            })
            .return_once(move |_, _, _| result);
        self
    }

    fn never_given_back(&mut self) -> &mut Self {
        self.gate.expect_give_back().never();
        self
    }

    /// The step's refusal is recorded at the gate under the key, once, with its expiry.
    fn recorded(&mut self, response: StoredResponse, result: Result<(), GateError>) -> &mut Self {
        self.gate
            .expect_record()
            .times(1)
            .withf(
                move |coupon, user, key_, fingerprint, bytes, at, expires_at| {
                    *coupon == coupon_id()
                        && *user == user_id()
                        && *key_ == key()
                        && *fingerprint == issue().fingerprint()
                        && *bytes == response
                        && *at == now()
                        && *expires_at == expiry()
                },
            )
            .return_once(move |_, _, _, _, _, _, _| result);
        self
    }

    fn never_recorded(&mut self) -> &mut Self {
        self.gate.expect_record().never();
        self
    }

    /// A refusal the gate decided is stored as the key's record in the database, once,
    /// with the request's bytes, answering `earlier` (`None`: inserted).
    fn refusal_stored(
        &mut self,
        response: StoredResponse,
        earlier: Option<CompletedRecord>,
    ) -> &mut Self {
        self.keys
            .expect_insert_refusal()
            .times(1)
            .withf(move |user, record, bytes| {
                *user == user_id() && *record == key_record() && *bytes == response
            })
            .return_once(move |_, _, _| Ok(earlier));
        self
    }

    /// As [`Mocks::refusal_stored`], inserted, and then cached at the gate.
    fn refusal_stored_and_cached(&mut self, response: StoredResponse) -> &mut Self {
        self.refusal_stored(response.clone(), None)
            .recorded(response, Ok(()))
    }

    /// Nothing at the gate besides `admit`: no settle, no rebuild.
    fn gate_left_alone(&mut self) -> &mut Self {
        self.never_confirmed()
            .never_given_back()
            .never_recorded()
            .not_rebuilt()
    }

    // --- the database step -----------------------------------------------------------

    /// The replay check finds no record of the key, `times` times.
    fn no_record(&mut self, times: usize) -> &mut Self {
        self.keys
            .expect_find()
            .times(times)
            .with(eq(user_id()), eq(key()), eq(now()))
            .returning(|_, _, _| Ok(None));
        self
    }

    /// `balance:user:7` is taken once with the configured wait and lease, released once.
    fn locked_and_released(&mut self) -> &mut Self {
        self.locks
            .expect_acquire()
            .times(1)
            .with(
                eq(LockKey::user_balance(user_id())),
                eq(LOCK_WAIT),
                eq(LOCK_LEASE),
            )
            .returning(|_, _, _| Ok(lease()));
        self.locks
            .expect_release()
            .times(1)
            .with(eq(lease()))
            .returning(|_| Ok(Release::Released));
        self
    }

    /// The step reads the coupon (and, when there is one, the user's holding of it).
    fn coupon_read(&mut self, found: Option<Coupon>, held: Option<UserCoupon>) -> &mut Self {
        let exists = found.is_some();
        self.coupons
            .expect_get_coupon()
            .times(1)
            .with(eq(coupon_id()))
            .return_once(move |_| Ok(found));
        if exists {
            self.coupons
                .expect_holding()
                .times(1)
                .with(eq(coupon_id()), eq(user_id()))
                .return_once(move |_, _| Ok(held));
        } else {
            self.coupons.expect_holding().never();
        }
        self
    }

    /// The step writes the issue of coupon 3 to user 7, once, as `result` says.
    fn applies(
        &mut self,
        result: impl FnOnce(BalanceChange) -> Result<Applied, StepError> + Send + 'static,
    ) -> &mut Self {
        self.store
            .expect_apply()
            .times(1)
            .withf(|change| {
                change.user_id == user_id()
                    && change.expected_version == VERSION
                    && change.key == key_record()
                    && matches!(&change.effect, Effect::IssueCoupon(e) if e.coupon == coupon_id())
            })
            .return_once(result);
        self.store.expect_record_refusal().never();
        self
    }

    /// One run of the step that issues: no record, the lock, the reads, the write.
    fn step_issues(&mut self) -> &mut Self {
        self.no_record(1)
            .locked_and_released()
            .coupon_read(Some(coupon(1)), None)
            .applies(commit)
    }

    /// One run of the step that refuses with `response`, decided on `found` and `held`.
    fn step_refuses(
        &mut self,
        found: Coupon,
        held: Option<UserCoupon>,
        response: StoredResponse,
    ) -> &mut Self {
        self.no_record(1)
            .locked_and_released()
            .coupon_read(Some(found), held);
        self.store.expect_apply().never();
        self.store
            .expect_record_refusal()
            .times(1)
            .withf(move |refusal: &RefusalRecord| {
                refusal.user_id == user_id()
                    && refusal.expected_version == VERSION
                    && refusal.key == key_record()
                    && refusal.response == response
            })
            .returning(|_| Ok(()));
        self
    }

    /// The step is not run: no record read, no lock, no coupon read, no write.
    fn step_not_run(&mut self) -> &mut Self {
        self.keys.expect_find().never();
        self.locks.expect_acquire().never();
        self.coupons.expect_get_coupon().never();
        self.store.expect_apply().never();
        self.store.expect_record_refusal().never();
        self
    }
}

// ---------------------------------------------------------------------------------------
// No gate, and the user
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn without_a_gate_the_database_step_alone_answers() {
    let mut mocks = Mocks::default();
    // One read of the user: the step's, under the lock; no separate check before it.
    mocks.user_read(1).step_issues();
    let service = mocks.service_without_gate();

    let execution = service.issue_coupon(issue()).await.unwrap();

    assert_eq!(execution, fresh(issued()));
}

#[tokio::test]
async fn an_unknown_user_is_not_found_before_the_gate_is_asked_and_is_not_remembered() {
    let mut mocks = Mocks::default();
    mocks
        .users
        .expect_get_user()
        .times(2)
        .with(eq(user_id()))
        .returning(|_| Ok(None));
    mocks.never_admits().gate_left_alone().step_not_run();
    let service = mocks.service(LockUnavailablePolicy::Degrade);

    for _ in 0..2 {
        let result = service.issue_coupon(issue()).await;
        assert!(
            matches!(result, Err(OperationError::UserNotFound)),
            "{result:?}"
        );
    }
}

#[tokio::test]
async fn a_known_user_is_not_looked_up_again() {
    let mut mocks = Mocks::default();
    mocks
        .user_read(1)
        .admits(Ok(GateAnswer::Refused {
            refusal: GateRefusal::SoldOut,
            stale: false,
        }))
        .admits(Ok(GateAnswer::Refused {
            refusal: GateRefusal::SoldOut,
            stale: false,
        }))
        .never_confirmed()
        .never_given_back()
        .not_rebuilt()
        .step_not_run();
    mocks
        .keys
        .expect_insert_refusal()
        .times(2)
        .returning(|_, _, _| Ok(None));
    mocks
        .gate
        .expect_record()
        .times(2)
        .returning(|_, _, _, _, _, _, _| Ok(()));
    let service = mocks.service(LockUnavailablePolicy::Degrade);

    for _ in 0..2 {
        assert_eq!(
            service.issue_coupon(issue()).await.unwrap(),
            fresh(sold_out())
        );
    }
}

// ---------------------------------------------------------------------------------------
// The gate's own answers
// ---------------------------------------------------------------------------------------

/// A refusal the gate decides is stored in the database first (one insert, no lock, no
/// step), then cached at the gate; the answer is the request's own pre-encoded bytes.
#[tokio::test]
async fn a_gate_refusal_answers_the_requests_pre_encoded_bytes_and_touches_nothing_else() {
    for (refusal, bytes) in [
        (GateRefusal::SoldOut, sold_out()),
        (GateRefusal::AlreadyIssued, already_issued()),
        (GateRefusal::NotOpen, not_open()),
    ] {
        let mut mocks = Mocks::default();
        let mut seq = Sequence::new();
        mocks
            .user_read(1)
            .admits(Ok(GateAnswer::Refused {
                refusal,
                stale: false,
            }))
            .never_confirmed()
            .never_given_back()
            .not_rebuilt()
            .step_not_run();
        mocks
            .keys
            .expect_insert_refusal()
            .times(1)
            .in_sequence(&mut seq)
            .withf({
                let bytes = bytes.clone();
                move |user, record, stored| {
                    *user == user_id() && *record == key_record() && *stored == bytes
                }
            })
            .return_once(|_, _, _| Ok(None));
        mocks
            .gate
            .expect_record()
            .times(1)
            .in_sequence(&mut seq)
            .withf({
                let bytes = bytes.clone();
                move |_, _, _, _, stored, _, expires_at| *stored == bytes && *expires_at == expiry()
            })
            .return_once(|_, _, _, _, _, _, _| Ok(()));
        mocks.locks.expect_release().never();
        let service = mocks.service(LockUnavailablePolicy::Degrade);

        let execution = service.issue_coupon(issue()).await.unwrap();

        assert_eq!(execution, fresh(bytes), "{refusal:?}");
    }
}

#[tokio::test]
async fn a_gate_replay_answers_the_recorded_bytes_and_expiry() {
    let recorded_until = now() + chrono::Duration::minutes(17);
    let mut mocks = Mocks::default();
    mocks
        .user_read(1)
        .admits(Ok(GateAnswer::Replay {
            response: recorded_bytes(),
            expires_at: recorded_until,
        }))
        .gate_left_alone()
        .step_not_run();
    let service = mocks.service(LockUnavailablePolicy::Degrade);

    let execution = service.issue_coupon(issue()).await.unwrap();

    assert_eq!(
        execution,
        Execution {
            response: recorded_bytes(),
            replayed: true,
            expires_at: recorded_until,
        }
    );
}

#[tokio::test]
async fn a_key_the_gate_answered_for_another_request_is_key_reused() {
    let mut mocks = Mocks::default();
    mocks
        .user_read(1)
        .admits(Ok(GateAnswer::Reused))
        .gate_left_alone()
        .step_not_run();
    let service = mocks.service(LockUnavailablePolicy::Degrade);

    let result = service.issue_coupon(issue()).await;

    assert!(
        matches!(result, Err(OperationError::KeyReused)),
        "{result:?}"
    );
}

// ---------------------------------------------------------------------------------------
// Rebuilding the gate
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_missing_gate_is_rebuilt_from_the_database_then_asked_again() {
    let mut seq = Sequence::new();
    let mut mocks = Mocks::default();
    mocks.user_read(1);
    mocks
        .admits_in(&mut seq, Ok(GateAnswer::Missing))
        .rebuilt(&mut seq, Ok(()))
        .admits_in(
            &mut seq,
            Ok(GateAnswer::Refused {
                refusal: GateRefusal::NotOpen,
                stale: false,
            }),
        )
        .never_confirmed()
        .never_given_back()
        .refusal_stored_and_cached(not_open())
        .step_not_run();
    let service = mocks.service(LockUnavailablePolicy::Degrade);

    let execution = service.issue_coupon(issue()).await.unwrap();

    assert_eq!(execution, fresh(not_open()));
}

#[tokio::test]
async fn a_missing_gate_of_a_coupon_the_database_does_not_have_is_coupon_not_found() {
    let mut mocks = Mocks::default();
    mocks.user_read(1).admits(Ok(GateAnswer::Missing));
    mocks
        .coupons
        .expect_gate_snapshot()
        .times(1)
        .with(eq(coupon_id()))
        .returning(|_| Ok(None));
    mocks.gate.expect_load().never();
    mocks.gate.expect_forget().never();
    mocks
        .never_confirmed()
        .never_given_back()
        .never_recorded()
        .step_not_run();
    let service = mocks.service(LockUnavailablePolicy::Degrade);

    let result = service.issue_coupon(issue()).await;

    assert!(
        matches!(result, Err(OperationError::CouponNotFound)),
        "{result:?}"
    );
}

#[tokio::test]
async fn a_gate_still_missing_after_a_failed_rebuild_lets_the_database_answer() {
    let mut seq = Sequence::new();
    let mut mocks = Mocks::default();
    // The gate's check, then the step's read.
    mocks.user_read(2);
    mocks
        .admits_in(&mut seq, Ok(GateAnswer::Missing))
        // The load fails: not the answer, the gate is asked again.
        .rebuilt(&mut seq, Err(gate_down()))
        .admits_in(&mut seq, Ok(GateAnswer::Missing))
        // Rebuilt once only; the step runs with no unit reserved and confirms its issue.
        .step_issues()
        .confirmed(Ok(()))
        .never_given_back()
        .never_recorded();
    let service = mocks.service(LockUnavailablePolicy::Degrade);

    let execution = service.issue_coupon(issue()).await.unwrap();

    assert_eq!(execution, fresh(issued()));
}

#[tokio::test]
async fn a_stale_refusal_rebuilds_the_gate_then_asks_again_once() {
    let stale = || {
        Ok(GateAnswer::Refused {
            refusal: GateRefusal::SoldOut,
            stale: true,
        })
    };
    let mut seq = Sequence::new();
    let mut mocks = Mocks::default();
    mocks.user_read(1);
    mocks
        .admits_in(&mut seq, stale())
        .rebuilt(&mut seq, Ok(()))
        // Still stale after the rebuild: answered (and only this final answer stored),
        // not rebuilt again.
        .admits_in(&mut seq, stale())
        .never_confirmed()
        .never_given_back()
        .refusal_stored_and_cached(sold_out())
        .step_not_run();
    let service = mocks.service(LockUnavailablePolicy::Degrade);

    let execution = service.issue_coupon(issue()).await.unwrap();

    assert_eq!(execution, fresh(sold_out()));
}

/// A key the database answered before keeps that answer when the gate would refuse it:
/// replayed (its bytes and expiry) for the same request, reused for another; nothing is
/// cached at the gate.
#[tokio::test]
async fn a_gate_refusal_of_a_key_the_database_answered_keeps_the_databases_answer() {
    let earlier_until = now() + chrono::Duration::minutes(9);
    let earlier = |fingerprint: Fingerprint| CompletedRecord {
        user_id: user_id(),
        key: key(),
        fingerprint,
        operation: OperationKind::CouponIssue,
        outcome: RecordOutcome::Applied,
        response: issued(),
        created_at: now() - chrono::Duration::minutes(1),
        expires_at: earlier_until,
    };
    let refused = || {
        Ok(GateAnswer::Refused {
            refusal: GateRefusal::SoldOut,
            stale: false,
        })
    };

    let mut mocks = Mocks::default();
    mocks
        .user_read(1)
        .admits(refused())
        .refusal_stored(sold_out(), Some(earlier(issue().fingerprint())))
        .gate_left_alone()
        .step_not_run();
    let service = mocks.service(LockUnavailablePolicy::Degrade);
    assert_eq!(
        service.issue_coupon(issue()).await.unwrap(),
        Execution {
            response: issued(),
            replayed: true,
            expires_at: earlier_until,
        }
    );
    drop(service);

    let mut mocks = Mocks::default();
    mocks
        .user_read(1)
        .admits(refused())
        .refusal_stored(
            sold_out(),
            Some(earlier(Fingerprint::from_stored("charge:user=7:amount=5"))),
        )
        .gate_left_alone()
        .step_not_run();
    let service = mocks.service(LockUnavailablePolicy::Degrade);
    assert!(matches!(
        service.issue_coupon(issue()).await,
        Err(OperationError::KeyReused)
    ));
}

/// The database cannot store the gate's refusal: 503, and nothing cached at the gate.
#[tokio::test]
async fn a_gate_refusal_the_database_cannot_store_is_unavailable() {
    let mut mocks = Mocks::default();
    mocks
        .user_read(1)
        .admits(Ok(GateAnswer::Refused {
            refusal: GateRefusal::NotOpen,
            stale: false,
        }))
        .gate_left_alone()
        .step_not_run();
    mocks
        .keys
        .expect_insert_refusal()
        .times(1)
        .return_once(|_, _, _| Err(RepoError::Unavailable(down())));
    let service = mocks.service(LockUnavailablePolicy::Degrade);
    assert!(matches!(
        service.issue_coupon(issue()).await,
        Err(OperationError::Unavailable(_))
    ));
}

// ---------------------------------------------------------------------------------------
// An admitted unit
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn an_admitted_unit_the_step_issued_is_confirmed_not_given_back() {
    let mut seq = Sequence::new();
    let mut mocks = Mocks::default();
    mocks.user_read(2);
    mocks.admits_in(&mut seq, Ok(GateAnswer::Admitted));
    mocks.step_issues();
    mocks
        .gate
        .expect_confirm()
        .times(1)
        .in_sequence(&mut seq)
        .with(eq(coupon_id()), eq(user_id()), eq(key()))
        .returning(|_, _, _| Ok(()));
    mocks.never_given_back().never_recorded().not_rebuilt();
    let service = mocks.service(LockUnavailablePolicy::Degrade);

    let execution = service.issue_coupon(issue()).await.unwrap();

    assert_eq!(execution, fresh(issued()));
}

#[tokio::test]
async fn an_admitted_unit_the_step_refused_is_recorded_given_back_and_the_gate_rebuilt() {
    let mut seq = Sequence::new();
    let mut mocks = Mocks::default();
    mocks.user_read(2);
    mocks.admits_in(&mut seq, Ok(GateAnswer::Admitted));
    // The database has no unit left although the gate let this one through.
    mocks.step_refuses(coupon(STOCK), None, sold_out());
    mocks
        .recorded(sold_out(), Ok(()))
        .given_back(Ok(()))
        .rebuilt(&mut seq, Ok(()))
        .never_confirmed();
    let service = mocks.service(LockUnavailablePolicy::Degrade);

    let execution = service.issue_coupon(issue()).await.unwrap();

    assert_eq!(execution, fresh(sold_out()));
}

#[tokio::test]
async fn an_admitted_unit_refused_as_already_issued_is_kept_not_given_back() {
    let mut seq = Sequence::new();
    let mut mocks = Mocks::default();
    mocks.user_read(2);
    mocks.admits_in(&mut seq, Ok(GateAnswer::Admitted));
    // The user holds one (issued under another key, not yet confirmed at the gate).
    mocks.step_refuses(coupon(1), Some(holding()), already_issued());
    mocks
        .recorded(already_issued(), Ok(()))
        .never_given_back()
        .rebuilt(&mut seq, Ok(()))
        .never_confirmed();
    let service = mocks.service(LockUnavailablePolicy::Degrade);

    let execution = service.issue_coupon(issue()).await.unwrap();

    assert_eq!(execution, fresh(already_issued()));
}

/// Errors of the step after an admission, each arranged on fresh mocks.
#[derive(Debug, Clone, Copy)]
enum StepFails {
    /// The user is gone by the step's read (the gate's check had found it).
    UserNotFound,
    /// The coupon is not in the database.
    CouponNotFound,
    /// The key has a record of another request (another coupon).
    KeyReused,
    /// The user's lock stayed busy.
    LockTimeout,
    /// Another instance finished the key meanwhile, and its record is not found.
    KeyInUse,
    /// The store failed with an unknown outcome.
    Unavailable,
}

impl StepFails {
    /// Arranges the step (and the user's reads) to fail so.
    fn arrange(self, mocks: &mut Mocks) {
        match self {
            StepFails::UserNotFound => {
                let reads = AtomicUsize::new(0);
                mocks
                    .users
                    .expect_get_user()
                    .times(2)
                    .with(eq(user_id()))
                    .returning(move |_| {
                        if reads.fetch_add(1, Ordering::SeqCst) == 0 {
                            Ok(Some(user()))
                        } else {
                            Ok(None)
                        }
                    });
                mocks.no_record(1).locked_and_released();
                mocks.coupons.expect_get_coupon().never();
                mocks.store.expect_apply().never();
                mocks.store.expect_record_refusal().never();
            }
            StepFails::CouponNotFound => {
                mocks
                    .user_read(2)
                    .no_record(1)
                    .locked_and_released()
                    .coupon_read(None, None);
                mocks.store.expect_apply().never();
                mocks.store.expect_record_refusal().never();
            }
            StepFails::KeyReused => {
                let other = IssueCoupon {
                    coupon: CouponId::new(OTHER_COUPON).unwrap(),
                    ..issue()
                };
                mocks.user_read(1);
                mocks
                    .keys
                    .expect_find()
                    .times(1)
                    .with(eq(user_id()), eq(key()), eq(now()))
                    .returning(move |_, _, _| {
                        Ok(Some(CompletedRecord {
                            user_id: user_id(),
                            key: key(),
                            fingerprint: other.fingerprint(),
                            operation: OperationKind::CouponIssue,
                            outcome: RecordOutcome::Applied,
                            response: recorded_bytes(),
                            created_at: now() - chrono::Duration::minutes(1),
                            expires_at: now() + chrono::Duration::minutes(59),
                        }))
                    });
                mocks.locks.expect_acquire().never();
                mocks.coupons.expect_get_coupon().never();
                mocks.store.expect_apply().never();
                mocks.store.expect_record_refusal().never();
            }
            StepFails::LockTimeout => {
                mocks.user_read(1).no_record(1);
                mocks
                    .locks
                    .expect_acquire()
                    .times(1)
                    .returning(|_, _, _| Err(LockError::Timeout));
                mocks.locks.expect_release().never();
                mocks.coupons.expect_get_coupon().never();
                mocks.store.expect_apply().never();
                mocks.store.expect_record_refusal().never();
            }
            StepFails::KeyInUse => {
                mocks
                    .user_read(2)
                    .no_record(2)
                    .locked_and_released()
                    .coupon_read(Some(coupon(1)), None)
                    .applies(|_| Err(StepError::KeyTaken));
            }
            StepFails::Unavailable => {
                mocks
                    .user_read(2)
                    .no_record(1)
                    .locked_and_released()
                    .coupon_read(Some(coupon(1)), None)
                    .applies(|_| Err(StepError::Unavailable(down())));
            }
        }
    }

    fn is(self, error: &OperationError) -> bool {
        match self {
            StepFails::UserNotFound => matches!(error, OperationError::UserNotFound),
            StepFails::CouponNotFound => matches!(error, OperationError::CouponNotFound),
            StepFails::KeyReused => matches!(error, OperationError::KeyReused),
            StepFails::LockTimeout => matches!(error, OperationError::LockTimeout),
            StepFails::KeyInUse => matches!(error, OperationError::KeyInUse),
            StepFails::Unavailable => matches!(error, OperationError::Unavailable(_)),
        }
    }
}

#[tokio::test]
async fn an_admitted_unit_is_given_back_after_an_error_that_proves_nothing_was_issued() {
    for failure in [
        StepFails::UserNotFound,
        StepFails::CouponNotFound,
        StepFails::KeyReused,
    ] {
        let mut mocks = Mocks::default();
        mocks.admits(Ok(GateAnswer::Admitted));
        failure.arrange(&mut mocks);
        mocks
            .given_back(Ok(()))
            .never_confirmed()
            .never_recorded()
            .not_rebuilt();
        let service = mocks.service(LockUnavailablePolicy::Degrade);

        let result = service.issue_coupon(issue()).await;

        let error = result.expect_err("the step failed");
        assert!(failure.is(&error), "{failure:?}: {error:?}");
    }
}

#[tokio::test]
async fn an_admitted_unit_stays_pending_after_an_unknown_outcome() {
    for failure in [
        StepFails::LockTimeout,
        StepFails::KeyInUse,
        StepFails::Unavailable,
    ] {
        let mut mocks = Mocks::default();
        mocks.admits(Ok(GateAnswer::Admitted));
        failure.arrange(&mut mocks);
        mocks.gate_left_alone();
        let service = mocks.service(LockUnavailablePolicy::Degrade);

        let result = service.issue_coupon(issue()).await;

        let error = result.expect_err("the step failed");
        assert!(failure.is(&error), "{failure:?}: {error:?}");
    }
}

// ---------------------------------------------------------------------------------------
// A pass: the step without a reservation
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_pass_runs_the_step_and_confirms_what_it_issued() {
    let mut mocks = Mocks::default();
    mocks
        .user_read(2)
        .admits(Ok(GateAnswer::Pass))
        .step_issues()
        .confirmed(Ok(()))
        .never_given_back()
        .never_recorded()
        .not_rebuilt();
    let service = mocks.service(LockUnavailablePolicy::Degrade);

    let execution = service.issue_coupon(issue()).await.unwrap();

    assert_eq!(execution, fresh(issued()));
}

#[tokio::test]
async fn a_pass_records_what_the_step_refused_and_gives_nothing_back() {
    let mut mocks = Mocks::default();
    mocks.user_read(2).admits(Ok(GateAnswer::Pass));
    mocks.step_refuses(coupon(STOCK), None, sold_out());
    // No unit was reserved, so none is given back (and the gate did not disagree).
    mocks
        .recorded(sold_out(), Ok(()))
        .never_given_back()
        .never_confirmed()
        .not_rebuilt();
    let service = mocks.service(LockUnavailablePolicy::Degrade);

    let execution = service.issue_coupon(issue()).await.unwrap();

    assert_eq!(execution, fresh(sold_out()));
}

#[tokio::test]
async fn a_pass_settles_nothing_when_the_step_fails() {
    for failure in [StepFails::CouponNotFound, StepFails::Unavailable] {
        let mut mocks = Mocks::default();
        mocks.admits(Ok(GateAnswer::Pass));
        failure.arrange(&mut mocks);
        mocks.gate_left_alone();
        let service = mocks.service(LockUnavailablePolicy::Degrade);

        let error = service
            .issue_coupon(issue())
            .await
            .expect_err("the step failed");

        assert!(failure.is(&error), "{failure:?}: {error:?}");
    }
}

// ---------------------------------------------------------------------------------------
// A gate that cannot be asked
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn an_unavailable_gate_under_degrade_runs_the_step_alone() {
    let mut mocks = Mocks::default();
    mocks
        .user_read(2)
        .admits(Err(gate_down()))
        .step_issues()
        .gate_left_alone();
    let service = mocks.service(LockUnavailablePolicy::Degrade);

    let execution = service.issue_coupon(issue()).await.unwrap();

    assert_eq!(execution, fresh(issued()));
}

#[tokio::test]
async fn an_unavailable_gate_under_fail_answers_unavailable_and_runs_nothing() {
    let mut mocks = Mocks::default();
    mocks
        .user_read(1)
        .admits(Err(gate_down()))
        .gate_left_alone()
        .step_not_run();
    let service = mocks.service(LockUnavailablePolicy::Fail);

    let result = service.issue_coupon(issue()).await;

    assert!(
        matches!(result, Err(OperationError::Unavailable(_))),
        "{result:?}"
    );
}

#[tokio::test]
async fn a_gate_that_fails_otherwise_is_bypassed_even_under_fail() {
    // "whenever the gate cannot answer": only Unavailable is LOCK_ON_REDIS_DOWN's to refuse.
    let mut mocks = Mocks::default();
    mocks
        .user_read(2)
        .admits(Err(GateError::Unexpected(anyhow::anyhow!(
            "a script error"
        ))))
        .step_issues()
        .gate_left_alone();
    let service = mocks.service(LockUnavailablePolicy::Fail);

    let execution = service.issue_coupon(issue()).await.unwrap();

    assert_eq!(execution, fresh(issued()));
}

// ---------------------------------------------------------------------------------------
// Settling the gate never changes the answer
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_failed_confirm_does_not_change_the_answer() {
    for answer in [GateAnswer::Admitted, GateAnswer::Pass] {
        let mut mocks = Mocks::default();
        mocks
            .user_read(2)
            .admits(Ok(answer.clone()))
            .step_issues()
            .confirmed(Err(gate_down()))
            .never_given_back()
            .never_recorded()
            .not_rebuilt();
        let service = mocks.service(LockUnavailablePolicy::Degrade);

        let execution = service.issue_coupon(issue()).await.unwrap();

        assert_eq!(execution, fresh(issued()), "{answer:?}");
    }
}

#[tokio::test]
async fn failed_settles_and_rebuild_after_a_refusal_do_not_change_the_answer() {
    // record, give_back and the rebuild's load all fail.
    let mut seq = Sequence::new();
    let mut mocks = Mocks::default();
    mocks.user_read(2);
    mocks.admits_in(&mut seq, Ok(GateAnswer::Admitted));
    mocks.step_refuses(coupon(STOCK), None, sold_out());
    mocks
        .recorded(sold_out(), Err(gate_down()))
        .given_back(Err(gate_down()))
        .rebuilt(&mut seq, Err(gate_down()))
        .never_confirmed();
    let service = mocks.service(LockUnavailablePolicy::Degrade);

    assert_eq!(
        service.issue_coupon(issue()).await.unwrap(),
        fresh(sold_out())
    );

    // The snapshot cannot be read for the rebuild: still the step's answer.
    let mut mocks = Mocks::default();
    mocks
        .user_read(2)
        .admits(Ok(GateAnswer::Admitted))
        .step_refuses(coupon(STOCK), None, sold_out());
    mocks
        .coupons
        .expect_gate_snapshot()
        .times(1)
        .with(eq(coupon_id()))
        .returning(|_| Err(RepoError::Unavailable(down())));
    mocks.gate.expect_load().never();
    mocks
        .recorded(sold_out(), Ok(()))
        .given_back(Ok(()))
        .never_confirmed();
    let service = mocks.service(LockUnavailablePolicy::Degrade);

    assert_eq!(
        service.issue_coupon(issue()).await.unwrap(),
        fresh(sold_out())
    );
}

#[tokio::test]
async fn a_failed_give_back_does_not_change_the_answer() {
    let mut mocks = Mocks::default();
    mocks.admits(Ok(GateAnswer::Admitted));
    StepFails::CouponNotFound.arrange(&mut mocks);
    mocks
        .given_back(Err(gate_down()))
        .never_confirmed()
        .never_recorded()
        .not_rebuilt();
    let service = mocks.service(LockUnavailablePolicy::Degrade);

    let result = service.issue_coupon(issue()).await;

    assert!(
        matches!(result, Err(OperationError::CouponNotFound)),
        "{result:?}"
    );
}
