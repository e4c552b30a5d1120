//! The admin port and the proxy's command line, as an operator meets them.

use std::net::SocketAddr;
use trellis_tests::{
    apps,
    control_plane::ControlPlane,
    http::{get, get_with_host},
    netns::Network,
    prom::{promtool_check, Metrics},
    sidecar::{admin, proxy_bin, run_refused, Options, Sidecar},
    TempDir,
};

#[tokio::test]
async fn admin_endpoints_answer() {
    let net = Network::new(1);
    let _sidecar = Sidecar::start(net.pod(0), Options::default()).await;
    let pod = net.pod(0);

    let (status, _, body) = get(pod, admin(), "/live").await.unwrap();
    assert_eq!((status.as_u16(), &body[..]), (200, &b"live\n"[..]));
    let (status, _, _) = get(pod, admin(), "/ready").await.unwrap();
    assert_eq!(status, 200);

    let (status, headers, body) = get(pod, admin(), "/config_dump").await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(headers["content-type"], "application/json");
    let dump = String::from_utf8_lossy(&body);
    assert!(
        dump.contains("\"services\": []"),
        "no config means passthrough: {dump}"
    );
    assert!(dump.contains("\"opaquePorts\""), "{dump}");

    let (status, _, _) = get(pod, admin(), "/nope").await.unwrap();
    assert_eq!(status, 404);
    let (status, _, _) = get(pod, admin(), "/shutdown").await.unwrap();
    assert_eq!(status, 405, "shutdown only on POST");

    let (_, headers, _) = get(pod, admin(), "/metrics").await.unwrap();
    assert!(headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
}

#[tokio::test]
async fn another_pod_gets_the_probes_and_metrics_but_not_the_config_or_shutdown() {
    let net = Network::new(2);
    let sidecar = Sidecar::start(net.pod(0), Options::default()).await;
    let (inside, other) = (net.pod(0), net.pod(1));
    let remote = SocketAddr::from((inside.ip, admin().port()));
    for path in ["/live", "/ready", "/metrics"] {
        let (status, _, _) = get(other, remote, path).await.unwrap();
        assert_eq!(status, 200, "{path} answers the kubelet and Prometheus");
    }
    let (status, _, body) = get(other, remote, "/config_dump").await.unwrap();
    assert_eq!(status, 403);
    assert_eq!(
        &body[..],
        b"/config_dump answers only callers inside the pod (loopback)\n"
    );
    let shutdown = hyper::Request::post("/shutdown")
        .header("host", remote.to_string())
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let response = trellis_tests::http::send_h1(other, remote, shutdown)
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    // Still serving: the refused shutdown changed nothing.
    let (status, _, _) = get(inside, admin(), "/ready").await.unwrap();
    assert_eq!(status, 200);
    let (status, _, _) = get(inside, admin(), "/config_dump").await.unwrap();
    assert_eq!(status, 200, "inside the pod it answers");
    let _ = &sidecar;
}

#[tokio::test]
async fn a_client_dialling_the_proxy_itself_gets_404_no_route() {
    let net = Network::new(1);
    let sidecar = Sidecar::start(net.pod(0), Options::default()).await;
    let outbound: SocketAddr = "127.0.0.1:15001".parse().unwrap();
    let (status, headers, _) = get_with_host(net.pod(0), outbound, "/", "unknown.default:80")
        .await
        .unwrap();
    assert_eq!(status, 404);
    assert_eq!(headers["x-trellis-flags"], "NR");
    let counted = sidecar.metrics().await.sum(
        "trellis_requests_total",
        &[("code", "404"), ("flags", "NR")],
    );
    assert_eq!(counted, 1.0);
}

#[test]
fn a_malformed_config_stops_start_up_naming_file_line_and_field() {
    let dir = TempDir::new("config");
    let path = dir.0.join("mesh.yaml");
    std::fs::write(
        &path,
        "services:\n  - name: reviews\n    port: 8080\n    endpoints:\n      - address: not-an-address\n",
    )
    .unwrap();
    let output = run_refused(&["--config".as_ref(), path.as_os_str()]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let expected = format!("{}:5:", path.display());
    assert!(stderr.contains(&expected), "names file and line: {stderr}");
    assert!(
        stderr.contains("services[0].endpoints[0].address"),
        "names the field: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn a_missing_config_file_is_named() {
    let output = std::process::Command::new(proxy_bin())
        .args(["run", "--config", "/nonexistent/trellis.yaml"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("/nonexistent/trellis.yaml") && stderr.contains("cannot read"),
        "{stderr}"
    );
}

#[tokio::test]
async fn with_a_control_plane_the_proxy_is_not_ready_until_its_first_config() {
    let net = Network::new(1);
    let pod = net.pod(0).clone();
    /// Kills the proxy however the test ends.
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    // Nothing listens there: the proxy keeps trying and must say why it is not ready.
    let _proxy = Kill(
        pod.command(proxy_bin().to_str().unwrap())
            .args(["run", "--control-plane", "http://127.0.0.1:1"])
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let answer = loop {
        if let Ok((status, _, body)) = get(&pod, admin(), "/ready").await {
            break (status, String::from_utf8_lossy(&body).into_owned());
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the admin port never answered"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(answer.0, 503);
    assert!(
        answer
            .1
            .contains("waiting for the first config from the control plane"),
        "{}",
        answer.1
    );
}

#[tokio::test]
async fn both_admin_ports_serve_metrics_that_promtool_accepts() {
    // A control plane in local mode (pod 1, beside the app) and a proxy it feeds
    // (pod 0); a few calls so that request counters and histograms exist.
    let net = Network::new(2);
    let (client, server) = (net.pod(0), net.pod(1));
    let _app = apps::http_app(server.listen(8080), "web");
    let mesh = format!(
        "apiVersion: v1
kind: Service
metadata: {{name: web, namespace: shop}}
spec: {{clusterIP: 198.19.0.30, ports: [{{name: http, port: 80, targetPort: 8080}}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-1, namespace: shop, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
endpoints: [{{addresses: [{}]}}]
ports: [{{name: http, port: 8080}}]
",
        server.ip
    );
    let cp = ControlPlane::start(server, &[("web.yaml", &mesh)]).await;
    let url = cp.url();
    let sidecar = Sidecar::start(
        client,
        Options {
            run_args: &["--control-plane", &url, "--pod-namespace", "shop"],
            ..Default::default()
        },
    )
    .await;
    let web: SocketAddr = "198.19.0.30:80".parse().unwrap();
    for path in ["/", "/status/503", "/"] {
        get_with_host(client, web, path, "web.shop").await.unwrap();
    }

    let (status, _, proxy) = get(client, admin(), "/metrics").await.unwrap();
    assert_eq!(status, 200, "proxy /metrics");
    let proxy = String::from_utf8_lossy(&proxy).into_owned();
    let (status, _, control_plane) = get(server, cp.admin(), "/metrics").await.unwrap();
    assert_eq!(status, 200, "control plane /metrics");
    let control_plane = String::from_utf8_lossy(&control_plane).into_owned();
    // Something to judge on each side.
    assert_eq!(
        Metrics::parse(&proxy).sum("trellis_requests_total", &[("service", "web.shop:80")]),
        3.0,
        "{proxy}\n{}",
        sidecar.log()
    );
    assert!(
        Metrics::parse(&control_plane).sum("trellis_cp_pushes_total", &[]) >= 1.0,
        "{control_plane}"
    );

    let verdicts = [
        ("the proxy's", promtool_check(&proxy)),
        ("the control plane's", promtool_check(&control_plane)),
    ];
    let problems: Vec<String> = verdicts
        .iter()
        .filter_map(|(whose, verdict)| {
            verdict
                .as_ref()
                .err()
                .map(|said| format!("{whose} /metrics: {said}"))
        })
        .collect();
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
