//! Dev-only test support.
//!
//! - [`TestDatabase`]: a fresh, migrated MySQL database per test, dropped afterwards (or,
//!   with [`TestDatabase::create_on_galera`], one on the Galera cluster of
//!   `TEST_GALERA_URLS`, present on every node: [`galera_urls`]);
//! - [`TestRedis`]: a Redis URL and a key prefix of the test's own;
//! - [`RedisServer`]: a redis-server of the test's own, to kill and restart;
//! - [`RedisCluster`]: a 3-primary, 3-replica Redis Cluster of the test's own, to fail over;
//! - [`skip`]: how a test that cannot run says so (and fails under CI);
//! - [`contract`]: the port contract suites, written once and run against every adapter;
//! - [`steps`]: hand-built atomic steps for the adapter-specific suites.
//!
//! Where the servers come from, for every suite alike: `TEST_DATABASE_URL` /
//! `TEST_REDIS_URL` when set (CI points them at the local MariaDB and Redis); otherwise,
//! with the `containers` feature (on by default), MySQL 8.4 and Redis 7.2 started by
//! testcontainers, shared by the tests of one process; otherwise the test is skipped,
//! saying so on stderr (`SKIPPED …`), and under `CI=true` it fails instead.

pub mod contract;
mod redis_cluster;
mod redis_server;
mod servers;
mod skip;
pub mod steps;

pub use redis_cluster::{ClusterNode, RedisCluster};
pub use redis_server::RedisServer;
pub use servers::{TestDatabase, TestRedis, galera_urls};
pub use skip::{SKIP_LOG_VAR, SKIP_MARK, is_ci, skip, skip_line};
