//! GRPCRoutes, read as the HTTPRoutes they amount to.
//!
//! A GRPCRoute is read as the HTTPRoute it amounts to ([`grpc_as_http`]), so it
//! follows every rule of `http_route.rs` (parents, section names, backendRefs,
//! header matches, ordering among HTTPRoutes by creationTimestamp, statuses with
//! kind `GRPCRoute`, policy attachment). A `method` match becomes a path match on
//! `/<service>/<method>`: `Exact` (the default) with both is an Exact path, with
//! only a service a PathPrefix `/<service>`, with only a method the regex
//! `/[^/]+/<method>` (escaped); `RegularExpression` is the regex
//! `/(?:<service>)/(?:<method>)`, `[^/]+` for a missing part. Exact names must be
//! gRPC names (letters, digits, `_`, and `.` in a service). GRPCRoute has no
//! timeouts. Filters are refused (`UnsupportedValue`), as on an HTTPRoute.

use super::http_route::check_regex;
use super::problem::{invalid, Problem};
use gateway_api::apis::standard::grpcroutes::{
    GrpcRoute, GrpcRouteRulesMatchesHeadersType, GrpcRouteRulesMatchesMethod,
    GrpcRouteRulesMatchesMethodType,
};
use gateway_api::apis::standard::httproutes::{
    HttpRoute, HttpRouteParentRefs, HttpRouteRules, HttpRouteRulesBackendRefs,
    HttpRouteRulesMatches, HttpRouteRulesMatchesHeaders, HttpRouteRulesMatchesHeadersType,
    HttpRouteRulesMatchesPath, HttpRouteRulesMatchesPathType, HttpRouteSpec,
};

/// A GRPCRoute in HTTPRoute form, so that it takes the HTTPRoute paths (parents,
/// backends, headers, statuses, policies). The problems are what only a GRPCRoute
/// can get wrong: its method matches, and filters (which the form drops).
pub(super) fn grpc_as_http(route: &GrpcRoute) -> (HttpRoute, Vec<Problem>) {
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

#[cfg(test)]
mod tests {
    use crate::translate::fixtures::{service, translated, CANARY, SHOP};
    use crate::translate::{GRPC_ROUTE, HTTP_ROUTE};
    use trellis_proto::model::config as model;
    use trellis_proto::model::policy::Policy;

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
}
