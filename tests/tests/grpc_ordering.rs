//! gRPC, event store, event bus and security together: a client places an
//! order over gRPC with a JWT from a refreshing token source; the server
//! verifies the token with keel-security, appends the event to the
//! PostgreSQL event store (idempotent by the request id) and publishes it
//! on the bus as a protobuf envelope. A lost reply is retried by the client
//! because the call is marked idempotent, and the order is stored and
//! published once.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use futures::TryStreamExt as _;
use keel_core::{
    Delivery, EventEnvelope, EventHandler, EventId, EventPublisher, ExpectedVersion, HandlerError,
    Message, Metadata, StreamId,
};
use keel_eventbus::{EventBus, InMemoryBus, SubscriptionConfig, WireFormat, WireFormats};
use keel_eventstore::{Appender, NewEvent, PostgresEventStore, ReadStream, StreamReader};
use keel_grpc::client::{
    ChannelConfig, ChannelFactory, Idempotency, IssuedToken, RefreshingToken, RetryPolicy, Target,
    TokenIssuer,
};
use keel_proto::examples::ordering::v1 as api;
use keel_security::{Algorithm, JwtConfig, JwtVerifier, KeySource, VerificationKey};
use keel_telemetry::Secret;
use keel_testkit::TestDatabase;
use tokio::sync::mpsc;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Code, Request, Response, Status};

const SIGNING_KEY: &[u8] = b"a test key of thirty-two bytes!!";
const ISSUER: &str = "https://issuer.test";
const AUDIENCE: &str = "ordering";

/// Mints short-lived HS256 tokens, as an identity provider would.
#[derive(Debug, Default)]
struct Issuer {
    issued: AtomicU32,
}

#[async_trait]
impl TokenIssuer for Issuer {
    async fn issue(&self) -> keel_core::Result<IssuedToken> {
        self.issued.fetch_add(1, Ordering::SeqCst);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let claims = serde_json::json!({
            "iss": ISSUER, "aud": AUDIENCE, "sub": "service:shipping",
            "iat": now, "exp": now + 300,
        });
        let token = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(SIGNING_KEY),
        )
        .map_err(|e| keel_core::Error::internal("cannot sign", e))?;
        Ok(IssuedToken {
            token: Secret::new(token),
            expires_in: Duration::from_secs(300),
        })
    }
}

struct OrderingServer {
    store: PostgresEventStore,
    bus: InMemoryBus,
    verifier: JwtVerifier,
    attempts: AtomicU32,
    /// Store and publish, then answer UNAVAILABLE as if the reply was lost.
    lose_next_reply: AtomicBool,
}

#[tonic::async_trait]
impl api::ordering_service_server::OrderingService for OrderingServer {
    async fn place_order(
        &self,
        request: Request<api::PlaceOrderRequest>,
    ) -> Result<Response<api::PlaceOrderResponse>, Status> {
        self.attempts.fetch_add(1, Ordering::SeqCst);
        let authorization = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| Status::unauthenticated("no bearer token"))?;
        let principal = self
            .verifier
            .verify_bearer(authorization)
            .await
            .map_err(|e| Status::unauthenticated(e.to_string()))?;
        let request = request.into_inner();
        let event_id: EventId = request
            .request_id
            .parse()
            .map_err(|_| Status::invalid_argument("request_id is not a UUID"))?;
        let stream = StreamId::new(format!("Order-{}", request.request_id))
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let payload = serde_json::json!({
            "customer": request.customer_id,
            "skus": request.lines.iter().map(|l| l.sku.clone()).collect::<Vec<_>>(),
        });
        let event = NewEvent::from_json("order.placed", &payload)
            .with_id(event_id)
            .with_metadata(Metadata::new().with_actor(principal.subject.clone()));
        let appended = self
            .store
            .append(&stream, ExpectedVersion::Any, vec![event])
            .await
            .map_err(|e| Status::internal(e.to_string()))?;

        if !appended.was_retry {
            // The stored event, as the protobuf envelope other services read.
            let stored = self
                .store
                .read_stream(&stream, ReadStream::forward())
                .try_collect::<Vec<_>>()
                .await
                .map_err(|e| Status::internal(e.to_string()))?;
            let recorded = &stored[0];
            let envelope: EventEnvelope<serde_json::Value> =
                recorded.envelope_with(recorded.decode_as().unwrap());
            let wire = keel_proto::keel::v1::EventEnvelope::from(&envelope);
            assert_eq!(wire.version, Some(1));
            assert!(wire.position.is_some());
            let message = Message::try_from(wire).map_err(|e| Status::internal(e.to_string()))?;
            self.bus
                .publish("orders", &[message])
                .await
                .map_err(|e| Status::unavailable(e.to_string()))?;
        }
        if self.lose_next_reply.swap(false, Ordering::SeqCst) {
            return Err(Status::unavailable("the reply was lost"));
        }
        Ok(Response::new(api::PlaceOrderResponse {
            order_id: stream.as_str().to_owned(),
            version: appended.next_expected_version.get(),
            total: None,
        }))
    }

    async fn pay_order(
        &self,
        _: Request<api::PayOrderRequest>,
    ) -> Result<Response<api::PayOrderResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn cancel_order(
        &self,
        _: Request<api::CancelOrderRequest>,
    ) -> Result<Response<api::CancelOrderResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn get_order(
        &self,
        _: Request<api::GetOrderRequest>,
    ) -> Result<Response<api::GetOrderResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
}

struct Forward(mpsc::UnboundedSender<Message>);

#[async_trait]
impl EventHandler for Forward {
    async fn handle(&self, delivery: &Delivery) -> Result<(), HandlerError> {
        self.0
            .send(delivery.message.clone())
            .map_err(HandlerError::retry)
    }
}

fn place(request_id: &str) -> api::PlaceOrderRequest {
    api::PlaceOrderRequest {
        request_id: request_id.to_owned(),
        customer_id: "c-7".into(),
        lines: vec![api::OrderLine {
            sku: "sku-1".into(),
            quantity: 2,
            unit_price: None,
        }],
        shipping_address: None,
    }
}

type Client = api::ordering_service_client::OrderingServiceClient<keel_grpc::client::KeelChannel>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_placed_over_grpc_is_stored_and_published_once() {
    let db = TestDatabase::create(&[&keel_eventstore::MIGRATIONS])
        .await
        .unwrap();
    let store = PostgresEventStore::new(db.pool().clone());
    let formats = WireFormats::new().with_topic("orders", WireFormat::Protobuf);
    let bus = InMemoryBus::new().with_wire_formats(formats);
    let (tx, mut published) = mpsc::unbounded_channel();
    let subscription = bus
        .subscribe(
            "orders",
            &SubscriptionConfig::new("shipping"),
            Arc::new(Forward(tx)),
        )
        .await
        .unwrap();
    let key = VerificationKey::hmac(None, &Secret::new(SIGNING_KEY.to_vec())).unwrap();
    let verifier = JwtVerifier::new(
        JwtConfig::new(ISSUER, AUDIENCE, [Algorithm::HS256]),
        KeySource::fixed([key]),
    )
    .unwrap();
    let server = Arc::new(OrderingServer {
        store: store.clone(),
        bus: bus.clone(),
        verifier,
        attempts: AtomicU32::new(0),
        lose_next_reply: AtomicBool::new(false),
    });

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = Target::new(format!("http://{}", listener.local_addr().unwrap())).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(
                api::ordering_service_server::OrderingServiceServer::from_arc(server.clone()),
            )
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                let _ = stopped.await;
            }),
    );

    let issuer = Arc::new(Issuer::default());
    let factory = ChannelFactory::new(ChannelConfig::new())
        .unwrap()
        .with_token_source(Arc::new(RefreshingToken::new(issuer.clone())))
        .with_retry_policy(
            RetryPolicy::new().with_backoff(Duration::from_millis(10), Duration::from_millis(50)),
        )
        .unwrap();
    let client = factory.client(&target).unwrap();

    // The reply to the first attempt is lost; the request id makes the call
    // idempotent, so the client retries, and the store answers the retry
    // from the first append.
    let request_id = uuid::Uuid::now_v7().to_string();
    server.lose_next_reply.store(true, Ordering::SeqCst);
    let placed = client
        .call(Idempotency::Idempotent, |channel| {
            let request = place(&request_id);
            async move { Client::new(channel).place_order(request).await }
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(server.attempts.load(Ordering::SeqCst), 2);
    assert_eq!(placed.version, 1);
    let stream = StreamId::new(placed.order_id.clone()).unwrap();
    let events: Vec<_> = store
        .read_stream(&stream, ReadStream::forward())
        .try_collect()
        .await
        .unwrap();
    assert_eq!(events.len(), 1, "stored once");
    assert_eq!(
        events[0].metadata.actor.as_deref(),
        Some("service:shipping")
    );

    let message = tokio::time::timeout(Duration::from_secs(10), published.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(message.event_id.to_string(), request_id);
    assert_eq!(
        message.ordering_key.as_deref(),
        Some(placed.order_id.as_str())
    );
    assert_eq!(message.metadata.actor.as_deref(), Some("service:shipping"));
    assert_eq!(message.payload["skus"][0], "sku-1");

    // Not marked idempotent: a lost reply reaches the caller, one attempt.
    let other_id = uuid::Uuid::now_v7().to_string();
    server.lose_next_reply.store(true, Ordering::SeqCst);
    let err = client
        .call(Idempotency::NotIdempotent, |channel| {
            let request = place(&other_id);
            async move { Client::new(channel).place_order(request).await }
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert_eq!(server.attempts.load(Ordering::SeqCst), 3);

    // Without a token: refused, nothing stored.
    let anonymous = ChannelFactory::new(ChannelConfig::new()).unwrap();
    let unknown_id = uuid::Uuid::now_v7().to_string();
    let err = Client::new(anonymous.channel(&target).unwrap())
        .place_order(place(&unknown_id))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let none: Vec<_> = store
        .read_stream(
            &StreamId::new(format!("Order-{unknown_id}")).unwrap(),
            ReadStream::forward(),
        )
        .try_collect()
        .await
        .unwrap();
    assert!(none.is_empty());

    // One token served every call; exactly two orders were published.
    assert_eq!(issuer.issued.load(Ordering::SeqCst), 1);
    let second = tokio::time::timeout(Duration::from_secs(10), published.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(second.event_id.to_string(), other_id);
    subscription.shutdown().await;
    assert!(published.try_recv().is_err(), "nothing was published twice");

    let _ = stop.send(());
    serving.await.unwrap().unwrap();
}
