//! Unit tests of the error taxonomy: kinds, codes, descriptions, status
//! mappings and the command error.

use super::*;

#[test]
fn kinds_codes_and_retryability() {
    let conflict = Error::from(VersionConflict {
        subject: "Order-1".into(),
        expected: ExpectedVersion::Exact(Version::new(2)),
        actual: Version::new(3),
    });
    assert_eq!(conflict.kind(), ErrorKind::Conflict);
    assert_eq!(conflict.code(), "keel.conflict.version");
    assert!(!conflict.is_retryable());
    assert_eq!(conflict.as_conflict().unwrap().actual, Version::new(3));
    assert_eq!(
        conflict.to_string(),
        "version conflict on Order-1: expected version 2, actual version 3"
    );

    let down = Error::unavailable(
        "postgres",
        "connection reset",
        std::io::Error::other("reset"),
    );
    assert_eq!(down.kind(), ErrorKind::Unavailable);
    assert!(down.is_retryable());
    assert!(std::error::Error::source(&down).is_some());

    let timeout = Error::Timeout {
        operation: "acquire".into(),
        after: Duration::from_secs(1),
    };
    assert!(timeout.is_retryable());
    assert_eq!(timeout.code(), "keel.timeout");

    let bad = Error::invalid_input("page_size", "must be between 1 and 1000");
    assert_eq!(bad.kind(), ErrorKind::InvalidInput);
    assert_eq!(
        bad.to_string(),
        "invalid page_size: must be between 1 and 1000"
    );
    assert!(!bad.is_retryable());
}

#[test]
fn descriptions_show_caller_errors_and_hide_server_faults() {
    let secret = "postgres://app:hunter2@db.internal:5432 SELECT * FROM orders";
    let faults = [
        Error::unavailable("postgres", secret, std::io::Error::other(secret)),
        Error::Timeout {
            operation: secret.to_owned().into(),
            after: Duration::from_secs(1),
        },
        Error::internal(secret, std::io::Error::other(secret)),
    ];
    for e in &faults {
        assert!(e.kind().is_server_fault(), "{e:?}");
        let d = e.describe();
        assert!(!d.detail.contains("hunter2"), "{d:?}");
        assert!(!d.detail.contains("db.internal"), "{d:?}");
        assert_eq!(d.code, e.code());
        assert_eq!(d.kind, e.kind());
        assert_eq!(d.retryable, e.is_retryable());
        // The log line keeps everything.
        assert!(e.full_message().contains("hunter2"));
    }
    assert_eq!(faults[0].describe().title, "Service unavailable");
    assert_eq!(faults[1].describe().title, "Timed out");
    assert_eq!(faults[2].describe().title, "Internal error");

    let conflict = Error::from(VersionConflict {
        subject: "Order-42".into(),
        expected: ExpectedVersion::Exact(Version::new(3)),
        actual: Version::new(4),
    })
    .describe();
    assert_eq!(conflict.title, "Version conflict");
    assert_eq!(
        conflict.detail,
        "Order-42 was changed by someone else: expected version 3, found version 4"
    );
    let caller_errors = [
        (
            Error::AlreadyExists {
                subject: "order 7".into(),
            },
            "Already exists",
            "order 7 already exists",
        ),
        (
            Error::not_found("order 7"),
            "Not found",
            "order 7 was not found",
        ),
        (
            Error::invalid_input("qty", "must be positive"),
            "Invalid input",
            "invalid qty: must be positive",
        ),
        (
            Error::Unauthorized {
                reason: "token expired".into(),
            },
            "Unauthorized",
            "token expired",
        ),
        (
            Error::Forbidden {
                reason: "not the owner".into(),
            },
            "Forbidden",
            "not the owner",
        ),
    ];
    for (e, title, detail) in caller_errors {
        assert!(!e.kind().is_server_fault(), "{e:?}");
        let d = e.describe();
        assert_eq!((d.title, d.detail.as_ref()), (title, detail));
        assert!(!d.retryable);
    }
}

#[test]
fn one_table_gives_http_and_grpc_codes() {
    let busy = Error::ResourceExhausted {
        resource: "concurrent calls".into(),
        retry_after: Some(Duration::from_millis(250)),
    };
    let d = busy.describe();
    assert_eq!((d.http_status, d.grpc_code), (429, 8));
    assert_eq!(d.code, "keel.resource_exhausted");
    assert_eq!(d.retry_after, Some(Duration::from_millis(250)));
    assert!(d.retryable && !busy.kind().is_server_fault());

    let dup = Error::AlreadyExists {
        subject: "order 1".into(),
    }
    .describe();
    assert_eq!((dup.http_status, dup.grpc_code), (409, 6));
    let conflict = Error::from(VersionConflict {
        subject: "Order-1".into(),
        expected: ExpectedVersion::Exact(Version::new(1)),
        actual: Version::new(2),
    })
    .describe();
    assert_eq!((conflict.http_status, conflict.grpc_code), (409, 10));
    assert_eq!(conflict.retry_after, None);
    for (error, http, grpc) in [
        (Error::not_found("x"), 404, 5),
        (Error::invalid_input("f", "bad"), 400, 3),
        (Error::Unauthorized { reason: "r".into() }, 401, 16),
        (Error::Forbidden { reason: "r".into() }, 403, 7),
        (Error::internal_msg("boom"), 500, 13),
        (
            Error::Timeout {
                operation: "op".into(),
                after: Duration::from_secs(1),
            },
            504,
            4,
        ),
        (
            Error::unavailable("pg", "down", std::io::Error::other("x")),
            503,
            14,
        ),
    ] {
        let d = error.describe();
        assert_eq!((d.http_status, d.grpc_code), (http, grpc), "{error:?}");
    }
    assert_eq!((DomainError::HTTP_STATUS, DomainError::GRPC_CODE), (422, 9));
}

#[test]
fn full_message_follows_the_sources() {
    let e = Error::unavailable(
        "postgres",
        "connect failed",
        Error::internal("inner", std::io::Error::other("refused")),
    );
    assert_eq!(
        e.full_message(),
        "postgres is unavailable: connect failed: internal error: inner: refused"
    );
    assert_eq!(Error::not_found("x").full_message(), "x was not found");
}

#[test]
fn command_error_separates_domain_from_infrastructure() {
    let rejected: CommandError<DomainError> =
        CommandError::Rejected(DomainError::new("cart.empty", "cart is empty"));
    assert!(rejected.as_rejection().is_some());
    assert!(rejected.as_infrastructure().is_none());
    let infra: CommandError<DomainError> = Error::not_found("cart 1").into();
    assert_eq!(
        infra.as_infrastructure().unwrap().kind(),
        ErrorKind::NotFound
    );
}
