//! Calendar arithmetic for the policy context and the audit log: Unix seconds
//! to and from RFC 3339 UTC text, hour of day and ISO weekday. Proleptic
//! Gregorian calendar, years 1970 to 9999 (what Cedar's `datetime` accepts
//! and more than any clock here will show).

/// Largest Unix time handled: 9999-12-31T23:59:59Z.
pub(crate) const MAX_UNIX_SECONDS: u64 = 253_402_300_799;

const SECONDS_PER_DAY: u64 = 86_400;

use postern_identity::time::civil_from_days;

/// Days since 1970-01-01 of a civil date, `None` before 1970 (Howard
/// Hinnant's `days_from_civil`).
fn days_from_civil(year: u64, month: u64, day: u64) -> Option<u64> {
    let y = if month <= 2 {
        year.checked_sub(1)?
    } else {
        year
    };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = if month > 2 { month - 3 } else { month + 9 };
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    (era * 146_097 + doe).checked_sub(719_468)
}

fn is_leap(year: u64) -> bool {
    (year.is_multiple_of(4) && !year.is_multiple_of(100)) || year.is_multiple_of(400)
}

fn days_in_month(year: u64, month: u64) -> u64 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Hour of the day, UTC, 0 to 23.
pub(crate) fn hour_utc(unix: u64) -> u64 {
    unix % SECONDS_PER_DAY / 3600
}

/// ISO weekday, UTC: 1 = Monday … 7 = Sunday (1970-01-01 was a Thursday).
pub(crate) fn iso_weekday(unix: u64) -> u64 {
    (unix / SECONDS_PER_DAY + 3) % 7 + 1
}

/// `YYYY-MM-DDTHH:MM:SSZ`, or `None` beyond [`MAX_UNIX_SECONDS`].
pub(crate) fn rfc3339(unix: u64) -> Option<String> {
    if unix > MAX_UNIX_SECONDS {
        return None;
    }
    let (y, mo, d) = civil_from_days(unix / SECONDS_PER_DAY);
    let s = unix % SECONDS_PER_DAY;
    Some(format!(
        "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}Z",
        s / 3600,
        s % 3600 / 60,
        s % 60
    ))
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` for a time in milliseconds since the epoch,
/// or `None` beyond [`MAX_UNIX_SECONDS`].
pub(crate) fn rfc3339_millis(unix_ms: u64) -> Option<String> {
    let secs = rfc3339(unix_ms / 1000)?;
    let stem = secs.strip_suffix('Z')?;
    Some(format!("{stem}.{:03}Z", unix_ms % 1000))
}

/// Parses `YYYY-MM-DDTHH:MM:SS` followed by `Z` or `±HH:MM` (the RFC 3339
/// profile without fractional seconds; `t`, `z` and a space for `T` are
/// accepted) into Unix seconds. Times before 1970 are refused.
pub(crate) fn parse_rfc3339(text: &str) -> Option<u64> {
    let b = text.as_bytes();
    if b.len() < 20 {
        return None;
    }
    let num = |range: std::ops::Range<usize>| -> Option<u64> {
        let part = b.get(range)?;
        if part.iter().all(u8::is_ascii_digit) {
            Some(part.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')))
        } else {
            None
        }
    };
    let sep = |i: usize, c: &[u8]| b.get(i).is_some_and(|x| c.contains(x));
    if !(sep(4, b"-") && sep(7, b"-") && sep(10, b"Tt ") && sep(13, b":") && sep(16, b":")) {
        return None;
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month)
        || day == 0
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
        || second > 59
    {
        return None;
    }
    let local =
        days_from_civil(year, month, day)? * SECONDS_PER_DAY + hour * 3600 + minute * 60 + second;
    let unix = match &b[19..] {
        b"Z" | b"z" => local,
        [sign @ (b'+' | b'-'), _, _, b':', _, _] => {
            let (oh, om) = (num(20..22)?, num(23..25)?);
            if oh > 23 || om > 59 {
                return None;
            }
            let offset = oh * 3600 + om * 60;
            if *sign == b'+' {
                local.checked_sub(offset)?
            } else {
                local.checked_add(offset)?
            }
        }
        _ => return None,
    };
    (unix <= MAX_UNIX_SECONDS).then_some(unix)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_instants() {
        assert_eq!(rfc3339(0).unwrap(), "1970-01-01T00:00:00Z");
        assert_eq!(iso_weekday(0), 4, "1970-01-01 was a Thursday");
        assert_eq!(rfc3339(951_782_400).unwrap(), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_735_732_800).unwrap(), "2025-01-01T12:00:00Z");
        assert_eq!(iso_weekday(1_735_732_800), 3, "2025-01-01 was a Wednesday");
        assert_eq!(hour_utc(1_735_732_800), 12);
        // 2025-01-05 is a Sunday, 2025-01-06 a Monday.
        assert_eq!(iso_weekday(1_736_035_200), 7);
        assert_eq!(iso_weekday(1_736_121_600), 1);
        assert_eq!(rfc3339(MAX_UNIX_SECONDS).unwrap(), "9999-12-31T23:59:59Z");
        assert_eq!(rfc3339(MAX_UNIX_SECONDS + 1), None);
        assert_eq!(
            rfc3339_millis(1_735_732_800_042).unwrap(),
            "2025-01-01T12:00:00.042Z"
        );
    }

    #[test]
    fn parse_round_trips_and_refuses_nonsense() {
        for t in [
            0,
            59,
            951_782_400,
            1_735_732_800,
            4_102_444_799,
            MAX_UNIX_SECONDS,
        ] {
            assert_eq!(parse_rfc3339(&rfc3339(t).unwrap()), Some(t));
        }
        assert_eq!(
            parse_rfc3339("2025-01-01T13:30:00+01:30"),
            Some(1_735_732_800)
        );
        assert_eq!(
            parse_rfc3339("2025-01-01T10:00:00-02:00"),
            Some(1_735_732_800)
        );
        for bad in [
            "",
            "2025-01-01",
            "2025-13-01T00:00:00Z",
            "2025-02-29T00:00:00Z",
            "2025-01-01T24:00:00Z",
            "2025-01-01T00:00:00",
            "2025-01-01T00:00:00.5Z",
            "1969-12-31T23:59:59Z",
            "1970-01-01T00:00:00+00:01",
            "２０２５-01-01T00:00:00Z",
            "2025-01-01T00:00:00+1:00",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad:?}");
        }
        assert_eq!(parse_rfc3339("2024-02-29 00:00:00z"), Some(1_709_164_800));
    }
}
