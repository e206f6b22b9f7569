//! Read options: one stream ([`ReadStream`]) or the global log
//! ([`ReadAll`]).

use keel_core::{Position, Version};

use super::{RecordedEvent, StoreConfig};

/// Which way to read a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ReadDirection {
    /// Oldest first.
    #[default]
    Forward,
    /// Newest first.
    Backward,
}

/// Options for reading one stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ReadStream {
    pub(crate) direction: ReadDirection,
    pub(crate) from: Option<Version>,
    pub(crate) limit: Option<u64>,
    pub(crate) page_size: Option<u32>,
}

impl ReadStream {
    /// Oldest first, from the first event.
    #[must_use]
    pub fn forward() -> Self {
        Self::default()
    }

    /// Newest first, from the last event.
    #[must_use]
    pub fn backward() -> Self {
        Self {
            direction: ReadDirection::Backward,
            ..Self::default()
        }
    }

    /// Starts at this version, inclusive (forward: this and later; backward:
    /// this and earlier).
    #[must_use]
    pub fn from(mut self, version: Version) -> Self {
        self.from = Some(version);
        self
    }

    /// Stops after this many events.
    #[must_use]
    pub fn limit(mut self, limit: u64) -> Self {
        self.limit = Some(limit);
        self
    }

    /// Fetches this many events per round trip for this read, instead of
    /// the store's [`StoreConfig::read_batch_size`] (at least 1).
    #[must_use]
    pub fn page_size(mut self, rows: u32) -> Self {
        self.page_size = Some(rows.max(1));
        self
    }

    /// The direction.
    #[must_use]
    pub fn direction(&self) -> ReadDirection {
        self.direction
    }

    /// The page size for this read on a store configured with `config`.
    pub(crate) fn page(&self, config: &StoreConfig) -> u32 {
        self.page_size.unwrap_or(config.read_batch_size)
    }

    pub(crate) fn bounds(&self) -> (i64, i64) {
        let from = self.from.map_or(
            match self.direction {
                ReadDirection::Forward => 0,
                ReadDirection::Backward => i64::MAX,
            },
            |v| i64::try_from(v.get()).unwrap_or(i64::MAX),
        );
        let limit = self
            .limit
            .map_or(i64::MAX, |l| i64::try_from(l).unwrap_or(i64::MAX));
        (from, limit)
    }
}

/// Options for reading the global log: where to start, filters, a limit.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ReadAll {
    pub(crate) after: Position,
    pub(crate) category: Option<String>,
    pub(crate) stream_prefix: Option<String>,
    pub(crate) event_types: Option<Vec<String>>,
    pub(crate) limit: Option<u64>,
    pub(crate) page_size: Option<u32>,
}

impl ReadAll {
    /// Everything from the start of the log.
    #[must_use]
    pub fn from_start() -> Self {
        Self::default()
    }

    /// Everything strictly after `position` (a checkpoint).
    #[must_use]
    pub fn after(position: Position) -> Self {
        Self {
            after: position,
            ..Self::default()
        }
    }

    /// Only streams of this category (`Category` or `Category-…`).
    #[must_use]
    pub fn category(mut self, category: impl Into<String>) -> Self {
        self.category = Some(category.into());
        self
    }

    /// Only streams whose id starts with this prefix.
    #[must_use]
    pub fn stream_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.stream_prefix = Some(prefix.into());
        self
    }

    /// Only these event types.
    #[must_use]
    pub fn event_types<I, S>(mut self, types: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.event_types = Some(types.into_iter().map(Into::into).collect());
        self
    }

    /// Stops after this many events.
    #[must_use]
    pub fn limit(mut self, limit: u64) -> Self {
        self.limit = Some(limit);
        self
    }

    /// Fetches this many events per round trip for this read, instead of
    /// the store's [`StoreConfig::read_batch_size`] (at least 1).
    #[must_use]
    pub fn page_size(mut self, rows: u32) -> Self {
        self.page_size = Some(rows.max(1));
        self
    }

    /// The position reading starts after.
    #[must_use]
    pub fn start(&self) -> Position {
        self.after
    }

    /// The page size for this read on a store configured with `config`.
    pub(crate) fn page(&self, config: &StoreConfig) -> u32 {
        self.page_size.unwrap_or(config.read_batch_size)
    }

    /// Whether an event passes the filters (the in-memory store's check and
    /// the reference for the SQL one).
    pub(crate) fn matches(&self, e: &RecordedEvent) -> bool {
        if let Some(c) = &self.category {
            let s = e.stream_id.as_str();
            let ok =
                s == c || (s.starts_with(c.as_str()) && s.as_bytes().get(c.len()) == Some(&b'-'));
            if !ok {
                return false;
            }
        }
        if let Some(p) = &self.stream_prefix
            && !e.stream_id.as_str().starts_with(p.as_str())
        {
            return false;
        }
        self.event_types
            .as_ref()
            .is_none_or(|types| types.contains(&e.event_type))
    }
}
