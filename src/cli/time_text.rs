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
    let day = time::macros::format_description!("[year]-[month]-[day]");
    if let Ok(date) = time::Date::parse(text, day) {
        return Ok(date.midnight().assume_utc().unix_timestamp());
    }
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map(|t| t.unix_timestamp())
        .map_err(|_| format!("{text:?}: give a day (2026-01-31) or an RFC 3339 time"))
}
