//! A real tonic server on a loopback port running the example Ordering
//! service, recording what each call carried and counting the TCP
//! connections it accepted.

#![allow(dead_code, unreachable_pub)] // each test binary uses part of it

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use api::ordering_service_server::{OrderingService, OrderingServiceServer};
use keel_grpc::proto::examples::ordering::v1 as api;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

/// What one call carried.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: &'static str,
    pub authorization: Option<String>,
    pub traceparent: Option<String>,
    pub grpc_timeout: Option<String>,
}

/// Shared between the test and the service; survives server restarts.
#[derive(Debug, Default)]
pub struct Recorder {
    pub attempts_get: AtomicU32,
    pub attempts_place: AtomicU32,
    pub attempts_cancel: AtomicU32,
    /// Fail this many more GetOrder calls with UNAVAILABLE.
    pub fail_gets: AtomicU32,
    /// Fail this many more PlaceOrder calls with UNAVAILABLE.
    pub fail_places: AtomicU32,
    pub seen: Mutex<Vec<Seen>>,
}

impl Recorder {
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn record<T>(&self, method: &'static str, request: &Request<T>) {
        let header = |name: &str| {
            request
                .metadata()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        self.seen.lock().unwrap().push(Seen {
            method,
            authorization: header("authorization"),
            traceparent: header("traceparent"),
            grpc_timeout: header("grpc-timeout"),
        });
    }
}

fn take_one(counter: &AtomicU32) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

struct Ordering_(Arc<Recorder>);

#[tonic::async_trait]
impl OrderingService for Ordering_ {
    async fn place_order(
        &self,
        request: Request<api::PlaceOrderRequest>,
    ) -> Result<Response<api::PlaceOrderResponse>, Status> {
        self.0.record("place", &request);
        self.0.attempts_place.fetch_add(1, Ordering::SeqCst);
        if take_one(&self.0.fail_places) {
            return Err(Status::unavailable("try again"));
        }
        Ok(Response::new(api::PlaceOrderResponse {
            order_id: format!("order-for-{}", request.get_ref().request_id),
            version: 1,
            total: None,
        }))
    }

    async fn pay_order(
        &self,
        request: Request<api::PayOrderRequest>,
    ) -> Result<Response<api::PayOrderResponse>, Status> {
        // The slow handler: longer than any deadline the tests give.
        self.0.record("pay", &request);
        tokio::time::sleep(Duration::from_secs(30)).await;
        Ok(Response::new(api::PayOrderResponse { version: 2 }))
    }

    async fn cancel_order(
        &self,
        request: Request<api::CancelOrderRequest>,
    ) -> Result<Response<api::CancelOrderResponse>, Status> {
        self.0.record("cancel", &request);
        self.0.attempts_cancel.fetch_add(1, Ordering::SeqCst);
        if request.get_ref().reason.is_empty() {
            return Err(Status::invalid_argument("a cancellation needs a reason"));
        }
        Ok(Response::new(api::CancelOrderResponse { version: 3 }))
    }

    async fn get_order(
        &self,
        request: Request<api::GetOrderRequest>,
    ) -> Result<Response<api::GetOrderResponse>, Status> {
        self.0.record("get", &request);
        self.0.attempts_get.fetch_add(1, Ordering::SeqCst);
        if take_one(&self.0.fail_gets) {
            return Err(Status::unavailable("try again"));
        }
        Ok(Response::new(api::GetOrderResponse {
            order: Some(api::Order {
                order_id: request.into_inner().order_id,
                ..Default::default()
            }),
        }))
    }
}

/// A running server; `stop` shuts it down and waits until it is gone.
pub struct TestServer {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl TestServer {
    /// Serves on a fresh loopback port.
    pub async fn start(recorder: Arc<Recorder>) -> Self {
        Self::serve(TcpListener::bind("127.0.0.1:0").await.unwrap(), recorder)
    }

    /// Serves on `addr` again (after a restart).
    pub async fn restart(addr: SocketAddr, recorder: Arc<Recorder>) -> Self {
        Self::serve(TcpListener::bind(addr).await.unwrap(), recorder)
    }

    fn serve(listener: TcpListener, recorder: Arc<Recorder>) -> Self {
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        let incoming = TcpListenerStream::new(listener).map(move |conn| {
            if conn.is_ok() {
                counter.fetch_add(1, Ordering::SeqCst);
            }
            conn
        });
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(OrderingServiceServer::new(Ordering_(recorder)))
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        Self {
            addr,
            accepted,
            stop,
            task,
        }
    }

    pub fn uri(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    pub async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap();
    }
}
