//! Opaque, tamper-evident keyset cursors.
//!
//! A cursor is `base64url(payload) "." base64url(HMAC-SHA256(payload))`. The
//! payload holds a format version, the fingerprint of the query that issued
//! it (its table, filters, sort order and deleted scope) and the sort-key
//! values of the last row of the page. Decoding checks, in order: the shape,
//! the signature (an altered cursor is [`RepositoryError::TamperedCursor`]),
//! the query (a cursor replayed against another query is
//! [`RepositoryError::CursorMismatch`]) and the values against the sort
//! fields' types.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::DateTime;
use hmac::{Hmac, Mac};
use keel_core::Cursor;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use std::sync::atomic::{AtomicBool, Ordering};
use uuid::Uuid;

use crate::error::{RepositoryError, Result};
use crate::value::{ColumnType, Value};

/// The longest cursor accepted; longer input is refused before decoding.
const MAX_CURSOR_LEN: usize = 16 * 1024;

/// The key used when no secret is configured: cursors are then checksummed
/// (tamper-evident) but anyone who reads this source can forge one.
const PUBLIC_KEY: &[u8] = b"keel-repository/cursor/v1";

/// Set once a cursor has been signed with [`PUBLIC_KEY`] and said so.
static PUBLIC_KEY_WARNED: AtomicBool = AtomicBool::new(false);

/// The key that signs pagination cursors (HMAC-SHA256).
///
/// Give every instance of a service the same key, from a secret store
/// (`keel-config` reads it from `repository.cursor_key` through a
/// `SecretProvider`). A repository built without one signs with a public
/// key written in Keel's source, so anyone can forge a cursor; that key has
/// to be asked for by name, [`CursorKey::insecure_development_key`], and a
/// repository that falls back to it logs a warning the first time it signs
/// a cursor.
///
/// ```
/// use keel_repository::CursorKey;
///
/// let key = CursorKey::new(b"0123456789abcdef0123456789abcdef")?;
/// assert!(!key.is_public());
/// assert!(CursorKey::new(b"short").is_err());
/// assert!(CursorKey::insecure_development_key().is_public());
/// # Ok::<_, keel_repository::CursorKeyTooShort>(())
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct CursorKey {
    key: Vec<u8>,
}

impl CursorKey {
    /// The shortest key accepted, in bytes.
    pub const MIN_BYTES: usize = 32;

    /// A secret key of at least [`MIN_BYTES`](Self::MIN_BYTES) bytes.
    ///
    /// # Errors
    ///
    /// [`CursorKeyTooShort`] for a shorter key.
    pub fn new(secret: impl AsRef<[u8]>) -> std::result::Result<Self, CursorKeyTooShort> {
        let key = secret.as_ref();
        if key.len() < Self::MIN_BYTES {
            return Err(CursorKeyTooShort);
        }
        Ok(Self { key: key.to_vec() })
    }

    /// The public key written in Keel's source. Cursors signed with it are
    /// tamper-evident against accidents only: anyone can forge them. For
    /// development and tests, never production.
    #[must_use]
    pub fn insecure_development_key() -> Self {
        Self {
            key: PUBLIC_KEY.to_vec(),
        }
    }

    /// Whether this is the public development key.
    #[must_use]
    pub fn is_public(&self) -> bool {
        self.key == PUBLIC_KEY
    }
}

impl std::fmt::Debug for CursorKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.is_public() {
            "CursorKey(<public development key>)"
        } else {
            "CursorKey(<redacted>)"
        })
    }
}

/// [`CursorKey::new`] was given fewer than [`CursorKey::MIN_BYTES`] bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("a cursor key must be at least {} bytes", CursorKey::MIN_BYTES)]
pub struct CursorKeyTooShort;

/// Signs and checks cursors with one key.
#[derive(Clone)]
pub(crate) struct CursorCodec {
    key: Vec<u8>,
    /// Whether the key is the public one because nobody chose a key (as
    /// opposed to asking for it by name): signing then warns once.
    fallback: bool,
}

impl std::fmt::Debug for CursorCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CursorCodec").finish_non_exhaustive()
    }
}

impl Default for CursorCodec {
    /// The public key, because no key was configured.
    fn default() -> Self {
        Self {
            key: PUBLIC_KEY.to_vec(),
            fallback: true,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct Payload {
    v: u8,
    q: String,
    k: Vec<Part>,
}

/// One sort-key value, in a compact and exact form (floats by their bits,
/// timestamps in microseconds).
#[derive(Serialize, Deserialize)]
enum Part {
    B(bool),
    I(i64),
    F(u64),
    S(String),
    U(Uuid),
    T(i64),
}

impl CursorCodec {
    pub(crate) fn with_secret(secret: &[u8]) -> Self {
        Self {
            key: secret.to_vec(),
            fallback: false,
        }
    }

    pub(crate) fn with_key(key: &CursorKey) -> Self {
        Self {
            key: key.key.clone(),
            fallback: false,
        }
    }

    /// Says, once per process, that cursors are signed with the public key
    /// because none was configured.
    fn warn_if_fallback(&self) {
        if self.fallback && !PUBLIC_KEY_WARNED.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "keel-repository signs pagination cursors with the public development key, \
                 so clients can forge them: configure a key (with_cursor_key, or \
                 repository.cursor_key in keel-config)"
            );
        }
    }

    fn mac(&self) -> Hmac<Sha256> {
        Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC accepts keys of any length")
    }

    pub(crate) fn encode(&self, fingerprint: &[u8; 16], key: &[Value]) -> Result<Cursor> {
        self.warn_if_fallback();
        let parts = key
            .iter()
            .map(|v| {
                Ok(match v {
                    Value::Bool(b) => Part::B(*b),
                    Value::I32(i) => Part::I(i64::from(*i)),
                    Value::I64(i) => Part::I(*i),
                    Value::F64(x) => Part::F(x.to_bits()),
                    Value::Text(s) => Part::S(s.clone()),
                    Value::Uuid(u) => Part::U(*u),
                    Value::Timestamp(t) => Part::T(t.timestamp_micros()),
                    other => {
                        return Err(RepositoryError::Decode {
                            entity: "cursor",
                            column: String::new(),
                            reason: format!("{other:?} cannot be a sort key"),
                        });
                    }
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let payload = serde_json::to_vec(&Payload {
            v: 1,
            q: hex(fingerprint),
            k: parts,
        })
        .map_err(|e| RepositoryError::malformed(e.to_string()))?;
        let mut mac = self.mac();
        mac.update(&payload);
        let tag = mac.finalize().into_bytes();
        Ok(Cursor::new(format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(&payload),
            URL_SAFE_NO_PAD.encode(tag)
        )))
    }

    pub(crate) fn decode(
        &self,
        cursor: &Cursor,
        fingerprint: &[u8; 16],
        types: &[ColumnType],
    ) -> Result<Vec<Value>> {
        let s = cursor.as_str();
        if s.len() > MAX_CURSOR_LEN {
            return Err(RepositoryError::malformed("too long"));
        }
        let (body, tag) = s
            .split_once('.')
            .ok_or_else(|| RepositoryError::malformed("expected PAYLOAD.SIGNATURE"))?;
        let payload = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| RepositoryError::malformed("payload is not base64url"))?;
        let tag = URL_SAFE_NO_PAD
            .decode(tag)
            .map_err(|_| RepositoryError::malformed("signature is not base64url"))?;
        let mut mac = self.mac();
        mac.update(&payload);
        mac.verify_slice(&tag)
            .map_err(|_| RepositoryError::TamperedCursor)?;
        let payload: Payload = serde_json::from_slice(&payload)
            .map_err(|_| RepositoryError::malformed("unreadable payload"))?;
        if payload.v != 1 {
            return Err(RepositoryError::malformed(format!(
                "unknown cursor version {}",
                payload.v
            )));
        }
        if payload.q != hex(fingerprint) {
            return Err(RepositoryError::CursorMismatch);
        }
        if payload.k.len() != types.len() {
            return Err(RepositoryError::CursorMismatch);
        }
        payload
            .k
            .into_iter()
            .zip(types)
            .map(|(part, ty)| {
                let value = match (ty, part) {
                    (ColumnType::Bool, Part::B(b)) => Value::Bool(b),
                    (ColumnType::I32, Part::I(i)) => Value::I32(
                        i32::try_from(i)
                            .map_err(|_| RepositoryError::malformed("value out of range"))?,
                    ),
                    (ColumnType::I64, Part::I(i)) => Value::I64(i),
                    (ColumnType::F64, Part::F(bits)) => Value::F64(f64::from_bits(bits)),
                    (ColumnType::Text, Part::S(s)) => Value::Text(s),
                    (ColumnType::Uuid, Part::U(u)) => Value::Uuid(u),
                    (ColumnType::Timestamp, Part::T(t)) => Value::Timestamp(
                        DateTime::from_timestamp_micros(t)
                            .ok_or_else(|| RepositoryError::malformed("timestamp out of range"))?,
                    ),
                    _ => return Err(RepositoryError::CursorMismatch),
                };
                // A cursor signed with the public default key can be forged:
                // its values get the same checks as a filter's.
                crate::limits::check_value("cursor", &value, crate::limits::MAX_TEXT_BYTES)
                    .map_err(|_| RepositoryError::malformed("a value no row can hold"))?;
                Ok(value)
            })
            .collect()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const Q: [u8; 16] = [7; 16];
    const TYPES: [ColumnType; 2] = [ColumnType::Text, ColumnType::I64];

    fn key() -> Vec<Value> {
        vec![Value::from("a'; DROP TABLE x; --"), Value::I64(42)]
    }

    #[test]
    fn round_trips() {
        let codec = CursorCodec::default();
        let c = codec.encode(&Q, &key()).unwrap();
        assert_eq!(codec.decode(&c, &Q, &TYPES).unwrap(), key());
    }

    #[test]
    fn a_cursor_key_signs_apart_from_the_public_key_it_replaces() {
        let a = CursorCodec::with_key(&CursorKey::new([1u8; 32]).unwrap());
        let b = CursorCodec::with_key(&CursorKey::new([2u8; 32]).unwrap());
        let public = CursorCodec::with_key(&CursorKey::insecure_development_key());
        let c = a.encode(&Q, &key()).unwrap();
        assert_eq!(a.decode(&c, &Q, &TYPES).unwrap(), key());
        for other in [&b, &public, &CursorCodec::default()] {
            assert!(matches!(
                other.decode(&c, &Q, &TYPES),
                Err(RepositoryError::TamperedCursor)
            ));
        }
        // The key asked for by name is the one used when none is chosen, so
        // cursors issued before a service chose one keep decoding.
        let old = CursorCodec::default().encode(&Q, &key()).unwrap();
        assert_eq!(public.decode(&old, &Q, &TYPES).unwrap(), key());
        assert!(!public.fallback && CursorCodec::default().fallback);
    }

    #[test]
    fn cursor_keys_refuse_short_secrets_and_never_print_themselves() {
        assert_eq!(CursorKey::new([7u8; 31]), Err(CursorKeyTooShort));
        let key = CursorKey::new(b"do-not-print-me-0123456789abcdef").unwrap();
        assert!(!key.is_public());
        assert_eq!(format!("{key:?}"), "CursorKey(<redacted>)");
        assert!(CursorKey::insecure_development_key().is_public());
        assert!(CursorKeyTooShort.to_string().contains("32 bytes"));
    }

    #[test]
    fn refuses_tampering_and_replay() {
        let codec = CursorCodec::with_secret(b"s3cret");
        let c = codec.encode(&Q, &key()).unwrap();
        let (body, tag) = c.as_str().split_once('.').unwrap();

        // Flip one payload character: the signature no longer matches.
        let mut altered = body.as_bytes().to_vec();
        altered[3] = if altered[3] == b'A' { b'B' } else { b'A' };
        let altered = format!("{}.{tag}", String::from_utf8(altered).unwrap());
        assert!(matches!(
            codec.decode(&Cursor::new(altered), &Q, &TYPES),
            Err(RepositoryError::TamperedCursor)
        ));

        // Signed with another secret.
        let other = CursorCodec::default().encode(&Q, &key()).unwrap();
        assert!(matches!(
            codec.decode(&other, &Q, &TYPES),
            Err(RepositoryError::TamperedCursor)
        ));

        // Genuine, but for another query.
        assert!(matches!(
            codec.decode(&c, &[8; 16], &TYPES),
            Err(RepositoryError::CursorMismatch)
        ));

        for junk in ["", "abc", "!!!.???", "a.b.c", &"x".repeat(20_000)] {
            assert!(
                matches!(
                    codec.decode(&Cursor::new(junk), &Q, &TYPES),
                    Err(RepositoryError::MalformedCursor { .. })
                ),
                "{junk:.20}"
            );
        }
    }
}
