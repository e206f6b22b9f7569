//! The default PostgreSQL is probed with a real login: a server that asks
//! for a password (a stock Ubuntu or Homebrew install) standing where the
//! kit looks by default is passed over, with the reason, for a cluster of
//! the kit's own.

use std::time::Duration;

use keel_testkit::services::{Discovery, Service, Source};
use keel_testkit::{Error, ThrowawayPostgres};
use sqlx::Connection;

/// Settings that look for the default PostgreSQL at `address` and keep
/// started services in `dir`, ignoring the process environment.
fn looking_at(address: &str, dir: &std::path::Path) -> Discovery {
    Discovery::from_vars(Vec::<(String, String)>::new())
        .default_address(Service::Postgres, address)
        .containers(false)
        .state_dir(dir)
        .idle_timeout(Duration::from_secs(3))
}

#[tokio::test]
async fn a_password_only_default_server_is_passed_over_for_a_cluster_of_its_own() {
    // Password-only over TCP (scram-sha-256), like a stock install.
    let stock = ThrowawayPostgres::new().await.unwrap();
    let default = format!("127.0.0.1:{}", stock.port());
    let dir = tempfile::tempdir().unwrap();

    // Without the right to start one, the error says why the default was
    // not taken.
    let err = looking_at(&default, dir.path())
        .start_local(false)
        .find(Service::Postgres)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::ServiceUnavailable { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains(&default) && text.contains("asks user \"postgres\" for a SCRAM password"),
        "{text}"
    );

    // With it, the kit starts its own and logs in there.
    let found = looking_at(&default, dir.path())
        .find(Service::Postgres)
        .await
        .unwrap();
    assert_eq!(found.source(), Source::Started);
    assert!(!found.connection_string().contains(&default));
    let mut conn = sqlx::PgConnection::connect(found.connection_string())
        .await
        .unwrap();
    let one: i32 = sqlx::query_scalar("SELECT 1")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(one, 1);
    conn.close().await.unwrap();

    // A default server the kit can log in to is taken as it is.
    let started = found
        .connection_string()
        .split('@')
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .unwrap()
        .to_owned();
    let other = tempfile::tempdir().unwrap();
    let taken = looking_at(&started, other.path())
        .start_local(false)
        .find(Service::Postgres)
        .await
        .unwrap();
    assert_eq!(taken.source(), Source::DefaultLocal);
}

#[tokio::test]
async fn a_server_refusing_the_login_is_named_with_its_sqlstate() {
    // A server that refuses the login outright (no pg_hba.conf entry).
    // Played by a listener speaking just enough of the protocol.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let server = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let (mut socket, _) = listener.accept().unwrap();
        let mut buf = [0_u8; 256];
        let _ = socket.read(&mut buf);
        // An ErrorResponse: FATAL, 28000, a message.
        let fields = b"SFATAL\0C28000\0Mno pg_hba.conf entry for host\0\0";
        let mut reply = vec![b'E'];
        reply.extend_from_slice(&u32::try_from(fields.len() + 4).unwrap().to_be_bytes());
        reply.extend_from_slice(fields);
        socket.write_all(&reply).unwrap();
    });
    let dir = tempfile::tempdir().unwrap();
    let err = looking_at(&address, dir.path())
        .start_local(false)
        .find(Service::Postgres)
        .await
        .unwrap_err();
    server.join().unwrap();
    let text = err.to_string();
    assert!(
        text.contains("no pg_hba.conf entry for host") && text.contains("SQLSTATE 28000"),
        "{text}"
    );
}
