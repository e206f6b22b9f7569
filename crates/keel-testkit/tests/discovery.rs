//! Service discovery: the order of sources, starting local binaries, and
//! sharing a started service across processes.
//!
//! Each test that starts something uses its own state directory, so it
//! neither reuses nor disturbs the instances other tests (or the machine)
//! use; removing the directory at the end makes the watchdog stop the
//! service.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use keel_testkit::Error;
use keel_testkit::services::{Discovery, Service, Source};

/// Settings that ignore the process environment and the machine's default
/// services, with state in `dir`.
fn isolated(dir: &std::path::Path) -> Discovery {
    Discovery::from_vars(Vec::<(String, String)>::new())
        .ignore_defaults(true)
        .containers(false)
        .state_dir(dir)
        .idle_timeout(Duration::from_secs(3))
}

/// A port on which nothing listens.
fn dead_address() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    drop(listener);
    addr
}

fn redis_ping(address: &str) -> bool {
    let Ok(mut s) = TcpStream::connect(address) else {
        return false;
    };
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = [0_u8; 16];
    s.write_all(b"PING\r\n").is_ok()
        && matches!(s.read(&mut buf), Ok(n) if buf[..n].starts_with(b"+PONG"))
}

fn strip_scheme(url: &str) -> &str {
    url.split_once("://").map_or(url, |(_, rest)| rest)
}

async fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < timeout, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn the_environment_variable_comes_first() {
    // Nothing listens there; the variable wins all the same, because the
    // person who set it meant it.
    let address = dead_address();
    let found = Discovery::from_vars([("REDIS_URL", format!("redis://{address}"))])
        .find(Service::Redis)
        .await
        .unwrap();
    assert_eq!(found.source(), Source::Environment);
    assert_eq!(found.connection_string(), format!("redis://{address}"));

    let found = Discovery::from_vars([("PUBSUB_EMULATOR_HOST", "emulator:8681")])
        .find(Service::PubSubEmulator)
        .await
        .unwrap();
    assert_eq!(found.source(), Source::Environment);
    assert_eq!(found.connection_string(), "emulator:8681");
}

#[tokio::test]
async fn an_empty_variable_counts_as_unset() {
    let err = Discovery::from_vars([("REDIS_URL", "  ")])
        .default_address(Service::Redis, dead_address())
        .containers(false)
        .start_local(false)
        .find(Service::Redis)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::ServiceUnavailable { .. }), "{err}");
}

#[tokio::test]
async fn a_malformed_variable_is_a_typed_error_without_the_password() {
    let err = Discovery::from_vars([("DATABASE_URL", "postgres://me:s3cret@host:notaport/db")])
        .find(Service::Postgres)
        .await
        .unwrap_err();
    let Error::InvalidUrl {
        variable, value, ..
    } = &err
    else {
        panic!("expected InvalidUrl, got {err:?}");
    };
    assert_eq!(*variable, "DATABASE_URL");
    assert!(!value.contains("s3cret") && !err.to_string().contains("s3cret"));

    let err = Discovery::from_vars([("PUBSUB_EMULATOR_HOST", "http://127.0.0.1:8085")])
        .find(Service::PubSubEmulator)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("without a scheme"), "{err}");
}

#[tokio::test]
async fn with_nothing_available_the_error_says_what_was_tried_and_how_to_fix_it() {
    let err = Discovery::from_vars(Vec::<(String, String)>::new())
        .default_address(Service::Redis, dead_address())
        .containers(false)
        .start_local(false)
        .find(Service::Redis)
        .await
        .unwrap_err();
    let message = err.to_string();
    assert!(matches!(
        err,
        Error::ServiceUnavailable {
            service: Service::Redis,
            ..
        }
    ));
    for expected in [
        "REDIS_URL: not set",
        "nothing answers",
        "KEEL_TESTKIT_NO_START",
        "redis-server",
    ] {
        assert!(
            message.contains(expected),
            "{expected:?} missing from:\n{message}"
        );
    }
}

#[tokio::test]
async fn a_missing_binary_is_named_in_the_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = isolated(dir.path())
        .program(Service::Redis, "/nonexistent/redis-server")
        .find(Service::Redis)
        .await
        .unwrap_err();
    let message = err.to_string();
    assert!(message.contains("no `redis-server`"), "{message}");
    assert!(message.contains("To fix: set REDIS_URL"), "{message}");
}

#[tokio::test]
async fn redis_is_started_on_a_free_port_reused_and_stopped_when_its_directory_goes() {
    let dir = tempfile::tempdir().unwrap();
    let discovery = isolated(dir.path());
    let found = discovery.find(Service::Redis).await.unwrap();
    assert_eq!(found.source(), Source::Started);
    let address = strip_scheme(found.connection_string()).to_owned();
    assert_ne!(address, "127.0.0.1:6379");
    assert!(redis_ping(&address), "the started Redis does not answer");

    // The same process asking again gets the same instance.
    let again = discovery.find(Service::Redis).await.unwrap();
    assert_eq!(again, found);

    // A started instance answers as a default one would.
    let via_default = Discovery::from_vars(Vec::<(String, String)>::new())
        .default_address(Service::Redis, address.clone())
        .find(Service::Redis)
        .await
        .unwrap();
    assert_eq!(via_default.source(), Source::DefaultLocal);

    // This process holds a lease: the instance outlives the idle timeout.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(redis_ping(&address), "retired while its user was alive");

    // Removing the state directory retires the instance.
    drop(dir);
    wait_until("the Redis instance stops", Duration::from_secs(20), || {
        !redis_ping(&address)
    })
    .await;
}

#[tokio::test]
async fn postgres_is_started_as_a_fresh_cluster_when_told_to_ignore_the_default() {
    use sqlx::Connection;

    let dir = tempfile::tempdir().unwrap();
    let found = isolated(dir.path()).find(Service::Postgres).await.unwrap();
    assert_eq!(found.source(), Source::Started);
    assert!(!found.connection_string().contains(":5432/"));
    let mut conn = sqlx::PgConnection::connect(found.connection_string())
        .await
        .unwrap();
    let max: String = sqlx::query_scalar("SHOW max_connections")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(max, "500", "not the test kit's cluster");
    conn.close().await.unwrap();
}

/// Run as a child process by the tests below: finds the service named by
/// `KEEL_TESTKIT_TEST_SERVICE` as the environment says and prints what it
/// found.
#[tokio::test]
#[ignore = "helper, run in a child process by other tests"]
#[allow(
    clippy::print_stdout,
    reason = "the parent process reads the answer from stdout"
)]
async fn child_finds_a_service() {
    let service = match std::env::var("KEEL_TESTKIT_TEST_SERVICE").as_deref() {
        Ok("redis") => Service::Redis,
        _ => Service::PubSubEmulator,
    };
    let found = Discovery::from_env().find(service).await.unwrap();
    println!("FOUND {} {:?}", found.connection_string(), found.source());
}

/// Runs `child_finds_a_service` in a new process with state in `state_dir`
/// and returns what it printed after `FOUND `.
fn run_child(service: &str, state_dir: &std::path::Path) -> String {
    let output = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_finds_a_service",
            "--ignored",
            "--nocapture",
        ])
        .env("KEEL_TESTKIT_TEST_SERVICE", service)
        .env("KEEL_TESTKIT_DIR", state_dir)
        .env("KEEL_TESTKIT_IGNORE_DEFAULTS", "1")
        .env("KEEL_TESTKIT_NO_CONTAINERS", "1")
        .env("KEEL_TESTKIT_IDLE_SECS", "3")
        .env_remove("PUBSUB_EMULATOR_HOST")
        .env_remove("REDIS_URL")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "child failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("FOUND "))
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("child printed nothing found:\n{stdout}"))
}

#[tokio::test]
async fn a_stale_instance_whose_watchdog_died_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let found = isolated(dir.path()).find(Service::Redis).await.unwrap();
    let old = strip_scheme(found.connection_string()).to_owned();
    let state = std::fs::read_to_string(dir.path().join("redis/state")).unwrap();
    let reaper: u32 = state
        .lines()
        .find_map(|l| l.strip_prefix("reaper="))
        .unwrap()
        .parse()
        .unwrap();
    // Kill the watchdog the hard way; the Redis it started lives on.
    let killed = Command::new("kill")
        .args(["-KILL", &reaper.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    assert!(redis_ping(&old));

    // Another process finds the stale state, stops the orphan and starts a
    // fresh instance.
    let state_dir = dir.path().to_path_buf();
    let fresh = tokio::task::spawn_blocking(move || run_child("redis", &state_dir))
        .await
        .unwrap();
    assert!(fresh.ends_with("Started"), "{fresh}");
    let fresh = strip_scheme(fresh.split_whitespace().next().unwrap()).to_owned();
    assert_ne!(fresh, old);
    wait_until("the orphaned Redis stops", Duration::from_secs(10), || {
        !redis_ping(&old)
    })
    .await;
    drop(dir);
    wait_until("the fresh Redis stops", Duration::from_secs(20), || {
        !redis_ping(&fresh)
    })
    .await;
}

#[tokio::test]
async fn the_emulator_is_started_once_and_shared_by_processes() {
    let dir = tempfile::tempdir().unwrap();
    let state_dir = dir.path().to_path_buf();
    let run_child = move || run_child("pubsub", &state_dir);
    let first = tokio::task::spawn_blocking(run_child.clone())
        .await
        .unwrap();
    let second = tokio::task::spawn_blocking(run_child).await.unwrap();
    assert_eq!(first, second, "the second process started its own emulator");
    let address = first.split_whitespace().next().unwrap().to_owned();
    assert!(first.ends_with("Started"), "{first}");

    // Both users are gone: after the idle time the watchdog stops it and
    // removes its files, though the state directory is still there.
    let service_dir = dir.path().join("pubsub-emulator");
    wait_until("the idle emulator stops", Duration::from_secs(30), || {
        TcpStream::connect(&address).is_err()
    })
    .await;
    wait_until(
        "the emulator's files are removed",
        Duration::from_secs(10),
        || {
            !service_dir.join("state").exists()
                && std::fs::read_dir(&service_dir)
                    .unwrap()
                    .flatten()
                    .all(|e| !e.file_name().to_string_lossy().starts_with("inst-"))
        },
    )
    .await;
}
