//! Search requests and their results.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::error::{Result, SearchError};
use crate::filter::Filter;
use crate::names::check_field;

/// A document as the engine stores it: a JSON object.
pub type Document = Map<String, Value>;

/// The most hits one request may ask for (`limit` or `hits_per_page`).
pub const MAX_LIMIT: usize = 1000;

/// A sort direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Smallest first.
    Asc,
    /// Largest first.
    Desc,
}

/// One sort criterion: an attribute (declared sortable) and a direction.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SortBy {
    /// The attribute.
    pub field: String,
    /// The direction.
    pub direction: Direction,
}

impl SortBy {
    /// Ascending on `field`.
    pub fn asc(field: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            direction: Direction::Asc,
        }
    }

    /// Descending on `field`.
    pub fn desc(field: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            direction: Direction::Desc,
        }
    }

    /// Meilisearch's `field:asc` form.
    #[must_use]
    pub fn to_expression(&self) -> String {
        let dir = match self.direction {
            Direction::Asc => "asc",
            Direction::Desc => "desc",
        };
        format!("{}:{dir}", self.field)
    }
}

/// Which hits to return.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pagination {
    /// Skip `offset` hits, return at most `limit`; the total is an
    /// estimate ([`TotalHits::Estimated`]).
    Offset {
        /// Hits to skip.
        offset: usize,
        /// Hits to return (at most [`MAX_LIMIT`]).
        limit: usize,
    },
    /// Page `page` (from 1) of `hits_per_page`; the total is exact
    /// ([`TotalHits::Exact`]).
    Page {
        /// The page, from 1.
        page: usize,
        /// Hits per page (1 to [`MAX_LIMIT`]).
        hits_per_page: usize,
    },
}

impl Default for Pagination {
    fn default() -> Self {
        Pagination::Offset {
            offset: 0,
            limit: 20,
        }
    }
}

/// Highlighting: matched query words in these attributes are wrapped in
/// the tags, in [`Hit::formatted`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Highlight {
    /// The attributes to highlight.
    pub fields: Vec<String>,
    /// Put before a match (default `<em>`).
    pub pre_tag: String,
    /// Put after a match (default `</em>`).
    pub post_tag: String,
}

impl Highlight {
    /// Highlights `fields` with `<em>`…`</em>`.
    pub fn fields<S: Into<String>>(fields: impl IntoIterator<Item = S>) -> Self {
        Self {
            fields: fields.into_iter().map(Into::into).collect(),
            pre_tag: "<em>".to_owned(),
            post_tag: "</em>".to_owned(),
        }
    }

    /// Uses other tags.
    #[must_use]
    pub fn tags(mut self, pre: impl Into<String>, post: impl Into<String>) -> Self {
        self.pre_tag = pre.into();
        self.post_tag = post.into();
        self
    }
}

/// A search: query words, filter, sort, facets, highlighting and
/// pagination.
///
/// Query words must all match (Meilisearch's `matchingStrategy: all`), the
/// last one as a prefix. An empty query matches every document the filter
/// lets through.
///
/// ```
/// use keel_search::{Filter, Pagination, SearchRequest, SortBy};
///
/// let request = SearchRequest::new("kettle")
///     .filter(Filter::lte("price", 50))
///     .sort(SortBy::asc("price"))
///     .facets(["category"])
///     .page(1, 10);
/// assert!(request.validate().is_ok());
/// ```
#[derive(Clone, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct SearchRequest {
    /// The query text.
    pub query: String,
    /// Which documents may match.
    pub filter: Option<Filter>,
    /// Sort criteria, in order.
    pub sort: Vec<SortBy>,
    /// Attributes whose value counts to return (declared filterable).
    pub facets: Vec<String>,
    /// Highlighting, if any.
    pub highlight: Option<Highlight>,
    /// Which hits to return.
    pub pagination: Pagination,
}

impl SearchRequest {
    /// A search for `query`.
    pub fn new(query: impl Into<String>) -> Self {
        Self {
            query: query.into(),
            ..Self::default()
        }
    }

    /// Only documents matching `filter`.
    #[must_use]
    pub fn filter(mut self, filter: Filter) -> Self {
        self.filter = Some(filter);
        self
    }

    /// Adds a sort criterion (earlier ones take precedence).
    #[must_use]
    pub fn sort(mut self, by: SortBy) -> Self {
        self.sort.push(by);
        self
    }

    /// Returns value counts for these attributes.
    #[must_use]
    pub fn facets<S: Into<String>>(mut self, fields: impl IntoIterator<Item = S>) -> Self {
        self.facets.extend(fields.into_iter().map(Into::into));
        self
    }

    /// Highlights matches.
    #[must_use]
    pub fn highlight(mut self, highlight: Highlight) -> Self {
        self.highlight = Some(highlight);
        self
    }

    /// Skips `offset` hits and returns at most `limit`.
    #[must_use]
    pub fn offset(mut self, offset: usize, limit: usize) -> Self {
        self.pagination = Pagination::Offset { offset, limit };
        self
    }

    /// Returns page `page` (from 1) of `hits_per_page` hits, with exact totals.
    #[must_use]
    pub fn page(mut self, page: usize, hits_per_page: usize) -> Self {
        self.pagination = Pagination::Page {
            page,
            hits_per_page,
        };
        self
    }

    /// Checks every attribute name, the filter and the pagination.
    ///
    /// # Errors
    ///
    /// [`SearchError::InvalidField`] or [`SearchError::InvalidArgument`].
    pub fn validate(&self) -> Result<()> {
        if let Some(f) = &self.filter {
            f.validate()?;
        }
        for s in &self.sort {
            check_field(&s.field)?;
        }
        for f in &self.facets {
            check_field(f)?;
        }
        if let Some(h) = &self.highlight {
            for f in &h.fields {
                if f != "*" {
                    check_field(f)?;
                }
            }
        }
        match self.pagination {
            Pagination::Offset { limit, .. } if limit > MAX_LIMIT => Err(SearchError::invalid(
                "limit",
                format!("at most {MAX_LIMIT} hits per request"),
            )),
            Pagination::Page { page: 0, .. } => {
                Err(SearchError::invalid("page", "pages are numbered from 1"))
            }
            Pagination::Page { hits_per_page, .. }
                if hits_per_page == 0 || hits_per_page > MAX_LIMIT =>
            {
                Err(SearchError::invalid(
                    "hits_per_page",
                    format!("between 1 and {MAX_LIMIT}"),
                ))
            }
            _ => Ok(()),
        }
    }
}

/// How many documents matched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TotalHits {
    /// An estimate (offset pagination).
    Estimated(usize),
    /// Exact counts (page pagination).
    Exact {
        /// Matching documents.
        hits: usize,
        /// Pages of the requested size.
        pages: usize,
    },
}

impl TotalHits {
    /// The number of hits, exact or estimated.
    #[must_use]
    pub fn hits(self) -> usize {
        match self {
            TotalHits::Estimated(n) | TotalHits::Exact { hits: n, .. } => n,
        }
    }
}

/// One hit.
#[derive(Clone, Debug, PartialEq)]
pub struct Hit<T> {
    /// The document.
    pub document: T,
    /// The highlighted attributes, when highlighting was asked for.
    pub formatted: Option<Document>,
}

/// The answer to a [`SearchRequest`].
#[derive(Clone, Debug, PartialEq)]
pub struct SearchResults<T> {
    /// The hits of the requested page, in rank order.
    pub hits: Vec<Hit<T>>,
    /// How many documents matched.
    pub total: TotalHits,
    /// Value counts per requested facet: attribute → value → count.
    pub facets: BTreeMap<String, BTreeMap<String, usize>>,
}

impl SearchResults<Document> {
    /// Converts every hit's document into `T`.
    ///
    /// # Errors
    ///
    /// [`SearchError::Serde`] when a document does not deserialize.
    pub fn into_typed<T: DeserializeOwned>(self) -> Result<SearchResults<T>> {
        let hits = self
            .hits
            .into_iter()
            .map(|h| {
                Ok(Hit {
                    document: serde_json::from_value(Value::Object(h.document))
                        .map_err(SearchError::Serde)?,
                    formatted: h.formatted,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(SearchResults {
            hits,
            total: self.total,
            facets: self.facets,
        })
    }
}

impl<T> SearchResults<T> {
    /// The documents, in rank order, without highlighting.
    pub fn documents(self) -> Vec<T> {
        self.hits.into_iter().map(|h| h.document).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation() {
        assert!(SearchRequest::new("x").page(0, 10).validate().is_err());
        assert!(SearchRequest::new("x").page(1, 0).validate().is_err());
        assert!(SearchRequest::new("x").offset(0, 1001).validate().is_err());
        assert!(
            SearchRequest::new("x")
                .sort(SortBy::asc("a b"))
                .validate()
                .is_err()
        );
        assert!(SearchRequest::new("x").facets(["a,b"]).validate().is_err());
        assert!(
            SearchRequest::new("x")
                .highlight(Highlight::fields(["*"]))
                .validate()
                .is_ok()
        );
        assert_eq!(SortBy::desc("price").to_expression(), "price:desc");
    }
}
