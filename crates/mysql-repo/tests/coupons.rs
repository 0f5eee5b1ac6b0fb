//! Coupons on a real server: what only a database shows. The port contracts (issue, pay
//! with a coupon, the refund that frees it, the audit's coupon checks) run on this store
//! and the in-memory one from testkit; these keep the rush of many connections on one
//! coupons row, the order of the issue's statements (the coupons row locked last), the
//! unique keys, and the audit's SQL on broken rows. Each test has a database of its own
//! from testkit's harness (`TEST_DATABASE_URL`, else testcontainers, else skipped, saying
//! so), dropped afterwards.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use domain::idempotency::StoredResponse;
use domain::model::{CouponUse, NewCoupon, PaymentStatus};
use domain::operations::{Effect, IssueEffect, Movement, OperationKind, coupon_issue};
use domain::outcome::Outcome;
use domain::ports::{
    AuditCheck, AuditReport, Auditor, BalanceChange, BalanceStore, Clock, CouponRepo, KeyRecord,
    OrderRepo, ResponseEncoder, StepError, SystemClock, UserRepo,
};
use domain::types::{Amount, Balance, CouponId, CouponName, IdempotencyKey, UserCouponId, UserId};
use domain::{BalanceService, IssueCoupon, OperationError, Pay, Ports, Refund, Settings};
use mysql_repo::MySqlStore;
use sqlx::{Connection, MySqlConnection};
use testkit::TestDatabase;

/// How long a test waits for the database to reach a state before it fails.
const PATIENCE: Duration = Duration::from_secs(20);

/// 200 with the outcome's debug text, 422 for a refusal: the tests read what happened.
struct DebugEncoder;

impl ResponseEncoder for DebugEncoder {
    fn encode(&self, outcome: &Outcome) -> StoredResponse {
        let status = if matches!(outcome, Outcome::Refused(_)) {
            422
        } else {
            200
        };
        StoredResponse {
            status,
            body: format!("{outcome:?}").into_bytes(),
        }
    }
}

fn service(store: &MySqlStore) -> BalanceService {
    let ports = Ports {
        users: Arc::new(store.clone()),
        orders: Arc::new(store.clone()),
        coupons: Arc::new(store.clone()),
        keys: Arc::new(store.clone()),
        store: Arc::new(store.clone()),
        locks: Arc::new(memory::InProcessLockManager::new()),
        encoder: Arc::new(DebugEncoder),
        clock: Arc::new(SystemClock),
        gate: None,
    };
    BalanceService::new(ports, Settings::default())
}

fn limits() -> domain::types::Limits {
    Settings::default().limits
}

fn amount(raw: i64) -> Amount {
    Amount::new(raw, &limits()).unwrap()
}

fn key(raw: &str) -> IdempotencyKey {
    IdempotencyKey::parse(raw).unwrap()
}

/// Users 1..=`count`, each with `balance`.
async fn users(store: &MySqlStore, count: u32, balance: i64) -> Vec<UserId> {
    store
        .seed_users(
            count,
            Balance::new(balance, &limits()).unwrap(),
            SystemClock.now(),
        )
        .await
        .unwrap();
    (1..=i64::from(count))
        .map(|id| UserId::new(id).unwrap())
        .collect()
}

/// A coupon open since an hour ago, never closing, valid for 30 days.
async fn coupon(store: &MySqlStore, discount: i64, total: i64) -> CouponId {
    let now = SystemClock.now();
    let new = NewCoupon::new(
        CouponName::parse("WELCOME").unwrap(),
        amount(discount),
        total,
        Some(now - chrono::Duration::hours(1)),
        None,
        Some(30),
        now,
    )
    .unwrap();
    store.create_coupon(new, now).await.unwrap().id
}

/// Issues, retrying with the same key while the service answers "try again" (as a client
/// does): the stored answer, once there is one.
async fn issue(
    service: &BalanceService,
    user: UserId,
    coupon: CouponId,
    raw: &str,
) -> StoredResponse {
    let started = Instant::now();
    loop {
        let op = IssueCoupon {
            user,
            coupon,
            key: key(raw),
        };
        match service.issue_coupon(op).await {
            Ok(execution) => return execution.response,
            Err(OperationError::Unavailable(_) | OperationError::KeyInUse) => {
                assert!(started.elapsed() < PATIENCE, "no answer for {user} {raw}");
            }
            Err(e) => panic!("issuing to {user}: {e:?}"),
        }
    }
}

fn body(response: &StoredResponse) -> String {
    String::from_utf8_lossy(&response.body).into_owned()
}

async fn audit(store: &MySqlStore) -> AuditReport {
    let settings = Settings::default();
    store
        .audit(
            settings.idempotency_ttl,
            settings.lock_lease,
            SystemClock.now(),
        )
        .await
        .unwrap()
}

async fn assert_audit_clean(store: &MySqlStore) -> AuditReport {
    let report = audit(store).await;
    assert!(report.is_clean(), "{report:#?}");
    report
}

async fn scalar(db: &TestDatabase, sql: &'static str) -> i64 {
    let (n,): (i64,) = sqlx::query_as(sql).fetch_one(db.pool()).await.unwrap();
    n
}

/// 40 users at once on a stock of 10, each on its own connection and retrying with its own
/// key: exactly 10 issued, to 10 different users, the count equal to the rows; the rest
/// sold out (stored and replayed), and the books audit clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rush_issues_exactly_the_stock_to_distinct_users() {
    let Some(db) = TestDatabase::create_with_pool(16).await else {
        return;
    };
    let store = db.store();
    let service = service(&store);
    let users = users(&store, 40, 0).await;
    let coupon = coupon(&store, 500, 10).await;

    let mut rush = Vec::new();
    for user in users.clone() {
        let service = service.clone();
        rush.push(tokio::spawn(async move {
            (
                user,
                issue(&service, user, coupon, &format!("rush-{user}")).await,
            )
        }));
    }
    let mut issued = Vec::new();
    let mut answers = std::collections::HashMap::new();
    let mut sold_out = 0;
    for run in rush {
        let (user, response) = run.await.unwrap();
        answers.insert(user, response.clone());
        match response.status {
            200 => issued.push(user),
            _ => {
                assert!(
                    body(&response).contains("CouponSoldOut"),
                    "{}",
                    body(&response)
                );
                sold_out += 1;
            }
        }
    }
    issued.sort_unstable();
    issued.dedup();
    assert_eq!((issued.len(), sold_out), (10, 30));
    let got = store.get_coupon(coupon).await.unwrap().unwrap();
    assert_eq!((got.issued_quantity, got.total_quantity), (10, 10));
    assert_eq!(
        scalar(&db, "select count(distinct user_id) from user_coupons").await,
        10
    );

    // A winner's retry replays its answer; a new key of a winner is already issued.
    for user in [
        issued[0],
        *users.iter().find(|u| !issued.contains(u)).unwrap(),
    ] {
        let again = issue(&service, user, coupon, &format!("rush-{user}")).await;
        assert_eq!(Some(&again), answers.get(&user), "replayed byte for byte");
    }
    let winner = issued[0];
    let other_key = issue(&service, winner, coupon, "another-key").await;
    assert!(
        body(&other_key).contains("CouponAlreadyIssued"),
        "{}",
        body(&other_key)
    );

    let report = assert_audit_clean(&store).await;
    assert_eq!((report.coupons, report.user_coupons), (1, 10));
    db.cleanup().await;
}

/// An admin connection holding the coupons row locked, in an open transaction.
async fn hold_coupon_row(db: &TestDatabase, coupon: CouponId) -> MySqlConnection {
    let mut holder = MySqlConnection::connect(&db.url).await.unwrap();
    sqlx::raw_sql("begin").execute(&mut holder).await.unwrap();
    sqlx::query("select id from coupons where id = ? for update")
        .bind(coupon.get())
        .fetch_one(&mut holder)
        .await
        .unwrap();
    holder
}

/// The issue's statement that waits on the held coupons row, once it does.
async fn wait_for_count_update(admin: &mut MySqlConnection, db: &str) {
    let started = Instant::now();
    loop {
        let waiting: Option<(String,)> = sqlx::query_as(
            "select state from information_schema.processlist \
             where db = ? and info like 'update coupons set issued_quantity%' limit 1",
        )
        .bind(db)
        .fetch_optional(&mut *admin)
        .await
        .unwrap();
        if waiting.is_some() {
            return;
        }
        assert!(
            started.elapsed() < PATIENCE,
            "no issue came to wait on the coupons row"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The coupons row is the one every issue of a rush writes, so the step writes it last:
/// while its update waits on that row, the users row, the user coupon and the key's record
/// are already written (uncommitted), and nothing else of the step waits.
#[tokio::test]
async fn an_issue_writes_the_coupons_row_last() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let store = db.store();
    let service = service(&store);
    let user = users(&store, 1, 0).await[0];
    let coupon = coupon(&store, 500, 5).await;
    let mut holder = hold_coupon_row(&db, coupon).await;

    let running = {
        let service = service.clone();
        tokio::spawn(async move { issue(&service, user, coupon, "last").await })
    };
    let mut admin = MySqlConnection::connect(&db.url).await.unwrap();
    wait_for_count_update(&mut admin, &db.name).await;
    sqlx::raw_sql("set session transaction isolation level read uncommitted")
        .execute(&mut admin)
        .await
        .unwrap();
    let (version, held, records): (i64, i64, i64) = sqlx::query_as(
        "select (select version from users where id = 1), \
                (select count(*) from user_coupons), \
                (select count(*) from idempotency_records)",
    )
    .fetch_one(&mut admin)
    .await
    .unwrap();
    assert_eq!((version, held, records), (1, 1, 1));

    sqlx::raw_sql("rollback")
        .execute(&mut holder)
        .await
        .unwrap();
    let response = running.await.unwrap();
    assert_eq!(response.status, 200, "{}", body(&response));
    let got = store.get_coupon(coupon).await.unwrap().unwrap();
    assert_eq!(got.issued_quantity, 1);
    let user_after = store.get_user(user).await.unwrap().unwrap();
    assert_eq!((user_after.balance.get(), user_after.version), (0, 1));
    assert_eq!(
        scalar(
            &db,
            "select count(*) from ledger_entries where kind <> 'CHARGE'"
        )
        .await,
        0,
        "an issue writes no ledger entry"
    );
    assert_audit_clean(&store).await;
    db.cleanup().await;
}

/// An issue step as the service builds it, decided on `version`.
fn issue_change(user: UserId, version: u64, coupon: CouponId, raw: &str) -> BalanceChange {
    let now = SystemClock.now();
    BalanceChange {
        user_id: user,
        expected_version: version,
        effect: Effect::IssueCoupon(IssueEffect {
            coupon,
            discount: amount(500),
            expires_at: now + chrono::Duration::days(30),
        }),
        at: now,
        key: KeyRecord {
            key: key(raw),
            fingerprint: coupon_issue::fingerprint(user, coupon),
            operation: OperationKind::CouponIssue,
            created_at: now,
            expires_at: now + chrono::Duration::days(1),
        },
        respond: Box::new(|assigned| StoredResponse {
            status: 200,
            body: format!("{assigned:?}").into_bytes(),
        }),
    }
}

/// The database's own guards, below any decision: a user's second coupon of a kind (the
/// unique key) and a unit past the stock (the guarded count) are `CouponChanged`, and the
/// step leaves nothing behind.
#[tokio::test]
async fn the_unique_key_and_the_guarded_count_refuse_what_a_decision_missed() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let store = db.store();
    let who = users(&store, 2, 0).await;
    let coupon = coupon(&store, 500, 1).await;

    let applied = store
        .apply(issue_change(who[0], 0, coupon, "a"))
        .await
        .unwrap();
    let id = applied.assigned.user_coupon_id.expect("a user coupon id");
    assert_eq!(applied.assigned.entry_id, None);
    let held = store.get_user_coupon(id).await.unwrap().unwrap();
    assert_eq!(
        (held.user_id, held.coupon_id, held.payment),
        (who[0], coupon, None)
    );
    assert_eq!(held.idempotency_key, key("a"));

    // The same user again, on its new version and another key: the unique key.
    let again = store.apply(issue_change(who[0], 1, coupon, "b")).await;
    assert!(matches!(again, Err(StepError::CouponChanged)), "{again:?}");
    // Another user past the stock: the guarded count, after everything else was written.
    let past = store.apply(issue_change(who[1], 0, coupon, "c")).await;
    assert!(matches!(past, Err(StepError::CouponChanged)), "{past:?}");

    assert_eq!(store.get_user(who[0]).await.unwrap().unwrap().version, 1);
    assert_eq!(store.get_user(who[1]).await.unwrap().unwrap().version, 0);
    assert_eq!(scalar(&db, "select count(*) from user_coupons").await, 1);
    assert_eq!(
        scalar(&db, "select count(*) from idempotency_records").await,
        1
    );
    assert_eq!(
        store
            .get_coupon(coupon)
            .await
            .unwrap()
            .unwrap()
            .issued_quantity,
        1
    );

    let snapshot = store.gate_snapshot(coupon).await.unwrap().unwrap();
    assert_eq!(snapshot.coupon.issued_quantity, 1);
    assert_eq!(snapshot.holders, vec![(who[0], key("a"))]);
    assert!(
        store
            .gate_snapshot(CouponId::new(99).unwrap())
            .await
            .unwrap()
            .is_none()
    );
    assert_audit_clean(&store).await;
    db.cleanup().await;
}

async fn pay(
    service: &BalanceService,
    user: UserId,
    order: domain::types::OrderId,
    coupon: Option<UserCouponId>,
    raw: &str,
) -> StoredResponse {
    service
        .execute(Arc::new(Pay {
            user,
            order,
            key: key(raw),
            coupon,
        }))
        .await
        .unwrap()
        .response
}

/// Paying with a coupon: the payment row names it and its discount, the coupon is used by
/// it, a payment the coupon covers in full writes a PAYMENT entry of 0; a used coupon is
/// not usable again, and a refund in full sets it free (a partial one does not).
#[tokio::test]
async fn a_coupon_pays_part_of_an_order_until_its_payment_is_refunded_in_full() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let store = db.store();
    let service = service(&store);
    let user = users(&store, 1, 10_000).await[0];
    let big = coupon(&store, 5_000, 10).await;
    let small = coupon(&store, 1_000, 10).await;
    issue(&service, user, big, "big").await;
    issue(&service, user, small, "small").await;
    let big_held = store.holding(big, user).await.unwrap().unwrap().id;
    let small_held = store.holding(small, user).await.unwrap().unwrap().id;

    // Covered in full: 0 from the balance.
    let order = service.create_order(user, amount(3_000)).await.unwrap();
    let paid = pay(&service, user, order.id, Some(big_held), "pay-1").await;
    assert_eq!(paid.status, 200, "{}", body(&paid));
    let (payment_id, discount, amount_paid): (i64, i64, i64) =
        sqlx::query_as("select id, discount, amount from payments where order_id = ?")
            .bind(order.id.get())
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert_eq!((discount, amount_paid), (3_000, 0));
    let payment_id = domain::types::PaymentId::new(payment_id).unwrap();
    let payment = store.get_payment(payment_id).await.unwrap().unwrap();
    assert_eq!(
        payment.coupon,
        Some(CouponUse {
            user_coupon: big_held,
            discount: amount(3_000),
        })
    );
    assert_eq!(
        store
            .get_user_coupon(big_held)
            .await
            .unwrap()
            .unwrap()
            .payment,
        Some(payment_id)
    );
    assert_eq!(
        scalar(
            &db,
            "select count(*) from ledger_entries where kind = 'PAYMENT' and amount = 0"
        )
        .await,
        1
    );
    assert_eq!(
        store.get_user(user).await.unwrap().unwrap().balance.get(),
        10_000
    );

    // Used: another order cannot have it.
    let second = service.create_order(user, amount(2_000)).await.unwrap();
    let refused = pay(&service, user, second.id, Some(big_held), "pay-2").await;
    assert!(
        body(&refused).contains("CouponNotUsable"),
        "{}",
        body(&refused)
    );

    // Part of the order: 4 000 from the balance; refunded in two parts, the coupon is free
    // only after the second.
    let third = service.create_order(user, amount(5_000)).await.unwrap();
    let paid = pay(&service, user, third.id, Some(small_held), "pay-3").await;
    assert_eq!(paid.status, 200, "{}", body(&paid));
    let (payment_id,): (i64,) = sqlx::query_as("select id from payments where order_id = ?")
        .bind(third.id.get())
        .fetch_one(db.pool())
        .await
        .unwrap();
    let payment_id = domain::types::PaymentId::new(payment_id).unwrap();
    assert_eq!(
        store.get_user(user).await.unwrap().unwrap().balance.get(),
        6_000
    );
    let refund = |amount: Option<Amount>, raw: &str| Refund {
        user,
        payment: payment_id,
        amount,
        reason: None,
        key: key(raw),
    };
    service
        .execute(Arc::new(refund(Some(amount(1_000)), "refund-1")))
        .await
        .unwrap();
    assert_eq!(
        store
            .get_user_coupon(small_held)
            .await
            .unwrap()
            .unwrap()
            .payment,
        Some(payment_id)
    );
    assert_audit_clean(&store).await;
    service
        .execute(Arc::new(refund(None, "refund-2")))
        .await
        .unwrap();
    let payment = store.get_payment(payment_id).await.unwrap().unwrap();
    assert_eq!(payment.status(), PaymentStatus::Refunded);
    assert_eq!(
        store
            .get_user_coupon(small_held)
            .await
            .unwrap()
            .unwrap()
            .payment,
        None
    );
    assert_eq!(
        store.get_user(user).await.unwrap().unwrap().balance.get(),
        10_000
    );

    // Free again: it pays another order.
    let fourth = service.create_order(user, amount(1_500)).await.unwrap();
    let paid = pay(&service, user, fourth.id, Some(small_held), "pay-4").await;
    assert_eq!(paid.status, 200, "{}", body(&paid));
    assert_audit_clean(&store).await;
    db.cleanup().await;
}

/// A pay step with a coupon, decided on `version`, at `at`.
fn pay_change(
    user: UserId,
    version: u64,
    order: domain::types::OrderId,
    coupon: UserCouponId,
    balance_after: i64,
    at: DateTime<Utc>,
) -> BalanceChange {
    BalanceChange {
        user_id: user,
        expected_version: version,
        effect: Effect::Pay {
            order,
            movement: Movement {
                amount: amount(500),
                balance_after: Balance::new(balance_after, &limits()).unwrap(),
            },
            coupon: Some(CouponUse {
                user_coupon: coupon,
                discount: amount(500),
            }),
        },
        at,
        key: KeyRecord {
            key: key(&format!("pay-{order}")),
            fingerprint: domain::operations::pay::fingerprint(user, order, Some(coupon)),
            operation: OperationKind::Payment,
            created_at: at,
            expires_at: at + chrono::Duration::days(1),
        },
        respond: Box::new(|assigned| StoredResponse {
            status: 200,
            body: format!("{assigned:?}").into_bytes(),
        }),
    }
}

/// The step's own guard on the user coupon, below the decision: another user's, an expired
/// one and one used since are `CouponChanged`, and the order stays PENDING.
#[tokio::test]
async fn a_coupon_that_is_not_this_users_free_and_unexpired_refuses_the_step() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let store = db.store();
    let service = service(&store);
    let who = users(&store, 2, 10_000).await;
    let kind = coupon(&store, 500, 10).await;
    issue(&service, who[0], kind, "mine").await;
    let held = store.holding(kind, who[0]).await.unwrap().unwrap();
    let now = SystemClock.now();

    let theirs = service.create_order(who[1], amount(1_000)).await.unwrap();
    let v1 = store.get_user(who[1]).await.unwrap().unwrap().version;
    let step = store
        .apply(pay_change(who[1], v1, theirs.id, held.id, 9_500, now))
        .await;
    assert!(matches!(step, Err(StepError::CouponChanged)), "{step:?}");

    let mine = service.create_order(who[0], amount(1_000)).await.unwrap();
    let v0 = store.get_user(who[0]).await.unwrap().unwrap().version;
    let expired = store
        .apply(pay_change(
            who[0],
            v0,
            mine.id,
            held.id,
            9_500,
            held.expires_at,
        ))
        .await;
    assert!(
        matches!(expired, Err(StepError::CouponChanged)),
        "{expired:?}"
    );

    let first = store
        .apply(pay_change(who[0], v0, mine.id, held.id, 9_500, now))
        .await
        .unwrap();
    let used_by = first.assigned.payment_id;
    let other = service.create_order(who[0], amount(1_000)).await.unwrap();
    let again = store
        .apply(pay_change(who[0], v0 + 1, other.id, held.id, 9_000, now))
        .await;
    assert!(matches!(again, Err(StepError::CouponChanged)), "{again:?}");

    for order in [theirs.id, other.id] {
        assert_eq!(
            store.get_order(order).await.unwrap().unwrap().status,
            domain::model::OrderStatus::Pending
        );
    }
    assert_eq!(
        store
            .get_user_coupon(held.id)
            .await
            .unwrap()
            .unwrap()
            .payment,
        used_by
    );
    assert_eq!(scalar(&db, "select count(*) from payments").await, 1);
    assert_audit_clean(&store).await;
    db.cleanup().await;
}

async fn exec(db: &TestDatabase, sql: &'static str) {
    sqlx::query(sql)
        .execute(db.pool())
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

fn found(report: &AuditReport) -> Vec<(AuditCheck, u64)> {
    AuditCheck::ALL
        .iter()
        .map(|check| (*check, report.found(*check)))
        .filter(|(_, n)| *n > 0)
        .collect()
}

/// The coupon checks' SQL on rows no step writes: a count off its rows, a used coupon whose
/// payment was refunded in full, a live payment whose coupon is free, a record without its
/// user coupon, and (with the unique key dropped) a user holding two.
#[tokio::test]
async fn the_audit_finds_coupon_rows_no_step_writes() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let store = db.store();
    let service = service(&store);
    let who = users(&store, 3, 10_000).await;
    let kind = coupon(&store, 500, 10).await;
    for user in &who {
        issue(&service, *user, kind, &format!("issue-{user}")).await;
    }
    let held = store.holding(kind, who[0]).await.unwrap().unwrap();
    let order = service.create_order(who[0], amount(1_000)).await.unwrap();
    pay(&service, who[0], order.id, Some(held.id), "pay").await;
    assert_audit_clean(&store).await;

    exec(&db, "update coupons set issued_quantity = 2").await;
    assert_eq!(
        found(&audit(&store).await),
        vec![(AuditCheck::CouponStockMatchesIssued, 1)]
    );
    exec(&db, "update coupons set issued_quantity = 3").await;

    // The payment loses its coupon (free again): the payment is not what it uses.
    exec(
        &db,
        "update user_coupons set payment_id = null where user_id = 1",
    )
    .await;
    let report = audit(&store).await;
    assert_eq!(
        found(&report),
        vec![(AuditCheck::CouponUseMatchesPayment, 1)]
    );
    assert!(
        report
            .listed(AuditCheck::CouponUseMatchesPayment)
            .any(|b| b.subject.starts_with("payment ")),
        "{report:#?}"
    );
    exec(
        &db,
        "update user_coupons set payment_id = (select id from payments) where user_id = 1",
    )
    .await;
    assert_audit_clean(&store).await;

    // Refunded in full behind the step's back: the coupon is used by a dead payment (and
    // the order and the refunds disagree with it too).
    exec(&db, "update payments set refunded_total = amount").await;
    let report = audit(&store).await;
    assert_eq!(
        report.found(AuditCheck::CouponUseMatchesPayment),
        1,
        "{report:#?}"
    );
    exec(&db, "update payments set refunded_total = 0").await;
    assert_audit_clean(&store).await;

    // A user coupon gone: its count and its record both say so.
    exec(&db, "delete from user_coupons where user_id = 3").await;
    assert_eq!(
        found(&audit(&store).await),
        vec![
            (AuditCheck::RecordHasOneEffect, 1),
            (AuditCheck::CouponStockMatchesIssued, 1)
        ]
    );
    exec(&db, "update coupons set issued_quantity = 2").await;
    exec(&db, "delete from idempotency_records where user_id = 3").await;
    assert_audit_clean(&store).await;

    // Twice the same (coupon, user): only with the unique key gone.
    exec(
        &db,
        "alter table user_coupons drop index user_coupons_coupon_user",
    )
    .await;
    exec(
        &db,
        "insert into user_coupons \
         (coupon_id, user_id, discount, issued_at, expires_at, idempotency_key) \
         select coupon_id, user_id, discount, issued_at, expires_at, 'forged' \
         from user_coupons where user_id = 2",
    )
    .await;
    exec(&db, "update coupons set issued_quantity = 3").await;
    let report = audit(&store).await;
    assert_eq!(
        found(&report),
        vec![(AuditCheck::CouponStockMatchesIssued, 1)]
    );
    assert!(
        report
            .listed(AuditCheck::CouponStockMatchesIssued)
            .any(|b| b.subject == format!("coupon {kind} user 2")),
        "{report:#?}"
    );
    db.cleanup().await;
}
