//! `baseline`: the service's charge transaction sent straight to the database by N
//! connections for a fixed time; prints throughput, latency percentiles, conflicts and
//! errors (a table, or one JSON line with `--json`, the table then going to stderr).

use std::time::Duration;

use bench::{Lock, Mode, Plan};
use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "baseline",
    about = "The service's charge transaction straight against MySQL/MariaDB: the database's ceiling."
)]
struct Args {
    /// mysql://user@127.0.0.1:3306/database, migrated and seeded with users 1..=--users.
    #[arg(long, env = "DATABASE_URL")]
    database_url: String,
    /// spread: round robin over the users; hot: all on --hot-user; idle: one connection, one charge at a time.
    #[arg(long, value_enum, default_value = "spread")]
    mode: Mode,
    /// optimistic: the service's version guard, retried; for-update: SELECT … FOR UPDATE first.
    #[arg(long, value_enum, default_value = "optimistic")]
    lock: Lock,
    /// Connections, and concurrent charges (one task each). Idle uses one.
    #[arg(long, default_value_t = 32)]
    connections: u32,
    /// Measured seconds.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds of unmeasured load first (connections opened, statements prepared).
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Users 1..=N for spread and idle.
    #[arg(long, default_value_t = 100)]
    users: u64,
    /// The user of the hot mode.
    #[arg(long, default_value_t = 1)]
    hot_user: i64,
    /// Won per charge.
    #[arg(long, default_value_t = 1)]
    amount: i64,
    /// Re-runs after a conflict before a charge gives up (the service's OPTIMISTIC_RETRIES).
    #[arg(long, default_value_t = 10)]
    max_retries: u32,
    /// Also send the service's idempotency lookup before each charge.
    #[arg(long)]
    key_lookup: bool,
    /// Ping every connection taken from the pool (sqlx's default; the service's pool doesn't).
    #[arg(long)]
    ping: bool,
    /// One JSON line on stdout (the table on stderr).
    #[arg(long)]
    json: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.duration > 0.0 && args.warmup >= 0.0,
        "--duration must be positive and --warmup not negative"
    );
    let plan = Plan {
        mode: args.mode,
        lock: args.lock,
        connections: if args.mode == Mode::Idle {
            1
        } else {
            args.connections.max(1)
        },
        duration: Duration::from_secs_f64(args.duration),
        warmup: Duration::from_secs_f64(args.warmup),
        users: args.users.max(1),
        hot_user: args.hot_user,
        amount: args.amount,
        max_retries: args.max_retries,
        key_lookup: args.key_lookup,
        ping: args.ping,
    };
    let pool = bench::pool(&args.database_url, &plan).await?;
    let report = bench::run(pool, plan).await?;
    if args.json {
        eprint!("{}", report.table());
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.table());
    }
    if let Some(e) = &report.first_error {
        eprintln!("first error: {e}");
    }
    Ok(())
}
