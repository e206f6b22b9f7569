//! The streaming-pull loop behind a Pub/Sub [`Subscription`](crate::Subscription).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use google_cloud_pubsub::client::{Publisher, Subscriber};
use google_cloud_pubsub::model::Message as PsMessage;
use google_cloud_pubsub::subscriber::handler::Handler;
use google_cloud_pubsub::subscriber::{MessageStream, ShutdownBehavior};
use keel_core::EventHandler;
use keel_telemetry::KeelMetrics;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::{from_pubsub, publish_to};
use crate::bus::StopSignal;
use crate::config::SubscriptionConfig;
use crate::dispatch::{Outcome, Recorder, invoke};

const MIN_RECONNECT: Duration = Duration::from_millis(100);
const MAX_RECONNECT: Duration = Duration::from_secs(10);
const DEAD_LETTER_PUBLISH_TIMEOUT: Duration = Duration::from_secs(30);

/// Everything a subscription's loop and its handler tasks share.
pub(super) struct Context {
    pub(super) subscriber: Subscriber,
    pub(super) subscription_path: String,
    pub(super) subscription_name: String,
    pub(super) dead_letter_topic: String,
    pub(super) dead_letter_publisher: Publisher,
    pub(super) config: SubscriptionConfig,
    pub(super) handler: Arc<dyn EventHandler>,
    pub(super) metrics: KeelMetrics,
}

impl Context {
    fn open(&self) -> MessageStream {
        let outstanding = i64::try_from(self.config.max_outstanding_messages()).unwrap_or(i64::MAX);
        self.subscriber
            .subscribe(self.subscription_path.clone())
            .set_max_outstanding_messages(outstanding)
            .set_max_lease_extension(self.config.ack_deadline())
            .set_max_lease(self.config.max_lease())
            .set_shutdown_behavior(ShutdownBehavior::WaitForProcessing)
            .build()
    }
}

/// How one message ended, for the ordering bookkeeping.
struct Done {
    key: Option<String>,
    message_id: String,
    /// Acked (handled or dead-lettered); `false` means nacked.
    settled: bool,
}

/// Per-key ordering state: one handler at a time per key; after a nack,
/// later messages of the key are nacked until the failed one comes back, so
/// nothing overtakes it.
#[derive(Default)]
struct Keys {
    busy: HashSet<String>,
    queued: HashMap<String, VecDeque<(PsMessage, Handler)>>,
    awaiting: HashMap<String, (String, Instant)>,
}

pub(super) async fn run(ctx: Arc<Context>, mut stop: StopSignal) {
    let mut running: JoinSet<Done> = JoinSet::new();
    let mut keys = Keys::default();
    let mut stream = Some(ctx.open());
    let mut reconnect_at = Instant::now();
    let mut reconnect_delay = MIN_RECONNECT;
    let limit = ctx.config.max_concurrent_handlers();
    // A redelivery that never comes (the message was dead-lettered by the
    // broker meanwhile) must not block its key forever.
    let await_limit = ctx.config.ack_deadline() * 2;

    loop {
        if stop.is_stopped() {
            break;
        }
        let can_take = running.len() < limit;
        tokio::select! {
            biased;
            () = stop.stopped() => break,
            Some(done) = running.join_next(), if !running.is_empty() => {
                if let Ok(done) = done {
                    finish(&ctx, &mut running, &mut keys, done);
                }
            }
            item = next(&mut stream), if can_take && stream.is_some() => match item {
                Some(Ok((m, h))) => {
                    reconnect_delay = MIN_RECONNECT;
                    dispatch(&ctx, &mut running, &mut keys, m, h, await_limit);
                }
                Some(Err(e)) => {
                    tracing::warn!(
                        subscription = %ctx.subscription_name,
                        error = %e,
                        retry_in = ?reconnect_delay,
                        "streaming pull failed; reconnecting"
                    );
                    retire(stream.take());
                    reconnect_at = Instant::now() + reconnect_delay;
                    reconnect_delay = (reconnect_delay * 2).min(MAX_RECONNECT);
                }
                None => {
                    tracing::info!(subscription = %ctx.subscription_name, "streaming pull ended; reconnecting");
                    retire(stream.take());
                    reconnect_at = Instant::now() + reconnect_delay;
                }
            },
            () = tokio::time::sleep_until(reconnect_at), if stream.is_none() => {
                stream = Some(ctx.open());
            }
        }
    }

    if stop.is_aborted() {
        // Like a crash: cancel the handlers and wait until each has ended,
        // acking nothing more; the stream is dropped with the task, and
        // Pub/Sub redelivers what was unfinished.
        running.shutdown().await;
        return;
    }
    // Graceful stop. First close the stream, so nothing released below is
    // redelivered into it; lease management keeps running for the handlers.
    let lease_shutdown = match stream.take() {
        Some(mut s) => {
            let token = s.shutdown_token();
            let mut fut = Box::pin(async move { token.shutdown().await });
            // The first poll signals the shutdown; `next` then sees it and
            // closes the gRPC stream.
            let _ = futures::poll!(fut.as_mut());
            let _ = s.next().await;
            Some(fut)
        }
        None => None,
    };
    // Messages waiting behind a busy key are released at once (dropping a
    // handler nacks it); running handlers get the grace period.
    keys.queued.clear();
    let drain = async { while running.join_next().await.is_some() {} };
    if tokio::time::timeout(ctx.config.shutdown_timeout(), drain)
        .await
        .is_err()
    {
        tracing::warn!(subscription = %ctx.subscription_name, "shutdown timeout: releasing unfinished messages");
        running.shutdown().await;
    }
    if let Some(fut) = lease_shutdown {
        // Flushes pending acks and nacks before returning.
        if tokio::time::timeout(Duration::from_secs(30), fut)
            .await
            .is_err()
        {
            tracing::warn!(subscription = %ctx.subscription_name, "stream shutdown timed out");
        }
    }
}

async fn next(
    stream: &mut Option<MessageStream>,
) -> Option<google_cloud_pubsub::Result<(PsMessage, Handler)>> {
    match stream {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

/// Lets a failed stream finish its acks in the background.
fn retire(stream: Option<MessageStream>) {
    if let Some(stream) = stream {
        tokio::spawn(async move {
            let token = stream.shutdown_token();
            let _ = tokio::time::timeout(Duration::from_secs(60), token.shutdown()).await;
            drop(stream);
        });
    }
}

fn dispatch(
    ctx: &Arc<Context>,
    running: &mut JoinSet<Done>,
    keys: &mut Keys,
    m: PsMessage,
    h: Handler,
    await_limit: Duration,
) {
    let key = (ctx.config.ordered() && !m.ordering_key.is_empty()).then(|| m.ordering_key.clone());
    let Some(key) = key else {
        running.spawn(process(ctx.clone(), m, h, None));
        return;
    };
    if let Some((failed_id, since)) = keys.awaiting.get(&key) {
        if *failed_id == m.message_id || since.elapsed() > await_limit {
            keys.awaiting.remove(&key);
        } else {
            // Would overtake the failed message: release it (nack on drop).
            drop(h);
            return;
        }
    }
    if keys.busy.contains(&key) {
        keys.queued.entry(key).or_default().push_back((m, h));
    } else {
        keys.busy.insert(key.clone());
        running.spawn(process(ctx.clone(), m, h, Some(key)));
    }
}

fn finish(ctx: &Arc<Context>, running: &mut JoinSet<Done>, keys: &mut Keys, done: Done) {
    let Some(key) = done.key else { return };
    if done.settled {
        let next = keys.queued.get_mut(&key).and_then(VecDeque::pop_front);
        match next {
            Some((m, h)) => {
                running.spawn(process(ctx.clone(), m, h, Some(key)));
            }
            None => {
                keys.queued.remove(&key);
                keys.busy.remove(&key);
            }
        }
    } else {
        // Everything behind the nacked message goes back too, so it is
        // redelivered after it, in order.
        keys.queued.remove(&key);
        keys.busy.remove(&key);
        keys.awaiting.insert(key, (done.message_id, Instant::now()));
    }
}

async fn process(ctx: Arc<Context>, m: PsMessage, h: Handler, key: Option<String>) -> Done {
    let raw = from_pubsub(&m);
    let mut attempt = h
        .delivery_attempt()
        .and_then(|a| u32::try_from(a).ok())
        .filter(|a| *a > 0)
        .unwrap_or(1);
    let recorder = Recorder {
        metrics: &ctx.metrics,
        max_attempts: ctx.config.max_delivery_attempts(),
    };
    let outcome = loop {
        let outcome = invoke(
            &*ctx.handler,
            &raw,
            attempt,
            &ctx.subscription_name,
            ctx.config.handler_timeout(),
            &recorder,
        )
        .await
        .with_limit(attempt, ctx.config.max_delivery_attempts());
        match outcome {
            // An ordered message is retried here, keeping its lease: a nack
            // would also send back every later message of its key, costing
            // them delivery attempts, and brokers (the emulator among them)
            // do not always redeliver those in order.
            Outcome::Retry(_) if key.is_some() => {
                tokio::time::sleep(ctx.config.backoff_after(attempt)).await;
                attempt += 1;
            }
            other => break other,
        }
    };
    let settled = match outcome {
        Outcome::Ack => {
            h.ack();
            true
        }
        Outcome::Retry(_) => {
            h.nack();
            false
        }
        Outcome::DeadLetter(why, reason) => {
            let copy = raw.dead_letter_copy(&reason, attempt, &ctx.subscription_name);
            let publish = publish_to(
                &ctx.dead_letter_publisher,
                &ctx.dead_letter_topic,
                vec![copy],
            );
            // A publish that never completes must not hold the message (and
            // its ordering key) forever: give up and let it be redelivered.
            let result = match tokio::time::timeout(DEAD_LETTER_PUBLISH_TIMEOUT, publish).await {
                Ok(r) => r,
                Err(_) => Err(crate::error::EventBusError::Publish {
                    topic: ctx.dead_letter_topic.clone(),
                    message: format!("no answer within {DEAD_LETTER_PUBLISH_TIMEOUT:?}"),
                    source: None,
                }),
            };
            match result {
                Ok(()) => {
                    h.ack();
                    // Counted once it is there: a failed publish above sends
                    // the message round again, to be dead-lettered anew.
                    recorder.dead_lettered(&ctx.subscription_name, why);
                    true
                }
                Err(e) => {
                    tracing::error!(
                        subscription = %ctx.subscription_name,
                        error = %e,
                        "cannot publish to the dead-letter topic; the message will be redelivered"
                    );
                    h.nack();
                    false
                }
            }
        }
    };
    Done {
        key,
        message_id: m.message_id,
        settled,
    }
}
