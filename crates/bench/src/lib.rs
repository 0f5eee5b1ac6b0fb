//! The database baseline of a charge: the service's own statements (shared with the
//! adapter through [`mysql_repo::sql`]), sent straight to MySQL/MariaDB by N connections,
//! so the service's throughput can be reported as a share of what the database alone does
//! on the same machine.
//!
//! Two ways to serialise a user's charges:
//!
//! - [`Lock::Optimistic`] is the service's transaction without its Redis lock: read the
//!   user, then `BEGIN; UPDATE … WHERE id = ? AND version = ?; INSERT ledger; INSERT key
//!   record; COMMIT`. When the update matches nothing (the version moved) the adapter's
//!   extra read tells a conflict from a missing user, the transaction is rolled back and
//!   the charge re-run from the read, at most `max_retries` times (as the service does).
//! - [`Lock::ForUpdate`] takes the row lock first: `BEGIN; SELECT … FOR UPDATE; UPDATE;
//!   INSERT; INSERT; COMMIT`. It is what the database can do for one hot user when charges
//!   queue on the row instead of racing.

pub mod coupon;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use chrono::{DateTime, NaiveDateTime, SubsecRound, TimeDelta, Utc};
use hdrhistogram::Histogram;
use mysql_repo::sql;
use serde::Serialize;
use sqlx::mysql::{MySqlConnectOptions, MySqlDatabaseError, MySqlPoolOptions};
use sqlx::{MySqlConnection, MySqlPool};

/// [`sql::SELECT_USER`] as a locking read (the for-update baseline only; the service's
/// charge never sends it).
pub const SELECT_USER_FOR_UPDATE: &str =
    "select balance, version, created_at from users where id = ? for update";

/// Which users the charges go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Round robin over users 1..=users (like the load client's spread run).
    Spread,
    /// Every charge on one user.
    Hot,
    /// One connection, one charge at a time, spread: the latency of a single transaction.
    Idle,
}

/// How concurrent charges of one user are kept apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Lock {
    /// The version guard alone, retried from a fresh read on a conflict.
    Optimistic,
    /// `SELECT … FOR UPDATE` inside the transaction.
    ForUpdate,
}

/// One run's parameters.
#[derive(Debug, Clone)]
pub struct Plan {
    pub mode: Mode,
    pub lock: Lock,
    pub connections: u32,
    pub duration: Duration,
    pub warmup: Duration,
    pub users: u64,
    pub hot_user: i64,
    pub amount: i64,
    pub max_retries: u32,
    /// Also send the service's idempotency lookup ([`sql::FIND_KEY`]) before each charge.
    pub key_lookup: bool,
    /// Ping each connection when it is taken from the pool (sqlx's default,
    /// `test_before_acquire`), which the service's pool does not do: one more round trip per
    /// acquire, to measure what it costs.
    pub ping: bool,
}

/// The pool: the service's own builder (`mysql_repo::connect`), or, with `plan.ping`, the
/// same options with sqlx's ping before every acquire.
///
/// # Errors
/// When the URL is not a MySQL URL.
pub async fn pool(url: &str, plan: &Plan) -> anyhow::Result<MySqlPool> {
    if !plan.ping {
        return mysql_repo::connect(url, plan.connections).await;
    }
    let options: MySqlConnectOptions = url.parse().context("invalid MySQL database URL")?;
    Ok(MySqlPoolOptions::new()
        .max_connections(plan.connections.max(1))
        .acquire_timeout(mysql_repo::ACQUIRE_TIMEOUT)
        .test_before_acquire(true)
        .connect_lazy_with(options.timezone(Some("+00:00".to_owned()))))
}

/// The figures of one run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub mode: Mode,
    pub lock: Lock,
    pub connections: u32,
    pub users: u64,
    pub key_lookup: bool,
    pub ping: bool,
    /// From the end of the warm-up to the end of the last measured charge.
    pub duration_s: f64,
    pub committed: u64,
    /// Charges committed during the warm-up (not measured; the process's CPU covers them).
    pub warmup_committed: u64,
    pub throughput_tps: f64,
    /// Per committed charge, from its first read to its commit, retries included.
    pub latency_ms: Latency,
    /// Updates that matched nothing, plus deadlocks and lock-wait timeouts.
    pub conflicts: u64,
    /// Charges that ran out of retries (not committed).
    pub exhausted: u64,
    /// Any other failure (not committed).
    pub errors: u64,
    pub first_error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub avg: f64,
    pub p50: f64,
    pub p90: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

impl Report {
    /// A header and one row, for people.
    pub fn table(&self) -> String {
        let l = &self.latency_ms;
        format!(
            "baseline: mode={:?} lock={:?} connections={} users={} key_lookup={} ping={} measured={:.1}s\n\
             {:>9} {:>7} {:>7} {:>7} {:>7} {:>7} {:>8} {:>9} {:>9} {:>9} {:>6}\n\
             {:>9.1} {:>7.2} {:>7.2} {:>7.2} {:>7.2} {:>7.2} {:>8.2} {:>9} {:>9} {:>9} {:>6}\n",
            self.mode,
            self.lock,
            self.connections,
            self.users,
            self.key_lookup,
            self.ping,
            self.duration_s,
            "tx/s",
            "avg ms",
            "p50",
            "p90",
            "p95",
            "p99",
            "max",
            "committed",
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
            self.conflicts,
            self.exhausted,
            self.errors,
        )
    }
}

/// Runs `plan` on `pool`: N tasks charging until the deadline; charges started during
/// the warm-up are not counted.
///
/// # Errors
/// When the latency histogram cannot be built or a task panicked.
pub async fn run(pool: MySqlPool, plan: Plan) -> anyhow::Result<Report> {
    let connections = if plan.mode == Mode::Idle {
        1
    } else {
        plan.connections.max(1)
    };
    let plan = Arc::new(plan);
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let measure_from = start + plan.warmup;
    let until = measure_from + plan.duration;
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let (pool, plan, next) = (pool.clone(), Arc::clone(&plan), Arc::clone(&next));
        tasks.push(tokio::spawn(async move {
            worker(pool, plan, next, measure_from, until).await
        }));
    }
    let mut total = Tally::new()?;
    for task in tasks {
        total.merge(task.await.context("a load task failed")??)?;
    }
    pool.close().await;

    let ended = total.last_end.unwrap_or(until);
    let duration_s = ended.saturating_duration_since(measure_from).as_secs_f64();
    let ms = |us: u64| us as f64 / 1000.0;
    let h = &total.latency_us;
    Ok(Report {
        mode: plan.mode,
        lock: plan.lock,
        connections,
        users: if plan.mode == Mode::Hot {
            1
        } else {
            plan.users
        },
        key_lookup: plan.key_lookup,
        ping: plan.ping,
        duration_s,
        committed: total.committed,
        warmup_committed: total.warmup_committed,
        throughput_tps: if duration_s > 0.0 {
            total.committed as f64 / duration_s
        } else {
            0.0
        },
        latency_ms: Latency {
            avg: h.mean() / 1000.0,
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p95: ms(h.value_at_quantile(0.95)),
            p99: ms(h.value_at_quantile(0.99)),
            max: ms(h.max()),
        },
        conflicts: total.conflicts,
        exhausted: total.exhausted,
        errors: total.errors,
        first_error: total.first_error,
    })
}

/// One task's counts.
struct Tally {
    latency_us: Histogram<u64>,
    committed: u64,
    warmup_committed: u64,
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
            committed: 0,
            warmup_committed: 0,
            conflicts: 0,
            exhausted: 0,
            errors: 0,
            first_error: None,
            last_end: None,
        })
    }

    fn merge(&mut self, other: Self) -> anyhow::Result<()> {
        self.latency_us.add(&other.latency_us)?;
        self.committed += other.committed;
        self.warmup_committed += other.warmup_committed;
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

async fn worker(
    pool: MySqlPool,
    plan: Arc<Plan>,
    next: Arc<AtomicU64>,
    measure_from: Instant,
    until: Instant,
) -> anyhow::Result<Tally> {
    let mut tally = Tally::new()?;
    loop {
        let started = Instant::now();
        if started >= until {
            return Ok(tally);
        }
        let n = next.fetch_add(1, Ordering::Relaxed);
        let user = match plan.mode {
            Mode::Hot => plan.hot_user,
            Mode::Spread | Mode::Idle => i64::try_from(n % plan.users.max(1) + 1)?,
        };
        let outcome = charge(&pool, &plan, user).await;
        let ended = Instant::now();
        if started < measure_from {
            if let Ok(Charged {
                committed: true, ..
            }) = &outcome
            {
                tally.warmup_committed += 1;
            }
            continue;
        }
        tally.last_end = Some(ended);
        match outcome {
            Ok(Charged {
                committed,
                conflicts,
            }) => {
                tally.conflicts += conflicts;
                if committed {
                    tally.committed += 1;
                    let us = u64::try_from(ended.duration_since(started).as_micros())?;
                    tally.latency_us.saturating_record(us.max(1));
                } else {
                    tally.exhausted += 1;
                }
            }
            Err(e) => {
                tally.errors += 1;
                if tally.first_error.is_none() {
                    tally.first_error = Some(e.to_string());
                }
            }
        }
    }
}

/// How one charge ended.
struct Charged {
    committed: bool,
    conflicts: u64,
}

/// One attempt: committed, or lost a race and rolled back.
enum Attempt {
    Done,
    Conflict,
}

/// One charge of `plan.amount` to `user` under a fresh key, with the service's retries.
async fn charge(pool: &MySqlPool, plan: &Plan, user: i64) -> Result<Charged, sqlx::Error> {
    let key = uuid::Uuid::new_v4().to_string();
    if plan.key_lookup {
        sqlx::query(sql::FIND_KEY)
            .bind(user)
            .bind(key.as_str())
            .bind(Utc::now().trunc_subsecs(3).naive_utc())
            .fetch_optional(pool)
            .await?;
    }
    let mut conflicts = 0;
    for _ in 0..=plan.max_retries {
        let attempt = match plan.lock {
            Lock::Optimistic => optimistic(pool, user, plan.amount, &key).await,
            Lock::ForUpdate => for_update(pool, user, plan.amount, &key).await,
        };
        match attempt {
            Ok(Attempt::Done) => {
                return Ok(Charged {
                    committed: true,
                    conflicts,
                });
            }
            Ok(Attempt::Conflict) => conflicts += 1,
            // The adapter answers deadlocks and lock-wait timeouts as a conflict too.
            Err(e) if is_lock_conflict(&e) => conflicts += 1,
            Err(e) => return Err(e),
        }
    }
    Ok(Charged {
        committed: false,
        conflicts,
    })
}

/// The service's path: a plain read on a pooled connection, then the transaction.
async fn optimistic(
    pool: &MySqlPool,
    user: i64,
    amount: i64,
    key: &str,
) -> Result<Attempt, sqlx::Error> {
    let row: Option<(i64, i64, NaiveDateTime)> = sqlx::query_as(sql::SELECT_USER)
        .bind(user)
        .fetch_optional(pool)
        .await?;
    let (balance, version, _) = row.ok_or(sqlx::Error::RowNotFound)?;
    let mut tx = pool.begin().await?;
    match write(&mut tx, user, balance, version, amount, key).await {
        Ok(Attempt::Done) => {
            tx.commit().await?;
            Ok(Attempt::Done)
        }
        Ok(Attempt::Conflict) => {
            tx.rollback().await?;
            Ok(Attempt::Conflict)
        }
        Err(e) => {
            // The adapter rolls back at once so the row locks go before the retry.
            let _ = tx.rollback().await;
            Err(e)
        }
    }
}

/// The row lock first, then the same writes.
async fn for_update(
    pool: &MySqlPool,
    user: i64,
    amount: i64,
    key: &str,
) -> Result<Attempt, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let row: Result<Option<(i64, i64, NaiveDateTime)>, _> = sqlx::query_as(SELECT_USER_FOR_UPDATE)
        .bind(user)
        .fetch_optional(&mut *tx)
        .await;
    let attempt = match row {
        Ok(Some((balance, version, _))) => {
            write(&mut tx, user, balance, version, amount, key).await
        }
        Ok(None) => Err(sqlx::Error::RowNotFound),
        Err(e) => Err(e),
    };
    match attempt {
        Ok(Attempt::Done) => {
            tx.commit().await?;
            Ok(Attempt::Done)
        }
        other => {
            let _ = tx.rollback().await;
            other
        }
    }
}

/// The adapter's writes of a charge (`BalanceStore::apply` without an order).
async fn write(
    conn: &mut MySqlConnection,
    user: i64,
    balance: i64,
    version: i64,
    amount: i64,
    key: &str,
) -> Result<Attempt, sqlx::Error> {
    let now = Utc::now().trunc_subsecs(3);
    let at = now.naive_utc();
    let new_balance = balance + amount;
    let updated = sqlx::query(sql::UPDATE_BALANCE)
        .bind(new_balance)
        .bind(at)
        .bind(user)
        .bind(version)
        .execute(&mut *conn)
        .await?;
    if updated.rows_affected() == 0 {
        let found: Option<(i64,)> = sqlx::query_as(sql::USER_EXISTS)
            .bind(user)
            .fetch_optional(&mut *conn)
            .await?;
        return match found {
            Some(_) => Ok(Attempt::Conflict),
            None => Err(sqlx::Error::RowNotFound),
        };
    }
    sqlx::query(sql::INSERT_LEDGER_ENTRY)
        .bind(user)
        .bind("CHARGE")
        .bind(amount)
        .bind(new_balance)
        .bind(key)
        .bind(at)
        .bind(at + TimeDelta::days(1))
        .execute(&mut *conn)
        .await?;
    sqlx::query(sql::INSERT_KEY_RECORD)
        .bind(user)
        .bind(key)
        .bind(format!("charge:user={user}:amount={amount}"))
        .bind("CHARGE")
        .bind("APPLIED")
        .bind(200_u16)
        .bind(response_body(user, new_balance, amount, now).into_bytes())
        .bind(at)
        .bind(at + TimeDelta::days(1))
        .execute(&mut *conn)
        .await?;
    Ok(Attempt::Done)
}

/// The service's 200 body of a charge (about 100 bytes), stored with the key.
fn response_body(user: i64, balance: i64, amount: i64, at: DateTime<Utc>) -> String {
    format!(
        r#"{{"userId":{user},"balance":{balance},"chargedAmount":{amount},"transactionTime":"{}"}}"#,
        at.format("%Y-%m-%dT%H:%M:%S%.3fZ")
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
    fn the_locking_read_is_the_services_read_plus_for_update() {
        assert_eq!(
            SELECT_USER_FOR_UPDATE,
            format!("{} for update", sql::SELECT_USER)
        );
    }

    #[test]
    fn the_stored_body_is_shaped_like_the_services() {
        let at = DateTime::parse_from_rfc3339("2026-11-23T10:00:00.123Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(
            response_body(1, 110_000, 10_000, at),
            r#"{"userId":1,"balance":110000,"chargedAmount":10000,"transactionTime":"2026-11-23T10:00:00.123Z"}"#
        );
    }
}
