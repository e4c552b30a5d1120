//! What ServerPolicies say of the pods' own ports, once translated: each pod port's
//! policy, and an index from pod to port to the policy that wins there. The hub
//! takes each proxy's `inbound` entries from it; endpoint translation asks it
//! whether a port takes mesh mTLS.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::num::NonZeroU16;
use trellis_proto::model::authorization::Authorization;
use trellis_proto::model::config::{InboundPort, MtlsMode};
use trellis_proto::model::policy::RateLimit;

/// What an accepted ServerPolicy says of one port of the pods behind a Service.
#[derive(Debug, Clone, PartialEq)]
pub struct InboundLimit {
    /// Lower wins when two limits cover one pod port: a policy that names its
    /// ports first, then the oldest.
    pub precedence: usize,
    /// The pod's own port: the EndpointSlice port behind the Service port.
    pub port: NonZeroU16,
    /// The pods it is for: the endpoints of one EndpointSlice, ready or not.
    pub pods: Vec<PodKey>,
    pub rate_limit: Option<RateLimit>,
    pub mtls: Option<MtlsMode>,
    /// The rules that apply to this port (those whose `to` names other ports
    /// dropped).
    pub authorization: Option<Authorization>,
}

/// A pod as an EndpointSlice endpoint names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PodKey {
    /// By the endpoint's `targetRef` (kind Pod): its namespace (the slice's when
    /// absent) and name.
    Name { namespace: String, name: String },
    /// By one of the endpoint's addresses.
    Ip(IpAddr),
}

/// Which pod ports get which inbound policy, so that a proxy's view, and an
/// endpoint's identity, cost a few lookups rather than a pass over every limit.
#[derive(Debug, Default)]
pub struct InboundIndex {
    /// Per pod: pod port -> (precedence, what the winning policy says).
    by_pod: HashMap<PodKey, BTreeMap<NonZeroU16, (usize, InboundPort)>>,
}

impl InboundIndex {
    /// `limits` in precedence order: the first to claim a pod's port keeps it.
    pub fn new(limits: &[InboundLimit]) -> InboundIndex {
        let mut by_pod: HashMap<PodKey, BTreeMap<NonZeroU16, (usize, InboundPort)>> =
            HashMap::new();
        for limit in limits {
            for pod in &limit.pods {
                by_pod
                    .entry(pod.clone())
                    .or_default()
                    .entry(limit.port)
                    .or_insert_with(|| {
                        (
                            limit.precedence,
                            InboundPort {
                                port: limit.port,
                                rate_limit: limit.rate_limit.clone(),
                                mtls: limit.mtls,
                                authorization: limit.authorization.clone(),
                            },
                        )
                    });
            }
        }
        InboundIndex { by_pod }
    }

    /// The inbound policy of one pod, known by any of `keys` (its name, its IPs):
    /// per port, the one with the lowest precedence.
    pub fn for_pod(&self, keys: &[PodKey]) -> BTreeMap<NonZeroU16, &InboundPort> {
        let mut ports: BTreeMap<NonZeroU16, (usize, &InboundPort)> = BTreeMap::new();
        for key in keys {
            for (port, (precedence, policy)) in self.by_pod.get(key).into_iter().flatten() {
                if ports.get(port).is_none_or(|(p, _)| precedence < p) {
                    ports.insert(*port, (*precedence, policy));
                }
            }
        }
        ports
            .into_iter()
            .map(|(port, (_, policy))| (port, policy))
            .collect()
    }

    /// Whether the pod known by `keys` takes mesh mTLS on `port`: not when a
    /// ServerPolicy DISABLEs it there.
    pub fn takes_mtls(&self, keys: &[PodKey], port: NonZeroU16) -> bool {
        self.for_pod(keys)
            .get(&port)
            .is_none_or(|policy| policy.mtls != Some(MtlsMode::Disable))
    }
}
