//! FHIR `instant`, `dateTime` and `date` values.
//!
//! Sluice accepts, wherever a point in time is asked for (`_since`, `_until`), a FHIR
//! `instant` or a `dateTime`/`date` of any precision (`2024`, `2024-05`, `2024-05-01`,
//! `2024-05-01T10:00:00`, with or without a zone); a missing zone means UTC and a partial
//! value means the start of its period. Server times are formatted as instants with
//! millisecond precision in UTC.

use time::format_description::well_known::Rfc3339;
use time::macros::format_description;
use time::{Date, Month, OffsetDateTime, PrimitiveDateTime, UtcOffset};

/// Why a value is not a FHIR date, dateTime or instant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{value}' is not a FHIR instant, dateTime or date (expected e.g. 2024-05-01T10:00:00Z, 2024-05-01 or 2024)")]
pub struct InstantError {
    /// The rejected input.
    pub value: String,
}

/// Parses a FHIR `instant`, `dateTime` or `date`.
///
/// A `+` that arrived as a space (an unencoded `+` in a query string) is read as `+`.
pub fn parse(value: &str) -> Result<OffsetDateTime, InstantError> {
    let err = || InstantError { value: value.to_string() };
    let s = value.trim().replace(' ', "+");
    if s.is_empty() {
        return Err(err());
    }
    if let Ok(t) = OffsetDateTime::parse(&s, &Rfc3339) {
        return Ok(t.to_offset(UtcOffset::UTC));
    }
    let digits = |part: &str, n: usize| part.len() == n && part.bytes().all(|b| b.is_ascii_digit());
    match s.len() {
        4 if digits(&s, 4) => {
            let y: i32 = s.parse().map_err(|_| err())?;
            let d = Date::from_calendar_date(y, Month::January, 1).map_err(|_| err())?;
            Ok(d.midnight().assume_utc())
        }
        7 if digits(&s[..4], 4) && &s[4..5] == "-" && digits(&s[5..], 2) => {
            let y: i32 = s[..4].parse().map_err(|_| err())?;
            let m: u8 = s[5..].parse().map_err(|_| err())?;
            let month = Month::try_from(m).map_err(|_| err())?;
            let d = Date::from_calendar_date(y, month, 1).map_err(|_| err())?;
            Ok(d.midnight().assume_utc())
        }
        10 => {
            let d = Date::parse(&s, format_description!("[year]-[month]-[day]")).map_err(|_| err())?;
            Ok(d.midnight().assume_utc())
        }
        _ => {
            // dateTime without a zone: UTC.
            let with_frac = format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond]");
            let no_frac = format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]");
            let no_sec = format_description!("[year]-[month]-[day]T[hour]:[minute]");
            PrimitiveDateTime::parse(&s, with_frac)
                .or_else(|_| PrimitiveDateTime::parse(&s, no_frac))
                .or_else(|_| PrimitiveDateTime::parse(&s, no_sec))
                .map(PrimitiveDateTime::assume_utc)
                .map_err(|_| err())
        }
    }
}

/// Formats a time as a FHIR instant in UTC with millisecond precision:
/// `2024-05-01T10:00:00.000Z`.
pub fn format(t: OffsetDateTime) -> String {
    let t = t.to_offset(UtcOffset::UTC);
    t.format(format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"))
        .expect("formatting a UTC time with a fixed description cannot fail")
}

/// Milliseconds since the Unix epoch (floor).
pub fn to_millis(t: OffsetDateTime) -> i64 {
    (t.unix_timestamp_nanos().div_euclid(1_000_000)) as i64
}

/// The UTC time `ms` milliseconds after the Unix epoch.
pub fn from_millis(ms: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// Formats milliseconds since the epoch as a FHIR instant.
pub fn format_millis(ms: i64) -> String {
    format(from_millis(ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(s: &str) -> i64 {
        to_millis(parse(s).unwrap())
    }

    #[test]
    fn parses_all_precisions() {
        assert_eq!(format(parse("2024").unwrap()), "2024-01-01T00:00:00.000Z");
        assert_eq!(format(parse("2024-05").unwrap()), "2024-05-01T00:00:00.000Z");
        assert_eq!(format(parse("2024-05-03").unwrap()), "2024-05-03T00:00:00.000Z");
        assert_eq!(format(parse("2024-05-03T10:11").unwrap()), "2024-05-03T10:11:00.000Z");
        assert_eq!(format(parse("2024-05-03T10:11:12").unwrap()), "2024-05-03T10:11:12.000Z");
        assert_eq!(format(parse("2024-05-03T10:11:12.5").unwrap()), "2024-05-03T10:11:12.500Z");
        assert_eq!(format(parse("2024-05-03T10:11:12Z").unwrap()), "2024-05-03T10:11:12.000Z");
        assert_eq!(format(parse("2024-05-03T10:11:12.123+02:00").unwrap()), "2024-05-03T08:11:12.123Z");
    }

    #[test]
    fn plus_sent_as_space_is_a_plus() {
        assert_eq!(ms("2024-05-03T10:00:00 02:00"), ms("2024-05-03T08:00:00Z"));
    }

    #[test]
    fn rejects_garbage() {
        for bad in ["", "yesterday", "2024-13", "2024-02-30", "20240101", "2024-05-03T25:00:00Z", "12"] {
            assert!(parse(bad).is_err(), "{bad} should be rejected");
        }
        let e = parse("nope").unwrap_err();
        assert!(e.to_string().contains("'nope'"));
    }

    #[test]
    fn millis_round_trip() {
        let t = parse("2024-05-03T10:11:12.345Z").unwrap();
        assert_eq!(from_millis(to_millis(t)), t);
        assert_eq!(format_millis(to_millis(t)), "2024-05-03T10:11:12.345Z");
        assert_eq!(to_millis(parse("1969-12-31T23:59:59.9995Z").unwrap()), -1);
    }
}
