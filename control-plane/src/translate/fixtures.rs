//! What the tests of translation (and of the views made from it) share: objects
//! from YAML as an operator writes them, a small mesh, and the checks every
//! translated config must pass.

use super::{translate, Objects, Translation};
use serde::Deserialize;
use trellis_proto::model::config::{self as model, Config};
use trellis_proto::model::resources;

/// Objects from YAML documents, as an operator writes them.
pub(crate) fn objects(yaml: &str) -> Objects {
    let mut objects = Objects::default();
    for document in serde_yaml_ng::Deserializer::from_str(yaml) {
        let value = serde_yaml_ng::Value::deserialize(document).unwrap();
        if value.is_null() {
            continue;
        }
        let kind = value["kind"].as_str().unwrap().to_owned();
        fn parse<T: serde::de::DeserializeOwned>(
            value: serde_yaml_ng::Value,
        ) -> serde_yaml_ng::Result<std::sync::Arc<T>> {
            serde_yaml_ng::from_value(value).map(std::sync::Arc::new)
        }
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

/// What every translated config and view must be: valid, the same after the trip
/// through the discovery API's resources, and without a destination section in
/// any route's policy (those follow the backend Service, and the proxy refuses
/// them on a route).
pub(crate) fn assert_valid(config: &Config) {
    config.validate().unwrap();
    for service in &config.services {
        for route in &service.routes {
            let policy = &route.policy;
            assert!(
                policy.connection_pool.is_none()
                    && policy.outlier_detection.is_none()
                    && policy.load_balancer.is_none(),
                "a destination section in route {:?} of {}: {policy:?}",
                route.name,
                service.authority()
            );
        }
    }
    let back = resources::from_resources(&resources::to_resources(config)).unwrap();
    assert_eq!(back.services.len(), config.services.len());
    for service in &config.services {
        assert!(back.services.contains(service), "{service:?}");
    }
    assert_eq!(back.inbound, config.inbound);
}

pub(crate) fn translated(yaml: &str) -> Translation {
    let translation = translate(&objects(yaml));
    assert_valid(&translation.mesh);
    translation
}

pub(crate) fn service<'a>(config: &'a Config, namespace: &str, name: &str) -> &'a model::Service {
    config
        .services
        .iter()
        .find(|s| s.namespace == namespace && s.name == name)
        .unwrap_or_else(|| panic!("no service {namespace}/{name} in {config:#?}"))
}

pub(crate) fn addresses(service: &model::Service) -> Vec<String> {
    service
        .endpoints
        .iter()
        .map(|e| e.address.to_string())
        .collect()
}

/// Three Services in `shop` (one per version of reviews, each pod listening on
/// 9080) and one in `web`, with their EndpointSlices.
pub(crate) const SHOP: &str = r#"
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
pub(crate) const CANARY: &str = r#"
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

/// A ServerPolicy limiting reviews' pods on the pod port behind Service port 8080.
pub(crate) const SERVER_POLICY_YAML: &str = r#"
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

/// The pods behind reviews' endpoints: v1-0 runs as `reviews`, v2-0 names no
/// service account (so runs as `default`).
pub(crate) const PODS: &str = "
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-v1-0, namespace: shop}
spec: {serviceAccountName: reviews, containers: [{name: app, image: reviews}]}
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-v2-0, namespace: shop}
spec: {containers: [{name: app, image: reviews}]}
";
