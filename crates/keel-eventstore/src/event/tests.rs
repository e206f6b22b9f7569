//! Unit tests of stored metadata: parsed on first read, kept as text.

use keel_core::{CorrelationId, Metadata};

use super::StoredMetadata;

#[test]
fn stored_metadata_parses_its_text_when_read() {
    let written = Metadata::new()
        .with_correlation_id(CorrelationId::new())
        .with_actor("clerk");
    let text = serde_json::to_string(&written).unwrap();
    let stored = StoredMetadata::from_json(text.as_str());
    assert_eq!(stored.json(), Some(text.as_str()));
    assert_eq!(stored.actor.as_deref(), Some("clerk"), "read through Deref");
    assert_eq!(stored, written);
    assert_eq!(stored.clone().into_metadata(), written);
    assert_eq!(
        StoredMetadata::from_json(text.as_str()).into_metadata(),
        written,
        "owned before any read"
    );
    assert_eq!(StoredMetadata::from(written.clone()), stored);
    assert_eq!(StoredMetadata::from(written.clone()).json(), None);
}

#[test]
fn metadata_text_that_does_not_fit_reads_as_empty() {
    for text in [
        r#"{"actor": 42}"#,
        r#"{"correlation_id": "not a uuid"}"#,
        "[]",
    ] {
        let stored = StoredMetadata::from_json(text);
        assert_eq!(*stored, Metadata::default(), "{text}");
        assert_eq!(stored.json(), Some(text), "the text is kept");
    }
    assert_eq!(*StoredMetadata::default(), Metadata::default());
}
