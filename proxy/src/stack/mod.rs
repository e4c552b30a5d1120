//! The per-route policy stack, composed in one place, outermost first:
//!
//! ```text
//! fault -> ratelimit -> timeout(request) -> retry -> timeout(per try) -> split
//!       -> breaker (per backend) -> balance (per backend) -> endpoint (pooled connection)
//! ```
//!
//! Each stage is a tower layer in its own module; a stage the route's policy does
//! not ask for is left out of its stack. Stages report what they did through
//! [`Failure`] (a response the proxy makes) or a [`Outcome`] response extension (flags
//! on an upstream response), which the HTTP service turns into headers, metrics and
//! the access log.

use crate::{
    balance::{self, Balancer},
    body::{RequestBody, ResponseBody},
    breaker::BreakerLayer,
    config::{BackendRef, Route, Service as ServiceConfig},
    fault::FaultInjector,
    http::forward,
    policy::{HashOn, Policy},
    pool::{Pool, UpstreamError},
    ratelimit::RateLimiter,
    retry::{RetryCounters, RetryLayer},
    rng::Rng,
    split::Split,
    timeout::TimeoutLayer,
};
use http::{Request, Response, StatusCode};
use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, OnceLock},
    task::{Context, Poll},
    time::Duration,
};
use tower::{util::BoxCloneSyncService, Layer, Service, ServiceExt};

pub type Req = Request<RequestBody>;
pub type Rsp = Response<ResponseBody>;
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
/// A route's whole stack, type-erased once when the table is built.
pub type RouteService = BoxCloneSyncService<Req, Rsp, Failure>;

/// Envoy-style response flags: why the proxy answered itself or changed the answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Flags(u16);

impl Flags {
    pub const NONE: Flags = Flags(0);
    /// Upstream connect failure.
    pub const UF: Flags = Flags(1 << 0);
    /// Upstream connection closed or reset before a response.
    pub const UC: Flags = Flags(1 << 1);
    /// No healthy upstream: the backend has no endpoints.
    pub const UH: Flags = Flags(1 << 2);
    /// No route.
    pub const NR: Flags = Flags(1 << 3);
    /// Upstream timeout (request or per try).
    pub const UT: Flags = Flags(1 << 4);
    /// Upstream overflow: a circuit-breaker limit.
    pub const UO: Flags = Flags(1 << 5);
    /// Rate limited.
    pub const RL: Flags = Flags(1 << 6);
    /// Delay injected.
    pub const DI: Flags = Flags(1 << 7);
    /// Fault injected (abort).
    pub const FI: Flags = Flags(1 << 8);
    /// Retries exhausted or refused by the budget while the upstream kept failing.
    pub const URX: Flags = Flags(1 << 9);

    const NAMES: [&'static str; 10] = ["UF", "UC", "UH", "NR", "UT", "UO", "RL", "DI", "FI", "URX"];

    pub fn union(self, other: Flags) -> Flags {
        Flags(self.0 | other.0)
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn contains(self, other: Flags) -> bool {
        self.0 & other.0 == other.0
    }

    /// `UF`, `DI,UT`, ... as a `'static` label (every combination is made once).
    pub fn label(self) -> &'static str {
        static LABELS: OnceLock<Vec<&'static str>> = OnceLock::new();
        let labels = LABELS.get_or_init(|| {
            (0..1u16 << Flags::NAMES.len())
                .map(|bits| {
                    let names: Vec<&str> = Flags::NAMES
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| bits & (1 << i) != 0)
                        .map(|(_, n)| *n)
                        .collect();
                    &*Box::leak(names.join(",").into_boxed_str())
                })
                .collect()
        });
        labels[usize::from(self.0)]
    }
}

/// What kind of failure, for retry conditions and outlier detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    ConnectFailure,
    Reset,
    Timeout,
    /// Refused by the proxy's own policy (limits, faults, no endpoints).
    Local,
}

/// A request the proxy answers itself.
#[derive(Debug)]
pub struct Failure {
    pub status: StatusCode,
    pub flags: Flags,
    pub kind: FailureKind,
    pub message: String,
    pub backend: Option<Arc<str>>,
    /// The endpoint that failed, so a retry can go elsewhere.
    pub endpoint: Option<SocketAddr>,
}

impl Failure {
    pub fn local(status: StatusCode, flags: Flags, message: impl Into<String>) -> Failure {
        Failure {
            status,
            flags,
            kind: FailureKind::Local,
            message: message.into(),
            backend: None,
            endpoint: None,
        }
    }

    pub fn timeout(after: Duration) -> Failure {
        Failure {
            status: StatusCode::GATEWAY_TIMEOUT,
            flags: Flags::UT,
            kind: FailureKind::Timeout,
            message: format!("no response within {}", crate::duration::format(after)),
            backend: None,
            endpoint: None,
        }
    }

    pub fn upstream(
        error: &UpstreamError,
        backend: Option<&Arc<str>>,
        endpoint: SocketAddr,
    ) -> Failure {
        let (status, flags, kind) = if error.is_connect() {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Flags::UF,
                FailureKind::ConnectFailure,
            )
        } else {
            (StatusCode::BAD_GATEWAY, Flags::UC, FailureKind::Reset)
        };
        Failure {
            status,
            flags,
            kind,
            message: error.to_string(),
            backend: backend.cloned(),
            endpoint: Some(endpoint),
        }
    }
}

/// Response extension set by the stack: flags on an upstream response (a delay was
/// injected, a retry happened) and the backend that answered.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub flags: Flags,
    pub backend: Option<Arc<str>>,
    pub endpoint: Option<SocketAddr>,
}

/// Adds `flags` to a response's [`Outcome`].
pub fn add_flags(response: &mut Rsp, flags: Flags) {
    let outcome = response.extensions_mut().get_or_insert_default::<Outcome>();
    outcome.flags = outcome.flags.union(flags);
}

/// Request extension: an endpoint a retry should avoid, and the client's address
/// for ring hashing on the source IP.
#[derive(Debug, Clone, Copy)]
pub struct Avoid(pub SocketAddr);

#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub SocketAddr);

/// The innermost stage: one backend, balanced over its endpoints and sent on the
/// pooled connection to the chosen one.
#[derive(Clone)]
pub struct Balance {
    backend: Arc<str>,
    balancer: Arc<Balancer>,
    hash_on: Option<HashOn>,
    pool: Arc<Pool>,
}

impl Balance {
    fn hash(&self, req: &Req) -> Option<u64> {
        let hash_on = self.hash_on.as_ref()?;
        if let Some(header) = &hash_on.header {
            if let Some(value) = req.headers().get(header.as_str()) {
                return Some(balance::hash_key(value.as_bytes()));
            }
        }
        if hash_on.source_ip {
            if let Some(ClientAddr(addr)) = req.extensions().get::<ClientAddr>() {
                return Some(match addr.ip() {
                    std::net::IpAddr::V4(ip) => balance::hash_key(&ip.octets()),
                    std::net::IpAddr::V6(ip) => balance::hash_key(&ip.octets()),
                });
            }
        }
        None
    }
}

impl Service<Req> for Balance {
    type Response = Rsp;
    type Error = Failure;
    type Future = BoxFuture<Result<Rsp, Failure>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Failure>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let avoid = req.extensions().get::<Avoid>().map(|a| a.0);
            let Some(pick) = this.balancer.pick(this.hash(&req), avoid) else {
                let mut failure = Failure::local(
                    StatusCode::SERVICE_UNAVAILABLE,
                    Flags::UH,
                    format!("backend {} has no endpoints", this.backend),
                );
                failure.backend = Some(this.backend.clone());
                return Err(failure);
            };
            let addr = pick.addr();
            match forward(&this.pool, addr, req).await {
                Ok(mut response) => {
                    let status = response.status().as_u16();
                    pick.finish(match status {
                        502..=504 => balance::Outcome::GatewayError,
                        500..=599 => balance::Outcome::Error5xx,
                        _ => balance::Outcome::Success,
                    });
                    let outcome = response.extensions_mut().get_or_insert_default::<Outcome>();
                    outcome.backend = Some(this.backend.clone());
                    outcome.endpoint = Some(addr);
                    Ok(response)
                }
                Err(error) => {
                    pick.finish(balance::Outcome::GatewayError);
                    Err(Failure::upstream(&error, Some(&this.backend), addr))
                }
            }
        })
    }
}

/// Injects faults (delay, abort) on a share of requests.
#[derive(Clone)]
pub struct Fault<S> {
    inner: S,
    injector: Arc<FaultInjector>,
    delays: metrics::Counter,
    aborts: metrics::Counter,
}

impl<S> Service<Req> for Fault<S>
where
    S: Service<Req, Response = Rsp, Error = Failure> + Clone + Send + 'static,
    S::Future: Send,
{
    type Response = Rsp;
    type Error = Failure;
    type Future = BoxFuture<Result<Rsp, Failure>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Failure>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let decision = self.injector.decide();
        let mut inner = self.inner.clone();
        let (delays, aborts) = (self.delays.clone(), self.aborts.clone());
        Box::pin(async move {
            let delayed = decision.delay.is_some();
            if let Some(delay) = decision.delay {
                delays.increment(1);
                tokio::time::sleep(delay).await;
            }
            if let Some(abort) = decision.abort {
                aborts.increment(1);
                let grpc = is_grpc(&req);
                let mut response = abort_response(&abort, grpc);
                add_flags(
                    &mut response,
                    if delayed {
                        Flags::FI.union(Flags::DI)
                    } else {
                        Flags::FI
                    },
                );
                return Ok(response);
            }
            let mut result = inner.ready().await?.call(req).await;
            if delayed {
                match &mut result {
                    Ok(response) => add_flags(response, Flags::DI),
                    Err(failure) => failure.flags = failure.flags.union(Flags::DI),
                }
            }
            result
        })
    }
}

/// The answer to an aborted request: a gRPC status in a trailers-only response for
/// a gRPC request when one is configured, else the HTTP status.
fn abort_response(abort: &crate::fault::Abort, grpc_request: bool) -> Rsp {
    let mut response = Response::new(ResponseBody::empty());
    match (grpc_request, abort.grpc) {
        (true, Some(code)) => {
            let headers = response.headers_mut();
            headers.insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/grpc"),
            );
            headers.insert("grpc-status", http::HeaderValue::from(code as i32));
            headers.insert(
                "grpc-message",
                http::HeaderValue::from_static("fault injected"),
            );
        }
        _ => {
            *response.status_mut() = abort.http;
            *response.body_mut() =
                ResponseBody::Full(Some(bytes::Bytes::from_static(b"fault injected\n")));
        }
    }
    response
}

/// A gRPC request: its failures are told in `grpc-status`, not the HTTP status.
pub fn is_grpc(req: &Req) -> bool {
    req.headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// Refuses requests over the route's token bucket with 429 `RL`.
#[derive(Clone)]
pub struct RateLimit<S> {
    inner: S,
    limiter: Arc<RateLimiter>,
    key_header: Option<http::HeaderName>,
    limited: metrics::Counter,
}

impl<S> Service<Req> for RateLimit<S>
where
    S: Service<Req, Response = Rsp, Error = Failure> + Clone + Send + 'static,
    S::Future: Send,
{
    type Response = Rsp;
    type Error = Failure;
    type Future = BoxFuture<Result<Rsp, Failure>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Failure>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let key = self
            .key_header
            .as_ref()
            .and_then(|h| req.headers().get(h))
            .and_then(|v| v.to_str().ok());
        if !self.limiter.try_acquire(key) {
            self.limited.increment(1);
            return Box::pin(std::future::ready(Err(Failure::local(
                StatusCode::TOO_MANY_REQUESTS,
                Flags::RL,
                "rate limit exceeded",
            ))));
        }
        let mut inner = self.inner.clone();
        Box::pin(async move { inner.ready().await?.call(req).await })
    }
}

/// A route's policy counters, registered once when the route is built, so a
/// request that retries, is limited or gets a fault pays one atomic add.
pub struct RouteCounters {
    pub retries: metrics::Counter,
    pub retry_budget_exhausted: metrics::Counter,
    pub retry_overflow: metrics::Counter,
    ratelimited: metrics::Counter,
    delays: metrics::Counter,
    aborts: metrics::Counter,
}

impl RouteCounters {
    fn new(service: &Arc<str>, route: &Arc<str>) -> RouteCounters {
        let labels = [
            ("service", service.to_string()),
            ("route", route.to_string()),
        ];
        let with = |extra: (&'static str, &'static str)| {
            let mut all: Vec<(&'static str, String)> = labels.to_vec();
            all.push((extra.0, extra.1.to_owned()));
            all
        };
        RouteCounters {
            retries: metrics::counter!("trellis_retries_total", &labels),
            retry_budget_exhausted: metrics::counter!(
                "trellis_retry_budget_exhausted_total",
                &labels
            ),
            retry_overflow: metrics::counter!("trellis_retry_overflow_total", &labels),
            ratelimited: metrics::counter!(
                "trellis_ratelimited_total",
                &with(("direction", "outbound"))
            ),
            delays: metrics::counter!("trellis_faults_injected_total", &with(("kind", "delay"))),
            aborts: metrics::counter!("trellis_faults_injected_total", &with(("kind", "abort"))),
        }
    }
}

/// Everything a route needs that lives outside its config.
pub struct Resources<'a> {
    pub pool: &'a Arc<Pool>,
    pub services: &'a [ServiceConfig],
    pub seed: Option<u64>,
}

fn rng(seed: Option<u64>, salt: u64) -> Rng {
    match seed {
        Some(seed) => Rng::with_seed(seed ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15)),
        None => Rng::from_entropy(),
    }
}

/// The backends a route sends to: its `backends`, or the service itself.
fn backend_refs(service: &ServiceConfig, route: &Route) -> Vec<BackendRef> {
    if route.backends.is_empty() {
        vec![BackendRef {
            name: service.name.clone(),
            namespace: Some(service.namespace.clone()),
            port: service.port,
            weight: 1,
        }]
    } else {
        route.backends.clone()
    }
}

/// Builds one route's stack from its effective policy; `service_label` and
/// `route_label` name it in metrics.
pub fn build_route(
    ctx: &Resources<'_>,
    service: &ServiceConfig,
    route: &Route,
    policy: &Policy,
    route_index: usize,
    labels: (&Arc<str>, &Arc<str>),
) -> RouteService {
    let salt = route_index as u64 + 1;
    let counters = RouteCounters::new(labels.0, labels.1);
    let mut backends = Vec::new();
    for (i, backend) in backend_refs(service, route).iter().enumerate() {
        let namespace = backend.namespace.as_deref().unwrap_or(&service.namespace);
        let target = ctx
            .services
            .iter()
            .find(|s| s.name == backend.name && s.namespace == namespace && s.port == backend.port);
        let endpoints: Vec<SocketAddr> = target
            .map(|s| s.endpoints.iter().map(|e| e.address).collect())
            .unwrap_or_default();
        let label: Arc<str> = format!("{}.{namespace}:{}", backend.name, backend.port).into();
        let lb = policy.load_balancer.clone().unwrap_or_default();
        let balancer = Balancer::new(
            label.clone(),
            &endpoints,
            &lb,
            policy.outlier_detection.as_ref(),
            rng(ctx.seed, salt * 1000 + i as u64),
        );
        let balance = Balance {
            backend: label.clone(),
            balancer: Arc::new(balancer),
            hash_on: lb.hash_on.clone(),
            pool: ctx.pool.clone(),
        };
        let service: RouteService = match &policy.connection_pool {
            Some(limits) => {
                BoxCloneSyncService::new(BreakerLayer::new(limits, label).layer(balance))
            }
            None => BoxCloneSyncService::new(balance),
        };
        backends.push((service, backend.weight));
    }
    let mut stack: RouteService = if backends.len() == 1 {
        backends.remove(0).0
    } else {
        BoxCloneSyncService::new(Split::new(backends, rng(ctx.seed, salt * 7919)))
    };
    let timeouts = policy.timeouts.clone().unwrap_or_default();
    if let Some(per_try) = timeouts.per_try {
        stack = BoxCloneSyncService::new(TimeoutLayer::new(per_try).layer(stack));
    }
    if let Some(retry) = &policy.retry {
        let max_retries = policy
            .connection_pool
            .as_ref()
            .map(|p| p.max_retries.0)
            .unwrap_or(u32::MAX);
        stack = BoxCloneSyncService::new(
            RetryLayer::new(
                retry,
                max_retries,
                rng(ctx.seed, salt * 104_729),
                RetryCounters {
                    retries: counters.retries.clone(),
                    budget_exhausted: counters.retry_budget_exhausted.clone(),
                    overflow: counters.retry_overflow.clone(),
                },
            )
            .layer(stack),
        );
    }
    if let Some(request) = timeouts.request {
        stack = BoxCloneSyncService::new(TimeoutLayer::new(request).layer(stack));
    }
    if let Some(limit) = &policy.rate_limit {
        stack = BoxCloneSyncService::new(RateLimit {
            inner: stack,
            limiter: Arc::new(RateLimiter::new(limit)),
            key_header: limit
                .key_header
                .as_ref()
                .and_then(|h| http::HeaderName::from_bytes(h.as_bytes()).ok()),
            limited: counters.ratelimited.clone(),
        });
    }
    if let Some(fault) = &policy.fault {
        stack = BoxCloneSyncService::new(Fault {
            inner: stack,
            injector: Arc::new(FaultInjector::new(fault, rng(ctx.seed, salt * 15_485_863))),
            delays: counters.delays.clone(),
            aborts: counters.aborts.clone(),
        });
    }
    stack
}

/// Runs a request through a route's stack.
pub async fn call(stack: &RouteService, req: Req) -> Result<Rsp, Failure> {
    stack.clone().oneshot(req).await
}

/// In-process services for testing each layer alone.
#[cfg(test)]
pub mod testing {
    use super::*;
    use std::{
        collections::VecDeque,
        sync::{
            atomic::{AtomicUsize, Ordering},
            Mutex,
        },
    };

    pub fn request() -> Req {
        Request::get("http://svc.test/")
            .body(RequestBody::Empty)
            .unwrap()
    }

    /// What one call of a [`Scripted`] service does.
    #[derive(Clone, Debug)]
    pub enum Step {
        Status(u16),
        Fail(FailureKind),
        /// Answers 200 after this long.
        Delay(Duration),
        /// Answers 200 after this long, from this endpoint (for `Avoid`).
        From(SocketAddr),
    }

    /// Answers calls by a script, then by its last step forever; counts calls and
    /// records the `Avoid` each request carried.
    #[derive(Clone)]
    pub struct Scripted {
        steps: Arc<Mutex<VecDeque<Step>>>,
        last: Step,
        pub calls: Arc<AtomicUsize>,
        pub avoided: Arc<Mutex<Vec<Option<SocketAddr>>>>,
    }

    impl Scripted {
        pub fn new(steps: Vec<Step>, then: Step) -> Scripted {
            Scripted {
                steps: Arc::new(Mutex::new(steps.into())),
                last: then,
                calls: Arc::new(AtomicUsize::new(0)),
                avoided: Arc::new(Mutex::new(Vec::new())),
            }
        }

        pub fn always(status: u16) -> Scripted {
            Scripted::new(vec![], Step::Status(status))
        }

        pub fn delayed(delay: Duration) -> Scripted {
            Scripted::new(vec![], Step::Delay(delay))
        }

        pub fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }
    }

    fn status(code: u16) -> Rsp {
        let mut response = Response::new(ResponseBody::empty());
        *response.status_mut() = StatusCode::from_u16(code).unwrap();
        response
    }

    impl Service<Req> for Scripted {
        type Response = Rsp;
        type Error = Failure;
        type Future = BoxFuture<Result<Rsp, Failure>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Failure>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, req: Req) -> Self::Future {
            self.calls.fetch_add(1, Ordering::SeqCst);
            self.avoided
                .lock()
                .unwrap()
                .push(req.extensions().get::<Avoid>().map(|a| a.0));
            let step = self
                .steps
                .lock()
                .unwrap()
                .pop_front()
                .unwrap_or(self.last.clone());
            Box::pin(async move {
                match step {
                    Step::Status(code) => Ok(status(code)),
                    Step::Fail(kind) => Err(Failure {
                        status: StatusCode::BAD_GATEWAY,
                        flags: Flags::UC,
                        kind,
                        message: "scripted failure".into(),
                        backend: None,
                        endpoint: None,
                    }),
                    Step::Delay(delay) => {
                        tokio::time::sleep(delay).await;
                        Ok(status(200))
                    }
                    Step::From(addr) => {
                        let mut response = status(503);
                        response.extensions_mut().insert(Outcome {
                            endpoint: Some(addr),
                            ..Default::default()
                        });
                        Ok(response)
                    }
                }
            })
        }
    }
}
