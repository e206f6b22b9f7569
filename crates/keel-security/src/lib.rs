//! Authentication, authorization, secrets and a tamper-evident audit log
//! for Keel services.
//!
//! Services use this crate at their edge (HTTP, gRPC, message consumers) to
//! turn a bearer token into a [`Principal`]: who is calling, for which
//! tenant, with which roles and scopes. Domain code never sees a token; it
//! sees the principal in command metadata. Application services ask a
//! [`Policy`] whether that principal may act on a resource, and the
//! composition root reads credentials through a [`SecretProvider`].
//!
//! # Authentication
//!
//! A [`JwtVerifier`] checks a compact JWS against an explicit algorithm
//! allow-list, keys bound to their algorithms (so an RSA public key can
//! never be used as an HMAC secret), issuer, audience, expiry and
//! not-before with a leeway, and a size limit. Keys come from a fixed list
//! ([`KeySource::fixed`]) or from a JSON Web Key Set that is cached,
//! refreshed, and refetched when a token names a new `kid`, at most once per
//! interval ([`JwksKeySource`]). Every refusal is a typed [`SecurityError`]
//! that converts into [`keel_core::Error::Unauthorized`].
//!
//! ```
//! use keel_security::{Algorithm, JwtConfig, JwtVerifier, KeySource, Secret, VerificationKey};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let runtime = tokio::runtime::Builder::new_current_thread().build()?;
//! # runtime.block_on(async {
//! let secret = Secret::new(b"an HMAC secret of at least 32 bytes!".to_vec());
//! let verifier = JwtVerifier::new(
//!     JwtConfig::new("https://idp.example", "orders-api", [Algorithm::HS256]),
//!     KeySource::fixed([VerificationKey::hmac(None, &secret)?]),
//! )?;
//!
//! // A token as an identity provider would issue it.
//! let claims = serde_json::json!({
//!     "iss": "https://idp.example", "aud": "orders-api", "sub": "user-42",
//!     "exp": 4_102_444_800u64, "tenant": "acme", "roles": ["clerk"],
//!     "scope": "orders:read orders:write",
//! });
//! let token = jsonwebtoken::encode(
//!     &jsonwebtoken::Header::new(Algorithm::HS256),
//!     &claims,
//!     &jsonwebtoken::EncodingKey::from_secret(secret.expose_secret()),
//! )?;
//!
//! let principal = verifier.verify_bearer(&format!("Bearer {token}")).await?;
//! assert_eq!(principal.subject, "user-42");
//! assert_eq!(principal.tenant.as_deref(), Some("acme"));
//! assert!(principal.has_role("clerk") && principal.has_scope("orders:write"));
//!
//! // Anything else is refused with a reason, and maps onto Keel's taxonomy.
//! let err = verifier.verify("not-a-token").await.unwrap_err();
//! assert_eq!(keel_core::Error::from(err).kind(), keel_core::ErrorKind::Unauthorized);
//! # Ok::<_, Box<dyn std::error::Error>>(())
//! # })
//! # }
//! ```
//!
//! With a key set instead of a fixed key:
//!
//! ```no_run
//! # async fn run() -> Result<(), keel_security::SecurityError> {
//! use std::{sync::Arc, time::Duration};
//! use keel_security::{Algorithm, JwksConfig, JwksKeySource, JwtConfig, JwtVerifier, KeySource};
//!
//! let jwks = Arc::new(JwksKeySource::new(
//!     JwksConfig::new("https://idp.example/.well-known/jwks.json")
//!         .min_refetch_interval(Duration::from_secs(30)),
//! )?);
//! jwks.refresh().await?; // fail fast at startup
//! let verifier = JwtVerifier::new(
//!     JwtConfig::new("https://idp.example", "orders-api", [Algorithm::RS256, Algorithm::ES256]),
//!     KeySource::jwks(jwks),
//! )?;
//! # let _ = verifier; Ok(()) }
//! ```
//!
//! # Authorization
//!
//! [`PolicyEngine`] is deny-by-default: an action is allowed only when one
//! of the principal's roles grants it **and** every [`Condition`] attached
//! to it holds (same tenant, ownership, custom predicates). Each
//! [`Decision`] carries its reason; [`Decision::into_result`] turns a denial
//! into [`SecurityError::Forbidden`] for a guard in an application service.
//!
//! # Secrets
//!
//! [`SecretProvider`] is the object-safe port; [`EnvSecrets`],
//! [`FileSecrets`] (a mounted directory, as Kubernetes and Cloud Run
//! provide) and, with the `gcp-secret-manager` feature, `GcpSecretManager`
//! (Google Cloud Secret Manager, `latest`, pinned or aliased versions)
//! implement it. [`CachedSecrets`] wraps any of them with a time to live:
//! a rotated value is read after the TTL, concurrent reads of one name
//! share a single backend call, [`SecretProvider::invalidate`] forces a
//! reread when a consumer finds a value refused, and a transient backend
//! failure keeps serving the last good value while a revocation (not
//! found, denied, disabled) does not. Values are
//! [`Secret<String>`](Secret) (re-exported from keel-telemetry), which
//! prints and serializes as `[REDACTED]`.
//!
//! ```
//! use std::{sync::Arc, time::Duration};
//! use keel_security::{CachedSecrets, FileSecrets, SecretProvider};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?; // a secret volume, as Kubernetes mounts one
//! std::fs::write(dir.path().join("db-password"), "hunter2-but-longer\n")?;
//!
//! let secrets: Arc<dyn SecretProvider> = Arc::new(CachedSecrets::new(
//!     Arc::new(FileSecrets::new(dir.path())),
//!     Duration::from_secs(300),
//! ));
//! let password = secrets.get("db-password").await?;
//! assert_eq!(password.expose_secret(), "hunter2-but-longer");
//! assert_eq!(format!("{password:?}"), "[REDACTED]");
//!
//! // The database refused it after a rotation: reread on next use.
//! std::fs::write(dir.path().join("db-password"), "rotated")?;
//! secrets.invalidate("db-password").await;
//! assert_eq!(secrets.get("db-password").await?.expose_secret(), "rotated");
//! # Ok(()) }
//! ```
//!
//! # Command pipeline
//!
//! [`pipeline`] holds the security layers of the command pipeline (see
//! `keel_core::command` and the guide `docs/command-pipeline.md`):
//! [`AuditLayer`](pipeline::AuditLayer) appends an audit record for every
//! command, accepted or refused; [`AuthenticationLayer`](pipeline::AuthenticationLayer)
//! turns the envelope's bearer token into its principal;
//! [`AuthorizationLayer`](pipeline::AuthorizationLayer) asks the policy
//! before the handler runs. [`CommandPipeline`](pipeline::CommandPipeline)
//! stacks them once in a composition root; [`Guard`](pipeline::Guard)
//! makes the same check inside an application service; with the `http`
//! feature, `pipeline::BearerAuthLayer` authenticates HTTP and gRPC
//! requests at the edge.
//!
//! # Audit log
//!
//! [`audit`] implements `keel_core::AuditLog`: an append-only log whose
//! records are chained by SHA-256, so `verify` names the first record
//! that was changed or removed. `audit::PgAuditLog` (feature `postgres`)
//! keeps it in `keel.audit_log`, which the database refuses to update,
//! delete or truncate; [`InMemoryAuditLog`] behaves the same in memory.
//! [`AuditHead`] reads the chain's head so an operator can keep a copy
//! outside the database and later prove nothing was cut from the end.
//! Appends are idempotent on the entry's command id (an identical entry
//! returns the stored record; a different one under the same id is
//! recorded as another attempt); with
//! `audit::AuditKeys` every record also carries an HMAC-SHA256 under a
//! rotatable key; `audit::AuditVerifier` checks the log incrementally in
//! the background and serves the result as a health check.
//!
//! More in the guide, `docs/security.md`.
//!
//! # Feature flags
//!
//! - `jwks` (default): [`JwksKeySource`], fetching key sets with reqwest
//!   over rustls (ring provider, webpki roots; never OpenSSL). Without it,
//!   verification uses fixed keys only and pulls in no HTTP client.
//! - `postgres` (default): `audit::PgAuditLog`, the audit log on
//!   PostgreSQL (sqlx and keel-database). Without it, only the in-memory
//!   audit log is built and no database driver is pulled in.
//! - `testing`: `audit::testing`, the contract suite for implementations
//!   of `keel_core::AuditLog`, and the `audit_contract_suite!` macro.
//! - `http`: `pipeline::BearerAuthLayer`, a tower layer over
//!   `http::Request` for axum and tonic servers (adds the `http` crate).
//! - `gcp-secret-manager`: `GcpSecretManager`, `GcpSecretManagerConfig`,
//!   `SecretRef`, `SecretVersion` and `AccessedSecret`, a secret provider
//!   on Google Cloud Secret Manager through the official
//!   `google-cloud-secretmanager-v1` client (REST/JSON over reqwest, rustls
//!   with the ring provider, never OpenSSL). Off by default: it pulls in
//!   the Google Cloud client stack.
//!
//! Signature verification uses the pure-Rust RustCrypto backend of
//! `jsonwebtoken`.

pub mod audit;
mod authn;
mod authz;
mod error;
pub mod pipeline;
mod secrets;

#[cfg(feature = "postgres")]
pub use audit::PgAuditLog;
pub use audit::{AuditHead, ChainHead, InMemoryAuditLog};
pub use authn::{ClaimMapping, JwtConfig, JwtVerifier, KeySource, VerificationKey};
#[cfg(feature = "jwks")]
pub use authn::{JwksConfig, JwksKeySource};
pub use authz::{Condition, Decision, Policy, PolicyEngine, Resource};
pub use error::{Result, SecurityError};
pub use jsonwebtoken::Algorithm;
pub use keel_core::Principal;
pub use keel_telemetry::Secret;

/// The audit log's tables and functions (`keel.audit_log`,
/// `keel.audit_head`), applied with [`keel_database::migrate()`] beside the
/// other linked crates' sets.
#[cfg(feature = "postgres")]
pub static MIGRATIONS: keel_database::Migrations =
    keel_database::Migrations::new("keel-security", sqlx::migrate!("./migrations"));
#[cfg(feature = "gcp-secret-manager")]
pub use secrets::{
    AccessedSecret, GcpSecretManager, GcpSecretManagerConfig, SecretRef, SecretVersion,
};
pub use secrets::{CachedSecrets, EnvSecrets, FileSecrets, SecretProvider};
