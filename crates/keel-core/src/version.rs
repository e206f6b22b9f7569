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

/// A position in the global log: strictly increasing across all streams, in
/// the order readers of the global log observe events.
///
/// Positions can have gaps (a rolled-back transaction burns numbers); readers
/// must never assume `n + 1` follows `n`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Position(u64);

impl Position {
    /// Before the first event: reading from here reads everything.
    pub const START: Position = Position(0);

    /// Wraps a raw position.
    #[must_use]
    pub const fn new(p: u64) -> Self {
        Self(p)
    }

    /// The raw position.
    #[must_use]
    pub const fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Debug for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "@{}", self.0)
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
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
}
