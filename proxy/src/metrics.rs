//! Metric names, what each means (the `# HELP` lines of `/metrics`), label
//! helpers and the Prometheus recorder behind `/metrics`.
//!
//! Every label takes a bounded set of values: direction, protocol, the configured
//! service, route and backend (never a raw host or path), status code, flags.

use metrics::Unit;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;

pub const REQUESTS_TOTAL: &str = "trellis_requests_total";
pub const REQUEST_DURATION: &str = "trellis_request_duration_seconds";
pub const TCP_CONNECTIONS_TOTAL: &str = "trellis_tcp_connections_total";
pub const TCP_CONNECTIONS_OPEN: &str = "trellis_tcp_connections_open";
pub const TCP_BYTES_TOTAL: &str = "trellis_tcp_bytes_total";
pub const RETRIES_TOTAL: &str = "trellis_retries_total";
pub const RETRY_BUDGET_EXHAUSTED_TOTAL: &str = "trellis_retry_budget_exhausted_total";
pub const RETRY_OVERFLOW_TOTAL: &str = "trellis_retry_overflow_total";
pub const RATELIMITED_TOTAL: &str = "trellis_ratelimited_total";
pub const FAULTS_INJECTED_TOTAL: &str = "trellis_faults_injected_total";
pub const OVERFLOW_TOTAL: &str = "trellis_overflow_total";
/// Counter, label `backend`: one per ejection.
pub const OUTLIER_EJECTIONS_TOTAL: &str = "trellis_outlier_ejections_total";
/// Gauge, label `backend`: endpoints ejected right now.
pub const ENDPOINTS_EJECTED: &str = "trellis_endpoints_ejected";
pub const CONFIG_RELOADS_TOTAL: &str = "trellis_config_reloads_total";
pub const TLS_HANDSHAKES_TOTAL: &str = "trellis_tls_handshakes_total";
pub const MTLS_REFUSED_TOTAL: &str = "trellis_mtls_refused_total";
/// Counter, labels `direction`, `kind` (`malformed`, `too_large`, `timeout`,
/// `http2`): client connections that ended on a protocol error.
pub const HTTP_ERRORS_TOTAL: &str = "trellis_http_errors_total";
/// Counter, label `direction`: connections closed at once, `--max-connections`
/// being reached.
pub const CONNECTIONS_REFUSED_TOTAL: &str = "trellis_connections_refused_total";
/// Counter, labels `port` (the pod's) and `protocol` (`http`, `opaque`).
pub const AUTHZ_DENIED_TOTAL: &str = "trellis_authz_denied_total";

/// Says what every metric means, so `/metrics` carries a `# HELP` line for each.
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        REQUESTS_TOTAL,
        "HTTP requests proxied, by direction, protocol, service, route, backend, status code and response flags"
    );
    describe_histogram!(
        REQUEST_DURATION,
        Unit::Seconds,
        "Time from a request's arrival to its response headers, by direction, protocol, service and route"
    );
    describe_counter!(
        TCP_CONNECTIONS_TOTAL,
        "Connections accepted, by direction and detected protocol"
    );
    describe_gauge!(
        TCP_CONNECTIONS_OPEN,
        "Connections open now, by direction and detected protocol"
    );
    describe_counter!(
        TCP_BYTES_TOTAL,
        Unit::Bytes,
        "Bytes relayed for clients, by direction, protocol and flow"
    );
    describe_counter!(RETRIES_TOTAL, "Retries sent, by service and route");
    describe_counter!(
        RETRY_BUDGET_EXHAUSTED_TOTAL,
        "Retries not sent because the route's retry budget was spent, by service and route"
    );
    describe_counter!(
        RETRY_OVERFLOW_TOTAL,
        "Retries not sent because maxRetries were already in flight, by service and route"
    );
    describe_counter!(
        RATELIMITED_TOTAL,
        "Requests refused with 429 by a rate limit: outbound by service and route, inbound by port"
    );
    describe_counter!(
        FAULTS_INJECTED_TOTAL,
        "Faults injected (kind delay or abort), by service and route"
    );
    describe_counter!(
        OVERFLOW_TOTAL,
        "Requests refused with 503 UO by a destination's connection pool limits, by backend"
    );
    describe_counter!(
        OUTLIER_EJECTIONS_TOTAL,
        "Endpoints ejected by outlier detection, by backend"
    );
    describe_gauge!(
        ENDPOINTS_EJECTED,
        "Endpoints ejected by outlier detection now, by backend"
    );
    describe_gauge!(
        crate::identity::CERTIFICATE_EXPIRY,
        Unit::Seconds,
        "When the proxy's certificate expires, in seconds since the Unix epoch: alert on time() getting near it"
    );
    describe_counter!(
        crate::identity::RENEWALS_TOTAL,
        "Certificate requests to the control plane, by result (ok, or error while the current one is kept)"
    );
    describe_counter!(
        TLS_HANDSHAKES_TOTAL,
        "Mesh mTLS handshakes, by direction and result (ok, refused, timeout, error)"
    );
    describe_counter!(
        MTLS_REFUSED_TOTAL,
        "Inbound connections a STRICT port refused, by reason (plaintext, not_mesh)"
    );
    describe_counter!(
        HTTP_ERRORS_TOTAL,
        "Client connections that ended on a protocol error, by direction and kind (malformed: 400, too_large: 431, timeout: request head not sent in time, http2: closed with GOAWAY)"
    );
    describe_counter!(
        CONNECTIONS_REFUSED_TOTAL,
        "Connections closed at once because the listener had --max-connections open, by direction"
    );
    describe_counter!(
        AUTHZ_DENIED_TOTAL,
        "Inbound calls a port's authorization policy refused (HTTP 403 AZ, or a closed connection), by port and protocol"
    );
    describe_counter!(
        CONFIG_RELOADS_TOTAL,
        "Config file reloads, by result (ok, or error when the running config was kept)"
    );
}

/// Which side of the pod a connection came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the pod's application to somewhere else.
    Outbound,
    /// From somewhere else to the pod's application.
    Inbound,
}

impl Direction {
    pub fn label(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

/// Latency buckets in seconds: sub-millisecond resolution where a sidecar lives,
/// out to the timeouts operators set.
const DURATION_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Installs the process-wide recorder once and returns the handle that renders it.
pub fn install() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(REQUEST_DURATION.into()), DURATION_BUCKETS)
                .expect("buckets are a non-empty constant")
                .build_recorder();
            let handle = recorder.handle();
            // Fails only if a recorder is already installed (tests in one process);
            // then that one keeps recording and this handle renders nothing new.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            handle
        })
        .clone()
}

/// The status code as a `'static` label, so counting a response allocates nothing.
pub fn status_label(code: u16) -> &'static str {
    static LABELS: OnceLock<Vec<&'static str>> = OnceLock::new();
    let labels = LABELS.get_or_init(|| {
        (0..1000u16)
            .map(|c| &*Box::leak(c.to_string().into_boxed_str()))
            .collect()
    });
    labels.get(usize::from(code)).copied().unwrap_or("other")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_has_help() {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            describe();
            for name in [
                REQUESTS_TOTAL,
                TCP_CONNECTIONS_TOTAL,
                TCP_BYTES_TOTAL,
                RETRIES_TOTAL,
                RETRY_BUDGET_EXHAUSTED_TOTAL,
                RETRY_OVERFLOW_TOTAL,
                RATELIMITED_TOTAL,
                FAULTS_INJECTED_TOTAL,
                OVERFLOW_TOTAL,
                OUTLIER_EJECTIONS_TOTAL,
                CONFIG_RELOADS_TOTAL,
                crate::identity::RENEWALS_TOTAL,
                TLS_HANDSHAKES_TOTAL,
                MTLS_REFUSED_TOTAL,
                AUTHZ_DENIED_TOTAL,
                HTTP_ERRORS_TOTAL,
                CONNECTIONS_REFUSED_TOTAL,
            ] {
                metrics::counter!(name).increment(1);
            }
            metrics::gauge!(TCP_CONNECTIONS_OPEN).set(1.0);
            metrics::gauge!(ENDPOINTS_EJECTED).set(1.0);
            metrics::gauge!(crate::identity::CERTIFICATE_EXPIRY).set(1.0);
            metrics::histogram!(REQUEST_DURATION).record(0.1);
        });
        let text = handle.render();
        let types: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split(' ').next())
            .collect();
        assert_eq!(types.len(), 21, "{text}");
        for name in types {
            assert!(
                text.contains(&format!("# HELP {name} ")),
                "{name} has no HELP line:\n{text}"
            );
        }
    }

    #[test]
    fn status_labels_are_the_codes() {
        assert_eq!(status_label(200), "200");
        assert_eq!(status_label(503), "503");
        assert_eq!(status_label(1000), "other");
    }
}
