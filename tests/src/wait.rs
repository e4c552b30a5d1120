//! Waiting in end-to-end tests: for an event the test can observe, bounded by a
//! deadline, never for a fixed time. A fixed sleep is either too short on a busy
//! machine (a flaky test) or too long everywhere (a slow one), and an upper bound
//! on wall-clock time fails when the machine is slow rather than when the code is
//! wrong; a deadline here only stops a test that would otherwise hang, so it is
//! generous.
//!
//! - [`until`] polls a check until it holds;
//! - [`poll`] does the same and hands back the last reason instead of panicking,
//!   for callers that add their own context (a process's log);
//! - [`within`] awaits one future, failing the test if it never finishes.

use std::{future::Future, time::Duration};
// tokio's clock: the same as the system's in a real runtime, and the paused one in
// this module's own tests.
use tokio::time::Instant;

/// How long to wait between two checks.
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Calls `check` until it returns `Ok`, every [`POLL_INTERVAL`], for at most
/// `limit`; then the last `Err` reason it gave. `check` runs at least once.
pub async fn poll<T, F, Fut>(limit: Duration, mut check: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + limit;
    loop {
        match check().await {
            Ok(value) => return Ok(value),
            Err(reason) if Instant::now() >= deadline => return Err(reason),
            Err(_) => tokio::time::sleep(POLL_INTERVAL).await,
        }
    }
}

/// Calls `check` until it returns `Ok` and returns its value; panics naming
/// `what` and the last reason `check` gave when that takes longer than `limit`.
pub async fn until<T, F, Fut>(limit: Duration, what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    match poll(limit, check).await {
        Ok(value) => value,
        Err(reason) => panic!("{what}: not so after {limit:?}: {reason}"),
    }
}

/// Awaits `future`; panics naming `what` when it has not finished after `limit`.
pub async fn within<T>(limit: Duration, what: &str, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, future).await {
        Ok(value) => value,
        Err(_) => panic!("{what}: not done after {limit:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[tokio::test(start_paused = true)]
    async fn until_returns_the_first_ok() {
        let calls = Cell::new(0);
        let value = until(Duration::from_secs(1), "third call", || {
            calls.set(calls.get() + 1);
            let n = calls.get();
            async move {
                if n == 3 {
                    Ok(n)
                } else {
                    Err(format!("call {n}"))
                }
            }
        })
        .await;
        assert_eq!(value, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn poll_gives_the_last_reason_after_the_limit() {
        let calls = Cell::new(0);
        let start = Instant::now();
        let result: Result<(), String> = poll(Duration::from_secs(1), || {
            calls.set(calls.get() + 1);
            let n = calls.get();
            async move { Err(format!("call {n}")) }
        })
        .await;
        assert_eq!(result, Err(format!("call {}", calls.get())));
        assert!(start.elapsed() >= Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    #[should_panic(expected = "never: not done after 1s")]
    async fn within_panics_on_a_future_that_never_ends() {
        within(
            Duration::from_secs(1),
            "never",
            std::future::pending::<()>(),
        )
        .await;
    }
}
