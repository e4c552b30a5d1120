//! Power of two choices over a peak-EWMA latency estimate, as Linkerd balances:
//! two endpoints drawn at random, the one with the lower estimate × load wins.

use super::clock::nanos_after;
use crate::rng::Rng;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::time::Instant;

/// The estimate an endpoint starts with, so a new one is neither shunned nor flooded.
const DEFAULT_RTT: Duration = Duration::from_millis(30);
/// tau, 10 s: how fast the estimate forgets; an observation tau old weighs 1/e.
const DECAY_NANOS: f64 = 10e9;

/// Peak-EWMA latency estimate of one endpoint. Every pick reads two estimates and
/// every response updates one, so they are atomics, not a lock: two responses
/// observed at the same instant on different threads may both write, and the
/// estimate keeps one of them, which a heuristic can afford.
pub struct Rtt {
    /// The estimate in nanoseconds, as `f64` bits.
    nanos: AtomicU64,
    /// When it was made: nanoseconds after `epoch`.
    at: AtomicU64,
    epoch: Instant,
}

impl Rtt {
    pub fn new(now: Instant) -> Rtt {
        Rtt {
            nanos: AtomicU64::new((DEFAULT_RTT.as_nanos() as f64).to_bits()),
            at: AtomicU64::new(0),
            epoch: now,
        }
    }

    /// How long before `now` (nanoseconds after `epoch`) the estimate was made.
    fn age(&self, now: u64) -> Duration {
        Duration::from_nanos(now.saturating_sub(self.at.load(Ordering::Relaxed)))
    }

    fn estimate(&self) -> f64 {
        f64::from_bits(self.nanos.load(Ordering::Relaxed))
    }

    /// A slower observation replaces the estimate at once, so a degrading endpoint
    /// sheds load now; a faster one is blended in by how long ago the last was.
    pub fn observe(&self, rtt: Duration, now: Instant) {
        let rtt = rtt.as_nanos() as f64;
        let now = nanos_after(self.epoch, now);
        let estimate = self.estimate();
        let next = if rtt > estimate {
            rtt
        } else {
            let weight = decay(self.age(now));
            estimate * weight + rtt * (1.0 - weight)
        };
        self.nanos.store(next.to_bits(), Ordering::Relaxed);
        self.at.store(now, Ordering::Relaxed);
    }

    /// The estimate as of `now`. It decays toward zero while nothing is observed,
    /// as in Linkerd: otherwise an endpoint that was slow once would lose every
    /// comparison and never be measured again.
    pub fn at(&self, now: Instant) -> f64 {
        self.estimate() * decay(self.age(nanos_after(self.epoch, now)))
    }

    /// Estimate × (in flight + 1): what choosing this endpoint is expected to cost.
    pub fn cost(&self, in_flight: u32, now: Instant) -> f64 {
        self.at(now) * (f64::from(in_flight) + 1.0)
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
