//! sqlx adapters of the repository ports for MySQL 8 and MariaDB 10.11, and the migrator.
//!
//! [`MySqlStore`] implements [`UserRepo`](domain::ports::UserRepo),
//! [`OrderRepo`](domain::ports::OrderRepo), [`IdempotencyRepo`](domain::ports::IdempotencyRepo),
//! [`BalanceStore`](domain::ports::BalanceStore) and [`Auditor`](domain::ports::Auditor) (a
//! read-only reconciliation in one consistent snapshot). Every atomic step is one method and one
//! database transaction; nothing here lets a transaction span two port calls.
//!
//! All SQL is shared by both servers: no `RETURNING` (MySQL lacks it), ids come from
//! `last_insert_id()`, and database conditions are told apart in one place (`error.rs`).

mod audit;
mod convert;
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
use sqlx::MySqlPool;
use sqlx::migrate::Migrator;
use sqlx::mysql::{MySqlConnectOptions, MySqlPoolOptions};

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
        // that died meanwhile fails its query instead, which answers 503 (not stored) and
        // is closed; the client's retry with the same key runs on a fresh one.
        .test_before_acquire(false)
        .connect_lazy_with(options.timezone(Some("+00:00".to_owned())))
}

/// Applies every migration that has not been applied yet; a no-op when the schema is
/// current. Safe to run from several processes at once (sqlx takes a database lock).
///
/// # Errors
/// When the database cannot be reached or a migration fails.
pub async fn migrate(pool: &MySqlPool) -> anyhow::Result<()> {
    MIGRATOR
        .run(pool)
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

    /// Readiness: one round trip (`select 1`) on a pooled connection.
    ///
    /// # Errors
    /// [`RepoError::Unavailable`] when no connection can be had within
    /// [`ACQUIRE_TIMEOUT`] or the round trip fails on the network.
    pub async fn ping(&self) -> Result<(), RepoError> {
        sqlx::query("select 1")
            .execute(&self.pool)
            .await
            .map(|_| ())
            .map_err(|e| error::classify(e).into_repo())
    }
}
