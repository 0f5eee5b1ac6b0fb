//! `balance-service [serve|migrate|seed]`: see `--help`.

use std::process::ExitCode;

use app::config::{Cli, Command, ServeArgs};
use app::startup::{self, Application};
use clap::Parser;
use domain::ports::{Clock, SystemClock, UserRepo};
use domain::types::Balance;
use secrecy::ExposeSecret;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    app::telemetry::init_logging(&cli.config.rust_log, cli.config.log_format);
    let result = match cli.command.unwrap_or(Command::Serve(ServeArgs::default())) {
        Command::Serve(ServeArgs {}) => serve(cli.config).await,
        Command::Migrate => migrate(&cli.config).await,
        Command::Seed(args) => seed(&cli.config, args.users, args.balance).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "balance-service failed");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: app::Config) -> anyhow::Result<()> {
    let seed_users = config.seed_users;
    let seed_balance = config.seed_balance.unwrap_or(startup::DEFAULT_SEED_BALANCE);
    let app = Application::build(config, seed_users, seed_balance).await?;
    app.run_until_stopped(startup::shutdown_signal()).await?;
    Ok(())
}

async fn migrate(config: &app::Config) -> anyhow::Result<()> {
    let Some(url) = &config.database_url else {
        println!("DATABASE_URL is not set: the in-memory store needs no migrations");
        return Ok(());
    };
    let pool = mysql_repo::connect(url.expose_secret(), 2).await?;
    mysql_repo::migrate(&pool).await?;
    println!("migrations applied");
    Ok(())
}

async fn seed(config: &app::Config, users: u32, balance: i64) -> anyhow::Result<()> {
    let Some(url) = &config.database_url else {
        anyhow::bail!(
            "seed needs DATABASE_URL: the in-memory store lives in the serving process; use `serve --seed-users {users} --seed-balance {balance}` instead"
        );
    };
    let limits = config.settings()?.limits;
    let balance = Balance::new(balance, &limits).map_err(|e| anyhow::anyhow!("--balance: {e}"))?;
    let pool = mysql_repo::connect(url.expose_secret(), 4).await?;
    let store = mysql_repo::MySqlStore::new(pool);
    let created = store
        .seed_users(users, balance, SystemClock.now())
        .await
        .map_err(anyhow::Error::from)?;
    println!(
        "users 1..{users}: {created} created, {} already there",
        u64::from(users) - created
    );
    Ok(())
}
