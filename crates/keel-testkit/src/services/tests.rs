//! Unit tests of discovery: URL checks, the missing-binary message, redaction
//! and address parsing.

use super::*;

#[test]
fn meilisearch_urls_must_be_http() {
    let d = Discovery::from_vars([("MEILISEARCH_URL", "127.0.0.1:7700")]);
    assert!(matches!(
        d.find_blocking(Service::Meilisearch),
        Err(Error::InvalidUrl { .. })
    ));
    let d = Discovery::from_vars([("MEILISEARCH_URL", "http://127.0.0.1:7700")]);
    let found = d.find_blocking(Service::Meilisearch).unwrap();
    assert_eq!(found.source(), Source::Environment);
    assert_eq!(found.connection_string(), "http://127.0.0.1:7700");
}

#[test]
fn meilisearch_without_a_binary_says_what_to_set() {
    let d = Discovery::from_vars(Vec::<(String, String)>::new())
        .ignore_defaults(true)
        .containers(false)
        .state_dir(std::env::temp_dir().join("keel-testkit-meili-unit"))
        .program(Service::Meilisearch, "/nonexistent/meilisearch");
    match d.find_blocking(Service::Meilisearch) {
        Err(Error::ServiceUnavailable { tried, hint, .. }) => {
            assert!(tried.contains("MEILISEARCH_BIN"), "{tried}");
            assert!(hint.contains("MEILISEARCH_URL"), "{hint}");
        }
        other => panic!("expected ServiceUnavailable, got {other:?}"),
    }
}

#[test]
fn redact_hides_only_the_password() {
    assert_eq!(
        redact("postgres://u:secret@h:5432/db"),
        "postgres://u:***@h:5432/db"
    );
    assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
    assert_eq!(redact("127.0.0.1:8085"), "127.0.0.1:8085");
}

#[test]
fn address_of_strips_scheme_credentials_and_path() {
    let e = |c: &str| Endpoint {
        service: Service::Postgres,
        connection: c.to_owned(),
        source: Source::Started,
    };
    assert_eq!(
        address_of(&e("postgres://postgres@127.0.0.1:1/postgres")),
        "127.0.0.1:1"
    );
    assert_eq!(address_of(&e("redis://127.0.0.1:2")), "127.0.0.1:2");
    assert_eq!(address_of(&e("127.0.0.1:3")), "127.0.0.1:3");
}
