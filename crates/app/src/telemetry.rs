//! Logs (pretty or JSON, every line of a request inside its `request_id` span) and the
//! Prometheus recorder.

use std::io::IsTerminal;
use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::FmtSpan;

use crate::config::LogFormat;

/// Installs the global log subscriber. A second call (tests build many apps) is a no-op.
pub fn init_logging(filter: &str, format: LogFormat) {
    init_logging_with(
        filter,
        format,
        std::io::stdout().is_terminal(),
        std::io::stdout,
    );
}

/// As [`init_logging`], with the log on stderr: for commands whose stdout is their
/// output (`audit`, whose report a script may parse).
pub fn init_logging_to_stderr(filter: &str, format: LogFormat) {
    init_logging_with(
        filter,
        format,
        std::io::stderr().is_terminal(),
        std::io::stderr,
    );
}

fn init_logging_with<W>(filter: &str, format: LogFormat, ansi: bool, writer: W)
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_span_events(FmtSpan::NONE)
        .with_ansi(ansi)
        .with_writer(writer)
        .with_target(true);
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
        LogFormat::Pretty => builder.compact().try_init(),
    };
}

/// Latency buckets in seconds, from 0.25 ms (a replay) to 10 s (the lock wait).
const BUCKETS: &[f64] = &[
    0.000_25, 0.000_5, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Requests per group-commit transaction, from a batch of one to `GROUP_COMMIT_MAX`'s top.
const BATCH_SIZE_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1000.0,
];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// The process-wide Prometheus recorder: installed once, shared by every app in the process.
pub fn metrics_handle() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(BUCKETS)
                .ok()?
                .set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Full(
                        domain::telemetry::BATCH_SIZE.to_owned(),
                    ),
                    BATCH_SIZE_BUCKETS,
                )
                .ok()?
                .build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok()?;
            describe();
            Some(handle)
        })
        .clone()
}

/// Keeps the recorder's histograms drained; call from a long-lived task.
pub async fn run_upkeep(handle: PrometheusHandle) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tick.tick().await;
        handle.run_upkeep();
    }
}

fn describe() {
    use domain::telemetry as m;
    metrics::describe_counter!(
        http_actix::middleware::HTTP_REQUESTS_TOTAL,
        "HTTP requests by method, route and status"
    );
    metrics::describe_histogram!(
        http_actix::middleware::HTTP_REQUEST_DURATION_SECONDS,
        metrics::Unit::Seconds,
        "HTTP request latency by method and route"
    );
    metrics::describe_histogram!(m::BATCH_SIZE, "Requests per group-commit transaction");
    metrics::describe_counter!(m::BATCHES_TOTAL, "Group-commit transactions run");
    metrics::describe_histogram!(
        m::BATCH_QUEUED_SECONDS,
        metrics::Unit::Seconds,
        "Time a request waited in the queue before its batch began"
    );
    metrics::describe_counter!(
        m::BATCH_FALLBACKS_TOTAL,
        "Batches whose transaction failed and whose requests then ran one by one"
    );
    metrics::describe_histogram!(
        m::LOCK_WAIT_SECONDS,
        metrics::Unit::Seconds,
        "Time spent waiting for a user lock"
    );
    metrics::describe_counter!(m::LOCK_ACQUIRED_TOTAL, "User locks taken");
    metrics::describe_counter!(
        m::LOCK_TIMEOUTS_TOTAL,
        "Lock waits that ran out (LOCK_TIMEOUT)"
    );
    metrics::describe_counter!(
        m::LOCK_LEASE_LOST_TOTAL,
        "Releases that found the lease already expired"
    );
    metrics::describe_counter!(
        m::LOCK_DEGRADED_TOTAL,
        "Balance changes run without the lock because the lock service was down"
    );
    metrics::describe_counter!(
        m::LOCK_UNAVAILABLE_TOTAL,
        "Balance changes refused because the lock service was down (fail policy)"
    );
    metrics::describe_counter!(
        m::OPTIMISTIC_CONFLICTS_TOTAL,
        "Writes refused by the version check"
    );
    metrics::describe_counter!(
        m::OPTIMISTIC_RETRIES_TOTAL,
        "Attempts re-run from a fresh read after a conflict"
    );
    metrics::describe_counter!(
        m::STEP_ABORTED_RETRIES_TOTAL,
        "Balance changes re-run after the database aborted their step before the commit"
    );
    metrics::describe_counter!(
        m::OPTIMISTIC_EXHAUSTED_TOTAL,
        "Requests that ran out of optimistic retries"
    );
    metrics::describe_counter!(
        m::IDEMPOTENT_REPLAYS_TOTAL,
        "Requests answered from a stored response"
    );
    metrics::describe_counter!(
        m::IDEMPOTENCY_IN_USE_TOTAL,
        "Duplicates answered IDEMPOTENCY_KEY_IN_USE"
    );
    metrics::describe_counter!(
        m::IDEMPOTENCY_REUSED_TOTAL,
        "Keys refused as reused with another request"
    );
    metrics::describe_counter!(m::OPERATIONS_APPLIED_TOTAL, "Balance changes committed");
    metrics::describe_counter!(m::OPERATIONS_REFUSED_TOTAL, "Business refusals stored");
    metrics::describe_counter!(
        m::IDEMPOTENCY_PURGED_TOTAL,
        "Expired idempotency records deleted"
    );
    metrics::describe_gauge!(
        m::AUDIT_BREACHES,
        "Breaches found by the last audit of the books, by check (0: the check passed)"
    );
    metrics::describe_gauge!(
        m::AUDIT_LAST_RUN_SECONDS,
        metrics::Unit::Seconds,
        "When the last audit of the books finished (Unix time)"
    );
    metrics::describe_counter!(
        redis_lock::REDIS_ERRORS_TOTAL,
        "Redis errors met by the lock, by operation and outcome"
    );
    metrics::describe_counter!(
        redis_lock::HANDOFFS_TOTAL,
        "Locks handed from a releasing holder to a waiter of this instance without a Redis round trip"
    );
}

/// An error and its causes on one line, `outer: cause: root`, each said once: some errors
/// (sqlx's among them) repeat their source's text in their own message, which `{:#}`
/// would then print again for every level.
pub fn error_chain(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if line.ends_with(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

#[cfg(test)]
mod chain_tests {
    use super::error_chain;

    /// An error that repeats its source's text, as sqlx's do.
    #[derive(Debug)]
    struct Wrapping(std::io::Error);

    impl std::fmt::Display for Wrapping {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "while executing migrations: {}", self.0)
        }
    }

    impl std::error::Error for Wrapping {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn each_cause_is_said_once() {
        let root = std::io::Error::other("1049 (42000): Unknown database 'nosuchdb'");
        let error = anyhow::Error::new(Wrapping(root)).context("migrate");
        assert_eq!(
            error_chain(&error),
            "migrate: while executing migrations: 1049 (42000): Unknown database 'nosuchdb'"
        );
        let plain = anyhow::anyhow!("root").context("middle").context("outer");
        assert_eq!(error_chain(&plain), "outer: middle: root");
    }
}
