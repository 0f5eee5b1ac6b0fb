//! The configuration table of the spec, as flags and environment variables (`--help`).

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use domain::types::Limits;
use domain::{GroupCommit, LockUnavailablePolicy, Settings};
use secrecy::{ExposeSecret, SecretString};

/// The largest integer a JSON number carries exactly to every client (2^53 − 1, IEEE
/// doubles): no balance or amount may exceed it, and sums of two stay far inside i64.
pub const MAX_EXACT_JSON_INTEGER: i64 = 9_007_199_254_740_991;

/// The longest retention of a finished request: a year.
pub const MAX_TTL_SECS: u64 = 365 * 86_400;

/// `balance-service [serve|migrate|seed|audit|openapi]`. `serve` (or nothing) serves, with
/// every setting, its flags before or after the word; each other subcommand takes only the
/// settings it uses.
#[derive(Debug, Parser)]
#[command(
    name = "balance-service",
    version,
    about = "Balance and payment service: charges, uses and payments guarded by a per-user lock, an optimistic version and idempotency keys.",
    long_about = None,
    // A flag before a subcommand would be read for `serve` and silently ignored by the
    // subcommand: refuse it instead (`balance-service migrate --flag` works).
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    // A word rather than a subcommand, so that serve's flags may come before or after it,
    // as they always could.
    /// Serve the HTTP API, the default; the options below are serve's.
    #[arg(value_enum, value_name = "serve", hide_possible_values = true)]
    pub serve: Option<Serve>,
    #[command(subcommand)]
    pub command: Option<Command>,
    /// The configuration of `serve`.
    #[command(flatten)]
    pub config: Config,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Serve {
    /// Serve the HTTP API (the default).
    Serve,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Apply the database migrations and exit.
    Migrate(MigrateArgs),
    /// Create users 1..N with balance B where they do not exist yet, and exit.
    Seed(SeedArgs),
    /// Reconcile the books of the database (read-only) and print a report. Exit status:
    /// 0 clean, 1 breaches found, 2 the audit could not run (no DATABASE_URL, database down).
    Audit(AuditArgs),
    /// Print the OpenAPI document (JSON) that `serve` answers at /api-docs/openapi.json, and exit.
    Openapi,
}

/// `DATABASE_URL`: every subcommand but `openapi` uses it.
#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    /// MySQL URL; unset: the in-memory store (one instance, nothing persisted).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<SecretString>,
}

/// The log settings, shared by every subcommand that logs.
#[derive(Debug, Clone, Args)]
pub struct LogArgs {
    /// Log filter, e.g. `info` or `info,domain=debug`.
    #[arg(long = "log-level", env = "RUST_LOG", default_value = "info")]
    pub rust_log: String,
    /// Log lines as text for people or JSON for machines.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "pretty")]
    pub log_format: LogFormat,
}

/// The money limits: `serve` enforces them, `seed` checks its balance against them.
#[derive(Debug, Clone, Args)]
pub struct LimitArgs {
    /// Largest amount of one operation.
    #[arg(long, env = "MAX_AMOUNT", default_value_t = Limits::DEFAULT_MAX_AMOUNT, value_parser = clap::value_parser!(i64).range(1..=MAX_EXACT_JSON_INTEGER))]
    pub max_amount: i64,
    /// Largest balance of one user.
    #[arg(long, env = "MAX_BALANCE", default_value_t = Limits::DEFAULT_MAX_BALANCE, value_parser = clap::value_parser!(i64).range(1..=MAX_EXACT_JSON_INTEGER))]
    pub max_balance: i64,
}

impl LimitArgs {
    /// # Errors
    /// When `MAX_AMOUNT` exceeds `MAX_BALANCE`.
    pub fn limits(&self) -> anyhow::Result<Limits> {
        if self.max_amount > self.max_balance {
            anyhow::bail!("MAX_AMOUNT must not exceed MAX_BALANCE");
        }
        Ok(Limits::new(self.max_amount, self.max_balance)?)
    }
}

/// How long a finished request is kept and how long a lock lives at most: `serve` obeys
/// both, and `audit` needs them to tell a stale record from one still in flight.
#[derive(Debug, Clone, Args)]
pub struct RetentionArgs {
    /// How long a lock is held at most if its holder never releases it.
    #[arg(long, env = "LOCK_LEASE_MS", default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(100..=600_000))]
    pub lock_lease_ms: u64,
    /// How long a finished request's response is kept for replays.
    #[arg(long, env = "IDEMPOTENCY_TTL_SECS", default_value_t = 86_400, value_parser = clap::value_parser!(u64).range(1..=MAX_TTL_SECS))]
    pub idempotency_ttl_secs: u64,
}

#[derive(Debug, Clone, Args)]
pub struct MigrateArgs {
    #[command(flatten)]
    pub db: DatabaseArgs,
    #[command(flatten)]
    pub log: LogArgs,
}

#[derive(Debug, Clone, Args)]
pub struct AuditArgs {
    /// Print the report as JSON (every listed breach) instead of text.
    #[arg(long)]
    pub json: bool,
    /// Breaches shown per check in the text report (up to 100 are listed).
    #[arg(long, default_value_t = 10)]
    pub show: usize,
    #[command(flatten)]
    pub db: DatabaseArgs,
    /// Redis URL: with it, the coupon admission gate is compared with the database too.
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<SecretString>,
    /// Prefix of the service's Redis keys (as `serve`'s `REDIS_KEY_PREFIX`).
    #[arg(long, env = "REDIS_KEY_PREFIX", default_value = "")]
    pub redis_key_prefix: String,
    #[command(flatten)]
    pub retention: RetentionArgs,
    #[command(flatten)]
    pub log: LogArgs,
}

impl AuditArgs {
    /// The settings the audit judges the books by: the retention and lease given, the
    /// rest (which the audit does not read) at their defaults.
    pub fn settings(&self) -> Settings {
        Settings {
            lock_lease: Duration::from_millis(self.retention.lock_lease_ms),
            idempotency_ttl: Duration::from_secs(self.retention.idempotency_ttl_secs),
            ..Settings::default()
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct SeedArgs {
    /// How many users (ids 1..N).
    #[arg(long)]
    pub users: u32,
    /// Each new user's balance.
    #[arg(long)]
    pub balance: i64,
    #[command(flatten)]
    pub db: DatabaseArgs,
    #[command(flatten)]
    pub limits: LimitArgs,
    #[command(flatten)]
    pub log: LogArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RedisDownPolicy {
    /// Go on under the database guard alone, counted and logged.
    Degrade,
    /// Answer 503 SERVICE_UNAVAILABLE.
    Fail,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct Config {
    /// Address to listen on.
    #[arg(long, env = "BIND_ADDR", default_value = "127.0.0.1:8080")]
    pub bind_addr: SocketAddr,
    #[command(flatten)]
    pub db: DatabaseArgs,
    /// Redis URL; unset: the in-process lock (one instance only).
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<SecretString>,
    /// Prefix of every Redis key this service writes (several deployments, or tests, can share one Redis).
    #[arg(long, env = "REDIS_KEY_PREFIX", default_value = "")]
    pub redis_key_prefix: String,
    /// Apply pending migrations when `serve` starts (with DATABASE_URL).
    #[arg(long, env = "MIGRATE_ON_START", default_value_t = true, action = clap::ArgAction::Set,
          value_parser = clap::builder::BoolishValueParser::new())]
    pub migrate_on_start: bool,
    /// Users 1..N that `serve` creates at start if missing (default: 100 with the in-memory store, 0 with MySQL).
    #[arg(long, env = "SEED_USERS", value_parser = clap::value_parser!(u32).range(0..=10_000_000))]
    pub seed_users: Option<u32>,
    /// The balance of users created by --seed-users [default: 100000].
    #[arg(long, env = "SEED_BALANCE")]
    pub seed_balance: Option<i64>,
    /// How long a balance change waits for its user's lock.
    #[arg(long, env = "LOCK_WAIT_MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub lock_wait_ms: u64,
    #[command(flatten)]
    pub retention: RetentionArgs,
    /// Group commit: charges and uses that queue while a transaction commits share the next one.
    #[arg(long, env = "GROUP_COMMIT", default_value_t = true, action = clap::ArgAction::Set,
          value_parser = clap::builder::BoolishValueParser::new())]
    pub group_commit: bool,
    /// Group commit across users: one queue for the instance, so users ready at once share a transaction (a row locked elsewhere fails the batch at once and holds up only its user); false: a queue per user.
    #[arg(long, env = "GROUP_COMMIT_ACROSS_USERS", default_value_t = true, action = clap::ArgAction::Set,
          value_parser = clap::builder::BoolishValueParser::new())]
    pub group_commit_across_users: bool,
    /// The most requests one group-commit transaction carries.
    #[arg(long, env = "GROUP_COMMIT_MAX", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub group_commit_max: u32,
    /// Retries of a balance change after a lost optimistic race.
    #[arg(long, env = "OPTIMISTIC_RETRIES", default_value_t = 10, value_parser = clap::value_parser!(u32).range(0..=1000))]
    pub optimistic_retries: u32,
    /// What balance changes do while Redis is unreachable.
    #[arg(
        long,
        env = "LOCK_ON_REDIS_DOWN",
        value_enum,
        default_value = "degrade"
    )]
    pub lock_on_redis_down: RedisDownPolicy,
    /// The service token (at least 32 visible characters): when set, /api/* needs `Authorization: Bearer <token>` (or a valid JWT); it acts for every user.
    #[arg(long, env = "API_TOKEN", hide_env_values = true)]
    pub api_token: Option<SecretString>,
    /// HS256 secret (at least 32 bytes) of per-user JWTs; then /api/* needs a bearer JWT (or the API_TOKEN).
    #[arg(
        long,
        env = "AUTH_JWT_SECRET",
        hide_env_values = true,
        conflicts_with = "auth_jwt_public_key_file"
    )]
    pub auth_jwt_secret: Option<SecretString>,
    /// PEM public key (RSA: RS256, Ed25519: EdDSA) of per-user JWTs, instead of AUTH_JWT_SECRET.
    #[arg(long, env = "AUTH_JWT_PUBLIC_KEY_FILE")]
    pub auth_jwt_public_key_file: Option<std::path::PathBuf>,
    /// When set, a JWT's `aud` must contain this audience.
    #[arg(long, env = "AUTH_JWT_AUDIENCE")]
    pub auth_jwt_audience: Option<String>,
    /// When set, a JWT's `iss` must be this issuer.
    #[arg(long, env = "AUTH_JWT_ISSUER")]
    pub auth_jwt_issuer: Option<String>,
    /// When set (at least 32 visible characters), /metrics needs `Authorization: Bearer <token>`.
    #[arg(long, env = "METRICS_TOKEN", hide_env_values = true)]
    pub metrics_token: Option<SecretString>,
    /// Connections served at once, across all workers; more wait in the listen backlog.
    #[arg(long, env = "MAX_CONNECTIONS", default_value_t = 25_000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_connections: u32,
    #[command(flatten)]
    pub limits: LimitArgs,
    /// Database pool size (default: sized for the machine's cores).
    #[arg(long, env = "DB_MAX_CONNECTIONS", value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub db_max_connections: Option<u32>,
    #[command(flatten)]
    pub log: LogArgs,
    /// HTTP worker threads (default: one per core).
    #[arg(long, env = "HTTP_WORKERS", value_parser = clap::value_parser!(u32).range(1..=256))]
    pub http_workers: Option<u32>,
    /// How long a stopping server waits for in-flight requests.
    #[arg(
        long,
        env = "SHUTDOWN_TIMEOUT_SECS",
        default_value_t = 30,
        value_parser = clap::value_parser!(u64).range(0..=3600)
    )]
    pub shutdown_timeout_secs: u64,
    /// How often `serve` audits the books (gauge `balance_audit_breaches`); 0: never.
    #[arg(
        long,
        env = "AUDIT_INTERVAL_SECS",
        default_value_t = 300,
        value_parser = clap::value_parser!(u64).range(0..=604_800)
    )]
    pub audit_interval_secs: u64,
}

impl Config {
    /// `DB_MAX_CONNECTIONS`, or eight per core (16 to 64) when unset: commits waiting on the
    /// log flush share it (group commit), so more connections than cores pay off; the
    /// benchmark measured 8 → 16 connections on 2 cores at about +10% spread charges/s.
    pub fn db_pool_size(&self) -> u32 {
        self.db_max_connections.unwrap_or_else(|| {
            let cores = std::thread::available_parallelism().map_or(2, |n| n.get() as u32);
            (cores * 8).clamp(16, 64)
        })
    }

    /// The defaults of the spec, as if no flag or variable were given (for tests).
    pub fn defaults() -> Self {
        Cli::parse_from(["balance-service"]).config
    }

    /// Who `/api/*` requests act for: `API_TOKEN` and the JWT key, if any.
    ///
    /// # Errors
    /// A short `AUTH_JWT_SECRET`, or a key file that cannot be read or is not a supported
    /// public key; the message names the variable.
    pub fn authenticator(&self) -> anyhow::Result<http_actix::auth::Authenticator> {
        use http_actix::auth::{Authenticator, JwtVerifier};
        let jwt = match (&self.auth_jwt_secret, &self.auth_jwt_public_key_file) {
            (Some(secret), _) => Some(JwtVerifier::hs256(secret.expose_secret().as_bytes())?),
            (None, Some(path)) => {
                let pem = std::fs::read(path).map_err(|e| {
                    anyhow::anyhow!("AUTH_JWT_PUBLIC_KEY_FILE {}: {e}", path.display())
                })?;
                Some(JwtVerifier::from_public_key_pem(&pem)?)
            }
            (None, None) => None,
        };
        if jwt.is_none() && (self.auth_jwt_audience.is_some() || self.auth_jwt_issuer.is_some()) {
            anyhow::bail!(
                "AUTH_JWT_AUDIENCE and AUTH_JWT_ISSUER need AUTH_JWT_SECRET or AUTH_JWT_PUBLIC_KEY_FILE"
            );
        }
        let jwt = jwt.map(|mut jwt| {
            if let Some(audience) = &self.auth_jwt_audience {
                jwt = jwt.with_audience(audience);
            }
            if let Some(issuer) = &self.auth_jwt_issuer {
                jwt = jwt.with_issuer(issuer);
            }
            jwt
        });
        if let Some(jwt) = &jwt
            && !jwt.checks_audience()
        {
            tracing::warn!(
                "AUTH_JWT_AUDIENCE is not set: a token the same issuer signed for ANOTHER application is accepted here too; set it to this service's audience"
            );
        }
        let api_token = self.api_token.as_ref().map(|t| t.expose_secret());
        Ok(Authenticator::new(api_token, jwt)?)
    }

    /// The use cases' settings.
    ///
    /// # Errors
    /// When the limits are inconsistent.
    pub fn settings(&self) -> anyhow::Result<Settings> {
        let limits = self.limits.limits()?;
        Ok(Settings {
            lock_wait: Duration::from_millis(self.lock_wait_ms),
            lock_lease: Duration::from_millis(self.retention.lock_lease_ms),
            optimistic_retries: self.optimistic_retries,
            on_lock_unavailable: match self.lock_on_redis_down {
                RedisDownPolicy::Degrade => LockUnavailablePolicy::Degrade,
                RedisDownPolicy::Fail => LockUnavailablePolicy::Fail,
            },
            idempotency_ttl: Duration::from_secs(self.retention.idempotency_ttl_secs),
            limits,
            group_commit: if self.group_commit {
                GroupCommit::On {
                    max_batch: self.group_commit_max as usize,
                    across_users: self.group_commit_across_users,
                }
            } else {
                GroupCommit::Off
            },
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use clap::CommandFactory;

    /// The environment variables an argument list reads.
    fn envs<'a>(args: impl Iterator<Item = &'a clap::Arg>) -> Vec<String> {
        let mut names: Vec<String> = args
            .filter_map(|a| a.get_env())
            .map(|e| e.to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn subcommand(name: &str) -> clap::Command {
        Cli::command()
            .find_subcommand(name)
            .unwrap_or_else(|| panic!("no subcommand {name}"))
            .clone()
    }

    #[test]
    fn each_subcommand_takes_only_the_settings_it_uses() {
        for (name, expected) in [
            ("migrate", &["DATABASE_URL", "LOG_FORMAT", "RUST_LOG"][..]),
            (
                "seed",
                &[
                    "DATABASE_URL",
                    "LOG_FORMAT",
                    "MAX_AMOUNT",
                    "MAX_BALANCE",
                    "RUST_LOG",
                ],
            ),
            (
                "audit",
                &[
                    "DATABASE_URL",
                    "IDEMPOTENCY_TTL_SECS",
                    "LOCK_LEASE_MS",
                    "LOG_FORMAT",
                    "REDIS_KEY_PREFIX",
                    "REDIS_URL",
                    "RUST_LOG",
                ],
            ),
            ("openapi", &[]),
        ] {
            assert_eq!(envs(subcommand(name).get_arguments()), expected, "{name}");
        }
    }

    #[test]
    fn serve_takes_every_setting() {
        let all = envs(Cli::command().get_arguments());
        assert!(all.len() > 20, "{all:?}");
        assert!(all.contains(&"LOCK_WAIT_MS".to_owned()));
    }

    #[test]
    fn serve_flags_go_before_or_after_the_word() {
        for args in [
            &["balance-service", "serve", "--bind-addr", "127.0.0.1:1"][..],
            &["balance-service", "--bind-addr", "127.0.0.1:1", "serve"],
            &["balance-service", "--bind-addr", "127.0.0.1:1"],
        ] {
            let cli = Cli::try_parse_from(args).unwrap();
            assert!(cli.command.is_none(), "{args:?}");
            assert_eq!(cli.config.bind_addr, "127.0.0.1:1".parse().unwrap());
        }
        let cli = Cli::try_parse_from(["balance-service", "migrate"]).unwrap();
        assert!(matches!(cli.command, Some(Command::Migrate(_))));
    }

    #[test]
    fn a_flag_before_a_subcommand_is_refused_not_ignored() {
        let err = Cli::try_parse_from(["balance-service", "--bind-addr", "127.0.0.1:1", "migrate"])
            .unwrap_err();
        assert!(err.to_string().contains("migrate"), "{err}");
        assert!(Cli::try_parse_from(["balance-service", "serve", "migrate"]).is_err());
    }
}
