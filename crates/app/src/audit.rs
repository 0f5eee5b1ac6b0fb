//! The reconciliation of the books, for people and for Prometheus: one run of the
//! [`Auditor`], its gauges and log lines, the periodic run of `serve`, and the reports of
//! `balance-service audit`.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use domain::Settings;
use domain::ports::{AuditCheck, AuditReport, Auditor, Clock, RepoError, SystemClock};
use domain::telemetry::{AUDIT_BREACHES, AUDIT_LAST_RUN_SECONDS};
use domain::time::format_rfc3339_millis;
use serde_json::json;

/// Exit status of `balance-service audit`: the books reconcile.
pub const EXIT_CLEAN: u8 = 0;
/// Exit status of `balance-service audit`: at least one breach.
pub const EXIT_BREACHES: u8 = 1;
/// Exit status of `balance-service audit`: the audit could not run.
pub const EXIT_ERROR: u8 = 2;

/// Breaches of one check written to the log by a run that found some (all are counted
/// in the gauge; `balance-service audit` lists up to 100).
const LOGGED_PER_CHECK: usize = 5;

/// One audit with the service's retention and lease, as of now.
#[derive(Debug, Clone)]
pub struct AuditRun {
    pub report: AuditReport,
    /// The instant audited (when the run began).
    pub at: DateTime<Utc>,
    /// When the run finished.
    pub finished: DateTime<Utc>,
    pub key_ttl: Duration,
    pub lease: Duration,
}

/// Runs the audit once with `settings`' idempotency retention and lock lease.
///
/// # Errors
/// When the store cannot be read.
pub async fn run_once(auditor: &dyn Auditor, settings: &Settings) -> Result<AuditRun, RepoError> {
    let at = SystemClock.now();
    let report = auditor
        .audit(settings.idempotency_ttl, settings.lock_lease, at)
        .await?;
    Ok(AuditRun {
        report,
        at,
        finished: SystemClock.now(),
        key_ttl: settings.idempotency_ttl,
        lease: settings.lock_lease,
    })
}

/// Adds breaches found outside the store's auditor (the coupon gate's) to a run.
pub fn add_breaches(run: &mut AuditRun, breaches: Vec<domain::ports::Breach>) {
    for breach in breaches {
        run.report.add(breach);
    }
}

/// Sets the gauges: breaches by check (every check, 0 when clean) and when the run
/// finished.
pub fn record(run: &AuditRun) {
    for check in AuditCheck::ALL {
        metrics::gauge!(AUDIT_BREACHES, "check" => check.name())
            .set(run.report.found(check) as f64);
    }
    metrics::gauge!(AUDIT_LAST_RUN_SECONDS).set(run.finished.timestamp_millis() as f64 / 1000.0);
}

/// Logs a run: one info line when clean; otherwise an error line with the counts and a
/// warning for each of the first breaches of each check.
pub fn log(run: &AuditRun) {
    let report = &run.report;
    if report.is_clean() {
        tracing::info!(
            users = report.users,
            ledger_entries = report.ledger_entries,
            records = report.records,
            orders = report.orders,
            payments = report.payments,
            "audit: the books reconcile"
        );
        return;
    }
    let by_check = AuditCheck::ALL
        .iter()
        .filter(|check| report.found(**check) > 0)
        .map(|check| format!("{}={}", check.name(), report.found(*check)))
        .collect::<Vec<_>>()
        .join(" ");
    tracing::error!(
        breaches = report.total_found(),
        by_check = %by_check,
        "audit: THE BOOKS DO NOT RECONCILE (run `balance-service audit` for the list)"
    );
    for check in AuditCheck::ALL {
        for breach in report.listed(check).take(LOGGED_PER_CHECK) {
            tracing::warn!(
                check = check.name(),
                subject = %breach.subject,
                detail = %breach.detail,
                "audit breach"
            );
        }
    }
}

/// Audits every `every`, forever: gauges and logs after each run. A run that fails is
/// logged and leaves the gauges as they were (the last-run time then stops moving).
pub async fn run_periodically(
    auditor: Arc<dyn Auditor>,
    service: domain::BalanceService,
    every: Duration,
) {
    let settings = service.settings().clone();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match run_once(auditor.as_ref(), &settings).await {
            Ok(mut run) => {
                match service.audit_coupon_gate().await {
                    Ok(breaches) => add_breaches(&mut run, breaches),
                    Err(e) => tracing::warn!(error = %format!("{e:#}"),
                        "audit: could not compare the coupon gate with the database"),
                }
                record(&run);
                log(&run);
            }
            Err(e) => {
                tracing::warn!(error = %format!("{:#}", anyhow::Error::from(e)), "audit: could not read the books");
            }
        }
    }
}

/// The text report of `balance-service audit`: each check OK or its breach count with
/// the first `show` breaches, the counts looked at, and the verdict.
pub fn render_text(run: &AuditRun, show: usize) -> String {
    let report = &run.report;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "audit of the books at {} (key retention {} s, lock lease {} ms)",
        format_rfc3339_millis(run.at),
        run.key_ttl.as_secs(),
        run.lease.as_millis()
    );
    let _ = writeln!(
        out,
        "looked at {} users, {} ledger entries, {} idempotency records, {} orders, {} payments, \
         {} refunds, {} coupons, {} user coupons",
        report.users,
        report.ledger_entries,
        report.records,
        report.orders,
        report.payments,
        report.refunds,
        report.coupons,
        report.user_coupons
    );
    out.push('\n');
    let width = AuditCheck::ALL
        .iter()
        .map(|check| check.name().len())
        .max()
        .unwrap_or(0);
    for check in AuditCheck::ALL {
        let found = report.found(check);
        if found == 0 {
            let _ = writeln!(out, "{:<width$}  OK", check.name());
            continue;
        }
        let noun = if found == 1 { "breach" } else { "breaches" };
        let _ = writeln!(out, "{:<width$}  {found} {noun}", check.name());
        let mut shown = 0_u64;
        for breach in report.listed(check).take(show) {
            let _ = writeln!(out, "    {}: {}", breach.subject, breach.detail);
            shown += 1;
        }
        if found > shown {
            let listed = report.listed(check).count();
            let _ = writeln!(
                out,
                "    … and {} more ({listed} listed: --show {listed} or --json)",
                found - shown
            );
        }
    }
    out.push('\n');
    match report.total_found() {
        0 => out.push_str("CLEAN: every check passed\n"),
        1 => out.push_str("NOT CLEAN: 1 breach\n"),
        n => {
            let _ = writeln!(out, "NOT CLEAN: {n} breaches");
        }
    }
    out
}

/// The JSON report of `balance-service audit --json`: one object, every listed breach.
///
/// ```json
/// {"clean":false,"at":"…","keyRetentionSecs":86400,"lockLeaseMs":30000,
///  "counts":{"users":3,"ledgerEntries":9,"records":5,"orders":2,"payments":1,"refunds":0,
///            "coupons":1,"userCoupons":1},
///  "totalBreaches":1,
///  "checks":[{"check":"balance_matches_ledger","breaches":1,
///             "listed":[{"subject":"user 1","detail":"…"}]}, …]}
/// ```
pub fn render_json(run: &AuditRun) -> String {
    let report = &run.report;
    let checks: Vec<_> = AuditCheck::ALL
        .iter()
        .map(|check| {
            let listed: Vec<_> = report
                .listed(*check)
                .map(|b| json!({"subject": b.subject, "detail": b.detail}))
                .collect();
            json!({"check": check.name(), "breaches": report.found(*check), "listed": listed})
        })
        .collect();
    json!({
        "clean": report.is_clean(),
        "at": format_rfc3339_millis(run.at),
        "keyRetentionSecs": run.key_ttl.as_secs(),
        "lockLeaseMs": u64::try_from(run.lease.as_millis()).unwrap_or(u64::MAX),
        "counts": {
            "users": report.users,
            "ledgerEntries": report.ledger_entries,
            "records": report.records,
            "orders": report.orders,
            "payments": report.payments,
            "refunds": report.refunds,
            "coupons": report.coupons,
            "userCoupons": report.user_coupons,
        },
        "totalBreaches": report.total_found(),
        "checks": checks,
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use domain::ports::Breach;

    use super::*;

    fn run(report: AuditReport) -> AuditRun {
        AuditRun {
            report,
            at: DateTime::from_timestamp(1_800_000_000, 0).unwrap(),
            finished: DateTime::from_timestamp(1_800_000_001, 0).unwrap(),
            key_ttl: Duration::from_secs(86_400),
            lease: Duration::from_secs(30),
        }
    }

    fn broken() -> AuditReport {
        let mut report = AuditReport {
            users: 3,
            ledger_entries: 9,
            ..AuditReport::default()
        };
        for n in 0..12 {
            report.add(Breach {
                check: AuditCheck::KeyAppliedOnce,
                subject: format!("user {n} key \"odd\\key\""),
                detail: "twice\tin a row".to_owned(),
            });
        }
        report
    }

    #[test]
    fn a_clean_report_reads_ok_for_every_check() {
        let text = render_text(&run(AuditReport::default()), 10);
        for check in AuditCheck::ALL {
            assert!(text.contains(&format!("{}  ", check.name())), "{text}");
        }
        assert_eq!(
            text.matches("  OK\n").count(),
            AuditCheck::ALL.len(),
            "{text}"
        );
        assert!(text.ends_with("CLEAN: every check passed\n"), "{text}");
    }

    #[test]
    fn a_broken_report_shows_the_first_breaches_and_how_many_more() {
        let text = render_text(&run(broken()), 3);
        assert!(
            text.lines()
                .any(|line| line.starts_with("key_applied_once  ")
                    && line.ends_with("  12 breaches")),
            "{text}"
        );
        assert!(
            text.contains("    user 0 key \"odd\\key\": twice\tin a row\n"),
            "{text}"
        );
        assert!(!text.contains("user 3 key"), "{text}");
        assert!(
            text.contains("… and 9 more (12 listed: --show 12 or --json)"),
            "{text}"
        );
        assert!(text.ends_with("NOT CLEAN: 12 breaches\n"), "{text}");
    }

    #[test]
    fn the_json_report_lists_everything() {
        let json: serde_json::Value = serde_json::from_str(&render_json(&run(broken()))).unwrap();
        assert_eq!(json["clean"], false);
        assert_eq!(json["at"], "2027-01-15T08:00:00.000Z");
        assert_eq!(json["keyRetentionSecs"], 86_400);
        assert_eq!(json["lockLeaseMs"], 30_000);
        assert_eq!(json["counts"]["users"], 3);
        assert_eq!(json["counts"]["ledgerEntries"], 9);
        assert_eq!(json["totalBreaches"], 12);
        let checks = json["checks"].as_array().unwrap();
        assert_eq!(checks.len(), AuditCheck::ALL.len());
        assert_eq!(
            checks[0],
            serde_json::json!({"check": "balance_matches_ledger", "breaches": 0, "listed": []})
        );
        let twice = &checks[2];
        assert_eq!(twice["check"], "key_applied_once");
        assert_eq!(twice["breaches"], 12);
        assert_eq!(twice["listed"].as_array().unwrap().len(), 12);
        assert_eq!(twice["listed"][0]["subject"], "user 0 key \"odd\\key\"");
        assert_eq!(twice["listed"][0]["detail"], "twice\tin a row");
    }
}
