//! `GrpcServer` over loopback with real tonic clients: authentication and
//! authorization, error mapping, deadlines, load shedding, health from a
//! database that goes away, reflection, and graceful shutdown and abort.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use keel_core::{Error, Principal};
use keel_database::{Database, DatabaseConfig, DatabaseReadiness};
use keel_grpc::health_proto::HealthCheckRequest;
use keel_grpc::health_proto::health_check_response::ServingStatus;
use keel_grpc::health_proto::health_client::HealthClient;
use keel_grpc::{ERROR_CODE_KEY, GrpcServer, RETRY_PUSHBACK_KEY, error_code};
use keel_telemetry::HealthRegistry;
use keel_telemetry::health::CheckOptions;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tonic::Code;

fn admins_only(principal: &Principal, method: &str) -> Result<(), Error> {
    if method.ends_with("/Echo") && !principal.has_role("clerk") {
        return Err(Error::Forbidden {
            reason: "only clerks may echo".into(),
        });
    }
    Ok(())
}

#[tokio::test]
async fn calls_without_a_valid_token_are_refused_and_the_principal_reaches_the_handler() {
    let service = EchoServer::default();
    let server = GrpcServer::builder()
        .add_service(service.clone())
        .health(HealthRegistry::new())
        .authenticate(verifier())
        .authorize(admins_only)
        .serve(addr())
        .await
        .unwrap();
    let channel = channel(server.local_addr()).await;

    let ok = call(
        channel.clone(),
        with_bearer(echo_req("hi"), &token("alice", &["clerk"], 600)),
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!((ok.text.as_str(), ok.subject.as_str()), ("hi", "alice"));

    let refusals = [
        (tonic::Request::new(echo_req("x")), "no bearer token"),
        (with_bearer(echo_req("x"), "garbage"), "malformed token"),
        (
            with_bearer(echo_req("x"), &token("alice", &["clerk"], -3600)),
            "token expired",
        ),
        (
            with_bearer(
                echo_req("x"),
                &format!("{}x", token("alice", &["clerk"], 600)),
            ),
            "invalid token signature",
        ),
    ];
    for (request, reason) in refusals {
        let status = call(channel.clone(), request).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
        assert_eq!(error_code(&status), Some("keel.unauthorized"));
        assert!(status.message().contains(reason), "{status:?}");
    }
    // A header that is not a bearer credential, and one with bytes that
    // are not visible ASCII.
    let mut basic = tonic::Request::new(echo_req("x"));
    basic
        .metadata_mut()
        .insert("authorization", "Basic YWxpY2U6cHc=".parse().unwrap());
    let mut binary = tonic::Request::new(echo_req("x"));
    binary.metadata_mut().insert(
        "authorization",
        tonic::metadata::MetadataValue::try_from("Bearer \u{e9}t\u{e9}".as_bytes()).unwrap(),
    );
    for request in [basic, binary] {
        let status = call(channel.clone(), request).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    }

    let forbidden = call(
        channel.clone(),
        with_bearer(echo_req("x"), &token("bob", &["viewer"], 600)),
    )
    .await
    .unwrap_err();
    assert_eq!(forbidden.code(), Code::PermissionDenied);
    assert_eq!(error_code(&forbidden), Some("keel.forbidden"));
    assert_eq!(forbidden.message(), "only clerks may echo");

    // Only the accepted call reached the handler.
    assert_eq!(service.calls.load(Ordering::SeqCst), 1);

    // Health needs no token.
    let mut health = HealthClient::new(channel.clone());
    let serving = health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(serving.status, ServingStatus::Serving as i32);
    server.shutdown().await.unwrap();
}

fn echo_req(text: &str) -> EchoRequest {
    echo(text)
}

#[tokio::test]
async fn keel_errors_arrive_as_statuses_with_stable_codes_and_no_internal_text() {
    let server = GrpcServer::builder()
        .add_service(EchoServer::default())
        .serve(addr())
        .await
        .unwrap();
    let channel = channel(server.local_addr()).await;
    let failing = |fail: &str| EchoRequest {
        fail: fail.to_owned(),
        ..echo("x")
    };

    let status = call(channel.clone(), tonic::Request::new(failing("not_found")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(error_code(&status), Some("keel.not_found"));
    assert_eq!(status.metadata().get("keel-retryable").unwrap(), "false");

    let status = call(channel.clone(), tonic::Request::new(failing("conflict")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Aborted);
    assert_eq!(error_code(&status), Some("keel.conflict.version"));
    assert_eq!(
        status.metadata().get("keel-expected-version").unwrap(),
        "version 3"
    );
    assert_eq!(status.metadata().get("keel-actual-version").unwrap(), "4");

    let status = call(channel.clone(), tonic::Request::new(failing("internal")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Internal);
    assert_eq!(error_code(&status), Some("keel.internal"));
    assert!(!status.message().contains("hunter2"), "{status:?}");
    for (_, value) in status.metadata().iter().filter_map(|kv| match kv {
        tonic::metadata::KeyAndValueRef::Ascii(k, v) => Some((k, v)),
        tonic::metadata::KeyAndValueRef::Binary(..) => None,
    }) {
        assert!(!value.to_str().unwrap_or_default().contains("hunter2"));
    }

    let status = call(channel.clone(), tonic::Request::new(failing("rejected")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(error_code(&status), Some("order.already_shipped"));

    // A service the server does not have.
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.unwrap();
    let status = grpc
        .unary::<EchoRequest, EchoReply, _>(
            tonic::Request::new(echo("x")),
            http::uri::PathAndQuery::from_static("/keel.test.v1.Nope/Echo"),
            tonic_prost::ProstCodec::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_server_deadline_ends_calls_with_deadline_exceeded() {
    let service = EchoServer::default();
    let server = GrpcServer::builder()
        .add_service(service.clone())
        .timeout(Duration::from_millis(300))
        .serve(addr())
        .await
        .unwrap();
    let channel = channel(server.local_addr()).await;
    let slow = EchoRequest {
        sleep_ms: 5_000,
        ..echo("slow")
    };

    // (The caller's own `grpc-timeout` is covered by a unit test of the
    // edge: tonic's client enforces it too and always wins the race.)
    // No deadline from the caller: the server's own applies, with the
    // stable code.
    let status = call(channel.clone(), tonic::Request::new(slow))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert_eq!(error_code(&status), Some("keel.timeout"));
    assert_eq!(status.metadata().get("keel-retryable").unwrap(), "true");
    // The handlers were cancelled, not left running.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(service.completed.load(Ordering::SeqCst), 0);

    let ok = call(channel, tonic::Request::new(echo("fast")))
        .await
        .unwrap();
    assert_eq!(ok.into_inner().text, "fast");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn calls_over_the_concurrency_limit_are_shed_with_a_retry_hint() {
    let server = GrpcServer::builder()
        .add_service(EchoServer::default())
        .concurrency_limit(2)
        .retry_after(Duration::from_millis(250))
        .serve(addr())
        .await
        .unwrap();
    let channel = channel(server.local_addr()).await;
    let slow = EchoRequest {
        sleep_ms: 1_500,
        ..echo("slow")
    };
    let mut busy = JoinSet::new();
    for _ in 0..2 {
        let channel = channel.clone();
        let slow = slow.clone();
        busy.spawn(async move { call(channel, tonic::Request::new(slow)).await });
    }
    // Wait until both hold their permits: then every further call is shed.
    let mut shed = None;
    for _ in 0..100 {
        match call(channel.clone(), tonic::Request::new(echo("extra"))).await {
            Err(status) => {
                shed = Some(status);
                break;
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    let status = shed.expect("a call beyond the limit is shed");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(error_code(&status), Some("keel.resource_exhausted"));
    assert_eq!(status.metadata().get(RETRY_PUSHBACK_KEY).unwrap(), "250");
    assert_eq!(status.metadata().get("keel-retryable").unwrap(), "true");

    while let Some(done) = busy.join_next().await {
        assert_eq!(done.unwrap().unwrap().into_inner().text, "slow");
    }
    // Capacity is back once they finished.
    call(channel, tonic::Request::new(echo("after")))
        .await
        .unwrap();
    server.shutdown().await.unwrap();
}

/// A TCP proxy in front of the shared PostgreSQL that the test can cut:
/// the database "stops" for this test's pool without touching the server.
async fn cuttable_proxy() -> (std::net::SocketAddr, JoinSet<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut tasks = JoinSet::new();
    tasks.spawn(async move {
        let mut links = JoinSet::new();
        while let Ok((mut client, _)) = listener.accept().await {
            links.spawn(async move {
                if let Ok(mut upstream) = TcpStream::connect("127.0.0.1:5432").await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                }
            });
        }
    });
    (addr, tasks)
}

#[tokio::test]
async fn health_turns_not_serving_when_postgres_stops_answering() {
    let (proxy, mut proxy_tasks) = cuttable_proxy().await;
    let db = Database::connect_lazy(
        DatabaseConfig::builder()
            .url(format!("postgres://postgres@{proxy}/postgres"))
            .min_connections(0)
            .max_connections(2)
            .connect_timeout(Duration::from_secs(1))
            .acquire_timeout(Duration::from_secs(1))
            .build()
            .unwrap(),
    );
    let registry = HealthRegistry::builder().cache_ttl(Duration::ZERO).build();
    registry.register_with(
        DatabaseReadiness::new(db),
        CheckOptions::default().timeout(Duration::from_secs(2)),
    );
    let server = GrpcServer::builder()
        .health(registry)
        .serve(addr())
        .await
        .unwrap();
    let mut health = HealthClient::new(channel(server.local_addr()).await);
    let readiness = || HealthCheckRequest {
        service: String::new(),
    };

    let up = health.check(readiness()).await.unwrap().into_inner();
    assert_eq!(up.status, ServingStatus::Serving as i32);

    // Stop the database: the proxy and every connection through it.
    proxy_tasks.shutdown().await;
    let mut status = up.status;
    for _ in 0..50 {
        status = health.check(readiness()).await.unwrap().into_inner().status;
        if status == ServingStatus::NotServing as i32 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, ServingStatus::NotServing as i32);
    // Liveness does not depend on the database.
    let live = health
        .check(HealthCheckRequest {
            service: "liveness".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(live.status, ServingStatus::Serving as i32);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_database_on_a_closed_port_is_not_serving_from_the_start() {
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let db = Database::connect_lazy(
        DatabaseConfig::builder()
            .url(format!("postgres://postgres@127.0.0.1:{port}/postgres"))
            .min_connections(0)
            .connect_timeout(Duration::from_secs(1))
            .acquire_timeout(Duration::from_secs(1))
            .build()
            .unwrap(),
    );
    let registry = HealthRegistry::new();
    registry.register(DatabaseReadiness::new(db));
    let server = GrpcServer::builder()
        .health(registry)
        .serve(addr())
        .await
        .unwrap();
    let mut health = HealthClient::new(channel(server.local_addr()).await);
    let report = health
        .check(HealthCheckRequest {
            service: "readiness".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(report.status, ServingStatus::NotServing as i32);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn reflection_lists_the_described_services() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let server = GrpcServer::builder()
        .health(HealthRegistry::new())
        .reflection(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .authenticate(verifier())
        .serve(addr())
        .await
        .unwrap();
    let mut client = ServerReflectionClient::new(channel(server.local_addr()).await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    // Reflection needs no token either.
    let mut answers = client
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let answer = answers.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
        panic!("unexpected answer {answer:?}");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"grpc.health.v1.Health".to_owned()),
        "{names:?}"
    );
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn shutdown_lets_calls_in_flight_finish_and_refuses_new_connections() {
    let service = EchoServer::default();
    let server = GrpcServer::builder()
        .add_service(service.clone())
        .serve(addr())
        .await
        .unwrap();
    let addr = server.local_addr();
    let channel = channel(addr).await;
    let mut in_flight = JoinSet::new();
    for i in 0..8 {
        let channel = channel.clone();
        in_flight.spawn(async move {
            let request = EchoRequest {
                sleep_ms: 400,
                ..echo(&format!("call {i}"))
            };
            call(channel, tonic::Request::new(request)).await
        });
    }
    while service.calls.load(Ordering::SeqCst) < 8 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    server.shutdown().await.unwrap();
    let mut finished = 0;
    while let Some(done) = in_flight.join_next().await {
        let reply = done.unwrap().expect("a call in flight completes");
        assert!(reply.into_inner().text.starts_with("call "));
        finished += 1;
    }
    assert_eq!(finished, 8);
    assert_eq!(service.completed.load(Ordering::SeqCst), 8);
    // The listener is closed.
    assert!(TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn a_drain_timeout_or_abort_cuts_calls_with_unavailable() {
    for abort in [false, true] {
        let service = EchoServer::default();
        let server = GrpcServer::builder()
            .add_service(service.clone())
            .health(HealthRegistry::new())
            .drain_timeout(Duration::from_millis(200))
            .serve(addr())
            .await
            .unwrap();
        let channel = channel(server.local_addr()).await;
        let stuck = {
            let channel = channel.clone();
            tokio::spawn(async move {
                let request = EchoRequest {
                    sleep_ms: 60_000,
                    ..echo("stuck")
                };
                call(channel, tonic::Request::new(request)).await
            })
        };
        // A health Watch never ends by itself.
        let mut watch = HealthClient::new(channel.clone())
            .watch(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(watch.message().await.unwrap().is_some());
        while service.calls.load(Ordering::SeqCst) < 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if abort {
            server.abort().await.unwrap();
        } else {
            server.shutdown().await.unwrap();
        }
        let status = stuck.await.unwrap().unwrap_err();
        assert_eq!(
            status.code(),
            Code::Unavailable,
            "abort={abort}: {status:?}"
        );
        let end = watch.message().await;
        assert!(
            matches!(&end, Err(s) if s.code() == Code::Unavailable),
            "abort={abort}: {end:?}"
        );
        assert_eq!(service.completed.load(Ordering::SeqCst), 0);
    }
}

#[tokio::test]
async fn dropping_the_handle_stops_the_server() {
    let server = GrpcServer::builder()
        .add_service(EchoServer::default())
        .serve(addr())
        .await
        .unwrap();
    let addr = server.local_addr();
    call(channel(addr).await, tonic::Request::new(echo("x")))
        .await
        .unwrap();
    drop(server);
    let mut closed = false;
    for _ in 0..100 {
        if TcpStream::connect(addr).await.is_err() {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(closed, "the listener is closed after the handle is dropped");
    let _ = Arc::new(());
}

#[tokio::test]
async fn error_code_metadata_key_is_the_documented_one() {
    assert_eq!(ERROR_CODE_KEY, "keel-error-code");
}
