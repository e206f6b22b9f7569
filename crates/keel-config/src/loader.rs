//! Reading the layers, resolving secrets, and checking every section.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

use figment::providers::{Format, Toml};
use figment::value::{Dict, Value};
use figment::{Figment, Profile, Provider};
use keel_security::SecretProvider;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::env::{EnvLayer, GENERIC_NAME, LEGACY_NAME, insert};
use crate::error::{ConfigErrors, Source, describe};
use crate::layer::{DEFAULTS_NAME, DictLayer, SECRETS_NAME, SERVICE_DEFAULTS_NAME};
use crate::settings::{
    CacheSettings, Check, DatabaseSettings, EventBusSettings, EventStoreSettings, GrpcSettings,
    RepositorySettings, Section, SecuritySettings, ServiceSettings, TelemetrySettings,
};
use crate::{ENVIRONMENT_VAR, Environment, KeelConfig, secrets};

/// The variable naming the directory of the configuration files.
pub const CONFIG_DIR_VAR: &str = "KEEL_CONFIG_DIR";
/// The directory used when neither the loader nor `KEEL_CONFIG_DIR` names
/// one; it may be missing.
pub const DEFAULT_CONFIG_DIR: &str = "config";
/// The base file, read in every environment.
pub const BASE_FILE: &str = "base.toml";

/// Builds a [`KeelConfig`] from the layers, later ones winning:
///
/// 1. Keel's built-in defaults (then the service's own,
///    [`set_default`](Self::set_default));
/// 2. `<dir>/base.toml`;
/// 3. `<dir>/<environment>.toml`, the environment chosen by `KEEL_ENV`;
/// 4. environment variables: the names Keel's crates always read
///    (`DATABASE_URL`, `KEEL_DB_*`, …), then `KEEL_<SECTION>__<KEY>`;
/// 5. secret references (`{ secret = "name" }`, `secret://name`), read
///    through the [`SecretProvider`].
///
/// Both files are optional. The directory is [`dir`](Self::dir), else
/// `KEEL_CONFIG_DIR`, else `./config`; a directory named explicitly must
/// exist.
#[must_use]
pub struct ConfigLoader {
    dir: Option<PathBuf>,
    environment: Option<Environment>,
    vars: Option<Vec<(String, String)>>,
    secrets: Option<Arc<dyn SecretProvider>>,
    service_defaults: Dict,
    default_errors: Vec<(String, String)>,
}

impl std::fmt::Debug for ConfigLoader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigLoader")
            .field("dir", &self.dir)
            .field("environment", &self.environment)
            .field("secrets", &self.secrets)
            .finish_non_exhaustive()
    }
}

impl Default for ConfigLoader {
    fn default() -> Self {
        Self::new()
    }
}

impl ConfigLoader {
    /// A loader reading the process's environment, with no secret provider.
    pub fn new() -> Self {
        Self {
            dir: None,
            environment: None,
            vars: None,
            secrets: None,
            service_defaults: Dict::new(),
            default_errors: Vec::new(),
        }
    }

    /// Reads the files from `dir` (which must exist).
    pub fn dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.dir = Some(dir.into());
        self
    }

    /// Chooses the environment instead of reading `KEEL_ENV`.
    pub fn environment(mut self, environment: Environment) -> Self {
        self.environment = Some(environment);
        self
    }

    /// Reads these variables instead of the process's environment (for
    /// tests, and for services that read their environment once).
    pub fn vars<K, V>(mut self, vars: impl IntoIterator<Item = (K, V)>) -> Self
    where
        K: Into<String>,
        V: Into<String>,
    {
        self.vars = Some(
            vars.into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        );
        self
    }

    /// Resolves secret references through `provider` (wrap it in
    /// [`CachedSecrets`](keel_security::CachedSecrets) to share reads).
    pub fn secrets(mut self, provider: Arc<dyn SecretProvider>) -> Self {
        self.secrets = Some(provider);
        self
    }

    /// A default of the service's own, above Keel's defaults and below
    /// every file and variable (e.g. `("service.name", "orders")`).
    pub fn set_default(mut self, key: &str, value: impl Serialize) -> Self {
        match Value::serialize(value) {
            Ok(value) => insert(&mut self.service_defaults, key, value),
            Err(e) => self.default_errors.push((key.to_owned(), e.to_string())),
        }
        self
    }

    /// Reads every layer, resolves the secrets and checks every section.
    ///
    /// # Errors
    ///
    /// [`ConfigErrors`] with every problem found: each names the key and
    /// the layer its value came from, never the value.
    pub async fn load(self) -> Result<KeelConfig, ConfigErrors> {
        let vars = self.vars.unwrap_or_else(|| {
            std::env::vars_os()
                .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
                .collect()
        });
        let var = |name: &str| {
            vars.iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let mut errors = ConfigErrors::default();
        for (key, message) in self.default_errors {
            errors.push(key, Source::Code, message);
        }

        let environment = match (self.environment, var(ENVIRONMENT_VAR)) {
            (Some(e), _) => e,
            (None, None) => Environment::Development,
            (None, Some(name)) => name.parse().unwrap_or_else(|e| {
                errors.push(
                    ENVIRONMENT_VAR,
                    Source::EnvVar(ENVIRONMENT_VAR.to_owned()),
                    format!("{e}"),
                );
                // Check the rest as strictly as possible.
                Environment::Production
            }),
        };

        let (dir, explicit_dir) = match (self.dir, var(CONFIG_DIR_VAR)) {
            (Some(dir), _) => (dir, Some(Source::Code)),
            (None, Some(dir)) => (
                PathBuf::from(dir),
                Some(Source::EnvVar(CONFIG_DIR_VAR.to_owned())),
            ),
            (None, None) => (PathBuf::from(DEFAULT_CONFIG_DIR), None),
        };
        if let Some(source) = explicit_dir
            && !dir.is_dir()
        {
            errors.push(
                CONFIG_DIR_VAR,
                source,
                format!("the directory {} does not exist", dir.display()),
            );
        }

        let mut figment = Figment::new()
            .merge(DictLayer {
                name: DEFAULTS_NAME,
                dict: defaults(),
            })
            .merge(DictLayer {
                name: SERVICE_DEFAULTS_NAME,
                dict: self.service_defaults,
            });
        for file in [dir.join(BASE_FILE), dir.join(format!("{environment}.toml"))] {
            if !file.is_file() {
                continue;
            }
            let layer = Toml::file_exact(&file);
            match layer.data() {
                Ok(_) => figment = figment.merge(layer),
                Err(e) => errors.push("", Source::File(file), parse_failure(&e)),
            }
        }
        figment = figment
            .merge(EnvLayer::legacy(&vars))
            .merge(EnvLayer::generic(&vars));

        let mut tree = Tree {
            figment,
            environment,
            secret_sources: HashMap::new(),
            reported: HashSet::new(),
            errors,
        };
        tree.resolve_secrets(self.secrets.as_deref()).await;

        let config = KeelConfig {
            environment,
            service: tree.section(),
            database: tree.section(),
            eventstore: tree.section(),
            eventbus: tree.section(),
            cache: tree.section(),
            telemetry: tree.section(),
            security: tree.section(),
            grpc: tree.section(),
            repository: tree.section(),
            tree: Arc::new(Resolved {
                figment: tree.figment,
                secret_sources: tree.secret_sources,
            }),
        };
        tree.errors.into_result(config)
    }
}

/// Keeps the first line of a parse error and its description, never the
/// quoted line of the file (which could hold a secret).
fn parse_failure(e: &figment::Error) -> String {
    let text = describe(&e.kind);
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let first = lines.next().unwrap_or("not valid TOML").trim().to_owned();
    let last = text
        .lines()
        .rev()
        .find(|l| {
            let l = l.trim();
            !l.is_empty() && !l.contains('|') && !l.starts_with('^')
        })
        .map(str::trim);
    match last {
        Some(last) if last != first => format!("not valid TOML: {first}: {last}"),
        _ => format!("not valid TOML: {first}"),
    }
}

/// Every section's defaults, as one tree.
pub(crate) fn defaults() -> Dict {
    fn put<T: Section>(dict: &mut Dict) {
        // Defaults are plain data; they always serialize.
        if let Ok(value) = Value::serialize(T::default()) {
            dict.insert(T::KEY.to_owned(), value);
        }
    }
    let mut dict = Dict::new();
    put::<ServiceSettings>(&mut dict);
    put::<DatabaseSettings>(&mut dict);
    put::<EventStoreSettings>(&mut dict);
    put::<EventBusSettings>(&mut dict);
    put::<CacheSettings>(&mut dict);
    put::<TelemetrySettings>(&mut dict);
    put::<SecuritySettings>(&mut dict);
    put::<GrpcSettings>(&mut dict);
    put::<RepositorySettings>(&mut dict);
    dict
}

/// The merged layers, after secrets were resolved.
pub(crate) struct Resolved {
    pub(crate) figment: Figment,
    pub(crate) secret_sources: HashMap<String, Source>,
}

impl Resolved {
    /// The layer `key`'s value came from.
    pub(crate) fn source_of(&self, key: &str) -> Source {
        source_of(&self.figment, &self.secret_sources, key)
    }

    /// The service's own section `key`, deserialized with the same
    /// reporting as Keel's.
    pub(crate) fn extract<T: DeserializeOwned>(&self, key: &str) -> Result<T, ConfigErrors> {
        self.figment.extract_inner_lossy::<T>(key).map_err(|error| {
            let mut errors = ConfigErrors::default();
            let key_parts: Vec<&str> = key.split('.').filter(|p| !p.is_empty()).collect();
            for e in error {
                // figment appends the extracted key to the error's path.
                let mut inner: Vec<&str> = e.path.iter().map(String::as_str).collect();
                if inner.ends_with(&key_parts) {
                    inner.truncate(inner.len() - key_parts.len());
                }
                let path = if inner.is_empty() {
                    key.to_owned()
                } else {
                    format!("{key}.{}", inner.join("."))
                };
                let source = self.source_of(&path);
                errors.push(path, source, describe(&e.kind));
            }
            errors
        })
    }
}

fn source_of(figment: &Figment, secrets: &HashMap<String, Source>, key: &str) -> Source {
    if let Some(source) = secrets.get(key) {
        return source.clone();
    }
    // A key whose value is "nothing" (an unset option) is not set, whichever
    // layer holds the nothing.
    if matches!(figment.find_value(key), Err(_) | Ok(Value::Empty(..))) {
        return Source::Unset;
    }
    let Some(metadata) = figment.find_metadata(key) else {
        return Source::Unset;
    };
    match &*metadata.name {
        DEFAULTS_NAME => Source::Default,
        SERVICE_DEFAULTS_NAME => Source::Code,
        GENERIC_NAME | LEGACY_NAME => {
            let keys: Vec<&str> = key.split('.').collect();
            Source::EnvVar(metadata.interpolate(&Profile::Default, &keys))
        }
        _ => match &metadata.source {
            Some(figment::Source::File(path)) => Source::File(path.clone()),
            _ => Source::Code,
        },
    }
}

/// The state of one load.
struct Tree {
    figment: Figment,
    environment: Environment,
    secret_sources: HashMap<String, Source>,
    /// Keys already reported, so one mistake is reported once.
    reported: HashSet<String>,
    errors: ConfigErrors,
}

impl Tree {
    fn report(&mut self, key: String, message: String) {
        if self
            .reported
            .iter()
            .any(|k| key == *k || key.starts_with(&format!("{k}.")))
        {
            return;
        }
        let source = source_of(&self.figment, &self.secret_sources, &key);
        self.reported.insert(key.clone());
        self.errors.push(key, source, message);
    }

    async fn resolve_secrets(&mut self, provider: Option<&dyn SecretProvider>) {
        let root = match self.figment.data() {
            Ok(mut data) => data.remove(&Profile::Default).unwrap_or_default(),
            Err(e) => {
                self.errors.push("", Source::Unset, describe(&e.kind));
                return;
            }
        };
        let mut references = Vec::new();
        secrets::find(&root, "", &mut references);
        let mut resolved = Dict::new();
        for reference in references {
            let referenced_by = source_of(&self.figment, &self.secret_sources, &reference.key);
            let result = match (&reference.name, provider) {
                (Err(malformed), _) => Err((*malformed).to_owned()),
                (Ok(_), None) => Err(
                    "refers to a secret, but no SecretProvider was given to the loader".to_owned(),
                ),
                (Ok(name), Some(provider)) => provider.get(name).await.map_err(|e| e.to_string()),
            };
            match result {
                Ok(secret) => {
                    let name = reference.name.clone().unwrap_or_default();
                    insert(
                        &mut resolved,
                        &reference.key,
                        Value::from(secret.expose_secret().clone()),
                    );
                    self.secret_sources.insert(
                        reference.key,
                        Source::Secret {
                            name,
                            referenced_by: Box::new(referenced_by),
                        },
                    );
                }
                Err(message) => {
                    self.errors
                        .push(reference.key.clone(), referenced_by, message);
                    // Leave the key unset rather than report its table as
                    // the wrong type too.
                    insert(
                        &mut resolved,
                        &reference.key,
                        Value::Empty(figment::value::Tag::Default, figment::value::Empty::None),
                    );
                    self.reported.insert(reference.key);
                }
            }
        }
        if !resolved.is_empty() {
            self.figment = std::mem::take(&mut self.figment).merge(DictLayer {
                name: SECRETS_NAME,
                dict: resolved,
            });
        }
    }

    /// Deserializes and checks section `T`, reporting every bad key; keys
    /// that are wrong take their defaults so the rest can still be checked.
    fn section<T: Section>(&mut self) -> T {
        let parsed = match self.figment.extract_inner_lossy::<T>(T::KEY) {
            Ok(value) => value,
            Err(_) => {
                let dict = self
                    .figment
                    .find_value(T::KEY)
                    .ok()
                    .and_then(|v| v.into_dict())
                    .unwrap_or_default();
                let mut leaves = Vec::new();
                leaves_of(&dict, "", &mut leaves);
                let mut good = Dict::new();
                for (path, value) in leaves {
                    let mut one = Dict::new();
                    insert(&mut one, &path, value.clone());
                    match extract::<T>(one) {
                        Ok(_) => insert(&mut good, &path, value),
                        Err(kind) => self.report(format!("{}.{path}", T::KEY), describe(&kind)),
                    }
                }
                extract::<T>(good).unwrap_or_default()
            }
        };
        let mut problems = Vec::new();
        parsed.validate(&mut Check {
            environment: self.environment,
            problems: &mut problems,
        });
        for (key, message) in problems {
            self.report(format!("{}.{key}", T::KEY), message);
        }
        parsed
    }
}

/// Only what went wrong is kept of the error: the caller renders its kind.
fn extract<T: DeserializeOwned>(dict: Dict) -> Result<T, figment::error::Kind> {
    Figment::from(DictLayer {
        name: "check",
        dict,
    })
    .extract_lossy()
    .map_err(|e| e.kind)
}

/// Every leaf of `dict` (a value that is not a table, or an empty table),
/// with its dotted path.
fn leaves_of(dict: &Dict, prefix: &str, out: &mut Vec<(String, Value)>) {
    for (k, v) in dict {
        let path = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            Value::Dict(_, d) if !d.is_empty() => leaves_of(d, &path, out),
            _ => out.push((path, v.clone())),
        }
    }
}
