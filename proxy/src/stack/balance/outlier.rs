//! Envoy's consecutive-error outlier ejection for one destination: an endpoint
//! that answers `consecutive5xx` errors in a row (or `consecutiveGatewayErrors`
//! 502/503/504s, connect failures and resets) leaves the balancer for
//! `baseEjectionTime` × the times it was ejected, never more than
//! `maxEjectionPercent` of the endpoints (though one may always go) and never the
//! last one in service.
//!
//! Ejection state lives in each endpoint, so it survives a change of the endpoint
//! set: an endpoint still in the new set stays ejected. Ejected endpoints come back
//! lazily, on the next pick or answer; there is no background task.

use super::clock::nanos_after;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use tokio::time::Instant;
use trellis_proto::model::policy::OutlierDetection;

/// Envoy's default `max_ejection_time`: a flapping endpoint is not lost for hours.
const MAX_EJECTION_TIME: Duration = Duration::from_secs(300);

/// How one answer went, as outlier detection counts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    Success,
    /// a 5xx other than 502/503/504
    Error5xx,
    /// 502, 503, 504, connect failure or reset
    GatewayError,
}

/// One endpoint's standing with outlier detection. The detector works on any
/// endpoint type that carries one (`AsRef<Health>`).
pub struct Health {
    /// Set while ejected; read on every pick without a lock.
    pub ejected: AtomicBool,
    /// Runs of errors, kept apart from the lock so that a success, the common
    /// case, takes none.
    consecutive_5xx: AtomicU32,
    consecutive_gateway: AtomicU32,
    /// Changed only under the destination's outlier lock.
    record: Mutex<Record>,
}

struct Record {
    /// Times ejected, less one per `interval` spent back in service.
    multiplier: u32,
    ejected_until: Option<Instant>,
    /// Since when the multiplier has been wearing off.
    in_service_since: Instant,
}

impl Health {
    pub fn new(now: Instant) -> Health {
        Health {
            ejected: AtomicBool::new(false),
            consecutive_5xx: AtomicU32::new(0),
            consecutive_gateway: AtomicU32::new(0),
            record: Mutex::new(Record {
                multiplier: 0,
                ejected_until: None,
                in_service_since: now,
            }),
        }
    }
}

/// A destination's outlier detection: its thresholds and what is ejected now.
pub struct Outlier {
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
    /// Endpoints of the current set ejected now, readable without the lock.
    pub ejected: AtomicUsize,
    /// Serialises ejections and returns, so the percentage cap holds.
    lock: Mutex<()>,
    ejections: metrics::Counter,
    ejected_gauge: metrics::Gauge,
}

impl Outlier {
    pub fn new(config: &OutlierDetection, label: &Arc<str>, now: Instant) -> Outlier {
        let ejected_gauge =
            metrics::gauge!(crate::metrics::ENDPOINTS_EJECTED, "backend" => Arc::clone(label));
        // A new detector starts with nothing ejected; say so rather than leave a
        // previous one's count standing.
        ejected_gauge.set(0.0);
        Outlier {
            consecutive_5xx: config.consecutive_5xx.0.max(1),
            consecutive_gateway: config.consecutive_gateway_errors.0.max(1),
            interval: config.interval,
            base_ejection_time: config.base_ejection_time,
            max_ejection_percent: config.max_ejection_percent.0,
            epoch: now,
            next_return: AtomicU64::new(u64::MAX),
            ejected: AtomicUsize::new(0),
            lock: Mutex::new(()),
            ejections: metrics::counter!(
                crate::metrics::OUTLIER_EJECTIONS_TOTAL,
                "backend" => Arc::clone(label)
            ),
            ejected_gauge,
        }
    }

    fn since_epoch(&self, at: Instant) -> u64 {
        nanos_after(self.epoch, at)
    }

    fn due(&self, now: Instant) -> bool {
        self.since_epoch(now) >= self.next_return.load(Ordering::Acquire)
    }

    /// Takes over a new endpoint set (endpoints kept from the old one bring their
    /// ejections with them) and puts back whoever is due.
    pub fn adopt<E: AsRef<Health>>(&self, endpoints: &[Arc<E>], now: Instant) {
        let _lock = lock(&self.lock);
        self.settle(endpoints, now);
    }

    pub fn return_if_due<E: AsRef<Health>>(&self, endpoints: &[Arc<E>], now: Instant) {
        if self.due(now) {
            let _lock = lock(&self.lock);
            self.settle(endpoints, now);
        }
    }

    /// With the lock held: puts back every endpoint whose ejection has ended by
    /// `now`, then counts who is still out and when the next one is due.
    fn settle<E: AsRef<Health>>(&self, endpoints: &[Arc<E>], now: Instant) {
        let mut next = u64::MAX;
        let mut ejected = 0;
        for endpoint in endpoints {
            let health = health_of(endpoint);
            let mut record = lock(&health.record);
            match record.ejected_until {
                Some(until) if until <= now => {
                    record.ejected_until = None;
                    record.in_service_since = until;
                    health.consecutive_5xx.store(0, Ordering::Relaxed);
                    health.consecutive_gateway.store(0, Ordering::Relaxed);
                    health.ejected.store(false, Ordering::Relaxed);
                }
                Some(until) => {
                    next = next.min(self.since_epoch(until));
                    ejected += 1;
                }
                None => {}
            }
        }
        self.next_return.store(next, Ordering::Release);
        self.publish(ejected);
    }

    /// Counts one answer of `endpoint` (one of `endpoints`, the set it was picked from).
    pub fn record<E: AsRef<Health>>(
        &self,
        endpoints: &[Arc<E>],
        endpoint: &Arc<E>,
        answer: Answer,
        now: Instant,
    ) {
        self.return_if_due(endpoints, now);
        let health = health_of(endpoint);
        // Answers still arriving from an ejected endpoint decide nothing: its
        // runs start afresh when it returns.
        if health.ejected.load(Ordering::Relaxed) {
            return;
        }
        let (run_5xx, run_gateway) = match answer {
            Answer::Success => {
                health.consecutive_5xx.store(0, Ordering::Relaxed);
                health.consecutive_gateway.store(0, Ordering::Relaxed);
                return;
            }
            // Envoy: any other 5xx breaks a run of gateway errors.
            Answer::Error5xx => {
                health.consecutive_gateway.store(0, Ordering::Relaxed);
                (bump(&health.consecutive_5xx), 0)
            }
            Answer::GatewayError => (
                bump(&health.consecutive_5xx),
                bump(&health.consecutive_gateway),
            ),
        };
        let trips_5xx = run_5xx >= self.consecutive_5xx;
        let trips_gateway = run_gateway >= self.consecutive_gateway;
        if !(trips_5xx || trips_gateway) {
            return;
        }
        let _lock = lock(&self.lock);
        // Envoy resets a run that trips whether or not the ejection is allowed,
        // so a capped endpoint needs a fresh run of errors to try again.
        if trips_5xx {
            health.consecutive_5xx.store(0, Ordering::Relaxed);
        }
        if trips_gateway {
            health.consecutive_gateway.store(0, Ordering::Relaxed);
        }
        // Another thread's answer may have ejected it since the check above, and
        // an endpoint that left the set is no one's to eject.
        let in_set = endpoints.iter().any(|e| Arc::ptr_eq(e, endpoint));
        if in_set && !health.ejected.load(Ordering::Relaxed) {
            self.eject(endpoints.len(), health, now);
        }
    }

    /// With the lock held: ejects `endpoint` if the caps allow.
    fn eject(&self, total: usize, health: &Health, now: Instant) {
        let before = self.ejected.load(Ordering::Relaxed);
        let after = before + 1;
        // Never the last endpoint in service; past the percentage only if no one
        // else is out (Envoy lets one endpoint go even when 1 is over the limit).
        let within = 100.0 * after as f64 <= self.max_ejection_percent * total as f64;
        if after >= total || !(within || before == 0) {
            return;
        }
        let mut record = lock(&health.record);
        let served = now.saturating_duration_since(record.in_service_since);
        let worn_off = served
            .as_nanos()
            .checked_div(self.interval.as_nanos())
            .map_or(u32::MAX, |periods| {
                u32::try_from(periods).unwrap_or(u32::MAX)
            });
        record.multiplier = record.multiplier.saturating_sub(worn_off).saturating_add(1);
        let duration = self
            .base_ejection_time
            .saturating_mul(record.multiplier)
            .min(MAX_EJECTION_TIME.max(self.base_ejection_time));
        let until = now
            .checked_add(duration)
            .or_else(|| now.checked_add(MAX_EJECTION_TIME))
            .unwrap_or(now);
        record.ejected_until = Some(until);
        health.ejected.store(true, Ordering::Relaxed);
        self.next_return
            .fetch_min(self.since_epoch(until), Ordering::AcqRel);
        self.ejections.increment(1);
        self.publish(after);
    }

    /// The indices of the endpoints ejected now (for tests and `/config_dump`).
    pub fn ejected_of<E: AsRef<Health>>(&self, endpoints: &[Arc<E>], now: Instant) -> Vec<usize> {
        self.return_if_due(endpoints, now);
        (0..endpoints.len())
            .filter(|&i| health_of(&endpoints[i]).ejected.load(Ordering::Relaxed))
            .collect()
    }

    fn publish(&self, ejected: usize) {
        self.ejected.store(ejected, Ordering::Relaxed);
        self.ejected_gauge.set(ejected as f64);
    }
}

fn health_of<E: AsRef<Health>>(endpoint: &Arc<E>) -> &Health {
    (**endpoint).as_ref()
}

/// The guarded values are plain numbers, valid at every step: a panic elsewhere
/// does not make them unusable.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Adds one to a run of errors and returns the new length.
fn bump(run: &AtomicU32) -> u32 {
    run.fetch_add(1, Ordering::Relaxed).saturating_add(1)
}
