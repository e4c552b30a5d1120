//! The HTTP/1 header-read timeout (`--header-read-timeout`): a connection that has
//! not sent a whole request head within the limit, counted from when it opened or
//! from the end of its last response, is closed. That cuts off a slowloris client,
//! and is HTTP/1's keep-alive idle timeout.
//!
//! hyper has one built in, but it arms a boxed timer for every request and reads
//! the socket once more after each head: about 1 100 instructions a request, 3 %
//! of a sidecar's. Here the service notes when a head arrives and when its
//! response ends (an atomic store, and a clock read), and one timer per
//! connection fires at most once per limit.

use crate::{
    alarm::Alarmed,
    upstream::body::{ResponseBody, Rsp},
};
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use std::{
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};
use tokio::time::{Instant, Sleep};

/// Whether a connection is waiting for a request head, and since when.
pub struct HeadWait {
    origin: Instant,
    /// Nanoseconds from `origin` to when the wait began; `IN_FLIGHT` while a
    /// request is being served.
    since: AtomicU64,
}

const IN_FLIGHT: u64 = u64::MAX;

impl HeadWait {
    /// A connection that has just opened: waiting for its first request.
    pub fn new() -> Arc<HeadWait> {
        Arc::new(HeadWait {
            origin: Instant::now(),
            since: AtomicU64::new(0),
        })
    }

    /// A request head has arrived.
    pub fn head_arrived(&self) {
        self.since.store(IN_FLIGHT, Ordering::Relaxed);
    }

    /// The response is done: the wait for the next head begins.
    fn response_ended(&self) {
        // Saturates 584 years after the connection opened.
        let nanos = u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(IN_FLIGHT - 1);
        self.since.store(nanos, Ordering::Relaxed);
    }

    /// How long the connection has waited for a request head; `None` while a
    /// request is in flight.
    fn waited(&self) -> Option<Duration> {
        match self.since.load(Ordering::Relaxed) {
            IN_FLIGHT => None,
            since => Some(
                self.origin
                    .elapsed()
                    .saturating_sub(Duration::from_nanos(since)),
            ),
        }
    }
}

/// A response body that ends its connection's request when hyper is done with it
/// (hyper drops every body once written, or at once if it has none to write).
pub struct ServedBody {
    body: ResponseBody,
    wait: Option<Arc<HeadWait>>,
}

/// `response` for a connection that tracks `wait` (HTTP/1), or none (HTTP/2).
pub fn served(response: Rsp, wait: Option<Arc<HeadWait>>) -> http::Response<ServedBody> {
    response.map(|body| ServedBody { body, wait })
}

impl Drop for ServedBody {
    fn drop(&mut self) {
        if let Some(wait) = &self.wait {
            wait.response_ended();
        }
    }
}

impl Body for ServedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The connection waited `limit` for a request head.
#[derive(Debug)]
pub struct HeadTimedOut;

/// `conn` served until it ends, or until it has waited `limit` for a request
/// head ([`HeadTimedOut`], and the connection is dropped, which closes it).
pub struct HeadDeadline<'a, C> {
    conn: Pin<&'a mut C>,
    wait: Arc<HeadWait>,
    limit: Duration,
    /// Boxed, so the deadline can be moved (one allocation per connection).
    timer: Alarmed<Pin<Box<Sleep>>>,
}

impl<'a, C: Future> HeadDeadline<'a, C> {
    /// Starts timing with `wait`, which a connection begins by waiting.
    pub fn new(conn: Pin<&'a mut C>, wait: Arc<HeadWait>, limit: Duration) -> Self {
        HeadDeadline {
            conn,
            wait,
            limit,
            timer: Alarmed::new(Box::pin(tokio::time::sleep(limit))),
        }
    }

    pub fn conn(&mut self) -> Pin<&mut C> {
        self.conn.as_mut()
    }
}

impl<C: Future> Future for HeadDeadline<'_, C> {
    type Output = Result<C::Output, HeadTimedOut>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        if let Poll::Ready(output) = this.conn.as_mut().poll(cx) {
            return Poll::Ready(Ok(output));
        }
        // The timer fires at most once per limit: it is moved on, not re-armed
        // per request.
        while this.timer.poll_if_rang(cx).is_ready() {
            let left = match this.wait.waited() {
                Some(waited) if waited >= this.limit => return Poll::Ready(Err(HeadTimedOut)),
                Some(waited) => this.limit - waited,
                None => this.limit,
            };
            // A limit beyond the clock's range is never reached.
            let Some(deadline) = Instant::now().checked_add(left) else {
                break;
            };
            this.timer.get_mut().as_mut().reset(deadline);
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::pin;

    const LIMIT: Duration = Duration::from_secs(10);

    /// Runs a connection that never ends under the deadline; how long until cut.
    async fn cut_after(wait: Arc<HeadWait>) -> Duration {
        let start = Instant::now();
        let conn = pin!(std::future::pending::<()>());
        let result = HeadDeadline::new(conn, wait, LIMIT).await;
        assert!(result.is_err());
        start.elapsed()
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_without_a_request_is_cut_at_the_limit() {
        assert_eq!(cut_after(HeadWait::new()).await, LIMIT);
    }

    #[tokio::test(start_paused = true)]
    async fn the_wait_counts_from_the_end_of_the_last_response_not_while_serving() {
        let wait = HeadWait::new();
        let requests = {
            let wait = wait.clone();
            async move {
                // A request arrives after 4 s and is served for 25 s, longer than
                // the limit; its (empty) response body ends there.
                tokio::time::sleep(Duration::from_secs(4)).await;
                wait.head_arrived();
                let response = served(Rsp::new(ResponseBody::empty()), Some(wait));
                tokio::time::sleep(Duration::from_secs(25)).await;
                drop(response);
            }
        };
        let (cut, ()) = tokio::join!(cut_after(wait), requests);
        assert_eq!(cut, Duration::from_secs(4 + 25) + LIMIT);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_ends_first_is_not_cut() {
        let conn = pin!(tokio::time::sleep(Duration::from_secs(3)));
        let result = HeadDeadline::new(conn, HeadWait::new(), LIMIT).await;
        assert!(result.is_ok());
    }
}
