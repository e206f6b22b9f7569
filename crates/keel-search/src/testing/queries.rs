//! Rules on searching: filters, sorts, pages, facets, word matching and
//! highlighting.

use super::{Subject, id_of, set};
use crate::error::SearchError;
use crate::filter::Filter;
use crate::query::{Document, Highlight, SearchRequest, SortBy, TotalHits};

/// Every filter form selects the same documents on every engine.
pub async fn filters_select_the_same_documents(s: Subject) {
    let index = s.catalog("filters").await;
    let cases: Vec<(Filter, &[&str])> = vec![
        (Filter::eq("category", "garden"), &["p04", "p05", "p10"]),
        (Filter::eq("category", "GARDEN"), &["p04", "p05", "p10"]),
        (
            Filter::ne("category", "kitchen"),
            &["p04", "p05", "p06", "p07", "p08", "p10", "p12"],
        ),
        (Filter::gt("price", 55), &["p03", "p12"]),
        (Filter::gte("price", 55), &["p03", "p06", "p12"]),
        (Filter::lt("price", 10), &["p05", "p07"]),
        (Filter::lte("price", 11), &["p05", "p07", "p11"]),
        (
            Filter::between("price", 25, 40),
            &["p01", "p02", "p04", "p09"],
        ),
        (Filter::gt("rating", 4.5), &["p03", "p07", "p12"]),
        (Filter::eq("price", 35), &["p02"]),
        (Filter::eq("tags", "tea"), &["p01", "p02", "p09"]),
        (
            Filter::any_of("tags", ["steel", "paper"]),
            &["p01", "p03", "p07"],
        ),
        (Filter::eq("in_stock", false), &["p02", "p06", "p10"]),
        (Filter::eq("maker.name", "acme"), &["p01", "p03", "p08"]),
        (
            Filter::exists("maker"),
            &[
                "p01", "p02", "p03", "p04", "p05", "p07", "p08", "p09", "p10", "p12",
            ],
        ),
        (Filter::is_null("maker"), &["p05"]),
        (Filter::is_empty("tags"), &["p04"]),
        (
            Filter::eq("category", "kitchen").and(Filter::lt("price", 30)),
            &["p01", "p11"],
        ),
        (
            Filter::eq("category", "garden").or(Filter::gt("price", 100)),
            &["p04", "p05", "p10", "p12"],
        ),
        (
            Filter::eq("category", "office")
                .and(Filter::eq("in_stock", true).not())
                .or(Filter::eq("tags", "porcelain")),
            &["p06", "p09"],
        ),
        (
            Filter::all([Filter::eq("category", "kitchen"), Filter::eq("tags", "tea")])
                .and(Filter::any_of("maker.name", ["verde", "brava"])),
            &["p02", "p09"],
        ),
        (
            Filter::all([]),
            &[
                "p01", "p02", "p03", "p04", "p05", "p06", "p07", "p08", "p09", "p10", "p11", "p12",
            ],
        ),
    ];
    for (filter, expected) in cases {
        let got = s.filtered(&index, filter.clone()).await;
        assert_eq!(got, set(expected), "filter {filter}");
    }
    s.cleanup().await;
}

/// Values from users are data: quotes, backslashes and operators inside a
/// value match only documents holding exactly that value.
pub async fn filter_values_cannot_inject(s: Subject) {
    let index = s.catalog("injection").await;
    let attempts = [
        r#"kitchen" OR category = "garden"#,
        r#"x" OR price > 0 OR tags = "y"#,
        r"kitchen\",
        "office) OR (price > 0",
        "' OR 1=1 --",
    ];
    for attempt in attempts {
        let got = s.filtered(&index, Filter::eq("category", attempt)).await;
        assert!(got.is_empty(), "{attempt:?} matched {got:?}");
    }
    assert_eq!(
        s.filtered(&index, Filter::eq("tags", "a\"b")).await,
        set(&["p11"])
    );
    assert_eq!(
        s.filtered(&index, Filter::eq("tags", "c\\d")).await,
        set(&["p11"])
    );
    let not = s
        .filtered(
            &index,
            Filter::ne("category", r#"x" OR category = "office"#),
        )
        .await;
    assert_eq!(not.len(), 12);
    s.cleanup().await;
}

/// Filters, facets and sorts on undeclared attributes are refused with the
/// engine's codes.
pub async fn undeclared_attributes_are_refused(s: Subject) {
    let index = s.catalog("undeclared").await;
    let code = |r: crate::Result<_>| match r {
        Err(SearchError::Rejected { code, .. }) => code,
        other => panic!(
            "expected a rejection, got {:?}",
            other.map(|_: crate::SearchResults<Document>| ())
        ),
    };
    let r = s
        .engine
        .search(
            &index,
            &SearchRequest::new("").filter(Filter::eq("title", "x")),
        )
        .await;
    assert_eq!(code(r), "invalid_search_filter");
    let r = s
        .engine
        .search(&index, &SearchRequest::new("").sort(SortBy::asc("title")))
        .await;
    assert_eq!(code(r), "invalid_search_sort");
    let r = s
        .engine
        .search(&index, &SearchRequest::new("").facets(["description"]))
        .await;
    assert_eq!(code(r), "invalid_search_facets");
    s.cleanup().await;
}

/// Sorts order hits the same way on every engine.
pub async fn sorts_order_hits(s: Subject) {
    let index = s.catalog("sorts").await;
    let all = |sort: Vec<SortBy>| {
        let mut r = SearchRequest::new("").offset(0, 100);
        r.sort = sort;
        r
    };
    assert_eq!(
        s.ids(&index, &all(vec![SortBy::asc("price")])).await,
        [
            "p05", "p07", "p11", "p10", "p08", "p01", "p09", "p02", "p04", "p06", "p03", "p12"
        ]
    );
    assert_eq!(
        s.ids(&index, &all(vec![SortBy::desc("rating")])).await,
        [
            "p03", "p07", "p12", "p01", "p06", "p04", "p09", "p02", "p10", "p05", "p11", "p08"
        ]
    );
    assert_eq!(
        s.ids(
            &index,
            &all(vec![SortBy::asc("category"), SortBy::desc("price")])
        )
        .await,
        [
            "p04", "p10", "p05", "p03", "p02", "p09", "p01", "p11", "p12", "p06", "p08", "p07"
        ]
    );
    let cheap_kitchen = all(vec![SortBy::desc("price")])
        .filter(Filter::eq("category", "kitchen").and(Filter::lt("price", 50)));
    assert_eq!(
        s.ids(&index, &cheap_kitchen).await,
        ["p02", "p09", "p01", "p11"]
    );
    s.cleanup().await;
}

/// Offset and page pagination slice the same ordered result.
pub async fn pagination_slices_results(s: Subject) {
    let index = s.catalog("pages").await;
    let by_price = || SearchRequest::new("").sort(SortBy::asc("price"));
    let r = s
        .engine
        .search(&index, &by_price().offset(3, 4))
        .await
        .unwrap();
    assert_eq!(r.total, TotalHits::Estimated(12));
    assert_eq!(
        r.hits
            .iter()
            .map(|h| id_of(&h.document))
            .collect::<Vec<_>>(),
        ["p10", "p08", "p01", "p09"]
    );
    let r = s
        .engine
        .search(&index, &by_price().page(3, 5))
        .await
        .unwrap();
    assert_eq!(r.total, TotalHits::Exact { hits: 12, pages: 3 });
    assert_eq!(
        r.hits
            .iter()
            .map(|h| id_of(&h.document))
            .collect::<Vec<_>>(),
        ["p03", "p12"]
    );
    let r = s
        .engine
        .search(&index, &by_price().page(4, 5))
        .await
        .unwrap();
    assert!(r.hits.is_empty());
    assert_eq!(r.total, TotalHits::Exact { hits: 12, pages: 3 });
    let r = s
        .engine
        .search(&index, &by_price().offset(20, 5))
        .await
        .unwrap();
    assert!(r.hits.is_empty());
    let r = s
        .engine
        .search(
            &index,
            &by_price()
                .filter(Filter::eq("category", "office"))
                .page(1, 3),
        )
        .await
        .unwrap();
    assert_eq!(r.total, TotalHits::Exact { hits: 4, pages: 2 });
    assert!(
        s.engine
            .search(&index, &by_price().page(0, 5))
            .await
            .is_err()
    );
    s.cleanup().await;
}

/// Facet counts cover every matching document, not just the page.
pub async fn facets_count_matches(s: Subject) {
    let index = s.catalog("facets").await;
    let r = s
        .engine
        .search(
            &index,
            &SearchRequest::new("")
                .filter(Filter::eq("in_stock", true))
                .facets(["category", "tags", "in_stock"])
                .offset(0, 1),
        )
        .await
        .unwrap();
    assert_eq!(r.hits.len(), 1);
    let category = &r.facets["category"];
    assert_eq!(category.get("kitchen"), Some(&4));
    assert_eq!(category.get("garden"), Some(&2));
    assert_eq!(category.get("office"), Some(&3));
    let tags = &r.facets["tags"];
    assert_eq!(tags.get("tea"), Some(&2));
    assert_eq!(tags.get("steel"), Some(&2));
    assert_eq!(tags.get("light"), None);
    assert_eq!(r.facets["in_stock"].get("true"), Some(&9));
    s.cleanup().await;
}

/// Every query word must match (the last one as a prefix); synonyms
/// widen a word.
pub async fn queries_match_words(s: Subject) {
    let index = s.catalog("queries").await;
    let q = |text: &str| SearchRequest::new(text).offset(0, 100);
    assert_eq!(s.id_set(&index, &q("kettle")).await, set(&["p01", "p02"]));
    assert_eq!(s.id_set(&index, &q("KETTLE")).await, set(&["p01", "p02"]));
    assert_eq!(s.id_set(&index, &q("blue kettle")).await, set(&["p01"]));
    assert_eq!(s.id_set(&index, &q("red kett")).await, set(&["p02"]));
    assert_eq!(
        s.id_set(&index, &q("tea")).await,
        set(&["p01", "p02", "p09"])
    );
    assert_eq!(
        s.id_set(&index, &q("teakettle")).await,
        set(&["p01", "p02"])
    );
    assert!(s.id_set(&index, &q("xylophone")).await.is_empty());
    assert_eq!(
        s.id_set(&index, &q("kettle").filter(Filter::eq("in_stock", true)))
            .await,
        set(&["p01"])
    );
    assert_eq!(s.id_set(&index, &q("")).await.len(), 12);
    s.cleanup().await;
}

/// Highlighting wraps matched words in the tags, keeping their case.
pub async fn highlighting_marks_matches(s: Subject) {
    let index = s.catalog("highlight").await;
    let r = s
        .engine
        .search(
            &index,
            &SearchRequest::new("kettle")
                .filter(Filter::eq("price", 25))
                .highlight(Highlight::fields(["title", "description"]).tags("[", "]")),
        )
        .await
        .unwrap();
    let formatted = r.hits[0].formatted.as_ref().expect("formatted hit");
    assert_eq!(formatted["title"], "Blue [kettle]");
    assert_eq!(formatted["description"], "A steel [kettle] for tea");
    // The document itself is untouched.
    assert_eq!(r.hits[0].document["title"], "Blue kettle");
    let plain = s
        .engine
        .search(&index, &SearchRequest::new("kettle"))
        .await
        .unwrap();
    assert!(plain.hits.iter().all(|h| h.formatted.is_none()));
    s.cleanup().await;
}
