//! Endpoint choice for one backend: power of two choices over a peak-EWMA latency
//! estimate (as Linkerd), or a consistent-hash ring (as Envoy's `RING_HASH`), with
//! Envoy's consecutive-error outlier ejection on top of either.
//!
//! A pick runs per request, so it allocates nothing and takes only short
//! per-endpoint locks, never held across an await; the backend-wide outlier lock is
//! taken only when an ejection may start or end. Ejected endpoints come back lazily
//! on the next pick or answer: there is no background task.

use crate::policy::{BalancerType, LoadBalancer, OutlierDetection};
use crate::rng::Rng;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use tokio::time::Instant;

/// Counter, label `backend`: one per ejection.
pub const OUTLIER_EJECTIONS_TOTAL: &str = "trellis_outlier_ejections_total";
/// Gauge, label `backend`: endpoints ejected right now.
pub const ENDPOINTS_EJECTED: &str = "trellis_endpoints_ejected";

/// The estimate an endpoint starts with, so a new one is neither shunned nor flooded.
const DEFAULT_RTT: Duration = Duration::from_millis(30);
/// tau, 10 s: how fast the estimate forgets; an observation tau old weighs 1/e.
const DECAY_NANOS: f64 = 10e9;
/// Ring positions at least (Envoy's minimum is 1024): shares of the key space
/// then stay within a few % of even for up to ten endpoints.
const RING_MIN: usize = 4096;
/// Positions per endpoint at least, so larger sets stay within about 25 %.
const VNODES_MIN: usize = 160;
/// Envoy's default `max_ejection_time`: a flapping endpoint is not lost for hours.
const MAX_EJECTION_TIME: Duration = Duration::from_secs(300);

/// The stable hash used for ring-hash keys (header value bytes or source IP bytes):
/// deterministic across processes.
///
/// XXH64 with seed 0, as Envoy hashes its ring, so the value is pinned by the
/// published test vectors rather than by this build's `std` hasher.
pub fn hash_key(bytes: &[u8]) -> u64 {
    xxh64(bytes)
}

/// One request's use of an endpoint: counts as in flight until finished or dropped.
pub struct Pick {
    shared: Arc<Shared>,
    index: usize,
    start: Instant,
}

impl Pick {
    pub fn addr(&self) -> SocketAddr {
        self.endpoint().addr
    }

    /// Records the request's latency (pick → now) and outcome.
    pub fn finish(self, outcome: Outcome) {
        let now = Instant::now();
        self.endpoint()
            .observe(now.saturating_duration_since(self.start), now);
        if let Some(outlier) = &self.shared.outlier {
            outlier.record(&self.shared, self.index, outcome, now);
        }
        // Dropping `self` ends the in-flight count.
    }

    fn endpoint(&self) -> &Endpoint {
        &self.shared.endpoints[self.index]
    }
}

impl Drop for Pick {
    fn drop(&mut self) {
        self.endpoint().in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl fmt::Debug for Pick {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pick").field("addr", &self.addr()).finish()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// a 5xx other than 502/503/504
    Error5xx,
    /// 502, 503, 504, connect failure or reset
    GatewayError,
}

pub struct Balancer {
    shared: Arc<Shared>,
}

impl Balancer {
    /// `label` names the backend in metrics (e.g. "reviews-v2.shop:8080").
    pub fn new(
        label: Arc<str>,
        endpoints: &[SocketAddr],
        lb: &LoadBalancer,
        outlier: Option<&OutlierDetection>,
        rng: Rng,
    ) -> Balancer {
        let now = Instant::now();
        let ring = match lb.kind {
            BalancerType::RingHash => build_ring(endpoints),
            BalancerType::P2CEwma => Box::default(),
        };
        let outlier = outlier.map(|config| Outlier::new(config, endpoints.len(), now));
        if outlier.is_some() {
            // A rebuilt balancer starts with nothing ejected; say so rather than
            // leave the previous one's count standing.
            metrics::gauge!(ENDPOINTS_EJECTED, "backend" => Arc::clone(&label)).set(0.0);
        }
        Balancer {
            shared: Arc::new(Shared {
                label,
                endpoints: endpoints
                    .iter()
                    .map(|&addr| Endpoint::new(addr, now))
                    .collect(),
                ring,
                outlier,
                rng,
            }),
        }
    }

    /// Chooses an endpoint that is not ejected. `hash` is the request's key for
    /// RingHash (ignored by P2C; when RingHash gets None it falls back to P2C).
    /// `avoid`: an endpoint to skip when another is available (a retry goes
    /// elsewhere). None only when there are no endpoints.
    pub fn pick(&self, hash: Option<u64>, avoid: Option<SocketAddr>) -> Option<Pick> {
        let shared = &self.shared;
        if shared.endpoints.is_empty() {
            return None;
        }
        let now = Instant::now();
        if let Some(outlier) = &shared.outlier {
            outlier.return_if_due(shared, now);
        }
        let (filter, admitted) = shared.filter(avoid);
        let index = match hash {
            Some(hash) if !shared.ring.is_empty() => shared.ring_pick(hash, filter),
            _ => shared.p2c_pick(filter, admitted, now),
        };
        Some(shared.take(index, now))
    }

    /// Endpoints currently ejected (for tests and /config_dump).
    pub fn ejected(&self) -> Vec<SocketAddr> {
        let shared = &self.shared;
        let Some(outlier) = &shared.outlier else {
            return Vec::new();
        };
        let mut state = lock(&outlier.state);
        outlier.return_due(&mut state, shared, Instant::now());
        state
            .health
            .iter()
            .zip(shared.endpoints.iter())
            .filter(|(health, _)| health.ejected_until.is_some())
            .map(|(_, endpoint)| endpoint.addr)
            .collect()
    }
}

impl fmt::Debug for Balancer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Balancer")
            .field("backend", &self.shared.label)
            .field("endpoints", &self.shared.endpoints.len())
            .field("ring_hash", &!self.shared.ring.is_empty())
            .finish()
    }
}

struct Shared {
    label: Arc<str>,
    endpoints: Box<[Endpoint]>,
    /// `(position, endpoint index)` sorted by position; empty unless RingHash.
    ring: Box<[(u64, usize)]>,
    outlier: Option<Outlier>,
    rng: Rng,
}

/// Which endpoints a pick may take.
#[derive(Clone, Copy)]
struct Filter {
    skip_ejected: bool,
    avoid: Option<SocketAddr>,
}

impl Filter {
    const ALL: Filter = Filter {
        skip_ejected: false,
        avoid: None,
    };

    fn is_all(self) -> bool {
        !self.skip_ejected && self.avoid.is_none()
    }

    fn admits(self, endpoint: &Endpoint) -> bool {
        !(self.skip_ejected && endpoint.ejected.load(Ordering::Relaxed))
            && self.avoid != Some(endpoint.addr)
    }
}

impl Shared {
    fn take(self: &Arc<Self>, index: usize, now: Instant) -> Pick {
        self.endpoints[index]
            .in_flight
            .fetch_add(1, Ordering::Relaxed);
        Pick {
            shared: Arc::clone(self),
            index,
            start: now,
        }
    }

    /// The narrowest filter that still admits someone, and how many it admits:
    /// healthy and not `avoid`; else healthy (only `avoid` is); else, with every
    /// endpoint ejected, all of them rather than failing the request.
    fn filter(&self, avoid: Option<SocketAddr>) -> (Filter, usize) {
        let skip_ejected = self
            .outlier
            .as_ref()
            .is_some_and(|outlier| outlier.ejected.load(Ordering::Relaxed) > 0);
        let tiers = [
            Filter {
                skip_ejected,
                avoid,
            },
            Filter {
                skip_ejected,
                avoid: None,
            },
            Filter {
                skip_ejected: false,
                avoid,
            },
        ];
        for filter in tiers {
            let admitted = self.admitted(filter);
            if admitted > 0 {
                return (filter, admitted);
            }
        }
        (Filter::ALL, self.endpoints.len())
    }

    fn admitted(&self, filter: Filter) -> usize {
        if filter.is_all() {
            return self.endpoints.len();
        }
        self.endpoints.iter().filter(|e| filter.admits(e)).count()
    }

    /// The index of the `k`-th endpoint the filter admits.
    fn nth(&self, filter: Filter, k: usize) -> usize {
        if filter.is_all() {
            return k;
        }
        self.endpoints
            .iter()
            .enumerate()
            .filter(|(_, e)| filter.admits(e))
            .map(|(i, _)| i)
            .nth(k)
            // Only if an ejection raced this pick; any endpoint will do then.
            .unwrap_or(0)
    }

    fn p2c_pick(&self, filter: Filter, admitted: usize, now: Instant) -> usize {
        if admitted <= 1 {
            return self.nth(filter, 0);
        }
        let n = admitted as u64;
        let first = self.rng.below(n) as usize;
        let mut second = self.rng.below(n - 1) as usize;
        if second >= first {
            second += 1;
        }
        let (a, b) = (self.nth(filter, first), self.nth(filter, second));
        if self.endpoints[b].cost(now) < self.endpoints[a].cost(now) {
            b
        } else {
            a
        }
    }

    /// The first admitted endpoint at or after `hash` on the ring, so only the keys
    /// of a skipped endpoint move, each to its ring successor.
    fn ring_pick(&self, hash: u64, filter: Filter) -> usize {
        let len = self.ring.len();
        let start = self.ring.partition_point(|&(position, _)| position < hash);
        (0..len)
            .map(|step| self.ring[(start + step) % len].1)
            .find(|&i| filter.admits(&self.endpoints[i]))
            .unwrap_or(self.ring[start % len].1)
    }
}

struct Endpoint {
    addr: SocketAddr,
    in_flight: AtomicU32,
    ejected: AtomicBool,
    /// Runs of errors, kept here rather than under the outlier lock so that a
    /// success, the common case, takes no shared lock.
    consecutive_5xx: AtomicU32,
    consecutive_gateway: AtomicU32,
    rtt: Mutex<Rtt>,
}

/// Peak-EWMA latency estimate in nanoseconds, as of `at`.
struct Rtt {
    estimate: f64,
    at: Instant,
}

impl Endpoint {
    fn new(addr: SocketAddr, now: Instant) -> Endpoint {
        Endpoint {
            addr,
            in_flight: AtomicU32::new(0),
            ejected: AtomicBool::new(false),
            consecutive_5xx: AtomicU32::new(0),
            consecutive_gateway: AtomicU32::new(0),
            rtt: Mutex::new(Rtt {
                estimate: DEFAULT_RTT.as_nanos() as f64,
                at: now,
            }),
        }
    }

    /// A slower observation replaces the estimate at once, so a degrading endpoint
    /// sheds load now; a faster one is blended in by how long ago the last was.
    fn observe(&self, rtt: Duration, now: Instant) {
        let rtt = rtt.as_nanos() as f64;
        let mut state = lock(&self.rtt);
        if rtt > state.estimate {
            state.estimate = rtt;
        } else {
            let weight = decay(now.saturating_duration_since(state.at));
            state.estimate = state.estimate * weight + rtt * (1.0 - weight);
        }
        state.at = now;
    }

    /// Estimate × (in flight + 1). The estimate also decays toward zero while
    /// nothing is observed, as in Linkerd: otherwise an endpoint that was slow
    /// once would lose every comparison and never be measured again.
    fn cost(&self, now: Instant) -> f64 {
        let in_flight = f64::from(self.in_flight.load(Ordering::Relaxed));
        let state = lock(&self.rtt);
        state.estimate * decay(now.saturating_duration_since(state.at)) * (in_flight + 1.0)
    }
}

/// The weight left on an estimate `elapsed` old.
fn decay(elapsed: Duration) -> f64 {
    (-(elapsed.as_nanos() as f64) / DECAY_NANOS).exp()
}

/// Envoy-style consecutive-error ejection for one backend.
struct Outlier {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    interval: Duration,
    base_ejection_time: Duration,
    max_ejection_percent: f64,
    /// Zero point for `next_return`, which must fit in an atomic.
    epoch: Instant,
    /// Nanoseconds after `epoch` when the earliest ejection ends (`u64::MAX`:
    /// none), so a pick takes the lock only when someone may be due back.
    next_return: AtomicU64,
    /// Endpoints ejected now, readable without the lock.
    ejected: AtomicUsize,
    state: Mutex<OutlierState>,
}

struct OutlierState {
    health: Vec<Health>,
    ejected: usize,
}

struct Health {
    /// Times ejected, less one per `interval` spent back in service.
    multiplier: u32,
    ejected_until: Option<Instant>,
    /// Since when the multiplier has been wearing off.
    in_service_since: Instant,
}

impl Outlier {
    fn new(config: &OutlierDetection, endpoints: usize, now: Instant) -> Outlier {
        let health = (0..endpoints)
            .map(|_| Health {
                multiplier: 0,
                ejected_until: None,
                in_service_since: now,
            })
            .collect();
        Outlier {
            consecutive_5xx: config.consecutive_5xx.0.max(1),
            consecutive_gateway: config.consecutive_gateway_errors.0.max(1),
            interval: config.interval,
            base_ejection_time: config.base_ejection_time,
            max_ejection_percent: config.max_ejection_percent.0,
            epoch: now,
            next_return: AtomicU64::new(u64::MAX),
            ejected: AtomicUsize::new(0),
            state: Mutex::new(OutlierState { health, ejected: 0 }),
        }
    }

    fn since_epoch(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX - 1)
    }

    fn due(&self, now: Instant) -> bool {
        self.since_epoch(now) >= self.next_return.load(Ordering::Acquire)
    }

    fn return_if_due(&self, shared: &Shared, now: Instant) {
        if self.due(now) {
            self.return_due(&mut lock(&self.state), shared, now);
        }
    }

    /// Puts back every endpoint whose ejection has ended by `now`.
    fn return_due(&self, state: &mut OutlierState, shared: &Shared, now: Instant) {
        if !self.due(now) {
            return;
        }
        let mut returned = false;
        let mut next = u64::MAX;
        for (health, endpoint) in state.health.iter_mut().zip(shared.endpoints.iter()) {
            match health.ejected_until {
                Some(until) if until <= now => {
                    health.ejected_until = None;
                    health.in_service_since = until;
                    endpoint.consecutive_5xx.store(0, Ordering::Relaxed);
                    endpoint.consecutive_gateway.store(0, Ordering::Relaxed);
                    endpoint.ejected.store(false, Ordering::Relaxed);
                    returned = true;
                }
                Some(until) => next = next.min(self.since_epoch(until)),
                None => {}
            }
        }
        self.next_return.store(next, Ordering::Release);
        if returned {
            state.ejected = state
                .health
                .iter()
                .filter(|h| h.ejected_until.is_some())
                .count();
            self.publish(&shared.label, state.ejected);
        }
    }

    fn record(&self, shared: &Shared, index: usize, outcome: Outcome, now: Instant) {
        self.return_if_due(shared, now);
        let endpoint = &shared.endpoints[index];
        // Answers still arriving from an ejected endpoint decide nothing: its
        // runs start afresh when it returns.
        if endpoint.ejected.load(Ordering::Relaxed) {
            return;
        }
        let (run_5xx, run_gateway) = match outcome {
            Outcome::Success => {
                endpoint.consecutive_5xx.store(0, Ordering::Relaxed);
                endpoint.consecutive_gateway.store(0, Ordering::Relaxed);
                return;
            }
            // Envoy: any other 5xx breaks a run of gateway errors.
            Outcome::Error5xx => {
                endpoint.consecutive_gateway.store(0, Ordering::Relaxed);
                (bump(&endpoint.consecutive_5xx), 0)
            }
            Outcome::GatewayError => (
                bump(&endpoint.consecutive_5xx),
                bump(&endpoint.consecutive_gateway),
            ),
        };
        let trips_5xx = run_5xx >= self.consecutive_5xx;
        let trips_gateway = run_gateway >= self.consecutive_gateway;
        if !(trips_5xx || trips_gateway) {
            return;
        }
        let mut state = lock(&self.state);
        // Envoy resets a run that trips whether or not the ejection is allowed,
        // so a capped endpoint needs a fresh run of errors to try again.
        if trips_5xx {
            endpoint.consecutive_5xx.store(0, Ordering::Relaxed);
        }
        if trips_gateway {
            endpoint.consecutive_gateway.store(0, Ordering::Relaxed);
        }
        // Another thread's answer may have ejected it since the check above.
        if !endpoint.ejected.load(Ordering::Relaxed) {
            self.eject(&mut state, shared, index, now);
        }
    }

    fn eject(&self, state: &mut OutlierState, shared: &Shared, index: usize, now: Instant) {
        let total = state.health.len();
        let after = state.ejected + 1;
        // Never the last endpoint in service; past the percentage only if no one
        // else is out (Envoy lets one endpoint go even when 1 is over the limit).
        let within = 100.0 * after as f64 <= self.max_ejection_percent * total as f64;
        if after >= total || !(within || state.ejected == 0) {
            return;
        }
        let Some(health) = state.health.get_mut(index) else {
            return;
        };
        let served = now.saturating_duration_since(health.in_service_since);
        let worn_off = served
            .as_nanos()
            .checked_div(self.interval.as_nanos())
            .map_or(u32::MAX, |periods| {
                u32::try_from(periods).unwrap_or(u32::MAX)
            });
        health.multiplier = health.multiplier.saturating_sub(worn_off).saturating_add(1);
        let duration = self
            .base_ejection_time
            .saturating_mul(health.multiplier)
            .min(MAX_EJECTION_TIME.max(self.base_ejection_time));
        let until = now
            .checked_add(duration)
            .or_else(|| now.checked_add(MAX_EJECTION_TIME))
            .unwrap_or(now);
        health.ejected_until = Some(until);
        shared.endpoints[index]
            .ejected
            .store(true, Ordering::Relaxed);
        state.ejected = after;
        self.next_return
            .fetch_min(self.since_epoch(until), Ordering::AcqRel);
        metrics::counter!(OUTLIER_EJECTIONS_TOTAL, "backend" => Arc::clone(&shared.label))
            .increment(1);
        self.publish(&shared.label, after);
    }

    fn publish(&self, label: &Arc<str>, ejected: usize) {
        self.ejected.store(ejected, Ordering::Relaxed);
        metrics::gauge!(ENDPOINTS_EJECTED, "backend" => Arc::clone(label)).set(ejected as f64);
    }
}

/// Adds one to a run of errors and returns the new length.
fn bump(run: &AtomicU32) -> u32 {
    run.fetch_add(1, Ordering::Relaxed).saturating_add(1)
}

/// Endpoints' virtual nodes hashed from address, port and replica number, so
/// every proxy builds the same ring from the same endpoint set.
fn build_ring(endpoints: &[SocketAddr]) -> Box<[(u64, usize)]> {
    if endpoints.is_empty() {
        return Box::default();
    }
    let replicas = RING_MIN.div_ceil(endpoints.len()).max(VNODES_MIN);
    let mut ring = Vec::with_capacity(replicas.saturating_mul(endpoints.len()));
    for (index, addr) in endpoints.iter().enumerate() {
        let mut key = [0u8; 22];
        let ip_len = match addr.ip() {
            IpAddr::V4(ip) => {
                key[..4].copy_from_slice(&ip.octets());
                4
            }
            IpAddr::V6(ip) => {
                key[..16].copy_from_slice(&ip.octets());
                16
            }
        };
        key[ip_len..ip_len + 2].copy_from_slice(&addr.port().to_be_bytes());
        for replica in 0..replicas as u32 {
            key[ip_len + 2..ip_len + 6].copy_from_slice(&replica.to_be_bytes());
            ring.push((hash_key(&key[..ip_len + 6]), index));
        }
    }
    ring.sort_unstable();
    ring.into_boxed_slice()
}

/// A lock that a panic elsewhere does not take down with it: the guarded values
/// are plain numbers, valid at every step.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

const P1: u64 = 0x9E37_79B1_85EB_CA87;
const P2: u64 = 0xC2B2_AE3D_27D4_EB4F;
const P3: u64 = 0x1656_67B1_9E37_79F9;
const P4: u64 = 0x85EB_CA77_C2B2_AE63;
const P5: u64 = 0x27D4_EB2F_1656_67C5;

fn xxh64(input: &[u8]) -> u64 {
    fn round(acc: u64, lane: u64) -> u64 {
        acc.wrapping_add(lane.wrapping_mul(P2))
            .rotate_left(31)
            .wrapping_mul(P1)
    }
    fn merge(acc: u64, lane: u64) -> u64 {
        (acc ^ round(0, lane)).wrapping_mul(P1).wrapping_add(P4)
    }
    /// Little-endian value of up to 8 bytes.
    fn le(bytes: &[u8]) -> u64 {
        bytes
            .iter()
            .rev()
            .fold(0, |acc, &b| (acc << 8) | u64::from(b))
    }

    let stripes = input.chunks_exact(32);
    let mut rest = stripes.remainder();
    let mut hash = if input.len() >= 32 {
        let mut v = [P1.wrapping_add(P2), P2, 0, 0u64.wrapping_sub(P1)];
        for stripe in stripes {
            for (acc, lane) in v.iter_mut().zip(stripe.chunks_exact(8)) {
                *acc = round(*acc, le(lane));
            }
        }
        let mut h = v[0]
            .rotate_left(1)
            .wrapping_add(v[1].rotate_left(7))
            .wrapping_add(v[2].rotate_left(12))
            .wrapping_add(v[3].rotate_left(18));
        for lane in v {
            h = merge(h, lane);
        }
        h
    } else {
        P5
    };
    hash = hash.wrapping_add(input.len() as u64);
    while rest.len() >= 8 {
        hash ^= round(0, le(&rest[..8]));
        hash = hash.rotate_left(27).wrapping_mul(P1).wrapping_add(P4);
        rest = &rest[8..];
    }
    if rest.len() >= 4 {
        hash ^= le(&rest[..4]).wrapping_mul(P1);
        hash = hash.rotate_left(23).wrapping_mul(P2).wrapping_add(P3);
        rest = &rest[4..];
    }
    for &byte in rest {
        hash ^= u64::from(byte).wrapping_mul(P5);
        hash = hash.rotate_left(11).wrapping_mul(P1);
    }
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(P2);
    hash ^= hash >> 29;
    hash = hash.wrapping_mul(P3);
    hash ^ (hash >> 32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Limit, Percent};
    use std::collections::HashMap;
    use tokio::time::advance;

    fn addrs(n: usize) -> Vec<SocketAddr> {
        (0..n)
            .map(|i| SocketAddr::from(([10, 0, 0, i as u8 + 1], 8080)))
            .collect()
    }

    fn p2c() -> LoadBalancer {
        LoadBalancer::default()
    }

    fn ring() -> LoadBalancer {
        LoadBalancer {
            kind: BalancerType::RingHash,
            hash_on: None,
        }
    }

    fn outlier(max_percent: f64) -> OutlierDetection {
        OutlierDetection {
            max_ejection_percent: Percent(max_percent),
            ..OutlierDetection::default()
        }
    }

    fn balancer(
        endpoints: &[SocketAddr],
        lb: &LoadBalancer,
        outlier: Option<&OutlierDetection>,
    ) -> Balancer {
        Balancer::new(
            "reviews.shop:8080".into(),
            endpoints,
            lb,
            outlier,
            Rng::with_seed(7),
        )
    }

    /// A pick of one given endpoint, whatever the balancer would choose.
    fn pick_on(b: &Balancer, addr: SocketAddr) -> Pick {
        let index = b
            .shared
            .endpoints
            .iter()
            .position(|e| e.addr == addr)
            .expect("test endpoint");
        b.shared.take(index, Instant::now())
    }

    fn fail(b: &Balancer, addr: SocketAddr, outcome: Outcome, times: usize) {
        for _ in 0..times {
            pick_on(b, addr).finish(outcome);
        }
    }

    /// Picks made by `n` requests with no hash, by endpoint.
    fn spread(b: &Balancer, n: usize) -> HashMap<SocketAddr, usize> {
        let mut counts = HashMap::new();
        for _ in 0..n {
            let pick = b.pick(None, None).expect("endpoints");
            *counts.entry(pick.addr()).or_default() += 1;
        }
        counts
    }

    /// Records counters and gauges as numbers keyed `name{label=value}`.
    #[derive(Default)]
    struct Capture(Mutex<HashMap<String, Arc<AtomicU64>>>);

    impl Capture {
        fn slot(&self, key: &metrics::Key) -> Arc<AtomicU64> {
            let labels: Vec<String> = key
                .labels()
                .map(|l| format!("{}={}", l.key(), l.value()))
                .collect();
            let name = format!("{}{{{}}}", key.name(), labels.join(","));
            Arc::clone(lock(&self.0).entry(name).or_default())
        }

        fn value(&self, name: &str) -> Option<u64> {
            let key = format!("{name}{{backend=reviews.shop:8080}}");
            lock(&self.0).get(&key).map(|v| v.load(Ordering::Relaxed))
        }

        fn counter(&self, name: &str) -> u64 {
            self.value(name).unwrap_or(0)
        }

        fn gauge(&self, name: &str) -> f64 {
            self.value(name).map_or(f64::NAN, f64::from_bits)
        }
    }

    impl metrics::Recorder for Capture {
        fn describe_counter(
            &self,
            _: metrics::KeyName,
            _: Option<metrics::Unit>,
            _: metrics::SharedString,
        ) {
        }
        fn describe_gauge(
            &self,
            _: metrics::KeyName,
            _: Option<metrics::Unit>,
            _: metrics::SharedString,
        ) {
        }
        fn describe_histogram(
            &self,
            _: metrics::KeyName,
            _: Option<metrics::Unit>,
            _: metrics::SharedString,
        ) {
        }
        fn register_counter(
            &self,
            key: &metrics::Key,
            _: &metrics::Metadata<'_>,
        ) -> metrics::Counter {
            metrics::Counter::from_arc(self.slot(key))
        }
        fn register_gauge(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
            metrics::Gauge::from_arc(self.slot(key))
        }
        fn register_histogram(
            &self,
            _: &metrics::Key,
            _: &metrics::Metadata<'_>,
        ) -> metrics::Histogram {
            metrics::Histogram::noop()
        }
    }

    #[test]
    fn hash_key_is_xxh64() {
        // The published XXH64 (seed 0) vectors; the last one covers the 32-byte stripes.
        assert_eq!(hash_key(b""), 0xEF46_DB37_51D8_E999);
        assert_eq!(hash_key(b"a"), 0xD24E_C4F1_A98C_6E5B);
        assert_eq!(hash_key(b"abc"), 0x44BC_2CF5_AD77_0999);
        assert_eq!(
            hash_key(b"The quick brown fox jumps over the lazy dog"),
            0x0B24_2D36_1FDA_71BC
        );
    }

    #[test]
    fn shared_between_threads_and_held_across_awaits() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Balancer>();
        send_sync::<Pick>();
    }

    #[tokio::test(start_paused = true)]
    async fn no_endpoints_no_pick_and_one_endpoint_is_always_taken() {
        let b = balancer(&[], &p2c(), Some(&outlier(100.0)));
        assert!(b.pick(None, None).is_none());
        assert!(b.pick(Some(1), None).is_none());
        assert!(b.ejected().is_empty());

        let one = addrs(1);
        let b = balancer(&one, &ring(), Some(&outlier(100.0)));
        assert_eq!(b.pick(None, Some(one[0])).map(|p| p.addr()), Some(one[0]));
        fail(&b, one[0], Outcome::GatewayError, 50);
        assert!(b.ejected().is_empty(), "the last endpoint is never ejected");
        assert_eq!(b.pick(Some(3), None).map(|p| p.addr()), Some(one[0]));
    }

    #[tokio::test(start_paused = true)]
    async fn p2c_sends_less_to_the_slower_endpoint() {
        let eps = addrs(2);
        let (slow, fast) = (eps[0], eps[1]);
        let latency = |addr| {
            if addr == slow {
                Duration::from_millis(100)
            } else {
                Duration::from_millis(1)
            }
        };
        let b = balancer(&eps, &p2c(), None);
        for addr in [slow, fast] {
            let pick = pick_on(&b, addr);
            advance(latency(addr)).await;
            pick.finish(Outcome::Success);
        }
        let mut slow_picks = 0;
        for _ in 0..1000 {
            let pick = b.pick(None, None).expect("endpoints");
            slow_picks += usize::from(pick.addr() == slow);
            advance(latency(pick.addr())).await;
            pick.finish(Outcome::Success);
        }
        assert!(slow_picks < 200, "slow endpoint got {slow_picks} of 1000");
    }

    #[tokio::test(start_paused = true)]
    async fn p2c_probes_a_once_slow_endpoint_again_as_its_estimate_ages() {
        let eps = addrs(2);
        let (slow, fast) = (eps[0], eps[1]);
        let b = balancer(&eps, &p2c(), None);
        let pick = pick_on(&b, slow);
        advance(Duration::from_millis(100)).await;
        pick.finish(Outcome::Success);
        let start = Instant::now();
        let mut probes = Vec::new();
        // 10 requests a second for a minute; the slow endpoint stays slow.
        for _ in 0..600 {
            let pick = b.pick(None, None).expect("endpoints");
            let latency = if pick.addr() == slow {
                probes.push(Instant::now() - start);
                100
            } else {
                assert_eq!(pick.addr(), fast);
                1
            };
            advance(Duration::from_millis(latency)).await;
            pick.finish(Outcome::Success);
            advance(Duration::from_millis(100 - latency)).await;
        }
        // 100 ms decays below 1 ms after about 10 s × ln 100 = 46 s.
        assert_eq!(probes.len(), 1, "{probes:?}");
        assert!(probes[0] > Duration::from_secs(40), "{probes:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn p2c_moves_picks_away_from_load_in_flight() {
        let eps = addrs(2);
        let b = balancer(&eps, &p2c(), None);
        let held: Vec<Pick> = (0..3)
            .map(|_| b.pick(None, Some(eps[1])).expect("endpoints"))
            .collect();
        assert!(held.iter().all(|p| p.addr() == eps[0]), "avoid is honoured");
        let next: Vec<Pick> = (0..3)
            .map(|_| b.pick(None, None).expect("endpoints"))
            .collect();
        assert!(next.iter().all(|p| p.addr() == eps[1]), "{next:?}");
        drop(held);
        assert_eq!(b.shared.endpoints[0].in_flight.load(Ordering::Relaxed), 0);
        assert_eq!(b.pick(None, None).map(|p| p.addr()), Some(eps[0]));

        // With more endpoints, the loaded one gets only what ties leave it.
        let eps = addrs(4);
        let b = balancer(&eps, &p2c(), None);
        let _held: Vec<Pick> = (0..5).map(|_| pick_on(&b, eps[0])).collect();
        let counts = spread(&b, 1000);
        assert_eq!(counts.get(&eps[0]), None, "{counts:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn p2c_avoid_goes_elsewhere_when_it_can() {
        let eps = addrs(3);
        let b = balancer(&eps, &p2c(), None);
        for _ in 0..300 {
            let pick = b.pick(None, Some(eps[1])).expect("endpoints");
            assert_ne!(pick.addr(), eps[1]);
        }
        let counts = spread(&b, 3000);
        assert!(
            eps.iter()
                .all(|a| counts.get(a).copied().unwrap_or(0) > 800),
            "{counts:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn ring_keeps_a_key_on_one_endpoint() {
        let eps = addrs(4);
        let b = balancer(&eps, &ring(), None);
        let other = Balancer::new("x".into(), &eps, &ring(), None, Rng::with_seed(99));
        for key in 0..200u32 {
            let hash = hash_key(format!("user-{key}").as_bytes());
            let first = b.pick(Some(hash), None).map(|p| p.addr());
            assert_eq!(b.pick(Some(hash), None).map(|p| p.addr()), first);
            assert_eq!(other.pick(Some(hash), None).map(|p| p.addr()), first);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn ring_spreads_keys_evenly() {
        let eps = addrs(4);
        let b = balancer(&eps, &ring(), None);
        let rng = Rng::with_seed(3);
        let mut counts = HashMap::new();
        for _ in 0..10_000 {
            let pick = b.pick(Some(rng.next_u64()), None).expect("endpoints");
            *counts.entry(pick.addr()).or_insert(0usize) += 1;
        }
        assert!(
            eps.iter()
                .all(|a| (1875..=3125).contains(&counts.get(a).copied().unwrap_or(0))),
            "{counts:?}"
        );

        // The ring itself: every endpoint owns its even share of the hash space
        // within a few %, for small and large endpoint sets.
        for n in [2, 3, 4, 10, 50] {
            let ring = build_ring(&addrs(n));
            let mut owned = vec![0f64; n];
            for (i, &(position, index)) in ring.iter().enumerate() {
                let previous = if i == 0 {
                    ring[ring.len() - 1].0
                } else {
                    ring[i - 1].0
                };
                owned[index] += position.wrapping_sub(previous) as f64 / u64::MAX as f64;
            }
            let even = 1.0 / n as f64;
            let worst = owned
                .iter()
                .map(|s| (s - even).abs() / even)
                .fold(0.0, f64::max);
            let bound = if n <= 10 { 0.08 } else { 0.25 };
            assert!(ring.len() >= 1024);
            assert!(
                worst < bound,
                "{n} endpoints: worst share off by {worst:.3}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn ring_ejection_moves_only_the_ejected_endpoints_keys() {
        let eps = addrs(4);
        let b = balancer(&eps, &ring(), Some(&outlier(10.0)));
        let keys: Vec<u64> = (0..1000u32).map(|k| hash_key(&k.to_be_bytes())).collect();
        let owner = |key: u64| b.pick(Some(key), None).map(|p| p.addr());
        let before: Vec<_> = keys.iter().map(|&k| owner(k)).collect();
        let victim = eps[2];
        fail(&b, victim, Outcome::Error5xx, 5);
        assert_eq!(b.ejected(), vec![victim]);
        let mut moved = 0;
        for (&key, &was) in keys.iter().zip(&before) {
            let now = owner(key);
            if was == Some(victim) {
                moved += 1;
                assert_ne!(now, Some(victim));
            } else {
                assert_eq!(now, was, "a key of a healthy endpoint moved");
            }
        }
        assert!(moved > 100, "{moved}");

        // A retry of a key goes to the next endpoint on the ring, and stays there.
        let key = keys[0];
        let first = owner(key).expect("endpoints");
        let retry = b.pick(Some(key), Some(first)).map(|p| p.addr());
        assert_ne!(retry, Some(first));
        assert_eq!(b.pick(Some(key), Some(first)).map(|p| p.addr()), retry);

        advance(Duration::from_secs(30)).await;
        let after: Vec<_> = keys.iter().map(|&k| owner(k)).collect();
        assert_eq!(after, before, "keys go back when the endpoint returns");
    }

    #[tokio::test(start_paused = true)]
    async fn ring_without_a_key_balances_by_p2c() {
        let eps = addrs(3);
        let b = balancer(&eps, &ring(), None);
        let counts = spread(&b, 3000);
        assert!(
            eps.iter()
                .all(|a| counts.get(a).copied().unwrap_or(0) > 800),
            "{counts:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn outlier_ejects_for_base_then_twice_base() {
        let capture = Capture::default();
        let eps = addrs(4);
        let b = balancer(&eps, &p2c(), Some(&outlier(50.0)));
        let bad = eps[1];
        metrics::with_local_recorder(&capture, || {
            fail(&b, bad, Outcome::Error5xx, 4);
            assert!(b.ejected().is_empty(), "4 of 5 is not enough");
            fail(&b, bad, Outcome::Error5xx, 1);
        });
        assert_eq!(b.ejected(), vec![bad]);
        assert_eq!(capture.counter(OUTLIER_EJECTIONS_TOTAL), 1);
        assert_eq!(capture.gauge(ENDPOINTS_EJECTED), 1.0);
        assert_eq!(spread(&b, 1000).get(&bad), None);
        assert_eq!(
            b.pick(Some(0), Some(eps[0])).map(|p| p.addr() == bad),
            Some(false)
        );

        // Back at exactly 30 s, not a millisecond earlier.
        advance(Duration::from_millis(29_999)).await;
        assert_eq!(b.ejected(), vec![bad]);
        assert_eq!(spread(&b, 500).get(&bad), None);
        advance(Duration::from_millis(1)).await;
        metrics::with_local_recorder(&capture, || {
            assert!(spread(&b, 500).get(&bad).is_some_and(|&n| n > 50));
        });
        assert!(b.ejected().is_empty());
        assert_eq!(capture.gauge(ENDPOINTS_EJECTED), 0.0);

        // Ejected again at once: twice as long.
        metrics::with_local_recorder(&capture, || fail(&b, bad, Outcome::GatewayError, 5));
        assert_eq!(b.ejected(), vec![bad]);
        assert_eq!(capture.counter(OUTLIER_EJECTIONS_TOTAL), 2);
        assert_eq!(capture.gauge(ENDPOINTS_EJECTED), 1.0);
        advance(Duration::from_millis(59_999)).await;
        assert_eq!(b.ejected(), vec![bad]);
        advance(Duration::from_millis(1)).await;
        assert!(b.ejected().is_empty());

        // Two intervals (10 s each) back in service wear the multiplier from 2
        // to 0, so the next ejection is base again.
        advance(Duration::from_secs(20)).await;
        fail(&b, bad, Outcome::Error5xx, 5);
        assert_eq!(b.ejected(), vec![bad]);
        advance(Duration::from_secs(30)).await;
        assert!(b.ejected().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn outlier_success_resets_the_run() {
        let eps = addrs(4);
        let b = balancer(&eps, &p2c(), Some(&outlier(100.0)));
        fail(&b, eps[0], Outcome::Error5xx, 4);
        fail(&b, eps[0], Outcome::Success, 1);
        fail(&b, eps[0], Outcome::Error5xx, 4);
        assert!(b.ejected().is_empty());
        fail(&b, eps[0], Outcome::Error5xx, 1);
        assert_eq!(b.ejected(), vec![eps[0]]);

        // Both kinds count toward consecutive 5xx.
        fail(&b, eps[1], Outcome::GatewayError, 2);
        fail(&b, eps[1], Outcome::Error5xx, 3);
        assert_eq!(b.ejected(), vec![eps[0], eps[1]]);

        // Gateway errors trip their own, lower limit; another 5xx breaks that run.
        let config = OutlierDetection {
            consecutive_5xx: Limit(100),
            consecutive_gateway_errors: Limit(3),
            ..outlier(100.0)
        };
        let b = balancer(&eps, &p2c(), Some(&config));
        fail(&b, eps[0], Outcome::GatewayError, 2);
        fail(&b, eps[0], Outcome::Error5xx, 1);
        fail(&b, eps[0], Outcome::GatewayError, 2);
        assert!(b.ejected().is_empty());
        fail(&b, eps[0], Outcome::GatewayError, 1);
        assert_eq!(b.ejected(), vec![eps[0]]);
    }

    #[tokio::test(start_paused = true)]
    async fn outlier_max_ejection_percent_caps_but_allows_one() {
        let capture = Capture::default();
        let eps = addrs(10);
        let b = balancer(&eps, &p2c(), Some(&outlier(10.0)));
        metrics::with_local_recorder(&capture, || {
            fail(&b, eps[0], Outcome::Error5xx, 5);
            fail(&b, eps[1], Outcome::Error5xx, 5);
        });
        assert_eq!(b.ejected(), vec![eps[0]], "10 % of 10 is one");
        assert_eq!(capture.counter(OUTLIER_EJECTIONS_TOTAL), 1);
        advance(Duration::from_secs(30)).await;
        assert!(b.ejected().is_empty());
        // The refused run was spent; a new one of 5 is needed.
        fail(&b, eps[1], Outcome::Error5xx, 4);
        assert!(b.ejected().is_empty());
        fail(&b, eps[1], Outcome::Error5xx, 1);
        assert_eq!(b.ejected(), vec![eps[1]]);

        // 1 of 3 is over 10 %, but one endpoint may always go.
        let eps = addrs(3);
        let b = balancer(&eps, &p2c(), Some(&outlier(10.0)));
        fail(&b, eps[0], Outcome::Error5xx, 5);
        fail(&b, eps[1], Outcome::Error5xx, 5);
        assert_eq!(b.ejected(), vec![eps[0]]);

        // Even at 100 %, the last endpoint in service stays.
        let eps = addrs(2);
        let b = balancer(&eps, &p2c(), Some(&outlier(100.0)));
        fail(&b, eps[0], Outcome::Error5xx, 5);
        fail(&b, eps[1], Outcome::Error5xx, 5);
        assert_eq!(b.ejected(), vec![eps[0]]);
        // A retry that must avoid the one endpoint in service still gets it.
        assert_eq!(b.pick(None, Some(eps[1])).map(|p| p.addr()), Some(eps[1]));
    }

    #[tokio::test(start_paused = true)]
    async fn every_endpoint_ejected_falls_back_to_all() {
        let eps = addrs(2);
        let b = balancer(&eps, &ring(), Some(&outlier(100.0)));
        // Not reachable through the ejection rules; forced to check the fallback.
        let outlier = b.shared.outlier.as_ref().expect("configured");
        outlier.ejected.store(2, Ordering::Relaxed);
        for endpoint in b.shared.endpoints.iter() {
            endpoint.ejected.store(true, Ordering::Relaxed);
        }
        assert!(b.pick(None, None).is_some());
        assert!(b.pick(Some(5), None).is_some());
        assert_eq!(b.pick(None, Some(eps[0])).map(|p| p.addr()), Some(eps[1]));
    }
}
