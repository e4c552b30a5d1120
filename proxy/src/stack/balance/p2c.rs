//! Power of two choices over a peak-EWMA latency estimate, as Linkerd balances:
//! two endpoints drawn at random, the one with the lower estimate × load wins.

use crate::rng::Rng;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use tokio::time::Instant;

/// The estimate an endpoint starts with, so a new one is neither shunned nor flooded.
const DEFAULT_RTT: Duration = Duration::from_millis(30);
/// tau, 10 s: how fast the estimate forgets; an observation tau old weighs 1/e.
const DECAY_NANOS: f64 = 10e9;

/// Peak-EWMA latency estimate of one endpoint, in nanoseconds as of `at`.
pub struct Rtt(Mutex<Estimate>);

struct Estimate {
    nanos: f64,
    at: Instant,
}

impl Rtt {
    pub fn new(now: Instant) -> Rtt {
        Rtt(Mutex::new(Estimate {
            nanos: DEFAULT_RTT.as_nanos() as f64,
            at: now,
        }))
    }

    /// A slower observation replaces the estimate at once, so a degrading endpoint
    /// sheds load now; a faster one is blended in by how long ago the last was.
    pub fn observe(&self, rtt: Duration, now: Instant) {
        let rtt = rtt.as_nanos() as f64;
        let mut state = self.lock();
        if rtt > state.nanos {
            state.nanos = rtt;
        } else {
            let weight = decay(now.saturating_duration_since(state.at));
            state.nanos = state.nanos * weight + rtt * (1.0 - weight);
        }
        state.at = now;
    }

    /// The estimate as of `now`. It decays toward zero while nothing is observed,
    /// as in Linkerd: otherwise an endpoint that was slow once would lose every
    /// comparison and never be measured again.
    pub fn at(&self, now: Instant) -> f64 {
        let state = self.lock();
        state.nanos * decay(now.saturating_duration_since(state.at))
    }
}

impl Rtt {
    /// Estimate × (in flight + 1): what choosing this endpoint is expected to cost.
    pub fn cost(&self, in_flight: u32, now: Instant) -> f64 {
        self.at(now) * (f64::from(in_flight) + 1.0)
    }

    /// The estimate is a plain number, valid at every step: a panic elsewhere
    /// does not make it unusable.
    fn lock(&self) -> MutexGuard<'_, Estimate> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The weight left on an estimate `elapsed` old.
fn decay(elapsed: Duration) -> f64 {
    (-(elapsed.as_nanos() as f64) / DECAY_NANOS).exp()
}

/// The cheaper of two of the `admitted` candidates drawn at random: `nth(k)` is the
/// index of candidate `k`, `cost(i)` what choosing index `i` would cost.
pub fn pick(
    admitted: usize,
    rng: &Rng,
    nth: impl Fn(usize) -> usize,
    cost: impl Fn(usize) -> f64,
) -> usize {
    if admitted <= 1 {
        return nth(0);
    }
    let n = admitted as u64;
    let first = rng.below(n) as usize;
    let mut second = rng.below(n - 1) as usize;
    if second >= first {
        second += 1;
    }
    let (a, b) = (nth(first), nth(second));
    if cost(b) < cost(a) {
        b
    } else {
        a
    }
}
