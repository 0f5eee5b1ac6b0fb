//! The fred (Redis) adapters of the [`LockManager`] port and (in the `gate` module,
//! [`RedisCouponGate`]) of the `CouponGate` port. The lock:
//!
//! - **acquire**: `SET {prefix}{key} {token} NX PX {lease}` with a random token; while the
//!   key is held elsewhere, retried with jittered exponential backoff until the wait runs
//!   out. Within one process, waiters for the same key queue locally (FIFO) and only the
//!   head of the queue polls Redis, and only while the key is held by another process.
//! - **release**: a Lua compare-and-delete, so only the token's holder can delete the key
//!   and a lease that expired and was taken by somebody else is left alone. When a waiter
//!   in this process is next in line, a young chain of holders hands the key straight over
//!   instead (no Redis round trip; see [`HandoffPolicy`] and the `local` module).
//! - **Redis down**: every call answers [`LockError::Unavailable`] at once (no connection)
//!   or within the command timeout, never after the whole wait; the connection keeps
//!   reconnecting in the background, so the manager recovers by itself when Redis returns.
//! - **Redis Cluster** (a `redis-cluster://` URL): both scripts touch a lock key and its
//!   waiting marker, so on a cluster the lock key's name is a hash tag (`{prefix}{{key}}`)
//!   and the two share a slot; see [`KeyLayout`].

mod backoff;
mod gate;
mod local;

use std::fmt;
use std::time::Duration;

use anyhow::Context as _;
use async_trait::async_trait;
use domain::ports::{LockError, LockKey, LockLease, LockManager, Release};
use fred::prelude::{
    Builder, Client, ClientLike, Config, Error as RedisError, ErrorKind, LuaInterface, Pool,
    ReconnectPolicy, TcpConfig,
};
use fred::types::ConnectHandle;
use fred::types::config::UnresponsiveConfig;
use fred::types::scripts::Script;
use tokio::time::Instant;

use crate::backoff::Backoff;
pub use crate::gate::{GATE_REDIS_ERRORS_TOTAL, RedisCouponGate, RedisGateConfig};
pub use crate::local::HandoffPolicy;
use crate::local::{Chain, Claim, KeyQueues, ReleaseStep};

/// Redis errors met by the lock (counter), labelled `op` (`acquire`, `release`, `ping`) and
/// `outcome`, what the port was told (`unavailable`, `unexpected`). The use case counts
/// waits, timeouts and lost leases itself; this says why the lock service failed.
pub const REDIS_ERRORS_TOTAL: &str = "balance_lock_redis_errors_total";

/// Locks handed from a releasing holder to a waiter of the same process without a Redis
/// round trip (counter).
pub const HANDOFFS_TOTAL: &str = "balance_lock_handoffs_total";

/// Deletes the key only if it still holds the caller's token: a plain DEL after the lease
/// expired would delete the lock of whoever took the key next.
const COMPARE_AND_DELETE: &str =
    "if redis.call('get',KEYS[1])==ARGV[1] then return redis.call('del',KEYS[1]) else return 0 end";

/// `SET NX PX` that leaves a trace when it fails: KEYS[2], the key's *waiting marker*,
/// names the last process that found the key held (ARGV[3], for ARGV[4] ms). On success it
/// answers 2 instead of 1 when another process's marker is there: somebody else waits, so
/// this chain of holders hands nothing off. Answers 0 when the key is held.
const ACQUIRE: &str = "if redis.call('set',KEYS[1],ARGV[1],'NX','PX',ARGV[2]) then \
       local w=redis.call('get',KEYS[2]) \
       if w and w~=ARGV[3] then return 2 end \
       return 1 \
     end \
     redis.call('set',KEYS[2],ARGV[3],'PX',ARGV[4]) \
     return 0";

/// The compare-and-delete of a release: 0 when KEYS[1] does not hold ARGV[1], else deletes
/// it and answers 2 when another process (not ARGV[2]) has left a waiting marker, 1 if not.
const RELEASE: &str = "if redis.call('get',KEYS[1])~=ARGV[1] then return 0 end \
     redis.call('del',KEYS[1]) \
     local w=redis.call('get',KEYS[2]) \
     if w and w~=ARGV[2] then return 2 end \
     return 1";

/// How the manager talks to Redis. The defaults suit a Redis on the same network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisLockConfig {
    /// Bound on opening a connection (TCP and the HELLO/AUTH/SELECT handshake), and how
    /// long [`RedisLockManager::connect_with`] waits for the first connection.
    pub connect_timeout: Duration,
    /// Bound on each Redis command. A command that takes longer makes the call answer
    /// [`LockError::Unavailable`]: a lock service this slow is as good as down.
    pub command_timeout: Duration,
    /// Longest pause between two reconnection attempts while Redis is down. Attempts never
    /// stop, so the manager recovers by itself; the pause only bounds how soon.
    pub reconnect_max_delay: Duration,
    /// Connections to Redis. Commands are pipelined, so one carries a lot of lock traffic.
    pub pool_size: usize,
    /// First ceiling of the random pause between two attempts on a held key.
    pub retry_initial: Duration,
    /// Cap of that ceiling: how stale a poller's view of a freed key can get.
    pub retry_max: Duration,
    /// When a release hands the key to the next waiter of this process.
    pub handoff: HandoffPolicy,
}

impl Default for RedisLockConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(1),
            command_timeout: Duration::from_millis(500),
            reconnect_max_delay: Duration::from_secs(2),
            pool_size: 1,
            retry_initial: Duration::from_millis(2),
            retry_max: Duration::from_millis(25),
            // Long enough to take a hot key's round trips off its critical path, short
            // enough that other processes get a turn several times a second.
            handoff: HandoffPolicy {
                max_handoffs: 32,
                max_age: Duration::from_millis(100),
            },
        }
    }
}

/// How lock keys are named in Redis. Each script touches two keys, the lock key and its
/// waiting marker (the lock key followed by `:waiting`), which a Redis Cluster only allows
/// when both hash to one slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyLayout {
    /// One Redis (or Sentinel): `{prefix}balance:user:42`, the names this service always
    /// used, so instances of older and newer versions keep excluding each other during a
    /// rolling upgrade.
    Plain,
    /// A Redis Cluster: `{prefix}{balance:user:42}`. The braces are a hash tag: only the
    /// domain key is hashed, so the marker (`…}:waiting`) lands in the lock key's slot, and
    /// different users still spread over the slots (and so over the primaries).
    HashTagged,
}

impl KeyLayout {
    /// The Redis key of the lock on `key`.
    pub fn lock_key(self, prefix: &str, key: &LockKey) -> String {
        match self {
            Self::Plain => format!("{prefix}{}", key.as_str()),
            Self::HashTagged => format!("{prefix}{{{}}}", key.as_str()),
        }
    }

    /// The Redis key of the waiting marker of the lock stored at `lock_key`.
    pub fn marker_key(lock_key: &str) -> String {
        format!("{lock_key}:waiting")
    }
}

/// A [`LockManager`] shared by every process that uses the same Redis and key prefix.
pub struct RedisLockManager {
    pool: Pool,
    prefix: String,
    layout: KeyLayout,
    acquire_script: Script,
    release_script: Script,
    /// This manager's name in waiting markers (see [`ACQUIRE`]).
    id: String,
    /// How long a waiting marker lives, in ms: longer than a poller's longest pause, so it
    /// stays while somebody polls.
    marker_ms: String,
    config: RedisLockConfig,
    queues: KeyQueues,
    /// The tasks driving the pool's connections; aborted on drop, or they would keep
    /// reconnecting to a Redis nobody uses any more.
    connections: Vec<ConnectHandle>,
    /// Deletes keys parked for a waiter that left (see the `local` module); aborted on drop.
    reaper: tokio::task::JoinHandle<()>,
}

impl fmt::Debug for RedisLockManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The pool's config holds the Redis password: leave it out.
        f.debug_struct("RedisLockManager")
            .field("prefix", &self.prefix)
            .field("layout", &self.layout)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Drop for RedisLockManager {
    fn drop(&mut self) {
        for connection in &self.connections {
            connection.abort();
        }
        self.reaper.abort();
    }
}

/// The `host:port` of every server a Redis URL names, for the start-up log: never its
/// password.
///
/// # Errors
/// When `url` is not a valid Redis URL.
pub fn servers(url: &str) -> anyhow::Result<Vec<String>> {
    let config = Config::from_url(url).context("invalid Redis URL")?;
    Ok(config
        .server
        .hosts()
        .iter()
        .map(ToString::to_string)
        .collect())
}

impl RedisLockManager {
    /// Connects with [`RedisLockConfig::default`]. See [`RedisLockManager::connect_with`].
    ///
    /// # Errors
    /// When `url` is not a valid Redis URL.
    pub async fn connect(url: &str, key_prefix: &str) -> anyhow::Result<Self> {
        Self::connect_with(url, key_prefix, RedisLockConfig::default()).await
    }

    /// Connects to the Redis at `url` (`redis://[user:password@]host:port[/db]`, or a cluster:
    /// `redis-cluster://[user:password@]host:port?node=host:port&…`); every lock key is
    /// stored under `key_prefix` as [`KeyLayout`] says. Waits up to `connect_timeout` for the first
    /// connection. If Redis cannot be reached yet this still succeeds, with a warning:
    /// the service can start while Redis is down (its calls answer `Unavailable` and the
    /// use case applies its policy), and the connection comes up once Redis does.
    /// Must be called inside a tokio runtime.
    ///
    /// # Errors
    /// When `url` is not a valid Redis URL or the configuration is invalid (on a cluster,
    /// a key prefix with a brace, which would change the hash tag).
    pub async fn connect_with(
        url: &str,
        key_prefix: &str,
        config: RedisLockConfig,
    ) -> anyhow::Result<Self> {
        let (pool, clustered) = build_pool(
            url,
            key_prefix,
            &PoolSettings {
                connect_timeout: config.connect_timeout,
                command_timeout: config.command_timeout,
                longest_command: config.command_timeout,
                reconnect_max_delay: config.reconnect_max_delay,
                pool_size: config.pool_size,
            },
        )?;
        let layout = if clustered {
            KeyLayout::HashTagged
        } else {
            KeyLayout::Plain
        };

        let connections = pool.connect_pool();
        let (orphans, mut parked) = tokio::sync::mpsc::unbounded_channel::<(String, String)>();
        let reaper_pool = pool.clone();
        let reaper = tokio::spawn(async move {
            while let Some((key, token)) = parked.recv().await {
                // Bounded by the command timeout; if Redis is away the lease expires anyway.
                let deleted: Result<i64, RedisError> = reaper_pool
                    .next()
                    .eval(COMPARE_AND_DELETE, vec![key], vec![token])
                    .await;
                if let Err(e) = deleted {
                    tracing::debug!(error = %e, "could not delete a parked lock nobody took");
                }
            }
        });
        let manager = Self {
            pool,
            prefix: key_prefix.to_owned(),
            layout,
            acquire_script: Script::from_lua(ACQUIRE),
            release_script: Script::from_lua(RELEASE),
            id: uuid::Uuid::new_v4().simple().to_string(),
            marker_ms: u64::try_from(config.retry_max.as_millis().saturating_mul(2))
                .unwrap_or(u64::MAX)
                .max(50)
                .to_string(),
            config,
            queues: KeyQueues::new(orphans),
            connections,
            reaper,
        };
        if !manager.wait_until_connected().await {
            tracing::warn!(
                "Redis is not reachable yet: lock calls answer Unavailable until it is; reconnecting in the background"
            );
        }
        Ok(manager)
    }

    /// Readiness: Redis answers PING within the command timeout.
    ///
    /// # Errors
    /// When Redis is not connected or does not answer.
    pub async fn ping(&self) -> anyhow::Result<()> {
        let client = self.connected_client("ping")?;
        client
            .ping::<String>(None)
            .await
            .map_err(|e| redis_error("ping", e))?;
        Ok(())
    }

    /// Whether a caller of this manager is waiting for `key` (a release would hand it over).
    pub fn has_local_waiter(&self, key: &LockKey) -> bool {
        self.queues.is_awaited(&self.redis_key(key))
    }

    /// The Redis key of the lock on `key`.
    pub fn redis_key(&self, key: &LockKey) -> String {
        self.layout.lock_key(&self.prefix, key)
    }

    /// How this manager names its keys (it follows the URL: a cluster or not).
    pub fn layout(&self) -> KeyLayout {
        self.layout
    }

    /// Polls the connection state rather than waiting for fred's connect event, which
    /// could fire between a state check and the subscription and be missed.
    async fn wait_until_connected(&self) -> bool {
        let deadline = Instant::now() + self.config.connect_timeout;
        loop {
            if self.pool.clients().iter().all(ClientLike::is_connected) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A connected client, or `Unavailable` at once: while fred reconnects, a command would
    /// sit in its queue for the whole command timeout before failing.
    fn connected_client(&self, op: &'static str) -> Result<&Client, LockError> {
        let client = self.pool.next_connected();
        if client.is_connected() {
            Ok(client)
        } else {
            count_error(op, "unavailable");
            Err(LockError::Unavailable(anyhow::anyhow!(
                "not connected to Redis (state: {:?})",
                client.state()
            )))
        }
    }

    /// One `SET NX PX` (the [`ACQUIRE`] script).
    async fn try_set(
        &self,
        client: &Client,
        key: &str,
        token: &str,
        lease_ms: i64,
    ) -> Result<Outcome, LockError> {
        let unconfirmed = UnconfirmedSet::new(client, key, token);
        let reply: Result<i64, RedisError> = self
            .acquire_script
            .evalsha_with_reload(
                client,
                vec![key.to_owned(), KeyLayout::marker_key(key)],
                vec![
                    token.to_owned(),
                    lease_ms.to_string(),
                    self.id.clone(),
                    self.marker_ms.clone(),
                ],
            )
            .await;
        match reply {
            Ok(reply) => {
                unconfirmed.confirm();
                Outcome::from_reply("acquire", reply)
            }
            // `unconfirmed` is dropped armed here: the SET may still have gone through.
            Err(e) => Err(redis_error("acquire", e)),
        }
    }
}

#[async_trait]
impl LockManager for RedisLockManager {
    async fn acquire(
        &self,
        key: &LockKey,
        wait: Duration,
        lease: Duration,
    ) -> Result<LockLease, LockError> {
        // One deadline for the local queue and the Redis polling together.
        let deadline = deadline_after(wait);
        // Fail fast before queueing: with Redis down the wait would only delay `Unavailable`.
        self.connected_client("acquire")?;
        let redis_key = self.redis_key(key);
        let Some(turn) = self.queues.take_turn(&redis_key, deadline).await else {
            return Err(LockError::Timeout);
        };

        let token = uuid::Uuid::new_v4().simple().to_string();
        let held = || {
            Ok(LockLease {
                key: key.clone(),
                token: token.clone(),
            })
        };
        // PX takes whole milliseconds, at least 1.
        let lease_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX).max(1);
        let mut backoff = Backoff::new(self.config.retry_initial, self.config.retry_max);
        loop {
            match turn.claim(&token) {
                Claim::Taken => {
                    metrics::counter!(HANDOFFS_TOTAL).increment(1);
                    return held();
                }
                Claim::HeldHere(lease_end) => {
                    // Held by this process: its release hands the key over or wakes this
                    // turn, so there is nothing to ask Redis. Look again at least every
                    // `retry_max`: a release whose delete failed or was cancelled (Redis
                    // down, a client gone) wakes nobody.
                    let now = Instant::now();
                    if now >= deadline {
                        return Err(LockError::Timeout);
                    }
                    let look_again = (now + self.config.retry_max).min(lease_end);
                    tokio::select! {
                        () = tokio::time::sleep_until(deadline.min(look_again)) => {}
                        () = turn.released() => {}
                    }
                    continue;
                }
                Claim::Free => {
                    // This process just released the key while another process waited:
                    // let that one take it first (its polls are at most `retry_max` apart).
                    if let Some(until) = turn.take_courtesy()
                        && until > Instant::now()
                    {
                        tokio::time::sleep_until(until.min(deadline)).await;
                    }
                }
            }
            // Checked on every attempt: Redis may have gone while this call waited.
            let client = self.connected_client("acquire")?;
            let sent = Instant::now();
            let taken = self.try_set(client, &redis_key, &token, lease_ms).await?;
            if taken != Outcome::Missed {
                let others_wait = taken == Outcome::WhileOthersWait;
                turn.hold(Chain::begun(&token, sent, lease, others_wait));
                return held();
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(LockError::Timeout);
            }
            // Never sleep past the deadline; one last attempt is made when it is reached. A
            // release by this process ends the pause early.
            tokio::select! {
                () = tokio::time::sleep(backoff.next_pause().min(deadline - now)) => {}
                () = turn.released() => {}
            }
        }
    }

    async fn release(&self, lease: &LockLease) -> Result<Release, LockError> {
        let redis_key = self.redis_key(&lease.key);
        // No hand-off while Redis is unreachable: the key there may be gone (a restart)
        // and another process may hold it; the waiter then meets the outage itself.
        let policy = if self.pool.next().is_connected() {
            self.config.handoff
        } else {
            HandoffPolicy {
                max_handoffs: 0,
                ..self.config.handoff
            }
        };
        match self.queues.release(&redis_key, &lease.token, policy) {
            ReleaseStep::HandedOff => Ok(Release::Released),
            ReleaseStep::NotHolder => Ok(Release::LeaseLost),
            ReleaseStep::Delete(token) => match self.delete(&redis_key, &token).await? {
                Outcome::Missed => Ok(Release::LeaseLost),
                Outcome::Alone => {
                    self.queues.wake(&redis_key, None);
                    Ok(Release::Released)
                }
                Outcome::WhileOthersWait => {
                    let courtesy = Instant::now() + self.config.retry_max;
                    self.queues.wake(&redis_key, Some(courtesy));
                    Ok(Release::Released)
                }
            },
        }
    }
}

impl RedisLockManager {
    /// The compare-and-delete of `key` if it holds `token` (the [`RELEASE`] script).
    async fn delete(&self, key: &str, token: &str) -> Result<Outcome, LockError> {
        let client = self.connected_client("release")?;
        let deleted: i64 = self
            .release_script
            .evalsha_with_reload(
                client,
                vec![key.to_owned(), KeyLayout::marker_key(key)],
                vec![token.to_owned(), self.id.clone()],
            )
            .await
            .map_err(|e| redis_error("release", e))?;
        Outcome::from_reply("release", deleted)
    }
}

/// How a pool of connections to Redis is opened: the part of [`RedisLockConfig`] (and of
/// the coupon gate's config) that is about the connection.
pub(crate) struct PoolSettings {
    pub(crate) connect_timeout: Duration,
    pub(crate) command_timeout: Duration,
    /// The longest any command on these connections may take by its own timeout (a gate's
    /// load carries every holder of a coupon): a connection is called unresponsive only
    /// when a command went unanswered for that plus `command_timeout`.
    pub(crate) longest_command: Duration,
    pub(crate) reconnect_max_delay: Duration,
    pub(crate) pool_size: usize,
}

/// A pool on the Redis at `url`, not connected yet, and whether it is a cluster. Every
/// adapter of this crate talks to Redis through one of these: one attempt per command,
/// bounded commands, half-open connections dropped, reconnection forever.
///
/// # Errors
/// When `url` is not a valid Redis URL or the configuration is invalid (on a cluster,
/// a key prefix with a brace, which would change the hash tag).
pub(crate) fn build_pool(
    url: &str,
    key_prefix: &str,
    config: &PoolSettings,
) -> anyhow::Result<(Pool, bool)> {
    anyhow::ensure!(
        config.pool_size >= 1,
        "the Redis pool needs at least one connection"
    );
    // The URL is not logged or put in the error: it may carry the password.
    let redis_config = Config {
        // Retry the first connection like any later one instead of failing start-up.
        fail_fast: false,
        ..Config::from_url(url).context("invalid Redis URL")?
    };
    let clustered = redis_config.server.is_clustered();
    if clustered {
        // A brace in the prefix would start the hash tag there: every key in one slot,
        // or (with `{}`) no tag at all and keys that must share a slot in different ones.
        anyhow::ensure!(
            !key_prefix.contains(['{', '}']),
            "on a Redis Cluster the key prefix must not contain '{{' or '}}'"
        );
    }
    let reconnect_max_ms =
        u32::try_from(config.reconnect_max_delay.as_millis()).unwrap_or(u32::MAX);
    let pool = Builder::from_config(redis_config)
        .with_connection_config(|connection| {
            connection.connection_timeout = config.connect_timeout;
            connection.internal_command_timeout = config.connect_timeout;
            // One attempt: a SET NX replayed after a lost reply would find our own key and
            // wait for it (an unknown outcome is cleaned up instead, see `UnconfirmedSet`),
            // and a gate script replayed would count twice what it ran once.
            connection.max_command_attempts = 1;
            // A half-open connection (no RST, e.g. a network partition) would otherwise
            // time out every command until TCP gives up after minutes; close it and
            // reconnect, so calls fail fast on the connection state instead.
            // Not before the longest command's own timeout, or a long one that Redis is
            // still running (a gate load of 100k holders on a busy server) is cut with its
            // connection instead of answered.
            connection.unresponsive = UnresponsiveConfig {
                max_timeout: Some(
                    config
                        .longest_command
                        .max(config.command_timeout)
                        .saturating_add(config.command_timeout),
                ),
                interval: (config.command_timeout / 2).max(Duration::from_millis(10)),
            };
            // Lock and gate commands are small request/reply pairs: Nagle would only delay them.
            connection.tcp = TcpConfig {
                nodelay: Some(true),
                ..TcpConfig::default()
            };
        })
        .with_performance_config(|performance| {
            performance.default_command_timeout = config.command_timeout;
        })
        // max_attempts 0: never give up, or the adapter would stay down after an outage.
        .set_policy(ReconnectPolicy::new_exponential(
            0,
            100,
            reconnect_max_ms,
            2,
        ))
        .build_pool(config.pool_size)
        .context("invalid Redis configuration")?;
    Ok((pool, clustered))
}

/// What the [`ACQUIRE`] or [`RELEASE`] script did (their answers 0, 1 and 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Nothing: the key is held by somebody else (acquire) or no longer holds the token
    /// (release: expired, or taken by somebody else).
    Missed,
    /// Took or deleted the key, with no other process waiting.
    Alone,
    /// Took or deleted the key while another process had left its waiting marker.
    WhileOthersWait,
}

impl Outcome {
    fn from_reply(op: &'static str, reply: i64) -> Result<Self, LockError> {
        match reply {
            0 => Ok(Self::Missed),
            1 => Ok(Self::Alone),
            2 => Ok(Self::WhileOthersWait),
            other => {
                count_error(op, "unexpected");
                Err(LockError::Unexpected(anyhow::anyhow!(
                    "the {op} script answered {other}, expected 0, 1 or 2"
                )))
            }
        }
    }
}

fn deadline_after(wait: Duration) -> Instant {
    let now = Instant::now();
    // A wait too long to represent is as good as forever: a year is.
    now.checked_add(wait)
        .unwrap_or_else(|| now + Duration::from_secs(365 * 24 * 3600))
}

/// Maps a fred error to the port's error, counting it.
fn redis_error(op: &'static str, error: RedisError) -> LockError {
    if is_unavailable(&error) {
        count_error(op, "unavailable");
        LockError::Unavailable(anyhow::Error::new(error).context(format!("Redis {op} failed")))
    } else {
        count_error(op, "unexpected");
        LockError::Unexpected(anyhow::Error::new(error).context(format!("Redis {op} failed")))
    }
}

fn count_error(op: &'static str, outcome: &'static str) {
    metrics::counter!(REDIS_ERRORS_TOTAL, "op" => op, "outcome" => outcome).increment(1);
}

/// Whether the error means the lock service cannot serve us right now (the port's
/// `Unavailable`, which the use case answers with its degrade/fail policy) rather than a
/// request this code got wrong. Only errors that a retry against a healthy Redis would
/// repeat are `Unexpected` (a 500): a bad command, argument or configuration. Everything
/// else, including a connection dropped mid-command (`Protocol`, `Unknown`, …) and
/// Redis replies such as LOADING or READONLY, is `Unavailable`: the chaos suite saw a
/// killed Redis surface as a 500 before this was widened.
fn is_unavailable(error: &RedisError) -> bool {
    match error.kind() {
        ErrorKind::Config
        | ErrorKind::Url
        | ErrorKind::InvalidCommand
        | ErrorKind::InvalidArgument => false,
        // A Redis error reply starts with its code: `ERR`, `WRONGTYPE` and `CROSSSLOT` (a
        // cluster refusing a script whose keys are in different slots) say the command
        // itself was wrong, which waiting will not fix.
        ErrorKind::Unknown => !matches!(
            error.details().split_whitespace().next(),
            Some("ERR" | "WRONGTYPE" | "CROSSSLOT")
        ),
        _ => true,
    }
}

/// A `SET NX` whose reply has not been seen. If the reply never comes (timeout, dropped
/// connection, or the caller dropping the acquire future), the SET may still have taken
/// the key under a token nobody knows, blocking every process for the whole lease. So
/// unless confirmed, dropping it spawns a compare-and-delete of that token.
struct UnconfirmedSet {
    pending: Option<(Client, String, String)>,
}

impl UnconfirmedSet {
    fn new(client: &Client, key: &str, token: &str) -> Self {
        Self {
            pending: Some((client.clone(), key.to_owned(), token.to_owned())),
        }
    }

    fn confirm(mut self) {
        self.pending = None;
    }
}

impl Drop for UnconfirmedSet {
    fn drop(&mut self) {
        let Some((client, key, token)) = self.pending.take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            // EVAL, not EVALSHA: this runs when replies are late, and a NOSCRIPT answered
            // after our timeout (a restarted Redis) would never be followed by the reload.
            // Bounded by the command timeout; if Redis stays away the lease expires anyway.
            let cleaned: Result<i64, RedisError> = client
                .eval(COMPARE_AND_DELETE, vec![key], vec![token])
                .await;
            if let Err(e) = cleaned {
                tracing::debug!(error = %e, "could not clean up after an unconfirmed lock SET");
            }
        });
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn connection_trouble_and_not_now_replies_are_unavailable() {
        for kind in [
            ErrorKind::IO,
            ErrorKind::Timeout,
            ErrorKind::Canceled,
            ErrorKind::Backpressure,
            ErrorKind::Protocol,
            ErrorKind::Parse,
            ErrorKind::Routing,
            // CLUSTERDOWN, or MOVED and ASK past the redirection limit: a failover in progress.
            ErrorKind::Cluster,
        ] {
            assert!(is_unavailable(&RedisError::new(kind, "x")));
        }
        assert!(is_unavailable(&RedisError::new(
            ErrorKind::Unknown,
            "LOADING Redis is loading the dataset in memory"
        )));
        assert!(is_unavailable(&RedisError::new(
            ErrorKind::Unknown,
            "READONLY You can't write against a read only replica."
        )));
        assert!(is_unavailable(&RedisError::new(
            ErrorKind::Unknown,
            "Connection closed abruptly"
        )));
        // What fred 10.1 answers when a command finds no connection (seen by the chaos suite).
        assert!(is_unavailable(&RedisError::new(
            ErrorKind::Unknown,
            "Failed to route command."
        )));
    }

    #[test]
    fn bad_requests_are_unexpected() {
        assert!(!is_unavailable(&RedisError::new(
            ErrorKind::Unknown,
            "ERR unknown command"
        )));
        assert!(!is_unavailable(&RedisError::new(
            ErrorKind::Unknown,
            "CROSSSLOT Keys in request don't hash to the same slot"
        )));
        assert!(!is_unavailable(&RedisError::new(
            ErrorKind::InvalidArgument,
            "x"
        )));
        assert!(!is_unavailable(&RedisError::new(ErrorKind::Url, "x")));
    }

    fn user(id: i64) -> LockKey {
        LockKey::user_balance(domain::types::UserId::new(id).unwrap())
    }

    #[test]
    fn the_plain_layout_keeps_the_names_of_older_versions() {
        let lock = KeyLayout::Plain.lock_key("lock:", &user(42));
        assert_eq!(lock, "lock:balance:user:42");
        assert_eq!(KeyLayout::marker_key(&lock), "lock:balance:user:42:waiting");
    }

    #[test]
    fn on_a_cluster_a_lock_and_its_marker_share_a_slot_and_users_spread() {
        use fred::util::redis_keyslot;
        let mut slots = std::collections::BTreeSet::new();
        for id in 1..=100 {
            let lock = KeyLayout::HashTagged.lock_key("lock:", &user(id));
            assert_eq!(lock, format!("lock:{{balance:user:{id}}}"));
            let marker = KeyLayout::marker_key(&lock);
            let slot = redis_keyslot(lock.as_bytes());
            assert_eq!(
                slot,
                redis_keyslot(marker.as_bytes()),
                "{lock} and {marker}"
            );
            // Only the tag is hashed: the prefix does not move a user's slot.
            let other_prefix = KeyLayout::HashTagged.lock_key("other:", &user(id));
            assert_eq!(slot, redis_keyslot(other_prefix.as_bytes()));
            slots.insert(slot);
        }
        assert!(
            slots.len() > 90,
            "users spread over the slots: {}",
            slots.len()
        );
    }

    #[test]
    fn an_unrepresentable_wait_still_has_a_deadline() {
        assert!(deadline_after(Duration::MAX) > Instant::now());
    }
}
