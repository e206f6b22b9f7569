//! Looking at dead letters without consuming them.
//!
//! Pub/Sub has no "peek". A [`Reader`] keeps one streaming pull open on a
//! dead-letter subscription and holds every dead letter it receives (the
//! client extends their leases), so listing is a snapshot and replaying is
//! publish-then-ack of the chosen ones. Holding, rather than pulling and
//! nacking for each listing, matters: a nacked message is redelivered at
//! once, and one that lands in a stream being closed stays leased to it.
//!
//! A reader starts on the first listing or replay of a subscription and
//! releases everything it holds once unused for [`IDLE_RELEASE`] (or when
//! the bus is closed or dropped); while it runs, no other subscriber of that
//! dead-letter subscription receives its messages.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use google_cloud_pubsub::client::Subscriber;
use google_cloud_pubsub::model::Message as PsMessage;
use google_cloud_pubsub::subscriber::handler::Handler;
use google_cloud_pubsub::subscriber::{MessageStream, ShutdownBehavior};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

/// The most dead letters one reader holds; more stay on the broker until
/// some are replayed.
pub(super) const MAX_HELD: i64 = 10_000;

/// How often a reader with nothing to show reopens its stream.
const REFRESH: Duration = Duration::from_secs(3);

/// A reader unused for this long releases its dead letters and stops.
pub(super) const IDLE_RELEASE: Duration = Duration::from_secs(120);

pub(super) struct Held {
    pub(super) message: PsMessage,
    pub(super) handler: Handler,
}

#[derive(Default)]
struct State {
    /// By broker message id: a redelivery (after a lease ran out) replaces
    /// the earlier copy instead of duplicating it.
    held: HashMap<String, Held>,
    last_arrival: Option<Instant>,
    last_error: Option<String>,
    last_used: Option<Instant>,
}

pub(super) struct Reader {
    state: Mutex<State>,
    arrived: Notify,
    started: Instant,
    alive: AtomicBool,
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Reader {
    /// Starts reading `path`; the task ends when `stop`'s sender is dropped.
    pub(super) fn start(
        subscriber: Subscriber,
        path: String,
        mut stop: watch::Receiver<()>,
    ) -> Arc<Self> {
        let reader = Arc::new(Self {
            state: Mutex::default(),
            arrived: Notify::new(),
            started: Instant::now(),
            alive: AtomicBool::new(true),
        });
        let weak = Arc::downgrade(&reader);
        tokio::spawn(async move {
            read(&subscriber, &path, &mut stop, &weak).await;
            if let Some(reader) = weak.upgrade() {
                reader.alive.store(false, Ordering::SeqCst);
                // Whatever a broken stream left held is released too.
                lock(&reader.state).held.clear();
            }
        });
        reader
    }

    /// Whether the reader still holds and receives dead letters.
    pub(super) fn is_alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }

    fn holds_nothing(&self) -> bool {
        lock(&self.state).held.is_empty()
    }

    fn idle_for(&self) -> Duration {
        let used = lock(&self.state).last_used.unwrap_or(self.started);
        used.elapsed()
    }

    /// Waits until the reader has been quiet long enough to have received
    /// what the broker had: `first` after it started, then `idle` after the
    /// last arrival.
    pub(super) async fn settle(&self, first: Duration, idle: Duration) {
        lock(&self.state).last_used = Some(Instant::now());
        loop {
            let notified = self.arrived.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let quiet_from = match lock(&self.state).last_arrival {
                Some(t) => t + idle,
                None => self.started + first,
            };
            if Instant::now() >= quiet_from {
                return;
            }
            tokio::select! {
                () = tokio::time::sleep_until(quiet_from) => {}
                () = &mut notified => {}
            }
        }
    }

    /// Copies of the held dead letters, oldest first.
    pub(super) fn snapshot(&self) -> Vec<PsMessage> {
        let state = lock(&self.state);
        let mut messages: Vec<PsMessage> = state.held.values().map(|h| h.message.clone()).collect();
        messages.sort_by(|a, b| {
            let key = |m: &PsMessage| m.publish_time.map(|t| (t.seconds(), t.nanos()));
            key(a)
                .cmp(&key(b))
                .then_with(|| a.message_id.cmp(&b.message_id))
        });
        messages
    }

    /// Takes the held dead letters `choose` selects.
    pub(super) fn take(&self, mut choose: impl FnMut(&PsMessage) -> bool) -> Vec<Held> {
        let mut state = lock(&self.state);
        let ids: Vec<String> = state
            .held
            .iter()
            .filter(|(_, h)| choose(&h.message))
            .map(|(id, _)| id.clone())
            .collect();
        ids.iter().filter_map(|id| state.held.remove(id)).collect()
    }

    /// Holds a dead letter again (its replay failed).
    pub(super) fn put_back(&self, held: Held) {
        lock(&self.state)
            .held
            .insert(held.message.message_id.clone(), held);
    }

    /// The last stream error, if nothing was received since.
    pub(super) fn last_error(&self) -> Option<String> {
        let state = lock(&self.state);
        if state.held.is_empty() {
            state.last_error.clone()
        } else {
            None
        }
    }
}

/// Reads until stopped, unused for [`IDLE_RELEASE`], or the reader is gone.
async fn read(
    subscriber: &Subscriber,
    path: &str,
    stop: &mut watch::Receiver<()>,
    weak: &std::sync::Weak<Reader>,
) {
    let mut delay = Duration::from_millis(100);
    loop {
        let mut stream = subscriber
            .subscribe(path.to_owned())
            .set_max_outstanding_messages(MAX_HELD)
            .set_max_lease(Duration::from_secs(7 * 24 * 3600))
            // Short leases: whatever a broken stream strands comes back soon.
            .set_max_lease_extension(Duration::from_secs(10))
            // Held dead letters stay leased (and their handlers usable)
            // until `close` releases them once the stream is gone.
            .set_shutdown_behavior(ShutdownBehavior::WaitForProcessing)
            .build();
        loop {
            let item = tokio::select! {
                _ = stop.changed() => return close(stream, weak.upgrade().as_deref()).await,
                () = tokio::time::sleep(REFRESH) => {
                    let Some(reader) = weak.upgrade() else { return close(stream, None).await };
                    if reader.idle_for() > IDLE_RELEASE {
                        return close(stream, Some(&reader)).await;
                    }
                    if reader.holds_nothing() {
                        // Nothing is leased, so nothing can be stranded:
                        // start a fresh stream. The emulator does not
                        // always deliver to a stream that opened idle.
                        close(stream, None).await;
                        break;
                    }
                    continue;
                }
                item = stream.next() => item,
            };
            let Some(reader) = weak.upgrade() else { return };
            match item {
                Some(Ok((message, handler))) => {
                    delay = Duration::from_millis(100);
                    let mut state = lock(&reader.state);
                    state.last_arrival = Some(Instant::now());
                    state
                        .held
                        .insert(message.message_id.clone(), Held { message, handler });
                    drop(state);
                    reader.arrived.notify_waiters();
                }
                Some(Err(e)) => {
                    tracing::warn!(subscription = %path, error = %e, "dead-letter stream failed; reconnecting");
                    lock(&reader.state).last_error = Some(e.to_string());
                    break;
                }
                None => break,
            }
        }
        tokio::select! {
            _ = stop.changed() => return,
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}

/// Closes the gRPC stream, then releases (nacks) every dead letter `reader`
/// holds and waits until lease management has sent the nacks, so a bus
/// closing returns with its dead letters back on the broker.
///
/// The order matters: released while the stream is still open, a message
/// is redelivered at once into that same stream, where nobody takes it any
/// more, and stays leased to it.
async fn close(mut stream: MessageStream, reader: Option<&Reader>) {
    let token = stream.shutdown_token();
    let mut shutdown = Box::pin(async move { token.shutdown().await });
    // The first poll signals the shutdown; `next` then sees it and drops
    // the gRPC stream.
    let _ = futures::poll!(shutdown.as_mut());
    let _ = stream.next().await;
    drop(stream);
    if let Some(reader) = reader {
        // Dropping a handler nacks its message. Lease management ends once
        // every handler of the stream is gone, after sending the nacks.
        drop(std::mem::take(&mut lock(&reader.state).held));
    }
    if tokio::time::timeout(Duration::from_secs(30), shutdown)
        .await
        .is_err()
    {
        tracing::warn!(
            "dead-letter stream shutdown timed out; its messages come back when their leases run out"
        );
    }
}
