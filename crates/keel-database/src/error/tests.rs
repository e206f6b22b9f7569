//! Unit tests of the classification of `sqlx` errors that need no server.

use super::*;

#[test]
fn errors_cross_threads() {
    fn assert_send_sync<T: Send + Sync + 'static>() {}
    assert_send_sync::<DatabaseError>();
}

#[test]
fn io_errors_are_retryable_unavailable() {
    let e = DatabaseError::from(sqlx::Error::Io(std::io::Error::new(
        std::io::ErrorKind::ConnectionReset,
        "reset",
    )));
    assert!(matches!(e, DatabaseError::ConnectionLost { .. }));
    assert!(e.is_retryable());
    let k = keel_core::Error::from(e);
    assert_eq!(k.kind(), keel_core::ErrorKind::Unavailable);
    assert!(k.is_retryable());
    assert!(std::error::Error::source(&k).is_some());
}

#[test]
fn pool_errors_map_to_timeout_and_unavailable() {
    let t = keel_core::Error::from(
        DatabaseError::from(sqlx::Error::PoolTimedOut)
            .with_timeouts(Some(Duration::from_secs(3)), None),
    );
    assert_eq!(t.kind(), keel_core::ErrorKind::Timeout);
    assert_eq!(
        t.to_string(),
        "postgres connection acquire timed out after 3s"
    );
    let c = to_keel(sqlx::Error::PoolClosed);
    assert_eq!(c.kind(), keel_core::ErrorKind::Unavailable);
    assert!(c.is_retryable());
}

#[test]
fn row_not_found_and_decode_errors() {
    assert_eq!(
        to_keel(sqlx::Error::RowNotFound).kind(),
        keel_core::ErrorKind::NotFound
    );
    let decode = to_keel(sqlx::Error::ColumnNotFound("x".into()));
    assert_eq!(decode.kind(), keel_core::ErrorKind::Internal);
    assert!(!decode.is_retryable());
}

#[test]
fn chain_detection_sees_through_keel_errors() {
    let plain = keel_core::Error::from(DatabaseError::RowNotFound);
    assert!(!chain_has_transaction_conflict(&plain));
    let io = to_keel(sqlx::Error::Io(std::io::Error::other("x")));
    assert!(!chain_has_transaction_conflict(&io));
}
