//! Secrets from a directory of files (Kubernetes secret volumes, Cloud Run
//! secret mounts, Docker secrets).

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use tokio::io::AsyncReadExt as _;

use super::{SecretProvider, check_name};
use crate::Secret;
use crate::error::{Result, SecurityError};

/// The largest secret file read, in bytes.
const MAX_SECRET_BYTES: u64 = 64 * 1024;

/// Reads each secret from a file named like it in one directory, the shape
/// Kubernetes and Cloud Run mount secrets in.
///
/// The file is read on every call, so a rotated mount is seen at once (wrap
/// in [`CachedSecrets`](super::CachedSecrets) to read less often). One
/// trailing line break is removed, since files written with `echo` end in
/// one; any other whitespace is kept. Names cannot leave the directory:
/// separators and leading dots (Kubernetes' `..data` links) are refused.
#[derive(Debug, Clone)]
pub struct FileSecrets {
    dir: PathBuf,
}

impl FileSecrets {
    /// Reads secrets from files in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The directory secrets are read from.
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

#[async_trait]
impl SecretProvider for FileSecrets {
    async fn get(&self, name: &str) -> Result<Secret<String>> {
        check_name(name)?;
        let path = self.dir.join(name);
        let unavailable = |source: std::io::Error| SecurityError::SecretUnavailable {
            name: name.to_owned(),
            source: Box::new(source),
        };
        let file = match tokio::fs::File::open(&path).await {
            Ok(file) => file,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(SecurityError::SecretNotFound {
                    name: name.to_owned(),
                });
            }
            Err(e) => return Err(unavailable(e)),
        };
        let mut bytes = Vec::new();
        file.take(MAX_SECRET_BYTES + 1)
            .read_to_end(&mut bytes)
            .await
            .map_err(unavailable)?;
        if bytes.len() as u64 > MAX_SECRET_BYTES {
            return Err(SecurityError::SecretInvalid {
                name: name.to_owned(),
                reason: "the file is larger than 64 KiB",
            });
        }
        let mut value = String::from_utf8(bytes).map_err(|_| SecurityError::SecretInvalid {
            name: name.to_owned(),
            reason: "the value is not UTF-8",
        })?;
        if value.ends_with('\n') {
            value.pop();
            if value.ends_with('\r') {
                value.pop();
            }
        }
        Ok(Secret::new(value))
    }
}
