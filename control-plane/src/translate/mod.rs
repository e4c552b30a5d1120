//! Translation: what operators write (Services, EndpointSlices, HTTPRoutes and
//! GRPCRoutes with GAMMA parentRefs, TrafficPolicy, ServerPolicy; `shared/API.md`)
//! into the proxy's one config model, plus a status for each object that says
//! whether it took effect. Pure and synchronous: the same [`Objects`] always give
//! the same [`Translation`], whether they came from Kubernetes or from local YAML
//! files. Nothing here knows about proxies or streams.
//!
//! One file per input kind, after two that every kind reads; each file imports
//! only the ones listed before it and states its own rules in its module docs:
//!
//! - `objects.rs`: the [`Objects`] translation reads, and how an object is named;
//! - `problem.rs`: how what is refused is said (an [`ObjectStatus`] per object,
//!   naming object and field);
//! - `inbound.rs`: what ServerPolicies say of a pod's own ports, per port, and
//!   which wins;
//! - `service.rs`: each port of a Service, with the ready endpoints of its
//!   EndpointSlices, is one model service;
//! - `http_route.rs`: HTTPRoutes with a Service parent become that Service's routes;
//! - `grpc_route.rs`: GRPCRoutes, read as the HTTPRoutes they amount to;
//! - `index.rs`: the order objects are read in (oldest first, each once), and the
//!   index of usable Services and of every route that the policies resolve against;
//! - `traffic_policy.rs`: TrafficPolicies attach to Services, ports, routes and
//!   rules; how a call is made follows the target, how a destination is treated
//!   (`connectionPool`, `outlierDetection`, `loadBalancer`) only ever follows a
//!   Service, and is refused on a route;
//! - `server_policy.rs`: ServerPolicies become [`InboundLimit`]s on the pods behind
//!   a Service, which each proxy's view hands its own pod.
//!
//! Translation runs in that order too: the usable Services first (everything else
//! refers to them), then the routes, then the policies that attach to both. An
//! object that does not translate is left out whole and its status says why, so
//! everything else still comes through.
//!
//! The translated mesh always passes `Config::validate()` and the proxy's route
//! checks (paths, regexes, header names are checked here the same way); should a
//! bug let something through, [`guard`] drops and logs it rather than sending
//! proxies a config they would refuse.

mod grpc_route;
mod http_route;
mod inbound;
mod index;
mod objects;
mod problem;
mod server_policy;
mod service;
mod traffic_policy;

pub use inbound::{InboundIndex, InboundLimit, PodKey};
pub use objects::{Objects, GRPC_ROUTE, HTTP_ROUTE, SERVER_POLICY, SERVICE, TRAFFIC_POLICY};
pub use problem::ObjectStatus;

use index::{oldest_first, Index};
use objects::Key;
use problem::status;
use std::collections::BTreeMap;
use traffic_policy::Attachments;
use trellis_proto::model::config::{self as model, Config};

/// The whole mesh (without `inbound`, which is per pod), the inbound limits each
/// pod's view takes its own from, and the status of every object Trellis owns.
#[derive(Debug, Clone, PartialEq)]
pub struct Translation {
    pub mesh: Config,
    /// In precedence order (see [`InboundLimit::precedence`]).
    pub inbound: Vec<InboundLimit>,
    pub statuses: Vec<ObjectStatus>,
}

impl Translation {
    /// The status of one object, if it has one.
    pub fn status(&self, kind: &str, namespace: &str, name: &str) -> Option<&ObjectStatus> {
        self.statuses
            .iter()
            .find(|s| s.kind == kind && s.namespace == namespace && s.name == name)
    }
}

/// Translates every object; see the module documentation for the rules.
pub fn translate(objects: &Objects) -> Translation {
    let index = Index::new(objects);
    let mut statuses = index.statuses.clone();

    // HTTPRoutes and GRPCRoutes with a Service parent, oldest first.
    let mut routes = Vec::new();
    for route in &index.routes {
        let Some(result) = http_route::translate_route(&route.key, &route.route, &index.services)
        else {
            continue;
        };
        let mut problems = route.problems.clone();
        match result {
            Ok(attached) if problems.is_empty() => {
                statuses.push(status(route.kind, &route.key, problems));
                routes.push(((route.kind, route.key.clone()), attached));
            }
            Ok(_) => statuses.push(status(route.kind, &route.key, problems)),
            Err(mut more) => {
                problems.append(&mut more);
                statuses.push(status(route.kind, &route.key, problems));
            }
        }
    }

    // TrafficPolicies, oldest first, sorted into their targets.
    let mut attachments = Attachments::default();
    for (key, policy) in oldest_first(
        &objects.traffic_policies,
        |p| &p.metadata,
        TRAFFIC_POLICY,
        &mut statuses,
    ) {
        match traffic_policy::translate_traffic_policy(&key, policy, &index) {
            Ok((policy, targets)) => {
                statuses.push(status(TRAFFIC_POLICY, &key, Vec::new()));
                attachments.add(policy, targets);
            }
            Err(problems) => statuses.push(status(TRAFFIC_POLICY, &key, problems)),
        }
    }

    // ServerPolicies: limits on pods, which each proxy's view picks its own from.
    let (inbound, server_statuses) = server_policy::server_policies(objects, &index);
    statuses.extend(server_statuses);

    // The model services, with their routes and policy.
    let mut route_lists: BTreeMap<(Key, u16), Vec<model::Route>> = BTreeMap::new();
    for (route_key, attached) in &routes {
        for (service_key, port) in &attached.parents {
            let service_policy = attachments.service_policy(service_key, port.get());
            let list = route_lists
                .entry((service_key.clone(), port.get()))
                .or_default();
            for rule in &attached.rules {
                let mut route = rule.route.clone();
                route.policy = attachments.route_policy(route_key, rule, &service_policy);
                list.push(route);
            }
        }
    }
    let accounts = service::pod_accounts(&objects.pods);
    let inbound_index = InboundIndex::new(&inbound);
    let mut services = Vec::new();
    for (key, service) in &index.services {
        for port in &service.ports {
            services.push(model::Service {
                name: key.1.clone(),
                namespace: key.0.clone(),
                port: port.port,
                cluster_ip: service.cluster_ip,
                endpoints: service::endpoints(service, port, &accounts, &inbound_index),
                routes: route_lists
                    .remove(&(key.clone(), port.port.get()))
                    .unwrap_or_default(),
                policy: attachments.service_policy(key, port.port.get()),
            });
        }
    }
    let mut mesh = Config {
        services,
        inbound: Vec::new(),
    };
    guard(&mut mesh);
    Translation {
        mesh,
        inbound,
        statuses,
    }
}

/// A last line of defence: the checks above should make every translated config
/// valid; if one is not (a bug), the offending service or inbound port is dropped
/// and logged rather than sending proxies a config they would refuse.
fn guard(config: &mut Config) {
    for _ in 0..=config.services.len() + config.inbound.len() {
        let Err((path, message)) = config.validate() else {
            return;
        };
        tracing::error!(%path, %message, "translated config is invalid; dropping the offender");
        let index = |list: &str| {
            path.strip_prefix(list)
                .and_then(|rest| rest.strip_prefix('['))
                .and_then(|rest| rest.split_once(']'))
                .and_then(|(i, _)| i.parse::<usize>().ok())
        };
        if let Some(i) = index("services").filter(|i| *i < config.services.len()) {
            config.services.remove(i);
        } else if let Some(i) = index("inbound").filter(|i| *i < config.inbound.len()) {
            config.inbound.remove(i);
        } else {
            config.services.clear();
            config.inbound.clear();
        }
    }
}

#[cfg(test)]
pub(crate) mod fixtures;
