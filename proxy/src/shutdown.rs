//! Graceful shutdown: one signal tells every listener and connection to wind down,
//! and the process waits (bounded) until all of them have.

use std::time::Duration;
use tokio::sync::watch;

/// Held by every listener and connection; dropping it says "I am done".
#[derive(Clone)]
pub struct Drain(watch::Receiver<bool>);

/// Held by the process: starts the drain and waits for it.
pub struct Trigger(watch::Sender<bool>);

pub fn channel() -> (Trigger, Drain) {
    let (tx, rx) = watch::channel(false);
    (Trigger(tx), Drain(rx))
}

impl Drain {
    /// Completes once shutdown has begun.
    pub async fn signaled(&mut self) {
        // An error means the trigger is gone, which also means shut down.
        let _ = self.0.wait_for(|draining| *draining).await;
    }
}

impl Trigger {
    /// Signals every [`Drain`] and waits until all are dropped or `timeout` passes.
    /// Returns whether everything finished in time.
    pub async fn drain(self, timeout: Duration) -> bool {
        self.0.send_replace(true);
        tokio::time::timeout(timeout, self.0.closed()).await.is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn waits_for_holders_and_gives_up_at_the_timeout() {
        let (trigger, drain) = channel();
        let mut quick = drain.clone();
        tokio::spawn(async move {
            quick.signaled().await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        });
        let mut stuck = drain;
        let stuck_task = tokio::spawn(async move {
            stuck.signaled().await;
            tokio::time::sleep(Duration::from_secs(3600)).await;
            drop(stuck);
        });
        let start = tokio::time::Instant::now();
        assert!(!trigger.drain(Duration::from_secs(5)).await);
        assert_eq!(start.elapsed(), Duration::from_secs(5));
        stuck_task.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn finishes_as_soon_as_the_last_holder_is_done() {
        let (trigger, mut drain) = channel();
        tokio::spawn(async move {
            drain.signaled().await;
            tokio::time::sleep(Duration::from_millis(250)).await;
        });
        let start = tokio::time::Instant::now();
        assert!(trigger.drain(Duration::from_secs(5)).await);
        assert_eq!(start.elapsed(), Duration::from_millis(250));
    }
}
