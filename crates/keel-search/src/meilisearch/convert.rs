//! Conversions between the SDK's types and Keel's: errors, settings, and
//! the byte reader the SDK streams a checked batch from.

use std::collections::{BTreeMap, HashMap};

use meilisearch_sdk::errors::{Error as SdkError, ErrorCode, MeilisearchError};
use meilisearch_sdk::settings::{FilterableAttribute, Settings};

use crate::error::SearchError;
use crate::names::IndexName;
use crate::settings::IndexSettings;

/// The code of a Meilisearch error as Meilisearch spells it.
pub(super) fn code_text(code: &ErrorCode) -> String {
    code.to_string()
}

pub(super) fn from_meili(
    e: &MeilisearchError,
    index: Option<&IndexName>,
    task: Option<u64>,
) -> SearchError {
    match (&e.error_code, index) {
        (ErrorCode::IndexNotFound, Some(i)) => SearchError::IndexNotFound {
            index: i.to_string(),
        },
        (ErrorCode::IndexAlreadyExists, Some(i)) => SearchError::IndexAlreadyExists {
            index: i.to_string(),
        },
        _ => SearchError::Rejected {
            code: code_text(&e.error_code),
            error_type: e.error_type.to_string(),
            message: e.error_message.clone(),
            task,
        },
    }
}

/// Turns an SDK error into a [`SearchError`]; `index` names the index the
/// call was about, for `index_not_found`.
pub(super) fn map_err(e: SdkError, index: Option<&IndexName>) -> SearchError {
    match e {
        SdkError::Meilisearch(m) => from_meili(&m, index, None),
        SdkError::MeilisearchCommunication(c) if c.status_code == 413 => SearchError::Rejected {
            code: "payload_too_large".to_owned(),
            error_type: "invalid_request".to_owned(),
            message: "the request is larger than the server accepts".to_owned(),
            task: None,
        },
        SdkError::MeilisearchCommunication(c) => SearchError::Unavailable {
            message: format!("Meilisearch answered HTTP {}", c.status_code),
            source: None,
        },
        SdkError::Other(other) => match other.downcast::<super::http::RequestTimedOut>() {
            Ok(timed_out) => SearchError::Timeout {
                operation: "a request to Meilisearch".to_owned(),
                after: timed_out.0,
            },
            Err(other) => SearchError::Unavailable {
                message: "the request to Meilisearch failed".to_owned(),
                source: Some(other),
            },
        },
        SdkError::ParseError(p) => SearchError::Unavailable {
            message: "Meilisearch answered something unexpected".to_owned(),
            source: Some(Box::new(p)),
        },
        other => SearchError::Unavailable {
            message: "the request to Meilisearch failed".to_owned(),
            source: Some(Box::new(other)),
        },
    }
}

pub(super) fn to_sdk_settings(s: &IndexSettings) -> Settings {
    let searchable = s
        .searchable_attributes
        .clone()
        .unwrap_or_else(|| vec!["*".to_owned()]);
    let synonyms: HashMap<String, Vec<String>> = s
        .synonyms
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    Settings::new()
        .with_searchable_attributes(searchable)
        .with_filterable_attributes(&s.filterable_attributes)
        .with_sortable_attributes(&s.sortable_attributes)
        .with_ranking_rules(s.effective_ranking_rules())
        .with_synonyms(synonyms)
}

pub(super) fn from_sdk_settings(s: Settings) -> IndexSettings {
    let filterable = s
        .filterable_attributes
        .unwrap_or_default()
        .into_iter()
        .flat_map(|f| match f {
            FilterableAttribute::Attribute(a) => vec![a],
            FilterableAttribute::Settings(s) => s.attribute_patterns,
        })
        .collect();
    let mut out = IndexSettings {
        searchable_attributes: s.searchable_attributes,
        filterable_attributes: filterable,
        sortable_attributes: s.sortable_attributes.unwrap_or_default(),
        ranking_rules: s.ranking_rules,
        synonyms: s
            .synonyms
            .unwrap_or_default()
            .into_iter()
            .collect::<BTreeMap<_, _>>(),
    };
    out.normalize();
    out
}

pub(super) fn futures_io_cursor(bytes: Vec<u8>) -> futures_util_cursor::Cursor {
    futures_util_cursor::Cursor::new(bytes)
}

/// A minimal `futures_io::AsyncRead` over owned bytes, so the SDK streams
/// the NDJSON batch Keel has already encoded and checked.
mod futures_util_cursor {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    pub(in crate::meilisearch) struct Cursor {
        bytes: Vec<u8>,
        at: usize,
    }

    impl Cursor {
        pub(in crate::meilisearch) fn new(bytes: Vec<u8>) -> Self {
            Self { bytes, at: 0 }
        }
    }

    impl futures::io::AsyncRead for Cursor {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &mut [u8],
        ) -> Poll<std::io::Result<usize>> {
            let n = buf.len().min(self.bytes.len() - self.at);
            let at = self.at;
            buf[..n].copy_from_slice(&self.bytes[at..at + n]);
            self.at += n;
            Poll::Ready(Ok(n))
        }
    }
}
