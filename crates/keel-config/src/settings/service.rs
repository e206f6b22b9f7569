use serde::{Deserialize, Serialize};

use super::{Check, Section};

/// `service`: who the service is. Other sections default from it
/// (`telemetry.service_name`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct ServiceSettings {
    /// The service's name (`service.name` in telemetry). Default `keel-service`.
    pub name: String,
    /// The service's version, e.g. its crate version. Default unset.
    pub version: Option<String>,
}

impl Default for ServiceSettings {
    fn default() -> Self {
        Self {
            name: "keel-service".to_owned(),
            version: None,
        }
    }
}

impl Section for ServiceSettings {
    const KEY: &'static str = "service";

    fn validate(&self, check: &mut Check<'_>) {
        if self.name.trim().is_empty() {
            check.fail("name", "must not be empty");
        }
    }
}
