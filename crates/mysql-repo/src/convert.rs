//! Conversions between domain values and column values. A stored value that does not
//! convert back is corrupt data: an `Unexpected` error, never a panic.

use anyhow::anyhow;
use chrono::{DateTime, NaiveDate, NaiveDateTime, SubsecRound, Utc};
use domain::idempotency::{
    CompletedRecord, Fingerprint, RecordOutcome, StoredResponse, legacy_operation, legacy_outcome,
};
use domain::model::EntryKind;
use domain::operations::OperationKind;
use domain::types::{
    CouponId, EntryId, IdempotencyKey, OrderId, PaymentId, RefundId, UserCouponId, UserId,
};

/// A `datetime(3)` value: UTC, truncated to milliseconds. The domain truncates already;
/// doing it again here makes MySQL (which rounds extra digits) and MariaDB (which
/// truncates them) store the same instant whatever the caller passed.
pub(crate) fn to_db_time(t: DateTime<Utc>) -> NaiveDateTime {
    t.trunc_subsecs(3).naive_utc()
}

/// An expiry as a `datetime(3)`: an instant past the column's range (year 9999), such as
/// the "never" the domain uses for an unbounded retention, is stored as its last instant.
pub(crate) fn to_db_expiry(t: DateTime<Utc>) -> NaiveDateTime {
    let t = to_db_time(t);
    let last =
        NaiveDate::from_ymd_opt(9999, 12, 31).and_then(|d| d.and_hms_milli_opt(23, 59, 59, 999));
    match last {
        Some(last) if t > last => last,
        _ => t,
    }
}

/// A `datetime(3)` column read back; sessions run with `time_zone = '+00:00'`.
pub(crate) fn from_db_time(t: NaiveDateTime) -> DateTime<Utc> {
    t.and_utc()
}

/// An id the database assigned (`last_insert_id()` or a bigint column).
pub(crate) fn id_from_db<T>(
    raw: impl TryInto<i64>,
    what: &str,
    make: impl FnOnce(i64) -> Result<T, domain::types::ValidationError>,
) -> anyhow::Result<T> {
    let value = raw
        .try_into()
        .map_err(|_| anyhow!("stored {what} does not fit in a signed 64-bit integer"))?;
    make(value).map_err(|e| anyhow!("stored {what} {value} is invalid: {e}"))
}

pub(crate) fn user_id(raw: impl TryInto<i64>) -> anyhow::Result<UserId> {
    id_from_db(raw, "user id", UserId::new)
}

pub(crate) fn order_id(raw: impl TryInto<i64>) -> anyhow::Result<OrderId> {
    id_from_db(raw, "order id", OrderId::new)
}

pub(crate) fn payment_id(raw: impl TryInto<i64>) -> anyhow::Result<PaymentId> {
    id_from_db(raw, "payment id", PaymentId::new)
}

pub(crate) fn refund_id(raw: impl TryInto<i64>) -> anyhow::Result<RefundId> {
    id_from_db(raw, "refund id", RefundId::new)
}

pub(crate) fn entry_id(raw: impl TryInto<i64>) -> anyhow::Result<EntryId> {
    id_from_db(raw, "ledger entry id", EntryId::new)
}

pub(crate) fn coupon_id(raw: impl TryInto<i64>) -> anyhow::Result<CouponId> {
    id_from_db(raw, "coupon id", CouponId::new)
}

pub(crate) fn user_coupon_id(raw: impl TryInto<i64>) -> anyhow::Result<UserCouponId> {
    id_from_db(raw, "user coupon id", UserCouponId::new)
}

/// A count or a number of days stored as a signed `int`; the domain counts in `u32`.
pub(crate) fn quantity_from_db(raw: i64, what: &str) -> anyhow::Result<u32> {
    u32::try_from(raw).map_err(|_| anyhow!("stored {what} {raw} is out of range"))
}

/// The `version` column is a signed bigint; the domain counts in `u64`.
pub(crate) fn version_from_db(raw: i64) -> anyhow::Result<u64> {
    u64::try_from(raw).map_err(|_| anyhow!("stored version {raw} is negative"))
}

/// A version the domain read from us, bound back in a `where version = ?`.
pub(crate) fn version_to_db(version: u64) -> anyhow::Result<i64> {
    i64::try_from(version).map_err(|_| anyhow!("version {version} does not fit in a bigint"))
}

pub(crate) fn entry_kind(raw: &str) -> anyhow::Result<EntryKind> {
    EntryKind::parse(raw).ok_or_else(|| anyhow!("stored ledger entry kind {raw:?} is unknown"))
}

pub(crate) fn idempotency_key(raw: &str) -> anyhow::Result<IdempotencyKey> {
    IdempotencyKey::parse(raw).map_err(|e| anyhow!("stored idempotency key is invalid: {e}"))
}

/// The response columns of an idempotency record.
pub(crate) fn stored_response(status: u16, body: Vec<u8>) -> StoredResponse {
    StoredResponse { status, body }
}

/// The columns of a completed record, in the order `sql::FIND_KEY` (and the batch read)
/// select them after the user and the key.
pub(crate) struct RecordColumns {
    pub(crate) fingerprint: String,
    pub(crate) operation: Option<String>,
    pub(crate) outcome: Option<String>,
    pub(crate) status: u16,
    pub(crate) body: Vec<u8>,
    pub(crate) created_at: NaiveDateTime,
    pub(crate) expires_at: NaiveDateTime,
}

/// A completed record of (`user`, `key`) read back.
pub(crate) fn completed_record(
    user: UserId,
    key: IdempotencyKey,
    columns: RecordColumns,
) -> anyhow::Result<CompletedRecord> {
    let RecordColumns {
        fingerprint,
        operation,
        outcome,
        status,
        body,
        created_at,
        expires_at,
    } = columns;
    let (operation, outcome) = record_facts(
        operation.as_deref(),
        outcome.as_deref(),
        &fingerprint,
        status,
    )?;
    Ok(CompletedRecord {
        user_id: user,
        key,
        fingerprint: Fingerprint::from_stored(fingerprint),
        operation,
        outcome,
        response: stored_response(status, body),
        created_at: from_db_time(created_at),
        expires_at: from_db_time(expires_at),
    })
}

/// A record's operation and outcome from their columns. A null column is a row written
/// before migration 0007 added it, by an instance of the previous version during a rolling
/// upgrade: it reads by the rule the migration backfilled with (`domain::idempotency::
/// legacy_operation` / `legacy_outcome`). Every reader of records goes through here (the
/// audit's SQL uses [`OUTCOME_SQL`], the same rule).
pub(crate) fn record_facts(
    operation: Option<&str>,
    outcome: Option<&str>,
    fingerprint: &str,
    status: u16,
) -> anyhow::Result<(OperationKind, RecordOutcome)> {
    let operation = match operation {
        Some(raw) => OperationKind::parse(raw)
            .ok_or_else(|| anyhow!("stored record operation {raw:?} is unknown"))?,
        None => legacy_operation(fingerprint)
            .ok_or_else(|| anyhow!("stored record has no operation and an unknown fingerprint"))?,
    };
    let outcome = match outcome {
        Some(raw) => RecordOutcome::parse(raw)
            .ok_or_else(|| anyhow!("stored record outcome {raw:?} is unknown"))?,
        None => legacy_outcome(status),
    };
    Ok((operation, outcome))
}

/// A record's outcome in SQL, over `idempotency_records` columns, with [`record_facts`]'s
/// rule for a null `outcome` (a test checks the two agree).
pub(crate) const OUTCOME_SQL: &str = "coalesce(outcome, case when response_status between 200 and 299 \
     then 'APPLIED' else 'REFUSED' end)";

/// `amount` signed by `kind`, in SQL (`case kind when 'CHARGE' then amount ... end`), built
/// from [`EntryKind::ALL`] and [`EntryKind::sign`] so the audit's arithmetic cannot drift
/// from the domain's. `prefix` qualifies the columns (`"e."`, or `""`).
pub(crate) fn signed_amount_sql(prefix: &str) -> String {
    let mut sql = format!("case {prefix}kind");
    for kind in EntryKind::ALL {
        let sign = if kind.sign() > 0 { "" } else { "-" };
        sql.push_str(&format!(
            " when '{}' then {sign}{prefix}amount",
            kind.as_str()
        ));
    }
    sql.push_str(" end");
    sql
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_audit_sql_signs_every_kind_as_the_domain_does() {
        let sql = signed_amount_sql("e.");
        for kind in EntryKind::ALL {
            let sign = if kind.sign() > 0 { "" } else { "-" };
            let arm = format!("when '{}' then {sign}e.amount", kind.as_str());
            assert!(sql.contains(&arm), "{kind:?} in {sql}");
        }
        assert_eq!(sql.matches(" when ").count(), EntryKind::ALL.len());
    }

    #[test]
    fn a_record_without_its_columns_reads_by_the_backfill_rule() {
        let read = |op, outcome, fingerprint, status| {
            record_facts(op, outcome, fingerprint, status).map_err(|e| e.to_string())
        };
        assert_eq!(
            read(None, None, "use:user=1:amount=5", 422),
            Ok((OperationKind::Use, RecordOutcome::Refused))
        );
        assert_eq!(
            read(None, None, "payment:user=1:order=2", 200),
            Ok((OperationKind::Payment, RecordOutcome::Applied))
        );
        // The columns win over the fingerprint and the status.
        assert_eq!(
            read(Some("CHARGE"), Some("REFUSED"), "use:user=1:amount=5", 200),
            Ok((OperationKind::Charge, RecordOutcome::Refused))
        );
        assert!(read(Some("NOPE"), None, "use:user=1:amount=5", 200).is_err());
        assert!(read(None, None, "coupon:user=1", 200).is_err());
    }
}
