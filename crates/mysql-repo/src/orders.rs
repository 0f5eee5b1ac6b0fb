//! `OrderRepo`: order creation and the read side of orders and payments.

use anyhow::anyhow;
use async_trait::async_trait;
use chrono::{DateTime, NaiveDateTime, Utc};
use domain::model::{Order, OrderStatus, Payment};
use domain::ports::{OrderRepo, RepoError};
use domain::types::{Amount, Balance, OrderId, PaymentId, UserId};

use crate::MySqlStore;
use crate::convert::{from_db_time, order_id, payment_id, to_db_time, user_id};
use crate::error::repo;

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
        let row: Option<(i64, i64, i64, i64, i64, NaiveDateTime)> =
            read_retrying!(&self.pool, |db| {
                sqlx::query_as(
                    "select id, order_id, user_id, amount, balance_after, paid_at \
                     from payments where id = ?",
                )
                .bind(id.get())
                .fetch_optional(db)
            })
            .map_err(repo)?;
        let Some((id, order, user, amount, balance_after, paid_at)) = row else {
            return Ok(None);
        };
        Ok(Some(Payment {
            id: payment_id(id)?,
            order_id: order_id(order)?,
            user_id: user_id(user)?,
            amount: Amount::from_stored(amount),
            balance_after: Balance::from_stored(balance_after),
            paid_at: from_db_time(paid_at),
        }))
    }
}
