//! Authentication and authorization of calls: a bearer token becomes a
//! [`Principal`] in the request's extensions, then a hook decides.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use http::HeaderMap;
use http::header::AUTHORIZATION;
use keel_core::{Error, Principal};
use keel_security::{JwtVerifier, Policy, Resource, SecurityError};

use super::router::service_name;

/// Decides whether an authenticated caller may call a method.
///
/// `method` is the call's path, `/<package.Service>/<Method>`. A refusal is
/// an [`Error::Forbidden`] (answered `PERMISSION_DENIED`); any other error
/// is answered as [`status_from_error`](crate::status_from_error) maps it.
///
/// A closure `Fn(&Principal, &str) -> Result<(), Error>` is an `Authorize`;
/// [`PolicyAuthorizer`] asks a keel-security [`Policy`].
///
/// ```
/// use keel_core::{Error, Principal};
///
/// let admins_only = |principal: &Principal, method: &str| {
///     if method.starts_with("/admin.v1.") && !principal.has_role("admin") {
///         return Err(Error::Forbidden { reason: "admins only".into() });
///     }
///     Ok(())
/// };
/// let server = keel_grpc::GrpcServer::builder().authorize(admins_only);
/// # let _ = server;
/// ```
#[async_trait]
pub trait Authorize: Send + Sync + 'static {
    /// `Ok(())` when `principal` may call `method`.
    async fn authorize(&self, principal: &Principal, method: &str) -> Result<(), Error>;
}

#[async_trait]
impl<F> Authorize for F
where
    F: Fn(&Principal, &str) -> Result<(), Error> + Send + Sync + 'static,
{
    async fn authorize(&self, principal: &Principal, method: &str) -> Result<(), Error> {
        self(principal, method)
    }
}

/// Authorizes calls with a keel-security [`Policy`]: the action is the
/// method without its leading slash (`orders.v1.Orders/Ship`), the
/// resource `Resource::new(<package.Service>)`. Rules that need the
/// resource's data belong in the handler (a `keel_security::pipeline::Guard`
/// or the command pipeline).
#[derive(Clone)]
pub struct PolicyAuthorizer {
    policy: Arc<dyn Policy>,
}

impl PolicyAuthorizer {
    /// An authorizer asking `policy`.
    #[must_use]
    pub fn new(policy: Arc<dyn Policy>) -> Self {
        Self { policy }
    }
}

impl fmt::Debug for PolicyAuthorizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PolicyAuthorizer")
            .field("policy", &self.policy)
            .finish()
    }
}

#[async_trait]
impl Authorize for PolicyAuthorizer {
    async fn authorize(&self, principal: &Principal, method: &str) -> Result<(), Error> {
        let service = service_name(method).unwrap_or(method);
        let action = method.strip_prefix('/').unwrap_or(method);
        self.policy
            .decide(principal, action, &Resource::new(service))
            .await
            .into_result()
            .map_err(Error::from)
    }
}

/// What the server checks before a call reaches its service.
pub(crate) struct Auth {
    pub(crate) verifier: JwtVerifier,
    pub(crate) authorizer: Option<Arc<dyn Authorize>>,
    /// Services (`package.Service`) and methods (`/package.Service/Method`)
    /// that need no token.
    pub(crate) public: Vec<String>,
}

impl Auth {
    pub(crate) fn is_public(&self, path: &str) -> bool {
        let service = service_name(path);
        self.public
            .iter()
            .any(|p| p == path || Some(p.as_str()) == service)
    }

    /// The caller, authenticated and authorized for `path`.
    pub(crate) async fn check(&self, headers: &HeaderMap, path: &str) -> Result<Principal, Error> {
        let header = headers
            .get(AUTHORIZATION)
            .ok_or(SecurityError::MissingToken)?
            .to_str()
            .map_err(|_| SecurityError::MissingToken)?;
        let principal = self.verifier.verify_bearer(header).await?;
        if let Some(authorizer) = &self.authorizer {
            authorizer.authorize(&principal, path).await?;
        }
        Ok(principal)
    }
}
