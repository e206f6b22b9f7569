//! Stream reads.

use async_trait::async_trait;
use futures::TryStreamExt;
use keel_core::{StreamId, Version};

use super::{COLUMNS, PostgresEventStore, decode_row, to_u64};
use crate::error::Result;
use crate::event::{ReadDirection, ReadStream};
use crate::store::{EventStream, StreamReader};

/// The statement that reads one batch of a stream in `direction`: $1 the
/// stream, $2 the version to start at, $3 the batch size.
pub(super) fn stream_sql(direction: ReadDirection) -> String {
    match direction {
        ReadDirection::Forward => format!(
            "SELECT {COLUMNS} FROM keel.events WHERE stream_id = $1 AND version >= $2 \
             ORDER BY version LIMIT $3"
        ),
        ReadDirection::Backward => format!(
            "SELECT {COLUMNS} FROM keel.events WHERE stream_id = $1 AND version <= $2 \
             ORDER BY version DESC LIMIT $3"
        ),
    }
}

/// The statement that reads a stream's version ($1 the stream).
pub(super) const STREAM_VERSION: &str = "SELECT max(version) FROM keel.events WHERE stream_id = $1";

#[async_trait]
impl StreamReader for PostgresEventStore {
    fn read_stream<'a>(&'a self, stream: &'a StreamId, options: ReadStream) -> EventStream<'a> {
        let batch = i64::from(self.config.read_batch_size);
        let sql = stream_sql(options.direction());
        Box::pin(async_stream::try_stream! {
            let (mut from, mut remaining) = options.bounds();
            while remaining > 0 {
                let take = remaining.min(batch);
                // Rows stream in as they are consumed: memory stays bounded
                // by the socket buffer, not by the batch size.
                let mut rows = sqlx::query(&sql)
                    .bind(stream.as_str())
                    .bind(from)
                    .bind(take)
                    .fetch(&self.pool);
                let mut n = 0i64;
                while let Some(row) = rows.try_next().await? {
                    n += 1;
                    let e = decode_row(&row, Some(stream))?;
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
        let v: Option<i64> = sqlx::query_scalar(STREAM_VERSION)
            .bind(stream.as_str())
            .fetch_one(&self.pool)
            .await?;
        Ok(Version::new(to_u64(v.unwrap_or(0), "version")?))
    }
}
