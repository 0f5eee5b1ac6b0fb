//! [`Corrupt`]: the one thing the `Auditor` suites need beyond the ports. The books a
//! port writes are right by construction, so to prove that the audit finds a breach a
//! suite must write a wrong row itself: each adapter says how (MySQL with raw SQL on its
//! tables, the in-memory store through its `tamper` test feature), and the suites say
//! what, once for both.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use domain::idempotency::RecordOutcome;
use domain::model::{EntryKind, OrderStatus, UserCoupon};
use domain::types::{
    Amount, CouponId, EntryId, IdempotencyKey, OrderId, PaymentId, UserCouponId, UserId,
};
use memory::MemoryStore;
use mysql_repo::MySqlStore;
use sqlx::{AssertSqlSafe, MySqlPool};

/// A ledger entry no step wrote.
#[derive(Debug, Clone)]
pub struct ForgedEntry {
    pub user: UserId,
    pub kind: EntryKind,
    pub amount: i64,
    pub balance_after: i64,
    pub key: Option<IdempotencyKey>,
    pub at: DateTime<Utc>,
}

/// A user coupon no step wrote.
#[derive(Debug, Clone)]
pub struct ForgedUserCoupon {
    pub coupon: CouponId,
    pub user: UserId,
    pub discount: i64,
    pub payment: Option<PaymentId>,
    pub issued_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub key: IdempotencyKey,
}

/// Writes that no port makes, each changing exactly the one thing it names (and nothing
/// the audit would see besides). A subject that does not exist fails the test: the suite
/// that names it is wrong.
#[async_trait]
pub trait Corrupt: Send + Sync {
    /// Sets `user`'s balance; its ledger stays.
    async fn set_balance(&self, user: UserId, balance: i64);
    /// Deletes `user`'s row; its ledger stays.
    async fn delete_user(&self, user: UserId);
    /// Appends `entry` to the ledger with the next id (and no record expiry kept for it,
    /// so the audit judges its key by the retention it is given); returns the id.
    async fn insert_entry(&self, entry: ForgedEntry) -> EntryId;
    /// Deletes ledger entry `id`.
    async fn delete_entry(&self, id: EntryId);
    /// Adds `by` to ledger entry `id`'s `balance_after`.
    async fn shift_balance_after(&self, id: EntryId, by: i64);
    /// Moves ledger entry `id` by `by` in time.
    async fn shift_entry_time(&self, id: EntryId, by: chrono::Duration);
    /// Rewrites what the record of (`user`, `key`) says happened.
    async fn set_record_outcome(&self, user: UserId, key: &str, outcome: RecordOutcome);
    /// Rewrites the HTTP status stored in the record of (`user`, `key`).
    async fn set_record_status(&self, user: UserId, key: &str, status: u16);
    /// Sets order `id`'s status; its payment stays.
    async fn set_order_status(&self, id: OrderId, status: OrderStatus);
    /// Deletes payment `id`; its order and its ledger entry stay.
    async fn delete_payment(&self, id: PaymentId);
    /// Sets payment `id`'s refunded total; its refunds stay.
    async fn set_refunded_total(&self, id: PaymentId, total: i64);
    /// Sets coupon `id`'s issued count; its user coupons stay.
    async fn set_issued_quantity(&self, id: CouponId, issued: u32);
    /// Deletes user coupon `id`; its coupon's count, its record and a payment naming it
    /// stay.
    async fn delete_user_coupon(&self, id: UserCouponId);
    /// Adds `coupon` with the next id; its coupon's count stays. Returns the id.
    async fn insert_user_coupon(&self, coupon: ForgedUserCoupon) -> UserCouponId;
    /// Sets the payment user coupon `id` is used by (`None`: free); every payment stays.
    async fn set_user_coupon_payment(&self, id: UserCouponId, payment: Option<PaymentId>);
}

/// Fails the test when `found` is false: the corruption named a row that is not there.
fn found(found: bool, what: &str) {
    assert!(found, "nothing to corrupt: {what} does not exist");
}

#[async_trait]
impl Corrupt for MemoryStore {
    async fn set_balance(&self, user: UserId, balance: i64) {
        found(
            self.tamper().set_balance(user, balance),
            &format!("user {user}"),
        );
    }

    async fn delete_user(&self, user: UserId) {
        found(self.tamper().delete_user(user), &format!("user {user}"));
    }

    async fn insert_entry(&self, entry: ForgedEntry) -> EntryId {
        let ForgedEntry {
            user,
            kind,
            amount,
            balance_after,
            key,
            at,
        } = entry;
        self.tamper()
            .insert_entry(user, kind, amount, balance_after, key, at)
            .expect("an entry id is left")
    }

    async fn delete_entry(&self, id: EntryId) {
        found(
            self.tamper().delete_entry(id),
            &format!("ledger entry {id}"),
        );
    }

    async fn shift_balance_after(&self, id: EntryId, by: i64) {
        found(
            self.tamper().shift_balance_after(id, by),
            &format!("ledger entry {id}"),
        );
    }

    async fn shift_entry_time(&self, id: EntryId, by: chrono::Duration) {
        found(
            self.tamper().shift_entry_time(id, by),
            &format!("ledger entry {id}"),
        );
    }

    async fn set_record_outcome(&self, user: UserId, key: &str, outcome: RecordOutcome) {
        found(
            self.tamper().set_record_outcome(user, key, outcome),
            &format!("the record of user {user} key {key}"),
        );
    }

    async fn set_record_status(&self, user: UserId, key: &str, status: u16) {
        found(
            self.tamper().set_record_status(user, key, status),
            &format!("the record of user {user} key {key}"),
        );
    }

    async fn set_order_status(&self, id: OrderId, status: OrderStatus) {
        found(
            self.tamper().set_order_status(id, status),
            &format!("order {id}"),
        );
    }

    async fn delete_payment(&self, id: PaymentId) {
        found(self.tamper().delete_payment(id), &format!("payment {id}"));
    }

    async fn set_refunded_total(&self, id: PaymentId, total: i64) {
        found(
            self.tamper().set_refunded_total(id, total),
            &format!("payment {id}"),
        );
    }

    async fn set_issued_quantity(&self, id: CouponId, issued: u32) {
        found(
            self.tamper().set_issued_quantity(id, issued),
            &format!("coupon {id}"),
        );
    }

    async fn delete_user_coupon(&self, id: UserCouponId) {
        found(
            self.tamper().delete_user_coupon(id),
            &format!("user coupon {id}"),
        );
    }

    async fn insert_user_coupon(&self, coupon: ForgedUserCoupon) -> UserCouponId {
        let ForgedUserCoupon {
            coupon,
            user,
            discount,
            payment,
            issued_at,
            expires_at,
            key,
        } = coupon;
        self.tamper()
            .insert_user_coupon(UserCoupon {
                // The store gives it the next id.
                id: UserCouponId::new(1).expect("a positive id"),
                coupon_id: coupon,
                user_id: user,
                discount: Amount::from_stored(discount),
                payment,
                issued_at,
                expires_at,
                idempotency_key: key,
            })
            .expect("a user coupon id is left")
    }

    async fn set_user_coupon_payment(&self, id: UserCouponId, payment: Option<PaymentId>) {
        found(
            self.tamper().set_user_coupon_payment(id, payment),
            &format!("user coupon {id}"),
        );
    }
}

/// Runs one statement with `binds` (integers or strings) and fails the test unless it
/// changed exactly one row.
async fn one_row(pool: &MySqlPool, sql: &str, binds: &[Bind<'_>], what: &str) {
    let mut query = sqlx::query(AssertSqlSafe(sql.to_owned()));
    for bind in binds {
        query = match bind {
            Bind::Int(n) => query.bind(*n),
            Bind::Str(s) => query.bind(s.to_owned()),
        };
    }
    let changed = query
        .execute(pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .rows_affected();
    assert_eq!(
        changed, 1,
        "{sql}: nothing to corrupt: {what} does not exist"
    );
}

/// A value for [`one_row`] to bind.
enum Bind<'a> {
    Int(i64),
    Str(&'a str),
}

#[async_trait]
impl Corrupt for MySqlStore {
    async fn set_balance(&self, user: UserId, balance: i64) {
        one_row(
            self.pool(),
            "update users set balance = ? where id = ?",
            &[Bind::Int(balance), Bind::Int(user.get())],
            &format!("user {user}"),
        )
        .await;
    }

    async fn delete_user(&self, user: UserId) {
        one_row(
            self.pool(),
            "delete from users where id = ?",
            &[Bind::Int(user.get())],
            &format!("user {user}"),
        )
        .await;
    }

    async fn insert_entry(&self, entry: ForgedEntry) -> EntryId {
        let done = sqlx::query(
            "insert into ledger_entries \
             (user_id, kind, amount, balance_after, idempotency_key, created_at) \
             values (?, ?, ?, ?, ?, ?)",
        )
        .bind(entry.user.get())
        .bind(entry.kind.as_str())
        .bind(entry.amount)
        .bind(entry.balance_after)
        .bind(entry.key.as_ref().map(IdempotencyKey::as_str))
        .bind(entry.at.naive_utc())
        .execute(self.pool())
        .await
        .unwrap_or_else(|e| panic!("inserting {entry:?}: {e}"));
        let id = i64::try_from(done.last_insert_id()).expect("an id in range");
        EntryId::new(id).expect("a positive entry id")
    }

    async fn delete_entry(&self, id: EntryId) {
        one_row(
            self.pool(),
            "delete from ledger_entries where id = ?",
            &[Bind::Int(id.get())],
            &format!("ledger entry {id}"),
        )
        .await;
    }

    async fn shift_balance_after(&self, id: EntryId, by: i64) {
        one_row(
            self.pool(),
            "update ledger_entries set balance_after = balance_after + ? where id = ?",
            &[Bind::Int(by), Bind::Int(id.get())],
            &format!("ledger entry {id}"),
        )
        .await;
    }

    async fn shift_entry_time(&self, id: EntryId, by: chrono::Duration) {
        let micros = by
            .num_microseconds()
            .expect("a shift of less than 290 000 years");
        one_row(
            self.pool(),
            "update ledger_entries set created_at = created_at + interval ? microsecond \
             where id = ?",
            &[Bind::Int(micros), Bind::Int(id.get())],
            &format!("ledger entry {id}"),
        )
        .await;
    }

    async fn set_record_outcome(&self, user: UserId, key: &str, outcome: RecordOutcome) {
        one_row(
            self.pool(),
            "update idempotency_records set outcome = ? where user_id = ? and idempotency_key = ?",
            &[
                Bind::Str(outcome.as_str()),
                Bind::Int(user.get()),
                Bind::Str(key),
            ],
            &format!("the record of user {user} key {key}"),
        )
        .await;
    }

    async fn set_record_status(&self, user: UserId, key: &str, status: u16) {
        one_row(
            self.pool(),
            "update idempotency_records set response_status = ? \
             where user_id = ? and idempotency_key = ?",
            &[
                Bind::Int(i64::from(status)),
                Bind::Int(user.get()),
                Bind::Str(key),
            ],
            &format!("the record of user {user} key {key}"),
        )
        .await;
    }

    async fn set_order_status(&self, id: OrderId, status: OrderStatus) {
        // `paid_at` follows the status, as the step writes it.
        one_row(
            self.pool(),
            "update orders set status = ?, \
             paid_at = case when ? = 'PAID' then coalesce(paid_at, created_at) end \
             where id = ?",
            &[
                Bind::Str(status.as_str()),
                Bind::Str(status.as_str()),
                Bind::Int(id.get()),
            ],
            &format!("order {id}"),
        )
        .await;
    }

    async fn delete_payment(&self, id: PaymentId) {
        one_row(
            self.pool(),
            "delete from payments where id = ?",
            &[Bind::Int(id.get())],
            &format!("payment {id}"),
        )
        .await;
    }

    async fn set_refunded_total(&self, id: PaymentId, total: i64) {
        one_row(
            self.pool(),
            "update payments set refunded_total = ? where id = ?",
            &[Bind::Int(total), Bind::Int(id.get())],
            &format!("payment {id}"),
        )
        .await;
    }

    async fn set_issued_quantity(&self, id: CouponId, issued: u32) {
        one_row(
            self.pool(),
            "update coupons set issued_quantity = ? where id = ?",
            &[Bind::Int(i64::from(issued)), Bind::Int(id.get())],
            &format!("coupon {id}"),
        )
        .await;
    }

    async fn delete_user_coupon(&self, id: UserCouponId) {
        one_row(
            self.pool(),
            "delete from user_coupons where id = ?",
            &[Bind::Int(id.get())],
            &format!("user coupon {id}"),
        )
        .await;
    }

    async fn insert_user_coupon(&self, coupon: ForgedUserCoupon) -> UserCouponId {
        let done = sqlx::query(
            "insert into user_coupons \
             (coupon_id, user_id, discount, payment_id, issued_at, expires_at, idempotency_key) \
             values (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(coupon.coupon.get())
        .bind(coupon.user.get())
        .bind(coupon.discount)
        .bind(coupon.payment.map(PaymentId::get))
        .bind(coupon.issued_at.naive_utc())
        .bind(coupon.expires_at.naive_utc())
        .bind(coupon.key.as_str())
        .execute(self.pool())
        .await
        .unwrap_or_else(|e| panic!("inserting {coupon:?}: {e}"));
        let id = i64::try_from(done.last_insert_id()).expect("an id in range");
        UserCouponId::new(id).expect("a positive user coupon id")
    }

    async fn set_user_coupon_payment(&self, id: UserCouponId, payment: Option<PaymentId>) {
        let changed = sqlx::query("update user_coupons set payment_id = ? where id = ?")
            .bind(payment.map(PaymentId::get))
            .bind(id.get())
            .execute(self.pool())
            .await
            .unwrap_or_else(|e| panic!("setting user coupon {id}'s payment: {e}"))
            .rows_affected();
        assert_eq!(
            changed, 1,
            "nothing to corrupt: user coupon {id} does not exist"
        );
    }
}
