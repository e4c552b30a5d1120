//! The local mesh demo: three pods (network namespaces) with sidecars behind real
//! iptables rules. `frontend` calls the `web` and `api` services by name; afterwards
//! the demo prints what each sidecar saw, read from its metrics.

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use std::{collections::BTreeMap, net::SocketAddr};
use trellis_tests::{
    apps,
    http::{collect, get_with_host, h2_client},
    netns::Network,
    sidecar::{Options, Sidecar},
};

const REQUESTS: usize = 50;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let net = Network::new(3);
    let (frontend, web, api) = (net.pod(0), net.pod(1), net.pod(2));
    println!(
        "pods (network namespaces): frontend {}, web {}, api {}",
        frontend.ip, web.ip, api.ip
    );

    let _apps = [
        apps::http_app(web.listen(8080), "web"),
        apps::http_app(api.listen(9090), "api-1"),
        apps::http_app(api.listen(9091), "api-2"),
    ];
    let config = format!(
        "services:
  - name: web
    namespace: demo
    port: 8080
    endpoints: [{{address: {web}:8080}}]
  - name: api
    namespace: demo
    port: 9090
    endpoints: [{{address: {api}:9090}}, {{address: {api}:9091}}]
",
        web = web.ip,
        api = api.ip
    );
    let web_sidecar = Sidecar::start(web, Options::default()).await;
    let api_sidecar = Sidecar::start(api, Options::default()).await;
    let frontend_sidecar = Sidecar::start(
        frontend,
        Options {
            config: Some(&config),
            ..Default::default()
        },
    )
    .await;
    println!(
        "sidecars ready; frontend's sidecar knows web.demo:8080 and api.demo:9090 (2 endpoints)\n"
    );

    // The frontend dials the pod address it has and names the service in Host, as
    // an application resolving a service name would; its sidecar does the rest.
    let mut served_by: BTreeMap<String, usize> = BTreeMap::new();
    let web_addr = SocketAddr::from((web.ip, 8080));
    for _ in 0..REQUESTS {
        let (_, headers, _) = get_with_host(frontend, web_addr, "/", "web.demo:8080")
            .await
            .expect("call web");
        *served_by.entry(app_name(&headers)).or_default() += 1;
    }
    // The api is called over HTTP/2 (h2c), many streams on one connection.
    let api_addr = SocketAddr::from((api.ip, 9090));
    let h2 = h2_client(frontend, api_addr).await.expect("connect to api");
    for i in 0..REQUESTS {
        let path = if i % 10 == 9 { "/status/503" } else { "/" };
        let req = Request::get(format!("http://api.demo:9090{path}"))
            .version(http::Version::HTTP_2)
            .body(Full::new(Bytes::new()))
            .unwrap();
        let (_, headers, _) = collect(h2.clone().send_request(req).await.expect("call api"))
            .await
            .expect("read api");
        *served_by.entry(app_name(&headers)).or_default() += 1;
    }

    println!("frontend -> services, as the frontend's sidecar (outbound) counted them:");
    let outbound = frontend_sidecar.metrics().await;
    println!(
        "  {:<18} {:>8} {:>6} {:>6} {:>12}",
        "service", "requests", "2xx", "5xx", "mean latency"
    );
    for service in ["web.demo:8080", "api.demo:9090"] {
        let labels = [("direction", "outbound"), ("service", service)];
        let total = outbound.sum("trellis_requests_total", &labels);
        let ok = outbound.sum(
            "trellis_requests_total",
            &[labels[0], labels[1], ("code", "200")],
        );
        let failed = outbound.sum(
            "trellis_requests_total",
            &[labels[0], labels[1], ("code", "503")],
        );
        let seconds = outbound.sum("trellis_request_duration_seconds_sum", &labels);
        let count = outbound.sum("trellis_request_duration_seconds_count", &labels);
        let mean_ms = if count > 0.0 {
            seconds / count * 1000.0
        } else {
            0.0
        };
        println!("  {service:<18} {total:>8} {ok:>6} {failed:>6} {mean_ms:>9.2} ms");
    }
    println!("\nrequests each server pod's sidecar (inbound) received:");
    for (pod, sidecar) in [("web", &web_sidecar), ("api", &api_sidecar)] {
        let received = sidecar
            .metrics()
            .await
            .sum("trellis_requests_total", &[("direction", "inbound")]);
        println!("  {pod:<18} {received:>8}");
    }
    println!(
        "\nresponses by the app instance that served them (round robin across api's endpoints):"
    );
    for (app, count) in &served_by {
        println!("  {app:<18} {count:>8}");
    }
}

fn app_name(headers: &http::HeaderMap) -> String {
    headers
        .get("x-app")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("(proxy)")
        .to_owned()
}
