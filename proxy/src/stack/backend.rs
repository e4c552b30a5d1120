//! A destination: one service as every route that sends to it sees it (its own
//! routes, and other services' routes that name it as a backend). Its state, the
//! endpoints' latency estimates and ejections and the breaker's counts, belongs to
//! the destination, not to a route, so a canary `reviews -> reviews-v2` is treated
//! by reviews-v2's `connectionPool`, `outlierDetection` and `loadBalancer`.
//!
//! A [`Backend`] lives across config versions for as long as its service does; a
//! new version swaps in a new [`Destination`] built from the old one, keeping what
//! did not change (see `stack::destination`).

use super::{
    balance::Balancer,
    breaker::Breaker,
    outcome::{BoxFuture, Failure, Req, Routed},
    stage::{Next, Stack, Stage},
};
use crate::upstream::pool::ConnectionLimit;
use arc_swap::ArcSwap;
use foldhash::HashMap;
use std::{net::SocketAddr, sync::Arc};
use trellis_proto::model::{
    config::{Endpoint, Workload},
    policy::Policy,
};

/// One destination service, kept by authority across config versions.
pub struct Backend {
    /// `name.namespace:port`, its label in metrics.
    pub label: Arc<str>,
    current: ArcSwap<Destination>,
}

/// What a destination is under one config version: its stages and the state
/// they carry.
pub struct Destination {
    /// The service's destination sections it was built from.
    pub policy: Policy,
    pub breaker: Option<Arc<Breaker>>,
    pub connections: Option<Arc<ConnectionLimit>>,
    pub balancer: Balancer,
    /// Who answers at each endpoint, where known.
    pub identities: Arc<HashMap<SocketAddr, Workload>>,
    /// Breaker (when the policy limits requests), then the balancer.
    pub stack: Stack,
}

impl Destination {
    /// Whether this is already the destination `policy` and `endpoints` describe.
    pub fn is_for(&self, policy: &Policy, endpoints: &[Endpoint]) -> bool {
        let addresses: Vec<SocketAddr> = endpoints.iter().map(|e| e.address).collect();
        self.policy == *policy
            && self.balancer.serves(&addresses)
            && endpoints
                .iter()
                .all(|e| self.identities.get(&e.address) == e.identity.as_ref())
            && self.identities.len() == endpoints.iter().filter(|e| e.identity.is_some()).count()
    }
}

impl Backend {
    pub fn new(label: Arc<str>, destination: Destination) -> Backend {
        Backend {
            label,
            current: ArcSwap::from_pointee(destination),
        }
    }

    /// The destination as requests see it now.
    pub fn current(&self) -> Arc<Destination> {
        self.current.load_full()
    }

    /// Puts a new version of the destination in place; requests already in it
    /// finish with the one they started in.
    pub fn replace(&self, destination: Destination) {
        self.current.store(Arc::new(destination));
    }
}

/// Routes hold their destinations shared: several routes may send to one.
impl Stage for Arc<Backend> {
    /// A destination ends the route's stack, so `next` is not used.
    fn call<'a>(&'a self, req: Req, _: Next<'a>) -> BoxFuture<'a, Result<Routed, Failure>> {
        let destination = self.current();
        Box::pin(async move { destination.stack.call(req).await })
    }
}
