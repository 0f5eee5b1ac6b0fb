//! What the adapter does when the database says "try again": a statement killed while it
//! waits on a row lock, and every pooled connection killed at once. Each test makes its own
//! database with `testkit::TestDatabase` and skips (saying so) without a server.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use domain::idempotency::StoredResponse;
use domain::operations::{Effect, Movement, OperationKind, charge};
use domain::outcome::Outcome;
use domain::ports::{
    Applied, Auditor, BalanceChange, BalanceStore, BatchTransaction, Clock, IdempotencyRepo,
    KeyRecord, LockError, LockKey, LockLease, LockManager, RefusalRecord, Release, ResponseEncoder,
    StepError, SystemClock, UserRepo,
};
use domain::types::{Amount, Balance, IdempotencyKey, UserId};
use domain::{BalanceService, GroupCommit, Operation, OperationError, Ports, Settings, UseBalance};
use mysql_repo::MySqlStore;
use sqlx::{AssertSqlSafe, Connection, MySqlConnection};
use testkit::TestDatabase;

/// How long a test waits for the database to reach a state before it fails.
const PATIENCE: Duration = Duration::from_secs(20);

/// Encodes every outcome as a 200 with its debug text: the tests look at the books, not
/// at the bytes.
struct DebugEncoder;

impl ResponseEncoder for DebugEncoder {
    fn encode(&self, outcome: &Outcome) -> StoredResponse {
        StoredResponse {
            status: 200,
            body: format!("{outcome:?}").into_bytes(),
        }
    }
}

/// The MySQL step, counting the attempts the service makes.
struct CountingStore {
    inner: MySqlStore,
    started: AtomicUsize,
}

#[async_trait]
impl BalanceStore for CountingStore {
    async fn apply(&self, change: BalanceChange) -> Result<Applied, StepError> {
        self.started.fetch_add(1, Ordering::SeqCst);
        self.inner.apply(change).await
    }

    async fn record_refusal(&self, refusal: RefusalRecord) -> Result<(), StepError> {
        self.started.fetch_add(1, Ordering::SeqCst);
        self.inner.record_refusal(refusal).await
    }

    async fn begin_batch(
        &self,
        users: &[UserId],
        keys: &[(UserId, IdempotencyKey)],
        now: DateTime<Utc>,
    ) -> Result<Box<dyn BatchTransaction>, StepError> {
        self.started.fetch_add(1, Ordering::SeqCst);
        self.inner.begin_batch(users, keys, now).await
    }
}

fn service(store: &MySqlStore) -> (BalanceService, Arc<CountingStore>) {
    service_with(store, Settings::default())
}

fn service_with(store: &MySqlStore, settings: Settings) -> (BalanceService, Arc<CountingStore>) {
    service_on(
        store,
        settings,
        Arc::new(memory::InProcessLockManager::new()),
    )
}

fn service_on(
    store: &MySqlStore,
    settings: Settings,
    locks: Arc<dyn LockManager>,
) -> (BalanceService, Arc<CountingStore>) {
    let steps = Arc::new(CountingStore {
        inner: store.clone(),
        started: AtomicUsize::new(0),
    });
    let ports = Ports {
        users: Arc::new(store.clone()),
        orders: Arc::new(store.clone()),
        coupons: Arc::new(store.clone()),
        gate: None,
        keys: Arc::new(store.clone()),
        store: Arc::clone(&steps) as Arc<dyn BalanceStore>,
        locks,
        encoder: Arc::new(DebugEncoder),
        clock: Arc::new(SystemClock),
    };
    (BalanceService::new(ports, settings), steps)
}

async fn admin(db: &TestDatabase) -> MySqlConnection {
    MySqlConnection::connect(&db.url).await.unwrap()
}

async fn user_with(store: &MySqlStore, balance: i64) -> UserId {
    let limits = Settings::default().limits;
    store
        .seed_users(
            1,
            Balance::new(balance, &limits).unwrap(),
            SystemClock.now(),
        )
        .await
        .unwrap();
    UserId::new(1).unwrap()
}

fn use_command(user: UserId, amount: i64, key: &str) -> Arc<dyn Operation> {
    Arc::new(UseBalance {
        user,
        amount: Amount::new(amount, &Settings::default().limits).unwrap(),
        key: IdempotencyKey::parse(key).unwrap(),
    })
}

/// The connection of this database whose balance update is running (waiting on the held
/// row lock, in these tests), once there is one.
async fn waiting_update(admin: &mut MySqlConnection, db: &str) -> u64 {
    let started = Instant::now();
    loop {
        let waiting: Option<(u64,)> = sqlx::query_as(
            "select cast(id as unsigned) from information_schema.processlist \
             where db = ? and info like 'update users set balance%' limit 1",
        )
        .bind(db)
        .fetch_optional(&mut *admin)
        .await
        .unwrap();
        if let Some((id,)) = waiting {
            return id;
        }
        assert!(
            started.elapsed() < PATIENCE,
            "no write came to wait on the held row lock"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until the service has started its `n`th atomic step.
async fn steps_started(steps: &CountingStore, n: usize) {
    let started = Instant::now();
    while steps.started.load(Ordering::SeqCst) < n {
        assert!(
            started.elapsed() < PATIENCE,
            "the service did not run step {n}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn kill_query(admin: &mut MySqlConnection, connection: u64) {
    sqlx::query(AssertSqlSafe(format!("kill query {connection}")))
        .execute(&mut *admin)
        .await
        .unwrap();
}

async fn balance_and_entries(store: &MySqlStore, db: &TestDatabase, user: UserId) -> (i64, i64) {
    let balance = store.get_user(user).await.unwrap().unwrap().balance.get();
    let (entries,): (i64,) =
        sqlx::query_as("select count(*) from ledger_entries where user_id = ?")
            .bind(user.get())
            .fetch_one(db.pool())
            .await
            .unwrap();
    (balance, entries)
}

async fn assert_audit_clean(store: &MySqlStore) {
    let settings = Settings::default();
    let report = store
        .audit(
            settings.idempotency_ttl,
            settings.lock_lease,
            SystemClock.now(),
        )
        .await
        .unwrap();
    assert!(report.is_clean(), "{report:?}");
}

#[tokio::test]
async fn a_write_killed_while_it_waits_on_a_row_lock_is_retried_from_a_fresh_read() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let store = db.store();
    let user = user_with(&store, 1_000).await;
    let (service, steps) = service(&store);
    let mut admin = admin(&db).await;
    let mut holder = db.hold_user_row(user.get()).await;

    let running = {
        let service = service.clone();
        tokio::spawn(async move { service.execute(use_command(user, 100, "kill-once")).await })
    };
    let connection = waiting_update(&mut admin, &db.name).await;
    kill_query(&mut admin, connection).await;
    // The retry, from a fresh read, waits on the same row lock.
    steps_started(&steps, 2).await;
    waiting_update(&mut admin, &db.name).await;
    sqlx::raw_sql("commit").execute(&mut holder).await.unwrap();

    let done = running.await.unwrap();
    let execution = done.unwrap_or_else(|e| panic!("the killed write was not retried: {e:?}"));
    assert!(!execution.replayed);
    assert_eq!(balance_and_entries(&store, &db, user).await, (900, 2));
    assert_audit_clean(&store).await;
    db.cleanup().await;
}

#[tokio::test]
async fn a_write_killed_twice_is_unavailable_and_writes_nothing() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let store = db.store();
    let user = user_with(&store, 1_000).await;
    let (service, steps) = service(&store);
    let mut admin = admin(&db).await;
    let mut holder = db.hold_user_row(user.get()).await;

    let running = {
        let service = service.clone();
        tokio::spawn(async move { service.execute(use_command(user, 100, "kill-twice")).await })
    };
    let connection = waiting_update(&mut admin, &db.name).await;
    kill_query(&mut admin, connection).await;
    steps_started(&steps, 2).await;
    let connection = waiting_update(&mut admin, &db.name).await;
    kill_query(&mut admin, connection).await;

    let done = running.await.unwrap();
    // 503 with Retry-After at the HTTP edge; never Unexpected (a 500).
    assert!(
        matches!(done, Err(OperationError::Unavailable(_))),
        "{done:?}"
    );
    sqlx::raw_sql("commit").execute(&mut holder).await.unwrap();
    assert_eq!(balance_and_entries(&store, &db, user).await, (1_000, 1));
    let key = IdempotencyKey::parse("kill-twice").unwrap();
    assert!(
        store
            .find(user, &key, SystemClock.now())
            .await
            .unwrap()
            .is_none()
    );

    // The client's retry with the same key runs afresh, once; its repeat replays.
    let retried = service
        .execute(use_command(user, 100, "kill-twice"))
        .await
        .unwrap();
    assert!(!retried.replayed);
    let repeated = service
        .execute(use_command(user, 100, "kill-twice"))
        .await
        .unwrap();
    assert!(repeated.replayed);
    assert_eq!(repeated.response, retried.response);
    assert_eq!(balance_and_entries(&store, &db, user).await, (900, 2));
    assert_audit_clean(&store).await;
    db.cleanup().await;
}

/// Opens `n` connections in the pool (held at once, then returned idle) and kills every
/// connection of the database but the admin's; returns when they are gone.
async fn kill_the_pool(db: &TestDatabase, admin: &mut MySqlConnection, n: usize) {
    let mut held = Vec::new();
    for _ in 0..n {
        let mut conn = db.pool().acquire().await.unwrap();
        sqlx::query("select 1").execute(&mut *conn).await.unwrap();
        held.push(conn);
    }
    drop(held);
    // Back in the pool (its release pings each one first).
    let started = Instant::now();
    while db.pool().num_idle() < n {
        assert!(
            started.elapsed() < PATIENCE,
            "the pool did not take its connections back"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let victims: Vec<(u64,)> = sqlx::query_as(
        "select cast(id as unsigned) from information_schema.processlist \
         where db = ? and id <> connection_id()",
    )
    .bind(&db.name)
    .fetch_all(&mut *admin)
    .await
    .unwrap();
    assert!(victims.len() >= n, "{victims:?}");
    for (id,) in &victims {
        sqlx::query(AssertSqlSafe(format!("kill {id}")))
            .execute(&mut *admin)
            .await
            .unwrap();
    }
    let started = Instant::now();
    loop {
        let (left,): (i64,) = sqlx::query_as(
            "select count(*) from information_schema.processlist \
             where db = ? and id <> connection_id()",
        )
        .bind(&db.name)
        .fetch_one(&mut *admin)
        .await
        .unwrap();
        if left == 0 {
            break;
        }
        assert!(started.elapsed() < PATIENCE, "killed connections linger");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn reads_after_every_pooled_connection_was_killed_succeed() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let store = db.store();
    let user = user_with(&store, 500).await;
    let mut admin = admin(&db).await;
    kill_the_pool(&db, &mut admin, 4).await;

    // Each read would otherwise meet a dead connection: one failure per pooled connection.
    for round in 0..6 {
        let read = store.get_user(user).await;
        assert!(
            matches!(read, Ok(Some(ref u)) if u.balance.get() == 500),
            "read {round}: {read:?}"
        );
    }
    db.cleanup().await;
}

#[tokio::test]
async fn a_balance_step_after_every_pooled_connection_was_killed_succeeds() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let store = db.store();
    let user = user_with(&store, 500).await;
    let version = store.get_user(user).await.unwrap().unwrap().version;
    let mut admin = admin(&db).await;
    kill_the_pool(&db, &mut admin, 4).await;

    // The step straight away, without a read before it to clear the pool.
    let now: DateTime<Utc> = SystemClock.now();
    let amount = Amount::from_stored(50);
    let change = BalanceChange {
        user_id: user,
        expected_version: version,
        effect: Effect::Charge(Movement {
            amount,
            balance_after: Balance::from_stored(550),
        }),
        at: now,
        key: KeyRecord {
            key: IdempotencyKey::parse("after-kill").unwrap(),
            fingerprint: charge::fingerprint(user, amount),
            operation: OperationKind::Charge,
            created_at: now,
            expires_at: now + chrono::Duration::hours(1),
        },
        respond: Box::new(|_| StoredResponse {
            status: 200,
            body: b"charged".to_vec(),
        }),
    };
    let applied = store.apply(change).await;
    assert!(applied.is_ok(), "{applied:?}");
    assert_eq!(balance_and_entries(&store, &db, user).await, (550, 2));
    db.cleanup().await;
}

/// A batch whose transaction the database refuses runs each of its requests alone, each
/// with the answer it would have had: here one key of the batch has an expired record not
/// purged yet, which the batch's multi-row insert meets (a duplicate key), while the
/// one-request step replaces it. (The first batch meets a row held elsewhere, which fails
/// a batch at once too.)
#[tokio::test]
async fn a_batch_the_database_refuses_runs_each_request_alone() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let store = db.store();
    let user = user_with(&store, 1_000).await;
    let settings = Settings {
        group_commit: GroupCommit::On {
            max_batch: 64,
            across_users: false,
        },
        ..Settings::default()
    };
    let (service, steps) = service_with(&store, settings);
    sqlx::query(
        "insert into idempotency_records (user_id, idempotency_key, fingerprint, operation, \
         outcome, status, response_status, response_body, created_at, expires_at) \
         values (?, 'expired-key', 'old', 'USE', 'APPLIED', 'COMPLETED', 200, 'old', \
         '2020-01-01 00:00:00', '2020-01-02 00:00:00')",
    )
    .bind(user.get())
    .execute(db.pool())
    .await
    .unwrap();
    let mut admin = admin(&db).await;
    let mut holder = db.hold_user_row(user.get()).await;

    // The first batch meets the held row and fails at once (a batch never waits for a row
    // lock); its request runs alone and waits on the row; the next three queue behind it.
    let send = |amount: i64, key: &'static str| {
        let service = service.clone();
        tokio::spawn(async move { service.execute(use_command(user, amount, key)).await })
    };
    let first = send(100, "first");
    let started = Instant::now();
    loop {
        let waiting: Option<(u64,)> = sqlx::query_as(
            "select cast(id as unsigned) from information_schema.processlist \
             where db = ? and id <> connection_id() \
             and info like '%update users set balance%' limit 1",
        )
        .bind(&db.name)
        .fetch_optional(&mut admin)
        .await
        .unwrap();
        if waiting.is_some() {
            break;
        }
        assert!(
            started.elapsed() < PATIENCE,
            "the first batch never came to wait on the held row"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let queued = [
        send(10, "a"),
        send(20, "expired-key"),
        send(5_000, "too-much"),
    ];
    while service.queued() < queued.len() {
        assert!(started.elapsed() < PATIENCE, "the requests did not queue");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    sqlx::raw_sql("commit").execute(&mut holder).await.unwrap();

    assert_eq!(first.await.unwrap().unwrap().response.status, 200);
    let mut answers = Vec::new();
    for running in queued {
        answers.push(running.await.unwrap().unwrap());
    }
    // Two batches, each refused by the database and followed by its requests alone.
    assert_eq!(steps.started.load(Ordering::SeqCst), (1 + 1) + (1 + 3));
    assert!(answers.iter().all(|e| !e.replayed));
    let (balance, entries) = balance_and_entries(&store, &db, user).await;
    assert_eq!(
        balance,
        1_000 - 100 - 10 - 20,
        "the overdraw refused, the rest applied once"
    );
    assert_eq!(entries, 1 + 3);
    let again = service
        .execute(use_command(user, 20, "expired-key"))
        .await
        .unwrap();
    assert!(
        again.replayed,
        "the expired record was replaced by this request's"
    );
    assert_eq!(again.response, answers[1].response);
    assert_audit_clean(&store).await;
}

/// While `first` (the held user's) waits on its row, a request of `free` is answered 200.
async fn another_user_goes_past(
    service: &BalanceService,
    free: UserId,
    first: &tokio::task::JoinHandle<Result<domain::Execution, OperationError>>,
) {
    let other = tokio::time::timeout(PATIENCE, service.execute(use_command(free, 10, "free")))
        .await
        .expect("another user's request was held up by the locked row")
        .unwrap();
    assert_eq!(other.response.status, 200);
    assert!(
        !first.is_finished(),
        "the held user's request went past its locked row"
    );
}

/// Users 1 and 2, with 1,000 each: the one whose row a test holds, and another.
async fn two_users(store: &MySqlStore) -> (UserId, UserId) {
    let limits = Settings::default().limits;
    store
        .seed_users(2, Balance::new(1_000, &limits).unwrap(), SystemClock.now())
        .await
        .unwrap();
    (UserId::new(1).unwrap(), UserId::new(2).unwrap())
}

/// Group commit with one queue for the instance.
fn across_users() -> Settings {
    Settings {
        group_commit: GroupCommit::On {
            max_batch: 64,
            across_users: true,
        },
        ..Settings::default()
    }
}

/// Across users, a users row locked by another transaction holds up only its own user:
/// the batch that meets it fails at once, that user's request runs alone (off the
/// instance's queue) and waits for its row, and the next batch, another user's, commits
/// while the row is still held.
#[tokio::test]
async fn across_users_a_row_held_elsewhere_holds_up_only_its_user() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let store = db.store();
    let (held, free) = two_users(&store).await;
    let settings = across_users();
    let (service, steps) = service_with(&store, settings);
    let mut admin = admin(&db).await;
    let mut holder = db.hold_user_row(held.get()).await;

    let first = {
        let service = service.clone();
        tokio::spawn(async move { service.execute(use_command(held, 100, "held")).await })
    };
    // Its own update, alone, waits on the row (a batch's statement begins otherwise).
    waiting_update(&mut admin, &db.name).await;
    another_user_goes_past(&service, free, &first).await;
    sqlx::raw_sql("commit").execute(&mut holder).await.unwrap();

    assert_eq!(first.await.unwrap().unwrap().response.status, 200);
    // The failed batch, its request alone, the other user's batch.
    assert_eq!(steps.started.load(Ordering::SeqCst), 3);
    // Each: its seeding entry and the one applied.
    assert_eq!(balance_and_entries(&store, &db, held).await, (900, 2));
    assert_eq!(balance_and_entries(&store, &db, free).await, (990, 2));
    assert_audit_clean(&store).await;
}

/// The lock service unreachable (Redis down).
struct LocksDown;

#[async_trait]
impl LockManager for LocksDown {
    async fn acquire(
        &self,
        _key: &LockKey,
        _wait: Duration,
        _lease: Duration,
    ) -> Result<LockLease, LockError> {
        Err(LockError::Unavailable(anyhow::anyhow!(
            "the lock service is down"
        )))
    }

    async fn release(&self, _lease: &LockLease) -> Result<Release, LockError> {
        Err(LockError::Unavailable(anyhow::anyhow!(
            "the lock service is down"
        )))
    }
}

/// With the lock service down (the `degrade` policy: no lock orders a user's requests),
/// across users, a users row held elsewhere keeps its user's requests waiting one at a
/// time, on one connection: the batches that meet it do not each start a request of their
/// own waiting on the row, which would take the pool and fail every other user.
#[tokio::test]
async fn lock_service_down_a_held_row_takes_one_connection_not_the_pool() {
    let Some(db) = TestDatabase::create_with_pool(4).await else {
        return;
    };
    let store = db.store();
    let (held, free) = two_users(&store).await;
    let settings = across_users();
    let (service, steps) = service_on(&store, settings, Arc::new(LocksDown));
    let mut admin = admin(&db).await;
    let mut holder = db.hold_user_row(held.get()).await;

    let send = |user: UserId, key: String| {
        let service = service.clone();
        tokio::spawn(async move { service.execute(use_command(user, 10, &key)).await })
    };
    let first = send(held, "held-0".to_owned());
    waiting_update(&mut admin, &db.name).await;
    // More of the held user's, one after another, each taken by a batch of its own: they
    // wait for the first, which waits on the row.
    let mut rest = Vec::new();
    for n in 1..8 {
        rest.push(send(held, format!("held-{n}")));
        let started = Instant::now();
        while service.queued() < n {
            assert!(
                started.elapsed() < PATIENCE,
                "request {n} of the held user did not wait behind the first"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    another_user_goes_past(&service, free, &first).await;
    sqlx::raw_sql("commit").execute(&mut holder).await.unwrap();

    assert_eq!(first.await.unwrap().unwrap().response.status, 200);
    for running in rest {
        assert_eq!(running.await.unwrap().unwrap().response.status, 200);
    }
    // The batch that met the row and its request alone; the other user's batch; then the
    // seven that waited, back in one batch.
    assert_eq!(steps.started.load(Ordering::SeqCst), (1 + 1) + 1 + 1);
    assert_eq!(
        balance_and_entries(&store, &db, held).await,
        (1_000 - 80, 1 + 8)
    );
    assert_eq!(balance_and_entries(&store, &db, free).await, (990, 2));
    assert_audit_clean(&store).await;
}
