//! Publishing a claimed batch: one call per topic, an aggregate's rows held
//! back after its first failure.

use std::collections::HashMap;

use keel_core::Message;
use tracing::warn;

use super::Relay;
use super::source::Claimed;
use crate::error::OutboxError;

impl Relay {
    pub(super) async fn publish(&self, rows: &[Claimed]) -> Outcome {
        // The first failed row of each aggregate: it and everything after it
        // in that aggregate stay unpublished, so order holds on retry.
        let mut failed_from: HashMap<(&str, &str), i64> = HashMap::new();
        let mut failures: Vec<(i64, String)> = Vec::new();
        let mut messages: Vec<Option<Message>> = Vec::with_capacity(rows.len());
        for row in rows {
            match &row.message {
                Ok(m) => messages.push(Some(m.clone())),
                Err(e) => {
                    warn!(relay = %self.config.name, error = %e, "unreadable outbox row");
                    failed_from
                        .entry((&row.aggregate_type, &row.aggregate_id))
                        .or_insert(row.id);
                    failures.push((row.id, e.to_string()));
                    messages.push(None);
                }
            }
        }

        // One publish call per topic, in id order within it; topics in order
        // of their first row.
        let mut topics: Vec<(&str, Vec<usize>)> = Vec::new();
        for (i, row) in rows.iter().enumerate() {
            match topics.iter_mut().find(|(t, _)| *t == row.topic) {
                Some((_, idx)) => idx.push(i),
                None => topics.push((&row.topic, vec![i])),
            }
        }

        for (topic, indices) in topics {
            let send: Vec<usize> = indices
                .into_iter()
                .filter(|&i| {
                    let row = &rows[i];
                    messages[i].is_some()
                        && failed_from
                            .get(&(row.aggregate_type.as_str(), row.aggregate_id.as_str()))
                            .is_none_or(|&f| row.id < f)
                })
                .collect();
            if send.is_empty() {
                continue;
            }
            let batch: Vec<Message> = send.iter().filter_map(|&i| messages[i].clone()).collect();
            let result = tokio::time::timeout(
                self.config.publish_timeout,
                self.publisher.publish(topic, &batch),
            )
            .await;
            let error = match result {
                Ok(Ok(())) => continue,
                Ok(Err(source)) => OutboxError::Publish {
                    topic: topic.to_owned(),
                    source,
                },
                Err(_) => OutboxError::PublishTimeout {
                    topic: topic.to_owned(),
                    after: self.config.publish_timeout,
                },
            };
            warn!(relay = %self.config.name, %topic, messages = batch.len(), error = %error,
                  source = ?std::error::Error::source(&error), "outbox publish failed; will retry");
            let reason = match std::error::Error::source(&error) {
                Some(source) => format!("{error}: {source}"),
                None => error.to_string(),
            };
            for i in send {
                let row = &rows[i];
                let first = failed_from
                    .entry((&row.aggregate_type, &row.aggregate_id))
                    .or_insert(row.id);
                *first = (*first).min(row.id);
                failures.push((row.id, reason.clone()));
            }
        }

        let published = rows
            .iter()
            .zip(&messages)
            .filter(|(row, m)| {
                m.is_some()
                    && failed_from
                        .get(&(row.aggregate_type.as_str(), row.aggregate_id.as_str()))
                        .is_none_or(|&f| row.id < f)
            })
            .map(|(row, _)| row.id)
            .collect();
        // Only each aggregate's first failure carries the retry schedule.
        let heads: Vec<i64> = failed_from.values().copied().collect();
        failures.retain(|(id, _)| heads.contains(id));
        Outcome {
            published,
            failures,
        }
    }
}

pub(crate) struct Outcome {
    pub(crate) published: Vec<i64>,
    pub(crate) failures: Vec<(i64, String)>,
}
