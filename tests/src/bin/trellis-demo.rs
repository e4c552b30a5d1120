//! The local mesh demo: the control plane in local mode serving `examples/mesh`, and
//! two pods (network namespaces) with sidecars behind real iptables rules. The
//! `frontend` pod calls `reviews` by its cluster IP, as an unchanged client does;
//! the demo then edits the HTTPRoute from a 90/10 canary to 0/100 and shows the
//! traffic moving, then what each sidecar saw, read from its metrics.

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use std::{collections::BTreeMap, net::SocketAddr, time::Duration};
use trellis_tests::{
    apps,
    control_plane::ControlPlane,
    http::{collect, send_h1},
    netns::{Network, Pod},
    sidecar::{Options, Sidecar},
    wait::until,
};

const REQUESTS: usize = 200;
const REVIEWS: &str = "198.19.0.10:80";

fn example(name: &str) -> String {
    let path = format!("{}/../examples/mesh/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

async fn sidecar(pod: &Pod, cp: &ControlPlane, name: &str) -> Sidecar {
    let (url, ip) = (cp.url(), pod.ip.to_string());
    let args = [
        "--control-plane",
        &url,
        "--pod-name",
        name,
        "--pod-namespace",
        "shop",
        "--pod-ip",
        &ip,
    ];
    Sidecar::start(
        pod,
        Options {
            run_args: &args,
            ..Default::default()
        },
    )
    .await
}

/// Calls `reviews` `REQUESTS` times and counts which version answered.
async fn traffic(frontend: &Pod) -> BTreeMap<String, usize> {
    let addr: SocketAddr = REVIEWS.parse().unwrap();
    let mut counts = BTreeMap::new();
    for _ in 0..REQUESTS {
        let req = Request::get("/")
            .header("host", "reviews.shop")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let served = match send_h1(frontend, addr, req).await {
            Ok(response) => {
                let (status, headers, _) = collect(response).await.expect("read reviews");
                match headers.get("x-app") {
                    Some(app) => app.to_str().unwrap_or("?").to_owned(),
                    None => format!("proxy {status}"),
                }
            }
            Err(e) => format!("failed: {e}"),
        };
        *counts.entry(served).or_default() += 1;
    }
    counts
}

fn show(counts: &BTreeMap<String, usize>) {
    for (version, count) in counts {
        let bar = "#".repeat(count * 40 / REQUESTS);
        println!("    {version:<12} {count:>4}  {bar}");
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let net = Network::new(3);
    let (frontend, reviews, control) = (net.pod(0), net.pod(1), net.pod(2));
    println!(
        "pods (network namespaces): frontend {}, reviews {}, control plane {}",
        frontend.ip, reviews.ip, control.ip
    );
    let _apps = [
        apps::http_app(reviews.listen(8080), "reviews-v1"),
        apps::http_app(reviews.listen(8081), "reviews-v2"),
    ];
    let files = [
        ("services.yaml", example("services.yaml")),
        ("route.yaml", example("route.yaml")),
        ("policy.yaml", example("policy.yaml")),
    ];
    let refs: Vec<(&str, &str)> = files.iter().map(|(n, t)| (*n, t.as_str())).collect();
    let cp = ControlPlane::start(control, &refs).await;
    println!(
        "control plane (local mode) serving examples/mesh at {}",
        cp.url()
    );
    let reviews_sidecar = sidecar(reviews, &cp, "reviews").await;
    let frontend_sidecar = sidecar(frontend, &cp, "frontend").await;
    println!("sidecars ready: both have their first config from the control plane\n");

    println!("frontend calls reviews ({REVIEWS}) {REQUESTS} times, HTTPRoute weights 90/10:");
    show(&traffic(frontend).await);

    println!("\nediting route.yaml: weights 0/100 ...");
    cp.write(
        "route.yaml",
        &example("route.yaml")
            .replace("weight: 90", "weight: 0")
            .replace("weight: 10", "weight: 100"),
    );
    // Wait (bounded) until both sidecars acknowledged a newer version.
    let before = cp.admin_json("/proxies").await;
    let acked_versions = |proxies: &serde_json::Value| -> Vec<serde_json::Value> {
        proxies["proxies"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| p["ackedVersion"].clone())
            .collect()
    };
    let old = acked_versions(&before);
    let acked = until(
        Duration::from_secs(15),
        "both sidecars acknowledged the change",
        || async {
            let now = cp.admin_json("/proxies").await;
            let acked = acked_versions(&now);
            match acked.len() == 2 && acked.iter().all(|v| !old.contains(v)) {
                true => Ok(acked),
                false => Err(format!("{now}")),
            }
        },
    )
    .await;
    println!("both sidecars acknowledged version {}", acked[0]);
    println!("frontend calls reviews {REQUESTS} times again:");
    show(&traffic(frontend).await);

    println!("\nwhat the sidecars saw (from their /metrics):");
    let outbound = frontend_sidecar.metrics().await;
    for backend in ["reviews-v1.shop:80", "reviews-v2.shop:80"] {
        let count = outbound.sum(
            "trellis_requests_total",
            &[("direction", "outbound"), ("backend", backend)],
        );
        println!("  frontend sidecar, outbound to {backend:<20} {count:>5}");
    }
    let labels = [("direction", "outbound"), ("service", "reviews.shop:80")];
    let seconds = outbound.sum("trellis_request_duration_seconds_sum", &labels);
    let count = outbound.sum("trellis_request_duration_seconds_count", &labels);
    if count > 0.0 {
        println!(
            "  frontend sidecar, mean latency to reviews  {:.2} ms",
            seconds / count * 1000.0
        );
    }
    let inbound = reviews_sidecar
        .metrics()
        .await
        .sum("trellis_requests_total", &[("direction", "inbound")]);
    println!("  reviews sidecar, inbound requests            {inbound:>5}");
}
