//! Sending one request upstream: on a pooled connection of the protocol the client
//! spoke, with the headers that describe only one hop removed, and an upgrade
//! (WebSocket and the like) spliced through once both sides switch.
//!
//! One exception to the client's protocol: an HTTP/1.1 request to another sidecar
//! over mesh mTLS, whose HTTP/1 connections are all busy, rides the pooled HTTP/2
//! connection to that sidecar, marked with [`ORIG_PROTO`]; the sidecar sends it on
//! to its app as HTTP/1.1 ([`downgrade_from_sidecar`]).

use super::{
    body::{Req, ResponseBody, Rsp},
    pool::{ConnectionLimit, Pool, UpstreamError},
};
use crate::shutdown::Drain;
use futures_util::{future::Either, FutureExt};
use http::{header, request, uri, HeaderMap, HeaderName, HeaderValue, StatusCode, Uri, Version};
use hyper_util::rt::TokioIo;
use std::{future::Future, net::SocketAddr, sync::Arc};
use trellis_proto::model::config::Workload;

/// Sends a request to `addr` on a pooled connection of the request's protocol,
/// splicing the two sides together when the upstream accepts an upgrade.
///
/// `peer` is who the endpoint is, when known: the request then goes over mesh
/// mTLS that proves it. `connections` is the destination's `maxConnections`, when it has one: a new
/// connection beyond it is refused. An upgraded stream holds the request's
/// [`Drain`] (if it carried one), so shutdown waits for it as for opaque TCP.
///
/// Built from combinators around the pool's future rather than as an `async fn`,
/// which would keep another copy of the request in every request's future.
pub fn forward<'a>(
    pool: Arc<Pool>,
    addr: SocketAddr,
    mut req: Req,
    connections: Option<&'a ConnectionLimit>,
    peer: Option<&'a Workload>,
) -> impl Future<Output = Result<Rsp, UpstreamError>> + Send + 'a {
    let key = pool.key(addr, peer);
    // Rewritten here, then sent with the HTTP/2 requests below. A key that names
    // the peer is one for mesh mTLS.
    let carried = req.version() == Version::HTTP_11
        && key.1.is_some()
        && pool.h1_all_busy(key)
        && upgrade_for_sidecar(&mut req);
    if req.version() == Version::HTTP_2 {
        strip_hop_by_hop(req.headers_mut(), false);
        if carried {
            req.headers_mut().insert(ORIG_PROTO, HTTP_11);
        }
        let sent = pool.send_h2(key, req, connections, peer);
        return Either::Left(sent.map(move |result| {
            let mut response = result?;
            strip_hop_by_hop(response.headers_mut(), false);
            if carried {
                *response.version_mut() = Version::HTTP_11;
            }
            Ok(response.map(|body| ResponseBody::Upstream { body, lease: None }))
        }));
    }

    let upgrade = is_upgrade(req.headers());
    let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let drain = req.extensions_mut().remove::<Drain>();
    strip_hop_by_hop(req.headers_mut(), upgrade);
    let sent = pool.send_h1(key, req, connections, peer);
    Either::Right(sent.map(move |result| {
        let (mut response, lease) = result?;
        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            if let Some(downstream) = downstream_upgrade {
                strip_hop_by_hop(response.headers_mut(), true);
                splice_upgrade(downstream, hyper::upgrade::on(&mut response), drain);
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
    }))
}

/// Joins the client's and the server's upgraded streams once both sides switch;
/// `drain` is held until the stream ends.
fn splice_upgrade(
    downstream: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    drain: Option<Drain>,
) {
    tokio::spawn(async move {
        let _drain = drain;
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

/// Marks an HTTP/1.1 request one sidecar carries to another over HTTP/2, for the
/// receiving sidecar to send on as HTTP/1.1. Removed with the hop-by-hop headers
/// anywhere else, so an app can neither send nor see it.
pub const ORIG_PROTO: HeaderName = HeaderName::from_static("x-trellis-orig-proto");
const HTTP_11: HeaderValue = HeaderValue::from_static("HTTP/1.1");

/// Rewrites an HTTP/1.1 request in HTTP/2's form (the authority in the URI, not in
/// `Host`), unless it must stay HTTP/1: an upgrade or `CONNECT` (a tunnel), or a
/// request target HTTP/2 cannot carry (no usable `Host`, `OPTIONS *`). The caller
/// adds [`ORIG_PROTO`] once the hop-by-hop headers are gone.
fn upgrade_for_sidecar(req: &mut Req) -> bool {
    if req.method() == http::Method::CONNECT || is_upgrade(req.headers()) {
        return false;
    }
    let authority = match req.uri().authority() {
        Some(authority) => authority.clone(),
        None => match req
            .headers()
            .get(header::HOST)
            .and_then(|host| uri::Authority::try_from(host.as_bytes()).ok())
        {
            Some(authority) => authority,
            None => return false,
        },
    };
    let Some(path) = req
        .uri()
        .path_and_query()
        .filter(|path| path.as_str().starts_with('/'))
        .cloned()
    else {
        return false;
    };
    let mut parts = uri::Parts::default();
    parts.scheme = Some(uri::Scheme::HTTP);
    parts.authority = Some(authority);
    parts.path_and_query = Some(path);
    let Ok(uri) = Uri::from_parts(parts) else {
        return false;
    };
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_2;
    req.headers_mut().remove(header::HOST);
    true
}

/// Takes back a request another sidecar carried over HTTP/2 for an HTTP/1.1 client
/// ([`ORIG_PROTO`]): HTTP/1.1 again, `Host` from the authority and the target in
/// origin form, so the app sees what the client sent. False when `parts` carry no
/// such mark.
pub fn downgrade_from_sidecar(parts: &mut request::Parts) -> bool {
    if parts.version != Version::HTTP_2 || parts.headers.remove(ORIG_PROTO).is_none() {
        return false;
    }
    parts.version = Version::HTTP_11;
    if let Some(authority) = parts.uri.authority() {
        if let Ok(host) = HeaderValue::from_str(authority.as_str()) {
            parts.headers.entry(header::HOST).or_insert(host);
        }
    }
    if let Some(path) = parts.uri.path_and_query() {
        parts.uri = Uri::from(path.clone());
    }
    true
}

/// `Connection: upgrade` plus an `Upgrade` header: a WebSocket or similar handshake.
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
}

const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");

/// The headers [`strip_hop_by_hop`] removes whatever `Connection` says; a name that
/// `Connection` lists comes with a `Connection` header.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    PROXY_CONNECTION,
    KEEP_ALIVE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::TE,
    ORIG_PROTO,
];

/// Removes the headers that describe one hop rather than the message (RFC 9110
/// §7.6.1), including any the `Connection` header names. `TE: trailers` is kept,
/// since gRPC needs it end to end. For an upgrade, `Upgrade` and
/// `Connection: upgrade` are kept so the next hop switches too.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Most messages carry none of them: one pass over the names, comparing without
    // hashing, spares the seven lookups below.
    if !keep_upgrade && !headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
        return;
    }
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
    headers.remove(PROXY_CONNECTION);
    headers.remove(KEEP_ALIVE);
    headers.remove(ORIG_PROTO);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::request_body::RequestBody;
    use http::Request;

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
    fn strips_each_hop_by_hop_header_without_a_connection_header() {
        for name in [
            "proxy-connection",
            "keep-alive",
            "transfer-encoding",
            "upgrade",
            "te",
            "x-trellis-orig-proto",
        ] {
            let mut headers = HeaderMap::new();
            headers.insert(name, HeaderValue::from_static("gzip"));
            headers.insert("x-end-to-end", HeaderValue::from_static("kept"));
            strip_hop_by_hop(&mut headers, false);
            let left: Vec<_> = headers.keys().map(|k| k.as_str()).collect();
            assert_eq!(left, ["x-end-to-end"], "{name}");
        }
    }

    fn request(builder: http::request::Builder) -> Req {
        builder.body(RequestBody::Empty).unwrap()
    }

    #[test]
    fn an_http1_request_carried_between_sidecars_reaches_the_app_as_sent() {
        let mut req = request(
            Request::post("/cart/items?id=7")
                .header(header::HOST, "web.shop:8080")
                .header("x-user", "ann"),
        );
        assert!(upgrade_for_sidecar(&mut req));
        assert_eq!(req.version(), Version::HTTP_2);
        assert_eq!(req.uri(), "http://web.shop:8080/cart/items?id=7");
        assert!(!req.headers().contains_key(header::HOST));
        req.headers_mut().insert(ORIG_PROTO, HTTP_11);

        let (mut parts, _) = req.into_parts();
        assert!(downgrade_from_sidecar(&mut parts));
        assert_eq!(parts.version, Version::HTTP_11);
        assert_eq!(parts.uri, "/cart/items?id=7");
        assert_eq!(parts.method, http::Method::POST);
        assert_eq!(parts.headers[header::HOST], "web.shop:8080");
        assert_eq!(parts.headers["x-user"], "ann");
        assert!(!parts.headers.contains_key(ORIG_PROTO));
    }

    #[test]
    fn tunnels_and_targets_http2_cannot_carry_stay_http1() {
        let upgrade = Request::get("/chat")
            .header(header::HOST, "chat:80")
            .header(header::CONNECTION, "upgrade")
            .header(header::UPGRADE, "websocket");
        let connect = Request::connect("db:5432").header(header::HOST, "db:5432");
        let no_host = Request::get("/");
        let bad_host = Request::get("/").header(header::HOST, "a b");
        let asterisk = Request::options("*").header(header::HOST, "web:80");
        for (what, builder) in [
            ("upgrade", upgrade),
            ("CONNECT", connect),
            ("no Host", no_host),
            ("a Host that is no authority", bad_host),
            ("OPTIONS *", asterisk),
        ] {
            let mut req = request(builder);
            let before = (req.uri().clone(), req.headers().clone());
            assert!(!upgrade_for_sidecar(&mut req), "{what}");
            assert_eq!(req.version(), Version::HTTP_11, "{what}");
            assert_eq!((req.uri().clone(), req.headers().clone()), before, "{what}");
        }
    }

    #[test]
    fn only_a_marked_http2_request_is_taken_back_to_http1() {
        // An HTTP/2 client's own request keeps its form.
        let req = request(Request::get("http://web:80/").version(Version::HTTP_2));
        let (mut parts, _) = req.into_parts();
        assert!(!downgrade_from_sidecar(&mut parts));
        assert_eq!(parts.version, Version::HTTP_2);
        assert_eq!(parts.uri, "http://web:80/");

        // The mark on an HTTP/1 request means nothing, and goes with the hop.
        let req = request(Request::get("/").header(ORIG_PROTO, "HTTP/1.1"));
        let (mut parts, _) = req.into_parts();
        assert!(!downgrade_from_sidecar(&mut parts));
        strip_hop_by_hop(&mut parts.headers, false);
        assert!(!parts.headers.contains_key(ORIG_PROTO));
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
}
