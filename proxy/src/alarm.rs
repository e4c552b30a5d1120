//! A rarely ready future watched beside busy work in one task (a connection and
//! its shutdown signal or its idle deadline), polled only after it woke the task.
//!
//! A connection's task wakes several times per request; polling the watched
//! future each time would cost a lock (a shutdown signal) or a timer check (a
//! deadline) for nothing.

use futures_util::task::AtomicWaker;
use std::{
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    task::{Context, Poll, Wake, Waker},
};

/// `future`, with the waker it is polled with, which notes that it rang.
pub struct Alarmed<F> {
    future: F,
    alarm: Arc<Alarm>,
    waker: Waker,
}

struct Alarm {
    rang: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Alarm {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.rang.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<F: Future + Unpin> Alarmed<F> {
    pub fn new(future: F) -> Self {
        let alarm = Arc::new(Alarm {
            // Polled the first time, so that it registers its waker.
            rang: AtomicBool::new(true),
            task: AtomicWaker::new(),
        });
        let waker = Waker::from(alarm.clone());
        Alarmed {
            future,
            alarm,
            waker,
        }
    }

    /// Polls the future if it woke the task since it was last polled; `Pending`
    /// otherwise. Once it has completed, it must not be polled again.
    pub fn poll_if_rang(&mut self, cx: &mut Context<'_>) -> Poll<F::Output> {
        // Registered before the check, so a ring after it still wakes the task.
        self.alarm.task.register(cx.waker());
        if !self.alarm.rang.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        Pin::new(&mut self.future).poll(&mut Context::from_waker(&self.waker))
    }

    /// The future, to change (a deadline moved); it is polled at the next
    /// [`Alarmed::poll_if_rang`].
    pub fn get_mut(&mut self) -> &mut F {
        self.alarm.rang.store(true, Ordering::Release);
        &mut self.future
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{future::poll_fn, pin::pin, time::Duration};

    /// A future that counts its polls.
    struct Counted<F>(F, usize);

    impl<F: Future + Unpin> Future for Counted<F> {
        type Output = F::Output;
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
            self.1 += 1;
            Pin::new(&mut self.0).poll(cx)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn polls_the_future_at_first_and_then_only_when_it_woke() {
        let sleep = pin!(tokio::time::sleep(Duration::from_secs(10)));
        let mut alarmed = Alarmed::new(Counted(sleep, 0));
        let mut busy = pin!(tokio::time::sleep(Duration::from_secs(1)));
        let mut task_polls = 0;
        poll_fn(|cx| {
            task_polls += 1;
            if alarmed.poll_if_rang(cx).is_ready() {
                return Poll::Ready(());
            }
            // Other work wakes the task every second.
            if busy.as_mut().poll(cx).is_ready() {
                let next = busy.deadline() + Duration::from_secs(1);
                busy.as_mut().reset(next);
                cx.waker().wake_by_ref();
            }
            Poll::Pending
        })
        .await;
        assert!(task_polls > 10, "the task woke {task_polls} times");
        assert_eq!(alarmed.future.1, 2, "polled to register, then when due");
    }

    #[tokio::test(start_paused = true)]
    async fn a_changed_future_is_polled_again() {
        let sleep = pin!(tokio::time::sleep(Duration::from_secs(10)));
        let mut alarmed = Alarmed::new(sleep);
        let start = tokio::time::Instant::now();
        let mut moved = false;
        poll_fn(|cx| {
            if !moved {
                assert!(alarmed.poll_if_rang(cx).is_pending());
                // Moved earlier while pending: the new deadline must be registered.
                alarmed
                    .get_mut()
                    .as_mut()
                    .reset(start + Duration::from_secs(3));
                moved = true;
            }
            alarmed.poll_if_rang(cx)
        })
        .await;
        assert_eq!(start.elapsed(), Duration::from_secs(3));
    }
}
