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
    server_url: String,
    pool: MySqlPool,
    _servers: Option<Arc<containers::Servers>>,
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

impl TestDatabase {
    /// A new database on the test server, with every migration applied; `None` (after
    /// printing why) when there is no server to use.
    ///
    /// # Panics
    /// When a server is configured but the database cannot be created: a broken
    /// environment must fail the test, not skip it.
    pub async fn create() -> Option<TestDatabase> {
        let (url, servers) = match std::env::var("TEST_DATABASE_URL") {
            Ok(url) if !url.is_empty() => (url, None),
            _ => {
                let servers = containers::Servers::shared().await?;
                (servers.mysql_url.clone(), Some(servers))
            }
        };
        let (server_url, query) = split_database(&url);
        let name = format!("t_{}", uuid::Uuid::new_v4().simple());
        let mut admin = MySqlConnection::connect(&format!("{server_url}/{query}"))
            .await
            .unwrap_or_else(|e| panic!("cannot reach the test MySQL at {server_url}: {e}"));
        sqlx::query(AssertSqlSafe(format!("create database `{name}`")))
            .execute(&mut admin)
            .await
            .unwrap_or_else(|e| panic!("cannot create the test database: {e}"));
        let _ = admin.close().await;
        let db_url = format!("{server_url}/{name}{query}");
        let pool = mysql_repo::connect(&db_url, 8)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to {name}: {e}"));
        mysql_repo::migrate(&pool)
            .await
            .unwrap_or_else(|e| panic!("cannot migrate {name}: {e:#}"));
        Some(TestDatabase {
            url: db_url,
            name,
            server_url: format!("{server_url}/{query}"),
            pool,
            _servers: servers,
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

    /// Drops the database. Call it at the end of a test; a test that panics leaves it to
    /// `Drop`, which does the same on a thread of its own.
    pub async fn cleanup(mut self) {
        self.pool.close().await;
        drop_database(&self.server_url, &self.name).await;
        self.dropped = true;
    }
}

async fn drop_database(server_url: &str, name: &str) {
    if let Ok(mut admin) = MySqlConnection::connect(server_url).await {
        let _ = sqlx::query(AssertSqlSafe(format!("drop database if exists `{name}`")))
            .execute(&mut admin)
            .await;
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
    _servers: Option<Arc<containers::Servers>>,
}

impl std::fmt::Debug for TestRedis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestRedis")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl TestRedis {
    /// `None` (after printing why) when there is no Redis to use.
    pub async fn create() -> Option<TestRedis> {
        let (url, servers) = match std::env::var("TEST_REDIS_URL") {
            Ok(url) if !url.is_empty() => (url, None),
            _ => {
                let servers = containers::Servers::shared().await?;
                (servers.redis_url.clone(), Some(servers))
            }
        };
        Some(TestRedis {
            url,
            prefix: format!("t:{}:", uuid::Uuid::new_v4().simple()),
            _servers: servers,
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
    //! MySQL and Redis in containers, shared by the tests of one process that run at the
    //! same time and removed when the last of them is done.

    use std::sync::{Arc, Weak};

    use testcontainers_modules::mysql::Mysql;
    use testcontainers_modules::redis::Redis;
    use testcontainers_modules::testcontainers::runners::AsyncRunner;
    use testcontainers_modules::testcontainers::{ContainerAsync, ImageExt};
    use tokio::sync::Mutex;

    pub struct Servers {
        pub mysql_url: String,
        pub redis_url: String,
        _mysql: ContainerAsync<Mysql>,
        _redis: ContainerAsync<Redis>,
    }

    static SHARED: Mutex<Option<Weak<Servers>>> = Mutex::const_new(None);

    impl Servers {
        pub async fn shared() -> Option<Arc<Servers>> {
            let mut slot = SHARED.lock().await;
            if let Some(servers) = slot.as_ref().and_then(Weak::upgrade) {
                return Some(servers);
            }
            match Self::start().await {
                Ok(servers) => {
                    let servers = Arc::new(servers);
                    *slot = Some(Arc::downgrade(&servers));
                    Some(servers)
                }
                Err(e) => {
                    crate::skip(&format!("no test servers: containers did not start ({e})"));
                    None
                }
            }
        }

        async fn start() -> anyhow::Result<Servers> {
            let mysql = Mysql::default().with_tag("8.4").start().await?;
            let redis = Redis::default().with_tag("7.2").start().await?;
            let mysql_port = mysql.get_host_port_ipv4(3306).await?;
            let redis_port = redis.get_host_port_ipv4(6379).await?;
            Ok(Servers {
                mysql_url: format!("mysql://root@127.0.0.1:{mysql_port}/test"),
                redis_url: format!("redis://127.0.0.1:{redis_port}"),
                _mysql: mysql,
                _redis: redis,
            })
        }
    }
}

#[cfg(not(feature = "containers"))]
mod containers {
    use std::sync::Arc;

    pub struct Servers {
        pub mysql_url: String,
        pub redis_url: String,
    }

    impl Servers {
        pub async fn shared() -> Option<Arc<Servers>> {
            crate::skip(
                "no test servers: TEST_DATABASE_URL/TEST_REDIS_URL unset and the containers feature is off",
            );
            None
        }
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
