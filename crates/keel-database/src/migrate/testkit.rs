//! Keel's sets as test-kit schemas: template databases built with Keel's own
//! runner, so they hold `keel.schema_history` as a service's database would.

use keel_testkit::{ApplyFuture, BoxError, Schema};
use sqlx::PgConnection;

use super::Migrations;

impl Schema for Migrations {
    fn fingerprint(&self) -> Vec<u8> {
        // The base set is applied with every set, so it is part of the name.
        let mut out = super::MIGRATIONS.fingerprint();
        out.push(0);
        out.extend(Migrations::fingerprint(self));
        out
    }

    fn apply<'a>(&'a self, conn: &'a mut PgConnection) -> ApplyFuture<'a> {
        Box::pin(async move {
            super::migrate_connection(conn, &[self])
                .await
                .map_err(BoxError::from)
        })
    }
}
