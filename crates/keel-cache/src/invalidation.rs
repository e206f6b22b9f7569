//! Automatic invalidation: an event handler that evicts what an event made
//! stale.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use keel_core::{Delivery, EventHandler, HandlerError, Message};

use crate::aside::CacheAside;

type KeyFn = dyn Fn(&Message) -> Result<Vec<String>, String> + Send + Sync;

enum Action {
    Keys(Arc<KeyFn>),
    All,
}

struct Rule {
    event_type: String,
    cache: CacheAside,
    action: Action,
}

/// An [`EventHandler`] that maps domain events to cache entries to evict.
///
/// Subscribe it to the topics your writes publish to (or feed it from an
/// event-store subscription): when an `order.shipped` event passes, the
/// `orders` cache entry for that order is evicted, in every process.
///
/// Events without a rule are acknowledged and ignored. A failing cache
/// backend makes the delivery fail with [`HandlerError::Retry`], so the bus
/// redelivers it; an event whose keys cannot be worked out (a missing
/// payload field) is rejected ([`HandlerError::Reject`]).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use keel_cache::{CacheAside, InvalidationHandler, MemoryCache};
/// use keel_core::{Delivery, EventHandler, Message};
/// use serde_json::json;
///
/// let memory = MemoryCache::new();
/// let orders = CacheAside::builder(memory.clone(), "orders").build().await?;
/// let catalog = CacheAside::builder(memory, "catalog").build().await?;
/// orders.set("o-1", "pending").await?;
///
/// let handler = InvalidationHandler::new()
///     .evict_field("order.shipped", &orders, "/order_id")
///     .evict("order.merged", &orders, |m| {
///         m.payload["merged"].as_array().into_iter().flatten()
///             .filter_map(|id| id.as_str().map(str::to_owned)).collect()
///     })
///     .evict_all("catalog.reimported", &catalog);
///
/// let shipped = Message::new("order.shipped", json!({ "order_id": "o-1" }));
/// handler.handle(&Delivery::new(shipped, 1, "orders-cache")).await?;
/// assert_eq!(orders.get::<String>("o-1").await?, None);
/// # Ok(())
/// # }
/// ```
#[derive(Default)]
pub struct InvalidationHandler {
    rules: Vec<Rule>,
}

impl fmt::Debug for InvalidationHandler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut list = f.debug_list();
        for rule in &self.rules {
            let action = match rule.action {
                Action::Keys(_) => "evict keys",
                Action::All => "evict all",
            };
            list.entry(&format_args!(
                "{} -> {} ({action})",
                rule.event_type,
                rule.cache.namespace()
            ));
        }
        list.finish()
    }
}

impl InvalidationHandler {
    /// A handler with no rules.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// On `event_type`, evicts the keys `keys` picks from the message.
    #[must_use]
    pub fn evict<F>(mut self, event_type: impl Into<String>, cache: &CacheAside, keys: F) -> Self
    where
        F: Fn(&Message) -> Vec<String> + Send + Sync + 'static,
    {
        self.rules.push(Rule {
            event_type: event_type.into(),
            cache: cache.clone(),
            action: Action::Keys(Arc::new(move |m| Ok(keys(m)))),
        });
        self
    }

    /// On `event_type`, evicts the key found in the payload at `pointer` (a
    /// JSON pointer such as `/order_id`; strings and numbers are used as
    /// they read). A message without it is rejected.
    #[must_use]
    pub fn evict_field(
        mut self,
        event_type: impl Into<String>,
        cache: &CacheAside,
        pointer: impl Into<String>,
    ) -> Self {
        let pointer = pointer.into();
        self.rules.push(Rule {
            event_type: event_type.into(),
            cache: cache.clone(),
            action: Action::Keys(Arc::new(move |m| match m.payload.pointer(&pointer) {
                Some(serde_json::Value::String(s)) => Ok(vec![s.clone()]),
                Some(serde_json::Value::Number(n)) => Ok(vec![n.to_string()]),
                _ => Err(format!(
                    "{} has no string or number at {pointer}",
                    m.event_type
                )),
            })),
        });
        self
    }

    /// On `event_type`, invalidates the whole namespace (a version bump).
    #[must_use]
    pub fn evict_all(mut self, event_type: impl Into<String>, cache: &CacheAside) -> Self {
        self.rules.push(Rule {
            event_type: event_type.into(),
            cache: cache.clone(),
            action: Action::All,
        });
        self
    }
}

#[async_trait]
impl EventHandler for InvalidationHandler {
    async fn handle(&self, delivery: &Delivery) -> Result<(), HandlerError> {
        let message = &delivery.message;
        for rule in self
            .rules
            .iter()
            .filter(|r| r.event_type == message.event_type)
        {
            let evicted = match &rule.action {
                Action::All => rule.cache.invalidate_all().await,
                Action::Keys(keys) => {
                    let keys = keys(message).map_err(HandlerError::reject)?;
                    rule.cache.invalidate_many(&keys).await
                }
            };
            if let Err(e) = evicted {
                tracing::warn!(
                    event_type = %message.event_type,
                    event_id = %message.event_id,
                    namespace = rule.cache.namespace(),
                    error = %e,
                    "cache invalidation failed"
                );
                return Err(if e.is_backend_failure() {
                    HandlerError::retry(e)
                } else {
                    HandlerError::reject(e)
                });
            }
        }
        Ok(())
    }
}
