//! `balance-service [serve|migrate|seed|audit|openapi]`: see `--help`.

use std::process::ExitCode;

use app::config::{AuditArgs, Cli, Command, LogArgs, LogFormat, MigrateArgs, SeedArgs};
use app::startup::{self, Application};
use app::telemetry::error_chain;
use clap::Parser;
use domain::ports::{Clock, SystemClock, UserRepo};
use domain::types::Balance;
use secrecy::ExposeSecret;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let (log, result) = match cli.command {
        None => (cli.config.log.clone(), serve(cli.config).await),
        Some(Command::Migrate(args)) => (args.log.clone(), migrate(&args).await),
        Some(Command::Seed(args)) => (args.log.clone(), seed(&args).await),
        Some(Command::Audit(args)) => return audit(&args).await,
        Some(Command::Openapi) => {
            return match http_actix::openapi::document_json() {
                Ok(json) => {
                    println!("{json}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: the OpenAPI document cannot be written: {e}");
                    ExitCode::FAILURE
                }
            };
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Once: as a log line where logs are for machines, else as one line on stderr.
            match log.log_format {
                LogFormat::Json => {
                    tracing::error!(error = %error_chain(&e), "balance-service failed");
                }
                LogFormat::Pretty => eprintln!("error: {}", error_chain(&e)),
            }
            ExitCode::FAILURE
        }
    }
}

fn init_logging(log: &LogArgs) {
    app::telemetry::init_logging(&log.rust_log, log.log_format);
}

async fn serve(config: app::Config) -> anyhow::Result<()> {
    init_logging(&config.log);
    let seed_users = config.seed_users;
    let seed_balance = config.seed_balance.unwrap_or(startup::DEFAULT_SEED_BALANCE);
    let app = Application::build(config, seed_users, seed_balance).await?;
    app.run_until_stopped(startup::shutdown_signal()).await?;
    Ok(())
}

/// Where `DATABASE_URL` points, for errors and the log (never with the password).
fn where_is(url: &str) -> anyhow::Result<String> {
    let target = mysql_repo::target(url)?;
    Ok(format!(
        "database `{}` at {}@{}:{}",
        target.database, target.user, target.host, target.port
    ))
}

async fn migrate(args: &MigrateArgs) -> anyhow::Result<()> {
    init_logging(&args.log);
    let Some(url) = &args.db.database_url else {
        println!("DATABASE_URL is not set: the in-memory store needs no migrations");
        return Ok(());
    };
    let url = url.expose_secret();
    let place = where_is(url)?;
    let pool = mysql_repo::connect(url, 2).await?;
    mysql_repo::migrate(&pool)
        .await
        .map_err(|e| e.context(format!("migrate ({place})")))?;
    println!("migrations applied ({place})");
    Ok(())
}

async fn seed(args: &SeedArgs) -> anyhow::Result<()> {
    init_logging(&args.log);
    let (users, balance) = (args.users, args.balance);
    let Some(url) = &args.db.database_url else {
        anyhow::bail!(
            "seed needs DATABASE_URL: the in-memory store lives in the serving process; use `serve --seed-users {users} --seed-balance {balance}` instead"
        );
    };
    let limits = args.limits.limits()?;
    let balance = Balance::new(balance, &limits).map_err(|e| anyhow::anyhow!("--balance: {e}"))?;
    let url = url.expose_secret();
    let place = where_is(url)?;
    let pool = mysql_repo::connect(url, 4).await?;
    let store = mysql_repo::MySqlStore::new(pool);
    let created = store
        .seed_users(users, balance, SystemClock.now())
        .await
        .map_err(|e| anyhow::Error::from(e).context(format!("seed ({place})")))?;
    println!(
        "users 1..{users}: {created} created, {} already there ({place})",
        u64::from(users) - created
    );
    Ok(())
}

/// `audit`: exit 0 when the books reconcile, 1 on any breach, 2 when the audit cannot run.
async fn audit(args: &AuditArgs) -> ExitCode {
    use app::audit::{EXIT_BREACHES, EXIT_CLEAN, EXIT_ERROR};
    // The report is the output; the log goes to stderr.
    app::telemetry::init_logging_to_stderr(&args.log.rust_log, args.log.log_format);
    let Some(url) = &args.db.database_url else {
        eprintln!(
            "error: audit needs DATABASE_URL. The in-memory store lives in the serving process, \
             which audits itself every AUDIT_INTERVAL_SECS (see balance_audit_breaches on /metrics)"
        );
        return ExitCode::from(EXIT_ERROR);
    };
    let run = async {
        let settings = args.settings();
        let url = url.expose_secret();
        let place = where_is(url)?;
        let pool = mysql_repo::connect(url, 1).await?;
        let store = mysql_repo::MySqlStore::new(pool.clone());
        let run = app::audit::run_once(&store, &settings).await;
        let run = match (run, &args.redis_url) {
            (Ok(mut run), Some(redis)) => {
                let gate = redis_lock::RedisCouponGate::connect(
                    redis.expose_secret(),
                    &args.redis_key_prefix,
                    settings.lock_wait.saturating_add(settings.lock_lease),
                )
                .await?;
                let breaches = domain::service::audit_coupon_gate(&store, &gate)
                    .await
                    .map_err(|e| {
                        anyhow::Error::from(e).context("could not audit the coupon gate")
                    })?;
                app::audit::add_breaches(&mut run, breaches);
                Ok(run)
            }
            (run, _) => run,
        };
        pool.close().await;
        run.map_err(|e| anyhow::Error::from(e).context(format!("could not audit the {place}")))
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
            eprintln!("error: {}", error_chain(&e));
            ExitCode::from(EXIT_ERROR)
        }
    }
}
