//! The L7 proxy: one hyper service per accepted connection. Outbound, a request
//! whose authority names a configured service takes one of its routes and runs
//! through that route's policy stack ([`crate::stack`]); everything else goes
//! straight to the connection's original destination. Either way it travels on the
//! pooled upstream connections, in the protocol the client spoke.

use crate::{
    body::{RequestBody, ResponseBody},
    detect::Protocol,
    metrics::{status_label, Direction, REQUESTS_TOTAL, REQUEST_DURATION},
    pool::{Pool, UpstreamError},
    stack::{self, ClientAddr, Failure, Flags, Outcome, Req, Rsp},
    table::SharedTable,
};
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use std::{
    convert::Infallible, future::Future, net::SocketAddr, pin::Pin, sync::Arc, time::Instant,
};

/// Response header naming why the proxy, not the upstream, produced or changed a
/// response.
pub const FLAGS_HEADER: &str = "x-trellis-flags";
/// Response header with the detail behind the flags, for whoever reads the response.
pub const ERROR_HEADER: &str = "x-trellis-error";

/// What the proxy shares between all the L7 connections of one direction.
pub struct Shared {
    pub direction: Direction,
    pub table: SharedTable,
    pub pool: Arc<Pool>,
    /// One structured log line per request (`--access-log`).
    pub access_log: bool,
}

/// The hyper service for one downstream connection.
#[derive(Clone)]
pub struct HttpProxy {
    shared: Arc<Shared>,
    /// Where the client meant to connect (SO_ORIGINAL_DST); `None` when it dialled
    /// the proxy directly.
    original_dst: Option<SocketAddr>,
    client: SocketAddr,
    protocol: Protocol,
}

impl HttpProxy {
    pub fn new(
        shared: Arc<Shared>,
        original_dst: Option<SocketAddr>,
        client: SocketAddr,
        protocol: Protocol,
    ) -> Self {
        HttpProxy {
            shared,
            original_dst,
            client,
            protocol,
        }
    }
}

impl hyper::service::Service<Request<Incoming>> for HttpProxy {
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        Box::pin(self.clone().proxy(req))
    }
}

/// The bounded labels a request is counted under.
#[derive(Default)]
struct Labels {
    service: Option<Arc<str>>,
    route: Option<Arc<str>>,
}

impl HttpProxy {
    async fn proxy(self, req: Request<Incoming>) -> Result<Response<ResponseBody>, Infallible> {
        let start = Instant::now();
        let mut labels = Labels::default();
        let log = self
            .shared
            .access_log
            .then(|| (req.method().clone(), req.uri().path().to_owned()));
        let req = req.map(RequestBody::Incoming);
        let result = self.dispatch(req, &mut labels).await;
        let (mut response, flags, backend) = match result {
            Ok(mut response) => {
                let outcome = response
                    .extensions_mut()
                    .remove::<Outcome>()
                    .unwrap_or_default();
                (response, outcome.flags, outcome.backend)
            }
            Err(failure) => {
                if failure.kind != stack::FailureKind::Local {
                    tracing::warn!(
                        direction = self.shared.direction.label(),
                        service = labels.service.as_deref().unwrap_or(""),
                        error = %failure.message,
                        flags = failure.flags.label(),
                        "upstream request failed"
                    );
                }
                let backend = failure.backend.clone();
                (proxy_error(&failure), failure.flags, backend)
            }
        };
        if !flags.is_empty() {
            response
                .headers_mut()
                .insert(FLAGS_HEADER, HeaderValue::from_static(flags.label()));
        }
        self.record(&labels, backend.as_ref(), &response, flags, start);
        if let Some((method, path)) = log {
            tracing::info!(
                target: "access",
                direction = self.shared.direction.label(),
                protocol = self.protocol.label(),
                client = %self.client,
                method = %method,
                path,
                service = labels.service.as_deref().unwrap_or(""),
                route = labels.route.as_deref().unwrap_or(""),
                backend = backend.as_deref().unwrap_or(""),
                status = response.status().as_u16(),
                flags = flags.label(),
                duration_ms = start.elapsed().as_secs_f64() * 1000.0,
            );
        }
        Ok(response)
    }

    /// Outbound to a named service: its route's stack. Otherwise the original
    /// destination, after the inbound port's rate limit.
    async fn dispatch(&self, mut req: Req, labels: &mut Labels) -> Result<Rsp, Failure> {
        let table = self.shared.table.load_full();
        if self.shared.direction == Direction::Outbound {
            // A service named by the authority, or dialled by its cluster IP.
            let named = authority(&req).and_then(|a| table.lookup(a));
            let dialled = || self.original_dst.and_then(|d| table.lookup_addr(&d));
            if let Some(target) = named.or_else(dialled) {
                labels.service = Some(target.label.clone());
                let Some(route) = target.route(&req) else {
                    return Err(Failure::local(
                        StatusCode::NOT_FOUND,
                        Flags::NR,
                        format!("no route of {} matches the request", target.label),
                    ));
                };
                labels.route = Some(route.name.clone());
                if route.needs_client_addr {
                    req.extensions_mut().insert(ClientAddr(self.client));
                }
                return stack::call(&route.stack, req).await;
            }
        }
        let Some(addr) = self.original_dst else {
            return Err(Failure::local(
                StatusCode::NOT_FOUND,
                Flags::NR,
                "no original destination and no service named by the request's authority",
            ));
        };
        if self.shared.direction == Direction::Inbound {
            if let Some(limit) = table.inbound_limit(addr.port()) {
                if !limit.try_acquire(None) {
                    metrics::counter!("trellis_ratelimited_total",
                        "direction" => "inbound",
                        "port" => addr.port().to_string(),
                    )
                    .increment(1);
                    return Err(Failure::local(
                        StatusCode::TOO_MANY_REQUESTS,
                        Flags::RL,
                        "rate limit exceeded",
                    ));
                }
            }
        }
        forward(&self.shared.pool, addr, req)
            .await
            .map_err(|error| Failure::upstream(&error, None, addr))
    }

    fn record(
        &self,
        labels: &Labels,
        backend: Option<&Arc<str>>,
        response: &Rsp,
        flags: Flags,
        start: Instant,
    ) {
        let direction = self.shared.direction.label();
        let protocol = self.protocol.label();
        let label = |value: Option<&Arc<str>>| match value {
            Some(name) => metrics::SharedString::from(name.clone()),
            None => metrics::SharedString::const_str(""),
        };
        let service = label(labels.service.as_ref());
        let route = label(labels.route.as_ref());
        metrics::counter!(REQUESTS_TOTAL,
            "direction" => direction,
            "protocol" => protocol,
            "service" => service.clone(),
            "route" => route.clone(),
            "backend" => label(backend),
            "code" => status_label(response.status().as_u16()),
            "flags" => flags.label(),
        )
        .increment(1);
        metrics::histogram!(REQUEST_DURATION,
            "direction" => direction,
            "protocol" => protocol,
            "service" => service,
            "route" => route,
        )
        .record(start.elapsed().as_secs_f64());
    }
}

/// Sends a request to `addr` on a pooled connection of the request's protocol,
/// splicing the two sides together when the upstream accepts an upgrade.
pub async fn forward(
    pool: &Arc<Pool>,
    addr: SocketAddr,
    mut req: Req,
) -> Result<Rsp, UpstreamError> {
    if req.version() == http::Version::HTTP_2 {
        strip_hop_by_hop(req.headers_mut(), false);
        let mut response = pool.send_h2(addr, req).await?;
        strip_hop_by_hop(response.headers_mut(), false);
        return Ok(response.map(|body| ResponseBody::Upstream { body, lease: None }));
    }

    let upgrade = is_upgrade(req.headers());
    let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    strip_hop_by_hop(req.headers_mut(), upgrade);
    let (mut response, lease) = pool.send_h1(addr, req).await?;
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(downstream) = downstream_upgrade {
            strip_hop_by_hop(response.headers_mut(), true);
            splice_upgrade(downstream, hyper::upgrade::on(&mut response));
            // The upstream connection now belongs to the upgraded stream.
            drop(lease);
            return Ok(response.map(|_| ResponseBody::empty()));
        }
    }
    strip_hop_by_hop(response.headers_mut(), false);
    Ok(response.map(|body| ResponseBody::Upstream {
        body,
        lease: Some(lease),
    }))
}

fn authority<B>(req: &Request<B>) -> Option<&str> {
    match req.uri().authority() {
        Some(authority) => Some(authority.as_str()),
        None => req.headers().get(header::HOST)?.to_str().ok(),
    }
}

/// Joins the client's and the server's upgraded streams once both sides switch.
fn splice_upgrade(downstream: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    tokio::spawn(async move {
        match tokio::try_join!(downstream, upstream) {
            Ok((down, up)) => {
                let mut down = TokioIo::new(down);
                let mut up = TokioIo::new(up);
                if let Err(error) = tokio::io::copy_bidirectional(&mut down, &mut up).await {
                    tracing::debug!(%error, "upgraded connection ended with an error");
                }
            }
            Err(error) => tracing::debug!(%error, "upgrade did not complete"),
        }
    });
}

/// `Connection: upgrade` plus an `Upgrade` header: a WebSocket or similar handshake.
fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
}

/// Removes the headers that describe one hop rather than the message (RFC 9110
/// §7.6.1), including any the `Connection` header names. `TE: trailers` is kept,
/// since gRPC needs it end to end. For an upgrade, `Upgrade` and
/// `Connection: upgrade` are kept so the next hop switches too.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    if let Some(connection) = headers.remove(header::CONNECTION) {
        if let Ok(names) = connection.to_str() {
            for name in names.split(',').map(str::trim) {
                // TE is judged on its own below; an upgrade keeps its Upgrade header.
                let kept = name.eq_ignore_ascii_case("te")
                    || (keep_upgrade && name.eq_ignore_ascii_case("upgrade"));
                if !kept {
                    headers.remove(name);
                }
            }
        }
    }
    headers.remove("proxy-connection");
    headers.remove("keep-alive");
    headers.remove(header::TRANSFER_ENCODING);
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
    let te_is_trailers = headers
        .get(header::TE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    if !te_is_trailers {
        headers.remove(header::TE);
    }
}

/// The response for a request the proxy answers itself, carrying the reason.
pub fn proxy_error(failure: &Failure) -> Rsp {
    let mut response = Response::new(ResponseBody::Full(Some(Bytes::from(format!(
        "{}\n",
        failure.message
    )))));
    *response.status_mut() = failure.status;
    let headers = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(&failure.message) {
        headers.insert(ERROR_HEADER, value);
    }
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_hop_by_hop_and_connection_named_headers() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-hop"),
        );
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert("x-hop", HeaderValue::from_static("1"));
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        headers.insert(header::TE, HeaderValue::from_static("gzip"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert("x-end-to-end", HeaderValue::from_static("kept"));
        strip_hop_by_hop(&mut headers, false);
        let left: Vec<_> = headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["x-end-to-end"]);
    }

    #[test]
    fn keeps_te_trailers_and_the_upgrade_handshake() {
        let mut headers = HeaderMap::new();
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
        strip_hop_by_hop(&mut headers, false);
        assert_eq!(headers[header::TE], "trailers");

        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(is_upgrade(&headers));
        strip_hop_by_hop(&mut headers, true);
        assert_eq!(headers[header::UPGRADE], "websocket");
        assert_eq!(headers[header::CONNECTION], "upgrade");
    }

    #[test]
    fn proxy_errors_carry_the_reason() {
        let failure = Failure::local(StatusCode::SERVICE_UNAVAILABLE, Flags::UH, "no endpoints");
        let response = proxy_error(&failure);
        assert_eq!(response.status(), 503);
        assert_eq!(response.headers()[ERROR_HEADER], "no endpoints");
    }
}
