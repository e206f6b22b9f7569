//! Stream versions, expected-version modes and global log positions.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The version of a stream or an entity: the number of events it holds (for a
/// stream) or the number of writes it has seen (for an entity).
///
/// The first event of a stream has version 1; an empty or missing stream is at
/// [`Version::INITIAL`] (0).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Version(u64);

impl Version {
    /// The version of a stream that holds no events.
    pub const INITIAL: Version = Version(0);

    /// Wraps a raw version number.
    #[must_use]
    pub const fn new(v: u64) -> Self {
        Self(v)
    }

    /// The raw version number.
    #[must_use]
    pub const fn get(self) -> u64 {
        self.0
    }

    /// The version after `n` more events.
    #[must_use]
    pub const fn advance(self, n: u64) -> Self {
        Self(self.0 + n)
    }

    /// The next version.
    #[must_use]
    pub const fn next(self) -> Self {
        Self(self.0 + 1)
    }
}

impl fmt::Debug for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v{}", self.0)
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl From<u64> for Version {
    fn from(v: u64) -> Self {
        Self(v)
    }
}

/// What a writer believes about a stream's current version. The write fails
/// with a structured conflict when the belief is wrong.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "mode", content = "version")]
pub enum ExpectedVersion {
    /// No check: append whatever the stream holds.
    #[default]
    Any,
    /// The stream must not exist yet (hold no events).
    NoStream,
    /// The stream must hold at least one event.
    StreamExists,
    /// The stream must be exactly at this version ([`Version::INITIAL`] means
    /// the same as [`ExpectedVersion::NoStream`]).
    Exact(Version),
}

impl ExpectedVersion {
    /// Whether a stream currently at `actual` satisfies this expectation.
    #[must_use]
    pub fn is_satisfied_by(self, actual: Version) -> bool {
        match self {
            ExpectedVersion::Any => true,
            ExpectedVersion::NoStream => actual == Version::INITIAL,
            ExpectedVersion::StreamExists => actual > Version::INITIAL,
            ExpectedVersion::Exact(v) => v == actual,
        }
    }
}

impl fmt::Display for ExpectedVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExpectedVersion::Any => f.write_str("any"),
            ExpectedVersion::NoStream => f.write_str("no stream"),
            ExpectedVersion::StreamExists => f.write_str("stream exists"),
            ExpectedVersion::Exact(v) => write!(f, "version {v}"),
        }
    }
}

impl From<Version> for ExpectedVersion {
    fn from(v: Version) -> Self {
        ExpectedVersion::Exact(v)
    }
}

/// A position in the global log, in the order readers of the log see events.
///
/// Global order must survive concurrent writers whose transactions commit out
/// of order, so a position has two parts compared in turn: `commit`, an
/// ordering key of the append that wrote the event, which readers only pass
/// once nothing can be stored below it any more, and `sequence`,
/// the event's unique, gap-tolerant number. Readers checkpoint the whole
/// position and resume strictly after it.
///
/// Positions can have gaps (a rolled-back transaction burns numbers); never
/// assume `n + 1` follows `n`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
pub struct Position {
    /// The ordering key of the append that wrote the event (events of one
    /// append share it).
    pub commit: u64,
    /// The event's unique sequence number within the log.
    pub sequence: u64,
}

impl Position {
    /// Before the first event: reading after here reads everything.
    pub const START: Position = Position {
        commit: 0,
        sequence: 0,
    };

    /// Builds a position from its two parts.
    #[must_use]
    pub const fn new(commit: u64, sequence: u64) -> Self {
        Self { commit, sequence }
    }
}

impl fmt::Debug for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "@{}:{}", self.commit, self.sequence)
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.commit, self.sequence)
    }
}

impl std::str::FromStr for Position {
    type Err = crate::Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || crate::Error::invalid_input("position", "expected COMMIT:SEQUENCE");
        let (c, q) = s.split_once(':').ok_or_else(bad)?;
        Ok(Self {
            commit: c.parse().map_err(|_| bad())?,
            sequence: q.parse().map_err(|_| bad())?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expectations() {
        let empty = Version::INITIAL;
        let three = Version::new(3);
        assert!(ExpectedVersion::Any.is_satisfied_by(empty));
        assert!(ExpectedVersion::NoStream.is_satisfied_by(empty));
        assert!(!ExpectedVersion::NoStream.is_satisfied_by(three));
        assert!(ExpectedVersion::StreamExists.is_satisfied_by(three));
        assert!(!ExpectedVersion::StreamExists.is_satisfied_by(empty));
        assert!(ExpectedVersion::Exact(three).is_satisfied_by(three));
        assert!(!ExpectedVersion::Exact(three).is_satisfied_by(Version::new(4)));
        assert!(ExpectedVersion::Exact(empty).is_satisfied_by(empty));
    }

    #[test]
    fn serde_shape_is_stable() {
        let json = serde_json::to_string(&ExpectedVersion::Exact(Version::new(7))).unwrap();
        assert_eq!(json, r#"{"mode":"exact","version":7}"#);
        let back: ExpectedVersion = serde_json::from_str(&json).unwrap();
        assert_eq!(back, ExpectedVersion::Exact(Version::new(7)));
        assert_eq!(
            serde_json::to_string(&ExpectedVersion::Any).unwrap(),
            r#"{"mode":"any"}"#
        );
    }

    #[test]
    fn positions_order_by_commit_then_sequence() {
        let a = Position::new(10, 50);
        let b = Position::new(11, 3);
        assert!(
            a < b,
            "a later transaction sorts after, whatever its sequence"
        );
        assert!(Position::START < a);
        assert_eq!("11:3".parse::<Position>().unwrap(), b);
        assert!("11".parse::<Position>().is_err());
        assert!("x:1".parse::<Position>().is_err());
    }
}
