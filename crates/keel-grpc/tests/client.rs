//! The client side against a real tonic server on a loopback port: one
//! shared connection, reconnection after a restart, deadlines, retries
//! only where the caller allows them, bearer tokens.

mod client_common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use client_common::{Recorder, TestServer};
use keel_grpc::client::{
    ChannelConfig, ChannelFactory, Idempotency, IssuedToken, RefreshingToken, RetryPolicy,
    StaticToken, Target, TokenIssuer,
};
use keel_grpc::proto::examples::ordering::v1 as api;
use keel_telemetry::Secret;
use tonic::Code;

type Client = api::ordering_service_client::OrderingServiceClient<keel_grpc::client::KeelChannel>;

fn factory() -> ChannelFactory {
    ChannelFactory::new(ChannelConfig::new().with_connect_timeout(Duration::from_secs(2)))
        .unwrap()
        .with_retry_policy(
            RetryPolicy::new()
                .with_max_attempts(4)
                .with_backoff(Duration::from_millis(10), Duration::from_millis(50)),
        )
        .unwrap()
}

fn get(id: &str) -> api::GetOrderRequest {
    api::GetOrderRequest {
        order_id: id.to_owned(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_clients_and_calls_share_one_connection() {
    let recorder = Arc::new(Recorder::default());
    let server = TestServer::start(recorder.clone()).await;
    let factory = factory();
    let target = Target::new(server.uri()).unwrap();

    // 20 tasks, each with clients of its own, from the factory and from a
    // clone of it; 10 calls each.
    let tasks = (0..20).map(|i| {
        let factory = factory.clone();
        let target = target.clone();
        tokio::spawn(async move {
            for n in 0..10 {
                let mut client = Client::new(factory.channel(&target).unwrap());
                let reply = client.get_order(get(&format!("o-{i}-{n}"))).await.unwrap();
                assert_eq!(
                    reply.into_inner().order.unwrap().order_id,
                    format!("o-{i}-{n}")
                );
            }
        })
    });
    for t in futures::future::join_all(tasks).await {
        t.unwrap();
    }
    let via_client = factory.client(&target).unwrap();
    via_client
        .call(Idempotency::Idempotent, |ch| async move {
            Client::new(ch).get_order(get("last")).await
        })
        .await
        .unwrap();

    assert_eq!(recorder.attempts_get.load(Ordering::SeqCst), 201);
    assert_eq!(server.accepted(), 1, "every call went over one connection");
    assert_eq!(factory.channel_count(), 1);

    // Another target is another channel (and connection).
    let other = Target::balanced([server.uri()]).unwrap();
    assert_eq!(other, target, "the same endpoint is the same target");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_channel_reconnects_after_the_server_restarts() {
    let recorder = Arc::new(Recorder::default());
    let server = TestServer::start(recorder.clone()).await;
    let addr = server.addr;
    let factory = factory();
    let target = Target::new(server.uri()).unwrap();
    let mut client = Client::new(factory.channel(&target).unwrap());
    client.get_order(get("before")).await.unwrap();
    server.stop().await;

    // Down: a call fails fast with UNAVAILABLE, it does not hang.
    let down = client.get_order(get("down")).await.unwrap_err();
    assert_eq!(down.code(), Code::Unavailable, "{down:?}");

    let server = TestServer::restart(addr, recorder.clone()).await;
    // The same client (same shared channel) works again. The first call
    // after the restart may still see the old connection's end, which the
    // idempotent retry absorbs.
    let again = factory
        .client(&target)
        .unwrap()
        .call(Idempotency::Idempotent, |ch| async move {
            Client::new(ch).get_order(get("after")).await
        })
        .await
        .unwrap();
    assert_eq!(again.into_inner().order.unwrap().order_id, "after");
    client.get_order(get("after-2")).await.unwrap();
    assert_eq!(server.accepted(), 1, "one new connection after the restart");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_reach_the_server_and_a_slow_call_ends_deadline_exceeded() {
    let recorder = Arc::new(Recorder::default());
    let server = TestServer::start(recorder.clone()).await;
    let factory = ChannelFactory::new(
        ChannelConfig::new().with_request_timeout(Some(Duration::from_millis(1500))),
    )
    .unwrap();
    let target = Target::new(server.uri()).unwrap();
    let mut client = Client::new(factory.channel(&target).unwrap());

    // The caller's own deadline.
    let mut request = tonic::Request::new(api::PayOrderRequest {
        request_id: "r-1".into(),
        order_id: "o-1".into(),
        ..Default::default()
    });
    request.set_timeout(Duration::from_millis(300));
    let err = client.pay_order(request).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");

    // No deadline set: the factory's default travels and applies.
    let err = client
        .pay_order(api::PayOrderRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");

    let seen = recorder.seen();
    let timeouts: Vec<_> = seen
        .iter()
        .filter(|s| s.method == "pay")
        .map(|s| s.grpc_timeout.clone())
        .collect();
    assert_eq!(timeouts.len(), 2, "{seen:?}");
    let first = timeouts[0]
        .as_deref()
        .expect("grpc-timeout on the first call");
    assert!(
        first.ends_with('u') || first.ends_with('m') || first.ends_with('n'),
        "{first}"
    );
    assert_eq!(timeouts[1].as_deref(), Some("1500m"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_calls_marked_idempotent_are_retried() {
    let recorder = Arc::new(Recorder::default());
    let server = TestServer::start(recorder.clone()).await;
    let factory = factory();
    let client = factory.client(&Target::new(server.uri()).unwrap()).unwrap();

    // Idempotent, failing twice with UNAVAILABLE: the third attempt wins.
    recorder.fail_gets.store(2, Ordering::SeqCst);
    client
        .call(Idempotency::Idempotent, |ch| async move {
            Client::new(ch).get_order(get("o-1")).await
        })
        .await
        .unwrap();
    assert_eq!(recorder.attempts_get.load(Ordering::SeqCst), 3);

    // Not idempotent, failing once: the caller sees the failure, the
    // server saw one attempt.
    recorder.fail_places.store(1, Ordering::SeqCst);
    let err = client
        .call(Idempotency::NotIdempotent, |ch| async move {
            let request = api::PlaceOrderRequest {
                request_id: "r-1".into(),
                ..Default::default()
            };
            Client::new(ch).place_order(request).await
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert_eq!(recorder.attempts_place.load(Ordering::SeqCst), 1);

    // Idempotent but refused by the server's decision: no retry.
    let err = client
        .call(Idempotency::Idempotent, |ch| async move {
            Client::new(ch)
                .cancel_order(api::CancelOrderRequest::default())
                .await
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(recorder.attempts_cancel.load(Ordering::SeqCst), 1);

    // Idempotent, failing more often than the attempts allow: exactly
    // max_attempts reach the server.
    recorder.fail_gets.store(10, Ordering::SeqCst);
    let err = client
        .call(Idempotency::Idempotent, |ch| async move {
            Client::new(ch).get_order(get("o-2")).await
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert_eq!(recorder.attempts_get.load(Ordering::SeqCst), 3 + 4);
    server.stop().await;
}

#[derive(Debug, Default)]
struct Issuer {
    issued: AtomicU32,
    refuse: std::sync::atomic::AtomicBool,
}

#[async_trait]
impl TokenIssuer for Issuer {
    async fn issue(&self) -> keel_core::Result<IssuedToken> {
        if self.refuse.load(Ordering::SeqCst) {
            return Err(keel_core::Error::Unauthorized {
                reason: "client credentials revoked".into(),
            });
        }
        let n = self.issued.fetch_add(1, Ordering::SeqCst) + 1;
        Ok(IssuedToken {
            token: Secret::new(format!("token-{n}")),
            expires_in: Duration::from_secs(3600),
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_carries_the_bearer_token() {
    let recorder = Arc::new(Recorder::default());
    let server = TestServer::start(recorder.clone()).await;
    let issuer = Arc::new(Issuer::default());
    let factory = factory().with_token_source(Arc::new(RefreshingToken::new(issuer.clone())));
    let target = Target::new(server.uri()).unwrap();
    for i in 0..5 {
        let mut client = Client::new(factory.channel(&target).unwrap());
        client.get_order(get(&format!("o-{i}"))).await.unwrap();
    }
    let seen = recorder.seen();
    assert_eq!(seen.len(), 5);
    assert!(
        seen.iter()
            .all(|s| s.authorization.as_deref() == Some("Bearer token-1")),
        "{seen:?}"
    );
    assert_eq!(
        issuer.issued.load(Ordering::SeqCst),
        1,
        "the token is cached"
    );

    // A token source that fails: the call never leaves the client.
    let refusing = Arc::new(Issuer::default());
    refusing.refuse.store(true, Ordering::SeqCst);
    let factory = factory_with(Arc::new(RefreshingToken::new(refusing)));
    let err = Client::new(factory.channel(&target).unwrap())
        .get_order(get("x"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert_eq!(recorder.seen().len(), 5, "the server saw nothing");

    // A token a header cannot carry is refused the same way.
    let factory = factory_with(Arc::new(StaticToken::new("bad\ntoken")));
    let err = Client::new(factory.channel(&target).unwrap())
        .get_order(get("x"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    server.stop().await;
}

fn factory_with(source: Arc<dyn keel_grpc::client::TokenSource>) -> ChannelFactory {
    factory().with_token_source(source)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balanced_targets_spread_calls_over_their_endpoints() {
    let recorder = Arc::new(Recorder::default());
    let a = TestServer::start(recorder.clone()).await;
    let b = TestServer::start(recorder.clone()).await;
    let factory = factory();
    let target = Target::balanced([a.uri(), b.uri()]).unwrap();
    let channel = factory.channel(&target).unwrap();
    for i in 0..40 {
        Client::new(channel.clone())
            .get_order(get(&format!("o-{i}")))
            .await
            .unwrap();
    }
    assert_eq!(recorder.attempts_get.load(Ordering::SeqCst), 40);
    // Each endpoint got its own (single) connection.
    assert_eq!((a.accepted(), b.accepted()), (1, 1));

    // One endpoint down: the balancer leaves it out, idempotent calls go on.
    b.stop().await;
    let client = factory.client(&target).unwrap();
    for i in 0..10 {
        client
            .call(Idempotency::Idempotent, |ch| {
                let id = format!("after-{i}");
                async move { Client::new(ch).get_order(get(&id)).await }
            })
            .await
            .unwrap();
    }
    a.stop().await;
}
