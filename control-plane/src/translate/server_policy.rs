//! ServerPolicies: how a Service's pods accept calls.
//!
//! A ServerPolicy targets Services (optionally one port by `sectionName`), and
//! `ports` narrows it to those Service ports. Its `rateLimit` becomes an
//! [`InboundLimit`] on the pod's own port (the EndpointSlice port behind the
//! Service port) for every pod that backs the Service: one whose EndpointSlice
//! endpoint has a `targetRef` naming the pod, or whose address is the pod's IP,
//! ready or not (a starting pod gets its limits before it is ready). When several
//! policies cover one pod port, one that names the port (by `ports` or
//! `sectionName`) beats one that covers every port, then the oldest wins: the
//! limits come in that order, each with its precedence. They are not part of the
//! mesh: each proxy's view (the hub's) takes the limits of its own pod as its
//! `inbound` entries. `mtls` and `authorization` are checked (a bad value is
//! Accepted=False, naming the field) but not translated yet: the model has no
//! place for them.
//!
//! Pods are not read yet: identity (service accounts) arrives with the CA. A pod
//! is recognised by its EndpointSlice endpoints, as above.

use super::index::{oldest_first, Index};
use super::objects::{namespace_of, Key, Objects, SERVER_POLICY};
use super::problem::{
    invalid, parse_value, status, unknown_fields, unresolved, ObjectStatus, Problem,
};
use super::service::{port_number, slice_port};
use super::traffic_policy::{resolve_targets, Target};
use crate::crd::{Authorization, ServerPolicy};
use serde_json::Value;
use std::net::IpAddr;
use std::num::NonZeroU16;
use trellis_proto::model::config as model;
use trellis_proto::model::config::is_dns_label;
use trellis_proto::model::config::MtlsMode;
use trellis_proto::model::policy::RateLimit;

/// An accepted ServerPolicy's rate limit and mTLS mode on one port of the pods
/// behind a Service.
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

/// An accepted ServerPolicy's rate limit on some ports of one Service.
struct InboundRule {
    service: Key,
    /// Service ports.
    ports: Vec<NonZeroU16>,
    rate_limit: Option<RateLimit>,
    mtls: Option<MtlsMode>,
}

const SERVER_POLICY_FIELDS: &str = "targetRefs, ports, mtls, rateLimit, authorization";

/// Every ServerPolicy's status, and the inbound limits of the accepted ones in
/// precedence order (port-specific first, then oldest).
pub(super) fn server_policies(
    objects: &Objects,
    index: &Index,
) -> (Vec<InboundLimit>, Vec<ObjectStatus>) {
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
    (inbound_limits(&specific, index), statuses)
}

/// The limits of `rules` (in precedence order) on the pods behind their Services:
/// one per rule, Service port and EndpointSlice.
fn inbound_limits(rules: &[InboundRule], index: &Index) -> Vec<InboundLimit> {
    let mut limits = Vec::new();
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
                let mut pods = Vec::new();
                for endpoint in &slice.endpoints {
                    pods.extend(
                        endpoint
                            .addresses
                            .iter()
                            .filter_map(|a| a.parse::<IpAddr>().ok())
                            .map(PodKey::Ip),
                    );
                    if let Some(pod) = endpoint
                        .target_ref
                        .as_ref()
                        .filter(|r| r.kind.as_deref() == Some("Pod"))
                    {
                        pods.push(PodKey::Name {
                            namespace: pod
                                .namespace
                                .clone()
                                .unwrap_or_else(|| slice_namespace.clone()),
                            name: pod.name.clone().unwrap_or_default(),
                        });
                    }
                }
                if !pods.is_empty() {
                    limits.push(InboundLimit {
                        precedence,
                        port: pod_port,
                        pods,
                        rate_limit: rule.rate_limit.clone(),
                        mtls: rule.mtls,
                    });
                }
            }
        }
    }
    limits
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
    let mtls = match spec.mtls.clone().filter(|v| !v.is_null()) {
        None => None,
        Some(value) => match parse_value::<MtlsMode>(value, "spec.mtls") {
            Ok(MtlsMode::Disable) => {
                problems.push(invalid(
                    "UnsupportedValue",
                    "spec.mtls",
                    "DISABLE is not supported yet: use PERMISSIVE, which also accepts plaintext",
                ));
                None
            }
            Ok(mode) => Some(mode),
            Err(problem) => {
                problems.push(problem);
                None
            }
        },
    };
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
    let targets: Vec<(Key, Option<u16>)> =
        resolve_targets(&key.0, &spec.target_refs, index, false, &mut problems)
            .into_iter()
            .filter_map(|target| match target {
                Target::Service { service, port } => Some((service, port)),
                Target::Route { .. } => None,
            })
            .collect();
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
            if rate_limit.is_some() || mtls.is_some() {
                rules.push(InboundRule {
                    service: service.clone(),
                    ports,
                    rate_limit: rate_limit.clone(),
                    mtls,
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
    use super::{InboundLimit, PodKey};
    use crate::translate::fixtures::{assert_valid, objects, CANARY, SERVER_POLICY_YAML, SHOP};
    use crate::translate::{translate, SERVER_POLICY};
    use std::time::Duration;

    #[test]
    fn server_policy_rate_limit_is_for_the_pods_that_back_the_service() {
        let objects = objects(&format!("{SHOP}{CANARY}{SERVER_POLICY_YAML}"));
        let t = translate(&objects);
        assert_valid(&t.mesh);
        let status = t.status(SERVER_POLICY, "shop", "reviews").unwrap();
        assert!(status.accepted, "{status:?}");
        assert!(t.mesh.inbound.is_empty(), "inbound is per pod");

        // One limit, on the pods' own port (the slice's, 9080), for every endpoint
        // of reviews' slice, ready or not, by address and by targetRef.
        let [InboundLimit {
            precedence,
            port,
            pods,
            rate_limit: Some(rate_limit),
            mtls,
        }] = t.inbound.as_slice()
        else {
            panic!("{:?}", t.inbound);
        };
        assert_eq!((*precedence, port.get()), (0, 9080));
        assert_eq!(rate_limit.max_tokens.0, 1000);
        assert_eq!(rate_limit.fill_interval, Duration::from_secs(1));
        assert_eq!(*mtls, Some(trellis_proto::model::config::MtlsMode::Strict));
        let name = |name: &str| PodKey::Name {
            namespace: "shop".into(),
            name: name.into(),
        };
        let ip = |ip: &str| PodKey::Ip(ip.parse().unwrap());
        assert_eq!(
            *pods,
            [
                ip("198.18.0.2"),
                name("reviews-v1-0"),
                ip("198.18.0.3"),
                name("reviews-v2-0"),
                ip("198.18.0.4"),
                name("reviews-v2-1"),
            ]
        );
    }

    #[test]
    fn disable_is_refused_until_callers_can_be_told_not_to_originate_mtls() {
        let t = translate(&objects(&format!(
            "{SHOP}{}",
            SERVER_POLICY_YAML.replace("mtls: STRICT", "mtls: DISABLE")
        )));
        let status = t.status(SERVER_POLICY, "shop", "reviews").unwrap();
        assert!(!status.accepted);
        assert!(
            status
                .message
                .starts_with("spec.mtls: DISABLE is not supported yet"),
            "{}",
            status.message
        );
        assert!(t.inbound.is_empty());
    }

    #[test]
    fn bad_server_policy_values_and_ports_are_refused_naming_the_field() {
        let bad = translate(&objects(&format!(
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
        let bad = translate(&objects(&format!(
            "{SHOP}{}",
            SERVER_POLICY_YAML.replace("ports: [8080]", "ports: [9999]")
        )));
        let status = bad.status(SERVER_POLICY, "shop", "reviews").unwrap();
        assert_eq!(status.reason, "TargetNotFound");
        assert_eq!(
            status.message,
            "spec.ports[0]: no targeted Service has port 9999"
        );
        let bad = translate(&objects(&format!(
            "{SHOP}{}",
            SERVER_POLICY_YAML.replace("maxTokens: 1000,", "maxTokens: 0,")
        )));
        let status = bad.status(SERVER_POLICY, "shop", "reviews").unwrap();
        assert!(
            status.message.starts_with("spec.rateLimit.maxTokens: "),
            "{}",
            status.message
        );
        assert!(bad.inbound.is_empty(), "a refused policy limits nothing");
    }
}
