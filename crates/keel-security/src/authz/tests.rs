use std::sync::Arc;

use super::*;

fn engine() -> PolicyEngine {
    PolicyEngine::new()
        .grant("clerk", ["order:read", "order:create"])
        .grant("customer", ["order:read", "order:cancel"])
        .grant("manager", ["order:*"])
        .grant("root", ["*"])
        .require("order:*", Condition::SameTenant)
        .require("order:cancel", Condition::Owner)
}

fn acme_order() -> Resource {
    Resource::new("order")
        .with_id("o-1")
        .with_tenant("acme")
        .with_owner("carol")
}

#[test]
fn nothing_is_allowed_by_default() {
    let empty = PolicyEngine::new();
    let admin = Principal::new("admin")
        .with_tenant("acme")
        .with_role("admin");
    let decision = empty.check(&admin, "order:read", &acme_order());
    assert_eq!(
        decision,
        Decision::Deny {
            reason: "no role of admin grants order:read".into()
        }
    );
    let no_roles = Principal::new("nobody").with_tenant("acme");
    assert!(
        !engine()
            .check(&no_roles, "order:read", &acme_order())
            .is_allowed()
    );
}

#[test]
fn a_role_grants_only_its_permissions() {
    let clerk = Principal::new("bob").with_tenant("acme").with_role("clerk");
    let allowed = engine().check(&clerk, "order:create", &acme_order());
    assert_eq!(
        allowed.reason(),
        "role clerk grants order:create; held: same tenant"
    );
    assert!(
        !engine()
            .check(&clerk, "order:approve", &acme_order())
            .is_allowed()
    );
}

#[test]
fn wildcards_grant_by_prefix() {
    let manager = Principal::new("mia")
        .with_tenant("acme")
        .with_role("manager");
    assert!(
        engine()
            .check(&manager, "order:approve", &acme_order())
            .is_allowed()
    );
    assert!(
        !engine()
            .check(&manager, "invoice:read", &acme_order())
            .is_allowed()
    );
    let root = Principal::new("r").with_role("root");
    let decision = engine().check(&root, "invoice:read", &Resource::new("invoice"));
    assert_eq!(decision.reason(), "role root grants invoice:read");
}

#[test]
fn another_tenants_resource_is_refused_even_with_the_role() {
    let manager = Principal::new("mia")
        .with_tenant("globex")
        .with_role("manager");
    let decision = engine().check(&manager, "order:read", &acme_order());
    assert_eq!(
        decision.reason(),
        "condition \"same tenant\" failed for order:read"
    );
    // No tenant on either side never counts as the same tenant.
    let tenantless = Principal::new("mia").with_role("manager");
    let orphan = Resource::new("order");
    assert!(
        !engine()
            .check(&tenantless, "order:read", &orphan)
            .is_allowed()
    );
}

#[test]
fn ownership_is_required_where_attached() {
    let carol = Principal::new("carol")
        .with_tenant("acme")
        .with_role("customer");
    let dave = Principal::new("dave")
        .with_tenant("acme")
        .with_role("customer");
    let allowed = engine().check(&carol, "order:cancel", &acme_order());
    assert_eq!(
        allowed.reason(),
        "role customer grants order:cancel; held: same tenant, owner"
    );
    let denied = engine().check(&dave, "order:cancel", &acme_order());
    assert_eq!(
        denied.reason(),
        "condition \"owner\" failed for order:cancel"
    );
    // Reading needs no ownership.
    assert!(
        engine()
            .check(&dave, "order:read", &acme_order())
            .is_allowed()
    );
}

#[test]
fn custom_predicates_see_principal_and_resource_attributes() {
    let engine = PolicyEngine::new()
        .grant("approver", ["order:approve"])
        .require(
            "order:approve",
            Condition::custom("amount within limit", |principal, resource| {
                let limit = principal
                    .claim("approval_limit")
                    .and_then(serde_json::Value::as_u64);
                let amount = resource
                    .attributes
                    .get("amount")
                    .and_then(serde_json::Value::as_u64);
                matches!((limit, amount), (Some(l), Some(a)) if a <= l)
            }),
        );
    let mut approver = Principal::new("ann").with_role("approver");
    approver
        .claims
        .insert("approval_limit".into(), serde_json::json!(1000));
    let small = Resource::new("order").with_attribute("amount", serde_json::json!(999));
    let large = Resource::new("order").with_attribute("amount", serde_json::json!(1001));
    assert!(
        engine
            .check(&approver, "order:approve", &small)
            .is_allowed()
    );
    let denied = engine.check(&approver, "order:approve", &large);
    assert_eq!(
        denied.reason(),
        "condition \"amount within limit\" failed for order:approve"
    );
}

#[tokio::test]
async fn the_engine_is_a_policy_and_a_denial_is_forbidden() {
    let policy: Arc<dyn Policy> = Arc::new(engine());
    let stranger = Principal::new("eve")
        .with_tenant("globex")
        .with_role("clerk");
    let decision = policy.decide(&stranger, "order:read", &acme_order()).await;
    let err = decision.into_result().unwrap_err();
    assert!(matches!(&err, SecurityError::Forbidden { .. }), "{err:?}");
    let core: keel_core::Error = err.into();
    assert_eq!(core.kind(), keel_core::ErrorKind::Forbidden);
    assert!(core.to_string().contains("same tenant"), "{core}");

    let clerk = Principal::new("bob").with_tenant("acme").with_role("clerk");
    policy
        .decide(&clerk, "order:read", &acme_order())
        .await
        .into_result()
        .unwrap();
}
