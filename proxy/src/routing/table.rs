//! The immutable routing snapshot built from a [`Config`], and the lock-free cell
//! that holds the current one.
//!
//! Requests read the table through [`arc_swap::ArcSwap`]: a load is a few atomic
//! operations, never a lock, and a new config replaces the table whole while requests
//! that already hold the old one finish with it. Everything a request needs is
//! compiled here once: authorities to services, each service's route matcher, and
//! each route's policy stack.

use crate::{
    config::{Config, Route, Service},
    pool::Pool,
    ratelimit::RateLimiter,
    route::Router,
    stack::{self, Resources, RouteService},
};
use arc_swap::ArcSwap;
use http::Request;
use serde_json::json;
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
};

/// The DNS suffix of services inside the cluster.
const CLUSTER_DOMAIN: &str = "svc.cluster.local";

/// Shared handle to the current table.
pub type SharedTable = Arc<ArcSwap<RouteTable>>;

/// A service as requests see it: its routes, compiled.
pub struct Target {
    /// `name.namespace:port`, the bounded label used in metrics.
    pub label: Arc<str>,
    router: Router,
    routes: Vec<RoutePlan>,
    /// The service's own endpoints, for opaque TCP sent to its cluster IP.
    endpoints: Box<[SocketAddr]>,
    next: AtomicUsize,
}

/// One route: its name for metrics and the stack its requests run through.
pub struct RoutePlan {
    pub name: Arc<str>,
    pub stack: RouteService,
    /// Ring hashing on the source address needs the client's address per request.
    pub needs_client_addr: bool,
}

impl Target {
    /// The route a request takes; `None` is "no route" (404 `NR`).
    pub fn route<B>(&self, req: &Request<B>) -> Option<&RoutePlan> {
        let index = self.router.find(req.method(), req.uri(), req.headers())?;
        self.routes.get(index)
    }

    /// An endpoint for an opaque connection, round robin (no policy applies to
    /// bytes the proxy cannot read).
    pub fn pick_endpoint(&self) -> Option<SocketAddr> {
        if self.endpoints.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        Some(self.endpoints[i % self.endpoints.len()])
    }
}

/// Authorities (as clients write them) to targets, the inbound limits, and the
/// config they came from.
pub struct RouteTable {
    by_authority: HashMap<Box<str>, Arc<Target>>,
    /// Services by cluster IP and port: what an unchanged client dials.
    by_address: HashMap<SocketAddr, Arc<Target>>,
    inbound: HashMap<u16, RateLimiter>,
    pub config: Config,
}

/// A service's routes: its own, or one default route to its endpoints.
fn routes_of(service: &Service) -> Vec<Route> {
    if service.routes.is_empty() {
        vec![Route::default()]
    } else {
        service.routes.clone()
    }
}

fn route_name(route: &Route, index: usize) -> String {
    route.name.clone().unwrap_or_else(|| index.to_string())
}

impl RouteTable {
    /// Compiles a validated config; `pool` carries every route's upstream requests.
    pub fn new(config: Config, pool: &Arc<Pool>) -> Result<RouteTable, String> {
        let resources = Resources {
            pool,
            services: &config.services,
            seed: None,
        };
        let mut by_authority = HashMap::new();
        let mut by_address = HashMap::new();
        for service in &config.services {
            let routes = routes_of(service);
            let router = Router::new(routes.iter().map(|r| r.matches.as_slice()))
                .map_err(|e| format!("service {}: {e}", service.authority()))?;
            let label: Arc<str> = service.authority().into();
            let plans = routes
                .iter()
                .enumerate()
                .map(|(i, route)| {
                    let policy = service.policy.overridden_by(&route.policy);
                    let name: Arc<str> = route_name(route, i).into();
                    RoutePlan {
                        stack: stack::build_route(
                            &resources,
                            service,
                            route,
                            &policy,
                            i,
                            (&label, &name),
                        ),
                        name,
                        needs_client_addr: policy
                            .load_balancer
                            .as_ref()
                            .and_then(|lb| lb.hash_on.as_ref())
                            .is_some_and(|h| h.source_ip),
                    }
                })
                .collect();
            let target = Arc::new(Target {
                label,
                router,
                routes: plans,
                endpoints: service.endpoints.iter().map(|e| e.address).collect(),
                next: AtomicUsize::new(0),
            });
            let port = service.port.get();
            if let Some(ip) = service.cluster_ip {
                by_address.insert(SocketAddr::new(ip, port), target.clone());
            }
            let base = format!("{}.{}", service.name, service.namespace);
            for host in [
                base.clone(),
                format!("{base}.svc"),
                format!("{base}.{CLUSTER_DOMAIN}"),
            ] {
                if port == 80 {
                    by_authority.insert(host.clone().into(), target.clone());
                }
                by_authority.insert(format!("{host}:{port}").into(), target.clone());
            }
        }
        let inbound = config
            .inbound
            .iter()
            .filter_map(|port| {
                let limit = port.rate_limit.as_ref()?;
                Some((port.port.get(), RateLimiter::new(limit)))
            })
            .collect();
        Ok(RouteTable {
            by_authority,
            by_address,
            inbound,
            config,
        })
    }

    /// The named service an authority (`Host` header or `:authority`) refers to.
    pub fn lookup(&self, authority: &str) -> Option<&Arc<Target>> {
        let authority = authority.strip_suffix('.').unwrap_or(authority);
        match self.by_authority.get(authority) {
            Some(target) => Some(target),
            // Hosts are case-insensitive; lowercase only in the rare case that needs it.
            None if authority.bytes().any(|b| b.is_ascii_uppercase()) => self
                .by_authority
                .get(authority.to_ascii_lowercase().as_str()),
            None => None,
        }
    }

    /// The service whose cluster IP and port a client dialled.
    pub fn lookup_addr(&self, addr: &SocketAddr) -> Option<&Arc<Target>> {
        self.by_address.get(addr)
    }

    /// The rate limit on calls to one of the pod's own ports.
    pub fn inbound_limit(&self, port: u16) -> Option<&RateLimiter> {
        self.inbound.get(&port)
    }

    /// The config as it runs: every route with its effective policy (the service's
    /// sections under the route's own, defaults filled in).
    pub fn effective(&self) -> serde_json::Value {
        let services: Vec<_> = self
            .config
            .services
            .iter()
            .map(|service| {
                let routes: Vec<_> = routes_of(service)
                    .iter()
                    .enumerate()
                    .map(|(i, route)| {
                        json!({
                            "name": route_name(route, i),
                            "matches": route.matches,
                            "backends": route.backends,
                            "policy": service.policy.overridden_by(&route.policy),
                        })
                    })
                    .collect();
                json!({
                    "service": service.authority(),
                    "clusterIP": service.cluster_ip,
                    "endpoints": service.endpoints,
                    "routes": routes,
                })
            })
            .collect();
        json!({ "services": services, "inbound": self.config.inbound })
    }
}

/// A table for `config`, shared for lock-free reads.
pub fn shared(config: Config, pool: &Arc<Pool>) -> Result<SharedTable, String> {
    Ok(Arc::new(ArcSwap::from_pointee(RouteTable::new(
        config, pool,
    )?)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn table() -> RouteTable {
        let config = Config::parse(
            "t",
            "services:
  - name: reviews
    namespace: shop
    port: 8080
    endpoints: [{address: 198.18.0.2:8080}, {address: 198.18.0.3:8080}]
    policy: {timeouts: {request: 3s}}
    routes:
      - name: api
        matches: [{path: {value: /api}}]
        policy: {retry: {attempts: 1}}
  - name: web
    port: 80
",
        )
        .unwrap();
        RouteTable::new(config, &Pool::new(Duration::from_secs(1))).unwrap()
    }

    #[tokio::test]
    async fn finds_services_by_every_authority_form() {
        let table = table();
        for authority in [
            "reviews.shop:8080",
            "reviews.shop.svc:8080",
            "reviews.shop.svc.cluster.local:8080",
            "Reviews.Shop:8080",
        ] {
            let target = table.lookup(authority).expect(authority);
            assert_eq!(&*target.label, "reviews.shop:8080");
        }
        assert!(table.lookup("reviews.shop:9090").is_none());
        assert!(table.lookup("reviews:8080").is_none());
        // Port 80 may be left out, as clients do.
        assert!(table.lookup("web.default").is_some());
        assert!(table.lookup("web.default:80").is_some());
    }

    #[tokio::test]
    async fn routes_are_found_and_unmatched_requests_have_none() {
        let table = table();
        let target = table.lookup("reviews.shop:8080").unwrap();
        let req = |path: &str| Request::get(path).body(()).unwrap();
        assert_eq!(&*target.route(&req("/api/x")).unwrap().name, "api");
        assert!(target.route(&req("/other")).is_none());
        // A service without routes has one route that takes everything.
        let web = table.lookup("web.default").unwrap();
        assert_eq!(&*web.route(&req("/anything")).unwrap().name, "0");
    }

    #[tokio::test]
    async fn effective_policy_fills_defaults_and_merges_service_policy() {
        let dump = table().effective();
        let policy = &dump["services"][0]["routes"][0]["policy"];
        assert_eq!(policy["timeouts"]["request"], "3s", "from the service");
        assert_eq!(policy["retry"]["attempts"], 1, "from the route");
        assert_eq!(
            policy["retry"]["backoff"]["base"], "25ms",
            "default filled in"
        );
        assert_eq!(policy["retry"]["budget"]["percent"], 20.0);
    }
}
