//! The fred (Redis) adapter of the [`CouponGate`] port: the coupon admission gate.
//!
//! Every call is one Lua script (or one command), atomic on the coupon's slot: all keys of
//! a coupon share the hash tag `{coupon:ID}`, so the gate works alike on one Redis and on
//! a Redis Cluster (where the key prefix must not contain a brace).
//!
//! - `{prefix}{coupon:ID}:gate`: hash `total`, `taken`, `starts_ms`, `ends_ms` (-1: never
//!   closes);
//! - `{prefix}{coupon:ID}:holders`: hash user -> `I|key` (issued under key) or
//!   `P|key|token` (a unit pending for the admission of `token`);
//! - `{prefix}{coupon:ID}:pending`: sorted set of the pending users, by admission ms;
//! - `{prefix}{coupon:ID}:rec:{user}:{key}`: a refusal the gate recorded under the key
//!   (`fp`, `status`, `body`, `expires_ms`), living until the request's `expires_at`.
//!
//! The scripts are in `gate/*.lua`; their headers say what they take and answer. Every
//! instant is the caller's (`GateRequest::now`, the `now` of a load), in milliseconds,
//! so the gate keeps the service's clock, not Redis's; only the memory a recorded
//! refusal takes is reclaimed on Redis's clock (a `PEXPIRE` of the same length).

use std::fmt;
use std::time::Duration;

use anyhow::Context as _;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use domain::idempotency::{Fingerprint, StoredResponse};
use domain::ports::{
    CouponGate, GateAnswer, GateError, GateRefusal, GateRequest, GateSnapshot, GateView,
};
use domain::types::{CouponId, IdempotencyKey, UserId};
use fred::prelude::{Client, ClientLike, Error as RedisError, KeysInterface, Options, Pool};
use fred::types::scripts::Script;
use fred::types::{ClusterHash, ConnectHandle, CustomCommand, Value};
use fred::util::redis_keyslot;
use tokio::time::Instant;

use crate::{PoolSettings, build_pool, is_unavailable};

/// Redis errors met by the coupon gate (counter), labelled `op` (`admit`, `confirm`,
/// `give_back`, `load`, `forget`, `inspect`) and `outcome`, what the port was told
/// (`unavailable`, `unexpected`).
pub const GATE_REDIS_ERRORS_TOTAL: &str = "coupon_gate_redis_errors_total";

const ADMIT: &str = include_str!("gate/admit.lua");
const CONFIRM: &str = include_str!("gate/confirm.lua");
const GIVE_BACK: &str = include_str!("gate/give_back.lua");
const LOAD: &str = include_str!("gate/load.lua");
const INSPECT: &str = include_str!("gate/inspect.lua");
const RECORD: &str = include_str!("gate/record.lua");

/// How the gate talks to Redis, and when it calls a pending unit stale.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisGateConfig {
    /// Bound on opening a connection, and how long [`RedisCouponGate::connect_with`]
    /// waits for the first one.
    pub connect_timeout: Duration,
    /// Bound on each call but a load or an inspect: a gate this slow is as good as down
    /// ([`GateError::Unavailable`]).
    pub command_timeout: Duration,
    /// Bound on a load or an inspect, which carry every holder of the coupon (100k users
    /// are a few megabytes and some tens of milliseconds of Redis's time).
    pub bulk_timeout: Duration,
    /// Longest pause between two reconnection attempts while Redis is down.
    pub reconnect_max_delay: Duration,
    /// Connections to Redis.
    pub pool_size: usize,
    /// How long a unit may stay pending before a sold-out answer says it is stale (its
    /// holder may be gone): the longest a database step can take after its admission.
    /// The service loads the gate with the same figure.
    pub stale_after: Duration,
}

impl RedisGateConfig {
    /// The defaults, with `stale_after` (the service's lock wait plus lock lease).
    pub fn new(stale_after: Duration) -> Self {
        Self {
            connect_timeout: Duration::from_secs(1),
            command_timeout: Duration::from_millis(500),
            bulk_timeout: Duration::from_secs(5),
            reconnect_max_delay: Duration::from_secs(2),
            pool_size: 1,
            stale_after,
        }
    }
}

/// A script and its SHA-1: sent as EVALSHA, and as EVAL when the server does not know it
/// yet (a new or restarted node, a failover), which also caches it there.
struct GateScript {
    lua: &'static str,
    sha: String,
}

impl GateScript {
    fn new(lua: &'static str) -> Self {
        Self {
            lua,
            sha: Script::from_lua(lua).sha1().to_string(),
        }
    }

    /// EVALSHA, then EVAL on NOSCRIPT, routed to the slot of the first key (every key of
    /// a call is in it). Sent as a plain command so that a load or an inspect can carry a
    /// timeout of its own: fred's per-call options wrap a client, but its Lua interface is
    /// not implemented for the wrapper.
    async fn run<C>(
        &self,
        client: &C,
        keys: Vec<String>,
        args: Vec<Value>,
    ) -> Result<Value, RedisError>
    where
        C: ClientLike + Send + Sync,
    {
        let slot = keys.first().map_or(0, |key| redis_keyslot(key.as_bytes()));
        let command = |name: &'static str, script: &str| {
            let mut line: Vec<Value> = Vec::with_capacity(2 + keys.len() + args.len());
            line.push(Value::from(script));
            line.push(Value::from(keys.len() as i64));
            line.extend(keys.iter().map(|key| Value::from(key.as_str())));
            line.extend(args.iter().cloned());
            (
                CustomCommand::new_static(name, ClusterHash::Custom(slot), false),
                line,
            )
        };
        let (evalsha, line) = command("EVALSHA", &self.sha);
        match client.custom::<Value, Value>(evalsha, line).await {
            Err(e) if e.details().starts_with("NOSCRIPT") => {
                let (eval, line) = command("EVAL", self.lua);
                client.custom::<Value, Value>(eval, line).await
            }
            result => result,
        }
    }
}

/// The Redis keys of one coupon's gate.
struct CouponKeys {
    gate: String,
    holders: String,
    pending: String,
    /// `{prefix}{coupon:ID}:rec:`, followed by `{user}:{key}`.
    record_base: String,
}

impl CouponKeys {
    fn new(prefix: &str, coupon: CouponId) -> Self {
        let base = format!("{prefix}{{coupon:{}}}", coupon.get());
        Self {
            gate: format!("{base}:gate"),
            holders: format!("{base}:holders"),
            pending: format!("{base}:pending"),
            record_base: format!("{base}:rec:"),
        }
    }

    fn record(&self, user: UserId, key: &IdempotencyKey) -> String {
        format!("{}{}:{}", self.record_base, user.get(), key.as_str())
    }

    fn state(&self) -> Vec<String> {
        vec![
            self.gate.clone(),
            self.holders.clone(),
            self.pending.clone(),
        ]
    }
}

/// A [`CouponGate`] shared by every instance that uses the same Redis and key prefix.
pub struct RedisCouponGate {
    pool: Pool,
    prefix: String,
    config: RedisGateConfig,
    admit: GateScript,
    confirm: GateScript,
    give_back: GateScript,
    load: GateScript,
    inspect: GateScript,
    record: GateScript,
    /// The tasks driving the pool's connections; aborted on drop.
    connections: Vec<ConnectHandle>,
}

impl fmt::Debug for RedisCouponGate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The pool's config holds the Redis password: leave it out.
        f.debug_struct("RedisCouponGate")
            .field("prefix", &self.prefix)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Drop for RedisCouponGate {
    fn drop(&mut self) {
        for connection in &self.connections {
            connection.abort();
        }
    }
}

impl RedisCouponGate {
    /// Connects with [`RedisGateConfig::new`]`(stale_after)`. See
    /// [`RedisCouponGate::connect_with`].
    ///
    /// # Errors
    /// When `url` is not a valid Redis URL.
    pub async fn connect(
        url: &str,
        key_prefix: &str,
        stale_after: Duration,
    ) -> anyhow::Result<Self> {
        Self::connect_with(url, key_prefix, RedisGateConfig::new(stale_after)).await
    }

    /// Connects to the Redis (or Redis Cluster) at `url`, as
    /// [`RedisLockManager::connect_with`](crate::RedisLockManager::connect_with) does:
    /// every key is stored under `key_prefix`, the first connection is awaited up to
    /// `connect_timeout`, and a Redis that cannot be reached yet is no error (calls answer
    /// `Unavailable` until it can). Must be called inside a tokio runtime.
    ///
    /// # Errors
    /// When `url` is not a valid Redis URL or the configuration is invalid (on a cluster,
    /// a key prefix with a brace).
    pub async fn connect_with(
        url: &str,
        key_prefix: &str,
        config: RedisGateConfig,
    ) -> anyhow::Result<Self> {
        let (pool, _clustered) = build_pool(
            url,
            key_prefix,
            &PoolSettings {
                connect_timeout: config.connect_timeout,
                command_timeout: config.command_timeout,
                longest_command: config.bulk_timeout,
                reconnect_max_delay: config.reconnect_max_delay,
                pool_size: config.pool_size,
            },
        )?;
        let connections = pool.connect_pool();
        let gate = Self {
            pool,
            prefix: key_prefix.to_owned(),
            config,
            admit: GateScript::new(ADMIT),
            confirm: GateScript::new(CONFIRM),
            give_back: GateScript::new(GIVE_BACK),
            load: GateScript::new(LOAD),
            inspect: GateScript::new(INSPECT),
            record: GateScript::new(RECORD),
            connections,
        };
        if !gate.wait_until_connected().await {
            tracing::warn!(
                "Redis is not reachable yet: coupon gate calls answer Unavailable until it is; reconnecting in the background"
            );
        }
        Ok(gate)
    }

    /// How long a unit may stay pending before it is called stale.
    pub fn stale_after(&self) -> Duration {
        self.config.stale_after
    }

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

    /// A connected client, or `Unavailable` at once (a command would otherwise wait in
    /// fred's queue for the whole command timeout while it reconnects).
    fn connected_client(&self, op: &'static str) -> Result<&Client, GateError> {
        let client = self.pool.next_connected();
        if client.is_connected() {
            Ok(client)
        } else {
            count_error(op, "unavailable");
            Err(GateError::Unavailable(anyhow::anyhow!(
                "not connected to Redis (state: {:?})",
                client.state()
            )))
        }
    }

    fn keys(&self, coupon: CouponId) -> CouponKeys {
        CouponKeys::new(&self.prefix, coupon)
    }

    async fn run(
        &self,
        op: &'static str,
        script: &GateScript,
        keys: Vec<String>,
        args: Vec<Value>,
    ) -> Result<Value, GateError> {
        let client = self.connected_client(op)?;
        script
            .run(client, keys, args)
            .await
            .map_err(|e| redis_error(op, e))
    }
}

impl RedisCouponGate {
    /// [`RedisCouponGate::run`] bounded by the bulk timeout: a call that carries every
    /// holder of the coupon.
    async fn run_bulk(
        &self,
        op: &'static str,
        script: &GateScript,
        keys: Vec<String>,
        args: Vec<Value>,
    ) -> Result<Value, GateError> {
        let client = self.connected_client(op)?.with_options(&Options {
            timeout: Some(self.config.bulk_timeout.max(self.config.command_timeout)),
            ..Options::default()
        });
        script
            .run(&client, keys, args)
            .await
            .map_err(|e| redis_error(op, e))
    }
}

#[async_trait]
impl CouponGate for RedisCouponGate {
    async fn admit(&self, request: &GateRequest) -> Result<GateAnswer, GateError> {
        if request.token.is_empty() || request.token.contains('|') {
            return Err(unexpected(
                "admit",
                anyhow::anyhow!("a gate token must be non-empty and without '|'"),
            ));
        }
        let keys = self.keys(request.coupon);
        let now = millis(request.now);
        let stale_before = now.saturating_sub(duration_millis(self.config.stale_after));
        let args = vec![
            Value::from(request.user.get()),
            Value::from(request.key.as_str()),
            Value::from(request.fingerprint.as_str()),
            Value::from(request.token.as_str()),
            Value::from(now),
            Value::from(stale_before),
        ];
        let mut redis_keys = keys.state();
        redis_keys.push(keys.record(request.user, &request.key));
        let reply = self.run("admit", &self.admit, redis_keys, args).await?;
        parse_admit(reply).map_err(|e| unexpected("admit", e))
    }

    async fn confirm(
        &self,
        coupon: CouponId,
        user: UserId,
        key: &IdempotencyKey,
    ) -> Result<(), GateError> {
        let keys = self.keys(coupon);
        let args = vec![Value::from(user.get()), Value::from(key.as_str())];
        self.run("confirm", &self.confirm, keys.state(), args)
            .await?;
        Ok(())
    }

    async fn record(
        &self,
        coupon: CouponId,
        user: UserId,
        key: &IdempotencyKey,
        fingerprint: &Fingerprint,
        response: &StoredResponse,
        now: DateTime<Utc>,
        expires_at: DateTime<Utc>,
    ) -> Result<(), GateError> {
        let keys = self.keys(coupon);
        let expires = millis(expires_at);
        let args = vec![
            Value::from(fingerprint.as_str()),
            Value::from(i64::from(response.status)),
            Value::Bytes(response.body.clone().into()),
            Value::from(expires),
            Value::from(expires.saturating_sub(millis(now))),
        ];
        self.run("record", &self.record, vec![keys.record(user, key)], args)
            .await?;
        Ok(())
    }

    async fn give_back(
        &self,
        coupon: CouponId,
        user: UserId,
        token: &str,
    ) -> Result<(), GateError> {
        // No unit is ever pending under such a token (admit refuses it).
        if token.is_empty() || token.contains('|') {
            return Ok(());
        }
        let keys = self.keys(coupon);
        let args = vec![Value::from(user.get()), Value::from(token)];
        self.run("give_back", &self.give_back, keys.state(), args)
            .await?;
        Ok(())
    }

    async fn load(
        &self,
        snapshot: &GateSnapshot,
        now: DateTime<Utc>,
        stale_after: Duration,
    ) -> Result<(), GateError> {
        let coupon = &snapshot.coupon;
        let keys = self.keys(coupon.id);
        let stale_before = millis(now).saturating_sub(duration_millis(stale_after));
        let mut args = Vec::with_capacity(4 + 2 * snapshot.holders.len());
        args.push(Value::from(i64::from(coupon.total_quantity)));
        args.push(Value::from(millis(coupon.issue_starts_at)));
        args.push(Value::from(ends_millis(coupon.issue_ends_at)));
        args.push(Value::from(stale_before));
        for (user, key) in &snapshot.holders {
            args.push(Value::from(user.get()));
            args.push(Value::from(key.as_str()));
        }
        self.run_bulk("load", &self.load, keys.state(), args)
            .await?;
        Ok(())
    }

    async fn forget(&self, coupon: CouponId) -> Result<(), GateError> {
        let keys = self.keys(coupon);
        let client = self.connected_client("forget")?;
        // One DEL of three keys of one slot: atomic, and allowed on a cluster.
        let _: i64 = client
            .del(keys.state())
            .await
            .map_err(|e| redis_error("forget", e))?;
        Ok(())
    }

    async fn inspect(&self, coupon: CouponId) -> Result<Option<GateView>, GateError> {
        let keys = self.keys(coupon);
        let reply = self
            .run_bulk("inspect", &self.inspect, keys.state(), Vec::new())
            .await?;
        parse_inspect(reply).map_err(|e| unexpected("inspect", e))
    }
}

/// Milliseconds since the epoch, as the scripts compare them.
fn millis(at: DateTime<Utc>) -> i64 {
    at.timestamp_millis()
}

/// `ends_ms`: -1 when issuing never closes; an end before the epoch is the epoch (closed
/// either way at any instant the service sees).
fn ends_millis(ends: Option<DateTime<Utc>>) -> i64 {
    ends.map_or(-1, |ends| millis(ends).max(0))
}

fn duration_millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn from_millis(ms: i64) -> anyhow::Result<DateTime<Utc>> {
    DateTime::from_timestamp_millis(ms).with_context(|| format!("instant out of range: {ms} ms"))
}

fn text(value: &Value) -> anyhow::Result<String> {
    value
        .as_str()
        .map(|s| s.into_owned())
        .with_context(|| format!("expected a string in the gate's reply, got {value:?}"))
}

fn integer(value: &Value) -> anyhow::Result<i64> {
    // Integers come back as bulk strings from hashes and as floats' text from sorted sets
    // (`1700000000000`); both are whole numbers here.
    if let Value::Integer(i) = value {
        return Ok(*i);
    }
    let s = text(value)?;
    s.parse::<i64>()
        .with_context(|| format!("expected an integer in the gate's reply, got {s:?}"))
}

fn parse_admit(reply: Value) -> anyhow::Result<GateAnswer> {
    let items = match reply {
        Value::Array(items) => items,
        other => anyhow::bail!("the admit script answered {other:?}"),
    };
    let tag = items.first().map(text).transpose()?.unwrap_or_default();
    let field = |i: usize| {
        items
            .get(i)
            .with_context(|| format!("the admit script's {tag} answer lacks field {i}"))
    };
    Ok(match tag.as_str() {
        "missing" => GateAnswer::Missing,
        "admitted" => GateAnswer::Admitted,
        "pass" => GateAnswer::Pass,
        "reused" => GateAnswer::Reused,
        "refused" => {
            let refusal = match text(field(1)?)?.as_str() {
                "sold_out" => GateRefusal::SoldOut,
                "already_issued" => GateRefusal::AlreadyIssued,
                "not_open" => GateRefusal::NotOpen,
                other => anyhow::bail!("the admit script refused with {other:?}"),
            };
            GateAnswer::Refused {
                refusal,
                stale: integer(field(2)?)? != 0,
            }
        }
        "replay" => {
            let status = u16::try_from(integer(field(1)?)?).context("a recorded status")?;
            let body = field(2)?
                .as_bytes()
                .map(<[u8]>::to_vec)
                .context("a recorded body")?;
            GateAnswer::Replay {
                response: StoredResponse { status, body },
                expires_at: from_millis(integer(field(3)?)?)?,
            }
        }
        other => anyhow::bail!("the admit script answered {other:?}"),
    })
}

fn parse_inspect(reply: Value) -> anyhow::Result<Option<GateView>> {
    let items = match reply {
        Value::Null => return Ok(None),
        Value::Array(items) => items,
        other => anyhow::bail!("the inspect script answered {other:?}"),
    };
    let [total, taken, starts, ends, holders, pending] = <[Value; 6]>::try_from(items)
        .map_err(|items| anyhow::anyhow!("the inspect script answered {} fields", items.len()))?;
    let count = |v: &Value, what: &str| -> anyhow::Result<u32> {
        u32::try_from(integer(v)?).with_context(|| format!("the gate's {what}"))
    };
    let ends = integer(&ends)?;
    let mut issued = Vec::new();
    let mut pairs = holders.into_array().into_iter();
    while let (Some(user), Some(held)) = (pairs.next(), pairs.next()) {
        let user = UserId::new(integer(&user)?).context("a holder's user id")?;
        let held = text(&held)?;
        if let Some(key) = held.strip_prefix("I|") {
            let key = IdempotencyKey::parse(key).context("a holder's key")?;
            issued.push((user, key));
        } else if !held.starts_with("P|") {
            anyhow::bail!("a holder of the gate is {held:?}");
        }
    }
    issued.sort_by_key(|(user, _)| user.get());
    let mut waiting = Vec::new();
    let mut pairs = pending.into_array().into_iter();
    while let (Some(user), Some(since)) = (pairs.next(), pairs.next()) {
        let user = UserId::new(integer(&user)?).context("a pending user id")?;
        waiting.push((user, from_millis(integer(&since)?)?));
    }
    Ok(Some(GateView {
        total: count(&total, "total")?,
        taken: count(&taken, "taken")?,
        issue_starts_at: from_millis(integer(&starts)?)?,
        issue_ends_at: if ends < 0 {
            None
        } else {
            Some(from_millis(ends)?)
        },
        issued,
        pending: waiting,
    }))
}

fn unexpected(op: &'static str, error: anyhow::Error) -> GateError {
    count_error(op, "unexpected");
    GateError::Unexpected(error.context(format!("coupon gate {op}")))
}

/// Maps a fred error to the port's error, counting it (the lock's rules: see
/// `is_unavailable`).
fn redis_error(op: &'static str, error: RedisError) -> GateError {
    let context = format!("Redis coupon gate {op} failed");
    if is_unavailable(&error) {
        count_error(op, "unavailable");
        GateError::Unavailable(anyhow::Error::new(error).context(context))
    } else {
        count_error(op, "unexpected");
        GateError::Unexpected(anyhow::Error::new(error).context(context))
    }
}

fn count_error(op: &'static str, outcome: &'static str) {
    metrics::counter!(GATE_REDIS_ERRORS_TOTAL, "op" => op, "outcome" => outcome).increment(1);
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn every_key_of_a_coupon_shares_its_slot_and_coupons_spread() {
        let mut slots = std::collections::BTreeSet::new();
        for id in 1..=100 {
            let keys = CouponKeys::new("t:", CouponId::new(id).unwrap());
            assert_eq!(keys.gate, format!("t:{{coupon:{id}}}:gate"));
            let record = keys.record(
                UserId::new(7).unwrap(),
                &IdempotencyKey::parse("k-1").unwrap(),
            );
            assert_eq!(record, format!("t:{{coupon:{id}}}:rec:7:k-1"));
            let slot = redis_keyslot(keys.gate.as_bytes());
            for other in [&keys.holders, &keys.pending, &record] {
                assert_eq!(slot, redis_keyslot(other.as_bytes()), "{other}");
            }
            slots.insert(slot);
        }
        assert!(slots.len() > 90, "coupons spread: {}", slots.len());
    }

    #[test]
    fn an_end_before_the_epoch_is_closed_and_none_never_closes() {
        assert_eq!(ends_millis(None), -1);
        assert_eq!(ends_millis(DateTime::from_timestamp_millis(-5)), 0);
        assert_eq!(ends_millis(DateTime::from_timestamp_millis(42)), 42);
    }

    #[test]
    fn a_malformed_reply_is_an_error_not_a_panic() {
        assert!(parse_admit(Value::Null).is_err());
        assert!(parse_admit(Value::Array(vec!["refused".into()])).is_err());
        assert!(parse_admit(Value::Array(vec!["what".into()])).is_err());
        assert!(parse_inspect(Value::Array(vec!["1".into()])).is_err());
        assert_eq!(parse_inspect(Value::Null).unwrap(), None);
    }
}
