//! Stream reads.

use async_trait::async_trait;
use futures::TryStreamExt;
use futures::stream::BoxStream;
use keel_core::{StreamId, Version};
use sqlx::PgExecutor;

use super::{EventRow, PostgresEventStore, to_u64};
use crate::error::Result;
use crate::event::{ReadDirection, ReadStream};
use crate::store::{EventStream, StreamReader};

/// One batch of `stream` in `direction`: at most `take` events from version
/// `from` on (forward) or down (backward). Rows stream in as they are
/// consumed.
pub(super) fn stream_batch<'e>(
    executor: impl PgExecutor<'e> + 'e,
    stream: &'e StreamId,
    direction: ReadDirection,
    from: i64,
    take: i64,
) -> BoxStream<'e, sqlx::Result<EventRow>> {
    match direction {
        ReadDirection::Forward => sqlx::query_as!(
            EventRow,
            r#"SELECT commit, position, event_id, version, event_type, schema_version,
                      payload::text AS "payload!", metadata::text AS "metadata!", recorded_at
               FROM keel.events WHERE stream_id = $1 AND version >= $2
               ORDER BY version LIMIT $3"#,
            stream.as_str(),
            from,
            take,
        )
        .fetch(executor),
        ReadDirection::Backward => sqlx::query_as!(
            EventRow,
            r#"SELECT commit, position, event_id, version, event_type, schema_version,
                      payload::text AS "payload!", metadata::text AS "metadata!", recorded_at
               FROM keel.events WHERE stream_id = $1 AND version <= $2
               ORDER BY version DESC LIMIT $3"#,
            stream.as_str(),
            from,
            take,
        )
        .fetch(executor),
    }
}

/// The version of `stream`: its newest stored event's, 0 when it has none.
pub(super) async fn stream_version_on<'e>(
    executor: impl PgExecutor<'e>,
    stream: &StreamId,
) -> Result<Version> {
    let v = sqlx::query_scalar!(
        "SELECT max(version) FROM keel.events WHERE stream_id = $1",
        stream.as_str()
    )
    .fetch_one(executor)
    .await?;
    Ok(Version::new(to_u64(v.unwrap_or(0), "version")?))
}

#[async_trait]
impl StreamReader for PostgresEventStore {
    fn read_stream<'a>(&'a self, stream: &'a StreamId, options: ReadStream) -> EventStream<'a> {
        let batch = i64::from(options.page(&self.config));
        Box::pin(async_stream::try_stream! {
            let (mut from, mut remaining) = options.bounds();
            while remaining > 0 {
                let take = remaining.min(batch);
                // Rows stream in as they are consumed: memory stays bounded
                // by the socket buffer, not by the batch size.
                let mut rows = stream_batch(&self.pool, stream, options.direction(), from, take);
                let mut n = 0i64;
                while let Some(row) = rows.try_next().await? {
                    n += 1;
                    let e = row.into_event(stream.clone())?;
                    let v = e.version.get() as i64;
                    from = match options.direction() {
                        ReadDirection::Forward => v + 1,
                        ReadDirection::Backward => v - 1,
                    };
                    yield e;
                }
                remaining -= n;
                if n < take { break; }
            }
        })
    }

    async fn stream_version(&self, stream: &StreamId) -> Result<Version> {
        stream_version_on(&self.pool, stream).await
    }
}
