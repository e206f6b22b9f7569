//! Services in Docker containers, through testcontainers (feature
//! `testcontainers`).
//!
//! A container serves the process that started it (other test processes
//! start their own, or find the same service through an environment
//! variable). It is not stopped when the process exits on its own, because
//! statics are never dropped; a small detached watchdog removes it
//! (`docker rm -f`) once the process is gone.

use std::ffi::OsStr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use testcontainers::core::{IntoContainerPort, WaitFor};
use testcontainers::runners::AsyncRunner;
use testcontainers::{ContainerRequest, GenericImage, ImageExt};

use super::Service;
use crate::sys;

/// Whether a Docker engine seems reachable, as testcontainers would look for
/// it: `DOCKER_HOST`, else the usual socket paths.
fn docker_reachable() -> Result<(), String> {
    use std::os::unix::net::UnixStream;

    if let Some(host) = std::env::var("DOCKER_HOST").ok().filter(|h| !h.is_empty()) {
        if let Some(path) = host.strip_prefix("unix://") {
            return UnixStream::connect(path)
                .map(drop)
                .map_err(|e| format!("DOCKER_HOST={host}: {e}"));
        }
        let address = host
            .strip_prefix("tcp://")
            .unwrap_or(&host)
            .trim_end_matches('/');
        let answers = std::net::ToSocketAddrs::to_socket_addrs(address)
            .ok()
            .into_iter()
            .flatten()
            .any(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_secs(1)).is_ok());
        return if answers {
            Ok(())
        } else {
            Err(format!("DOCKER_HOST={host}: nothing answers"))
        };
    }
    let mut sockets = vec![PathBuf::from("/var/run/docker.sock")];
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR") {
        sockets.push(PathBuf::from(dir).join("docker.sock"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        sockets.push(PathBuf::from(home).join(".docker/run/docker.sock"));
    }
    if sockets.iter().any(|s| UnixStream::connect(s).is_ok()) {
        Ok(())
    } else {
        Err(
            "no Docker engine reachable (DOCKER_HOST is unset and no docker.sock answers)"
                .to_owned(),
        )
    }
}

fn request(service: Service) -> (ContainerRequest<GenericImage>, u16) {
    let (name, tag) = service.container_image();
    let image = GenericImage::new(name, tag);
    match service {
        Service::Postgres => (
            image
                .with_exposed_port(5432.tcp())
                .with_wait_for(WaitFor::message_on_stderr(
                    "database system is ready to accept connections",
                ))
                .with_env_var("POSTGRES_HOST_AUTH_METHOD", "trust")
                .with_cmd([
                    "postgres",
                    "-c",
                    "fsync=off",
                    "-c",
                    "synchronous_commit=off",
                    "-c",
                    "full_page_writes=off",
                    "-c",
                    "max_connections=500",
                ]),
            5432,
        ),
        Service::Redis => (
            image
                .with_exposed_port(6379.tcp())
                .with_wait_for(WaitFor::message_on_stdout("Ready to accept connections"))
                .with_cmd(["redis-server", "--save", "", "--appendonly", "no"]),
            6379,
        ),
        Service::PubSubEmulator => (
            image
                .with_exposed_port(8085.tcp())
                .with_wait_for(WaitFor::message_on_either_std("Server started"))
                .with_cmd([
                    "gcloud",
                    "beta",
                    "emulators",
                    "pubsub",
                    "start",
                    "--host-port=0.0.0.0:8085",
                ]),
            8085,
        ),
        Service::Meilisearch => (
            image
                .with_exposed_port(7700.tcp())
                .with_wait_for(WaitFor::message_on_either_std("Server listening"))
                .with_env_var("MEILI_MASTER_KEY", super::MEILISEARCH_TEST_KEY)
                .with_env_var("MEILI_NO_ANALYTICS", "true")
                .with_env_var("MEILI_ENV", "development"),
            7700,
        ),
    }
}

// Removes the container once the owning test process is gone.
const REMOVER: &str = r#"
owner=$1; id=$2
while [ -d "/proc/$owner" ]; do sleep 2; done
docker rm -f "$id" >/dev/null 2>&1
"#;

/// Starts `service` in a container; the error says why containers could not
/// be used.
pub(super) fn start(service: Service) -> Result<String, String> {
    docker_reachable()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("creating a runtime: {e}"))?;
    let (request, port) = request(service);
    let request = request
        .with_label("org.keel.testkit", "1")
        .with_label("org.keel.testkit.owner", std::process::id().to_string())
        .with_startup_timeout(Duration::from_secs(180));
    let container = runtime
        .block_on(request.start())
        .map_err(|e| format!("starting a container for {service}: {e}"))?;
    let id = container.id().to_owned();
    let address = runtime.block_on(async {
        let host = container.get_host().await?;
        let port = container.get_host_port_ipv4(port).await?;
        Ok::<_, testcontainers::TestcontainersError>(
            format!("{host}:{port}").replace("localhost:", "127.0.0.1:"),
        )
    });
    let owner = std::process::id().to_string();
    let log = std::env::temp_dir().join(format!("keel-testkit-container-{id}.log"));
    let _ = sys::spawn_detached(REMOVER, &[OsStr::new(&owner), OsStr::new(&id)], &log);
    // The container must outlive this call: it serves the whole process and
    // the watchdog above removes it.
    std::mem::forget(container);
    let address = address.map_err(|e| format!("reading the container's port: {e}"))?;

    // The image's log line can come from its initialisation phase; wait
    // until the service really answers on the mapped port.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !service.ready(&address) {
        if Instant::now() > deadline {
            return Err(format!(
                "container {id} started, but {service} does not answer on {address}"
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(service.connection_string(&address))
}
