//! Secret references: a value that says "read me from the secret named X".
//!
//! Two spellings, anywhere in any layer:
//!
//! * a table `{ secret = "cursor-key" }` (TOML files);
//! * a string `secret://cursor-key` (files and environment variables).
//!
//! After the other layers are merged, every reference left in the tree is
//! read through the [`SecretProvider`](keel_security::SecretProvider) and
//! replaced by the secret's value: the last layer.

use figment::value::{Dict, Value};

/// The scheme of the string spelling.
pub const SECRET_SCHEME: &str = "secret://";
/// The key of the table spelling.
pub const SECRET_KEY: &str = "secret";

/// One reference found in the tree.
pub(crate) struct Reference {
    /// The dotted key that holds it.
    pub(crate) key: String,
    /// The secret's name, or why the reference is malformed.
    pub(crate) name: Result<String, &'static str>,
}

/// Every reference in `dict`, depth first.
pub(crate) fn find(dict: &Dict, prefix: &str, out: &mut Vec<Reference>) {
    for (k, v) in dict {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            Value::Dict(_, d) if d.contains_key(SECRET_KEY) => {
                let name = match (d.len(), d.get(SECRET_KEY)) {
                    (1, Some(Value::String(_, name))) if !name.trim().is_empty() => {
                        Ok(name.trim().to_owned())
                    }
                    _ => Err("a secret reference is { secret = \"name\" } and nothing else"),
                };
                out.push(Reference { key, name });
            }
            Value::Dict(_, d) => find(d, &key, out),
            Value::String(_, s) => {
                if let Some(name) = s.trim().strip_prefix(SECRET_SCHEME) {
                    let name = if name.trim().is_empty() {
                        Err("a secret reference is secret://name")
                    } else {
                        Ok(name.trim().to_owned())
                    };
                    out.push(Reference { key, name });
                }
            }
            _ => {}
        }
    }
}
