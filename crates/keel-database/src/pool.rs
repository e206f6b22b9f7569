//! The database handle: pool, units of work, statistics.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock, Weak};
use std::time::{Duration, Instant};

use keel_telemetry::KeelMetrics;

use sqlx::pool::PoolConnection;
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection, PgPool, Postgres};

use crate::config::DatabaseConfig;
use crate::error::{DatabaseError, Result};
use crate::retry::TransactionError;
use crate::uow::{TransactionOptions, UnitOfWork};

/// The future a [`Database::transaction`] closure returns: boxed and `Send`,
/// borrowing the unit of work for `'r`.
pub type TransactionFuture<'r, T, E> =
    std::pin::Pin<Box<dyn std::future::Future<Output = std::result::Result<T, E>> + Send + 'r>>;

/// A PostgreSQL connection pool with Keel's configuration, units of work and
/// statistics. Cheap to clone: clones share the pool.
///
/// ```no_run
/// use keel_database::{Database, DatabaseConfig, DatabaseError};
///
/// # async fn run() -> Result<(), DatabaseError> {
/// let db = Database::connect(DatabaseConfig::from_env()?).await?;
/// db.migrate(&[]).await?; // plus each linked crate's MIGRATIONS
/// let n: i64 = db
///     .transaction(|uow| {
///         Box::pin(async move {
///             let n = sqlx::query_scalar::<_, i64>("SELECT count(*) FROM keel.events")
///                 .fetch_one(uow.conn())
///                 .await?;
///             Ok::<_, DatabaseError>(n)
///         })
///     })
///     .await?;
/// # let _ = n;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Database {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    config: DatabaseConfig,
    acquires: AtomicU64,
    acquire_timeouts: AtomicU64,
    acquire_wait_nanos: AtomicU64,
    acquire_wait_max_nanos: AtomicU64,
    metrics: RwLock<KeelMetrics>,
    pool_name: String,
    metrics_interval_ms: AtomicU64,
    closed_on_release: Arc<AtomicU64>,
}

/// How many broken pooled connections one `begin` skips before it reports
/// the failure.
const MAX_STALE_RETRIES: u32 = 16;

/// The pool name in metrics when the configuration sets no
/// `application_name`.
const DEFAULT_POOL_NAME: &str = "keel";

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// How often a pool records `keel.db.pool.size` and `keel.db.pool.idle`,
/// unless changed with [`Database::set_pool_metrics_interval`].
pub const DEFAULT_POOL_METRICS_INTERVAL: Duration = Duration::from_secs(10);

/// Samples the pool's size and idle count until the pool is dropped or
/// closed.
async fn sample_pool(inner: Weak<Inner>) {
    loop {
        let interval = match inner.upgrade() {
            Some(inner) if !inner.pool.is_closed() => {
                Database {
                    inner: inner.clone(),
                }
                .record_pool_metrics();
                Duration::from_millis(inner.metrics_interval_ms.load(Ordering::Relaxed))
            }
            _ => return,
        };
        tokio::time::sleep(interval).await;
    }
}

impl fmt::Debug for Database {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Database")
            .field("config", &self.inner.config)
            .field("stats", &self.stats())
            .finish()
    }
}

/// A snapshot of the pool, for metrics and health checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct PoolStats {
    /// Open connections, idle or in use.
    pub size: u32,
    /// Open connections not in use.
    pub idle: u32,
    /// Connections in use (`size - idle`).
    pub in_use: u32,
    /// The configured maximum.
    pub max_connections: u32,
    /// The configured minimum.
    pub min_connections: u32,
    /// Whether [`Database::close`] was called.
    pub closed: bool,
    /// Connections handed out through this handle ([`Database::acquire`],
    /// [`Database::begin`], [`Database::transaction`], health checks).
    /// Queries run directly on [`Database::pool`] are not counted.
    pub acquires: u64,
    /// Acquisitions that gave up after the acquire timeout.
    pub acquire_timeouts: u64,
    /// Total time spent waiting in those acquisitions (for units of work,
    /// including the `BEGIN` round trip).
    pub acquire_wait_total: Duration,
    /// The longest single wait so far.
    pub acquire_wait_max: Duration,
    /// Connections closed as they came back to the pool because they were
    /// still inside a transaction, in a failed one, or could not answer
    /// (see [`close_unclean_connections`](crate::close_unclean_connections)).
    /// Counts every connection of the pool, however it was taken.
    pub closed_on_release: u64,
}

impl PoolStats {
    /// The mean wait per acquisition, if there was any.
    #[must_use]
    pub fn acquire_wait_mean(&self) -> Option<Duration> {
        let n = u32::try_from(self.acquires).ok().filter(|n| *n > 0)?;
        Some(self.acquire_wait_total / n)
    }
}

impl Database {
    /// Opens a pool and checks, before returning, that the server can be
    /// reached and accepts the credentials.
    ///
    /// One connection is opened within the connect timeout and closed again;
    /// the pool then fills up to `min_connections` in the background. So a
    /// wrong host, a wrong password or a missing database fails here, as
    /// [`DatabaseError::Unreachable`], [`DatabaseError::ConnectTimeout`],
    /// [`DatabaseError::AuthenticationFailed`] or
    /// [`DatabaseError::DatabaseNotFound`], instead of at the first query.
    /// Use [`connect_lazy`](Self::connect_lazy) to start while the database
    /// may still be down.
    pub async fn connect(config: DatabaseConfig) -> Result<Self> {
        let options = config.connect_options();
        let probe = tokio::time::timeout(
            config.connect_timeout(),
            PgConnection::connect_with(options),
        )
        .await
        .map_err(|_| DatabaseError::ConnectTimeout {
            host: config.host().into_owned(),
            port: config.port(),
            after: config.connect_timeout(),
        })?
        .map_err(|e| DatabaseError::from_connect(e, options))?;
        // The probe is not handed to the pool (sqlx cannot adopt a
        // connection); closing it politely is best effort.
        let _ = probe.close().await;
        Ok(Self::connect_lazy(config))
    }

    /// Builds the pool without touching the network: connections are opened
    /// on first use (and, for `min_connections`, in the background).
    /// Connection problems then surface from the first operation, as
    /// retryable errors. Must be called inside a Tokio runtime.
    #[must_use]
    pub fn connect_lazy(config: DatabaseConfig) -> Self {
        let closed_on_release = Arc::new(AtomicU64::new(0));
        // A connection given back inside a transaction (a `BEGIN` cancelled
        // in flight, plain-text `BEGIN` whose owner was dropped) is closed,
        // never handed to the next user.
        let options = crate::release::with_counter(PgPoolOptions::new(), closed_on_release.clone());
        let pool = options
            .max_connections(config.max_connections())
            .min_connections(config.min_connections())
            .acquire_timeout(config.acquire_timeout())
            .idle_timeout(config.idle_timeout())
            .max_lifetime(config.max_lifetime())
            // No ping before handing a connection out: it would be a round
            // trip of its own before every statement (an autocommit append
            // paid 13-25 % of its rate for it). sqlx still pings a connection
            // when it comes back to the pool and closes it if that fails, so
            // a connection that broke while in use is never reused; one that
            // broke while idle (a server restart) fails its next use with a
            // retryable `ConnectionLost`, which `begin` retries on a fresh
            // connection (nothing has run on it yet).
            .test_before_acquire(false)
            .connect_lazy_with(config.connect_options().clone());
        let pool_name = config
            .application_name()
            .unwrap_or(DEFAULT_POOL_NAME)
            .to_owned();
        let inner = Arc::new(Inner {
            pool,
            config,
            acquires: AtomicU64::new(0),
            acquire_timeouts: AtomicU64::new(0),
            acquire_wait_nanos: AtomicU64::new(0),
            acquire_wait_max_nanos: AtomicU64::new(0),
            metrics: RwLock::new(KeelMetrics::global()),
            pool_name,
            metrics_interval_ms: AtomicU64::new(millis(DEFAULT_POOL_METRICS_INTERVAL)),
            closed_on_release,
        });
        tokio::spawn(sample_pool(Arc::downgrade(&inner)));
        Self { inner }
    }

    /// Records the pool metrics through `metrics` from now on, instead of
    /// the global meter provider's instruments taken when the pool was
    /// built. Affects every clone of this `Database`.
    ///
    /// The pool records `keel.db.pool.size` and `keel.db.pool.idle` every
    /// [`DEFAULT_POOL_METRICS_INTERVAL`] (from a background task that ends
    /// with the pool), and `keel.db.pool.wait.duration` on every
    /// acquisition through this handle; all under
    /// `db.client.connection.pool.name` = the configured
    /// `application_name`, else `keel`.
    pub fn set_metrics(&self, metrics: KeelMetrics) {
        *self
            .inner
            .metrics
            .write()
            .unwrap_or_else(PoisonError::into_inner) = metrics;
        self.record_pool_metrics();
    }

    /// How often the background task samples the pool's size (at least
    /// 10 ms). The sleep in progress finishes first.
    pub fn set_pool_metrics_interval(&self, interval: Duration) {
        self.inner
            .metrics_interval_ms
            .store(millis(interval).max(10), Ordering::Relaxed);
    }

    /// Records the pool's size and idle connections now
    /// (`keel.db.pool.size`, `keel.db.pool.idle`).
    pub fn record_pool_metrics(&self) {
        let stats = self.stats();
        self.metrics().record_pool(
            &self.inner.pool_name,
            u64::from(stats.size),
            u64::from(stats.idle),
        );
    }

    fn metrics(&self) -> KeelMetrics {
        self.inner
            .metrics
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The underlying `sqlx` pool, for queries outside a unit of work.
    #[must_use]
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// The configuration this pool was built from.
    #[must_use]
    pub fn config(&self) -> &DatabaseConfig {
        &self.inner.config
    }

    /// Closes the pool: waiting and future acquisitions fail with
    /// [`DatabaseError::PoolClosed`]; returns once every connection is
    /// closed.
    pub async fn close(&self) {
        self.inner.pool.close().await;
    }

    /// Switches to a rotated password: connections opened from now on use
    /// it; open connections stay as they are until they are recycled (see
    /// `max_lifetime`). Clones of this `Database` share the change.
    pub fn set_password(&self, password: &str) {
        let options = (*self.inner.pool.connect_options())
            .clone()
            .password(password);
        self.inner.pool.set_connect_options(options);
    }

    /// Whether [`close`](Self::close) was called.
    #[must_use]
    pub fn is_closed(&self) -> bool {
        self.inner.pool.is_closed()
    }

    /// Pool size and acquisition statistics.
    #[must_use]
    pub fn stats(&self) -> PoolStats {
        let size = self.inner.pool.size();
        let idle = u32::try_from(self.inner.pool.num_idle())
            .unwrap_or(u32::MAX)
            .min(size);
        PoolStats {
            size,
            idle,
            in_use: size - idle,
            max_connections: self.inner.config.max_connections(),
            min_connections: self.inner.config.min_connections(),
            closed: self.inner.pool.is_closed(),
            acquires: self.inner.acquires.load(Ordering::Relaxed),
            acquire_timeouts: self.inner.acquire_timeouts.load(Ordering::Relaxed),
            acquire_wait_total: Duration::from_nanos(
                self.inner.acquire_wait_nanos.load(Ordering::Relaxed),
            ),
            acquire_wait_max: Duration::from_nanos(
                self.inner.acquire_wait_max_nanos.load(Ordering::Relaxed),
            ),
            closed_on_release: self.inner.closed_on_release.load(Ordering::Relaxed),
        }
    }

    /// Classifies a `sqlx` error from this pool, filling in the configured
    /// acquire and statement timeouts.
    #[must_use]
    pub fn classify(&self, e: sqlx::Error) -> DatabaseError {
        DatabaseError::from(e).with_timeouts(
            Some(self.inner.config.acquire_timeout()),
            self.inner.config.statement_timeout(),
        )
    }

    /// Applies Keel's base migrations and `sets` (each linked crate's
    /// `MIGRATIONS`): see [`migrate`](crate::migrate()).
    ///
    /// ```no_run
    /// # async fn run(db: keel_database::Database) -> keel_database::Result<()> {
    /// # static EVENTSTORE: keel_database::Migrations =
    /// #     keel_database::Migrations::new("keel-eventstore", sqlx::migrate::Migrator::DEFAULT);
    /// // db.migrate(&[&keel_eventstore::MIGRATIONS]).await?;
    /// db.migrate(&[&EVENTSTORE]).await?;
    /// # Ok(()) }
    /// ```
    pub async fn migrate(&self, sets: &[&crate::Migrations]) -> Result<()> {
        crate::migrate(&self.inner.pool, sets).await
    }

    /// A pooled connection, outside any transaction.
    pub async fn acquire(&self) -> Result<PoolConnection<Postgres>> {
        let started = Instant::now();
        let result = self.inner.pool.acquire().await;
        self.record_acquire(started.elapsed(), &result);
        result.map_err(|e| self.classify(e))
    }

    /// Starts a read-committed unit of work.
    pub async fn begin(&self) -> Result<UnitOfWork<'static>> {
        self.begin_attempt(&TransactionOptions::default(), 1).await
    }

    /// Starts a unit of work with the given isolation level and access mode
    /// (the retry policy in `options` is not used here).
    pub async fn begin_with(&self, options: &TransactionOptions) -> Result<UnitOfWork<'static>> {
        self.begin_attempt(options, 1).await
    }

    async fn begin_attempt(
        &self,
        options: &TransactionOptions,
        attempt: u32,
    ) -> Result<UnitOfWork<'static>> {
        let started = Instant::now();
        let mut result = self.inner.pool.begin_with(options.begin_statement()).await;
        // A `BEGIN` that failed on a broken connection ran nothing: take
        // another. Each failure discards one stale connection (sqlx closes
        // it on release), so after a restart this ends within the pool's
        // size; and never past the acquire timeout, so a server that is
        // really down fails as fast as before.
        let mut stale = 0;
        while let Err(e) = &result
            && crate::is_connection_error(e)
            && !matches!(e, sqlx::Error::PoolClosed)
            && stale < self.inner.config.max_connections().min(MAX_STALE_RETRIES)
            && started.elapsed() < self.inner.config.acquire_timeout()
        {
            stale += 1;
            tracing::debug!(error = %e, stale, "BEGIN failed on a broken pooled connection; taking another");
            result = self.inner.pool.begin_with(options.begin_statement()).await;
        }
        self.record_acquire(started.elapsed(), &result);
        let tx = result.map_err(|e| self.classify(e))?;
        Ok(UnitOfWork::top_level(
            tx,
            options.isolation_level(),
            attempt,
            self.inner.config.statement_timeout(),
        ))
    }

    fn record_acquire<T>(&self, waited: Duration, result: &std::result::Result<T, sqlx::Error>) {
        let nanos = u64::try_from(waited.as_nanos()).unwrap_or(u64::MAX);
        self.inner.acquires.fetch_add(1, Ordering::Relaxed);
        self.inner
            .acquire_wait_nanos
            .fetch_add(nanos, Ordering::Relaxed);
        self.inner
            .acquire_wait_max_nanos
            .fetch_max(nanos, Ordering::Relaxed);
        if matches!(result, Err(sqlx::Error::PoolTimedOut)) {
            self.inner.acquire_timeouts.fetch_add(1, Ordering::Relaxed);
        }
        self.inner
            .metrics
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .record_pool_wait(&self.inner.pool_name, waited);
    }

    /// Runs `work` in a read-committed unit of work and commits it; see
    /// [`transaction_with`](Self::transaction_with).
    pub async fn transaction<'env, T, E, F>(&self, work: F) -> std::result::Result<T, E>
    where
        F: for<'r> FnMut(&'r mut UnitOfWork<'env>) -> TransactionFuture<'r, T, E>,
        E: TransactionError,
    {
        self.transaction_with(&TransactionOptions::default(), work)
            .await
    }

    /// Runs `work` in a unit of work started with `options` and commits it.
    ///
    /// `work` is a closure returning a boxed future,
    /// `|uow| Box::pin(async move { … })`: that shape keeps the returned
    /// future `Send`, so transactions run inside `tokio::spawn`, and lets the
    /// future borrow from the caller (bind references before the closure:
    /// `let orders = &orders;`).
    ///
    /// * If `work` returns `Err`, the transaction is rolled back and the
    ///   error returned. If it panics, the transaction is rolled back as the
    ///   unit of work is dropped.
    /// * If `work` or the `COMMIT` fails with a serialization failure
    ///   (`40001`) or a deadlock (`40P01`), the transaction is rolled back
    ///   and `work` runs again in a fresh transaction, after an exponential
    ///   backoff with jitter, up to the policy's attempts (the options'
    ///   policy, else the configuration's). `work` must therefore be safe to
    ///   run more than once: keep side effects outside the database in
    ///   [`UnitOfWork::after_commit`] hooks, which run only after the
    ///   successful commit. [`UnitOfWork::attempt`] says which attempt runs.
    /// * Other errors, including lost connections (whose commit outcome is
    ///   unknown), are returned without retrying.
    ///
    /// ```no_run
    /// use keel_database::{Database, DatabaseError, TransactionOptions};
    ///
    /// # async fn demo(db: Database, order_id: i64) -> Result<(), DatabaseError> {
    /// let opts = TransactionOptions::serializable();
    /// let shipped = db
    ///     .transaction_with(&opts, |uow| {
    ///         Box::pin(async move {
    ///             let n = sqlx::query("UPDATE orders SET shipped = true WHERE id = $1")
    ///                 .bind(order_id)
    ///                 .execute(uow.conn())
    ///                 .await?
    ///                 .rows_affected();
    ///             Ok::<_, DatabaseError>(n == 1)
    ///         })
    ///     })
    ///     .await?;
    /// # let _ = shipped;
    /// # Ok(()) }
    /// ```
    pub async fn transaction_with<'env, T, E, F>(
        &self,
        options: &TransactionOptions,
        mut work: F,
    ) -> std::result::Result<T, E>
    where
        F: for<'r> FnMut(&'r mut UnitOfWork<'env>) -> TransactionFuture<'r, T, E>,
        E: TransactionError,
    {
        let policy = options
            .retry_policy()
            .unwrap_or(self.inner.config.retry_policy())
            .clone();
        let mut attempt = 1;
        loop {
            // Shortened to 'env: `&'r mut UnitOfWork<'env>` in the closure's
            // signature then implies 'env: 'r, which lets the future borrow
            // what the caller borrowed.
            let mut uow: UnitOfWork<'env> = self.begin_attempt(options, attempt).await?;
            let outcome = match work(&mut uow).await {
                Ok(value) => match uow.commit().await {
                    Ok(()) => return Ok(value),
                    Err(e) => E::from(e),
                },
                Err(e) => {
                    // A failed rollback means the connection is gone; sqlx
                    // discards it, so the work is not committed either way.
                    let _ = uow.rollback().await;
                    e
                }
            };
            if !outcome.is_transaction_conflict() {
                return Err(outcome);
            }
            if attempt >= policy.attempts() {
                tracing::warn!(
                    attempts = attempt,
                    "transaction still aborted by serialization failures or deadlocks after the last attempt"
                );
                return Err(outcome);
            }
            let wait = policy.jittered_backoff(attempt);
            tracing::debug!(
                attempt,
                max_attempts = policy.attempts(),
                wait_ms = wait.as_millis() as u64,
                "transaction aborted by a serialization failure or deadlock; retrying"
            );
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
    }
}
