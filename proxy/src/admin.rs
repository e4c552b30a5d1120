//! The admin port: probes, Prometheus metrics, the running config, and shutdown.
//!
//! `GET /live`, `GET /ready` (200 once the listeners are bound and config loaded,
//! 503 with the reason otherwise), `GET /metrics`, `GET /config_dump`,
//! `POST /shutdown`.
//!
//! The probes and `/metrics` answer anyone: the kubelet and Prometheus call from
//! outside the pod. Everything else reveals or changes state, so it answers only
//! callers inside the pod (loopback) and refuses the rest of the mesh with 403
//! (Linkerd's and Istio's rule): no other pod can read the config or stop the proxy.

use crate::{identity::Identity, routing::table::SharedTable, settings::Settings};
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use std::{
    convert::Infallible,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};
use tokio::{net::TcpListener, sync::Notify};

pub struct AdminState {
    /// Set once the listeners are bound, cleared when the proxy starts draining.
    pub listening: AtomicBool,
    /// Set once a config is in place (at once with a file; with a control plane,
    /// when its first version has been applied).
    pub config_loaded: AtomicBool,
    /// Wakes the main task when `POST /shutdown` arrives.
    pub shutdown: Notify,
    metrics: PrometheusHandle,
    table: SharedTable,
    settings: Arc<Settings>,
    /// The proxy's certificate, when it has an identity to prove.
    identity: Option<Arc<Identity>>,
}

impl AdminState {
    pub fn new(
        metrics: PrometheusHandle,
        table: SharedTable,
        settings: Arc<Settings>,
        identity: Option<Arc<Identity>>,
    ) -> Arc<Self> {
        Arc::new(AdminState {
            listening: AtomicBool::new(false),
            config_loaded: AtomicBool::new(false),
            shutdown: Notify::new(),
            metrics,
            table,
            settings,
            identity,
        })
    }
}

/// Serves the admin port until the process exits (it stays up while draining so
/// probes see `/ready` turn 503).
pub async fn serve(listener: TcpListener, state: Arc<AdminState>) {
    // Histograms are kept as buckets; upkeep keeps the exporter's memory bounded.
    let upkeep = state.metrics.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(10));
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let state = state.clone();
        let local = is_loopback(peer.ip());
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(respond(&state, req, local)) }
            });
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Whether a caller is inside the pod: loopback, also as an IPv4-mapped address.
fn is_loopback(ip: std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(v4) => v4.is_loopback(),
        std::net::IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// The endpoints anyone may call; the rest answer loopback callers only.
const OPEN_TO_ALL: [&str; 3] = ["/live", "/ready", "/metrics"];

fn respond(state: &AdminState, req: Request<Incoming>, local: bool) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    if !local && !OPEN_TO_ALL.contains(&path) {
        return text(
            StatusCode::FORBIDDEN,
            format!("{path} answers only callers inside the pod (loopback)\n"),
        );
    }
    match (req.method(), path) {
        (&Method::GET, "/live") => text(StatusCode::OK, "live\n"),
        (&Method::GET, "/ready") => {
            if !state.listening.load(Ordering::Acquire) {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: starting up or draining\n",
                )
            } else if state
                .identity
                .as_ref()
                .is_some_and(|identity| identity.current().is_none())
            {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: waiting for a certificate from the control plane\n",
                )
            } else if !state.config_loaded.load(Ordering::Acquire) {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: waiting for the first config from the control plane\n",
                )
            } else {
                text(StatusCode::OK, "ready\n")
            }
        }
        (&Method::GET, "/metrics") => {
            #[cfg(feature = "count-allocations")]
            crate::allocations::publish();
            let mut response = text(StatusCode::OK, state.metrics.render());
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            response
        }
        (&Method::GET, "/config_dump") => {
            let table = state.table.load();
            let dump = serde_json::json!({
                "settings": &*state.settings,
                "identity": state.identity.as_ref().map(|identity| identity.dump()),
                "config": table.effective(),
            });
            let mut response = text(
                StatusCode::OK,
                serde_json::to_vec_pretty(&dump).unwrap_or_default(),
            );
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            );
            response
        }
        (&Method::POST, "/shutdown") => {
            state.shutdown.notify_one();
            text(StatusCode::OK, "shutting down\n")
        }
        (_, "/live" | "/ready" | "/metrics" | "/config_dump" | "/shutdown") => {
            text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
        }
        (_, path) => text(StatusCode::NOT_FOUND, format!("no admin endpoint {path}\n")),
    }
}
