//! HTTPRoutes: the routes of a Service (GAMMA mesh routing).
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
//! Not supported yet, and refused rather than ignored (Accepted=False,
//! `UnsupportedValue`): filters, and a parentRef to a Service in another namespace
//! (a GAMMA consumer route). `hostnames` are ignored, as GAMMA says. ReferenceGrants
//! are not read: a backendRef may name a Service in any namespace.
//!
//! Paths, regexes and header names are checked here as the proxy checks them, so a
//! route the proxy would refuse is refused here instead, naming its field.

use super::objects::{is_core_group, Key};
use super::problem::{invalid, parse_value, unresolved, Problem};
use super::service::{port_number, Port, Services};
use gateway_api::apis::standard::httproutes::{
    HttpRoute, HttpRouteRules, HttpRouteRulesBackendRefs, HttpRouteRulesMatches,
    HttpRouteRulesMatchesHeadersType, HttpRouteRulesMatchesPathType,
    HttpRouteRulesMatchesQueryParamsType, HttpRouteRulesTimeouts,
};
use serde_json::Value;
use std::borrow::Cow;
use std::num::NonZeroU16;
use std::time::Duration;
use trellis_proto::model::config as model;
use trellis_proto::model::duration;
use trellis_proto::model::policy::Policy;

/// A rule's own `timeouts`: for each field, None = not set, Some(None) = `0s` (off).
#[derive(Default)]
pub(super) struct RuleTimeouts {
    pub(super) request: Option<Option<Duration>>,
    pub(super) per_try: Option<Option<Duration>>,
}

/// One rule of an accepted route, as the model route it becomes.
pub(super) struct Rule {
    pub(super) section: String,
    /// Its policy is filled in when the route is placed on a service.
    pub(super) route: model::Route,
    pub(super) timeouts: RuleTimeouts,
}

/// An accepted HTTPRoute: the service ports it attaches to and its rules.
pub(super) struct Attached {
    pub(super) parents: Vec<(Key, NonZeroU16)>,
    pub(super) rules: Vec<Rule>,
}

/// The rules of a route; a route without rules has one rule that takes everything.
pub(super) fn rules_of(route: &HttpRoute) -> Cow<'_, [HttpRouteRules]> {
    match &route.spec.rules {
        Some(rules) if !rules.is_empty() => Cow::Borrowed(rules.as_slice()),
        _ => Cow::Owned(vec![HttpRouteRules::default()]),
    }
}

/// What a TrafficPolicy's `sectionName` calls a rule: its name, or its index.
pub(super) fn section_of(rule: &HttpRouteRules, index: usize) -> String {
    rule.name.clone().unwrap_or_else(|| index.to_string())
}

/// None when the route has no Service parent (it is not a mesh route).
pub(super) fn translate_route(
    key: &Key,
    route: &HttpRoute,
    services: &Services,
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
        let Some(service) = services.get(&service_key) else {
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
        match translate_rule(key, j, rule, services) {
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
    services: &Services,
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
        match translate_backend(key, backend, &at(&format!("backendRefs[{b}]")), services) {
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
pub(super) fn check_regex(pattern: &str) -> Result<(), String> {
    trellis_proto::model::regex::full_match(pattern).map(|_| ())
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
    services: &Services,
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
    let Some(service) = services.get(&(namespace.clone(), backend.name.clone())) else {
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

#[cfg(test)]
mod tests {
    use crate::translate::fixtures::{service, translated, CANARY, SHOP};
    use crate::translate::HTTP_ROUTE;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use std::time::Duration;
    use trellis_proto::model::config as model;
    use trellis_proto::model::policy::Policy;

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
}
