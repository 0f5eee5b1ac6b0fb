#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The balance-changing use cases over swapped adapters: mockall mocks of every port, a
//! small real `ResponseEncoder`, a fixed `Clock`, and two hand-written fakes where a test
//! must hold an execution half-way (a lock that waits on a gate, a store that never
//! answers).
//!
//! What is pinned here: the order lock → read → write → release and the lock's name; what
//! is stored (successes and business refusals) and what is not (lock timeouts, 5xx,
//! unknown user or order, duplicates); the bounded optimistic retry; replays that touch
//! nothing but the idempotency record; and concurrent duplicates held off by the claim.

use std::any::Any;
use std::future::Future;
use std::ops::Deref;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use mockall::Sequence;
use mockall::predicate::eq;
use tokio::sync::{Notify, Semaphore};

use domain::idempotency::{CompletedRecord, RecordOutcome, StoredResponse};
use domain::model::{EntryKind, Order, OrderStatus, User};
use domain::operations::Effect;
use domain::outcome::{BalanceReceipt, Outcome, PaymentReceipt, Refusal};
use domain::ports::{
    Applied, Assigned, BalanceChange, BalanceStore, BatchTransaction, Clock, IdempotencyRepo,
    KeyRecord, LockError, LockKey, LockLease, LockManager, MockBalanceStore, MockCouponRepo,
    MockIdempotencyRepo, MockLockManager, MockOrderRepo, MockUserRepo, OrderRepo, RefusalRecord,
    Release, RepoError, ResponseEncoder, StepError, UserRepo,
};
use domain::types::{
    Amount, Balance, EntryId, IdempotencyKey, Limits, OrderId, PageLimit, PaymentId, UserId,
};
use domain::{
    BalanceService, Charge, Execution, GroupCommit, LockUnavailablePolicy, Operation,
    OperationError, Pay, Ports, Settings, UseBalance,
};

// ---------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------

const USER: i64 = 7;
const OTHER_USER: i64 = 8;
const KEY: &str = "retry-7f3c2a";
const TOKEN: &str = "lease-token-1";
const LOCK_WAIT: Duration = Duration::from_millis(250);
const LOCK_LEASE: Duration = Duration::from_millis(2_000);
const TTL_SECS: i64 = 3_600;
const MAX_AMOUNT: i64 = 1_000_000;
const MAX_BALANCE: i64 = 5_000_000;
const RETRIES: u32 = 3;

fn now() -> DateTime<Utc> {
    DateTime::from_timestamp_millis(1_795_356_000_123).expect("a valid instant")
}

fn settings() -> Settings {
    Settings {
        lock_wait: LOCK_WAIT,
        lock_lease: LOCK_LEASE,
        optimistic_retries: RETRIES,
        on_lock_unavailable: LockUnavailablePolicy::Degrade,
        idempotency_ttl: Duration::from_secs(TTL_SECS.unsigned_abs()),
        limits: limits(),
        group_commit: GroupCommit::Off,
    }
}

fn limits() -> Limits {
    Limits::new(MAX_AMOUNT, MAX_BALANCE).unwrap()
}

fn user_id() -> UserId {
    UserId::new(USER).unwrap()
}

fn other_user_id() -> UserId {
    UserId::new(OTHER_USER).unwrap()
}

fn key() -> IdempotencyKey {
    IdempotencyKey::parse(KEY).unwrap()
}

fn amount(value: i64) -> Amount {
    Amount::new(value, &limits()).unwrap()
}

fn order_id(value: i64) -> OrderId {
    OrderId::new(value).unwrap()
}

fn user(balance: i64, version: u64) -> User {
    User {
        id: user_id(),
        balance: Balance::from_stored(balance),
        version,
        created_at: now() - chrono::Duration::days(30),
    }
}

fn order(id: i64, owner: UserId, value: i64, status: OrderStatus) -> Order {
    Order {
        id: order_id(id),
        user_id: owner,
        amount: amount(value),
        status,
        created_at: now() - chrono::Duration::minutes(5),
    }
}

/// A validated operation, as the HTTP adapter hands it to the use case.
type Command = Arc<dyn Operation>;

fn charge(value: i64) -> Command {
    Arc::new(Charge {
        user: user_id(),
        amount: amount(value),
        key: key(),
    })
}

fn use_balance(value: i64) -> Command {
    Arc::new(UseBalance {
        user: user_id(),
        amount: amount(value),
        key: key(),
    })
}

fn pay(order: i64) -> Command {
    Arc::new(Pay {
        user: user_id(),
        order: order_id(order),
        key: key(),
        coupon: None,
    })
}

/// The order an effect pays, if it pays one.
fn pays_order(effect: &Effect) -> Option<OrderId> {
    match effect {
        Effect::Pay { order, .. } => Some(*order),
        Effect::Charge(_) | Effect::Use(_) | Effect::Refund(_) | Effect::IssueCoupon(_) => None,
    }
}

/// One command of each kind, for the paths that do not depend on the operation.
fn every_kind() -> [Command; 3] {
    [charge(2_500), use_balance(2_500), pay(11)]
}

fn lease() -> LockLease {
    LockLease {
        key: LockKey::user_balance(user_id()),
        token: TOKEN.to_owned(),
    }
}

/// The completed record the atomic step must write with `command`'s effect.
fn key_record(command: &Command) -> KeyRecord {
    KeyRecord {
        key: command.key().clone(),
        fingerprint: command.fingerprint(),
        operation: command.kind(),
        created_at: now(),
        expires_at: now() + chrono::Duration::seconds(TTL_SECS),
    }
}

fn encode(outcome: Outcome) -> StoredResponse {
    TestEncoder.encode(&outcome)
}

fn receipt(balance: i64, value: i64) -> BalanceReceipt {
    BalanceReceipt {
        user_id: user_id(),
        balance: Balance::from_stored(balance),
        amount: amount(value),
        at: now(),
    }
}

/// A live record of an earlier request under the test key.
fn completed(fingerprint_of: &Command, response: StoredResponse) -> CompletedRecord {
    let outcome = if (200..300).contains(&response.status) {
        RecordOutcome::Applied
    } else {
        RecordOutcome::Refused
    };
    CompletedRecord {
        user_id: user_id(),
        key: key(),
        fingerprint: fingerprint_of.fingerprint(),
        operation: fingerprint_of.kind(),
        outcome,
        response,
        created_at: now() - chrono::Duration::minutes(1),
        expires_at: now() + chrono::Duration::minutes(59),
    }
}

/// Bytes that no encoder would produce, so a replay is visibly the stored response.
fn stored_bytes() -> StoredResponse {
    StoredResponse {
        status: 201,
        body: b"stored earlier \x00\xff".to_vec(),
    }
}

/// What a store does on commit: assigns ids and builds the response through `respond`.
fn commit(change: BalanceChange, entry: i64, payment: Option<i64>) -> Result<Applied, StepError> {
    let assigned = Assigned {
        entry_id: EntryId::new(entry).ok(),
        payment_id: payment.map(|p| PaymentId::new(p).unwrap()),
        refund_id: None,
        user_coupon_id: None,
    };
    let response = (change.respond)(&assigned);
    Ok(Applied { assigned, response })
}

fn down() -> anyhow::Error {
    anyhow::anyhow!("connection refused")
}

/// A small, real encoder: a status per outcome and the outcome's debug text as the body.
#[derive(Debug)]
struct TestEncoder;

impl ResponseEncoder for TestEncoder {
    fn encode(&self, outcome: &Outcome) -> StoredResponse {
        let status = match outcome {
            Outcome::Charged(_)
            | Outcome::Used(_)
            | Outcome::Paid(_)
            | Outcome::Refunded(_)
            | Outcome::CouponIssued(_) => 200,
            Outcome::Refused(Refusal::OrderAlreadyPaid { .. } | Refusal::OrderCancelled { .. }) => {
                409
            }
            Outcome::Refused(_) => 422,
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

fn service_with(
    users: Arc<dyn UserRepo>,
    orders: Arc<dyn OrderRepo>,
    keys: Arc<dyn IdempotencyRepo>,
    store: Arc<dyn BalanceStore>,
    locks: Arc<dyn LockManager>,
    settings: Settings,
) -> BalanceService {
    BalanceService::new(
        Ports {
            users,
            orders,
            // No use case under test here reads a coupon: any call fails the test.
            coupons: Arc::new(MockCouponRepo::new()),
            keys,
            store,
            locks,
            encoder: Arc::new(TestEncoder),
            clock: Arc::new(FixedClock(now())),
            gate: None,
        },
        settings,
    )
}

/// Every port mocked. A method without an expectation panics when called, so a test
/// only states what it expects; `.never()` is spelled out where the absence is the point.
#[derive(Default)]
struct Mocks {
    users: MockUserRepo,
    orders: MockOrderRepo,
    keys: MockIdempotencyRepo,
    store: MockBalanceStore,
    locks: MockLockManager,
}

/// The service over the mocks. When dropped it drops the service and checks that every
/// mock went with it and that no key is left claimed: mockall verifies call counts
/// (`times`, `never`) when a mock is dropped, so a mock kept alive, say by a lease that was
/// never released, would otherwise skip that check silently.
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
        assert_eq!(in_flight, 0, "a key is still claimed after the execution");
        for (name, mock) in &self.mocks {
            assert!(
                mock.upgrade().is_none(),
                "the {name} mock outlived the service, so its expectations were never checked"
            );
        }
    }
}

impl Mocks {
    fn service(self, settings: Settings) -> Harness {
        let users = Arc::new(self.users);
        let orders = Arc::new(self.orders);
        let keys = Arc::new(self.keys);
        let store = Arc::new(self.store);
        let locks = Arc::new(self.locks);
        let mocks: Vec<(&'static str, Weak<dyn Any + Send + Sync>)> = vec![
            (
                "UserRepo",
                Arc::downgrade(&users) as Weak<dyn Any + Send + Sync>,
            ),
            (
                "OrderRepo",
                Arc::downgrade(&orders) as Weak<dyn Any + Send + Sync>,
            ),
            (
                "IdempotencyRepo",
                Arc::downgrade(&keys) as Weak<dyn Any + Send + Sync>,
            ),
            (
                "BalanceStore",
                Arc::downgrade(&store) as Weak<dyn Any + Send + Sync>,
            ),
            (
                "LockManager",
                Arc::downgrade(&locks) as Weak<dyn Any + Send + Sync>,
            ),
        ];
        Harness {
            service: Some(service_with(users, orders, keys, store, locks, settings)),
            mocks,
        }
    }

    /// The replay check finds no record for (user 7, the test key).
    fn no_record(&mut self) -> &mut Self {
        self.keys
            .expect_find()
            .times(1)
            .with(eq(user_id()), eq(key()), eq(now()))
            .returning(|_, _, _| Ok(None));
        self
    }

    /// `balance:user:7` is taken once with the configured wait and lease, and released once.
    fn lock_taken_and_released(&mut self) -> &mut Self {
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

    fn user_is(&mut self, balance: i64, version: u64) -> &mut Self {
        self.users
            .expect_get_user()
            .times(1)
            .with(eq(user_id()))
            .returning(move |_| Ok(Some(user(balance, version))));
        self
    }

    fn order_is(&mut self, found: Order) -> &mut Self {
        let id = found.id;
        self.orders
            .expect_get_order()
            .times(1)
            .with(eq(id))
            .returning(move |_| Ok(Some(found.clone())));
        self
    }

    fn nothing_stored(&mut self) -> &mut Self {
        self.store.expect_apply().never();
        self.store.expect_record_refusal().never();
        self
    }

    fn nothing_locked(&mut self) -> &mut Self {
        self.locks.expect_acquire().never();
        self.locks.expect_release().never();
        self
    }
}

// ---------------------------------------------------------------------------------------
// The lock: its name, its place in the sequence, its release on every path
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_charge_takes_the_user_lock_then_reads_applies_and_releases_in_that_order() {
    let command = charge(2_500);
    let expected_key = key_record(&command);
    let mut m = Mocks::default();
    let mut seq = Sequence::new();
    m.keys
        .expect_find()
        .times(1)
        .in_sequence(&mut seq)
        .with(eq(user_id()), eq(key()), eq(now()))
        .returning(|_, _, _| Ok(None));
    m.locks
        .expect_acquire()
        .times(1)
        .in_sequence(&mut seq)
        .withf(|lock, wait, lease| {
            lock.as_str() == "balance:user:7" && *wait == LOCK_WAIT && *lease == LOCK_LEASE
        })
        .returning(|_, _, _| Ok(lease()));
    m.users
        .expect_get_user()
        .times(1)
        .in_sequence(&mut seq)
        .with(eq(user_id()))
        .returning(|_| Ok(Some(user(10_000, 4))));
    m.store
        .expect_apply()
        .times(1)
        .in_sequence(&mut seq)
        .withf(move |c| {
            c.user_id == user_id()
                && c.expected_version == 4
                && c.effect.movement().map(|m| m.balance_after)
                    == Some(Balance::from_stored(12_500))
                && c.effect.entry_kind() == Some(EntryKind::Charge)
                && c.effect.movement().map(|m| m.amount) == Some(amount(2_500))
                && c.at == now()
                && c.key == expected_key
                && pays_order(&c.effect).is_none()
        })
        .returning(|c| commit(c, 31, None));
    m.locks
        .expect_release()
        .times(1)
        .in_sequence(&mut seq)
        .with(eq(lease()))
        .returning(|_| Ok(Release::Released));
    m.store.expect_record_refusal().never();
    let service = m.service(settings());

    let got = service.execute(command).await.expect("the charge applies");

    assert_eq!(
        got,
        Execution {
            response: encode(Outcome::Charged(receipt(12_500, 2_500))),
            replayed: false,
            expires_at: now() + chrono::Duration::seconds(TTL_SECS),
        }
    );
    assert_eq!(
        service.in_flight(),
        0,
        "the claim is dropped after the commit"
    );
}

#[tokio::test]
async fn the_lock_is_named_after_the_user_even_when_the_key_looks_like_a_lock_name() {
    let sneaky = IdempotencyKey::parse("balance:user:99").unwrap();
    let command = Arc::new(UseBalance {
        user: user_id(),
        amount: amount(100),
        key: sneaky.clone(),
    });
    let mut m = Mocks::default();
    m.keys
        .expect_find()
        .times(1)
        .with(eq(user_id()), eq(sneaky), eq(now()))
        .returning(|_, _, _| Ok(None));
    m.locks
        .expect_acquire()
        .times(1)
        .withf(|lock, _, _| lock.as_str() == "balance:user:7")
        .returning(|lock, _, _| {
            Ok(LockLease {
                key: lock.clone(),
                token: TOKEN.to_owned(),
            })
        });
    m.locks
        .expect_release()
        .times(1)
        .withf(|lease| lease.key.as_str() == "balance:user:7" && lease.token == TOKEN)
        .returning(|_| Ok(Release::Released));
    m.user_is(1_000, 1);
    m.store
        .expect_apply()
        .times(1)
        .withf(|c| c.key.key.as_str() == "balance:user:99")
        .returning(|c| commit(c, 2, None));

    let got = m.service(settings()).execute(command).await;

    assert_eq!(
        got.expect("the use applies").response,
        encode(Outcome::Used(receipt(900, 100)))
    );
}

#[tokio::test]
async fn a_use_debits_the_balance_read_under_the_lock() {
    let command = use_balance(2_500);
    let expected_key = key_record(&command);
    let mut m = Mocks::default();
    m.no_record().lock_taken_and_released().user_is(10_000, 4);
    m.store
        .expect_apply()
        .times(1)
        .withf(move |c| {
            c.expected_version == 4
                && c.effect.movement().map(|m| m.balance_after) == Some(Balance::from_stored(7_500))
                && c.effect.entry_kind() == Some(EntryKind::Use)
                && c.effect.movement().map(|m| m.amount) == Some(amount(2_500))
                && c.key == expected_key
                && pays_order(&c.effect).is_none()
        })
        .returning(|c| commit(c, 32, None));

    let got = m.service(settings()).execute(command).await;

    assert_eq!(
        got.expect("the use applies"),
        Execution {
            response: encode(Outcome::Used(receipt(7_500, 2_500))),
            replayed: false,
            expires_at: now() + chrono::Duration::seconds(TTL_SECS),
        }
    );
}

#[tokio::test]
async fn using_the_whole_balance_and_charging_up_to_the_maximum_are_applied() {
    let mut m = Mocks::default();
    m.no_record().lock_taken_and_released().user_is(2_500, 1);
    m.store
        .expect_apply()
        .times(1)
        .withf(|c| c.effect.movement().map(|m| m.balance_after) == Some(Balance::ZERO))
        .returning(|c| commit(c, 1, None));
    let got = m.service(settings()).execute(use_balance(2_500)).await;
    assert_eq!(got.expect("applies").response.status, 200);

    let mut m = Mocks::default();
    m.no_record()
        .lock_taken_and_released()
        .user_is(MAX_BALANCE - MAX_AMOUNT, 1);
    m.store
        .expect_apply()
        .times(1)
        .withf(|c| {
            c.effect.movement().map(|m| m.balance_after) == Some(Balance::from_stored(MAX_BALANCE))
        })
        .returning(|c| commit(c, 1, None));
    let got = m.service(settings()).execute(charge(MAX_AMOUNT)).await;
    assert_eq!(got.expect("applies").response.status, 200);
}

#[tokio::test]
async fn a_payment_debits_the_orders_amount_and_marks_the_order_paid() {
    let command = pay(11);
    let expected_key = key_record(&command);
    let mut m = Mocks::default();
    m.no_record()
        .lock_taken_and_released()
        .user_is(50_000, 9)
        .order_is(order(11, user_id(), 15_000, OrderStatus::Pending));
    m.store
        .expect_apply()
        .times(1)
        .withf(move |c| {
            c.expected_version == 9
                && c.effect.movement().map(|m| m.balance_after)
                    == Some(Balance::from_stored(35_000))
                && c.effect.entry_kind() == Some(EntryKind::Payment)
                && c.effect.movement().map(|m| m.amount) == Some(amount(15_000))
                && pays_order(&c.effect) == Some(order_id(11))
                && c.key == expected_key
        })
        .returning(|c| commit(c, 33, Some(41)));
    m.store.expect_record_refusal().never();

    let got = m.service(settings()).execute(command).await;

    assert_eq!(
        got.expect("the payment applies"),
        Execution {
            response: encode(Outcome::Paid(PaymentReceipt {
                payment_id: PaymentId::new(41).unwrap(),
                order_id: order_id(11),
                user_id: user_id(),
                amount: amount(15_000),
                balance: Balance::from_stored(35_000),
                paid_at: now(),
                coupon: None,
            })),
            replayed: false,
            expires_at: now() + chrono::Duration::seconds(TTL_SECS),
        }
    );
}

#[tokio::test]
async fn an_unavailable_store_answers_unavailable_and_the_lock_is_still_released() {
    let mut m = Mocks::default();
    m.no_record().lock_taken_and_released().user_is(10_000, 4);
    m.store
        .expect_apply()
        .times(1)
        .returning(|_| Err(StepError::Unavailable(down())));
    let service = m.service(settings());

    let got = service.execute(charge(100)).await;

    assert!(
        matches!(got, Err(OperationError::Unavailable(_))),
        "{got:?}"
    );
    assert_eq!(service.in_flight(), 0);
}

#[tokio::test]
async fn an_unexpected_store_failure_answers_unexpected_and_the_lock_is_still_released() {
    let mut m = Mocks::default();
    m.no_record().lock_taken_and_released().user_is(10_000, 4);
    m.store
        .expect_record_refusal()
        .times(1)
        .returning(|_| Err(StepError::Unexpected(anyhow::anyhow!("constraint broke"))));

    // 20 000 from 10 000 is refused, so the failing write is the refusal's record.
    let got = m.service(settings()).execute(use_balance(20_000)).await;

    assert!(matches!(got, Err(OperationError::Unexpected(_))), "{got:?}");
}

#[tokio::test]
async fn an_unknown_user_is_not_found_stores_nothing_and_the_lock_is_released() {
    for command in every_kind() {
        let mut m = Mocks::default();
        m.no_record().lock_taken_and_released().nothing_stored();
        m.users
            .expect_get_user()
            .times(1)
            .with(eq(user_id()))
            .returning(|_| Ok(None));
        m.orders.expect_get_order().never();
        let service = m.service(settings());

        let got = service.execute(command.clone()).await;

        assert!(
            matches!(got, Err(OperationError::UserNotFound)),
            "{command:?}: {got:?}"
        );
        assert_eq!(service.in_flight(), 0);
    }
}

#[tokio::test]
async fn an_unknown_order_is_not_found_stores_nothing_and_the_lock_is_released() {
    let mut m = Mocks::default();
    m.no_record()
        .lock_taken_and_released()
        .user_is(50_000, 9)
        .nothing_stored();
    m.orders
        .expect_get_order()
        .times(1)
        .with(eq(order_id(11)))
        .returning(|_| Ok(None));

    let got = m.service(settings()).execute(pay(11)).await;

    assert!(matches!(got, Err(OperationError::OrderNotFound)), "{got:?}");
}

#[tokio::test]
async fn paying_another_users_order_is_not_found_whatever_its_state_and_stores_nothing() {
    for status in [OrderStatus::Pending, OrderStatus::Paid] {
        let mut m = Mocks::default();
        m.no_record()
            .lock_taken_and_released()
            .user_is(50_000, 9)
            .order_is(order(11, other_user_id(), 15_000, status))
            .nothing_stored();

        let got = m.service(settings()).execute(pay(11)).await;

        assert!(
            matches!(got, Err(OperationError::OrderNotFound)),
            "{status:?}: {got:?}"
        );
    }
}

#[tokio::test]
async fn a_lost_lease_or_a_failed_release_does_not_change_the_committed_answer() {
    let outcomes: [fn() -> Result<Release, LockError>; 2] = [
        || Ok(Release::LeaseLost),
        || Err(LockError::Unavailable(down())),
    ];
    for release in outcomes {
        let mut m = Mocks::default();
        m.no_record().user_is(10_000, 4);
        m.locks
            .expect_acquire()
            .times(1)
            .returning(|_, _, _| Ok(lease()));
        m.locks
            .expect_release()
            .times(1)
            .with(eq(lease()))
            .returning(move |_| release());
        m.store
            .expect_apply()
            .times(1)
            .returning(|c| commit(c, 31, None));

        let got = m.service(settings()).execute(charge(2_500)).await;

        assert_eq!(
            got.expect("committed before the release"),
            Execution {
                response: encode(Outcome::Charged(receipt(12_500, 2_500))),
                replayed: false,
                expires_at: now() + chrono::Duration::seconds(TTL_SECS),
            }
        );
    }
}

// ---------------------------------------------------------------------------------------
// When the lock cannot be had
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_lock_timeout_answers_lock_timeout_reads_and_stores_nothing_and_releases_nothing() {
    for command in every_kind() {
        let mut m = Mocks::default();
        m.no_record().nothing_stored();
        m.locks
            .expect_acquire()
            .times(1)
            .returning(|_, _, _| Err(LockError::Timeout));
        m.locks.expect_release().never();
        m.users.expect_get_user().never();
        m.orders.expect_get_order().never();
        let service = m.service(settings());

        let got = service.execute(command.clone()).await;

        assert!(
            matches!(got, Err(OperationError::LockTimeout)),
            "{command:?}: {got:?}"
        );
        assert_eq!(service.in_flight(), 0, "the key is free for a retry");
    }
}

#[tokio::test]
async fn a_retry_after_a_lock_timeout_runs_afresh() {
    let mut m = Mocks::default();
    let mut seq = Sequence::new();
    m.keys
        .expect_find()
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_, _, _| Ok(None));
    m.locks
        .expect_acquire()
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_, _, _| Err(LockError::Timeout));
    m.keys
        .expect_find()
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_, _, _| Ok(None));
    m.locks
        .expect_acquire()
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_, _, _| Ok(lease()));
    m.users
        .expect_get_user()
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_| Ok(Some(user(10_000, 4))));
    m.store
        .expect_apply()
        .times(1)
        .in_sequence(&mut seq)
        .returning(|c| commit(c, 31, None));
    m.locks
        .expect_release()
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_| Ok(Release::Released));
    let service = m.service(settings());

    let first = service.execute(charge(2_500)).await;
    let second = service.execute(charge(2_500)).await;

    assert!(
        matches!(first, Err(OperationError::LockTimeout)),
        "{first:?}"
    );
    assert_eq!(
        second.expect("the retry runs"),
        Execution {
            response: encode(Outcome::Charged(receipt(12_500, 2_500))),
            replayed: false,
            expires_at: now() + chrono::Duration::seconds(TTL_SECS),
        }
    );
}

#[tokio::test]
async fn an_unreachable_lock_service_with_degrade_goes_on_without_the_lock() {
    let mut m = Mocks::default();
    m.no_record().user_is(10_000, 4);
    m.locks
        .expect_acquire()
        .times(1)
        .returning(|_, _, _| Err(LockError::Unavailable(down())));
    m.locks.expect_release().never();
    m.store
        .expect_apply()
        .times(1)
        .withf(|c| {
            c.expected_version == 4
                && c.effect.movement().map(|m| m.balance_after) == Some(Balance::from_stored(7_500))
        })
        .returning(|c| commit(c, 31, None));
    let service = m.service(Settings {
        on_lock_unavailable: LockUnavailablePolicy::Degrade,
        ..settings()
    });

    let got = service.execute(use_balance(2_500)).await;

    assert_eq!(
        got.expect("degraded, still applied"),
        Execution {
            response: encode(Outcome::Used(receipt(7_500, 2_500))),
            replayed: false,
            expires_at: now() + chrono::Duration::seconds(TTL_SECS),
        }
    );
    assert_eq!(service.in_flight(), 0);
}

#[tokio::test]
async fn an_unreachable_lock_service_with_fail_answers_unavailable_and_writes_nothing() {
    for command in every_kind() {
        let mut m = Mocks::default();
        m.no_record().nothing_stored();
        m.locks
            .expect_acquire()
            .times(1)
            .returning(|_, _, _| Err(LockError::Unavailable(down())));
        m.locks.expect_release().never();
        m.users.expect_get_user().never();
        m.orders.expect_get_order().never();
        let service = m.service(Settings {
            on_lock_unavailable: LockUnavailablePolicy::Fail,
            ..settings()
        });

        let got = service.execute(command.clone()).await;

        assert!(
            matches!(got, Err(OperationError::Unavailable(_))),
            "{command:?}: {got:?}"
        );
        assert_eq!(service.in_flight(), 0);
    }
}

#[tokio::test]
async fn an_unexpected_lock_error_answers_unexpected_and_writes_nothing() {
    let mut m = Mocks::default();
    m.no_record().nothing_stored();
    m.locks
        .expect_acquire()
        .times(1)
        .returning(|_, _, _| Err(LockError::Unexpected(anyhow::anyhow!("bad script"))));
    m.locks.expect_release().never();
    m.users.expect_get_user().never();

    let got = m.service(settings()).execute(charge(100)).await;

    assert!(matches!(got, Err(OperationError::Unexpected(_))), "{got:?}");
}

// ---------------------------------------------------------------------------------------
// Optimistic retries
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_version_conflict_is_retried_from_a_fresh_read() {
    let mut m = Mocks::default();
    let mut seq = Sequence::new();
    m.no_record().lock_taken_and_released();
    m.users
        .expect_get_user()
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_| Ok(Some(user(10_000, 4))));
    m.store
        .expect_apply()
        .times(1)
        .in_sequence(&mut seq)
        .withf(|c| {
            c.expected_version == 4
                && c.effect.movement().map(|m| m.balance_after)
                    == Some(Balance::from_stored(12_500))
        })
        .returning(|_| Err(StepError::VersionConflict));
    // Somebody else wrote first: the retry must decide on what they left.
    m.users
        .expect_get_user()
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_| Ok(Some(user(20_000, 5))));
    m.store
        .expect_apply()
        .times(1)
        .in_sequence(&mut seq)
        .withf(|c| {
            c.expected_version == 5
                && c.effect.movement().map(|m| m.balance_after)
                    == Some(Balance::from_stored(22_500))
        })
        .returning(|c| commit(c, 31, None));

    let got = m.service(settings()).execute(charge(2_500)).await;

    assert_eq!(
        got.expect("the retry applies"),
        Execution {
            response: encode(Outcome::Charged(receipt(22_500, 2_500))),
            replayed: false,
            expires_at: now() + chrono::Duration::seconds(TTL_SECS),
        }
    );
}

#[tokio::test]
async fn optimistic_retries_give_up_after_the_configured_number_with_unavailable() {
    for retries in [0_u32, 1, RETRIES] {
        let attempts = usize::try_from(retries).unwrap() + 1;
        let mut m = Mocks::default();
        m.no_record().lock_taken_and_released();
        m.users
            .expect_get_user()
            .times(attempts)
            .returning(|_| Ok(Some(user(10_000, 4))));
        m.store
            .expect_apply()
            .times(attempts)
            .returning(|_| Err(StepError::VersionConflict));
        m.store.expect_record_refusal().never();
        let service = m.service(Settings {
            optimistic_retries: retries,
            ..settings()
        });

        let got = service.execute(charge(2_500)).await;

        match got {
            Err(OperationError::Unavailable(cause)) => assert!(
                cause
                    .to_string()
                    .contains(&format!("after {attempts} attempts")),
                "{cause}"
            ),
            other => panic!("retries = {retries}: expected Unavailable, got {other:?}"),
        }
        assert_eq!(service.in_flight(), 0);
    }
}

#[tokio::test]
async fn a_refusal_decided_on_a_stale_read_is_decided_again() {
    let command = use_balance(15_000);
    let mut m = Mocks::default();
    let mut seq = Sequence::new();
    m.no_record().lock_taken_and_released();
    m.users
        .expect_get_user()
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_| Ok(Some(user(10_000, 4))));
    m.store
        .expect_record_refusal()
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_| Err(StepError::VersionConflict));
    m.users
        .expect_get_user()
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_| Ok(Some(user(30_000, 5))));
    m.store
        .expect_apply()
        .times(1)
        .in_sequence(&mut seq)
        .withf(|c| {
            c.expected_version == 5
                && c.effect.movement().map(|m| m.balance_after)
                    == Some(Balance::from_stored(15_000))
        })
        .returning(|c| commit(c, 31, None));

    let got = m.service(settings()).execute(command).await;

    assert_eq!(
        got.expect("applied on the fresh read").response,
        encode(Outcome::Used(receipt(15_000, 15_000)))
    );
}

#[tokio::test]
async fn an_order_paid_meanwhile_is_read_again_and_refused_as_already_paid() {
    let command = pay(11);
    let expected = RefusalRecord {
        user_id: user_id(),
        expected_version: 5,
        key: key_record(&command),
        response: encode(Outcome::Refused(Refusal::OrderAlreadyPaid {
            order_id: order_id(11),
        })),
    };
    let mut m = Mocks::default();
    let mut seq = Sequence::new();
    m.no_record().lock_taken_and_released();
    m.users
        .expect_get_user()
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_| Ok(Some(user(50_000, 4))));
    m.orders
        .expect_get_order()
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_| Ok(Some(order(11, user_id(), 15_000, OrderStatus::Pending))));
    m.store
        .expect_apply()
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_| Err(StepError::OrderNotPending));
    m.users
        .expect_get_user()
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_| Ok(Some(user(50_000, 5))));
    m.orders
        .expect_get_order()
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_| Ok(Some(order(11, user_id(), 15_000, OrderStatus::Paid))));
    m.store
        .expect_record_refusal()
        .times(1)
        .in_sequence(&mut seq)
        .with(eq(expected.clone()))
        .returning(|_| Ok(()));

    let got = m.service(settings()).execute(command).await;

    assert_eq!(
        got.expect("a stored refusal"),
        Execution {
            response: expected.response,
            replayed: false,
            expires_at: now() + chrono::Duration::seconds(TTL_SECS),
        }
    );
}

// ---------------------------------------------------------------------------------------
// Replays and reused keys
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_replay_answers_the_stored_bytes_without_a_lock_a_read_or_a_write() {
    for command in every_kind() {
        let mut m = Mocks::default();
        let record = completed(&command, stored_bytes());
        m.keys
            .expect_find()
            .times(2)
            .with(eq(user_id()), eq(key()), eq(now()))
            .returning(move |_, _, _| Ok(Some(record.clone())));
        m.users.expect_get_user().never();
        m.orders.expect_get_order().never();
        m.nothing_locked().nothing_stored();
        let service = m.service(settings());

        for _ in 0..2 {
            let got = service.execute(command.clone()).await;
            assert_eq!(
                got.expect("a replay"),
                Execution {
                    response: stored_bytes(),
                    replayed: true,
                    expires_at: now() + chrono::Duration::minutes(59),
                },
                "{command:?}"
            );
        }
        assert_eq!(service.in_flight(), 0, "a replay claims nothing");
    }
}

#[tokio::test]
async fn a_reused_key_answers_key_reused_and_writes_nothing() {
    // The record is of a charge of 2 500; each of these is another request.
    for command in [charge(2_600), use_balance(2_500), pay(11)] {
        let mut m = Mocks::default();
        let record = completed(&charge(2_500), stored_bytes());
        m.keys
            .expect_find()
            .times(1)
            .returning(move |_, _, _| Ok(Some(record.clone())));
        m.users.expect_get_user().never();
        m.orders.expect_get_order().never();
        m.nothing_locked().nothing_stored();
        let service = m.service(settings());

        let got = service.execute(command.clone()).await;

        assert!(
            matches!(got, Err(OperationError::KeyReused)),
            "{command:?}: {got:?}"
        );
        assert_eq!(service.in_flight(), 0);
    }
}

#[tokio::test]
async fn an_expired_record_handed_back_by_the_repository_is_not_replayed() {
    let command = charge(2_500);
    let mut m = Mocks::default();
    let mut record = completed(&command, stored_bytes());
    record.expires_at = now();
    m.keys
        .expect_find()
        .times(1)
        .returning(move |_, _, _| Ok(Some(record.clone())));
    m.lock_taken_and_released().user_is(10_000, 4);
    m.store
        .expect_apply()
        .times(1)
        .returning(|c| commit(c, 31, None));

    let got = m.service(settings()).execute(command).await;

    assert_eq!(
        got.expect("runs afresh"),
        Execution {
            response: encode(Outcome::Charged(receipt(12_500, 2_500))),
            replayed: false,
            expires_at: now() + chrono::Duration::seconds(TTL_SECS),
        }
    );
}

#[tokio::test]
async fn an_unreachable_idempotency_store_answers_unavailable_before_anything_else() {
    let mut m = Mocks::default();
    m.keys
        .expect_find()
        .times(1)
        .returning(|_, _, _| Err(RepoError::Unavailable(down())));
    m.users.expect_get_user().never();
    m.nothing_locked().nothing_stored();

    let got = m.service(settings()).execute(charge(100)).await;

    assert!(
        matches!(got, Err(OperationError::Unavailable(_))),
        "{got:?}"
    );
}

/// `apply` says the key was completed meanwhile (another instance won, the lock was
/// bypassed); the use case reads the record again and answers what it says.
async fn key_taken_then_found(found: Option<CompletedRecord>) -> Result<Execution, OperationError> {
    let mut m = Mocks::default();
    let mut seq = Sequence::new();
    m.keys
        .expect_find()
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_, _, _| Ok(None));
    m.locks
        .expect_acquire()
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_, _, _| Ok(lease()));
    m.users
        .expect_get_user()
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_| Ok(Some(user(10_000, 4))));
    m.store
        .expect_apply()
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_| Err(StepError::KeyTaken));
    m.keys
        .expect_find()
        .times(1)
        .in_sequence(&mut seq)
        .with(eq(user_id()), eq(key()), eq(now()))
        .returning(move |_, _, _| Ok(found.clone()));
    m.locks
        .expect_release()
        .times(1)
        .in_sequence(&mut seq)
        .with(eq(lease()))
        .returning(|_| Ok(Release::Released));
    m.store.expect_record_refusal().never();
    let service = m.service(settings());
    let got = service.execute(charge(2_500)).await;
    assert_eq!(service.in_flight(), 0);
    got
}

#[tokio::test]
async fn a_key_taken_at_commit_is_found_again_and_replayed() {
    let got = key_taken_then_found(Some(completed(&charge(2_500), stored_bytes()))).await;
    assert_eq!(
        got.expect("the winner's answer"),
        Execution {
            response: stored_bytes(),
            replayed: true,
            expires_at: now() + chrono::Duration::minutes(59),
        }
    );
}

#[tokio::test]
async fn a_key_taken_at_commit_by_another_request_is_key_reused() {
    let got = key_taken_then_found(Some(completed(&use_balance(2_500), stored_bytes()))).await;
    assert!(matches!(got, Err(OperationError::KeyReused)), "{got:?}");
}

#[tokio::test]
async fn a_key_taken_at_commit_whose_record_cannot_be_read_is_key_in_use() {
    let got = key_taken_then_found(None).await;
    assert!(matches!(got, Err(OperationError::KeyInUse)), "{got:?}");
}

// ---------------------------------------------------------------------------------------
// Business refusals: stored under the key and answered as Ok
// ---------------------------------------------------------------------------------------

/// Runs `command` against a user with `balance` at version 6 (and `order`, for a payment)
/// and checks that exactly `refusal` is stored and answered, and nothing applied.
async fn assert_refused(command: Command, balance: i64, found: Option<Order>, refusal: Refusal) {
    let expected = RefusalRecord {
        user_id: user_id(),
        expected_version: 6,
        key: key_record(&command),
        response: encode(Outcome::Refused(refusal)),
    };
    let mut m = Mocks::default();
    m.no_record().lock_taken_and_released().user_is(balance, 6);
    if let Some(found) = found {
        m.order_is(found);
    }
    m.store.expect_apply().never();
    m.store
        .expect_record_refusal()
        .times(1)
        .with(eq(expected.clone()))
        .returning(|_| Ok(()));
    let service = m.service(settings());

    let got = service.execute(command.clone()).await;

    assert_eq!(
        got.expect("a refusal is an answer, not an error"),
        Execution {
            response: expected.response,
            replayed: false,
            expires_at: now() + chrono::Duration::seconds(TTL_SECS),
        },
        "{command:?}"
    );
    assert_eq!(service.in_flight(), 0);
}

#[tokio::test]
async fn using_more_than_the_balance_is_refused_and_stored() {
    assert_refused(
        use_balance(10_001),
        10_000,
        None,
        Refusal::InsufficientBalance {
            balance: Balance::from_stored(10_000),
            requested: amount(10_001),
        },
    )
    .await;
}

#[tokio::test]
async fn charging_past_the_balance_limit_is_refused_and_stored() {
    assert_refused(
        charge(MAX_AMOUNT),
        MAX_BALANCE - MAX_AMOUNT + 1,
        None,
        Refusal::BalanceLimitExceeded {
            balance: Balance::from_stored(MAX_BALANCE - MAX_AMOUNT + 1),
            requested: amount(MAX_AMOUNT),
            max_balance: MAX_BALANCE,
        },
    )
    .await;
}

#[tokio::test]
async fn paying_a_paid_order_is_refused_and_stored() {
    assert_refused(
        pay(11),
        50_000,
        Some(order(11, user_id(), 15_000, OrderStatus::Paid)),
        Refusal::OrderAlreadyPaid {
            order_id: order_id(11),
        },
    )
    .await;
}

#[tokio::test]
async fn paying_more_than_the_balance_is_refused_and_stored() {
    assert_refused(
        pay(11),
        10_000,
        Some(order(11, user_id(), 15_000, OrderStatus::Pending)),
        Refusal::InsufficientBalance {
            balance: Balance::from_stored(10_000),
            requested: amount(15_000),
        },
    )
    .await;
}

// ---------------------------------------------------------------------------------------
// Queries and creation: no lock, no key
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn history_and_order_creation_of_an_unknown_user_are_not_found_and_touch_nothing_else() {
    let mut m = Mocks::default();
    m.users
        .expect_get_user()
        .times(2)
        .with(eq(user_id()))
        .returning(|_| Ok(None));
    m.users.expect_history().never();
    m.orders.expect_create_order().never();
    m.nothing_locked().nothing_stored();
    let service = m.service(settings());

    let history = service.history(user_id(), None, PageLimit::DEFAULT).await;
    let order = service.create_order(user_id(), amount(15_000)).await;

    assert!(
        matches!(history, Err(OperationError::UserNotFound)),
        "{history:?}"
    );
    assert!(
        matches!(order, Err(OperationError::UserNotFound)),
        "{order:?}"
    );
}

#[tokio::test]
async fn an_order_is_created_for_an_existing_user_at_the_clocks_time_without_a_lock() {
    let mut m = Mocks::default();
    m.user_is(0, 0).nothing_locked().nothing_stored();
    m.orders
        .expect_create_order()
        .times(1)
        .with(eq(user_id()), eq(amount(15_000)), eq(now()))
        .returning(|user, amount, at| {
            Ok(Order {
                id: order_id(11),
                user_id: user,
                amount,
                status: OrderStatus::Pending,
                created_at: at,
            })
        });

    let got = m
        .service(settings())
        .create_order(user_id(), amount(15_000))
        .await;

    assert_eq!(
        got.expect("created"),
        Order {
            created_at: now(),
            ..order(11, user_id(), 15_000, OrderStatus::Pending)
        }
    );
}

#[tokio::test]
async fn unknown_orders_and_payments_are_not_found() {
    let mut m = Mocks::default();
    m.orders.expect_get_order().times(1).returning(|_| Ok(None));
    m.orders
        .expect_get_payment()
        .times(1)
        .returning(|_| Ok(None));
    let service = m.service(settings());

    let order = service.order(order_id(11)).await;
    let payment = service.payment(PaymentId::new(41).unwrap()).await;

    assert!(
        matches!(order, Err(OperationError::OrderNotFound)),
        "{order:?}"
    );
    assert!(
        matches!(payment, Err(OperationError::PaymentNotFound)),
        "{payment:?}"
    );
}

// ---------------------------------------------------------------------------------------
// Concurrent duplicates and cancellation (hand-written fakes that can hold an execution)
// ---------------------------------------------------------------------------------------

/// A lock that grants a lease only when the test lets it through the gate, and records
/// what it released.
#[derive(Debug)]
struct GateLock {
    entered: Notify,
    gate: Semaphore,
    acquired: AtomicUsize,
    released: Mutex<Vec<LockLease>>,
    on_release: Notify,
}

impl GateLock {
    fn with_permits(permits: usize) -> Self {
        Self {
            entered: Notify::new(),
            gate: Semaphore::new(permits),
            acquired: AtomicUsize::new(0),
            released: Mutex::new(Vec::new()),
            on_release: Notify::new(),
        }
    }

    fn acquired(&self) -> usize {
        self.acquired.load(Ordering::SeqCst)
    }

    fn released(&self) -> Vec<LockLease> {
        self.released.lock().unwrap().clone()
    }
}

#[async_trait]
impl LockManager for GateLock {
    async fn acquire(
        &self,
        key: &LockKey,
        _wait: Duration,
        _lease: Duration,
    ) -> Result<LockLease, LockError> {
        self.acquired.fetch_add(1, Ordering::SeqCst);
        self.entered.notify_one();
        self.gate
            .acquire()
            .await
            .map_err(|e| LockError::Unexpected(e.into()))?
            .forget();
        Ok(LockLease {
            key: key.clone(),
            token: TOKEN.to_owned(),
        })
    }

    async fn release(&self, lease: &LockLease) -> Result<Release, LockError> {
        self.released.lock().unwrap().push(lease.clone());
        self.on_release.notify_one();
        Ok(Release::Released)
    }
}

/// A store that never answers, to hold an execution inside its atomic step.
#[derive(Debug, Default)]
struct StuckStore {
    entered: Notify,
}

#[async_trait]
impl BalanceStore for StuckStore {
    async fn apply(&self, _change: BalanceChange) -> Result<Applied, StepError> {
        self.entered.notify_one();
        std::future::pending().await
    }

    async fn record_refusal(&self, _refusal: RefusalRecord) -> Result<(), StepError> {
        self.entered.notify_one();
        std::future::pending().await
    }

    async fn begin_batch(
        &self,
        _users: &[UserId],
        _keys: &[(UserId, IdempotencyKey)],
        _now: DateTime<Utc>,
    ) -> Result<Box<dyn BatchTransaction>, StepError> {
        self.entered.notify_one();
        std::future::pending().await
    }
}

fn keys_never_completed(calls: usize) -> MockIdempotencyRepo {
    let mut keys = MockIdempotencyRepo::new();
    keys.expect_find()
        .times(calls)
        .returning(|_, _, _| Ok(None));
    keys
}

fn users_found(calls: usize) -> MockUserRepo {
    let mut users = MockUserRepo::new();
    users.expect_get_user().times(calls).returning(|id| {
        Ok(Some(User {
            id,
            ..user(10_000, 4)
        }))
    });
    users
}

fn store_committing(calls: usize) -> MockBalanceStore {
    let mut store = MockBalanceStore::new();
    store
        .expect_apply()
        .times(calls)
        .returning(|c| commit(c, 31, None));
    store.expect_record_refusal().never();
    store
}

/// Awaits `step`, failing the test if it would never finish. The tests run on paused
/// time, so when every task is stuck the clock jumps to the deadline at once: a broken
/// claim or lock fails the test immediately instead of hanging it.
async fn within<F: Future>(step: &str, future: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(60), future)
        .await
        .unwrap_or_else(|_| panic!("stuck: {step}"))
}

/// Starts `command` on its own task and returns once it holds its claim and waits at the
/// lock's gate.
async fn start_held(
    service: &BalanceService,
    gate: &GateLock,
    command: Command,
) -> tokio::task::JoinHandle<Result<Execution, OperationError>> {
    let running = service.clone();
    let handle = tokio::spawn(async move { running.execute(command).await });
    within("the request reaches the lock", gate.entered.notified()).await;
    handle
}

async fn finish(
    handle: tokio::task::JoinHandle<Result<Execution, OperationError>>,
) -> Result<Execution, OperationError> {
    within("the held request finishes", handle)
        .await
        .expect("the request's task does not panic")
}

#[tokio::test(start_paused = true)]
async fn a_duplicate_while_the_first_is_in_flight_is_key_in_use_and_never_reaches_the_store() {
    let gate = Arc::new(GateLock::with_permits(0));
    let service = service_with(
        Arc::new(users_found(1)),
        Arc::new(MockOrderRepo::new()),
        Arc::new(keys_never_completed(2)),
        Arc::new(store_committing(1)),
        gate.clone(),
        settings(),
    );
    let first = start_held(&service, &gate, charge(2_500)).await;
    assert_eq!(service.in_flight(), 1);

    let duplicate = within("the duplicate answers", service.execute(charge(2_500))).await;

    assert!(
        matches!(duplicate, Err(OperationError::KeyInUse)),
        "{duplicate:?}"
    );
    assert_eq!(
        gate.acquired(),
        1,
        "the duplicate did not queue for the lock"
    );
    gate.gate.add_permits(1);
    assert_eq!(
        finish(first).await.expect("the first one commits"),
        Execution {
            response: encode(Outcome::Charged(receipt(12_500, 2_500))),
            replayed: false,
            expires_at: now() + chrono::Duration::seconds(TTL_SECS),
        }
    );
    assert_eq!(service.in_flight(), 0);
    assert_eq!(gate.released(), vec![lease()]);
}

#[tokio::test(start_paused = true)]
async fn another_request_with_the_key_while_the_first_is_in_flight_is_key_reused() {
    let gate = Arc::new(GateLock::with_permits(0));
    let service = service_with(
        Arc::new(users_found(1)),
        Arc::new(MockOrderRepo::new()),
        Arc::new(keys_never_completed(2)),
        Arc::new(store_committing(1)),
        gate.clone(),
        settings(),
    );
    let first = start_held(&service, &gate, charge(2_500)).await;

    let other = within(
        "the other request answers",
        service.execute(use_balance(2_500)),
    )
    .await;

    assert!(matches!(other, Err(OperationError::KeyReused)), "{other:?}");
    assert_eq!(gate.acquired(), 1);
    gate.gate.add_permits(1);
    assert!(finish(first).await.is_ok());
    assert_eq!(service.in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn the_same_key_for_another_user_is_another_key_and_is_not_held_off() {
    let gate = Arc::new(GateLock::with_permits(0));
    let service = service_with(
        Arc::new(users_found(2)),
        Arc::new(MockOrderRepo::new()),
        Arc::new(keys_never_completed(2)),
        Arc::new(store_committing(2)),
        gate.clone(),
        settings(),
    );
    let first = start_held(&service, &gate, charge(2_500)).await;
    let second = start_held(
        &service,
        &gate,
        Arc::new(Charge {
            user: other_user_id(),
            amount: amount(2_500),
            key: key(),
        }),
    )
    .await;

    assert_eq!(gate.acquired(), 2, "both reached the lock");
    assert_eq!(service.in_flight(), 2);
    gate.gate.add_permits(2);
    assert!(finish(first).await.is_ok());
    assert!(finish(second).await.is_ok());
    let mut released: Vec<String> = gate
        .released()
        .iter()
        .map(|l| l.key.as_str().to_owned())
        .collect();
    released.sort();
    assert_eq!(released, ["balance:user:7", "balance:user:8"]);
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_execution_frees_its_key_and_releases_its_lock() {
    let gate = Arc::new(GateLock::with_permits(1));
    let store = Arc::new(StuckStore::default());
    let service = service_with(
        Arc::new(users_found(1)),
        Arc::new(MockOrderRepo::new()),
        Arc::new(keys_never_completed(1)),
        store.clone(),
        gate.clone(),
        settings(),
    );
    let mut running = Box::pin(service.execute(charge(2_500)));
    within("the request reaches the store", async {
        tokio::select! {
            biased;
            got = &mut running => panic!("finished although the store never answers: {got:?}"),
            () = store.entered.notified() => {}
        }
    })
    .await;
    assert_eq!(service.in_flight(), 1);
    assert!(gate.released().is_empty());

    drop(running);

    assert_eq!(service.in_flight(), 0, "the claim goes with the execution");
    within("the dropped lock is released", gate.on_release.notified()).await;
    assert_eq!(gate.released(), vec![lease()]);
}
