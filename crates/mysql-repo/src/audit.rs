//! `Auditor`: the reconciliation of the books. Read-only, set-based, in one consistent
//! snapshot.
//!
//! Every check is one or a few statements that return only the broken rows, at most
//! [`AuditReport::LISTED_PER_CHECK`] of them, each carrying the total (`count(*) over ()`,
//! computed before the `limit`), so a badly broken database yields a bounded report with
//! exact counts. The statements run inside one `START TRANSACTION WITH CONSISTENT
//! SNAPSHOT, READ ONLY` at REPEATABLE READ: they all see the same committed state, take no
//! row locks, and a balance change that commits meanwhile cannot show up half-way (a new
//! ledger entry without its balance) as a false breach.
//!
//! The schema indexes `ledger_entries` only by `(user_id, id)`, so matching records and
//! payments to ledger entries by `(user, key, instant)` is done by sorting a `union all`
//! of both sides (window functions, or a `group by`) rather than by a join (a nested loop
//! over each user's whole ledger on servers without hash joins). The three checks about
//! keys share one such sort. Window functions (`rows` frames, `row_number`,
//! `count(*) over`) and derived tables work on MySQL 8 and MariaDB 10.11 alike; nothing
//! here uses `RETURNING` or JSON.
//!
//! The user coupons join that sort too (a coupon issue's record has its user coupon where
//! other records have their ledger entry); the coupon checks are a few passes over
//! `coupons`, `user_coupons` (mostly its unique (coupon_id, user_id) alone) and `payments`.
//!
//! Cost: a few sequential passes over `ledger_entries`, `idempotency_records` and
//! `payments` and one sort of the keyed rows; about 20 s for a million ledger entries and
//! a million records on a small, busy MariaDB (128 MB buffer pool, two shared cores).

use std::sync::LazyLock;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, NaiveDateTime, Utc};
use domain::idempotency::RecordOutcome;
use domain::model::PaymentStatus;
use domain::operations::OperationKind;
use domain::ports::{AuditCheck, AuditReport, Auditor, Breach, RepoError};
use domain::time::format_rfc3339_millis;
use sqlx::{Connection as _, MySqlConnection};

use crate::MySqlStore;
use crate::convert::{OUTCOME_SQL, from_db_time, signed_amount_sql, to_db_time};
use crate::error::repo;
use crate::retry::tested_connection;

/// Rows fetched per statement: the report lists no more than this per check anyway.
const LISTED: i64 = AuditReport::LISTED_PER_CHECK as i64;

#[async_trait]
impl Auditor for MySqlStore {
    async fn audit(
        &self,
        key_ttl: Duration,
        lease: Duration,
        now: DateTime<Utc>,
    ) -> Result<AuditReport, RepoError> {
        // Tested first: a periodic audit may be the first query in minutes, on an idle
        // connection the database has dropped meanwhile; one ping per audit is nothing.
        let mut conn = tested_connection(&self.pool).await.map_err(repo)?;
        // For the next transaction only: the snapshot below needs REPEATABLE READ whatever
        // the server's default is, and the pooled connection keeps its own level afterwards.
        sqlx::raw_sql("set transaction isolation level repeatable read")
            .execute(&mut *conn)
            .await
            .map_err(repo)?;
        let mut tx = conn
            .begin_with("start transaction with consistent snapshot, read only")
            .await
            .map_err(repo)?;
        let audited = audit_in(&mut tx, key_ttl, lease, now).await;
        // Nothing was written; ending the transaction only releases the snapshot.
        if let Err(e) = tx.rollback().await {
            tracing::debug!(error = %e, "ending the audit's read-only transaction failed");
        }
        audited
    }
}

/// Each user whose balance disagrees with its ledger's signed sum or its newest entry.
static BALANCES: LazyLock<String> = LazyLock::new(|| {
    format!(
        "select id, balance, total, entries, newest_id, newest_after, count(*) over () \
         from (select u.id, u.balance, \
                      cast(coalesce(l.total, 0) as signed) as total, \
                      cast(coalesce(l.entries, 0) as signed) as entries, \
                      l.newest_id, n.balance_after as newest_after \
               from users u \
               left join (select user_id, \
                                 sum({signed}) as total, \
                                 count(*) as entries, max(id) as newest_id \
                          from ledger_entries group by user_id) l on l.user_id = u.id \
               left join ledger_entries n on n.id = l.newest_id \
               where coalesce(l.total, 0) <> u.balance or n.balance_after <> u.balance) b \
         order by id limit ?",
        signed = signed_amount_sql("")
    )
});

/// Users the ledger names that do not exist, with their ledgers' signed sums.
static ORPHAN_LEDGERS: LazyLock<String> = LazyLock::new(|| {
    format!(
        "select o.user_id, \
                (select count(*) from ledger_entries e where e.user_id = o.user_id), \
                (select cast(coalesce(sum({signed}), 0) as signed) \
                 from ledger_entries e where e.user_id = o.user_id), \
                count(*) over () \
         from (select l.user_id \
               from (select distinct user_id from ledger_entries) l \
               left join users u on u.id = l.user_id \
               where u.id is null) o \
         order by o.user_id limit ?",
        signed = signed_amount_sql("e.")
    )
});

/// The three checks about keys, in one statement (see [`key_checks`]).
static KEY_CHECKS: LazyLock<String> = LazyLock::new(|| {
    format!(
        "select chk, user_id, k, at, status, outcome, record_status, effects, prev_at, \
                live_until, id, found, operation, coupons \
         from (select b.*, \
                      row_number() over (partition by chk order by user_id, k, at, id) as rn, \
                      count(*) over (partition by chk) as found \
               from (select case when is_entry = 1 then 'KEY' \
                                 when record_status = 'COMPLETED' then 'RECORD' \
                                 else 'STUCK' end as chk, \
                            user_id, k, at, cast(status as signed) as status, outcome, \
                            record_status, \
                            cast(effects as signed) as effects, prev_at, live_until, \
                            cast(id as signed) as id, operation, \
                            cast(coupons as signed) as coupons \
                     from (select user_id, k, at, status, outcome, record_status, is_entry, id, \
                                  operation, is_coupon, \
                                  sum(is_entry) over (partition by user_id, k, at) \
                                      as effects, \
                                  sum(is_coupon) over (partition by user_id, k, at) \
                                      as coupons, \
                                  max(case is_entry when 1 then at end) \
                                      over (partition by user_id, k order by at, id \
                                      rows between unbounded preceding and 1 preceding) \
                                      as prev_at, \
                                  max(case is_entry when 1 then \
                                          coalesce(key_expires_at, \
                                                   timestampadd(microsecond, ?, at)) end) \
                                      over (partition by user_id, k order by at, id \
                                      rows between unbounded preceding and 1 preceding) \
                                      as live_until \
                           from (select user_id, idempotency_key as k, created_at as at, \
                                        response_status as status, {outcome} as outcome, \
                                        status as record_status, \
                                        0 as is_entry, 0 as id, \
                                        cast(null as datetime(3)) as key_expires_at, \
                                        coalesce(operation, '') as operation, \
                                        0 as is_coupon \
                                 from idempotency_records \
                                 union all \
                                 select user_id, idempotency_key, created_at, 0, '', '', 1, id, \
                                        key_expires_at, '', 0 \
                                 from ledger_entries where idempotency_key is not null \
                                 union all \
                                 select user_id, idempotency_key, issued_at, 0, '', '', 0, id, \
                                        null, '', 1 \
                                 from user_coupons) x \
                          ) w \
                     where (is_entry = 0 and is_coupon = 0 and record_status = 'COMPLETED' \
                            and ((outcome = 'APPLIED' and operation <> '{issue}' \
                                  and (effects <> 1 or coupons <> 0)) \
                                 or (outcome = 'APPLIED' and operation = '{issue}' \
                                     and (effects <> 0 or coupons <> 1)) \
                                 or (outcome <> 'APPLIED' \
                                     and (effects <> 0 or coupons <> 0)))) \
                        or (is_entry = 0 and is_coupon = 0 and record_status <> 'COMPLETED' \
                            and at < ?) \
                        or (is_entry = 1 and live_until is not null \
                            and at < live_until)) b) c \
         where rn <= ? order by chk, rn",
        outcome = OUTCOME_SQL,
        issue = OperationKind::CouponIssue.as_str(),
    )
});

async fn audit_in(
    conn: &mut MySqlConnection,
    key_ttl: Duration,
    lease: Duration,
    now: DateTime<Utc>,
) -> Result<AuditReport, RepoError> {
    let mut report = AuditReport::default();
    count_rows(conn, &mut report).await?;
    balance_matches_ledger(conn, &mut report).await?;
    key_checks(conn, &mut report, key_ttl, lease, now).await?;
    paid_order_has_one_payment(conn, &mut report).await?;
    refunds_match_payment(conn, &mut report).await?;
    coupon_stock_matches_issued(conn, &mut report).await?;
    coupon_use_matches_payment(conn, &mut report).await?;
    Ok(report)
}

/// A count read back from the database: never negative.
fn count(raw: i64) -> u64 {
    u64::try_from(raw).unwrap_or(0)
}

/// The total a capped statement reported, from any of its rows (all carry it).
fn total<R>(rows: &[R], found: impl Fn(&R) -> i64) -> u64 {
    rows.first().map_or(0, |row| count(found(row)))
}

fn at(t: NaiveDateTime) -> String {
    format_rfc3339_millis(from_db_time(t))
}

fn breach(check: AuditCheck, subject: String, detail: String) -> Breach {
    Breach {
        check,
        subject,
        detail,
    }
}

async fn count_rows(conn: &mut MySqlConnection, report: &mut AuditReport) -> Result<(), RepoError> {
    type Counts = (i64, i64, i64, i64, i64, i64, i64, i64);
    let (users, entries, records, orders, payments, refunds, coupons, user_coupons): Counts =
        sqlx::query_as(
            "select (select count(*) from users), (select count(*) from ledger_entries), \
             (select count(*) from idempotency_records), (select count(*) from orders), \
             (select count(*) from payments), (select count(*) from refunds), \
             (select count(*) from coupons), (select count(*) from user_coupons)",
        )
        .fetch_one(&mut *conn)
        .await
        .map_err(repo)?;
    report.users = count(users);
    report.ledger_entries = count(entries);
    report.records = count(records);
    report.orders = count(orders);
    report.payments = count(payments);
    report.refunds = count(refunds);
    report.coupons = count(coupons);
    report.user_coupons = count(user_coupons);
    Ok(())
}

/// Each user's balance against its ledger's signed sum and its newest entry's
/// `balance_after`; and ledger entries of users that do not exist.
async fn balance_matches_ledger(
    conn: &mut MySqlConnection,
    report: &mut AuditReport,
) -> Result<(), RepoError> {
    const CHECK: AuditCheck = AuditCheck::BalanceMatchesLedger;
    type Row = (i64, i64, i64, i64, Option<i64>, Option<i64>, i64);
    let rows: Vec<Row> = sqlx::query_as(BALANCES.as_str())
        .bind(LISTED)
        .fetch_all(&mut *conn)
        .await
        .map_err(repo)?;
    let found = total(&rows, |r| r.6);
    let listed = rows.into_iter().map(
        |(user, balance, sum, entries, newest_id, newest_after, _)| {
            let mut detail = format!("balance {balance}, ledger sum {sum} over {entries} entries");
            if let (Some(id), Some(after)) = (newest_id, newest_after)
                && after != balance
            {
                detail.push_str(&format!("; newest entry {id} has balance_after {after}"));
            }
            breach(CHECK, format!("user {user}"), detail)
        },
    );
    report.add_found(CHECK, found, listed.collect::<Vec<_>>());

    // The users the ledger names come from the (user_id, id) index alone (a loose index
    // scan); only those without a users row are summed.
    let rows: Vec<(i64, i64, i64, i64)> = sqlx::query_as(ORPHAN_LEDGERS.as_str())
        .bind(LISTED)
        .fetch_all(&mut *conn)
        .await
        .map_err(repo)?;
    let found = total(&rows, |r| r.3);
    let listed = rows.into_iter().map(|(user, entries, sum, _)| {
        breach(
            CHECK,
            format!("user {user}"),
            format!("no such user, but {entries} ledger entries summing to {sum}"),
        )
    });
    report.add_found(CHECK, found, listed.collect::<Vec<_>>());
    Ok(())
}

/// The three checks about idempotency keys, in one statement: the records and the keyed
/// ledger entries, partitioned by (user, key) and sorted by instant once, give
///
/// - for each completed record, the entries at its instant: one for a record whose outcome
///   is APPLIED, none for a REFUSED one (`RecordHasOneEffect`; a record from an older
///   instance without an outcome reads by `convert::record_facts`' rule); a COUPON_ISSUE
///   record moves no money, so an APPLIED one has no entry and instead exactly one user
///   coupon of its user, key and instant; every other record has no user coupon;
/// - for each entry, the earlier entries of its key (by instant, then id), whose records
///   must all have expired by its instant (`KeyAppliedOnce`): each entry carries the
///   expiry of the record written with it (`key_expires_at`), so the check holds whatever
///   retention the service ran with; entries from before that column fall back to
///   `key_ttl`;
/// - each record that is not completed and older than the lock lease
///   (`NoRecordStuckInFlight`; the service stores only completed records, so this finds
///   nothing unless something else wrote the table).
///
/// Each check's rows are numbered and counted apart, so each gets its own cap and total.
async fn key_checks(
    conn: &mut MySqlConnection,
    report: &mut AuditReport,
    key_ttl: Duration,
    lease: Duration,
    now: DateTime<Utc>,
) -> Result<(), RepoError> {
    // Capped at a century, so adding it to an instant stays within `datetime`'s range.
    let ttl_micros = i64::try_from(key_ttl.as_micros())
        .unwrap_or(i64::MAX)
        .min(100 * 366 * 86_400 * 1_000_000);
    let lease = chrono::Duration::from_std(lease).unwrap_or(chrono::Duration::MAX);
    let stuck_before = now
        .checked_sub_signed(lease)
        .unwrap_or(DateTime::<Utc>::MIN_UTC);
    type Row = (
        String,
        i64,
        String,
        NaiveDateTime,
        i64,
        String,
        String,
        i64,
        Option<NaiveDateTime>,
        Option<NaiveDateTime>,
        i64,
        i64,
        String,
        i64,
    );
    let rows: Vec<Row> = sqlx::query_as(KEY_CHECKS.as_str())
        .bind(ttl_micros)
        .bind(to_db_time(stuck_before))
        .bind(LISTED)
        .fetch_all(&mut *conn)
        .await
        .map_err(repo)?;

    let mut found = [0_u64; 3];
    let mut listed: [Vec<Breach>; 3] = Default::default();
    for (
        chk,
        user,
        key,
        created,
        status,
        outcome,
        record_status,
        effects,
        prev_at,
        live_until,
        id,
        total,
        operation,
        coupons,
    ) in rows
    {
        let subject = format!("user {user} key {key}");
        let (slot, breach) = match chk.as_str() {
            "RECORD" => {
                // What the record says happened, never what its HTTP status suggests.
                let applied = outcome == RecordOutcome::Applied.as_str();
                let issue = operation == OperationKind::CouponIssue.as_str();
                let (what, expected) = match (applied, issue) {
                    (true, false) => ("stored success", "exactly 1 entry and no coupon"),
                    (true, true) => ("stored coupon issue", "exactly 1 coupon and no entry"),
                    (false, _) => ("stored refusal", "none"),
                };
                let detail = format!(
                    "{what} ({status}) of {}: {effects} ledger entries and {coupons} user coupons \
                     with this key and instant, expected {expected}",
                    at(created)
                );
                (0, breach(AuditCheck::RecordHasOneEffect, subject, detail))
            }
            "KEY" => {
                let prev_at = prev_at.unwrap_or(created);
                let live_until = live_until.unwrap_or(created);
                let detail = key_applied_twice(id, created, prev_at, live_until);
                (1, breach(AuditCheck::KeyAppliedOnce, subject, detail))
            }
            _ => {
                let detail = format!(
                    "{record_status} since {}, longer than the lock lease of {} ms",
                    at(created),
                    lease.num_milliseconds()
                );
                (
                    2,
                    breach(AuditCheck::NoRecordStuckInFlight, subject, detail),
                )
            }
        };
        found[slot] = count(total);
        listed[slot].push(breach);
    }
    let checks = [
        AuditCheck::RecordHasOneEffect,
        AuditCheck::KeyAppliedOnce,
        AuditCheck::NoRecordStuckInFlight,
    ];
    for ((check, found), listed) in checks.into_iter().zip(found).zip(listed) {
        report.add_found(check, found, listed);
    }
    Ok(())
}

/// The detail of a `KeyAppliedOnce` breach (the in-memory audit words it the same way).
fn key_applied_twice(
    id: i64,
    created: NaiveDateTime,
    earlier: NaiveDateTime,
    live_until: NaiveDateTime,
) -> String {
    let apart = from_db_time(created) - from_db_time(earlier);
    format!(
        "ledger entry {id} ({}) is {:.3} s after an earlier entry of this key ({}), while an earlier record of the key was live (until {})",
        at(created),
        apart.num_milliseconds() as f64 / 1000.0,
        at(earlier),
        at(live_until)
    )
}

/// PAID or REFUNDED orders without a payment; payments whose order is missing, not the
/// payment's user and amount (what the balance paid plus the coupon's discount), or not in
/// the status the payment gives it (REFUNDED exactly
/// when the payment is refunded in full, else PAID); payments without exactly one PAYMENT
/// ledger entry of the same user, key, amount and instant, and PAYMENT entries without a
/// payment.
async fn paid_order_has_one_payment(
    conn: &mut MySqlConnection,
    report: &mut AuditReport,
) -> Result<(), RepoError> {
    const CHECK: AuditCheck = AuditCheck::PaidOrderHasOnePayment;

    let rows: Vec<(i64, i64, i64, i64, String)> = sqlx::query_as(
        "select o.id, o.user_id, o.amount, count(*) over () \
         , o.status from orders o left join payments p on p.order_id = o.id \
         where o.status in ('PAID', 'REFUNDED') and p.id is null \
         order by o.id limit ?",
    )
    .bind(LISTED)
    .fetch_all(&mut *conn)
    .await
    .map_err(repo)?;
    let found = total(&rows, |r| r.3);
    let listed = rows.into_iter().map(|(order, user, amount, _, status)| {
        breach(
            CHECK,
            format!("order {order}"),
            format!("{status} (user {user}, amount {amount}) but has no payment"),
        )
    });
    report.add_found(CHECK, found, listed.collect::<Vec<_>>());

    type OrderRow = (
        i64,
        i64,
        i64,
        i64,
        Option<String>,
        Option<i64>,
        Option<i64>,
        i64,
        String,
        i64,
    );
    // The order's status its payment gives it: REFUNDED once refunded in full (as
    // `PaymentStatus::of` says: something refunded, and all of it; a payment a coupon
    // covered in full took nothing, and stays PAID). The order's amount is what the
    // balance paid plus the coupon's discount.
    let rows: Vec<OrderRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select id, order_id, user_id, amount, status, order_user, order_amount, \
                count(*) over (), expected, discount \
         from (select p.id, p.order_id, p.user_id, p.amount, p.discount, o.status, \
                      o.user_id as order_user, o.amount as order_amount, \
                      case when {REFUNDED_IN_FULL_SQL} then 'REFUNDED' else 'PAID' end \
                          as expected \
               from payments p left join orders o on o.id = p.order_id) x \
         where status is null or status <> expected \
            or order_user <> user_id or order_amount <> amount + discount \
         order by id limit ?"
    )))
    .bind(LISTED)
    .fetch_all(&mut *conn)
    .await
    .map_err(repo)?;
    let found = total(&rows, |r| r.7);
    let listed = rows.into_iter().map(
        |(
            payment,
            order,
            user,
            amount,
            status,
            order_user,
            order_amount,
            _,
            expected,
            discount,
        )| {
            let detail = match (status, order_user, order_amount) {
                (Some(status), Some(order_user), Some(order_amount)) if status == expected => {
                    format!(
                        "pays order {order} of user {order_user} for {order_amount}, \
                         but is user {user}'s for {amount} (with a discount of {discount})"
                    )
                }
                (Some(status), ..) => {
                    format!(
                        "pays order {order}, which is {status}; its payment makes it {expected}"
                    )
                }
                (None, ..) => format!("pays order {order}, which does not exist"),
            };
            breach(CHECK, format!("payment {payment}"), detail)
        },
    );
    report.add_found(CHECK, found, listed.collect::<Vec<_>>());

    pair_with_entries(
        conn,
        report,
        CHECK,
        PAYMENT_PAIRS.as_str(),
        "payment",
        "PAYMENT",
    )
    .await
}

/// Payments whose refunded total is not the sum of their refunds or passes their amount;
/// refunds of a missing payment, or not of the payment's user and order; refunds without
/// exactly one REFUND ledger entry of the same user, key, amount and instant, and REFUND
/// entries without a refund.
async fn refunds_match_payment(
    conn: &mut MySqlConnection,
    report: &mut AuditReport,
) -> Result<(), RepoError> {
    const CHECK: AuditCheck = AuditCheck::RefundsMatchPayment;

    let rows: Vec<(i64, i64, i64, i64, i64, i64)> = sqlx::query_as(
        "select p.id, p.amount, p.refunded_total, coalesce(r.total, 0), coalesce(r.n, 0), \
                count(*) over () \
         from payments p \
         left join (select payment_id, cast(sum(amount) as signed) as total, \
                           cast(count(*) as signed) as n \
                    from refunds group by payment_id) r on r.payment_id = p.id \
         where p.refunded_total <> coalesce(r.total, 0) \
            or p.refunded_total > p.amount or p.refunded_total < 0 \
         order by p.id limit ?",
    )
    .bind(LISTED)
    .fetch_all(&mut *conn)
    .await
    .map_err(repo)?;
    let found = total(&rows, |r| r.5);
    let listed = rows
        .into_iter()
        .map(|(payment, amount, refunded, sum, n, _)| {
            breach(
                CHECK,
                format!("payment {payment}"),
                format!(
                    "amount {amount}, refunded total {refunded}, its {n} refund(s) sum to {sum}"
                ),
            )
        });
    report.add_found(CHECK, found, listed.collect::<Vec<_>>());

    type RefundRow = (i64, i64, i64, i64, Option<i64>, Option<i64>, i64);
    let rows: Vec<RefundRow> = sqlx::query_as(
        "select r.id, r.payment_id, r.user_id, r.order_id, p.user_id, p.order_id, \
                count(*) over () \
         from refunds r left join payments p on p.id = r.payment_id \
         where p.id is null or p.user_id <> r.user_id or p.order_id <> r.order_id \
         order by r.id limit ?",
    )
    .bind(LISTED)
    .fetch_all(&mut *conn)
    .await
    .map_err(repo)?;
    let found = total(&rows, |r| r.6);
    let listed = rows
        .into_iter()
        .map(|(refund, payment, user, order, p_user, p_order, _)| {
            let detail = match (p_user, p_order) {
                (Some(p_user), Some(p_order)) => format!(
                    "refunds payment {payment} of user {p_user} and order {p_order} \
                 as user {user} and order {order}"
                ),
                _ => format!("refunds payment {payment}, which does not exist"),
            };
            breach(CHECK, format!("refund {refund}"), detail)
        });
    report.add_found(CHECK, found, listed.collect::<Vec<_>>());

    pair_with_entries(
        conn,
        report,
        CHECK,
        REFUND_PAIRS.as_str(),
        "refund",
        "REFUND",
    )
    .await
}

/// Rows of `table` (payments, refunds) and the ledger entries of `kind` grouped by what
/// each row shares with its entry (user, key, instant, amount): the groups that do not
/// hold exactly one of each. The instant is the row's `time_column`.
fn pairs_sql(table: &str, time_column: &str, kind: &str) -> String {
    format!(
        "select user_id, k, at, amount, rows_in, entries, row_id, entry_id, \
                count(*) over () \
         from (select user_id, k, at, amount, \
                      cast(sum(is_row) as signed) as rows_in, \
                      cast(sum(1 - is_row) as signed) as entries, \
                      cast(max(row_id) as signed) as row_id, \
                      cast(max(entry_id) as signed) as entry_id \
               from (select user_id, idempotency_key as k, {time_column} as at, amount, \
                            1 as is_row, id as row_id, 0 as entry_id \
                     from {table} \
                     union all \
                     select user_id, idempotency_key, created_at, amount, 0, 0, id \
                     from ledger_entries where kind = '{kind}') x \
               group by user_id, k, at, amount \
               having sum(is_row) <> 1 or sum(1 - is_row) <> 1) m \
         order by user_id, at, row_id, entry_id limit ?"
    )
}

static PAYMENT_PAIRS: LazyLock<String> =
    LazyLock::new(|| pairs_sql("payments", "paid_at", "PAYMENT"));
static REFUND_PAIRS: LazyLock<String> =
    LazyLock::new(|| pairs_sql("refunds", "created_at", "REFUND"));

/// Runs a [`pairs_sql`] statement and reports each unpaired group under `check`: an entry
/// of `kind` without its `row`, or a group with other than one of each.
async fn pair_with_entries(
    conn: &mut MySqlConnection,
    report: &mut AuditReport,
    check: AuditCheck,
    sql: &'static str,
    row: &str,
    kind: &str,
) -> Result<(), RepoError> {
    type PairRow = (
        i64,
        Option<String>,
        NaiveDateTime,
        i64,
        i64,
        i64,
        i64,
        i64,
        i64,
    );
    let rows: Vec<PairRow> = sqlx::query_as(sql)
        .bind(LISTED)
        .fetch_all(&mut *conn)
        .await
        .map_err(repo)?;
    let found = total(&rows, |r| r.8);
    let listed = rows.into_iter().map(
        |(user, key, when, amount, rows_in, entries, row_id, entry, _)| {
            let key = key.unwrap_or_else(|| "(none)".to_owned());
            let what = format!("user {user}, key {key}, amount {amount}, at {}", at(when));
            if rows_in == 0 {
                breach(
                    check,
                    format!("ledger entry {entry}"),
                    format!("a {kind} entry ({what}) without a {row}"),
                )
            } else {
                breach(
                    check,
                    format!("{row} {row_id}"),
                    format!(
                        "{rows_in} {row}(s) and {entries} {kind} ledger entries share \
                         {what}; expected exactly one of each"
                    ),
                )
            }
        },
    );
    report.add_found(check, found, listed.collect::<Vec<_>>());
    Ok(())
}

/// Coupons whose issued count is not the number of their user coupons, or passes their
/// stock; a user holding two of one coupon (the unique key forbids it: this finds it if the
/// key was ever lost); and, by coupon, user coupons of a coupon that does not exist.
/// (Worded as the in-memory audit words them.)
async fn coupon_stock_matches_issued(
    conn: &mut MySqlConnection,
    report: &mut AuditReport,
) -> Result<(), RepoError> {
    const CHECK: AuditCheck = AuditCheck::CouponStockMatchesIssued;

    // The user coupons are counted from the unique (coupon_id, user_id) alone.
    let rows: Vec<(i64, i64, i64, i64, i64)> = sqlx::query_as(
        "select c.id, c.total_quantity, c.issued_quantity, coalesce(u.n, 0), count(*) over () \
         from coupons c \
         left join (select coupon_id, cast(count(*) as signed) as n \
                    from user_coupons group by coupon_id) u on u.coupon_id = c.id \
         where c.issued_quantity <> coalesce(u.n, 0) \
            or c.issued_quantity > c.total_quantity or c.issued_quantity < 0 \
         order by c.id limit ?",
    )
    .bind(LISTED)
    .fetch_all(&mut *conn)
    .await
    .map_err(repo)?;
    let found = total(&rows, |r| r.4);
    let listed = rows.into_iter().map(|(coupon, stock, issued, held, _)| {
        breach(
            CHECK,
            format!("coupon {coupon}"),
            format!("issued {issued} of {stock}, with {held} user coupons"),
        )
    });
    report.add_found(CHECK, found, listed.collect::<Vec<_>>());

    let rows: Vec<(i64, i64, String, i64)> = sqlx::query_as(
        "select coupon_id, user_id, ids, count(*) over () \
         from (select coupon_id, user_id, \
                      group_concat(id order by id separator ', ') as ids \
               from user_coupons group by coupon_id, user_id having count(*) > 1) d \
         order by coupon_id, user_id limit ?",
    )
    .bind(LISTED)
    .fetch_all(&mut *conn)
    .await
    .map_err(repo)?;
    let found = total(&rows, |r| r.3);
    let listed = rows.into_iter().map(|(coupon, user, ids, _)| {
        let held = ids.split(", ").count();
        breach(
            CHECK,
            format!("coupon {coupon} user {user}"),
            format!(
                "user {user} holds {held} of coupon {coupon}, at most 1 allowed: user coupons {ids}"
            ),
        )
    });
    report.add_found(CHECK, found, listed.collect::<Vec<_>>());

    let rows: Vec<(i64, i64, i64)> = sqlx::query_as(
        "select u.coupon_id, u.n, count(*) over () \
         from (select coupon_id, cast(count(*) as signed) as n \
               from user_coupons group by coupon_id) u \
         left join coupons c on c.id = u.coupon_id \
         where c.id is null \
         order by u.coupon_id limit ?",
    )
    .bind(LISTED)
    .fetch_all(&mut *conn)
    .await
    .map_err(repo)?;
    let found = total(&rows, |r| r.2);
    let listed = rows.into_iter().map(|(coupon, held, _)| {
        breach(
            CHECK,
            format!("coupon {coupon}"),
            format!("no such coupon, but {held} user coupons of it"),
        )
    });
    report.add_found(CHECK, found, listed.collect::<Vec<_>>());
    Ok(())
}

/// A payment refunded in full, over `payments p`: as [`domain::model::PaymentStatus::of`]
/// says, something refunded and all of it (a payment a coupon covered in full took nothing,
/// and never is).
const REFUNDED_IN_FULL_SQL: &str = "(p.refunded_total > 0 and p.refunded_total >= p.amount)";

/// Used user coupons whose payment is missing, another user's, names another coupon or is
/// refunded in full; payments not refunded in full that their user coupon is not used by
/// (missing, free, or used by another payment); and (a row only this schema can hold) a
/// discount without a coupon. (Worded as the in-memory audit words them.)
async fn coupon_use_matches_payment(
    conn: &mut MySqlConnection,
    report: &mut AuditReport,
) -> Result<(), RepoError> {
    const CHECK: AuditCheck = AuditCheck::CouponUseMatchesPayment;

    type UsedRow = (i64, i64, i64, Option<i64>, Option<i64>, Option<i64>, i64);
    let rows: Vec<UsedRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select uc.id, uc.user_id, uc.payment_id, p.id, p.user_id, p.user_coupon_id, \
                count(*) over () \
         from user_coupons uc left join payments p on p.id = uc.payment_id \
         where uc.payment_id is not null \
           and (p.id is null or p.user_id <> uc.user_id or p.user_coupon_id is null \
                or p.user_coupon_id <> uc.id or {REFUNDED_IN_FULL_SQL}) \
         order by uc.id limit ?"
    )))
    .bind(LISTED)
    .fetch_all(&mut *conn)
    .await
    .map_err(repo)?;
    let found = total(&rows, |r| r.6);
    let listed = rows
        .into_iter()
        .map(|(held, user, payment, exists, payer, names, _)| {
            let wrong = match (exists, payer, names) {
                (None, ..) => "which does not exist".to_owned(),
                (Some(_), Some(payer), _) if payer != user => {
                    format!("which is user {payer}'s, not user {user}'s")
                }
                (Some(_), _, None) => "which names no coupon".to_owned(),
                (Some(_), _, Some(named)) if named != held => {
                    format!("which names user coupon {named}")
                }
                (Some(_), ..) => "which is refunded in full".to_owned(),
            };
            breach(
                CHECK,
                format!("user coupon {held}"),
                format!("used by payment {payment}, {wrong}"),
            )
        });
    report.add_found(CHECK, found, listed.collect::<Vec<_>>());

    type PaymentRow = (i64, Option<i64>, i64, i64, Option<i64>, Option<i64>, i64);
    let rows: Vec<PaymentRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select p.id, p.user_coupon_id, p.discount, p.refunded_total, uc.id, uc.payment_id, \
                count(*) over () \
         from payments p left join user_coupons uc on uc.id = p.user_coupon_id \
         where (p.user_coupon_id is null and p.discount <> 0) \
            or (p.user_coupon_id is not null and not {REFUNDED_IN_FULL_SQL} \
                and (uc.id is null or uc.payment_id is null or uc.payment_id <> p.id)) \
         order by p.id limit ?"
    )))
    .bind(LISTED)
    .fetch_all(&mut *conn)
    .await
    .map_err(repo)?;
    let found = total(&rows, |r| r.6);
    let listed = rows.into_iter().map(
        |(payment, coupon, discount, refunded, exists, used_by, _)| {
            let detail = match coupon {
                None => format!("a discount of {discount} without a coupon"),
                Some(coupon) => {
                    // Not refunded in full: COMPLETED or PARTIALLY_REFUNDED.
                    let status = if refunded > 0 {
                        PaymentStatus::PartiallyRefunded
                    } else {
                        PaymentStatus::Completed
                    };
                    let found = match (exists, used_by) {
                        (None, _) => "which does not exist".to_owned(),
                        (Some(_), None) => "which is not used".to_owned(),
                        (Some(_), Some(other)) => format!("which payment {other} uses"),
                    };
                    format!(
                        "{} with user coupon {coupon} (not refunded in full), {found}",
                        status.as_str()
                    )
                }
            };
            breach(CHECK, format!("payment {payment}"), detail)
        },
    );
    report.add_found(CHECK, found, listed.collect::<Vec<_>>());
    Ok(())
}
