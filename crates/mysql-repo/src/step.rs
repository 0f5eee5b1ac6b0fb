//! `BalanceStore`: the atomic step. Each method is one transaction: the users row (guarded
//! by its version), the ledger entry, the order and payment (or the payment, order and
//! refund), the user coupon (or the coupon's issued count), and the key's completed record
//! commit together or not at all.
//!
//! Row locks are always taken in the same order (users row first, then the payment row,
//! then the order row, then the new rows and the user's own coupon), so steps of one user
//! queue behind its row instead of deadlocking. An issue is the exception that proves the
//! rule: the coupons row is shared by every user of a rush, so it is updated last, and
//! its lock is held only from that update to the commit.
//! A deadlock that InnoDB still reports (gap locks in a rare path) is a lock conflict,
//! which the step answers as a version conflict so the use case retries it.

use async_trait::async_trait;
use chrono::{DateTime, NaiveDateTime, Utc};
use domain::idempotency::{RecordOutcome, StoredResponse};
use domain::model::CouponUse;
use domain::operations::{Effect, IssueEffect, Movement, RefundEffect};
use domain::ports::{
    Applied, Assigned, BalanceChange, BalanceStore, BatchTransaction, KeyRecord, RefusalRecord,
    Responder, StepError,
};
use domain::types::{IdempotencyKey, OrderId, PaymentId, RefundId, UserCouponId, UserId};
use sqlx::pool::PoolConnection;
use sqlx::{Connection as _, MySql, MySqlConnection, Transaction};

use crate::MySqlStore;
use crate::convert::{
    entry_id, payment_id, refund_id, to_db_expiry, to_db_time, user_coupon_id, version_to_db,
};
use crate::error::{self, Classified, classify, commit, step};
use crate::retry::tested_connection;
use crate::sql;

#[async_trait]
impl BalanceStore for MySqlStore {
    async fn apply(&self, change: BalanceChange) -> Result<Applied, StepError> {
        let mut conn = self.pool.acquire().await.map_err(step)?;
        let lost = match conn.begin().await {
            Ok(tx) => return apply_tx(tx, change).await,
            Err(e) if error::connection_lost(&e) => e,
            Err(e) => return Err(step(e)),
        };
        lost_at_begin(conn, &lost);
        let mut conn = tested_connection(&self.pool).await.map_err(step)?;
        let tx = conn.begin().await.map_err(step)?;
        apply_tx(tx, change).await
    }

    async fn record_refusal(&self, refusal: RefusalRecord) -> Result<(), StepError> {
        let mut conn = self.pool.acquire().await.map_err(step)?;
        let lost = match conn.begin().await {
            Ok(tx) => return refuse_tx(tx, &refusal).await,
            Err(e) if error::connection_lost(&e) => e,
            Err(e) => return Err(step(e)),
        };
        lost_at_begin(conn, &lost);
        let mut conn = tested_connection(&self.pool).await.map_err(step)?;
        let tx = conn.begin().await.map_err(step)?;
        refuse_tx(tx, &refusal).await
    }

    async fn begin_batch(
        &self,
        users: &[UserId],
        keys: &[(UserId, IdempotencyKey)],
        now: DateTime<Utc>,
    ) -> Result<Box<dyn BatchTransaction>, StepError> {
        crate::batch::begin_batch(&self.pool, users, keys, now).await
    }
}

/// `BEGIN` is the first thing a step sends on a pooled connection, which may have died
/// idle (the pool does not test it): nothing has happened yet, so the step begins once
/// more on a tested connection. This one is closed (before the next is acquired, so a
/// pool of one does not wait on itself) instead of going back to the pool.
fn lost_at_begin(mut conn: PoolConnection<MySql>, e: &sqlx::Error) {
    tracing::info!(error = %e, "a pooled connection was found dead at BEGIN; beginning again on a tested one");
    conn.close_on_drop();
}

async fn apply_tx(
    mut tx: Transaction<'_, MySql>,
    change: BalanceChange,
) -> Result<Applied, StepError> {
    match apply_in(&mut tx, change).await {
        Ok(applied) => {
            // A commit that fails may or may not have happened (see `error::commit`): it is
            // not retried here; the error is not stored, so the client's retry with the same
            // key either replays the committed record or runs afresh.
            tx.commit().await.map_err(commit)?;
            Ok(applied)
        }
        Err(e) => {
            rollback(tx).await;
            Err(e)
        }
    }
}

async fn refuse_tx(
    mut tx: Transaction<'_, MySql>,
    refusal: &RefusalRecord,
) -> Result<(), StepError> {
    match refuse_in(&mut tx, refusal).await {
        Ok(()) => tx.commit().await.map_err(commit),
        Err(e) => {
            rollback(tx).await;
            Err(e)
        }
    }
}

/// Rolls back at once, so the transaction's row locks are released before the use case retries
/// (dropping the transaction would defer the rollback to the connection's next use).
pub(crate) async fn rollback(tx: Transaction<'_, MySql>) {
    if let Err(e) = tx.rollback().await {
        // The connection is broken; the server rolls back when the session ends.
        tracing::debug!(error = %e, "rollback of a failed transaction failed");
    }
}

async fn apply_in(conn: &mut MySqlConnection, change: BalanceChange) -> Result<Applied, StepError> {
    let BalanceChange {
        user_id,
        expected_version,
        effect,
        at,
        key,
        respond,
    } = change;
    // The one place this adapter looks at what an effect writes besides the balance and
    // its ledger entry.
    let (pays_order, refunding) = match &effect {
        Effect::Charge(_) | Effect::Use(_) => (None, None),
        Effect::Pay { order, coupon, .. } => (Some((*order, *coupon)), None),
        Effect::Refund(refund) => (None, Some(refund)),
        Effect::IssueCoupon(issue) => {
            let issuing = IssueStep {
                user: user_id,
                expected_version,
                issue,
                at: to_db_time(at),
                key: &key,
            };
            return issue_coupon(conn, issuing, respond).await;
        }
    };
    let Some((
        kind,
        Movement {
            amount,
            balance_after: new_balance,
        },
    )) = effect.ledger()
    else {
        return Err(StepError::Unexpected(anyhow::anyhow!(
            "an effect that moves money has no ledger entry: {effect:?}"
        )));
    };
    let at = to_db_time(at);

    // The optimistic guard: only the version that was read may be replaced. The row lock
    // this takes is held to the commit, so nobody else writes this user meanwhile.
    let updated = sqlx::query(sql::UPDATE_BALANCE)
        .bind(new_balance.get())
        .bind(at)
        .bind(user_id.get())
        .bind(version_to_db(expected_version)?)
        .execute(&mut *conn)
        .await
        .map_err(step)?;
    if updated.rows_affected() == 0 {
        return Err(missing_or_moved(conn, user_id).await);
    }

    let payment_id = match pays_order {
        Some((order, coupon)) => {
            let payment = NewPayment {
                amount: amount.get(),
                balance_after: new_balance.get(),
                paid_at: at,
                key: key.key.as_str(),
                coupon,
            };
            Some(pay_order(conn, order, user_id, &payment).await?)
        }
        None => None,
    };
    let refund_id = match refunding {
        Some(refund) => Some(refund_payment(conn, refund, user_id, key.key.as_str(), at).await?),
        None => None,
    };

    let entry = sqlx::query(sql::INSERT_LEDGER_ENTRY)
        .bind(user_id.get())
        .bind(kind.as_str())
        .bind(amount.get())
        .bind(new_balance.get())
        .bind(key.key.as_str())
        .bind(at)
        .bind(to_db_expiry(key.expires_at))
        .execute(&mut *conn)
        .await
        .map_err(step)?;

    let assigned = Assigned {
        entry_id: Some(entry_id(entry.last_insert_id())?),
        payment_id,
        refund_id,
        user_coupon_id: None,
    };
    let response = respond(&assigned);
    put_record(conn, user_id, &key, RecordOutcome::Applied, &response).await?;
    Ok(Applied { assigned, response })
}

async fn refuse_in(conn: &mut MySqlConnection, refusal: &RefusalRecord) -> Result<(), StepError> {
    // A locking read: the refusal was decided on this version, and no balance write may
    // commit between this check and ours (it waits on the row lock instead).
    let version: Option<(i64,)> =
        sqlx::query_as("select version from users where id = ? for update")
            .bind(refusal.user_id.get())
            .fetch_optional(&mut *conn)
            .await
            .map_err(step)?;
    match version {
        None => return Err(StepError::UserNotFound),
        Some((v,)) if v != version_to_db(refusal.expected_version)? => {
            return Err(StepError::VersionConflict);
        }
        Some(_) => {}
    }
    put_record(
        conn,
        refusal.user_id,
        &refusal.key,
        RecordOutcome::Refused,
        &refusal.response,
    )
    .await
}

/// What an issue writes, borrowed from the change.
struct IssueStep<'a> {
    user: UserId,
    expected_version: u64,
    issue: &'a IssueEffect,
    at: NaiveDateTime,
    key: &'a KeyRecord,
}

/// One unit of a coupon to the user, in the order that keeps the hot coupons row locked
/// for the shortest time: the users row's version (guarded, the balance unchanged; no
/// ledger entry), the user coupon (its unique (coupon, user) refuses a second one), the
/// key's record, and only then the coupon's issued count, guarded by the stock. Every
/// request of a rush updates that one row, so its lock queues them; taken last, it is held
/// only from the update to the commit, and everything before it runs in parallel.
async fn issue_coupon(
    conn: &mut MySqlConnection,
    issuing: IssueStep<'_>,
    respond: Responder,
) -> Result<Applied, StepError> {
    let IssueStep {
        user,
        expected_version,
        issue,
        at,
        key,
    } = issuing;
    let bumped = sqlx::query(sql::BUMP_VERSION)
        .bind(at)
        .bind(user.get())
        .bind(version_to_db(expected_version)?)
        .execute(&mut *conn)
        .await
        .map_err(step)?;
    if bumped.rows_affected() == 0 {
        return Err(missing_or_moved(conn, user).await);
    }

    let inserted = sqlx::query(sql::INSERT_USER_COUPON)
        .bind(issue.coupon.get())
        .bind(user.get())
        .bind(issue.discount.get())
        .bind(at)
        .bind(to_db_expiry(issue.expires_at))
        .bind(key.key.as_str())
        .execute(&mut *conn)
        .await;
    let user_coupon = match inserted.map_err(classify) {
        Ok(done) => user_coupon_id(done.last_insert_id())?,
        // The unique (coupon_id, user_id): this user was issued one since the decision
        // (payment_id is null here, so its unique key cannot be the one).
        Err(Classified::Duplicate(_)) => return Err(StepError::CouponChanged),
        Err(other) => return Err(other.into_step()),
    };

    let assigned = Assigned {
        entry_id: None,
        payment_id: None,
        refund_id: None,
        user_coupon_id: Some(user_coupon),
    };
    let response = respond(&assigned);
    put_record(conn, user, key, RecordOutcome::Applied, &response).await?;

    let counted = sqlx::query(sql::COUNT_ISSUED)
        .bind(issue.coupon.get())
        .execute(&mut *conn)
        .await
        .map_err(step)?;
    if counted.rows_affected() == 0 {
        // Sold out since the decision (or the coupon is gone): the rollback takes the
        // user coupon and the record back with it.
        return Err(StepError::CouponChanged);
    }
    Ok(Applied { assigned, response })
}

/// After a guarded update matched nothing: the user is gone or its version moved on.
async fn missing_or_moved(conn: &mut MySqlConnection, user: UserId) -> StepError {
    let found: Result<Option<(i64,)>, _> = sqlx::query_as(sql::USER_EXISTS)
        .bind(user.get())
        .fetch_optional(&mut *conn)
        .await;
    match found {
        Ok(Some(_)) => StepError::VersionConflict,
        Ok(None) => StepError::UserNotFound,
        Err(e) => step(e),
    }
}

/// The payment row's values, borrowed from the change.
struct NewPayment<'a> {
    amount: i64,
    balance_after: i64,
    paid_at: NaiveDateTime,
    key: &'a str,
    coupon: Option<CouponUse>,
}

/// Marks `order` PAID and writes its payment row, and with a coupon marks the user coupon
/// used by it; `OrderNotPending` when the order was paid (or is not this user's PENDING
/// order) by the time the step runs, `CouponChanged` when the user coupon is no longer
/// this user's, free and unexpired.
async fn pay_order(
    conn: &mut MySqlConnection,
    order: OrderId,
    user: UserId,
    payment: &NewPayment<'_>,
) -> Result<PaymentId, StepError> {
    let flipped = sqlx::query(
        "update orders set status = 'PAID', paid_at = ? \
         where id = ? and user_id = ? and status = 'PENDING'",
    )
    .bind(payment.paid_at)
    .bind(order.get())
    .bind(user.get())
    .execute(&mut *conn)
    .await
    .map_err(step)?;
    if flipped.rows_affected() == 0 {
        return Err(StepError::OrderNotPending);
    }

    let inserted = sqlx::query(
        "insert into payments \
         (order_id, user_id, amount, balance_after, paid_at, idempotency_key, discount, \
          user_coupon_id) \
         values (?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(order.get())
    .bind(user.get())
    .bind(payment.amount)
    .bind(payment.balance_after)
    .bind(payment.paid_at)
    .bind(payment.key)
    .bind(payment.coupon.map_or(0, |used| used.discount.get()))
    .bind(payment.coupon.map(|used| used.user_coupon.get()))
    .execute(&mut *conn)
    .await;
    let paid = match inserted.map_err(classify) {
        Ok(done) => payment_id(done.last_insert_id())?,
        // The unique order_id: a payment row exists although the order was PENDING, so
        // the order is not payable; the database refuses a second payment either way.
        Err(Classified::Duplicate(_)) => return Err(StepError::OrderNotPending),
        Err(other) => return Err(other.into_step()),
    };

    if let Some(used) = payment.coupon {
        // Only this user's coupon, free and unexpired at the payment's instant: a payment
        // that committed first with it, or its expiry since the decision, refuses this one.
        let taken = sqlx::query(
            "update user_coupons set payment_id = ? \
             where id = ? and user_id = ? and payment_id is null and expires_at > ?",
        )
        .bind(paid.get())
        .bind(used.user_coupon.get())
        .bind(user.get())
        .bind(payment.paid_at)
        .execute(&mut *conn)
        .await
        .map_err(step)?;
        if taken.rows_affected() == 0 {
            return Err(StepError::CouponChanged);
        }
    }
    Ok(paid)
}

/// Raises the payment's refunded total (only over the total the refund was decided on, and
/// never past the amount), marks the order REFUNDED once the payment is refunded in full,
/// and writes the refund's row; `PaymentChanged` when the guard matches nothing.
async fn refund_payment(
    conn: &mut MySqlConnection,
    refund: &RefundEffect,
    user: UserId,
    key: &str,
    at: NaiveDateTime,
) -> Result<RefundId, StepError> {
    let amount = refund.movement.amount.get();
    let raised = sqlx::query(
        "update payments set refunded_total = refunded_total + ? \
         where id = ? and user_id = ? and refunded_total = ? and refunded_total + ? <= amount",
    )
    .bind(amount)
    .bind(refund.payment.get())
    .bind(user.get())
    .bind(refund.refunded_before)
    .bind(amount)
    .execute(&mut *conn)
    .await
    .map_err(step)?;
    if raised.rows_affected() == 0 {
        return Err(StepError::PaymentChanged);
    }
    if refund.completes_payment() {
        let flipped = sqlx::query(
            "update orders set status = 'REFUNDED' where id = ? and user_id = ? and status = 'PAID'",
        )
        .bind(refund.order.get())
        .bind(user.get())
        .execute(&mut *conn)
        .await
        .map_err(step)?;
        if flipped.rows_affected() == 0 {
            // Not a race (only a refund moves a paid order on, and refunds of one payment
            // are serialised by the guard above): the order is not in the state its payment
            // gives it. Retrying cannot help; the audit names it.
            return Err(StepError::Unexpected(anyhow::anyhow!(
                "order {} of payment {} is not PAID, so its payment cannot complete its refund",
                refund.order,
                refund.payment
            )));
        }
        if let Some(coupon) = refund.coupon {
            free_coupon(conn, refund, coupon).await?;
        }
    }
    let inserted = sqlx::query(
        "insert into refunds \
         (payment_id, order_id, user_id, amount, balance_after, refunded_total, reason, \
          idempotency_key, created_at) \
         values (?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(refund.payment.get())
    .bind(refund.order.get())
    .bind(user.get())
    .bind(amount)
    .bind(refund.movement.balance_after.get())
    .bind(refund.refunded_after())
    .bind(refund.reason.as_ref().map(|reason| reason.as_str()))
    .bind(key)
    .bind(at)
    .execute(&mut *conn)
    .await;
    match inserted.map_err(classify) {
        Ok(done) => Ok(refund_id(done.last_insert_id())?),
        // The unique (payment_id, refunded_total): another refund reached this total first.
        Err(Classified::Duplicate(_)) => Err(StepError::PaymentChanged),
        Err(other) => Err(other.into_step()),
    }
}

/// A payment refunded in full lets its coupon go: free again (AVAILABLE, or EXPIRED once
/// past its expiry, which the status reads from `expires_at`).
async fn free_coupon(
    conn: &mut MySqlConnection,
    refund: &RefundEffect,
    coupon: UserCouponId,
) -> Result<(), StepError> {
    let freed =
        sqlx::query("update user_coupons set payment_id = null where id = ? and payment_id = ?")
            .bind(coupon.get())
            .bind(refund.payment.get())
            .execute(&mut *conn)
            .await
            .map_err(step)?;
    if freed.rows_affected() == 0 {
        // Not a race either (only this payment's last refund frees what it holds): the
        // coupon is not held by its payment. The refund itself is right and goes on; the
        // coupon is left as it is (free already, or another payment's), and the audit
        // names the payment.
        tracing::warn!(
            payment = %refund.payment,
            user_coupon = %coupon,
            "the payment refunded in full does not hold its coupon; the coupon is left as it is"
        );
    }
    Ok(())
}

/// Writes the key's completed record, replacing an expired one.
///
/// The insert comes first and the expired record is deleted only when the insert hits
/// it: deleting first would, for the usual fresh key, search for a row that is not there,
/// and under REPEATABLE READ that search takes a gap lock which makes concurrent steps of
/// other users wait on (or deadlock with) each other's inserts into the same gap. Deleting
/// a row that exists locks only that row.
pub(crate) async fn put_record(
    conn: &mut MySqlConnection,
    user: UserId,
    key: &KeyRecord,
    outcome: RecordOutcome,
    response: &StoredResponse,
) -> Result<(), StepError> {
    match insert_record(conn, user, key, outcome, response).await {
        Err(Classified::Duplicate(_)) => {}
        other => return other.map_err(Classified::into_step),
    }
    // A record is live while `now < expires_at`; the new record's creation is "now".
    let purged = sqlx::query(
        "delete from idempotency_records \
         where user_id = ? and idempotency_key = ? and expires_at <= ?",
    )
    .bind(user.get())
    .bind(key.key.as_str())
    .bind(to_db_time(key.created_at))
    .execute(&mut *conn)
    .await
    .map_err(step)?;
    if purged.rows_affected() == 0 {
        return Err(StepError::KeyTaken);
    }
    match insert_record(conn, user, key, outcome, response).await {
        Ok(()) => Ok(()),
        Err(Classified::Duplicate(_)) => Err(StepError::KeyTaken),
        Err(other) => Err(other.into_step()),
    }
}

async fn insert_record(
    conn: &mut MySqlConnection,
    user: UserId,
    key: &KeyRecord,
    outcome: RecordOutcome,
    response: &StoredResponse,
) -> Result<(), Classified> {
    sqlx::query(sql::INSERT_KEY_RECORD)
        .bind(user.get())
        .bind(key.key.as_str())
        .bind(key.fingerprint.as_str())
        .bind(key.operation.as_str())
        .bind(outcome.as_str())
        .bind(response.status)
        .bind(response.body.as_slice())
        .bind(to_db_time(key.created_at))
        .bind(to_db_expiry(key.expires_at))
        .execute(&mut *conn)
        .await
        .map(|_| ())
        .map_err(classify)
}
