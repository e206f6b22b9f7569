//! One shared channel per target.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use tonic::Status;
use tonic::transport::Channel;
use tower::Layer as _;

use super::config::{ChannelConfig, Target};
use super::error::ClientError;
use super::layer::{CallContext, CallContextLayer};
use super::retry::{Idempotency, Retrier, RetryPolicy};
use super::token::TokenSource;

/// The channel type a factory hands out: a shared tonic [`Channel`] behind
/// the [`CallContextLayer`]. Cheap to clone; generated tonic clients take
/// it where they take a `Channel`.
pub type KeelChannel = CallContext<Channel>;

/// Hands out one shared channel per [`Target`], so every client of a
/// service talks over the same HTTP/2 connection (one per endpoint), with
/// the same keepalive, timeouts and caller context.
///
/// * Channels connect lazily, on the first call, and reconnect by
///   themselves after the connection is lost (a server restart, a dropped
///   socket): the next call dials again.
/// * A target with several endpoints balances calls over them
///   (power of two choices over the ready ones); an endpoint that is down
///   is left out until it reconnects.
/// * Every call carries the caller's trace context, the factory's bearer
///   token and, when it set none, the default deadline (see
///   [`CallContextLayer`]).
/// * [`client`](Self::client) adds retries for idempotent calls, with one
///   retry budget per target.
///
/// Build one factory in the composition root and share it (it is cheap to
/// clone). Channels need a Tokio runtime: ask for them from inside one.
///
/// ```no_run
/// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
/// use std::sync::Arc;
/// use keel_grpc::client::{ChannelConfig, ChannelFactory, Idempotency, StaticToken, Target};
/// use keel_grpc::proto::examples::ordering::v1::GetOrderRequest;
/// use keel_grpc::proto::examples::ordering::v1::ordering_service_client::OrderingServiceClient;
///
/// let factory = ChannelFactory::new(ChannelConfig::new())?
///     .with_token_source(Arc::new(StaticToken::new("service-token")));
/// let ordering = factory.client(&Target::new("http://ordering:50051")?)?;
///
/// let order = ordering
///     .call(Idempotency::Idempotent, |channel| async move {
///         let request = GetOrderRequest { order_id: "o-42".into() };
///         OrderingServiceClient::new(channel).get_order(request).await
///     })
///     .await?;
/// # let _ = order; Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct ChannelFactory {
    config: ChannelConfig,
    retry: RetryPolicy,
    layer: CallContextLayer,
    shared: Arc<Mutex<HashMap<Target, Shared>>>,
}

#[derive(Clone, Debug)]
struct Shared {
    channel: Channel,
    retrier: Retrier,
}

impl ChannelFactory {
    /// A factory whose channels use `config`, with the default
    /// [`RetryPolicy`] and no bearer token.
    ///
    /// # Errors
    ///
    /// [`ClientError::InvalidConfig`] when `config` does not
    /// [validate](ChannelConfig::validate).
    pub fn new(config: ChannelConfig) -> Result<Self, ClientError> {
        config.validate()?;
        let layer = CallContextLayer::new().with_default_timeout(config.request_timeout());
        Ok(Self {
            config,
            retry: RetryPolicy::new(),
            layer,
            shared: Arc::default(),
        })
    }

    /// Puts a bearer token from `source` on every call of this factory's
    /// channels.
    #[must_use]
    pub fn with_token_source(mut self, source: Arc<dyn TokenSource>) -> Self {
        self.layer = self.layer.with_token_source(source);
        self
    }

    /// Retries idempotent calls of [`client`](Self::client)s under
    /// `policy`.
    ///
    /// # Errors
    ///
    /// [`ClientError::InvalidConfig`] when `policy` does not
    /// [validate](RetryPolicy::validate).
    pub fn with_retry_policy(mut self, policy: RetryPolicy) -> Result<Self, ClientError> {
        policy.validate()?;
        self.retry = policy;
        Ok(self)
    }

    /// The settings.
    #[must_use]
    pub fn config(&self) -> &ChannelConfig {
        &self.config
    }

    /// The shared channel to `target`, created on first use.
    ///
    /// # Errors
    ///
    /// [`ClientError::InvalidConfig`] when the settings cannot make an
    /// endpoint (never for a validated config in practice).
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime (tonic spawns the connection's task).
    pub fn channel(&self, target: &Target) -> Result<KeelChannel, ClientError> {
        Ok(self.layer.layer(self.shared(target)?.channel))
    }

    /// A client for `target`: its shared channel and the target's retry
    /// budget.
    ///
    /// # Errors
    ///
    /// As [`channel`](Self::channel).
    pub fn client(&self, target: &Target) -> Result<GrpcClient, ClientError> {
        let shared = self.shared(target)?;
        Ok(GrpcClient {
            channel: self.layer.layer(shared.channel),
            retrier: shared.retrier,
        })
    }

    /// How many targets have a channel.
    #[must_use]
    pub fn channel_count(&self) -> usize {
        lock(&self.shared).len()
    }

    fn shared(&self, target: &Target) -> Result<Shared, ClientError> {
        let mut shared = lock(&self.shared);
        if let Some(s) = shared.get(target) {
            return Ok(s.clone());
        }
        let endpoints = target
            .endpoints()
            .iter()
            .map(|uri| self.config.endpoint(uri))
            .collect::<Result<Vec<_>, _>>()?;
        let channel = match endpoints.as_slice() {
            [one] => one.connect_lazy(),
            _ => Channel::balance_list(endpoints.into_iter()),
        };
        let s = Shared {
            channel,
            retrier: Retrier::new(self.retry.clone())?,
        };
        shared.insert(target.clone(), s.clone());
        Ok(s)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The map is only read or extended by one insert; a panic elsewhere
    // cannot leave it half-written.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A target's shared channel with its retry budget, from
/// [`ChannelFactory::client`]. Cheap to clone.
#[derive(Clone, Debug)]
pub struct GrpcClient {
    channel: KeelChannel,
    retrier: Retrier,
}

impl GrpcClient {
    /// The channel, for calls that need no retry logic (streams, or a
    /// generated client kept around).
    #[must_use]
    pub fn channel(&self) -> KeelChannel {
        self.channel.clone()
    }

    /// Makes a call, retried under the factory's policy when `idempotency`
    /// says it is safe (see [`Retrier::call`]). `call` gets a clone of the
    /// channel for each attempt and builds the request afresh.
    ///
    /// # Errors
    ///
    /// The last attempt's status.
    pub async fn call<T, F, Fut>(&self, idempotency: Idempotency, mut call: F) -> Result<T, Status>
    where
        F: FnMut(KeelChannel) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        self.retrier
            .call(idempotency, |_| call(self.channel.clone()))
            .await
    }
}
