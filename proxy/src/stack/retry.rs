//! Retries: another attempt when a response or failure matches the route's
//! conditions, after exponential backoff with full jitter, to a different endpoint
//! where one exists, and only while the retry budget allows, so retries cannot
//! multiply an outage.
//!
//! Not retried: methods that are not idempotent (unless the route says so), request
//! bodies over the replay limit (64 KiB), and upgrades. gRPC calls are always POST,
//! which says nothing about the call itself; like gRPC's own retry policy, they are
//! retried on the listed conditions whatever the method.

use crate::{
    body::RequestBody,
    policy::{Retry, RetryOn},
    rng::Rng,
    stack::{add_flags, Avoid, BoxFuture, Failure, FailureKind, Flags, Outcome, Req, Rsp},
};
use http::{Method, Request};
use std::{
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll},
    time::Duration,
};
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

/// How long the budget remembers requests and retries.
const BUDGET_WINDOW_SECS: u64 = 10;

/// Retries may add at most `percent` % of the requests seen in the last 10 s, plus
/// `minPerSecond` for each of those seconds (so a quiet route can still retry).
pub struct Budget {
    ratio: f64,
    reserve: f64,
    start: Instant,
    /// Per second of the window: (second, requests, retries).
    slots: Mutex<[(u64, u32, u32); BUDGET_WINDOW_SECS as usize]>,
}

impl Budget {
    pub fn new(percent: f64, min_per_second: u32) -> Budget {
        Budget {
            ratio: percent / 100.0,
            reserve: f64::from(min_per_second) * BUDGET_WINDOW_SECS as f64,
            start: Instant::now(),
            slots: Mutex::new([(u64::MAX, 0, 0); BUDGET_WINDOW_SECS as usize]),
        }
    }

    /// Counts an original request.
    pub fn deposit(&self) {
        let second = self.start.elapsed().as_secs();
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let slot = &mut slots[(second % BUDGET_WINDOW_SECS) as usize];
        if slot.0 != second {
            *slot = (second, 0, 0);
        }
        slot.1 += 1;
    }

    /// Takes one retry from the budget; false when it is spent.
    pub fn try_withdraw(&self) -> bool {
        let second = self.start.elapsed().as_secs();
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let live = |s: &&mut (u64, u32, u32)| s.0 <= second && second - s.0 < BUDGET_WINDOW_SECS;
        let (requests, retries) = slots
            .iter_mut()
            .filter(live)
            .fold((0u64, 0u64), |(q, r), s| {
                (q + u64::from(s.1), r + u64::from(s.2))
            });
        let allowed = self.reserve + self.ratio * requests as f64;
        if (retries as f64) + 1.0 > allowed {
            return false;
        }
        let slot = &mut slots[(second % BUDGET_WINDOW_SECS) as usize];
        if slot.0 != second {
            *slot = (second, 0, 0);
        }
        slot.2 += 1;
        true
    }
}

/// Full-jitter exponential backoff: retry `n` (from 0) waits a uniformly random
/// time in `[0, min(max, base * 2^n))`.
pub fn backoff(base: Duration, max: Duration, retry: u32, rng: &Rng) -> Duration {
    let ceiling = base.saturating_mul(1u32 << retry.min(20)).min(max);
    ceiling.mul_f64(rng.unit())
}

/// The counters a route's retries are reported in.
pub struct RetryCounters {
    pub retries: metrics::Counter,
    pub budget_exhausted: metrics::Counter,
    /// Retries refused because `maxRetries` were already in flight.
    pub overflow: metrics::Counter,
}

impl RetryCounters {
    #[cfg(test)]
    fn none() -> RetryCounters {
        RetryCounters {
            retries: metrics::Counter::noop(),
            budget_exhausted: metrics::Counter::noop(),
            overflow: metrics::Counter::noop(),
        }
    }
}

struct Policy {
    attempts: u32,
    on: Vec<RetryOn>,
    status_codes: Vec<u16>,
    base: Duration,
    max: Duration,
    non_idempotent: bool,
    budget: Budget,
    max_active: u32,
    active: AtomicU32,
    rng: Rng,
    counters: RetryCounters,
}

#[derive(Clone)]
pub struct RetryLayer(Arc<Policy>);

impl RetryLayer {
    /// `max_active` caps retries in flight at once (the connection pool's `maxRetries`).
    pub fn new(config: &Retry, max_active: u32, rng: Rng, counters: RetryCounters) -> Self {
        RetryLayer(Arc::new(Policy {
            attempts: config.attempts,
            on: config.on.clone(),
            status_codes: config.status_codes.iter().map(|c| c.0).collect(),
            base: config.backoff.base,
            max: config.backoff.max,
            non_idempotent: config.retry_non_idempotent,
            budget: Budget::new(config.budget.percent.0, config.budget.min_per_second),
            max_active,
            active: AtomicU32::new(0),
            rng,
            counters,
        }))
    }
}

impl<S> Layer<S> for RetryLayer {
    type Service = RetryService<S>;

    fn layer(&self, inner: S) -> RetryService<S> {
        RetryService {
            inner,
            policy: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RetryService<S> {
    inner: S,
    policy: Arc<Policy>,
}

/// gRPC status codes by number, as they appear in `grpc-status`.
fn grpc_condition(code: &[u8]) -> Option<RetryOn> {
    match code {
        b"1" => Some(RetryOn::Cancelled),
        b"4" => Some(RetryOn::DeadlineExceeded),
        b"8" => Some(RetryOn::ResourceExhausted),
        b"13" => Some(RetryOn::Internal),
        b"14" => Some(RetryOn::Unavailable),
        _ => None,
    }
}

impl Policy {
    fn idempotent(&self, method: &Method) -> bool {
        self.non_idempotent
            || matches!(
                *method,
                Method::GET
                    | Method::HEAD
                    | Method::OPTIONS
                    | Method::TRACE
                    | Method::PUT
                    | Method::DELETE
            )
    }

    /// Whether this result is one the route retries.
    fn wants_retry(&self, result: &Result<Rsp, Failure>) -> bool {
        let on = |c: RetryOn| self.on.contains(&c);
        match result {
            Ok(response) => {
                let status = response.status().as_u16();
                if let Some(code) = response.headers().get("grpc-status") {
                    if grpc_condition(code.as_bytes()).is_some_and(on) {
                        return true;
                    }
                }
                (on(RetryOn::Status5xx) && (500..=599).contains(&status))
                    || (on(RetryOn::GatewayError) && (502..=504).contains(&status))
                    || (on(RetryOn::RetriableStatusCodes) && self.status_codes.contains(&status))
            }
            Err(failure) => match failure.kind {
                FailureKind::ConnectFailure => {
                    on(RetryOn::ConnectFailure)
                        || on(RetryOn::Status5xx)
                        || on(RetryOn::GatewayError)
                }
                FailureKind::Reset => {
                    on(RetryOn::Reset) || on(RetryOn::Status5xx) || on(RetryOn::GatewayError)
                }
                FailureKind::Timeout => on(RetryOn::Status5xx) || on(RetryOn::GatewayError),
                FailureKind::Local => false,
            },
        }
    }
}

/// A body for the next attempt, if the request can still be sent again.
fn body_copy(body: &RequestBody) -> Option<RequestBody> {
    match body {
        RequestBody::Empty => Some(RequestBody::Empty),
        RequestBody::Replay(replay) => replay.try_clone().map(RequestBody::Replay),
        RequestBody::Incoming(_) => None,
    }
}

fn endpoint_of(result: &Result<Rsp, Failure>) -> Option<std::net::SocketAddr> {
    match result {
        Ok(response) => response
            .extensions()
            .get::<Outcome>()
            .and_then(|o| o.endpoint),
        Err(failure) => failure.endpoint,
    }
}

impl<S> Service<Req> for RetryService<S>
where
    S: Service<Req, Response = Rsp, Error = Failure> + Clone + Send + 'static,
    S::Future: Send,
{
    type Response = Rsp;
    type Error = Failure;
    type Future = BoxFuture<Result<Rsp, Failure>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Failure>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let policy = self.policy.clone();
        let inner = self.inner.clone();
        let upgrade = req.headers().contains_key(http::header::UPGRADE);
        if upgrade || !(policy.idempotent(req.method()) || crate::stack::is_grpc(&req)) {
            return Box::pin(inner.oneshot(req));
        }
        policy.budget.deposit();
        let (parts, body) = req.into_parts();
        let body = match body {
            RequestBody::Incoming(incoming) => {
                RequestBody::Replay(crate::body::ReplayBody::new(incoming))
            }
            other => other,
        };
        Box::pin(async move {
            let mut next = body_copy(&body);
            let mut retries = 0u32;
            let mut avoid = None;
            loop {
                let Some(this_body) = next.take() else {
                    return Err(no_body());
                };
                let mut req = Request::from_parts(parts.clone(), this_body);
                if let Some(addr) = avoid {
                    req.extensions_mut().insert(Avoid(addr));
                }
                let result = inner.clone().oneshot(req).await;
                if !policy.wants_retry(&result) {
                    return result;
                }
                let give_up = |mut result: Result<Rsp, Failure>| {
                    match &mut result {
                        Ok(response) => add_flags(response, Flags::URX),
                        Err(failure) => failure.flags = failure.flags.union(Flags::URX),
                    }
                    result
                };
                if retries >= policy.attempts {
                    return give_up(result);
                }
                next = body_copy(&body);
                if next.is_none() {
                    return result;
                }
                if !policy.budget.try_withdraw() {
                    policy.counters.budget_exhausted.increment(1);
                    return give_up(result);
                }
                if policy.active.fetch_add(1, Ordering::AcqRel) >= policy.max_active {
                    policy.active.fetch_sub(1, Ordering::AcqRel);
                    policy.counters.overflow.increment(1);
                    return give_up(result);
                }
                avoid = endpoint_of(&result);
                drop(result);
                tokio::time::sleep(backoff(policy.base, policy.max, retries, &policy.rng)).await;
                policy.active.fetch_sub(1, Ordering::AcqRel);
                policy.counters.retries.increment(1);
                retries += 1;
            }
        })
    }
}

/// The loop always has a body ready for the attempt it starts; this only names the
/// impossible case instead of panicking.
fn no_body() -> Failure {
    Failure::local(
        http::StatusCode::INTERNAL_SERVER_ERROR,
        Flags::NONE,
        "retry without a request body",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stack::testing::{request, Scripted, Step};

    fn retry(yaml: &str) -> Retry {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    #[test]
    fn backoff_stays_within_full_jitter_bounds() {
        let rng = Rng::with_seed(3);
        let (base, max) = (Duration::from_millis(25), Duration::from_millis(250));
        for n in 0..8u32 {
            let ceiling = (base * 2u32.pow(n)).min(max);
            let draws: Vec<_> = (0..1000).map(|_| backoff(base, max, n, &rng)).collect();
            assert!(draws.iter().all(|d| *d < ceiling), "retry {n}");
            // Full jitter spreads over the whole range, not just near the ceiling.
            assert!(draws.iter().any(|d| *d < ceiling / 4), "retry {n}");
            assert!(draws.iter().any(|d| *d > ceiling * 3 / 4), "retry {n}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn budget_stops_retries_at_the_ratio() {
        let budget = Budget::new(20.0, 0);
        for _ in 0..100 {
            budget.deposit();
        }
        let granted = (0..50).filter(|_| budget.try_withdraw()).count();
        assert_eq!(granted, 20);
        // The window forgets: after 10 s with no traffic there is nothing to spend.
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(!budget.try_withdraw());
    }

    #[tokio::test(start_paused = true)]
    async fn budget_reserve_allows_min_per_second() {
        let budget = Budget::new(20.0, 10);
        let granted = (0..500).filter(|_| budget.try_withdraw()).count();
        assert_eq!(granted, 100, "10 per second over the 10 s window");
    }

    #[tokio::test(start_paused = true)]
    async fn retries_until_success_with_backoff_and_avoids_the_last_endpoint() {
        let addr = "198.18.0.9:80".parse().unwrap();
        let upstream = Scripted::new(vec![Step::From(addr), Step::From(addr)], Step::Status(200));
        let service = RetryLayer::new(
            &retry("{attempts: 3, on: [5xx]}"),
            u32::MAX,
            Rng::with_seed(1),
            RetryCounters::none(),
        )
        .layer(upstream.clone());
        let start = tokio::time::Instant::now();
        let response = service.oneshot(request()).await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(upstream.calls(), 3);
        assert_eq!(
            *upstream.avoided.lock().unwrap(),
            [None, Some(addr), Some(addr)]
        );
        // Two backoffs: under 25 ms then under 50 ms.
        assert!(start.elapsed() < Duration::from_millis(75));
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_after_attempts_and_flags_it() {
        let upstream = Scripted::always(503);
        let service = RetryLayer::new(
            &retry("{attempts: 2, on: [gateway-error]}"),
            u32::MAX,
            Rng::with_seed(1),
            RetryCounters::none(),
        )
        .layer(upstream.clone());
        let response = service.oneshot(request()).await.unwrap();
        assert_eq!(response.status(), 503);
        assert_eq!(upstream.calls(), 3, "first attempt plus two retries");
        assert!(response
            .extensions()
            .get::<Outcome>()
            .unwrap()
            .flags
            .contains(Flags::URX));
    }

    #[tokio::test(start_paused = true)]
    async fn conditions_decide_what_is_retried() {
        let cases: [(&str, Step, usize); 6] = [
            (
                "{on: [connect-failure]}",
                Step::Fail(FailureKind::ConnectFailure),
                3,
            ),
            ("{on: [connect-failure]}", Step::Fail(FailureKind::Reset), 1),
            ("{on: [reset]}", Step::Fail(FailureKind::Reset), 3),
            (
                "{on: [retriable-status-codes], statusCodes: [409]}",
                Step::Status(409),
                3,
            ),
            ("{on: [gateway-error]}", Step::Status(500), 1),
            ("{on: [5xx]}", Step::Status(500), 3),
        ];
        for (config, step, calls) in cases {
            let upstream = Scripted::new(vec![], step.clone());
            let service = RetryLayer::new(
                &retry(config),
                u32::MAX,
                Rng::with_seed(1),
                RetryCounters::none(),
            )
            .layer(upstream.clone());
            let _ = service.oneshot(request()).await;
            assert_eq!(upstream.calls(), calls, "{config} with {step:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn non_idempotent_methods_are_not_retried_unless_allowed() {
        let post = || {
            Request::post("http://svc.test/")
                .body(RequestBody::Empty)
                .unwrap()
        };
        let upstream = Scripted::always(503);
        let service = RetryLayer::new(
            &retry("{on: [5xx]}"),
            u32::MAX,
            Rng::with_seed(1),
            RetryCounters::none(),
        )
        .layer(upstream.clone());
        service.oneshot(post()).await.unwrap();
        assert_eq!(upstream.calls(), 1);

        let upstream = Scripted::always(503);
        let service = RetryLayer::new(
            &retry("{on: [5xx], retryNonIdempotent: true}"),
            u32::MAX,
            Rng::with_seed(1),
            RetryCounters::none(),
        )
        .layer(upstream.clone());
        service.oneshot(post()).await.unwrap();
        assert_eq!(upstream.calls(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn grpc_statuses_in_headers_are_retried() {
        #[derive(Clone)]
        struct Grpc(Scripted);
        impl Service<Req> for Grpc {
            type Response = Rsp;
            type Error = Failure;
            type Future = BoxFuture<Result<Rsp, Failure>>;
            fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Failure>> {
                Poll::Ready(Ok(()))
            }
            fn call(&mut self, req: Req) -> Self::Future {
                let inner = self.0.clone();
                Box::pin(async move {
                    let calls = inner.calls();
                    let mut response = inner.oneshot(req).await?;
                    if calls == 0 {
                        response
                            .headers_mut()
                            .insert("grpc-status", "14".parse().unwrap());
                    }
                    Ok(response)
                })
            }
        }
        let upstream = Scripted::always(200);
        let service = RetryLayer::new(
            &retry("{on: [unavailable]}"),
            u32::MAX,
            Rng::with_seed(1),
            RetryCounters::none(),
        )
        .layer(Grpc(upstream.clone()));
        let response = service.oneshot(request()).await.unwrap();
        assert!(response.headers().get("grpc-status").is_none());
        assert_eq!(upstream.calls(), 2);
    }
}
