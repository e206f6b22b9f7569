//! Event bus benchmarks.
//!
//! * `in_memory`: messages per second from publish to handled, against a
//!   raw baseline (a tokio channel feeding one consumer task) in the same run.
//! * `pubsub_publish`: `PubSubBus::publish` against the raw
//!   `google-cloud-pubsub` publisher, both on the same emulator in the same
//!   run (skipped when no emulator is found).
//!
//! Run with `cargo bench -p keel-eventbus`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use criterion::{Criterion, Throughput, criterion_main};
use keel_core::{Delivery, EventHandler, EventPublisher, HandlerError, Message};
use keel_eventbus::testing::unique;
use keel_eventbus::{EventBus, InMemoryBus, RawMessage, SubscriptionConfig};
use serde_json::json;
use tokio::sync::Notify;

const BATCH: usize = 1_000;

struct Count {
    seen: AtomicUsize,
    target: AtomicUsize,
    done: Notify,
}

#[async_trait]
impl EventHandler for Count {
    async fn handle(&self, _: &Delivery) -> Result<(), HandlerError> {
        let n = self.seen.fetch_add(1, Ordering::SeqCst) + 1;
        if n == self.target.load(Ordering::SeqCst) {
            self.done.notify_one();
        }
        Ok(())
    }
}

fn messages(n: usize) -> Vec<Message> {
    (0..n)
        .map(|i| {
            Message::new(
                "bench.happened",
                json!({ "n": i, "note": "a small payload" }),
            )
        })
        .collect()
}

fn in_memory(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("in_memory");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.sample_size(20);

    let bus = InMemoryBus::new();
    let counter = Arc::new(Count {
        seen: AtomicUsize::new(0),
        target: AtomicUsize::new(0),
        done: Notify::new(),
    });
    let config = SubscriptionConfig::new("bench").with_max_concurrent_handlers(16);
    let _sub = rt
        .block_on(bus.subscribe("bench", &config, counter.clone()))
        .unwrap();
    group.bench_function("publish_to_handled", |b| {
        b.to_async(&rt).iter(|| {
            let bus = bus.clone();
            let counter = counter.clone();
            async move {
                let msgs = messages(BATCH);
                counter.seen.store(0, Ordering::SeqCst);
                counter.target.store(BATCH, Ordering::SeqCst);
                let done = counter.done.notified();
                bus.publish("bench", &msgs).await.unwrap();
                done.await;
            }
        });
    });

    // Baseline: the same messages, encoded the same way, through a channel
    // to one consumer task that decodes them.
    group.bench_function("raw_channel_baseline", |b| {
        b.to_async(&rt).iter(|| async {
            let msgs = messages(BATCH);
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<RawMessage>();
            let consumer = tokio::spawn(async move {
                let mut n = 0;
                while let Some(raw) = rx.recv().await {
                    let _ = raw.decode().unwrap();
                    n += 1;
                    if n == BATCH {
                        break;
                    }
                }
            });
            for m in &msgs {
                tx.send(RawMessage::encode(m).unwrap()).unwrap();
            }
            consumer.await.unwrap();
        });
    });
    group.finish();
}

async fn raw_publish(publisher: &google_cloud_pubsub::client::Publisher, n: usize) {
    use google_cloud_pubsub::model::Message as PsMessage;
    let pending: Vec<_> = messages(n)
        .iter()
        .map(|m| {
            let raw = RawMessage::encode(m).unwrap();
            publisher.publish(
                PsMessage::new()
                    .set_data(raw.data)
                    .set_attributes(raw.attributes),
            )
        })
        .collect();
    for r in futures::future::join_all(pending).await {
        r.unwrap();
    }
}

fn pubsub_publish(c: &mut Criterion) {
    use google_cloud_pubsub::client::Publisher;
    use keel_eventbus::{PubSubBus, PubSubConfig};

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let Ok(host) = rt.block_on(keel_testkit::services::pubsub_emulator_host()) else {
        eprintln!("pubsub_publish: no Pub/Sub emulator, skipped");
        return;
    };
    let project = unique("bench");
    let bus = rt
        .block_on(PubSubBus::connect(
            PubSubConfig::emulator(project.clone(), &host).unwrap(),
        ))
        .unwrap();
    let (keel_topic, raw_topic) = ("keel-publish", "raw-publish");
    rt.block_on(async {
        bus.ensure_topic(keel_topic).await.unwrap();
        bus.ensure_topic(raw_topic).await.unwrap();
    });
    let raw_publisher = rt
        .block_on(
            Publisher::builder(format!("projects/{project}/topics/{raw_topic}"))
                .with_endpoint(format!("http://{host}"))
                .with_credentials(google_cloud_auth::credentials::anonymous::Builder::new().build())
                .build(),
        )
        .unwrap();

    const N: usize = 200;
    let mut group = c.benchmark_group("pubsub_publish");
    group.throughput(Throughput::Elements(N as u64));
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(15));
    // The emulator is a JVM: warm both paths up alternately first, so
    // neither is measured against a colder server than the other.
    rt.block_on(async {
        for _ in 0..50 {
            bus.publish(keel_topic, &messages(N)).await.unwrap();
            raw_publish(&raw_publisher, N).await;
        }
    });
    // Each timed publish is preceded by an untimed one through the other
    // path, so both are measured against the same emulator state (a JVM whose
    // speed drifts as it warms up and collects garbage).
    group.bench_function("raw_publisher_baseline", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let (bus, publisher) = (bus.clone(), raw_publisher.clone());
            async move {
                let mut timed = Duration::ZERO;
                for _ in 0..iters {
                    bus.publish(keel_topic, &messages(N)).await.unwrap();
                    let start = Instant::now();
                    raw_publish(&publisher, N).await;
                    timed += start.elapsed();
                }
                timed
            }
        });
    });
    group.bench_function("keel_publish", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let (bus, publisher) = (bus.clone(), raw_publisher.clone());
            async move {
                let mut timed = Duration::ZERO;
                for _ in 0..iters {
                    raw_publish(&publisher, N).await;
                    let start = Instant::now();
                    bus.publish(keel_topic, &messages(N)).await.unwrap();
                    timed += start.elapsed();
                }
                timed
            }
        });
    });
    group.finish();
}

// `criterion_group!` generates an undocumented function.
#[allow(missing_docs)]
mod group {
    criterion::criterion_group!(benches, super::in_memory, super::pubsub_publish);
}
use group::benches;
criterion_main!(benches);
