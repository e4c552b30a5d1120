//! Deadlines: the whole request (outside retries) or each attempt (inside them).
//! A request still waiting for response headers at the deadline gets 504 `UT`;
//! the response body, once it streams, is not cut short.

use super::{
    outcome::{BoxFuture, Failure, Req, Routed},
    stage::{Next, Stage},
};
use futures_util::FutureExt;
use std::time::Duration;

pub struct Timeout(pub Duration);

impl Stage for Timeout {
    fn call<'a>(&'a self, req: Req, next: Next<'a>) -> BoxFuture<'a, Result<Routed, Failure>> {
        // A combinator, not an `async` block, which would keep the request beside
        // the inner stage's future.
        let limit = self.0;
        Box::pin(
            tokio::time::timeout(limit, next.call(req))
                .map(move |result| result.unwrap_or_else(|_| Err(Failure::timeout(limit)))),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stack::testing::{request, run, Scripted};

    #[tokio::test(start_paused = true)]
    async fn fires_at_the_deadline_and_not_before() {
        let slow = Scripted::delayed(Duration::from_millis(1500));
        let start = tokio::time::Instant::now();
        let failure = run(Timeout(Duration::from_secs(1)), slow, request())
            .await
            .unwrap_err();
        assert_eq!(start.elapsed(), Duration::from_secs(1));
        assert_eq!(failure.status, 504);
        assert_eq!(failure.flags.label(), "UT");

        let fast = Scripted::delayed(Duration::from_millis(999));
        let response = run(Timeout(Duration::from_secs(1)), fast, request())
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
}
