//! The [`EventPublisher`] and [`EventBus`] implementations of
//! [`PubSubBus`].

use std::collections::HashSet;
use std::sync::Arc;

use async_trait::async_trait;
use google_cloud_pubsub::client::Subscriber;
use keel_core::{EventHandler, EventId, EventPublisher, Message};

use super::{PubSubBus, admin, configure, connect_error, from_pubsub, lock, publish_to, worker};
use crate::bus::{DeadLetter, EventBus, Subscription};
use crate::codec::RawMessage;
use crate::config::SubscriptionConfig;
use crate::error::{EventBusError, Result};

#[async_trait]
impl EventPublisher for PubSubBus {
    async fn publish(&self, topic: &str, messages: &[Message]) -> keel_core::Result<()> {
        let raw = crate::codec::encode_batch(messages, self.formats.for_topic(topic))?;
        self.publish_owned(topic, raw).await?;
        Ok(())
    }
}

#[async_trait]
impl EventBus for PubSubBus {
    async fn publish_raw(&self, topic: &str, messages: &[RawMessage]) -> Result<()> {
        self.publish_owned(topic, messages.to_vec()).await
    }

    async fn close(&self) {
        PubSubBus::close(self).await;
    }

    async fn ensure_topic(&self, topic: &str) -> Result<()> {
        let path = self.topic_path(&self.naming.topic(topic)?);
        admin::create_topic(&self.inner.topics, &path).await?;
        lock(&self.inner.known_topics).insert(path);
        Ok(())
    }

    async fn ensure_subscription(&self, topic: &str, config: &SubscriptionConfig) -> Result<()> {
        config.validate()?;
        let consumer = config.consumer();
        let topic_path = self.topic_path(&self.naming.topic(topic)?);
        let dlq_topic = self.topic_path(&self.naming.dead_letter_topic(topic, consumer)?);
        let sub = self.subscription_path(&self.naming.subscription(topic, consumer)?);
        let dlq_sub =
            self.subscription_path(&self.naming.dead_letter_subscription(topic, consumer)?);
        let admin = &self.inner;
        admin::create_topic(&admin.topics, &topic_path).await?;
        admin::create_topic(&admin.topics, &dlq_topic).await?;
        // The dead-letter subscription first: a dead letter forwarded before
        // it exists would be lost.
        admin::create_dead_letter_subscription(&admin.subscriptions, &dlq_sub, &dlq_topic).await?;
        admin::create_subscription(&admin.subscriptions, &sub, &topic_path, &dlq_topic, config)
            .await?;
        let mut known = lock(&admin.known_topics);
        known.insert(topic_path);
        known.insert(dlq_topic);
        Ok(())
    }

    async fn subscribe(
        &self,
        topic: &str,
        config: &SubscriptionConfig,
        handler: Arc<dyn EventHandler>,
    ) -> Result<Subscription> {
        config.validate()?;
        let consumer = config.consumer();
        let topic_path = self.topic_path(&self.naming.topic(topic)?);
        let sub_name = self.naming.subscription(topic, consumer)?;
        let sub_path = self.subscription_path(&sub_name);
        let dlq_topic = self.topic_path(&self.naming.dead_letter_topic(topic, consumer)?);
        if self.auto_create {
            self.ensure_subscription(topic, config).await?;
        } else {
            match admin::get_subscription(&self.inner.subscriptions, &sub_path).await? {
                None if !admin::topic_exists(&self.inner.topics, &topic_path).await? => {
                    return Err(EventBusError::TopicNotFound { topic: topic_path });
                }
                None => {
                    return Err(EventBusError::SubscriptionNotFound {
                        subscription: sub_path,
                    });
                }
                Some(existing) if existing.dead_letter_policy.is_none() => {
                    // Without a policy Pub/Sub reports no delivery attempts,
                    // so a failing message would be retried forever.
                    tracing::warn!(
                        subscription = %sub_path,
                        "the subscription has no dead-letter policy: failing messages are retried \
                         without limit; provision it with ensure_subscription"
                    );
                }
                Some(_) => {}
            }
        }
        // Each subscription gets a client (connection and client id) of its
        // own, so competing subscriptions in one process are distinct
        // clients to Pub/Sub (the emulator, for one, does not reliably serve
        // several streams of one client).
        let subscriber = configure!(Subscriber::builder(), self.inner.config)
            .build()
            .await
            .map_err(|e| connect_error("subscriber", e))?;
        let ctx = worker::Context {
            subscriber,
            subscription_path: sub_path,
            subscription_name: sub_name.clone(),
            dead_letter_topic: dlq_topic.clone(),
            dead_letter_publisher: self.publisher(&dlq_topic),
            config: config.clone(),
            handler,
            metrics: self.metrics.clone(),
        };
        Ok(Subscription::start(sub_name, move |stop| {
            worker::run(Arc::new(ctx), stop)
        }))
    }

    async fn dead_letters(
        &self,
        topic: &str,
        consumer: &str,
        limit: usize,
    ) -> Result<Vec<DeadLetter>> {
        let path = self.subscription_path(&self.naming.dead_letter_subscription(topic, consumer)?);
        let reader = self.dead_letter_reader(&path).await?;
        let mut letters: Vec<DeadLetter> = reader
            .snapshot()
            .iter()
            .take(limit)
            .map(|m| DeadLetter::from_dead_letter_copy(&from_pubsub(m)))
            .collect();
        letters.truncate(limit);
        Ok(letters)
    }

    async fn replay_dead_letters(
        &self,
        topic: &str,
        consumer: &str,
        event_ids: &[EventId],
    ) -> Result<usize> {
        let topic_path = self.topic_path(&self.naming.topic(topic)?);
        let path = self.subscription_path(&self.naming.dead_letter_subscription(topic, consumer)?);
        let reader = self.dead_letter_reader(&path).await?;
        let wanted: HashSet<EventId> = event_ids.iter().copied().collect();
        let chosen = reader.take(|m| {
            from_pubsub(m)
                .event_id()
                .is_some_and(|id| wanted.contains(&id))
        });
        let publisher = self.publisher(&topic_path);
        let mut replayed = HashSet::new();
        let mut chosen = chosen.into_iter();
        while let Some(held) = chosen.next() {
            let raw = from_pubsub(&held.message);
            let id = raw.event_id();
            if !replayed.contains(&id) {
                let result = publish_to(
                    &publisher,
                    &topic_path,
                    vec![raw.without_dead_letter_attributes()],
                )
                .await;
                if let Err(e) = result {
                    reader.put_back(held);
                    chosen.for_each(|h| reader.put_back(h));
                    return Err(e);
                }
                replayed.insert(id);
            }
            // Published (or another copy of a replayed one): remove it.
            held.handler.ack();
        }
        Ok(replayed.len())
    }
}
