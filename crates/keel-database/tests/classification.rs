//! Real PostgreSQL errors are classified by SQLSTATE and constraint name.

use keel_core::ErrorKind;
use keel_database::{DatabaseError, MIGRATIONS};
use keel_testkit::TestDatabase;
use sqlx::Executor;

async fn db_with_table() -> TestDatabase {
    let db = TestDatabase::create(&MIGRATIONS).await.unwrap();
    db.pool()
        .execute(
            "CREATE TABLE accounts (
                 id int PRIMARY KEY,
                 email text NOT NULL CONSTRAINT accounts_email_key UNIQUE,
                 balance int NOT NULL CONSTRAINT accounts_balance_positive CHECK (balance >= 0),
                 parent int CONSTRAINT accounts_parent_fk REFERENCES accounts (id)
             )",
        )
        .await
        .unwrap();
    sqlx::query("INSERT INTO accounts (id, email, balance) VALUES (1, 'a@example.com', 10)")
        .execute(db.pool())
        .await
        .unwrap();
    db
}

#[tokio::test]
async fn unique_violation_names_its_constraint() {
    let db = db_with_table().await;
    let err =
        sqlx::query("INSERT INTO accounts (id, email, balance) VALUES (2, 'a@example.com', 1)")
            .execute(db.pool())
            .await
            .unwrap_err();
    assert!(keel_database::is_unique_violation(&err, None));
    assert!(keel_database::is_unique_violation(
        &err,
        Some("accounts_email_key")
    ));
    assert!(!keel_database::is_unique_violation(
        &err,
        Some("accounts_pkey")
    ));
    assert_eq!(
        keel_database::constraint_of(&err),
        Some("accounts_email_key")
    );
    assert!(!keel_database::is_connection_error(&err));

    let classified = DatabaseError::from(err);
    assert!(classified.is_unique_violation(Some("accounts_email_key")));
    assert_eq!(classified.sqlstate(), Some("23505"));
    assert_eq!(classified.constraint(), Some("accounts_email_key"));
    assert!(!classified.is_retryable());
    // The key's value (in the server's DETAIL) stays out of the message.
    assert!(!classified.to_string().contains("a@example.com"));

    let keel = keel_core::Error::from(classified);
    assert_eq!(keel.kind(), ErrorKind::Conflict);
    assert_eq!(keel.code(), "keel.conflict.already_exists");
    assert!(!keel.is_retryable());

    // The primary key is a different constraint.
    let pk =
        sqlx::query("INSERT INTO accounts (id, email, balance) VALUES (1, 'b@example.com', 1)")
            .execute(db.pool())
            .await
            .unwrap_err();
    assert!(keel_database::is_unique_violation(
        &pk,
        Some("accounts_pkey")
    ));
}

#[tokio::test]
async fn other_constraint_violations_are_invalid_input() {
    let db = db_with_table().await;
    let check = sqlx::query("INSERT INTO accounts (id, email, balance) VALUES (3, 'c@x', -5)")
        .execute(db.pool())
        .await
        .unwrap_err();
    let check = DatabaseError::from(check);
    assert!(matches!(
        check,
        DatabaseError::ConstraintViolation {
            kind: keel_database::ConstraintKind::Check,
            ..
        }
    ));
    assert_eq!(check.constraint(), Some("accounts_balance_positive"));
    assert_eq!(
        keel_core::Error::from(check).kind(),
        ErrorKind::InvalidInput
    );

    let fk =
        sqlx::query("INSERT INTO accounts (id, email, balance, parent) VALUES (4, 'd@x', 0, 99)")
            .execute(db.pool())
            .await
            .unwrap_err();
    let fk = DatabaseError::from(fk);
    assert_eq!(fk.constraint(), Some("accounts_parent_fk"));
    assert_eq!(fk.sqlstate(), Some("23503"));

    let not_null = sqlx::query("INSERT INTO accounts (id, email, balance) VALUES (5, NULL, 0)")
        .execute(db.pool())
        .await
        .unwrap_err();
    match DatabaseError::from(not_null) {
        DatabaseError::ConstraintViolation { kind, column, .. } => {
            assert_eq!(kind, keel_database::ConstraintKind::NotNull);
            assert_eq!(column.as_deref(), Some("email"));
        }
        other => panic!("expected a NOT NULL violation, got {other:?}"),
    }

    let bad_value = sqlx::query("SELECT 'not-a-number'::int")
        .execute(db.pool())
        .await
        .unwrap_err();
    let bad_value = DatabaseError::from(bad_value);
    assert_eq!(bad_value.sqlstate(), Some("22P02"));
    assert_eq!(
        keel_core::Error::from(bad_value).kind(),
        ErrorKind::InvalidInput
    );
}

#[tokio::test]
async fn statement_timeout_is_a_retryable_timeout() {
    let db = TestDatabase::create(&MIGRATIONS).await.unwrap();
    let mut conn = db.pool().acquire().await.unwrap();
    conn.execute("SET statement_timeout = '50ms'")
        .await
        .unwrap();
    let err = sqlx::query("SELECT pg_sleep(5)")
        .execute(&mut *conn)
        .await
        .unwrap_err();
    assert!(keel_database::is_statement_timeout(&err));
    let classified = DatabaseError::from(err);
    assert!(matches!(classified, DatabaseError::StatementTimeout { .. }));
    assert!(classified.is_retryable());
    let keel = keel_core::Error::from(classified);
    assert_eq!(keel.kind(), ErrorKind::Timeout);
    assert!(keel.is_retryable());
}

#[tokio::test]
async fn syntax_errors_are_internal_and_not_retryable() {
    let db = TestDatabase::create(&MIGRATIONS).await.unwrap();
    let err = sqlx::query("SELEC 1").execute(db.pool()).await.unwrap_err();
    let classified = DatabaseError::from(err);
    assert_eq!(classified.sqlstate(), Some("42601"));
    assert!(!classified.is_retryable());
    let keel = keel_core::Error::from(classified);
    assert_eq!(keel.kind(), ErrorKind::Internal);
    assert!(keel.to_string().contains("42601"), "{keel}");
}

#[tokio::test]
async fn terminated_backend_is_a_connection_error() {
    let db = TestDatabase::create(&MIGRATIONS).await.unwrap();
    let mut victim = db.pool().acquire().await.unwrap();
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *victim)
        .await
        .unwrap();
    let killed: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert!(killed);
    let err = sqlx::query("SELECT 1")
        .execute(&mut *victim)
        .await
        .unwrap_err();
    assert!(keel_database::is_connection_error(&err), "{err:?}");
    let keel = keel_database::to_keel(err);
    assert_eq!(keel.kind(), ErrorKind::Unavailable);
    assert!(keel.is_retryable());
}
