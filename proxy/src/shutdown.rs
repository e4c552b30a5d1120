//! Graceful shutdown: one signal tells every listener and connection to wind down,
//! and the process waits (bounded) until all of them have.

use crate::alarm::Alarmed;
use std::{
    future::{poll_fn, Future},
    pin::{pin, Pin},
    time::Duration,
};
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

    /// Runs `work` to its end, calling `wind_down` on it once when shutdown
    /// begins (a graceful close that it then finishes).
    ///
    /// The same as selecting over `work` and [`Drain::signaled`], but the drain
    /// is polled only after it woke the task ([`Alarmed`]).
    pub async fn wind_down_on_signal<F: Future>(
        mut self,
        mut work: Pin<&mut F>,
        wind_down: impl FnOnce(Pin<&mut F>),
    ) -> F::Output {
        let signaled = pin!(self.signaled());
        let mut signaled = Alarmed::new(signaled);
        let mut wind_down = Some(wind_down);
        poll_fn(|cx| {
            if wind_down.is_some() && signaled.poll_if_rang(cx).is_ready() {
                if let Some(wind_down) = wind_down.take() {
                    wind_down(work.as_mut());
                }
            }
            work.as_mut().poll(cx)
        })
        .await
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
    use std::task::{Context, Poll};

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

    /// Work that counts its polls and, once wound down, finishes on its next poll.
    struct Work {
        polls: usize,
        wound_down: bool,
    }

    impl Future for Work {
        type Output = usize;
        fn poll(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<usize> {
            self.polls += 1;
            match self.wound_down {
                true => Poll::Ready(self.polls),
                false => Poll::Pending,
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn work_is_wound_down_once_when_shutdown_begins_and_run_to_its_end() {
        let (trigger, drain) = channel();
        let task = tokio::spawn(async move {
            let mut work = pin!(Work {
                polls: 0,
                wound_down: false,
            });
            let mut calls = 0;
            let polls = drain
                .wind_down_on_signal(work.as_mut(), |work| {
                    calls += 1;
                    work.get_mut().wound_down = true;
                })
                .await;
            (polls, calls)
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!task.is_finished(), "work ended before shutdown began");
        assert!(trigger.drain(Duration::from_secs(5)).await);
        let (polls, calls) = task.await.unwrap();
        assert_eq!(calls, 1);
        assert_eq!(
            polls, 2,
            "polled once at the start and once after the signal"
        );
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
