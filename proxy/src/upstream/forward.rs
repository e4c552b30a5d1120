//! Sending one request upstream: on a pooled connection of the protocol the client
//! spoke, with the headers that describe only one hop removed, and an upgrade
//! (WebSocket and the like) spliced through once both sides switch.

use super::{
    body::{Req, ResponseBody, Rsp},
    pool::{ConnectionLimit, Pool, UpstreamError},
};
use crate::shutdown::Drain;
use futures_util::{future::Either, FutureExt};
use http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
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
    if req.version() == http::Version::HTTP_2 {
        strip_hop_by_hop(req.headers_mut(), false);
        let sent = pool.send_h2(addr, req, connections, peer);
        return Either::Left(sent.map(|result| {
            let mut response = result?;
            strip_hop_by_hop(response.headers_mut(), false);
            Ok(response.map(|body| ResponseBody::Upstream { body, lease: None }))
        }));
    }

    let upgrade = is_upgrade(req.headers());
    let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let drain = req.extensions_mut().remove::<Drain>();
    strip_hop_by_hop(req.headers_mut(), upgrade);
    let sent = pool.send_h1(addr, req, connections, peer);
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
const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    PROXY_CONNECTION,
    KEEP_ALIVE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::TE,
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
        ] {
            let mut headers = HeaderMap::new();
            headers.insert(name, HeaderValue::from_static("gzip"));
            headers.insert("x-end-to-end", HeaderValue::from_static("kept"));
            strip_hop_by_hop(&mut headers, false);
            let left: Vec<_> = headers.keys().map(|k| k.as_str()).collect();
            assert_eq!(left, ["x-end-to-end"], "{name}");
        }
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
