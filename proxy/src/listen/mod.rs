//! Accepting connections: every connection of the outbound and inbound listeners
//! has its original destination recovered (SO_ORIGINAL_DST), its protocol detected
//! ([`detect`]), and is then served as HTTP ([`crate::http`]) or forwarded as
//! opaque bytes ([`tcp`]); each holds a [`Drain`] so shutdown waits for it.

pub mod detect;
pub mod flood;
pub mod io;
pub mod tcp;

use crate::{
    http::{
        head_wait::{HeadDeadline, HeadTimedOut, HeadWait},
        HttpProxy, Shared,
    },
    identity::{Credentials, Identity},
    metrics::{
        Direction, CONNECTIONS_REFUSED_TOTAL, HTTP_ERRORS_TOTAL, MTLS_REFUSED_TOTAL,
        TCP_BYTES_TOTAL, TCP_CONNECTIONS_OPEN, TCP_CONNECTIONS_TOTAL, TLS_HANDSHAKES_TOTAL,
    },
    routing::table::SharedTable,
    settings::Settings,
    shutdown::Drain,
    stack::balance::outlier::Answer,
    upstream::pool::{Opaque, Pool, H2_CONNECTION_WINDOW, H2_STREAM_WINDOW},
};
use arc_swap::ArcSwapOption;
use bytes::BytesMut;
use detect::Protocol;
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use io::ClientIo;
use std::{net::SocketAddr, pin::pin, sync::Arc, time::Duration};
use tokio::net::{TcpListener, TcpStream};
use trellis_proto::model::{
    authorization::{Call, Peer},
    config::MtlsMode,
};

/// Response bytes one HTTP/2 stream may buffer beyond what the client's window
/// lets through.
const H2_SEND_BUFFER: usize = 64 * 1024;

/// Everything a connection handler needs, shared by all of one listener's connections.
pub struct Listener {
    direction: Direction,
    /// True once a config is in place; connections wait for it (bounded).
    loaded: tokio::sync::watch::Receiver<bool>,
    settings: Arc<Settings>,
    http: Arc<Shared>,
    /// The proxy's certificate, with which inbound mesh mTLS is accepted.
    identity: Option<Arc<Identity>>,
    /// The TLS configuration of the current certificate, and that certificate.
    server_config: ArcSwapOption<(Arc<Credentials>, Arc<rustls::ServerConfig>)>,
    h1: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
    /// One permit per open connection (`--max-connections`).
    open: Arc<tokio::sync::Semaphore>,
}

impl Listener {
    pub fn new(
        direction: Direction,
        settings: &Arc<Settings>,
        loaded: tokio::sync::watch::Receiver<bool>,
        table: &SharedTable,
        pool: &Arc<Pool>,
        identity: Option<Arc<Identity>>,
    ) -> Arc<Listener> {
        let mut h1 = http1::Builder::new();
        // `--header-read-timeout` is kept by `HeadDeadline`, not by hyper's timer.
        h1.header_read_timeout(None::<Duration>)
            .max_buf_size(settings.max_header_bytes.max(8192) as usize);
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .max_concurrent_streams(settings.http2_max_concurrent_streams)
            .max_header_list_size(settings.max_header_bytes)
            // What a stream may hold for a client whose window is shut: with
            // hyper's 400 KiB, 100 streams that never read held 40 MiB.
            .max_send_buf_size(H2_SEND_BUFFER)
            .initial_stream_window_size(H2_STREAM_WINDOW)
            .initial_connection_window_size(H2_CONNECTION_WINDOW);
        Arc::new(Listener {
            direction,
            loaded,
            settings: settings.clone(),
            http: Arc::new(Shared {
                direction,
                table: table.clone(),
                pool: pool.clone(),
                access_log: settings.access_log,
                response_headers_timeout: settings.response_headers_timeout,
                request_idle_timeout: settings.request_idle_timeout,
                request_metrics: Default::default(),
            }),
            identity,
            server_config: ArcSwapOption::empty(),
            h1,
            h2,
            open: Arc::new(tokio::sync::Semaphore::new(
                settings
                    .max_connections
                    .min(tokio::sync::Semaphore::MAX_PERMITS),
            )),
        })
    }
}

pub async fn accept_loop(listener: TcpListener, state: Arc<Listener>, mut drain: Drain) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = drain.signaled() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                let Ok(permit) = state.open.clone().try_acquire_owned() else {
                    // Full: close at once rather than queue without bound.
                    metrics::counter!(CONNECTIONS_REFUSED_TOTAL, "direction" => state.direction.label())
                        .increment(1);
                    tracing::debug!(%peer, direction = state.direction.label(), "--max-connections reached; closing");
                    continue;
                };
                let (state, drain) = (state.clone(), drain.clone());
                tokio::spawn(async move {
                    handle(stream, peer, state, drain).await;
                    drop(permit);
                });
            }
            Err(error) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(%error, direction = state.direction.label(), "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// The destination the client dialled before iptables redirected it here; `None`
/// when it dialled the proxy itself.
fn original_dst(stream: &TcpStream) -> Option<SocketAddr> {
    let sock = socket2::SockRef::from(stream);
    let original = sock
        .original_dst_v4()
        .or_else(|_| sock.original_dst_v6())
        .ok()?
        .as_socket()?;
    (Some(original) != stream.local_addr().ok()).then_some(original)
}

/// Decrements the open-connections gauge however the connection ends.
struct OpenGuard(metrics::Gauge);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

async fn handle(mut stream: TcpStream, peer: SocketAddr, state: Arc<Listener>, drain: Drain) {
    let _ = stream.set_nodelay(true);
    if !*state.loaded.borrow() {
        // Dynamic mode before the first config: hold the connection until it comes.
        let mut loaded = state.loaded.clone();
        let wait = loaded.wait_for(|loaded| *loaded);
        if tokio::time::timeout(state.settings.connect_timeout, wait)
            .await
            .is_err()
        {
            tracing::warn!(
                direction = state.direction.label(),
                "no config from the control plane yet; closing"
            );
            return;
        }
    }
    let original_dst = original_dst(&stream);
    let direction = state.direction.label();

    let mut prefix = BytesMut::new();
    let protocol = match original_dst {
        Some(dst) if state.settings.opaque_ports.contains(&dst.port()) => Protocol::Opaque,
        _ => match detect::detect(&mut stream, &mut prefix, state.settings.detect_timeout).await {
            Ok(protocol) => protocol,
            Err(error) => {
                tracing::debug!(%error, direction, "connection failed during detection");
                return;
            }
        },
    };
    let labels = [("direction", direction), ("protocol", protocol.label())];
    metrics::counter!(TCP_CONNECTIONS_TOTAL, &labels).increment(1);
    let open = metrics::gauge!(TCP_CONNECTIONS_OPEN, &labels);
    open.increment(1.0);
    let _open = OpenGuard(open);
    let io = ClientIo::new(
        prefix.freeze(),
        stream,
        metrics::counter!(TCP_BYTES_TOTAL, "direction" => direction, "protocol" => protocol.label(), "flow" => "client_to_server"),
        metrics::counter!(TCP_BYTES_TOTAL, "direction" => direction, "protocol" => protocol.label(), "flow" => "server_to_client"),
    );

    // A STRICT port of the pod takes mesh mTLS only.
    let strict = state.direction == Direction::Inbound
        && original_dst.is_some_and(|dst| {
            state.http.table.load().inbound_mtls(dst.port()) == MtlsMode::Strict
        });
    match protocol {
        Protocol::Http1 | Protocol::Http2 | Protocol::Opaque if strict => {
            refuse_strict("plaintext", peer);
        }
        Protocol::Http1 | Protocol::Http2 => {
            serve_http(io, protocol, &state, original_dst, peer, None, drain).await;
        }
        Protocol::Tls => match (state.direction, mesh_server_config(&state)) {
            (Direction::Inbound, Some(config)) => {
                inbound_tls(io, config, strict, &state, original_dst, peer, drain).await;
            }
            _ if strict => refuse_strict("not_mesh", peer),
            _ => opaque(io, original_dst, None, &state, drain).await,
        },
        Protocol::Opaque => opaque(io, original_dst, None, &state, drain).await,
    }
}

/// Closes a connection a STRICT port does not take, saying why.
fn refuse_strict(reason: &'static str, peer: SocketAddr) {
    metrics::counter!(MTLS_REFUSED_TOTAL, "reason" => reason).increment(1);
    tracing::info!(reason, %peer, "refused by a STRICT port: only mesh mTLS is accepted");
}

/// The TLS configuration inbound mesh mTLS is accepted with, once the proxy has a
/// certificate.
fn mesh_server_config(state: &Listener) -> Option<Arc<rustls::ServerConfig>> {
    let credentials = state.identity.as_ref()?.current()?;
    // Built once per certificate, not per connection.
    if let Some(built) = &*state.server_config.load() {
        let (built_for, config) = &**built;
        if Arc::ptr_eq(built_for, &credentials) {
            return Some(config.clone());
        }
    }
    match crate::tls::server_config(&credentials) {
        Ok(config) => {
            state
                .server_config
                .store(Some(Arc::new((credentials, config.clone()))));
            Some(config)
        }
        Err(error) => {
            tracing::warn!(%error, "cannot accept mesh mTLS");
            None
        }
    }
}

/// Serves HTTP on one connection (plain, or inside mesh mTLS) until it ends or
/// the drain asks it to finish.
async fn serve_http<I>(
    io: I,
    protocol: Protocol,
    state: &Listener,
    original_dst: Option<SocketAddr>,
    peer: SocketAddr,
    caller: Option<Arc<Peer>>,
    drain: Drain,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let direction = state.direction.label();
    let service = |head_wait| {
        HttpProxy::new(
            state.http.clone(),
            original_dst,
            peer,
            caller,
            protocol,
            drain.clone(),
            head_wait,
        )
    };
    if protocol == Protocol::Http2 {
        // Counted only if it floods: nothing is looked up per connection.
        let io = flood::FloodGuard::new(io, direction);
        let conn = pin!(state.h2.serve_connection(TokioIo::new(io), service(None)));
        let result = drain
            .wind_down_on_signal(conn, |conn| conn.graceful_shutdown())
            .await;
        if let Err(error) = result {
            count_http_error(direction, &error);
            tracing::debug!(%error, direction, "HTTP/2 connection ended with an error");
        }
    } else {
        let wait = HeadWait::new();
        let limit = state.settings.header_read_timeout;
        let conn = state
            .h1
            .serve_connection(TokioIo::new(io), service(Some(wait.clone())))
            .with_upgrades();
        let conn = pin!(conn);
        let watched = pin!(HeadDeadline::new(conn, wait, limit));
        let result = drain
            .wind_down_on_signal(watched, |watched| {
                watched.get_mut().conn().graceful_shutdown()
            })
            .await;
        match result {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                count_http_error(direction, &error);
                tracing::debug!(%error, direction, "HTTP/1 connection ended with an error");
            }
            Err(HeadTimedOut) => {
                count_http_error_kind(direction, "timeout");
                tracing::debug!(
                    direction,
                    ?limit,
                    "no request head within --header-read-timeout"
                );
            }
        }
    }
}

/// Counts a connection that ended on a client's protocol error, by kind: what
/// hyper refused (`malformed`: 400, `too_large`: 431), an HTTP/2 protocol
/// violation (`http2`, the connection closed with GOAWAY).
fn count_http_error(direction: &'static str, error: &hyper::Error) {
    let kind = if error.is_parse_too_large() {
        "too_large"
    } else if error.is_parse() || error.is_parse_status() {
        "malformed"
    } else if std::error::Error::source(error)
        .is_some_and(|source| source.downcast_ref::<h2::Error>().is_some())
    {
        "http2"
    } else {
        return;
    };
    count_http_error_kind(direction, kind);
}

/// Counts a connection closed for a client's fault: also `timeout`, a request
/// head not sent within `--header-read-timeout`.
fn count_http_error_kind(direction: &'static str, kind: &'static str) {
    metrics::counter!(HTTP_ERRORS_TOTAL, "direction" => direction, "kind" => kind).increment(1);
}

/// TLS arriving at the pod: a ClientHello that asks for mesh mTLS is terminated
/// here (the caller's certificate required) and what it carries served by its
/// ALPN; any other TLS is the app's own and passes through untouched.
async fn inbound_tls<I>(
    io: I,
    config: Arc<rustls::ServerConfig>,
    strict: bool,
    state: &Listener,
    original_dst: Option<SocketAddr>,
    peer: SocketAddr,
    drain: Drain,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let acceptor = tokio_rustls::LazyConfigAcceptor::new(
        rustls::server::Acceptor::default(),
        io::Recorder::new(io),
    );
    let mut start = match tokio::time::timeout(state.settings.detect_timeout, acceptor).await {
        Ok(Ok(start)) => start,
        Ok(Err(error)) => {
            tracing::debug!(%error, "not a TLS ClientHello; closing");
            return;
        }
        Err(_) => {
            tracing::debug!("no whole ClientHello in time; closing");
            return;
        }
    };
    let mesh = start
        .client_hello()
        .alpn()
        .is_some_and(|mut protocols| protocols.any(crate::tls::is_mesh_alpn));
    if !mesh && strict {
        return refuse_strict("not_mesh", peer);
    }
    if !mesh {
        // The app's own TLS: replay what was read, then pass everything through.
        let (read, rest) = start.io.into_parts();
        let replayed = ClientIo::new(
            read,
            rest,
            metrics::Counter::noop(),
            metrics::Counter::noop(),
        );
        return opaque(replayed, original_dst, None, state, drain).await;
    }
    start.io.stop();
    let tls = match tokio::time::timeout(state.settings.detect_timeout, start.into_stream(config))
        .await
    {
        Ok(Ok(tls)) => tls,
        Ok(Err(error)) => {
            metrics::counter!(TLS_HANDSHAKES_TOTAL, "result" => "refused").increment(1);
            tracing::info!(%error, %peer, "mesh mTLS handshake refused");
            return;
        }
        Err(_) => {
            metrics::counter!(TLS_HANDSHAKES_TOTAL, "result" => "timeout").increment(1);
            return;
        }
    };
    metrics::counter!(TLS_HANDSHAKES_TOTAL, "result" => "ok").increment(1);
    let (_, session) = tls.get_ref();
    // The client verifier took the chain; its leaf's one URI is the caller.
    let caller: Option<Arc<Peer>> = session
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(|leaf| crate::tls::uri_names(leaf).into_iter().next())
        .map(|identity| Arc::new(Peer::new(&identity)));
    tracing::debug!(?caller, %peer, "mesh mTLS accepted");
    let protocol = match session.alpn_protocol() {
        Some(crate::tls::ALPN_HTTP2) => Protocol::Http2,
        Some(crate::tls::ALPN_HTTP1) => Protocol::Http1,
        _ => return opaque(tls, original_dst, caller.as_deref(), state, drain).await,
    };
    serve_http(tls, protocol, state, original_dst, peer, caller, drain).await
}

/// Opaque bytes: outbound to a service's cluster IP, one of its endpoints, chosen
/// by its balancer, inside mesh mTLS when its identity is known, where the
/// connection counts as in flight while it lasts; anything else where the client
/// dialled. Inbound, the port's authorization decides first (`caller` is the
/// identity mesh mTLS proved, if any).
async fn opaque<C>(
    mut io: C,
    original_dst: Option<SocketAddr>,
    caller: Option<&Peer>,
    state: &Listener,
    drain: Drain,
) where
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + 'static,
{
    let direction = state.direction.label();
    let Some(dst) = original_dst else {
        tracing::debug!(
            direction,
            "opaque connection with no original destination; closing"
        );
        return;
    };
    let (pick, peer) = match state.direction {
        Direction::Outbound => {
            let table = state.http.table.load();
            let backend = table
                .lookup_addr(&dst)
                .and_then(|target| table.backend(&target.label));
            match backend {
                Some(backend) => {
                    let destination = backend.current();
                    match destination.balancer.pick(None, None) {
                        Some(pick) => {
                            let peer = destination.identities.get(&pick.addr()).cloned();
                            (Some(pick), peer)
                        }
                        None => {
                            tracing::debug!(direction, %dst, "no endpoints for this cluster IP; closing");
                            return;
                        }
                    }
                }
                None => (None, None),
            }
        }
        Direction::Inbound => {
            if !authorized(state, dst.port(), caller, Call::Opaque) {
                return;
            }
            (None, None)
        }
    };
    let target = pick.as_ref().map_or(dst, |pick| pick.addr());
    let result = match state.http.pool.connect_opaque(target, peer.as_ref()).await {
        // Plain TCP on both sides (no TLS, no replayed ClientHello): splice(2).
        Ok(Opaque::Plain(server)) => {
            match (&mut io as &mut dyn std::any::Any).downcast_mut::<ClientIo<TcpStream>>() {
                Some(client) => tcp::splice(client, server).await,
                None => tcp::copy(&mut io, server).await,
            }
        }
        Ok(Opaque::Mtls(server)) => tcp::copy(&mut io, server).await,
        Err(error) => {
            tracing::debug!(%error, direction, %target, "opaque connect failed; closing");
            if let Some(pick) = pick {
                pick.finish(Answer::GatewayError);
            }
            return;
        }
    };
    // Opaque bytes carry no signal for shutdown: they run until either side
    // closes or the drain timeout ends the process.
    if let Err(error) = result {
        tracing::debug!(%error, direction, %target, "opaque connection ended with an error");
    }
    drop(pick);
    drop(drain);
}

/// Whether the pod's `port` lets `caller` make `call`; a refusal is counted and
/// logged.
fn authorized(state: &Listener, port: u16, caller: Option<&Peer>, call: Call<'_>) -> bool {
    let table = state.http.table.load();
    crate::http::authorize(&table, port, caller, call).is_ok()
}
