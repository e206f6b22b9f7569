//! Killing a service mid-run loses no order and ships none twice.
//!
//! Two tests, both checked in both services' own databases at the end:
//!
//! * [`killing_ordering_twice_mid_run_loses_no_order_and_ships_each_once`]
//!   runs on the emulator: Ordering, the producer, is SIGKILLed twice while
//!   Shipping stays up.
//! * [`killing_either_service_mid_run_loses_no_order_and_ships_each_once`]
//!   also kills Shipping, the consumer, and is ignored on the emulator.
//!
//! What the emulator cannot show: the Pub/Sub emulator (0.8) never
//! redelivers messages leased to a streaming pull that has ended, and the
//! stream of a killed process goes on taking messages from its
//! subscription (see `docs/event-bus.md`), so a consumer killed on the
//! emulator loses messages that real Pub/Sub would redeliver after the ack
//! deadline. The crash of a consumer holding a message is covered on the
//! in-memory bus (keel-eventbus's
//! `aborted_or_dropped_subscriber_messages_are_redelivered_unless_acked`)
//! and by the inbox's concurrency tests; the ignored test is the same
//! scenario for real Pub/Sub. What is real in both: the processes die by
//! SIGKILL, Ordering's relay resumes from its checkpoint (republishing what
//! it had not recorded, which Shipping's inbox absorbs), and clients retry
//! commands with the same request ids; in the ignored test also messages
//! published while their consumer is down wait in the subscription.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
use std::time::Duration;

use futures::future::try_join_all;
use keel_tests::services::{Error, OrderingClient, ServiceStack, StackOptions};
use sqlx::PgPool;
use tokio::task::JoinHandle;

use keel_grpc::proto::examples::shipping::v1 as shipping_api;

use crate::common::{
    ONE_STACK_AT_A_TIME, place_and_pay, pool, shipment, wait_all_dispatched, wait_all_shipped,
    wait_for,
};

/// The checkpoint name of Ordering's event-store relay
/// (`keel.subscription_checkpoints`).
const RELAY: &str = "ordering-relay";

/// Places and pays `n` orders, four at a time.
async fn orders(ordering: &OrderingClient, batch: &str, n: usize) -> Result<Vec<String>, Error> {
    let mut ids = Vec::with_capacity(n);
    for chunk in (0..n).collect::<Vec<_>>().chunks(4) {
        let placed = try_join_all(chunk.iter().map(|i| {
            let customer = format!("customer-{batch}-{i}");
            async move { place_and_pay(ordering, &customer, "Grace Hopper").await }
        }))
        .await?;
        ids.extend(placed);
    }
    Ok(ids)
}

/// A client in the background: `workers` loops, each placing and paying
/// orders one after another (retrying through restarts), `n` in all.
struct Client {
    done: Arc<AtomicUsize>,
    task: JoinHandle<Result<Vec<String>, Error>>,
}

impl Client {
    /// Starts it on `ordering`, its customers named after `batch`.
    fn spawn(ordering: &OrderingClient, batch: &str, n: usize, workers: usize) -> Self {
        let done = Arc::new(AtomicUsize::new(0));
        let loops: Vec<_> = (0..workers)
            .map(|w| {
                let (ordering, done) = (ordering.clone(), Arc::clone(&done));
                let batch = batch.to_owned();
                async move {
                    let mut ids = Vec::new();
                    for i in (w..n).step_by(workers) {
                        let customer = format!("customer-{batch}-{i}");
                        ids.push(place_and_pay(&ordering, &customer, "Grace Hopper").await?);
                        done.fetch_add(1, AtomicOrdering::SeqCst);
                    }
                    Ok::<_, Error>(ids)
                }
            })
            .collect();
        let task =
            tokio::spawn(
                async move { Ok(try_join_all(loops).await?.into_iter().flatten().collect()) },
            );
        Self { done, task }
    }

    /// Waits until it has placed and paid `n` orders.
    async fn wait_done(&self, n: usize) {
        while self.done() < n && !self.task.is_finished() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// How many orders it has placed and paid so far.
    fn done(&self) -> usize {
        self.done.load(AtomicOrdering::SeqCst)
    }

    /// Waits for the rest; the ids of all its orders.
    async fn finish(self) -> Result<Vec<String>, Error> {
        self.task.await?
    }
}

/// How many `order.shipped` events Ordering's store must hold per order.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Shipped {
    /// Exactly one: Ordering heard back from Shipping about every order.
    Once,
    /// None or one: Ordering's subscription died with it, and the emulator
    /// may have lost what it had routed to the dead stream.
    AtMostOnce,
}

/// Ordering's store: each order in `orders` placed and paid exactly once
/// (a retried command recorded nothing again), `order.shipped` as `shipped`
/// says, nothing else, and no stream of an order the client does not know.
async fn check_ordering_store(
    db: &PgPool,
    orders: &[String],
    shipped: Shipped,
) -> Result<(), Error> {
    let rows: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT stream_id, event_type, count(*) FROM keel.events \
         WHERE stream_id LIKE 'Order-%' GROUP BY 1, 2",
    )
    .fetch_all(db)
    .await?;
    let counts: HashMap<(&str, &str), i64> = rows
        .iter()
        .map(|(s, t, n)| ((s.as_str(), t.as_str()), *n))
        .collect();
    let expected: HashSet<String> = orders.iter().map(|id| format!("Order-{id}")).collect();
    let streams: HashSet<String> = rows.iter().map(|(s, _, _)| s.clone()).collect();
    assert_eq!(
        streams.difference(&expected).collect::<Vec<_>>(),
        Vec::<&String>::new(),
        "streams of orders nobody placed"
    );
    for ((stream, kind), n) in &counts {
        assert!(
            ["order.placed", "order.paid", "order.shipped"].contains(kind),
            "{stream} holds {n} unexpected {kind}"
        );
    }
    for stream in &expected {
        let n = |kind: &str| counts.get(&(stream.as_str(), kind)).copied().unwrap_or(0);
        assert_eq!(n("order.placed"), 1, "order.placed in {stream}");
        assert_eq!(n("order.paid"), 1, "order.paid in {stream}");
        match shipped {
            Shipped::Once => assert_eq!(n("order.shipped"), 1, "order.shipped in {stream}"),
            Shipped::AtMostOnce => {
                assert!(n("order.shipped") <= 1, "order.shipped twice in {stream}");
            }
        }
    }
    Ok(())
}

/// Shipping's side: through its API each order in `orders` has a shipment,
/// dispatched, with its tracking number; in its database exactly one
/// shipment row per order and none other, each written twice (version 2:
/// inserted on `order.placed`, dispatched on `order.paid`), and exactly
/// one `shipment.dispatched` outbox row per order.
async fn check_shipping(
    stack: &ServiceStack,
    shipping_db: &PgPool,
    orders: &[String],
) -> Result<(), Error> {
    let shipping = stack.shipping_client()?;
    for id in orders {
        let found = shipment(&shipping, id)
            .await?
            .ok_or_else(|| format!("the paid order {id} has no shipment"))?;
        assert_eq!(
            found.status(),
            shipping_api::ShipmentStatus::Dispatched,
            "{id}"
        );
        assert_eq!(found.tracking_number, format!("TRK-{id}"));
    }

    let shipments: Vec<(String, i64, serde_json::Value)> =
        sqlx::query_as("SELECT order_id, version, shipment FROM keel_examples_shipments")
            .fetch_all(shipping_db)
            .await?;
    assert_eq!(shipments.len(), orders.len(), "one shipment per order");
    for (order_id, version, shipment) in &shipments {
        assert!(
            orders.contains(order_id),
            "a shipment for an unknown order {order_id}"
        );
        assert_eq!(
            *version, 2,
            "shipment of {order_id} written other than twice: {shipment}"
        );
        assert_eq!(shipment["status"], "dispatched", "{shipment}");
    }
    let dispatched: Vec<(String, i64)> = sqlx::query_as(
        "SELECT aggregate_id, count(*) FROM keel.outbox \
         WHERE event_type = 'shipment.dispatched' GROUP BY 1",
    )
    .fetch_all(shipping_db)
    .await?;
    assert_eq!(dispatched.len(), orders.len(), "shipment.dispatched rows");
    assert!(dispatched.iter().all(|(_, n)| *n == 1), "{dispatched:?}");
    Ok(())
}

/// Shipping's inbox against Ordering's store: every `order.placed` and
/// `order.paid` Ordering stored was marked (each once: the key is the
/// event id), and nothing Ordering did not store. The inbox is read first:
/// the store only grows, so an `order.shipped` Ordering records and
/// Shipping marks meanwhile cannot look like an event from nowhere.
async fn check_inbox(ordering_db: &PgPool, shipping_db: &PgPool) -> Result<(), Error> {
    let marked: HashSet<uuid::Uuid> =
        sqlx::query_scalar("SELECT event_id FROM keel.inbox WHERE consumer = 'shipping'")
            .fetch_all(shipping_db)
            .await?
            .into_iter()
            .collect();
    let stored: Vec<(uuid::Uuid, String)> = sqlx::query_as(
        "SELECT event_id, event_type FROM keel.events WHERE stream_id LIKE 'Order-%'",
    )
    .fetch_all(ordering_db)
    .await?;
    for (id, kind) in &stored {
        if kind != "order.shipped" {
            assert!(marked.contains(id), "{kind} {id} never handled by Shipping");
        }
    }
    let stored: HashSet<uuid::Uuid> = stored.iter().map(|(id, _)| *id).collect();
    assert!(
        marked.is_subset(&stored),
        "Shipping handled an event Ordering never stored"
    );
    Ok(())
}

/// Order events of `orders` (all when `None`) that Ordering's relay has
/// not checkpointed: what it publishes (again) when it next starts.
async fn past_relay_checkpoint(
    db: impl sqlx::PgExecutor<'_>,
    orders: Option<&[String]>,
) -> Result<i64, Error> {
    let streams: Option<Vec<String>> =
        orders.map(|ids| ids.iter().map(|id| format!("Order-{id}")).collect());
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM keel.events e \
         LEFT JOIN keel.subscription_checkpoints c ON c.name = $1 \
         WHERE e.stream_id LIKE 'Order-%' \
           AND ($2::text[] IS NULL OR e.stream_id = ANY($2)) \
           AND (c.name IS NULL OR (e.commit, e.position) > (c.commit, c.sequence))",
    )
    .bind(RELAY)
    .bind(streams)
    .fetch_one(db)
    .await?)
}

/// A statement in Ordering's database waiting for a lock on the relay's
/// checkpoint row, if one is: its server process id and start time (the
/// same pair twice means the same statement waited all along).
async fn relay_waiting_on_checkpoint(db: &PgPool) -> Result<Option<(i32, String)>, Error> {
    Ok(sqlx::query_as(
        "SELECT pid, query_start::text FROM pg_stat_activity \
         WHERE datname = current_database() AND pid <> pg_backend_pid() \
           AND wait_event_type = 'Lock' AND query LIKE '%keel.subscription_checkpoints%' \
         LIMIT 1",
    )
    .fetch_optional(db)
    .await?)
}

/// Ordering, the producer, is SIGKILLed twice and restarted while Shipping
/// stays up; no order is lost and each is shipped exactly once in effect.
///
/// The kills:
///
/// 1. Mid-burst: three client loops are placing and paying orders (the
///    relay publishing them as they commit) when Ordering dies. Calls in
///    flight fail or never answer; the clients retry them with the same
///    request ids until the restarted Ordering answers. Should a kill land
///    after a command committed but before it answered, the retry is
///    answered from the stored events and records nothing again; whether
///    it does is up to timing, and the store's counts check it either way.
/// 2. With unpublished events: the test holds a row lock on the relay's
///    checkpoint row, so the relay stalls at its next write to that row (it
///    records how far it has started delivering before it publishes a new
///    batch, and its checkpoint every second), as a relay behind a slow
///    database would. The test places one order to make the relay write,
///    waits until that write is blocked, then commits a burst of six
///    orders that the stalled relay cannot publish, checks that the same
///    statement was still waiting after the burst (no timeout and retry let
///    the relay move on), kills Ordering and releases the lock. The burst's
///    twelve events are all past the checkpoint: only the restarted relay
///    can deliver them.
///
/// What it proves, in the end, from Shipping's side and both databases:
/// every paid order has exactly one shipment row, version 2 (inserted,
/// then dispatched, never written again by a republished event) and
/// dispatched, and exactly one `shipment.dispatched` outbox row; Shipping's
/// inbox marked every `order.placed` and `order.paid` in Ordering's store
/// and nothing Ordering did not store; Ordering's store holds exactly one
/// `order.placed` and one `order.paid` per order and no stream of an order
/// the clients do not know.
///
/// What it cannot prove: Ordering's own subscription (to
/// `shipment.dispatched`) dies with it, and the emulator may lose what it
/// had routed to that dead stream (see the module docs), so the test does
/// not wait for Ordering to show orders shipped, and only checks that no
/// order was marked shipped twice. Nor does it kill a consumer holding
/// messages: on real Pub/Sub that is the ignored test below, and keel's
/// in-memory bus covers the redelivery after such a crash.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_ordering_twice_mid_run_loses_no_order_and_ships_each_once() -> Result<(), Error> {
    let _one = ONE_STACK_AT_A_TIME.lock().await;
    let mut stack = ServiceStack::start(StackOptions::default()).await?;
    let ordering = stack.ordering_client()?;
    let ordering_db = pool(&stack.ordering_db.url()).await?;
    let shipping_db = pool(&stack.shipping_db.url()).await?;
    let patience = Duration::from_secs(120);

    // 1. Both up: orders flow end to end.
    let mut all = orders(&ordering, "a", 4).await?;
    wait_all_dispatched(&shipping_db, &all, patience).await?;

    // 2. Kill mid-burst: the clients retry until Ordering is back.
    let client = Client::spawn(&ordering, "b", 12, 3);
    client.wait_done(4).await;
    stack.ordering.kill().await;
    assert!(client.done() < 12, "the client was done before the kill");
    let behind = past_relay_checkpoint(&ordering_db, None).await?;
    eprintln!("first kill: {behind} order events past the relay's checkpoint");
    tokio::time::sleep(Duration::from_millis(500)).await;
    stack.ordering.start().await?;
    let burst = client.finish().await?;
    assert_eq!(burst.len(), 12, "the mid-burst client's orders");
    all.extend(burst);

    // 3. Kill with committed events the relay has not published: hold its
    //    checkpoint row, make it write there, burst, kill, release.
    wait_for("the relay's checkpoint row", patience, || async {
        let saved: Option<i64> =
            sqlx::query_scalar("SELECT commit FROM keel.subscription_checkpoints WHERE name = $1")
                .bind(RELAY)
                .fetch_optional(&ordering_db)
                .await?;
        Ok(saved.map(|_| ()))
    })
    .await?;
    let mut hold = ordering_db.begin().await?;
    sqlx::query("SELECT 1 FROM keel.subscription_checkpoints WHERE name = $1 FOR UPDATE")
        .bind(RELAY)
        .execute(&mut *hold)
        .await?;
    all.extend(orders(&ordering, "c", 1).await?);
    let stalled = wait_for(
        "the relay to wait on its checkpoint",
        Duration::from_secs(20),
        || relay_waiting_on_checkpoint(&ordering_db),
    )
    .await?;
    let burst = orders(&ordering, "d", 6).await?;
    assert_eq!(
        relay_waiting_on_checkpoint(&ordering_db).await?,
        Some(stalled),
        "the relay's write to its checkpoint row (the same statement) waited through the burst"
    );
    stack.ordering.kill().await;
    let unpublished = past_relay_checkpoint(&mut *hold, Some(&burst)).await?;
    assert_eq!(
        unpublished, 12,
        "the burst's events (placed and paid) wait for the restarted relay"
    );
    hold.rollback().await?;
    all.extend(burst);
    stack.ordering.start().await?;

    // 4. After the last restart, orders flow as before.
    all.extend(orders(&ordering, "e", 4).await?);

    // Shipping shipped each of them, once. Before the checks, the relay
    // must have checkpointed every order event: all it republished after
    // the restarts has then been sent to Shipping (a duplicate still on its
    // way when the checks read is not seen by them).
    wait_all_dispatched(&shipping_db, &all, patience).await?;
    wait_for(
        "the relay to checkpoint every order event",
        patience,
        || async { Ok((past_relay_checkpoint(&ordering_db, None).await? == 0).then_some(())) },
    )
    .await?;
    assert_eq!(all.len(), 27);
    assert_eq!(
        all.iter().collect::<HashSet<_>>().len(),
        27,
        "27 distinct orders"
    );
    check_shipping(&stack, &shipping_db, &all).await?;
    check_inbox(&ordering_db, &shipping_db).await?;
    check_ordering_store(&ordering_db, &all, Shipped::AtMostOnce).await?;

    stack.terminate().await?;
    ordering_db.close().await;
    shipping_db.close().await;
    Ok(())
}

/// Ignored: on the Pub/Sub emulator here this loses messages, so it fails
/// for a reason outside Keel. Measured on 2026-12-06 (two runs): after
/// Shipping was SIGKILLed, idle and drained, and 5 s passed before any new
/// message was published, the restarted Shipping received the messages of
/// only 11 (and 12) of the 18 orders published meanwhile, even with a 10 s
/// ack deadline and 120 s of waiting; the restarted Ordering likewise never
/// received 4 to 6 `shipment.dispatched` messages. The emulator seems to
/// keep handing messages to the killed process's stream. Run it against
/// real Pub/Sub (or an emulator that redelivers expired leases) with
/// `cargo test -p keel-tests --test e2e -- --ignored restart`.
///
/// On real Pub/Sub it adds to the test above: Shipping is SIGKILLed (when
/// it has drained, holding no lease) while Ordering keeps publishing, and
/// Ordering is killed while Shipping is down; at the end Ordering shows
/// every order shipped, with exactly one `order.shipped` each.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "the Pub/Sub emulator loses messages after a subscriber is SIGKILLed; see the doc comment"]
async fn killing_either_service_mid_run_loses_no_order_and_ships_each_once() -> Result<(), Error> {
    let _one = ONE_STACK_AT_A_TIME.lock().await;
    // A short ack deadline: should the emulator lease a message to the
    // killed process's stream before it notices the stream is gone, the
    // lease runs out soon.
    let mut stack = ServiceStack::start(
        StackOptions::default().shipping_env("KEEL_EVENTBUS__SUBSCRIPTION__ACK_DEADLINE", "10s"),
    )
    .await?;
    let ordering = stack.ordering_client()?;
    let patience = Duration::from_secs(120);

    // 1. Both up: orders flow end to end.
    let mut all = orders(&ordering, "a", 8).await?;
    wait_all_shipped(&ordering, &all, patience).await?;

    // 2. Shipping is killed (it has drained: no lease is lost on the
    //    emulator); Ordering keeps taking orders, its relay publishes them,
    //    and they wait in Shipping's subscription.
    stack.shipping.kill().await;
    // Give the emulator time to notice the ended stream: messages it leases
    // to that stream in the meantime are lost there (see the module docs).
    tokio::time::sleep(Duration::from_secs(5)).await;
    all.extend(orders(&ordering, "b", 8).await?);

    // 3. Ordering is killed while a client is placing and paying orders
    //    (and its relay publishing them); the client retries with the same
    //    request ids until Ordering is back.
    let client = Client::spawn(&ordering, "c", 10, 1);
    client.wait_done(3).await;
    stack.ordering.kill().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stack.ordering.start().await?;
    all.extend(client.finish().await?);

    // 4. Shipping comes back and works off what waited for it.
    stack.shipping.start().await?;
    wait_all_shipped(&ordering, &all, patience).await?;
    assert_eq!(all.len(), 26);
    assert_eq!(
        all.iter().collect::<HashSet<_>>().len(),
        26,
        "26 distinct orders"
    );

    let ordering_db = pool(&stack.ordering_db.url()).await?;
    let shipping_db = pool(&stack.shipping_db.url()).await?;
    check_shipping(&stack, &shipping_db, &all).await?;
    check_inbox(&ordering_db, &shipping_db).await?;
    check_ordering_store(&ordering_db, &all, Shipped::Once).await?;

    stack.terminate().await?;
    ordering_db.close().await;
    shipping_db.close().await;
    Ok(())
}
