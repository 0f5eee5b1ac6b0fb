//! Dev-only test support.
//!
//! - [`TestDatabase`]: a fresh, migrated MySQL database per test, dropped afterwards;
//! - [`TestRedis`]: a Redis URL and a key prefix of the test's own;
//! - [`contract`]: the port contract suites, written once and run against every adapter.
//!
//! Where the servers come from: `TEST_DATABASE_URL` / `TEST_REDIS_URL` when set (CI points
//! them at the local MariaDB and Redis); otherwise, with the `containers` feature (on by
//! default), MySQL 8.4 and Redis 7.2 started by testcontainers, one pair per test process;
//! otherwise the test is skipped, saying so.

pub mod contract;
mod servers;

pub use servers::{TestDatabase, TestRedis};

/// Prints why a test did not run; the test then returns early.
pub fn skip(what: &str) {
    eprintln!("skipped: {what} (set TEST_DATABASE_URL and TEST_REDIS_URL, or run Docker)");
}
