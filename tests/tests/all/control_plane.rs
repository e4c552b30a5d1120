//! The control plane in local mode, end to end: a directory of Kubernetes YAML
//! served to real sidecars in pods. Unchanged clients call services by cluster IP;
//! editing, adding and deleting files changes what the sidecars do.

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use std::{collections::HashMap, future::Future, net::SocketAddr, time::Duration};
use trellis_tests::{
    apps::{self, App},
    control_plane::ControlPlane,
    http::{collect, send_h1},
    netns::Network,
    sidecar::Sidecar,
    wait::{self, until, within},
};

const SERVICES: &str = "
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: shop}
spec: {clusterIP: 198.19.0.10, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: reviews-v1, namespace: shop}
spec: {clusterIP: 198.19.0.11, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: reviews-v2, namespace: shop}
spec: {clusterIP: 198.19.0.12, ports: [{name: http, port: 80, targetPort: 8081}]}
---
apiVersion: v1
kind: Service
metadata: {name: ratings, namespace: shop}
spec: {clusterIP: 198.19.0.20, ports: [{name: http, port: 80, targetPort: 8082}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: reviews-1, namespace: shop, labels: {kubernetes.io/service-name: reviews}}
addressType: IPv4
endpoints: [{addresses: [198.18.0.3], targetRef: {kind: Pod, name: server, namespace: shop}}]
ports: [{name: http, port: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: reviews-v1-1, namespace: shop, labels: {kubernetes.io/service-name: reviews-v1}}
addressType: IPv4
endpoints: [{addresses: [198.18.0.3]}]
ports: [{name: http, port: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: reviews-v2-1, namespace: shop, labels: {kubernetes.io/service-name: reviews-v2}}
addressType: IPv4
endpoints: [{addresses: [198.18.0.3]}]
ports: [{name: http, port: 8081}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: ratings-1, namespace: shop, labels: {kubernetes.io/service-name: ratings}}
addressType: IPv4
endpoints: [{addresses: [198.18.0.3]}]
ports: [{name: http, port: 8082}]
";

fn canary(v1: u32, v2: u32) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: reviews, namespace: shop}}
spec:
  parentRefs: [{{group: '', kind: Service, name: reviews, port: 80}}]
  rules:
    - backendRefs:
        - {{name: reviews-v1, port: 80, weight: {v1}}}
        - {{name: reviews-v2, port: 80, weight: {v2}}}
"
    )
}

const RETRIES: &str = "apiVersion: policy.trellis.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: ratings, namespace: shop}
spec:
  targetRefs: [{group: '', kind: Service, name: ratings}]
  retry: {attempts: 10, retryOn: [5xx], backoff: {base: 1ms, max: 2ms}, budget: {percent: 100}}
";

/// Pods: client (0) and server (1) with sidecars, the control plane (2).
struct CpMesh {
    client: Sidecar,
    server: Sidecar,
    cp: ControlPlane,
    _apps: Vec<App>,
    net: Network,
}

impl CpMesh {
    async fn start(files: &[(&str, &str)]) -> CpMesh {
        let net = Network::new(3);
        let server_pod = net.pod(1).clone();
        let apps = vec![
            apps::http_app(server_pod.listen(8080), "v1"),
            apps::http_app(server_pod.listen(8081), "v2"),
            apps::failing_app(server_pod.listen(8082), "ratings", 503, 30.0),
        ];
        let cp = ControlPlane::start(net.pod(2), files).await;
        let server = cp.sidecar(&server_pod, "server").await;
        let client = cp.sidecar(net.pod(0), "client").await;
        CpMesh {
            client,
            server,
            cp,
            _apps: apps,
            net,
        }
    }

    /// One request from the client pod to a cluster IP, as an unchanged client does.
    async fn call(&self, cluster_ip: &str) -> (u16, String) {
        let addr: SocketAddr = format!("{cluster_ip}:80").parse().unwrap();
        let req = Request::get("/")
            .header("host", "reviews")
            .body(Full::new(Bytes::new()))
            .unwrap();
        match send_h1(self.net.pod(0), addr, req).await {
            Ok(response) => {
                let (status, headers, _) = collect(response).await.unwrap();
                let app = headers
                    .get("x-app")
                    .map(|v| v.to_str().unwrap().to_owned())
                    .unwrap_or_default();
                (status.as_u16(), app)
            }
            Err(_) => (0, String::new()),
        }
    }

    async fn share(&self, cluster_ip: &str, n: usize) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for _ in 0..n {
            *counts.entry(self.call(cluster_ip).await.1).or_default() += 1;
        }
        counts
    }

    /// Waits (bounded) until `check` holds for what the client sees.
    async fn until<F, Fut>(&self, what: &str, check: F)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<(), String>>,
    {
        if let Err(reason) = wait::poll(Duration::from_secs(15), check).await {
            panic!("{what} never happened ({reason}):\n{}", self.cp.log());
        }
    }

    /// Ok when 20 calls to `cluster_ip` all reach `app`.
    async fn all_from(&self, cluster_ip: &str, app: &str) -> Result<(), String> {
        let counts = self.share(cluster_ip, 20).await;
        match counts.get(app) {
            Some(20) => Ok(()),
            _ => Err(format!("{counts:?}")),
        }
    }

    /// Ok when some of `n` calls to `cluster_ip` fail (`failing`), or none do.
    async fn failures(&self, cluster_ip: &str, n: usize, failing: bool) -> Result<(), String> {
        let mut failed = 0;
        for _ in 0..n {
            if self.call(cluster_ip).await.0 != 200 {
                failed += 1;
            }
        }
        match (failed > 0) == failing {
            true => Ok(()),
            false => Err(format!("{failed} of {n} calls failed")),
        }
    }
}

fn files(route: &str) -> Vec<(&'static str, String)> {
    vec![
        ("services.yaml", SERVICES.to_owned()),
        ("route.yaml", route.to_owned()),
    ]
}

async fn start(route: &str) -> CpMesh {
    let files = files(route);
    let refs: Vec<(&str, &str)> = files.iter().map(|(n, t)| (*n, t.as_str())).collect();
    CpMesh::start(&refs).await
}

#[tokio::test]
async fn a_mesh_sent_in_many_parts_reaches_the_sidecars_whole() {
    // 600 more services, in a namespace that sorts first: the view goes in parts
    // of about 16 KiB, with `shop`'s services in the last ones.
    let mut filler = String::new();
    for i in 0..600 {
        filler += &format!(
            "apiVersion: v1
kind: Service
metadata: {{name: filler-{i}, namespace: filler}}
spec: {{clusterIP: 198.19.{}.{}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: filler-{i}-1, namespace: filler, labels: {{kubernetes.io/service-name: filler-{i}}}}}
addressType: IPv4
endpoints: [{{addresses: [198.18.0.3]}}]
ports: [{{name: http, port: 8080}}]
---
",
            10 + i / 200,
            1 + i % 200
        );
    }
    let mut files = files(&canary(100, 0));
    files.push(("filler.yaml", filler));
    let refs: Vec<(&str, &str)> = files.iter().map(|(n, t)| (*n, t.as_str())).collect();
    let mesh = CpMesh::start(&refs).await;
    let pushed = mesh.cp.admin_text("/metrics").await;
    let bytes: f64 = pushed
        .lines()
        .find_map(|l| l.strip_prefix("trellis_cp_push_bytes_sum "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap();
    assert!(
        bytes > 2.0 * 3.0 * 16384.0,
        "two views of 3 parts or more: {bytes}"
    );
    // A service from the first part and one from the last both route.
    assert_eq!(mesh.call("198.19.10.1").await, (200, "v1".to_owned()));
    assert_eq!(mesh.call("198.19.12.200").await, (200, "v1".to_owned()));
    mesh.until("reviews routes", || mesh.all_from("198.19.0.10", "v1"))
        .await;
}

#[tokio::test]
async fn editing_an_httproute_file_moves_traffic() {
    let mesh = start(&canary(90, 10)).await;
    let counts = mesh.share("198.19.0.10", 400).await;
    // Binomial(400, 0.1): standard deviation 6; 5 sigma is 30.
    let v2 = counts.get("v2").copied().unwrap_or(0);
    assert!((10..=70).contains(&v2), "{counts:?}");
    assert_eq!(
        counts.get("v1").copied().unwrap_or(0) + v2,
        400,
        "{counts:?}"
    );

    mesh.cp.write("route.yaml", &canary(0, 100));
    mesh.until("all traffic on v2", || mesh.all_from("198.19.0.10", "v2"))
        .await;

    // Both sidecars acknowledged the same, latest version.
    let proxies = mesh.cp.admin_json("/proxies").await;
    let list = proxies["proxies"].as_array().unwrap();
    assert_eq!(list.len(), 2, "{proxies}");
    let versions: Vec<_> = list.iter().map(|p| p["ackedVersion"].clone()).collect();
    assert_eq!(versions[0], versions[1], "{proxies}");
    let metrics = mesh.client.metrics().await;
    assert!(metrics.sum("trellis_requests_total", &[("service", "reviews.shop:80")]) >= 420.0);
    let _ = &mesh.server;
}

#[tokio::test]
async fn a_traffic_policy_file_turns_retries_on_and_deleting_it_restores_defaults() {
    let mesh = start(&canary(100, 0)).await;
    mesh.until("failures without retries", || {
        mesh.failures("198.19.0.20", 40, true)
    })
    .await;
    mesh.cp.write("retries.yaml", RETRIES);
    mesh.until("no failures with retries", || {
        mesh.failures("198.19.0.20", 100, false)
    })
    .await;
    // It stays that way.
    let mut failed = 0;
    for _ in 0..200 {
        if mesh.call("198.19.0.20").await.0 != 200 {
            failed += 1;
        }
    }
    assert_eq!(failed, 0, "with retries on");
    mesh.cp.remove("retries.yaml");
    mesh.until("failures again without the policy", || {
        mesh.failures("198.19.0.20", 40, true)
    })
    .await;
}

#[tokio::test]
async fn an_invalid_field_is_reported_with_file_and_field_and_changes_nothing() {
    let mesh = start(&canary(100, 0)).await;
    mesh.cp.write("retries.yaml", RETRIES);
    mesh.until("retries on", || mesh.failures("198.19.0.20", 100, false))
        .await;

    // A policy value the model refuses: reported, and the last good policy stays.
    mesh.cp.write(
        "retries.yaml",
        &RETRIES.replace("retryOn: [5xx]", "retryOn: [sometimes]"),
    );
    let message = until(Duration::from_secs(15), "rejected", || async {
        let status = mesh.cp.admin_json("/status").await;
        let found = status["objects"]
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["kind"] == "TrafficPolicy" && o["accepted"] == false)
            .cloned();
        let object = found.ok_or_else(|| format!("{status}"))?;
        let file = object["file"].as_str().unwrap_or("");
        assert!(
            file.ends_with("retries.yaml"),
            "the rejection names the file: {object}"
        );
        Ok(object["message"].as_str().unwrap().to_owned())
    })
    .await;
    assert!(message.contains("spec.retry.retryOn[0]"), "{message}");
    assert!(
        mesh.cp.log().contains("spec.retry.retryOn[0]"),
        "{}",
        mesh.cp.log()
    );
    let mut failed = 0;
    for _ in 0..100 {
        if mesh.call("198.19.0.20").await.0 != 200 {
            failed += 1;
        }
    }
    assert_eq!(failed, 0, "the last accepted policy must stay in effect");

    // A document that does not parse as its kind: the file is named with the field,
    // and its last good version stays.
    mesh.cp.write(
        "route.yaml",
        &canary(0, 100).replace("parentRefs: [", "parentRefs: 7 #["),
    );
    until(Duration::from_secs(15), "bad file reported", || async {
        let status = mesh.cp.admin_json("/status").await;
        let errors = status["fileErrors"].as_object().unwrap();
        let (file, error) = errors
            .iter()
            .find(|(f, _)| f.ends_with("route.yaml"))
            .ok_or_else(|| format!("{status}"))?;
        assert!(
            error.as_str().unwrap().contains("spec.parentRefs"),
            "{file}: {error}"
        );
        Ok(())
    })
    .await;
    let counts = mesh.share("198.19.0.10", 20).await;
    assert_eq!(
        counts.get("v1"),
        Some(&20),
        "the broken file changed traffic: {counts:?}"
    );
}

#[tokio::test]
async fn sidecars_ride_out_a_control_plane_restart_without_a_failed_request() {
    let mut mesh = start(&canary(100, 0)).await;
    let before = mesh.cp.admin_json("/proxies").await;
    assert_eq!(before["proxies"].as_array().unwrap().len(), 2);

    // Calls before, while the control plane is down (the sidecars see their
    // streams break and retry with backoff), and after it is back: counted, not
    // timed, so a slow machine makes no difference.
    let mut failed = 0;
    let mut total = 0;
    for _ in 0..50 {
        total += 1;
        failed += usize::from(mesh.call("198.19.0.10").await.0 != 200);
    }
    mesh.cp.kill();
    for _ in 0..100 {
        total += 1;
        failed += usize::from(mesh.call("198.19.0.10").await.0 != 200);
    }
    mesh.cp.restart().await;
    // The sidecars reconnect (with backoff) and converge on the new instance's version.
    let mesh = &mesh;
    let (failed, total) = (std::cell::Cell::new(failed), std::cell::Cell::new(total));
    until(Duration::from_secs(20), "sidecars converged", || async {
        total.set(total.get() + 1);
        failed.set(failed.get() + usize::from(mesh.call("198.19.0.10").await.0 != 200));
        let proxies = mesh.cp.admin_json("/proxies").await;
        let list = proxies["proxies"].as_array().unwrap();
        let acked: Vec<_> = list
            .iter()
            .filter(|p| p["connected"] == true)
            .map(|p| p["ackedVersion"].as_str().unwrap_or("").to_owned())
            .collect();
        match acked.len() == 2 && !acked[0].is_empty() && acked[0] == acked[1] {
            true => Ok(()),
            false => Err(format!("{proxies}")),
        }
    })
    .await;
    let (failed, total) = (failed.get(), total.get());
    assert_eq!(
        failed, 0,
        "{failed} of {total} requests failed across the restart"
    );
}

#[tokio::test]
async fn the_control_plane_records_a_nack_and_its_message() {
    use trellis_proto::v1::{discovery_client::DiscoveryClient, DiscoveryRequest, Nack, Node};
    let net = Network::new(2);
    let files = files(&canary(100, 0));
    let refs: Vec<(&str, &str)> = files.iter().map(|(n, t)| (*n, t.as_str())).collect();
    let cp = ControlPlane::start(net.pod(1), &refs).await;
    // A proxy that refuses whatever it is sent, speaking the real protocol.
    let pod = net.pod(0).clone();
    let addr: SocketAddr = format!("{}:15010", net.pod(1).ip).parse().unwrap();
    let channel = trellis_tests::grpc::channel(&pod, addr, "http://control-plane")
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(DiscoveryRequest {
        node: Some(Node {
            namespace: "shop".into(),
            pod: "picky".into(),
            ..Default::default()
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut responses = DiscoveryClient::new(channel)
        .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let first = within(
        Duration::from_secs(20),
        "the first discovery response",
        responses.message(),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(first.full);
    assert!(first
        .resources
        .iter()
        .any(|r| r.name == "service/shop/reviews/80"));
    tx.send(DiscoveryRequest {
        version: first.version.clone(),
        nonce: first.nonce.clone(),
        nack: Some(Nack {
            resource: "service/shop/reviews/80".into(),
            message: "routes[0]: not today".into(),
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    let nack = until(Duration::from_secs(10), "NACK recorded", || async {
        let proxies = cp.admin_json("/proxies").await;
        proxies["proxies"][0]["lastNack"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("{proxies}"))
    })
    .await;
    assert!(
        nack.contains("service/shop/reviews/80") && nack.contains("not today"),
        "{nack}"
    );
    let (_, _, metrics) = trellis_tests::http::get(&cp.pod, cp.admin(), "/metrics")
        .await
        .unwrap();
    let metrics = trellis_tests::prom::Metrics::parse(&String::from_utf8_lossy(&metrics));
    assert_eq!(metrics.sum("trellis_cp_nacks_total", &[]), 1.0);
}
