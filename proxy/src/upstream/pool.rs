//! Pooled upstream HTTP connections, keyed by endpoint address.
//!
//! HTTP/2 connections are shared: one per endpoint carries every concurrent stream.
//! HTTP/1.1 connections carry one request at a time; an idle one is checked out for
//! a request and checked back in when its response body has been read to the end.
//! A request that fails on a reused connection before any of it was written (the
//! server closed an idle keep-alive connection) is sent again on a fresh one.
//!
//! A request to an endpoint whose identity is known goes over mesh mTLS once the
//! proxy has a certificate (`crate::tls`), checking that the endpoint is who the
//! config says; such connections are pooled apart from plaintext ones.
//!
//! A destination with `maxConnections` hands its [`ConnectionLimit`] along: each
//! connection made for it holds a place until the connection closes, and a request
//! that needs a new connection when none is left is refused (503 `UO`).

use super::request_body::RequestBody;
use crate::identity::Identity;
use foldhash::{HashMap, HashMapExt};
use futures_util::{future::Either, FutureExt};
use hyper::{
    body::Incoming,
    client::conn::{http1, http2},
    Request, Response,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::{
    future::Future,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};
use tokio::{
    net::TcpStream,
    sync::{OwnedSemaphorePermit, Semaphore},
};
use trellis_proto::model::config::Workload;

/// Why an upstream request failed, mapped to a response flag by the caller.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connect to {addr} failed: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("connect to {addr} timed out after {timeout:?}")]
    ConnectTimeout { addr: SocketAddr, timeout: Duration },
    #[error("HTTP handshake with {addr} failed: {source}")]
    Handshake {
        addr: SocketAddr,
        source: hyper::Error,
    },
    #[error("upstream {addr} closed or reset the connection: {source}")]
    Reset {
        addr: SocketAddr,
        source: hyper::Error,
    },
    #[error("backend {backend} is over its connection limit ({limit})")]
    Overflow { backend: Arc<str>, limit: usize },
    #[error("mTLS with {addr} failed: {message}")]
    Tls { addr: SocketAddr, message: String },
}

impl UpstreamError {
    /// True when the request failed on the client's side: its body could not be
    /// read (a malformed chunk, a client that went away), not the upstream.
    pub fn is_client_body(&self) -> bool {
        matches!(self, UpstreamError::Reset { source, .. } if source.is_user())
    }

    /// True when no connection could be made at all (nothing reached the server).
    pub fn is_connect(&self) -> bool {
        matches!(
            self,
            UpstreamError::Connect { .. }
                | UpstreamError::ConnectTimeout { .. }
                | UpstreamError::Tls { .. }
        )
    }

    /// True when the destination's own `maxConnections` refused it: nothing was sent.
    pub fn is_overflow(&self) -> bool {
        matches!(self, UpstreamError::Overflow { .. })
    }
}

/// What the proxy lets one HTTP/2 stream send it before it reads, downstream and
/// upstream (the protocol's default window, as Linkerd): each stream a client
/// holds without reading pins this much of the upstream's response in the proxy
/// (2 MiB with hyper's defaults: 100 streams that never read held 200 MiB).
pub const H2_STREAM_WINDOW: u32 = 65_535;
/// What all of one HTTP/2 connection's streams may send before the proxy reads:
/// room for 100 streams' full windows, so streams a slow reader holds cannot use
/// up a pooled upstream connection's window and stall everyone else's.
pub const H2_CONNECTION_WINDOW: u32 = 100 * H2_STREAM_WINDOW;
/// A destination's `maxConnections`: how many upstream connections it may hold open.
pub struct ConnectionLimit {
    slots: Arc<Semaphore>,
    limit: usize,
    backend: Arc<str>,
    overflows: metrics::Counter,
}

impl ConnectionLimit {
    pub fn new(limit: u32, backend: Arc<str>) -> ConnectionLimit {
        let limit = limit as usize;
        ConnectionLimit {
            slots: Arc::new(Semaphore::new(limit)),
            limit,
            overflows: metrics::counter!(crate::metrics::OVERFLOW_TOTAL, "backend" => backend.clone()),
            backend,
        }
    }

    /// A place for one more connection, held for as long as the connection lives.
    fn take(&self) -> Result<OwnedSemaphorePermit, UpstreamError> {
        self.slots.clone().try_acquire_owned().map_err(|_| {
            self.overflows.increment(1);
            UpstreamError::Overflow {
                backend: self.backend.clone(),
                limit: self.limit,
            }
        })
    }
}

/// The most idle HTTP/1 connections kept per endpoint.
const MAX_IDLE_PER_ENDPOINT: usize = 64;

/// How many requests an endpoint's HTTP/1 connections over mesh mTLS carry at once
/// before the next one, finding none idle, rides the shared HTTP/2 connection to
/// the endpoint's sidecar instead (see [`Pool::h1_all_busy`]).
pub const H1_BUSY_BEFORE_H2: usize = 4;

/// One endpoint's HTTP/1 connections: those idle, and how many requests hold or
/// wait for one.
#[derive(Default)]
struct H1Endpoint {
    idle: Vec<http1::SendRequest<RequestBody>>,
    busy: usize,
}

/// An opaque connection to an endpoint (see [`Pool::connect_opaque`]).
pub enum Opaque {
    Plain(TcpStream),
    Mtls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// Connections are pooled by endpoint and, for mesh mTLS, by the peer identity they
/// proved (a hash of it), so a connection is never reused for a peer it was not
/// checked against.
pub type Key = (SocketAddr, Option<u64>);

pub struct Pool {
    connect_timeout: Duration,
    /// The proxy's certificate, for mesh mTLS to endpoints whose identity is known.
    identity: Option<Arc<Identity>>,
    h1: Mutex<HashMap<Key, H1Endpoint>>,
    h2: Mutex<HashMap<Key, http2::SendRequest<RequestBody>>>,
}

/// An HTTP/1 connection lent to one request, returned when its response is done.
pub struct Lease {
    busy: Busy,
    sender: http1::SendRequest<RequestBody>,
}

impl Lease {
    /// Puts the connection back for the next request to the same endpoint.
    pub fn release(self) {
        let Lease { mut busy, sender } = self;
        if sender.is_closed() {
            return;
        }
        let mut h1 = lock(&busy.pool.h1);
        let endpoint = h1.entry(busy.key).or_default();
        endpoint.busy = endpoint.busy.saturating_sub(1);
        busy.counted = false;
        if endpoint.idle.len() < MAX_IDLE_PER_ENDPOINT {
            endpoint.idle.push(sender);
        }
    }
}

/// A request's place in its endpoint's count of busy HTTP/1 connections, from
/// checkout until its connection is back or gone.
struct Busy {
    pool: Arc<Pool>,
    key: Key,
    /// Still in the count: cleared where the connection is returned, under the
    /// same lock.
    counted: bool,
}

impl Drop for Busy {
    fn drop(&mut self) {
        if self.counted {
            if let Some(endpoint) = lock(&self.pool.h1).get_mut(&self.key) {
                endpoint.busy = endpoint.busy.saturating_sub(1);
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The maps hold no invariant a panic could break; keep serving.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Pool {
    pub fn new(connect_timeout: Duration) -> Arc<Pool> {
        Pool::meshed(connect_timeout, None)
    }

    /// A pool that speaks mesh mTLS with `identity`'s certificate.
    pub fn meshed(connect_timeout: Duration, identity: Option<Arc<Identity>>) -> Arc<Pool> {
        Arc::new(Pool {
            connect_timeout,
            identity,
            h1: Mutex::new(HashMap::new()),
            h2: Mutex::new(HashMap::new()),
        })
    }

    /// The pool a request to `addr` takes: mesh mTLS with `peer` when the
    /// endpoint's identity is known and the proxy has a certificate (the key then
    /// carries the peer's hash), else plaintext.
    pub fn key(&self, addr: SocketAddr, peer: Option<&Workload>) -> Key {
        let meshed = self
            .identity
            .as_ref()
            .is_some_and(|identity| identity.is_certified());
        let peer = peer.filter(|_| meshed).map(|workload| {
            use std::hash::{Hash, Hasher};
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            workload.hash(&mut hasher);
            hasher.finish()
        });
        (addr, peer)
    }

    /// The mTLS configuration for a new connection of pool `key` to `peer`;
    /// plaintext (`None`) when the key says so.
    fn mtls(
        &self,
        key: Key,
        peer: Option<&Workload>,
        alpn: &[u8],
    ) -> Result<Option<Arc<rustls::ClientConfig>>, UpstreamError> {
        let addr = key.0;
        let (Some(_), Some(peer), Some(credentials)) = (
            key.1,
            peer,
            self.identity
                .as_ref()
                .and_then(|identity| identity.current()),
        ) else {
            return Ok(None);
        };
        let trust_domain = credentials
            .identity
            .strip_prefix("spiffe://")
            .and_then(|rest| rest.split('/').next())
            .unwrap_or_default();
        crate::tls::client_config(&credentials, &peer.spiffe_id(trust_domain), alpn)
            .map(Some)
            .map_err(|message| UpstreamError::Tls { addr, message })
    }

    /// `io` inside mesh mTLS with `config`.
    async fn handshake_tls(
        addr: SocketAddr,
        io: TcpStream,
        config: Arc<rustls::ClientConfig>,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, UpstreamError> {
        let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
        tokio_rustls::TlsConnector::from(config)
            .connect(name, io)
            .await
            .map_err(|error| UpstreamError::Tls {
                addr,
                message: error.to_string(),
            })
    }

    /// A connection for opaque bytes to `addr`: inside mesh mTLS (ALPN
    /// `trellis.dev/opaque`) when `peer` is known and the proxy has a
    /// certificate, plaintext otherwise. Not pooled: it lasts as long as the
    /// client's.
    pub async fn connect_opaque(
        &self,
        addr: SocketAddr,
        peer: Option<&Workload>,
    ) -> Result<Opaque, UpstreamError> {
        let tls = self.mtls(self.key(addr, peer), peer, crate::tls::ALPN_OPAQUE)?;
        let io = self.connect(addr).await?;
        Ok(match tls {
            Some(config) => Opaque::Mtls(Box::new(Self::handshake_tls(addr, io, config).await?)),
            None => Opaque::Plain(io),
        })
    }

    async fn connect(&self, addr: SocketAddr) -> Result<TcpStream, UpstreamError> {
        let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| UpstreamError::ConnectTimeout {
                addr,
                timeout: self.connect_timeout,
            })?
            .map_err(|source| UpstreamError::Connect { addr, source })?;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    /// Takes an idle HTTP/1 connection that is still usable, if there is one:
    /// `first` (already taken from the pool), then the others.
    async fn checkout_h1(
        &self,
        key: Key,
        mut first: Option<http1::SendRequest<RequestBody>>,
    ) -> Option<http1::SendRequest<RequestBody>> {
        loop {
            let mut sender = match first.take() {
                Some(sender) => sender,
                None => lock(&self.h1).get_mut(&key)?.idle.pop()?,
            };
            // Ready at once if idle; waits out a response the server is finishing;
            // fails if the server closed it.
            if sender.ready().await.is_ok() {
                return Some(sender);
            }
        }
    }

    async fn connect_h1(
        &self,
        addr: SocketAddr,
        tls: Option<Arc<rustls::ClientConfig>>,
        limit: Option<&ConnectionLimit>,
    ) -> Result<http1::SendRequest<RequestBody>, UpstreamError> {
        let place = limit.map(ConnectionLimit::take).transpose()?;
        let io = self.connect(addr).await?;
        match tls {
            Some(config) => {
                let io = Pool::handshake_tls(addr, io, config).await?;
                handshake_h1(addr, TokioIo::new(io), place).await
            }
            None => handshake_h1(addr, TokioIo::new(io), place).await,
        }
    }

    async fn connect_h2(
        &self,
        addr: SocketAddr,
        tls: Option<Arc<rustls::ClientConfig>>,
        limit: Option<&ConnectionLimit>,
    ) -> Result<http2::SendRequest<RequestBody>, UpstreamError> {
        let place = limit.map(ConnectionLimit::take).transpose()?;
        let io = self.connect(addr).await?;
        match tls {
            Some(config) => {
                let io = Pool::handshake_tls(addr, io, config).await?;
                handshake_h2(addr, TokioIo::new(io), place).await
            }
            None => handshake_h2(addr, TokioIo::new(io), place).await,
        }
    }

    /// Sends an HTTP/1 request to `key`'s endpoint ([`Pool::key`]); the lease must be
    /// released once the response body has been read to its end (or dropped, which
    /// closes the connection).
    ///
    /// Usually an idle connection is ready: the request is handed to it here, and
    /// the future only waits for the response. It is built from combinators, not
    /// as an `async fn`, which would keep the request in the future twice more:
    /// every request's future stays small enough for the allocator's per-thread
    /// cache (1 KiB). Anything else (a connection to make, or to wait for) takes
    /// the boxed [`Pool::send_h1_waiting`].
    pub fn send_h1<'a>(
        self: Arc<Self>,
        key: Key,
        req: Request<RequestBody>,
        limit: Option<&'a ConnectionLimit>,
        peer: Option<&'a Workload>,
    ) -> impl Future<Output = Result<(Response<Incoming>, Lease), UpstreamError>> + Send + 'a {
        let addr = key.0;
        let idle = {
            let mut h1 = lock(&self.h1);
            let endpoint = h1.entry(key).or_default();
            endpoint.busy += 1;
            endpoint.idle.pop()
        };
        let busy = Busy {
            pool: self,
            key,
            counted: true,
        };
        match idle {
            Some(mut sender) if sender.is_ready() => {
                let sent = sender.try_send_request(req);
                Either::Left(sent.then(move |result| match result {
                    Ok(response) => {
                        let lease = Lease { busy, sender };
                        Either::Left(std::future::ready(Ok((response, lease))))
                    }
                    Err(mut error) => match error.take_message() {
                        // Closed while idle, before any of the request was written:
                        // safe to send again, on another connection.
                        Some(unsent) => Either::Right(Box::pin(Self::send_h1_waiting(
                            busy, addr, unsent, limit, peer, None,
                        ))),
                        None => Either::Left(std::future::ready(Err(UpstreamError::Reset {
                            addr,
                            source: error.into_error(),
                        }))),
                    },
                }))
            }
            idle => Either::Right(Box::pin(Self::send_h1_waiting(
                busy, addr, req, limit, peer, idle,
            ))),
        }
    }

    /// True when requests hold every one of `key`'s HTTP/1 connections, and at
    /// least [`H1_BUSY_BEFORE_H2`] of them: a request to a sidecar, over mesh mTLS,
    /// could ride the shared HTTP/2 connection rather than wait for or open another.
    ///
    /// Why not always HTTP/2 between sidecars, as Linkerd does: one request at a
    /// time, hyper's HTTP/1 costs each sidecar 6-25 % less CPU than its HTTP/2.
    /// Many at once inside mTLS, one HTTP/2 connection carries several in each
    /// read, write and TLS record, where HTTP/1 pays them per message: so the mTLS
    /// pair carried 27 % more at its max rate, at the same CPU per request at 1000
    /// rps, and the same behind a slow app. In plaintext the slow app's case cost
    /// the sidecars 8-18 % more CPU per request (benches/RESULTS.md, 2026-12-08).
    pub fn h1_all_busy(&self, key: Key) -> bool {
        lock(&self.h1)
            .get(&key)
            .is_some_and(|endpoint| endpoint.idle.is_empty() && endpoint.busy >= H1_BUSY_BEFORE_H2)
    }

    /// [`Pool::send_h1`] when no idle connection was ready: waits for `idle`, or
    /// another pooled connection, to be, or connects. Its caller boxes it, so the
    /// connect and TLS handshake states (kilobytes) are paid only on this path.
    async fn send_h1_waiting(
        busy: Busy,
        addr: SocketAddr,
        mut req: Request<RequestBody>,
        limit: Option<&ConnectionLimit>,
        peer: Option<&Workload>,
        mut idle: Option<http1::SendRequest<RequestBody>>,
    ) -> Result<(Response<Incoming>, Lease), UpstreamError> {
        let (pool, key) = (&busy.pool, busy.key);
        loop {
            let (mut sender, reused) = match pool.checkout_h1(key, idle.take()).await {
                Some(sender) => (sender, true),
                None => {
                    let tls = pool.mtls(key, peer, crate::tls::ALPN_HTTP1)?;
                    (pool.connect_h1(addr, tls, limit).await?, false)
                }
            };
            match sender.try_send_request(req).await {
                Ok(response) => return Ok((response, Lease { busy, sender })),
                Err(mut error) => match error.take_message() {
                    // Not written at all: safe to send again on a fresh connection.
                    Some(unsent) if reused => req = unsent,
                    _ => {
                        return Err(UpstreamError::Reset {
                            addr,
                            source: error.into_error(),
                        })
                    }
                },
            }
        }
    }

    /// Sends an HTTP/2 request on the endpoint's shared connection. As with
    /// [`Pool::send_h1`], a connection that is ready takes the request here;
    /// making one, or waiting for it, is boxed apart.
    pub fn send_h2<'a>(
        self: Arc<Self>,
        key: Key,
        req: Request<RequestBody>,
        limit: Option<&'a ConnectionLimit>,
        peer: Option<&'a Workload>,
    ) -> impl Future<Output = Result<Response<Incoming>, UpstreamError>> + Send + 'a {
        let addr = key.0;
        let existing = lock(&self.h2).get(&key).filter(|s| !s.is_closed()).cloned();
        match existing {
            Some(mut sender) if sender.is_ready() => {
                Either::Left(sender.send_request(req).map(move |result| {
                    result.map_err(|source| UpstreamError::Reset { addr, source })
                }))
            }
            existing => Either::Right(Box::pin(
                self.send_h2_waiting(addr, key, req, limit, peer, existing),
            )),
        }
    }

    /// [`Pool::send_h2`] when the connection was not ready, or there was none.
    async fn send_h2_waiting(
        self: Arc<Self>,
        addr: SocketAddr,
        key: Key,
        req: Request<RequestBody>,
        limit: Option<&ConnectionLimit>,
        peer: Option<&Workload>,
        existing: Option<http2::SendRequest<RequestBody>>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let mut sender = match existing {
            Some(sender) => sender,
            None => {
                let tls = self.mtls(key, peer, crate::tls::ALPN_HTTP2)?;
                let sender = self.connect_h2(addr, tls, limit).await?;
                lock(&self.h2).insert(key, sender.clone());
                sender
            }
        };
        sender
            .ready()
            .await
            .map_err(|source| UpstreamError::Reset { addr, source })?;
        sender
            .send_request(req)
            .await
            .map_err(|source| UpstreamError::Reset { addr, source })
    }
}

/// An HTTP/1 client connection on `io`, driven by a task of its own, which holds
/// `place` (the destination's connection limit) while it lives.
async fn handshake_h1<I>(
    addr: SocketAddr,
    io: I,
    place: Option<OwnedSemaphorePermit>,
) -> Result<http1::SendRequest<RequestBody>, UpstreamError>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (sender, conn) = http1::Builder::new()
        .handshake(io)
        .await
        .map_err(|source| UpstreamError::Handshake { addr, source })?;
    tokio::spawn(async move {
        let _place = place;
        if let Err(error) = conn.with_upgrades().await {
            tracing::debug!(%addr, %error, "upstream HTTP/1 connection ended");
        }
    });
    Ok(sender)
}

/// An HTTP/2 client connection on `io`, as [`handshake_h1`].
async fn handshake_h2<I>(
    addr: SocketAddr,
    io: I,
    place: Option<OwnedSemaphorePermit>,
) -> Result<http2::SendRequest<RequestBody>, UpstreamError>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (sender, conn) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONNECTION_WINDOW)
        .handshake(io)
        .await
        .map_err(|source| UpstreamError::Handshake { addr, source })?;
    tokio::spawn(async move {
        let _place = place;
        if let Err(error) = conn.await {
            tracing::debug!(%addr, %error, "upstream HTTP/2 connection ended");
        }
    });
    Ok(sender)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::server::conn::http1 as server;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// An HTTP/1 server on loopback answering 200 to everything; counts connections.
    async fn server() -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let count = connections.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(|_| async {
                        Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Empty::<
                            bytes::Bytes,
                        >::new(
                        )))
                    });
                    let _ = server::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        (addr, connections)
    }

    /// Whether each idle pooled HTTP/1 connection has been closed.
    fn idle_closed(pool: &Pool) -> Vec<bool> {
        let h1 = lock(&pool.h1);
        let idle = h1.values().flat_map(|endpoint| &endpoint.idle);
        idle.map(|sender| sender.is_closed()).collect()
    }

    fn get() -> Request<RequestBody> {
        Request::get("/").body(RequestBody::Empty).unwrap()
    }

    #[tokio::test]
    async fn max_connections_refuses_a_new_connection_and_reuses_an_idle_one() {
        let (addr, connections) = server().await;
        let pool = Pool::new(Duration::from_secs(5));
        let limit = ConnectionLimit::new(1, "web.default:80".into());
        let (first, lease) = pool
            .clone()
            .send_h1(pool.key(addr, None), get(), Some(&limit), None)
            .await
            .unwrap();
        assert_eq!(first.status(), 200);

        // The one connection is lent out: a second request would need another.
        let Err(refused) = pool
            .clone()
            .send_h1(pool.key(addr, None), get(), Some(&limit), None)
            .await
        else {
            panic!("a second connection was opened");
        };
        assert!(refused.is_overflow(), "{refused}");
        assert_eq!(
            refused.to_string(),
            "backend web.default:80 is over its connection limit (1)"
        );

        // Once it is back in the pool, the next request takes it.
        drop(first);
        lease.release();
        let (again, _lease) = pool
            .clone()
            .send_h1(pool.key(addr, None), get(), Some(&limit), None)
            .await
            .unwrap();
        assert_eq!(again.status(), 200);
        assert_eq!(connections.load(Ordering::SeqCst), 1);

        // Without a limit the same pool opens as many as it needs.
        let (_a, _la) = pool
            .clone()
            .send_h1(pool.key(addr, None), get(), None, None)
            .await
            .unwrap();
        let (_b, _lb) = pool
            .clone()
            .send_h1(pool.key(addr, None), get(), None, None)
            .await
            .unwrap();
        assert_eq!(connections.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn an_endpoint_is_busy_while_requests_hold_all_its_connections() {
        let (addr, _) = server().await;
        let pool = Pool::new(Duration::from_secs(5));
        let key = pool.key(addr, None);
        let lend = || async {
            let sent = pool.clone().send_h1(key, get(), None, None);
            sent.await.unwrap().1
        };
        let mut leases = Vec::new();
        for _ in 0..H1_BUSY_BEFORE_H2 {
            assert!(!pool.h1_all_busy(key));
            leases.push(lend().await);
        }
        assert!(pool.h1_all_busy(key));

        // A connection given back is idle: the next request takes it.
        leases.pop().unwrap().release();
        assert!(!pool.h1_all_busy(key));
        leases.push(lend().await);
        assert!(pool.h1_all_busy(key));

        // A lease dropped unreleased (its response cut short) closes its connection
        // and no longer counts.
        drop(leases.pop());
        assert!(!pool.h1_all_busy(key));

        // A request that fails to connect leaves no count behind.
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let nowhere = closed.local_addr().unwrap();
        drop(closed);
        for _ in 0..H1_BUSY_BEFORE_H2 {
            assert!(pool
                .clone()
                .send_h1(pool.key(nowhere, None), get(), None, None)
                .await
                .is_err());
        }
        assert_eq!(lock(&pool.h1)[&(nowhere, None)].busy, 0);
    }

    /// An HTTP/1 server on loopback that answers one request per connection and,
    /// once `close` is notified, closes it without having said so (no `Connection:
    /// close`), as a server does when its keep-alive timeout ends; counts connections.
    async fn closing_server(close: Arc<tokio::sync::Notify>) -> (SocketAddr, Arc<AtomicUsize>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let count = connections.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.ends_with(b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
                close.notified().await;
            }
        });
        (addr, connections)
    }

    #[tokio::test]
    async fn an_idle_connection_the_server_closed_is_passed_over_for_a_new_one() {
        let close = Arc::new(tokio::sync::Notify::new());
        let (addr, connections) = closing_server(close.clone()).await;
        let pool = Pool::new(Duration::from_secs(5));
        let (first, lease) = pool
            .clone()
            .send_h1(pool.key(addr, None), get(), None, None)
            .await
            .unwrap();
        assert_eq!(first.status(), 200);
        http_body_util::BodyExt::collect(first.into_body())
            .await
            .unwrap();
        lease.release();
        assert_eq!(idle_closed(&pool), [false]);
        close.notify_one();
        // Wait (bounded) until the pooled connection has seen the server close it.
        let closed = async {
            while !idle_closed(&pool).iter().all(|closed| *closed) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), closed)
            .await
            .expect("the idle connection never saw the server close it");

        let (second, _lease) = pool
            .clone()
            .send_h1(pool.key(addr, None), get(), None, None)
            .await
            .unwrap();
        assert_eq!(second.status(), 200);
        assert_eq!(connections.load(Ordering::SeqCst), 2);
    }
}
