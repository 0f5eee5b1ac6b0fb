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

/// Parses a client's RFC 3339 instant (any offset) into UTC at the millisecond the service
/// keeps. A leap second (`…:60.5Z`) is folded into the last millisecond of its minute
/// (`…:59.999Z`): the ledger's clocks never write one, and "at or before" then means the
/// same. Years outside 1..=9999 (after the offset is applied) are refused: no entry is
/// that old, storage cannot hold them, and the echoed time would not be RFC 3339.
///
/// # Errors
/// A [`crate::types::ValidationError`] naming `name` for anything else.
pub fn parse_instant(
    raw: &str,
    name: &str,
) -> Result<DateTime<Utc>, crate::types::ValidationError> {
    use chrono::{Datelike, Timelike};
    let invalid = || {
        crate::types::ValidationError(format!(
            "{name} must be an RFC 3339 time between the years 1 and 9999, e.g. 2026-11-22T14:00:00.000Z"
        ))
    };
    let parsed = DateTime::parse_from_rfc3339(raw)
        .map_err(|_| invalid())?
        .with_timezone(&Utc);
    let folded = if parsed.nanosecond() >= 1_000_000_000 {
        parsed.with_nanosecond(999_000_000).ok_or_else(invalid)?
    } else {
        parsed
    };
    if !(1..=9999).contains(&folded.year()) {
        return Err(invalid());
    }
    Ok(truncate_to_millis(folded))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(raw: &str) -> Option<String> {
        parse_instant(raw, "at").ok().map(format_rfc3339_millis)
    }

    #[test]
    fn instants_are_utc_milliseconds_of_any_offset() {
        assert_eq!(
            at("2026-11-22T23:00:00.123456+09:00").as_deref(),
            Some("2026-11-22T14:00:00.123Z")
        );
        assert_eq!(
            at("2026-11-22T14:00:00-00:00").as_deref(),
            Some("2026-11-22T14:00:00.000Z")
        );
    }

    #[test]
    fn a_leap_second_is_the_last_millisecond_of_its_minute() {
        for raw in [
            "2026-12-31T23:59:60Z",
            "2026-12-31T23:59:60.999Z",
            "2027-01-01T08:59:60.5+09:00",
        ] {
            assert_eq!(
                at(raw).as_deref(),
                Some("2026-12-31T23:59:59.999Z"),
                "{raw}"
            );
        }
    }

    #[test]
    fn years_outside_one_to_9999_and_non_times_are_refused() {
        for raw in [
            "0000-01-01T00:00:00+00:01",
            "0000-01-01T00:00:00Z",
            "9999-12-31T23:59:59-23:59",
            "yesterday",
            "2026-02-30T00:00:00Z",
            "2026-11-22T14:00:00",
            "",
        ] {
            assert_eq!(at(raw), None, "{raw}");
        }
        assert_eq!(
            at("0001-01-01T00:00:00Z").as_deref(),
            Some("0001-01-01T00:00:00.000Z")
        );
        assert_eq!(
            at("9999-12-31T23:59:59Z").as_deref(),
            Some("9999-12-31T23:59:59.000Z")
        );
    }
}
