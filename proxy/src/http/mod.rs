//! The L7 proxy: one hyper service per accepted connection. Outbound, a request
//! whose authority names a configured service (or that was sent to its cluster IP)
//! takes one of its routes and runs through that route's policy stack
//! ([`crate::stack`]); everything else goes straight to the connection's original
//! destination. Inbound, a request passes the port's rate limit, if it has one,
//! then goes to the application. Either way it travels on the pooled upstream
//! connections, in the protocol the client spoke (save HTTP/1.1 between two
//! sidecars over mesh mTLS when their HTTP/1 connections are busy:
//! [`crate::upstream::forward`]);
//! what the proxy answers itself is built by [`respond`].

pub mod head_wait;
pub mod respond;

use crate::{
    listen::detect::Protocol,
    metrics::{status_label, Direction, AUTHZ_DENIED_TOTAL, REQUESTS_TOTAL, REQUEST_DURATION},
    routing::table::{RouteTable, SharedTable},
    shutdown::Drain,
    stack::outcome::{is_grpc, ClientAddr, Failure, FailureKind, Flags, Req, Routed, Rsp},
    upstream::{
        forward::{downgrade_from_sidecar, forward, is_upgrade},
        pool::Pool,
        request_body::{BodyStalled, ClientBody, RequestBody},
    },
};
use futures_util::{future::Either, FutureExt};
use head_wait::{served, HeadWait, ServedBody};
use http::{header, HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use respond::FLAGS_HEADER;
use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};
use trellis_proto::model::authorization::{Call, Peer};

/// What the proxy shares between all the L7 connections of one direction.
pub struct Shared {
    pub direction: Direction,
    pub table: SharedTable,
    pub pool: Arc<Pool>,
    /// One structured log line per request (`--access-log`).
    pub access_log: bool,
    /// The bound on waiting for response headers (`--response-headers-timeout`).
    pub response_headers_timeout: std::time::Duration,
    /// How long a request body may stall (`--request-idle-timeout`).
    pub request_idle_timeout: std::time::Duration,
    pub request_metrics: RequestMetrics,
}

/// The hyper service for one downstream connection.
#[derive(Clone)]
pub struct HttpProxy {
    shared: Arc<Shared>,
    /// Where the client meant to connect (SO_ORIGINAL_DST); `None` when it dialled
    /// the proxy directly.
    original_dst: Option<SocketAddr>,
    client: SocketAddr,
    /// Who the client's mesh certificate proved it is, inbound over mTLS.
    caller: Option<Arc<Peer>>,
    protocol: Protocol,
    /// The connection's hold on shutdown, lent to upgraded streams that outlive it.
    drain: Drain,
    /// HTTP/1: told when each request head arrives and each response ends.
    head_wait: Option<Arc<HeadWait>>,
}

impl HttpProxy {
    pub fn new(
        shared: Arc<Shared>,
        original_dst: Option<SocketAddr>,
        client: SocketAddr,
        caller: Option<Arc<Peer>>,
        protocol: Protocol,
        drain: Drain,
        head_wait: Option<Arc<HeadWait>>,
    ) -> Self {
        HttpProxy {
            shared,
            original_dst,
            client,
            caller,
            protocol,
            drain,
            head_wait,
        }
    }
}

impl hyper::service::Service<Request<Incoming>> for HttpProxy {
    type Response = Response<ServedBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    /// Routes the request at once and boxes one future: the dispatch under the
    /// response-headers deadline, then [`Answer::respond`]. Combinators rather
    /// than an `async fn`, which would carry the request in its future again
    /// beside the copy the upstream send holds, and push that future past the
    /// allocator's per-thread cache (1 KiB).
    fn call(&self, req: Request<Incoming>) -> Self::Future {
        if let Some(wait) = &self.head_wait {
            wait.head_arrived();
        }
        let start = Instant::now();
        let log = self
            .shared
            .access_log
            .then(|| (req.method().clone(), req.uri().path().to_owned()));
        let grpc = is_grpc(&req);
        let (mut parts, body) = req.into_parts();
        // An HTTP/1.1 request the calling sidecar carried over HTTP/2 goes on, and is
        // counted, as the HTTP/1.1 request its client sent.
        let protocol = match self.protocol == Protocol::Http2
            && self.shared.direction == Direction::Inbound
            && downgrade_from_sidecar(&mut parts)
        {
            true => Protocol::Http1,
            false => self.protocol,
        };
        // A tunnel (an upgrade to a WebSocket, a CONNECT) may rightly be quiet.
        let upgrade = is_upgrade(&parts.headers);
        let idle = match upgrade || parts.method == http::Method::CONNECT {
            true => Duration::ZERO,
            false => self.shared.request_idle_timeout,
        };
        let (body, stalled) = ClientBody::new(body, idle);
        if upgrade {
            parts.extensions.insert(self.drain.clone());
        }
        let req = Request::from_parts(parts, RequestBody::Incoming(body));
        let mut labels = Labels::default();
        let dispatched = self.dispatch(req, &mut labels);
        let answer = Answer {
            shared: self.shared.clone(),
            protocol,
            client: self.client,
            head_wait: self.head_wait.clone(),
            start,
            labels,
            log,
            grpc,
            stalled,
        };
        let limit = self.shared.response_headers_timeout;
        Box::pin(
            tokio::time::timeout(limit, dispatched)
                .map(move |result| Ok(answer.respond(result.map_err(|_| limit)))),
        )
    }
}

/// The bounded labels a request is counted under.
#[derive(Default)]
struct Labels {
    service: Option<Arc<str>>,
    route: Option<Arc<str>>,
}

/// What a request's response needs once its dispatch is over.
struct Answer {
    shared: Arc<Shared>,
    protocol: Protocol,
    client: SocketAddr,
    head_wait: Option<Arc<HeadWait>>,
    start: Instant,
    labels: Labels,
    /// Method and path, kept for the access log when it is on.
    log: Option<(http::Method, String)>,
    grpc: bool,
    /// Set when the client's body was cut for stalling.
    stalled: Option<Arc<AtomicBool>>,
}

impl Answer {
    /// The response to send downstream: the upstream's, or the proxy's own for a
    /// failure (`Err(limit)`: no response headers within `limit`); counted, logged.
    fn respond(
        self,
        dispatched: Result<Result<Routed, Failure>, Duration>,
    ) -> Response<ServedBody> {
        let result = match dispatched {
            // However the upstream request failed, a body cut for stalling is why.
            Err(_) | Ok(Err(_))
                if self
                    .stalled
                    .as_ref()
                    .is_some_and(|s| s.load(Ordering::Relaxed)) =>
            {
                Err(Failure::local(
                    StatusCode::REQUEST_TIMEOUT,
                    Flags::SI,
                    BodyStalled(self.shared.request_idle_timeout).to_string(),
                ))
            }
            Ok(result) => result,
            Err(limit) => Err(Failure::local(
                StatusCode::GATEWAY_TIMEOUT,
                Flags::UT,
                format!("no response headers within {limit:?} (--response-headers-timeout)"),
            )),
        };
        let (mut response, flags, backend) = match result {
            Ok(Routed { response, outcome }) => (response, outcome.flags, outcome.backend),
            Err(failure) => {
                if failure.kind != FailureKind::Local {
                    tracing::warn!(
                        direction = self.shared.direction.label(),
                        service = self.labels.service.as_deref().unwrap_or(""),
                        error = %failure.message,
                        flags = failure.flags.label(),
                        "upstream request failed"
                    );
                }
                let backend = failure.backend.clone();
                (
                    respond::failure(&failure, self.grpc),
                    failure.flags,
                    backend,
                )
            }
        };
        if !flags.is_empty() {
            response
                .headers_mut()
                .insert(FLAGS_HEADER, HeaderValue::from_static(flags.label()));
        }
        self.record(backend.as_ref(), &response, flags);
        if let Some((method, path)) = &self.log {
            tracing::info!(
                target: "access",
                direction = self.shared.direction.label(),
                protocol = self.protocol.label(),
                client = %self.client,
                method = %method,
                path,
                service = self.labels.service.as_deref().unwrap_or(""),
                route = self.labels.route.as_deref().unwrap_or(""),
                backend = backend.as_deref().unwrap_or(""),
                status = response.status().as_u16(),
                flags = flags.label(),
                duration_ms = self.start.elapsed().as_secs_f64() * 1000.0,
            );
        }
        served(response, self.head_wait)
    }

    fn record(&self, backend: Option<&Arc<str>>, response: &Rsp, flags: Flags) {
        let key = RequestKey {
            protocol: self.protocol.label(),
            service: self.labels.service.clone(),
            route: self.labels.route.clone(),
            backend: backend.cloned(),
            code: response.status().as_u16(),
            flags,
        };
        let mut handles = self
            .shared
            .request_metrics
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let (requests, duration) = handles
            .entry(key)
            .or_insert_with_key(|key| key.register(self.shared.direction.label()));
        requests.increment(1);
        duration.record(self.start.elapsed().as_secs_f64());
    }
}

impl HttpProxy {
    /// Outbound to a named service: its route's stack. Otherwise the original
    /// destination, after the inbound port's rate limit. The route is chosen here,
    /// before anything is awaited; the future only waits for the answer.
    fn dispatch(
        &self,
        mut req: Req,
        labels: &mut Labels,
    ) -> impl Future<Output = Result<Routed, Failure>> + Send + 'static {
        let refuse = |failure| Either::Right(Either::Right(std::future::ready(Err(failure))));
        let table = self.shared.table.load();
        if self.shared.direction == Direction::Outbound {
            // A service named by the authority, or dialled by its cluster IP.
            let named = authority(&req).and_then(|a| table.lookup(a));
            let dialled = || self.original_dst.and_then(|d| table.lookup_addr(&d));
            if let Some(target) = named.or_else(dialled) {
                labels.service = Some(target.label.clone());
                let Some(route) = target.route(&req) else {
                    return refuse(Failure::local(
                        StatusCode::NOT_FOUND,
                        Flags::NR,
                        format!("no route of {} matches the request", target.label),
                    ));
                };
                labels.route = Some(route.name.clone());
                if route.needs_client_addr {
                    req.extensions_mut().insert(ClientAddr(self.client));
                }
                // The route, and the destinations its stack sends to, live as long
                // as its requests, whatever config version comes next.
                let route = route.clone();
                return Either::Left(async move { route.stack.call(req).await });
            }
        }
        let Some(addr) = self.original_dst else {
            return refuse(Failure::local(
                StatusCode::NOT_FOUND,
                Flags::NR,
                "no original destination and no service named by the request's authority",
            ));
        };
        if self.shared.direction == Direction::Inbound {
            let call = Call::Http {
                method: req.method(),
                path: req.uri().path(),
            };
            if let Err(refused) = authorize(&table, addr.port(), self.caller.as_deref(), call) {
                return refuse(refused);
            }
            if let Some(limit) = table.inbound_limit(addr.port()) {
                if let Err(limited) = limit.admit(&req) {
                    return refuse(limited);
                }
            }
        }
        let sent = forward(self.shared.pool.clone(), addr, req, None, None);
        Either::Right(Either::Left(sent.map(move |result| {
            result
                .map(Routed::from)
                .map_err(|error| Failure::upstream(&error, None, addr))
        })))
    }
}

/// The labels one request is counted under, besides the direction.
#[derive(PartialEq, Eq, Hash)]
pub struct RequestKey {
    protocol: &'static str,
    service: Option<Arc<str>>,
    route: Option<Arc<str>>,
    backend: Option<Arc<str>>,
    code: u16,
    flags: Flags,
}

/// The request counter and duration histogram of each label set, resolved once:
/// looking a metric up by its labels allocates twice (the label list, then the
/// registry's copy of the key) on every call.
pub type RequestMetrics =
    std::sync::Mutex<foldhash::HashMap<RequestKey, (metrics::Counter, metrics::Histogram)>>;

impl RequestKey {
    fn register(&self, direction: &'static str) -> (metrics::Counter, metrics::Histogram) {
        let label = |value: &Option<Arc<str>>| match value {
            Some(name) => metrics::SharedString::from(name.clone()),
            None => metrics::SharedString::const_str(""),
        };
        let requests = metrics::counter!(REQUESTS_TOTAL,
            "direction" => direction,
            "protocol" => self.protocol,
            "service" => label(&self.service),
            "route" => label(&self.route),
            "backend" => label(&self.backend),
            "code" => status_label(self.code),
            "flags" => self.flags.label(),
        );
        let duration = metrics::histogram!(REQUEST_DURATION,
            "direction" => direction,
            "protocol" => self.protocol,
            "service" => label(&self.service),
            "route" => label(&self.route),
        );
        (requests, duration)
    }
}

/// The pod's `port` lets `caller` (who mesh mTLS proved, if it did) make `call`,
/// or a 403 `AZ` says it does not; refusals are counted and logged.
pub fn authorize(
    table: &RouteTable,
    port: u16,
    caller: Option<&Peer>,
    call: Call<'_>,
) -> Result<(), Failure> {
    let Some(authorization) = table.inbound_authorization(port) else {
        return Ok(());
    };
    if authorization.allows(caller, call) {
        return Ok(());
    }
    let protocol = match call {
        Call::Http { .. } => "http",
        Call::Opaque => "opaque",
    };
    metrics::counter!(AUTHZ_DENIED_TOTAL, "port" => port.to_string(), "protocol" => protocol)
        .increment(1);
    let caller = caller.map_or("a caller without a mesh identity", |c| c.identity.as_str());
    tracing::info!(
        port,
        caller,
        protocol,
        "refused by the port's authorization policy"
    );
    Err(Failure::local(
        StatusCode::FORBIDDEN,
        Flags::AZ,
        format!("{caller} may not call port {port}"),
    ))
}

fn authority<B>(req: &Request<B>) -> Option<&str> {
    match req.uri().authority() {
        Some(authority) => Some(authority.as_str()),
        None => req.headers().get(header::HOST)?.to_str().ok(),
    }
}
