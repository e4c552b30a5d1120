//! The vocabulary every stage speaks, and nothing else: the request and response
//! types, [`Failure`] (a request the proxy answers itself), [`Flags`] (why the
//! proxy answered or changed an answer), [`Outcome`] (what an upstream response
//! went through, carried beside it in [`Routed`]) and the request extensions
//! stages leave for each other ([`Avoid`], [`ClientAddr`]). It imports no stage,
//! so every stage and the HTTP service can import it.

use crate::upstream::pool::UpstreamError;
use http::StatusCode;
use std::{future::Future, net::SocketAddr, pin::Pin, sync::Arc, sync::OnceLock, time::Duration};
use trellis_proto::model::policy::GrpcCode;

pub use crate::upstream::body::{Req, Rsp};

/// A stage's answer, borrowed from the stack that runs it.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Envoy-style response flags: why the proxy answered itself or changed the answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Flags(u16);

impl Flags {
    pub const NONE: Flags = Flags(0);
    /// Upstream connect failure.
    pub const UF: Flags = Flags(1 << 0);
    /// Upstream connection closed or reset before a response.
    pub const UC: Flags = Flags(1 << 1);
    /// No healthy upstream: the backend has no endpoints.
    pub const UH: Flags = Flags(1 << 2);
    /// No route.
    pub const NR: Flags = Flags(1 << 3);
    /// Upstream timeout (request or per try).
    pub const UT: Flags = Flags(1 << 4);
    /// Upstream overflow: a circuit-breaker limit.
    pub const UO: Flags = Flags(1 << 5);
    /// Rate limited.
    pub const RL: Flags = Flags(1 << 6);
    /// Delay injected.
    pub const DI: Flags = Flags(1 << 7);
    /// Fault injected (abort).
    pub const FI: Flags = Flags(1 << 8);
    /// Retries exhausted or refused by the budget while the upstream kept failing.
    pub const URX: Flags = Flags(1 << 9);
    /// Refused by the port's authorization policy.
    pub const AZ: Flags = Flags(1 << 10);
    /// Downstream protocol error: the client's request could not be read.
    pub const DPE: Flags = Flags(1 << 11);
    /// Stream idle: the client stalled mid-way through its request body.
    pub const SI: Flags = Flags(1 << 12);

    const NAMES: [&'static str; 13] = [
        "UF", "UC", "UH", "NR", "UT", "UO", "RL", "DI", "FI", "URX", "AZ", "DPE", "SI",
    ];

    pub fn union(self, other: Flags) -> Flags {
        Flags(self.0 | other.0)
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn contains(self, other: Flags) -> bool {
        self.0 & other.0 == other.0
    }

    /// `UF`, `DI,UT`, ... as a `'static` label (every combination is made once).
    pub fn label(self) -> &'static str {
        static LABELS: OnceLock<Vec<&'static str>> = OnceLock::new();
        let labels = LABELS.get_or_init(|| {
            (0..1u16 << Flags::NAMES.len())
                .map(|bits| {
                    let names: Vec<&str> = Flags::NAMES
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| bits & (1 << i) != 0)
                        .map(|(_, n)| *n)
                        .collect();
                    &*Box::leak(names.join(",").into_boxed_str())
                })
                .collect()
        });
        labels[usize::from(self.0)]
    }
}

/// What kind of failure, for retry conditions and outlier detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    ConnectFailure,
    Reset,
    Timeout,
    /// Refused by the proxy's own policy (limits, faults, no endpoints).
    Local,
}

/// A request the proxy answers itself; `http::respond` turns it into the response.
#[derive(Debug)]
pub struct Failure {
    pub status: StatusCode,
    /// What a gRPC client is told instead; `None`: the gRPC code for `status`.
    pub grpc: Option<GrpcCode>,
    pub flags: Flags,
    pub kind: FailureKind,
    pub message: String,
    pub backend: Option<Arc<str>>,
    /// The endpoint that failed, so a retry can go elsewhere.
    pub endpoint: Option<SocketAddr>,
}

impl Failure {
    pub fn local(status: StatusCode, flags: Flags, message: impl Into<String>) -> Failure {
        Failure {
            status,
            grpc: None,
            flags,
            kind: FailureKind::Local,
            message: message.into(),
            backend: None,
            endpoint: None,
        }
    }

    pub fn timeout(after: Duration) -> Failure {
        Failure {
            kind: FailureKind::Timeout,
            grpc: Some(GrpcCode::DeadlineExceeded),
            ..Failure::local(
                StatusCode::GATEWAY_TIMEOUT,
                Flags::UT,
                format!(
                    "no response within {}",
                    trellis_proto::model::duration::format(after)
                ),
            )
        }
    }

    pub fn upstream(
        error: &UpstreamError,
        backend: Option<&Arc<str>>,
        endpoint: SocketAddr,
    ) -> Failure {
        let (status, flags, kind) = if error.is_client_body() {
            // The client's fault: not retried, and no mark against the endpoint.
            (StatusCode::BAD_REQUEST, Flags::DPE, FailureKind::Local)
        } else if error.is_overflow() {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Flags::UO,
                FailureKind::Local,
            )
        } else if error.is_connect() {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Flags::UF,
                FailureKind::ConnectFailure,
            )
        } else {
            (StatusCode::BAD_GATEWAY, Flags::UC, FailureKind::Reset)
        };
        Failure {
            kind,
            backend: backend.cloned(),
            endpoint: Some(endpoint),
            ..Failure::local(status, flags, error.to_string())
        }
    }

    /// Adds flags, e.g. `URX` when retries gave up on this failure.
    pub fn with_flags(mut self, flags: Flags) -> Failure {
        self.flags = self.flags.union(flags);
        self
    }
}

/// What an upstream response went through: flags (a delay was injected, a retry
/// happened) and the backend and endpoint that answered.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub flags: Flags,
    pub backend: Option<Arc<str>>,
    pub endpoint: Option<SocketAddr>,
}

/// A response from a route's stack with its [`Outcome`] beside it. Kept out of the
/// response's extensions, where it would cost a map, its table and a box on every
/// request. Reads as the response it holds.
#[derive(Debug)]
pub struct Routed {
    pub response: Rsp,
    pub outcome: Outcome,
}

impl From<Rsp> for Routed {
    fn from(response: Rsp) -> Routed {
        Routed {
            response,
            outcome: Outcome::default(),
        }
    }
}

impl std::ops::Deref for Routed {
    type Target = Rsp;
    fn deref(&self) -> &Rsp {
        &self.response
    }
}

impl std::ops::DerefMut for Routed {
    fn deref_mut(&mut self) -> &mut Rsp {
        &mut self.response
    }
}

/// Adds `flags` to a stage's result, whichever way it went.
pub fn flag_result(result: &mut Result<Routed, Failure>, flags: Flags) {
    let mine = match result {
        Ok(routed) => &mut routed.outcome.flags,
        Err(failure) => &mut failure.flags,
    };
    *mine = mine.union(flags);
}

/// Request extension: an endpoint a retry should avoid.
#[derive(Debug, Clone, Copy)]
pub struct Avoid(pub SocketAddr);

/// Request extension: the client's address, for ring hashing on the source IP.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub SocketAddr);

/// A gRPC request: its failures are told in `grpc-status`, not the HTTP status.
pub fn is_grpc<B>(req: &http::Request<B>) -> bool {
    req.headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}
