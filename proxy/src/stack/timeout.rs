//! Deadlines: the whole request (outside retries) or each attempt (inside them).
//! A request still waiting for response headers at the deadline gets 504 `UT`;
//! the response body, once it streams, is not cut short.

use crate::stack::{BoxFuture, Failure, Req, Rsp};
use std::{
    task::{Context, Poll},
    time::Duration,
};
use tower::{Layer, Service, ServiceExt};

#[derive(Clone)]
pub struct TimeoutLayer(Duration);

impl TimeoutLayer {
    pub fn new(after: Duration) -> Self {
        TimeoutLayer(after)
    }
}

impl<S> Layer<S> for TimeoutLayer {
    type Service = Timeout<S>;

    fn layer(&self, inner: S) -> Timeout<S> {
        Timeout {
            inner,
            after: self.0,
        }
    }
}

#[derive(Clone)]
pub struct Timeout<S> {
    inner: S,
    after: Duration,
}

impl<S> Service<Req> for Timeout<S>
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
        let inner = self.inner.clone();
        let after = self.after;
        Box::pin(async move {
            match tokio::time::timeout(after, inner.oneshot(req)).await {
                Ok(result) => result,
                Err(_) => Err(Failure::timeout(after)),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stack::testing::{request, Scripted};

    #[tokio::test(start_paused = true)]
    async fn fires_at_the_deadline_and_not_before() {
        let slow = Scripted::delayed(Duration::from_millis(1500));
        let start = tokio::time::Instant::now();
        let failure = TimeoutLayer::new(Duration::from_secs(1))
            .layer(slow.clone())
            .oneshot(request())
            .await
            .unwrap_err();
        assert_eq!(start.elapsed(), Duration::from_secs(1));
        assert_eq!(failure.status, 504);
        assert_eq!(failure.flags.label(), "UT");

        let fast = Scripted::delayed(Duration::from_millis(999));
        let response = TimeoutLayer::new(Duration::from_secs(1))
            .layer(fast)
            .oneshot(request())
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
}
