//! What a resource store can select before the queries are evaluated in memory: the
//! `meta.lastUpdated` window and the ids that the `_lastUpdated` and `_id` criteria of
//! `_typeFilter` queries allow.
//!
//! The bounds are a superset: every resource that some query matches lies within them (the
//! caller still evaluates [`matches_any`](crate::matches_any) on what the store returns).
//! Queries are OR-ed (the bounds are the hull of each query's window and the union of each
//! query's ids), criteria AND-ed (intersected), values OR-ed (their hull or union). A query
//! without a bound of one kind leaves that bound open.
//!
//! The window assumes what the stores do: a resource's `meta.lastUpdated` is the instant
//! the store compares, with millisecond precision (the stores stamp it so), so a resource
//! stands for the one-millisecond range `[t, t + 1 ms)` when the prefixes are applied. The
//! window is then exact for every prefix but `ne`, which bounds nothing.

use std::collections::BTreeSet;

use time::OffsetDateTime;

use crate::{DateValue, Prefix, Test, TokenValue, TypeQuery};

/// The bounds that `_typeFilter` queries put on the resources of their type, for a store
/// to narrow its scan to ([`store_bounds`]). Every field `None` means no narrowing.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StoreBounds {
    /// Only resources last updated strictly after this instant (an exclusive lower bound on
    /// `meta.lastUpdated`, like `_since`); `None`: no lower bound.
    pub after: Option<OffsetDateTime>,
    /// Only resources last updated at or before this instant (an inclusive upper bound on
    /// `meta.lastUpdated`, like `_until`); `None`: no upper bound.
    pub until: Option<OffsetDateTime>,
    /// Only resources with one of these ids; `None`: every id. An empty set selects nothing
    /// (no query can match any resource).
    pub ids: Option<BTreeSet<String>>,
}

impl StoreBounds {
    /// Whether these bounds narrow nothing.
    pub fn is_unbounded(&self) -> bool {
        self.after.is_none() && self.until.is_none() && self.ids.is_none()
    }
}

/// The bounds on `meta.lastUpdated` and on the id that a resource must meet for any of
/// `queries` (OR-ed, as [`matches_any`](crate::matches_any) evaluates them) to match it. A
/// superset: a resource outside them matches none of the queries. No queries: no bounds
/// (there is no filter).
///
/// Bounds come from `_lastUpdated` criteria (every prefix but `ne`, at the precision of the
/// search value) and from `_id` criteria (token values without a system, or with the empty
/// system `|id`). `:missing`, `:not`, `:text` and every other parameter bound nothing.
pub fn store_bounds(queries: &[TypeQuery]) -> StoreBounds {
    if queries.is_empty() {
        return StoreBounds::default();
    }
    let mut window: Option<Window> = None;
    let mut ids: Option<BTreeSet<String>> = Some(BTreeSet::new());
    for query in queries {
        let Some((w, query_ids)) = query_bounds(query) else { continue }; // matches nothing
        window = Some(window.map_or(w, |h| h.hull(w)));
        ids = match (ids, query_ids) {
            (Some(mut all), Some(these)) => {
                all.extend(these);
                Some(all)
            }
            _ => None,
        };
    }
    let Some(window) = window else {
        // Every query matches nothing: so does the filter.
        return StoreBounds { after: None, until: None, ids: Some(BTreeSet::new()) };
    };
    // An instant that time cannot represent leaves its end open (wider, never narrower).
    let after = window.lo.and_then(|lo| lo.checked_sub(1)).and_then(instant);
    let until = window.hi.and_then(instant);
    StoreBounds { after, until, ids }
}

/// An inclusive window of milliseconds since the Unix epoch: `[lo, hi]`; `None` leaves
/// that end open. Empty when `lo > hi`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Window {
    lo: Option<i64>,
    hi: Option<i64>,
}

impl Window {
    const ALL: Window = Window { lo: None, hi: None };

    fn is_empty(self) -> bool {
        matches!((self.lo, self.hi), (Some(lo), Some(hi)) if lo > hi)
    }

    /// Both: the intersection.
    fn meet(self, other: Window) -> Window {
        let max = |a: Option<i64>, b: Option<i64>| match (a, b) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        let min = |a: Option<i64>, b: Option<i64>| match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        Window { lo: max(self.lo, other.lo), hi: min(self.hi, other.hi) }
    }

    /// Either: the least window holding both (both non-empty).
    fn hull(self, other: Window) -> Window {
        let lo = self.lo.zip(other.lo).map(|(a, b)| a.min(b));
        let hi = self.hi.zip(other.hi).map(|(a, b)| a.max(b));
        Window { lo, hi }
    }

    /// The instants `t` whose millisecond `[t, t + 1)` matches `value`, as
    /// [`Prefix::test`] compares ranges; `None` when that is every instant (`ne`).
    fn of(value: &DateValue) -> Option<Window> {
        let (s, e) = (value.start, value.end);
        // `[t, t + 1)` starts before `s` iff `t <= s - 1`; ends after `e` iff `t >= e`;
        // is contained in `[s, e)` iff `s <= t <= e - 1`.
        let below = |x: i64| Window { lo: None, hi: Some(x.saturating_sub(1)) };
        let from = |x: i64| Window { lo: Some(x), hi: None };
        Some(match value.prefix {
            Prefix::Eq => Window { lo: Some(s), hi: Some(e.saturating_sub(1)) },
            Prefix::Ne => return None,
            Prefix::Gt | Prefix::Sa => from(e),
            Prefix::Lt | Prefix::Eb => below(s),
            // `gt` or `eq`: `t >= e` or `s <= t <= e - 1`.
            Prefix::Ge => from(s.min(e)),
            // `lt` or `eq`: `t <= s - 1` or `s <= t <= e - 1`.
            Prefix::Le => below(s.max(e)),
        })
    }
}

/// The window and the ids (`None`: any) of one query; `None` when it can match nothing.
fn query_bounds(query: &TypeQuery) -> Option<(Window, Option<BTreeSet<String>>)> {
    let mut window = Window::ALL;
    let mut ids: Option<BTreeSet<String>> = None;
    for criterion in &query.criteria {
        match (criterion.param.as_str(), &criterion.test) {
            ("_lastUpdated", Test::Date(values)) => {
                // Values are OR-ed: the hull of their windows (any `ne`: no bound).
                let mut either: Option<Window> = None;
                let mut open = false;
                for w in values.iter().map(Window::of) {
                    match w {
                        None => open = true,
                        Some(w) if w.is_empty() => {}
                        Some(w) => either = Some(either.map_or(w, |e| e.hull(w))),
                    }
                }
                if open {
                    continue;
                }
                window = window.meet(either?);
                if window.is_empty() {
                    return None;
                }
            }
            ("_id", Test::Token { not: false, values }) => {
                let these: BTreeSet<String> = values.iter().filter_map(plain_code).collect();
                let both = match ids {
                    Some(before) => before.intersection(&these).cloned().collect(),
                    None => these,
                };
                if both.is_empty() {
                    return None;
                }
                ids = Some(both);
            }
            _ => {}
        }
    }
    Some((window, ids))
}

/// The id a token value can match on `_id`, a plain string without a system: `code` or
/// `|code`. `None` for `system|code` and `system|`, which match no plain string.
fn plain_code(value: &TokenValue) -> Option<String> {
    match value.system.as_deref() {
        None | Some("") => value.code.clone(),
        Some(_) => None,
    }
}

/// The UTC instant `ms` milliseconds after the Unix epoch, when `time` can represent it.
fn instant(ms: i64) -> Option<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).ok()
}
