//! Translation: what operators write (Services, EndpointSlices, HTTPRoutes and
//! GRPCRoutes with GAMMA parentRefs, TrafficPolicy, ServerPolicy; `shared/API.md`) into the proxy's
//! one config model, plus a status for each object that says whether it took
//! effect. Pure and synchronous: the same [`Objects`] always give the same
//! [`Translation`], whether they came from Kubernetes or from local YAML files.
//!
//! # Services and endpoints
//!
//! Each port of a Service becomes one model service (`name`, `namespace`, `port`,
//! `clusterIP`; a headless Service has none). ExternalName Services are left out:
//! their traffic is not ours to route. Endpoints come from the EndpointSlices in the
//! Service's namespace labelled `kubernetes.io/service-name: <service>`: ready
//! endpoints only (an absent `conditions.ready` counts as ready), the first address
//! of each (FQDN slices are skipped), with the slice port whose name is the Service
//! port's name. For an unnamed Service port, the slice's unnamed port is taken
//! (the one numbered like a numeric `targetPort` if there are several), and a
//! slice that lists no ports at all serves the `targetPort` number (the Service
//! port when absent), which suits hand-written slices in local mode.
//!
//! # HTTPRoutes
//!
//! An HTTPRoute is ours when a parentRef names a Service (kind `Service`, group
//! `""`, `core` or absent); its other parents (Gateways) are left to their
//! controllers and an HTTPRoute with no Service parent gets no status from us. A
//! parentRef without `port` (or `sectionName`, the port's name) attaches to every
//! port of the Service. Each rule becomes one model route named
//! `<httproute>/<section>`, where the section is the rule's `name`, or its index
//! when unnamed: exactly the `sectionName` a TrafficPolicy uses to target the rule.
//! Rules keep their matches (path type and value, method, headers, query
//! parameters), backendRefs (namespace defaults to the route's, weight to 1) and
//! `timeouts` (`request` is the model's `request`, `backendRequest` its `perTry`;
//! `0s` turns a timeout off, as Gateway API says). A rule without backendRefs sends
//! requests to the Service's own endpoints; a route without rules is one such rule.
//! Routes from several HTTPRoutes on one Service are concatenated oldest first
//! (creationTimestamp, then namespace/name; objects without a creationTimestamp,
//! as in local files, count as oldest), each in rule order; the proxy then
//! orders them by Gateway API precedence with that order as the tie-break.
//!
//! # GRPCRoutes
//!
//! A GRPCRoute is read as the HTTPRoute it amounts to (`grpc_as_http`), so it
//! follows every rule above (parents, section names, backendRefs, header matches,
//! ordering among HTTPRoutes by creationTimestamp, statuses with kind `GRPCRoute`).
//! A `method` match becomes a path match on `/<service>/<method>`: `Exact` (the
//! default) with both is an Exact path, with only a service a PathPrefix
//! `/<service>`, with only a method the regex `/[^/]+/<method>` (escaped);
//! `RegularExpression` is the regex `/(?:<service>)/(?:<method>)`, `[^/]+` for
//! a missing part. Exact names must be gRPC names (letters, digits, `_`, and `.` in
//! a service). GRPCRoute has no timeouts.
//!
//! Not supported yet, and refused rather than ignored (Accepted=False,
//! `UnsupportedValue`): filters, and a parentRef to a Service in another namespace
//! (a GAMMA consumer route). `hostnames` are ignored, as GAMMA says. ReferenceGrants
//! are not read: a backendRef may name a Service in any namespace.
//!
//! # TrafficPolicy
//!
//! A policy applies to what its targetRefs name, from broadest to narrowest: a
//! Service (its model services' `policy`), one port of it (`sectionName` = the
//! port's name), an HTTPRoute or GRPCRoute (every route made from it), one rule of it
//! (`sectionName` = the rule's name, or index when unnamed). A narrower target wins
//! section by section ([`Policy::overridden_by`]); among policies on the same
//! target the oldest (creationTimestamp, then namespace/name) wins, also section by
//! section, so a newer policy still fills the sections the older one leaves out.
//! A rule's own `timeouts` are narrower still and override the effective timeouts
//! field by field (`request`, `perTry`). The proxy itself merges a route's policy
//! over its service's, so route policies carry only what routes or rules set. A
//! policy whose target exists but is not in effect (a refused HTTPRoute) is
//! accepted, and applies once its target is.
//!
//! # ServerPolicy
//!
//! A ServerPolicy targets Services (optionally one port by `sectionName`), and
//! `ports` narrows it to those Service ports. Its `rateLimit` becomes an `inbound`
//! entry, on the pod's own port (the EndpointSlice port behind the Service port),
//! in the [`view`] of every pod that backs the Service: one whose EndpointSlice
//! endpoint has a `targetRef` naming the pod, or whose address is the pod's IP,
//! ready or not (a starting pod gets its limits before it is ready). When several
//! policies cover one pod port, one that names the port (by `ports` or
//! `sectionName`) beats one that covers every port, then the oldest wins. `mtls`
//! and `authorization` are checked (a bad value is Accepted=False, naming the
//! field) but not translated yet: the model has no place for them.
//!
//! # Pods
//!
//! Pods are not read yet: identity (service accounts) arrives with the CA. A pod
//! is recognised in [`view`] by its EndpointSlice endpoints.
//!
//! # Statuses
//!
//! Every HTTPRoute and GRPCRoute with a Service parent, every TrafficPolicy and every
//! ServerPolicy gets one [`ObjectStatus`]; a Service gets one only when it cannot
//! be used (possible in local mode: a name that is not a DNS label, a port out of
//! range, the same Service twice). `accepted` means the object is in effect. An
//! object that is not is left out of the translation entirely, so everything else
//! still comes through; its message names the field (`spec.retry.on[0]: unknown
//! variant ...`, `spec.rules[1].matches[0].path.value: invalid regex ...`).
//! `resolved_refs` is false when what is wrong is a reference (a backendRef to a
//! missing Service, a parentRef or targetRef to nothing). When an object has more
//! than one problem, an invalid value is reported before a reference, and the
//! message says how many more there are.
//!
//! The translated mesh always passes `Config::validate()` and the proxy's route
//! checks (paths, regexes, header names are checked here the same way).

use crate::crd::{Authorization, MtlsMode, ServerPolicy, TargetRef, TrafficPolicy};
use gateway_api::apis::standard::grpcroutes::{
    GrpcRoute, GrpcRouteRulesMatchesHeadersType, GrpcRouteRulesMatchesMethod,
    GrpcRouteRulesMatchesMethodType,
};
use gateway_api::apis::standard::httproutes::{
    HttpRoute, HttpRouteParentRefs, HttpRouteRules, HttpRouteRulesBackendRefs,
    HttpRouteRulesMatches, HttpRouteRulesMatchesHeaders, HttpRouteRulesMatchesHeadersType,
    HttpRouteRulesMatchesPath, HttpRouteRulesMatchesPathType, HttpRouteRulesMatchesQueryParamsType,
    HttpRouteRulesTimeouts, HttpRouteSpec,
};
use k8s_openapi::api::core::v1::Service as KubeService;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Display;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU16;
use std::time::Duration;
use trellis_proto::model::config::{self as model, Config};
use trellis_proto::model::duration;
use trellis_proto::model::policy::{Policy, RateLimit, Timeouts};

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

/// Accepted=False (with reason and a message naming the field) or Accepted=True for one object.
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

/// The whole mesh (without `inbound`, which is per pod: see [`view`]) and the
/// status of every object Trellis owns.
#[derive(Debug, Clone, PartialEq)]
pub struct Translation {
    pub mesh: trellis_proto::model::config::Config,
    pub statuses: Vec<ObjectStatus>,
}

/// The kinds an [`ObjectStatus`] names.
pub const SERVICE: &str = "Service";
pub const HTTP_ROUTE: &str = "HTTPRoute";
pub const GRPC_ROUTE: &str = "GRPCRoute";
pub const TRAFFIC_POLICY: &str = "TrafficPolicy";
pub const SERVER_POLICY: &str = "ServerPolicy";

/// The label that ties an EndpointSlice to its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
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
        let Some(result) = translate_route(&route.key, &route.route, &index) else {
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
        match translate_traffic_policy(&key, policy, &index) {
            Ok((policy, targets)) => {
                statuses.push(status(TRAFFIC_POLICY, &key, Vec::new()));
                attachments.add(policy, targets);
            }
            Err(problems) => statuses.push(status(TRAFFIC_POLICY, &key, problems)),
        }
    }

    // ServerPolicies only have statuses here; their rules reach proxies in `view`.
    statuses.extend(server_policies(objects, &index).1);

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
                endpoints: endpoints(service, port),
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
    Translation { mesh, statuses }
}

/// What one proxy receives: `mesh` narrowed to the namespaces it may reach (None = all),
/// plus `inbound` entries from the ServerPolicies that target services whose endpoints are this pod.
///
/// `objects` must be the ones `translation` was made from. With `reach`, the view
/// keeps the services in those namespaces and, transitively, every service their
/// routes' backends name, so it is a valid config on its own.
pub fn view(
    translation: &Translation,
    objects: &Objects,
    pod_namespace: &str,
    pod_name: &str,
    pod_ip: &str,
    reach: Option<&[String]>,
) -> trellis_proto::model::config::Config {
    let services = match reach {
        None => translation.mesh.services.clone(),
        Some(namespaces) => reachable(&translation.mesh.services, namespaces),
    };

    let index = Index::new(objects);
    let (rules, _) = server_policies(objects, &index);
    let pod_ip: Option<IpAddr> = pod_ip.trim().parse().ok();
    let backs = |slice: &EndpointSlice| {
        let slice_namespace = namespace_of(&slice.metadata);
        slice.endpoints.iter().any(|endpoint| {
            let by_ref = endpoint.target_ref.as_ref().is_some_and(|r| {
                r.kind.as_deref() == Some("Pod")
                    && r.name.as_deref() == Some(pod_name)
                    && r.namespace.as_deref().unwrap_or(&slice_namespace) == pod_namespace
            });
            let by_ip = pod_ip.is_some_and(|ip| {
                endpoint
                    .addresses
                    .iter()
                    .any(|a| a.parse::<IpAddr>().ok() == Some(ip))
            });
            by_ref || by_ip
        })
    };
    // Rules come in precedence order: the first to claim a pod port keeps it.
    let mut inbound: BTreeMap<NonZeroU16, RateLimit> = BTreeMap::new();
    for rule in &rules {
        let Some(service) = index.services.get(&rule.service) else {
            continue;
        };
        for port in service
            .ports
            .iter()
            .filter(|p| rule.ports.contains(&p.port))
        {
            for slice in service.slices.iter().filter(|s| backs(s)) {
                if let Some(pod_port) = slice_port(slice, port) {
                    inbound
                        .entry(pod_port)
                        .or_insert_with(|| rule.rate_limit.clone());
                }
            }
        }
    }
    let mut config = Config {
        services,
        inbound: inbound
            .into_iter()
            .map(|(port, rate_limit)| model::InboundPort {
                port,
                rate_limit: Some(rate_limit),
            })
            .collect(),
    };
    guard(&mut config);
    config
}

/// The services in `namespaces`, plus every service their routes reach, in mesh order.
/// The services of `namespaces`, plus every service their routes send to.
pub fn reachable(services: &[model::Service], namespaces: &[String]) -> Vec<model::Service> {
    let by_authority: HashMap<(&str, &str, u16), usize> = services
        .iter()
        .enumerate()
        .map(|(i, s)| ((s.namespace.as_str(), s.name.as_str(), s.port.get()), i))
        .collect();
    let mut keep = BTreeSet::new();
    let mut queue: Vec<usize> = services
        .iter()
        .enumerate()
        .filter(|(_, s)| namespaces.contains(&s.namespace))
        .map(|(i, _)| i)
        .collect();
    while let Some(i) = queue.pop() {
        if !keep.insert(i) {
            continue;
        }
        let service = &services[i];
        for backend in service.routes.iter().flat_map(|r| &r.backends) {
            let namespace = backend.namespace.as_deref().unwrap_or(&service.namespace);
            if let Some(&j) =
                by_authority.get(&(namespace, backend.name.as_str(), backend.port.get()))
            {
                queue.push(j);
            }
        }
    }
    keep.into_iter().map(|i| services[i].clone()).collect()
}

/// A last line of defence: the checks above should make every translated config
/// valid; if one is not (a bug), the offending service or inbound port is dropped
/// and logged rather than sending proxies a config they would refuse.
/// Who gets which inbound limits, computed once per snapshot so that a proxy's view
/// costs a few lookups rather than a pass over every object.
#[derive(Debug, Default)]
pub struct InboundIndex {
    /// Per pod (by `namespace/name` of the endpoints' targetRef, or by IP): pod
    /// port -> (rule precedence, limit).
    by_pod: HashMap<String, BTreeMap<NonZeroU16, (usize, RateLimit)>>,
}

impl InboundIndex {
    pub fn new(objects: &Objects) -> InboundIndex {
        let index = Index::new(objects);
        let (rules, _) = server_policies(objects, &index);
        let mut by_pod: HashMap<String, BTreeMap<NonZeroU16, (usize, RateLimit)>> = HashMap::new();
        for (precedence, rule) in rules.iter().enumerate() {
            let Some(service) = index.services.get(&rule.service) else {
                continue;
            };
            for port in service
                .ports
                .iter()
                .filter(|p| rule.ports.contains(&p.port))
            {
                for slice in &service.slices {
                    let Some(pod_port) = slice_port(slice, port) else {
                        continue;
                    };
                    let slice_namespace = namespace_of(&slice.metadata);
                    for endpoint in &slice.endpoints {
                        let mut keys: Vec<String> = endpoint
                            .addresses
                            .iter()
                            .filter_map(|a| a.parse::<IpAddr>().ok())
                            .map(|ip| format!("ip/{ip}"))
                            .collect();
                        if let Some(pod) = endpoint
                            .target_ref
                            .as_ref()
                            .filter(|r| r.kind.as_deref() == Some("Pod"))
                        {
                            let namespace = pod
                                .namespace
                                .clone()
                                .unwrap_or_else(|| slice_namespace.clone());
                            keys.push(format!(
                                "pod/{namespace}/{}",
                                pod.name.as_deref().unwrap_or("")
                            ));
                        }
                        for key in keys {
                            by_pod
                                .entry(key)
                                .or_default()
                                .entry(pod_port)
                                .or_insert_with(|| (precedence, rule.rate_limit.clone()));
                        }
                    }
                }
            }
        }
        InboundIndex { by_pod }
    }

    /// The inbound limits of one pod, as `view` computes them.
    pub fn for_pod(&self, namespace: &str, pod: &str, pod_ip: &str) -> Vec<model::InboundPort> {
        let mut ports: BTreeMap<NonZeroU16, (usize, RateLimit)> = BTreeMap::new();
        let mut keys = vec![format!("pod/{namespace}/{pod}")];
        if let Ok(ip) = pod_ip.trim().parse::<IpAddr>() {
            keys.push(format!("ip/{ip}"));
        }
        for key in keys {
            for (port, (precedence, limit)) in self.by_pod.get(&key).into_iter().flatten() {
                let keep = ports.get(port).is_none_or(|(p, _)| precedence < p);
                if keep {
                    ports.insert(*port, (*precedence, limit.clone()));
                }
            }
        }
        ports
            .into_iter()
            .map(|(port, (_, limit))| model::InboundPort {
                port,
                rate_limit: Some(limit),
            })
            .collect()
    }
}

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
// Objects, their identity and their problems.

/// (namespace, name)
type Key = (String, String);

fn namespace_of(meta: &ObjectMeta) -> String {
    meta.namespace
        .clone()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "default".to_owned())
}

fn key_of(meta: &ObjectMeta) -> Key {
    (namespace_of(meta), meta.name.clone().unwrap_or_default())
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

/// Why an object is not in effect.
#[derive(Clone)]
struct Problem {
    /// A reference that resolves to nothing (rather than an invalid value).
    refs: bool,
    reason: &'static str,
    message: String,
}

fn invalid(reason: &'static str, field: impl Display, message: impl Display) -> Problem {
    Problem {
        refs: false,
        reason,
        message: format!("{field}: {message}"),
    }
}

fn unresolved(reason: &'static str, field: impl Display, message: impl Display) -> Problem {
    Problem {
        refs: true,
        reason,
        message: format!("{field}: {message}"),
    }
}

fn status(kind: &'static str, key: &Key, problems: Vec<Problem>) -> ObjectStatus {
    let more = problems.len().saturating_sub(1);
    let first = problems
        .iter()
        .position(|p| !p.refs)
        .or(if problems.is_empty() { None } else { Some(0) });
    match first {
        None => ObjectStatus {
            kind,
            namespace: key.0.clone(),
            name: key.1.clone(),
            accepted: true,
            reason: "Accepted".to_owned(),
            message: String::new(),
            resolved_refs: true,
        },
        Some(i) => {
            let problem = &problems[i];
            let mut message = problem.message.clone();
            if more > 0 {
                message.push_str(&format!(
                    " (and {more} more problem{})",
                    if more == 1 { "" } else { "s" }
                ));
            }
            ObjectStatus {
                kind,
                namespace: key.0.clone(),
                name: key.1.clone(),
                accepted: false,
                reason: problem.reason.to_owned(),
                message,
                resolved_refs: !problem.refs,
            }
        }
    }
}

/// Deserialises a JSON value into a model type; the error names the field under
/// `at` (e.g. `spec.retry.on[0]: unknown variant ...`).
fn parse_value<T: DeserializeOwned>(value: Value, at: &str) -> Result<T, Problem> {
    serde_path_to_error::deserialize::<_, T>(value).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." {
            at.to_owned()
        } else {
            format!("{at}.{path}")
        };
        invalid("Invalid", field, e.into_inner())
    })
}

/// A spec field this version does not know, left in by local mode (the API
/// server prunes them): refused, so a misspelt section is not silently ignored.
fn unknown_fields(unknown: &BTreeMap<String, Value>, known: &str) -> Vec<Problem> {
    unknown
        .keys()
        .map(|field| {
            invalid(
                "Invalid",
                format!("spec.{field}"),
                format!("unknown field, expected one of {known}"),
            )
        })
        .collect()
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_core_group(group: Option<&str>) -> bool {
    matches!(group, None | Some("") | Some("core"))
}

fn port_number(value: i32) -> Option<NonZeroU16> {
    u16::try_from(value).ok().and_then(NonZeroU16::new)
}

// ---------------------------------------------------------------------------
// Services and endpoints.

struct Port {
    name: Option<String>,
    port: NonZeroU16,
    target_port: Option<IntOrString>,
}

struct ServiceInfo<'a> {
    cluster_ip: Option<IpAddr>,
    /// By port number.
    ports: Vec<Port>,
    slices: Vec<&'a EndpointSlice>,
}

impl ServiceInfo<'_> {
    fn port(&self, number: i32) -> Option<&Port> {
        self.ports
            .iter()
            .find(|p| i32::from(p.port.get()) == number)
    }

    fn port_named(&self, name: &str) -> Option<&Port> {
        self.ports.iter().find(|p| p.name.as_deref() == Some(name))
    }
}

/// A route's kind ([`HTTP_ROUTE`] or [`GRPC_ROUTE`]) and namespace/name.
type RouteKey = (&'static str, Key);

/// An HTTPRoute, or a GRPCRoute in HTTPRoute form ([`grpc_as_http`]).
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
        let mut services = BTreeMap::new();
        for (key, service) in
            oldest_first(&objects.services, |s| &s.metadata, SERVICE, &mut statuses)
        {
            match service_info(&key, service) {
                Ok(Some(info)) => {
                    services.insert(key, info);
                }
                Ok(None) => {}
                Err(problem) => statuses.push(status(SERVICE, &key, vec![problem])),
            }
        }
        for slice in &objects.endpoint_slices {
            let Some(service) = slice
                .metadata
                .labels
                .as_ref()
                .and_then(|labels| labels.get(SERVICE_NAME_LABEL))
            else {
                continue;
            };
            let key = (namespace_of(&slice.metadata), service.clone());
            if let Some(info) = services.get_mut(&key) {
                info.slices.push(slice);
            }
        }
        for info in services.values_mut() {
            info.slices.sort_by_key(|s| s.metadata.name.clone());
        }
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
            let (route, problems) = grpc_as_http(route);
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

/// A Service's ports and address; None for an ExternalName Service.
fn service_info<'a>(key: &Key, service: &KubeService) -> Result<Option<ServiceInfo<'a>>, Problem> {
    if !is_dns_label(&key.1) {
        return Err(invalid(
            "Invalid",
            "metadata.name",
            format!("{:?} is not a DNS label", key.1),
        ));
    }
    if !is_dns_label(&key.0) {
        return Err(invalid(
            "Invalid",
            "metadata.namespace",
            format!("{:?} is not a DNS label", key.0),
        ));
    }
    let Some(spec) = &service.spec else {
        return Ok(Some(ServiceInfo {
            cluster_ip: None,
            ports: Vec::new(),
            slices: Vec::new(),
        }));
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return Ok(None);
    }
    let mut ports: Vec<Port> = Vec::new();
    for (i, port) in spec.ports.iter().flatten().enumerate() {
        let Some(number) = port_number(port.port) else {
            return Err(invalid(
                "Invalid",
                format!("spec.ports[{i}].port"),
                format!("{} is not a port (1 to 65535)", port.port),
            ));
        };
        if ports.iter().any(|p| p.port == number) {
            return Err(invalid(
                "Invalid",
                format!("spec.ports[{i}].port"),
                format!("port {number} is listed twice"),
            ));
        }
        ports.push(Port {
            name: port.name.clone().filter(|n| !n.is_empty()),
            port: number,
            target_port: port.target_port.clone(),
        });
    }
    ports.sort_by_key(|p| p.port);
    Ok(Some(ServiceInfo {
        cluster_ip: spec.cluster_ip.as_deref().and_then(|ip| ip.parse().ok()),
        ports,
        slices: Vec::new(),
    }))
}

/// The port of `slice` that serves the Service port `port`.
fn slice_port(slice: &EndpointSlice, port: &Port) -> Option<NonZeroU16> {
    let ports = slice.ports.as_deref().unwrap_or_default();
    let number = |p: &k8s_openapi::api::discovery::v1::EndpointPort| p.port.and_then(port_number);
    if let Some(name) = &port.name {
        return ports
            .iter()
            .find(|p| p.name.as_deref() == Some(name))
            .and_then(number);
    }
    let target = match &port.target_port {
        None => Some(port.port),
        Some(IntOrString::Int(n)) => port_number(*n),
        Some(IntOrString::String(_)) => None,
    };
    if ports.is_empty() {
        return target;
    }
    let unnamed: Vec<NonZeroU16> = ports
        .iter()
        .filter(|p| p.name.as_deref().unwrap_or("").is_empty())
        .filter_map(number)
        .collect();
    target
        .filter(|t| unnamed.contains(t))
        .or_else(|| unnamed.first().copied())
}

/// The ready endpoints of one Service port, sorted and without duplicates.
fn endpoints(service: &ServiceInfo, port: &Port) -> Vec<model::Endpoint> {
    let mut addresses = BTreeSet::new();
    for slice in &service.slices {
        if slice.address_type == "FQDN" {
            continue;
        }
        let Some(number) = slice_port(slice, port) else {
            continue;
        };
        for endpoint in &slice.endpoints {
            let ready = endpoint
                .conditions
                .as_ref()
                .and_then(|c| c.ready)
                .unwrap_or(true);
            if !ready {
                continue;
            }
            if let Some(ip) = endpoint
                .addresses
                .first()
                .and_then(|a| a.parse::<IpAddr>().ok())
            {
                addresses.insert(SocketAddr::new(ip, number.get()));
            }
        }
    }
    addresses
        .into_iter()
        .map(|address| model::Endpoint { address })
        .collect()
}

// ---------------------------------------------------------------------------
// HTTPRoutes.

/// A rule's own `timeouts`: for each field, None = not set, Some(None) = `0s` (off).
#[derive(Default)]
struct RuleTimeouts {
    request: Option<Option<Duration>>,
    per_try: Option<Option<Duration>>,
}

struct Rule {
    section: String,
    /// Its policy is filled in when the route is placed on a service.
    route: model::Route,
    timeouts: RuleTimeouts,
}

/// An accepted HTTPRoute: the service ports it attaches to and its rules.
struct Attached {
    parents: Vec<(Key, NonZeroU16)>,
    rules: Vec<Rule>,
}

/// The rules of a route; a route without rules has one rule that takes everything.
fn rules_of(route: &HttpRoute) -> Cow<'_, [HttpRouteRules]> {
    match &route.spec.rules {
        Some(rules) if !rules.is_empty() => Cow::Borrowed(rules.as_slice()),
        _ => Cow::Owned(vec![HttpRouteRules::default()]),
    }
}

fn section_of(rule: &HttpRouteRules, index: usize) -> String {
    rule.name.clone().unwrap_or_else(|| index.to_string())
}

/// None when the route has no Service parent (it is not a mesh route).
fn translate_route(
    key: &Key,
    route: &HttpRoute,
    index: &Index,
) -> Option<Result<Attached, Vec<Problem>>> {
    let parent_refs = route.spec.parent_refs.as_deref().unwrap_or_default();
    let service_parents: Vec<(usize, _)> = parent_refs
        .iter()
        .enumerate()
        .filter(|(_, p)| p.kind.as_deref() == Some("Service") && is_core_group(p.group.as_deref()))
        .collect();
    if service_parents.is_empty() {
        return None;
    }
    let mut problems = Vec::new();
    let mut parents: Vec<(Key, NonZeroU16)> = Vec::new();
    for (i, parent) in service_parents {
        let at = |field: &str| format!("spec.parentRefs[{i}].{field}");
        let namespace = parent.namespace.clone().unwrap_or_else(|| key.0.clone());
        if namespace != key.0 {
            problems.push(invalid(
                "UnsupportedValue",
                at("namespace"),
                "a route for a Service in another namespace (a consumer route) is not supported yet",
            ));
            continue;
        }
        let service_key = (namespace, parent.name.clone());
        let Some(service) = index.services.get(&service_key) else {
            problems.push(unresolved(
                "NoMatchingParent",
                at("name"),
                format!("no Service {}/{}", service_key.0, service_key.1),
            ));
            continue;
        };
        let mut ports: Vec<&Port> = service.ports.iter().collect();
        if let Some(number) = parent.port {
            ports.retain(|p| i32::from(p.port.get()) == number);
            if ports.is_empty() {
                problems.push(unresolved(
                    "NoMatchingParent",
                    at("port"),
                    format!(
                        "Service {}/{} has no port {number}",
                        service_key.0, service_key.1
                    ),
                ));
                continue;
            }
        }
        if let Some(section) = &parent.section_name {
            ports.retain(|p| p.name.as_deref() == Some(section.as_str()));
            if ports.is_empty() {
                problems.push(unresolved(
                    "NoMatchingParent",
                    at("sectionName"),
                    format!(
                        "Service {}/{} has no port named {section:?}{}",
                        service_key.0,
                        service_key.1,
                        if parent.port.is_some() {
                            " with that port number"
                        } else {
                            ""
                        }
                    ),
                ));
                continue;
            }
        }
        for port in ports {
            let target = (service_key.clone(), port.port);
            if !parents.contains(&target) {
                parents.push(target);
            }
        }
    }

    let mut rules = Vec::new();
    for (j, rule) in rules_of(route).iter().enumerate() {
        match translate_rule(key, j, rule, index) {
            Ok(rule) => rules.push(rule),
            Err(mut more) => problems.append(&mut more),
        }
    }
    if problems.is_empty() {
        Some(Ok(Attached { parents, rules }))
    } else {
        Some(Err(problems))
    }
}

fn translate_rule(
    key: &Key,
    j: usize,
    rule: &HttpRouteRules,
    index: &Index,
) -> Result<Rule, Vec<Problem>> {
    let at = |field: &str| format!("spec.rules[{j}].{field}");
    let mut problems = Vec::new();
    if rule.filters.as_ref().is_some_and(|f| !f.is_empty()) {
        problems.push(invalid(
            "UnsupportedValue",
            at("filters"),
            "filters are not supported yet",
        ));
    }
    let mut matches = Vec::new();
    for (k, m) in rule.matches.iter().flatten().enumerate() {
        match translate_match(m, &at(&format!("matches[{k}]"))) {
            Ok(m) => matches.push(m),
            Err(problem) => problems.push(problem),
        }
    }
    let mut backends = Vec::new();
    for (b, backend) in rule.backend_refs.iter().flatten().enumerate() {
        match translate_backend(key, backend, &at(&format!("backendRefs[{b}]")), index) {
            Ok(backend) => backends.push(backend),
            Err(problem) => problems.push(problem),
        }
    }
    if problems.is_empty() && !backends.is_empty() && backends.iter().all(|b| b.weight == 0) {
        problems.push(invalid(
            "UnsupportedValue",
            at("backendRefs"),
            "the weights sum to 0: no request could be sent anywhere",
        ));
    }
    let timeouts = match &rule.timeouts {
        None => RuleTimeouts::default(),
        Some(t) => match rule_timeouts(t, &at("timeouts")) {
            Ok(t) => t,
            Err(mut more) => {
                problems.append(&mut more);
                RuleTimeouts::default()
            }
        },
    };
    if !problems.is_empty() {
        return Err(problems);
    }
    let section = section_of(rule, j);
    Ok(Rule {
        route: model::Route {
            name: Some(format!("{}/{section}", key.1)),
            matches,
            backends,
            policy: Policy::default(),
        },
        section,
        timeouts,
    })
}

/// Compiles a regex the way the proxy does: it must match the whole value.
fn check_regex(pattern: &str) -> Result<(), String> {
    regex::Regex::new(&format!("^(?:{pattern})$"))
        .map(|_| ())
        .map_err(|e| format!("invalid regex {pattern:?}: {e}"))
}

/// An HTTP header name (an RFC 9110 token).
fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn translate_match(m: &HttpRouteRulesMatches, at: &str) -> Result<model::RouteMatch, Problem> {
    let path = match &m.path {
        None => None,
        Some(path) => {
            let value = path.value.clone().unwrap_or_else(|| "/".to_owned());
            let kind = match path.r#type {
                Some(HttpRouteRulesMatchesPathType::Exact) => model::PathMatchType::Exact,
                None | Some(HttpRouteRulesMatchesPathType::PathPrefix) => {
                    model::PathMatchType::PathPrefix
                }
                Some(HttpRouteRulesMatchesPathType::RegularExpression) => {
                    model::PathMatchType::RegularExpression
                }
            };
            if kind == model::PathMatchType::RegularExpression {
                check_regex(&value)
                    .map_err(|e| invalid("UnsupportedValue", format!("{at}.path.value"), e))?;
            } else if !value.starts_with('/') {
                return Err(invalid(
                    "UnsupportedValue",
                    format!("{at}.path.value"),
                    format!("{value:?} must start with '/'"),
                ));
            }
            Some(model::PathMatch {
                kind,
                value: model::PathValue(value),
            })
        }
    };
    let method = match &m.method {
        None => None,
        Some(method) => {
            let text = serde_json::to_value(method).unwrap_or(Value::Null);
            Some(parse_value::<model::Method>(text, &format!("{at}.method"))?)
        }
    };
    let mut headers = Vec::new();
    for (l, h) in m.headers.iter().flatten().enumerate() {
        if !is_header_name(&h.name) {
            return Err(invalid(
                "UnsupportedValue",
                format!("{at}.headers[{l}].name"),
                format!("{:?} is not a header name", h.name),
            ));
        }
        let kind = match h.r#type {
            None | Some(HttpRouteRulesMatchesHeadersType::Exact) => model::ValueMatchType::Exact,
            Some(HttpRouteRulesMatchesHeadersType::RegularExpression) => {
                check_regex(&h.value).map_err(|e| {
                    invalid("UnsupportedValue", format!("{at}.headers[{l}].value"), e)
                })?;
                model::ValueMatchType::RegularExpression
            }
        };
        headers.push(model::ValueMatch {
            name: h.name.clone(),
            kind,
            value: Some(h.value.clone()),
        });
    }
    let mut query_params = Vec::new();
    for (l, q) in m.query_params.iter().flatten().enumerate() {
        if q.name.is_empty() {
            return Err(invalid(
                "UnsupportedValue",
                format!("{at}.queryParams[{l}].name"),
                "the name is empty",
            ));
        }
        let kind = match q.r#type {
            None | Some(HttpRouteRulesMatchesQueryParamsType::Exact) => {
                model::ValueMatchType::Exact
            }
            Some(HttpRouteRulesMatchesQueryParamsType::RegularExpression) => {
                check_regex(&q.value).map_err(|e| {
                    invalid(
                        "UnsupportedValue",
                        format!("{at}.queryParams[{l}].value"),
                        e,
                    )
                })?;
                model::ValueMatchType::RegularExpression
            }
        };
        query_params.push(model::ValueMatch {
            name: q.name.clone(),
            kind,
            value: Some(q.value.clone()),
        });
    }
    Ok(model::RouteMatch {
        path,
        method,
        headers,
        query_params,
    })
}

fn translate_backend(
    key: &Key,
    backend: &HttpRouteRulesBackendRefs,
    at: &str,
    index: &Index,
) -> Result<model::BackendRef, Problem> {
    let kind = backend.kind.as_deref().unwrap_or("Service");
    if kind != "Service" || !is_core_group(backend.group.as_deref()) {
        return Err(unresolved(
            "InvalidKind",
            format!("{at}.kind"),
            format!(
                "only Service backends are supported, not {kind} in group {:?}",
                backend.group.as_deref().unwrap_or("")
            ),
        ));
    }
    if backend.filters.as_ref().is_some_and(|f| !f.is_empty()) {
        return Err(invalid(
            "UnsupportedValue",
            format!("{at}.filters"),
            "filters are not supported yet",
        ));
    }
    let Some(port) = backend.port else {
        return Err(invalid(
            "UnsupportedValue",
            format!("{at}.port"),
            "a port is required for a Service backend",
        ));
    };
    let Some(port) = port_number(port) else {
        return Err(invalid(
            "UnsupportedValue",
            format!("{at}.port"),
            format!("{port} is not a port (1 to 65535)"),
        ));
    };
    let weight = backend.weight.unwrap_or(1);
    let Ok(weight) = u32::try_from(weight) else {
        return Err(invalid(
            "UnsupportedValue",
            format!("{at}.weight"),
            format!("{weight} is negative"),
        ));
    };
    let namespace = backend.namespace.clone().unwrap_or_else(|| key.0.clone());
    let Some(service) = index
        .services
        .get(&(namespace.clone(), backend.name.clone()))
    else {
        return Err(unresolved(
            "BackendNotFound",
            format!("{at}.name"),
            format!("no Service {namespace}/{}", backend.name),
        ));
    };
    if service.port(i32::from(port.get())).is_none() {
        return Err(unresolved(
            "BackendNotFound",
            format!("{at}.port"),
            format!("Service {namespace}/{} has no port {port}", backend.name),
        ));
    }
    Ok(model::BackendRef {
        name: backend.name.clone(),
        namespace: (namespace != key.0).then_some(namespace),
        port,
        weight,
    })
}

/// A Gateway API duration; `0s` (any zero) means no timeout.
fn gateway_duration(text: &str) -> Result<Option<Duration>, String> {
    let zero = text.bytes().any(|b| b.is_ascii_digit())
        && text.bytes().all(|b| b == b'0' || b.is_ascii_alphabetic());
    if zero {
        return Ok(None);
    }
    duration::parse(text).map(Some)
}

fn rule_timeouts(t: &HttpRouteRulesTimeouts, at: &str) -> Result<RuleTimeouts, Vec<Problem>> {
    let mut problems = Vec::new();
    let mut field = |value: &Option<String>, name: &str| match value {
        None => None,
        Some(text) => match gateway_duration(text) {
            Ok(d) => Some(d),
            Err(e) => {
                problems.push(invalid("UnsupportedValue", format!("{at}.{name}"), e));
                None
            }
        },
    };
    let timeouts = RuleTimeouts {
        request: field(&t.request, "request"),
        per_try: field(&t.backend_request, "backendRequest"),
    };
    if problems.is_empty() {
        Ok(timeouts)
    } else {
        Err(problems)
    }
}

// ---------------------------------------------------------------------------
// GRPCRoutes.

/// A GRPCRoute in HTTPRoute form, so that it takes the HTTPRoute paths (parents,
/// backends, headers, statuses, policies). The problems are what only a GRPCRoute
/// can get wrong: its method matches, and filters (which the form drops).
fn grpc_as_http(route: &GrpcRoute) -> (HttpRoute, Vec<Problem>) {
    let mut problems = Vec::new();
    let parent_refs = route.spec.parent_refs.as_ref().map(|refs| {
        refs.iter()
            .map(|p| HttpRouteParentRefs {
                group: p.group.clone(),
                kind: p.kind.clone(),
                name: p.name.clone(),
                namespace: p.namespace.clone(),
                port: p.port,
                section_name: p.section_name.clone(),
            })
            .collect()
    });
    let mut rules = Vec::new();
    for (j, rule) in route.spec.rules.iter().flatten().enumerate() {
        let at = |field: &str| format!("spec.rules[{j}].{field}");
        if rule.filters.as_ref().is_some_and(|f| !f.is_empty()) {
            problems.push(invalid(
                "UnsupportedValue",
                at("filters"),
                "filters are not supported yet",
            ));
        }
        let mut matches = Vec::new();
        for (k, m) in rule.matches.iter().flatten().enumerate() {
            let path = match m
                .method
                .as_ref()
                .map(|method| grpc_method_path(method, &at(&format!("matches[{k}].method"))))
            {
                Some(Err(problem)) => {
                    problems.push(problem);
                    None
                }
                Some(Ok(path)) => path,
                None => None,
            };
            let headers = m.headers.as_ref().map(|headers| {
                headers
                    .iter()
                    .map(|h| HttpRouteRulesMatchesHeaders {
                        name: h.name.clone(),
                        value: h.value.clone(),
                        r#type: h.r#type.as_ref().map(|t| match t {
                            GrpcRouteRulesMatchesHeadersType::Exact => {
                                HttpRouteRulesMatchesHeadersType::Exact
                            }
                            GrpcRouteRulesMatchesHeadersType::RegularExpression => {
                                HttpRouteRulesMatchesHeadersType::RegularExpression
                            }
                        }),
                    })
                    .collect()
            });
            matches.push(HttpRouteRulesMatches {
                path,
                headers,
                ..Default::default()
            });
        }
        let mut backend_refs = Vec::new();
        for (b, backend) in rule.backend_refs.iter().flatten().enumerate() {
            if backend.filters.as_ref().is_some_and(|f| !f.is_empty()) {
                problems.push(invalid(
                    "UnsupportedValue",
                    at(&format!("backendRefs[{b}].filters")),
                    "filters are not supported yet",
                ));
            }
            backend_refs.push(HttpRouteRulesBackendRefs {
                filters: None,
                group: backend.group.clone(),
                kind: backend.kind.clone(),
                name: backend.name.clone(),
                namespace: backend.namespace.clone(),
                port: backend.port,
                weight: backend.weight,
            });
        }
        rules.push(HttpRouteRules {
            name: rule.name.clone(),
            matches: rule.matches.as_ref().map(|_| matches),
            backend_refs: rule.backend_refs.as_ref().map(|_| backend_refs),
            ..Default::default()
        });
    }
    let http = HttpRoute {
        metadata: route.metadata.clone(),
        spec: HttpRouteSpec {
            parent_refs,
            rules: route.spec.rules.as_ref().map(|_| rules),
            ..Default::default()
        },
        status: None,
    };
    (http, problems)
}

/// The path match for a gRPC method match (gRPC calls are `POST /<service>/<method>`);
/// None when it names neither service nor method (it matches every call).
fn grpc_method_path(
    m: &GrpcRouteRulesMatchesMethod,
    at: &str,
) -> Result<Option<HttpRouteRulesMatchesPath>, Problem> {
    let service = m.service.as_deref().filter(|s| !s.is_empty());
    let method = m.method.as_deref().filter(|s| !s.is_empty());
    let path = |kind, value: String| {
        Some(HttpRouteRulesMatchesPath {
            r#type: Some(kind),
            value: Some(value),
        })
    };
    let regex = HttpRouteRulesMatchesPathType::RegularExpression;
    if m.r#type == Some(GrpcRouteRulesMatchesMethodType::RegularExpression) {
        for (field, value) in [("service", service), ("method", method)] {
            if let Some(value) = value {
                check_regex(value)
                    .map_err(|e| invalid("UnsupportedValue", format!("{at}.{field}"), e))?;
            }
        }
        if service.is_none() && method.is_none() {
            return Ok(None);
        }
        // Each part in a group of its own, so an alternation stays inside it.
        let part = |p: Option<&str>| p.map_or("[^/]+".to_owned(), |p| format!("(?:{p})"));
        return Ok(path(regex, format!("/{}/{}", part(service), part(method))));
    }
    // Exact: names as gRPC spells them (`pkg.Service`, `Method`).
    for (field, value) in [("service", service), ("method", method)] {
        let name =
            |b: u8| b.is_ascii_alphanumeric() || b == b'_' || (field == "service" && b == b'.');
        if let Some(value) = value.filter(|v| !v.bytes().all(name)) {
            return Err(invalid(
                "UnsupportedValue",
                format!("{at}.{field}"),
                format!("{value:?} is not a gRPC {field} name"),
            ));
        }
    }
    Ok(match (service, method) {
        (Some(s), Some(m)) => path(HttpRouteRulesMatchesPathType::Exact, format!("/{s}/{m}")),
        (Some(s), None) => path(HttpRouteRulesMatchesPathType::PathPrefix, format!("/{s}")),
        (None, Some(m)) => path(regex, format!("/[^/]+/{}", regex::escape(m))),
        (None, None) => None,
    })
}

// ---------------------------------------------------------------------------
// TrafficPolicy.

enum Target {
    /// A Service, or one of its ports.
    Service { service: Key, port: Option<u16> },
    /// An HTTPRoute or GRPCRoute, or one of its rules (by section).
    Route {
        route: RouteKey,
        section: Option<String>,
    },
}

/// Resolves `targetRefs[i]` in the policy's namespace.
fn resolve_target(
    namespace: &str,
    i: usize,
    target: &TargetRef,
    index: &Index,
    routes_allowed: bool,
) -> Result<Target, Problem> {
    let at = |field: &str| format!("spec.targetRefs[{i}].{field}");
    let service = target.kind == "Service" && is_core_group(Some(target.group.as_str()));
    let route_kind = match target.kind.as_str() {
        "HTTPRoute" => Some(HTTP_ROUTE),
        "GRPCRoute" => Some(GRPC_ROUTE),
        _ => None,
    }
    .filter(|_| routes_allowed && target.group == GATEWAY_GROUP);
    if service {
        let key = (namespace.to_owned(), target.name.clone());
        let Some(info) = index.services.get(&key) else {
            return Err(unresolved(
                "TargetNotFound",
                at("name"),
                format!("no Service {namespace}/{}", target.name),
            ));
        };
        let port = match &target.section_name {
            None => None,
            Some(section) => match info.port_named(section) {
                Some(port) => Some(port.port.get()),
                None => {
                    return Err(unresolved(
                        "TargetNotFound",
                        at("sectionName"),
                        format!(
                            "Service {namespace}/{} has no port named {section:?}",
                            target.name
                        ),
                    ))
                }
            },
        };
        Ok(Target::Service { service: key, port })
    } else if let Some(kind) = route_kind {
        let key = (kind, (namespace.to_owned(), target.name.clone()));
        let Some(&found) = index.route_keys.get(&key) else {
            return Err(unresolved(
                "TargetNotFound",
                at("name"),
                format!("no {kind} {namespace}/{}", target.name),
            ));
        };
        if let Some(section) = &target.section_name {
            let exists = rules_of(&index.routes[found].route)
                .iter()
                .enumerate()
                .any(|(j, rule)| section_of(rule, j) == *section);
            if !exists {
                return Err(unresolved(
                    "TargetNotFound",
                    at("sectionName"),
                    format!(
                        "{kind} {namespace}/{} has no rule {section:?} (a rule's name, or its index when unnamed)",
                        target.name
                    ),
                ));
            }
        }
        Ok(Target::Route {
            route: key,
            section: target.section_name.clone(),
        })
    } else {
        Err(invalid(
            "Invalid",
            at("kind"),
            format!(
                "{} in group {:?} cannot be targeted; use a Service (group \"\"){}",
                target.kind,
                target.group,
                if routes_allowed {
                    " or an HTTPRoute or GRPCRoute (group gateway.networking.k8s.io)"
                } else {
                    ""
                }
            ),
        ))
    }
}

const TRAFFIC_POLICY_FIELDS: &str =
    "targetRefs, timeouts, retry, connectionPool, outlierDetection, loadBalancer, rateLimit, fault";

fn translate_traffic_policy(
    key: &Key,
    policy: &TrafficPolicy,
    index: &Index,
) -> Result<(Policy, Vec<Target>), Vec<Problem>> {
    let spec = &policy.spec;
    let mut problems = unknown_fields(&spec.unknown, TRAFFIC_POLICY_FIELDS);
    let mut sections = serde_json::Map::new();
    for (name, value) in [
        ("timeouts", &spec.timeouts),
        ("retry", &spec.retry),
        ("connectionPool", &spec.connection_pool),
        ("outlierDetection", &spec.outlier_detection),
        ("loadBalancer", &spec.load_balancer),
        ("rateLimit", &spec.rate_limit),
        ("fault", &spec.fault),
    ] {
        if let Some(value) = value.as_ref().filter(|v| !v.is_null()) {
            sections.insert(name.to_owned(), value.clone());
        }
    }
    let parsed = parse_value::<Policy>(Value::Object(sections), "spec");
    let parsed = match parsed {
        Ok(p) => Some(p),
        Err(problem) => {
            problems.push(problem);
            None
        }
    };
    if spec.target_refs.is_empty() {
        problems.push(invalid(
            "Invalid",
            "spec.targetRefs",
            "at least one targetRef is required",
        ));
    }
    let mut targets = Vec::new();
    for (i, target) in spec.target_refs.iter().enumerate() {
        match resolve_target(&key.0, i, target, index, true) {
            Ok(t) => targets.push(t),
            Err(problem) => problems.push(problem),
        }
    }
    match parsed {
        Some(policy) if problems.is_empty() => Ok((policy, targets)),
        _ => Err(problems),
    }
}

/// Accepted TrafficPolicies by target, each list oldest first.
#[derive(Default)]
struct Attachments {
    service: BTreeMap<Key, Vec<Policy>>,
    port: BTreeMap<(Key, u16), Vec<Policy>>,
    route: BTreeMap<RouteKey, Vec<Policy>>,
    rule: BTreeMap<(RouteKey, String), Vec<Policy>>,
}

/// Policies on one target, oldest first, merged so the oldest wins each section.
fn combine(policies: Option<&Vec<Policy>>) -> Policy {
    policies
        .into_iter()
        .flatten()
        .fold(Policy::default(), |older, newer| {
            newer.overridden_by(&older)
        })
}

impl Attachments {
    fn add(&mut self, policy: Policy, targets: Vec<Target>) {
        for target in targets {
            let list = match target {
                Target::Service {
                    service,
                    port: None,
                } => self.service.entry(service).or_default(),
                Target::Service {
                    service,
                    port: Some(port),
                } => self.port.entry((service, port)).or_default(),
                Target::Route {
                    route,
                    section: None,
                } => self.route.entry(route).or_default(),
                Target::Route {
                    route,
                    section: Some(section),
                } => self.rule.entry((route, section)).or_default(),
            };
            list.push(policy.clone());
        }
    }

    fn service_policy(&self, service: &Key, port: u16) -> Policy {
        combine(self.service.get(service))
            .overridden_by(&combine(self.port.get(&(service.clone(), port))))
    }

    /// What a route carries: its HTTPRoute's and rule's policies, and the rule's
    /// own timeouts over the effective ones, field by field.
    fn route_policy(&self, route: &RouteKey, rule: &Rule, service_policy: &Policy) -> Policy {
        let mut policy = combine(self.route.get(route)).overridden_by(&combine(
            self.rule.get(&(route.clone(), rule.section.clone())),
        ));
        let own = &rule.timeouts;
        if own.request.is_some() || own.per_try.is_some() {
            let mut timeouts: Timeouts = policy
                .timeouts
                .clone()
                .or_else(|| service_policy.timeouts.clone())
                .unwrap_or_default();
            if let Some(request) = own.request {
                timeouts.request = request;
            }
            if let Some(per_try) = own.per_try {
                timeouts.per_try = per_try;
            }
            policy.timeouts = Some(timeouts);
        }
        policy
    }
}

// ---------------------------------------------------------------------------
// ServerPolicy.

/// An accepted ServerPolicy's rate limit on some ports of one Service.
struct InboundRule {
    service: Key,
    /// Service ports.
    ports: Vec<NonZeroU16>,
    rate_limit: RateLimit,
}

const SERVER_POLICY_FIELDS: &str = "targetRefs, ports, mtls, rateLimit, authorization";

/// Every ServerPolicy's status, and the rate limits of the accepted ones in
/// precedence order (port-specific first, then oldest).
fn server_policies(objects: &Objects, index: &Index) -> (Vec<InboundRule>, Vec<ObjectStatus>) {
    let mut statuses = Vec::new();
    let mut specific = Vec::new();
    let mut general = Vec::new();
    for (key, policy) in oldest_first(
        &objects.server_policies,
        |p| &p.metadata,
        SERVER_POLICY,
        &mut statuses,
    ) {
        match translate_server_policy(&key, policy, index) {
            Ok((rules, is_specific)) => {
                statuses.push(status(SERVER_POLICY, &key, Vec::new()));
                if is_specific {
                    specific.extend(rules);
                } else {
                    general.extend(rules);
                }
            }
            Err(problems) => statuses.push(status(SERVER_POLICY, &key, problems)),
        }
    }
    specific.append(&mut general);
    (specific, statuses)
}

/// The policy's inbound rules and whether it names its ports.
fn translate_server_policy(
    key: &Key,
    policy: &ServerPolicy,
    index: &Index,
) -> Result<(Vec<InboundRule>, bool), Vec<Problem>> {
    let spec = &policy.spec;
    let mut problems = unknown_fields(&spec.unknown, SERVER_POLICY_FIELDS);
    let mut listed = Vec::new();
    for (i, port) in spec.ports.iter().flatten().enumerate() {
        match port_number(*port) {
            Some(p) => listed.push((i, p)),
            None => problems.push(invalid(
                "Invalid",
                format!("spec.ports[{i}]"),
                format!("{port} is not a port (1 to 65535)"),
            )),
        }
    }
    if let Some(mtls) = spec.mtls.clone().filter(|v| !v.is_null()) {
        if let Err(problem) = parse_value::<MtlsMode>(mtls, "spec.mtls") {
            problems.push(problem);
        }
    }
    let rate_limit = match spec.rate_limit.clone().filter(|v| !v.is_null()) {
        None => None,
        Some(value) => match parse_value::<RateLimit>(value, "spec.rateLimit") {
            Ok(r) => Some(r),
            Err(problem) => {
                problems.push(problem);
                None
            }
        },
    };
    if let Some(value) = spec.authorization.clone().filter(|v| !v.is_null()) {
        match parse_value::<Authorization>(value, "spec.authorization") {
            Ok(authorization) => problems.extend(check_authorization(&authorization)),
            Err(problem) => problems.push(problem),
        }
    }
    if spec.target_refs.is_empty() {
        problems.push(invalid(
            "Invalid",
            "spec.targetRefs",
            "at least one targetRef is required",
        ));
    }
    let mut targets = Vec::new();
    for (i, target) in spec.target_refs.iter().enumerate() {
        match resolve_target(&key.0, i, target, index, false) {
            Ok(Target::Service { service, port }) => targets.push((service, port)),
            Ok(Target::Route { .. }) => {}
            Err(problem) => problems.push(problem),
        }
    }
    let mut rules = Vec::new();
    if problems.is_empty() {
        for (i, port) in &listed {
            let covered = targets.iter().any(|(service, section)| {
                index.services.get(service).is_some_and(|info| {
                    info.port(i32::from(port.get())).is_some()
                        && section.is_none_or(|s| s == port.get())
                })
            });
            if !covered {
                problems.push(unresolved(
                    "TargetNotFound",
                    format!("spec.ports[{i}]"),
                    format!("no targeted Service has port {port}"),
                ));
            }
        }
        for (service, section) in &targets {
            let Some(info) = index.services.get(service) else {
                continue;
            };
            let ports: Vec<NonZeroU16> = info
                .ports
                .iter()
                .map(|p| p.port)
                .filter(|p| section.is_none_or(|s| s == p.get()))
                .filter(|p| spec.ports.is_none() || listed.iter().any(|(_, l)| l == p))
                .collect();
            if let Some(rate_limit) = &rate_limit {
                rules.push(InboundRule {
                    service: service.clone(),
                    ports,
                    rate_limit: rate_limit.clone(),
                });
            }
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    let specific =
        spec.ports.is_some() || spec.target_refs.iter().any(|t| t.section_name.is_some());
    Ok((rules, specific))
}

/// What serde cannot check in an authorization: the forms of its strings.
fn check_authorization(authorization: &Authorization) -> Vec<Problem> {
    let mut problems = Vec::new();
    for (r, rule) in authorization.rules.iter().enumerate() {
        let at = format!("spec.authorization.rules[{r}]");
        for (f, from) in rule.from.iter().enumerate() {
            for (s, account) in from.service_accounts.iter().enumerate() {
                let ok = account.split_once('/').is_some_and(|(ns, name)| {
                    is_dns_label(ns) && !name.is_empty() && !name.contains('/')
                });
                if !ok {
                    problems.push(invalid(
                        "Invalid",
                        format!("{at}.from[{f}].serviceAccounts[{s}]"),
                        format!("{account:?} is not namespace/name"),
                    ));
                }
            }
        }
        for (t, to) in rule.to.iter().enumerate() {
            for (m, method) in to.methods.iter().enumerate() {
                if let Err(problem) = parse_value::<model::Method>(
                    Value::String(method.clone()),
                    &format!("{at}.to[{t}].methods[{m}]"),
                ) {
                    problems.push(problem);
                }
            }
            for (p, path) in to.paths.iter().enumerate() {
                if !path.starts_with('/') && path != "*" {
                    problems.push(invalid(
                        "Invalid",
                        format!("{at}.to[{t}].paths[{p}]"),
                        format!("{path:?} must start with '/'"),
                    ));
                }
            }
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use trellis_proto::model::resources;

    /// Objects from YAML documents, as an operator writes them.
    fn objects(yaml: &str) -> Objects {
        let mut objects = Objects::default();
        for document in serde_yaml_ng::Deserializer::from_str(yaml) {
            let value = serde_yaml_ng::Value::deserialize(document).unwrap();
            if value.is_null() {
                continue;
            }
            let kind = value["kind"].as_str().unwrap().to_owned();
            use serde_yaml_ng::from_value as parse;
            match kind.as_str() {
                "Service" => objects.services.push(parse(value).unwrap()),
                "EndpointSlice" => objects.endpoint_slices.push(parse(value).unwrap()),
                "Pod" => objects.pods.push(parse(value).unwrap()),
                "HTTPRoute" => objects.http_routes.push(parse(value).unwrap()),
                "GRPCRoute" => objects.grpc_routes.push(parse(value).unwrap()),
                "TrafficPolicy" => objects.traffic_policies.push(parse(value).unwrap()),
                "ServerPolicy" => objects.server_policies.push(parse(value).unwrap()),
                other => panic!("unexpected kind {other}"),
            }
        }
        objects
    }

    /// What every translated config and view must be: valid, and the same after
    /// the trip through the discovery API's resources.
    fn assert_valid(config: &Config) {
        config.validate().unwrap();
        let back = resources::from_resources(&resources::to_resources(config)).unwrap();
        assert_eq!(back.services.len(), config.services.len());
        for service in &config.services {
            assert!(back.services.contains(service), "{service:?}");
        }
        assert_eq!(back.inbound, config.inbound);
    }

    fn translated(yaml: &str) -> Translation {
        let translation = translate(&objects(yaml));
        assert_valid(&translation.mesh);
        translation
    }

    fn service<'a>(config: &'a Config, namespace: &str, name: &str) -> &'a model::Service {
        config
            .services
            .iter()
            .find(|s| s.namespace == namespace && s.name == name)
            .unwrap_or_else(|| panic!("no service {namespace}/{name} in {config:#?}"))
    }

    fn addresses(service: &model::Service) -> Vec<String> {
        service
            .endpoints
            .iter()
            .map(|e| e.address.to_string())
            .collect()
    }

    /// Three Services in `shop` (one per version of reviews, each pod listening on
    /// 9080) and one in `web`, with their EndpointSlices.
    const SHOP: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: shop}
spec:
  clusterIP: 198.19.0.10
  selector: {app: reviews}
  ports: [{name: http, port: 8080, targetPort: 9080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: reviews-x7k2p
  namespace: shop
  labels: {kubernetes.io/service-name: reviews}
addressType: IPv4
ports: [{name: http, port: 9080, protocol: TCP}]
endpoints:
  - addresses: [198.18.0.2]
    conditions: {ready: true}
    targetRef: {kind: Pod, name: reviews-v1-0, namespace: shop}
  - addresses: [198.18.0.3]
    targetRef: {kind: Pod, name: reviews-v2-0, namespace: shop}
  - addresses: [198.18.0.4]
    conditions: {ready: false}
    targetRef: {kind: Pod, name: reviews-v2-1, namespace: shop}
---
apiVersion: v1
kind: Service
metadata: {name: reviews-v1, namespace: shop}
spec:
  clusterIP: 198.19.0.11
  ports: [{port: 8080, targetPort: 9080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: reviews-v1-abcde
  namespace: shop
  labels: {kubernetes.io/service-name: reviews-v1}
addressType: IPv4
ports: [{port: 9080}]
endpoints:
  - addresses: [198.18.0.2]
---
apiVersion: v1
kind: Service
metadata: {name: reviews-v2, namespace: shop}
spec:
  clusterIP: 198.19.0.12
  ports: [{port: 8080, targetPort: 9080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: reviews-v2-fghij
  namespace: shop
  labels: {kubernetes.io/service-name: reviews-v2}
addressType: IPv4
endpoints:
  - addresses: [198.18.0.3]
  - addresses: [198.18.0.4]
    conditions: {ready: false}
---
apiVersion: v1
kind: Service
metadata: {name: productpage, namespace: web}
spec:
  clusterIP: 198.19.1.10
  ports: [{name: http, port: 9080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: productpage-00001
  namespace: web
  labels: {kubernetes.io/service-name: productpage}
addressType: IPv4
ports: [{name: http, port: 9080}]
endpoints:
  - addresses: [198.18.1.2]
    targetRef: {kind: Pod, name: productpage-0, namespace: web}
"#;

    /// The canary of API.md: a header match in front of a 90/10 split.
    const CANARY: &str = r#"
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews, namespace: shop, creationTimestamp: "2025-01-02T00:00:00Z"}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews, port: 8080}]
  rules:
    - matches: [{headers: [{name: x-canary, value: "true"}]}]
      backendRefs: [{name: reviews-v2, port: 8080}]
    - backendRefs:
        - {name: reviews-v1, port: 8080, weight: 90}
        - {name: reviews-v2, port: 8080, weight: 10}
"#;

    #[test]
    fn services_and_endpoint_slices_become_model_services_with_ready_endpoints() {
        let t = translated(SHOP);
        let names: Vec<String> = t.mesh.services.iter().map(|s| s.authority()).collect();
        assert_eq!(
            names,
            [
                "reviews.shop:8080",
                "reviews-v1.shop:8080",
                "reviews-v2.shop:8080",
                "productpage.web:9080"
            ]
        );
        let reviews = service(&t.mesh, "shop", "reviews");
        assert_eq!(reviews.cluster_ip, Some("198.19.0.10".parse().unwrap()));
        // The named slice port behind the Service port; not-ready 198.18.0.4 is left out.
        assert_eq!(addresses(reviews), ["198.18.0.2:9080", "198.18.0.3:9080"]);
        assert!(reviews.routes.is_empty());
        assert_eq!(reviews.policy, Policy::default());
        // An unnamed Service port takes the slice's unnamed port ...
        let v1 = service(&t.mesh, "shop", "reviews-v1");
        assert_eq!(addresses(v1), ["198.18.0.2:9080"]);
        // ... and a slice listing no ports serves the targetPort.
        let v2 = service(&t.mesh, "shop", "reviews-v2");
        assert_eq!(addresses(v2), ["198.18.0.3:9080"]);
        assert_eq!(v2.cluster_ip, Some("198.19.0.12".parse().unwrap()));
        assert!(t.statuses.is_empty(), "{:?}", t.statuses);
    }

    #[test]
    fn canary_by_weight_and_header_becomes_weighted_routes() {
        let t = translated(&format!(
            "{SHOP}{CANARY}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: reviews-admin, namespace: shop, creationTimestamp: \"2025-01-01T00:00:00Z\"}}
spec:
  parentRefs: [{{kind: Service, name: reviews}}]
  rules:
    - name: admin
      matches: [{{path: {{type: Exact, value: /admin}}, method: POST, queryParams: [{{name: debug, value: \"1\"}}]}}]
      timeouts: {{request: 10s, backendRequest: 2s}}
"
        ));
        assert!(
            t.statuses.iter().all(|s| s.accepted && s.resolved_refs),
            "{:?}",
            t.statuses
        );
        assert_eq!(t.statuses.len(), 2);
        let reviews = service(&t.mesh, "shop", "reviews");
        let names: Vec<&str> = reviews
            .routes
            .iter()
            .map(|r| r.name.as_deref().unwrap())
            .collect();
        // The older HTTPRoute's rules come first; rules are named <route>/<section>.
        assert_eq!(names, ["reviews-admin/admin", "reviews/0", "reviews/1"]);

        let admin = &reviews.routes[0];
        let m = &admin.matches[0];
        assert_eq!(m.path.as_ref().unwrap().kind, model::PathMatchType::Exact);
        assert_eq!(m.path.as_ref().unwrap().value.0, "/admin");
        assert_eq!(m.method.as_ref().unwrap().0, "POST");
        assert_eq!(m.query_params[0].name, "debug");
        assert!(
            admin.backends.is_empty(),
            "no backendRefs: the service's own endpoints"
        );
        let timeouts = admin.policy.timeouts.as_ref().unwrap();
        assert_eq!(timeouts.request, Some(Duration::from_secs(10)));
        assert_eq!(timeouts.per_try, Some(Duration::from_secs(2)));

        let header = &reviews.routes[1];
        assert_eq!(header.matches[0].headers[0].name, "x-canary");
        assert_eq!(
            header.matches[0].headers[0].kind,
            model::ValueMatchType::Exact
        );
        assert_eq!(header.matches[0].headers[0].value.as_deref(), Some("true"));
        assert_eq!(header.backends.len(), 1);
        assert_eq!(header.backends[0].name, "reviews-v2");
        assert_eq!(header.backends[0].weight, 1);

        let split = &reviews.routes[2];
        assert!(split.matches.is_empty());
        let weights: Vec<(&str, u32)> = split
            .backends
            .iter()
            .map(|b| (b.name.as_str(), b.weight))
            .collect();
        assert_eq!(weights, [("reviews-v1", 90), ("reviews-v2", 10)]);
        assert!(split
            .backends
            .iter()
            .all(|b| b.namespace.is_none() && b.port.get() == 8080));
        assert_eq!(split.policy, Policy::default());
    }

    const POLICIES: &str = r#"
---
apiVersion: policy.trellis.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: on-service, namespace: shop, creationTimestamp: "2025-01-01T00:00:00Z"}
spec:
  targetRefs: [{group: "", kind: Service, name: reviews}]
  timeouts: {request: 10s}
  retry: {attempts: 1}
  connectionPool: {maxConnections: 10}
---
apiVersion: policy.trellis.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: on-service-newer, namespace: shop, creationTimestamp: "2025-01-05T00:00:00Z"}
spec:
  targetRefs: [{group: "", kind: Service, name: reviews}]
  retry: {attempts: 5}
  fault: {abort: {httpStatus: 503, percent: 5}}
---
apiVersion: policy.trellis.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: on-route, namespace: shop, creationTimestamp: "2025-01-03T00:00:00Z"}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: HTTPRoute, name: reviews}]
  timeouts: {request: 3s}
  retry: {attempts: 2, on: [gateway-error]}
---
apiVersion: policy.trellis.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: on-rule, namespace: shop, creationTimestamp: "2025-01-04T00:00:00Z"}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: HTTPRoute, name: reviews, sectionName: "1"}]
  retry: {attempts: 3}
"#;

    #[test]
    fn narrower_targets_win_section_by_section_and_the_oldest_wins_on_one_target() {
        let t = translated(&format!("{SHOP}{CANARY}{POLICIES}"));
        assert!(t.statuses.iter().all(|s| s.accepted), "{:?}", t.statuses);
        let reviews = service(&t.mesh, "shop", "reviews");

        // On the Service: the older policy's retry wins; the newer one fills in fault.
        let policy = &reviews.policy;
        assert_eq!(policy.retry.as_ref().unwrap().attempts, 1);
        assert_eq!(
            policy.timeouts.as_ref().unwrap().request,
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            policy.connection_pool.as_ref().unwrap().max_connections.0,
            10
        );
        assert_eq!(
            policy
                .fault
                .as_ref()
                .unwrap()
                .abort
                .as_ref()
                .unwrap()
                .percent
                .0,
            5.0
        );

        // On the HTTPRoute: every route made from it.
        let whole = &reviews.routes[0].policy;
        assert_eq!(whole.retry.as_ref().unwrap().attempts, 2);
        assert_eq!(
            whole.timeouts.as_ref().unwrap().request,
            Some(Duration::from_secs(3))
        );
        assert!(
            whole.connection_pool.is_none(),
            "the proxy takes it from the service"
        );

        // On rule 1 (sectionName "1"): its retry over the route's, the route's timeouts kept.
        let rule = &reviews.routes[1].policy;
        assert_eq!(rule.retry.as_ref().unwrap().attempts, 3);
        assert_eq!(rule.retry.as_ref().unwrap().on, default_retry_on());
        assert_eq!(
            rule.timeouts.as_ref().unwrap().request,
            Some(Duration::from_secs(3))
        );

        // What the proxy applies on rule 1: the service's policy under the route's.
        let effective = policy.overridden_by(rule);
        assert_eq!(effective.retry.as_ref().unwrap().attempts, 3);
        assert_eq!(
            effective
                .connection_pool
                .as_ref()
                .unwrap()
                .max_connections
                .0,
            10
        );
        assert!(effective.fault.is_some());

        // Backends' own services are untouched.
        assert_eq!(
            service(&t.mesh, "shop", "reviews-v1").policy,
            Policy::default()
        );
    }

    fn default_retry_on() -> Vec<trellis_proto::model::policy::RetryOn> {
        let retry: trellis_proto::model::policy::Retry = serde_json::from_str("{}").unwrap();
        retry.on
    }

    #[test]
    fn an_invalid_traffic_policy_is_refused_naming_the_field_and_changes_nothing_else() {
        let good = translated(&format!("{SHOP}{CANARY}{POLICIES}"));
        let t = translated(&format!(
            "{SHOP}{CANARY}{POLICIES}
---
apiVersion: policy.trellis.dev/v1alpha1
kind: TrafficPolicy
metadata: {{name: bad, namespace: shop}}
spec:
  targetRefs: [{{group: \"\", kind: Service, name: reviews}}]
  retry:
    attempts: 9
    on: [sometimes]
"
        ));
        let bad = t.status(TRAFFIC_POLICY, "shop", "bad").unwrap();
        assert!(!bad.accepted);
        assert!(bad.resolved_refs);
        assert_eq!(bad.reason, "Invalid");
        assert!(
            bad.message
                .starts_with("spec.retry.on[0]: unknown variant `sometimes`"),
            "{}",
            bad.message
        );
        // Without creationTimestamp it would be the oldest; it still changes nothing.
        assert_eq!(t.mesh, good.mesh);
        let others: Vec<&ObjectStatus> = t.statuses.iter().filter(|s| s.name != "bad").collect();
        assert_eq!(others.len(), good.statuses.len());
        assert!(others.iter().all(|s| s.accepted));
    }

    #[test]
    fn unknown_fields_and_targets_to_nothing_are_refused() {
        let t = translated(&format!(
            "{SHOP}{CANARY}
---
apiVersion: policy.trellis.dev/v1alpha1
kind: TrafficPolicy
metadata: {{name: typo, namespace: shop}}
spec:
  targetRefs: [{{group: \"\", kind: Service, name: reviews}}]
  retries: {{attempts: 3}}
---
apiVersion: policy.trellis.dev/v1alpha1
kind: TrafficPolicy
metadata: {{name: ghost, namespace: shop}}
spec:
  targetRefs: [{{group: \"\", kind: Service, name: ghost}}]
  retry: {{attempts: 3}}
---
apiVersion: policy.trellis.dev/v1alpha1
kind: TrafficPolicy
metadata: {{name: no-rule, namespace: shop}}
spec:
  targetRefs: [{{group: gateway.networking.k8s.io, kind: HTTPRoute, name: reviews, sectionName: \"7\"}}]
  retry: {{attempts: 3}}
---
apiVersion: policy.trellis.dev/v1alpha1
kind: TrafficPolicy
metadata: {{name: deployment, namespace: shop}}
spec:
  targetRefs: [{{group: apps, kind: Deployment, name: reviews}}]
"
        ));
        let typo = t.status(TRAFFIC_POLICY, "shop", "typo").unwrap();
        assert!(!typo.accepted);
        assert!(
            typo.message.starts_with("spec.retries: unknown field"),
            "{}",
            typo.message
        );

        let ghost = t.status(TRAFFIC_POLICY, "shop", "ghost").unwrap();
        assert!(!ghost.accepted && !ghost.resolved_refs);
        assert_eq!(ghost.reason, "TargetNotFound");
        assert_eq!(
            ghost.message,
            "spec.targetRefs[0].name: no Service shop/ghost"
        );

        let no_rule = t.status(TRAFFIC_POLICY, "shop", "no-rule").unwrap();
        assert_eq!(no_rule.reason, "TargetNotFound");
        assert!(
            no_rule
                .message
                .starts_with("spec.targetRefs[0].sectionName: "),
            "{}",
            no_rule.message
        );

        let deployment = t.status(TRAFFIC_POLICY, "shop", "deployment").unwrap();
        assert_eq!(deployment.reason, "Invalid");
        assert!(
            deployment.message.starts_with("spec.targetRefs[0].kind: "),
            "{}",
            deployment.message
        );

        assert_eq!(t.mesh, translated(&format!("{SHOP}{CANARY}")).mesh);
    }

    #[test]
    fn a_backend_ref_to_a_missing_service_is_unresolved_and_left_out() {
        let good = translated(&format!("{SHOP}{CANARY}"));
        let t = translated(&format!(
            "{SHOP}{CANARY}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: ghost, namespace: shop}}
spec:
  parentRefs: [{{group: \"\", kind: Service, name: reviews}}]
  rules:
    - matches: [{{path: {{value: /ghost}}}}]
      backendRefs: [{{name: reviews-v3, port: 8080}}]
"
        ));
        let ghost = t.status(HTTP_ROUTE, "shop", "ghost").unwrap();
        assert!(!ghost.resolved_refs);
        assert!(!ghost.accepted, "not in effect");
        assert_eq!(ghost.reason, "BackendNotFound");
        assert_eq!(
            ghost.message,
            "spec.rules[0].backendRefs[0].name: no Service shop/reviews-v3"
        );
        assert_eq!(t.mesh, good.mesh);
        assert!(t.status(HTTP_ROUTE, "shop", "reviews").unwrap().accepted);

        let conditions = ghost.conditions(Some(3), &Time(Default::default()));
        let summary: Vec<(&str, &str, &str)> = conditions
            .iter()
            .map(|c| (c.type_.as_str(), c.status.as_str(), c.reason.as_str()))
            .collect();
        assert_eq!(
            summary,
            [
                ("Accepted", "False", "BackendNotFound"),
                ("ResolvedRefs", "False", "BackendNotFound")
            ]
        );
        assert_eq!(conditions[0].observed_generation, Some(3));
    }

    #[test]
    fn an_invalid_match_is_refused_naming_the_field() {
        let t = translated(&format!(
            "{SHOP}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: reviews, namespace: shop}}
spec:
  parentRefs: [{{kind: Service, name: reviews}}]
  rules:
    - backendRefs: [{{name: reviews-v1, port: 8080}}]
    - matches: [{{path: {{type: RegularExpression, value: \"/api/(\"}}}}]
      backendRefs: [{{name: reviews-v2, port: 8080}}]
"
        ));
        let status = t.status(HTTP_ROUTE, "shop", "reviews").unwrap();
        assert!(!status.accepted && status.resolved_refs);
        assert_eq!(status.reason, "UnsupportedValue");
        assert!(
            status
                .message
                .starts_with("spec.rules[1].matches[0].path.value: invalid regex \"/api/(\""),
            "{}",
            status.message
        );
        assert!(service(&t.mesh, "shop", "reviews").routes.is_empty());
    }

    /// A GRPCRoute older than CANARY's HTTPRoute, on the same Service.
    const GRPC: &str = r#"
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: reviews-grpc, namespace: shop, creationTimestamp: "2025-01-01T00:00:00Z"}
spec:
  parentRefs: [{kind: Service, name: reviews, port: 8080}]
  rules:
    - name: get
      matches:
        - method: {service: shop.v1.Reviews, method: Get}
          headers: [{name: x-canary, value: "true"}]
      backendRefs:
        - {name: reviews-v1, port: 8080, weight: 80}
        - {name: reviews-v2, port: 8080, weight: 20}
    - matches: [{method: {service: shop.v1.Reviews}}]
      backendRefs: [{name: reviews-v1, port: 8080}]
    - matches:
        - method: {method: Watch}
        - method: {type: RegularExpression, service: "shop\\.v[12]\\.Reviews", method: "List|Scan"}
        - headers: [{name: x-debug, type: RegularExpression, value: "1|yes"}]
"#;

    #[test]
    fn grpc_routes_become_path_matches_among_http_routes() {
        let t = translated(&format!(
            "{SHOP}{CANARY}{GRPC}
---
apiVersion: policy.trellis.dev/v1alpha1
kind: TrafficPolicy
metadata: {{name: on-grpc-rule, namespace: shop}}
spec:
  targetRefs: [{{group: gateway.networking.k8s.io, kind: GRPCRoute, name: reviews-grpc, sectionName: get}}]
  retry: {{attempts: 4}}
"
        ));
        assert!(
            t.statuses.iter().all(|s| s.accepted && s.resolved_refs),
            "{:?}",
            t.statuses
        );
        let status = t.status(GRPC_ROUTE, "shop", "reviews-grpc").unwrap();
        assert_eq!(status.kind, "GRPCRoute");
        let reviews = service(&t.mesh, "shop", "reviews");
        let names: Vec<&str> = reviews
            .routes
            .iter()
            .map(|r| r.name.as_deref().unwrap())
            .collect();
        // The GRPCRoute is older than the HTTPRoute: its rules come first.
        assert_eq!(
            names,
            [
                "reviews-grpc/get",
                "reviews-grpc/1",
                "reviews-grpc/2",
                "reviews/0",
                "reviews/1"
            ]
        );
        let path = |r: &model::Route, i: usize| {
            let p = r.matches[i].path.as_ref().unwrap();
            (p.kind, p.value.0.clone())
        };

        let get = &reviews.routes[0];
        assert_eq!(
            path(get, 0),
            (
                model::PathMatchType::Exact,
                "/shop.v1.Reviews/Get".to_owned()
            )
        );
        assert!(get.matches[0].method.is_none());
        assert_eq!(get.matches[0].headers[0].name, "x-canary");
        assert_eq!(get.matches[0].headers[0].kind, model::ValueMatchType::Exact);
        assert_eq!(get.matches[0].headers[0].value.as_deref(), Some("true"));
        let weights: Vec<(&str, u32)> = get
            .backends
            .iter()
            .map(|b| (b.name.as_str(), b.weight))
            .collect();
        assert_eq!(weights, [("reviews-v1", 80), ("reviews-v2", 20)]);
        assert_eq!(get.policy.retry.as_ref().unwrap().attempts, 4);

        let service_only = &reviews.routes[1];
        assert_eq!(
            path(service_only, 0),
            (
                model::PathMatchType::PathPrefix,
                "/shop.v1.Reviews".to_owned()
            )
        );
        assert_eq!(service_only.policy, Policy::default());

        let others = &reviews.routes[2];
        assert_eq!(
            path(others, 0),
            (
                model::PathMatchType::RegularExpression,
                "/[^/]+/Watch".to_owned()
            )
        );
        assert_eq!(
            path(others, 1),
            (
                model::PathMatchType::RegularExpression,
                "/(?:shop\\.v[12]\\.Reviews)/(?:List|Scan)".to_owned()
            )
        );
        assert!(others.matches[2].path.is_none());
        assert_eq!(
            others.matches[2].headers[0].kind,
            model::ValueMatchType::RegularExpression
        );
        assert!(others.backends.is_empty());
    }

    #[test]
    fn an_invalid_grpc_route_is_refused_naming_the_field_and_changes_nothing_else() {
        let without = translated(&format!("{SHOP}{CANARY}"));
        let t = translated(&format!(
            "{SHOP}{CANARY}
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {{name: reviews, namespace: shop}}
spec:
  parentRefs: [{{kind: Service, name: reviews}}]
  rules:
    - matches: [{{method: {{type: RegularExpression, service: \"shop.(\", method: Get}}}}]
      backendRefs: [{{name: reviews-v1, port: 8080}}]
    - backendRefs: [{{name: nowhere, port: 8080}}]
"
        ));
        let status = t.status(GRPC_ROUTE, "shop", "reviews").unwrap();
        assert!(!status.accepted && status.resolved_refs);
        assert_eq!(status.reason, "UnsupportedValue");
        assert!(
            status
                .message
                .starts_with("spec.rules[0].matches[0].method.service: invalid regex \"shop.(\"")
                && status.message.ends_with("(and 1 more problem)"),
            "{}",
            status.message
        );
        // The HTTPRoute of the same name is another object, still in effect.
        assert!(t.status(HTTP_ROUTE, "shop", "reviews").unwrap().accepted);
        assert_eq!(t.mesh, without.mesh);

        let t = translated(&format!(
            "{SHOP}
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {{name: reviews, namespace: shop}}
spec:
  parentRefs: [{{kind: Service, name: reviews}}]
  rules: [{{backendRefs: [{{name: nowhere, port: 8080}}]}}]
"
        ));
        let status = t.status(GRPC_ROUTE, "shop", "reviews").unwrap();
        assert!(!status.accepted && !status.resolved_refs);
        assert!(
            status
                .message
                .starts_with("spec.rules[0].backendRefs[0].name: no Service shop/nowhere"),
            "{}",
            status.message
        );
        assert!(service(&t.mesh, "shop", "reviews").routes.is_empty());
    }

    const SERVER_POLICY_YAML: &str = r#"
---
apiVersion: policy.trellis.dev/v1alpha1
kind: ServerPolicy
metadata: {name: reviews, namespace: shop}
spec:
  targetRefs: [{group: "", kind: Service, name: reviews}]
  ports: [8080]
  mtls: STRICT
  rateLimit: {maxTokens: 1000, tokensPerFill: 1000, fillInterval: 1s}
  authorization:
    action: ALLOW
    rules:
      - from: [{serviceAccounts: [shop/frontend]}, {namespaces: [ops]}]
        to: [{methods: [GET], paths: [/api/*]}]
"#;

    #[test]
    fn server_policy_rate_limit_is_inbound_only_for_pods_that_back_the_service() {
        let objects = objects(&format!("{SHOP}{CANARY}{SERVER_POLICY_YAML}"));
        let t = translate(&objects);
        assert_valid(&t.mesh);
        let status = t.status(SERVER_POLICY, "shop", "reviews").unwrap();
        assert!(status.accepted, "{status:?}");
        assert!(t.mesh.inbound.is_empty(), "inbound is per pod");

        // By the endpoint's targetRef, on the pod's own port (the slice's, 9080).
        let v1 = view(&t, &objects, "shop", "reviews-v1-0", "", None);
        assert_valid(&v1);
        assert_eq!(v1.services, t.mesh.services);
        assert_eq!(v1.inbound.len(), 1);
        assert_eq!(v1.inbound[0].port.get(), 9080);
        let limit = v1.inbound[0].rate_limit.as_ref().unwrap();
        assert_eq!(limit.max_tokens.0, 1000);
        assert_eq!(limit.fill_interval, Duration::from_secs(1));

        // By address, and ready or not.
        let by_ip = view(&t, &objects, "shop", "renamed", "198.18.0.3", None);
        assert_eq!(by_ip.inbound, v1.inbound);
        let starting = view(&t, &objects, "shop", "reviews-v2-1", "198.18.0.4", None);
        assert_eq!(starting.inbound, v1.inbound);

        // A pod that does not back reviews gets none.
        let other = view(&t, &objects, "web", "productpage-0", "198.18.1.2", None);
        assert_valid(&other);
        assert!(other.inbound.is_empty());
        assert_eq!(other.services, t.mesh.services);

        // The per-snapshot index gives every pod the same inbound limits as `view`.
        let index = InboundIndex::new(&objects);
        for (namespace, pod, ip) in [
            ("shop", "reviews-v1-0", ""),
            ("shop", "renamed", "198.18.0.3"),
            ("shop", "reviews-v2-1", "198.18.0.4"),
            ("web", "productpage-0", "198.18.1.2"),
        ] {
            let expected = view(&t, &objects, namespace, pod, ip, None).inbound;
            assert_eq!(
                index.for_pod(namespace, pod, ip),
                expected,
                "{namespace}/{pod}"
            );
        }

        // Bad values and ports are refused with the field named, and add nothing.
        let bad = translate(&self::objects(&format!(
            "{SHOP}{}",
            SERVER_POLICY_YAML
                .replace("ports: [8080]", "ports: [9999]")
                .replace("mtls: STRICT", "mtls: SOMETIMES")
        )));
        let status = bad.status(SERVER_POLICY, "shop", "reviews").unwrap();
        assert!(!status.accepted);
        assert!(
            status
                .message
                .starts_with("spec.mtls: unknown variant `SOMETIMES`"),
            "{}",
            status.message
        );
        let bad = translate(&self::objects(&format!(
            "{SHOP}{}",
            SERVER_POLICY_YAML.replace("ports: [8080]", "ports: [9999]")
        )));
        let status = bad.status(SERVER_POLICY, "shop", "reviews").unwrap();
        assert_eq!(status.reason, "TargetNotFound");
        assert_eq!(
            status.message,
            "spec.ports[0]: no targeted Service has port 9999"
        );
        let bad_objects = self::objects(&format!(
            "{SHOP}{}",
            SERVER_POLICY_YAML.replace("maxTokens: 1000,", "maxTokens: 0,")
        ));
        let bad = translate(&bad_objects);
        let status = bad.status(SERVER_POLICY, "shop", "reviews").unwrap();
        assert!(
            status.message.starts_with("spec.rateLimit.maxTokens: "),
            "{}",
            status.message
        );
        assert!(view(&bad, &bad_objects, "shop", "reviews-v1-0", "", None)
            .inbound
            .is_empty());
    }

    #[test]
    fn reach_narrows_a_view_to_its_namespaces_and_their_backends() {
        let objects = objects(&format!(
            "{SHOP}{CANARY}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: productpage, namespace: web}}
spec:
  parentRefs: [{{group: core, kind: Service, name: productpage}}]
  rules:
    - backendRefs: [{{name: reviews, namespace: shop, port: 8080}}]
"
        ));
        let t = translate(&objects);
        assert_valid(&t.mesh);
        let web = t
            .mesh
            .services
            .iter()
            .find(|s| s.name == "productpage")
            .unwrap();
        assert_eq!(web.routes[0].backends[0].namespace.as_deref(), Some("shop"));

        let reach = ["web".to_owned()];
        let narrowed = view(
            &t,
            &objects,
            "web",
            "productpage-0",
            "198.18.1.2",
            Some(&reach),
        );
        assert_valid(&narrowed);
        let mut names: Vec<String> = narrowed.services.iter().map(|s| s.authority()).collect();
        names.sort();
        // web's own service, the shop service its route sends to, and that one's
        // canary backends in turn.
        assert_eq!(
            names,
            [
                "productpage.web:9080",
                "reviews-v1.shop:8080",
                "reviews-v2.shop:8080",
                "reviews.shop:8080"
            ]
        );

        let reach = ["shop".to_owned()];
        let shop = view(
            &t,
            &objects,
            "shop",
            "reviews-v1-0",
            "198.18.0.2",
            Some(&reach),
        );
        assert_valid(&shop);
        assert!(shop.services.iter().all(|s| s.namespace == "shop"));
        assert_eq!(shop.services.len(), 3);

        let nowhere = view(&t, &objects, "ops", "x", "198.18.9.9", Some(&[]));
        assert_eq!(nowhere, Config::default());
    }

    #[test]
    fn invalid_services_are_reported_and_left_out() {
        let t = translated(&format!(
            "{SHOP}
---
apiVersion: v1
kind: Service
metadata: {{name: Bad_Name, namespace: shop}}
spec: {{ports: [{{port: 80}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: reviews, namespace: shop}}
spec: {{ports: [{{port: 81}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: external, namespace: shop}}
spec: {{type: ExternalName, externalName: example.com}}
"
        ));
        let bad = t.status(SERVICE, "shop", "Bad_Name").unwrap();
        assert_eq!(
            bad.message,
            "metadata.name: \"Bad_Name\" is not a DNS label"
        );
        let twice = t.status(SERVICE, "shop", "reviews").unwrap();
        assert!(
            twice.message.contains("more than once"),
            "{}",
            twice.message
        );
        assert_eq!(t.mesh, translated(SHOP).mesh);
    }
}
