//! Contract tests of the documented limits: what PostgreSQL cannot store
//! or compare is refused by every repository, before the database sees it,
//! with the same [`Error::Invalid`], and error messages stay bounded.

use super::*;
use crate::cursor::CursorCodec;
use crate::limits::{MAX_FILTERS, MAX_ID_BYTES, MAX_SORT_KEYS, MAX_TEXT_BYTES};
use crate::mapping::Schema;
use crate::query::{DEFAULT_MAX_PAGE_SIZE, Plan};

async fn refused_write(h: &Harness, g: Gadget) -> String {
    let err = h.repo.insert(g.clone()).await.unwrap_err();
    let field = invalid_field(&err);
    let err = h.repo.upsert(g).await.unwrap_err();
    assert_eq!(invalid_field(&err), field, "insert and upsert agree");
    field
}

/// A NUL character in text, JSON, an id, a filter value, a prefix or a
/// forged cursor is `Invalid`, on reads as on writes.
pub async fn nul_characters_are_refused(h: Harness) {
    h.repo.insert(gadget("a", "x", 1)).await.unwrap();
    let mut g = gadget("b", "nul\0name", 1);
    assert_eq!(refused_write(&h, g.clone()).await, "name");
    g.name = "fine".into();
    g.category = Some("tools\0".into());
    assert_eq!(refused_write(&h, g.clone()).await, "category");
    g.category = None;
    g.specs = serde_json::json!({ "deep": [{ "k": "v\u{0}" }] });
    assert_eq!(refused_write(&h, g.clone()).await, "specs");
    g.specs = serde_json::json!({ "key\u{0}": 1 });
    assert_eq!(refused_write(&h, g).await, "specs");
    assert_eq!(refused_write(&h, gadget("c\0", "x", 1)).await, "id");

    let nul = "a\0b".to_owned();
    let err = h.repo.get(&nul).await.unwrap_err();
    assert_eq!(invalid_field(&err), "id");
    let err = h.repo.exists(&nul).await.unwrap_err();
    assert_eq!(invalid_field(&err), "id");
    let err = h
        .repo
        .get_many(&[key_of("a"), nul.clone()])
        .await
        .unwrap_err();
    assert_eq!(invalid_field(&err), "id");
    let err = h.repo.soft_delete(&nul, Version::new(1)).await.unwrap_err();
    assert_eq!(invalid_field(&err), "id");
    let err = h.repo.hard_delete(&nul, Version::new(1)).await.unwrap_err();
    assert_eq!(invalid_field(&err), "id");
    for f in [
        Filter::eq("name", "a\0"),
        Filter::one_of("id", ["a", "\0"]),
        Filter::prefix("name", "\0"),
        Filter::between("name", "a", "z\0"),
    ] {
        let q = ListQuery::new(PageRequest::first(5)).filter(f.clone());
        let err = h.repo.list(&q).await.unwrap_err();
        assert_eq!(invalid_field(&err), "filter", "{f:?}");
        let err = h
            .repo
            .count(&q.filters, Deleted::Exclude)
            .await
            .unwrap_err();
        assert_eq!(invalid_field(&err), "filter", "{f:?}");
    }

    // A cursor signed with the public default key can be forged; one that
    // carries a NUL is refused like a malformed cursor.
    let q = ListQuery::new(PageRequest::first(5)).sort_by("name", Direction::Asc);
    let schema = Schema::of::<Gadget>().unwrap();
    let codec = CursorCodec::default();
    let plan = Plan::new(&schema, &q, DEFAULT_MAX_PAGE_SIZE, &codec).unwrap();
    let forged = codec
        .encode(
            &plan.fingerprint,
            &[Value::Text("n\0".into()), Value::Text("a".into())],
        )
        .unwrap();
    let err = h
        .repo
        .list(&q.with_page(PageRequest::after(forged, 5)))
        .await
        .unwrap_err();
    assert_eq!(invalid_field(&err), "cursor");
    assert_eq!(h.repo.count(&[], Deleted::Include).await.unwrap(), 1);
}

fn key_of(s: &str) -> String {
    s.to_owned()
}

/// Ids, text, timestamps, filter counts and sort keys have documented
/// limits; at the limit everything works, above it is `Invalid`.
pub async fn sizes_have_limits(h: Harness) {
    let longest = "i".repeat(MAX_ID_BYTES);
    h.repo.insert(gadget(&longest, "x", 1)).await.unwrap();
    assert!(h.repo.exists(&longest).await.unwrap());
    let huge = "i".repeat(1 << 20);
    assert_eq!(refused_write(&h, gadget(&huge, "x", 1)).await, "id");
    let err = h.repo.get(&huge).await.unwrap_err();
    assert_eq!(invalid_field(&err), "id");
    let too_long = format!("{longest}i");
    let err = h.repo.get(&too_long).await.unwrap_err();
    assert_eq!(invalid_field(&err), "id");

    let mut g = gadget("t", "x", 1);
    g.name = "n".repeat(MAX_TEXT_BYTES);
    h.repo.insert(g.clone()).await.unwrap();
    g.id = "t2".into();
    g.name.push('n');
    assert_eq!(refused_write(&h, g).await, "name");
    let mut g = gadget("far", "x", 1);
    g.released = DateTime::<Utc>::MIN_UTC;
    assert_eq!(refused_write(&h, g).await, "released");

    let filters: Vec<Filter> = (0..=MAX_FILTERS).map(|_| Filter::eq("price", 1)).collect();
    let err = h.repo.count(&filters, Deleted::Exclude).await.unwrap_err();
    assert_eq!(invalid_field(&err), "filter");
    let at_limit = &filters[..MAX_FILTERS];
    assert_eq!(
        h.repo.count(at_limit, Deleted::Exclude).await.unwrap(),
        2,
        "both rows at price 1"
    );
    let mut q = ListQuery::new(PageRequest::first(5));
    for _ in 0..=MAX_SORT_KEYS {
        q = q.sort_by("price", Direction::Asc);
    }
    let err = h.repo.list(&q).await.unwrap_err();
    assert_eq!(invalid_field(&err), "sort");
    let err = h
        .repo
        .list(
            &ListQuery::new(PageRequest::first(5))
                .filter(Filter::eq("name", "n".repeat(MAX_TEXT_BYTES + 1))),
        )
        .await
        .unwrap_err();
    assert_eq!(invalid_field(&err), "filter");
    assert_eq!(h.repo.count(&[], Deleted::Include).await.unwrap(), 2);
}

/// Field names, values and ids echoed into messages are cut to a bounded
/// length, with control characters escaped, and no message repeats its
/// own prefix.
pub async fn messages_are_bounded(h: Harness) {
    let hostile = format!("line1\nline2\r{}", "x".repeat(5_000));
    let q = ListQuery::new(PageRequest::first(5));
    let errors = vec![
        h.repo
            .list(&q.clone().filter(Filter::eq(hostile.as_str(), 1)))
            .await
            .unwrap_err(),
        h.repo
            .list(&q.clone().sort_by(hostile.as_str(), Direction::Asc))
            .await
            .unwrap_err(),
        h.repo
            .list(&q.clone().filter(Filter::eq("sku", hostile.as_str())))
            .await
            .unwrap_err(),
        h.repo
            .list(&q.clone().filter(Filter::eq("price", hostile.as_str())))
            .await
            .unwrap_err(),
        h.repo
            .list(&q.clone().with_page(PageRequest::first(0)))
            .await
            .unwrap_err(),
        h.repo
            .update(gadget(&hostile[..MAX_ID_BYTES], "x", 1), Version::new(1))
            .await
            .unwrap_err(),
    ];
    for err in errors {
        let message = err.to_string();
        assert!(
            !message.contains('\n') && !message.contains('\r'),
            "{message:?}"
        );
        assert!(
            message.chars().count() < 400,
            "{} chars",
            message.chars().count()
        );
        if let Error::Invalid(i) = &err {
            let prefix = format!("invalid {}:", i.field);
            assert_eq!(message.matches(&prefix).count(), 1, "{message}");
        }
    }
}
