//! A local server speaking the part of Google Cloud Secret Manager's REST
//! API that `GcpSecretManager` uses (`AccessSecretVersion`, its answers and
//! Google error bodies). There is no Secret Manager emulator; this double
//! keeps versions, their states, aliases and refused identities, can stall,
//! fail or corrupt answers on demand, and counts the requests it gets.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use base64::Engine as _;
use keel_security::{GcpSecretManager, GcpSecretManagerConfig};

pub(crate) const PROJECT: &str = "keel-test";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum VersionState {
    Enabled,
    Disabled,
    Destroyed,
}

#[derive(Default)]
pub(crate) struct Store {
    /// Version `n` of a secret is at index `n - 1`.
    pub(crate) secrets: HashMap<String, Vec<(Vec<u8>, VersionState)>>,
    pub(crate) aliases: HashMap<(String, String), usize>,
    pub(crate) denied: HashSet<String>,
    /// Secrets whose answers are held back this long.
    pub(crate) delays: HashMap<String, Duration>,
    /// Secrets answered with a wrong CRC32C.
    pub(crate) corrupt: HashSet<String>,
    /// Secrets answered with `UNAVAILABLE` this many more times.
    pub(crate) failures: HashMap<String, usize>,
    /// Per secret: how many access requests arrived.
    pub(crate) requests: HashMap<String, usize>,
    /// The resource names asked for, in order.
    pub(crate) paths: Vec<String>,
    /// Whether any request carried an `Authorization` header.
    pub(crate) saw_authorization: bool,
}

/// A Secret Manager double on a loopback port.
pub(crate) struct FakeSecretManager {
    addr: SocketAddr,
    store: Arc<Mutex<Store>>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for FakeSecretManager {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl FakeSecretManager {
    pub(crate) async fn start() -> Self {
        let store = Arc::new(Mutex::new(Store::default()));
        let app = Router::new()
            .route("/v1/{*name}", axum::routing::get(access))
            .with_state(Arc::clone(&store));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self {
            addr,
            store,
            server,
        }
    }

    pub(crate) fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub(crate) fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap()
    }

    /// Adds a version and returns its number.
    pub(crate) fn add_version(&self, secret: &str, value: impl Into<Vec<u8>>) -> usize {
        let mut store = self.store();
        let versions = store.secrets.entry(secret.to_owned()).or_default();
        versions.push((value.into(), VersionState::Enabled));
        versions.len()
    }

    pub(crate) fn set_state(&self, secret: &str, version: usize, state: VersionState) {
        self.store().secrets.get_mut(secret).unwrap()[version - 1].1 = state;
    }

    pub(crate) fn requests(&self, secret: &str) -> usize {
        self.store().requests.get(secret).copied().unwrap_or(0)
    }

    pub(crate) async fn provider(&self) -> GcpSecretManager {
        self.provider_with(|config| config).await
    }

    pub(crate) async fn provider_with(
        &self,
        configure: impl FnOnce(GcpSecretManagerConfig) -> GcpSecretManagerConfig,
    ) -> GcpSecretManager {
        let config = GcpSecretManagerConfig::local(PROJECT, self.endpoint()).unwrap();
        GcpSecretManager::connect(configure(config)).await.unwrap()
    }
}

/// `GET /v1/projects/{project}/secrets/{secret}/versions/{version}:access`.
async fn access(
    State(store): State<Arc<Mutex<Store>>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    let Some(resource) = name.strip_suffix(":access") else {
        return google_error(StatusCode::NOT_FOUND, "NOT_FOUND", "no such method");
    };
    let parts: Vec<&str> = resource.split('/').collect();
    let (project, secret, version) = match parts.as_slice() {
        ["projects", project, "secrets", secret, "versions", version]
        | [
            "projects",
            project,
            "locations",
            _,
            "secrets",
            secret,
            "versions",
            version,
        ] => (*project, *secret, *version),
        _ => return google_error(StatusCode::BAD_REQUEST, "INVALID_ARGUMENT", "bad name"),
    };
    let (secret, version) = (secret.to_owned(), version.to_owned());
    let delay = {
        let mut store = store.lock().unwrap();
        *store.requests.entry(secret.clone()).or_default() += 1;
        store.saw_authorization |= headers.contains_key(header::AUTHORIZATION);
        store.paths.push(resource.to_owned());
        store.delays.get(&secret).copied()
    };
    if let Some(delay) = delay {
        tokio::time::sleep(delay).await;
    }

    let mut store = store.lock().unwrap();
    if let Some(left) = store.failures.get_mut(&secret).filter(|left| **left > 0) {
        *left -= 1;
        return google_error(StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE", "try again");
    }
    if store.denied.contains(&secret) {
        return google_error(
            StatusCode::FORBIDDEN,
            "PERMISSION_DENIED",
            "Permission 'secretmanager.versions.access' denied",
        );
    }
    if project != PROJECT {
        return google_error(StatusCode::NOT_FOUND, "NOT_FOUND", "no such project");
    }
    let Some(versions) = store.secrets.get(&secret) else {
        return google_error(StatusCode::NOT_FOUND, "NOT_FOUND", "Secret not found");
    };
    let number = match version.as_str() {
        "latest" => versions.len(),
        digits if digits.bytes().all(|b| b.is_ascii_digit()) => digits.parse().unwrap(),
        alias => match store.aliases.get(&(secret.clone(), alias.to_owned())) {
            Some(number) => *number,
            None => return google_error(StatusCode::NOT_FOUND, "NOT_FOUND", "no alias"),
        },
    };
    let Some((data, state)) = number.checked_sub(1).and_then(|i| versions.get(i)) else {
        return google_error(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            "Secret version not found",
        );
    };
    match state {
        VersionState::Enabled => {}
        VersionState::Disabled => {
            return google_error(
                StatusCode::BAD_REQUEST,
                "FAILED_PRECONDITION",
                "Secret version is in DISABLED state",
            );
        }
        VersionState::Destroyed => {
            return google_error(
                StatusCode::BAD_REQUEST,
                "FAILED_PRECONDITION",
                "Secret version is in DESTROYED state",
            );
        }
    }
    let mut checksum = i64::from(crc::Crc::<u32>::new(&crc::CRC_32_ISCSI).checksum(data));
    if store.corrupt.contains(&secret) {
        checksum += 1;
    }
    let body = serde_json::json!({
        "name": format!("projects/123456789/secrets/{secret}/versions/{number}"),
        "payload": {
            "data": base64::engine::general_purpose::STANDARD.encode(data),
            // int64 travels as a string in Google's JSON mapping.
            "dataCrc32c": checksum.to_string(),
        },
    });
    json_response(StatusCode::OK, &body)
}

fn google_error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = serde_json::json!({
        "error": { "code": status.as_u16(), "message": message, "status": code }
    });
    json_response(status, &body)
}

fn json_response(status: StatusCode, body: &serde_json::Value) -> Response {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}
