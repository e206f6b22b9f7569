//! Which secret, in which project, at which version.

use std::fmt;
use std::num::NonZeroU64;
use std::str::FromStr;

use crate::error::{Result, SecurityError, truncate};

/// A version of a Secret Manager secret: the newest one, a pinned number,
/// or an alias.
///
/// Parsed from `latest`, a positive number (`7`) or an alias name (a
/// letter, then up to 62 letters, digits, `-` or `_`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub enum SecretVersion {
    /// The most recently created version (Secret Manager's `latest`). A
    /// rotation that adds a version is picked up on the next read.
    #[default]
    Latest,
    /// One numbered version, which never changes value: rotation means
    /// changing the pin.
    Pinned(NonZeroU64),
    /// A version alias set on the secret (e.g. `prod`), which an operator
    /// can move from one version to another.
    Alias(String),
}

impl SecretVersion {
    /// A pinned version; `None` for 0, which Secret Manager never assigns.
    #[must_use]
    pub fn pinned(number: u64) -> Option<Self> {
        NonZeroU64::new(number).map(SecretVersion::Pinned)
    }
}

impl fmt::Display for SecretVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretVersion::Latest => f.write_str("latest"),
            SecretVersion::Pinned(number) => write!(f, "{number}"),
            SecretVersion::Alias(alias) => f.write_str(alias),
        }
    }
}

impl FromStr for SecretVersion {
    type Err = SecurityError;

    fn from_str(text: &str) -> Result<Self> {
        if text == "latest" {
            return Ok(SecretVersion::Latest);
        }
        if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
            return text
                .parse::<u64>()
                .ok()
                .and_then(SecretVersion::pinned)
                .ok_or_else(|| invalid(text, "a version number is between 1 and 2^64-1"));
        }
        let mut chars = text.chars();
        let alias = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
            && text.len() <= 63
            && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'));
        if alias {
            Ok(SecretVersion::Alias(text.to_owned()))
        } else {
            Err(invalid(
                text,
                "a version is `latest`, a positive number or an alias",
            ))
        }
    }
}

/// Names one version of one Secret Manager secret.
///
/// Parsed from the short forms a configuration file holds:
///
/// | text | secret | version | project |
/// |---|---|---|---|
/// | `db-password` | `db-password` | latest, or the configured pin | the provider's |
/// | `db-password@latest` | `db-password` | latest | the provider's |
/// | `db-password@7` | `db-password` | 7 | the provider's |
/// | `db-password@prod` | `db-password` | alias `prod` | the provider's |
/// | `projects/shared/secrets/db-password` | `db-password` | latest, or the pin | `shared` |
/// | `projects/shared/secrets/db-password/versions/7` | `db-password` | 7 | `shared` |
///
/// Secret ids are 1 to 255 ASCII letters, digits, `-` and `_`; project ids
/// are 1 to 63 lower-case letters, digits and `-` (a project number is
/// fine). Anything else is refused with [`SecurityError::SecretInvalid`]
/// before a request is made, so a name cannot smuggle a path into the URL.
///
/// ```
/// use keel_security::{SecretRef, SecretVersion};
///
/// let pinned: SecretRef = "db-password@7".parse()?;
/// assert_eq!(pinned.secret(), "db-password");
/// assert_eq!(pinned.version(), Some(&SecretVersion::pinned(7).unwrap()));
///
/// let other = SecretRef::latest("api-key")?.in_project("shared-secrets")?;
/// assert_eq!(other.to_string(), "projects/shared-secrets/secrets/api-key/versions/latest");
///
/// assert!("../etc@1".parse::<SecretRef>().is_err());
/// # Ok::<_, keel_security::SecurityError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SecretRef {
    project: Option<String>,
    secret: String,
    /// `None`: not given, so a configured pin or `latest` applies.
    version: Option<SecretVersion>,
}

impl SecretRef {
    /// The latest version of `secret`, in the provider's project.
    ///
    /// # Errors
    ///
    /// [`SecurityError::SecretInvalid`] for an id Secret Manager cannot hold.
    pub fn latest(secret: &str) -> Result<Self> {
        Self::new(secret, Some(SecretVersion::Latest))
    }

    /// Version `version` of `secret`, in the provider's project.
    ///
    /// # Errors
    ///
    /// [`SecurityError::SecretInvalid`] for an id Secret Manager cannot hold.
    pub fn new(secret: &str, version: Option<SecretVersion>) -> Result<Self> {
        check_secret_id(secret)?;
        Ok(Self {
            project: None,
            secret: secret.to_owned(),
            version,
        })
    }

    /// The same secret in another project than the provider's.
    ///
    /// # Errors
    ///
    /// [`SecurityError::SecretInvalid`] for a malformed project id.
    pub fn in_project(mut self, project: &str) -> Result<Self> {
        check_project_id(project)?;
        self.project = Some(project.to_owned());
        Ok(self)
    }

    /// The secret's id.
    #[must_use]
    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// The version asked for, if one was.
    #[must_use]
    pub fn version(&self) -> Option<&SecretVersion> {
        self.version.as_ref()
    }

    /// The project, when the reference names one.
    #[must_use]
    pub fn project(&self) -> Option<&str> {
        self.project.as_deref()
    }

    /// Fills in what the reference left open: the project and the version.
    pub(crate) fn resolve(
        &self,
        project: &str,
        location: Option<&str>,
        version: &SecretVersion,
    ) -> Resolved {
        Resolved {
            project: self.project.clone().unwrap_or_else(|| project.to_owned()),
            location: location.map(str::to_owned),
            secret: self.secret.clone(),
            version: self.version.clone().unwrap_or_else(|| version.clone()),
        }
    }
}

/// A reference with its project and version settled.
#[derive(Debug, Clone)]
pub(crate) struct Resolved {
    pub(crate) project: String,
    pub(crate) location: Option<String>,
    pub(crate) secret: String,
    pub(crate) version: SecretVersion,
}

impl Resolved {
    /// The resource name Secret Manager's API takes.
    pub(crate) fn resource_name(&self) -> String {
        match &self.location {
            None => format!(
                "projects/{}/secrets/{}/versions/{}",
                self.project, self.secret, self.version
            ),
            Some(location) => format!(
                "projects/{}/locations/{location}/secrets/{}/versions/{}",
                self.project, self.secret, self.version
            ),
        }
    }
}

impl fmt::Display for SecretRef {
    /// The short form (`db-password`, `db-password@7`) without a project,
    /// the full resource name with one.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.project, &self.version) {
            (None, None) => f.write_str(&self.secret),
            (None, Some(version)) => write!(f, "{}@{version}", self.secret),
            (Some(project), version) => {
                write!(f, "projects/{project}/secrets/{}", self.secret)?;
                match version {
                    Some(version) => write!(f, "/versions/{version}"),
                    None => Ok(()),
                }
            }
        }
    }
}

impl FromStr for SecretRef {
    type Err = SecurityError;

    fn from_str(text: &str) -> Result<Self> {
        if let Some(rest) = text.strip_prefix("projects/") {
            let parts: Vec<&str> = rest.split('/').collect();
            let (project, secret, version) = match parts.as_slice() {
                [project, "secrets", secret] => (*project, *secret, None),
                [project, "secrets", secret, "versions", version] => {
                    (*project, *secret, Some(version.parse()?))
                }
                _ => {
                    return Err(invalid(
                        text,
                        "a resource name is projects/P/secrets/S or projects/P/secrets/S/versions/V",
                    ));
                }
            };
            return Self::new(secret, version)?.in_project(project);
        }
        match text.split_once('@') {
            Some((secret, version)) => Self::new(secret, Some(version.parse()?)),
            None => Self::new(text, None),
        }
    }
}

fn check_secret_id(secret: &str) -> Result<()> {
    let ok = !secret.is_empty()
        && secret.len() <= 255
        && secret
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'));
    if ok {
        Ok(())
    } else {
        Err(invalid(
            secret,
            "a secret id is 1 to 255 ASCII letters, digits, '-' and '_'",
        ))
    }
}

pub(crate) fn check_project_id(project: &str) -> Result<()> {
    let ok = !project.is_empty()
        && project.len() <= 63
        && project
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(invalid(
            project,
            "a project id is 1 to 63 lower-case ASCII letters, digits and '-'",
        ))
    }
}

fn invalid(name: &str, reason: &'static str) -> SecurityError {
    SecurityError::SecretInvalid {
        name: truncate(name, 64),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_and_full_forms_parse() {
        let r: SecretRef = "db-password".parse().unwrap();
        assert_eq!(
            (r.secret(), r.version(), r.project()),
            ("db-password", None, None)
        );
        let r: SecretRef = "db-password@latest".parse().unwrap();
        assert_eq!(r.version(), Some(&SecretVersion::Latest));
        let r: SecretRef = "db_password@42".parse().unwrap();
        assert_eq!(r.version(), SecretVersion::pinned(42).as_ref());
        let r: SecretRef = "db-password@prod".parse().unwrap();
        assert_eq!(r.version(), Some(&SecretVersion::Alias("prod".into())));
        let r: SecretRef = "projects/shared-1/secrets/api-key".parse().unwrap();
        assert_eq!((r.project(), r.version()), (Some("shared-1"), None));
        let r: SecretRef = "projects/123456/secrets/api-key/versions/3"
            .parse()
            .unwrap();
        assert_eq!(r.project(), Some("123456"));
        assert_eq!(r.to_string(), "projects/123456/secrets/api-key/versions/3");
        assert_eq!(
            "db-password@7".parse::<SecretRef>().unwrap().to_string(),
            "db-password@7"
        );
    }

    #[test]
    fn resolution_fills_in_the_project_and_the_version() {
        let pin = SecretVersion::pinned(9).unwrap();
        let r: SecretRef = "db-password".parse().unwrap();
        assert_eq!(
            r.resolve("orders", None, &pin).resource_name(),
            "projects/orders/secrets/db-password/versions/9"
        );
        let r: SecretRef = "db-password@latest".parse().unwrap();
        assert_eq!(
            r.resolve("orders", None, &pin).resource_name(),
            "projects/orders/secrets/db-password/versions/latest"
        );
        assert_eq!(
            r.resolve("orders", Some("europe-west1"), &pin)
                .resource_name(),
            "projects/orders/locations/europe-west1/secrets/db-password/versions/latest"
        );
    }

    #[test]
    fn names_that_could_reach_another_path_are_refused() {
        for bad in [
            "",
            "a/b",
            "../x",
            "x@",
            "x@0",
            "x@-1",
            "x@1/2",
            "x@99999999999999999999999",
            "x@latest@1",
            "x?alt=media",
            "x%2F..",
            "sécret",
            "projects/",
            "projects/p/secrets",
            "projects/P/secrets/x",
            "projects/p/secrets/x/versions",
            "projects/p/secrets/x/versions/1/extra",
            "projects/p/keys/x",
            &"x".repeat(256),
        ] {
            let err = bad.parse::<SecretRef>().unwrap_err();
            assert!(
                matches!(err, SecurityError::SecretInvalid { .. }),
                "{bad:?}: {err:?}"
            );
        }
    }
}
