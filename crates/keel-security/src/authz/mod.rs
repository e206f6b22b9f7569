//! Authorization: a policy port and a deny-by-default engine combining
//! roles (RBAC) with attribute conditions (ABAC).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;

use crate::Principal;
use crate::error::SecurityError;

/// What an action is performed on: its kind and id, the tenant it belongs
/// to, its owner, and any attributes custom conditions need.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct Resource {
    /// The kind of resource, e.g. `"order"`.
    pub kind: String,
    /// The resource's id, when the action targets one instance.
    pub id: Option<String>,
    /// The tenant the resource belongs to.
    pub tenant: Option<String>,
    /// The subject that owns the resource.
    pub owner: Option<String>,
    /// Further attributes for custom conditions.
    pub attributes: BTreeMap<String, serde_json::Value>,
}

impl Resource {
    /// A resource of `kind` with nothing else known.
    pub fn new(kind: impl Into<String>) -> Self {
        Self {
            kind: kind.into(),
            ..Self::default()
        }
    }

    /// Sets the id.
    #[must_use]
    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }

    /// Sets the owning tenant.
    #[must_use]
    pub fn with_tenant(mut self, tenant: impl Into<String>) -> Self {
        self.tenant = Some(tenant.into());
        self
    }

    /// Sets the owner.
    #[must_use]
    pub fn with_owner(mut self, owner: impl Into<String>) -> Self {
        self.owner = Some(owner.into());
        self
    }

    /// Adds an attribute.
    #[must_use]
    pub fn with_attribute(mut self, name: impl Into<String>, value: serde_json::Value) -> Self {
        self.attributes.insert(name.into(), value);
        self
    }
}

/// The outcome of an authorization check, always with the reason, so that
/// audit records and error messages can say why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The action is allowed.
    Allow {
        /// Why (e.g. which role granted it and which conditions held).
        reason: String,
    },
    /// The action is refused.
    Deny {
        /// Why (e.g. no role grants it, or which condition failed).
        reason: String,
    },
}

impl Decision {
    /// Whether the action is allowed.
    #[must_use]
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allow { .. })
    }

    /// The reason for the decision.
    #[must_use]
    pub fn reason(&self) -> &str {
        match self {
            Decision::Allow { reason } | Decision::Deny { reason } => reason,
        }
    }

    /// `Ok(())` when allowed, [`SecurityError::Forbidden`] with the reason
    /// otherwise: the shape a guard in an application service wants.
    ///
    /// # Errors
    ///
    /// [`SecurityError::Forbidden`] when the decision is a denial.
    pub fn into_result(self) -> Result<(), SecurityError> {
        match self {
            Decision::Allow { .. } => Ok(()),
            Decision::Deny { reason } => Err(SecurityError::Forbidden { reason }),
        }
    }
}

/// Decides whether a principal may perform an action on a resource.
///
/// Object-safe so a composition root can hold `Arc<dyn Policy>`; async so
/// an implementation may consult a remote policy service.
#[async_trait]
pub trait Policy: Send + Sync + fmt::Debug {
    /// The decision for `principal` doing `action` on `resource`.
    async fn decide(&self, principal: &Principal, action: &str, resource: &Resource) -> Decision;
}

type Predicate = dyn Fn(&Principal, &Resource) -> bool + Send + Sync;

/// An attribute condition that must hold, on top of a role granting the
/// action.
#[derive(Clone)]
pub enum Condition {
    /// The resource's tenant equals the principal's; a resource or
    /// principal without a tenant fails it.
    SameTenant,
    /// The principal owns the resource (`resource.owner == subject`).
    Owner,
    /// A named custom predicate; the name appears in decisions.
    Custom {
        /// Names the predicate in reasons.
        name: String,
        /// The predicate.
        predicate: Arc<Predicate>,
    },
}

impl Condition {
    /// A named custom predicate over the principal and the resource.
    pub fn custom(
        name: impl Into<String>,
        predicate: impl Fn(&Principal, &Resource) -> bool + Send + Sync + 'static,
    ) -> Self {
        Condition::Custom {
            name: name.into(),
            predicate: Arc::new(predicate),
        }
    }

    fn name(&self) -> &str {
        match self {
            Condition::SameTenant => "same tenant",
            Condition::Owner => "owner",
            Condition::Custom { name, .. } => name,
        }
    }

    fn holds(&self, principal: &Principal, resource: &Resource) -> bool {
        match self {
            Condition::SameTenant => {
                principal.tenant.is_some() && principal.tenant == resource.tenant
            }
            Condition::Owner => resource.owner.as_deref() == Some(principal.subject.as_str()),
            Condition::Custom { predicate, .. } => predicate(principal, resource),
        }
    }
}

impl fmt::Debug for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A deny-by-default policy: an action is allowed only when one of the
/// principal's roles grants its permission **and** every condition attached
/// to that permission holds.
///
/// Permissions are action names such as `"order:approve"`; a role granting
/// `"order:*"` grants every action starting with `"order:"`, and `"*"`
/// grants everything.
///
/// ```
/// use keel_security::{Condition, Decision, Principal, PolicyEngine, Resource};
///
/// let engine = PolicyEngine::new()
///     .grant("clerk", ["order:read", "order:create"])
///     .grant("manager", ["order:*"])
///     .require("order:*", Condition::SameTenant);
///
/// let alice = Principal::new("alice").with_tenant("acme").with_role("clerk");
/// let order = Resource::new("order").with_id("o-1").with_tenant("acme");
/// assert!(engine.check(&alice, "order:read", &order).is_allowed());
/// assert!(!engine.check(&alice, "order:approve", &order).is_allowed());
/// let foreign = Resource::new("order").with_tenant("globex");
/// let denied = engine.check(&alice, "order:read", &foreign);
/// assert_eq!(denied.reason(), "condition \"same tenant\" failed for order:read");
/// ```
#[derive(Debug, Clone, Default)]
pub struct PolicyEngine {
    grants: BTreeMap<String, BTreeSet<String>>,
    conditions: Vec<(String, Condition)>,
}

impl PolicyEngine {
    /// An engine that allows nothing.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Grants `permissions` to `role`.
    #[must_use]
    pub fn grant<I: IntoIterator<Item = S>, S: Into<String>>(
        mut self,
        role: &str,
        permissions: I,
    ) -> Self {
        self.grants
            .entry(role.to_owned())
            .or_default()
            .extend(permissions.into_iter().map(Into::into));
        self
    }

    /// Attaches `condition` to every action matching `pattern` (same
    /// wildcard rules as permissions).
    #[must_use]
    pub fn require(mut self, pattern: impl Into<String>, condition: Condition) -> Self {
        self.conditions.push((pattern.into(), condition));
        self
    }

    /// The decision, computed synchronously (the [`Policy`] impl wraps it).
    #[must_use]
    pub fn check(&self, principal: &Principal, action: &str, resource: &Resource) -> Decision {
        let granting_role = principal.roles.iter().find(|role| {
            self.grants
                .get(role.as_str())
                .is_some_and(|perms| perms.iter().any(|p| matches(p, action)))
        });
        let Some(role) = granting_role else {
            return Decision::Deny {
                reason: format!("no role of {} grants {action}", principal.subject),
            };
        };
        let mut held = Vec::new();
        for (pattern, condition) in &self.conditions {
            if !matches(pattern, action) {
                continue;
            }
            if !condition.holds(principal, resource) {
                return Decision::Deny {
                    reason: format!("condition {:?} failed for {action}", condition.name()),
                };
            }
            held.push(condition.name());
        }
        let reason = if held.is_empty() {
            format!("role {role} grants {action}")
        } else {
            format!("role {role} grants {action}; held: {}", held.join(", "))
        };
        Decision::Allow { reason }
    }
}

#[async_trait]
impl Policy for PolicyEngine {
    async fn decide(&self, principal: &Principal, action: &str, resource: &Resource) -> Decision {
        self.check(principal, action, resource)
    }
}

fn matches(pattern: &str, action: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => action.starts_with(prefix),
        None => pattern == action,
    }
}

#[cfg(test)]
mod tests;
