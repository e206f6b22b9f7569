//! Channel settings and targets.

use std::time::Duration;

use http::Uri;

use super::error::ClientError;

/// How long connecting to an endpoint may take by default.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The deadline a call gets by default when the caller set none.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How often an HTTP/2 ping checks the connection by default.
pub const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// How long a keepalive ping may go unanswered by default before the
/// connection is dropped (and re-established on the next call).
pub const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// How the channels of a [`ChannelFactory`](super::ChannelFactory) connect
/// and time out.
///
/// ```
/// use std::time::Duration;
/// use keel_grpc::client::ChannelConfig;
///
/// let config = ChannelConfig::new()
///     .with_connect_timeout(Duration::from_secs(2))
///     .with_request_timeout(Some(Duration::from_secs(10)));
/// assert_eq!(config.request_timeout(), Some(Duration::from_secs(10)));
/// assert!(ChannelConfig::new().with_connect_timeout(Duration::ZERO).validate().is_err());
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChannelConfig {
    connect_timeout: Duration,
    request_timeout: Option<Duration>,
    keepalive_interval: Option<Duration>,
    keepalive_timeout: Duration,
    keepalive_while_idle: bool,
    tcp_keepalive: Option<Duration>,
    user_agent: Option<String>,
}

impl Default for ChannelConfig {
    fn default() -> Self {
        Self::new()
    }
}

impl ChannelConfig {
    /// The defaults: connect within [`DEFAULT_CONNECT_TIMEOUT`], calls
    /// without a deadline get [`DEFAULT_REQUEST_TIMEOUT`], HTTP/2 keepalive
    /// pings every [`DEFAULT_KEEPALIVE_INTERVAL`] (also while idle)
    /// answered within [`DEFAULT_KEEPALIVE_TIMEOUT`], TCP keepalive every
    /// 60 s.
    #[must_use]
    pub fn new() -> Self {
        Self {
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            request_timeout: Some(DEFAULT_REQUEST_TIMEOUT),
            keepalive_interval: Some(DEFAULT_KEEPALIVE_INTERVAL),
            keepalive_timeout: DEFAULT_KEEPALIVE_TIMEOUT,
            keepalive_while_idle: true,
            tcp_keepalive: Some(Duration::from_secs(60)),
            user_agent: None,
        }
    }

    /// How long connecting (TCP and HTTP/2 handshake) may take; a call
    /// that needs a connection fails with `UNAVAILABLE` after it.
    #[must_use]
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// The deadline of calls whose request sets none
    /// (`tonic::Request::set_timeout` wins). It travels to the server as
    /// `grpc-timeout`, and the call ends with `DEADLINE_EXCEEDED` when it
    /// passes. `None` leaves such calls without a deadline.
    #[must_use]
    pub fn with_request_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// HTTP/2 keepalive: a ping every `interval` (`None` for none), and
    /// the connection dropped when one goes unanswered for `timeout`.
    /// Keepalive finds dead connections (a peer that vanished without a
    /// FIN) before a call has to.
    #[must_use]
    pub fn with_keepalive(mut self, interval: Option<Duration>, timeout: Duration) -> Self {
        self.keepalive_interval = interval;
        self.keepalive_timeout = timeout;
        self
    }

    /// Whether keepalive pings also go out on connections with no call in
    /// flight (default on; servers must allow it, tonic's do).
    #[must_use]
    pub fn with_keepalive_while_idle(mut self, on: bool) -> Self {
        self.keepalive_while_idle = on;
        self
    }

    /// TCP keepalive probes on the socket (`None` for off).
    #[must_use]
    pub fn with_tcp_keepalive(mut self, interval: Option<Duration>) -> Self {
        self.tcp_keepalive = interval;
        self
    }

    /// The `user-agent` the calls carry (tonic's own by default).
    #[must_use]
    pub fn with_user_agent(mut self, agent: impl Into<String>) -> Self {
        self.user_agent = Some(agent.into());
        self
    }

    /// The connect timeout.
    #[must_use]
    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// The default call deadline.
    #[must_use]
    pub fn request_timeout(&self) -> Option<Duration> {
        self.request_timeout
    }

    /// Checks every setting.
    ///
    /// # Errors
    ///
    /// [`ClientError::InvalidConfig`] for a zero timeout or interval, or a
    /// user agent that is not a valid header value.
    pub fn validate(&self) -> Result<(), ClientError> {
        let positive = |field, d: Duration| {
            if d.is_zero() {
                Err(ClientError::config(field, "must be more than zero"))
            } else {
                Ok(())
            }
        };
        positive("connect_timeout", self.connect_timeout)?;
        positive("keepalive_timeout", self.keepalive_timeout)?;
        if let Some(d) = self.request_timeout {
            positive("request_timeout", d)?;
        }
        if let Some(d) = self.keepalive_interval {
            positive("keepalive_interval", d)?;
        }
        if let Some(d) = self.tcp_keepalive {
            positive("tcp_keepalive", d)?;
        }
        if let Some(agent) = &self.user_agent
            && http::HeaderValue::try_from(agent.as_str()).is_err()
        {
            return Err(ClientError::config(
                "user_agent",
                "is not a valid header value",
            ));
        }
        Ok(())
    }

    /// A tonic endpoint for `uri` with these settings.
    pub(crate) fn endpoint(&self, uri: &Uri) -> Result<tonic::transport::Endpoint, ClientError> {
        let mut endpoint = tonic::transport::Endpoint::from(uri.clone())
            .connect_timeout(self.connect_timeout)
            .keep_alive_timeout(self.keepalive_timeout)
            .keep_alive_while_idle(self.keepalive_while_idle)
            .tcp_keepalive(self.tcp_keepalive)
            .tcp_nodelay(true);
        if let Some(interval) = self.keepalive_interval {
            endpoint = endpoint.http2_keep_alive_interval(interval);
        }
        if let Some(agent) = &self.user_agent {
            endpoint = endpoint
                .user_agent(agent.as_str())
                .map_err(|_| ClientError::config("user_agent", "is not a valid header value"))?;
        }
        Ok(endpoint)
    }
}

/// Where calls go: one endpoint, or several that share the load.
///
/// Endpoints are `http://host:port` URIs (TLS is left to the platform's
/// mesh or a sidecar for now). Two targets with the same endpoints, in
/// any order, are the same target and share one channel.
///
/// ```
/// use keel_grpc::client::Target;
///
/// let one = Target::new("http://ordering:50051")?;
/// let both = Target::balanced(["http://10.0.0.2:50051", "http://10.0.0.1:50051"])?;
/// assert_eq!(both, Target::balanced(["http://10.0.0.1:50051", "http://10.0.0.2:50051"])?);
/// assert_eq!(one.endpoints().len(), 1);
/// assert!(Target::new("ordering:50051").is_err());
/// assert!(Target::balanced(Vec::<String>::new()).is_err());
/// # Ok::<(), keel_grpc::client::ClientError>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Target {
    endpoints: Vec<Uri>,
}

impl Target {
    /// Calls to one endpoint.
    ///
    /// # Errors
    ///
    /// [`ClientError::InvalidTarget`] when `uri` is not an `http://` URI
    /// with a host and nothing after the authority.
    pub fn new(uri: impl AsRef<str>) -> Result<Self, ClientError> {
        Ok(Self {
            endpoints: vec![parse_endpoint(uri.as_ref())?],
        })
    }

    /// Calls balanced over several endpoints (duplicates count once).
    ///
    /// # Errors
    ///
    /// [`ClientError::InvalidTarget`] for an empty list or any invalid
    /// endpoint.
    pub fn balanced<I>(uris: I) -> Result<Self, ClientError>
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        let mut endpoints = uris
            .into_iter()
            .map(|u| parse_endpoint(u.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        if endpoints.is_empty() {
            return Err(ClientError::target("", "no endpoints"));
        }
        endpoints.sort_by_key(ToString::to_string);
        endpoints.dedup();
        Ok(Self { endpoints })
    }

    /// The endpoints, sorted.
    #[must_use]
    pub fn endpoints(&self) -> &[Uri] {
        &self.endpoints
    }
}

fn parse_endpoint(text: &str) -> Result<Uri, ClientError> {
    let uri: Uri = text
        .parse()
        .map_err(|e: http::uri::InvalidUri| ClientError::target(text, e.to_string()))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(ClientError::target(
                text,
                "https endpoints are not supported yet; terminate TLS in the mesh or a sidecar",
            ));
        }
        _ => return Err(ClientError::target(text, "the scheme must be http://")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(ClientError::target(text, "no host"));
    }
    if uri.path_and_query().is_some_and(|p| p.as_str() != "/") {
        return Err(ClientError::target(
            text,
            "a gRPC endpoint has no path or query",
        ));
    }
    Ok(uri)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_unusable_endpoints() {
        for bad in [
            "",
            "ordering:50051",
            "ftp://ordering:50051",
            "https://ordering:50051",
            "http://",
            "http://ordering:50051/orders",
            "http://ordering:50051/?x=1",
            "http://order ing:1",
        ] {
            assert!(
                matches!(Target::new(bad), Err(ClientError::InvalidTarget { .. })),
                "{bad:?}"
            );
        }
        assert!(Target::new("http://127.0.0.1:50051").is_ok());
        assert!(Target::new("http://[::1]:50051/").is_ok());
        let long = format!("http://{}", "a".repeat(1000));
        if let Err(ClientError::InvalidTarget { target, .. }) = Target::new(format!("{long}/x")) {
            assert!(target.len() <= 200);
        }
    }

    #[test]
    fn balanced_targets_ignore_order_and_duplicates() {
        let a = Target::balanced(["http://b:1", "http://a:1", "http://a:1"]).unwrap();
        assert_eq!(a.endpoints().len(), 2);
        assert_eq!(a, Target::balanced(["http://a:1", "http://b:1"]).unwrap());
    }

    #[test]
    fn refuses_zero_durations() {
        let c = ChannelConfig::new();
        assert!(c.validate().is_ok());
        for bad in [
            c.clone().with_connect_timeout(Duration::ZERO),
            c.clone().with_request_timeout(Some(Duration::ZERO)),
            c.clone()
                .with_keepalive(Some(Duration::ZERO), Duration::from_secs(1)),
            c.clone().with_keepalive(None, Duration::ZERO),
            c.clone().with_tcp_keepalive(Some(Duration::ZERO)),
            c.clone().with_user_agent("bad\nagent"),
        ] {
            assert!(
                matches!(bad.validate(), Err(ClientError::InvalidConfig { .. })),
                "{bad:?}"
            );
        }
    }
}
