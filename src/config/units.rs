//! Sizes and durations with units, as operators write them (`50MiB`, `5m`), and
//! [`Invalid`], what every configuration value parser and section validator says about a
//! bad value.
//!
//! Both deserialize from a string with a unit or from a bare integer (octets, seconds), and
//! display back in the same notation, so `check-config` can echo what it understood.
//! `parse_str` runs any value parser inside the deserializer, so that its [`Invalid`]
//! keeps serde_yaml's key path and line.
//!
//! A leaf: the sections' owners (`listener::config`, `delivery::config`,
//! `scheduler::config`) import it by this path.

use std::fmt;
use std::ops::Deref;
use std::time::Duration;

use serde::{Deserialize, Deserializer, de};

/// What is wrong with a configuration value, as the operator reads it: `` `5 fortnights` ``
/// is not a duration like 5m, `window.min: must be at least 1`. It becomes the message of a
/// located `ConfigError` (file, line, key path), of a `StoreError` when a store is loaded, or
/// of a serde error at the value's key.
///
/// The message is the product, so the type reads as its text (`Deref<Target = str>`) and
/// converts into a `String`; it exists so that a signature says "a validation message" and
/// cannot be confused with an internal failure.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(String);

impl Deref for Invalid {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl From<String> for Invalid {
    fn from(message: String) -> Self {
        Self(message)
    }
}

impl From<&str> for Invalid {
    fn from(message: &str) -> Self {
        Self(message.to_owned())
    }
}

impl From<Invalid> for String {
    fn from(invalid: Invalid) -> Self {
        invalid.0
    }
}

/// A number of octets: `4096`, `64KiB`, `50MiB`, `1GiB`, `10MB` (SI units are accepted too).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

/// A duration: `30s`, `5m`, `1h`, `5d`, `500ms`, or a bare number of seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Span(pub Duration);

impl ByteSize {
    /// Parses the notation above.
    pub fn parse(s: &str) -> Result<Self, Invalid> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (digits, unit) = s.split_at(split);
        let n: u64 = digits
            .parse()
            .map_err(|_| Invalid(format!("`{s}` is not a size like 50MiB")))?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" | "K" | "k" => 1 << 10,
            "MiB" | "M" => 1 << 20,
            "GiB" | "G" => 1 << 30,
            "TiB" | "T" => 1 << 40,
            "kB" | "KB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            other => {
                return Err(Invalid(format!(
                    "unknown size unit `{other}` (use B, KiB, MiB, GiB, kB, MB, GB)"
                )));
            }
        };
        n.checked_mul(mult)
            .map(Self)
            .ok_or_else(|| Invalid(format!("`{s}` is too large")))
    }
}

impl Span {
    /// Parses the notation above.
    pub fn parse(s: &str) -> Result<Self, Invalid> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (digits, unit) = s.split_at(split);
        let n: u64 = digits
            .parse()
            .map_err(|_| Invalid(format!("`{s}` is not a duration like 5m")))?;
        let d = match unit.trim() {
            "" | "s" => Duration::from_secs(n),
            "ms" => Duration::from_millis(n),
            "m" => Duration::from_secs(n.saturating_mul(60)),
            "h" => Duration::from_secs(n.saturating_mul(3600)),
            "d" => Duration::from_secs(n.saturating_mul(86_400)),
            "w" => Duration::from_secs(n.saturating_mul(7 * 86_400)),
            other => {
                return Err(Invalid(format!(
                    "unknown duration unit `{other}` (use ms, s, m, h, d, w)"
                )));
            }
        };
        Ok(Self(d))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        for (unit, size) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
            if n >= size && n % size == 0 {
                return write!(f, "{}{unit}", n / size);
            }
        }
        write!(f, "{n}B")
    }
}

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.0;
        if d.subsec_millis() != 0 || d.as_secs() == 0 {
            return write!(f, "{}ms", d.as_millis());
        }
        let s = d.as_secs();
        for (unit, size) in [("d", 86_400), ("h", 3600), ("m", 60)] {
            if s % size == 0 {
                return write!(f, "{}{unit}", s / size);
            }
        }
        write!(f, "{s}s")
    }
}

/// Accepts a string with a unit or a bare integer. A visitor (not an untagged enum) keeps
/// serde_yaml's position, so a bad unit is reported at its key path and line.
struct UnitVisitor<T>(fn(&str) -> Result<T, Invalid>, fn(u64) -> T, &'static str);

impl<T> de::Visitor<'_> for UnitVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.2)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
        Ok((self.1)(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
        u64::try_from(v)
            .map(self.1)
            .map_err(|_| E::custom("must not be negative"))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        (self.0)(v).map_err(E::custom)
    }
}

/// Deserializes a string through `parse` inside the deserializer, so that an error keeps
/// serde_yaml's key path and line.
pub(crate) fn parse_str<'de, D: Deserializer<'de>, T>(
    d: D,
    parse: fn(&str) -> Result<T, Invalid>,
    expecting: &'static str,
) -> Result<T, D::Error> {
    struct V<T>(fn(&str) -> Result<T, Invalid>, &'static str);
    impl<T> de::Visitor<'_> for V<T> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.1)
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
            (self.0)(v).map_err(E::custom)
        }
    }
    d.deserialize_str(V(parse, expecting))
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(UnitVisitor(Self::parse, Self, "a size like 50MiB"))
    }
}

impl<'de> Deserialize<'de> for Span {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(UnitVisitor(
            Self::parse,
            |n| Self(Duration::from_secs(n)),
            "a duration like 5m",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        let cases = [
            ("4096", 4096),
            ("64KiB", 65_536),
            ("50MiB", 52_428_800),
            ("1GiB", 1 << 30),
            ("10MB", 10_000_000),
            ("0", 0),
        ];
        for (s, n) in cases {
            assert_eq!(ByteSize::parse(s), Ok(ByteSize(n)), "{s}");
        }
        assert!(
            ByteSize::parse("50 furlongs")
                .unwrap_err()
                .contains("unknown size unit")
        );
        assert!(ByteSize::parse("MiB").is_err());
        assert!(
            ByteSize::parse("99999999999999GiB")
                .unwrap_err()
                .contains("too large")
        );
        assert_eq!(ByteSize(52_428_800).to_string(), "50MiB");
        assert_eq!(ByteSize(1000).to_string(), "1000B");
    }

    #[test]
    fn spans() {
        let cases = [
            ("30s", 30),
            ("5m", 300),
            ("1h", 3600),
            ("5d", 432_000),
            ("45", 45),
        ];
        for (s, n) in cases {
            assert_eq!(Span::parse(s), Ok(Span(Duration::from_secs(n))), "{s}");
        }
        assert_eq!(Span::parse("250ms"), Ok(Span(Duration::from_millis(250))));
        assert!(
            Span::parse("5 fortnights")
                .unwrap_err()
                .contains("unknown duration unit")
        );
        assert_eq!(Span(Duration::from_secs(300)).to_string(), "5m");
        assert_eq!(Span(Duration::from_secs(4000)).to_string(), "4000s");
        assert_eq!(Span(Duration::from_millis(1500)).to_string(), "1500ms");
    }
}
