//! Time helpers: the service keeps and shows instants to the millisecond.

use chrono::{DateTime, SecondsFormat, SubsecRound, Utc};

/// Drops sub-millisecond digits, so what is stored (DATETIME(3)) equals what was computed.
pub fn truncate_to_millis(t: DateTime<Utc>) -> DateTime<Utc> {
    t.trunc_subsecs(3)
}

/// RFC 3339, UTC, milliseconds: `2026-11-22T14:00:00.123Z`.
pub fn format_rfc3339_millis(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}
