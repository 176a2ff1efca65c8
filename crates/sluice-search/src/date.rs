//! FHIR dates as ranges: a value stands for every instant its precision covers.
//!
//! `2024` is the year 2024, `2024-05` the month, `2024-05-03` the day,
//! `2024-05-03T10:11` the minute, `2024-05-03T10:11:12` the second and
//! `2024-05-03T10:11:12.5` the tenth of a second (one, two or three fraction digits set the
//! precision; more digits count as milliseconds). A value without a zone is read as UTC (as
//! `_since` is, DESIGN D5). Ranges are half-open, in milliseconds since the Unix epoch:
//! `[start, end)`.

use serde::{Deserialize, Serialize};
use time::{Date, Month, PrimitiveDateTime, Time, UtcOffset};

/// A half-open range of instants, in milliseconds since the Unix epoch: `[start, end)`.
/// Open ends (a `Period` without `start` or `end`) are `i64::MIN` / `i64::MAX`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Range {
    pub(crate) start: i64,
    pub(crate) end: i64,
}

/// A date search prefix (FHIR R4 search, "prefixes").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Prefix {
    /// `eq` (the default): the search range fully contains the resource's range.
    Eq,
    /// `ne`: the search range does not fully contain the resource's range.
    Ne,
    /// `gt`: the resource's range reaches past the end of the search range.
    Gt,
    /// `lt`: the resource's range begins before the start of the search range.
    Lt,
    /// `ge`: `gt` or `eq`.
    Ge,
    /// `le`: `lt` or `eq`.
    Le,
    /// `sa`: the resource's range starts at or after the end of the search range.
    Sa,
    /// `eb`: the resource's range ends at or before the start of the search range.
    Eb,
}

impl Prefix {
    /// Reads a two-letter prefix; `None` when `s` is not one Sluice supports.
    pub(crate) fn parse(s: &str) -> Option<Prefix> {
        Some(match s {
            "eq" => Prefix::Eq,
            "ne" => Prefix::Ne,
            "gt" => Prefix::Gt,
            "lt" => Prefix::Lt,
            "ge" => Prefix::Ge,
            "le" => Prefix::Le,
            "sa" => Prefix::Sa,
            "eb" => Prefix::Eb,
            _ => return None,
        })
    }

    /// The prefixes Sluice accepts, for messages.
    pub(crate) const ACCEPTED: &'static str = "eq, ne, gt, lt, ge, le, sa, eb";

    /// Whether a resource value covering `target` matches the search range `search` under
    /// this prefix, exactly as the FHIR R4 search page defines the prefixes for ranges:
    /// "the range above the search value" is `[search.end, +inf)`, "the range below" is
    /// `(-inf, search.start)`.
    pub(crate) fn test(self, search: Range, target: Range) -> bool {
        let contains = search.start <= target.start && target.end <= search.end;
        let above_overlaps = target.end > search.end;
        let below_overlaps = target.start < search.start;
        match self {
            Prefix::Eq => contains,
            Prefix::Ne => !contains,
            Prefix::Gt => above_overlaps,
            Prefix::Lt => below_overlaps,
            Prefix::Ge => above_overlaps || contains,
            Prefix::Le => below_overlaps || contains,
            Prefix::Sa => target.start >= search.end,
            Prefix::Eb => target.end <= search.start,
        }
    }
}

const MINUTE_MS: i64 = 60_000;
const DAY_MS: i64 = 86_400_000;

/// Whether `s` is exactly `n` ASCII digits.
fn digits(s: &str, n: usize) -> bool {
    s.len() == n && s.bytes().all(|b| b.is_ascii_digit())
}

/// Milliseconds since the epoch of midnight UTC on `date`.
fn midnight_ms(date: Date) -> i64 {
    (date.midnight().assume_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

/// Reads a FHIR `date`, `dateTime` or `instant` (a `+` that arrived as a space counts as
/// `+`) as the range its precision covers; `None` when it is not one.
pub(crate) fn parse(value: &str) -> Option<Range> {
    let s = value.trim().replace(' ', "+");
    if !s.is_ascii() {
        return None;
    }
    let (date_part, time_part) = match s.split_once('T') {
        Some((d, t)) => (d, Some(t)),
        None => (s.as_str(), None),
    };
    let fields: Vec<&str> = date_part.split('-').collect();
    let year_text = fields.first()?;
    if !digits(year_text, 4) {
        return None;
    }
    let year: i32 = year_text.parse().ok()?;
    let month_of = |text: &str| -> Option<Month> {
        if !digits(text, 2) {
            return None;
        }
        Month::try_from(text.parse::<u8>().ok()?).ok()
    };
    match (fields.as_slice(), time_part) {
        ([_], None) => {
            let start = Date::from_calendar_date(year, Month::January, 1).ok()?;
            let end = Date::from_calendar_date(year + 1, Month::January, 1).ok()?;
            Some(Range { start: midnight_ms(start), end: midnight_ms(end) })
        }
        ([_, m], None) => {
            let month = month_of(m)?;
            let start = Date::from_calendar_date(year, month, 1).ok()?;
            let (next_year, next_month) =
                if month == Month::December { (year + 1, Month::January) } else { (year, month.next()) };
            let end = Date::from_calendar_date(next_year, next_month, 1).ok()?;
            Some(Range { start: midnight_ms(start), end: midnight_ms(end) })
        }
        ([_, m, d], time_part) => {
            let month = month_of(m)?;
            if !digits(d, 2) {
                return None;
            }
            let date = Date::from_calendar_date(year, month, d.parse().ok()?).ok()?;
            match time_part {
                None => {
                    let start = midnight_ms(date);
                    Some(Range { start, end: start + DAY_MS })
                }
                Some(t) => parse_time(date, t),
            }
        }
        _ => None,
    }
}

/// The time of a dateTime/instant after the `T`: `hh:mm[:ss[.fff]][Z|+hh:mm|-hh:mm]`.
fn parse_time(date: Date, text: &str) -> Option<Range> {
    let (clock, offset) = match text.find(['Z', '+', '-']) {
        Some(i) => (&text[..i], Some(&text[i..])),
        None => (text, None),
    };
    let offset = match offset {
        None => UtcOffset::UTC,
        Some("Z") => UtcOffset::UTC,
        Some(o) => {
            let sign: i8 = if o.starts_with('-') { -1 } else { 1 };
            let (h, m) = o[1..].split_once(':')?;
            if !digits(h, 2) || !digits(m, 2) {
                return None;
            }
            let (h, m): (i8, i8) = (h.parse().ok()?, m.parse().ok()?);
            if h > 14 || m > 59 {
                return None;
            }
            UtcOffset::from_hms(sign * h, sign * m, 0).ok()?
        }
    };
    let parts: Vec<&str> = clock.split(':').collect();
    let (hour, minute, second, fraction) = match parts.as_slice() {
        [h, m] => (*h, *m, None, None),
        [h, m, s] => match s.split_once('.') {
            Some((whole, frac)) => (*h, *m, Some(whole), Some(frac)),
            None => (*h, *m, Some(*s), None),
        },
        _ => return None,
    };
    if !digits(hour, 2) || !digits(minute, 2) || second.is_some_and(|s| !digits(s, 2)) {
        return None;
    }
    let time =
        Time::from_hms(hour.parse().ok()?, minute.parse().ok()?, second.map_or(Some(0), |s| s.parse().ok())?).ok()?;
    let base = (PrimitiveDateTime::new(date, time).assume_offset(offset).unix_timestamp_nanos() / 1_000_000) as i64;
    let (millis, unit) = match (second, fraction) {
        (None, _) => (0, MINUTE_MS),
        (Some(_), None) => (0, 1000),
        (Some(_), Some(frac)) => {
            if frac.is_empty() || !frac.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            let kept = &frac[..frac.len().min(3)];
            let scale = 10_i64.pow(3 - kept.len() as u32);
            (kept.parse::<i64>().ok()? * scale, scale)
        }
    };
    let start = base + millis;
    Some(Range { start, end: start + unit })
}

/// The range of a resource's date-like JSON value: a `date`/`dateTime`/`instant` string, or
/// a `Period` object (missing `start` or `end` is open). `None` for anything else.
pub(crate) fn of_json(value: &sluice_json::Json<'_>) -> Option<Range> {
    match value {
        sluice_json::Json::String(s) => parse(&s.text()),
        sluice_json::Json::Object(_) => {
            let bound = |key: &str| value.get(key).and_then(sluice_json::Json::as_str);
            let (start, end) = (bound("start"), bound("end"));
            if start.is_none() && end.is_none() {
                return None;
            }
            let start = match start {
                Some(s) => parse(&s)?.start,
                None => i64::MIN,
            };
            let end = match end {
                Some(e) => parse(&e)?.end,
                None => i64::MAX,
            };
            Some(Range { start, end })
        }
        _ => None,
    }
}
