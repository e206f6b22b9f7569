//! Carrying over Keel's history from `_sqlx_migrations`, where Keel versions
//! before 0.2 recorded it next to the service's own migrations.

use std::time::Duration;

use sqlx::{Connection, PgConnection, Row};

use super::error::MigrateError;
use super::run::Planned;

/// Every migration Keel ever recorded in `_sqlx_migrations`: component,
/// version and SHA-384 checksum (what `sqlx::migrate!` computes). Rows with
/// exactly these values are Keel's and are moved to `keel.schema_history`,
/// even when the service no longer links the crate that owns them, so the
/// service's own migrator never meets a version it does not know.
const LEGACY: [(&str, i64, &str); 6] = [
    (
        "keel-database",
        20_261_123_000_000,
        "3f35bd04384636c111236ce109baa7249174026a89f06ed0fd6dfa3287e3e03ddd00696856186c3c4c2a23dda1ed474d",
    ),
    (
        "keel-eventstore",
        20_261_123_010_000,
        "faef35eae63325ed3aea118db6884c571cecef7bec45d67e150a65ca808807e5843468a3fccd0af0b3ca9d4b66539774",
    ),
    (
        "keel-outbox",
        20_261_123_020_000,
        "cd1c117f6f01d1e55527710c703e8db05edf6c218cbcd8b17a035bf1c1fa20591216d852113853e285688d41498d3cdd",
    ),
    (
        "keel-security",
        20_261_123_040_000,
        "5077ede875bcc65d8c377c254343aa11846274715abab0a575f41ccd1269636cf1afd919c136322d545a8b352dd7607b",
    ),
    (
        "keel-eventstore",
        20_261_123_070_000,
        "59485bba6d569179163ca7a411a27bee218494293582bec436e2a0774faac413a5905a14e3ad684e948e1c3bc09a9e5e",
    ),
    (
        "keel-security",
        20_261_123_190_000,
        "df221a9cdc063a108ea7e0e0bfeea6d407b80e74b0f0293d2e252c619a3d3dcfd27b4d7d76abd9c9a7be4d7a7d56cb92",
    ),
];

/// The legacy table as `(component, version, checksum)`, for tests that
/// check it against the migration files.
pub(crate) fn legacy() -> impl Iterator<Item = (&'static str, i64, Vec<u8>)> {
    LEGACY
        .iter()
        .map(|(component, version, hex)| (*component, *version, from_hex(hex)))
}

fn from_hex(hex: &str) -> Vec<u8> {
    hex.as_bytes()
        .chunks(2)
        .map(|pair| {
            let digit = |c: u8| match c {
                b'0'..=b'9' => c - b'0',
                _ => c - b'a' + 10,
            };
            digit(pair[0]) * 16 + digit(pair[1])
        })
        .collect()
}

/// Moves Keel's rows (same version and checksum as one of Keel's migrations,
/// applied successfully) from `_sqlx_migrations` into `keel.schema_history`,
/// in one transaction, holding sqlx's own migration lock so a service's
/// migrator running at the same moment sees either all of them or none.
/// The service's own rows are never touched. Returns how many moved.
pub(crate) async fn adopt(
    conn: &mut PgConnection,
    plan: &[Planned<'_>],
) -> Result<u64, MigrateError> {
    let history = |what| move |source| MigrateError::History { what, source };
    // sqlx creates its table unqualified, so it lives wherever the
    // connection's search path puts new tables: look it up the same way.
    let exists: bool = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
        .fetch_one(&mut *conn)
        .await
        .map_err(history("looking for _sqlx_migrations"))?;
    if !exists {
        return Ok(0);
    }
    let mut known: Vec<(&str, i64, Vec<u8>)> = legacy().collect();
    for p in plan {
        known.push((
            p.component,
            p.migration.version,
            p.migration.checksum.to_vec(),
        ));
    }
    let versions: Vec<i64> = known.iter().map(|k| k.1).collect();

    let select =
        "SELECT version, checksum FROM _sqlx_migrations WHERE success AND version = ANY($1)";
    let candidates = sqlx::query(select)
        .bind(&versions)
        .fetch_all(&mut *conn)
        .await
        .map_err(history("reading _sqlx_migrations"))?;
    if candidates.is_empty() {
        return Ok(0);
    }
    let database: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&mut *conn)
        .await
        .map_err(history("reading the database name"))?;

    let mut tx = conn
        .begin()
        .await
        .map_err(history("starting the carry-over"))?;
    // Polled, for the reason `run::lock` gives.
    let mut pause = Duration::from_millis(20);
    loop {
        let taken: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
            .bind(sqlx_lock_id(&database))
            .fetch_one(&mut *tx)
            .await
            .map_err(history("taking sqlx's migration lock"))?;
        if taken {
            break;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(500));
    }
    let rows = sqlx::query(select)
        .bind(&versions)
        .fetch_all(&mut *tx)
        .await
        .map_err(history("reading _sqlx_migrations"))?;

    let mut moved = 0;
    for row in rows {
        let version: i64 = row.get(0);
        let checksum: Vec<u8> = row.get(1);
        let Some((component, ..)) = known
            .iter()
            .find(|(_, v, c)| *v == version && *c == checksum)
        else {
            continue; // a service migration that happens to share a version
        };
        let done = sqlx::query(
            "WITH old AS (
                 DELETE FROM _sqlx_migrations
                 WHERE version = $1 AND checksum = $2 AND success
                 RETURNING version, description, checksum, installed_on, execution_time
             )
             INSERT INTO keel.schema_history
                 (component, version, description, checksum, installed_on, execution_ms)
             SELECT $3, version, description, checksum, installed_on, execution_time / 1000000
             FROM old
             ON CONFLICT (component, version) DO NOTHING",
        )
        .bind(version)
        .bind(&checksum)
        .bind(*component)
        .execute(&mut *tx)
        .await
        .map_err(history("moving a row from _sqlx_migrations"))?;
        moved += done.rows_affected();
    }
    tx.commit()
        .await
        .map_err(history("committing the carry-over"))?;
    Ok(moved)
}

/// The advisory lock key sqlx's PostgreSQL migrator takes for a database:
/// `0x3d32ad9e` times the CRC-32 (IEEE) of the database name.
fn sqlx_lock_id(database: &str) -> i64 {
    let mut crc = 0xFFFF_FFFF_u32;
    for byte in database.bytes() {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    0x3d32_ad9e * i64::from(!crc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_matches_the_ieee_check_value() {
        // The CRC-32/ISO-HDLC check value of "123456789" is 0xCBF43926.
        assert_eq!(sqlx_lock_id("123456789"), 0x3d32_ad9e * 0xCBF4_3926_i64);
    }

    #[test]
    fn legacy_checksums_are_sha384_sized() {
        for (_, _, checksum) in legacy() {
            assert_eq!(checksum.len(), 48);
        }
    }
}
