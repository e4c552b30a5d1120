//! Policy state that operators rely on survives config pushes, end to end: real
//! sidecars taking their config from a control plane in local mode, while the
//! served directory changes under them. An endpoint ejected by outlier detection
//! stays ejected, a drained token bucket stays drained and a spent retry budget
//! stays spent across a push that is not about them, and an endpoint keeps its
//! latency estimate when another joins its service; and destination sections
//! follow the destination, so a backend's own `outlierDetection` ejects its failing
//! endpoint when it is reached through another service's route.

use serde_json::Value;
use std::{net::SocketAddr, time::Duration};
use trellis_tests::{
    apps::{self, App},
    control_plane::ControlPlane,
    http::get_with_host,
    netns::Network,
    sidecar::Sidecar,
    wait::until,
};

/// `reviews` routes everything to `reviews-v2`, whose two endpoints are a good app
/// and one that answers 500; `ratings` is limited inbound, `down` always fails.
const MESH: &str = "
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: shop}
spec: {clusterIP: 198.19.0.10, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: reviews-v2, namespace: shop}
spec: {clusterIP: 198.19.0.12, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: ratings, namespace: shop}
spec: {clusterIP: 198.19.0.20, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: down, namespace: shop}
spec: {clusterIP: 198.19.0.30, ports: [{name: http, port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: reviews-1, namespace: shop, labels: {kubernetes.io/service-name: reviews}}
addressType: IPv4
endpoints: [{addresses: [198.18.0.3]}]
ports: [{name: http, port: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: reviews-v2-good, namespace: shop, labels: {kubernetes.io/service-name: reviews-v2}}
addressType: IPv4
endpoints: [{addresses: [198.18.0.3]}]
ports: [{name: http, port: 8081}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: reviews-v2-broken, namespace: shop, labels: {kubernetes.io/service-name: reviews-v2}}
addressType: IPv4
endpoints: [{addresses: [198.18.0.3]}]
ports: [{name: http, port: 8083}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: ratings-1, namespace: shop, labels: {kubernetes.io/service-name: ratings}}
addressType: IPv4
endpoints: [{addresses: [198.18.0.3], targetRef: {kind: Pod, name: server, namespace: shop}}]
ports: [{name: http, port: 8082}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: down-1, namespace: shop, labels: {kubernetes.io/service-name: down}}
addressType: IPv4
endpoints: [{addresses: [198.18.0.3]}]
ports: [{name: http, port: 8083}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews, namespace: shop}
spec:
  parentRefs: [{group: '', kind: Service, name: reviews, port: 80}]
  rules: [{backendRefs: [{name: reviews-v2, port: 80}]}]
---
apiVersion: policy.trellis.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: reviews-v2, namespace: shop}
spec:
  targetRefs: [{group: '', kind: Service, name: reviews-v2}]
  outlierDetection: {consecutive5xx: 3, baseEjectionTime: 10m, maxEjectionPercent: 50}
---
apiVersion: policy.trellis.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: down, namespace: shop}
spec:
  targetRefs: [{group: '', kind: Service, name: down}]
  retry: {attempts: 20, retryOn: [5xx], backoff: {base: 1ms, max: 1ms}, budget: {percent: 0, minPerSecond: 1}}
---
apiVersion: policy.trellis.dev/v1alpha1
kind: ServerPolicy
metadata: {name: ratings, namespace: shop}
spec:
  targetRefs: [{group: '', kind: Service, name: ratings}]
  rateLimit: {maxTokens: 5, fillInterval: 1h}
";

/// A Service none of the state above has anything to do with.
const UNRELATED: &str = "
apiVersion: v1
kind: Service
metadata: {name: details, namespace: shop}
spec: {clusterIP: 198.19.0.40, ports: [{name: http, port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: details-1, namespace: shop, labels: {kubernetes.io/service-name: details}}
addressType: IPv4
endpoints: [{addresses: [198.18.0.3]}]
ports: [{name: http, port: 8080}]
";

/// A third endpoint for reviews-v2.
const MORE_V2: &str = "
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: reviews-v2-more, namespace: shop, labels: {kubernetes.io/service-name: reviews-v2}}
addressType: IPv4
endpoints: [{addresses: [198.18.0.3]}]
ports: [{name: http, port: 8084}]
";

const LIMIT: Duration = Duration::from_secs(20);
const GOOD: &str = "198.18.0.3:8081";
const BROKEN: &str = "198.18.0.3:8083";

/// Pods: client (0), server (1) with the apps, the control plane (2).
struct Pods {
    client: Sidecar,
    server: Sidecar,
    cp: ControlPlane,
    _apps: Vec<App>,
    net: Network,
}

impl Pods {
    async fn start() -> Pods {
        let net = Network::new(3);
        let server_pod = net.pod(1).clone();
        let apps = vec![
            apps::http_app(server_pod.listen(8080), "reviews"),
            apps::http_app(server_pod.listen(8081), "v2"),
            apps::http_app(server_pod.listen(8082), "ratings"),
            apps::failing_app(server_pod.listen(8083), "broken", 500, 100.0),
            apps::http_app(server_pod.listen(8084), "v2-more"),
        ];
        let cp = ControlPlane::start(net.pod(2), &[("mesh.yaml", MESH)]).await;
        let server = cp.sidecar(&server_pod, "server").await;
        let client = cp.sidecar(net.pod(0), "client").await;
        Pods {
            client,
            server,
            cp,
            _apps: apps,
            net,
        }
    }

    /// One call from the client pod to a cluster IP, as an unchanged client makes it.
    async fn call(&self, cluster_ip: &str) -> u16 {
        self.call_path(cluster_ip, "/").await
    }

    async fn call_path(&self, cluster_ip: &str, path: &str) -> u16 {
        let addr: SocketAddr = format!("{cluster_ip}:80").parse().unwrap();
        match get_with_host(self.net.pod(0), addr, path, cluster_ip).await {
            Ok((status, _, _)) => status.as_u16(),
            Err(error) => panic!("call to {cluster_ip}: {error}"),
        }
    }

    /// The calls' statuses, in order.
    async fn calls(&self, cluster_ip: &str, n: usize) -> Vec<u16> {
        let mut statuses = Vec::with_capacity(n);
        for _ in 0..n {
            statuses.push(self.call(cluster_ip).await);
        }
        statuses
    }

    /// Requests the server's sidecar passed to the always-failing app.
    async fn failed_attempts(&self) -> f64 {
        self.server.metrics().await.sum(
            "trellis_requests_total",
            &[("direction", "inbound"), ("code", "500")],
        )
    }
}

/// `service` as a sidecar's `/config_dump` shows it, once it is there.
async fn dumped(sidecar: &Sidecar, service: &str) -> Result<Value, String> {
    let dump = sidecar.config_dump().await?;
    dump["config"]["services"]
        .as_array()
        .and_then(|all| all.iter().find(|s| s["service"] == service))
        .cloned()
        .ok_or_else(|| format!("{service} not in the config yet"))
}

/// The balancer's latency estimate of one endpoint of `service`, in ms.
fn latency_ms(service: &Value, address: &str) -> f64 {
    service["balancer"]
        .as_array()
        .and_then(|all| all.iter().find(|e| e["address"] == address))
        .and_then(|e| e["latencyMs"].as_f64())
        .unwrap_or_else(|| panic!("no estimate for {address}: {service}"))
}

fn ejected(service: &Value) -> Vec<String> {
    service["ejected"]
        .as_array()
        .map(|list| {
            list.iter()
                .filter_map(|a| a.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn ejections_buckets_and_budgets_survive_a_push_and_destination_sections_follow_the_destination(
) {
    let pods = Pods::start().await;

    // reviews has no outlier policy of its own; its backend reviews-v2 does, and
    // ejects its failing endpoint when called through reviews' route.
    let reviews = until(LIMIT, "reviews in the client's config", || {
        dumped(&pods.client, "reviews.shop:80")
    })
    .await;
    assert!(
        reviews["destination"].get("outlierDetection").is_none(),
        "{reviews}"
    );
    until(
        LIMIT,
        "the broken endpoint of reviews-v2 ejected",
        || async {
            pods.calls("198.19.0.10", 5).await;
            let v2 = dumped(&pods.client, "reviews-v2.shop:80").await?;
            match ejected(&v2).as_slice() {
                [only] if only == BROKEN => Ok(()),
                // The balancer's estimates and in-flight counts say why not.
                other => Err(format!("ejected: {other:?}, balancer: {}", v2["balancer"])),
            }
        },
    )
    .await;
    assert!(pods
        .calls("198.19.0.10", 30)
        .await
        .iter()
        .all(|s| *s == 200));
    // One slow answer: the good endpoint's peak-EWMA estimate jumps to it (a new
    // endpoint starts at 30 ms).
    assert_eq!(pods.call_path("198.19.0.10", "/slow/300").await, 200);
    let v2 = dumped(&pods.client, "reviews-v2.shop:80").await.unwrap();
    assert!(latency_ms(&v2, GOOD) > 250.0, "{v2}");

    // The inbound bucket of ratings (5 tokens an hour) drained.
    let mut drained = pods.calls("198.19.0.20", 8).await;
    drained.dedup();
    assert_eq!(drained, [200, 429], "5 admitted, then refused");

    // The retry budget of down (10 retries in its 10 s window) spent: a call is
    // its first attempt plus 10 retries.
    let before = pods.failed_attempts().await;
    assert_eq!(pods.call("198.19.0.30").await, 500);
    let spent = until(
        LIMIT,
        "the server's count of the call's attempts",
        || async {
            match pods.failed_attempts().await - before {
                n if n >= 11.0 => Ok(n),
                n => Err(format!("{n} attempts counted")),
            }
        },
    )
    .await;
    assert_eq!(spent, 11.0);

    // A push about something else entirely.
    pods.cp.write("details.yaml", UNRELATED);
    for sidecar in [&pods.client, &pods.server] {
        until(LIMIT, "the unrelated service applied", || {
            dumped(sidecar, "details.shop:80")
        })
        .await;
    }

    // The budget is still spent: one attempt, no retry.
    let before = pods.failed_attempts().await;
    assert_eq!(pods.call("198.19.0.30").await, 500);
    until(LIMIT, "the server's count of one attempt", || async {
        match pods.failed_attempts().await - before {
            1.0 => Ok(()),
            n => Err(format!("{n} attempts counted")),
        }
    })
    .await;
    // The bucket is still drained.
    assert_eq!(pods.calls("198.19.0.20", 3).await, [429, 429, 429]);
    // The endpoint is still ejected, and still gets nothing.
    let v2 = dumped(&pods.client, "reviews-v2.shop:80").await.unwrap();
    assert_eq!(ejected(&v2), [BROKEN]);
    assert!(pods
        .calls("198.19.0.10", 30)
        .await
        .iter()
        .all(|s| *s == 200));

    // reviews-v2 itself gains an endpoint: the ejection stays.
    pods.cp.write("more-v2.yaml", MORE_V2);
    let v2 = until(LIMIT, "the third endpoint of reviews-v2", || async {
        let v2 = dumped(&pods.client, "reviews-v2.shop:80").await?;
        match v2["endpoints"].as_array().map(Vec::len) {
            Some(3) => Ok(v2),
            n => Err(format!("{n:?} endpoints")),
        }
    })
    .await;
    assert_eq!(ejected(&v2), [BROKEN]);
    // The good endpoint kept its estimate (decaying with a 10 s time constant, far
    // above the 30 ms it would have started again from); the new one starts fresh.
    assert!(latency_ms(&v2, GOOD) > 60.0, "{v2}");
    assert!(latency_ms(&v2, "198.18.0.3:8084") <= 30.0, "{v2}");
    assert!(pods
        .calls("198.19.0.10", 30)
        .await
        .iter()
        .all(|s| *s == 200));
    let _ = (&pods.cp, &pods.net);
}
