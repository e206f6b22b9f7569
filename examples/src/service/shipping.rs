//! The Shipping service: shipments in a keel-repository table, fed by
//! Ordering's events through the inbox, served over gRPC
//! (`examples.shipping.v1.ShippingService`).
//!
//! Each order event is handled once in effect: the inbox mark, the
//! shipment's row and the outbox row of `shipment.dispatched` commit in one
//! transaction ([`crate::contexts::shipping`], the code the tour runs). The
//! outbox relay publishes to `shipping.shipments`. Reads go through
//! keel-cache; `SearchShipments` reads the search read model
//! ([`crate::contexts::search`]).

use std::sync::Arc;
use std::time::Duration;

use keel_config::KeelConfig;
use keel_grpc::proto::examples::ordering::v1 as ordering_api;
use keel_grpc::proto::examples::shipping::v1 as api;
use keel_grpc::status_from_error;
use keel_search::{InMemoryEngine, SearchEngine};
use serde::Deserialize;
use shipping_domain::{Shipment, ShipmentStatus};
use tonic::{Request, Response, Status};
use tracing::info;

use super::{AuthSettings, Backends, Lifecycle, ScopePolicy, section, shutdown_signal, verifier};
use crate::contexts::ordering::ORDERS_TOPIC;
use crate::contexts::search::{ShipmentDocument, ShipmentSearch};
use crate::contexts::shipping::{CONSUMER, SHIPMENTS_TOPIC, Shipping, ShippingWiring};

/// The service's name.
pub const SERVICE: &str = "shipping-service";
/// Where it listens unless `grpc.address` says otherwise.
pub const DEFAULT_ADDRESS: &str = "127.0.0.1:50052";
/// The variable naming a Meilisearch server for the search read model.
pub const MEILISEARCH_URL_VAR: &str = "MEILISEARCH_URL";
/// The variable holding that server's API key.
pub const MEILISEARCH_KEY_VAR: &str = "MEILISEARCH_KEY";

/// The `shipping` section.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShippingSettings {
    /// Accept `order.paid` of schema version 2: the fix for the poison
    /// message, deployed.
    pub accept_schema_v2: bool,
}

/// The scopes of Shipping's reads and commands.
#[must_use]
pub fn policy() -> ScopePolicy {
    let method = |m: &str| format!("/examples.shipping.v1.ShippingService/{m}");
    let rules = [
        ("GetShipment", "shipments:read"),
        ("SearchShipments", "shipments:read"),
        ("GetStock", "shipments:read"),
        ("ShipOrder", "shipments:write"),
        ("RestockItem", "shipments:write"),
    ]
    .map(|(m, s)| (method(m), s));
    ScopePolicy::new(rules.iter().map(|(m, s)| (m.as_str(), *s)))
}

/// Runs the Shipping service until SIGTERM or SIGINT.
///
/// # Errors
///
/// A configuration or backend problem at start, or a failing shutdown.
#[allow(clippy::needless_pass_by_value)] // the process hands its configuration over for good
pub async fn run(config: KeelConfig) -> crate::Result {
    let telemetry = keel_telemetry::init(config.telemetry_config())?;
    let settings: ShippingSettings = section(&config, "shipping")?;
    let auth: AuthSettings = section(&config, "auth")?;
    let verifier = verifier(&config, &auth)?;
    let lifecycle = Lifecycle::new();

    let mut backends = Backends::connect(
        &config,
        &[&keel_outbox::MIGRATIONS, &keel_security::MIGRATIONS],
    )
    .await?;
    backends.health.register(lifecycle.check());

    let index_name = format!(
        "{}shipments",
        config.eventbus.name_prefix.as_deref().unwrap_or("")
    )
    .replace(
        |c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'),
        "_",
    );
    let engine: Arc<dyn SearchEngine> = match std::env::var(MEILISEARCH_URL_VAR)
        .ok()
        .filter(|u| !u.trim().is_empty())
    {
        Some(url) => {
            let key = std::env::var(MEILISEARCH_KEY_VAR)
                .ok()
                .map(keel_security::Secret::new);
            let engine = keel_search::meilisearch::MeilisearchEngine::new(&url, key)?;
            backends.health.register_shared(
                engine.health_check(Duration::from_secs(2)),
                keel_telemetry::health::CheckOptions::new().non_critical(),
            );
            backends
                .described
                .push(format!("meilisearch index {index_name}"));
            Arc::new(engine)
        }
        None => {
            backends.described.push("in-memory search".to_owned());
            Arc::new(InMemoryEngine::new())
        }
    };
    let search = ShipmentSearch::open(engine, &index_name).await?;

    let shipping = Shipping::wire(ShippingWiring {
        run: "service".to_owned(),
        database: backends.database.clone(),
        cache: backends.cache.clone(),
        publisher: backends.bus.clone(),
        search: Some(search.clone()),
        accept_schema_v2: settings.accept_schema_v2,
        relay_poll_interval: Duration::from_millis(50),
    })
    .await?;
    let reindexed = shipping.reindex().await?;
    let subscription = backends
        .bus
        .subscribe(
            ORDERS_TOPIC,
            &config
                .eventbus
                .subscription_config(CONSUMER)
                .with_ordered(true),
            super::traced(shipping.consumer.clone()),
        )
        .await?;

    let shipping = Arc::new(shipping);
    let api = ShippingApi {
        shipping: Arc::clone(&shipping),
        search,
    };
    let server = super::grpc_server(&config, &backends, verifier, policy())
        .add_service(api::shipping_service_server::ShippingServiceServer::new(
            api,
        ))
        .serve(config.grpc.address)
        .await?;
    lifecycle.set_ready(true);
    info!(
        listen = %server.local_addr(),
        backends = %backends.described.join(", "),
        accept_schema_v2 = settings.accept_schema_v2,
        reindexed,
        shipments_topic = SHIPMENTS_TOPIC,
        "{SERVICE} listening on {}",
        server.local_addr()
    );

    let signal = shutdown_signal().await?;
    info!(signal, "{SERVICE} stopping");
    lifecycle.set_ready(false);
    server.shutdown().await?;
    subscription.shutdown().await;
    shipping.shutdown().await;
    backends.close().await;
    info!("{SERVICE} stopped");
    telemetry.shutdown()?;
    Ok(())
}

/// The gRPC API over Shipping's reads.
#[derive(Clone, Debug)]
pub struct ShippingApi {
    shipping: Arc<Shipping>,
    search: ShipmentSearch,
}

fn to_api_status(status: ShipmentStatus) -> api::ShipmentStatus {
    match status {
        ShipmentStatus::AwaitingPayment => api::ShipmentStatus::Unspecified,
        ShipmentStatus::Preparing => api::ShipmentStatus::Preparing,
        ShipmentStatus::Dispatched => api::ShipmentStatus::Dispatched,
        ShipmentStatus::Cancelled => api::ShipmentStatus::Cancelled,
    }
}

fn status_from_name(name: &str) -> api::ShipmentStatus {
    match name {
        "preparing" => api::ShipmentStatus::Preparing,
        "dispatched" => api::ShipmentStatus::Dispatched,
        "cancelled" => api::ShipmentStatus::Cancelled,
        _ => api::ShipmentStatus::Unspecified,
    }
}

fn to_api_shipment(shipment: &Shipment) -> api::Shipment {
    let address = shipment.address();
    api::Shipment {
        shipment_id: shipping_domain::ShipmentId::for_order(shipment.order_id())
            .as_str()
            .to_owned(),
        order_id: shipment.order_id().to_owned(),
        lines: shipment
            .lines()
            .iter()
            .map(|l| ordering_api::OrderLine {
                sku: l.sku.clone(),
                quantity: l.quantity,
                unit_price: None,
            })
            .collect(),
        address: Some(ordering_api::Address {
            name: address.name.clone(),
            lines: address.lines.clone(),
            postal_code: address.postal_code.clone(),
            city: address.city.clone(),
            country_code: address.country_code.clone(),
        }),
        status: to_api_status(shipment.status()) as i32,
        tracking_number: shipment.tracking_number().unwrap_or_default().to_owned(),
        dispatched_at: shipment.dispatched_at().map(|t| prost_types::Timestamp {
            seconds: t.timestamp(),
            nanos: i32::try_from(t.timestamp_subsec_nanos()).unwrap_or(0),
        }),
    }
}

fn to_hit(document: ShipmentDocument) -> api::ShipmentHit {
    api::ShipmentHit {
        status: status_from_name(&document.status) as i32,
        shipment_id: document.id,
        order_id: document.order_id,
        recipient: document.recipient,
        city: document.city,
        skus: document.skus,
        tracking_number: document.tracking_number.unwrap_or_default(),
    }
}

#[tonic::async_trait]
impl api::shipping_service_server::ShippingService for ShippingApi {
    async fn ship_order(
        &self,
        _: Request<api::ShipOrderRequest>,
    ) -> Result<Response<api::ShipOrderResponse>, Status> {
        Err(Status::unimplemented(
            "this Shipping ships paid orders from Ordering's events; there is no manual shipping",
        ))
    }

    async fn get_shipment(
        &self,
        request: Request<api::GetShipmentRequest>,
    ) -> Result<Response<api::GetShipmentResponse>, Status> {
        let order_id = request.into_inner().order_id;
        if order_id.is_empty() {
            return Err(Status::invalid_argument("order_id is required"));
        }
        let shipment = self
            .shipping
            .shipment(&order_id)
            .await
            .map_err(|e| status_from_error(&e))?
            .ok_or_else(|| Status::not_found(format!("no shipment for order {order_id}")))?;
        Ok(Response::new(api::GetShipmentResponse {
            shipment: Some(to_api_shipment(&shipment)),
        }))
    }

    async fn restock_item(
        &self,
        _: Request<api::RestockItemRequest>,
    ) -> Result<Response<api::RestockItemResponse>, Status> {
        Err(Status::unimplemented("this Shipping keeps no stock"))
    }

    async fn get_stock(
        &self,
        _: Request<api::GetStockRequest>,
    ) -> Result<Response<api::GetStockResponse>, Status> {
        Err(Status::unimplemented("this Shipping keeps no stock"))
    }

    async fn search_shipments(
        &self,
        request: Request<api::SearchShipmentsRequest>,
    ) -> Result<Response<api::SearchShipmentsResponse>, Status> {
        let body = request.into_inner();
        let limit = match body.limit {
            0 => 20,
            n @ 1..=1000 => n as usize,
            _ => return Err(Status::invalid_argument("limit must be at most 1000")),
        };
        let status = match api::ShipmentStatus::try_from(body.status) {
            Ok(api::ShipmentStatus::Unspecified) => None,
            Ok(api::ShipmentStatus::Preparing) => Some(ShipmentStatus::Preparing),
            Ok(api::ShipmentStatus::Dispatched) => Some(ShipmentStatus::Dispatched),
            Ok(api::ShipmentStatus::Cancelled) => Some(ShipmentStatus::Cancelled),
            Err(_) => return Err(Status::invalid_argument("unknown status")),
        };
        let hits = self
            .search
            .search(&body.query, status, limit)
            .await
            .map_err(|e| status_from_error(&e.into()))?;
        Ok(Response::new(api::SearchShipmentsResponse {
            hits: hits.into_iter().map(to_hit).collect(),
        }))
    }
}
