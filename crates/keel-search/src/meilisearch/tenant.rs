//! Tenant tokens: short-lived, signed search keys that force a filter on
//! every search.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keel_security::{Secret, SecretProvider};
use serde_json::{Map, Value};

use crate::error::{Result, SearchError};
use crate::filter::Filter;
use crate::names::IndexName;

/// What a tenant token lets its holder search: per index, an optional
/// filter every search of that index is forced through.
///
/// ```
/// use keel_search::Filter;
/// use keel_search::meilisearch::TenantRules;
///
/// let rules = TenantRules::new()
///     .index("orders", Some(Filter::eq("tenant_id", "acme")))
///     .unwrap();
/// assert_eq!(rules.to_json().unwrap()["orders"]["filter"], r#"tenant_id = "acme""#);
/// ```
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TenantRules {
    rules: BTreeMap<IndexName, Option<Filter>>,
}

impl TenantRules {
    /// No index at all.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Allows searching `index`, through `filter` when given.
    ///
    /// # Errors
    ///
    /// [`SearchError::InvalidIndexName`].
    pub fn index(mut self, index: &str, filter: Option<Filter>) -> Result<Self> {
        self.rules.insert(IndexName::new(index)?, filter);
        Ok(self)
    }

    /// The `searchRules` claim.
    ///
    /// # Errors
    ///
    /// As [`Filter::to_expression`], and [`SearchError::InvalidArgument`]
    /// when no index is allowed.
    pub fn to_json(&self) -> Result<Value> {
        if self.rules.is_empty() {
            return Err(SearchError::invalid(
                "search_rules",
                "a tenant token must allow at least one index",
            ));
        }
        let mut out = Map::new();
        for (index, filter) in &self.rules {
            let rule = match filter
                .as_ref()
                .map(Filter::to_expression)
                .transpose()?
                .flatten()
            {
                Some(expr) => serde_json::json!({ "filter": expr }),
                None => serde_json::json!({}),
            };
            out.insert(index.to_string(), rule);
        }
        Ok(Value::Object(out))
    }
}

/// Signs Meilisearch tenant tokens: short-lived JWTs (HS256) that let a
/// client search only what [`TenantRules`] allow, signed with a search API
/// key that never leaves the server.
///
/// Signing uses the workspace's one JWT crate (`jsonwebtoken`).
#[derive(Clone)]
pub struct TenantTokenSigner {
    api_key_uid: String,
    api_key: Secret<String>,
}

impl std::fmt::Debug for TenantTokenSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantTokenSigner")
            .field("api_key_uid", &self.api_key_uid)
            .finish_non_exhaustive()
    }
}

impl TenantTokenSigner {
    /// A signer for the API key `api_key` whose uid is `api_key_uid` (both
    /// as Meilisearch's `/keys` lists them; the key needs the `search`
    /// action on the indexes the tokens allow).
    ///
    /// # Errors
    ///
    /// [`SearchError::Config`] when the uid is not a UUID or the key is
    /// shorter than 8 characters.
    pub fn new(api_key_uid: &str, api_key: Secret<String>) -> Result<Self> {
        if uuid::Uuid::parse_str(api_key_uid).is_err() {
            return Err(SearchError::Config(format!(
                "the API key uid {api_key_uid:?} is not a UUID"
            )));
        }
        if api_key.expose_secret().len() < 8 {
            return Err(SearchError::Config(
                "the API key is too short to sign tenant tokens".to_owned(),
            ));
        }
        Ok(Self {
            api_key_uid: api_key_uid.to_owned(),
            api_key,
        })
    }

    /// A signer whose key is the secret `secret_name` of `secrets`.
    ///
    /// # Errors
    ///
    /// [`SearchError::Config`] when the secret cannot be read, or as
    /// [`new`](Self::new).
    pub async fn from_secret(
        api_key_uid: &str,
        secrets: &dyn SecretProvider,
        secret_name: &str,
    ) -> Result<Self> {
        let key = secrets.get(secret_name).await.map_err(|e| {
            SearchError::Config(format!(
                "cannot read the tenant-token signing key from secret {secret_name:?}: {e}"
            ))
        })?;
        Self::new(api_key_uid, key)
    }

    /// A token allowing `rules`, valid for `ttl`.
    ///
    /// # Errors
    ///
    /// As [`TenantRules::to_json`]; [`SearchError::InvalidArgument`] for a
    /// zero `ttl`.
    pub fn sign(&self, rules: &TenantRules, ttl: Duration) -> Result<Secret<String>> {
        if ttl.is_zero() {
            return Err(SearchError::invalid(
                "ttl",
                "a tenant token must live a while",
            ));
        }
        let exp = SystemTime::now()
            .checked_add(ttl)
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_secs())
            .ok_or_else(|| SearchError::invalid("ttl", "the expiry is out of range"))?;
        let claims = serde_json::json!({
            "searchRules": rules.to_json()?,
            "apiKeyUid": self.api_key_uid,
            "exp": exp,
        });
        let token = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(self.api_key.expose_secret().as_bytes()),
        )
        .map_err(|e| SearchError::Config(format!("cannot sign the tenant token: {e}")))?;
        Ok(Secret::from(token))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_uids_are_checked() {
        assert!(TenantTokenSigner::new("not-a-uuid", Secret::from("0123456789")).is_err());
        assert!(
            TenantTokenSigner::new(
                "2f2d1b9e-1f43-4b1e-9a3f-8d0f7f3f6a10",
                Secret::from("short")
            )
            .is_err()
        );
    }

    #[test]
    fn tokens_carry_the_rules() {
        let signer = TenantTokenSigner::new(
            "2f2d1b9e-1f43-4b1e-9a3f-8d0f7f3f6a10",
            Secret::from("a-long-enough-key"),
        )
        .unwrap();
        let rules = TenantRules::new()
            .index("orders", Some(Filter::eq("tenant", "a\"b")))
            .unwrap();
        let token = signer.sign(&rules, Duration::from_secs(60)).unwrap();
        let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
        validation.required_spec_claims.clear();
        let data = jsonwebtoken::decode::<Value>(
            token.expose_secret(),
            &jsonwebtoken::DecodingKey::from_secret(b"a-long-enough-key"),
            &validation,
        )
        .unwrap();
        assert_eq!(
            data.claims["searchRules"]["orders"]["filter"],
            r#"tenant = "a\"b""#
        );
        assert!(TenantRules::new().to_json().is_err());
    }
}
