//! The immutable routing snapshot built from a [`Config`], and the lock-free cell
//! that holds the current one.
//!
//! Requests read the table through [`arc_swap::ArcSwap`]: a load is a few atomic
//! operations, never a lock. Everything a request needs is compiled here once:
//! authorities and cluster IPs to services, each service's route matcher, each
//! route's policy stack, and each destination's balancer and limits.
//!
//! A new config is applied as a diff against the table it replaces
//! ([`RouteTable::next`]): a destination whose service is still there keeps its
//! object, its endpoints updated in place (each remaining endpoint keeps its latency
//! estimate and ejection); a route whose name, backends and effective call policy
//! did not change keeps its stack (its retry budget, its token bucket), even when
//! its matches changed; an inbound port whose limit did not change keeps its
//! bucket. Only what changed starts afresh.

use super::router::Router;
use crate::{
    metrics::RATELIMITED_TOTAL,
    stack::{self, backend::Backend, rate_limit::RateLimit, stage::Stack, RouteLabels},
    upstream::pool::Pool,
};
use arc_swap::ArcSwap;
use foldhash::{HashMap, HashMapExt};
use http::Request;
use serde_json::json;
use std::{net::SocketAddr, sync::Arc};
use trellis_proto::model::authorization::Authorization;
use trellis_proto::model::config::{Config, MtlsMode, Route, Service};
use trellis_proto::model::policy::{Policy, RateLimit as RateLimitConfig};

/// The DNS suffix of services inside the cluster.
const CLUSTER_DOMAIN: &str = "svc.cluster.local";

/// Shared handle to the current table.
pub type SharedTable = Arc<ArcSwap<RouteTable>>;

/// A service as requests addressed to it see it: its routes, compiled.
pub struct Target {
    /// `name.namespace:port`, the bounded label used in metrics.
    pub label: Arc<str>,
    router: Router,
    routes: Box<[Arc<RoutePlan>]>,
}

/// One route: its name for metrics and the stack its requests run through.
pub struct RoutePlan {
    pub name: Arc<str>,
    pub stack: Stack,
    /// Ring hashing on the source address needs the client's address per request.
    pub needs_client_addr: bool,
    /// What the stack was built from, to tell whether a new version may keep it.
    built: Built,
}

/// What a route's stack depends on, beside its name. Not its matches: they only
/// choose the route, and the router holds them.
struct Built {
    policy: Policy,
    backends: Vec<(Arc<Backend>, u32)>,
    max_retries: u32,
    needs_client_addr: bool,
}

/// The same policy and limits, to the same destination objects.
impl PartialEq for Built {
    fn eq(&self, other: &Built) -> bool {
        self.policy == other.policy
            && self.max_retries == other.max_retries
            && self.needs_client_addr == other.needs_client_addr
            && self.backends.len() == other.backends.len()
            && self
                .backends
                .iter()
                .zip(&other.backends)
                .all(|((a, x), (b, y))| Arc::ptr_eq(a, b) && x == y)
    }
}

impl Target {
    /// The route a request takes; `None` is "no route" (404 `NR`).
    pub fn route<B>(&self, req: &Request<B>) -> Option<&Arc<RoutePlan>> {
        let index = self.router.find(req.method(), req.uri(), req.headers())?;
        self.routes.get(index)
    }
}

/// Authorities (as clients write them) to targets, the destinations, the inbound
/// limits, and the config they came from.
pub struct RouteTable {
    by_authority: HashMap<Box<str>, Arc<Target>>,
    /// Services by cluster IP and port: what an unchanged client dials.
    by_address: HashMap<SocketAddr, Arc<Target>>,
    /// Each service's target, and where the service stands in `config`.
    targets: HashMap<Arc<str>, (Arc<Target>, usize)>,
    backends: HashMap<Arc<str>, Arc<Backend>>,
    inbound: HashMap<u16, (RateLimitConfig, Arc<RateLimit>)>,
    pub config: Config,
}

/// The route of a service that names none: everything to its endpoints.
static DEFAULT_ROUTE: std::sync::LazyLock<[Route; 1]> =
    std::sync::LazyLock::new(|| [Route::default()]);

/// A service's routes: its own, or one default route to its endpoints.
fn routes_of(service: &Service) -> &[Route] {
    if service.routes.is_empty() {
        &*DEFAULT_ROUTE
    } else {
        &service.routes
    }
}

fn route_name(route: &Route, index: usize) -> String {
    route.name.clone().unwrap_or_else(|| index.to_string())
}

/// Whether two versions of a service are the same to the requests addressed to it:
/// everything but its endpoints and destination sections (which belong to its
/// [`Backend`]).
fn same_calls(a: &Service, b: &Service) -> bool {
    a.name == b.name
        && a.namespace == b.namespace
        && a.port == b.port
        && a.cluster_ip == b.cluster_ip
        && a.routes == b.routes
        && a.policy.timeouts == b.policy.timeouts
        && a.policy.retry == b.policy.retry
        && a.policy.rate_limit == b.policy.rate_limit
        && a.policy.fault == b.policy.fault
}

impl RouteTable {
    /// Compiles a validated config from nothing; `pool` carries every route's
    /// upstream requests.
    pub fn new(config: Config, pool: &Arc<Pool>) -> Result<RouteTable, String> {
        RouteTable::build(config, pool, None)
    }

    /// Compiles `config` as a change to this table, keeping the state of whatever
    /// it leaves as it was. On error nothing of this table has changed.
    pub fn next(&self, config: Config, pool: &Arc<Pool>) -> Result<RouteTable, String> {
        RouteTable::build(config, pool, Some(self))
    }

    fn build(
        config: Config,
        pool: &Arc<Pool>,
        previous: Option<&RouteTable>,
    ) -> Result<RouteTable, String> {
        // Destinations first: routes send to them. Replacements are only staged
        // here and put in place once nothing can fail any more.
        let mut backends = HashMap::with_capacity(config.services.len());
        let mut replacements = Vec::new();
        for service in &config.services {
            let label: Arc<str> = service.authority().into();
            let policy = service.policy.destination_sections();
            let kept = previous.and_then(|p| p.backends.get(&label));
            let backend = match kept {
                Some(backend) => {
                    let current = backend.current();
                    if !current.is_for(&policy, &service.endpoints) {
                        let next = stack::destination(
                            pool,
                            &label,
                            policy,
                            &service.endpoints,
                            Some(&current),
                        );
                        replacements.push((backend.clone(), next));
                    }
                    backend.clone()
                }
                None => {
                    let destination =
                        stack::destination(pool, &label, policy, &service.endpoints, None);
                    Arc::new(Backend::new(label.clone(), destination))
                }
            };
            backends.insert(label, backend);
        }
        // What a route needs of each destination it sends to, as the destination
        // will be once the replacements are in: its `maxRetries`, and whether it
        // hashes on the client's address.
        let needs_of = |backend: &Arc<Backend>| -> (Option<u32>, bool) {
            let of = |policy: &Policy| {
                let retries = policy.connection_pool.as_ref().map(|p| p.max_retries.0);
                let hash_on = policy
                    .load_balancer
                    .as_ref()
                    .and_then(|lb| lb.hash_on.as_ref());
                (retries, hash_on.is_some_and(|h| h.source_ip))
            };
            match replacements.iter().find(|(b, _)| Arc::ptr_eq(b, backend)) {
                Some((_, destination)) => of(&destination.policy),
                None => of(&backend.current().policy),
            }
        };

        let mut targets = HashMap::with_capacity(config.services.len());
        for (position, service) in config.services.iter().enumerate() {
            let label: Arc<str> = service.authority().into();
            let old = previous.and_then(|p| {
                let (target, at) = p.targets.get(&label)?;
                Some((target, p.config.services.get(*at)?))
            });
            let routes = routes_of(service);
            let mut plans = Vec::with_capacity(routes.len());
            for (i, route) in routes.iter().enumerate() {
                let name: Arc<str> = route_name(route, i).into();
                let mut weighted = Vec::new();
                for backend in backend_refs(service, route) {
                    let Some(target) = backends.get(backend.0.as_str()) else {
                        return Err(format!(
                            "service {label}: route {name}: no service {}",
                            backend.0
                        ));
                    };
                    weighted.push((target.clone(), backend.1));
                }
                let needs: Vec<(Option<u32>, bool)> =
                    weighted.iter().map(|(b, _)| needs_of(b)).collect();
                let built = Built {
                    policy: service.policy.call_sections().overridden_by(&route.policy),
                    max_retries: needs.iter().filter_map(|n| n.0).min().unwrap_or(u32::MAX),
                    needs_client_addr: needs.iter().any(|n| n.1),
                    backends: weighted,
                };
                let same = old.and_then(|(t, _)| {
                    t.routes.iter().find(|p| p.name == name && p.built == built)
                });
                plans.push(match same {
                    Some(plan) => plan.clone(),
                    None => Arc::new(RoutePlan {
                        stack: stack::route(
                            &built.policy,
                            &built.backends,
                            built.max_retries,
                            &RouteLabels {
                                service: &label,
                                route: &name,
                            },
                        ),
                        name,
                        needs_client_addr: built.needs_client_addr,
                        built,
                    }),
                });
            }
            let unchanged = old.filter(|(t, was)| {
                same_calls(was, service)
                    && t.routes.len() == plans.len()
                    && t.routes.iter().zip(&plans).all(|(a, b)| Arc::ptr_eq(a, b))
            });
            let target = match unchanged {
                Some((target, _)) => target.clone(),
                None => {
                    let router = Router::new(routes.iter().map(|r| r.matches.as_slice()))
                        .map_err(|e| format!("service {label}: {e}"))?;
                    Arc::new(Target {
                        label: label.clone(),
                        router,
                        routes: plans.into_boxed_slice(),
                    })
                }
            };
            targets.insert(label, (target, position));
        }

        let mut inbound = HashMap::new();
        for port in &config.inbound {
            let Some(limit) = &port.rate_limit else {
                continue;
            };
            let number = port.port.get();
            let kept = previous
                .and_then(|p| p.inbound.get(&number))
                .filter(|(config, _)| config == limit)
                .map(|(_, limiter)| limiter.clone());
            let limiter = kept.unwrap_or_else(|| {
                let limited = metrics::counter!(RATELIMITED_TOTAL,
                    "direction" => "inbound",
                    "port" => number.to_string(),
                );
                Arc::new(RateLimit::new(limit, limited))
            });
            inbound.insert(number, (limit.clone(), limiter));
        }

        // Nothing below can fail: put the new destinations in place.
        for (backend, destination) in replacements {
            backend.replace(destination);
        }
        let (by_authority, by_address) = index(&config, &targets);
        Ok(RouteTable {
            by_authority,
            by_address,
            targets,
            backends,
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
    pub fn inbound_limit(&self, port: u16) -> Option<&RateLimit> {
        self.inbound.get(&port).map(|(_, limiter)| &**limiter)
    }

    /// What one of the pod's own ports accepts from callers.
    pub fn inbound_mtls(&self, port: u16) -> MtlsMode {
        self.config
            .inbound
            .iter()
            .find(|p| p.port.get() == port)
            .and_then(|p| p.mtls)
            .unwrap_or_default()
    }

    /// Who may call one of the pod's own ports; `None` lets every caller in.
    pub fn inbound_authorization(&self, port: u16) -> Option<&Authorization> {
        self.config
            .inbound
            .iter()
            .find(|p| p.port.get() == port)?
            .authorization
            .as_ref()
    }

    /// A destination by its `name.namespace:port` label.
    pub fn backend(&self, label: &str) -> Option<&Arc<Backend>> {
        self.backends.get(label)
    }

    /// The config as it runs: each service's destination sections, what its
    /// balancer knows of each endpoint (latency estimate, in flight, ejected) and
    /// which are ejected, and every route with its effective call policy (the
    /// service's call sections under the route's own), defaults filled in.
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
                            "policy": service.policy.call_sections().overridden_by(&route.policy),
                        })
                    })
                    .collect();
                let label = service.authority();
                let balancer = self
                    .backends
                    .get(label.as_str())
                    .map(|b| b.current().balancer.clone());
                json!({
                    "service": label,
                    "clusterIP": service.cluster_ip,
                    "endpoints": service.endpoints,
                    "ejected": balancer.as_ref().map(|b| b.ejected()).unwrap_or_default(),
                    "balancer": balancer.map(|b| b.endpoint_states()).unwrap_or_default(),
                    "destination": service.policy.destination_sections(),
                    "routes": routes,
                })
            })
            .collect();
        json!({ "services": services, "inbound": self.config.inbound })
    }
}

/// The backends a route sends to, as (label, weight): its `backends`, or the
/// service itself.
fn backend_refs(service: &Service, route: &Route) -> Vec<(String, u32)> {
    if route.backends.is_empty() {
        return vec![(service.authority(), 1)];
    }
    route
        .backends
        .iter()
        .map(|b| {
            let namespace = b.namespace.as_deref().unwrap_or(&service.namespace);
            (format!("{}.{namespace}:{}", b.name, b.port), b.weight)
        })
        .collect()
}

type Indexes = (
    HashMap<Box<str>, Arc<Target>>,
    HashMap<SocketAddr, Arc<Target>>,
);

/// Every authority form and cluster address of each service.
fn index(config: &Config, targets: &HashMap<Arc<str>, (Arc<Target>, usize)>) -> Indexes {
    let mut by_authority = HashMap::with_capacity(config.services.len() * 4);
    let mut by_address = HashMap::new();
    for service in &config.services {
        let Some((target, _)) = targets.get(service.authority().as_str()) else {
            continue;
        };
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
    (by_authority, by_address)
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
    use crate::stack::balance::outlier::Answer;
    use crate::upstream::request_body::RequestBody;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;
    use tokio::net::TcpListener;

    fn parse(yaml: &str) -> Config {
        crate::config::parse("t", yaml).unwrap()
    }

    fn pool() -> Arc<Pool> {
        Pool::new(Duration::from_secs(1))
    }

    /// A server on loopback that accepts connections, counts them, and closes each
    /// at once: every request sent to it fails with a reset.
    async fn resetting_upstream() -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                drop(stream);
            }
        });
        (addr, accepted)
    }

    fn get(authority: &str) -> crate::upstream::body::Req {
        Request::get(format!("http://{authority}/"))
            .body(RequestBody::Empty)
            .unwrap()
    }

    /// Sends one request through the route `authority`'s requests take.
    async fn send(table: &RouteTable, authority: &str) -> u16 {
        let target = table.lookup(authority).expect(authority);
        let req = get(authority);
        let route = target.route(&req).expect("a route");
        match route.stack.call(req).await {
            Ok(response) => response.status().as_u16(),
            Err(failure) => failure.status.as_u16(),
        }
    }

    fn same_route(a: &RouteTable, b: &RouteTable, authority: &str) -> bool {
        let req = get(authority);
        let route = |t: &RouteTable| Arc::as_ptr(t.lookup(authority).unwrap().route(&req).unwrap());
        std::ptr::eq(route(a), route(b))
    }

    fn table() -> RouteTable {
        let config = parse(
            "services:
  - name: reviews
    namespace: shop
    port: 8080
    endpoints: [{address: 198.18.0.2:8080}, {address: 198.18.0.3:8080}]
    policy: {timeouts: {request: 3s}, outlierDetection: {consecutive5xx: 3}}
    routes:
      - name: api
        matches: [{path: {value: /api}}]
        policy: {retry: {attempts: 1}}
  - name: web
    port: 80
",
        );
        RouteTable::new(config, &pool()).unwrap()
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
        assert!(
            policy.get("outlierDetection").is_none(),
            "a destination section"
        );
        let destination = &dump["services"][0]["destination"];
        assert_eq!(destination["outlierDetection"]["consecutive5xx"], 3);
        assert_eq!(destination["outlierDetection"]["baseEjectionTime"], "30s");
        assert_eq!(dump["services"][0]["ejected"], json!([]));
    }

    const MESH: &str = "services:
  - name: reviews
    port: 8080
    endpoints: [{address: 127.0.0.1:1}]
    routes:
      - name: canary
        backends: [{name: reviews-v2, port: 8080}]
        policy: {retry: {attempts: 1, retryOn: [reset]}}
  - name: reviews-v2
    port: 8080
    endpoints: [{address: 127.0.0.1:2}, {address: 127.0.0.1:3}]
    policy: {outlierDetection: {consecutiveGatewayErrors: 2, maxEjectionPercent: 50}}
  - name: ratings
    port: 9080
";

    #[tokio::test]
    async fn a_push_that_changes_nothing_of_a_route_keeps_its_stack_and_destination() {
        let pool = pool();
        let first = RouteTable::new(parse(MESH), &pool).unwrap();
        let bad: SocketAddr = "127.0.0.1:2".parse().unwrap();
        let v2 = first.backend("reviews-v2.default:8080").unwrap().clone();
        let balancer = v2.current().balancer.clone();
        for _ in 0..2 {
            let pick = balancer
                .pick(None, Some("127.0.0.1:3".parse().unwrap()))
                .unwrap();
            assert_eq!(pick.addr(), bad);
            pick.finish(Answer::GatewayError);
        }
        assert_eq!(balancer.ejected(), vec![bad]);

        // Another service is added: nothing of reviews changes.
        let added = MESH.replace(
            "  - name: ratings\n",
            "  - name: details\n    port: 9080\n  - name: ratings\n",
        );
        let second = first.next(parse(&added), &pool).unwrap();
        assert!(same_route(&first, &second, "reviews.default:8080"));
        let kept = second.backend("reviews-v2.default:8080").unwrap();
        assert!(Arc::ptr_eq(kept, &v2), "the destination is the same object");
        assert_eq!(
            kept.current().balancer.ejected(),
            vec![bad],
            "still ejected"
        );

        // reviews-v2 gains an endpoint: the destination is updated in place.
        let grown = added.replace(
            "{address: 127.0.0.1:3}]",
            "{address: 127.0.0.1:3}, {address: 127.0.0.1:4}]",
        );
        let third = second.next(parse(&grown), &pool).unwrap();
        let kept = third.backend("reviews-v2.default:8080").unwrap();
        assert!(Arc::ptr_eq(kept, &v2));
        assert!(kept.current().balancer.serves(&[
            bad,
            "127.0.0.1:3".parse().unwrap(),
            "127.0.0.1:4".parse().unwrap()
        ]));
        assert_eq!(
            kept.current().balancer.ejected(),
            vec![bad],
            "still ejected"
        );
        assert!(same_route(&second, &third, "reviews.default:8080"));

        // Its outlier policy changes: that destination starts afresh, the route stays.
        let changed = grown.replace("consecutiveGatewayErrors: 2", "consecutiveGatewayErrors: 3");
        let fourth = third.next(parse(&changed), &pool).unwrap();
        assert!(fourth
            .backend("reviews-v2.default:8080")
            .unwrap()
            .current()
            .balancer
            .ejected()
            .is_empty());
        assert!(same_route(&third, &fourth, "reviews.default:8080"));

        // The route's own policy changes: only that route is rebuilt.
        let retried = changed.replace("attempts: 1, retryOn", "attempts: 2, retryOn");
        let fifth = fourth.next(parse(&retried), &pool).unwrap();
        assert!(!same_route(&fourth, &fifth, "reviews.default:8080"));
        assert!(same_route(&fourth, &fifth, "ratings.default:9080"));

        // Only the route's matches change: requests are chosen by the new ones,
        // and the route they reach keeps its stack (its retry budget).
        let narrowed = retried.replace(
            "      - name: canary\n",
            "      - name: canary\n        matches: [{path: {type: PathPrefix, value: /reviews}}]\n",
        );
        let sixth = fifth.next(parse(&narrowed), &pool).unwrap();
        let target = sixth.lookup("reviews.default:8080").unwrap();
        assert!(
            target.route(&get("reviews.default:8080")).is_none(),
            "/ no longer matches"
        );
        let on_path = Request::get("http://reviews.default:8080/reviews/1")
            .body(RequestBody::Empty)
            .unwrap();
        let before = fifth
            .lookup("reviews.default:8080")
            .unwrap()
            .route(&get("reviews.default:8080"));
        assert!(Arc::ptr_eq(
            target.route(&on_path).unwrap(),
            before.unwrap()
        ));
    }

    #[tokio::test]
    async fn a_bad_version_changes_nothing_of_the_running_table() {
        let pool = pool();
        let first = RouteTable::new(parse(MESH), &pool).unwrap();
        let v2 = first.backend("reviews-v2.default:8080").unwrap().clone();
        let before = v2.current();
        // Valid as a config, refused by the route compiler (a regex the
        // loader did not see, since the table is built from the model directly).
        let mut bad = parse(&MESH.replace("{address: 127.0.0.1:3}]", "{address: 127.0.0.1:5}]"));
        Arc::make_mut(&mut bad.services[2]).routes.push(Route {
            matches: vec![
                serde_yaml_ng::from_str("{path: {type: RegularExpression, value: '('}}").unwrap(),
            ],
            ..Route::default()
        });
        assert!(first.next(bad, &pool).is_err());
        assert!(Arc::ptr_eq(&before, &v2.current()), "no endpoint moved");
    }

    #[tokio::test]
    async fn a_spent_retry_budget_stays_spent_across_a_push() {
        let (upstream, attempts) = resetting_upstream().await;
        let config = format!(
            "services:
  - name: down
    port: 80
    endpoints: [{{address: {upstream}}}]
    policy:
      retry: {{attempts: 20, retryOn: [reset], backoff: {{base: 1ms, max: 1ms}}, budget: {{percent: 0, minPerSecond: 1}}}}
"
        );
        let pool = pool();
        let first = RouteTable::new(parse(&config), &pool).unwrap();
        // The budget: 1 a second over its 10 s window, so 10 retries.
        assert_eq!(send(&first, "down.default").await, 502);
        assert_eq!(attempts.load(Ordering::SeqCst), 11);
        let pushed = format!("{config}  - {{name: other, port: 80}}\n");
        let second = first.next(parse(&pushed), &pool).unwrap();
        assert_eq!(send(&second, "down.default").await, 502);
        assert_eq!(
            attempts.load(Ordering::SeqCst),
            12,
            "no retry: the push did not refill the budget"
        );
    }

    #[tokio::test]
    async fn a_drained_inbound_bucket_stays_drained_across_a_push() {
        let config = "inbound:
  - port: 8080
    rateLimit: {maxTokens: 3, fillInterval: 1h}
";
        let pool = pool();
        let first = RouteTable::new(parse(config), &pool).unwrap();
        let req = get("app");
        let limit = first.inbound_limit(8080).unwrap();
        assert_eq!((0..5).filter(|_| limit.admit(&req).is_ok()).count(), 3);
        let second = first
            .next(
                parse(&format!("{config}services: [{{name: new, port: 80}}]\n")),
                &pool,
            )
            .unwrap();
        assert!(second.inbound_limit(8080).unwrap().admit(&req).is_err());
        // A changed limit is a new bucket.
        let third = second
            .next(
                parse(&config.replace("maxTokens: 3", "maxTokens: 4")),
                &pool,
            )
            .unwrap();
        assert!(third.inbound_limit(8080).unwrap().admit(&req).is_ok());
    }
}
