//! Inbox marks in memory.

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use keel_core::uow::{MemoryCell, MemoryTransaction, Transaction, join};
use keel_core::{EventId, Message};
use tokio::sync::Mutex;

use super::{InboxMarks, InboxStore, check_consumer};

type Marks = HashMap<(String, EventId), Instant>;

/// The [`InboxStore`] kept in memory; marks are written through a
/// [`MemoryTransaction`]. Clones share the marks.
#[derive(Clone)]
pub struct InMemoryInbox {
    cell: Arc<MemoryCell<Marks>>,
}

impl fmt::Debug for InMemoryInbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InMemoryInbox")
            .field("marks", &self.cell.read(HashMap::len))
            .finish()
    }
}

impl Default for InMemoryInbox {
    fn default() -> Self {
        Self::new()
    }
}

impl InMemoryInbox {
    /// An inbox with no marks.
    #[must_use]
    pub fn new() -> Self {
        Self {
            cell: Arc::new(MemoryCell::new(Marks::new())),
        }
    }
}

#[async_trait]
impl InboxStore for InMemoryInbox {
    fn within<'t>(&'t self, tx: &'t mut dyn Transaction) -> Box<dyn InboxMarks + 't> {
        Box::new(MemoryInboxIn {
            inbox: self,
            tx: Mutex::new(tx),
        })
    }

    async fn has_handled(&self, consumer: &str, event_id: EventId) -> keel_core::Result<bool> {
        Ok(self
            .cell
            .read(|marks| marks.contains_key(&(consumer.to_owned(), event_id))))
    }

    async fn prune(&self, consumer: &str, older_than: Duration) -> keel_core::Result<u64> {
        let now = Instant::now();
        let pruned = self.cell.write(|marks| {
            let before = marks.len();
            marks.retain(|(c, _), at| {
                c != consumer || now.saturating_duration_since(*at) <= older_than
            });
            Ok::<_, Infallible>((before - marks.len()) as u64)
        });
        Ok(pruned.unwrap_or_else(|never| match never {}))
    }
}

struct MemoryInboxIn<'t> {
    inbox: &'t InMemoryInbox,
    tx: Mutex<&'t mut dyn Transaction>,
}

#[async_trait]
impl InboxMarks for MemoryInboxIn<'_> {
    async fn record(&self, consumer: &str, message: &Message) -> keel_core::Result<bool> {
        check_consumer(consumer)?;
        let mut tx = self.tx.lock().await;
        let tx = join::<MemoryTransaction>(&mut **tx)?;
        let key = (consumer.to_owned(), message.event_id);
        if self
            .inbox
            .cell
            .read_in(tx, |marks| marks.contains_key(&key))
        {
            return Ok(false);
        }
        // Replayed at commit if other marks were committed meanwhile: a
        // racing transaction that marked the same event first makes this
        // one fail to commit, so its work is discarded.
        let now = Instant::now();
        self.inbox.cell.write_in(tx, move |marks: &mut Marks| {
            if marks.contains_key(&key) {
                return Err(keel_core::Error::AlreadyExists {
                    subject: format!("inbox mark of event {}", key.1),
                });
            }
            marks.insert(key.clone(), now);
            Ok(true)
        })
    }
}
