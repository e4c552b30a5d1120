//! Metric names, label helpers and the Prometheus recorder behind `/metrics`.
//!
//! Every label takes a bounded set of values: direction, protocol, the configured
//! service (never a raw host), status code, response flags.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;

pub const REQUESTS_TOTAL: &str = "trellis_requests_total";
pub const REQUEST_DURATION: &str = "trellis_request_duration_seconds";
pub const TCP_CONNECTIONS_TOTAL: &str = "trellis_tcp_connections_total";
pub const TCP_CONNECTIONS_OPEN: &str = "trellis_tcp_connections_open";
pub const TCP_BYTES_TOTAL: &str = "trellis_tcp_bytes_total";

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
    fn status_labels_are_the_codes() {
        assert_eq!(status_label(200), "200");
        assert_eq!(status_label(503), "503");
        assert_eq!(status_label(1000), "other");
    }
}
