//! Contract tests of filtering, sorting and both kinds of pagination.

use super::*;

/// Equality, ranges, in-lists and prefixes on every filterable type.
pub async fn filters_select_exactly(h: Harness) {
    let all = seed(&h, 40).await;
    let check = |filters: Vec<Filter>, pred: &dyn Fn(&Gadget) -> bool| {
        let want: BTreeSet<String> = all
            .iter()
            .filter(|g| pred(g))
            .map(|g| g.id.clone())
            .collect();
        let h = h.clone();
        async move {
            let mut q = ListQuery::new(PageRequest::offset(1, 1000));
            for f in &filters {
                q = q.filter(f.clone());
            }
            let page = h.repo.list(&q).await.unwrap();
            let got: BTreeSet<String> = ids(&page.items).into_iter().collect();
            assert_eq!(got, want, "{filters:?}");
            assert_eq!(page.total, Some(want.len() as u64));
            assert_eq!(
                h.repo.count(&filters, Deleted::Exclude).await.unwrap(),
                want.len() as u64
            );
            assert!(
                !want.is_empty()
                    || filters
                        .iter()
                        .any(|f| matches!(f, Filter::In { values, .. } if values.is_empty()))
            );
        }
    };
    check(vec![Filter::eq("name", "name-3")], &|g| g.name == "name-3").await;
    check(vec![Filter::eq("category", "tools")], &|g| {
        g.category.as_deref() == Some("tools")
    })
    .await;
    check(vec![Filter::between("price", 200, 500)], &|g| {
        (200..=500).contains(&g.price)
    })
    .await;
    check(vec![Filter::at_least("rating", 2.5)], &|g| g.rating >= 2.5).await;
    check(vec![Filter::at_most("stock", 30)], &|g| g.stock <= 30).await;
    check(vec![Filter::eq("active", true)], &|g| g.active).await;
    check(vec![Filter::one_of("id", ["g001", "g017", "zzz"])], &|g| {
        ["g001", "g017"].contains(&g.id.as_str())
    })
    .await;
    check(vec![Filter::one_of("price", Vec::<i64>::new())], &|_| false).await;
    // An in-list on every other filterable type (one typed array parameter
    // each on PostgreSQL).
    let (a, b) = (&all[3], &all[11]);
    check(vec![Filter::one_of("price", [a.price, b.price])], &|g| {
        g.price == a.price || g.price == b.price
    })
    .await;
    check(vec![Filter::one_of("stock", [a.stock, b.stock])], &|g| {
        g.stock == a.stock || g.stock == b.stock
    })
    .await;
    check(vec![Filter::one_of("rating", [a.rating, b.rating])], &|g| {
        g.rating == a.rating || g.rating == b.rating
    })
    .await;
    check(vec![Filter::one_of("active", [false])], &|g| !g.active).await;
    check(vec![Filter::one_of("sku", [a.sku, b.sku])], &|g| {
        g.sku == a.sku || g.sku == b.sku
    })
    .await;
    check(
        vec![Filter::one_of("released", [a.released, b.released])],
        &|g| g.released == a.released || g.released == b.released,
    )
    .await;
    check(vec![Filter::one_of("category", ["tools"])], &|g| {
        g.category.as_deref() == Some("tools")
    })
    .await;
    check(vec![Filter::prefix("id", "g01")], &|g| {
        g.id.starts_with("g01")
    })
    .await;
    let sku = all[5].sku;
    check(vec![Filter::eq("sku", sku)], &|g| g.sku == sku).await;
    let t = all[7].released;
    check(vec![Filter::at_least("released", t)], &|g| g.released >= t).await;
    check(
        vec![
            Filter::prefix("name", "name-"),
            Filter::between("price", 100, 800),
            Filter::eq("category", "tools"),
        ],
        &|g| (100..=800).contains(&g.price) && g.category.is_some(),
    )
    .await;
    // Timestamps kept by the repository are filterable too.
    check(vec![Filter::at_most("created_at", h.now())], &|_| true).await;
}

/// `%`, `_` and `\` in a prefix match themselves only.
pub async fn prefix_is_literal(h: Harness) {
    let names = [
        "50% off",
        "500 units",
        "a_c",
        "abc",
        "back\\slash",
        "backXslash",
        "%",
        "_",
        "",
    ];
    let batch = names
        .iter()
        .enumerate()
        .map(|(i, n)| gadget(&format!("p{i}"), n, 1))
        .collect();
    h.repo.insert_many(batch).await.unwrap();
    for (prefix, want) in [
        ("50%", vec!["50% off"]),
        ("a_", vec!["a_c"]),
        ("back\\", vec!["back\\slash"]),
        ("%", vec!["%"]),
        ("_", vec!["_"]),
        ("", names.to_vec()),
        ("ABC", vec![]),
    ] {
        let page = h
            .repo
            .list(&ListQuery::new(PageRequest::first(100)).filter(Filter::prefix("name", prefix)))
            .await
            .unwrap();
        let got: BTreeSet<&str> = page.items.iter().map(|s| s.entity.name.as_str()).collect();
        assert_eq!(got, want.into_iter().collect(), "prefix {prefix:?}");
    }
}

fn sorted(all: &[Gadget], cmp: impl Fn(&Gadget, &Gadget) -> std::cmp::Ordering) -> Vec<String> {
    let mut v = all.to_vec();
    v.sort_by(|a, b| cmp(a, b).then_with(|| a.id.as_bytes().cmp(b.id.as_bytes())));
    v.into_iter().map(|g| g.id).collect()
}

/// Several sort keys and directions, text in byte order, id as the last
/// tie-breaker.
pub async fn sorting_follows_declared_keys(h: Harness) {
    let mut all = seed(&h, 30).await;
    let extra = vec![
        gadget("u1", "Zebra", 5),
        gadget("u2", "apple", 5),
        gadget("u3", "Äpfel", 5),
    ];
    h.repo.insert_many(extra.clone()).await.unwrap();
    all.extend(extra);
    let q = ListQuery::new(PageRequest::offset(1, 1000))
        .sort_by("price", Direction::Desc)
        .sort_by("name", Direction::Asc);
    let got = ids(&h.repo.list(&q).await.unwrap().items);
    let want = sorted(&all, |a, b| {
        b.price
            .cmp(&a.price)
            .then_with(|| a.name.as_bytes().cmp(b.name.as_bytes()))
    });
    assert_eq!(got, want);

    let q = ListQuery::new(PageRequest::offset(1, 1000)).sort_by("rating", Direction::Desc);
    let got = ids(&h.repo.list(&q).await.unwrap().items);
    let want = sorted(&all, |a, b| b.rating.total_cmp(&a.rating));
    assert_eq!(got, want);

    let q = ListQuery::new(PageRequest::offset(1, 1000)).sort_by("id", Direction::Desc);
    let got = ids(&h.repo.list(&q).await.unwrap().items);
    let mut want = sorted(&all, |_, _| std::cmp::Ordering::Equal);
    want.reverse();
    assert_eq!(got, want);
}

/// Offset pages carry the total; a page past the end is empty.
pub async fn offset_pagination(h: Harness) {
    let all = seed(&h, 23).await;
    let want = sorted(&all, |a, b| a.price.cmp(&b.price));
    let mut got = Vec::new();
    for page in 1..=3 {
        let q = ListQuery::new(PageRequest::offset(page, 10)).sort_by("price", Direction::Asc);
        let p: Page<Stored<Gadget>> = h.repo.list(&q).await.unwrap();
        assert_eq!(p.total, Some(23));
        assert_eq!(p.next, None);
        assert_eq!(p.items.len(), if page < 3 { 10 } else { 3 });
        got.extend(ids(&p.items));
    }
    assert_eq!(got, want);
    let past = h
        .repo
        .list(&ListQuery::new(PageRequest::offset(9, 10)))
        .await
        .unwrap();
    assert!(past.items.is_empty());
    assert_eq!(past.total, Some(23));
}

/// Keyset pages walk every row once, in order, for one or mixed directions.
pub async fn keyset_pagination_walks_everything(h: Harness) {
    let all = seed(&h, 50).await;
    let q = ListQuery::new(PageRequest::first(1))
        .sort_by("price", Direction::Desc)
        .sort_by("name", Direction::Asc);
    let want = sorted(&all, |a, b| {
        b.price
            .cmp(&a.price)
            .then_with(|| a.name.as_bytes().cmp(b.name.as_bytes()))
    });
    assert_eq!(all_pages(&h, q, 7).await, want);

    let q = ListQuery::new(PageRequest::first(1)).sort_by("released", Direction::Desc);
    let want = sorted(&all, |a, b| b.released.cmp(&a.released));
    assert_eq!(all_pages(&h, q, 5).await, want);

    let q = ListQuery::new(PageRequest::first(1))
        .filter(Filter::eq("category", "tools"))
        .sort_by("stock", Direction::Asc);
    let tools: Vec<Gadget> = all
        .iter()
        .filter(|g| g.category.is_some())
        .cloned()
        .collect();
    let want = sorted(&tools, |a, b| a.stock.cmp(&b.stock));
    assert_eq!(all_pages(&h, q, 4).await, want);

    // Exactly one full page: no cursor to an empty page.
    let q = ListQuery::new(PageRequest::first(50));
    let p = h.repo.list(&q).await.unwrap();
    assert_eq!(p.items.len(), 50);
    assert!(p.next.is_none());
}

/// Rows inserted or deleted while a client pages never shift what it sees:
/// no row of the original set is skipped or repeated.
pub async fn keyset_is_stable_under_concurrent_writes(h: Harness) {
    seed(&h, 30).await;
    let q = ListQuery::new(PageRequest::first(10)).sort_by("name", Direction::Asc);
    let first = h.repo.list(&q).await.unwrap();
    let cursor = first.next.clone().expect("more pages");
    let last_seen = first.items.last().unwrap().entity.name.clone();
    // Rows sorting before and after the cursor arrive meanwhile.
    h.repo
        .insert_many(vec![
            gadget("n0", "aaa-before", 1),
            gadget("n1", "zzz-after", 1),
        ])
        .await
        .unwrap();
    let mut seen: Vec<String> = ids(&first.items);
    let mut after = Some(cursor);
    while let Some(c) = after {
        let p = h
            .repo
            .list(&q.clone().with_page(PageRequest::after(c, 10)))
            .await
            .unwrap();
        for s in &p.items {
            assert!(s.entity.name.as_bytes() >= last_seen.as_bytes());
        }
        seen.extend(ids(&p.items));
        after = p.next;
    }
    let unique: BTreeSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "no row twice");
    assert_eq!(seen.len(), 31, "30 originals and the row after the cursor");
    assert!(seen.contains(&"n1".to_owned()));
    assert!(!seen.contains(&"n0".to_owned()));
}
