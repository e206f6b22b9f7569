//! What a template database is built from.

use std::future::Future;
use std::pin::Pin;

use sqlx::PgConnection;
use sqlx::migrate::Migrator;

/// An error from applying a [`Schema`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A future returned by [`Schema::apply`].
pub type ApplyFuture<'a> = Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send + 'a>>;

/// The migrations a [`TestDatabase`](crate::TestDatabase) starts with.
///
/// Implemented for a plain sqlx [`Migrator`], for Keel's migration sets
/// (`keel_database::Migrations`, with keel-database's `testkit` feature),
/// and for arrays and slices of them, applied in order (two plain sqlx
/// migrators do not combine: both keep their history in `_sqlx_migrations`
/// and each would refuse the other's versions):
///
/// ```no_run
/// # static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate::Migrator::DEFAULT;
/// # async fn example() -> keel_testkit::Result<()> {
/// use keel_testkit::TestDatabase;
///
/// // A service's own sqlx migrations:
/// let db = TestDatabase::create(&MIGRATOR).await?;
/// // Keel's sets (keel-database's `testkit` feature), base set included:
/// //   TestDatabase::create(&keel_eventstore::MIGRATIONS)
/// //   TestDatabase::create(&[&keel_eventstore::MIGRATIONS, &keel_outbox::MIGRATIONS])
/// # Ok(()) }
/// ```
pub trait Schema: Sync {
    /// Bytes that change whenever the migrations change; the template
    /// database is named after their hash, so a changed schema gets a new
    /// template.
    fn fingerprint(&self) -> Vec<u8>;

    /// Applies the migrations to a fresh database.
    fn apply<'a>(&'a self, conn: &'a mut PgConnection) -> ApplyFuture<'a>;
}

impl Schema for Migrator {
    fn fingerprint(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for m in self.iter() {
            out.extend_from_slice(&m.version.to_le_bytes());
            out.extend_from_slice(&m.checksum);
        }
        out
    }

    fn apply<'a>(&'a self, conn: &'a mut PgConnection) -> ApplyFuture<'a> {
        Box::pin(async move { self.run_direct(conn).await.map_err(BoxError::from) })
    }
}

impl<S: Schema + ?Sized> Schema for &S {
    fn fingerprint(&self) -> Vec<u8> {
        (**self).fingerprint()
    }

    fn apply<'a>(&'a self, conn: &'a mut PgConnection) -> ApplyFuture<'a> {
        (**self).apply(conn)
    }
}

impl<S: Schema> Schema for [S] {
    fn fingerprint(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for s in self {
            let part = s.fingerprint();
            out.extend_from_slice(&(part.len() as u64).to_le_bytes());
            out.extend_from_slice(&part);
        }
        out
    }

    fn apply<'a>(&'a self, conn: &'a mut PgConnection) -> ApplyFuture<'a> {
        Box::pin(async move {
            for s in self {
                s.apply(&mut *conn).await?;
            }
            Ok(())
        })
    }
}

impl<S: Schema, const N: usize> Schema for [S; N] {
    fn fingerprint(&self) -> Vec<u8> {
        self.as_slice().fingerprint()
    }

    fn apply<'a>(&'a self, conn: &'a mut PgConnection) -> ApplyFuture<'a> {
        self.as_slice().apply(conn)
    }
}
