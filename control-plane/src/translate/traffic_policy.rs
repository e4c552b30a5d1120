//! TrafficPolicies: how clients call a service, attached by targetRef.
//!
//! A policy applies to what its targetRefs name, from broadest to narrowest: a
//! Service (its model services' `policy`), one port of it (`sectionName` = the
//! port's name), an HTTPRoute or GRPCRoute (every route made from it), one rule of
//! it (`sectionName` = the rule's name, or index when unnamed). A narrower target
//! wins section by section ([`Policy::overridden_by`]); among policies on the same
//! target the oldest (creationTimestamp, then namespace/name) wins, also section by
//! section, so a newer policy still fills the sections the older one leaves out.
//! A rule's own `timeouts` are narrower still and override the effective timeouts
//! field by field (`request`, `perTry`). The proxy itself merges a route's policy
//! over its service's, so route policies carry only what routes or rules set. A
//! policy whose target exists but is not in effect (a refused HTTPRoute) is
//! accepted, and applies once its target is.
//!
//! # Two kinds of section
//!
//! How a call is made (`timeouts`, `retry`, `fault`, `rateLimit`) applies to calls
//! addressed to the target: a Service's (or port's) go in the `policy` of its model
//! services, a route's (or rule's) in the `policy` of the model routes made from it.
//!
//! How a destination is treated (`connectionPool`, `outlierDetection`,
//! `loadBalancer`) follows the Service whose endpoints are called, whether it is
//! called directly or as the backend of another Service's route: these sections go
//! only in the `policy` of that Service's own model services, where the proxy
//! takes them from (a canary `reviews -> reviews-v2` uses reviews-v2's pool limits
//! and ejection, and reviews' retries). The proxy refuses them in a route's
//! `policy`, so a policy that sets one and targets an HTTPRoute, a GRPCRoute or a
//! rule is refused whole (Accepted=False, `Invalid`, `spec.connectionPool: a
//! destination section follows the Service whose endpoints are called; target that
//! Service`) and nothing of it applies, not even to a Service it also targets. A
//! model route's `policy` never carries a destination section.

use super::http_route::{rules_of, section_of, Rule};
use super::index::Index;
use super::objects::{is_core_group, Key, RouteKey, GRPC_ROUTE, HTTP_ROUTE};
use super::problem::{invalid, parse_value, unknown_fields, unresolved, Problem};
use crate::crd::{TargetRef, TrafficPolicy};
use serde_json::Value;
use std::collections::BTreeMap;
use trellis_proto::model::policy::{Policy, Timeouts};

/// The group of the route kinds a targetRef may name.
const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";

/// What a targetRef resolved to.
#[derive(Clone)]
pub(super) enum Target {
    /// A Service, or one of its ports.
    Service { service: Key, port: Option<u16> },
    /// An HTTPRoute or GRPCRoute, or one of its rules (by section).
    Route {
        route: RouteKey,
        section: Option<String>,
    },
}

/// Resolves `spec.targetRefs` in the policy's namespace, at least one required;
/// a ServerPolicy may only target Services (`routes_allowed` false). Each one
/// that does not resolve adds a problem.
pub(super) fn resolve_targets(
    namespace: &str,
    refs: &[TargetRef],
    index: &Index,
    routes_allowed: bool,
    problems: &mut Vec<Problem>,
) -> Vec<Target> {
    if refs.is_empty() {
        problems.push(invalid(
            "Invalid",
            "spec.targetRefs",
            "at least one targetRef is required",
        ));
    }
    let mut targets = Vec::new();
    for (i, target) in refs.iter().enumerate() {
        match resolve_target(namespace, i, target, index, routes_allowed) {
            Ok(t) => targets.push(t),
            Err(problem) => problems.push(problem),
        }
    }
    targets
}

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

/// The sections that say how a destination is treated: they follow the Service
/// whose endpoints are called, never a route.
const DESTINATION_SECTIONS: [&str; 3] = ["connectionPool", "outlierDetection", "loadBalancer"];

/// The accepted policy and what it attaches to, or why it is refused.
pub(super) fn translate_traffic_policy(
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
    let targets_a_route = spec
        .target_refs
        .iter()
        .any(|t| t.group == GATEWAY_GROUP && matches!(t.kind.as_str(), "HTTPRoute" | "GRPCRoute"));
    let destination: Vec<Problem> = DESTINATION_SECTIONS
        .into_iter()
        .filter(|name| targets_a_route && sections.contains_key(*name))
        .map(|name| {
            invalid(
                "Invalid",
                format!("spec.{name}"),
                "a destination section follows the Service whose endpoints are called; \
                 target that Service",
            )
        })
        .collect();
    let parsed = parse_value::<Policy>(Value::Object(sections), "spec");
    let parsed = match parsed {
        Ok(p) => Some(p),
        Err(problem) => {
            problems.push(problem);
            None
        }
    };
    problems.extend(destination);
    let targets = resolve_targets(&key.0, &spec.target_refs, index, true, &mut problems);
    match parsed {
        Some(policy) if problems.is_empty() => Ok((policy, targets)),
        _ => Err(problems),
    }
}

/// Accepted TrafficPolicies by target, each list oldest first.
#[derive(Default)]
pub(super) struct Attachments {
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
    pub(super) fn add(&mut self, policy: Policy, targets: Vec<Target>) {
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

    /// What a model service carries: its Service's policies, under its port's.
    pub(super) fn service_policy(&self, service: &Key, port: u16) -> Policy {
        combine(self.service.get(service))
            .overridden_by(&combine(self.port.get(&(service.clone(), port))))
    }

    /// What a route carries: its HTTPRoute's and rule's policies, and the rule's
    /// own timeouts over the effective ones, field by field. Never a destination
    /// section: those follow the backend Service, and a policy that sets one on a
    /// route is refused before it gets here.
    pub(super) fn route_policy(
        &self,
        route: &RouteKey,
        rule: &Rule,
        service_policy: &Policy,
    ) -> Policy {
        let attached = combine(self.route.get(route)).overridden_by(&combine(
            self.rule.get(&(route.clone(), rule.section.clone())),
        ));
        let mut policy = Policy {
            connection_pool: None,
            outlier_detection: None,
            load_balancer: None,
            ..attached
        };
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

#[cfg(test)]
mod tests {
    use crate::translate::fixtures::{service, translated, CANARY, SHOP};
    use crate::translate::{ObjectStatus, TRAFFIC_POLICY};
    use std::time::Duration;
    use trellis_proto::model::policy::Policy;

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
  retry: {attempts: 2, retryOn: [gateway-error]}
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
        assert_eq!(rule.retry.as_ref().unwrap().retry_on, default_retry_on());
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
        retry.retry_on
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
    retryOn: [sometimes]
"
        ));
        let bad = t.status(TRAFFIC_POLICY, "shop", "bad").unwrap();
        assert!(!bad.accepted);
        assert!(bad.resolved_refs);
        assert_eq!(bad.reason, "Invalid");
        assert!(
            bad.message
                .starts_with("spec.retry.retryOn[0]: unknown variant `sometimes`"),
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
    fn the_old_retry_field_on_is_refused_naming_retry_on() {
        // `true` is what kubectl sends for a key `on`, having read it as YAML 1.1.
        for (key, field) in [("on", "spec.retry.on"), ("'true'", "spec.retry.true")] {
            let t = translated(&format!(
                "{SHOP}
---
apiVersion: policy.trellis.dev/v1alpha1
kind: TrafficPolicy
metadata: {{name: old, namespace: shop}}
spec:
  targetRefs: [{{group: '', kind: Service, name: reviews}}]
  retry: {{attempts: 3, {key}: [5xx]}}
"
            ));
            let old = t.status(TRAFFIC_POLICY, "shop", "old").unwrap();
            assert!(!old.accepted && old.resolved_refs);
            assert_eq!(old.reason, "Invalid");
            assert!(
                old.message
                    .starts_with(&format!("{field}: the field is `retryOn`")),
                "{}",
                old.message
            );
            assert_eq!(
                service(&t.mesh, "shop", "reviews").policy,
                Policy::default()
            );
        }
    }

    #[test]
    fn a_duration_too_long_to_count_is_refused_naming_the_field_not_a_panic() {
        let t = translated(&format!(
            "{SHOP}
---
apiVersion: policy.trellis.dev/v1alpha1
kind: TrafficPolicy
metadata: {{name: forever, namespace: shop}}
spec:
  targetRefs: [{{group: '', kind: Service, name: reviews}}]
  timeouts: {{request: 18446744073709551615s1s}}
"
        ));
        let forever = t.status(TRAFFIC_POLICY, "shop", "forever").unwrap();
        assert!(!forever.accepted);
        assert!(
            forever
                .message
                .starts_with("spec.timeouts.request: duration"),
            "{}",
            forever.message
        );
        assert!(forever.message.contains("too long"), "{}", forever.message);
        assert_eq!(
            service(&t.mesh, "shop", "reviews").policy,
            Policy::default()
        );
    }

    #[test]
    fn a_destination_section_on_a_route_or_rule_is_refused_and_nothing_of_it_applies() {
        const GRPC_ROUTE_YAML: &str = "
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: reviews-grpc, namespace: shop}
spec:
  parentRefs: [{kind: Service, name: reviews}]
  rules: [{backendRefs: [{name: reviews-v1, port: 8080}]}]
";
        // Destination sections on the Service whose endpoints are called: accepted.
        const ON_BACKEND: &str = "
---
apiVersion: policy.trellis.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: on-backend, namespace: shop}
spec:
  targetRefs: [{group: '', kind: Service, name: reviews-v2}]
  connectionPool: {maxConnections: 7}
  outlierDetection: {consecutive5xx: 3}
  loadBalancer: {type: P2CEwma}
";
        let good = translated(&format!("{SHOP}{CANARY}{GRPC_ROUTE_YAML}{ON_BACKEND}"));
        let t = translated(&format!(
            "{SHOP}{CANARY}{GRPC_ROUTE_YAML}{ON_BACKEND}
---
apiVersion: policy.trellis.dev/v1alpha1
kind: TrafficPolicy
metadata: {{name: on-route, namespace: shop}}
spec:
  targetRefs: [{{group: gateway.networking.k8s.io, kind: HTTPRoute, name: reviews}}]
  connectionPool: {{maxConnections: 10}}
  retry: {{attempts: 4}}
---
apiVersion: policy.trellis.dev/v1alpha1
kind: TrafficPolicy
metadata: {{name: on-rule, namespace: shop}}
spec:
  targetRefs: [{{group: gateway.networking.k8s.io, kind: HTTPRoute, name: reviews, sectionName: '1'}}]
  outlierDetection: {{consecutive5xx: 3}}
  loadBalancer: {{type: RingHash, hashOn: {{header: x-user}}}}
---
apiVersion: policy.trellis.dev/v1alpha1
kind: TrafficPolicy
metadata: {{name: on-grpc, namespace: shop}}
spec:
  targetRefs: [{{group: gateway.networking.k8s.io, kind: GRPCRoute, name: reviews-grpc}}]
  loadBalancer: {{type: P2CEwma}}
---
apiVersion: policy.trellis.dev/v1alpha1
kind: TrafficPolicy
metadata: {{name: service-and-route, namespace: shop}}
spec:
  targetRefs:
    - {{group: '', kind: Service, name: reviews}}
    - {{group: gateway.networking.k8s.io, kind: HTTPRoute, name: reviews}}
  connectionPool: {{maxConnections: 5}}
  timeouts: {{request: 1s}}
"
        ));
        let message = "a destination section follows the Service whose endpoints are called; \
                       target that Service";
        let on_route = t.status(TRAFFIC_POLICY, "shop", "on-route").unwrap();
        assert!(!on_route.accepted && on_route.resolved_refs);
        assert_eq!(on_route.reason, "Invalid");
        assert_eq!(on_route.message, format!("spec.connectionPool: {message}"));
        let on_rule = t.status(TRAFFIC_POLICY, "shop", "on-rule").unwrap();
        assert!(!on_rule.accepted);
        assert_eq!(
            on_rule.message,
            format!("spec.outlierDetection: {message} (and 1 more problem)")
        );
        let on_grpc = t.status(TRAFFIC_POLICY, "shop", "on-grpc").unwrap();
        assert!(!on_grpc.accepted);
        assert_eq!(on_grpc.message, format!("spec.loadBalancer: {message}"));
        let both = t
            .status(TRAFFIC_POLICY, "shop", "service-and-route")
            .unwrap();
        assert!(!both.accepted);
        assert_eq!(both.message, format!("spec.connectionPool: {message}"));
        assert!(
            t.status(TRAFFIC_POLICY, "shop", "on-backend")
                .unwrap()
                .accepted
        );

        // Nothing of the refused policies applies: not their call sections, not
        // on the Service one of them also targets.
        assert_eq!(t.mesh, good.mesh);
        let reviews = service(&t.mesh, "shop", "reviews");
        assert_eq!(reviews.policy, Policy::default());
        assert!(reviews.routes.iter().all(|r| r.policy == Policy::default()));
        // The backend's own sections are on its model service, where the proxy
        // takes them from when reviews' routes send there.
        let v2 = &service(&t.mesh, "shop", "reviews-v2").policy;
        assert_eq!(v2.connection_pool.as_ref().unwrap().max_connections.0, 7);
        assert_eq!(v2.outlier_detection.as_ref().unwrap().consecutive_5xx.0, 3);
        assert!(v2.load_balancer.is_some());
    }
}
