//! `balance-service [serve|migrate|seed]`: see `--help`.

use std::process::ExitCode;

use app::config::{Cli, Command, ServeArgs};
use app::startup::{self, Application};
use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    app::telemetry::init_logging(&cli.config.rust_log, cli.config.log_format);
    let result = match cli.command.unwrap_or(Command::Serve(ServeArgs::default())) {
        Command::Serve(args) => serve(cli.config, args).await,
        Command::Migrate => migrate(&cli.config),
        Command::Seed(args) => seed(&cli.config, args.users, args.balance),
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

async fn serve(config: app::Config, args: ServeArgs) -> anyhow::Result<()> {
    let seed_balance = args.seed_balance;
    let app = Application::build(config, args.seed_users, seed_balance).await?;
    app.run_until_stopped(startup::shutdown_signal()).await?;
    Ok(())
}

fn migrate(config: &app::Config) -> anyhow::Result<()> {
    if config.database_url.is_none() {
        println!("DATABASE_URL is not set: the in-memory store needs no migrations");
        return Ok(());
    }
    anyhow::bail!("this build has no MySQL adapter yet")
}

fn seed(config: &app::Config, users: u32, balance: i64) -> anyhow::Result<()> {
    if config.database_url.is_none() {
        anyhow::bail!(
            "seed needs DATABASE_URL: the in-memory store lives in the serving process; use `serve --seed-users {users} --seed-balance {balance}` instead"
        );
    }
    anyhow::bail!("this build has no MySQL adapter yet")
}
