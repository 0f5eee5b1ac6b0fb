//! `OrderRepo`: order creation and the read side of orders and payments.

use anyhow::anyhow;
use async_trait::async_trait;
use chrono::{DateTime, NaiveDateTime, Utc};
use domain::model::{CouponUse, Order, OrderStatus, Payment, PaymentStatus, Refund};
use domain::ports::{OrderRepo, RepoError};
use domain::types::{Amount, Balance, OrderId, PaymentId, RefundReason, UserId};

use crate::MySqlStore;
use crate::convert::{
    from_db_time, order_id, payment_id, refund_id, to_db_time, user_coupon_id, user_id,
};
use crate::error::repo;

/// A refunds row as read: id, order_id, user_id, amount, balance_after, refunded_total,
/// reason, created_at, and the payment's amount (for the status after it).
type RefundRow = (
    i64,
    i64,
    i64,
    i64,
    i64,
    i64,
    Option<String>,
    NaiveDateTime,
    i64,
);

/// A payments row as read: id, order_id, user_id, amount, balance_after, paid_at,
/// refunded_total, discount, user_coupon_id.
type PaymentRow = (
    i64,
    i64,
    i64,
    i64,
    i64,
    NaiveDateTime,
    i64,
    i64,
    Option<i64>,
);

#[async_trait]
impl OrderRepo for MySqlStore {
    async fn create_order(
        &self,
        user: UserId,
        amount: Amount,
        now: DateTime<Utc>,
    ) -> Result<Order, RepoError> {
        let created_at = to_db_time(now);
        let done = sqlx::query(
            "insert into orders (user_id, amount, status, created_at) values (?, ?, ?, ?)",
        )
        .bind(user.get())
        .bind(amount.get())
        .bind(OrderStatus::Pending.as_str())
        .bind(created_at)
        .execute(&self.pool)
        .await
        .map_err(repo)?;
        Ok(Order {
            id: order_id(done.last_insert_id())?,
            user_id: user,
            amount,
            status: OrderStatus::Pending,
            created_at: from_db_time(created_at),
        })
    }

    async fn get_order(&self, id: OrderId) -> Result<Option<Order>, RepoError> {
        let row: Option<(i64, i64, i64, String, NaiveDateTime)> =
            read_retrying!(&self.pool, |db| {
                sqlx::query_as(
                    "select id, user_id, amount, status, created_at from orders where id = ?",
                )
                .bind(id.get())
                .fetch_optional(db)
            })
            .map_err(repo)?;
        let Some((id, user, amount, status, created_at)) = row else {
            return Ok(None);
        };
        let status = OrderStatus::parse(&status)
            .ok_or_else(|| anyhow!("stored order status {status:?} is unknown"))?;
        Ok(Some(Order {
            id: order_id(id)?,
            user_id: user_id(user)?,
            amount: Amount::from_stored(amount),
            status,
            created_at: from_db_time(created_at),
        }))
    }

    async fn get_payment(&self, id: PaymentId) -> Result<Option<Payment>, RepoError> {
        let row: Option<PaymentRow> = read_retrying!(&self.pool, |db| {
            sqlx::query_as(
                "select id, order_id, user_id, amount, balance_after, paid_at, refunded_total, \
                 discount, user_coupon_id \
                 from payments where id = ?",
            )
            .bind(id.get())
            .fetch_optional(db)
        })
        .map_err(repo)?;
        let Some((
            id,
            order,
            user,
            amount,
            balance_after,
            paid_at,
            refunded_total,
            discount,
            user_coupon,
        )) = row
        else {
            return Ok(None);
        };
        // Written together by the step: a coupon and the discount it gave, or neither.
        let coupon = user_coupon
            .map(|raw| {
                Ok::<_, anyhow::Error>(CouponUse {
                    user_coupon: user_coupon_id(raw)?,
                    discount: Amount::from_stored(discount),
                })
            })
            .transpose()?;
        Ok(Some(Payment {
            id: payment_id(id)?,
            order_id: order_id(order)?,
            user_id: user_id(user)?,
            amount: Amount::from_stored(amount),
            balance_after: Balance::from_stored(balance_after),
            paid_at: from_db_time(paid_at),
            refunded_total,
            coupon,
        }))
    }

    async fn refunds(&self, payment: PaymentId, limit: u32) -> Result<Vec<Refund>, RepoError> {
        let rows: Vec<RefundRow> = read_retrying!(&self.pool, |db| {
            sqlx::query_as(
                "select r.id, r.order_id, r.user_id, r.amount, r.balance_after, \
                 r.refunded_total, r.reason, r.created_at, p.amount \
                 from refunds r join payments p on p.id = r.payment_id \
                 where r.payment_id = ? order by r.id limit ?",
            )
            .bind(payment.get())
            .bind(i64::from(limit))
            .fetch_all(db)
        })
        .map_err(repo)?;
        let refunds = rows
            .into_iter()
            .map(
                |(id, order, user, amount, balance_after, refunded_total, reason, at, paid)| {
                    Ok(Refund {
                        id: refund_id(id)?,
                        payment_id: payment,
                        order_id: order_id(order)?,
                        user_id: user_id(user)?,
                        amount: Amount::from_stored(amount),
                        balance_after: Balance::from_stored(balance_after),
                        refunded_total,
                        payment_status: PaymentStatus::of(
                            Amount::from_stored(paid),
                            refunded_total,
                        ),
                        reason: reason.map(RefundReason::from_stored),
                        created_at: from_db_time(at),
                    })
                },
            )
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(refunds)
    }

    async fn cancel_order(&self, id: OrderId) -> Result<Option<Order>, RepoError> {
        // Guarded like the payment's flip to PAID: whichever commits first wins, and the
        // read below sees the winner. Autocommit: one statement, nothing to roll back.
        sqlx::query("update orders set status = 'CANCELLED' where id = ? and status = 'PENDING'")
            .bind(id.get())
            .execute(&self.pool)
            .await
            .map_err(repo)?;
        self.get_order(id).await
    }
}
