//! Circuit breaking per destination (Envoy's thresholds): at most `maxRequests`
//! requests in flight and at most `maxPendingRequests` waiting for a slot; anything
//! beyond is answered at once with 503 `UO`, never queued. (`maxConnections` limits
//! upstream connections, in the pool.)
//!
//! A request holds its slot from admission until its response headers arrive, and
//! its pending place while it waits; both are guards, so a request dropped while it
//! waits (the client went away, an outer timeout fired) gives them back.

use super::{
    outcome::{BoxFuture, Failure, Flags, Req, Routed},
    stage::{Next, Stage},
};
use futures_util::FutureExt;
use http::StatusCode;
use std::sync::{
    atomic::{AtomicUsize, Ordering},
    Arc,
};
use tokio::sync::Semaphore;
use trellis_proto::model::policy::ConnectionPool;

/// A destination's request limits; kept across config versions while its
/// `connectionPool` stays the same, so requests in flight stay counted.
pub struct Breaker {
    slots: Arc<Semaphore>,
    pending: AtomicUsize,
    max_pending: usize,
    backend: Arc<str>,
    overflows: metrics::Counter,
}

impl Breaker {
    pub fn new(config: &ConnectionPool, backend: Arc<str>) -> Breaker {
        Breaker {
            slots: Arc::new(Semaphore::new(config.max_requests.0 as usize)),
            pending: AtomicUsize::new(0),
            max_pending: config.max_pending_requests as usize,
            overflows: metrics::counter!(crate::metrics::OVERFLOW_TOTAL, "backend" => backend.clone()),
            backend,
        }
    }

    fn overflow(&self) -> Failure {
        self.overflows.increment(1);
        Failure {
            backend: Some(self.backend.clone()),
            ..Failure::local(
                StatusCode::SERVICE_UNAVAILABLE,
                Flags::UO,
                format!("backend {} is over its request limit", self.backend),
            )
        }
    }

    /// Takes a pending place, if one is free, without ever exceeding the limit.
    fn wait_in_line(&self) -> Option<Pending<'_>> {
        self.pending
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |p| {
                (p < self.max_pending).then_some(p + 1)
            })
            .ok()
            .map(|_| Pending(&self.pending))
    }
}

/// A place among the pending requests, given back when dropped.
struct Pending<'a>(&'a AtomicUsize);

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Stage for Breaker {
    fn call<'a>(&'a self, req: Req, next: Next<'a>) -> BoxFuture<'a, Result<Routed, Failure>> {
        let pending = match self.slots.clone().try_acquire_owned() {
            // A slot at once: held beside the inner stages' future until it ends.
            Ok(permit) => {
                return Box::pin(next.call(req).map(move |result| {
                    drop(permit);
                    result
                }))
            }
            Err(_) => match self.wait_in_line() {
                Some(place) => place,
                None => return Box::pin(std::future::ready(Err(self.overflow()))),
            },
        };
        Box::pin(async move {
            let waited = self.slots.clone().acquire_owned().await;
            drop(pending);
            let Ok(_permit) = waited else {
                return Err(self.overflow());
            };
            next.call(req).await
        })
    }
}

/// A destination's breaker outlives its stacks: each new one shares it.
impl Stage for Arc<Breaker> {
    fn call<'a>(&'a self, req: Req, next: Next<'a>) -> BoxFuture<'a, Result<Routed, Failure>> {
        (**self).call(req, next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stack::testing::{request, stack, Scripted};
    use std::time::Duration;

    fn pool(max_requests: u32, max_pending: u32) -> ConnectionPool {
        serde_yaml_ng::from_str(&format!(
            "{{maxRequests: {max_requests}, maxPendingRequests: {max_pending}}}"
        ))
        .unwrap()
    }

    fn spawn_call(
        stack: &Arc<crate::stack::stage::Stack>,
    ) -> tokio::task::JoinHandle<Result<Routed, Failure>> {
        let stack = stack.clone();
        tokio::spawn(async move { stack.call(request()).await })
    }

    #[tokio::test(start_paused = true)]
    async fn request_n_plus_one_overflows_at_once() {
        let slow = Scripted::delayed(Duration::from_secs(1));
        let breaker = stack(
            Breaker::new(&pool(3, 0), "b.default:80".into()),
            slow.clone(),
        );
        let in_flight: Vec<_> = (0..3).map(|_| spawn_call(&breaker)).collect();
        tokio::task::yield_now().await;
        let start = tokio::time::Instant::now();
        let failure = breaker.call(request()).await.unwrap_err();
        assert_eq!(start.elapsed(), Duration::ZERO, "overflow is immediate");
        assert_eq!(
            (failure.status.as_u16(), failure.flags.label()),
            (503, "UO")
        );
        for task in in_flight {
            assert_eq!(task.await.unwrap().unwrap().status(), 200);
        }
        // Slots come back once responses arrive.
        assert_eq!(breaker.call(request()).await.unwrap().status(), 200);
        assert_eq!(slow.calls(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn pending_requests_wait_up_to_their_limit() {
        let slow = Scripted::delayed(Duration::from_secs(1));
        let breaker = stack(
            Breaker::new(&pool(1, 2), "b.default:80".into()),
            slow.clone(),
        );
        let tasks: Vec<_> = (0..3).map(|_| spawn_call(&breaker)).collect();
        tokio::task::yield_now().await;
        // One running, two pending: the fourth overflows.
        let failure = breaker.call(request()).await.unwrap_err();
        assert_eq!(failure.flags.label(), "UO");
        let start = tokio::time::Instant::now();
        for task in tasks {
            assert_eq!(task.await.unwrap().unwrap().status(), 200);
        }
        assert_eq!(
            start.elapsed(),
            Duration::from_secs(3),
            "pending requests ran one by one"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn requests_dropped_while_pending_give_their_place_back() {
        let slow = Scripted::delayed(Duration::from_secs(1));
        let breaker = stack(
            Breaker::new(&pool(1, 1), "b.default:80".into()),
            slow.clone(),
        );
        let running = spawn_call(&breaker);
        tokio::task::yield_now().await;
        // Five times: a request waits for the slot, then its client gives up.
        for _ in 0..5 {
            let waiting = spawn_call(&breaker);
            tokio::task::yield_now().await;
            assert_eq!(
                breaker.call(request()).await.unwrap_err().flags.label(),
                "UO",
                "the one pending place is taken"
            );
            waiting.abort();
            assert!(waiting.await.unwrap_err().is_cancelled());
        }
        // The place is free again: a request waits its turn instead of overflowing.
        let start = tokio::time::Instant::now();
        assert_eq!(breaker.call(request()).await.unwrap().status(), 200);
        assert_eq!(
            start.elapsed(),
            Duration::from_secs(2),
            "it waited for the slot"
        );
        assert_eq!(running.await.unwrap().unwrap().status(), 200);
    }
}
