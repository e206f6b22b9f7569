//! Typed identifiers: event ids, correlation and causation ids, stream ids.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, InvalidInput};

/// Declares a UUID-backed identifier newtype with the usual conversions.
///
/// Services use it for their own entity and aggregate ids so that an order id
/// can never be passed where a customer id is expected.
///
/// ```
/// keel_core::uuid_id! {
///     /// Identifies an order.
///     pub struct OrderId;
/// }
/// let id = OrderId::new();
/// let parsed: OrderId = id.to_string().parse().unwrap();
/// assert_eq!(id, parsed);
/// ```
#[macro_export]
macro_rules! uuid_id {
    ($(#[$meta:meta])* $vis:vis struct $name:ident;) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, ::serde::Serialize, ::serde::Deserialize)]
        #[serde(transparent)]
        $vis struct $name(pub $crate::__private::Uuid);

        impl $name {
            /// A new, time-ordered (UUID v7) identifier.
            #[must_use]
            pub fn new() -> Self {
                Self($crate::__private::Uuid::now_v7())
            }

            /// Wraps an existing UUID.
            #[must_use]
            pub const fn from_uuid(uuid: $crate::__private::Uuid) -> Self {
                Self(uuid)
            }

            /// The underlying UUID.
            #[must_use]
            pub const fn as_uuid(&self) -> &$crate::__private::Uuid {
                &self.0
            }
        }

        impl ::core::default::Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl ::core::fmt::Display for $name {
            fn fmt(&self, f: &mut ::core::fmt::Formatter<'_>) -> ::core::fmt::Result {
                ::core::fmt::Display::fmt(&self.0, f)
            }
        }

        impl ::core::str::FromStr for $name {
            type Err = $crate::Error;
            fn from_str(s: &str) -> ::core::result::Result<Self, Self::Err> {
                $crate::__private::Uuid::parse_str(s).map(Self).map_err(|_| {
                    $crate::Error::invalid_input(
                        stringify!($name),
                        "is not a valid UUID",
                    )
                })
            }
        }

        impl ::core::convert::From<$crate::__private::Uuid> for $name {
            fn from(uuid: $crate::__private::Uuid) -> Self {
                Self(uuid)
            }
        }

        impl ::core::convert::From<$name> for $crate::__private::Uuid {
            fn from(id: $name) -> Self {
                id.0
            }
        }
    };
}

uuid_id! {
    /// Identifies one event, everywhere and forever. A UUID v7, so ids sort
    /// roughly by creation time and index well. Appends are idempotent by it.
    pub struct EventId;
}

uuid_id! {
    /// Groups every message caused, directly or not, by one originating
    /// request.
    pub struct CorrelationId;
}

uuid_id! {
    /// Names the message (command or event) that directly caused this one.
    pub struct CausationId;
}

uuid_id! {
    /// Identifies one command as it passes through the command pipeline. The
    /// events a command produces name it as their causation.
    pub struct CommandId;
}

impl From<CommandId> for CausationId {
    fn from(id: CommandId) -> Self {
        Self(id.0)
    }
}

impl From<EventId> for CausationId {
    fn from(id: EventId) -> Self {
        Self(id.0)
    }
}

/// The longest stream id accepted, in bytes.
pub const MAX_STREAM_ID_LEN: usize = 200;

/// The name of an event stream, validated on construction.
///
/// A stream id is 1 to [`MAX_STREAM_ID_LEN`] bytes of ASCII letters, digits and
/// `- _ . : @ / + =`. The convention is `Category-identifier` (for example
/// `Order-0190...`): the part before the first `-` is the stream's category,
/// which the global log can be filtered by.
///
/// ```
/// use keel_core::StreamId;
/// let id = StreamId::new("Order-42").unwrap();
/// assert_eq!(id.category(), "Order");
/// assert!(StreamId::new("").is_err());
/// assert!(StreamId::new("no spaces").is_err());
/// ```
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct StreamId(String);

impl StreamId {
    /// Validates and wraps a stream id.
    pub fn new(id: impl Into<String>) -> Result<Self, Error> {
        let id = id.into();
        validate_stream_id(&id)?;
        Ok(Self(id))
    }

    /// Builds `Category-id`, the conventional stream for one aggregate.
    pub fn for_aggregate(category: &str, id: impl fmt::Display) -> Result<Self, Error> {
        Self::new(format!("{category}-{id}"))
    }

    /// The stream id as text.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The part before the first `-`, or the whole id when it has none.
    #[must_use]
    pub fn category(&self) -> &str {
        self.0.split_once('-').map_or(self.0.as_str(), |(c, _)| c)
    }

    /// Consumes the id, returning its text.
    #[must_use]
    pub fn into_string(self) -> String {
        self.0
    }
}

fn validate_stream_id(id: &str) -> Result<(), Error> {
    if id.is_empty() {
        return Err(Error::invalid_input("stream_id", "must not be empty"));
    }
    if id.len() > MAX_STREAM_ID_LEN {
        return Err(Error::invalid_input(
            "stream_id",
            format!(
                "is {} bytes long; the limit is {MAX_STREAM_ID_LEN}",
                id.len()
            ),
        ));
    }
    if let Some(bad) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "-_.:@/+=".contains(*c)))
    {
        return Err(Error::invalid_input(
            "stream_id",
            format!(
                "contains the character {bad:?}; allowed are ASCII letters, digits and -_.:@/+="
            ),
        ));
    }
    if id.starts_with('$') {
        return Err(Error::invalid_input("stream_id", "must not start with '$'"));
    }
    Ok(())
}

impl<'de> Deserialize<'de> for StreamId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::new(s).map_err(serde::de::Error::custom)
    }
}

impl fmt::Debug for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StreamId({:?})", self.0)
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for StreamId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Self::new(s)
    }
}

impl TryFrom<String> for StreamId {
    type Error = Error;
    fn try_from(s: String) -> Result<Self, Error> {
        Self::new(s)
    }
}

impl TryFrom<&str> for StreamId {
    type Error = Error;
    fn try_from(s: &str) -> Result<Self, Error> {
        Self::new(s)
    }
}

impl AsRef<str> for StreamId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// Identifies the tenant a request or record belongs to.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TenantId(String);

impl TenantId {
    /// Validates and wraps a tenant id (1 to 128 visible ASCII characters).
    pub fn new(id: impl Into<String>) -> Result<Self, Error> {
        let id = id.into();
        if id.is_empty() || id.len() > 128 || !id.chars().all(|c| c.is_ascii_graphic()) {
            return Err(Error::Invalid(InvalidInput::new(
                "tenant_id",
                "must be 1 to 128 visible ASCII characters",
            )));
        }
        Ok(Self(id))
    }

    /// The tenant id as text.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[test]
    fn event_ids_are_v7_and_ordered() {
        let a = EventId::new();
        let b = EventId::new();
        assert_eq!(a.as_uuid().get_version_num(), 7);
        assert!(a <= b);
    }

    #[test]
    fn stream_id_rules() {
        assert_eq!(StreamId::new("Order-1").unwrap().category(), "Order");
        assert_eq!(StreamId::new("plain").unwrap().category(), "plain");
        let long = "a".repeat(MAX_STREAM_ID_LEN + 1);
        for bad in [
            "",
            " ",
            "a b",
            "drop;table",
            "é",
            "$all",
            "x'--",
            long.as_str(),
        ] {
            let err = StreamId::new(bad).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidInput, "{bad:?}");
            match err {
                Error::Invalid(inv) => assert_eq!(inv.field, "stream_id"),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(StreamId::new("a".repeat(MAX_STREAM_ID_LEN)).is_ok());
    }

    #[test]
    fn stream_id_deserialization_validates() {
        let ok: StreamId = serde_json::from_str("\"Cart-9\"").unwrap();
        assert_eq!(ok.as_str(), "Cart-9");
        assert!(serde_json::from_str::<StreamId>("\"bad id\"").is_err());
    }

    #[test]
    fn typed_uuid_ids_parse_and_reject() {
        let id = EventId::new();
        assert_eq!(id.to_string().parse::<EventId>().unwrap(), id);
        let err = "not-a-uuid".parse::<EventId>().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput);
        assert!(err.to_string().contains("EventId"));
    }

    #[test]
    fn tenant_ids_are_validated() {
        assert!(TenantId::new("acme").is_ok());
        assert!(TenantId::new("").is_err());
        assert!(TenantId::new("a b").is_err());
    }
}
