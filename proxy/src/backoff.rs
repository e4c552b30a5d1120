//! Full-jitter exponential backoff, shared by retries and the control-plane
//! reconnect: waits spread over the whole range, so clients that failed together
//! do not come back together.

use crate::rng::Rng;
use std::time::Duration;

/// Retry `n` (from 0) waits a uniformly random time in `[0, min(max, base * 2^n))`.
pub fn backoff(base: Duration, max: Duration, retry: u32, rng: &Rng) -> Duration {
    let ceiling = base.saturating_mul(1u32 << retry.min(20)).min(max);
    ceiling.mul_f64(rng.unit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_stays_within_full_jitter_bounds() {
        let rng = Rng::with_seed(3);
        let (base, max) = (Duration::from_millis(25), Duration::from_millis(250));
        for n in 0..8u32 {
            let ceiling = (base * 2u32.pow(n)).min(max);
            let draws: Vec<_> = (0..1000).map(|_| backoff(base, max, n, &rng)).collect();
            assert!(draws.iter().all(|d| *d < ceiling), "retry {n}");
            // Full jitter spreads over the whole range, not just near the ceiling.
            assert!(draws.iter().any(|d| *d < ceiling / 4), "retry {n}");
            assert!(draws.iter().any(|d| *d > ceiling * 3 / 4), "retry {n}");
        }
        // Far past the cap, and with huge bases, it neither overflows nor exceeds max.
        assert!(backoff(Duration::MAX, max, u32::MAX, &rng) < max);
    }
}
