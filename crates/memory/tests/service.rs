// An integration test's helpers are not `#[test]` functions, so clippy's test allowances
// miss them; a failed assumption here is a failed test all the same.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The in-memory adapters under the real use cases: random sequences of requests are
//! checked against a small model of the contract, and concurrent requests against the
//! ledger. These are the adapters the zero-setup service runs on, so they must keep every
//! promise of the spec on their own.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use domain::idempotency::{Fingerprint, StoredResponse};
use domain::outcome::{Outcome, Refusal};
use domain::ports::{Auditor, Clock, ResponseEncoder};
use domain::types::{Amount, Balance, EntryId, IdempotencyKey, Limits, OrderId, PageLimit, UserId};
use domain::{BalanceService, Charge, Operation, OperationError, Pay, Ports, Settings, UseBalance};
use memory::{InProcessLockManager, MemoryStore};
use proptest::prelude::*;

const MAX_AMOUNT: i64 = 400;
const MAX_BALANCE: i64 = 1000;
const OPENING: i64 = 500;
const TTL_SECS: i64 = 100;

/// Encodes an outcome as its debug text: enough to tell responses apart byte for byte.
struct DebugEncoder;

impl ResponseEncoder for DebugEncoder {
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

/// A clock the test moves by hand.
struct ManualClock(Mutex<DateTime<Utc>>);

impl ManualClock {
    fn advance(&self, secs: i64) {
        let mut now = self.0.lock().unwrap();
        *now += chrono::Duration::seconds(secs);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.0.lock().unwrap()
    }
}

fn limits() -> Limits {
    Limits::new(MAX_AMOUNT, MAX_BALANCE).unwrap()
}

fn service(clock: Arc<ManualClock>) -> (BalanceService, MemoryStore) {
    let store = MemoryStore::new();
    let ports = Ports {
        users: Arc::new(store.clone()),
        orders: Arc::new(store.clone()),
        coupons: Arc::new(store.clone()),
        keys: Arc::new(store.clone()),
        store: Arc::new(store.clone()),
        locks: Arc::new(InProcessLockManager::new()),
        encoder: Arc::new(DebugEncoder),
        clock,
        gate: None,
    };
    let settings = Settings {
        lock_wait: Duration::from_secs(10),
        idempotency_ttl: Duration::from_secs(u64::try_from(TTL_SECS).unwrap()),
        limits: limits(),
        ..Settings::default()
    };
    (BalanceService::new(ports, settings), store)
}

fn start() -> DateTime<Utc> {
    DateTime::from_timestamp(1_800_000_000, 0).unwrap()
}

fn user(id: i64) -> UserId {
    UserId::new(id).unwrap()
}

fn amount(value: i64) -> Amount {
    Amount::new(value, &limits()).unwrap()
}

fn key(raw: &str) -> IdempotencyKey {
    IdempotencyKey::parse(raw).unwrap()
}

/// The whole ledger of `id`, oldest first, read page by page as a client would.
async fn ledger(service: &BalanceService, id: UserId) -> Vec<domain::model::LedgerEntry> {
    let mut entries = Vec::new();
    let mut before: Option<EntryId> = None;
    loop {
        let page = service
            .history(id, before, PageLimit::parse("7").unwrap())
            .await
            .unwrap();
        entries.extend(page.items);
        match page.next {
            Some(next) => before = Some(next),
            None => break,
        }
    }
    entries.reverse();
    entries
}

/// Checks that the balance is in range, equals its ledger's sum, and that each entry's
/// `balance_after` follows from the one before.
async fn assert_ledger_matches(service: &BalanceService, id: UserId) -> i64 {
    let balance = service.balance(id).await.unwrap().balance.get();
    let mut running = 0;
    for entry in ledger(service, id).await {
        running += entry.kind.sign() * entry.amount.get();
        assert_eq!(entry.balance_after.get(), running, "entry {}", entry.id);
    }
    assert_eq!(
        balance, running,
        "the balance of user {id} is its ledger's sum"
    );
    assert!((0..=MAX_BALANCE).contains(&balance));
    balance
}

// ----------------------------------------------------------------------------------------
// A model of the contract, against random request sequences
// ----------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Op {
    Charge { user: i64, amount: i64, key: u8 },
    Use { user: i64, amount: i64, key: u8 },
    Order { user: i64, amount: i64 },
    Pay { user: i64, order: i64, key: u8 },
    Later { secs: i64 },
    Purge,
}

fn op() -> impl Strategy<Value = Op> {
    // User 4 does not exist; order ids run past the orders created.
    let user = 1..=4_i64;
    let amount = 1..=MAX_AMOUNT;
    let key = 0..4_u8;
    prop_oneof![
        3 => (user.clone(), amount.clone(), key.clone())
            .prop_map(|(user, amount, key)| Op::Charge { user, amount, key }),
        3 => (user.clone(), amount.clone(), key.clone())
            .prop_map(|(user, amount, key)| Op::Use { user, amount, key }),
        1 => (1..=3_i64, amount).prop_map(|(user, amount)| Op::Order { user, amount }),
        2 => (user, 1..=5_i64, key).prop_map(|(user, order, key)| Op::Pay { user, order, key }),
        1 => (0..=60_i64).prop_map(|secs| Op::Later { secs }),
        1 => Just(Op::Purge),
    ]
}

/// What the contract says a request gets.
#[derive(Debug, PartialEq, Eq)]
enum Expected {
    /// Runs now and answers this status (a success or a stored refusal).
    Runs(u16),
    /// Answers the stored response again.
    Replays(StoredResponse),
    KeyReused,
    UserNotFound,
    OrderNotFound,
}

#[derive(Debug, Clone)]
struct ModelOrder {
    owner: i64,
    amount: i64,
    paid: bool,
}

/// A request of the model: what the test generates and matches on, run as its operation.
#[derive(Debug, Clone)]
enum BalanceCommand {
    Charge {
        user: UserId,
        amount: Amount,
        key: IdempotencyKey,
    },
    Use {
        user: UserId,
        amount: Amount,
        key: IdempotencyKey,
    },
    Pay {
        user: UserId,
        order: OrderId,
        key: IdempotencyKey,
    },
}

impl BalanceCommand {
    fn operation(&self) -> Arc<dyn Operation> {
        match self.clone() {
            Self::Charge { user, amount, key } => Arc::new(Charge { user, amount, key }),
            Self::Use { user, amount, key } => Arc::new(UseBalance { user, amount, key }),
            Self::Pay { user, order, key } => Arc::new(Pay {
                user,
                order,
                key,
                coupon: None,
            }),
        }
    }

    fn user(&self) -> UserId {
        self.operation().user()
    }

    fn key(&self) -> IdempotencyKey {
        self.operation().key().clone()
    }

    fn fingerprint(&self) -> Fingerprint {
        self.operation().fingerprint()
    }
}

/// The state the contract talks about, kept the simplest way possible.
#[derive(Debug, Default)]
struct Model {
    balances: HashMap<i64, i64>,
    orders: Vec<ModelOrder>,
    records: HashMap<(i64, String), (Fingerprint, StoredResponse, DateTime<Utc>)>,
}

impl Model {
    /// What `command` gets at `now`, and the model after it (when it changes anything).
    fn expect(&mut self, command: &BalanceCommand, now: DateTime<Utc>) -> Expected {
        let id = command.user().get();
        let record_key = (id, command.key().as_str().to_owned());
        if let Some((fingerprint, response, expires_at)) = self.records.get(&record_key)
            && now < *expires_at
        {
            return if *fingerprint == command.fingerprint() {
                Expected::Replays(response.clone())
            } else {
                Expected::KeyReused
            };
        }
        let Some(&balance) = self.balances.get(&id) else {
            return Expected::UserNotFound;
        };
        let (status, new_balance) = match command {
            BalanceCommand::Charge { amount, .. } if balance + amount.get() > MAX_BALANCE => {
                (422, balance)
            }
            BalanceCommand::Charge { amount, .. } => (200, balance + amount.get()),
            BalanceCommand::Use { amount, .. } if balance < amount.get() => (422, balance),
            BalanceCommand::Use { amount, .. } => (200, balance - amount.get()),
            BalanceCommand::Pay { order, .. } => {
                let index = usize::try_from(order.get() - 1).unwrap();
                let Some(found) = self.orders.get_mut(index).filter(|o| o.owner == id) else {
                    return Expected::OrderNotFound;
                };
                if found.paid {
                    (409, balance)
                } else if balance < found.amount {
                    (422, balance)
                } else {
                    found.paid = true;
                    (200, balance - found.amount)
                }
            }
        };
        self.balances.insert(id, new_balance);
        Expected::Runs(status)
    }

    fn remember(&mut self, command: &BalanceCommand, response: StoredResponse, now: DateTime<Utc>) {
        let expires_at = now + chrono::Duration::seconds(TTL_SECS);
        self.records.insert(
            (command.user().get(), command.key().as_str().to_owned()),
            (command.fingerprint(), response, expires_at),
        );
    }
}

fn command(op: &Op) -> Option<BalanceCommand> {
    let name = |n: u8| key(&format!("key-{n}"));
    Some(match *op {
        Op::Charge {
            user: u,
            amount: a,
            key: k,
        } => BalanceCommand::Charge {
            user: user(u),
            amount: amount(a),
            key: name(k),
        },
        Op::Use {
            user: u,
            amount: a,
            key: k,
        } => BalanceCommand::Use {
            user: user(u),
            amount: amount(a),
            key: name(k),
        },
        Op::Pay {
            user: u,
            order,
            key: k,
        } => BalanceCommand::Pay {
            user: user(u),
            order: OrderId::new(order).unwrap(),
            key: name(k),
        },
        Op::Order { .. } | Op::Later { .. } | Op::Purge => return None,
    })
}

async fn run_model(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let clock = Arc::new(ManualClock(Mutex::new(start())));
    let (service, store) = service(Arc::clone(&clock));
    service
        .seed_users(3, Balance::new(OPENING, &limits()).unwrap())
        .await
        .unwrap();
    let mut model = Model::default();
    for id in 1..=3 {
        model.balances.insert(id, OPENING);
    }

    for op in &ops {
        match *op {
            Op::Later { secs } => clock.advance(secs),
            Op::Purge => {
                service.purge_expired_keys(2).await.unwrap();
            }
            Op::Order {
                user: owner,
                amount: value,
            } => {
                let order = service
                    .create_order(user(owner), amount(value))
                    .await
                    .unwrap();
                model.orders.push(ModelOrder {
                    owner,
                    amount: value,
                    paid: false,
                });
                prop_assert_eq!(order.id.get(), i64::try_from(model.orders.len()).unwrap());
            }
            _ => {}
        }
        let Some(command) = command(op) else { continue };
        let now = clock.now();
        let expected = model.expect(&command, now);
        let actual = service.execute(command.operation()).await;
        match (&expected, actual) {
            (Expected::Runs(status), Ok(execution)) => {
                prop_assert!(!execution.replayed, "{:?} ran afresh", op);
                prop_assert_eq!(execution.response.status, *status, "{:?}", op);
                model.remember(&command, execution.response, now);
            }
            (Expected::Replays(stored), Ok(execution)) => {
                prop_assert!(execution.replayed, "{:?} is a replay", op);
                prop_assert_eq!(
                    &execution.response,
                    stored,
                    "{:?} replays byte for byte",
                    op
                );
            }
            (Expected::KeyReused, Err(OperationError::KeyReused))
            | (Expected::UserNotFound, Err(OperationError::UserNotFound))
            | (Expected::OrderNotFound, Err(OperationError::OrderNotFound)) => {}
            (expected, actual) => {
                prop_assert!(false, "{:?}: expected {:?}, got {:?}", op, expected, actual);
            }
        }
    }

    for id in 1..=3 {
        let balance = assert_ledger_matches(&service, user(id)).await;
        prop_assert_eq!(balance, model.balances[&id], "user {}", id);
    }
    for (index, expected) in model.orders.iter().enumerate() {
        let id = OrderId::new(i64::try_from(index).unwrap() + 1).unwrap();
        let order = service.order(id).await.unwrap();
        prop_assert_eq!(
            order.status.as_str(),
            if expected.paid { "PAID" } else { "PENDING" }
        );
    }
    // Keys reused after their retention, purges, refusals and payments: the books
    // reconcile.
    let report = audit(&store, clock.now()).await;
    prop_assert!(report.is_clean(), "{:#?}", report);
    Ok(())
}

async fn audit(store: &MemoryStore, now: DateTime<Utc>) -> domain::ports::AuditReport {
    let ttl = Duration::from_secs(TTL_SECS.unsigned_abs());
    store
        .audit(ttl, Settings::default().lock_lease, now)
        .await
        .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// Random requests (repeated keys, other users' orders, unknown users, time passing
    /// beyond the key's retention, purges) get what the contract says, and every balance
    /// ends equal to the model's and to its ledger's sum.
    #[test]
    fn requests_follow_the_contract(ops in proptest::collection::vec(op(), 1..80)) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        runtime.block_on(run_model(ops))?;
    }
}

// ----------------------------------------------------------------------------------------
// Concurrency on real threads
// ----------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_lose_no_update_and_apply_each_key_once() {
    let clock = Arc::new(ManualClock(Mutex::new(start())));
    let (service, store) = service(Arc::clone(&clock));
    service
        .seed_users(2, Balance::new(OPENING, &limits()).unwrap())
        .await
        .unwrap();

    // 160 requests on two users (alternating): every fourth one reuses the key of the same
    // user's request before it, so duplicates race their originals.
    let tasks: Vec<_> = (0..160_i64)
        .map(|i| {
            let service = service.clone();
            tokio::spawn(async move {
                let who = user(1 + i % 2);
                let raw = format!("k-{}", i - 2 * i64::from(i % 4 == 3));
                let command = if i % 3 == 0 {
                    BalanceCommand::Use {
                        user: who,
                        amount: amount(70),
                        key: key(&raw),
                    }
                } else {
                    BalanceCommand::Charge {
                        user: who,
                        amount: amount(30),
                        key: key(&raw),
                    }
                };
                (command.clone(), service.execute(command.operation()).await)
            })
        })
        .collect();

    let mut applied: HashMap<i64, i64> = HashMap::new();
    for task in tasks {
        let (command, result) = task.await.unwrap();
        match result {
            Ok(execution) if !execution.replayed && execution.response.status == 200 => {
                let delta = match command {
                    BalanceCommand::Charge { amount, .. } => amount.get(),
                    BalanceCommand::Use { amount, .. } => -amount.get(),
                    BalanceCommand::Pay { .. } => unreachable!("no payments here"),
                };
                *applied.entry(command.user().get()).or_default() += delta;
            }
            // Refusals, replays, a duplicate in flight or one that differs: nothing applied.
            Ok(_) | Err(OperationError::KeyInUse | OperationError::KeyReused) => {}
            Err(other) => panic!("unexpected {other:?}"),
        }
    }

    for id in 1..=2 {
        let balance = assert_ledger_matches(&service, user(id)).await;
        assert_eq!(balance, OPENING + applied.get(&id).copied().unwrap_or(0));
        let entries = ledger(&service, user(id)).await;
        let mut keys: Vec<_> = entries
            .iter()
            .filter_map(|e| e.idempotency_key.clone())
            .collect();
        let count = keys.len();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), count, "no key of user {id} applied twice");
    }
    let report = audit(&store, clock.now()).await;
    assert!(report.is_clean(), "{report:#?}");
    assert_eq!(report.users, 2);
}

/// The coupon rush on the in-memory store, without a gate: 240 concurrent issue requests
/// of 60 users (four keys each) for a stock of 20 issue exactly 20, to 20 different
/// users; every other request is refused as sold out or already issued; each key replays
/// its answer byte for byte, and the books audit clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_coupon_rush_issues_exactly_the_stock_once_per_user() {
    const USERS: i64 = 60;
    const TRIES: i64 = 4;
    const STOCK: i64 = 20;
    let clock = Arc::new(ManualClock(Mutex::new(start())));
    let (service, store) = service(Arc::clone(&clock));
    service
        .seed_users(60, Balance::new(OPENING, &limits()).unwrap())
        .await
        .unwrap();
    let name = domain::types::CouponName::parse("RUSH").unwrap();
    let new = domain::model::NewCoupon::new(
        name,
        amount(100),
        STOCK,
        Some(start()),
        None,
        Some(30),
        start(),
    )
    .unwrap();
    let coupon = service.create_coupon(new).await.unwrap();
    let issue = move |i: i64| domain::IssueCoupon {
        user: user(1 + i % USERS),
        coupon: coupon.id,
        key: key(&format!("rush-{i}")),
    };
    let tasks: Vec<_> = (0..USERS * TRIES)
        .map(|i| {
            let service = service.clone();
            tokio::spawn(async move { (i, service.issue_coupon(issue(i)).await) })
        })
        .collect();
    let mut answers = Vec::new();
    let mut winners = Vec::new();
    for task in tasks {
        let (i, result) = task.await.unwrap();
        let execution = result.unwrap_or_else(|e| panic!("request {i}: {e:?}"));
        assert!(!execution.replayed, "request {i} ran once");
        let body = String::from_utf8(execution.response.body.clone()).unwrap();
        match execution.response.status {
            200 => winners.push(1 + i % USERS),
            422 => assert!(
                body.contains("CouponSoldOut") || body.contains("CouponAlreadyIssued"),
                "request {i}: {body}"
            ),
            other => panic!("request {i}: {other} {body}"),
        }
        answers.push((i, execution.response));
    }
    winners.sort_unstable();
    let count = winners.len();
    winners.dedup();
    assert_eq!(
        (count, winners.len()),
        (20, 20),
        "the stock, to distinct users"
    );
    assert_eq!(service.coupon(coupon.id).await.unwrap().issued_quantity, 20);
    for (i, response) in answers {
        let again = service.issue_coupon(issue(i)).await.unwrap();
        assert!(again.replayed, "request {i} replays");
        assert_eq!(
            again.response, response,
            "request {i} replays byte for byte"
        );
    }
    for id in 1..=USERS {
        let held = service.user_coupons(user(id)).await.unwrap().items.len();
        assert_eq!(
            held,
            usize::from(winners.binary_search(&id).is_ok()),
            "user {id}"
        );
    }
    let report = audit(&store, clock.now()).await;
    assert!(report.is_clean(), "{report:#?}");
    assert_eq!((report.coupons, report.user_coupons), (1, 20));
}
