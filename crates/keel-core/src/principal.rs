//! Who is calling: the result of authentication.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// An authenticated caller: who they are, which tenant they act for and what
/// they were granted.
///
/// Built by `keel_security::JwtVerifier` from a verified token (or by hand
/// for service accounts and tests); it is plain data so it can travel in a
/// [`CommandEnvelope`](crate::command::CommandEnvelope) and audit records.
/// `claims` holds only the claims the verifier was told to keep, never the
/// whole token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Principal {
    /// The stable identifier of the caller (`sub`).
    pub subject: String,
    /// The tenant the caller acts for, when the token names one.
    pub tenant: Option<String>,
    /// Role names granted to the caller.
    pub roles: BTreeSet<String>,
    /// OAuth scopes granted to the caller.
    pub scopes: BTreeSet<String>,
    /// The issuer that vouched for the caller (`iss`), when present.
    pub issuer: Option<String>,
    /// Selected extra claims, by name.
    pub claims: BTreeMap<String, serde_json::Value>,
}

impl Principal {
    /// A principal with a subject and nothing else; add the rest with the
    /// `with_*` methods. Useful for tests and for service accounts built
    /// without a token.
    pub fn new(subject: impl Into<String>) -> Self {
        Self {
            subject: subject.into(),
            tenant: None,
            roles: BTreeSet::new(),
            scopes: BTreeSet::new(),
            issuer: None,
            claims: BTreeMap::new(),
        }
    }

    /// Sets the tenant.
    #[must_use]
    pub fn with_tenant(mut self, tenant: impl Into<String>) -> Self {
        self.tenant = Some(tenant.into());
        self
    }

    /// Adds a role.
    #[must_use]
    pub fn with_role(mut self, role: impl Into<String>) -> Self {
        self.roles.insert(role.into());
        self
    }

    /// Adds a scope.
    #[must_use]
    pub fn with_scope(mut self, scope: impl Into<String>) -> Self {
        self.scopes.insert(scope.into());
        self
    }

    /// Whether the caller holds `role`.
    #[must_use]
    pub fn has_role(&self, role: &str) -> bool {
        self.roles.contains(role)
    }

    /// Whether the caller was granted `scope`.
    #[must_use]
    pub fn has_scope(&self, scope: &str) -> bool {
        self.scopes.contains(scope)
    }

    /// A kept claim, by name.
    #[must_use]
    pub fn claim(&self, name: &str) -> Option<&serde_json::Value> {
        self.claims.get(name)
    }
}
