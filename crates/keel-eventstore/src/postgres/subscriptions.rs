//! Subscription support: checkpoints, leadership, and the wake-up
//! notifier for appends.

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use keel_core::Position;
use sqlx::postgres::PgListener;
use sqlx::{Connection, PgConnection, PgPool};

use super::{NOTIFY_CHANNEL, PostgresEventStore, clamp, to_u64};
use crate::error::{EventStoreError, Result};
use crate::store::{EventSignal, Leadership, SubscriptionSupport};

/// Sends the wake-up `NOTIFY` for appends made by this store, outside the
/// writers' transactions.
///
/// `NOTIFY` takes a cluster-wide lock at commit that is held through the
/// commit's WAL flush, so notifying inside every append serialises all
/// committers. Instead a background task notifies after the appends have
/// committed, coalescing bursts into one notification (at most one per
/// [`NOTIFY_SPACING`]).
#[derive(Debug, Default)]
pub(super) struct Notifier {
    wake: tokio::sync::Notify,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

async fn notify_loop(pool: PgPool, notifier: Weak<Notifier>) {
    loop {
        let Some(n) = notifier.upgrade() else { return };
        // A bounded wait so the task ends soon after the store is dropped.
        let woke = tokio::time::timeout(Duration::from_secs(2), n.wake.notified())
            .await
            .is_ok();
        drop(n);
        if woke
            // The notification needs no durability of its own (a lost one
            // costs a subscription one polling interval), so its transaction
            // commits asynchronously: it never waits for a WAL flush and
            // never queues behind the writers' commits.
            && let Err(error) = sqlx::query!(
                "SELECT set_config('synchronous_commit', 'off', true), pg_notify($1, '')",
                NOTIFY_CHANNEL
            )
            .fetch_one(&pool)
            .await
        {
            // Subscriptions fall back to polling; nothing is lost.
            tracing::debug!(%error, "could not send the append notification");
        }
        if woke {
            // Appends committed meanwhile leave one pending wake-up, answered
            // by one notification after the pause: under a steady stream of
            // appends the store sends at most one per pause, not one each.
            tokio::time::sleep(NOTIFY_SPACING).await;
        }
    }
}

/// The shortest time between two append notifications from one store. It
/// bounds the extra delay a subscription sees and the server work
/// notifications cost under heavy writing.
const NOTIFY_SPACING: Duration = Duration::from_millis(5);

impl PostgresEventStore {
    /// Wakes subscriptions after appends committed by this store.
    pub(super) fn committed(&self) {
        if !self.config.notify_on_append {
            return;
        }
        {
            let mut task = self
                .notifier
                .task
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if task
                .as_ref()
                .is_none_or(tokio::task::JoinHandle::is_finished)
            {
                *task = Some(tokio::spawn(notify_loop(
                    self.pool.clone(),
                    Arc::downgrade(&self.notifier),
                )));
            }
        }
        self.notifier.wake.notify_one();
    }
}

/// Leadership held as a session advisory lock on a dedicated connection: it
/// ends when the connection does, whichever process or network fault ends it.
#[derive(Debug)]
struct AdvisoryLeadership {
    conn: Option<PgConnection>,
}

#[async_trait]
impl Leadership for AdvisoryLeadership {
    async fn is_held(&mut self) -> bool {
        let Some(conn) = &mut self.conn else {
            return false;
        };
        match conn.ping().await {
            Ok(()) => true,
            Err(_) => {
                self.conn = None;
                false
            }
        }
    }
}

#[derive(Debug)]
struct ListenSignal {
    listener: Option<PgListener>,
}

#[async_trait]
impl EventSignal for ListenSignal {
    async fn wait(&mut self, timeout: Duration) {
        let Some(listener) = &mut self.listener else {
            tokio::time::sleep(timeout).await;
            return;
        };
        match tokio::time::timeout(timeout, listener.try_recv()).await {
            Ok(Ok(Some(_))) => {
                // Many appends may have notified; one wake-up covers them all.
                while listener.next_buffered().is_some() {}
            }
            // The connection dropped: PgListener reconnects on the next call;
            // until then this wait degrades to polling.
            Ok(Ok(None) | Err(_)) => tokio::time::sleep(timeout / 4).await,
            Err(_) => {}
        }
    }
}

#[async_trait]
impl SubscriptionSupport for PostgresEventStore {
    async fn load_checkpoint(&self, name: &str) -> Result<Option<Position>> {
        let row = sqlx::query!(
            "SELECT commit, sequence FROM keel.subscription_checkpoints WHERE name = $1",
            name
        )
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            Ok(Position::new(
                to_u64(r.commit, "commit")?,
                to_u64(r.sequence, "sequence")?,
            ))
        })
        .transpose()
    }

    async fn save_checkpoint(&self, name: &str, position: Position) -> Result<()> {
        if name.is_empty() {
            return Err(EventStoreError::invalid(
                "subscription",
                "the name must not be empty",
            ));
        }
        sqlx::query!(
            "INSERT INTO keel.subscription_checkpoints (name, commit, sequence) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO UPDATE \
                SET commit = EXCLUDED.commit, sequence = EXCLUDED.sequence, updated_at = now() \
              WHERE (keel.subscription_checkpoints.commit, keel.subscription_checkpoints.sequence) \
                    < (EXCLUDED.commit, EXCLUDED.sequence)",
            name,
            clamp(position.commit),
            clamp(position.sequence),
        )
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn load_delivered(&self, name: &str) -> Result<Option<Position>> {
        let row = sqlx::query!(
            "SELECT delivered_commit, delivered_sequence FROM keel.subscription_checkpoints \
             WHERE name = $1",
            name
        )
        .fetch_optional(&self.pool)
        .await?;
        match row.and_then(|r| r.delivered_commit.zip(r.delivered_sequence)) {
            Some((c, s)) => Ok(Some(Position::new(
                to_u64(c, "commit")?,
                to_u64(s, "sequence")?,
            ))),
            None => Ok(None),
        }
    }

    async fn save_delivered(&self, name: &str, position: Position) -> Result<()> {
        if name.is_empty() {
            return Err(EventStoreError::invalid(
                "subscription",
                "the name must not be empty",
            ));
        }
        // A subscription without a checkpoint yet starts at the beginning.
        sqlx::query!(
            "INSERT INTO keel.subscription_checkpoints \
                 (name, commit, sequence, delivered_commit, delivered_sequence) \
             VALUES ($1, 0, 0, $2, $3) \
             ON CONFLICT (name) DO UPDATE \
                SET delivered_commit = EXCLUDED.delivered_commit, \
                    delivered_sequence = EXCLUDED.delivered_sequence \
              WHERE keel.subscription_checkpoints.delivered_commit IS NULL \
                 OR (keel.subscription_checkpoints.delivered_commit, \
                     keel.subscription_checkpoints.delivered_sequence) \
                    < (EXCLUDED.delivered_commit, EXCLUDED.delivered_sequence)",
            name,
            clamp(position.commit),
            clamp(position.sequence),
        )
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn acquire_leadership(&self, name: &str, retry: Duration) -> Result<Box<dyn Leadership>> {
        let options = self.pool.connect_options();
        let mut conn = PgConnection::connect_with(&options).await?;
        loop {
            let won = sqlx::query_scalar!(
                r#"SELECT pg_try_advisory_lock(hashtextextended('keel.subscription:' || $1, 0))
                   AS "won!""#,
                name
            )
            .fetch_one(&mut conn)
            .await?;
            if won {
                return Ok(Box::new(AdvisoryLeadership { conn: Some(conn) }));
            }
            tokio::time::sleep(retry).await;
        }
    }

    async fn event_signal(&self) -> Result<Box<dyn EventSignal>> {
        let listener = if self.config.notify_on_append {
            let mut l = PgListener::connect_with(&self.pool).await?;
            l.listen(NOTIFY_CHANNEL).await?;
            Some(l)
        } else {
            None
        };
        Ok(Box::new(ListenSignal { listener }))
    }
}
