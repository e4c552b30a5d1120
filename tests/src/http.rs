//! Plain HTTP clients as an application in a pod would use them: they dial the
//! address they want and know nothing of any proxy.
//!
//! Every step that waits on the other side is bounded by [`TIMEOUT`] (connecting,
//! a response's headers, a whole body), so a proxy that hangs fails the test with
//! an error naming the request instead of hanging it.

use crate::netns::Pod;
use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Incoming};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::{error::Error, future::Future, net::SocketAddr, time::Duration};

pub type BoxError = Box<dyn Error + Send + Sync>;

/// How long a client waits for each step: the connection, a response's headers,
/// a whole response body. Far beyond anything a test asks of a working proxy (the
/// slowest test app answers after 3 s), so only a hang reaches it.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// `step`, failed with an error naming `what` when it takes longer than [`TIMEOUT`].
pub async fn bounded<T>(
    what: String,
    step: impl Future<Output = Result<T, BoxError>>,
) -> Result<T, BoxError> {
    match tokio::time::timeout(TIMEOUT, step).await {
        Ok(result) => result,
        Err(_) => Err(format!("{what}: no answer within {TIMEOUT:?}").into()),
    }
}

/// Sends one HTTP/1.1 request on a new connection from `pod` to `addr`.
pub async fn send_h1<B>(
    pod: &Pod,
    addr: SocketAddr,
    req: Request<B>,
) -> Result<Response<Incoming>, BoxError>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let what = format!("HTTP/1.1 {} {} to {addr}", req.method(), req.uri());
    bounded(what, async {
        let stream = pod.connect(addr).await?;
        let (mut sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        Ok(sender.send_request(req).await?)
    })
    .await
}

/// An HTTP/2 (prior knowledge, h2c) connection from `pod` to `addr`.
pub async fn h2_client(
    pod: &Pod,
    addr: SocketAddr,
) -> Result<http2::SendRequest<Full<Bytes>>, BoxError> {
    bounded(format!("HTTP/2 connection to {addr}"), async {
        let stream = pod.connect(addr).await?;
        let (sender, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        Ok(sender)
    })
    .await
}

/// Sends one request on an HTTP/2 connection from [`h2_client`]; its response's
/// headers.
pub async fn send_h2(
    sender: &mut http2::SendRequest<Full<Bytes>>,
    req: Request<Full<Bytes>>,
) -> Result<Response<Incoming>, BoxError> {
    let what = format!("HTTP/2 {} {}", req.method(), req.uri());
    bounded(what, async { Ok(sender.send_request(req).await?) }).await
}

/// `GET path` over HTTP/1.1 with `Host: addr`; the status, headers and whole body.
pub async fn get(
    pod: &Pod,
    addr: SocketAddr,
    path: &str,
) -> Result<(StatusCode, HeaderMap, Bytes), BoxError> {
    get_with_host(pod, addr, path, &addr.to_string()).await
}

/// `GET path` with the given `Host` header (how a client names a service).
pub async fn get_with_host(
    pod: &Pod,
    addr: SocketAddr,
    path: &str,
    host: &str,
) -> Result<(StatusCode, HeaderMap, Bytes), BoxError> {
    let req = Request::get(path)
        .header("host", host)
        .body(Full::new(Bytes::new()))?;
    let response = send_h1(pod, addr, req).await?;
    collect(response).await
}

/// Reads a whole response.
pub async fn collect<B>(response: Response<B>) -> Result<(StatusCode, HeaderMap, Bytes), BoxError>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    let (parts, body) = response.into_parts();
    let what = format!("the body of a {} response", parts.status);
    let body = bounded(what, async { body.collect().await.map_err(Into::into) })
        .await?
        .to_bytes();
    Ok((parts.status, parts.headers, body))
}
