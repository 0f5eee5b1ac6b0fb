//! The audit report: every breach counted, at most the cap of each check listed.

use domain::ports::{AuditCheck, AuditReport, Breach};

fn breach(check: AuditCheck, n: usize) -> Breach {
    Breach {
        check,
        subject: format!("user {n}"),
        detail: "broken".to_owned(),
    }
}

#[test]
fn an_empty_report_is_clean_and_counts_nothing() {
    let report = AuditReport::default();
    assert!(report.is_clean());
    assert_eq!(report.total_found(), 0);
    for check in AuditCheck::ALL {
        assert_eq!(report.found(check), 0);
    }
}

#[test]
fn add_counts_every_breach_and_lists_up_to_the_cap() {
    let mut report = AuditReport::default();
    let many = AuditReport::LISTED_PER_CHECK + 25;
    for n in 0..many {
        report.add(breach(AuditCheck::KeyAppliedOnce, n));
    }
    report.add(breach(AuditCheck::BalanceMatchesLedger, 1));
    assert!(!report.is_clean());
    assert_eq!(report.found(AuditCheck::KeyAppliedOnce), many as u64);
    assert_eq!(
        report.listed(AuditCheck::KeyAppliedOnce).count(),
        AuditReport::LISTED_PER_CHECK
    );
    assert_eq!(report.found(AuditCheck::BalanceMatchesLedger), 1);
    assert_eq!(report.found(AuditCheck::RecordHasOneEffect), 0);
    assert_eq!(report.total_found(), many as u64 + 1);
    // The first ones found are the ones listed.
    assert_eq!(
        report
            .listed(AuditCheck::KeyAppliedOnce)
            .next()
            .map(|b| b.subject.as_str()),
        Some("user 0")
    );
}

#[test]
fn add_found_keeps_the_total_of_a_capped_query() {
    let mut report = AuditReport::default();
    let listed =
        (0..AuditReport::LISTED_PER_CHECK).map(|n| breach(AuditCheck::PaidOrderHasOnePayment, n));
    report.add_found(AuditCheck::PaidOrderHasOnePayment, 5_000, listed);
    // A second query of the same check adds to the count; the list is full already.
    report.add_found(
        AuditCheck::PaidOrderHasOnePayment,
        2,
        [breach(AuditCheck::PaidOrderHasOnePayment, 9_999)],
    );
    assert_eq!(report.found(AuditCheck::PaidOrderHasOnePayment), 5_002);
    assert_eq!(
        report.listed(AuditCheck::PaidOrderHasOnePayment).count(),
        AuditReport::LISTED_PER_CHECK
    );
    // A total below what is listed is taken as the listed count.
    report.add_found(
        AuditCheck::RecordHasOneEffect,
        0,
        [breach(AuditCheck::RecordHasOneEffect, 1)],
    );
    assert_eq!(report.found(AuditCheck::RecordHasOneEffect), 1);
}
