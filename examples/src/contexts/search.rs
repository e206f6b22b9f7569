//! Shipping's search read model: one document per shipment, kept by
//! keel-search (Meilisearch, or the in-memory engine), so that operators
//! can find a shipment by recipient, city, product or tracking number and
//! filter by status.
//!
//! The documents follow the repository: after each committed change the
//! consumer re-reads the shipment and upserts its document, and at start
//! the service re-indexes every stored shipment, so a crash between the
//! commit and the upsert leaves the index stale only until the next start.

use std::sync::Arc;

use keel_search::{
    Filter, IndexSettings, SearchEngine, SearchError, SearchIndex, SearchRequest, Wait,
};
use serde::{Deserialize, Serialize};
use shipping_domain::{Shipment, ShipmentStatus};

/// A shipment as the search index holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShipmentDocument {
    /// The shipment's id (`shp-<order id>`), the primary key.
    pub id: String,
    /// The order it ships.
    pub order_id: String,
    /// `awaiting_payment`, `preparing`, `dispatched` or `cancelled`.
    pub status: String,
    /// The recipient.
    pub recipient: String,
    /// The destination city.
    pub city: String,
    /// The destination country (ISO 3166-1 alpha-2).
    pub country_code: String,
    /// The products shipped.
    pub skus: Vec<String>,
    /// The carrier's tracking number, once dispatched.
    pub tracking_number: Option<String>,
}

/// The status name used in documents and filters.
#[must_use]
pub fn status_name(status: ShipmentStatus) -> &'static str {
    match status {
        ShipmentStatus::AwaitingPayment => "awaiting_payment",
        ShipmentStatus::Preparing => "preparing",
        ShipmentStatus::Dispatched => "dispatched",
        ShipmentStatus::Cancelled => "cancelled",
    }
}

impl ShipmentDocument {
    /// The document of `shipment`.
    #[must_use]
    pub fn of(shipment: &Shipment) -> Self {
        let address = shipment.address();
        Self {
            id: shipping_domain::ShipmentId::for_order(shipment.order_id())
                .as_str()
                .to_owned(),
            order_id: shipment.order_id().to_owned(),
            status: status_name(shipment.status()).to_owned(),
            recipient: address.name.clone(),
            city: address.city.clone(),
            country_code: address.country_code.clone(),
            skus: shipment.lines().iter().map(|l| l.sku.clone()).collect(),
            tracking_number: shipment.tracking_number().map(str::to_owned),
        }
    }
}

/// The shipments index.
#[derive(Clone, Debug)]
pub struct ShipmentSearch {
    index: SearchIndex<ShipmentDocument>,
}

impl ShipmentSearch {
    /// Opens (creating it when missing) the index `name` on `engine`, with
    /// `status`, `order_id` and `country_code` filterable.
    ///
    /// # Errors
    ///
    /// An invalid name, or an engine that refuses or does not answer.
    pub async fn open(engine: Arc<dyn SearchEngine>, name: &str) -> keel_search::Result<Self> {
        let index = SearchIndex::new(engine, name)?;
        match index.create("id", Wait::applied_default()).await {
            Ok(_) | Err(SearchError::IndexAlreadyExists { .. }) => {}
            Err(e) => return Err(e),
        }
        index
            .apply_settings(
                &IndexSettings::new()
                    .searchable(["order_id", "recipient", "city", "skus", "tracking_number"])
                    .filterable(["status", "order_id", "country_code"]),
                Wait::applied_default(),
            )
            .await?;
        Ok(Self { index })
    }

    /// Writes the document of `shipment`, visible to searches on return.
    ///
    /// # Errors
    ///
    /// The engine's.
    pub async fn index(&self, shipment: &Shipment) -> keel_search::Result<()> {
        self.index
            .upsert(&ShipmentDocument::of(shipment), Wait::applied_default())
            .await?;
        Ok(())
    }

    /// Writes the documents of many shipments at once.
    ///
    /// # Errors
    ///
    /// The engine's.
    pub async fn index_many(&self, shipments: &[Shipment]) -> keel_search::Result<()> {
        if shipments.is_empty() {
            return Ok(());
        }
        let documents: Vec<_> = shipments.iter().map(ShipmentDocument::of).collect();
        for chunk in documents.chunks(1000) {
            self.index
                .upsert_many(chunk, Wait::applied_default())
                .await?;
        }
        Ok(())
    }

    /// Shipments matching `text` (every word, the last as a prefix; empty
    /// matches all), optionally only those in `status`, at most `limit`.
    ///
    /// # Errors
    ///
    /// The engine's.
    pub async fn search(
        &self,
        text: &str,
        status: Option<ShipmentStatus>,
        limit: usize,
    ) -> keel_search::Result<Vec<ShipmentDocument>> {
        let mut request = SearchRequest::new(text).offset(0, limit.max(1));
        if let Some(status) = status {
            request = request.filter(Filter::eq("status", status_name(status)));
        }
        let results = self.index.search(&request).await?;
        Ok(results.hits.into_iter().map(|h| h.document).collect())
    }
}
