//! The control plane's admin port: `GET /live`, `GET /ready` (200 once the first
//! snapshot is translated), `GET /metrics`, `GET /proxies` (what each proxy was
//! sent and last ACKed or NACKed), `GET /status` (each object's conditions and, in
//! local mode, the files that did not parse).

use crate::{hub::Hub, local::FileErrors, server::Proxies};
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use std::{convert::Infallible, sync::Arc};
use tokio::net::TcpListener;

pub struct Admin {
    pub hub: Hub,
    pub proxies: Proxies,
    pub file_errors: FileErrors,
    pub metrics: PrometheusHandle,
}

fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}

fn json(value: serde_json::Value) -> Response<Full<Bytes>> {
    respond(
        StatusCode::OK,
        "application/json",
        serde_json::to_vec_pretty(&value).unwrap_or_default(),
    )
}

fn handle(admin: &Admin, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    const TEXT: &str = "text/plain; charset=utf-8";
    if req.method() != Method::GET {
        return respond(StatusCode::METHOD_NOT_ALLOWED, TEXT, "method not allowed\n");
    }
    match req.uri().path() {
        "/live" => respond(StatusCode::OK, TEXT, "live\n"),
        "/ready" => match admin.hub.current() {
            Some(_) => respond(StatusCode::OK, TEXT, "ready\n"),
            None => respond(
                StatusCode::SERVICE_UNAVAILABLE,
                TEXT,
                "not ready: no objects translated yet\n",
            ),
        },
        "/metrics" => respond(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            admin.metrics.render(),
        ),
        "/proxies" => json(serde_json::json!({ "proxies": admin.proxies.list() })),
        "/status" => {
            let snapshot = admin.hub.current();
            let objects: Vec<_> = snapshot
                .iter()
                .flat_map(|snapshot| snapshot.statuses().iter().map(move |s| (snapshot, s)))
                .map(|(snapshot, s)| {
                    let id = (s.kind.to_owned(), s.namespace.clone(), s.name.clone());
                    serde_json::json!({
                        "file": snapshot.objects.origins.get(&id),
                        "kind": s.kind,
                        "namespace": s.namespace,
                        "name": s.name,
                        "accepted": s.accepted,
                        "resolvedRefs": s.resolved_refs,
                        "reason": s.reason,
                        "message": s.message,
                    })
                })
                .collect();
            json(serde_json::json!({
                "version": snapshot.as_ref().map(|s| s.version),
                "objects": objects,
                "fileErrors": admin.file_errors.list(),
            }))
        }
        path => respond(
            StatusCode::NOT_FOUND,
            TEXT,
            format!("no admin endpoint {path}\n"),
        ),
    }
}

pub async fn serve(listener: TcpListener, admin: Arc<Admin>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(handle(&admin, &req)) }
            });
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
