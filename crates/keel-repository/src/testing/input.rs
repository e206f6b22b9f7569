//! Contract tests of hostile and malformed input: injection strings,
//! unknown fields, bad values, pages and cursors.

use super::*;

/// SQL-injection strings in ids, filter values, prefixes and in-lists are
/// stored and matched as plain data.
pub async fn injection_strings_are_data(h: Harness) {
    let evil = [
        "'; DROP TABLE gadgets; --",
        "\" OR 1=1 --",
        "x' OR 'x'='x",
        "%",
        "_",
        "\\",
        "\\'; SELECT pg_sleep(10); --",
        "名前 ✓ 🚀",
        "$1",
        "?",
    ];
    let batch: Vec<Gadget> = evil
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let mut g = gadget(s, s, i64::try_from(i).unwrap_or(0));
            g.category = Some((*s).to_owned());
            g
        })
        .collect();
    h.repo.insert_many(batch).await.unwrap();
    h.repo.insert(gadget("plain", "plain", 99)).await.unwrap();
    for s in evil {
        let id = s.to_owned();
        let got = h
            .repo
            .get(&id)
            .await
            .unwrap()
            .expect("stored under its literal id");
        assert_eq!(got.entity.name, s);
        assert!(h.repo.exists(&id).await.unwrap());
        for f in [
            Filter::eq("name", s),
            Filter::eq("category", s),
            Filter::prefix("name", s),
            Filter::one_of("id", [s]),
        ] {
            let page = h
                .repo
                .list(&ListQuery::new(PageRequest::first(100)).filter(f.clone()))
                .await
                .unwrap();
            let matched = ids(&page.items);
            assert!(matched.contains(&id), "{f:?}");
            assert!(
                matched.iter().all(|m| m.starts_with(s)),
                "{f:?} matched {matched:?}"
            );
        }
        // Versioned writes with injection ids touch that row only.
        let mut g = got.entity.clone();
        g.price += 1000;
        h.repo.update(g, got.version).await.unwrap();
    }
    let moved = h
        .repo
        .count(&[Filter::at_least("price", 1000)], Deleted::Exclude)
        .await
        .unwrap();
    assert_eq!(moved, evil.len() as u64);
    // The table is still there, with every row.
    assert_eq!(
        h.repo.count(&[], Deleted::Exclude).await.unwrap(),
        evil.len() as u64 + 1
    );
    // A cursor made of an injection string is just a malformed cursor.
    let err = h
        .repo
        .list(&ListQuery::new(PageRequest::after(
            Cursor::new("'; DROP TABLE gadgets; --"),
            10,
        )))
        .await
        .unwrap_err();
    assert_eq!(invalid_field(&err), "cursor");
    assert_eq!(
        h.repo.count(&[], Deleted::Exclude).await.unwrap(),
        evil.len() as u64 + 1
    );
}

/// Every kind of bad input is a typed error naming what was wrong.
pub async fn bad_input_is_typed(h: Harness) {
    seed(&h, 12).await;
    let base = || ListQuery::new(PageRequest::first(5));
    let cases: Vec<(ListQuery, &str)> = vec![
        (base().sort_by("nope", Direction::Asc), "sort"),
        (base().sort_by("category", Direction::Asc), "sort"),
        (base().sort_by("specs", Direction::Asc), "sort"),
        (
            base()
                .sort_by("name", Direction::Asc)
                .sort_by("name", Direction::Desc),
            "sort",
        ),
        (base().filter(Filter::eq("nope", 1)), "filter"),
        (base().filter(Filter::eq("specs", "x")), "filter"),
        (base().filter(Filter::eq("price", "ten")), "filter"),
        (base().filter(Filter::eq("stock", i64::MAX)), "filter"),
        (base().filter(Filter::prefix("price", "1")), "filter"),
        (base().filter(Filter::eq("sku", "not-a-uuid")), "filter"),
        (base().filter(Filter::eq("released", "yesterday")), "filter"),
        (base().with_page(PageRequest::first(0)), "page"),
        (base().with_page(PageRequest::first(1001)), "page"),
        (base().with_page(PageRequest::offset(0, 10)), "page"),
        (base().with_page(PageRequest::offset(u64::MAX, 10)), "page"),
        (
            base().with_page(PageRequest::after(Cursor::new("garbage"), 5)),
            "cursor",
        ),
    ];
    for (q, field) in cases {
        let err = h.repo.list(&q).await.unwrap_err();
        assert_eq!(invalid_field(&err), field, "{q:?}: {err}");
    }
    assert!(
        h.repo
            .list(&base().with_page(PageRequest::first(1000)))
            .await
            .is_ok()
    );
    let err = h
        .repo
        .count(&[Filter::eq("nope", 1)], Deleted::Exclude)
        .await
        .unwrap_err();
    assert_eq!(invalid_field(&err), "filter");

    // Tampered and replayed cursors.
    let q = base().sort_by("price", Direction::Asc);
    let cursor = h.repo.list(&q).await.unwrap().next.expect("next page");
    let s = cursor.as_str();
    let flip = |i: usize| {
        let mut b = s.as_bytes().to_vec();
        b[i] = if b[i] == b'A' { b'B' } else { b'A' };
        Cursor::new(String::from_utf8(b).unwrap())
    };
    for bad in [flip(2), flip(s.len() - 2), Cursor::new(format!("{s}x"))] {
        let err = h
            .repo
            .list(&q.clone().with_page(PageRequest::after(bad, 5)))
            .await
            .unwrap_err();
        assert_eq!(invalid_field(&err), "cursor");
    }
    for other in [
        base().sort_by("price", Direction::Desc),
        base()
            .sort_by("price", Direction::Asc)
            .filter(Filter::eq("active", true)),
        base().sort_by("price", Direction::Asc).with_deleted(),
    ] {
        let err = h
            .repo
            .list(&other.with_page(PageRequest::after(cursor.clone(), 5)))
            .await
            .unwrap_err();
        assert_eq!(invalid_field(&err), "cursor");
    }
    // The genuine cursor still works, with another page size too.
    let next = h
        .repo
        .list(&q.with_page(PageRequest::after(cursor, 3)))
        .await
        .unwrap();
    assert_eq!(next.items.len(), 3);
}

/// Injection attempts in filter field names and sort fields are refused as
/// unknown fields (names are looked up in the mapping, never pasted into
/// SQL), and nothing they carry is executed: every row is still there.
pub async fn field_name_injection_is_refused(h: Harness) {
    seed(&h, 5).await;
    let names = [
        "name; DROP TABLE gadgets; --",
        "name\" = name OR \"1",
        "price) OR (1=1",
        "name COLLATE \"C\"",
        "(SELECT 1)",
        "NAME",
    ];
    for name in names {
        let q = ListQuery::new(PageRequest::first(5));
        let err = h
            .repo
            .list(&q.clone().filter(Filter::eq(name, "x")))
            .await
            .unwrap_err();
        assert_eq!(invalid_field(&err), "filter", "{name}");
        let err = h
            .repo
            .list(&q.clone().sort_by(name, Direction::Desc))
            .await
            .unwrap_err();
        assert_eq!(invalid_field(&err), "sort", "{name}");
        let err = h
            .repo
            .count(&[Filter::prefix(name, "x")], Deleted::Include)
            .await
            .unwrap_err();
        assert_eq!(invalid_field(&err), "filter", "{name}");
    }
    assert_eq!(h.repo.count(&[], Deleted::Include).await.unwrap(), 5);
}
