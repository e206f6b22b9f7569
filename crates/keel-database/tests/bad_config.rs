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

/// A fake server that refuses TLS the way PostgreSQL does: it answers the
/// client's SSLRequest with `N`.
async fn server_without_tls() -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = [0_u8; 8];
                if socket.read_exact(&mut request).await.is_ok() {
                    let _ = socket.write_all(b"N").await;
                    // Then wait for the client to give up.
                    let mut rest = [0_u8; 64];
                    let _ = socket.read(&mut rest).await;
                }
            });
        }
    });
    port
}

fn tls_config(url: &str, mode: keel_database::TlsMode, ca: Option<&str>) -> DatabaseConfig {
    let mut b = DatabaseConfig::builder()
        .url(url)
        .tls_mode(mode)
        .min_connections(0)
        .max_connections(1);
    if let Some(ca) = ca {
        b = b.tls_ca_file(ca);
    }
    b.build().unwrap()
}

#[tokio::test]
async fn tls_required_but_not_offered_is_a_tls_error() {
    let port = server_without_tls().await;
    let url = format!("postgres://app:Sup3rS3cret@127.0.0.1:{port}/app");
    let e = Database::connect(tls_config(&url, keel_database::TlsMode::Require, None))
        .await
        .unwrap_err();
    assert!(matches!(e, DatabaseError::Tls { .. }), "{e:?}");
    assert_no_secret(&e, "Sup3rS3cret");
}

/// Against the local server's TLS set-up (Debian's self-signed "snakeoil"
/// certificate for `localhost`): verification through rustls accepts it only
/// with that certificate as CA and, for verify-full, the matching host name.
#[tokio::test]
async fn tls_verification_against_the_local_server() {
    use keel_database::TlsMode;
    const SNAKEOIL: &str = "/etc/ssl/certs/ssl-cert-snakeoil.pem";
    let probe = sqlx::PgPool::connect("postgres://postgres@127.0.0.1:5432/postgres")
        .await
        .unwrap();
    let ssl: String = sqlx::query_scalar("SHOW ssl")
        .fetch_one(&probe)
        .await
        .unwrap();
    let cert: String = sqlx::query_scalar("SHOW ssl_cert_file")
        .fetch_one(&probe)
        .await
        .unwrap();
    probe.close().await;
    if ssl != "on" || cert != SNAKEOIL {
        eprintln!(
            "local PostgreSQL has no snakeoil TLS set-up (ssl={ssl}, cert={cert}); only the negative cases run"
        );
    }
    let tls_in_use = async |db: &Database| -> bool {
        sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            .fetch_one(db.pool())
            .await
            .unwrap()
    };

    // Without the CA, the self-signed certificate is refused.
    let untrusted = Database::connect(tls_config(
        "postgres://postgres@127.0.0.1:5432/postgres",
        TlsMode::VerifyFull,
        None,
    ))
    .await
    .unwrap_err();
    assert!(
        matches!(untrusted, DatabaseError::Tls { .. }),
        "{untrusted:?}"
    );

    if ssl == "on" && cert == SNAKEOIL {
        let require = Database::connect(tls_config(
            "postgres://postgres@127.0.0.1:5432/postgres",
            TlsMode::Require,
            None,
        ))
        .await
        .unwrap();
        assert!(tls_in_use(&require).await);

        let verified = Database::connect(tls_config(
            "postgres://postgres@localhost:5432/postgres",
            TlsMode::VerifyFull,
            Some(SNAKEOIL),
        ))
        .await
        .unwrap();
        assert!(tls_in_use(&verified).await);

        // Trusted CA, but the certificate does not name 127.0.0.1.
        let wrong_name = Database::connect(tls_config(
            "postgres://postgres@127.0.0.1:5432/postgres",
            TlsMode::VerifyFull,
            Some(SNAKEOIL),
        ))
        .await
        .unwrap_err();
        assert!(
            matches!(wrong_name, DatabaseError::Tls { .. }),
            "{wrong_name:?}"
        );

        // verify-ca accepts a certificate signed by the given CA. (With
        // sqlx 0.8.6 and current rustls it also checks the host name, see
        // `TlsMode::VerifyCa`, so this connects by the certificate's name.)
        let ca_only = Database::connect(tls_config(
            "postgres://postgres@localhost:5432/postgres",
            TlsMode::VerifyCa,
            Some(SNAKEOIL),
        ))
        .await
        .unwrap();
        assert!(tls_in_use(&ca_only).await);
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

/// A server that accepts TCP connections and then never answers (a hung
/// process, a black-holing proxy) is caught by the connect timeout, and by
/// the acquire timeout in a lazy pool: nothing waits forever.
#[tokio::test]
async fn silent_server_hits_the_connect_and_acquire_timeouts() {
    // The kernel completes the handshake from the listen backlog; nobody
    // ever reads or writes.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let url = format!("postgres://app:Sup3rS3cret@127.0.0.1:{port}/app");

    let e = tokio::time::timeout(
        Duration::from_secs(10),
        Database::connect(
            DatabaseConfig::builder()
                .url(&url)
                .min_connections(0)
                .connect_timeout(Duration::from_millis(300))
                .build()
                .unwrap(),
        ),
    )
    .await
    .expect("connect must give up after its timeout")
    .unwrap_err();
    match &e {
        DatabaseError::ConnectTimeout {
            host,
            port: p,
            after,
        } => {
            assert_eq!(host, "127.0.0.1");
            assert_eq!(*p, port);
            assert_eq!(*after, Duration::from_millis(300));
        }
        other => panic!("expected ConnectTimeout, got {other:?}"),
    }
    assert!(e.is_retryable());
    assert_no_secret(&e, "Sup3rS3cret");
    assert_eq!(
        keel_core::Error::from(e).kind(),
        keel_core::ErrorKind::Timeout
    );

    let lazy = Database::connect_lazy(
        DatabaseConfig::builder()
            .url(&url)
            .min_connections(0)
            .acquire_timeout(Duration::from_millis(300))
            .build()
            .unwrap(),
    );
    let e = tokio::time::timeout(Duration::from_secs(10), lazy.begin())
        .await
        .expect("begin must give up after the acquire timeout")
        .unwrap_err();
    match &e {
        DatabaseError::AcquireTimeout { after } => {
            assert_eq!(*after, Some(Duration::from_millis(300)));
        }
        other => panic!("expected AcquireTimeout, got {other:?}"),
    }
    drop(silent);
}

#[tokio::test]
async fn unknown_host_names_the_host() {
    let e = Database::connect(
        DatabaseConfig::builder()
            .url("postgres://app:Sup3rS3cret@no-such-host.invalid:5432/app")
            .min_connections(0)
            .connect_timeout(Duration::from_secs(3))
            .build()
            .unwrap(),
    )
    .await
    .unwrap_err();
    // Name resolution fails at once, or (with a resolver that does not
    // answer) the connect timeout catches it; both name the host.
    match &e {
        DatabaseError::Unreachable { host, port, .. }
        | DatabaseError::ConnectTimeout { host, port, .. } => {
            assert_eq!(host, "no-such-host.invalid");
            assert_eq!(*port, 5432);
        }
        other => panic!("expected Unreachable or ConnectTimeout, got {other:?}"),
    }
    assert!(e.to_string().contains("no-such-host.invalid:5432"), "{e}");
    assert_no_secret(&e, "Sup3rS3cret");
}
