//! Bad configuration fails `Database::connect` fast, with a typed error that
//! names what is wrong and never shows the password.

use std::time::Duration;

use keel_database::{Database, DatabaseConfig, DatabaseError};
use keel_testkit::ThrowawayPostgres;

fn assert_no_secret(e: &DatabaseError, secret: &str) {
    let shown = e.to_string();
    let debug = format!("{e:?}");
    assert!(!shown.contains(secret), "secret in Display: {shown}");
    assert!(!debug.contains(secret), "secret in Debug: {debug}");
    let keel = keel_core::Error::from(DatabaseError::Config {
        setting: "probe".into(),
        reason: shown,
    });
    assert!(!keel.to_string().contains(secret));
}

fn config(url: &str) -> DatabaseConfig {
    DatabaseConfig::builder()
        .url(url)
        .min_connections(0)
        .max_connections(2)
        .connect_timeout(Duration::from_secs(3))
        .build()
        .unwrap()
}

#[tokio::test]
async fn malformed_url_is_a_config_error() {
    let e = DatabaseConfig::builder()
        .url("postgres://admin:Sup3rS3cret@db.internal:port/app")
        .build()
        .unwrap_err();
    match &e {
        DatabaseError::Config { setting, reason } => {
            assert_eq!(setting, "url");
            assert!(reason.contains("malformed"), "{reason}");
        }
        other => panic!("expected a config error, got {other:?}"),
    }
    assert_no_secret(&e, "Sup3rS3cret");
    let keel = keel_core::Error::from(e);
    assert_eq!(keel.kind(), keel_core::ErrorKind::Internal);
    assert!(!keel.is_retryable());
}

#[tokio::test]
async fn unreachable_host_names_host_and_port() {
    // A port nobody listens on: bind one, then free it.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let e = Database::connect(config(&format!(
        "postgres://app:Sup3rS3cret@127.0.0.1:{port}/app"
    )))
    .await
    .unwrap_err();
    match &e {
        DatabaseError::Unreachable { host, port: p, .. } => {
            assert_eq!(host, "127.0.0.1");
            assert_eq!(*p, port);
        }
        other => panic!("expected Unreachable, got {other:?}"),
    }
    assert!(e.to_string().contains(&format!("127.0.0.1:{port}")));
    // Unreachable (not the pool's AcquireTimeout): connect probed the server
    // itself instead of waiting for the pool to give up.
    assert!(e.is_connection_error() && e.is_retryable());
    assert_no_secret(&e, "Sup3rS3cret");
    let keel = keel_core::Error::from(e);
    assert_eq!(keel.kind(), keel_core::ErrorKind::Unavailable);
}

#[tokio::test]
async fn unknown_database_and_unknown_role_are_named() {
    let e = Database::connect(config(
        "postgres://postgres@127.0.0.1:5432/keel_no_such_database",
    ))
    .await
    .unwrap_err();
    match &e {
        DatabaseError::DatabaseNotFound { database, .. } => {
            assert_eq!(database, "keel_no_such_database");
        }
        other => panic!("expected DatabaseNotFound, got {other:?}"),
    }
    assert!(!e.is_retryable());

    let e = Database::connect(config(
        "postgres://keel_no_such_role:pw1234567@127.0.0.1:5432/postgres",
    ))
    .await
    .unwrap_err();
    match &e {
        DatabaseError::AuthenticationFailed { user, .. } => {
            assert_eq!(user.as_deref(), Some("keel_no_such_role"));
        }
        other => panic!("expected AuthenticationFailed, got {other:?}"),
    }
    assert_no_secret(&e, "pw1234567");
}

#[tokio::test]
async fn wrong_password_is_an_authentication_error_without_the_password() {
    let pg = ThrowawayPostgres::new().await.unwrap();
    let wrong = "Wr0ngPassw0rd-xyz";
    let e = Database::connect(config(&pg.url_with_password(wrong)))
        .await
        .unwrap_err();
    match &e {
        DatabaseError::AuthenticationFailed { user, code, .. } => {
            assert_eq!(user.as_deref(), Some(pg.user()));
            assert_eq!(code, "28P01");
        }
        other => panic!("expected AuthenticationFailed, got {other:?}"),
    }
    assert!(e.to_string().contains("password"), "{e}");
    assert!(!e.is_retryable());
    assert_no_secret(&e, wrong);
    assert_no_secret(&e, pg.password());
    let keel = keel_core::Error::from(e);
    assert!(!keel.is_retryable());
    assert!(!format!("{keel:?}").contains(wrong));

    // The right password works, and the password given separately wins
    // over the URL's.
    let right = DatabaseConfig::builder()
        .url(pg.url_with_password(wrong))
        .password(pg.password())
        .min_connections(0)
        .build()
        .unwrap();
    let db = Database::connect(right).await.unwrap();
    let one: i32 = sqlx::query_scalar("SELECT 1")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(one, 1);
    db.close().await;
}

#[tokio::test]
async fn tls_required_against_a_server_without_tls_fails_typed() {
    let e = Database::connect(
        DatabaseConfig::builder()
            .url("postgres://postgres@127.0.0.1:5432/postgres")
            .tls_mode(keel_database::TlsMode::Require)
            .min_connections(0)
            .build()
            .unwrap(),
    )
    .await;
    // The local server may or may not offer TLS; when it does not, the
    // failure is the typed TLS error, and when it does, the pool works.
    match e {
        Ok(db) => {
            let ssl: bool =
                sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
                    .fetch_one(db.pool())
                    .await
                    .unwrap();
            assert!(ssl);
        }
        Err(e) => assert!(matches!(e, DatabaseError::Tls { .. }), "{e:?}"),
    }
}

#[tokio::test]
async fn lazy_pool_reports_failures_as_retryable_on_use() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let db = Database::connect_lazy(
        DatabaseConfig::builder()
            .url(format!("postgres://app@127.0.0.1:{port}/app"))
            .min_connections(0)
            .acquire_timeout(Duration::from_millis(300))
            .build()
            .unwrap(),
    );
    let e = tokio::time::timeout(Duration::from_secs(5), db.begin())
        .await
        .expect("begin must give up after the acquire timeout")
        .unwrap_err();
    assert!(e.is_retryable(), "{e:?}");
    let keel = keel_core::Error::from(e);
    assert!(keel.is_retryable());
    let stats = db.stats();
    assert_eq!(stats.acquires, 1);
    assert_eq!(stats.acquire_timeouts, 1);
    assert!(stats.acquire_wait_total >= Duration::from_millis(300));

    db.close().await;
    let closed = db.begin().await.unwrap_err();
    assert!(matches!(closed, DatabaseError::PoolClosed), "{closed:?}");
}
