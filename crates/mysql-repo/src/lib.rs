//! sqlx adapters of the repository ports for MySQL 8 and MariaDB 10.11, and the migrator.
//!
//! [`MySqlStore`] implements [`UserRepo`](domain::ports::UserRepo),
//! [`OrderRepo`](domain::ports::OrderRepo), [`CouponRepo`](domain::ports::CouponRepo),
//! [`IdempotencyRepo`](domain::ports::IdempotencyRepo),
//! [`BalanceStore`](domain::ports::BalanceStore) and [`Auditor`](domain::ports::Auditor) (a
//! read-only reconciliation in one consistent snapshot). Every atomic step is one method and one
//! database transaction; nothing here lets a transaction span two port calls.
//!
//! All SQL is shared by both servers: no `RETURNING` (MySQL lacks it), ids come from
//! `last_insert_id()`, and database conditions are told apart in one place (`error.rs`).

// First: the read helper macro it defines is used by the modules below.
#[macro_use]
mod retry;

mod audit;
mod batch;
mod convert;
mod coupons;
mod error;
mod idempotency;
mod orders;
pub mod sql;
mod step;
mod users;

use std::str::FromStr;
use std::time::Duration;

use anyhow::Context as _;
use domain::ports::RepoError;
use sqlx::migrate::Migrator;
use sqlx::mysql::{MySqlConnectOptions, MySqlPoolOptions};
use sqlx::{AssertSqlSafe, MySqlPool};

/// The schema, embedded at compile time from the workspace's `migrations/` directory.
pub static MIGRATOR: Migrator = sqlx::migrate!("../../migrations");

/// How long a query waits for a pooled connection (or for a new one to be opened) before
/// it fails as unavailable: short, because a balance change holds the user's lock while
/// it waits, and a readiness probe must answer before its own timeout.
pub const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);

/// Builds a pool for `url` (`mysql://user:password@host:3306/database`).
///
/// The pool is **lazy**: no connection is opened here, only the URL is parsed, so the
/// service can start while the database is still coming up and report it through
/// readiness ([`MySqlStore::ping`]) instead of failing at boot. The first query opens the
/// first connection. Every session runs with `time_zone = '+00:00'` (sqlx's default, set
/// again explicitly here) so `datetime(3)` values are UTC on both servers.
///
/// # Errors
/// When `url` is not a valid MySQL URL.
pub async fn connect(url: &str, max_connections: u32) -> anyhow::Result<MySqlPool> {
    let options = MySqlConnectOptions::from_str(url).context("invalid MySQL database URL")?;
    Ok(connect_with(options, max_connections))
}

/// Where a MySQL URL points, for the start-up log: never its password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatabaseTarget {
    pub user: String,
    pub host: String,
    pub port: u16,
    pub database: String,
}

/// Reads `url` as [`connect`] does, keeping only what may be logged.
///
/// # Errors
/// When `url` is not a MySQL URL.
pub fn target(url: &str) -> anyhow::Result<DatabaseTarget> {
    let options = MySqlConnectOptions::from_str(url).context("invalid MySQL database URL")?;
    Ok(DatabaseTarget {
        user: options.get_username().to_owned(),
        host: options.get_host().to_owned(),
        port: options.get_port(),
        database: options.get_database().unwrap_or_default().to_owned(),
    })
}

/// As [`connect`], from options already built (a test harness picks its own database).
pub fn connect_with(options: MySqlConnectOptions, max_connections: u32) -> MySqlPool {
    MySqlPoolOptions::new()
        .max_connections(max_connections.max(1))
        .acquire_timeout(ACQUIRE_TIMEOUT)
        // No ping before every acquire: it is one more round trip per query, and a balance
        // change acquires three times (replay check, read, transaction), two of them under
        // the user's lock (measured: +32% charges/s on the database alone). A connection
        // that died meanwhile fails its query instead and is closed; a read, or a step's
        // BEGIN, is then sent once more on a tested connection (see `retry`).
        .test_before_acquire(false)
        .after_connect(|conn, _| Box::pin(causal_reads_on_galera(conn)))
        .connect_lazy_with(options.timezone(Some("+00:00".to_owned())))
}

/// On a Galera node, every session of the pool reads causally (`wsrep_sync_wait = 1`): a
/// read waits until the node has applied every write set the cluster committed before it,
/// so what one node acknowledged (a payment) is there for a read through any other (its
/// refund, a second later, through another instance). Without it a node may answer from
/// a state a few write sets old: harmless for the balance changes, which the version
/// guard and certification already protect, but a client could be told "not found" about
/// what it was just told exists. Elsewhere nothing is set: MariaDB without Galera reports
/// `wsrep_on` 0, and MySQL has no such variable (the probe's error is ignored).
async fn causal_reads_on_galera(conn: &mut sqlx::MySqlConnection) -> Result<(), sqlx::Error> {
    let galera: Result<(i64,), sqlx::Error> = sqlx::query_as("select cast(@@wsrep_on as signed)")
        .fetch_one(&mut *conn)
        .await;
    if let Ok((1,)) = galera {
        sqlx::raw_sql("set session wsrep_sync_wait = 1")
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// How long `migrate` waits for another process's migration run to finish before it
/// gives up: far longer than this schema's migrations take, short enough that a stuck
/// holder fails the deployment instead of hanging it.
pub const MIGRATION_LOCK_WAIT: Duration = Duration::from_secs(300);

/// Applies every migration that has not been applied yet; a no-op when the schema is
/// current. Safe to run from several processes at once: each run holds a named lock of
/// this database (`GET_LOCK`) for its whole length, so the others wait and then find the
/// schema current.
///
/// sqlx's own lock (`GET_LOCK(name, -1)`) does not serialise runs on MariaDB, where a
/// negative timeout returns NULL at once without taking the lock, so two fresh runs
/// would both apply the first migration and one fails. The lock here has a positive
/// timeout, which both MySQL 8 and MariaDB honour. A named lock belongs to its session,
/// so the lock and the run share one session: a pool of exactly one connection, opened
/// here and closed afterwards (the lock ends with the session, whatever happens). The
/// run is on that pool rather than on a bare connection because sqlx's `run` on a
/// connection makes a future the compiler cannot prove `Send`, and `migrate` is awaited
/// in spawned tasks.
///
/// # Errors
/// When the database cannot be reached, the lock is not granted within
/// [`MIGRATION_LOCK_WAIT`], the lock's session was lost before the run, or a migration
/// fails.
pub async fn migrate(pool: &MySqlPool) -> anyhow::Result<()> {
    let options = pool.connect_options();
    let session = MySqlPoolOptions::new()
        .max_connections(1)
        .min_connections(0)
        // The one connection must stay the same session from the lock to the release:
        // never reaped, and not replaced behind our back by a test on acquire.
        .idle_timeout(None)
        .max_lifetime(None)
        .test_before_acquire(false)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .connect_lazy_with((*options).clone());
    let run = migrate_locked(&session).await;
    session.close().await;
    run
}

/// The lock's name: named locks are server-wide, so it is this database's; hashed,
/// because a lock name is at most 64 characters and a database name may be that long.
const MIGRATION_LOCK: &str = "concat('balance-migrate:', sha1(database()))";

async fn migrate_locked(session: &MySqlPool) -> anyhow::Result<()> {
    let granted: (Option<i64>,) = sqlx::query_as(AssertSqlSafe(format!(
        "select get_lock({MIGRATION_LOCK}, ?)"
    )))
    .bind(MIGRATION_LOCK_WAIT.as_secs())
    .fetch_one(session)
    .await
    .context("could not take the migration lock")?;
    match granted.0 {
        Some(1) => {}
        Some(_) => anyhow::bail!(
            "another process has been migrating this database for more than {} s",
            MIGRATION_LOCK_WAIT.as_secs()
        ),
        None => anyhow::bail!("the server refused the migration lock (is a database selected?)"),
    }
    let run = run_holding_lock(session).await;
    // Released at once, so a waiting process goes on without waiting for the close.
    if let Err(e) = sqlx::query(AssertSqlSafe(format!(
        "select release_lock({MIGRATION_LOCK})"
    )))
    .execute(session)
    .await
    {
        tracing::debug!(error = %e, "releasing the migration lock failed; closing the session releases it");
    }
    run
}

async fn run_holding_lock(session: &MySqlPool) -> anyhow::Result<()> {
    // Had the session died since the lock was taken, the pool would have opened another
    // one, without the lock: run only on the session that holds it.
    let (holds,): (Option<i64>,) = sqlx::query_as(AssertSqlSafe(format!(
        "select is_used_lock({MIGRATION_LOCK}) = connection_id()"
    )))
    .fetch_one(session)
    .await
    .context("could not check the migration lock")?;
    if holds != Some(1) {
        anyhow::bail!("the connection holding the migration lock was lost; run migrate again");
    }
    // A database a newer version migrated further (a rollback, or an older pod restarting
    // during a rolling upgrade) has migrations this binary does not know: they are additive by
    // rule (new files only), so this binary can still serve on it, and refusing to start would
    // turn every rollback into an outage.
    let mut migrator = sqlx::migrate!("../../migrations");
    migrator.set_ignore_missing(true);
    migrator
        .run(session)
        .await
        .context("could not apply the database migrations")
}

/// The MySQL adapter of every repository port. Cheap to clone: it shares one pool.
#[derive(Debug, Clone)]
pub struct MySqlStore {
    pool: MySqlPool,
}

impl MySqlStore {
    pub fn new(pool: MySqlPool) -> Self {
        Self { pool }
    }

    /// The pool, for callers that need to close it on shutdown.
    pub fn pool(&self) -> &MySqlPool {
        &self.pool
    }

    /// Readiness: one round trip on a pooled connection that reads a table
    /// (`select 1 from users limit 1`). A bare `select 1` is not enough: a Galera node that
    /// lost quorum still answers it, yet refuses every statement on a table (1047).
    ///
    /// # Errors
    /// [`RepoError::Unavailable`] when no connection can be had within
    /// [`ACQUIRE_TIMEOUT`], the round trip fails on the network, or the server is not
    /// ready to serve tables (a Galera node not synced or without quorum).
    pub async fn ping(&self) -> Result<(), RepoError> {
        sqlx::query("select 1 from users limit 1")
            .execute(&self.pool)
            .await
            .map(|_| ())
            .map_err(|e| error::classify(e).into_repo())
    }
}
