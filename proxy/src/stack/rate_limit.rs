//! Local token-bucket rate limiting, with Envoy `local_ratelimit` semantics.
//!
//! A bucket starts full with `maxTokens`; each request takes one token or is refused
//! (429 `RL`). Every whole `fillInterval` since the bucket's
//! last fill adds `tokensPerFill`, capped at `maxTokens`. Fills are discrete and
//! computed lazily when a request arrives, so no timer runs per bucket.
//!
//! Requests without a key, and every request when no `keyHeader` is configured,
//! share one lock-free bucket: that path runs on every request of a limited route.
//!
//! With `keyHeader`, each header value gets its own bucket, behind one mutex. The
//! header is client-controlled, so at most `maxKeys` buckets exist. When the map is
//! full, a request with a new key first triggers a sweep that drops buckets which have
//! refilled to `maxTokens` (a full bucket behaves exactly like a new one, so nothing is
//! lost), at most once per fill interval to bound the cost. If no room is freed, the
//! new key takes from one shared overflow bucket: memory stays bounded and unknown keys
//! are still limited, together.

use super::{
    outcome::{BoxFuture, Failure, Flags, Req, Routed},
    stage::{Next, Stage},
};
use http::{HeaderName, StatusCode};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;
use tokio::time::Instant;
use trellis_proto::model::policy::RateLimit as Config;

/// A limit on calls: outbound on a route (a stage), or inbound on one of the pod's
/// ports; each request takes a token from the bucket of its key, or gets 429 `RL`.
pub struct RateLimit {
    limiter: RateLimiter,
    key_header: Option<HeaderName>,
    /// Refusals, on the route's or the port's labels.
    limited: metrics::Counter,
}

impl RateLimit {
    pub fn new(config: &Config, limited: metrics::Counter) -> RateLimit {
        RateLimit {
            limiter: RateLimiter::new(config),
            key_header: config.key_header.as_ref().map(|h| h.0.clone()),
            limited,
        }
    }

    /// Takes a token for this request, keyed by its `keyHeader` value.
    pub fn admit<B>(&self, req: &http::Request<B>) -> Result<(), Failure> {
        let key = self
            .key_header
            .as_ref()
            .and_then(|h| req.headers().get(h))
            .and_then(|v| v.to_str().ok());
        if self.limiter.try_acquire(key) {
            return Ok(());
        }
        self.limited.increment(1);
        Err(Failure::local(
            StatusCode::TOO_MANY_REQUESTS,
            Flags::RL,
            "rate limit exceeded",
        ))
    }
}

impl Stage for RateLimit {
    fn call<'a>(&'a self, req: Req, next: Next<'a>) -> BoxFuture<'a, Result<Routed, Failure>> {
        match self.admit(&req) {
            Ok(()) => next.call(req),
            Err(failure) => Box::pin(std::future::ready(Err(failure))),
        }
    }
}

pub struct RateLimiter {
    shape: Shape,
    /// Unkeyed requests, or all requests when no key header is configured.
    shared: AtomicBucket,
    keyed: Option<Keyed>,
}

impl RateLimiter {
    pub fn new(config: &Config) -> RateLimiter {
        let now = Instant::now();
        let shape = Shape::new(config);
        let keyed = config.key_header.as_ref().map(|_| Keyed {
            max_keys: usize::try_from(config.max_keys.0).unwrap_or(usize::MAX),
            overflow: AtomicBucket::full(&shape, now),
            buckets: Mutex::new(KeyedBuckets {
                map: HashMap::new(),
                last_sweep: now,
            }),
        });
        RateLimiter {
            shared: AtomicBucket::full(&shape, now),
            shape,
            keyed,
        }
    }

    /// Takes one token from the bucket for `key` (the value of config.key_header when the
    /// caller found that header; None otherwise) at tokio::time::Instant::now(); true = admitted.
    pub fn try_acquire(&self, key: Option<&str>) -> bool {
        match (&self.keyed, key) {
            (Some(keyed), Some(key)) => self.try_acquire_keyed(keyed, key),
            _ => self.shared.try_take(&self.shape),
        }
    }

    fn try_acquire_keyed(&self, keyed: &Keyed, key: &str) -> bool {
        let shape = &self.shape;
        // Nothing in the critical section can panic, so a poisoned lock still holds
        // consistent buckets; refusing to limit over it would be worse.
        let mut guard = keyed.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        // Read under the lock so every bucket sees time move forward.
        let now = Instant::now();
        let buckets = &mut *guard;
        if let Some(bucket) = buckets.map.get_mut(key) {
            return bucket.try_take(shape, now);
        }
        if buckets.map.len() >= keyed.max_keys && shape.filled_since(buckets.last_sweep, now) {
            buckets.last_sweep = now;
            buckets
                .map
                .retain(|_, bucket| !bucket.is_full_at(shape, now));
        }
        if buckets.map.len() < keyed.max_keys {
            let mut bucket = Bucket::full(shape, now);
            let admitted = bucket.try_take(shape, now);
            buckets.map.insert(key.into(), bucket);
            return admitted;
        }
        drop(guard);
        keyed.overflow.try_take(shape)
    }

    #[cfg(test)]
    fn key_count(&self) -> (usize, usize) {
        self.keyed.as_ref().map_or((0, 0), |keyed| {
            let buckets = keyed.buckets.lock().unwrap_or_else(PoisonError::into_inner);
            (buckets.map.len(), buckets.map.capacity())
        })
    }
}

struct Keyed {
    max_keys: usize,
    /// Shared by new keys once `max_keys` buckets exist and none can be dropped.
    overflow: AtomicBucket,
    buckets: Mutex<KeyedBuckets>,
}

struct KeyedBuckets {
    map: HashMap<Box<str>, Bucket>,
    last_sweep: Instant,
}

/// The configuration in the form the per-request arithmetic wants.
struct Shape {
    max_tokens: u32,
    per_fill: u32,
    /// At least 1: a zero interval (refused by the config parser) would divide by zero.
    interval_nanos: u64,
    /// Low bits of an [`AtomicBucket`] word that hold the token count.
    token_bits: u32,
}

impl Shape {
    fn new(config: &Config) -> Shape {
        let max_tokens = config.max_tokens.0;
        Shape {
            max_tokens,
            per_fill: config.tokens_per_fill(),
            interval_nanos: u64::try_from(config.fill_interval.as_nanos())
                .unwrap_or(u64::MAX)
                .max(1),
            token_bits: (u32::BITS - max_tokens.leading_zeros()).max(1),
        }
    }

    /// Whole fill intervals in `elapsed`, and the time past the last of them.
    fn fills(&self, elapsed: Duration) -> (u64, Duration) {
        match u64::try_from(elapsed.as_nanos()) {
            Ok(nanos) => (
                nanos / self.interval_nanos,
                Duration::from_nanos(nanos % self.interval_nanos),
            ),
            // Over 584 years: any bucket is full by now.
            Err(_) => (u64::MAX, Duration::ZERO),
        }
    }

    /// Whether a fill interval has passed between `since` and `now`.
    fn filled_since(&self, since: Instant, now: Instant) -> bool {
        self.fills(now.saturating_duration_since(since)).0 > 0
    }

    /// `tokens` after `fills` fills. Applying fills in parts gives the same result as
    /// all at once, which lets a refused request skip storing anything.
    fn refilled(&self, tokens: u32, fills: u64) -> u32 {
        let total = fills
            .saturating_mul(u64::from(self.per_fill))
            .saturating_add(u64::from(tokens));
        u32::try_from(total.min(u64::from(self.max_tokens))).unwrap_or(self.max_tokens)
    }
}

/// A bucket in one word, so taking a token is one compare-and-swap: the token count in
/// the low `token_bits`, and in the rest the number of fill intervals from `origin` to
/// the last fill. That count wraps after 2^(64 - token_bits) intervals, at least 2^32
/// (49 days at the parser's smallest interval, 1 ms; centuries unless maxTokens is
/// above 2^20); a bucket left untouched that long may come back short of full, until
/// its next fill.
struct AtomicBucket {
    origin: Instant,
    word: AtomicU64,
}

impl AtomicBucket {
    fn full(shape: &Shape, origin: Instant) -> AtomicBucket {
        AtomicBucket {
            origin,
            word: AtomicU64::new(u64::from(shape.max_tokens)),
        }
    }

    fn try_take(&self, shape: &Shape) -> bool {
        let token_mask = (1u64 << shape.token_bits) - 1;
        let fill_mask = u64::MAX >> shape.token_bits;
        let mut word = self.word.load(Ordering::Acquire);
        loop {
            // The clock is read after the word: a thread whose store we loaded read its
            // clock before that store, so the stored fill count is never ahead of ours.
            let now = Instant::now().saturating_duration_since(self.origin);
            let now_fills = shape.fills(now).0;
            let last_fill = word >> shape.token_bits;
            let elapsed = now_fills.wrapping_sub(last_fill) & fill_mask;
            let tokens = shape.refilled((word & token_mask) as u32, elapsed);
            if tokens == 0 {
                return false;
            }
            let next = (now_fills << shape.token_bits) | u64::from(tokens - 1);
            match self
                .word
                .compare_exchange_weak(word, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return true,
                Err(current) => word = current,
            }
        }
    }
}

/// A keyed bucket: the map's mutex makes plain fields enough.
struct Bucket {
    tokens: u32,
    last_fill: Instant,
}

impl Bucket {
    fn full(shape: &Shape, now: Instant) -> Bucket {
        Bucket {
            tokens: shape.max_tokens,
            last_fill: now,
        }
    }

    fn try_take(&mut self, shape: &Shape, now: Instant) -> bool {
        let (fills, past) = shape.fills(now.saturating_duration_since(self.last_fill));
        if fills > 0 {
            self.tokens = shape.refilled(self.tokens, fills);
            // last_fill += fills * interval, keeping fills on this bucket's boundaries.
            self.last_fill = now.checked_sub(past).unwrap_or(now);
        }
        if self.tokens == 0 {
            return false;
        }
        self.tokens -= 1;
        true
    }

    /// Whether the bucket has refilled to the top, so dropping it changes nothing.
    fn is_full_at(&self, shape: &Shape, now: Instant) -> bool {
        let fills = shape.fills(now.saturating_duration_since(self.last_fill)).0;
        shape.refilled(self.tokens, fills) == shape.max_tokens
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stack::testing::{request, stack, Scripted};
    use tokio::time::advance;
    use trellis_proto::model::policy::{HeaderKey, Limit};

    const SECOND: Duration = Duration::from_secs(1);
    const MS: Duration = Duration::from_millis(1);

    fn config(max_tokens: u32, tokens_per_fill: u32, interval: Duration) -> Config {
        Config {
            max_tokens: Limit(max_tokens),
            tokens_per_fill: Some(Limit(tokens_per_fill)),
            fill_interval: interval,
            key_header: None,
            max_keys: Limit(10_000),
        }
    }

    fn keyed(max_tokens: u32, tokens_per_fill: u32, max_keys: u32) -> Config {
        Config {
            key_header: Some(HeaderKey(HeaderName::from_static("x-client"))),
            max_keys: Limit(max_keys),
            ..config(max_tokens, tokens_per_fill, SECOND)
        }
    }

    /// Acquires until refused and returns how many were admitted.
    fn drain(limiter: &RateLimiter, key: Option<&str>) -> u32 {
        let mut admitted = 0;
        while admitted < 1_000_000 && limiter.try_acquire(key) {
            admitted += 1;
        }
        admitted
    }

    #[tokio::test(start_paused = true)]
    async fn admits_max_tokens_at_once_then_refuses() {
        let limiter = RateLimiter::new(&config(5, 2, SECOND));
        for _ in 0..5 {
            assert!(limiter.try_acquire(None));
        }
        assert!(!limiter.try_acquire(None));
        assert!(!limiter.try_acquire(None));
    }

    #[tokio::test(start_paused = true)]
    async fn refills_tokens_per_fill_at_each_interval_boundary() {
        let limiter = RateLimiter::new(&config(5, 2, SECOND));
        assert_eq!(drain(&limiter, None), 5);
        advance(SECOND - MS).await;
        assert!(!limiter.try_acquire(None), "refilled before the interval");
        advance(MS).await;
        assert_eq!(drain(&limiter, None), 2);
        // The next boundary is at 2 s from the start, not 1 s after the last acquire.
        advance(SECOND - MS).await;
        assert!(!limiter.try_acquire(None));
        advance(MS).await;
        assert_eq!(drain(&limiter, None), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn never_exceeds_max_tokens_after_idle() {
        let limiter = RateLimiter::new(&config(5, 2, SECOND));
        advance(Duration::from_secs(3600)).await;
        assert_eq!(drain(&limiter, None), 5);
        advance(Duration::from_secs(3600)).await;
        assert_eq!(drain(&limiter, None), 5);
        // tokensPerFill above maxTokens is capped too.
        let limiter = RateLimiter::new(&config(3, 10, SECOND));
        assert_eq!(drain(&limiter, None), 3);
        advance(SECOND).await;
        assert_eq!(drain(&limiter, None), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn admits_max_plus_fills_over_a_window() {
        const K: u32 = 7;
        let limiter = RateLimiter::new(&config(10, 3, SECOND));
        let mut admitted = 0;
        // Greedy clients every 100 ms from 0 through K intervals inclusive.
        for step in 0..=K * 10 {
            admitted += drain(&limiter, None);
            if step < K * 10 {
                advance(SECOND / 10).await;
            }
        }
        assert_eq!(admitted, 10 + K * 3);
    }

    #[tokio::test(start_paused = true)]
    async fn without_key_header_keys_share_one_bucket() {
        let limiter = RateLimiter::new(&config(4, 1, SECOND));
        assert!(limiter.try_acquire(Some("a")));
        assert!(limiter.try_acquire(Some("b")));
        assert!(limiter.try_acquire(None));
        assert!(limiter.try_acquire(Some("c")));
        assert!(!limiter.try_acquire(Some("d")));
        assert_eq!(limiter.key_count(), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn keys_are_independent() {
        let limiter = RateLimiter::new(&keyed(3, 1, 100));
        assert_eq!(drain(&limiter, Some("a")), 3);
        assert_eq!(drain(&limiter, Some("b")), 3);
        // Requests without the header have their own bucket.
        assert_eq!(drain(&limiter, None), 3);
        advance(SECOND / 2).await;
        assert_eq!(drain(&limiter, Some("c")), 3);
        // "a" and "b" fill at 1 s; "c", created at 0.5 s, at 1.5 s.
        advance(SECOND / 2).await;
        assert_eq!(drain(&limiter, Some("a")), 1);
        assert_eq!(drain(&limiter, Some("b")), 1);
        assert_eq!(drain(&limiter, Some("c")), 0);
        assert_eq!(drain(&limiter, None), 1);
        advance(SECOND / 2).await;
        assert_eq!(drain(&limiter, Some("c")), 1);
        // A fill seen late (at 2.25 s) leaves the next one on the bucket's own boundary.
        advance(SECOND * 3 / 4).await;
        assert_eq!(drain(&limiter, Some("a")), 1);
        advance(SECOND * 3 / 4 - MS).await;
        assert_eq!(drain(&limiter, Some("a")), 0);
        advance(MS).await;
        assert_eq!(drain(&limiter, Some("a")), 1);
        assert_eq!(limiter.key_count().0, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn new_keys_past_max_keys_share_the_overflow_bucket() {
        let limiter = RateLimiter::new(&keyed(5, 1, 3));
        for key in ["k0", "k1", "k2"] {
            assert!(limiter.try_acquire(Some(key)));
        }
        let (count, capacity) = limiter.key_count();
        assert_eq!(count, 3);
        // 1000 distinct new keys: 5 admitted in total, from the one overflow bucket.
        let mut admitted = 0;
        for i in 0..1000 {
            admitted += u32::from(limiter.try_acquire(Some(&format!("new{i}"))));
        }
        assert_eq!(admitted, 5);
        assert_eq!(limiter.key_count(), (3, capacity));
        // Known keys keep their own buckets (4 tokens left each), and the shared
        // unkeyed bucket is separate from the overflow one.
        assert_eq!(drain(&limiter, Some("k1")), 4);
        assert_eq!(drain(&limiter, None), 5);
        assert_eq!(limiter.key_count(), (3, capacity));
    }

    #[tokio::test(start_paused = true)]
    async fn full_buckets_make_room_for_new_keys_drained_ones_do_not() {
        let limiter = RateLimiter::new(&keyed(2, 1, 2));
        // "idle" takes one token and is full again after one fill; "busy" is drained
        // and still one short after one fill.
        assert!(limiter.try_acquire(Some("idle")));
        assert_eq!(drain(&limiter, Some("busy")), 2);
        assert!(limiter.try_acquire(Some("x")));
        assert!(limiter.try_acquire(Some("x")));
        assert!(
            !limiter.try_acquire(Some("y")),
            "overflow bucket is drained"
        );
        advance(SECOND).await;
        // The sweep drops "idle" (full) but keeps "busy" (1 of 2), so "x" gets a bucket.
        assert_eq!(drain(&limiter, Some("x")), 2);
        assert_eq!(limiter.key_count().0, 2);
        assert_eq!(drain(&limiter, Some("busy")), 1);
        // The map is full again and the next sweep is a fill interval away: overflow.
        assert_eq!(drain(&limiter, Some("z")), 1);
        assert_eq!(limiter.key_count().0, 2);
    }

    /// The lock-free path under real contention: no token is handed out twice. Runs
    /// outside a runtime (real clock) with an interval no test outlives.
    #[test]
    fn concurrent_acquires_take_each_token_once() {
        let limiter = RateLimiter::new(&config(2_000, 1, Duration::from_secs(3600)));
        let admitted = std::sync::atomic::AtomicU32::new(0);
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    for _ in 0..1_000 {
                        if limiter.try_acquire(None) {
                            admitted.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(admitted.into_inner(), 2_000);
    }

    #[test]
    fn word_layout_fits_the_largest_bucket() {
        let shape = Shape::new(&config(u32::MAX, u32::MAX, MS));
        assert_eq!(shape.token_bits, 32);
        assert_eq!(shape.refilled(0, u64::MAX), u32::MAX);
        assert_eq!(Shape::new(&config(1, 1, MS)).token_bits, 1);
        assert_eq!(Shape::new(&config(1, 1, Duration::ZERO)).interval_nanos, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_stage_keys_buckets_by_the_configured_header() {
        let upstream = Scripted::always(200);
        let limited = stack(
            RateLimit::new(&keyed(1, 1, 10), metrics::Counter::noop()),
            upstream.clone(),
        );
        let from = |client: &str| {
            let mut req = request();
            req.headers_mut()
                .insert("x-client", client.parse().unwrap());
            req
        };
        assert!(limited.call(from("a")).await.is_ok());
        let refused = limited.call(from("a")).await.unwrap_err();
        assert_eq!(
            (refused.status.as_u16(), refused.flags.label()),
            (429, "RL")
        );
        assert!(limited.call(from("b")).await.is_ok());
        assert_eq!(upstream.calls(), 2, "the refused request went nowhere");
    }
}
