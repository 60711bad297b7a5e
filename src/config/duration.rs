//! Durations as operators write them: `60s`, `100ms`, `1m30s`, `1.5s`, `2h`.
//!
//! Small enough to own rather than pull in a crate for: one or more `<number><unit>`
//! parts with no spaces, units `h`, `m`, `s`, `ms`, `us`, `ns`. A bare number is an
//! error, because `window: 60` could mean seconds or milliseconds.

use std::time::Duration;

const UNITS: [(&str, u128); 6] = [
    // Longest first, so `ms` is not read as `m` followed by junk.
    ("ms", 1_000_000),
    ("us", 1_000),
    ("ns", 1),
    ("h", 3_600_000_000_000),
    ("m", 60_000_000_000),
    ("s", 1_000_000_000),
];

/// Parses `text`, or says why it is not a duration.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let expect = "expected a duration such as `60s`, `100ms` or `1m30s`";
    if text.is_empty() {
        return Err(format!("{expect}, found an empty value"));
    }
    let mut rest = text;
    let mut total_ns: u128 = 0;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (number, after) = rest.split_at(number_len);
        if number.is_empty() {
            return Err(format!("{expect}, found `{text}`"));
        }
        let Some((unit, scale)) = UNITS.iter().find(|(unit, _)| after.starts_with(unit)) else {
            return Err(if after.is_empty() {
                format!("{expect}: `{text}` has no unit (add `s` or `ms`)")
            } else {
                format!("{expect}, found `{text}`")
            });
        };
        total_ns = total_ns
            .checked_add(scaled(number, *scale).ok_or_else(|| format!("{expect}, found `{text}`"))?)
            .ok_or_else(|| format!("duration `{text}` is too long"))?;
        rest = &after[unit.len()..];
    }
    let secs = u64::try_from(total_ns / 1_000_000_000)
        .map_err(|_| format!("duration `{text}` is too long"))?;
    Ok(Duration::new(secs, (total_ns % 1_000_000_000) as u32))
}

/// `number` (digits, at most one `.`) times `scale` nanoseconds, exactly; `None` if
/// malformed, too large, or finer than a nanosecond.
fn scaled(number: &str, scale: u128) -> Option<u128> {
    let (whole, frac) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && frac.is_empty() || frac.contains('.') || frac.len() > 9 {
        return None;
    }
    let whole: u128 = if whole.is_empty() {
        0
    } else {
        whole.parse().ok()?
    };
    let mut ns = whole.checked_mul(scale)?;
    if !frac.is_empty() {
        let denominator = 10u128.pow(frac.len() as u32);
        let numerator = frac.parse::<u128>().ok()?.checked_mul(scale)?;
        if numerator % denominator != 0 {
            return None;
        }
        ns = ns.checked_add(numerator / denominator)?;
    }
    Some(ns)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn accepts_the_documented_forms() {
        assert_eq!(parse_duration("60s"), Ok(ms(60_000)));
        assert_eq!(parse_duration("100ms"), Ok(ms(100)));
        assert_eq!(parse_duration("1m"), Ok(ms(60_000)));
        assert_eq!(parse_duration("1m30s"), Ok(ms(90_000)));
        assert_eq!(parse_duration("1.5s"), Ok(ms(1_500)));
        assert_eq!(parse_duration(".5s"), Ok(ms(500)));
        assert_eq!(parse_duration("2h"), Ok(ms(7_200_000)));
        assert_eq!(parse_duration("250us"), Ok(Duration::from_micros(250)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
    }

    #[test]
    fn rejects_what_is_not_a_duration() {
        for bad in [
            "",
            "60",
            "s",
            "1.2.3s",
            "1 s",
            "10sec",
            "-1s",
            "1.s5",
            "1ms2",
            "0.0000000001s",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} was accepted");
        }
        assert!(parse_duration("60").unwrap_err().contains("no unit"));
        assert!(parse_duration("99999999999999999999999h").is_err());
    }
}
