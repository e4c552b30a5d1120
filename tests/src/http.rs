//! Plain HTTP clients as an application in a pod would use them: they dial the
//! address they want and know nothing of any proxy.

use crate::netns::Pod;
use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Incoming};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::{error::Error, net::SocketAddr};

pub type BoxError = Box<dyn Error + Send + Sync>;

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
    let stream = pod.connect(addr).await?;
    let (mut sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender.send_request(req).await?)
}

/// An HTTP/2 (prior knowledge, h2c) connection from `pod` to `addr`.
pub async fn h2_client(
    pod: &Pod,
    addr: SocketAddr,
) -> Result<http2::SendRequest<Full<Bytes>>, BoxError> {
    let stream = pod.connect(addr).await?;
    let (sender, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
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
    let body = body.collect().await.map_err(Into::into)?.to_bytes();
    Ok((parts.status, parts.headers, body))
}
