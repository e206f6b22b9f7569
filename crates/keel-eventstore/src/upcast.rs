//! Schema evolution: chains of upcasters that lift stored payloads from
//! schema version n to n + 1 when they are read.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;

use keel_core::{BoxError, DomainEvent, EventEnvelope};
use serde_json::Value;

use crate::error::{EventStoreError, Result};
use crate::event::RecordedEvent;

type Step = Arc<dyn Fn(Value) -> std::result::Result<Value, BoxError> + Send + Sync>;

/// Upcasters per event type, applied on read.
///
/// Register one step per schema version change: `step("order.placed", 1, f)`
/// turns a version-1 payload into a version-2 one. A stored payload is lifted
/// step by step to the type's current version (set explicitly with
/// [`current_version`](Self::current_version), or one past the highest
/// registered step). A missing step is an
/// [`EventStoreError::MissingUpcaster`] naming the type and versions; a
/// payload newer than the current version is an
/// [`EventStoreError::FutureSchemaVersion`].
///
/// ```
/// use keel_eventstore::Upcasters;
/// use serde_json::json;
///
/// let upcasters = Upcasters::new()
///     // v1 had `amount` in cents as a string; v2 has an integer.
///     .step("payment.made", 1, |mut v| {
///         let cents: i64 = v["amount"].as_str().ok_or("amount is not a string")?.parse()?;
///         v["amount"] = json!(cents);
///         Ok(v)
///     })
///     // v3 renamed `amount` to `cents`.
///     .step("payment.made", 2, |mut v| {
///         let amount = v["amount"].take();
///         Ok(json!({ "cents": amount }))
///     });
/// let lifted = upcasters.upcast_value("payment.made", 1, json!({"amount": "250"})).unwrap();
/// assert_eq!(lifted, (json!({"cents": 250}), 3));
/// ```
#[derive(Clone, Default)]
pub struct Upcasters {
    steps: HashMap<String, BTreeMap<u32, Step>>,
    current: HashMap<String, u32>,
}

impl fmt::Debug for Upcasters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut m = f.debug_map();
        for (t, steps) in &self.steps {
            m.entry(t, &steps.keys().collect::<Vec<_>>());
        }
        m.finish()
    }
}

impl Upcasters {
    /// No upcasters: payloads are read as stored.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers the step lifting `event_type` from schema version `from` to
    /// `from + 1`.
    #[must_use]
    pub fn step<F>(mut self, event_type: impl Into<String>, from: u32, f: F) -> Self
    where
        F: Fn(Value) -> std::result::Result<Value, BoxError> + Send + Sync + 'static,
    {
        self.steps
            .entry(event_type.into())
            .or_default()
            .insert(from, Arc::new(f));
        self
    }

    /// Declares the current schema version of `event_type` (what the code
    /// reads). Without it, the current version is one past the highest step.
    #[must_use]
    pub fn current_version(mut self, event_type: impl Into<String>, version: u32) -> Self {
        self.current.insert(event_type.into(), version);
        self
    }

    /// The schema version payloads of `event_type` are lifted to, if any
    /// upcasting is configured for it.
    #[must_use]
    pub fn target(&self, event_type: &str) -> Option<u32> {
        self.current.get(event_type).copied().or_else(|| {
            self.steps
                .get(event_type)
                .and_then(|s| s.keys().next_back())
                .map(|v| v + 1)
        })
    }

    /// Lifts one payload to the current version; returns it and its version.
    pub fn upcast_value(
        &self,
        event_type: &str,
        version: u32,
        payload: Value,
    ) -> Result<(Value, u32)> {
        let Some(target) = self.target(event_type) else {
            return Ok((payload, version));
        };
        if version > target {
            return Err(EventStoreError::FutureSchemaVersion {
                event_type: event_type.to_owned(),
                stored: version,
                current: target,
            });
        }
        let mut value = payload;
        for from in version..target {
            let step = self
                .steps
                .get(event_type)
                .and_then(|s| s.get(&from))
                .ok_or_else(|| EventStoreError::MissingUpcaster {
                    event_type: event_type.to_owned(),
                    from,
                    to: from + 1,
                })?;
            value = step(value).map_err(|source| EventStoreError::Upcast {
                event_type: event_type.to_owned(),
                from,
                source,
            })?;
        }
        Ok((value, target))
    }

    /// Lifts a stored event to its type's current schema version (a no-op
    /// when it is current or its type has no upcasters).
    pub fn upcast(&self, mut event: RecordedEvent) -> Result<RecordedEvent> {
        match self.target(&event.event_type) {
            Some(target) if target != event.schema_version => {
                let value = event.payload_value()?;
                let (value, version) =
                    self.upcast_value(&event.event_type, event.schema_version, value)?;
                event.payload = value.to_string();
                event.schema_version = version;
                Ok(event)
            }
            _ => Ok(event),
        }
    }

    /// Upcasts, then decodes into a domain event.
    pub fn decode<E: DomainEvent>(&self, event: RecordedEvent) -> Result<EventEnvelope<E>> {
        self.upcast(event)?.decode()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn chain() -> Upcasters {
        Upcasters::new()
            .step("a", 1, |v| Ok(json!({ "v2": v })))
            .step("a", 2, |v| Ok(json!({ "v3": v })))
    }

    #[test]
    fn lifts_step_by_step_to_the_current_version() {
        let (v, n) = chain().upcast_value("a", 1, json!(0)).unwrap();
        assert_eq!((v, n), (json!({"v3": {"v2": 0}}), 3));
        let (v, n) = chain().upcast_value("a", 2, json!(0)).unwrap();
        assert_eq!((v, n), (json!({"v3": 0}), 3));
        let (v, n) = chain().upcast_value("a", 3, json!(0)).unwrap();
        assert_eq!((v, n), (json!(0), 3));
        let (v, n) = chain().upcast_value("other", 7, json!(1)).unwrap();
        assert_eq!(
            (v, n),
            (json!(1), 7),
            "types without upcasters are read as stored"
        );
    }

    #[test]
    fn a_missing_step_names_the_type_and_versions() {
        let gap = chain().current_version("a", 5);
        match gap.upcast_value("a", 1, json!(0)).unwrap_err() {
            EventStoreError::MissingUpcaster {
                event_type,
                from,
                to,
            } => {
                assert_eq!((event_type.as_str(), from, to), ("a", 3, 4));
            }
            other => panic!("unexpected {other:?}"),
        }
        let no_first = Upcasters::new().step("b", 2, Ok);
        let err = no_first.upcast_value("b", 1, json!(0)).unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"no upcaster for event type "b" from schema version 1 to 2"#
        );
    }

    #[test]
    fn newer_payloads_and_failing_steps_are_typed_errors() {
        assert!(matches!(
            chain().upcast_value("a", 4, json!(0)),
            Err(EventStoreError::FutureSchemaVersion {
                stored: 4,
                current: 3,
                ..
            })
        ));
        let failing = Upcasters::new().step("c", 1, |_| Err("no".into()));
        assert!(matches!(
            failing.upcast_value("c", 1, json!(0)),
            Err(EventStoreError::Upcast { from: 1, .. })
        ));
    }
}
