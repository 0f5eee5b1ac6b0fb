//! Wiring: adapters chosen by the configuration, the HTTP server bound, background tasks.

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use actix_web::HttpServer;
use actix_web::dev::{Server, ServerHandle};
use actix_web::web::Data;
use domain::ports::{Auditor, LockManager, SystemClock};
use domain::types::Balance;
use domain::{BalanceService, Ports, Settings};
use http_actix::{AppState, Dependency, InProcess, JsonEncoder};
use secrecy::ExposeSecret;

use crate::config::Config;
use crate::telemetry;

/// Users the in-memory store creates at start unless told otherwise (the load scripts
/// expect users 1..100 with 100000).
pub const DEFAULT_MEMORY_SEED_USERS: u32 = 100;
pub const DEFAULT_SEED_BALANCE: i64 = 100_000;

/// How often expired idempotency records are purged, and how many per batch.
const PURGE_EVERY: Duration = Duration::from_secs(60);
const PURGE_BATCH: u32 = 500;

/// The adapters behind the use cases, what readiness checks, and the audit of the books
/// (the same store, kept apart from the use cases).
pub struct Wiring {
    pub service: BalanceService,
    pub dependencies: Vec<Arc<dyn Dependency>>,
    pub auditor: Arc<dyn Auditor>,
}

impl std::fmt::Debug for Wiring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wiring").finish_non_exhaustive()
    }
}

/// Builds the adapters named by the configuration: MySQL or the in-memory store, Redis or
/// the in-process lock.
///
/// # Errors
/// When the configuration is inconsistent, a URL is malformed, or the start-up migration
/// fails.
pub async fn wire(config: &Config) -> anyhow::Result<Wiring> {
    let (locks, lock_dependency) = lock_from_config(config).await?;
    wire_with_locks(config, locks, lock_dependency).await
}

/// The lock manager named by `REDIS_URL`, or the in-process one, with its readiness check.
///
/// # Errors
/// A malformed `REDIS_URL`.
pub async fn lock_from_config(
    config: &Config,
) -> anyhow::Result<(Arc<dyn LockManager>, Arc<dyn Dependency>)> {
    let Some(url) = &config.redis_url else {
        tracing::warn!(
            "REDIS_URL is not set: using the IN-PROCESS lock. It guards this process only: run ONE instance"
        );
        return Ok((
            Arc::new(memory::InProcessLockManager::new()),
            Arc::new(InProcess {
                name: "lock",
                kind: "in-process",
            }),
        ));
    };
    let servers = redis_lock::servers(url.expose_secret())?.join(",");
    tracing::info!(
        servers = %servers,
        key_prefix = %config.redis_key_prefix,
        "lock: Redis"
    );
    let manager =
        redis_lock::RedisLockManager::connect(url.expose_secret(), &config.redis_key_prefix)
            .await?;
    if let Err(e) = manager.ping().await {
        tracing::warn!(error = %format!("{e:#}"), policy = ?config.lock_on_redis_down,
            "Redis does not answer at start-up; balance changes follow LOCK_ON_REDIS_DOWN until it does");
    }
    let manager = Arc::new(manager);
    let dependency = Arc::new(RedisDependency {
        manager: Arc::clone(&manager),
        required: config.lock_on_redis_down == crate::config::RedisDownPolicy::Fail,
    });
    Ok((manager, dependency))
}

/// The store named by `DATABASE_URL` (or the in-memory one) behind the given lock manager.
///
/// # Errors
/// A bad configuration, a malformed `DATABASE_URL`, or a failed start-up migration.
pub async fn wire_with_locks(
    config: &Config,
    locks: Arc<dyn LockManager>,
    lock_dependency: Arc<dyn Dependency>,
) -> anyhow::Result<Wiring> {
    let settings = config.settings()?;
    let Some(url) = &config.db.database_url else {
        tracing::warn!(
            "DATABASE_URL is not set: using the IN-MEMORY store. NOTHING IS PERSISTED across restarts, \
             and only ONE instance is safe"
        );
        let mut wiring = in_memory(settings, locks);
        wiring.dependencies.retain(|d| d.name() != "lock");
        wiring.dependencies.push(lock_dependency);
        return Ok(wiring);
    };
    let target = mysql_repo::target(url.expose_secret())?;
    tracing::info!(
        host = %target.host,
        port = target.port,
        database = %target.database,
        user = %target.user,
        pool = config.db_pool_size(),
        "store: MySQL"
    );
    let pool = mysql_repo::connect(url.expose_secret(), config.db_pool_size()).await?;
    if config.migrate_on_start {
        mysql_repo::migrate(&pool)
            .await
            .map_err(|e| e.context("applying migrations at start-up (MIGRATE_ON_START)"))?;
    }
    let store = mysql_repo::MySqlStore::new(pool);
    let ports = Ports {
        users: Arc::new(store.clone()),
        orders: Arc::new(store.clone()),
        coupons: Arc::new(store.clone()),
        keys: Arc::new(store.clone()),
        store: Arc::new(store.clone()),
        locks,
        encoder: Arc::new(JsonEncoder),
        clock: Arc::new(SystemClock),
        gate: gate_from_config(config).await?,
    };
    Ok(Wiring {
        service: BalanceService::new(ports, settings),
        auditor: Arc::new(store.clone()),
        dependencies: vec![Arc::new(MySqlDependency { store }), lock_dependency],
    })
}

/// Rebuilds every coupon's admission gate from the database once, at start (a gate an
/// earlier run left in Redis may be out of date); issues meanwhile go through the gate as
/// it is, which the database step checks anyway.
async fn rebuild_coupon_gates(service: BalanceService) {
    match service.rebuild_coupon_gates().await {
        Ok(0) => {}
        Ok(n) => tracing::info!(coupons = n, "coupon gates rebuilt from the database"),
        Err(e) => tracing::warn!(error = %format!("{e:#}"),
            "could not rebuild the coupon gates at start; each is rebuilt when it is next found missing or stale"),
    }
}

/// The coupon admission gate on the Redis of `REDIS_URL` (with the lock's key prefix), or
/// none without Redis: then every issue is decided by the database step alone.
///
/// # Errors
/// A malformed `REDIS_URL`.
async fn gate_from_config(
    config: &Config,
) -> anyhow::Result<Option<Arc<dyn domain::ports::CouponGate>>> {
    let Some(url) = &config.redis_url else {
        return Ok(None);
    };
    let settings = config.settings()?;
    // A unit pending longer than a step can wait for its lock and hold it is stale.
    let stale_after = settings.lock_wait.saturating_add(settings.lock_lease);
    let gate = redis_lock::RedisCouponGate::connect(
        url.expose_secret(),
        &config.redis_key_prefix,
        stale_after,
    )
    .await?;
    Ok(Some(Arc::new(gate)))
}

/// Readiness of the MySQL store: always required.
struct MySqlDependency {
    store: mysql_repo::MySqlStore,
}

#[async_trait::async_trait]
impl Dependency for MySqlDependency {
    fn name(&self) -> &'static str {
        "database"
    }
    fn kind(&self) -> &'static str {
        "mysql"
    }
    fn required(&self) -> bool {
        true
    }
    async fn check(&self) -> anyhow::Result<()> {
        Ok(self.store.ping().await?)
    }
}

/// Readiness of the Redis lock: required only under `LOCK_ON_REDIS_DOWN=fail`; under
/// `degrade` the service keeps working without it.
struct RedisDependency {
    manager: Arc<redis_lock::RedisLockManager>,
    required: bool,
}

#[async_trait::async_trait]
impl Dependency for RedisDependency {
    fn name(&self) -> &'static str {
        "lock"
    }
    fn kind(&self) -> &'static str {
        "redis"
    }
    fn required(&self) -> bool {
        self.required
    }
    async fn check(&self) -> anyhow::Result<()> {
        self.manager.ping().await
    }
}

/// The in-memory store with the given lock manager (tests pass one they also hold).
pub fn in_memory(settings: Settings, locks: Arc<dyn LockManager>) -> Wiring {
    let store = memory::MemoryStore::new();
    let ports = Ports {
        users: Arc::new(store.clone()),
        orders: Arc::new(store.clone()),
        coupons: Arc::new(store.clone()),
        keys: Arc::new(store.clone()),
        store: Arc::new(store.clone()),
        locks,
        encoder: Arc::new(JsonEncoder),
        clock: Arc::new(SystemClock),
        // One process, one store: the database step alone is as fast as a gate.
        gate: None,
    };
    Wiring {
        service: BalanceService::new(ports, settings),
        auditor: Arc::new(store),
        dependencies: vec![
            Arc::new(InProcess {
                name: "database",
                kind: "memory",
            }),
            Arc::new(InProcess {
                name: "lock",
                kind: "in-process",
            }),
        ],
    }
}

/// A bound, not yet running service. Tests build it on port 0 and read [`Application::port`].
pub struct Application {
    port: u16,
    server: Server,
    service: BalanceService,
    background: Vec<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for Application {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Application")
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl Application {
    /// Wires the adapters, seeds the users asked for, binds the listener and starts the
    /// background purge and audit. Signals are not handled here; see
    /// [`Application::run_until_stopped`].
    ///
    /// # Errors
    /// Bad configuration, a failing seed, or an address that cannot be bound.
    pub async fn build(
        config: Config,
        seed_users: Option<u32>,
        seed_balance: i64,
    ) -> anyhow::Result<Self> {
        let wiring = wire(&config).await?;
        Self::build_with(config, wiring, seed_users, seed_balance).await
    }

    /// As [`Application::build`], with adapters chosen by the caller (tests swap in a lock
    /// service that is down, say).
    ///
    /// # Errors
    /// A failing seed, or an address that cannot be bound.
    pub async fn build_with(
        config: Config,
        wiring: Wiring,
        seed_users: Option<u32>,
        seed_balance: i64,
    ) -> anyhow::Result<Self> {
        let in_memory = config.db.database_url.is_none();
        let seed = seed_users.unwrap_or(if in_memory {
            DEFAULT_MEMORY_SEED_USERS
        } else {
            0
        });
        if seed > 0 {
            let balance = Balance::new(seed_balance, wiring.service.limits())
                .map_err(|e| anyhow::anyhow!("SEED_BALANCE: {e}"))?;
            let created = wiring.service.seed_users(seed, balance).await?;
            tracing::info!(
                users = seed,
                balance = seed_balance,
                created,
                "seeded users"
            );
        }

        let metrics = telemetry::metrics_handle();
        let mut background = Vec::new();
        if let Some(handle) = metrics.clone() {
            background.push(tokio::spawn(telemetry::run_upkeep(handle)));
        }
        background.push(tokio::spawn(purge_expired_keys(wiring.service.clone())));
        background.push(tokio::spawn(rebuild_coupon_gates(wiring.service.clone())));
        if config.audit_interval_secs > 0 {
            background.push(tokio::spawn(crate::audit::run_periodically(
                Arc::clone(&wiring.auditor),
                wiring.service.clone(),
                Duration::from_secs(config.audit_interval_secs),
            )));
        }

        let auth = config.authenticator()?;
        if auth.is_open() {
            tracing::warn!(
                "neither API_TOKEN nor AUTH_JWT_* is set: /api/* is OPEN to every caller (run it behind a gateway that authenticates)"
            );
        }
        let state = Data::new(AppState {
            service: wiring.service.clone(),
            dependencies: wiring.dependencies,
            metrics,
            auth,
            metrics_token: config
                .metrics_token
                .as_ref()
                .map(|t| {
                    http_actix::auth::check_token("METRICS_TOKEN", t.expose_secret())
                        .map(str::to_owned)
                })
                .transpose()?,
        });
        raise_open_file_limit(config.max_connections);
        let listener = TcpListener::bind(config.bind_addr)
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.bind_addr))?;
        let port = listener.local_addr()?.port();
        let workers = config
            .http_workers
            .map(|w| w as usize)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, usize::from));
        // actix counts connections per worker; MAX_CONNECTIONS is for the whole process.
        let per_worker = (config.max_connections as usize).div_ceil(workers).max(1);
        let server = HttpServer::new(move || http_actix::build_app(state.clone()))
            .workers(workers)
            .max_connections(per_worker)
            .shutdown_timeout(config.shutdown_timeout_secs)
            // Signals are ours (run_until_stopped), so tests can run many servers in one process.
            .disable_signals()
            .listen(listener)?
            .run();
        tracing::info!(address = %config.bind_addr.ip(), port, "listening");
        Ok(Self {
            port,
            server,
            service: wiring.service,
            background,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn service(&self) -> &BalanceService {
        &self.service
    }

    /// A handle that stops the server (gracefully with `stop(true)`).
    pub fn handle(&self) -> ServerHandle {
        self.server.handle()
    }

    /// Serves until `shutdown` completes, then stops accepting, lets in-flight requests
    /// finish (their locks are released on their normal path) and returns.
    ///
    /// # Errors
    /// When the server fails.
    pub async fn run_until_stopped(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let handle = self.server.handle();
        let stopper = tokio::spawn(async move {
            shutdown.await;
            tracing::info!("shutting down: no new connections; finishing requests in flight");
            handle.stop(true).await;
        });
        let result = self.server.await;
        stopper.abort();
        for task in self.background {
            task.abort();
        }
        tracing::info!(in_flight = self.service.in_flight(), "stopped");
        result
    }
}

/// Deletes expired idempotency records in small batches, forever. Safe on every instance:
/// each batch deletes only what has expired, whoever gets there first.
async fn purge_expired_keys(service: BalanceService) {
    let mut tick = tokio::time::interval(PURGE_EVERY);
    loop {
        tick.tick().await;
        loop {
            match service.purge_expired_keys(PURGE_BATCH).await {
                Ok(n) if n >= u64::from(PURGE_BATCH) => tokio::task::yield_now().await,
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "purging expired idempotency records failed");
                    break;
                }
            }
        }
    }
}

/// Raises the soft open-file limit as far as the hard limit allows (every connection is a
/// file descriptor; the usual soft default of 1024 would refuse connections long before
/// `MAX_CONNECTIONS`), and says what it got.
fn raise_open_file_limit(max_connections: u32) {
    // Connections, plus the database pool, Redis, logs and the listener.
    let wanted = u64::from(max_connections) + 1024;
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) if limit < wanted => tracing::warn!(
            open_files = limit,
            max_connections,
            "the open-file limit is below MAX_CONNECTIONS plus headroom; connections past it are refused (raise the hard limit: ulimit -Hn, LimitNOFILE=)"
        ),
        Ok(limit) => tracing::info!(open_files = limit, "open-file limit raised"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open-file limit"),
    }
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("SIGINT received"),
        () = terminate => tracing::info!("SIGTERM received"),
    }
}
