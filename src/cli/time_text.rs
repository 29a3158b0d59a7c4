//! Times as admin commands print and take them.

use talos_kms_server::store::UnixTime;

/// `yyyy-MM-dd HH:mm:ss` UTC, as the legacy database writes times; `never` for none.
pub fn date(at: Option<UnixTime>) -> String {
    let Some(at) = at else {
        return "never".into();
    };
    time::OffsetDateTime::from_unix_timestamp(at)
        .ok()
        .and_then(|t| {
            t.format(time::macros::format_description!(
                "[year]-[month]-[day] [hour]:[minute]:[second]"
            ))
            .ok()
        })
        .unwrap_or_else(|| at.to_string())
}

/// `90d`, `12w`, `36h`, `30m`, `45s`: seconds.
pub fn parse_age(text: &str) -> Result<i64, String> {
    let split = text.len().saturating_sub(1);
    let (number, unit) = text.split_at(split);
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => {
            return Err(format!(
                "{text:?}: give a number and a unit, e.g. 90d, 12w, 36h"
            ));
        }
    };
    number
        .parse::<i64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .filter(|seconds| *seconds >= 0)
        .ok_or_else(|| format!("{text:?}: give a number and a unit, e.g. 90d, 12w, 36h"))
}

/// `2026-01-31` (midnight UTC) or an RFC 3339 time.
pub fn parse_date(text: &str) -> Result<UnixTime, String> {
    parse_moment(text)
        .map(|t| t.unix_timestamp())
        .map_err(|_| format!("{text:?}: give a day (2026-01-31) or an RFC 3339 time"))
}

/// A point in time as `--since`/`--until` take it: an age before now (`1h`, `7d`), a day
/// (`2026-12-01`, midnight UTC), a minute or second of a day in UTC (`2026-12-01T10:30`,
/// `2026-12-01 10:30:15`), or an RFC 3339 time with its offset.
pub fn parse_point(text: &str) -> Result<time::OffsetDateTime, String> {
    if let Ok(age) = parse_age(text) {
        return Ok(time::OffsetDateTime::now_utc() - time::Duration::seconds(age));
    }
    parse_moment(text).map_err(|_| {
        format!(
            "{text:?} is not a time: give an age before now (30m, 1h, 7d), a day (2026-12-01), \
             a UTC time (2026-12-01T10:30) or an RFC 3339 time (2026-12-01T10:30:00+01:00)"
        )
    })
}

fn parse_moment(text: &str) -> Result<time::OffsetDateTime, ()> {
    use time::macros::format_description;
    if let Ok(t) = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
    {
        return Ok(t);
    }
    if let Ok(day) = time::Date::parse(text, format_description!("[year]-[month]-[day]")) {
        return Ok(day.midnight().assume_utc());
    }
    let text = text.replacen(' ', "T", 1);
    let text = text.strip_suffix('Z').unwrap_or(&text);
    [
        format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]"),
        format_description!("[year]-[month]-[day]T[hour]:[minute]"),
    ]
    .iter()
    .find_map(|form| time::PrimitiveDateTime::parse(text, form).ok())
    .map(|t| t.assume_utc())
    .ok_or(())
}

/// RFC 3339 in UTC with `Z`, to the second: how times are written for machines.
pub fn rfc3339(at: Option<UnixTime>) -> Option<String> {
    let t = time::OffsetDateTime::from_unix_timestamp(at?).ok()?;
    t.format(time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second]Z"
    ))
    .ok()
}
