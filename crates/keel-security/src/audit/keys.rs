//! Keyed mode: an HMAC-SHA256 per record, so that whoever can write the
//! audit tables but does not hold the key cannot forge a chain that
//! verifies.

use std::fmt;
use std::sync::Arc;

use hmac::{Hmac, Mac};
use keel_telemetry::Secret;
use sha2::Sha256;

use crate::error::SecurityError;

/// The shortest key accepted, in bytes: HMAC-SHA256 gains nothing from
/// longer keys and loses strength with shorter ones.
pub const MIN_KEY_BYTES: usize = 32;
/// The longest key id accepted, in bytes (the column's limit too).
pub const MAX_KEY_ID_BYTES: usize = 64;

/// Names the MAC's input layout, apart from the hash chain's.
const MAC_DOMAIN: &[u8] = b"keel.audit.mac.v1\0";

/// One audit MAC key: an id, stored with every record it seals, and the
/// secret key material.
///
/// The id is not secret; it tells [`verify`](keel_core::AuditLog::verify)
/// which key sealed a record, so keys can be rotated while older records
/// stay verifiable.
#[derive(Clone)]
pub struct AuditKey {
    id: String,
    key: Secret<Vec<u8>>,
}

impl fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditKey")
            .field("id", &self.id)
            .field("key", &self.key)
            .finish()
    }
}

impl AuditKey {
    /// A key named `id` (1 to 64 bytes, printable ASCII) with at least
    /// [`MIN_KEY_BYTES`] bytes of secret material.
    ///
    /// # Errors
    ///
    /// [`SecurityError::Config`] for an unusable id or a short key; the
    /// message never contains key material.
    pub fn new(id: impl Into<String>, key: Secret<Vec<u8>>) -> Result<Self, SecurityError> {
        let id = id.into();
        if id.is_empty() || id.len() > MAX_KEY_ID_BYTES || !id.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(SecurityError::Config(format!(
                "an audit key id must be 1 to {MAX_KEY_ID_BYTES} printable ASCII characters"
            )));
        }
        if key.expose_secret().len() < MIN_KEY_BYTES {
            return Err(SecurityError::Config(format!(
                "audit key {id:?} is shorter than {MIN_KEY_BYTES} bytes"
            )));
        }
        Ok(Self { id, key })
    }

    /// The key's id.
    #[must_use]
    pub fn id(&self) -> &str {
        &self.id
    }

    fn mac(&self) -> Hmac<Sha256> {
        // HMAC takes keys of any length; the length was checked anyway.
        <Hmac<Sha256> as Mac>::new_from_slice(self.key.expose_secret())
            .unwrap_or_else(|_| unreachable!("HMAC accepts every key length"))
    }

    /// The MAC of the record at `sequence` with `hash` (lower-case hex).
    pub(crate) fn seal(&self, sequence: u64, hash: &str) -> RecordMac {
        let mut mac = self.mac();
        feed(&mut mac, &self.id, sequence, hash);
        RecordMac {
            key_id: self.id.clone(),
            mac: super::chain::hex(&mac.finalize().into_bytes()),
        }
    }

    /// Whether `mac` (lower-case hex) is this key's MAC of the record, in
    /// constant time.
    fn check(&self, sequence: u64, hash: &str, mac_hex: &str) -> bool {
        let Some(expected) = unhex(mac_hex) else {
            return false;
        };
        let mut mac = self.mac();
        feed(&mut mac, &self.id, sequence, hash);
        mac.verify_slice(&expected).is_ok()
    }
}

fn feed(mac: &mut Hmac<Sha256>, key_id: &str, sequence: u64, hash: &str) {
    mac.update(MAC_DOMAIN);
    mac.update(&(key_id.len() as u64).to_be_bytes());
    mac.update(key_id.as_bytes());
    mac.update(&sequence.to_be_bytes());
    mac.update(&(hash.len() as u64).to_be_bytes());
    mac.update(hash.as_bytes());
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if text.len() != 64 {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    text.as_bytes()
        .chunks_exact(2)
        .map(|pair| Some(digit(pair[0])? << 4 | digit(pair[1])?))
        .collect()
}

/// A record's seal in keyed mode: the id of the key that made it and the
/// HMAC-SHA256 (lower-case hex) over the record's sequence and hash.
///
/// The hash already covers the record's content, time and predecessor, so
/// the MAC covers them too.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct RecordMac {
    /// The sealing key's id.
    pub key_id: String,
    /// The MAC, 64 lower-case hex digits.
    pub mac: String,
}

/// The keys of a keyed audit log: the current key, which seals new
/// records, and earlier keys, which only verify the records they sealed.
///
/// An unkeyed log (no `AuditKeys`) writes no MACs and checks none. A keyed
/// log seals every record it appends and its `verify` refuses a record
/// whose MAC does not match, names an unknown key, or is missing at or
/// after [`required_from`](Self::required_from) (by default every record:
/// otherwise someone who strips the MACs and rewrites the plain chain would
/// pass).
///
/// ```
/// use keel_security::Secret;
/// use keel_security::audit::{AuditKey, AuditKeys};
///
/// let old = AuditKey::new("2026-01", Secret::new(vec![1; 32]))?;
/// let new = AuditKey::new("2026-06", Secret::new(vec![2; 32]))?;
/// let keys = AuditKeys::new(new, [old])?;
/// assert_eq!(keys.current().id(), "2026-06");
/// # Ok::<_, keel_security::SecurityError>(())
/// ```
#[derive(Clone, Debug)]
pub struct AuditKeys {
    current: AuditKey,
    previous: Vec<AuditKey>,
    required_from: u64,
}

impl AuditKeys {
    /// Seals with `current`; verifies with `current` and `previous`.
    ///
    /// # Errors
    ///
    /// [`SecurityError::Config`] when two keys share an id.
    pub fn new(
        current: AuditKey,
        previous: impl IntoIterator<Item = AuditKey>,
    ) -> Result<Self, SecurityError> {
        let previous: Vec<AuditKey> = previous.into_iter().collect();
        for (i, key) in previous.iter().enumerate() {
            if key.id == current.id || previous[..i].iter().any(|k| k.id == key.id) {
                return Err(SecurityError::Config(format!(
                    "audit key id {:?} is given twice",
                    key.id
                )));
            }
        }
        Ok(Self {
            current,
            previous,
            required_from: 1,
        })
    }

    /// A keyring of one key.
    #[must_use]
    pub fn single(key: AuditKey) -> Self {
        Self {
            current: key,
            previous: Vec::new(),
            required_from: 1,
        }
    }

    /// Records before `sequence` may lack a MAC: for a log that was kept
    /// unkeyed before keyed mode was turned on, pass the first sequence
    /// written with a key (the head's sequence plus one at the switch).
    /// Records from `sequence` on must carry a valid MAC; a MAC that is
    /// present is checked wherever it is.
    #[must_use]
    pub fn required_from(mut self, sequence: u64) -> Self {
        self.required_from = sequence.max(1);
        self
    }

    /// The first sequence that must carry a MAC.
    #[must_use]
    pub fn mac_required_from(&self) -> u64 {
        self.required_from
    }

    /// The key that seals new records.
    #[must_use]
    pub fn current(&self) -> &AuditKey {
        &self.current
    }

    fn find(&self, id: &str) -> Option<&AuditKey> {
        std::iter::once(&self.current)
            .chain(&self.previous)
            .find(|k| k.id == id)
    }

    /// Checks a record's seal; `Err` says why it fails.
    pub(crate) fn check(
        &self,
        sequence: u64,
        hash: &str,
        mac: Option<&RecordMac>,
    ) -> Result<(), String> {
        let Some(mac) = mac else {
            if sequence >= self.required_from {
                return Err("MAC missing: the record carries no MAC in a keyed log".to_owned());
            }
            return Ok(());
        };
        let Some(key) = self.find(&mac.key_id) else {
            return Err(format!(
                "unknown key: the record is sealed with key {:?}, which is not in the keyring",
                crate::error::truncate(&mac.key_id, MAX_KEY_ID_BYTES)
            ));
        };
        if !key.check(sequence, hash, &mac.mac) {
            return Err(format!(
                "MAC mismatch: the record's MAC does not match key {:?}",
                key.id
            ));
        }
        Ok(())
    }
}

/// The keys a store holds, shared with its clones and replaceable while it
/// runs (rotation without a restart).
#[derive(Debug, Default)]
pub(crate) struct KeySlot(std::sync::RwLock<Option<Arc<AuditKeys>>>);

impl KeySlot {
    pub(crate) fn get(&self) -> Option<Arc<AuditKeys>> {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub(crate) fn set(&self, keys: Option<AuditKeys>) {
        *self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = keys.map(Arc::new);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: &str, byte: u8) -> AuditKey {
        AuditKey::new(id, Secret::new(vec![byte; 32])).unwrap()
    }

    #[test]
    fn keys_are_checked_and_never_printed() {
        assert!(AuditKey::new("k", Secret::new(vec![0; 31])).is_err());
        assert!(AuditKey::new("", Secret::new(vec![0; 32])).is_err());
        assert!(AuditKey::new("a b", Secret::new(vec![0; 32])).is_err());
        assert!(AuditKey::new("x".repeat(65), Secret::new(vec![0; 32])).is_err());
        let k = AuditKey::new(
            "k1",
            Secret::new(b"0123456789abcdef0123456789abcdef".to_vec()),
        )
        .unwrap();
        let printed = format!("{k:?} {:?}", AuditKeys::single(k.clone()));
        assert!(!printed.contains("0123456789"), "{printed}");
        assert!(AuditKeys::new(key("a", 1), [key("a", 2)]).is_err());
        assert!(AuditKeys::new(key("a", 1), [key("b", 2), key("b", 3)]).is_err());
    }

    #[test]
    fn seals_verify_with_their_own_key_only() {
        let hash = "ab".repeat(32);
        let a = key("a", 1);
        let b = key("b", 2);
        let seal = a.seal(3, &hash);
        assert_eq!(seal.key_id, "a");
        assert_eq!(seal.mac.len(), 64);
        let ring = AuditKeys::new(b.clone(), [a.clone()]).unwrap();
        assert_eq!(ring.check(3, &hash, Some(&seal)), Ok(()));
        // Another sequence, hash or key does not verify.
        assert!(
            ring.check(4, &hash, Some(&seal))
                .unwrap_err()
                .starts_with("MAC mismatch")
        );
        let other = "cd".repeat(32);
        assert!(ring.check(3, &other, Some(&seal)).is_err());
        let relabelled = RecordMac {
            key_id: "b".into(),
            mac: seal.mac.clone(),
        };
        assert!(ring.check(3, &hash, Some(&relabelled)).is_err());
        let unknown = AuditKeys::single(b);
        assert!(
            unknown
                .check(3, &hash, Some(&seal))
                .unwrap_err()
                .starts_with("unknown key")
        );
        let garbage = RecordMac {
            key_id: "a".into(),
            mac: "zz".repeat(32),
        };
        assert!(ring.check(3, &hash, Some(&garbage)).is_err());
        assert!(
            ring.check(3, &hash, None)
                .unwrap_err()
                .starts_with("MAC missing")
        );
        let lenient = ring.required_from(4);
        assert_eq!(lenient.check(3, &hash, None), Ok(()));
        assert!(lenient.check(4, &hash, None).is_err());
    }

    #[test]
    fn a_known_mac_stays_fixed() {
        // HMAC-SHA256 is deterministic: this guards the input layout.
        let seal = key("k1", 7).seal(1, &"0".repeat(64));
        assert_eq!(seal.mac, KNOWN_MAC);
    }

    // Computed independently (Python's hmac module) from the layout in `feed`.
    const KNOWN_MAC: &str = "d8b136049b045bc1bde18dd1c953960e5b3747b2e3ac837dc309f84655d7e3f7";
}
