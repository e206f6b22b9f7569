//! Keel errors as tonic statuses: codes, metadata, and nothing leaked.

use std::time::Duration;

use keel_core::{
    CommandError, DomainError, Error, ErrorKind, ExpectedVersion, Version, VersionConflict,
};
use keel_grpc::{
    ACTUAL_VERSION_KEY, ERROR_CODE_KEY, EXPECTED_VERSION_KEY, FIELD_KEY, IntoStatus as _,
    RETRYABLE_KEY, StatusExt as _, code_for, error_code, status_from_error,
};
use tonic::Code;

const PASSWORD: &str = "hunter2-Sup3rSecret";
const HOST: &str = "pg-primary.internal.example.com";

fn leaky_source() -> std::io::Error {
    std::io::Error::other(format!(
        "connection to postgres://orders:{PASSWORD}@{HOST}:5432/orders refused; SELECT * FROM orders"
    ))
}

fn md<'a>(status: &'a tonic::Status, key: &str) -> Option<&'a str> {
    status.metadata().get(key).map(|v| v.to_str().unwrap())
}

#[test]
fn conflicts_carry_versions_in_metadata() {
    let status = Error::from(VersionConflict {
        subject: "Order-42".into(),
        expected: ExpectedVersion::Exact(Version::new(3)),
        actual: Version::new(5),
    })
    .into_status();
    assert_eq!(status.code(), Code::Aborted);
    assert_eq!(error_code(&status), Some("keel.conflict.version"));
    assert_eq!(md(&status, EXPECTED_VERSION_KEY), Some("version 3"));
    assert_eq!(md(&status, ACTUAL_VERSION_KEY), Some("5"));
    assert_eq!(md(&status, RETRYABLE_KEY), Some("false"));
    assert!(status.message().contains("Order-42"));

    let dup = status_from_error(&Error::AlreadyExists {
        subject: "order 7".into(),
    });
    assert_eq!(dup.code(), Code::AlreadyExists);
    assert_eq!(error_code(&dup), Some("keel.conflict.already_exists"));
}

#[test]
fn internal_and_dependency_failures_leak_nothing() {
    let cases = [
        (
            Error::internal(format!("query failed on {HOST}"), leaky_source()),
            Code::Internal,
            "false",
        ),
        (
            Error::unavailable(
                "postgres",
                format!("cannot reach {HOST} as orders:{PASSWORD}"),
                leaky_source(),
            ),
            Code::Unavailable,
            "true",
        ),
        (
            Error::Timeout {
                operation: format!("acquire on {HOST}").into(),
                after: Duration::from_secs(5),
            },
            Code::DeadlineExceeded,
            "true",
        ),
    ];
    for (error, code, retryable) in cases {
        let status = status_from_error(&error);
        assert_eq!(status.code(), code);
        assert_eq!(md(&status, RETRYABLE_KEY), Some(retryable));
        let mut visible = status.message().to_owned();
        for kv in status.metadata().iter() {
            if let tonic::metadata::KeyAndValueRef::Ascii(k, v) = kv {
                visible.push_str(&format!(" {}={}", k.as_str(), v.to_str().unwrap()));
            }
        }
        visible.push_str(&String::from_utf8_lossy(status.details()));
        for secret in [PASSWORD, HOST, "SELECT", "postgres", "5432"] {
            assert!(!visible.contains(secret), "leaked {secret:?}: {visible}");
        }
        assert!(!status.message().is_empty());
    }
}

#[test]
fn commands_and_caller_errors() {
    let rejected: Result<(), CommandError<DomainError>> = Err(CommandError::Rejected(
        DomainError::new("order.already_shipped", "the order has already shipped"),
    ));
    let status = rejected.or_status().unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(error_code(&status), Some("order.already_shipped"));
    assert_eq!(status.message(), "the order has already shipped");

    let infra: Result<(), CommandError<DomainError>> =
        Err(CommandError::Infrastructure(Error::not_found("cart 7")));
    assert_eq!(infra.or_status().unwrap_err().code(), Code::NotFound);

    let invalid = Error::invalid_input("page_size", "must be between 1 and 1000").into_status();
    assert_eq!(invalid.code(), Code::InvalidArgument);
    assert_eq!(md(&invalid, FIELD_KEY), Some("page_size"));
    assert_eq!(
        invalid.message(),
        "invalid page_size: must be between 1 and 1000"
    );
    assert_eq!(md(&invalid, ERROR_CODE_KEY), Some("keel.invalid_input"));
}

#[test]
fn every_kind_has_a_code() {
    let expected = [
        (ErrorKind::Conflict, Code::Aborted),
        (ErrorKind::NotFound, Code::NotFound),
        (ErrorKind::InvalidInput, Code::InvalidArgument),
        (ErrorKind::Unauthorized, Code::Unauthenticated),
        (ErrorKind::Forbidden, Code::PermissionDenied),
        (ErrorKind::Unavailable, Code::Unavailable),
        (ErrorKind::Timeout, Code::DeadlineExceeded),
        (ErrorKind::Internal, Code::Internal),
    ];
    for (kind, code) in expected {
        assert_eq!(code_for(kind), code, "{kind}");
    }
}
