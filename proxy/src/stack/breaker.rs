//! Circuit breaking per backend (Envoy's thresholds): at most `maxRequests`
//! requests in flight (and, since an HTTP/1 request holds a connection,
//! `maxConnections`), at most `maxPendingRequests` waiting for a slot; anything
//! beyond is answered at once with 503 `UO`, never queued.
//!
//! A request holds its slot from admission until its response headers arrive.

use crate::{
    policy::ConnectionPool,
    stack::{BoxFuture, Failure, Flags, Req, Rsp},
};
use http::StatusCode;
use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    task::{Context, Poll},
};
use tokio::sync::Semaphore;
use tower::{Layer, Service, ServiceExt};

struct Limits {
    slots: Arc<Semaphore>,
    pending: AtomicUsize,
    max_pending: usize,
    backend: Arc<str>,
}

#[derive(Clone)]
pub struct BreakerLayer(Arc<Limits>);

impl BreakerLayer {
    pub fn new(config: &ConnectionPool, backend: Arc<str>) -> Self {
        let slots = config.max_requests.0.min(config.max_connections.0) as usize;
        BreakerLayer(Arc::new(Limits {
            slots: Arc::new(Semaphore::new(slots)),
            pending: AtomicUsize::new(0),
            max_pending: config.max_pending_requests as usize,
            backend,
        }))
    }
}

impl<S> Layer<S> for BreakerLayer {
    type Service = Breaker<S>;

    fn layer(&self, inner: S) -> Breaker<S> {
        Breaker {
            inner,
            limits: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Breaker<S> {
    inner: S,
    limits: Arc<Limits>,
}

fn overflow(limits: &Limits, what: &str) -> Failure {
    metrics::counter!("trellis_overflow_total", "backend" => limits.backend.clone()).increment(1);
    let mut failure = Failure::local(
        StatusCode::SERVICE_UNAVAILABLE,
        Flags::UO,
        format!("backend {} is over its {what} limit", limits.backend),
    );
    failure.backend = Some(limits.backend.clone());
    failure
}

impl<S> Service<Req> for Breaker<S>
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
        let limits = self.limits.clone();
        let inner = self.inner.clone();
        let permit = limits.slots.clone().try_acquire_owned().ok();
        if permit.is_none() {
            // Take a pending place, if one is free, without ever exceeding the limit.
            let admitted = limits
                .pending
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |p| {
                    (p < limits.max_pending).then_some(p + 1)
                })
                .is_ok();
            if !admitted {
                return Box::pin(std::future::ready(Err(overflow(&limits, "request"))));
            }
        }
        Box::pin(async move {
            let _permit = match permit {
                Some(permit) => permit,
                None => {
                    let waited = limits.slots.clone().acquire_owned().await;
                    limits.pending.fetch_sub(1, Ordering::AcqRel);
                    match waited {
                        Ok(permit) => permit,
                        Err(_) => return Err(overflow(&limits, "request")),
                    }
                }
            };
            inner.oneshot(req).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stack::testing::{request, Scripted};
    use std::time::Duration;

    fn pool(max_requests: u32, max_pending: u32) -> ConnectionPool {
        serde_yaml_ng::from_str(&format!(
            "{{maxRequests: {max_requests}, maxPendingRequests: {max_pending}}}"
        ))
        .unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn request_n_plus_one_overflows_at_once() {
        let slow = Scripted::delayed(Duration::from_secs(1));
        let breaker = BreakerLayer::new(&pool(3, 0), "b.default:80".into()).layer(slow.clone());
        let in_flight: Vec<_> = (0..3)
            .map(|_| tokio::spawn(breaker.clone().oneshot(request())))
            .collect();
        tokio::task::yield_now().await;
        let start = tokio::time::Instant::now();
        let failure = breaker.clone().oneshot(request()).await.unwrap_err();
        assert_eq!(start.elapsed(), Duration::ZERO, "overflow is immediate");
        assert_eq!(
            (failure.status.as_u16(), failure.flags.label()),
            (503, "UO")
        );
        for task in in_flight {
            assert_eq!(task.await.unwrap().unwrap().status(), 200);
        }
        // Slots come back once responses arrive.
        assert_eq!(breaker.oneshot(request()).await.unwrap().status(), 200);
        assert_eq!(slow.calls(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn pending_requests_wait_up_to_their_limit() {
        let slow = Scripted::delayed(Duration::from_secs(1));
        let breaker = BreakerLayer::new(&pool(1, 2), "b.default:80".into()).layer(slow.clone());
        let tasks: Vec<_> = (0..3)
            .map(|_| tokio::spawn(breaker.clone().oneshot(request())))
            .collect();
        tokio::task::yield_now().await;
        // One running, two pending: the fourth overflows.
        let failure = breaker.clone().oneshot(request()).await.unwrap_err();
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
}
