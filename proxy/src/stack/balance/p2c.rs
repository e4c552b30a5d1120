//! Power of two choices over a peak-EWMA latency estimate, as Linkerd balances:
//! two endpoints drawn at random, the one with the lower estimate × load wins.

use super::{lock, Endpoint, Filter};
use crate::rng::Rng;
use std::sync::{atomic::Ordering, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// The estimate an endpoint starts with, so a new one is neither shunned nor flooded.
const DEFAULT_RTT: Duration = Duration::from_millis(30);
/// tau, 10 s: how fast the estimate forgets; an observation tau old weighs 1/e.
const DECAY_NANOS: f64 = 10e9;

/// Peak-EWMA latency estimate of one endpoint, in nanoseconds as of `at`.
pub(super) struct Rtt(Mutex<Estimate>);

struct Estimate {
    nanos: f64,
    at: Instant,
}

impl Rtt {
    pub(super) fn new(now: Instant) -> Rtt {
        Rtt(Mutex::new(Estimate {
            nanos: DEFAULT_RTT.as_nanos() as f64,
            at: now,
        }))
    }

    /// A slower observation replaces the estimate at once, so a degrading endpoint
    /// sheds load now; a faster one is blended in by how long ago the last was.
    pub(super) fn observe(&self, rtt: Duration, now: Instant) {
        let rtt = rtt.as_nanos() as f64;
        let mut state = lock(&self.0);
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
    pub(super) fn at(&self, now: Instant) -> f64 {
        let state = lock(&self.0);
        state.nanos * decay(now.saturating_duration_since(state.at))
    }
}

/// The weight left on an estimate `elapsed` old.
fn decay(elapsed: Duration) -> f64 {
    (-(elapsed.as_nanos() as f64) / DECAY_NANOS).exp()
}

/// Estimate × (in flight + 1): what choosing this endpoint is expected to cost.
fn cost(endpoint: &Endpoint, now: Instant) -> f64 {
    let in_flight = f64::from(endpoint.in_flight.load(Ordering::Relaxed));
    endpoint.rtt.at(now) * (in_flight + 1.0)
}

/// The cheaper of two endpoints drawn from the `admitted` that `filter` lets through.
pub(super) fn pick(
    endpoints: &[std::sync::Arc<Endpoint>],
    filter: Filter,
    admitted: usize,
    rng: &Rng,
    now: Instant,
) -> usize {
    if admitted <= 1 {
        return filter.nth(endpoints, 0);
    }
    let n = admitted as u64;
    let first = rng.below(n) as usize;
    let mut second = rng.below(n - 1) as usize;
    if second >= first {
        second += 1;
    }
    let (a, b) = (filter.nth(endpoints, first), filter.nth(endpoints, second));
    if cost(&endpoints[b], now) < cost(&endpoints[a], now) {
        b
    } else {
        a
    }
}
