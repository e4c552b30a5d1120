//! The policy stack: each stage in its own file, in request order, all speaking
//! the vocabulary of [`outcome`] through the one mechanism of [`stage`]; this file
//! puts them together.
//!
//! ```text
//! route:        fault -> rate_limit -> timeout(request) -> retry -> timeout(per try)
//!               -> split (weighted backends, or the one backend)
//! destination:  breaker -> balance -> endpoint (pooled connection)
//! ```
//!
//! A route's stages come from its call sections (`timeouts`, `retry`, `rateLimit`,
//! `fault`: the service's, under the route's own); a destination's from its own
//! service's destination sections (`connectionPool`, `outlierDetection`,
//! `loadBalancer`), wherever it is called from. A stage the policy does not ask for
//! is left out.

pub mod backend;
pub mod balance;
pub mod breaker;
pub mod fault;
pub mod outcome;
pub mod rate_limit;
pub mod retry;
pub mod split;
pub mod stage;
pub mod timeout;

use crate::{
    metrics::{FAULTS_INJECTED_TOTAL, RATELIMITED_TOTAL},
    rng::Rng,
    upstream::pool::{ConnectionLimit, Pool},
};
use backend::{Backend, Destination};
use balance::{Balance, Balancer};
use breaker::Breaker;
use fault::FaultInjector;
use foldhash::HashMap;
use rate_limit::RateLimit;
use retry::{Retry, RetryCounters};
use split::Split;
use stage::{Stack, Stage};
use std::{net::SocketAddr, sync::Arc};
use timeout::Timeout;
use trellis_proto::model::{
    config::{Endpoint, Workload},
    policy::Policy,
};

/// The metric labels of a route: its service and its name.
pub struct RouteLabels<'a> {
    pub service: &'a Arc<str>,
    pub route: &'a Arc<str>,
}

/// One route's stack, outermost first. `policy` is the route's effective call
/// policy, `backends` its destinations with their weights, and `max_retries` the
/// retries its destinations allow in flight at once.
pub fn route(
    policy: &Policy,
    backends: &[(Arc<Backend>, u32)],
    max_retries: u32,
    labels: &RouteLabels<'_>,
) -> Stack {
    let counter = |name: &'static str, extra: Option<(&'static str, &'static str)>| {
        let mut all = vec![
            ("service", labels.service.to_string()),
            ("route", labels.route.to_string()),
        ];
        all.extend(extra.map(|(k, v)| (k, v.to_owned())));
        metrics::counter!(name, &all)
    };
    let timeouts = policy.timeouts.clone().unwrap_or_default();
    let mut stages: Vec<Box<dyn Stage>> = Vec::new();
    if let Some(fault) = &policy.fault {
        stages.push(Box::new(FaultInjector::new(
            fault,
            Rng::from_entropy(),
            counter(FAULTS_INJECTED_TOTAL, Some(("kind", "delay"))),
            counter(FAULTS_INJECTED_TOTAL, Some(("kind", "abort"))),
        )));
    }
    if let Some(limit) = &policy.rate_limit {
        let limited = counter(RATELIMITED_TOTAL, Some(("direction", "outbound")));
        stages.push(Box::new(RateLimit::new(limit, limited)));
    }
    if let Some(request) = timeouts.request {
        stages.push(Box::new(Timeout(request)));
    }
    if let Some(retry) = &policy.retry {
        let counters = RetryCounters {
            retries: counter(crate::metrics::RETRIES_TOTAL, None),
            budget_exhausted: counter(crate::metrics::RETRY_BUDGET_EXHAUSTED_TOTAL, None),
            overflow: counter(crate::metrics::RETRY_OVERFLOW_TOTAL, None),
        };
        let rng = Rng::from_entropy();
        stages.push(Box::new(Retry::new(retry, max_retries, rng, counters)));
    }
    if let Some(per_try) = timeouts.per_try {
        stages.push(Box::new(Timeout(per_try)));
    }
    stages.push(match backends {
        [(only, _)] => Box::new(only.clone()),
        several => {
            let weighted = several
                .iter()
                .map(|(backend, weight)| (Box::new(backend.clone()) as Box<dyn Stage>, *weight))
                .collect();
            Box::new(Split::new(weighted, Rng::from_entropy()))
        }
    });
    Stack::new(stages)
}

/// One destination under a new config version, its requests sent on `pool`. From `previous` with the same
/// destination sections it keeps the breaker's counts, the connection limit and
/// every remaining endpoint's state; a changed policy starts afresh.
pub fn destination(
    pool: &Arc<Pool>,
    label: &Arc<str>,
    policy: Policy,
    endpoints: &[Endpoint],
    previous: Option<&Destination>,
) -> Destination {
    let addresses: Vec<SocketAddr> = endpoints.iter().map(|e| e.address).collect();
    let identities: Arc<HashMap<SocketAddr, Workload>> = Arc::new(
        endpoints
            .iter()
            .filter_map(|e| Some((e.address, e.identity.clone()?)))
            .collect(),
    );
    let endpoints = addresses.as_slice();
    let kept = previous.filter(|p| p.policy == policy);
    let (breaker, connections, balancer) = match kept {
        Some(p) => (
            p.breaker.clone(),
            p.connections.clone(),
            if p.balancer.serves(endpoints) {
                p.balancer.clone()
            } else {
                p.balancer.with_endpoints(endpoints)
            },
        ),
        None => {
            let limits = policy.connection_pool.as_ref();
            let lb = policy.load_balancer.clone().unwrap_or_default();
            (
                limits.map(|l| Arc::new(Breaker::new(l, label.clone()))),
                limits.map(|l| Arc::new(ConnectionLimit::new(l.max_connections.0, label.clone()))),
                Balancer::new(
                    label.clone(),
                    endpoints,
                    &lb,
                    policy.outlier_detection.as_ref(),
                    Rng::from_entropy(),
                ),
            )
        }
    };
    let mut stages: Vec<Box<dyn Stage>> = Vec::new();
    if let Some(breaker) = &breaker {
        stages.push(Box::new(breaker.clone()));
    }
    stages.push(Box::new(Balance {
        balancer: balancer.clone(),
        hash_on: policy
            .load_balancer
            .as_ref()
            .and_then(|lb| lb.hash_on.clone()),
        pool: pool.clone(),
        connections: connections.clone(),
        identities: identities.clone(),
    }));
    Destination {
        policy,
        breaker,
        connections,
        balancer,
        identities,
        stack: Stack::new(stages),
    }
}

#[cfg(test)]
pub mod testing;
