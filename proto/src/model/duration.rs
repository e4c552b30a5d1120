//! Durations as operators write them: `250ms`, `1s`, `2m`, `1h`, or a sum such as
//! `1m30s` (the Gateway API duration format).

use std::time::Duration;

/// Parses a duration such as `500ms`, `10s` or `1m30s`. Zero is refused: every
/// duration Trellis takes is a timeout or an interval, where zero is a mistake.
pub fn parse(text: &str) -> Result<Duration, String> {
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err("empty duration; expected e.g. 500ms, 10s, 1m".into());
    }
    let mut total = Duration::ZERO;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!(
                "invalid duration {text:?}; expected e.g. 500ms, 10s, 1m"
            ));
        }
        let value: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("invalid duration {text:?}: number too large"))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let too_long = || format!("duration {text:?} is too long");
        let part = match &rest[..unit_len] {
            "ms" => Duration::from_millis(value),
            "s" => Duration::from_secs(value),
            "m" => Duration::from_secs(value.checked_mul(60).ok_or_else(too_long)?),
            "h" => Duration::from_secs(value.checked_mul(3600).ok_or_else(too_long)?),
            unit => {
                return Err(format!(
                    "invalid duration {text:?}: unknown unit {unit:?} (use ms, s, m or h)"
                ))
            }
        };
        total = total.checked_add(part).ok_or_else(too_long)?;
        rest = &rest[unit_len..];
    }
    if total.is_zero() {
        return Err(format!("duration {text:?} must be greater than zero"));
    }
    Ok(total)
}

/// Formats a duration in the same notation [`parse`] reads.
pub fn format(duration: Duration) -> String {
    let ms = duration.as_millis();
    if ms % 1000 != 0 {
        format!("{ms}ms")
    } else {
        format!("{}s", ms / 1000)
    }
}

/// Serde adapter for `Duration` fields written as text.
pub mod serde_text {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        super::parse(&text).map_err(D::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_sums() {
        assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse("1m30s"), Ok(Duration::from_secs(90)));
    }

    #[test]
    fn refuses_zero_negative_and_garbage() {
        assert!(parse("0s").unwrap_err().contains("greater than zero"));
        assert!(parse("-1s").unwrap_err().contains("invalid duration"));
        assert!(parse("10").unwrap_err().contains("unknown unit"));
        assert!(parse("10 parsecs").unwrap_err().contains("unknown unit"));
        assert!(parse("").is_err());
    }

    #[test]
    fn refuses_durations_that_overflow_instead_of_panicking() {
        for text in [
            "18446744073709551615s1s",
            "18446744073709551615m",
            "18446744073709551615h",
            "18446744073709551615s18446744073709551615s",
        ] {
            assert!(parse(text).unwrap_err().contains("too long"), "{text}");
        }
        assert!(parse("99999999999999999999s")
            .unwrap_err()
            .contains("number too large"));
    }

    #[test]
    fn formats_round_trip() {
        for text in ["250ms", "10s", "1500ms"] {
            assert_eq!(format(parse(text).unwrap()), text);
        }
    }
}
