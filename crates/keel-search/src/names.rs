//! Validated names: index names, document ids and attribute names, and the
//! size limits every engine applies before it writes.

use std::fmt;

use serde_json::Value;

use crate::error::{Result, SearchError, truncate};

/// The longest index name, in bytes (Meilisearch's limit).
pub const MAX_INDEX_NAME_LEN: usize = 400;

/// The longest document id, in bytes (Meilisearch accepts up to 511).
pub const MAX_DOCUMENT_ID_LEN: usize = 511;

/// The longest attribute name accepted in filters, sorts, facets and
/// settings, in bytes.
pub const MAX_FIELD_LEN: usize = 255;

fn allowed(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_'
}

/// The name of a search index: 1 to 400 bytes of `[A-Za-z0-9_-]`.
///
/// ```
/// use keel_search::IndexName;
///
/// assert!(IndexName::new("orders_v2").is_ok());
/// assert!(IndexName::new("orders v2").is_err());
/// assert!(IndexName::new("../etc").is_err());
/// ```
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IndexName(String);

impl IndexName {
    /// Validates `name`.
    ///
    /// # Errors
    ///
    /// [`SearchError::InvalidIndexName`] for an empty or too long name or a
    /// character outside `[A-Za-z0-9_-]`.
    pub fn new(name: impl Into<String>) -> Result<Self> {
        let name = name.into();
        let bad = |reason| SearchError::InvalidIndexName {
            name: truncate(&name, 64),
            reason,
        };
        if name.is_empty() {
            return Err(bad("the name is empty"));
        }
        if name.len() > MAX_INDEX_NAME_LEN {
            return Err(bad("the name is longer than 400 bytes"));
        }
        if !name.chars().all(allowed) {
            return Err(bad("only ASCII letters, digits, '-' and '_' are allowed"));
        }
        Ok(Self(name))
    }

    /// The name as text.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for IndexName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for IndexName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IndexName({})", self.0)
    }
}

impl AsRef<str> for IndexName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl TryFrom<&str> for IndexName {
    type Error = SearchError;
    fn try_from(value: &str) -> Result<Self> {
        Self::new(value)
    }
}

/// A document's id: 1 to 511 bytes of `[A-Za-z0-9_-]`. In a document it may
/// be a JSON string or a non-negative integer.
///
/// ```
/// use keel_search::DocumentId;
///
/// assert_eq!(DocumentId::new("order-42").unwrap().as_str(), "order-42");
/// assert!(DocumentId::new("order/42").is_err());
/// assert!(DocumentId::new("").is_err());
/// ```
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DocumentId(String);

impl DocumentId {
    /// Validates `id`.
    ///
    /// # Errors
    ///
    /// [`SearchError::InvalidDocumentId`] for an empty or too long id or a
    /// character outside `[A-Za-z0-9_-]`.
    pub fn new(id: impl Into<String>) -> Result<Self> {
        let id = id.into();
        let bad = |reason: &str| SearchError::InvalidDocumentId {
            id: truncate(&id, 64),
            reason: reason.to_owned(),
        };
        if id.is_empty() {
            return Err(bad("the id is empty"));
        }
        if id.len() > MAX_DOCUMENT_ID_LEN {
            return Err(bad("the id is longer than 511 bytes"));
        }
        if !id.chars().all(allowed) {
            return Err(bad("only ASCII letters, digits, '-' and '_' are allowed"));
        }
        Ok(Self(id))
    }

    /// The id found in a document's primary-key field.
    ///
    /// # Errors
    ///
    /// [`SearchError::InvalidDocumentId`] when the field is missing, is not
    /// a string or a non-negative integer, or holds an invalid id.
    pub fn from_value(primary_key: &str, value: Option<&Value>) -> Result<Self> {
        match value {
            Some(Value::String(s)) => Self::new(s.clone()),
            Some(Value::Number(n)) if n.is_u64() => Self::new(n.to_string()),
            Some(other) => Err(SearchError::InvalidDocumentId {
                id: truncate(&other.to_string(), 64),
                reason: format!(
                    "the {primary_key} field must be a string or a non-negative integer"
                ),
            }),
            None => Err(SearchError::InvalidDocumentId {
                id: String::new(),
                reason: format!("the document has no {primary_key} field"),
            }),
        }
    }

    /// The id as text.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DocumentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for DocumentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DocumentId({})", self.0)
    }
}

impl AsRef<str> for DocumentId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// Checks an attribute name used in a filter, sort, facet list or setting:
/// 1 to 255 bytes of `[A-Za-z0-9_-]`, with `.` between nested names (and
/// `*` alone, for "every attribute", where the caller allows it).
pub(crate) fn check_field(field: &str) -> Result<()> {
    let bad = |reason| SearchError::InvalidField {
        field: truncate(field, 64),
        reason,
    };
    if field.is_empty() {
        return Err(bad("the name is empty"));
    }
    if field.len() > MAX_FIELD_LEN {
        return Err(bad("the name is longer than 255 bytes"));
    }
    if field
        .split('.')
        .any(|part| part.is_empty() || !part.chars().all(allowed))
    {
        return Err(bad(
            "only ASCII letters, digits, '-', '_' and '.' between names are allowed",
        ));
    }
    Ok(())
}

/// The sizes every engine refuses before writing anything.
///
/// The defaults stay well under Meilisearch's own payload limit (100 MB),
/// so a refused write is refused by Keel, with a clear error, and never
/// half-applied by the engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limits {
    /// The largest document, as JSON (default 1 MiB).
    pub max_document_bytes: usize,
    /// The most documents in one write (default 10 000).
    pub max_batch_documents: usize,
    /// The largest write, as JSON (default 20 MiB).
    pub max_batch_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_document_bytes: 1024 * 1024,
            max_batch_documents: 10_000,
            max_batch_bytes: 20 * 1024 * 1024,
        }
    }
}

impl Limits {
    /// Sets the largest document.
    #[must_use]
    pub fn max_document_bytes(mut self, bytes: usize) -> Self {
        self.max_document_bytes = bytes;
        self
    }

    /// Sets the most documents in one write.
    #[must_use]
    pub fn max_batch_documents(mut self, n: usize) -> Self {
        self.max_batch_documents = n;
        self
    }

    /// Sets the largest write.
    #[must_use]
    pub fn max_batch_bytes(mut self, bytes: usize) -> Self {
        self.max_batch_bytes = bytes;
        self
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn index_names() {
        assert!(IndexName::new("a").is_ok());
        assert!(IndexName::new("A-b_9").is_ok());
        for bad in ["", "a b", "a/b", "a.b", "é", "a\0", "a\"b"] {
            assert!(
                matches!(
                    IndexName::new(bad),
                    Err(SearchError::InvalidIndexName { .. })
                ),
                "{bad:?}"
            );
        }
        assert!(IndexName::new("x".repeat(400)).is_ok());
        assert!(IndexName::new("x".repeat(401)).is_err());
    }

    #[test]
    fn document_ids_from_values() {
        assert_eq!(
            DocumentId::from_value("id", Some(&json!("a-1")))
                .unwrap()
                .as_str(),
            "a-1"
        );
        assert_eq!(
            DocumentId::from_value("id", Some(&json!(42)))
                .unwrap()
                .as_str(),
            "42"
        );
        for bad in [
            json!(-1),
            json!(1.5),
            json!(true),
            json!(null),
            json!("a b"),
            json!({}),
        ] {
            assert!(DocumentId::from_value("id", Some(&bad)).is_err(), "{bad}");
        }
        assert!(DocumentId::from_value("id", None).is_err());
        assert!(DocumentId::new("x".repeat(512)).is_err());
    }

    #[test]
    fn fields() {
        assert!(check_field("price").is_ok());
        assert!(check_field("author.name").is_ok());
        for bad in ["", "a b", "a.", ".a", "a..b", "a=1", "a\"", "a OR b", "*"] {
            assert!(check_field(bad).is_err(), "{bad:?}");
        }
    }
}
