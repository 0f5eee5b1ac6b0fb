//! The database baseline of issuing a coupon: the write of one issue, sent straight to
//! MySQL/MariaDB by N connections at once on ONE coupon row, so the rush benchmark can
//! report the service's issuing next to what the database alone does with the same write
//! on the same machine.
//!
//! The statements are the adapter's own text ([`mysql_repo::sql`], migration 0009). One
//! issue ([`Step::Bare`], the write itself): `BEGIN`; the user coupon's row
//! ([`sql::INSERT_USER_COUPON`], unique per coupon and user); the guarded count
//! ([`sql::COUNT_ISSUED`]: it only rises below the stock); `COMMIT`. [`Step::Service`] is
//! the MySQL adapter's whole step: the user's row read first ([`sql::SELECT_USER`]), then
//! `BEGIN`; its version moved on ([`sql::BUMP_VERSION`]); the user coupon; the key's stored
//! answer ([`sql::INSERT_KEY_RECORD`]); the guarded count; `COMMIT`. [`Order`] says where the count goes: last (the adapter's choice: the coupon's
//! row lock, which every concurrent issue queues on, is held only from that update to the
//! commit) or first (held over every other statement of the step).
//!
//! Every issue is for a different user of the same coupon, as in a rush: issue `n` goes to
//! user `n % users + 1` of coupon number `n / users` (a fresh coupon, created when the
//! first issue of it comes, once the previous one has had every user). With `stock` below
//! `users` the issues past the stock find the guard closed: the count matches nothing and
//! the transaction is rolled back, a sold-out refusal answered by the database (counted
//! apart, with its own latency). At the end the books of every coupon used are read back
//! (`issued_quantity` = its rows ≤ its stock) and, unless `keep`, its rows deleted.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use chrono::{NaiveDateTime, SubsecRound, TimeDelta, Utc};
use hdrhistogram::Histogram;
use mysql_repo::sql;
use serde::Serialize;
use sqlx::mysql::MySqlDatabaseError;
use sqlx::{MySqlConnection, MySqlPool};
use tokio::sync::Mutex;

use crate::Latency;

/// A coupon of the baseline's own, open now. Binds: name, discount, total_quantity,
/// issue_starts_at, created_at.
pub const INSERT_COUPON: &str = "insert into coupons \
     (name, discount, total_quantity, issued_quantity, issue_starts_at, issue_ends_at, \
      valid_for_days, created_at) \
     values (?, ?, ?, 0, ?, null, 30, ?)";

/// The discount of the baseline's coupons.
pub const DISCOUNT: i64 = 5_000;

/// What one issue writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Step {
    /// The user coupon and the guarded count, committed.
    Bare,
    /// The adapter's whole step: also the user's read, its version moved on and the key's
    /// record.
    Service,
}

/// Where the guarded count goes in the transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Order {
    /// Last, as the adapter does: the coupon's row lock is taken just before the commit.
    CountLast,
    /// First: the row lock is held over every other write of the step.
    CountFirst,
}

/// One run's parameters.
#[derive(Debug, Clone)]
pub struct CouponPlan {
    pub connections: u32,
    pub duration: Duration,
    pub warmup: Duration,
    /// Users 1..=users, each issued once per coupon.
    pub users: u64,
    /// Each coupon's stock (`total_quantity`).
    pub stock: i64,
    pub step: Step,
    pub order: Order,
    /// Re-runs of an issue after a deadlock, a lock-wait timeout or a version conflict.
    pub max_retries: u32,
    /// Leave the coupons, user coupons and key records in the database.
    pub keep: bool,
}

/// The figures of one run.
#[derive(Debug, Clone, Serialize)]
pub struct CouponReport {
    pub mode: &'static str,
    pub step: Step,
    pub order: Order,
    pub connections: u32,
    pub users: u64,
    pub stock: i64,
    /// From the end of the warm-up to the end of the last measured issue.
    pub duration_s: f64,
    /// Issues committed (a unit taken and a user coupon written).
    pub committed: u64,
    pub throughput_tps: f64,
    /// Per committed issue, from BEGIN (or the user's read) to COMMIT, retries included.
    pub latency_ms: Latency,
    /// Issues the guard refused (sold out: the update matched nothing), rolled back.
    pub refused: u64,
    pub refused_latency_ms: Option<Latency>,
    /// Deadlocks, lock-wait timeouts and version conflicts, each retried.
    pub conflicts: u64,
    /// Issues that ran out of retries.
    pub exhausted: u64,
    /// Any other failure.
    pub errors: u64,
    pub first_error: Option<String>,
    /// Coupons the run went through.
    pub coupons: usize,
    /// Every coupon: `issued_quantity` = its user coupons ≤ its stock.
    pub books_exact: bool,
    pub books: Vec<CouponBooks>,
}

/// One coupon's books after the run.
#[derive(Debug, Clone, Serialize)]
pub struct CouponBooks {
    pub coupon: i64,
    pub total_quantity: i64,
    pub issued_quantity: i64,
    pub rows: i64,
}

impl CouponReport {
    /// A header and one row, for people.
    pub fn table(&self) -> String {
        let l = &self.latency_ms;
        format!(
            "coupon baseline: step={:?} order={:?} connections={} users={} stock={} measured={:.1}s coupons={} books_exact={}\n\
             {:>9} {:>7} {:>7} {:>7} {:>7} {:>7} {:>8} {:>9} {:>8} {:>9} {:>9} {:>6}\n\
             {:>9.1} {:>7.2} {:>7.2} {:>7.2} {:>7.2} {:>7.2} {:>8.2} {:>9} {:>8} {:>9} {:>9} {:>6}\n",
            self.step,
            self.order,
            self.connections,
            self.users,
            self.stock,
            self.duration_s,
            self.coupons,
            self.books_exact,
            "issues/s",
            "avg ms",
            "p50",
            "p90",
            "p95",
            "p99",
            "max",
            "committed",
            "refused",
            "conflicts",
            "exhausted",
            "errors",
            self.throughput_tps,
            l.avg,
            l.p50,
            l.p90,
            l.p95,
            l.p99,
            l.max,
            self.committed,
            self.refused,
            self.conflicts,
            self.exhausted,
            self.errors,
        )
    }
}

/// The coupons of the run, created one after the other as the issues reach them.
struct Coupons {
    ids: Mutex<Vec<i64>>,
    stock: i64,
}

impl Coupons {
    /// The id of the run's coupon number `round`, creating the coupons up to it.
    async fn get(&self, pool: &MySqlPool, round: usize) -> Result<i64, sqlx::Error> {
        let mut ids = self.ids.lock().await;
        while ids.len() <= round {
            let now = Utc::now().trunc_subsecs(3).naive_utc();
            let created = sqlx::query(INSERT_COUPON)
                .bind(format!(
                    "baseline-{}-{}",
                    now.and_utc().timestamp(),
                    ids.len()
                ))
                .bind(DISCOUNT)
                .bind(self.stock)
                .bind(now - TimeDelta::seconds(1))
                .bind(now)
                .execute(pool)
                .await?;
            ids.push(
                i64::try_from(created.last_insert_id())
                    .map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
            );
        }
        Ok(ids[round])
    }
}

/// Runs `plan` on `pool`: N tasks issuing until the deadline; issues started during the
/// warm-up are not counted. Then the books, and the clean-up.
///
/// # Errors
/// When the first coupon cannot be created (no migration 0009?), the latency histogram
/// cannot be built, a task panicked, or the books cannot be read.
pub async fn run(pool: MySqlPool, plan: CouponPlan) -> anyhow::Result<CouponReport> {
    anyhow::ensure!(
        plan.users >= 1 && plan.stock >= 1,
        "--users and --stock must be at least 1"
    );
    let connections = plan.connections.max(1);
    let coupons = Arc::new(Coupons {
        ids: Mutex::new(Vec::new()),
        stock: plan.stock,
    });
    coupons.get(&pool, 0).await.context(
        "creating the baseline's first coupon (is the database migrated to 0009_coupons?)",
    )?;
    let run_id = uuid::Uuid::new_v4().simple().to_string();
    let plan = Arc::new(plan);
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let measure_from = start + plan.warmup;
    let until = measure_from + plan.duration;
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let ctx = Worker {
            pool: pool.clone(),
            plan: Arc::clone(&plan),
            next: Arc::clone(&next),
            coupons: Arc::clone(&coupons),
            run_id: run_id.clone(),
        };
        tasks.push(tokio::spawn(
            async move { ctx.work(measure_from, until).await },
        ));
    }
    let mut total = Tally::new()?;
    for task in tasks {
        total.merge(task.await.context("a load task failed")??)?;
    }
    let ids = coupons.ids.lock().await.clone();
    let books = read_books(&pool, &ids).await?;
    if !plan.keep {
        clean_up(&pool, &ids, &run_id).await?;
    }
    pool.close().await;

    let ended = total.last_end.unwrap_or(until);
    let duration_s = ended.saturating_duration_since(measure_from).as_secs_f64();
    Ok(CouponReport {
        mode: "coupon",
        step: plan.step,
        order: plan.order,
        connections,
        users: plan.users,
        stock: plan.stock,
        duration_s,
        committed: total.committed,
        throughput_tps: if duration_s > 0.0 {
            total.committed as f64 / duration_s
        } else {
            0.0
        },
        latency_ms: latency(&total.latency_us),
        refused: total.refused,
        refused_latency_ms: (total.refused > 0).then(|| latency(&total.refused_us)),
        conflicts: total.conflicts,
        exhausted: total.exhausted,
        errors: total.errors,
        first_error: total.first_error,
        coupons: ids.len(),
        books_exact: books
            .iter()
            .all(|b| b.issued_quantity == b.rows && b.rows <= b.total_quantity),
        books,
    })
}

fn latency(h: &Histogram<u64>) -> Latency {
    let ms = |us: u64| us as f64 / 1000.0;
    Latency {
        avg: h.mean() / 1000.0,
        p50: ms(h.value_at_quantile(0.50)),
        p90: ms(h.value_at_quantile(0.90)),
        p95: ms(h.value_at_quantile(0.95)),
        p99: ms(h.value_at_quantile(0.99)),
        max: ms(h.max()),
    }
}

async fn read_books(pool: &MySqlPool, ids: &[i64]) -> anyhow::Result<Vec<CouponBooks>> {
    let mut books = Vec::with_capacity(ids.len());
    for &id in ids {
        let (total_quantity, issued_quantity, rows): (i64, i64, i64) = sqlx::query_as(
            "select c.total_quantity, c.issued_quantity, \
             (select count(*) from user_coupons u where u.coupon_id = c.id) \
             from coupons c where c.id = ?",
        )
        .bind(id)
        .fetch_one(pool)
        .await
        .with_context(|| format!("reading the books of coupon {id}"))?;
        books.push(CouponBooks {
            coupon: id,
            total_quantity,
            issued_quantity,
            rows,
        });
    }
    Ok(books)
}

/// Deletes what the run wrote (the users' versions moved on stay: they mean nothing).
async fn clean_up(pool: &MySqlPool, ids: &[i64], run_id: &str) -> anyhow::Result<()> {
    for &id in ids {
        sqlx::query("delete from user_coupons where coupon_id = ?")
            .bind(id)
            .execute(pool)
            .await?;
        sqlx::query("delete from coupons where id = ?")
            .bind(id)
            .execute(pool)
            .await?;
    }
    sqlx::query("delete from idempotency_records where idempotency_key like ?")
        .bind(format!("cb-{run_id}-%"))
        .execute(pool)
        .await
        .context("deleting the baseline's key records")?;
    Ok(())
}

/// One task's counts.
struct Tally {
    latency_us: Histogram<u64>,
    refused_us: Histogram<u64>,
    committed: u64,
    refused: u64,
    conflicts: u64,
    exhausted: u64,
    errors: u64,
    first_error: Option<String>,
    last_end: Option<Instant>,
}

impl Tally {
    fn new() -> anyhow::Result<Self> {
        Ok(Self {
            // 1 µs to 10 min, three significant digits.
            latency_us: Histogram::new_with_bounds(1, 600_000_000, 3)?,
            refused_us: Histogram::new_with_bounds(1, 600_000_000, 3)?,
            committed: 0,
            refused: 0,
            conflicts: 0,
            exhausted: 0,
            errors: 0,
            first_error: None,
            last_end: None,
        })
    }

    fn merge(&mut self, other: Self) -> anyhow::Result<()> {
        self.latency_us.add(&other.latency_us)?;
        self.refused_us.add(&other.refused_us)?;
        self.committed += other.committed;
        self.refused += other.refused;
        self.conflicts += other.conflicts;
        self.exhausted += other.exhausted;
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        self.last_end = self.last_end.max(other.last_end);
        Ok(())
    }
}

/// How one attempt ended.
enum Attempt {
    Issued,
    SoldOut,
    /// Lost a race that a re-run settles (deadlock, lock-wait timeout, version moved).
    Conflict,
}

/// How one issue ended.
enum Issue {
    Issued,
    SoldOut,
    Exhausted,
}

struct Worker {
    pool: MySqlPool,
    plan: Arc<CouponPlan>,
    next: Arc<AtomicU64>,
    coupons: Arc<Coupons>,
    run_id: String,
}

impl Worker {
    async fn work(self, measure_from: Instant, until: Instant) -> anyhow::Result<Tally> {
        let mut tally = Tally::new()?;
        loop {
            let started = Instant::now();
            if started >= until {
                return Ok(tally);
            }
            let n = self.next.fetch_add(1, Ordering::Relaxed);
            let round = usize::try_from(n / self.plan.users)?;
            let user = i64::try_from(n % self.plan.users + 1)?;
            let mut conflicts = 0;
            let outcome = match self.coupons.get(&self.pool, round).await {
                Ok(coupon) => self.issue(coupon, user, n, &mut conflicts).await,
                Err(e) => Err(e),
            };
            let ended = Instant::now();
            if started < measure_from {
                continue;
            }
            tally.last_end = Some(ended);
            tally.conflicts += conflicts;
            let us = u64::try_from(ended.duration_since(started).as_micros())?.max(1);
            match outcome {
                Ok(Issue::Issued) => {
                    tally.committed += 1;
                    tally.latency_us.saturating_record(us);
                }
                Ok(Issue::SoldOut) => {
                    tally.refused += 1;
                    tally.refused_us.saturating_record(us);
                }
                Ok(Issue::Exhausted) => tally.exhausted += 1,
                Err(e) => {
                    tally.errors += 1;
                    if tally.first_error.is_none() {
                        tally.first_error = Some(e.to_string());
                    }
                }
            }
        }
    }

    /// One issue of `coupon` to `user` under a fresh key, re-run after a lost race.
    async fn issue(
        &self,
        coupon: i64,
        user: i64,
        n: u64,
        conflicts: &mut u64,
    ) -> Result<Issue, sqlx::Error> {
        let key = format!("cb-{}-{n}", self.run_id);
        for _ in 0..=self.plan.max_retries {
            match self.attempt(coupon, user, &key).await {
                Ok(Attempt::Issued) => return Ok(Issue::Issued),
                Ok(Attempt::SoldOut) => return Ok(Issue::SoldOut),
                Ok(Attempt::Conflict) => *conflicts += 1,
                Err(e) if is_lock_conflict(&e) => *conflicts += 1,
                Err(e) => return Err(e),
            }
        }
        Ok(Issue::Exhausted)
    }

    async fn attempt(&self, coupon: i64, user: i64, key: &str) -> Result<Attempt, sqlx::Error> {
        let read = match self.plan.step {
            Step::Bare => None,
            Step::Service => {
                let row: Option<(i64, i64, NaiveDateTime)> = sqlx::query_as(sql::SELECT_USER)
                    .bind(user)
                    .fetch_optional(&self.pool)
                    .await?;
                Some(row.ok_or(sqlx::Error::RowNotFound)?)
            }
        };
        let mut tx = self.pool.begin().await?;
        let attempt = self.write(&mut tx, coupon, user, key, read).await;
        match attempt {
            Ok(Attempt::Issued) => {
                tx.commit().await?;
                Ok(Attempt::Issued)
            }
            other => {
                // Rolled back at once so the coupon's row lock goes before the next issue.
                let _ = tx.rollback().await;
                other
            }
        }
    }

    async fn write(
        &self,
        conn: &mut MySqlConnection,
        coupon: i64,
        user: i64,
        key: &str,
        read: Option<(i64, i64, NaiveDateTime)>,
    ) -> Result<Attempt, sqlx::Error> {
        let now = Utc::now().trunc_subsecs(3);
        let at = now.naive_utc();
        if let Some((_, version, _)) = read {
            let moved = sqlx::query(sql::BUMP_VERSION)
                .bind(at)
                .bind(user)
                .bind(version)
                .execute(&mut *conn)
                .await?;
            if moved.rows_affected() == 0 {
                return Ok(Attempt::Conflict);
            }
        }
        if self.plan.order == Order::CountFirst && !take_unit(conn, coupon).await? {
            return Ok(Attempt::SoldOut);
        }
        insert_user_coupon(conn, coupon, user, key, at).await?;
        if read.is_some() {
            sqlx::query(sql::INSERT_KEY_RECORD)
                .bind(user)
                .bind(key)
                .bind(format!("coupon_issue:user={user}:coupon={coupon}"))
                .bind("COUPON_ISSUE")
                .bind("APPLIED")
                .bind(200_u16)
                .bind(response_body(coupon, user, now).into_bytes())
                .bind(at)
                .bind(at + TimeDelta::days(1))
                .execute(&mut *conn)
                .await?;
        }
        if self.plan.order == Order::CountLast && !take_unit(conn, coupon).await? {
            return Ok(Attempt::SoldOut);
        }
        Ok(Attempt::Issued)
    }
}

async fn take_unit(conn: &mut MySqlConnection, coupon: i64) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(sql::COUNT_ISSUED)
        .bind(coupon)
        .execute(&mut *conn)
        .await?;
    Ok(done.rows_affected() == 1)
}

async fn insert_user_coupon(
    conn: &mut MySqlConnection,
    coupon: i64,
    user: i64,
    key: &str,
    at: NaiveDateTime,
) -> Result<(), sqlx::Error> {
    sqlx::query(sql::INSERT_USER_COUPON)
        .bind(coupon)
        .bind(user)
        .bind(DISCOUNT)
        .bind(at)
        .bind(at + TimeDelta::days(30))
        .bind(key)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// The service's 200 body of an issue (about 170 bytes), stored with the key.
fn response_body(coupon: i64, user: i64, at: chrono::DateTime<Utc>) -> String {
    let fmt = "%Y-%m-%dT%H:%M:%S%.3fZ";
    format!(
        r#"{{"userCouponId":0,"couponId":{coupon},"userId":{user},"discount":{DISCOUNT},"status":"AVAILABLE","issuedAt":"{}","expiresAt":"{}"}}"#,
        at.format(fmt),
        (at + TimeDelta::days(30)).format(fmt)
    )
}

/// Deadlock (1213) or lock-wait timeout (1205).
fn is_lock_conflict(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|db| db.try_downcast_ref::<MySqlDatabaseError>())
        .is_some_and(|m| matches!(m.number(), 1205 | 1213))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stored_body_is_shaped_like_the_services() {
        let at = chrono::DateTime::parse_from_rfc3339("2026-11-23T10:00:00.123Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(
            response_body(3, 7, at),
            r#"{"userCouponId":0,"couponId":3,"userId":7,"discount":5000,"status":"AVAILABLE","issuedAt":"2026-11-23T10:00:00.123Z","expiresAt":"2026-12-23T10:00:00.123Z"}"#
        );
    }
}
