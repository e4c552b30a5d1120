//! `trellis-proxy run`: binds the outbound, inbound and admin listeners, proxies
//! every accepted connection, and drains on SIGTERM or `POST /shutdown`.

use crate::{
    admin::{self, AdminState},
    config::Config,
    detect::{self, Protocol},
    http::{HttpProxy, Shared},
    io::ClientIo,
    metrics::{Direction, TCP_BYTES_TOTAL, TCP_CONNECTIONS_OPEN, TCP_CONNECTIONS_TOTAL},
    pool::Pool,
    shutdown::{self, Drain},
    table,
};
use bytes::BytesMut;
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde::Serialize;
use std::{
    collections::BTreeSet,
    io,
    net::SocketAddr,
    path::PathBuf,
    sync::{atomic::Ordering, Arc},
    time::Duration,
};
use tokio::net::{TcpListener, TcpStream};

/// How the proxy runs; all of it comes from flags (see `trellis-proxy run --help`).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Settings {
    pub config_file: Option<PathBuf>,
    /// The control plane's discovery URL (dynamic mode), instead of a config file.
    pub control_plane: Option<String>,
    #[serde(skip)]
    pub identity: crate::discovery::Identity,
    pub outbound_addr: SocketAddr,
    pub inbound_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    #[serde(with = "crate::duration::serde_text")]
    pub detect_timeout: Duration,
    #[serde(with = "crate::duration::serde_text")]
    pub connect_timeout: Duration,
    #[serde(with = "crate::duration::serde_text")]
    pub drain_timeout: Duration,
    /// How often the config file is checked for changes.
    #[serde(with = "crate::duration::serde_text")]
    pub config_poll: Duration,
    pub access_log: bool,
    /// Ports proxied as opaque TCP without detection (server-first protocols).
    pub opaque_ports: BTreeSet<u16>,
}

/// Linkerd's default opaque ports: SMTP, MySQL, Galera, PostgreSQL, Redis,
/// Elasticsearch, memcached. Their servers speak first, so detection would stall.
pub const DEFAULT_OPAQUE_PORTS: [u16; 8] = [25, 587, 3306, 4444, 5432, 6379, 9300, 11211];

/// Everything a connection handler needs, shared by all of one listener's connections.
struct Listener {
    direction: Direction,
    /// True once a config is in place; connections wait for it (bounded).
    loaded: tokio::sync::watch::Receiver<bool>,
    settings: Arc<Settings>,
    http: Arc<Shared>,
    h1: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
}

/// Runs the proxy until shutdown is requested and the drain finishes.
pub async fn run(settings: Settings, config: Config) -> io::Result<()> {
    let metrics = crate::metrics::install();
    let settings = Arc::new(settings);
    let pool = Pool::new(settings.connect_timeout);
    let table = table::shared(config, &pool).map_err(io::Error::other)?;

    let bind = |addr: SocketAddr, what: &'static str| async move {
        TcpListener::bind(addr).await.map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot bind the {what} listener on {addr}: {e}"),
            )
        })
    };
    let outbound = bind(settings.outbound_addr, "outbound").await?;
    let inbound = bind(settings.inbound_addr, "inbound").await?;
    let admin_listener = bind(settings.admin_addr, "admin").await?;

    let admin = AdminState::new(metrics, table.clone(), settings.clone());
    tokio::spawn(admin::serve(admin_listener, admin.clone()));

    let (loaded_tx, loaded) = tokio::sync::watch::channel(settings.control_plane.is_none());
    if let Some(url) = settings.control_plane.clone() {
        tokio::spawn(crate::discovery::run(
            url,
            settings.identity.clone(),
            table.clone(),
            pool.clone(),
            loaded_tx,
        ));
    } else {
        drop(loaded_tx);
    }
    let (trigger, drain) = shutdown::channel();
    for (listener, direction) in [
        (outbound, Direction::Outbound),
        (inbound, Direction::Inbound),
    ] {
        let state = Arc::new(Listener {
            direction,
            loaded: loaded.clone(),
            settings: settings.clone(),
            http: Arc::new(Shared {
                direction,
                table: table.clone(),
                pool: pool.clone(),
                access_log: settings.access_log,
            }),
            h1: {
                let mut b = http1::Builder::new();
                b.timer(TokioTimer::new());
                b
            },
            h2: {
                let mut b = http2::Builder::new(TokioExecutor::new());
                b.timer(TokioTimer::new());
                b
            },
        });
        tokio::spawn(accept_loop(listener, state, drain.clone()));
    }
    drop(drain);
    if let Some(path) = settings.config_file.clone() {
        tokio::spawn(watch_config(
            path,
            settings.config_poll,
            table.clone(),
            pool.clone(),
        ));
    }
    admin.listening.store(true, Ordering::Release);
    tokio::spawn(mark_loaded(loaded, admin.clone()));
    tracing::info!(
        outbound = %settings.outbound_addr,
        inbound = %settings.inbound_addr,
        admin = %settings.admin_addr,
        "proxy ready"
    );

    wait_for_shutdown(&admin).await;
    admin.listening.store(false, Ordering::Release);
    tracing::info!(timeout = ?settings.drain_timeout, "draining");
    if trigger.drain(settings.drain_timeout).await {
        tracing::info!("drained");
    } else {
        tracing::warn!("drain timeout passed with connections still open; exiting");
    }
    Ok(())
}

/// Tells the admin port once the first config is in place.
async fn mark_loaded(mut loaded: tokio::sync::watch::Receiver<bool>, admin: Arc<AdminState>) {
    // Ok at once with a config file (the value starts true); with a control plane,
    // once the first version is applied.
    if loaded.wait_for(|loaded| *loaded).await.is_ok() {
        admin.config_loaded.store(true, Ordering::Release);
    }
}

/// Reloads the config file when it changes. A file that does not load is reported
/// (with file, line and field) and the running config stays.
async fn watch_config(path: PathBuf, every: Duration, table: table::SharedTable, pool: Arc<Pool>) {
    let stamp = |path: &PathBuf| {
        std::fs::metadata(path)
            .ok()
            .map(|m| (m.modified().ok(), m.len()))
    };
    let mut seen = stamp(&path);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = stamp(&path);
        if now == seen {
            continue;
        }
        seen = now;
        let loaded = crate::config::load(&path)
            .map_err(|e| e.to_string())
            .and_then(|config| table::RouteTable::new(config, &pool));
        match loaded {
            Ok(new) => {
                table.store(Arc::new(new));
                metrics::counter!("trellis_config_reloads_total", "result" => "ok").increment(1);
                tracing::info!(file = %path.display(), "config reloaded");
            }
            Err(error) => {
                metrics::counter!("trellis_config_reloads_total", "result" => "error").increment(1);
                tracing::error!(%error, "config not reloaded; keeping the running config");
            }
        }
    }
}

async fn wait_for_shutdown(admin: &AdminState) {
    use tokio::signal::unix::{signal, SignalKind};
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(term), Ok(int)) => (term, int),
        _ => {
            tracing::warn!("cannot install signal handlers; only POST /shutdown stops the proxy");
            admin.shutdown.notified().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = int.recv() => tracing::info!("SIGINT"),
        _ = admin.shutdown.notified() => tracing::info!("shutdown requested on the admin port"),
    }
}

async fn accept_loop(listener: TcpListener, state: Arc<Listener>, mut drain: Drain) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = drain.signaled() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                tokio::spawn(handle(stream, peer, state.clone(), drain.clone()));
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

async fn handle(mut stream: TcpStream, peer: SocketAddr, state: Arc<Listener>, mut drain: Drain) {
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

    match protocol {
        Protocol::Http1 => {
            let service = HttpProxy::new(state.http.clone(), original_dst, peer, protocol);
            let conn = state
                .h1
                .serve_connection(TokioIo::new(io), service)
                .with_upgrades();
            tokio::pin!(conn);
            let result = tokio::select! {
                result = conn.as_mut() => result,
                _ = drain.signaled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(error) = result {
                tracing::debug!(%error, direction, "HTTP/1 connection ended with an error");
            }
        }
        Protocol::Http2 => {
            let service = HttpProxy::new(state.http.clone(), original_dst, peer, protocol);
            let conn = state.h2.serve_connection(TokioIo::new(io), service);
            tokio::pin!(conn);
            let result = tokio::select! {
                result = conn.as_mut() => result,
                _ = drain.signaled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(error) = result {
                tracing::debug!(%error, direction, "HTTP/2 connection ended with an error");
            }
        }
        Protocol::Tls | Protocol::Opaque => {
            let Some(dst) = original_dst else {
                tracing::debug!(
                    direction,
                    "opaque connection with no original destination; closing"
                );
                return;
            };
            let mut io = io;
            // Opaque bytes carry no signal for shutdown: they run until either side
            // closes or the drain timeout ends the process.
            if let Err(error) =
                crate::tcp::forward(&mut io, dst, state.settings.connect_timeout).await
            {
                tracing::debug!(%error, direction, %dst, "opaque connection ended with an error");
            }
            drop(drain);
        }
    }
}
