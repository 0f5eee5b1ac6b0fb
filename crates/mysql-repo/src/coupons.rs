//! `CouponRepo`: coupon creation and the read side of coupons and user coupons. Issuing and
//! spending are balance steps ([`crate::step`]).

use async_trait::async_trait;
use chrono::{DateTime, NaiveDateTime, Utc};
use domain::model::{Coupon, NewCoupon, UserCoupon};
use domain::ports::{CouponRepo, GateSnapshot, RepoError};
use domain::types::{Amount, CouponId, CouponName, UserCouponId, UserId};

use crate::MySqlStore;
use crate::convert::{
    coupon_id, from_db_time, idempotency_key, payment_id, quantity_from_db, to_db_expiry,
    to_db_time, user_coupon_id, user_id,
};
use crate::error::repo;

/// The columns of a coupon, in [`CouponRow`]'s order.
const COUPON_COLUMNS: &str = "c.id, c.name, c.discount, c.total_quantity, c.issued_quantity, \
     c.issue_starts_at, c.issue_ends_at, c.valid_for_days, c.created_at";

/// A coupons row as read: id, name, discount, total_quantity, issued_quantity,
/// issue_starts_at, issue_ends_at, valid_for_days, created_at.
type CouponRow = (
    i64,
    String,
    i64,
    i64,
    i64,
    NaiveDateTime,
    Option<NaiveDateTime>,
    i64,
    NaiveDateTime,
);

/// The columns of a user coupon, in [`UserCouponRow`]'s order.
const USER_COUPON_COLUMNS: &str = "id, coupon_id, user_id, discount, payment_id, issued_at, \
     expires_at, idempotency_key";

/// A user_coupons row as read: id, coupon_id, user_id, discount, payment_id, issued_at,
/// expires_at, idempotency_key.
type UserCouponRow = (
    i64,
    i64,
    i64,
    i64,
    Option<i64>,
    NaiveDateTime,
    NaiveDateTime,
    String,
);

/// A gate snapshot's row: the coupon, and one of its holders (none when it has none).
type SnapshotRow = (
    i64,
    String,
    i64,
    i64,
    i64,
    NaiveDateTime,
    Option<NaiveDateTime>,
    i64,
    NaiveDateTime,
    Option<i64>,
    Option<String>,
);

fn coupon(row: CouponRow) -> anyhow::Result<Coupon> {
    let (id, name, discount, total, issued, starts, ends, days, created) = row;
    Ok(Coupon {
        id: coupon_id(id)?,
        name: CouponName::from_stored(name),
        discount: Amount::from_stored(discount),
        total_quantity: quantity_from_db(total, "total quantity")?,
        issued_quantity: quantity_from_db(issued, "issued quantity")?,
        issue_starts_at: from_db_time(starts),
        issue_ends_at: ends.map(from_db_time),
        valid_for_days: quantity_from_db(days, "validity in days")?,
        created_at: from_db_time(created),
    })
}

fn user_coupon(row: UserCouponRow) -> anyhow::Result<UserCoupon> {
    let (id, coupon, user, discount, payment, issued_at, expires_at, key) = row;
    Ok(UserCoupon {
        id: user_coupon_id(id)?,
        coupon_id: coupon_id(coupon)?,
        user_id: user_id(user)?,
        discount: Amount::from_stored(discount),
        payment: payment.map(payment_id).transpose()?,
        issued_at: from_db_time(issued_at),
        expires_at: from_db_time(expires_at),
        idempotency_key: idempotency_key(&key)?,
    })
}

#[async_trait]
impl CouponRepo for MySqlStore {
    async fn create_coupon(&self, new: NewCoupon, now: DateTime<Utc>) -> Result<Coupon, RepoError> {
        let created_at = to_db_time(now);
        // Either end of the window may be far off: past `datetime`'s range, it is stored as
        // the column's last instant (the window reads the same).
        let starts = to_db_expiry(new.issue_starts_at);
        let ends = new.issue_ends_at.map(to_db_expiry);
        let done = sqlx::query(
            "insert into coupons \
             (name, discount, total_quantity, issued_quantity, issue_starts_at, issue_ends_at, \
              valid_for_days, created_at) \
             values (?, ?, ?, 0, ?, ?, ?, ?)",
        )
        .bind(new.name.as_str())
        .bind(new.discount.get())
        .bind(new.total_quantity)
        .bind(starts)
        .bind(ends)
        .bind(new.valid_for_days)
        .bind(created_at)
        .execute(&self.pool)
        .await
        .map_err(repo)?;
        // What a read gives back: the instants as stored (milliseconds).
        Ok(Coupon {
            id: coupon_id(done.last_insert_id())?,
            name: new.name,
            discount: new.discount,
            total_quantity: new.total_quantity,
            issued_quantity: 0,
            issue_starts_at: from_db_time(starts),
            issue_ends_at: ends.map(from_db_time),
            valid_for_days: new.valid_for_days,
            created_at: from_db_time(created_at),
        })
    }

    async fn get_coupon(&self, id: CouponId) -> Result<Option<Coupon>, RepoError> {
        let row: Option<CouponRow> = read_retrying!(&self.pool, |db| {
            sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "select {COUPON_COLUMNS} from coupons c where c.id = ?"
            )))
            .bind(id.get())
            .fetch_optional(db)
        })
        .map_err(repo)?;
        Ok(row.map(coupon).transpose()?)
    }

    async fn get_user_coupon(&self, id: UserCouponId) -> Result<Option<UserCoupon>, RepoError> {
        let row: Option<UserCouponRow> = read_retrying!(&self.pool, |db| {
            sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "select {USER_COUPON_COLUMNS} from user_coupons where id = ?"
            )))
            .bind(id.get())
            .fetch_optional(db)
        })
        .map_err(repo)?;
        Ok(row.map(user_coupon).transpose()?)
    }

    async fn holding(
        &self,
        coupon: CouponId,
        user: UserId,
    ) -> Result<Option<UserCoupon>, RepoError> {
        // One seek on the unique (coupon_id, user_id).
        let row: Option<UserCouponRow> = read_retrying!(&self.pool, |db| {
            sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "select {USER_COUPON_COLUMNS} from user_coupons where coupon_id = ? and user_id = ?"
            )))
            .bind(coupon.get())
            .bind(user.get())
            .fetch_optional(db)
        })
        .map_err(repo)?;
        Ok(row.map(user_coupon).transpose()?)
    }

    async fn user_coupons(&self, user: UserId, limit: u32) -> Result<Vec<UserCoupon>, RepoError> {
        // Newest first from the (user_id, id) index, without a sort.
        let rows: Vec<UserCouponRow> = read_retrying!(&self.pool, |db| {
            sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "select {USER_COUPON_COLUMNS} from user_coupons where user_id = ? \
                 order by id desc limit ?"
            )))
            .bind(user.get())
            .bind(i64::from(limit))
            .fetch_all(db)
        })
        .map_err(repo)?;
        Ok(rows
            .into_iter()
            .map(user_coupon)
            .collect::<anyhow::Result<Vec<_>>>()?)
    }

    async fn coupon_ids(
        &self,
        after: Option<CouponId>,
        limit: u32,
    ) -> Result<Vec<CouponId>, RepoError> {
        let after = after.map_or(0, CouponId::get);
        let rows: Vec<(i64,)> = read_retrying!(&self.pool, |db| {
            sqlx::query_as("select id from coupons where id > ? order by id limit ?")
                .bind(after)
                .bind(i64::from(limit))
                .fetch_all(db)
        })
        .map_err(repo)?;
        Ok(rows
            .into_iter()
            .map(|(id,)| CouponId::new(id).map_err(|e| anyhow::anyhow!("a stored coupon id: {e}")))
            .collect::<anyhow::Result<Vec<_>>>()?)
    }

    async fn gate_snapshot(&self, id: CouponId) -> Result<Option<GateSnapshot>, RepoError> {
        // One statement, so one consistent read whatever the isolation level: an issue
        // writes its user coupon and the count in one transaction, so the count and the
        // holders read here always agree. The holders come from the unique
        // (coupon_id, user_id), in user order.
        let rows: Vec<SnapshotRow> = read_retrying!(&self.pool, |db| {
            sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "select {COUPON_COLUMNS}, u.user_id, u.idempotency_key \
                 from coupons c left join user_coupons u on u.coupon_id = c.id \
                 where c.id = ? order by u.user_id"
            )))
            .bind(id.get())
            .fetch_all(db)
        })
        .map_err(repo)?;
        let Some(first) = rows.first() else {
            return Ok(None);
        };
        let (id, name, discount, total, issued, starts, ends, days, created, ..) = first.clone();
        let coupon = coupon((
            id, name, discount, total, issued, starts, ends, days, created,
        ))?;
        let holders = rows
            .into_iter()
            .filter_map(|row| match (row.9, row.10) {
                (Some(user), Some(key)) => Some((user, key)),
                _ => None,
            })
            .map(|(user, key)| Ok((user_id(user)?, idempotency_key(&key)?)))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Some(GateSnapshot { coupon, holders }))
    }
}
