//! The control plane's admin port: `GET /live`, `GET /ready` (200 once the first
//! snapshot is translated), `GET /metrics`, `GET /proxies` (what each proxy was
//! sent and last ACKed or NACKed), `GET /status` (each object's conditions and, in
//! local mode, the files that did not parse).
//!
//! `/metrics` is the Prometheus text of every metric the control plane records,
//! each with its `# HELP` and `# TYPE` ([`describe_metrics`]); histograms of
//! seconds and of bytes each have buckets of their own ([`metrics_recorder`]).

use crate::{discovery::Proxies, hub::Hub, source::local::FileErrors};
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::{
    BuildError, Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};
use std::{convert::Infallible, sync::Arc};
use tokio::net::TcpListener;

/// The recorder behind `/metrics`: histograms in seconds get buckets from 1 ms to
/// 10 s, `trellis_cp_push_bytes` from 256 B to 16 MiB.
pub fn metrics_recorder() -> Result<PrometheusRecorder, BuildError> {
    Ok(PrometheusBuilder::new()
        .set_buckets(&[
            0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ])?
        .set_buckets_for_metric(
            Matcher::Full("trellis_cp_push_bytes".to_owned()),
            &[
                256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0, 16777216.0,
            ],
        )?
        .build_recorder())
}

/// Describes every metric the control plane records, for `# HELP` lines; call it
/// once the recorder is installed.
pub fn describe_metrics() {
    crate::hub::describe_metrics();
    crate::discovery::describe_metrics();
    crate::identity::service::describe_metrics();
    crate::inject::webhook::describe_metrics();
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::testing::{self, services, settle, TestProxy};
    use std::collections::BTreeSet;
    use std::time::Duration;

    /// What `promtool check metrics` asks first: every metric has HELP and TYPE.
    #[tokio::test(start_paused = true)]
    async fn every_metric_on_the_metrics_page_has_help_and_a_type() {
        let recorder = metrics_recorder().unwrap();
        let exporter = recorder.handle();
        let _recorder = metrics::set_default_local_recorder(&recorder);
        describe_metrics();

        // Record every metric the way the control plane does: a translation, a
        // proxy that ACKs a first push and a change, NACKs another, and leaves.
        let hub = Hub::start(Duration::from_millis(10), Duration::from_secs(1));
        hub.update(services(&["a"]));
        let proxies = Proxies::default();
        let service = testing::service(&hub, &proxies);
        let mut proxy = TestProxy::connect(&service, "shop", "p");
        let first = proxy.next().await;
        proxy.answer(&first, None).await;
        hub.update(services(&["a", "b"]));
        let change = proxy.next().await;
        proxy.answer(&change, None).await;
        hub.update(services(&["a"]));
        let refused = proxy.next().await;
        proxy.answer(&refused, Some("no")).await;
        proxy.hang_up();
        settle().await;

        let text = exporter.render();
        let names = |prefix: &str| -> BTreeSet<String> {
            text.lines()
                .filter_map(|line| line.strip_prefix(prefix))
                .filter_map(|rest| rest.split_whitespace().next())
                .map(str::to_owned)
                .collect()
        };
        let (help, types) = (names("# HELP "), names("# TYPE "));
        let expected: BTreeSet<String> = [
            "trellis_cp_connected_proxies",
            "trellis_cp_convergence_seconds",
            "trellis_cp_nacks_total",
            "trellis_cp_push_bytes",
            "trellis_cp_pushes_total",
            "trellis_cp_translation_seconds",
            "trellis_cp_translations_total",
        ]
        .map(str::to_owned)
        .into();
        assert_eq!(types, expected, "{text}");
        let missing: Vec<&String> = types.difference(&help).collect();
        assert!(missing.is_empty(), "no # HELP for {missing:?}:\n{text}");
        // Bytes are counted in byte buckets, not in the seconds' ones.
        assert!(
            text.contains("trellis_cp_push_bytes_bucket{le=\"1048576\"}"),
            "{text}"
        );
    }
}
