//! Bad input against `GrpcServer`: a malformed protobuf, a message over
//! the limit, garbage metadata, an oversized header block and slow-loris
//! clients. Each gets a typed status or a closed connection, and the
//! server keeps serving others.

mod common;

use std::time::Duration;

use common::*;
use keel_grpc::{GrpcServer, GrpcServerHandle, error_code};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tonic::Code;

async fn server() -> GrpcServerHandle {
    GrpcServer::builder()
        .add_service(EchoServer::default())
        .max_message_size(1024)
        .max_header_list_size(8 * 1024)
        .handshake_timeout(Duration::from_millis(300))
        .keepalive(Duration::from_millis(300), Duration::from_millis(300))
        .serve(addr())
        .await
        .unwrap()
}

/// The server still answers a well-formed call on a new connection.
async fn still_serving(server: &GrpcServerHandle) {
    let reply = call(
        channel(server.local_addr()).await,
        tonic::Request::new(echo("ok")),
    )
    .await
    .unwrap();
    assert_eq!(reply.into_inner().text, "ok");
}

#[tokio::test]
async fn a_malformed_protobuf_is_a_typed_status() {
    let server = server().await;
    let channel = channel(server.local_addr()).await;
    // Field 1 sent as a varint where the server's schema has a string.
    let status = call(channel.clone(), tonic::Request::new(Malformed { text: 7 }))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    assert!(status.message().contains("decode"), "{status:?}");
    // The same connection goes on working.
    call(channel, tonic::Request::new(echo("again")))
        .await
        .unwrap();
    still_serving(&server).await;
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_message_over_the_limit_is_refused_before_it_is_read() {
    let server = server().await;
    let channel = channel(server.local_addr()).await;
    let status = call(
        channel.clone(),
        tonic::Request::new(echo(&"x".repeat(4096))),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(error_code(&status), Some("keel.invalid_input"));
    assert_eq!(status.metadata().get("keel-field").unwrap(), "message");
    // Just under the limit passes.
    let fits = echo(&"y".repeat(1000));
    call(channel, tonic::Request::new(fits)).await.unwrap();
    still_serving(&server).await;
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn garbage_metadata_is_ignored_or_refused_never_fatal() {
    let server = server().await;
    let channel = channel(server.local_addr()).await;
    let mut request = tonic::Request::new(echo("traced?"));
    for (key, value) in [
        ("traceparent", "00-not-a-trace-01"),
        ("tracestate", "=,=,="),
        ("grpc-timeout", "soon"),
    ] {
        request.metadata_mut().insert(key, value.parse().unwrap());
    }
    let reply = call(channel.clone(), request).await.unwrap().into_inner();
    assert_eq!(reply.text, "traced?");
    still_serving(&server).await;
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_oversized_header_block_is_refused_and_the_server_stays_up() {
    let server = server().await;
    let channel = channel(server.local_addr()).await;
    let mut request = tonic::Request::new(echo("big"));
    request
        .metadata_mut()
        .insert("x-padding", "p".repeat(64 * 1024).parse().unwrap());
    let status = call(channel, request).await.unwrap_err();
    assert_ne!(status.code(), Code::Ok);
    still_serving(&server).await;
    server.shutdown().await.unwrap();
}

/// Reads until the server closes the connection; `true` when it did
/// within `limit` (a generous bound, not a timing assertion).
async fn closed_by_server(stream: &mut tokio::net::tcp::OwnedReadHalf, limit: Duration) -> bool {
    let mut buf = [0u8; 1024];
    tokio::time::timeout(limit, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

#[tokio::test]
async fn a_client_that_never_finishes_its_preface_is_disconnected() {
    let server = server().await;
    let stream = TcpStream::connect(server.local_addr()).await.unwrap();
    let (mut read, mut write) = stream.into_split();
    write.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    // ... and nothing more. Meanwhile others are served.
    still_serving(&server).await;
    assert!(closed_by_server(&mut read, Duration::from_secs(20)).await);
    still_serving(&server).await;
    // Shutdown is not held up by the half-open connection.
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_client_that_trickles_a_frame_is_disconnected_by_keepalive() {
    let server = server().await;
    let stream = TcpStream::connect(server.local_addr()).await.unwrap();
    let (mut read, mut write) = stream.into_split();
    // A complete preface and an empty SETTINGS frame, so the handshake
    // deadline no longer applies ...
    write
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    // ... then a HEADERS frame one byte at a time, never acknowledging a
    // ping.
    let trickle = tokio::spawn(async move {
        let frame = b"\x00\x00\x40\x01\x04\x00\x00\x00\x01";
        for byte in frame.iter().cycle().take(400) {
            if write.write_all(&[*byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    still_serving(&server).await;
    assert!(closed_by_server(&mut read, Duration::from_secs(20)).await);
    trickle.abort();
    still_serving(&server).await;
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn random_bytes_instead_of_http2_close_the_connection() {
    let server = server().await;
    let mut stream = TcpStream::connect(server.local_addr()).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\xff\xfe\x00garbage")
        .await
        .unwrap();
    let (mut read, _write) = stream.into_split();
    assert!(closed_by_server(&mut read, Duration::from_secs(20)).await);
    still_serving(&server).await;
    server.shutdown().await.unwrap();
}
