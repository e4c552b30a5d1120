//! The mesh both control-plane benches use: 1 000 Services, each with an
//! HTTPRoute and an EndpointSlice of 10 endpoints.

use std::fmt::Write as _;

pub const SERVICES: usize = 1_000;
pub const ENDPOINTS_PER_SERVICE: usize = 10;

pub fn endpoint_slice(i: usize, extra: bool) -> String {
    let mut addresses = String::new();
    let count = ENDPOINTS_PER_SERVICE + usize::from(extra);
    for e in 0..count {
        let _ = writeln!(addresses, "  - addresses: [198.18.{}.{}]", i % 250, 1 + e);
    }
    format!(
        "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: svc-{i}-1, namespace: bench, labels: {{kubernetes.io/service-name: svc-{i}}}}}
addressType: IPv4
endpoints:
{addresses}ports: [{{name: http, port: 8080}}]
"
    )
}

pub fn mesh_file() -> String {
    let mut text = String::new();
    for i in 0..SERVICES {
        let _ = write!(
            text,
            "apiVersion: v1
kind: Service
metadata: {{name: svc-{i}, namespace: bench}}
spec: {{clusterIP: 198.19.{}.{}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: svc-{i}, namespace: bench}}
spec:
  parentRefs: [{{group: '', kind: Service, name: svc-{i}, port: 80}}]
  rules:
    - matches: [{{path: {{type: PathPrefix, value: /api}}}}]
      backendRefs: [{{name: svc-{i}, port: 80}}]
---
",
            i / 250,
            1 + i % 250
        );
    }
    text
}

/// Every Service's EndpointSlice, in one file.
pub fn slices_file() -> String {
    let mut slices = String::new();
    for i in 0..SERVICES {
        slices += &endpoint_slice(i, false);
        slices += "---\n";
    }
    slices
}
