//! `CachedSecrets` on a counting provider with tokio's clock paused: TTL
//! expiry, coalescing of concurrent reads, invalidation during a load and
//! the back-off after a failed refresh, checked by how often the backend
//! was asked.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use keel_security::{CachedSecrets, Secret, SecretProvider, SecurityError};
use tokio::task::JoinSet;

/// What the backend answers with next.
#[derive(Debug, Clone)]
enum Answer {
    Value(&'static str),
    Unavailable,
    Denied,
}

#[derive(Debug)]
struct Backend {
    answer: Mutex<Answer>,
    calls: AtomicUsize,
    delay: Duration,
}

impl Backend {
    fn new(answer: Answer, delay: Duration) -> Arc<Self> {
        Arc::new(Self {
            answer: Mutex::new(answer),
            calls: AtomicUsize::new(0),
            delay,
        })
    }

    fn set(&self, answer: Answer) {
        *self.answer.lock().unwrap() = answer;
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl SecretProvider for Backend {
    async fn get(&self, name: &str) -> keel_security::Result<Secret<String>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        // Decide before the delay: the answer is what the backend held when
        // the request arrived.
        let answer = self.answer.lock().unwrap().clone();
        tokio::time::sleep(self.delay).await;
        match answer {
            Answer::Value(value) => Ok(Secret::new(value.to_owned())),
            Answer::Unavailable => Err(SecurityError::SecretUnavailable {
                name: name.to_owned(),
                source: "backend down".into(),
            }),
            Answer::Denied => Err(SecurityError::SecretPermissionDenied {
                name: name.to_owned(),
            }),
        }
    }
}

async fn value(cache: &CachedSecrets, name: &str) -> String {
    cache.get(name).await.unwrap().expose_secret().clone()
}

#[tokio::test(start_paused = true)]
async fn values_are_reread_after_the_ttl_and_not_before() {
    let backend = Backend::new(Answer::Value("one"), Duration::ZERO);
    let cache = CachedSecrets::new(backend.clone(), Duration::from_secs(60));
    assert_eq!(value(&cache, "token").await, "one");

    backend.set(Answer::Value("two"));
    tokio::time::advance(Duration::from_secs(59)).await;
    assert_eq!(value(&cache, "token").await, "one", "still within the TTL");
    assert_eq!(backend.calls(), 1);

    tokio::time::advance(Duration::from_secs(2)).await;
    assert_eq!(value(&cache, "token").await, "two", "reread after the TTL");
    assert_eq!(backend.calls(), 2);
    assert_eq!(value(&cache, "token").await, "two");
    assert_eq!(backend.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn concurrent_misses_share_one_read() {
    let backend = Backend::new(Answer::Value("one"), Duration::from_secs(1));
    let cache = Arc::new(CachedSecrets::new(backend.clone(), Duration::from_secs(60)));

    let mut tasks = JoinSet::new();
    for _ in 0..64 {
        let cache = Arc::clone(&cache);
        tasks.spawn(async move { value(&cache, "token").await });
    }
    // Another name loads beside them, not behind them.
    let other = Arc::clone(&cache);
    tasks.spawn(async move { value(&other, "other").await });
    let values = tasks.join_all().await;
    assert_eq!(values.len(), 65);
    assert_eq!(values.iter().filter(|v| *v == "one").count(), 65);
    assert_eq!(backend.calls(), 2, "one read per name");

    // After expiry, the next burst again costs one read.
    backend.set(Answer::Value("two"));
    tokio::time::advance(Duration::from_secs(61)).await;
    let mut tasks = JoinSet::new();
    for _ in 0..64 {
        let cache = Arc::clone(&cache);
        tasks.spawn(async move { value(&cache, "token").await });
    }
    let values = tasks.join_all().await;
    assert!(values.iter().all(|v| v == "two"), "{values:?}");
    assert_eq!(backend.calls(), 3);
}

#[tokio::test(start_paused = true)]
async fn concurrent_misses_share_one_refusal() {
    let backend = Backend::new(Answer::Denied, Duration::from_secs(1));
    let cache = Arc::new(CachedSecrets::new(backend.clone(), Duration::from_secs(60)));
    let mut tasks = JoinSet::new();
    for _ in 0..32 {
        let cache = Arc::clone(&cache);
        tasks.spawn(async move { cache.get("token").await });
    }
    for result in tasks.join_all().await {
        let err = result.unwrap_err();
        assert!(
            matches!(err, SecurityError::SecretPermissionDenied { .. }),
            "{err:?}"
        );
        assert_eq!(
            keel_core::Error::from(err).code(),
            "keel.forbidden",
            "the shared copy keeps its kind"
        );
    }
    assert_eq!(backend.calls(), 1);

    // A refusal is not cached: the next read asks again.
    backend.set(Answer::Value("granted"));
    assert_eq!(value(&cache, "token").await, "granted");
    assert_eq!(backend.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn invalidate_forces_a_reread_even_during_a_load() {
    let backend = Backend::new(Answer::Value("old"), Duration::from_secs(1));
    let cache = Arc::new(CachedSecrets::new(
        backend.clone(),
        Duration::from_secs(3600),
    ));
    assert_eq!(value(&cache, "token").await, "old");

    // Through the port, as a consumer holding `Arc<dyn SecretProvider>`.
    backend.set(Answer::Value("new"));
    let port: Arc<dyn SecretProvider> = cache.clone();
    port.invalidate("token").await;
    assert_eq!(value(&cache, "token").await, "new");
    assert_eq!(backend.calls(), 2);

    // A load under way when the value is invalidated answers its caller
    // but is not cached.
    port.invalidate("token").await;
    backend.set(Answer::Value("stale-in-flight"));
    let loading = {
        let cache = Arc::clone(&cache);
        tokio::spawn(async move { value(&cache, "token").await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    backend.set(Answer::Value("newest"));
    port.invalidate("token").await;
    assert_eq!(loading.await.unwrap(), "stale-in-flight");
    assert_eq!(value(&cache, "token").await, "newest");
    assert_eq!(backend.calls(), 4);
}

#[tokio::test(start_paused = true)]
async fn a_down_backend_is_asked_again_only_after_the_backoff() {
    let backend = Backend::new(Answer::Value("one"), Duration::ZERO);
    let cache = CachedSecrets::new(backend.clone(), Duration::from_secs(10))
        .with_failure_backoff(Duration::from_secs(3));
    assert_eq!(value(&cache, "token").await, "one");

    backend.set(Answer::Unavailable);
    tokio::time::advance(Duration::from_secs(11)).await;
    assert_eq!(
        value(&cache, "token").await,
        "one",
        "served through the outage"
    );
    assert_eq!(backend.calls(), 2);
    assert_eq!(value(&cache, "token").await, "one");
    assert_eq!(backend.calls(), 2, "within the back-off");

    tokio::time::advance(Duration::from_secs(4)).await;
    assert_eq!(value(&cache, "token").await, "one");
    assert_eq!(backend.calls(), 3);

    // A refusal after an outage drops the value: it is an answer.
    backend.set(Answer::Denied);
    tokio::time::advance(Duration::from_secs(4)).await;
    let err = cache.get("token").await.unwrap_err();
    assert!(
        matches!(err, SecurityError::SecretPermissionDenied { .. }),
        "{err:?}"
    );
    backend.set(Answer::Unavailable);
    let err = cache.get("token").await.unwrap_err();
    assert!(
        matches!(err, SecurityError::SecretUnavailable { .. }),
        "nothing left to serve: {err:?}"
    );
}
