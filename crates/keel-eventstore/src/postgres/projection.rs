//! Projection checkpoints, parked events and active versions
//! (`keel.projections`, `keel.parked_events`, `keel.projection_active`).

use async_trait::async_trait;
use keel_core::uow::Transaction;
use keel_core::{EventId, Position, StreamId, Version};
use keel_database::UnitOfWork;

use super::{PostgresEventStore, clamp, to_u64};
use crate::error::{EventStoreError, Result};
use crate::event::ReadAll;
use crate::projection::{
    LAG_COUNT_LIMIT, Lag, LogLag, ParkedEvent, ProjectionId, ProjectionState, ProjectionSupport,
    moved, not_caught_up, still_active, unknown,
};

fn version_of(id: &ProjectionId) -> i32 {
    // ProjectionId::new keeps versions within i32.
    i32::try_from(id.version()).unwrap_or(i32::MAX)
}

struct StateRow {
    commit: i64,
    sequence: i64,
    caught_up_at: Option<chrono::DateTime<chrono::Utc>>,
}

impl StateRow {
    fn into_state(self, id: &ProjectionId) -> Result<ProjectionState> {
        Ok(ProjectionState {
            id: id.clone(),
            checkpoint: Position::new(
                to_u64(self.commit, "commit")?,
                to_u64(self.sequence, "sequence")?,
            ),
            caught_up_at: self.caught_up_at,
        })
    }
}

struct ParkedRow {
    commit: i64,
    sequence: i64,
    event_id: uuid::Uuid,
    stream_id: String,
    stream_version: i64,
    event_type: String,
    attempts: i32,
    error: String,
    skipped: bool,
    parked_at: chrono::DateTime<chrono::Utc>,
}

impl ParkedRow {
    fn into_parked(self) -> Result<ParkedEvent> {
        Ok(ParkedEvent {
            position: Position::new(
                to_u64(self.commit, "commit")?,
                to_u64(self.sequence, "sequence")?,
            ),
            event_id: EventId::from_uuid(self.event_id),
            stream_id: StreamId::new(self.stream_id)?,
            stream_version: Version::new(to_u64(self.stream_version, "version")?),
            event_type: self.event_type,
            attempts: u32::try_from(self.attempts).unwrap_or(0),
            error: self.error,
            skipped: self.skipped,
            parked_at: self.parked_at,
        })
    }
}

#[async_trait]
impl ProjectionSupport for PostgresEventStore {
    async fn register_projection(&self, id: &ProjectionId) -> Result<ProjectionState> {
        sqlx::query!(
            "INSERT INTO keel.projections (name, version) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            id.name(),
            version_of(id),
        )
        .execute(&self.pool)
        .await?;
        self.projection_state(id).await?.ok_or_else(|| unknown(id))
    }

    async fn projection_state(&self, id: &ProjectionId) -> Result<Option<ProjectionState>> {
        sqlx::query_as!(
            StateRow,
            "SELECT commit, sequence, caught_up_at FROM keel.projections \
             WHERE name = $1 AND version = $2",
            id.name(),
            version_of(id),
        )
        .fetch_optional(&self.pool)
        .await?
        .map(|r| r.into_state(id))
        .transpose()
    }

    async fn advance_projection(
        &self,
        tx: &mut dyn Transaction,
        id: &ProjectionId,
        from: Position,
        to: Position,
    ) -> Result<()> {
        let uow = UnitOfWork::join(tx)?;
        // Compare and set: the row lock makes a second runner wait, and it
        // then finds the checkpoint moved and rolls its writes back.
        let moved_rows = sqlx::query!(
            "UPDATE keel.projections SET commit = $5, sequence = $6, updated_at = now() \
             WHERE name = $1 AND version = $2 AND commit = $3 AND sequence = $4",
            id.name(),
            version_of(id),
            clamp(from.commit),
            clamp(from.sequence),
            clamp(to.commit),
            clamp(to.sequence),
        )
        .execute(uow.conn())
        .await?
        .rows_affected();
        if moved_rows != 1 {
            return Err(moved(id));
        }
        sqlx::query!(
            "DELETE FROM keel.parked_events \
             WHERE name = $1 AND version = $2 AND NOT skipped \
               AND (commit, sequence) > ($3, $4) AND (commit, sequence) <= ($5, $6)",
            id.name(),
            version_of(id),
            clamp(from.commit),
            clamp(from.sequence),
            clamp(to.commit),
            clamp(to.sequence),
        )
        .execute(uow.conn())
        .await?;
        Ok(())
    }

    async fn park_event(
        &self,
        tx: &mut dyn Transaction,
        id: &ProjectionId,
        parked: &ParkedEvent,
    ) -> Result<()> {
        let uow = UnitOfWork::join(tx)?;
        sqlx::query!(
            "INSERT INTO keel.parked_events \
                 (name, version, commit, sequence, event_id, stream_id, stream_version, \
                  event_type, attempts, error, skipped) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) \
             ON CONFLICT (name, version, commit, sequence) DO UPDATE \
                SET attempts = keel.parked_events.attempts + EXCLUDED.attempts, \
                    error = EXCLUDED.error, skipped = EXCLUDED.skipped, parked_at = now()",
            id.name(),
            version_of(id),
            clamp(parked.position.commit),
            clamp(parked.position.sequence),
            parked.event_id.as_uuid(),
            parked.stream_id.as_str(),
            clamp(parked.stream_version.get()),
            parked.event_type,
            i32::try_from(parked.attempts).unwrap_or(i32::MAX),
            parked.error,
            parked.skipped,
        )
        .execute(uow.conn())
        .await?;
        Ok(())
    }

    async fn unpark_event(
        &self,
        tx: &mut dyn Transaction,
        id: &ProjectionId,
        position: Position,
    ) -> Result<Option<ParkedEvent>> {
        let uow = UnitOfWork::join(tx)?;
        // A concurrent replay of the same event holds the row until it
        // ends; this one then deletes nothing and backs off.
        sqlx::query_as!(
            ParkedRow,
            "DELETE FROM keel.parked_events \
             WHERE name = $1 AND version = $2 AND commit = $3 AND sequence = $4 \
             RETURNING commit, sequence, event_id, stream_id, stream_version, event_type, \
                       attempts, error, skipped, parked_at",
            id.name(),
            version_of(id),
            clamp(position.commit),
            clamp(position.sequence),
        )
        .fetch_optional(uow.conn())
        .await?
        .map(ParkedRow::into_parked)
        .transpose()
    }

    async fn parked_events(&self, id: &ProjectionId) -> Result<Vec<ParkedEvent>> {
        sqlx::query_as!(
            ParkedRow,
            "SELECT commit, sequence, event_id, stream_id, stream_version, event_type, \
                    attempts, error, skipped, parked_at \
             FROM keel.parked_events WHERE name = $1 AND version = $2 \
             ORDER BY commit, sequence",
            id.name(),
            version_of(id),
        )
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(ParkedRow::into_parked)
        .collect()
    }

    async fn mark_caught_up(&self, id: &ProjectionId) -> Result<()> {
        sqlx::query!(
            "UPDATE keel.projections SET caught_up_at = coalesce(caught_up_at, now()) \
             WHERE name = $1 AND version = $2",
            id.name(),
            version_of(id),
        )
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn active_projection_version(&self, name: &str) -> Result<Option<u32>> {
        let version = sqlx::query_scalar!(
            "SELECT version FROM keel.projection_active WHERE name = $1",
            name
        )
        .fetch_optional(&self.pool)
        .await?;
        version
            .map(|v| {
                u32::try_from(v)
                    .map_err(|_| EventStoreError::Corrupt(format!("projection version {v}")))
            })
            .transpose()
    }

    async fn activate_projection(&self, id: &ProjectionId, newer_only: bool) -> Result<bool> {
        let state = self
            .projection_state(id)
            .await?
            .ok_or_else(|| unknown(id))?;
        if state.caught_up_at.is_none() {
            return Err(not_caught_up(id));
        }
        // One statement: readers see the old version or the new one.
        let switched = sqlx::query_scalar!(
            r#"INSERT INTO keel.projection_active (name, version) VALUES ($1, $2)
               ON CONFLICT (name) DO UPDATE
                  SET version = EXCLUDED.version, switched_at = now()
                WHERE NOT $3 OR keel.projection_active.version < EXCLUDED.version
               RETURNING version"#,
            id.name(),
            version_of(id),
            newer_only,
        )
        .fetch_optional(&self.pool)
        .await?;
        if switched.is_some() {
            return Ok(true);
        }
        Ok(self.active_projection_version(id.name()).await? == Some(id.version()))
    }

    async fn retire_projection(&self, id: &ProjectionId) -> Result<()> {
        let result = sqlx::query!(
            "DELETE FROM keel.projections WHERE name = $1 AND version = $2",
            id.name(),
            version_of(id),
        )
        .execute(&self.pool)
        .await;
        match result {
            Ok(_) => Ok(()),
            Err(e)
                if keel_database::constraint_of(&e) == Some("projection_active_version_fkey") =>
            {
                Err(still_active(id))
            }
            Err(e) => Err(e.into()),
        }
    }
}

#[async_trait]
impl LogLag for PostgresEventStore {
    async fn lag_after(&self, after: Position, filter: &ReadAll) -> Result<Lag> {
        let row = sqlx::query!(
            r#"SELECT count(*) AS "events!", min(recorded_at) AS oldest FROM (
                   SELECT recorded_at FROM keel.events
                   WHERE (commit, position) > ($1, $2)
                     AND ($3::text IS NULL OR stream_id = $3 OR starts_with(stream_id, $3 || '-'))
                     AND ($4::text IS NULL OR starts_with(stream_id, $4))
                     AND ($5::text[] IS NULL OR event_type = ANY ($5))
                   ORDER BY commit, position LIMIT $6) pending"#,
            clamp(after.commit),
            clamp(after.sequence),
            filter.category.as_deref(),
            filter.stream_prefix.as_deref(),
            filter.event_types.as_deref(),
            clamp(LAG_COUNT_LIMIT),
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(Lag {
            events: to_u64(row.events, "count")?,
            oldest: row.oldest,
        })
    }
}
