//! Time and duration query parameters: `from`/`to` are integer milliseconds since the epoch or
//! RFC 3339 timestamps; `interval` is integer milliseconds or a duration like `500ms`, `10s`,
//! `5m`, `1h`, `1d`.
//!
//! Hand-written rather than a date crate: the accepted grammar is small and fixed by the API
//! contract, and the parser must report precisely what is wrong with a caller's value.

use polyhub_store::Millis;

const MS_PER_SECOND: i64 = 1_000;
const MS_PER_MINUTE: i64 = 60 * MS_PER_SECOND;
const MS_PER_HOUR: i64 = 60 * MS_PER_MINUTE;
const MS_PER_DAY: i64 = 24 * MS_PER_HOUR;

/// Parses a point in time: integer milliseconds since the Unix epoch (may be negative) or an
/// RFC 3339 timestamp such as `2026-11-21T10:00:00Z` or `2026-11-21T11:00:00.250+01:00`.
pub fn parse_time(text: &str) -> Result<Millis, String> {
    let text = text.trim();
    if let Ok(millis) = text.parse::<i64>() {
        return Ok(millis);
    }
    parse_rfc3339(text).ok_or_else(|| {
        format!("{text:?} is neither milliseconds since the epoch nor an RFC 3339 timestamp")
    })
}

/// Parses a positive duration in milliseconds: integer milliseconds, or a whole number followed
/// by one unit of `ms`, `s`, `m`, `h`, `d`.
pub fn parse_duration_ms(text: &str) -> Result<i64, String> {
    let text = text.trim();
    let invalid =
        || format!("{text:?} is not a duration (integer ms or e.g. 500ms, 10s, 5m, 1h, 1d)");
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits_end);
    let amount: i64 = number.parse().map_err(|_| invalid())?;
    let unit_ms = match unit {
        "" | "ms" => 1,
        "s" => MS_PER_SECOND,
        "m" => MS_PER_MINUTE,
        "h" => MS_PER_HOUR,
        "d" => MS_PER_DAY,
        _ => return Err(invalid()),
    };
    let millis = amount
        .checked_mul(unit_ms)
        .ok_or_else(|| format!("duration {text:?} is too long"))?;
    if millis <= 0 {
        return Err(format!("duration {text:?} must be positive"));
    }
    Ok(millis)
}

/// `YYYY-MM-DD(T|t| )HH:MM:SS[.fraction](Z|z|+HH:MM|-HH:MM)` → milliseconds since the epoch.
fn parse_rfc3339(text: &str) -> Option<Millis> {
    let bytes = text.as_bytes();
    if bytes.len() < 20 || !text.is_ascii() {
        return None;
    }
    let field = |range: std::ops::Range<usize>| -> Option<i64> {
        let part = &text[range];
        if part.bytes().all(|b| b.is_ascii_digit()) {
            part.parse().ok()
        } else {
            None
        }
    };
    let separators_ok = bytes[4] == b'-'
        && bytes[7] == b'-'
        && matches!(bytes[10], b'T' | b't' | b' ')
        && bytes[13] == b':'
        && bytes[16] == b':';
    if !separators_ok {
        return None;
    }
    let (year, month, day) = (field(0..4)?, field(5..7)?, field(8..10)?);
    let (hour, minute, second) = (field(11..13)?, field(14..16)?, field(17..19)?);
    // Leap seconds (`:60`) are valid RFC 3339; they land on the next second.
    if !(1..=12).contains(&month)
        || day < 1
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }

    let mut rest = &text[19..];
    let mut fraction_ms = 0;
    if let Some(after_dot) = rest.strip_prefix('.') {
        let digits = after_dot
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(after_dot.len());
        if digits == 0 {
            return None;
        }
        // Only milliseconds are kept; finer digits are truncated.
        let kept = &after_dot[..digits.min(3)];
        fraction_ms = kept.parse::<i64>().ok()? * 10_i64.pow(3 - kept.len() as u32);
        rest = &after_dot[digits..];
    }
    let offset_ms = match rest {
        "Z" | "z" => 0,
        _ => {
            let sign = match rest.as_bytes().first()? {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let offset = &rest[1..];
            if offset.len() != 5 || offset.as_bytes()[2] != b':' {
                return None;
            }
            let hours: i64 = offset[0..2].parse().ok()?;
            let minutes: i64 = offset[3..5].parse().ok()?;
            if hours > 23 || minutes > 59 {
                return None;
            }
            sign * (hours * MS_PER_HOUR + minutes * MS_PER_MINUTE)
        }
    };

    let days = days_from_civil(year, month, day);
    Some(
        days * MS_PER_DAY
            + hour * MS_PER_HOUR
            + minute * MS_PER_MINUTE
            + second * MS_PER_SECOND
            + fraction_ms
            - offset_ms,
    )
}

fn is_leap_year(year: i64) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if is_leap_year(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (eras of 400 years keep it exact).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    // Counting years from March puts the leap day at the end of the year.
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month_from_march = (month + 9) % 12;
    let day_of_year = (153 * month_from_march + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integer_milliseconds_pass_through() {
        assert_eq!(parse_time("0"), Ok(0));
        assert_eq!(parse_time("1700000000123"), Ok(1_700_000_000_123));
        assert_eq!(parse_time("-5"), Ok(-5));
    }

    #[test]
    fn rfc3339_timestamps_are_converted() {
        assert_eq!(parse_time("1970-01-01T00:00:00Z"), Ok(0));
        assert_eq!(parse_time("2026-11-21T10:00:00Z"), Ok(1_795_255_200_000));
        assert_eq!(
            parse_time("2026-11-21T11:00:00+01:00"),
            Ok(1_795_255_200_000)
        );
        assert_eq!(
            parse_time("2026-11-21T09:30:00-00:30"),
            Ok(1_795_255_200_000)
        );
        assert_eq!(parse_time("2026-11-21t10:00:00.25z"), Ok(1_795_255_200_250));
        assert_eq!(
            parse_time("2026-11-21T10:00:00.123456Z"),
            Ok(1_795_255_200_123)
        );
        assert_eq!(parse_time("2024-02-29T00:00:00Z"), Ok(1_709_164_800_000));
        assert_eq!(parse_time("1969-12-31T23:59:59Z"), Ok(-1_000));
    }

    #[test]
    fn malformed_timestamps_are_refused() {
        for bad in [
            "",
            "yesterday",
            "2026-11-21",
            "2026-11-21T10:00:00",
            "2026-13-01T00:00:00Z",
            "2025-02-29T00:00:00Z",
            "2026-11-21T24:00:00Z",
            "2026-11-21T10:00:00.Z",
            "2026-11-21T10:00:00+0100",
            "2026-11-21T10:00:00Zjunk",
            "2026-11-21T10:0a:00Z",
            "2026-11-2١T10:00:00Z",
        ] {
            assert!(parse_time(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn durations_accept_units_and_integers() {
        assert_eq!(parse_duration_ms("250"), Ok(250));
        assert_eq!(parse_duration_ms("500ms"), Ok(500));
        assert_eq!(parse_duration_ms("10s"), Ok(10_000));
        assert_eq!(parse_duration_ms("5m"), Ok(300_000));
        assert_eq!(parse_duration_ms("1h"), Ok(3_600_000));
        assert_eq!(parse_duration_ms("1d"), Ok(86_400_000));
    }

    #[test]
    fn bad_durations_are_refused() {
        for bad in [
            "",
            "0",
            "0s",
            "-5",
            "5x",
            "s",
            "1.5s",
            "1 h",
            "99999999999999999999d",
        ] {
            assert!(parse_duration_ms(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
