//! `balance-service [serve|migrate|seed|audit]`: see `--help`.

use std::process::ExitCode;

use app::config::{AuditArgs, Cli, Command, ServeArgs};
use app::startup::{self, Application};
use clap::Parser;
use domain::ports::{Clock, SystemClock, UserRepo};
use domain::types::Balance;
use secrecy::ExposeSecret;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Audit(args)) = &cli.command {
        // The report is the output; the log goes to stderr.
        app::telemetry::init_logging_to_stderr(&cli.config.rust_log, cli.config.log_format);
        return audit(&cli.config, args).await;
    }
    app::telemetry::init_logging(&cli.config.rust_log, cli.config.log_format);
    let result = match cli.command.unwrap_or(Command::Serve(ServeArgs::default())) {
        Command::Serve(ServeArgs {}) => serve(cli.config).await,
        Command::Migrate => migrate(&cli.config).await,
        Command::Seed(args) => seed(&cli.config, args.users, args.balance).await,
        Command::Audit(_) => unreachable!("handled above"),
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

/// `audit`: exit 0 when the books reconcile, 1 on any breach, 2 when the audit cannot run.
async fn audit(config: &app::Config, args: &AuditArgs) -> ExitCode {
    use app::audit::{EXIT_BREACHES, EXIT_CLEAN, EXIT_ERROR};
    let Some(url) = &config.database_url else {
        eprintln!(
            "error: audit needs DATABASE_URL. The in-memory store lives in the serving process, \
             which audits itself every AUDIT_INTERVAL_SECS (see balance_audit_breaches on /metrics)"
        );
        return ExitCode::from(EXIT_ERROR);
    };
    let run = async {
        let settings = config.settings()?;
        let pool = mysql_repo::connect(url.expose_secret(), 1).await?;
        let store = mysql_repo::MySqlStore::new(pool.clone());
        let run = app::audit::run_once(&store, &settings).await;
        pool.close().await;
        run.map_err(|e| anyhow::Error::from(e).context("could not audit the database"))
    };
    match run.await {
        Ok(run) => {
            if args.json {
                println!("{}", app::audit::render_json(&run));
            } else {
                print!("{}", app::audit::render_text(&run, args.show));
            }
            ExitCode::from(if run.report.is_clean() {
                EXIT_CLEAN
            } else {
                EXIT_BREACHES
            })
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}
