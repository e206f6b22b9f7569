//! Dispatch by service name (`/<package.Service>/<Method>`), without
//! tonic's axum-based router.

use std::collections::HashMap;
use std::convert::Infallible;

use http::{Request, Response};
use tonic::Status;
use tonic::body::Body;
use tonic::server::NamedService;
use tower::ServiceExt as _;
use tower::util::BoxCloneSyncService;

/// A service the server routes to.
pub(crate) type RouteService = BoxCloneSyncService<Request<Body>, Response<Body>, Infallible>;

/// The services of a server, by their fully qualified names.
#[derive(Clone, Default)]
pub(crate) struct Router {
    services: HashMap<&'static str, RouteService>,
}

impl Router {
    pub(crate) fn add<S>(&mut self, service: S)
    where
        S: tower::Service<Request<Body>, Response = Response<Body>, Error = Infallible>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        self.services
            .insert(S::NAME, BoxCloneSyncService::new(service));
    }

    pub(crate) fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.services.keys().copied()
    }

    /// Calls the service the path names; `UNIMPLEMENTED` when none does.
    pub(crate) async fn call(&self, request: Request<Body>) -> Response<Body> {
        let service = service_name(request.uri().path()).and_then(|n| self.services.get(n));
        match service {
            Some(service) => match service.clone().oneshot(request).await {
                Ok(response) => response,
                Err(never) => match never {},
            },
            None => Status::unimplemented(format!("no service answers {}", request.uri().path()))
                .into_http(),
        }
    }
}

/// `package.Service` from `/package.Service/Method`.
pub(crate) fn service_name(path: &str) -> Option<&str> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    (!service.is_empty() && !method.is_empty() && !method.contains('/')).then_some(service)
}

#[cfg(test)]
mod tests {
    use super::service_name;

    #[test]
    fn service_names_come_from_well_formed_paths_only() {
        assert_eq!(
            service_name("/grpc.health.v1.Health/Check"),
            Some("grpc.health.v1.Health")
        );
        for bad in ["", "/", "//Check", "/svc/", "/svc", "svc/m", "/svc/m/extra"] {
            assert_eq!(service_name(bad), None, "{bad}");
        }
    }
}
