//! Contract tests with many concurrent writers.

use super::*;

/// Many writers expecting the same version: exactly one wins.
pub async fn concurrent_writers_one_winner(h: Harness) {
    h.repo.insert(gadget("hot", "start", 0)).await.unwrap();
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let repo = Arc::clone(&h.repo);
            tokio::spawn(async move {
                let mut g = gadget("hot", &format!("writer-{i}"), i);
                g.stock = i32::try_from(i).unwrap_or(0);
                repo.update(g, Version::new(1)).await
            })
        })
        .collect();
    let mut winners = Vec::new();
    let mut conflicts = 0;
    for t in tasks {
        match t.await.expect("task") {
            Ok(s) => winners.push(s),
            Err(e) => {
                assert_eq!(conflict(&e).1, Version::new(2));
                conflicts += 1;
            }
        }
    }
    assert_eq!(winners.len(), 1, "exactly one winner");
    assert_eq!(conflicts, 15);
    let now = h.repo.get(&"hot".to_owned()).await.unwrap().unwrap();
    assert_eq!(now.version, Version::new(2));
    assert_eq!(
        now.entity, winners[0].entity,
        "the winner's write is stored"
    );
}

/// Read-modify-write loops that retry on conflict lose no update.
pub async fn retries_lose_no_update(h: Harness) {
    h.repo.insert(gadget("counter", "c", 0)).await.unwrap();
    let (tasks, each) = (8, 5);
    let handles: Vec<_> = (0..tasks)
        .map(|_| {
            let repo = Arc::clone(&h.repo);
            tokio::spawn(async move {
                let id = "counter".to_owned();
                let mut conflicts = 0u32;
                for _ in 0..each {
                    loop {
                        let cur = repo.get(&id).await.unwrap().unwrap();
                        let mut g = cur.entity.clone();
                        g.price += 1;
                        match repo.update(g, cur.version).await {
                            Ok(_) => break,
                            Err(Error::Conflict(_)) => conflicts += 1,
                            Err(e) => panic!("{e:?}"),
                        }
                    }
                }
                conflicts
            })
        })
        .collect();
    for t in handles {
        t.await.expect("task");
    }
    let end = h.repo.get(&"counter".to_owned()).await.unwrap().unwrap();
    assert_eq!(end.entity.price, tasks * each);
    assert_eq!(end.version, Version::new(1 + (tasks * each) as u64));
}
