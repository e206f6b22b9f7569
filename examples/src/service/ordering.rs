//! The Ordering service: event-sourced orders on the event store (with
//! snapshots), served over gRPC (`examples.ordering.v1.OrderingService`).
//!
//! Commands go through the command pipeline (tracing, audit, the
//! `orders:write` scope, one transaction) into the same handler the tour
//! runs ([`crate::contexts::ordering`]); the caller's `request_id` is the
//! command id, so a retried command is answered from the events it already
//! caused. Order events leave through the event-store relay to
//! `ordering.orders` with the stream id as ordering key; Shipping's
//! `shipment.dispatched` marks orders shipped.

use std::sync::Arc;

use keel_config::KeelConfig;
use keel_core::command::{CommandEnvelope, PipelineError};
use keel_core::{AggregateRepository, CommandId, Metadata, Principal};
use keel_eventstore::{EventStoreBackend, PostgresEventStore};
use keel_grpc::proto::examples::ordering::v1 as api;
use keel_grpc::{status_from_command_error, status_from_error};
use keel_security::pipeline::{
    AuditLayer, AuthenticationLayer, AuthorizationLayer, CommandPipeline, CommandService,
};
use keel_security::{InMemoryAuditLog, JwtVerifier, PgAuditLog};
use keel_telemetry::{CommandTracingLayer, KeelMetrics};
use ordering_domain::{Address, Money, Order, OrderCommand, OrderLine, OrderStatus};
use serde::Deserialize;
use tonic::{Request, Response, Status};
use tower::ServiceExt;
use tracing::info;

use super::{AuthSettings, Backends, Lifecycle, ScopePolicy, section, shutdown_signal, verifier};
use crate::contexts::ordering::{
    ORDERS_TOPIC, OrderOutcome, OrderRequest, Ordering, ShipmentListener,
};
use crate::contexts::shipping::SHIPMENTS_TOPIC;

/// The service's name, and its default listen address.
pub const SERVICE: &str = "ordering-service";
/// Where it listens unless `grpc.address` says otherwise.
pub const DEFAULT_ADDRESS: &str = "127.0.0.1:50051";
/// The subscription name of Ordering's consumer of Shipping's events.
pub const CONSUMER: &str = "ordering";

/// The `ordering` section.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OrderingSettings {
    /// Snapshot an order every this many events.
    pub snapshot_every: u64,
}

impl Default for OrderingSettings {
    fn default() -> Self {
        Self { snapshot_every: 3 }
    }
}

/// The scopes of Ordering's commands and reads.
#[must_use]
pub fn policy() -> ScopePolicy {
    ScopePolicy::new([
        ("order.place", "orders:write"),
        ("order.pay", "orders:write"),
        ("order.cancel", "orders:write"),
        (
            "/examples.ordering.v1.OrderingService/GetOrder",
            "orders:read",
        ),
    ])
}

/// Runs the Ordering service until SIGTERM or SIGINT.
///
/// # Errors
///
/// A configuration or backend problem at start, or a failing shutdown.
#[allow(clippy::needless_pass_by_value)] // the process hands its configuration over for good
pub async fn run(config: KeelConfig) -> crate::Result {
    let telemetry = keel_telemetry::init(config.telemetry_config())?;
    let settings: OrderingSettings = section(&config, "ordering")?;
    let auth: AuthSettings = section(&config, "auth")?;
    let verifier = verifier(&config, &auth)?;
    let lifecycle = Lifecycle::new();

    let backends = Backends::connect(
        &config,
        &[
            &keel_eventstore::MIGRATIONS,
            &keel_outbox::MIGRATIONS,
            &keel_security::MIGRATIONS,
        ],
    )
    .await?;
    backends.health.register(lifecycle.check());
    let (store, audit, transactions): (
        Arc<dyn EventStoreBackend>,
        Arc<dyn keel_core::AuditLog>,
        Arc<dyn keel_core::TransactionSource>,
    ) = match &backends.database {
        Some(db) => {
            let mut audit = PgAuditLog::new(db.pool().clone());
            if let Some(keys) = config.security.audit_keys()? {
                audit = audit.with_keys(keys);
            }
            (
                Arc::new(PostgresEventStore::new(db.pool().clone())),
                Arc::new(audit),
                Arc::new(db.clone()),
            )
        }
        None => (
            Arc::new(keel_eventstore::InMemoryEventStore::new()),
            Arc::new(InMemoryAuditLog::new()),
            Arc::new(keel_core::uow::MemoryTransactions::new()),
        ),
    };

    let ordering = Ordering::start(
        store,
        transactions,
        backends.bus.clone(),
        "ordering-relay",
        &format!("{}-", ordering_domain::AGGREGATE_TYPE),
        settings.snapshot_every,
    )?;
    let ordering = Arc::new(ordering);
    let listener = Arc::new(ShipmentListener::new(&ordering));
    let subscription = backends
        .bus
        .subscribe(
            SHIPMENTS_TOPIC,
            &config.eventbus.subscription_config(CONSUMER),
            super::traced(listener),
        )
        .await?;

    let api = OrderingApi::new(&ordering, audit, verifier.clone());
    let address = config.grpc.address;
    let server = super::grpc_server(&config, &backends, verifier, policy())
        .add_service(api::ordering_service_server::OrderingServiceServer::new(
            api,
        ))
        .serve(address)
        .await?;
    lifecycle.set_ready(true);
    info!(
        listen = %server.local_addr(),
        backends = %backends.described.join(", "),
        orders_topic = ORDERS_TOPIC,
        "{SERVICE} listening on {}",
        server.local_addr()
    );

    let signal = shutdown_signal().await?;
    info!(signal, "{SERVICE} stopping");
    lifecycle.set_ready(false);
    server.shutdown().await?;
    subscription.shutdown().await;
    ordering.shutdown().await?;
    backends.close().await;
    info!("{SERVICE} stopped");
    telemetry.shutdown()?;
    Ok(())
}

/// The gRPC API over Ordering's command service and repository.
#[derive(Clone)]
pub struct OrderingApi {
    commands: CommandService<OrderRequest, OrderOutcome>,
    orders: Arc<dyn AggregateRepository<Order>>,
    ordering: Arc<Ordering>,
}

impl std::fmt::Debug for OrderingApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrderingApi").finish_non_exhaustive()
    }
}

impl OrderingApi {
    /// The API over `ordering`, its commands audited in `audit`.
    #[must_use]
    pub fn new(
        ordering: &Arc<Ordering>,
        audit: Arc<dyn keel_core::AuditLog>,
        verifier: JwtVerifier,
    ) -> Self {
        // The edge verified the token already; the pipeline takes its
        // principal as is and decides the command's scope, so that a
        // refused command is audited too.
        let pipeline = CommandPipeline::new(
            AuditLayer::new(audit).metrics(KeelMetrics::global()),
            AuthenticationLayer::new(verifier).trust_preset_principal(true),
            AuthorizationLayer::new(Arc::new(policy())),
        )
        .outer(CommandTracingLayer::new(KeelMetrics::global()));
        Self {
            commands: pipeline.service(ordering.commands.clone()),
            orders: Arc::clone(&ordering.orders),
            ordering: Arc::clone(ordering),
        }
    }

    async fn command<T>(
        &self,
        request: &Request<T>,
        request_id: &str,
        order_id: String,
        command: OrderCommand,
        expected_version: Option<u64>,
    ) -> Result<OrderOutcome, Status> {
        let command_id: CommandId = request_id
            .parse()
            .map_err(|_| Status::invalid_argument("request_id must be a UUID"))?;
        // A retry of a command that succeeded: answered from its events,
        // nothing recorded again.
        if let Some(version) = self
            .ordering
            .handled_before(&order_id, command_id)
            .await
            .map_err(|e| status_from_error(&e))?
        {
            return Ok(OrderOutcome {
                events: Vec::new(),
                version,
                replayed: true,
            });
        }
        let mut envelope = CommandEnvelope::new(OrderRequest {
            order_id,
            command,
            expected_version,
        })
        .with_metadata(call_metadata(request));
        envelope.command_id = command_id;
        if let Some(principal) = request.extensions().get::<Principal>() {
            envelope = envelope.with_principal(principal.clone());
        }
        let handled = self
            .commands
            .clone()
            .oneshot(envelope)
            .await
            .map_err(|e: PipelineError| status_from_command_error(e))?;
        Ok(handled.output)
    }
}

/// The call's trace context (the server span the edge opened, child of the
/// caller's `traceparent`), for the command's events.
fn call_metadata<T>(_request: &Request<T>) -> Metadata {
    let mut metadata = Metadata::new();
    metadata.trace_context = keel_telemetry::propagation::current_trace_context();
    metadata
}

fn money(m: Option<api::Money>, field: &str) -> Result<Money, Status> {
    let m = m.ok_or_else(|| Status::invalid_argument(format!("{field} is required")))?;
    Ok(Money::new(m.currency_code, m.amount_minor))
}

fn to_api_money(m: &Money) -> api::Money {
    api::Money {
        currency_code: m.currency_code.clone(),
        amount_minor: m.amount_minor,
    }
}

fn to_api_line(l: &OrderLine) -> api::OrderLine {
    api::OrderLine {
        sku: l.sku.clone(),
        quantity: l.quantity,
        unit_price: Some(to_api_money(&l.unit_price)),
    }
}

fn to_api_address(a: &Address) -> api::Address {
    api::Address {
        name: a.name.clone(),
        lines: a.lines.clone(),
        postal_code: a.postal_code.clone(),
        city: a.city.clone(),
        country_code: a.country_code.clone(),
    }
}

fn to_api_status(s: OrderStatus) -> api::OrderStatus {
    match s {
        OrderStatus::New => api::OrderStatus::Unspecified,
        OrderStatus::Placed => api::OrderStatus::Placed,
        OrderStatus::Paid => api::OrderStatus::Paid,
        OrderStatus::Shipped => api::OrderStatus::Shipped,
        OrderStatus::Cancelled => api::OrderStatus::Cancelled,
    }
}

#[tonic::async_trait]
impl api::ordering_service_server::OrderingService for OrderingApi {
    async fn place_order(
        &self,
        request: Request<api::PlaceOrderRequest>,
    ) -> Result<Response<api::PlaceOrderResponse>, Status> {
        let body = request.get_ref().clone();
        let lines = body
            .lines
            .into_iter()
            .map(|l| {
                Ok(OrderLine::new(
                    l.sku,
                    l.quantity,
                    money(l.unit_price, "lines.unit_price")?,
                ))
            })
            .collect::<Result<Vec<_>, Status>>()?;
        let address = body.shipping_address.unwrap_or_default();
        let command = OrderCommand::Place {
            customer_id: body.customer_id,
            lines,
            address: Address {
                name: address.name,
                lines: address.lines,
                postal_code: address.postal_code,
                city: address.city,
                country_code: address.country_code,
            },
        };
        // The request id names the order: placing it again finds it.
        let order_id = body.request_id.clone();
        let outcome = self
            .command(&request, &body.request_id, order_id.clone(), command, None)
            .await?;
        let total = self
            .orders
            .load(&order_id)
            .await
            .map_err(|e| status_from_error(&e))?
            .and_then(|root| root.state().total().map(to_api_money));
        Ok(Response::new(api::PlaceOrderResponse {
            order_id,
            version: outcome.version,
            total,
        }))
    }

    async fn pay_order(
        &self,
        request: Request<api::PayOrderRequest>,
    ) -> Result<Response<api::PayOrderResponse>, Status> {
        let body = request.get_ref().clone();
        let command = OrderCommand::Pay {
            amount: money(body.amount, "amount")?,
            payment_reference: body.payment_reference,
        };
        let outcome = self
            .command(
                &request,
                &body.request_id,
                body.order_id,
                command,
                body.expected_version,
            )
            .await?;
        Ok(Response::new(api::PayOrderResponse {
            version: outcome.version,
        }))
    }

    async fn cancel_order(
        &self,
        request: Request<api::CancelOrderRequest>,
    ) -> Result<Response<api::CancelOrderResponse>, Status> {
        let body = request.get_ref().clone();
        let command = OrderCommand::Cancel {
            reason: body.reason,
        };
        let outcome = self
            .command(
                &request,
                &body.request_id,
                body.order_id,
                command,
                body.expected_version,
            )
            .await?;
        Ok(Response::new(api::CancelOrderResponse {
            version: outcome.version,
        }))
    }

    async fn get_order(
        &self,
        request: Request<api::GetOrderRequest>,
    ) -> Result<Response<api::GetOrderResponse>, Status> {
        let order_id = request.into_inner().order_id;
        if order_id.is_empty() {
            return Err(Status::invalid_argument("order_id is required"));
        }
        let root = self
            .orders
            .load(&order_id)
            .await
            .map_err(|e| status_from_error(&e))?
            .ok_or_else(|| Status::not_found(format!("no order {order_id}")))?;
        let order = root.state();
        Ok(Response::new(api::GetOrderResponse {
            order: Some(api::Order {
                order_id,
                customer_id: order.customer_id().to_owned(),
                lines: order.lines().iter().map(to_api_line).collect(),
                shipping_address: Some(to_api_address(order.address())),
                total: order.total().map(to_api_money),
                status: to_api_status(order.status()) as i32,
                version: root.version().get(),
                placed_at: None,
            }),
        }))
    }
}
