//! Creating and inspecting topics and subscriptions, idempotently.

use std::time::Duration;

use google_cloud_gax::error::rpc::Code;
use google_cloud_pubsub::client::{SubscriptionAdmin, TopicAdmin};
use google_cloud_pubsub::model::{DeadLetterPolicy, RetryPolicy, Subscription};
use google_cloud_wkt as wkt;

use crate::config::SubscriptionConfig;
use crate::error::{EventBusError, Result};

fn code(e: &google_cloud_pubsub::Error) -> Option<Code> {
    e.status().map(|s| s.code)
}

pub(super) fn broker_error(operation: String, e: google_cloud_pubsub::Error) -> EventBusError {
    let retryable = e.is_timeout()
        || e.is_transport()
        || e.is_io()
        || e.is_connect()
        || matches!(
            code(&e),
            Some(
                Code::Unavailable
                    | Code::DeadlineExceeded
                    | Code::ResourceExhausted
                    | Code::Aborted
                    | Code::Internal
            )
        );
    let message = match e.status() {
        Some(s) => format!("{}: {}", s.code.name(), s.message),
        None => e.to_string(),
    };
    EventBusError::Broker {
        operation,
        message,
        retryable,
        source: Some(Box::new(e)),
    }
}

fn duration(d: Duration) -> wkt::Duration {
    // Settings are validated to at most 600 s, well inside wkt's range.
    wkt::Duration::try_from(d).unwrap_or_default()
}

/// Creates a topic; an existing one is success.
pub(super) async fn create_topic(admin: &TopicAdmin, path: &str) -> Result<()> {
    match admin.create_topic().set_name(path).send().await {
        Ok(_) => {
            tracing::info!(topic = path, "created topic");
            Ok(())
        }
        Err(e) if code(&e) == Some(Code::AlreadyExists) => Ok(()),
        Err(e) => Err(broker_error(format!("create topic {path}"), e)),
    }
}

pub(super) async fn topic_exists(admin: &TopicAdmin, path: &str) -> Result<bool> {
    match admin.get_topic().set_topic(path).send().await {
        Ok(_) => Ok(true),
        Err(e) if code(&e) == Some(Code::NotFound) => Ok(false),
        Err(e) => Err(broker_error(format!("get topic {path}"), e)),
    }
}

pub(super) async fn get_subscription(
    admin: &SubscriptionAdmin,
    path: &str,
) -> Result<Option<Subscription>> {
    match admin.get_subscription().set_subscription(path).send().await {
        Ok(s) => Ok(Some(s)),
        Err(e) if code(&e) == Some(Code::NotFound) => Ok(None),
        Err(e) => Err(broker_error(format!("get subscription {path}"), e)),
    }
}

pub(super) async fn subscription_exists(admin: &SubscriptionAdmin, path: &str) -> Result<bool> {
    Ok(get_subscription(admin, path).await?.is_some())
}

/// The subscription on a dead-letter topic that keeps dead letters: no retry
/// or dead-letter policy of its own, the longest retention.
pub(super) async fn create_dead_letter_subscription(
    admin: &SubscriptionAdmin,
    path: &str,
    topic: &str,
) -> Result<()> {
    let result = admin
        .create_subscription()
        .set_name(path)
        .set_topic(topic)
        // Short, so dead letters stranded by an interrupted listing come
        // back soon.
        .set_ack_deadline_seconds(10)
        .set_message_retention_duration(duration(Duration::from_secs(7 * 24 * 3600)))
        // Listing releases dead letters with a nack; without an explicit
        // short retry policy the emulator waits longer and longer before
        // handing them out again.
        .set_retry_policy(
            RetryPolicy::new()
                .set_minimum_backoff(duration(Duration::from_millis(100)))
                .set_maximum_backoff(duration(Duration::from_secs(1))),
        )
        .send()
        .await;
    match result {
        Ok(_) => {
            tracing::info!(subscription = path, "created dead-letter subscription");
            Ok(())
        }
        Err(e) if code(&e) == Some(Code::AlreadyExists) => Ok(()),
        Err(e) => Err(broker_error(format!("create subscription {path}"), e)),
    }
}

fn policies(
    config: &SubscriptionConfig,
    dead_letter_topic: &str,
) -> (RetryPolicy, DeadLetterPolicy) {
    let attempts = i32::try_from(config.max_delivery_attempts()).unwrap_or(i32::MAX);
    (
        RetryPolicy::new()
            .set_minimum_backoff(duration(config.backoff().0))
            .set_maximum_backoff(duration(config.backoff().1)),
        DeadLetterPolicy::new()
            .set_dead_letter_topic(dead_letter_topic)
            .set_max_delivery_attempts(attempts),
    )
}

fn ack_deadline_secs(config: &SubscriptionConfig) -> i32 {
    i32::try_from(config.ack_deadline().as_secs()).unwrap_or(600)
}

/// Creates a consumer's subscription with its retry and dead-letter
/// policies. An existing one is success; its retry, dead-letter and ack
/// deadline settings are updated when they differ from `config` (ordering
/// cannot change after creation, so a difference is only logged).
pub(super) async fn create_subscription(
    admin: &SubscriptionAdmin,
    path: &str,
    topic: &str,
    dead_letter_topic: &str,
    config: &SubscriptionConfig,
) -> Result<()> {
    let (retry, dead_letter) = policies(config, dead_letter_topic);
    let result = admin
        .create_subscription()
        .set_name(path)
        .set_topic(topic)
        .set_ack_deadline_seconds(ack_deadline_secs(config))
        .set_enable_message_ordering(config.ordered())
        .set_retry_policy(retry.clone())
        .set_dead_letter_policy(dead_letter.clone())
        .send()
        .await;
    match result {
        Ok(_) => {
            tracing::info!(subscription = path, "created subscription");
            Ok(())
        }
        Err(e) if code(&e) == Some(Code::AlreadyExists) => {
            let Some(existing) = get_subscription(admin, path).await? else {
                // Deleted in between: try once more from the top.
                return Box::pin(create_subscription(
                    admin,
                    path,
                    topic,
                    dead_letter_topic,
                    config,
                ))
                .await;
            };
            if existing.topic != topic {
                return Err(EventBusError::invalid_config(
                    "consumer",
                    format!(
                        "subscription {path} exists on topic {} instead of {topic}",
                        existing.topic
                    ),
                ));
            }
            if existing.enable_message_ordering != config.ordered() {
                tracing::warn!(
                    subscription = path,
                    existing = existing.enable_message_ordering,
                    wanted = config.ordered(),
                    "message ordering cannot change on an existing subscription"
                );
            }
            let same = existing.retry_policy.as_ref() == Some(&retry)
                && existing.dead_letter_policy.as_ref() == Some(&dead_letter)
                && existing.ack_deadline_seconds == ack_deadline_secs(config);
            if same {
                return Ok(());
            }
            let updated = existing
                .set_retry_policy(retry)
                .set_dead_letter_policy(dead_letter)
                .set_ack_deadline_seconds(ack_deadline_secs(config));
            admin
                .update_subscription()
                .set_subscription(updated)
                .set_update_mask(wkt::FieldMask::default().set_paths([
                    "retry_policy",
                    "dead_letter_policy",
                    "ack_deadline_seconds",
                ]))
                .send()
                .await
                .map_err(|e| broker_error(format!("update subscription {path}"), e))?;
            tracing::info!(subscription = path, "updated subscription settings");
            Ok(())
        }
        Err(e) => Err(broker_error(format!("create subscription {path}"), e)),
    }
}
