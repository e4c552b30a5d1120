//! The L7 proxy: one hyper service per accepted connection, forwarding each request
//! to a named service's endpoint or to the connection's original destination over
//! the pooled upstream connections, in the protocol the client spoke.

use crate::{
    detect::Protocol,
    metrics::{status_label, Direction, REQUESTS_TOTAL, REQUEST_DURATION},
    pool::{Lease, Pool, UpstreamError},
    table::SharedTable,
};
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

/// Response header naming why the proxy, not the upstream, produced a response.
pub const FLAGS_HEADER: &str = "x-trellis-flags";
/// Response header with the detail behind the flags, for whoever reads the response.
pub const ERROR_HEADER: &str = "x-trellis-error";

/// What the proxy shares between all the L7 connections of one direction.
pub struct Shared {
    pub direction: Direction,
    pub table: SharedTable,
    pub pool: Arc<Pool>,
}

/// The hyper service for one downstream connection.
#[derive(Clone)]
pub struct HttpProxy {
    shared: Arc<Shared>,
    /// Where the client meant to connect (SO_ORIGINAL_DST); `None` when it dialled
    /// the proxy directly.
    original_dst: Option<SocketAddr>,
    protocol: Protocol,
}

impl HttpProxy {
    pub fn new(shared: Arc<Shared>, original_dst: Option<SocketAddr>, protocol: Protocol) -> Self {
        HttpProxy {
            shared,
            original_dst,
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

/// Where one request goes and what to call it in metrics.
struct Destination {
    addr: SocketAddr,
    service: Option<Arc<str>>,
}

impl HttpProxy {
    async fn proxy(self, req: Request<Incoming>) -> Result<Response<ResponseBody>, Infallible> {
        let start = Instant::now();
        let destination = match self.destination(&req) {
            Ok(destination) => destination,
            Err((status, flags, message)) => {
                let response = proxy_error(status, flags, &message);
                self.record(None, &response, flags, start);
                return Ok(response);
            }
        };
        let (response, flags) = match self.forward(destination.addr, req).await {
            Ok(response) => (response, ""),
            Err(error) => {
                let (status, flags) = if error.is_connect() {
                    (StatusCode::SERVICE_UNAVAILABLE, "UF")
                } else {
                    (StatusCode::BAD_GATEWAY, "UC")
                };
                tracing::warn!(
                    direction = self.shared.direction.label(),
                    service = destination.service.as_deref().unwrap_or(""),
                    %error,
                    flags,
                    "upstream request failed"
                );
                (proxy_error(status, flags, &error.to_string()), flags)
            }
        };
        self.record(destination.service, &response, flags, start);
        Ok(response)
    }

    /// A named service when the authority names one (outbound only), else the
    /// original destination.
    fn destination(
        &self,
        req: &Request<Incoming>,
    ) -> Result<Destination, (StatusCode, &'static str, String)> {
        if self.shared.direction == Direction::Outbound {
            let table = self.shared.table.load();
            if let Some(target) = authority(req).and_then(|a| table.lookup(a)) {
                return match target.pick() {
                    Some(addr) => Ok(Destination {
                        addr,
                        service: Some(target.label.clone()),
                    }),
                    None => Err((
                        StatusCode::SERVICE_UNAVAILABLE,
                        "UH",
                        format!("service {} has no endpoints", target.label),
                    )),
                };
            }
        }
        match self.original_dst {
            Some(addr) => Ok(Destination {
                addr,
                service: None,
            }),
            None => Err((
                StatusCode::NOT_FOUND,
                "NR",
                "no original destination and no service named by the request's authority"
                    .to_owned(),
            )),
        }
    }

    async fn forward(
        &self,
        addr: SocketAddr,
        mut req: Request<Incoming>,
    ) -> Result<Response<ResponseBody>, UpstreamError> {
        if self.protocol == Protocol::Http2 {
            strip_hop_by_hop(req.headers_mut(), false);
            let mut response = self.shared.pool.send_h2(addr, req).await?;
            strip_hop_by_hop(response.headers_mut(), false);
            return Ok(response.map(|body| ResponseBody::Upstream { body, lease: None }));
        }

        let upgrade = is_upgrade(req.headers());
        let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        strip_hop_by_hop(req.headers_mut(), upgrade);
        let (mut response, lease) = self.shared.pool.send_h1(addr, req).await?;
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

    fn record(
        &self,
        service: Option<Arc<str>>,
        response: &Response<ResponseBody>,
        flags: &'static str,
        start: Instant,
    ) {
        let direction = self.shared.direction.label();
        let protocol = self.protocol.label();
        let service = match service {
            Some(name) => metrics::SharedString::from(name),
            None => metrics::SharedString::const_str(""),
        };
        metrics::counter!(REQUESTS_TOTAL,
            "direction" => direction,
            "protocol" => protocol,
            "service" => service.clone(),
            "code" => status_label(response.status().as_u16()),
            "flags" => flags,
        )
        .increment(1);
        metrics::histogram!(REQUEST_DURATION,
            "direction" => direction,
            "protocol" => protocol,
            "service" => service,
        )
        .record(start.elapsed().as_secs_f64());
    }
}

fn authority(req: &Request<Incoming>) -> Option<&str> {
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

/// A response made by the proxy itself, carrying its flags and the reason.
pub fn proxy_error(
    status: StatusCode,
    flags: &'static str,
    message: &str,
) -> Response<ResponseBody> {
    let mut response = Response::new(ResponseBody::Full(Some(Bytes::from(format!(
        "{message}\n"
    )))));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(FLAGS_HEADER, HeaderValue::from_static(flags));
    if let Ok(value) = HeaderValue::from_str(message) {
        headers.insert(ERROR_HEADER, value);
    }
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// The body of a proxied response: the upstream's, streamed frame by frame
/// (trailers included), or a short one the proxy made.
pub enum ResponseBody {
    Upstream {
        body: Incoming,
        /// The HTTP/1 connection the body arrives on, returned to the pool once the
        /// body has been read to its end.
        lease: Option<Lease>,
    },
    Full(Option<Bytes>),
}

impl ResponseBody {
    pub fn empty() -> Self {
        ResponseBody::Full(None)
    }

    fn release_if_done(&mut self) {
        if let ResponseBody::Upstream { body, lease } = self {
            if body.is_end_stream() {
                if let Some(lease) = lease.take() {
                    lease.release();
                }
            }
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        match this {
            ResponseBody::Upstream { body, .. } => {
                let poll = Pin::new(body).poll_frame(cx);
                if let Poll::Ready(None) = poll {
                    this.release_if_done();
                }
                poll
            }
            ResponseBody::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Upstream { body, .. } => body.is_end_stream(),
            ResponseBody::Full(data) => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Upstream { body, .. } => body.size_hint(),
            ResponseBody::Full(data) => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // Bodies hyper never polls (HEAD, 204, 304, empty) end here.
        self.release_if_done();
    }
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
    fn proxy_errors_carry_flags_and_reason() {
        let response = proxy_error(StatusCode::SERVICE_UNAVAILABLE, "UF", "connect failed");
        assert_eq!(response.status(), 503);
        assert_eq!(response.headers()[FLAGS_HEADER], "UF");
        assert_eq!(response.headers()[ERROR_HEADER], "connect failed");
    }
}
