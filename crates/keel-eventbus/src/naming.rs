//! How Keel names topics and subscriptions on the broker.
//!
//! | what | name |
//! |---|---|
//! | topic | `{prefix}.{topic}` (or `{topic}` without a prefix) |
//! | subscription of a consumer | `{topic name}.{consumer}` |
//! | its dead-letter topic | `{topic name}.{consumer}.dlq` |
//! | the subscription that keeps dead letters | `{topic name}.{consumer}.dlq` |
//!
//! Topics and subscriptions live in separate namespaces in Pub/Sub, so the
//! dead-letter topic and its subscription share one name. A prefix (an
//! environment or a bounded context, say `prod` or `billing`) lets several
//! deployments share one project.

use crate::error::{EventBusError, Result};

const MAX_NAME: usize = 255;

/// Computes and validates broker-side names; see the [module docs](self).
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct Naming {
    prefix: Option<String>,
}

impl Naming {
    /// Names without a prefix.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Names under `prefix` (`{prefix}.{topic}`).
    pub fn with_prefix(prefix: impl Into<String>) -> Result<Self> {
        let prefix = prefix.into();
        validate_part("prefix", &prefix)?;
        Ok(Self {
            prefix: Some(prefix),
        })
    }

    /// The prefix, if any.
    #[must_use]
    pub fn prefix(&self) -> Option<&str> {
        self.prefix.as_deref()
    }

    /// The broker-side name of `topic`.
    pub fn topic(&self, topic: &str) -> Result<String> {
        validate_part("topic", topic)?;
        let name = match &self.prefix {
            Some(p) => format!("{p}.{topic}"),
            None => topic.to_owned(),
        };
        validate_full("topic", name)
    }

    /// The name of `consumer`'s subscription on `topic`.
    pub fn subscription(&self, topic: &str, consumer: &str) -> Result<String> {
        validate_part("consumer", consumer)?;
        validate_full("consumer", format!("{}.{consumer}", self.topic(topic)?))
    }

    /// The name of the dead-letter topic for `consumer` on `topic`.
    pub fn dead_letter_topic(&self, topic: &str, consumer: &str) -> Result<String> {
        validate_full(
            "consumer",
            format!("{}.dlq", self.subscription(topic, consumer)?),
        )
    }

    /// The name of the subscription that keeps `consumer`'s dead letters.
    pub fn dead_letter_subscription(&self, topic: &str, consumer: &str) -> Result<String> {
        self.dead_letter_topic(topic, consumer)
    }
}

fn invalid(kind: &'static str, name: &str, reason: impl Into<String>) -> EventBusError {
    EventBusError::InvalidName {
        kind,
        name: name.to_owned(),
        reason: reason.into(),
    }
}

/// One part of a name: starts with a letter, then letters, digits and
/// `- _ . ~ + %` (what Pub/Sub allows in resource ids).
fn validate_part(kind: &'static str, part: &str) -> Result<()> {
    let Some(first) = part.chars().next() else {
        return Err(invalid(kind, part, "must not be empty"));
    };
    if !first.is_ascii_alphabetic() {
        return Err(invalid(kind, part, "must start with an ASCII letter"));
    }
    if let Some(bad) = part
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "-_.~+%".contains(*c)))
    {
        return Err(invalid(
            kind,
            part,
            format!("contains {bad:?}; allowed are ASCII letters, digits and -_.~+%"),
        ));
    }
    if part.starts_with("goog") {
        return Err(invalid(kind, part, "must not start with \"goog\""));
    }
    if part.ends_with(".dlq") {
        return Err(invalid(kind, part, "must not end with \".dlq\" (reserved)"));
    }
    Ok(())
}

fn validate_full(kind: &'static str, name: String) -> Result<String> {
    if name.len() < 3 {
        return Err(invalid(
            kind,
            &name,
            "the full name must be at least 3 characters",
        ));
    }
    if name.len() > MAX_NAME {
        return Err(invalid(
            kind,
            &name,
            format!("the full name is longer than {MAX_NAME} characters"),
        ));
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn convention() {
        let n = Naming::with_prefix("prod").unwrap();
        assert_eq!(n.topic("orders").unwrap(), "prod.orders");
        assert_eq!(
            n.subscription("orders", "billing").unwrap(),
            "prod.orders.billing"
        );
        assert_eq!(
            n.dead_letter_topic("orders", "billing").unwrap(),
            "prod.orders.billing.dlq"
        );
        assert_eq!(Naming::new().topic("orders").unwrap(), "orders");
    }

    #[test]
    fn refuses_bad_names() {
        let n = Naming::new();
        for bad in ["", "1abc", "a b", "ab", "goog-x", "x/y", "x.dlq"] {
            let err = n.topic(bad).unwrap_err();
            assert!(
                matches!(err, EventBusError::InvalidName { kind: "topic", .. }),
                "{bad}: {err}"
            );
        }
        assert!(matches!(
            n.subscription("orders", "bad consumer"),
            Err(EventBusError::InvalidName {
                kind: "consumer",
                ..
            })
        ));
        assert!(n.topic(&"a".repeat(300)).is_err());
        assert!(Naming::with_prefix("9").is_err());
    }
}
