//! Redis over TLS (`rediss://`, rustls): a throwaway `redis-server` with a
//! certificate from a throwaway CA.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use keel_cache::{CacheAside, RedisCache, RedisConfig};

fn openssl(dir: &Path, args: &[&str]) {
    let status = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("the openssl tool makes the test certificates");
    assert!(status.success(), "openssl {args:?} failed");
}

/// A CA, and a server certificate for localhost / 127.0.0.1 signed by it.
fn certificates(dir: &Path) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509", "-days", "1", "-subj", "/CN=keel-test-ca"];
    ca.extend(ec);
    ca.extend(["-keyout", "ca.key", "-out", "ca.crt"]);
    openssl(dir, &ca);
    let mut csr = vec!["req", "-subj", "/CN=localhost"];
    csr.extend(ec);
    csr.extend(["-keyout", "server.key", "-out", "server.csr"]);
    openssl(dir, &csr);
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            "san.ext",
            "-out",
            "server.crt",
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caches_over_tls_and_refuses_an_untrusted_server() {
    let dir = tempfile::tempdir().unwrap();
    certificates(dir.path());
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let file = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    let _server = tokio::process::Command::new("redis-server")
        .args([
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .args([
            "--tls-cert-file",
            &file("server.crt"),
            "--tls-key-file",
            &file("server.key"),
        ])
        .args([
            "--tls-ca-cert-file",
            &file("ca.crt"),
            "--tls-auth-clients",
            "no",
        ])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("redis-server must be installed");
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }

    let url = format!("rediss://localhost:{port}");
    let ca = std::fs::read(dir.path().join("ca.crt")).unwrap();
    let connect = || {
        RedisCache::connect(
            RedisConfig::new(url.clone())
                .key_prefix("tls:")
                .root_certificate_pem(ca.clone()),
        )
    };
    let one = CacheAside::builder(connect().await.unwrap(), "secure")
        .local_tier(Duration::from_secs(60), 10)
        .build()
        .await
        .unwrap();
    let two = CacheAside::builder(connect().await.unwrap(), "secure")
        .local_tier(Duration::from_secs(60), 10)
        .build()
        .await
        .unwrap();
    one.set("k", "v1").await.unwrap();
    assert_eq!(two.get::<String>("k").await.unwrap().as_deref(), Some("v1"));
    // The invalidation travels over the TLS pub/sub connection.
    one.set("k", "v2").await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while two.get::<String>("k").await.unwrap().as_deref() != Some("v2") {
        assert!(
            std::time::Instant::now() < deadline,
            "no invalidation over TLS"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Without trusting the test CA, the server's certificate is refused.
    let untrusted =
        RedisCache::connect(RedisConfig::new(url.clone()).connect_timeout(Duration::from_secs(2)))
            .await;
    assert!(untrusted.is_err(), "an untrusted certificate was accepted");
}
