//! Mutual TLS between two sidecars, end to end: both proxies get certificates from a
//! control plane acting as the mesh CA; the client's sidecar, knowing from the
//! EndpointSlice's pod who answers at the endpoint, calls it over mesh mTLS and
//! checks the peer is that identity; the server's sidecar terminates it, takes the
//! caller's certificate, and hands the request to the app as before. A STRICT port
//! refuses callers without mesh mTLS; a peer that is not who the config says is
//! refused by the caller.

use std::{net::SocketAddr, time::Duration};
use trellis_tests::{
    apps,
    control_plane::{ControlPlane, GRPC_PORT},
    http::get_with_host,
    netns::{Network, Pod},
    sidecar::{Options, Sidecar},
    wait::until,
    TempDir,
};

const MESH: &str = "
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: shop}
spec: {clusterIP: 198.19.0.10, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: reviews-1, namespace: shop, labels: {kubernetes.io/service-name: reviews}}
addressType: IPv4
endpoints: [{addresses: [198.18.0.3], targetRef: {kind: Pod, name: server, namespace: shop}}]
ports: [{name: http, port: 8080}]
";

const STRICT: &str = "apiVersion: policy.trellis.dev/v1alpha1
kind: ServerPolicy
metadata: {name: reviews, namespace: shop}
spec:
  targetRefs: [{group: '', kind: Service, name: reviews}]
  mtls: STRICT
";

fn pod(service_account: &str) -> String {
    format!(
        "apiVersion: v1
kind: Pod
metadata: {{name: server, namespace: shop}}
spec: {{serviceAccountName: {service_account}, containers: [{{name: app, image: reviews}}]}}
"
    )
}

const LIMIT: Duration = Duration::from_secs(20);

/// A sidecar in `pod` proving `token`'s identity to the control plane.
async fn meshed(pod: &Pod, name: &str, cp: &ControlPlane, anchors: &str, token: &str) -> Sidecar {
    let url = format!("https://{}:{GRPC_PORT}", cp.pod.ip);
    let ip = pod.ip.to_string();
    let args = [
        "--control-plane",
        url.as_str(),
        "--trust-anchors",
        anchors,
        "--identity-token-file",
        token,
        "--pod-namespace",
        "shop",
        "--pod-name",
        name,
        "--pod-ip",
        ip.as_str(),
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

#[tokio::test]
async fn http_between_two_sidecars_goes_over_mtls_to_the_identity_the_config_names() {
    // Pods: client (0), server (1), control plane (2), and a caller outside the
    // mesh (3, no sidecar).
    let net = Network::new(4);
    let _app = apps::http_app(net.pod(1).listen(8080), "reviews");
    let secrets = TempDir::new("mtls");
    let ca_dir = secrets.0.join("ca");
    let tokens = secrets.0.join("tokens");
    std::fs::write(
        &tokens,
        "client-token shop/frontend\nserver-token shop/reviews\n",
    )
    .unwrap();
    let token_file = |name: &str, token: &str| {
        let path = secrets.0.join(name);
        std::fs::write(&path, token).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let (client_token, server_token) = (
        token_file("client", "client-token"),
        token_file("server", "server-token"),
    );
    let args = [
        "--ca-dir",
        ca_dir.to_str().unwrap(),
        "--bootstrap-tokens",
        tokens.to_str().unwrap(),
    ];
    let cp = ControlPlane::start_with(
        net.pod(2),
        &[("mesh.yaml", MESH), ("pod.yaml", &pod("reviews"))],
        &args,
    )
    .await;
    let anchors = ca_dir.join("ca.crt").to_str().unwrap().to_owned();
    let server = meshed(net.pod(1), "server", &cp, &anchors, &server_token).await;
    let client = meshed(net.pod(0), "client", &cp, &anchors, &client_token).await;

    let reviews: SocketAddr = "198.19.0.10:80".parse().unwrap();
    let call = || async {
        get_with_host(net.pod(0), reviews, "/", "reviews.shop")
            .await
            .map(|(status, headers, _)| (status.as_u16(), headers))
            .map_err(|e| e.to_string())
    };
    let (status, headers) = until(LIMIT, "a call to reviews", || async {
        match call().await? {
            (200, headers) => Ok((200, headers)),
            (status, headers) => Err(format!("{status} {headers:?}")),
        }
    })
    .await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-app"], "reviews");
    let handshakes = server
        .metrics()
        .await
        .sum("trellis_tls_handshakes_total", &[("result", "ok")]);
    assert!(handshakes >= 1.0, "the server's sidecar accepted mesh mTLS");
    let inbound_tls = server.metrics().await.sum(
        "trellis_tcp_connections_total",
        &[("direction", "inbound"), ("protocol", "tls")],
    );
    assert!(inbound_tls >= 1.0);

    // PERMISSIVE, the default: a caller outside the mesh still gets through.
    let app: SocketAddr = "198.18.0.3:8080".parse().unwrap();
    let outsider = || async {
        get_with_host(net.pod(3), app, "/", "reviews")
            .await
            .map(|(status, _, _)| status.as_u16())
            .map_err(|e| e.to_string())
    };
    assert_eq!(outsider().await, Ok(200));
    // STRICT: only mesh mTLS.
    cp.write("strict.yaml", STRICT);
    until(LIMIT, "the outsider refused by the STRICT port", || async {
        match outsider().await {
            Err(_) => Ok(()),
            Ok(status) => Err(format!("still answered {status}")),
        }
    })
    .await;
    let refused = server
        .metrics()
        .await
        .sum("trellis_mtls_refused_total", &[("reason", "plaintext")]);
    assert!(refused >= 1.0);
    assert_eq!(
        call().await.map(|(status, _)| status),
        Ok(200),
        "mTLS still passes"
    );

    // The pod behind the endpoint now says it runs as another account: the server's
    // certificate no longer proves what the config expects, so the client's
    // sidecar refuses to talk to it.
    cp.write("pod.yaml", &pod("impostor"));
    let refused = until(LIMIT, "the call refused as the wrong peer", || async {
        match call().await? {
            (503, headers) => Ok(headers),
            (status, _) => Err(format!("still {status}")),
        }
    })
    .await;
    assert_eq!(refused["x-trellis-flags"], "UF");
    let reason = refused["x-trellis-error"].to_str().unwrap();
    assert!(reason.contains("/ns/shop/sa/impostor"), "{reason}");
    let _ = &client;
}
