//! Durations written as text: `500ms`, `5s`, `2m`, `1h`, or `0`.
//!
//! The same syntax Keel's environment variables have always used
//! (`KEEL_DB_ACQUIRE_TIMEOUT=5s`). For settings that can be turned off,
//! `0` (or `off`) means "no limit".

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serializer};

/// Parses `500ms`, `5s`, `2m`, `1h` or `0`; `None` when it does not parse.
pub(crate) fn parse(text: &str) -> Option<Duration> {
    let v = text.trim();
    if v == "0" {
        return Some(Duration::ZERO);
    }
    let split = v.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = v.split_at(split);
    let n: u64 = number.parse().ok()?;
    Some(match unit.trim() {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" | "min" => Duration::from_secs(n.checked_mul(60)?),
        "h" => Duration::from_secs(n.checked_mul(3600)?),
        _ => return None,
    })
}

/// Writes a duration in the largest unit that keeps it exact.
pub(crate) fn format(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        "0".to_owned()
    } else if ms.is_multiple_of(3_600_000) {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

const EXPECTED: &str = "a duration such as 500ms, 5s, 2m or 1h";

/// A duration that must be given (`serde(with = "duration")`).
pub(crate) mod required {
    use super::*;

    pub(crate) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(*d))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = Text::deserialize(d)?.0;
        parse(&text).ok_or_else(|| serde::de::Error::custom(format!("expected {EXPECTED}")))
    }
}

/// A limit that `0` or `off` turns off (`None`).
pub(crate) mod optional {
    use super::*;

    #[allow(clippy::ref_option, reason = "the signature serde's `with` expects")]
    pub(crate) fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&d.map_or_else(|| "0".to_owned(), format))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        let text = Text::deserialize(d)?.0;
        if text.trim().eq_ignore_ascii_case("off") {
            return Ok(None);
        }
        parse(&text)
            .map(|d| (!d.is_zero()).then_some(d))
            .ok_or_else(|| serde::de::Error::custom(format!("expected {EXPECTED}, 0 or off")))
    }
}

/// A string, or a bare integer read as seconds would be ambiguous: only
/// text is accepted, and a number is refused with the expected syntax.
struct Text(String);

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Text;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(EXPECTED)
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Text, E> {
                Ok(Text(v.to_owned()))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Text, E> {
                // `0` is the one number with a single meaning.
                if v == 0 {
                    Ok(Text("0".to_owned()))
                } else {
                    Err(E::custom(format!(
                        "expected {EXPECTED} (a number needs a unit)"
                    )))
                }
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Text, E> {
                match u64::try_from(v) {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => Err(E::custom(format!("expected {EXPECTED}"))),
                }
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_formats_the_units() {
        for (text, d) in [
            ("0", Duration::ZERO),
            ("250ms", Duration::from_millis(250)),
            ("5s", Duration::from_secs(5)),
            ("2m", Duration::from_secs(120)),
            ("1h", Duration::from_secs(3600)),
        ] {
            assert_eq!(parse(text), Some(d), "{text}");
            assert_eq!(format(d), text);
        }
        assert_eq!(format(Duration::from_millis(1500)), "1500ms");
        for bad in ["", "5", "s", "5 parsecs", "-1s", "99999999999999999999h"] {
            assert_eq!(parse(bad), None, "{bad}");
        }
    }
}
