//! Secrets from Google Cloud Secret Manager, through the official
//! `google-cloud-secretmanager-v1` client (REST/JSON over reqwest, TLS
//! through rustls with the ring provider).

mod reference;

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use google_cloud_gax::error::rpc::Code;
use google_cloud_gax::exponential_backoff::ExponentialBackoffBuilder;
use google_cloud_gax::options::RequestOptionsBuilder as _;
use google_cloud_gax::retry_policy::{Aip194Strict, RetryPolicyExt as _};
use google_cloud_secretmanager_v1::client::SecretManagerService;
use google_cloud_secretmanager_v1::model::AccessSecretVersionResponse;

pub use reference::{SecretRef, SecretVersion};

use self::reference::{Resolved, check_project_id};
use super::SecretProvider;
use crate::Secret;
use crate::error::{Result, SecurityError};

/// How long one read may take by default, retries included.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// How many attempts one read makes by default (the first and retries of
/// transient failures).
const DEFAULT_ATTEMPTS: u32 = 3;

/// Where and how [`GcpSecretManager`] reads secrets.
///
/// [`new`](Self::new) is production: Secret Manager's global endpoint and
/// Application Default Credentials. [`local`](Self::local) is a server on
/// this machine (a test double) with anonymous credentials. Holds no
/// secret, so `Debug` shows everything.
#[derive(Debug, Clone)]
pub struct GcpSecretManagerConfig {
    project: String,
    endpoint: Option<String>,
    location: Option<String>,
    anonymous: bool,
    timeout: Duration,
    attempts: u32,
    pins: BTreeMap<String, SecretVersion>,
}

impl GcpSecretManagerConfig {
    /// Secret Manager in `project` (an id or a number) at
    /// `https://secretmanager.googleapis.com`, with Application Default
    /// Credentials: `GOOGLE_APPLICATION_CREDENTIALS` (a service account key
    /// or workload identity federation file), else the gcloud user
    /// credentials, else the metadata server of the Google Cloud runtime
    /// (Cloud Run, GKE workload identity, Compute Engine). Nothing is read
    /// until the first request.
    ///
    /// # Errors
    ///
    /// [`SecurityError::SecretInvalid`] for a malformed project id.
    pub fn new(project: impl Into<String>) -> Result<Self> {
        let project = project.into();
        check_project_id(&project)?;
        Ok(Self {
            project,
            endpoint: None,
            location: None,
            anonymous: false,
            timeout: DEFAULT_TIMEOUT,
            attempts: DEFAULT_ATTEMPTS,
            pins: BTreeMap::new(),
        })
    }

    /// A server speaking Secret Manager's REST API at `endpoint` (e.g.
    /// `http://127.0.0.1:8086`), with anonymous credentials: no token is
    /// fetched and no `Authorization` header is sent. For tests and local
    /// development only.
    ///
    /// # Errors
    ///
    /// [`SecurityError::SecretInvalid`] for a malformed project id.
    pub fn local(project: impl Into<String>, endpoint: impl Into<String>) -> Result<Self> {
        Ok(Self::new(project)?
            .with_endpoint(endpoint)
            .with_anonymous_credentials())
    }

    /// Talks to another endpoint (a Private Service Connect address, a
    /// local server), keeping the credentials choice. For regional secrets
    /// use [`with_location`](Self::with_location), which also picks the
    /// regional endpoint.
    #[must_use]
    pub fn with_endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.endpoint = Some(endpoint.into());
        self
    }

    /// Reads regional secrets stored in `location` (e.g. `europe-west1`):
    /// resource names become `projects/P/locations/L/secrets/S/versions/V`
    /// and, unless an endpoint was set, requests go to the regional
    /// endpoint `https://secretmanager.L.rep.googleapis.com`.
    ///
    /// # Errors
    ///
    /// [`SecurityError::SecretInvalid`] for a malformed location.
    pub fn with_location(mut self, location: impl Into<String>) -> Result<Self> {
        let location = location.into();
        check_project_id(&location).map_err(|_| SecurityError::SecretInvalid {
            name: crate::error::truncate(&location, 64),
            reason: "a location is 1 to 63 lower-case ASCII letters, digits and '-'",
        })?;
        self.location = Some(location);
        Ok(self)
    }

    /// Sends requests without credentials. Real Secret Manager refuses
    /// them; meant for a local endpoint.
    #[must_use]
    pub fn with_anonymous_credentials(mut self) -> Self {
        self.anonymous = true;
        self
    }

    /// How long one read may take, retries and back-off included (default
    /// 10 s). A read that runs out of time fails with
    /// [`SecurityError::SecretTimeout`].
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// How many attempts a read makes when Secret Manager is unavailable
    /// (default 3; 1 disables retries). Only transient failures are
    /// retried.
    #[must_use]
    pub fn with_attempts(mut self, attempts: u32) -> Self {
        self.attempts = attempts;
        self
    }

    /// Reads `secret` at `version` whenever it is asked for without a
    /// version (`"db-password"` rather than `"db-password@7"`), so the pin
    /// lives in configuration and the code keeps using the bare name.
    #[must_use]
    pub fn pin(mut self, secret: impl Into<String>, version: SecretVersion) -> Self {
        self.pins.insert(secret.into(), version);
        self
    }

    /// The project secrets are read from unless a reference names another.
    #[must_use]
    pub fn project(&self) -> &str {
        &self.project
    }

    /// The configured endpoint, if not the default.
    #[must_use]
    pub fn endpoint(&self) -> Option<&str> {
        self.endpoint.as_deref()
    }

    /// The location of regional secrets, if set.
    #[must_use]
    pub fn location(&self) -> Option<&str> {
        self.location.as_deref()
    }

    /// The time limit of one read.
    #[must_use]
    pub fn timeout(&self) -> Duration {
        self.timeout
    }
}

/// A [`SecretProvider`] on Google Cloud Secret Manager.
///
/// `get(name)` takes the short forms of [`SecretRef`] (`db-password`,
/// `db-password@7`, `db-password@latest`, `projects/p/secrets/s/versions/v`);
/// a bare name reads the version [pinned](GcpSecretManagerConfig::pin) in
/// the configuration, else `latest`. Each call is one `AccessSecretVersion`
/// request: wrap the provider in [`CachedSecrets`](crate::CachedSecrets)
/// for caching, TTL-based rotation, coalescing of concurrent reads and
/// refetch after [`invalidate`](SecretProvider::invalidate).
///
/// The payload must be UTF-8, and when Secret Manager sends its CRC32C
/// checksum (it does for every version created with one, and computes one
/// for the others) the payload must match it; a corrupted payload is
/// refused with [`SecurityError::SecretInvalid`].
///
/// Errors name the secret, never the value: [`SecurityError::SecretNotFound`]
/// (no such secret or version), [`SecurityError::SecretPermissionDenied`]
/// (the identity lacks `secretmanager.versions.access`, or its
/// credentials were rejected), [`SecurityError::SecretVersionDisabled`]
/// (the version is disabled or destroyed), [`SecurityError::SecretTimeout`]
/// (no answer within [the time limit](GcpSecretManagerConfig::with_timeout)),
/// [`SecurityError::SecretUnavailable`] (Secret Manager down, credentials
/// that cannot be obtained).
///
/// ```no_run
/// use std::{sync::Arc, time::Duration};
/// use keel_security::{CachedSecrets, GcpSecretManager, GcpSecretManagerConfig, SecretProvider, SecretVersion};
///
/// # async fn run() -> Result<(), keel_security::SecurityError> {
/// // Production: Application Default Credentials, the global endpoint.
/// let config = GcpSecretManagerConfig::new("orders-prod")?
///     .pin("db-password", SecretVersion::pinned(7).unwrap());
/// let secrets: Arc<dyn SecretProvider> = Arc::new(CachedSecrets::new(
///     Arc::new(GcpSecretManager::connect(config).await?),
///     Duration::from_secs(300),
/// ));
///
/// let password = secrets.get("db-password").await?; // version 7
/// let api_key = secrets.get("partner-api-key").await?; // latest
/// # let _ = (password, api_key);
///
/// // The database refused the password: read it again on next use.
/// secrets.invalidate("db-password").await;
/// # Ok(()) }
/// ```
pub struct GcpSecretManager {
    client: SecretManagerService,
    config: GcpSecretManagerConfig,
}

impl fmt::Debug for GcpSecretManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GcpSecretManager")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// A value read from Secret Manager with the version it came from.
#[derive(Debug, Clone)]
pub struct AccessedSecret {
    /// The secret's value.
    pub value: Secret<String>,
    /// The version number Secret Manager resolved the request to (`latest`
    /// and aliases become a number), or the version asked for when the
    /// answer did not say.
    pub version: String,
}

impl GcpSecretManager {
    /// Builds the client. Makes no request: a missing secret or a refused
    /// identity shows on the first read. Installs rustls' `ring` crypto
    /// provider as the process default when none is installed yet.
    ///
    /// # Errors
    ///
    /// [`SecurityError::Config`] when the client cannot be built (an
    /// endpoint that is not a URL, an unreadable credentials file, a zero
    /// timeout or attempt count).
    pub async fn connect(config: GcpSecretManagerConfig) -> Result<Self> {
        if config.timeout.is_zero() {
            return Err(SecurityError::Config(
                "the Secret Manager timeout must be positive".into(),
            ));
        }
        if config.attempts == 0 {
            return Err(SecurityError::Config(
                "the Secret Manager attempt count must be at least 1".into(),
            ));
        }
        // Ignored error: another provider is already the process default.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let backoff = ExponentialBackoffBuilder::new()
            .with_initial_delay(Duration::from_millis(100))
            .with_maximum_delay(Duration::from_secs(2))
            .build()
            .map_err(|e| SecurityError::Config(format!("Secret Manager back-off: {e}")))?;
        let mut builder = SecretManagerService::builder()
            .with_retry_policy(
                Aip194Strict
                    .with_attempt_limit(config.attempts)
                    .with_time_limit(config.timeout),
            )
            .with_backoff_policy(backoff)
            .with_attempt_timeout(config.timeout);
        let endpoint = config.endpoint.clone().or_else(|| {
            config
                .location
                .as_ref()
                .map(|location| format!("https://secretmanager.{location}.rep.googleapis.com"))
        });
        if let Some(endpoint) = endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        if config.anonymous {
            builder = builder.with_credentials(
                google_cloud_auth::credentials::anonymous::Builder::new().build(),
            );
        }
        let client = builder.build().await.map_err(|e| {
            SecurityError::Config(format!("cannot build the Secret Manager client: {e}"))
        })?;
        Ok(Self { client, config })
    }

    /// The configuration the provider was built with.
    #[must_use]
    pub fn config(&self) -> &GcpSecretManagerConfig {
        &self.config
    }

    /// Reads one version of a secret, telling which version answered.
    ///
    /// # Errors
    ///
    /// As listed on [`GcpSecretManager`]; the secret is named as `reference`
    /// shows it.
    pub async fn access(&self, reference: &SecretRef) -> Result<AccessedSecret> {
        let name = reference.to_string();
        let pinned = self
            .config
            .pins
            .get(reference.secret())
            .cloned()
            .unwrap_or_default();
        let resolved = reference.resolve(
            &self.config.project,
            self.config.location.as_deref(),
            &pinned,
        );
        let request = self
            .client
            .access_secret_version()
            .set_name(resolved.resource_name())
            .with_attempt_timeout(self.config.timeout)
            .send();
        let response = match tokio::time::timeout(self.config.timeout, request).await {
            Ok(Ok(response)) => response,
            Ok(Err(error)) => return Err(self.classify(&name, &resolved, error)),
            Err(_) => {
                return Err(SecurityError::SecretTimeout {
                    name,
                    after: self.config.timeout,
                });
            }
        };
        let accessed = decode(&name, &resolved, response)?;
        tracing::debug!(secret = %name, version = %accessed.version, "secret read from Secret Manager");
        Ok(accessed)
    }

    /// Turns the client's error into a typed one, by the status Secret
    /// Manager answered with (or the HTTP status when the body was not a
    /// Google error).
    fn classify(
        &self,
        name: &str,
        resolved: &Resolved,
        error: google_cloud_gax::error::Error,
    ) -> SecurityError {
        let code = error.status().map(|status| status.code).or_else(|| {
            error.http_status_code().and_then(|status| match status {
                400 => Some(Code::InvalidArgument),
                401 => Some(Code::Unauthenticated),
                403 => Some(Code::PermissionDenied),
                404 => Some(Code::NotFound),
                412 => Some(Code::FailedPrecondition),
                504 => Some(Code::DeadlineExceeded),
                _ => None,
            })
        });
        let name = name.to_owned();
        match code {
            Some(Code::NotFound) => SecurityError::SecretNotFound { name },
            Some(Code::PermissionDenied | Code::Unauthenticated) => {
                SecurityError::SecretPermissionDenied { name }
            }
            Some(Code::FailedPrecondition) => SecurityError::SecretVersionDisabled {
                name,
                version: resolved.version.to_string(),
            },
            Some(Code::InvalidArgument) => SecurityError::SecretInvalid {
                name,
                reason: "Secret Manager refused the name",
            },
            Some(Code::DeadlineExceeded) => SecurityError::SecretTimeout {
                name,
                after: self.config.timeout,
            },
            _ if error.is_timeout() => SecurityError::SecretTimeout {
                name,
                after: self.config.timeout,
            },
            _ => SecurityError::SecretUnavailable {
                name,
                source: Box::new(error),
            },
        }
    }
}

/// Checks and unpacks an answer: a payload, its checksum, UTF-8.
fn decode(
    name: &str,
    resolved: &Resolved,
    response: AccessSecretVersionResponse,
) -> Result<AccessedSecret> {
    let invalid = |reason| SecurityError::SecretInvalid {
        name: name.to_owned(),
        reason,
    };
    let payload = response
        .payload
        .ok_or_else(|| invalid("Secret Manager's answer carries no payload"))?;
    if let Some(expected) = payload.data_crc32c {
        let actual = crc32c(&payload.data);
        if i64::from(actual) != expected {
            return Err(invalid(
                "the payload does not match its CRC32C checksum (corrupted in transit)",
            ));
        }
    }
    let value =
        String::from_utf8(payload.data.to_vec()).map_err(|_| invalid("the value is not UTF-8"))?;
    let version = response
        .name
        .rsplit_once("/versions/")
        .map(|(_, version)| version.to_owned())
        .filter(|version| !version.is_empty())
        .unwrap_or_else(|| resolved.version.to_string());
    Ok(AccessedSecret {
        value: Secret::new(value),
        version,
    })
}

/// CRC32C (Castagnoli), the checksum Secret Manager keeps for payloads.
fn crc32c(data: &[u8]) -> u32 {
    const CASTAGNOLI: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);
    CASTAGNOLI.checksum(data)
}

#[async_trait]
impl SecretProvider for GcpSecretManager {
    async fn get(&self, name: &str) -> Result<Secret<String>> {
        let reference: SecretRef = name.parse()?;
        Ok(self.access(&reference).await?.value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_is_castagnoli() {
        // The check value of CRC-32C (RFC 3720, appendix B.4).
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn configuration_refuses_bad_projects() {
        assert!(GcpSecretManagerConfig::new("Bad Project").is_err());
        assert!(GcpSecretManagerConfig::new("").is_err());
        let config = GcpSecretManagerConfig::local("p-1", "http://127.0.0.1:1").unwrap();
        assert!(config.anonymous);
        assert_eq!(config.endpoint(), Some("http://127.0.0.1:1"));
        assert_eq!(config.timeout(), DEFAULT_TIMEOUT);
    }
}
