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
//! `inbound` entries, with the policy's `mtls` mode and its `authorization` (the
//! rules whose `to` covers the port). A port that DISABLEs mTLS has its
//! endpoints sent without an identity, so that callers send it plaintext.
//! A pod is recognised by its EndpointSlice endpoints, as above.

use super::inbound::{InboundLimit, PodKey};
use super::index::{oldest_first, Index};
use super::objects::{namespace_of, Key, Objects, SERVER_POLICY};
use super::problem::{
    invalid, parse_value, status, unknown_fields, unresolved, ObjectStatus, Problem,
};
use super::service::{port_number, slice_port};
use super::traffic_policy::{resolve_targets, Target};
use crate::crd::{Authorization, AuthorizationAction, ServerPolicy};
use serde_json::Value;
use std::net::IpAddr;
use std::num::NonZeroU16;
use trellis_proto::model::authorization;
use trellis_proto::model::config::{self as model, is_dns_label, MtlsMode, Workload};
use trellis_proto::model::policy::RateLimit;

/// An accepted ServerPolicy on some ports of one Service.
struct InboundRule {
    service: Key,
    /// Service ports.
    ports: Vec<NonZeroU16>,
    rate_limit: Option<RateLimit>,
    mtls: Option<MtlsMode>,
    authorization: Option<Authorization>,
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
                        authorization: rule
                            .authorization
                            .as_ref()
                            .map(|a| authorization_on(a, port.port)),
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
    let authorization = match spec.authorization.clone().filter(|v| !v.is_null()) {
        None => None,
        Some(value) => match parse_value::<Authorization>(value, "spec.authorization") {
            Ok(authorization) => {
                problems.extend(check_authorization(&authorization));
                Some(authorization)
            }
            Err(problem) => {
                problems.push(problem);
                None
            }
        },
    };
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
            if rate_limit.is_some() || mtls.is_some() || authorization.is_some() {
                rules.push(InboundRule {
                    service: service.clone(),
                    ports,
                    rate_limit: rate_limit.clone(),
                    mtls,
                    authorization: authorization.clone(),
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
            for (i, identity) in from.identities.iter().enumerate() {
                if Workload::from_spiffe_id(identity).is_none() {
                    problems.push(invalid(
                        "Invalid",
                        format!("{at}.from[{f}].identities[{i}]"),
                        format!("{identity:?} is not spiffe://TRUST-DOMAIN/ns/NAMESPACE/sa/NAME"),
                    ));
                }
            }
            for (n, namespace) in from.namespaces.iter().enumerate() {
                if !is_dns_label(namespace) {
                    problems.push(invalid(
                        "Invalid",
                        format!("{at}.from[{f}].namespaces[{n}]"),
                        format!("{namespace:?} is not a namespace name"),
                    ));
                }
            }
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
            for (p, port) in to.ports.iter().enumerate() {
                if port_number(*port).is_none() {
                    problems.push(invalid(
                        "Invalid",
                        format!("{at}.to[{t}].ports[{p}]"),
                        format!("{port} is not a port (1 to 65535)"),
                    ));
                }
            }
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

/// `authorization` as it applies to calls to one Service port: a `to` entry that
/// names other ports is dropped, and a rule whose every `to` entry was dropped
/// matches nothing there and goes too (an empty `to` would match everything).
fn authorization_on(
    authorization: &Authorization,
    service_port: NonZeroU16,
) -> authorization::Authorization {
    let rules = authorization
        .rules
        .iter()
        .filter_map(|rule| {
            let to: Vec<authorization::Operation> = rule
                .to
                .iter()
                .filter(|to| {
                    to.ports.is_empty() || to.ports.contains(&i32::from(service_port.get()))
                })
                .map(|to| authorization::Operation {
                    // Checked above.
                    methods: to
                        .methods
                        .iter()
                        .filter_map(|m| http::Method::from_bytes(m.as_bytes()).ok())
                        .map(model::Method)
                        .collect(),
                    paths: to.paths.clone(),
                })
                .collect();
            (rule.to.is_empty() || !to.is_empty()).then(|| authorization::Rule {
                from: rule
                    .from
                    .iter()
                    .map(|from| authorization::Source {
                        identities: from.identities.clone(),
                        service_accounts: from.service_accounts.clone(),
                        namespaces: from.namespaces.clone(),
                    })
                    .collect(),
                to,
            })
        })
        .collect();
    authorization::Authorization {
        action: match authorization.action {
            AuthorizationAction::Allow => authorization::Action::Allow,
            AuthorizationAction::Deny => authorization::Action::Deny,
        },
        rules,
    }
}

#[cfg(test)]
mod tests {
    use crate::translate::fixtures::{
        assert_valid, objects, CANARY, PODS, SERVER_POLICY_YAML, SHOP,
    };
    use crate::translate::{translate, SERVER_POLICY};
    use crate::translate::{InboundLimit, PodKey};
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
            authorization: Some(_),
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
    fn disable_sends_the_ports_endpoints_without_an_identity_so_callers_send_plaintext() {
        let identities = |yaml: &str| {
            let t = translate(&objects(yaml));
            let status = t.status(SERVER_POLICY, "shop", "reviews");
            assert!(status.is_none_or(|s| s.accepted), "{status:?}");
            let reviews = t
                .mesh
                .services
                .iter()
                .find(|s| s.name == "reviews")
                .unwrap();
            reviews
                .endpoints
                .iter()
                .map(|e| e.identity.is_some())
                .collect::<Vec<_>>()
        };
        assert_eq!(identities(&format!("{SHOP}{PODS}")), [true, true]);
        let disabled = SERVER_POLICY_YAML.replace("mtls: STRICT", "mtls: DISABLE");
        assert_eq!(
            identities(&format!("{SHOP}{PODS}{disabled}")),
            [false, false]
        );
        let t = translate(&objects(&format!("{SHOP}{PODS}{disabled}")));
        assert_eq!(
            t.inbound[0].mtls,
            Some(trellis_proto::model::config::MtlsMode::Disable)
        );
    }

    #[test]
    fn authorization_goes_to_each_port_with_the_rules_that_cover_it() {
        let policy = SERVER_POLICY_YAML.replace("  ports: [8080]\n", "").replace(
            "        to: [{methods: [GET], paths: [/api/*]}]",
            "        to: [{methods: [GET], paths: [/api/*]}]
      - from: [{identities: ['spiffe://cluster.local/ns/ops/sa/debug']}]
        to: [{ports: [9999]}]",
        );
        let t = translate(&objects(&format!("{SHOP}{policy}")));
        let status = t.status(SERVER_POLICY, "shop", "reviews").unwrap();
        assert!(status.accepted, "{status:?}");
        let authorization = t.inbound[0].authorization.as_ref().unwrap();
        // Port 8080 (pods' 9080): the first rule; the second names another port.
        assert_eq!(t.inbound[0].port.get(), 9080);
        assert_eq!(authorization.rules.len(), 1, "{authorization:?}");
        let rule = &authorization.rules[0];
        assert_eq!(rule.from[0].service_accounts, ["shop/frontend"]);
        assert_eq!(rule.from[1].namespaces, ["ops"]);
        assert_eq!(rule.to[0].methods[0].0, http::Method::GET);
        assert_eq!(rule.to[0].paths, ["/api/*"]);

        let bad = translate(&objects(&format!(
            "{SHOP}{}",
            SERVER_POLICY_YAML.replace("namespaces: [ops]", "identities: [ops]")
        )));
        let status = bad.status(SERVER_POLICY, "shop", "reviews").unwrap();
        assert!(!status.accepted);
        assert!(
            status.message.starts_with(
                "spec.authorization.rules[0].from[1].identities[0]: \"ops\" is not spiffe://"
            ),
            "{}",
            status.message
        );
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
