//! A small lock-free random source shared by the policies that draw per request
//! (weighted splits, fault percentages, P2C choices, backoff jitter).
//!
//! splitmix64 over an atomic counter: one atomic add per draw, no lock, and a seed
//! makes a run repeatable, which the tests use to check statistical bounds.

use std::sync::atomic::{AtomicU64, Ordering};

pub struct Rng(AtomicU64);

impl Rng {
    pub fn with_seed(seed: u64) -> Rng {
        Rng(AtomicU64::new(seed))
    }

    /// Seeded from the clock and the address of a stack value: different per process.
    pub fn from_entropy() -> Rng {
        let marker = 0u8;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Rng::with_seed(nanos ^ (&marker as *const u8 as u64).rotate_left(32))
    }

    pub fn next_u64(&self) -> u64 {
        let mut z = self
            .0
            .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
            .wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A value in `0..n` (`n` > 0), without modulo bias worth mentioning for the
    /// small `n` used here.
    pub fn below(&self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// A float in `[0, 1)`.
    pub fn unit(&self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// True with probability `percent` / 100.
    pub fn chance(&self, percent: f64) -> bool {
        self.unit() * 100.0 < percent
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_draws_repeat_and_spread() {
        let (a, b) = (Rng::with_seed(7), Rng::with_seed(7));
        assert_eq!(a.next_u64(), b.next_u64());
        let rng = Rng::with_seed(1);
        let mut counts = [0u32; 4];
        for _ in 0..40_000 {
            counts[rng.below(4) as usize] += 1;
        }
        assert!(
            counts.iter().all(|&c| (9_400..10_600).contains(&c)),
            "{counts:?}"
        );
        let hits = (0..100_000).filter(|_| rng.chance(10.0)).count();
        assert!((9_400..10_600).contains(&hits), "{hits}");
        assert!(!rng.chance(0.0) && rng.chance(100.0));
    }
}
