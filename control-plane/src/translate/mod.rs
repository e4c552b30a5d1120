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
//! Each change is translated whole, but what did not change is not translated
//! again: a [`Translator`] (the hub keeps one) remembers what it made of each
//! route, policy and Service port, and reuses it while the object and what it
//! reads are the same allocations. [`translate`] is a translator that remembers
//! nothing; both give the same [`Translation`] for the same objects.
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

use crate::crd::TrafficPolicy;
use http_route::Attached;
use index::{oldest_first, Index};
use k8s_openapi::api::core::v1::Service as KubeService;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use objects::{Key, RouteKey};
use problem::{status, Problem};
use std::any::Any;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use traffic_policy::{Attachments, Target};
use trellis_proto::model::config::{self as model, Config};
use trellis_proto::model::policy::Policy;

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

/// Translation that remembers what it last read and made, so that a change
/// re-translates only what it touches: a route or TrafficPolicy again only when
/// it changed or the Services it resolves against did (a TrafficPolicy also when
/// a route did), a Service port's endpoints only when the Service, its
/// EndpointSlices, the pods' service accounts or the ServerPolicies' limits did.
/// An object is known again by its allocation: a source hands an unchanged object
/// over as the same `Arc`. Whatever it reuses, the result is what [`translate`]
/// makes of the same objects.
#[derive(Default)]
pub struct Translator {
    /// The Service objects, oldest first, that `routes` and `policies` were
    /// resolved against.
    services: Vec<Arc<KubeService>>,
    /// The route objects, in index order, that `policies` were resolved against.
    route_objects: Vec<Object>,
    routes: HashMap<RouteKey, (Object, RouteResult)>,
    policies: HashMap<Key, (Arc<TrafficPolicy>, PolicyResult)>,
    /// The pods' service accounts (namespace, pod, account; sorted) and the inbound
    /// limits that `endpoints` were made with.
    accounts: Vec<(String, String, String)>,
    inbound: Vec<InboundLimit>,
    endpoints: HashMap<(Key, u16), Endpoints>,
}

/// A route object (an HTTPRoute or a GRPCRoute), known by its allocation.
type Object = Arc<dyn Any + Send + Sync>;
type RouteResult = Option<Result<Arc<Attached>, Vec<Problem>>>;
type PolicyResult = Result<(Policy, Vec<Target>), Vec<Problem>>;

/// One Service port's endpoints and what they were made from.
struct Endpoints {
    service: Arc<KubeService>,
    slices: Vec<Arc<EndpointSlice>>,
    endpoints: Vec<model::Endpoint>,
}

/// Whether `now` are the very allocations of `then`, in the same order.
fn same_objects<'a, T: ?Sized + 'a>(
    then: &[Arc<T>],
    now: impl ExactSizeIterator<Item = &'a Arc<T>>,
) -> bool {
    then.len() == now.len() && then.iter().zip(now).all(|(a, b)| Arc::ptr_eq(a, b))
}

/// Translates every object; see the module documentation for the rules.
pub fn translate(objects: &Objects) -> Translation {
    Translator::default().translate(objects)
}

impl Translator {
    /// Translates every object, reusing what it made of those that did not change.
    pub fn translate(&mut self, objects: &Objects) -> Translation {
        let index = Index::new(objects);
        let mut statuses = index.statuses.clone();
        if !same_objects(&self.services, index.service_objects.iter().copied()) {
            self.services = index
                .service_objects
                .iter()
                .map(|s| Arc::clone(s))
                .collect();
            self.routes.clear();
            self.policies.clear();
        }
        if !same_objects(&self.route_objects, index.routes.iter().map(|r| &r.object)) {
            self.route_objects = index.routes.iter().map(|r| r.object.clone()).collect();
            self.policies.clear();
        }

        // HTTPRoutes and GRPCRoutes with a Service parent, oldest first.
        let mut remembered = std::mem::take(&mut self.routes);
        let mut routes = Vec::new();
        for route in &index.routes {
            let id = (route.kind, route.key.clone());
            let result = match remembered.remove(&id) {
                Some((object, result)) if Arc::ptr_eq(&object, &route.object) => result,
                _ => http_route::translate_route(&route.key, &route.route, &index.services)
                    .map(|result| result.map(Arc::new)),
            };
            self.routes
                .insert(id.clone(), (route.object.clone(), result.clone()));
            let Some(result) = result else {
                continue;
            };
            let mut problems = route.problems.clone();
            match result {
                Ok(attached) if problems.is_empty() => {
                    statuses.push(status(route.kind, &route.key, problems));
                    routes.push((id, attached));
                }
                Ok(_) => statuses.push(status(route.kind, &route.key, problems)),
                Err(mut more) => {
                    problems.append(&mut more);
                    statuses.push(status(route.kind, &route.key, problems));
                }
            }
        }

        // TrafficPolicies, oldest first, sorted into their targets.
        let mut remembered = std::mem::take(&mut self.policies);
        let mut attachments = Attachments::default();
        for (key, policy) in oldest_first(
            &objects.traffic_policies,
            |p| &p.metadata,
            TRAFFIC_POLICY,
            &mut statuses,
        ) {
            let result = match remembered.remove(&key) {
                Some((object, result)) if Arc::ptr_eq(&object, policy) => result,
                _ => traffic_policy::translate_traffic_policy(&key, policy, &index),
            };
            self.policies
                .insert(key.clone(), (policy.clone(), result.clone()));
            match result {
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
        self.forget_endpoints_unless(&accounts, &inbound);
        let inbound_index = InboundIndex::new(&inbound);
        let mut remembered = std::mem::take(&mut self.endpoints);
        let mut services = Vec::new();
        for (key, service) in &index.services {
            for port in &service.ports {
                let id = (key.clone(), port.port.get());
                let endpoints = match remembered.remove(&id) {
                    Some(made)
                        if Arc::ptr_eq(&made.service, service.object)
                            && same_objects(&made.slices, service.slices.iter().copied()) =>
                    {
                        made
                    }
                    _ => Endpoints {
                        service: service.object.clone(),
                        slices: service.slices.iter().map(|s| Arc::clone(s)).collect(),
                        endpoints: service::endpoints(service, port, &accounts, &inbound_index),
                    },
                };
                services.push(Arc::new(model::Service {
                    name: key.1.clone(),
                    namespace: key.0.clone(),
                    port: port.port,
                    cluster_ip: service.cluster_ip,
                    endpoints: endpoints.endpoints.clone(),
                    routes: route_lists
                        .remove(&(key.clone(), port.port.get()))
                        .unwrap_or_default(),
                    policy: attachments.service_policy(key, port.port.get()),
                }));
                self.endpoints.insert(id, endpoints);
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

    /// Forgets every remembered endpoint list unless the pods' service accounts
    /// and the inbound limits are those they were made with.
    fn forget_endpoints_unless(
        &mut self,
        accounts: &service::PodAccounts<'_>,
        inbound: &[InboundLimit],
    ) {
        let mut now: Vec<(&str, &str, &str)> = accounts
            .iter()
            .map(|(&(namespace, pod), &account)| (namespace, pod, account))
            .collect();
        now.sort_unstable();
        let same_accounts = now.len() == self.accounts.len()
            && now
                .iter()
                .zip(&self.accounts)
                .all(|(a, b)| a.0 == b.0 && a.1 == b.1 && a.2 == b.2);
        if same_accounts && self.inbound == inbound {
            return;
        }
        self.endpoints.clear();
        self.accounts = now
            .into_iter()
            .map(|(n, p, a)| (n.to_owned(), p.to_owned(), a.to_owned()))
            .collect();
        self.inbound = inbound.to_vec();
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

#[cfg(test)]
mod tests {
    use super::fixtures::{objects, CANARY, PODS, SERVER_POLICY_YAML, SHOP};
    use super::*;

    /// Policies on a Service and on routes, a GRPCRoute, and a ServerPolicy that
    /// DISABLEs mTLS: with the fixtures, every kind a translator remembers.
    const MORE: &str = r#"
---
apiVersion: policy.trellis.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: on-route, namespace: shop}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: HTTPRoute, name: reviews, sectionName: "1"}]
  retry: {attempts: 2}
---
apiVersion: policy.trellis.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: on-service, namespace: shop}
spec:
  targetRefs: [{group: "", kind: Service, name: reviews-v2}]
  connectionPool: {maxConnections: 10}
---
apiVersion: policy.trellis.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: on-grpc, namespace: web}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: GRPCRoute, name: catalog}]
  timeouts: {request: 2s}
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: catalog, namespace: web}
spec:
  parentRefs: [{kind: Service, name: productpage, port: 9080}]
  rules: [{matches: [{method: {service: web.v1.Catalog}}]}]
---
apiVersion: policy.trellis.dev/v1alpha1
kind: ServerPolicy
metadata: {name: plain, namespace: shop}
spec:
  targetRefs: [{group: "", kind: Service, name: reviews-v1}]
  mtls: DISABLE
"#;

    /// Every object of `objects`, as (kind, position): what a step may leave out
    /// or replace.
    fn positions(objects: &Objects) -> Vec<(&'static str, usize)> {
        let mut all = Vec::new();
        for (kind, len) in [
            ("service", objects.services.len()),
            ("slice", objects.endpoint_slices.len()),
            ("pod", objects.pods.len()),
            ("http", objects.http_routes.len()),
            ("grpc", objects.grpc_routes.len()),
            ("traffic", objects.traffic_policies.len()),
            ("server", objects.server_policies.len()),
        ] {
            all.extend((0..len).map(|i| (kind, i)));
        }
        all
    }

    /// `objects` with one object left out (`copy` false) or replaced by an equal
    /// copy in a new allocation (`copy` true).
    fn change(objects: &Objects, (kind, i): (&str, usize), copy: bool) -> Objects {
        fn apply<T: Clone>(list: &mut Vec<Arc<T>>, i: usize, copy: bool) {
            if copy {
                list[i] = Arc::new((*list[i]).clone());
            } else {
                list.remove(i);
            }
        }
        let mut changed = objects.clone();
        match kind {
            "service" => apply(&mut changed.services, i, copy),
            "slice" => apply(&mut changed.endpoint_slices, i, copy),
            "pod" => apply(&mut changed.pods, i, copy),
            "http" => apply(&mut changed.http_routes, i, copy),
            "grpc" => apply(&mut changed.grpc_routes, i, copy),
            "traffic" => apply(&mut changed.traffic_policies, i, copy),
            _ => apply(&mut changed.server_policies, i, copy),
        }
        changed
    }

    #[test]
    fn a_translator_makes_of_every_change_what_a_fresh_translation_makes() {
        let whole = objects(&format!("{SHOP}{CANARY}{SERVER_POLICY_YAML}{PODS}{MORE}"));
        let fresh = translate(&whole);
        assert!(
            fresh.statuses.iter().all(|s| s.accepted && s.resolved_refs),
            "{:?}",
            fresh.statuses
        );
        let mut translator = Translator::default();
        assert_eq!(translator.translate(&whole), fresh);
        // Each object in turn: gone, back, copied, and back to the original, each
        // step from the translator's state after the one before.
        for at in positions(&whole) {
            for step in [
                change(&whole, at, false),
                whole.clone(),
                change(&whole, at, true),
            ] {
                assert_eq!(translator.translate(&step), translate(&step), "{at:?}");
            }
        }
        // Two objects at once, which leaves a route or policy pointing at nothing.
        for first in positions(&whole) {
            for second in positions(&whole) {
                let step = change(&change(&whole, second, true), first, false);
                assert_eq!(
                    translator.translate(&step),
                    translate(&step),
                    "{first:?} {second:?}"
                );
            }
        }
        assert_eq!(translator.translate(&whole), fresh);
    }
}
