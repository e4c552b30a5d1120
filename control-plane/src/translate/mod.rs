//! Translation: what operators write (Services, EndpointSlices, HTTPRoutes and
//! GRPCRoutes with GAMMA parentRefs, TrafficPolicy, ServerPolicy; `shared/API.md`)
//! into the proxy's one config model, plus a status for each object that says
//! whether it took effect. Pure and synchronous: the same [`Objects`] always give
//! the same [`Translation`], whether they came from Kubernetes or from local YAML
//! files. Nothing here knows about proxies or streams.
//!
//! One file per input kind, each stating its own rules in its module docs:
//!
//! - `service.rs`: each port of a Service, with the ready endpoints of its
//!   EndpointSlices, is one model service;
//! - `http_route.rs`: HTTPRoutes with a Service parent become that Service's routes;
//! - `grpc_route.rs`: GRPCRoutes, read as the HTTPRoutes they amount to;
//! - `traffic_policy.rs`: TrafficPolicies attach to Services, ports, routes and
//!   rules; how a call is made follows the target, how a destination is treated
//!   (`connectionPool`, `outlierDetection`, `loadBalancer`) only ever follows a
//!   Service, and is refused on a route;
//! - `server_policy.rs`: ServerPolicies become [`InboundLimit`]s on the pods behind
//!   a Service, which each proxy's view hands its own pod;
//! - `problem.rs`: how what is refused is said (statuses, naming object and field).
//!
//! Translation runs in that order: the usable Services first (everything else
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
mod problem;
mod server_policy;
mod service;
mod traffic_policy;

pub use server_policy::{InboundLimit, PodKey};

use gateway_api::apis::standard::httproutes::HttpRoute;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta, Time};
use problem::{invalid, status, Problem};
use service::ServiceInfo;
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use traffic_policy::Attachments;
use trellis_proto::model::config::{self as model, Config};

/// Everything the control plane knows, from Kubernetes or from local YAML files.
#[derive(Debug, Default, Clone)]
pub struct Objects {
    pub services: Vec<k8s_openapi::api::core::v1::Service>,
    pub endpoint_slices: Vec<k8s_openapi::api::discovery::v1::EndpointSlice>,
    pub pods: Vec<k8s_openapi::api::core::v1::Pod>,
    pub http_routes: Vec<gateway_api::apis::standard::httproutes::HttpRoute>,
    pub grpc_routes: Vec<gateway_api::apis::standard::grpcroutes::GrpcRoute>,
    pub traffic_policies: Vec<crate::crd::TrafficPolicy>,
    pub server_policies: Vec<crate::crd::ServerPolicy>,
    /// Where each object came from, by (kind, namespace, name): in local mode its
    /// file, so a rejection can name the file as well as the field.
    pub origins: HashMap<(String, String, String), String>,
}

/// Accepted=False (with reason and a message naming the field) or Accepted=True
/// for one object; see `problem.rs` for which objects get one and what it says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectStatus {
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
    pub accepted: bool,
    pub reason: String,
    pub message: String,
    pub resolved_refs: bool,
}

/// The whole mesh (without `inbound`, which is per pod), the inbound limits each
/// pod's view takes its own from, and the status of every object Trellis owns.
#[derive(Debug, Clone, PartialEq)]
pub struct Translation {
    pub mesh: Config,
    /// In precedence order (see [`InboundLimit::precedence`]).
    pub inbound: Vec<InboundLimit>,
    pub statuses: Vec<ObjectStatus>,
}

/// The kinds an [`ObjectStatus`] names.
pub const SERVICE: &str = "Service";
pub const HTTP_ROUTE: &str = "HTTPRoute";
pub const GRPC_ROUTE: &str = "GRPCRoute";
pub const TRAFFIC_POLICY: &str = "TrafficPolicy";
pub const SERVER_POLICY: &str = "ServerPolicy";

const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";

impl ObjectStatus {
    /// The Gateway-API-style conditions to write on the object: `Accepted` and
    /// `ResolvedRefs`, each True with its own name as reason, or False with
    /// [`reason`](Self::reason) and [`message`](Self::message). A writer should
    /// keep a condition's old `lastTransitionTime` when its status is unchanged.
    pub fn conditions(&self, observed_generation: Option<i64>, now: &Time) -> Vec<Condition> {
        let condition = |type_: &str, ok: bool| Condition {
            type_: type_.to_owned(),
            status: if ok { "True" } else { "False" }.to_owned(),
            reason: if ok {
                type_.to_owned()
            } else {
                self.reason.clone()
            },
            message: if ok {
                String::new()
            } else {
                self.message.clone()
            },
            observed_generation,
            last_transition_time: now.clone(),
        };
        vec![
            condition("Accepted", self.accepted),
            condition("ResolvedRefs", self.resolved_refs),
        ]
    }
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
        let Some(result) = http_route::translate_route(&route.key, &route.route, &index) else {
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
    let mut services = Vec::new();
    for (key, service) in &index.services {
        for port in &service.ports {
            services.push(model::Service {
                name: key.1.clone(),
                namespace: key.0.clone(),
                port: port.port,
                cluster_ip: service.cluster_ip,
                endpoints: service::endpoints(service, port),
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

// ---------------------------------------------------------------------------
// Objects: their identity, their order, and the index every kind reads.

/// (namespace, name)
type Key = (String, String);

/// A route's kind ([`HTTP_ROUTE`] or [`GRPC_ROUTE`]) and namespace/name.
type RouteKey = (&'static str, Key);

fn namespace_of(meta: &ObjectMeta) -> String {
    meta.namespace
        .clone()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "default".to_owned())
}

fn key_of(meta: &ObjectMeta) -> Key {
    (namespace_of(meta), meta.name.clone().unwrap_or_default())
}

/// A Service reference's group: `""`, `core` or absent.
fn is_core_group(group: Option<&str>) -> bool {
    matches!(group, None | Some("") | Some("core"))
}

/// `items` oldest first (creationTimestamp, then namespace/name, then the order
/// given; objects without a creationTimestamp, as in local files, come first); a
/// second object with the same namespace/name is reported and skipped.
fn oldest_first<'a, T>(
    items: &'a [T],
    meta: impl Fn(&T) -> &ObjectMeta,
    kind: &'static str,
    statuses: &mut Vec<ObjectStatus>,
) -> Vec<(Key, &'a T)> {
    let mut sorted: Vec<(Option<&Time>, Key, &'a T)> = items
        .iter()
        .map(|item| {
            let meta = meta(item);
            (meta.creation_timestamp.as_ref(), key_of(meta), item)
        })
        .collect();
    sorted.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for (_, key, item) in sorted {
        if seen.insert(key.clone()) {
            out.push((key, item));
        } else {
            statuses.push(status(
                kind,
                &key,
                vec![invalid(
                    "Invalid",
                    "metadata.name",
                    format!(
                        "{kind} {}/{} is defined more than once; the oldest is used",
                        key.0, key.1
                    ),
                )],
            ));
        }
    }
    out
}

/// An HTTPRoute, or a GRPCRoute in HTTPRoute form (`grpc_route.rs`).
struct MeshRoute<'a> {
    kind: &'static str,
    key: Key,
    route: Cow<'a, HttpRoute>,
    /// What the conversion from a GRPCRoute found wrong.
    problems: Vec<Problem>,
}

/// The usable Services and every HTTPRoute and GRPCRoute, oldest first.
struct Index<'a> {
    services: BTreeMap<Key, ServiceInfo<'a>>,
    routes: Vec<MeshRoute<'a>>,
    /// Positions in `routes`.
    route_keys: BTreeMap<RouteKey, usize>,
    /// Services that cannot be used, and objects defined twice.
    statuses: Vec<ObjectStatus>,
}

impl<'a> Index<'a> {
    fn new(objects: &'a Objects) -> Index<'a> {
        let mut statuses = Vec::new();
        let services = service::services(objects, &mut statuses);
        let mut routes: Vec<MeshRoute> = oldest_first(
            &objects.http_routes,
            |r| &r.metadata,
            HTTP_ROUTE,
            &mut statuses,
        )
        .into_iter()
        .map(|(key, route)| MeshRoute {
            kind: HTTP_ROUTE,
            key,
            route: Cow::Borrowed(route),
            problems: Vec::new(),
        })
        .collect();
        for (key, route) in oldest_first(
            &objects.grpc_routes,
            |r| &r.metadata,
            GRPC_ROUTE,
            &mut statuses,
        ) {
            let (route, problems) = grpc_route::grpc_as_http(route);
            routes.push(MeshRoute {
                kind: GRPC_ROUTE,
                key,
                route: Cow::Owned(route),
                problems,
            });
        }
        // Both kinds in one order, as for one kind (stable: HTTPRoutes first on a tie).
        routes.sort_by(|a, b| {
            (a.route.metadata.creation_timestamp.as_ref(), &a.key)
                .cmp(&(b.route.metadata.creation_timestamp.as_ref(), &b.key))
        });
        let route_keys = routes
            .iter()
            .enumerate()
            .map(|(i, r)| ((r.kind, r.key.clone()), i))
            .collect();
        Index {
            services,
            routes,
            route_keys,
            statuses,
        }
    }
}

#[cfg(test)]
pub(crate) mod fixtures;
