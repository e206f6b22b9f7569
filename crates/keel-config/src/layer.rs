//! A layer holding a ready tree: the defaults, the service's own defaults
//! and the resolved secrets.

use figment::value::{Dict, Map};
use figment::{Metadata, Profile, Provider};

pub(crate) const DEFAULTS_NAME: &str = "Keel defaults";
pub(crate) const SERVICE_DEFAULTS_NAME: &str = "service defaults";
pub(crate) const SECRETS_NAME: &str = "secret provider";

pub(crate) struct DictLayer {
    pub(crate) name: &'static str,
    pub(crate) dict: Dict,
}

impl Provider for DictLayer {
    fn metadata(&self) -> Metadata {
        Metadata::named(self.name)
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Ok(Profile::Default.collect(self.dict.clone()))
    }
}
