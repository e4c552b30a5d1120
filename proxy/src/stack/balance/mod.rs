//! Endpoint choice for one destination: power of two choices over a peak-EWMA
//! latency estimate ([`p2c`], as Linkerd), or a consistent-hash ring ([`ring`], as
//! Envoy's `RING_HASH`), with Envoy's consecutive-error outlier ejection
//! ([`outlier`]) on top of either; and [`Balance`], the stage that picks an
//! endpoint and sends the request to it.
//!
//! A pick runs per request, so it allocates nothing and takes only short
//! per-endpoint locks, never held across an await. Every endpoint's state (its
//! latency estimate, requests in flight, error runs and ejection) is its own: when
//! the endpoint set changes, [`Balancer::with_endpoints`] keeps the state of every
//! endpoint still there, as linkerd2-proxy's balancer does.

pub mod clock;
pub mod outlier;
pub mod p2c;
pub mod ring;

use super::{
    outcome::{Avoid, BoxFuture, ClientAddr, Failure, Flags, Outcome, Req, Routed},
    stage::{Next, Stage},
};
use crate::{
    rng::Rng,
    upstream::{forward::forward, pool::Pool},
};
use foldhash::HashMap;
use futures_util::FutureExt;
use http::StatusCode;
use outlier::{Answer, Health, Outlier};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use tokio::time::Instant;
use trellis_proto::model::config::Workload;
use trellis_proto::model::policy::{BalancerType, HashOn, LoadBalancer, OutlierDetection};

pub use ring::hash_key;

/// A destination's endpoints and how one is chosen; cheap to clone.
#[derive(Clone)]
pub struct Balancer(Arc<Inner>);

struct Inner {
    label: Arc<str>,
    kind: BalancerType,
    endpoints: Box<[Arc<Endpoint>]>,
    /// `(position, endpoint index)` sorted by position; empty unless RingHash.
    ring: Box<[(u64, usize)]>,
    /// Shared by every endpoint set of the destination while its policy stays.
    outlier: Option<Arc<Outlier>>,
    rng: Arc<Rng>,
}

/// One endpoint and everything the balancer knows about it.
struct Endpoint {
    addr: SocketAddr,
    in_flight: AtomicU32,
    rtt: p2c::Rtt,
    health: Health,
}

impl AsRef<Health> for Endpoint {
    fn as_ref(&self) -> &Health {
        &self.health
    }
}

impl Endpoint {
    fn new(addr: SocketAddr, now: Instant) -> Endpoint {
        Endpoint {
            addr,
            in_flight: AtomicU32::new(0),
            rtt: p2c::Rtt::new(now),
            health: Health::new(now),
        }
    }
}

impl Balancer {
    /// `label` names the destination in metrics (e.g. "reviews-v2.shop:8080").
    pub fn new(
        label: Arc<str>,
        endpoints: &[SocketAddr],
        lb: &LoadBalancer,
        outlier: Option<&OutlierDetection>,
        rng: Rng,
    ) -> Balancer {
        let now = Instant::now();
        let outlier = outlier.map(|config| Arc::new(Outlier::new(config, &label, now)));
        Balancer::build(
            label,
            lb.kind,
            endpoints
                .iter()
                .map(|&addr| Arc::new(Endpoint::new(addr, now))),
            outlier,
            Arc::new(rng),
        )
    }

    fn build(
        label: Arc<str>,
        kind: BalancerType,
        endpoints: impl Iterator<Item = Arc<Endpoint>>,
        outlier: Option<Arc<Outlier>>,
        rng: Arc<Rng>,
    ) -> Balancer {
        let endpoints: Box<[Arc<Endpoint>]> = endpoints.collect();
        let ring = match kind {
            BalancerType::RingHash => {
                let addrs: Vec<SocketAddr> = endpoints.iter().map(|e| e.addr).collect();
                ring::build(&addrs)
            }
            BalancerType::P2CEwma => Box::default(),
        };
        Balancer(Arc::new(Inner {
            label,
            kind,
            endpoints,
            ring,
            outlier,
            rng,
        }))
    }

    /// The same destination over a new endpoint set: an endpoint that is in both
    /// keeps its latency estimate, load and ejection; new ones start fresh and
    /// removed ones are dropped (requests still on them finish undisturbed).
    pub fn with_endpoints(&self, endpoints: &[SocketAddr]) -> Balancer {
        let now = Instant::now();
        let old: HashMap<SocketAddr, &Arc<Endpoint>> =
            self.0.endpoints.iter().map(|e| (e.addr, e)).collect();
        let kept = endpoints.iter().map(|addr| match old.get(addr) {
            Some(endpoint) => Arc::clone(endpoint),
            None => Arc::new(Endpoint::new(*addr, now)),
        });
        let next = Balancer::build(
            self.0.label.clone(),
            self.0.kind,
            kept,
            self.0.outlier.clone(),
            self.0.rng.clone(),
        );
        if let Some(outlier) = &next.0.outlier {
            outlier.adopt(&next.0.endpoints, now);
        }
        next
    }

    /// Whether this balancer serves exactly `endpoints`, in order.
    pub fn serves(&self, endpoints: &[SocketAddr]) -> bool {
        self.0.endpoints.len() == endpoints.len()
            && self
                .0
                .endpoints
                .iter()
                .zip(endpoints)
                .all(|(e, a)| e.addr == *a)
    }

    /// Chooses an endpoint that is not ejected. `hash` is the request's key for
    /// RingHash (ignored by P2C; when RingHash gets None it falls back to P2C).
    /// `avoid`: an endpoint to skip when another is available (a retry goes
    /// elsewhere). None only when there are no endpoints.
    pub fn pick(&self, hash: Option<u64>, avoid: Option<SocketAddr>) -> Option<Pick> {
        let inner = &self.0;
        if inner.endpoints.is_empty() {
            return None;
        }
        let now = Instant::now();
        if let Some(outlier) = &inner.outlier {
            outlier.return_if_due(&inner.endpoints, now);
        }
        let (filter, admitted) = inner.filter(avoid);
        let endpoints = &inner.endpoints;
        let index = match hash {
            Some(hash) if !inner.ring.is_empty() => {
                ring::pick(&inner.ring, hash, |i| filter.admits(&endpoints[i]))
            }
            _ => p2c::pick(
                admitted,
                &inner.rng,
                |k| filter.nth(endpoints, k),
                |i| {
                    let in_flight = endpoints[i].in_flight.load(Ordering::Relaxed);
                    endpoints[i].rtt.cost(in_flight, now)
                },
            ),
        };
        Some(self.take(index, now))
    }

    fn take(&self, index: usize, now: Instant) -> Pick {
        self.0.endpoints[index]
            .in_flight
            .fetch_add(1, Ordering::Relaxed);
        Pick {
            balancer: self.clone(),
            index,
            start: now,
        }
    }

    /// What the balancer knows of each endpoint now, for `/config_dump`.
    pub fn endpoint_states(&self) -> Vec<EndpointState> {
        let now = Instant::now();
        let ejected = self.ejected();
        self.0
            .endpoints
            .iter()
            .map(|e| EndpointState {
                address: e.addr,
                latency_ms: e.rtt.at(now) / 1e6,
                in_flight: e.in_flight.load(Ordering::Relaxed),
                ejected: ejected.contains(&e.addr),
            })
            .collect()
    }

    /// Endpoints currently ejected (for tests and /config_dump).
    pub fn ejected(&self) -> Vec<SocketAddr> {
        let Some(outlier) = &self.0.outlier else {
            return Vec::new();
        };
        let endpoints = &self.0.endpoints;
        outlier
            .ejected_of(endpoints, Instant::now())
            .into_iter()
            .map(|i| endpoints[i].addr)
            .collect()
    }
}

impl fmt::Debug for Balancer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Balancer")
            .field("backend", &self.0.label)
            .field("endpoints", &self.0.endpoints.len())
            .field("ring_hash", &!self.0.ring.is_empty())
            .finish()
    }
}

/// One endpoint as `/config_dump` shows it: its latency estimate (peak EWMA, as of
/// now), requests in flight, and whether outlier detection has it out.
#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointState {
    pub address: SocketAddr,
    pub latency_ms: f64,
    pub in_flight: u32,
    pub ejected: bool,
}

/// One request's use of an endpoint: counts as in flight until finished or dropped.
pub struct Pick {
    balancer: Balancer,
    index: usize,
    start: Instant,
}

impl Pick {
    pub fn addr(&self) -> SocketAddr {
        self.endpoint().addr
    }

    /// Records the request's latency (pick → now) and how it went.
    pub fn finish(self, answer: Answer) {
        let now = Instant::now();
        let endpoint = self.endpoint();
        endpoint
            .rtt
            .observe(now.saturating_duration_since(self.start), now);
        let inner = &self.balancer.0;
        if let Some(outlier) = &inner.outlier {
            outlier.record(&inner.endpoints, endpoint, answer, now);
        }
        // Dropping `self` ends the in-flight count.
    }

    fn endpoint(&self) -> &Arc<Endpoint> {
        &self.balancer.0.endpoints[self.index]
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
        !(self.skip_ejected && endpoint.health.ejected.load(Ordering::Relaxed))
            && self.avoid != Some(endpoint.addr)
    }

    fn admitted(self, endpoints: &[Arc<Endpoint>]) -> usize {
        if self.is_all() {
            return endpoints.len();
        }
        endpoints.iter().filter(|e| self.admits(e)).count()
    }

    /// The index of the `k`-th endpoint the filter admits.
    fn nth(self, endpoints: &[Arc<Endpoint>], k: usize) -> usize {
        if self.is_all() {
            return k;
        }
        endpoints
            .iter()
            .enumerate()
            .filter(|(_, e)| self.admits(e))
            .map(|(i, _)| i)
            .nth(k)
            // Only if an ejection raced this pick; any endpoint will do then.
            .unwrap_or(0)
    }
}

impl Inner {
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
            let admitted = filter.admitted(&self.endpoints);
            if admitted > 0 {
                return (filter, admitted);
            }
        }
        (Filter::ALL, self.endpoints.len())
    }
}

/// The innermost stage: one destination, balanced over its endpoints and sent on
/// the pooled connection to the chosen one.
pub struct Balance {
    pub balancer: Balancer,
    pub hash_on: Option<HashOn>,
    pub pool: Arc<Pool>,
    /// `maxConnections` of the destination, enforced where connections are made.
    pub connections: Option<Arc<crate::upstream::pool::ConnectionLimit>>,
    /// Who answers at each endpoint, where that is known: such requests go over
    /// mesh mTLS that proves it.
    pub identities: Arc<HashMap<SocketAddr, Workload>>,
}

impl Balance {
    fn hash(&self, req: &Req) -> Option<u64> {
        let hash_on = self.hash_on.as_ref()?;
        if let Some(header) = &hash_on.header {
            if let Some(value) = req.headers().get(&header.0) {
                return Some(hash_key(value.as_bytes()));
            }
        }
        if hash_on.source_ip {
            if let Some(ClientAddr(addr)) = req.extensions().get::<ClientAddr>() {
                return Some(match addr.ip() {
                    IpAddr::V4(ip) => hash_key(&ip.octets()),
                    IpAddr::V6(ip) => hash_key(&ip.octets()),
                });
            }
        }
        None
    }
}

impl Stage for Balance {
    /// The endpoint is picked before the future is made, so the future holds the
    /// upstream send alone and not the request beside it.
    fn call<'a>(&'a self, req: Req, _: Next<'a>) -> BoxFuture<'a, Result<Routed, Failure>> {
        let backend = &self.balancer.0.label;
        let avoid = req.extensions().get::<Avoid>().map(|a| a.0);
        let Some(pick) = self.balancer.pick(self.hash(&req), avoid) else {
            return Box::pin(std::future::ready(Err(Failure {
                backend: Some(backend.clone()),
                ..Failure::local(
                    StatusCode::SERVICE_UNAVAILABLE,
                    Flags::UH,
                    format!("backend {backend} has no endpoints"),
                )
            })));
        };
        let addr = pick.addr();
        let peer = self.identities.get(&addr);
        let sent = forward(
            self.pool.clone(),
            addr,
            req,
            self.connections.as_deref(),
            peer,
        );
        Box::pin(sent.map(move |result| match result {
            Ok(response) => {
                pick.finish(match response.status().as_u16() {
                    502..=504 => Answer::GatewayError,
                    500..=599 => Answer::Error5xx,
                    _ => Answer::Success,
                });
                Ok(Routed {
                    response,
                    outcome: Outcome {
                        flags: Flags::NONE,
                        backend: Some(backend.clone()),
                        endpoint: Some(addr),
                    },
                })
            }
            Err(error) => {
                // Over the destination's own connection limit says nothing of
                // the endpoint's health.
                if !error.is_overflow() {
                    pick.finish(Answer::GatewayError);
                }
                Err(Failure::upstream(&error, Some(backend), addr))
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{ENDPOINTS_EJECTED, OUTLIER_EJECTIONS_TOTAL};
    use std::collections::HashMap;
    use std::sync::{atomic::AtomicU64, Mutex};
    use std::time::Duration;
    use tokio::time::advance;
    use trellis_proto::model::policy::{Limit, Percent};

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
        let index =
            b.0.endpoints
                .iter()
                .position(|e| e.addr == addr)
                .expect("test endpoint");
        b.take(index, Instant::now())
    }

    fn fail(b: &Balancer, addr: SocketAddr, answer: Answer, times: usize) {
        for _ in 0..times {
            pick_on(b, addr).finish(answer);
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
            Arc::clone(self.0.lock().unwrap().entry(name).or_default())
        }

        fn value(&self, name: &str) -> Option<u64> {
            let key = format!("{name}{{backend=reviews.shop:8080}}");
            self.0
                .lock()
                .unwrap()
                .get(&key)
                .map(|v| v.load(Ordering::Relaxed))
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
        fail(&b, one[0], Answer::GatewayError, 50);
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
            pick.finish(Answer::Success);
        }
        let mut slow_picks = 0;
        for _ in 0..1000 {
            let pick = b.pick(None, None).expect("endpoints");
            slow_picks += usize::from(pick.addr() == slow);
            advance(latency(pick.addr())).await;
            pick.finish(Answer::Success);
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
        pick.finish(Answer::Success);
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
            pick.finish(Answer::Success);
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
        assert_eq!(b.0.endpoints[0].in_flight.load(Ordering::Relaxed), 0);
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
            let ring = ring::build(&addrs(n));
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
        fail(&b, victim, Answer::Error5xx, 5);
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
        // Handles are registered when the balancer is built.
        let b =
            metrics::with_local_recorder(&capture, || balancer(&eps, &p2c(), Some(&outlier(50.0))));
        let bad = eps[1];
        metrics::with_local_recorder(&capture, || {
            fail(&b, bad, Answer::Error5xx, 4);
            assert!(b.ejected().is_empty(), "4 of 5 is not enough");
            fail(&b, bad, Answer::Error5xx, 1);
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
        metrics::with_local_recorder(&capture, || fail(&b, bad, Answer::GatewayError, 5));
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
        fail(&b, bad, Answer::Error5xx, 5);
        assert_eq!(b.ejected(), vec![bad]);
        advance(Duration::from_secs(30)).await;
        assert!(b.ejected().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn outlier_success_resets_the_run() {
        let eps = addrs(4);
        let b = balancer(&eps, &p2c(), Some(&outlier(100.0)));
        fail(&b, eps[0], Answer::Error5xx, 4);
        fail(&b, eps[0], Answer::Success, 1);
        fail(&b, eps[0], Answer::Error5xx, 4);
        assert!(b.ejected().is_empty());
        fail(&b, eps[0], Answer::Error5xx, 1);
        assert_eq!(b.ejected(), vec![eps[0]]);

        // Both kinds count toward consecutive 5xx.
        fail(&b, eps[1], Answer::GatewayError, 2);
        fail(&b, eps[1], Answer::Error5xx, 3);
        assert_eq!(b.ejected(), vec![eps[0], eps[1]]);

        // Gateway errors trip their own, lower limit; another 5xx breaks that run.
        let config = OutlierDetection {
            consecutive_5xx: Limit(100),
            consecutive_gateway_errors: Limit(3),
            ..outlier(100.0)
        };
        let b = balancer(&eps, &p2c(), Some(&config));
        fail(&b, eps[0], Answer::GatewayError, 2);
        fail(&b, eps[0], Answer::Error5xx, 1);
        fail(&b, eps[0], Answer::GatewayError, 2);
        assert!(b.ejected().is_empty());
        fail(&b, eps[0], Answer::GatewayError, 1);
        assert_eq!(b.ejected(), vec![eps[0]]);
    }

    #[tokio::test(start_paused = true)]
    async fn outlier_max_ejection_percent_caps_but_allows_one() {
        let capture = Capture::default();
        let eps = addrs(10);
        let b =
            metrics::with_local_recorder(&capture, || balancer(&eps, &p2c(), Some(&outlier(10.0))));
        metrics::with_local_recorder(&capture, || {
            fail(&b, eps[0], Answer::Error5xx, 5);
            fail(&b, eps[1], Answer::Error5xx, 5);
        });
        assert_eq!(b.ejected(), vec![eps[0]], "10 % of 10 is one");
        assert_eq!(capture.counter(OUTLIER_EJECTIONS_TOTAL), 1);
        advance(Duration::from_secs(30)).await;
        assert!(b.ejected().is_empty());
        // The refused run was spent; a new one of 5 is needed.
        fail(&b, eps[1], Answer::Error5xx, 4);
        assert!(b.ejected().is_empty());
        fail(&b, eps[1], Answer::Error5xx, 1);
        assert_eq!(b.ejected(), vec![eps[1]]);

        // 1 of 3 is over 10 %, but one endpoint may always go.
        let eps = addrs(3);
        let b = balancer(&eps, &p2c(), Some(&outlier(10.0)));
        fail(&b, eps[0], Answer::Error5xx, 5);
        fail(&b, eps[1], Answer::Error5xx, 5);
        assert_eq!(b.ejected(), vec![eps[0]]);

        // Even at 100 %, the last endpoint in service stays.
        let eps = addrs(2);
        let b = balancer(&eps, &p2c(), Some(&outlier(100.0)));
        fail(&b, eps[0], Answer::Error5xx, 5);
        fail(&b, eps[1], Answer::Error5xx, 5);
        assert_eq!(b.ejected(), vec![eps[0]]);
        // A retry that must avoid the one endpoint in service still gets it.
        assert_eq!(b.pick(None, Some(eps[1])).map(|p| p.addr()), Some(eps[1]));
    }

    #[tokio::test(start_paused = true)]
    async fn every_endpoint_ejected_falls_back_to_all() {
        let eps = addrs(2);
        let b = balancer(&eps, &ring(), Some(&outlier(100.0)));
        // Not reachable through the ejection rules; forced to check the fallback.
        let outlier = b.0.outlier.as_ref().expect("configured");
        outlier.ejected.store(2, Ordering::Relaxed);
        for endpoint in b.0.endpoints.iter() {
            endpoint.health.ejected.store(true, Ordering::Relaxed);
        }
        assert!(b.pick(None, None).is_some());
        assert!(b.pick(Some(5), None).is_some());
        assert_eq!(b.pick(None, Some(eps[0])).map(|p| p.addr()), Some(eps[1]));
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_endpoint_set_keeps_what_is_known_of_the_endpoints_still_in_it() {
        let eps = addrs(4);
        let b = balancer(&eps[..3], &p2c(), Some(&outlier(50.0)));
        // eps[0] is measured slow; eps[1] fails until it is ejected.
        let pick = pick_on(&b, eps[0]);
        advance(Duration::from_millis(200)).await;
        pick.finish(Answer::Success);
        fail(&b, eps[1], Answer::GatewayError, 5);
        assert_eq!(b.ejected(), vec![eps[1]]);
        let estimate = |b: &Balancer, addr: SocketAddr| {
            let endpoint = b.0.endpoints.iter().find(|e| e.addr == addr).unwrap();
            endpoint.rtt.at(Instant::now())
        };
        let slow = estimate(&b, eps[0]);
        let held = pick_on(&b, eps[0]);

        // eps[2] leaves, eps[3] joins.
        let next = b.with_endpoints(&[eps[0], eps[1], eps[3]]);
        assert!(next.serves(&[eps[0], eps[1], eps[3]]));
        assert_eq!(next.ejected(), vec![eps[1]], "the ejection is kept");
        assert_eq!(
            estimate(&next, eps[0]),
            slow,
            "the latency estimate is kept"
        );
        assert_eq!(
            next.0.endpoints[0].in_flight.load(Ordering::Relaxed),
            1,
            "requests in flight stay counted"
        );
        drop(held);
        assert_eq!(next.0.endpoints[0].in_flight.load(Ordering::Relaxed), 0);
        let fresh = estimate(&next, eps[3]);
        assert!(
            fresh < slow,
            "a new endpoint starts at the default estimate"
        );
        assert_eq!(spread(&next, 300).get(&eps[1]), None);

        // The ejection still ends when it would have: 30 s after it began.
        advance(Duration::from_millis(29_999)).await;
        assert_eq!(next.ejected(), vec![eps[1]]);
        advance(Duration::from_millis(1)).await;
        assert!(next.ejected().is_empty());
    }
}
