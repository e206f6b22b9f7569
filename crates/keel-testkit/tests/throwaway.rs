//! `ThrowawayPostgres`: a private cluster a test may stop, start and restart.

use std::time::Duration;

use keel_testkit::ThrowawayPostgres;
use sqlx::{Connection, Executor, PgConnection};

async fn select_one(url: &str) -> Result<i32, sqlx::Error> {
    let mut conn = PgConnection::connect(url).await?;
    let one: i32 = sqlx::query_scalar("SELECT 1").fetch_one(&mut conn).await?;
    conn.close().await?;
    Ok(one)
}

#[tokio::test]
async fn stop_start_and_restart_keep_port_and_data() {
    let pg = ThrowawayPostgres::new().await.unwrap();
    let url = pg.url();
    assert!(pg.is_running());

    let mut conn = PgConnection::connect(&url).await.unwrap();
    conn.execute("CREATE TABLE kept (v int); INSERT INTO kept VALUES (42)")
        .await
        .unwrap();

    pg.stop().await.unwrap();
    assert!(!pg.is_running());
    // The old connection is dead, and new ones are refused.
    assert!(
        sqlx::query("SELECT 1").execute(&mut conn).await.is_err(),
        "a connection survived the server's stop"
    );
    let refused = tokio::time::timeout(Duration::from_secs(10), select_one(&url))
        .await
        .expect("connecting to a stopped server hung");
    assert!(refused.is_err());
    pg.stop().await.unwrap(); // stopping twice is harmless

    pg.start().await.unwrap();
    assert_eq!(pg.url(), url, "the port changed across stop/start");
    let mut conn = PgConnection::connect(&url).await.unwrap();
    let kept: i32 = sqlx::query_scalar("SELECT v FROM kept")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(kept, 42, "data was lost across stop/start");

    pg.restart().await.unwrap();
    assert!(sqlx::query("SELECT 1").execute(&mut conn).await.is_err());
    assert_eq!(select_one(&url).await.unwrap(), 1);

    pg.kill().await.unwrap();
    pg.start().await.unwrap();
    assert_eq!(
        select_one(&url).await.unwrap(),
        1,
        "no recovery after a crash"
    );
}

#[tokio::test]
async fn a_wrong_password_is_refused() {
    let pg = ThrowawayPostgres::new().await.unwrap();
    assert_eq!(select_one(&pg.url()).await.unwrap(), 1);
    let err = select_one(&pg.url_with_password("not-the-password"))
        .await
        .expect_err("a wrong password was accepted");
    let code = err
        .as_database_error()
        .and_then(|e| e.code())
        .map(|c| c.into_owned());
    assert_eq!(code.as_deref(), Some("28P01"), "unexpected error: {err}");
}

#[tokio::test]
async fn dropping_removes_the_cluster() {
    let pg = ThrowawayPostgres::new().await.unwrap();
    let url = pg.url();
    let log = pg.log_file().to_path_buf();
    let dir = log.parent().unwrap().to_path_buf();
    assert!(dir.exists());
    drop(pg);
    assert!(!dir.exists(), "{} is left behind", dir.display());
    assert!(select_one(&url).await.is_err(), "the server still runs");
}

#[tokio::test]
async fn clusters_are_independent() {
    let (a, b) = tokio::join!(ThrowawayPostgres::new(), ThrowawayPostgres::new());
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_ne!(a.port(), b.port());
    a.stop().await.unwrap();
    assert_eq!(select_one(&b.url()).await.unwrap(), 1);
    assert!(select_one(&a.url()).await.is_err());
}

/// Run in a child process by `a_dead_test_process_leaves_nothing_behind`:
/// creates a cluster, says where, and waits to be killed.
#[tokio::test]
#[ignore = "helper, run in a child process by another test"]
#[allow(
    clippy::print_stdout,
    reason = "the parent process reads the answer from stdout"
)]
async fn child_creates_a_cluster_and_waits() {
    let pg = ThrowawayPostgres::new().await.unwrap();
    println!(
        "READY {} {}",
        pg.port(),
        pg.log_file().parent().unwrap().display()
    );
    tokio::time::sleep(Duration::from_secs(120)).await;
}

#[tokio::test]
async fn a_dead_test_process_leaves_nothing_behind() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_creates_a_cluster_and_waits",
            "--ignored",
            "--nocapture",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .find(|l| l.starts_with("READY "))
    })
    .await
    .unwrap()
    .expect("the child never reported its cluster");
    let mut parts = line.split_whitespace().skip(1);
    let port: u16 = parts.next().unwrap().parse().unwrap();
    let dir = std::path::PathBuf::from(parts.next().unwrap());
    assert!(dir.exists());

    // SIGKILL: no destructor runs; the watchdog must clean up.
    child.kill().unwrap();
    child.wait().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while dir.exists() || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "the cluster of a killed test process is still there: {}",
            dir.display()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
