//! Where the test servers come from, and a database and key prefix per test.
// A dev-only harness: a broken test environment must fail the test loudly.
#![allow(clippy::panic)]

use std::sync::Arc;

use sqlx::mysql::MySqlPool;
use sqlx::{AssertSqlSafe, Connection, MySqlConnection};

/// A fresh database, migrated, dropped by [`TestDatabase::cleanup`] (or, as a fallback, when
/// dropped).
pub struct TestDatabase {
    /// URL of this test's database.
    pub url: String,
    /// The database's name (`t_<uuid>`).
    pub name: String,
    /// On a Galera cluster, the URL of this database on every node (the node of `url`
    /// among them); empty on a single server.
    pub nodes: Vec<String>,
    server_url: String,
    pool: MySqlPool,
    _server: Option<Arc<containers::Server>>,
    dropped: bool,
}

impl std::fmt::Debug for TestDatabase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestDatabase")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// `mysql://user@host:port/db?x` → (`mysql://user@host:port`, `?x`).
fn split_database(url: &str) -> (String, String) {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url, String::new()),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    match base[scheme_end..].find('/') {
        Some(slash) => (base[..scheme_end + slash].to_owned(), query),
        None => (base.to_owned(), query),
    }
}

/// How a suite that found no server says so: the first line of the error, kept short.
fn short(error: &str) -> String {
    let first = error.lines().next().unwrap_or_default();
    let mut short: String = first.chars().take(160).collect();
    if short.len() < first.len() {
        short.push('…');
    }
    short
}

/// The skip reason of a suite that has no MySQL.
fn no_mysql(error: &str) -> String {
    format!(
        "no MySQL (set TEST_DATABASE_URL=mysql://root@127.0.0.1:3306/test or start Docker; \
         testcontainers: {})",
        short(error)
    )
}

/// The skip reason of a suite that has no Redis.
fn no_redis(error: &str) -> String {
    format!(
        "no Redis (set TEST_REDIS_URL=redis://127.0.0.1:6379 or start Docker; \
         testcontainers: {})",
        short(error)
    )
}

/// A URL from `var` when it is set and not empty.
fn from_env(var: &str) -> Option<String> {
    std::env::var(var).ok().filter(|url| !url.is_empty())
}

/// Creates database `name` on the server at `server_url` (`query`: its URL's options).
///
/// # Panics
/// When the server cannot be reached or refuses: a broken environment fails the test.
async fn create_database(server_url: &str, query: &str, name: &str, what: &str) {
    let mut admin = MySqlConnection::connect(&format!("{server_url}/{query}"))
        .await
        .unwrap_or_else(|e| panic!("cannot reach {what} at {server_url}: {e}"));
    sqlx::query(AssertSqlSafe(format!(
        "create database `{name}` character set utf8mb4"
    )))
    .execute(&mut admin)
    .await
    .unwrap_or_else(|e| panic!("cannot create the test database: {e}"));
    let _ = admin.close().await;
}

impl TestDatabase {
    /// A new database on the test server, with every migration applied; `None` when there
    /// is no server to use (after [`crate::skip`], which fails the test under CI).
    ///
    /// # Panics
    /// When a server is configured but the database cannot be created: a broken
    /// environment must fail the test, not skip it.
    pub async fn create() -> Option<TestDatabase> {
        Self::create_with_pool(8).await
    }

    /// As [`TestDatabase::create`], with a pool of `max_connections`.
    ///
    /// # Panics
    /// As [`TestDatabase::create`].
    pub async fn create_with_pool(max_connections: u32) -> Option<TestDatabase> {
        let (url, servers) = match from_env("TEST_DATABASE_URL") {
            Some(url) => (url, None),
            None => match containers::mysql().await {
                Ok(server) => (server.url.clone(), Some(server)),
                Err(e) => {
                    crate::skip(&no_mysql(&e));
                    return None;
                }
            },
        };
        let (server_url, query) = split_database(&url);
        let name = format!("t_{}", uuid::Uuid::new_v4().simple());
        create_database(&server_url, &query, &name, "the test MySQL").await;
        let db_url = format!("{server_url}/{name}{query}");
        let pool = mysql_repo::connect(&db_url, max_connections)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to {name}: {e}"));
        mysql_repo::migrate(&pool)
            .await
            .unwrap_or_else(|e| panic!("cannot migrate {name}: {e:#}"));
        Some(TestDatabase {
            url: db_url,
            name,
            nodes: Vec::new(),
            server_url: format!("{server_url}/{query}"),
            pool,
            _server: servers,
            dropped: false,
        })
    }

    /// A new database on the Galera cluster of `TEST_GALERA_URLS` (one URL per node),
    /// created and migrated through the first node, present on every node before this
    /// returns; `url` and [`TestDatabase::pool`] are on node `node % nodes` (so tests can
    /// spread over the nodes), [`TestDatabase::nodes`] has every node. `None` when no
    /// cluster is configured (after [`crate::skip`], which fails the test under CI).
    ///
    /// # Panics
    /// When a cluster is configured but the database cannot be created on it.
    pub async fn create_on_galera(node: usize) -> Option<TestDatabase> {
        let Some(urls) = galera_urls() else {
            crate::skip(NO_GALERA);
            return None;
        };
        let servers: Vec<(String, String)> = urls.iter().map(|u| split_database(u)).collect();
        let (first, query) = &servers[0];
        let name = format!("t_{}", uuid::Uuid::new_v4().simple());
        create_database(first, query, &name, "Galera node 1").await;
        let on_first = mysql_repo::connect(&format!("{first}/{name}{query}"), 2)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to {name} on node 1: {e}"));
        mysql_repo::migrate(&on_first)
            .await
            .unwrap_or_else(|e| panic!("cannot migrate {name} on Galera: {e:#}"));
        let (want,): (i64,) = sqlx::query_as(
            "select count(*) from information_schema.tables where table_schema = database()",
        )
        .fetch_one(&on_first)
        .await
        .unwrap_or_else(|e| panic!("cannot count the tables of {name}: {e}"));
        on_first.close().await;
        let nodes: Vec<String> = servers
            .iter()
            .map(|(server, query)| format!("{server}/{name}{query}"))
            .collect();
        // DDL replicates in total order but each node applies it on its own: wait until
        // every node has the whole schema, so no test meets a missing table.
        for url in &nodes {
            wait_for_tables(url, want).await;
        }
        let chosen = node % nodes.len();
        let pool = mysql_repo::connect(&nodes[chosen], 8)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to {name} on node {}: {e}", chosen + 1));
        Some(TestDatabase {
            url: nodes[chosen].clone(),
            name,
            nodes,
            server_url: format!("{first}/{query}"),
            pool,
            _server: None,
            dropped: false,
        })
    }

    pub fn pool(&self) -> &MySqlPool {
        &self.pool
    }

    /// The MySQL store on this database.
    pub fn store(&self) -> mysql_repo::MySqlStore {
        mysql_repo::MySqlStore::new(self.pool.clone())
    }

    /// A connection of its own holding the users row of `user` locked (`select … for
    /// update` in an open transaction), as a writer elsewhere would; `commit` or
    /// `rollback` on it, or dropping it, lets the row go.
    ///
    /// # Panics
    /// When the server cannot be reached or the user does not exist: a broken test.
    #[allow(clippy::expect_used)]
    pub async fn hold_user_row(&self, user: i64) -> MySqlConnection {
        let mut holder = MySqlConnection::connect(&self.url)
            .await
            .expect("a connection to hold a row");
        sqlx::raw_sql("begin")
            .execute(&mut holder)
            .await
            .expect("begin");
        sqlx::query("select id from users where id = ? for update")
            .bind(user)
            .fetch_one(&mut holder)
            .await
            .expect("the users row to hold");
        holder
    }

    /// Drops the database. Call it at the end of a test; a test that panics leaves it to
    /// `Drop`, which does the same on a thread of its own.
    pub async fn cleanup(mut self) {
        self.pool.close().await;
        drop_database(&self.server_url, &self.name).await;
        self.dropped = true;
    }

    /// Runs `test` in a task of its own, then drops the database, also when `test`
    /// panics (the panic is caught, and raised again after the cleanup).
    ///
    /// # Panics
    /// When `test` panics, with its panic.
    pub async fn run_then_cleanup<F>(self, test: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let outcome = tokio::spawn(test).await;
        self.cleanup().await;
        if let Err(e) = outcome {
            match e.try_into_panic() {
                Ok(panic) => std::panic::resume_unwind(panic),
                Err(e) => panic!("the test's task failed: {e}"),
            }
        }
    }
}

/// The skip reason of a Galera suite without a cluster.
const NO_GALERA: &str = "no Galera cluster (python3 chaos/galera.py up, then set \
     TEST_GALERA_URLS=mysql://root@127.0.0.1:23306/test,mysql://root@127.0.0.1:23307/test,\
     mysql://root@127.0.0.1:23308/test)";

/// The node URLs of `TEST_GALERA_URLS` (comma-separated), when set.
pub fn galera_urls() -> Option<Vec<String>> {
    let urls: Vec<String> = from_env("TEST_GALERA_URLS")?
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(str::to_owned)
        .collect();
    (!urls.is_empty()).then_some(urls)
}

/// Waits (bounded) until the database of `url` has `want` tables.
async fn wait_for_tables(url: &str, want: i64) {
    for _ in 0..600 {
        if let Ok(mut conn) = MySqlConnection::connect(url).await {
            let have: Result<(i64,), _> = sqlx::query_as(
                "select count(*) from information_schema.tables where table_schema = database()",
            )
            .fetch_one(&mut conn)
            .await;
            let _ = conn.close().await;
            if matches!(have, Ok((n,)) if n == want) {
                return;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("the test database never reached {url} with its {want} tables");
}

async fn drop_database(server_url: &str, name: &str) {
    if let Ok(mut admin) = MySqlConnection::connect(server_url).await {
        // A test that failed may leave a transaction of its own open on the database (its
        // runtime is not polled while this runs), whose metadata lock the drop would wait
        // for until `lock_wait_timeout` (a year by default): wait briefly, then leave the
        // database behind rather than hang the run.
        let _ = sqlx::raw_sql("set session lock_wait_timeout = 5")
            .execute(&mut admin)
            .await;
        let dropped = sqlx::query(AssertSqlSafe(format!("drop database if exists `{name}`")))
            .execute(&mut admin)
            .await;
        if let Err(e) = dropped {
            eprintln!("the test database {name} was left behind: {e}");
        }
        let _ = admin.close().await;
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        if self.dropped {
            return;
        }
        let server_url = self.server_url.clone();
        let name = self.name.clone();
        // Drop runs inside the test's runtime, which cannot be blocked on: use a thread
        // with a runtime of its own.
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(drop_database(&server_url, &name));
            }
        })
        .join();
    }
}

/// A Redis URL and a key prefix no other test uses.
#[derive(Clone)]
pub struct TestRedis {
    pub url: String,
    /// `t:<uuid>:`; every key the test writes starts with it.
    pub prefix: String,
    _server: Option<Arc<containers::Server>>,
}

impl std::fmt::Debug for TestRedis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestRedis")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl TestRedis {
    /// `None` when there is no Redis to use (after [`crate::skip`], which fails the test
    /// under CI).
    pub async fn create() -> Option<TestRedis> {
        let (url, server) = match from_env("TEST_REDIS_URL") {
            Some(url) => (url, None),
            None => match containers::redis().await {
                Ok(server) => (server.url.clone(), Some(server)),
                Err(e) => {
                    crate::skip(&no_redis(&e));
                    return None;
                }
            },
        };
        Some(TestRedis {
            url,
            prefix: format!("t:{}:", uuid::Uuid::new_v4().simple()),
            _server: server,
        })
    }

    /// A lock manager on this Redis, under this test's prefix.
    ///
    /// # Panics
    /// When the URL is malformed.
    pub async fn lock_manager(&self) -> redis_lock::RedisLockManager {
        redis_lock::RedisLockManager::connect(&self.url, &self.prefix)
            .await
            .unwrap_or_else(|e| panic!("cannot build the Redis lock manager: {e:#}"))
    }

    /// A plain client, to look at the keys the service writes.
    ///
    /// # Panics
    /// When Redis cannot be reached.
    pub async fn client(&self) -> fred::prelude::Client {
        use fred::prelude::*;
        let config =
            Config::from_url(&self.url).unwrap_or_else(|e| panic!("bad TEST_REDIS_URL: {e}"));
        let client = Builder::from_config(config)
            .build()
            .unwrap_or_else(|e| panic!("cannot build a Redis client: {e}"));
        client
            .init()
            .await
            .unwrap_or_else(|e| panic!("cannot reach Redis: {e}"));
        client
    }
}

#[cfg(feature = "containers")]
mod containers {
    //! MySQL and Redis in containers, each shared by the tests of one process that run at
    //! the same time and removed when the last of them is done. A server that could not be
    //! started (no Docker) is not tried again by that process: the first test pays for the
    //! detection, the others skip at once.

    use std::sync::{Arc, Weak};

    use testcontainers_modules::mysql::Mysql;
    use testcontainers_modules::redis::Redis;
    use testcontainers_modules::testcontainers::runners::AsyncRunner;
    use testcontainers_modules::testcontainers::{ContainerAsync, ImageExt};
    use tokio::sync::Mutex;

    /// A running container and the URL to reach it.
    pub struct Server {
        pub url: String,
        _container: Container,
    }

    // Held, never read: dropping it stops and removes the container.
    #[allow(dead_code)]
    enum Container {
        Mysql(ContainerAsync<Mysql>),
        Redis(ContainerAsync<Redis>),
    }

    /// The server in use, or why it could not be started.
    enum Slot {
        Empty,
        Running(Weak<Server>),
        Failed(String),
    }

    static MYSQL: Mutex<Slot> = Mutex::const_new(Slot::Empty);
    static REDIS: Mutex<Slot> = Mutex::const_new(Slot::Empty);

    pub async fn mysql() -> Result<Arc<Server>, String> {
        shared(&MYSQL, async {
            let mysql = Mysql::default().with_tag("8.4").start().await?;
            let port = mysql.get_host_port_ipv4(3306).await?;
            Ok(Server {
                url: format!("mysql://root@127.0.0.1:{port}/test"),
                _container: Container::Mysql(mysql),
            })
        })
        .await
    }

    pub async fn redis() -> Result<Arc<Server>, String> {
        shared(&REDIS, async {
            let redis = Redis::default().with_tag("7.2").start().await?;
            let port = redis.get_host_port_ipv4(6379).await?;
            Ok(Server {
                url: format!("redis://127.0.0.1:{port}"),
                _container: Container::Redis(redis),
            })
        })
        .await
    }

    async fn shared(
        slot: &Mutex<Slot>,
        start: impl Future<Output = anyhow::Result<Server>>,
    ) -> Result<Arc<Server>, String> {
        let mut slot = slot.lock().await;
        match &*slot {
            Slot::Running(server) => {
                if let Some(server) = server.upgrade() {
                    return Ok(server);
                }
            }
            Slot::Failed(why) => return Err(why.clone()),
            Slot::Empty => {}
        }
        match start.await {
            Ok(server) => {
                let server = Arc::new(server);
                *slot = Slot::Running(Arc::downgrade(&server));
                Ok(server)
            }
            Err(e) => {
                let why = format!("{e:#}");
                *slot = Slot::Failed(why.clone());
                Err(why)
            }
        }
    }
}

#[cfg(not(feature = "containers"))]
mod containers {
    use std::sync::Arc;

    pub struct Server {
        pub url: String,
    }

    const OFF: &str = "testkit's `containers` feature is off";

    pub async fn mysql() -> Result<Arc<Server>, String> {
        Err(OFF.to_owned())
    }

    pub async fn redis() -> Result<Arc<Server>, String> {
        Err(OFF.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::split_database;

    #[test]
    fn database_part_of_a_url() {
        assert_eq!(
            split_database("mysql://root@127.0.0.1:3306/test"),
            ("mysql://root@127.0.0.1:3306".to_owned(), String::new())
        );
        assert_eq!(
            split_database("mysql://u:p@h:1/db?ssl-mode=disabled"),
            (
                "mysql://u:p@h:1".to_owned(),
                "?ssl-mode=disabled".to_owned()
            )
        );
        assert_eq!(
            split_database("mysql://h:1"),
            ("mysql://h:1".to_owned(), String::new())
        );
    }
}
