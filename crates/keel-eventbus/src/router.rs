//! Routing deliveries to typed handlers by event type.

use std::collections::HashMap;
use std::fmt;
use std::marker::PhantomData;
use std::ops::RangeInclusive;
use std::sync::Arc;

use async_trait::async_trait;
use keel_core::{Delivery, DomainEvent, EventHandler, HandlerError};

/// Handles one kind of event, already decoded.
#[async_trait]
pub trait TypedHandler<E: DomainEvent>: Send + Sync {
    /// Handles a decoded event; `delivery` has the metadata and attempt.
    async fn handle(&self, event: E, delivery: &Delivery) -> Result<(), HandlerError>;
}

#[async_trait]
trait Route: Send + Sync {
    async fn handle(&self, delivery: &Delivery) -> Result<(), HandlerError>;
}

struct Typed<E, H> {
    handler: H,
    _event: PhantomData<fn() -> E>,
}

#[async_trait]
impl<E: DomainEvent, H: TypedHandler<E>> Route for Typed<E, H> {
    async fn handle(&self, delivery: &Delivery) -> Result<(), HandlerError> {
        // An undecodable payload can never succeed: `decode` fails with
        // invalid input, which converts to a rejection.
        let event: E = delivery.message.decode()?;
        self.handler.handle(event, delivery).await
    }
}

/// A handler for a range of schema versions of one event type.
type Versioned = (RangeInclusive<u32>, Arc<dyn Route>);

/// An [`EventHandler`] that decodes each message into the type registered
/// for its event type and schema versions, and calls that type's handler.
///
/// A message of an unregistered event type is rejected (dead-lettered) unless
/// [`ignore_unknown_types`](Self::ignore_unknown_types) is set, in which case
/// it is acked and skipped, for consumers of topics that carry more types than
/// they care about. A registered type with an unsupported schema version, or a
/// payload that does not decode, is rejected.
///
/// ```
/// use std::sync::Arc;
/// use async_trait::async_trait;
/// use keel_core::{Delivery, DomainEvent, HandlerError};
/// use keel_eventbus::{EventRouter, TypedHandler};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Clone, Debug, Serialize, Deserialize)]
/// struct OrderPlaced { order: String }
/// impl DomainEvent for OrderPlaced {
///     fn event_type(&self) -> &'static str { "order.placed" }
/// }
///
/// struct Billing;
/// #[async_trait]
/// impl TypedHandler<OrderPlaced> for Billing {
///     async fn handle(&self, e: OrderPlaced, _: &Delivery) -> Result<(), HandlerError> {
///         assert!(!e.order.is_empty());
///         Ok(())
///     }
/// }
///
/// let router = EventRouter::new()
///     .route::<OrderPlaced, _>("order.placed", 1..=1, Billing)
///     .ignore_unknown_types();
/// let handler: Arc<dyn keel_core::EventHandler> = Arc::new(router);
/// ```
#[derive(Default)]
pub struct EventRouter {
    routes: HashMap<String, Vec<Versioned>>,
    ignore_unknown: bool,
}

impl fmt::Debug for EventRouter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut types: Vec<&String> = self.routes.keys().collect();
        types.sort();
        f.debug_struct("EventRouter")
            .field("event_types", &types)
            .field("ignore_unknown", &self.ignore_unknown)
            .finish()
    }
}

impl EventRouter {
    /// A router with no routes.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Sends messages of `event_type` with a schema version in `versions` to
    /// `handler`, decoded as `E`.
    #[must_use]
    pub fn route<E, H>(
        mut self,
        event_type: impl Into<String>,
        versions: RangeInclusive<u32>,
        handler: H,
    ) -> Self
    where
        E: DomainEvent,
        H: TypedHandler<E> + 'static,
    {
        let route: Arc<dyn Route> = Arc::new(Typed {
            handler,
            _event: PhantomData,
        });
        self.routes
            .entry(event_type.into())
            .or_default()
            .push((versions, route));
        self
    }

    /// Acks and skips messages of event types with no route.
    #[must_use]
    pub fn ignore_unknown_types(mut self) -> Self {
        self.ignore_unknown = true;
        self
    }
}

#[async_trait]
impl EventHandler for EventRouter {
    async fn handle(&self, delivery: &Delivery) -> Result<(), HandlerError> {
        let message = &delivery.message;
        let Some(routes) = self.routes.get(&message.event_type) else {
            if self.ignore_unknown {
                return Ok(());
            }
            return Err(HandlerError::reject(format!(
                "no handler for event type {:?}",
                message.event_type
            )));
        };
        let route = routes
            .iter()
            .find(|(versions, _)| versions.contains(&message.schema_version));
        match route {
            Some((_, route)) => route.handle(delivery).await,
            None => Err(HandlerError::reject(format!(
                "{} schema version {} is not supported",
                message.event_type, message.schema_version
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_core::Message;
    use serde::{Deserialize, Serialize};
    use serde_json::json;
    use std::sync::Mutex;

    #[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
    struct Placed {
        order: String,
    }
    impl DomainEvent for Placed {
        fn event_type(&self) -> &'static str {
            "order.placed"
        }
    }

    #[derive(Default)]
    struct Seen(Mutex<Vec<String>>);
    #[async_trait]
    impl TypedHandler<Placed> for Arc<Seen> {
        async fn handle(&self, e: Placed, _: &Delivery) -> Result<(), HandlerError> {
            self.0.lock().unwrap().push(e.order);
            Ok(())
        }
    }

    fn delivery(event_type: &str, version: u32, payload: serde_json::Value) -> Delivery {
        let mut m = Message::new(event_type, payload);
        m.schema_version = version;
        Delivery::new(m, 1, "s")
    }

    #[tokio::test]
    async fn routes_decodes_and_rejects() {
        let seen = Arc::new(Seen::default());
        let router = EventRouter::new().route::<Placed, _>("order.placed", 1..=2, seen.clone());
        router
            .handle(&delivery("order.placed", 2, json!({"order": "o-1"})))
            .await
            .unwrap();
        assert_eq!(*seen.0.lock().unwrap(), ["o-1"]);

        let rejected = |r: Result<(), HandlerError>| matches!(r, Err(HandlerError::Reject(_)));
        assert!(rejected(
            router
                .handle(&delivery("order.placed", 3, json!({"order": "o-2"})))
                .await
        ));
        assert!(rejected(
            router
                .handle(&delivery("order.placed", 1, json!({"wrong": true})))
                .await
        ));
        assert!(rejected(
            router
                .handle(&delivery("order.shipped", 1, json!({})))
                .await
        ));
        let lenient = EventRouter::new().ignore_unknown_types();
        lenient
            .handle(&delivery("order.shipped", 1, json!({})))
            .await
            .unwrap();
        assert_eq!(seen.0.lock().unwrap().len(), 1);
    }
}
