//! Retries: another attempt when a response or failure matches the route's
//! conditions, after exponential backoff with full jitter, to a different endpoint
//! where one exists, and only while the retry budget allows, so retries cannot
//! multiply an outage.
//!
//! Not retried: methods that are not idempotent (unless the route says so), request
//! bodies over the replay limit (64 KiB), and upgrades. gRPC calls are always POST,
//! which says nothing about the call itself; like gRPC's own retry policy, they are
//! retried on the listed conditions whatever the method.

use super::{
    outcome::{flag_result, is_grpc, Avoid, BoxFuture, Failure, FailureKind, Flags, Req, Routed},
    stage::{Next, Stage},
};
use crate::{
    backoff::backoff,
    rng::Rng,
    upstream::request_body::{ReplayBody, RequestBody},
};
use http::{HeaderName, Method, Request};
use http_body::Body;
use std::{
    sync::atomic::{AtomicU32, AtomicU64, Ordering},
    time::Duration,
};
use tokio::time::Instant;
use trellis_proto::model::policy::{Retry as Config, RetryOn};

/// How long the budget remembers requests and retries.
const BUDGET_WINDOW_SECS: u64 = 10;

/// Retries may add at most `percent` % of the requests seen in the last 10 s, plus
/// `minPerSecond` for each of those seconds (so a quiet route can still retry).
///
/// Every request deposits, so the window is kept in atomics rather than behind a
/// lock. Two retries withdrawn at the same instant on different threads may both
/// pass the check: the budget can be overdrawn by one retry per worker thread.
pub struct Budget {
    ratio: f64,
    reserve: f64,
    start: Instant,
    /// Per second of the window, the requests seen in it.
    requests: [Slot; BUDGET_WINDOW_SECS as usize],
    /// Per second of the window, the retries taken in it.
    retries: [Slot; BUDGET_WINDOW_SECS as usize],
}

/// One second's count: the second (since the budget began) in the high 32 bits,
/// the count in the low 32, so a slot moves on to a new second in one atomic step.
struct Slot(AtomicU64);

/// A slot that has counted nothing yet.
const UNUSED: u64 = u64::MAX;

impl Slot {
    fn new() -> Slot {
        Slot(AtomicU64::new(UNUSED))
    }

    /// Counts one in `second`, starting the count afresh if the slot held an older one.
    fn add(&self, second: u32) {
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                let (held, count) = ((v >> 32) as u32, v as u32);
                let count = if v != UNUSED && held == second {
                    count.saturating_add(1)
                } else {
                    1
                };
                Some((u64::from(second) << 32) | u64::from(count))
            });
    }

    /// The count, if its second is still inside the window that ends at `now`.
    fn live(&self, now: u32) -> u64 {
        let v = self.0.load(Ordering::Relaxed);
        let held = (v >> 32) as u32;
        let inside = v != UNUSED && held <= now && now - held < BUDGET_WINDOW_SECS as u32;
        if inside {
            u64::from(v as u32)
        } else {
            0
        }
    }
}

impl Budget {
    pub fn new(percent: f64, min_per_second: u32) -> Budget {
        Budget {
            ratio: percent / 100.0,
            reserve: f64::from(min_per_second) * BUDGET_WINDOW_SECS as f64,
            start: Instant::now(),
            requests: std::array::from_fn(|_| Slot::new()),
            retries: std::array::from_fn(|_| Slot::new()),
        }
    }

    /// Seconds since the budget began (saturating: a proxy up for 136 years is
    /// still counted, in its last second).
    fn second(&self) -> u32 {
        let elapsed = self.start.elapsed().as_secs();
        u32::try_from(elapsed).unwrap_or(u32::MAX - 1)
    }

    fn slot(second: u32) -> usize {
        (second % BUDGET_WINDOW_SECS as u32) as usize
    }

    /// Counts an original request.
    pub fn deposit(&self) {
        let second = self.second();
        self.requests[Budget::slot(second)].add(second);
    }

    /// Takes one retry from the budget; false when it is spent.
    pub fn try_withdraw(&self) -> bool {
        let second = self.second();
        let requests: u64 = self.requests.iter().map(|s| s.live(second)).sum();
        let retries: u64 = self.retries.iter().map(|s| s.live(second)).sum();
        let allowed = self.reserve + self.ratio * requests as f64;
        if (retries as f64) + 1.0 > allowed {
            return false;
        }
        self.retries[Budget::slot(second)].add(second);
        true
    }
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

/// The retry stage of one route. Its budget and its count of retries in flight
/// live as long as the route's stack: across config versions that leave the route
/// as it was.
pub struct Retry {
    attempts: u32,
    retry_on: Vec<RetryOn>,
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

/// A retry in flight, from its backoff to its attempt's result, counted until
/// dropped however the request ends (a client that goes away, an outer timeout).
struct ActiveRetry<'a>(&'a AtomicU32);

impl Drop for ActiveRetry<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Named once: looking a header up by a `&str` parses the name on every call.
const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

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

impl Retry {
    /// `max_active` caps retries in flight at once (the connection pool's `maxRetries`).
    pub fn new(config: &Config, max_active: u32, rng: Rng, counters: RetryCounters) -> Retry {
        Retry {
            attempts: config.attempts,
            retry_on: config.retry_on.clone(),
            status_codes: config.status_codes.iter().map(|c| c.0).collect(),
            base: config.backoff.base,
            max: config.backoff.max,
            non_idempotent: config.retry_non_idempotent,
            budget: Budget::new(config.budget.percent.0, config.budget.min_per_second),
            max_active,
            active: AtomicU32::new(0),
            rng,
            counters,
        }
    }

    /// A place among the retries in flight, or `None` when `maxRetries` are.
    fn start_retry(&self) -> Option<ActiveRetry<'_>> {
        self.active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_active).then_some(n + 1)
            })
            .ok()
            .map(|_| ActiveRetry(&self.active))
    }

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
    fn wants_retry(&self, result: &Result<Routed, Failure>) -> bool {
        let on = |c: RetryOn| self.retry_on.contains(&c);
        match result {
            Ok(response) => {
                let status = response.status().as_u16();
                if let Some(code) = response.headers().get(&GRPC_STATUS) {
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

fn endpoint_of(result: &Result<Routed, Failure>) -> Option<std::net::SocketAddr> {
    match result {
        Ok(routed) => routed.outcome.endpoint,
        Err(failure) => failure.endpoint,
    }
}

impl Stage for Retry {
    fn call<'a>(&'a self, req: Req, next: Next<'a>) -> BoxFuture<'a, Result<Routed, Failure>> {
        let upgrade = req.headers().contains_key(http::header::UPGRADE);
        if upgrade || !(self.idempotent(req.method()) || is_grpc(&req)) {
            return next.call(req);
        }
        self.budget.deposit();
        let (parts, body) = req.into_parts();
        let body = match body {
            // Nothing left to read (a GET, `content-length: 0`): nothing to copy either.
            RequestBody::Incoming(incoming) if incoming.is_end_stream() => RequestBody::Empty,
            RequestBody::Incoming(incoming) => RequestBody::Replay(ReplayBody::new(incoming)),
            other => other,
        };
        Box::pin(async move {
            let mut next_body = body_copy(&body);
            let mut retries = 0u32;
            let mut avoid = None;
            let mut active: Option<ActiveRetry<'_>> = None;
            // The request and each result live in blocks that end before the next
            // wait, so the future keeps neither across it (it stays in the
            // allocator's per-thread cache).
            loop {
                let attempt = {
                    let Some(this_body) = next_body.take() else {
                        return Err(no_body());
                    };
                    let mut req = Request::from_parts(parts.clone(), this_body);
                    if let Some(addr) = avoid {
                        req.extensions_mut().insert(Avoid(addr));
                    }
                    next.call(req)
                };
                let delay = {
                    let mut result = attempt.await;
                    // The retry (if this was one) is over.
                    active.take();
                    if !self.wants_retry(&result) {
                        return result;
                    }
                    if retries >= self.attempts {
                        flag_result(&mut result, Flags::URX);
                        return result;
                    }
                    next_body = body_copy(&body);
                    if next_body.is_none() {
                        return result;
                    }
                    if !self.budget.try_withdraw() {
                        self.counters.budget_exhausted.increment(1);
                        flag_result(&mut result, Flags::URX);
                        return result;
                    }
                    active = self.start_retry();
                    if active.is_none() {
                        self.counters.overflow.increment(1);
                        flag_result(&mut result, Flags::URX);
                        return result;
                    }
                    avoid = endpoint_of(&result);
                    backoff(self.base, self.max, retries, &self.rng)
                };
                tokio::time::sleep(delay).await;
                self.counters.retries.increment(1);
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
    use crate::stack::testing::{request, run, stack, Scripted, Step};

    /// A retry stage from its YAML, with at most `max_active` retries in flight.
    fn retry_with(yaml: &str, max_active: u32) -> Retry {
        let config: Config = serde_yaml_ng::from_str(yaml).unwrap();
        Retry::new(
            &config,
            max_active,
            Rng::with_seed(1),
            RetryCounters::none(),
        )
    }

    fn retry(yaml: &str) -> Retry {
        retry_with(yaml, u32::MAX)
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
    async fn budget_forgets_each_second_as_the_window_passes_it() {
        let budget = Budget::new(10.0, 0);
        for _ in 0..100 {
            budget.deposit();
        }
        tokio::time::advance(Duration::from_secs(5)).await;
        for _ in 0..50 {
            budget.deposit();
        }
        // 150 requests in the window: 15 retries.
        assert_eq!((0..30).filter(|_| budget.try_withdraw()).count(), 15);
        // At 10 s the first second (100 requests) has left the window, and the
        // same slot starts counting afresh: 50 + 30 requests allow 8 retries, all
        // taken at 5 s.
        tokio::time::advance(Duration::from_secs(5)).await;
        for _ in 0..30 {
            budget.deposit();
        }
        assert!(!budget.try_withdraw());
        // At 15 s the retries of second 5 leave as well: 30 requests, 3 retries.
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!((0..10).filter(|_| budget.try_withdraw()).count(), 3);
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
        let service = stack(retry("{attempts: 3, retryOn: [5xx]}"), upstream.clone());
        let start = tokio::time::Instant::now();
        let response = service.call(request()).await.unwrap();
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
        let service = stack(
            retry("{attempts: 2, retryOn: [gateway-error]}"),
            upstream.clone(),
        );
        let response = service.call(request()).await.unwrap();
        assert_eq!(response.status(), 503);
        assert_eq!(upstream.calls(), 3, "first attempt plus two retries");
        assert!(response.outcome.flags.contains(Flags::URX));
    }

    #[tokio::test(start_paused = true)]
    async fn conditions_decide_what_is_retried() {
        let cases: [(&str, Step, usize); 6] = [
            (
                "{retryOn: [connect-failure]}",
                Step::Fail(FailureKind::ConnectFailure),
                3,
            ),
            (
                "{retryOn: [connect-failure]}",
                Step::Fail(FailureKind::Reset),
                1,
            ),
            ("{retryOn: [reset]}", Step::Fail(FailureKind::Reset), 3),
            (
                "{retryOn: [retriable-status-codes], statusCodes: [409]}",
                Step::Status(409),
                3,
            ),
            ("{retryOn: [gateway-error]}", Step::Status(500), 1),
            ("{retryOn: [5xx]}", Step::Status(500), 3),
        ];
        for (config, step, calls) in cases {
            let upstream = Scripted::new(vec![], step.clone());
            let service = stack(retry(config), upstream.clone());
            let _ = service.call(request()).await;
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
        let service = stack(retry("{retryOn: [5xx]}"), upstream.clone());
        service.call(post()).await.unwrap();
        assert_eq!(upstream.calls(), 1);

        let upstream = Scripted::always(503);
        let service = stack(
            retry("{retryOn: [5xx], retryNonIdempotent: true}"),
            upstream.clone(),
        );
        service.call(post()).await.unwrap();
        assert_eq!(upstream.calls(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn grpc_statuses_in_headers_are_retried() {
        let upstream = Scripted::new(vec![Step::Grpc(14)], Step::Status(200));
        let response = run(
            retry("{retryOn: [unavailable]}"),
            upstream.clone(),
            request(),
        )
        .await
        .unwrap();
        assert!(response.headers().get(&GRPC_STATUS).is_none());
        assert_eq!(upstream.calls(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_dropped_during_its_backoff_frees_its_retry() {
        // One retry in flight at most, and a backoff long enough to be caught in.
        let service = stack(
            retry_with(
                "{attempts: 1, retryOn: [5xx], backoff: {base: 10s, max: 10s}}",
                1,
            ),
            Scripted::new(vec![Step::Status(503); 4], Step::Status(200)),
        );
        for _ in 0..3 {
            let caller = service.clone();
            let task = tokio::spawn(async move { caller.call(request()).await });
            // Let it get its first answer (503) and start backing off.
            tokio::time::sleep(Duration::from_millis(1)).await;
            task.abort();
            assert!(task.await.unwrap_err().is_cancelled());
        }
        // Nothing is left in flight: the next request's 503 is retried.
        let response = service.call(request()).await.unwrap();
        assert_eq!(
            response.status(),
            200,
            "the dropped requests' retries were released"
        );
    }
}
