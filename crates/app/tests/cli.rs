//! The binary's command line: what each subcommand's `--help` offers, and how a failing
//! command reports its error.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::{Command, Output};

/// Runs the binary with `args` and no configuration from the environment.
fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_balance-service"))
        .env_clear()
        .envs(env.iter().copied())
        .args(args)
        .output()
        .unwrap()
}

fn help(args: &[&str]) -> String {
    let out = run(args, &[]);
    assert!(out.status.success(), "{args:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// Flags only `serve` uses.
const SERVE_ONLY: &[&str] = &[
    "--bind-addr",
    "--redis-url",
    "--lock-wait-ms",
    "--api-token",
    "--auth-jwt-secret",
    "--metrics-token",
    "--max-connections",
    "--http-workers",
    "--audit-interval-secs",
    "--seed-users",
];

#[test]
fn subcommands_offer_only_the_flags_they_use() {
    for (command, wanted) in [
        (
            "migrate",
            &["--database-url", "--log-level", "--log-format"][..],
        ),
        (
            "seed",
            &["--users", "--balance", "--database-url", "--max-balance"],
        ),
        (
            "audit",
            &[
                "--json",
                "--database-url",
                "--redis-url",
                "--idempotency-ttl-secs",
                "--lock-lease-ms",
            ],
        ),
    ] {
        let text = help(&[command, "--help"]);
        for flag in wanted {
            assert!(
                text.contains(flag),
                "{command} --help lacks {flag}:\n{text}"
            );
        }
        // The audit reads Redis too (the coupon gate), and only that of serve's flags.
        for flag in SERVE_ONLY.iter().filter(|flag| !wanted.contains(flag)) {
            assert!(
                !text.contains(flag),
                "{command} --help lists {flag}:\n{text}"
            );
        }
    }
    for args in [&["--help"][..], &["serve", "--help"]] {
        let text = help(args);
        for flag in SERVE_ONLY {
            assert!(text.contains(flag), "{args:?} lacks {flag}");
        }
    }
}

/// `migrate` on a database that does not exist says so once, on stderr, naming the
/// database and not the password.
#[tokio::test]
async fn migrate_on_a_missing_database_says_so_once() {
    let Some(db) = testkit::TestDatabase::create().await else {
        return;
    };
    let (server, _) = db.url.rsplit_once('/').unwrap();
    let missing = format!("{server}/no_such_db_{}", uuid::Uuid::new_v4().simple());
    let out = tokio::task::spawn_blocking(move || {
        run(
            &["migrate"],
            &[("DATABASE_URL", &missing), ("RUST_LOG", "warn")],
        )
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert_eq!(
        stderr.matches("Unknown database").count(),
        1,
        "stderr: {stderr}\nstdout: {stdout}"
    );
    assert!(!stdout.contains("Unknown database"), "{stdout}");
    assert!(stderr.contains("no_such_db_"), "{stderr}");
}

/// `serve` on MySQL and Redis says at start which database and which Redis it uses.
#[tokio::test]
async fn serve_names_its_database_and_redis_at_start() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let Some(db) = testkit::TestDatabase::create().await else {
        return;
    };
    let Some(redis) = testkit::TestRedis::create().await else {
        return;
    };
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_balance-service"))
        .env_clear()
        .env("BIND_ADDR", "127.0.0.1:0")
        .env("DATABASE_URL", &db.url)
        .env("REDIS_URL", &redis.url)
        .env("REDIS_KEY_PREFIX", &redis.prefix)
        .env("AUDIT_INTERVAL_SECS", "0")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut log = String::new();
    let listening = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            log.push_str(&line);
            log.push('\n');
            if line.contains("listening") {
                return true;
            }
        }
        false
    })
    .await;
    child.kill().await.unwrap();
    assert_eq!(listening, Ok(true), "{log}");
    let target = mysql_repo::target(&db.url).unwrap();
    let store = log
        .lines()
        .find(|l| l.contains("store: MySQL"))
        .unwrap_or_else(|| panic!("no store line:\n{log}"));
    for part in [
        format!("host={}", target.host),
        format!("port={}", target.port),
        format!("database={}", target.database),
    ] {
        assert!(store.contains(&part), "{part} not in {store}");
    }
    let lock = log
        .lines()
        .find(|l| l.contains("lock: Redis"))
        .unwrap_or_else(|| panic!("no lock line:\n{log}"));
    assert!(lock.contains(&redis.prefix), "{lock}");
    let (_, redis_host) = redis.url.split_once("//").unwrap();
    assert!(lock.contains(redis_host.trim_end_matches('/')), "{lock}");
}
