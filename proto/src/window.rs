//! Time windows (`days`, `start`, `end`, `timeZone`): when automation may
//! start disruptive work. Shared by rollouts and remedies.

use std::time::SystemTime;

use crate::ResourceError;
use crate::v1::TimeWindow;

const DAYS: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];

fn hhmm(s: &str) -> Option<u32> {
    let (h, m) = s.trim().split_once(':')?;
    let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
    (h < 24 && m < 60).then_some(h * 60 + m)
}

/// `Mon` or `Monday` (any case) to 0..7.
fn day_index(d: &str) -> Option<usize> {
    const FULL: [&str; 7] = [
        "monday",
        "tuesday",
        "wednesday",
        "thursday",
        "friday",
        "saturday",
        "sunday",
    ];
    let d = d.trim().to_ascii_lowercase();
    (0..7).find(|&i| d == FULL[i] || d == DAYS[i].to_ascii_lowercase())
}

/// Validates windows at `at` (`spec.updateStrategy.rollingUpdate.windows`).
pub fn check(at: &str, windows: &[TimeWindow]) -> Result<(), ResourceError> {
    for (i, w) in windows.iter().enumerate() {
        let f = format!("{at}[{i}]");
        for (j, d) in w.days.iter().enumerate() {
            if day_index(d).is_none() {
                return Err(ResourceError::new(
                    format!("{f}.days[{j}]"),
                    format!("{d:?}: one of {}", DAYS.join(", ")),
                ));
            }
        }
        for (name, v) in [("start", &w.start), ("end", &w.end)] {
            if hhmm(v).is_none() {
                return Err(ResourceError::new(
                    format!("{f}.{name}"),
                    format!("{v:?}: HH:MM, 00:00 to 23:59"),
                ));
            }
        }
        if !w.time_zone.is_empty() && jiff::tz::TimeZone::get(&w.time_zone).is_err() {
            return Err(ResourceError::new(
                format!("{f}.timeZone"),
                format!(
                    "{:?} is not a known IANA time zone (`Europe/Berlin`, `UTC`)",
                    w.time_zone
                ),
            ));
        }
    }
    Ok(())
}

/// Whether `now` is inside one of `windows` (no windows: always). A window
/// whose end is before its start spans midnight and belongs to the day it
/// starts on.
pub fn open(windows: &[TimeWindow], now: SystemTime) -> bool {
    if windows.is_empty() {
        return true;
    }
    let Ok(ts) = jiff::Timestamp::try_from(now) else {
        return false;
    };
    windows.iter().any(|w| inside(w, ts))
}

fn inside(w: &TimeWindow, ts: jiff::Timestamp) -> bool {
    let tz = if w.time_zone.is_empty() {
        jiff::tz::TimeZone::UTC
    } else {
        match jiff::tz::TimeZone::get(&w.time_zone) {
            Ok(tz) => tz,
            Err(_) => return false,
        }
    };
    let (Some(start), Some(end)) = (hhmm(&w.start), hhmm(&w.end)) else {
        return false;
    };
    let local = ts.to_zoned(tz);
    let minute = u32::from(local.hour() as u8) * 60 + u32::from(local.minute() as u8);
    let today = local.weekday().to_monday_zero_offset() as usize;
    let yesterday = (today + 6) % 7;
    let day_ok = |d: usize| w.days.is_empty() || w.days.iter().any(|x| day_index(x) == Some(d));
    if start <= end {
        day_ok(today) && minute >= start && minute < end
    } else {
        (day_ok(today) && minute >= start) || (day_ok(yesterday) && minute < end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(days: &[&str], start: &str, end: &str, tz: &str) -> TimeWindow {
        TimeWindow {
            days: days.iter().map(|d| d.to_string()).collect(),
            start: start.into(),
            end: end.into(),
            time_zone: tz.into(),
        }
    }

    fn at(s: &str) -> SystemTime {
        SystemTime::from(s.parse::<jiff::Timestamp>().expect("timestamp"))
    }

    #[test]
    fn windows_follow_days_hours_midnight_and_time_zones() {
        // 2026-12-01 is a Tuesday.
        let day = [w(&["Tue"], "09:00", "17:00", "")];
        assert!(open(&day, at("2026-12-01T09:00:00Z")));
        assert!(!open(&day, at("2026-12-01T17:00:00Z")));
        assert!(!open(&day, at("2026-12-02T10:00:00Z")), "Wednesday");
        let night = [w(&["Tue"], "22:00", "04:00", "")];
        assert!(open(&night, at("2026-12-01T23:00:00Z")));
        assert!(
            open(&night, at("2026-12-02T03:59:00Z")),
            "after midnight, Tuesday's window"
        );
        assert!(!open(&night, at("2026-12-01T03:00:00Z")), "Monday had no window");
        // 09:00 in Berlin is 08:00 UTC in winter.
        let berlin = [w(&[], "09:00", "10:00", "Europe/Berlin")];
        assert!(open(&berlin, at("2026-12-01T08:30:00Z")));
        assert!(!open(&berlin, at("2026-12-01T09:30:00Z")));
        assert!(open(&[], at("2026-12-01T09:30:00Z")));
        assert!(check("w", &[w(&["Tuesday"], "9:00", "23:59", "UTC")]).is_ok());
        assert_eq!(
            check("w", &[w(&["Xyz"], "09:00", "10:00", "")]).unwrap_err().field,
            "w[0].days[0]"
        );
        assert_eq!(
            check("w", &[w(&[], "25:00", "10:00", "")]).unwrap_err().field,
            "w[0].start"
        );
        assert_eq!(
            check("w", &[w(&[], "09:00", "10:00", "Mars/Base")]).unwrap_err().field,
            "w[0].timeZone"
        );
    }
}
