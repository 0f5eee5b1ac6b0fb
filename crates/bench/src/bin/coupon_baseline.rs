//! `coupon-baseline`: the write of a coupon issue (the user coupon and the guarded count,
//! committed) sent straight to the database by N connections on one coupon for a
//! fixed time; prints throughput, latency percentiles, refusals and the books (a table, or
//! one JSON line with `--json`, the table then going to stderr).

use std::time::Duration;

use bench::coupon::{CouponPlan, Order, Step};
use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "coupon-baseline",
    about = "A coupon issue's write straight against MySQL/MariaDB, every connection on one coupon: the database's ceiling."
)]
struct Args {
    /// mysql://user@127.0.0.1:3306/database, migrated (0009_coupons) and seeded with users 1..=--users.
    #[arg(long, env = "DATABASE_URL")]
    database_url: String,
    /// Connections, and concurrent issues (one task each).
    #[arg(long, default_value_t = 32)]
    connections: u32,
    /// Measured seconds.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds of unmeasured load first (connections opened, statements prepared).
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Users 1..=N: each coupon is issued to each of them once, then the next coupon.
    #[arg(long, default_value_t = 1000)]
    users: u64,
    /// Each coupon's stock; below --users, the issues past it are sold-out refusals of the
    /// guard (rolled back, counted apart). Default: --users (never sold out).
    #[arg(long)]
    stock: Option<i64>,
    /// bare: the user coupon and the guarded count; service: also the user's read, its
    /// version moved on and the key's record, as the MySQL adapter's step writes them.
    #[arg(long, value_enum, default_value = "bare")]
    step: Step,
    /// Where the guarded count goes: last (the adapter's order) or first.
    #[arg(long, value_enum, default_value = "count-last")]
    order: Order,
    /// Re-runs after a deadlock, a lock-wait timeout or a version conflict.
    #[arg(long, default_value_t = 10)]
    max_retries: u32,
    /// Leave the run's coupons, user coupons and key records in the database.
    #[arg(long)]
    keep: bool,
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
    let connections = args.connections.max(1);
    let plan = CouponPlan {
        connections,
        duration: Duration::from_secs_f64(args.duration),
        warmup: Duration::from_secs_f64(args.warmup),
        users: args.users.max(1),
        stock: args.stock.unwrap_or(i64::try_from(args.users.max(1))?),
        step: args.step,
        order: args.order,
        max_retries: args.max_retries,
        keep: args.keep,
    };
    let pool = mysql_repo::connect(&args.database_url, connections).await?;
    let report = bench::coupon::run(pool, plan).await?;
    if args.json {
        eprint!("{}", report.table());
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.table());
    }
    if let Some(e) = &report.first_error {
        eprintln!("first error: {e}");
    }
    if !report.books_exact {
        eprintln!("the books are NOT exact: {:?}", report.books);
    }
    Ok(())
}
