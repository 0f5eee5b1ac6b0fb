//! Conversions between domain values and column values. A stored value that does not
//! convert back is corrupt data: an `Unexpected` error, never a panic.

use anyhow::anyhow;
use chrono::{DateTime, NaiveDate, NaiveDateTime, SubsecRound, Utc};
use domain::idempotency::StoredResponse;
use domain::model::EntryKind;
use domain::types::{EntryId, IdempotencyKey, OrderId, PaymentId, UserId};

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

pub(crate) fn entry_id(raw: impl TryInto<i64>) -> anyhow::Result<EntryId> {
    id_from_db(raw, "ledger entry id", EntryId::new)
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
