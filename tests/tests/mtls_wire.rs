//! What mesh mTLS means on the wire and to whom a pod answers. Between two meshed
//! pods, HTTP/1, HTTP/2, gRPC and opaque TCP reach the app unchanged while a
//! capture of the server pod's veth holds no byte of what was sent; the app's own
//! TLS passes through; a port that DISABLEs mTLS is called in plaintext. A
//! ServerPolicy's authorization lets in only the callers and requests it names:
//! 403 `AZ` for HTTP, a closed connection for opaque TCP.

use bytes::Bytes;
use http_body_util::Full;
use hyper::Request;
use std::{net::SocketAddr, sync::Arc, time::Duration};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use trellis_tests::{
    apps,
    control_plane::ControlPlane,
    grpc::echo_client,
    http::{collect, get_with_host, h2_client, send_h2, TIMEOUT},
    netns::{contains, Network, Pod},
    proto::EchoRequest,
    wait::until,
    TempDir,
};

const LIMIT: Duration = Duration::from_secs(20);

/// Four Services in front of the pod `server` (198.18.0.3), which runs as
/// `shop/reviews`; `frontend` (pod 0) and `cart` (pod 3) are callers.
const MESH: &str = "
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: shop}
spec: {clusterIP: 198.19.0.10, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: echo-grpc, namespace: shop}
spec: {clusterIP: 198.19.0.11, ports: [{name: grpc, port: 90, targetPort: 9090}]}
---
apiVersion: v1
kind: Service
metadata: {name: echo-tcp, namespace: shop}
spec: {clusterIP: 198.19.0.12, ports: [{name: tcp, port: 70, targetPort: 7000}]}
---
apiVersion: v1
kind: Service
metadata: {name: secure, namespace: shop}
spec: {clusterIP: 198.19.0.13, ports: [{name: tls, port: 443, targetPort: 8443}]}
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
metadata: {name: echo-grpc-1, namespace: shop, labels: {kubernetes.io/service-name: echo-grpc}}
addressType: IPv4
endpoints: [{addresses: [198.18.0.3], targetRef: {kind: Pod, name: server, namespace: shop}}]
ports: [{name: grpc, port: 9090}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: echo-tcp-1, namespace: shop, labels: {kubernetes.io/service-name: echo-tcp}}
addressType: IPv4
endpoints: [{addresses: [198.18.0.3], targetRef: {kind: Pod, name: server, namespace: shop}}]
ports: [{name: tcp, port: 7000}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: secure-1, namespace: shop, labels: {kubernetes.io/service-name: secure}}
addressType: IPv4
endpoints: [{addresses: [198.18.0.3], targetRef: {kind: Pod, name: server, namespace: shop}}]
ports: [{name: tls, port: 8443}]
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: shop}
spec: {serviceAccountName: reviews, containers: [{name: app, image: reviews}]}
";

const REVIEWS: &str = "198.19.0.10:80";
const ECHO_GRPC: &str = "198.19.0.11:90";
const ECHO_TCP: &str = "198.19.0.12:70";
const SECURE: &str = "198.19.0.13:443";

fn addr(text: &str) -> SocketAddr {
    text.parse().unwrap()
}

/// The server pod's apps: HTTP (1 and 2), gRPC, TCP echo and a TLS echo of its
/// own; the TLS app's certificate, for clients to trust.
struct Apps {
    _apps: Vec<apps::App>,
    tls_certificate: Vec<u8>,
}

fn server_apps(pod: &Pod) -> Apps {
    let (tls, tls_certificate) = apps::tls_echo_app(pod.listen(8443), "secure.shop");
    Apps {
        _apps: vec![
            apps::http_app(pod.listen(8080), "reviews"),
            apps::grpc_app(pod.listen(9090)),
            apps::tcp_echo_app(pod.listen(7000)),
            tls,
        ],
        tls_certificate,
    }
}

/// HTTP/1 GET from `pod` to reviews: the status and `x-trellis-flags`.
async fn get(pod: &Pod, path: &str) -> Result<(u16, String), String> {
    let (status, headers, _) = get_with_host(pod, addr(REVIEWS), path, "reviews.shop")
        .await
        .map_err(|e| e.to_string())?;
    let flags = headers
        .get("x-trellis-flags")
        .map(|v| v.to_str().unwrap_or_default().to_owned())
        .unwrap_or_default();
    Ok((status.as_u16(), flags))
}

/// Sends `payload` over opaque TCP from `pod` to `to` and reads it back.
async fn echo(pod: &Pod, to: SocketAddr, payload: &[u8]) -> Result<Vec<u8>, String> {
    let exchange = async {
        let mut stream = pod.connect(to).await.map_err(|e| e.to_string())?;
        stream.write_all(payload).await.map_err(|e| e.to_string())?;
        let mut back = vec![0u8; payload.len()];
        stream
            .read_exact(&mut back)
            .await
            .map_err(|e| format!("closed: {e}"))?;
        Ok(back)
    };
    tokio::time::timeout(TIMEOUT, exchange)
        .await
        .map_err(|_| "no echo in time".to_owned())?
}

/// Sends `payload` through the app's own TLS from `pod` to `to`, trusting only
/// the app's certificate, and reads it back.
async fn tls_echo(
    pod: &Pod,
    to: SocketAddr,
    app_certificate: &[u8],
    payload: &[u8],
) -> Result<Vec<u8>, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(app_certificate.to_vec().into())
        .map_err(|e| e.to_string())?;
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let exchange = async {
        let stream = pod.connect(to).await.map_err(|e| e.to_string())?;
        let name = rustls::pki_types::ServerName::try_from("secure.shop").unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, stream)
            .await
            .map_err(|e| format!("the app's TLS: {e}"))?;
        tls.write_all(payload).await.map_err(|e| e.to_string())?;
        let mut back = vec![0u8; payload.len()];
        tls.read_exact(&mut back).await.map_err(|e| e.to_string())?;
        Ok(back)
    };
    tokio::time::timeout(TIMEOUT, exchange)
        .await
        .map_err(|_| "no echo in time".to_owned())?
}

/// Waits until `pod`'s sidecar calls reviews over mesh mTLS and gets 200.
async fn wait_meshed(pod: &Pod) {
    until(LIMIT, "a 200 from reviews", || async {
        match get(pod, "/").await? {
            (200, _) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
}

#[tokio::test]
async fn every_protocol_between_meshed_pods_is_encrypted_on_the_wire_and_arrives_unchanged() {
    // Pods: client (0), server (1), control plane (2), an outsider without a
    // sidecar (3).
    let net = Network::new(4);
    let apps = server_apps(net.pod(1));
    let secrets = TempDir::new("wire");
    let cp = ControlPlane::issuing(
        net.pod(2),
        &[("mesh.yaml", MESH)],
        &secrets,
        &["frontend", "reviews"],
        &[],
    )
    .await;
    let server = cp
        .meshed_sidecar(net.pod(1), "server", &secrets, "reviews")
        .await;
    let _client = cp
        .meshed_sidecar(net.pod(0), "client", &secrets, "frontend")
        .await;
    let client = net.pod(0);
    wait_meshed(client).await;

    let capture = net.pod(1).capture("eth0");
    // HTTP/1.
    let (status, _) = get(client, "/wire-secret-http1").await.unwrap();
    assert_eq!(status, 200);
    // HTTP/2.
    let mut h2 = h2_client(client, addr(REVIEWS)).await.unwrap();
    let req = Request::get("http://reviews.shop/wire-secret-h2")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (status, headers, _) = collect(send_h2(&mut h2, req).await.unwrap()).await.unwrap();
    assert_eq!(status.as_u16(), 200);
    assert_eq!(headers["x-app"], "reviews");
    // gRPC.
    let mut grpc = echo_client(client, addr(ECHO_GRPC)).await.unwrap();
    let reply = grpc
        .unary(EchoRequest {
            message: "wire-secret-grpc".into(),
        })
        .await
        .unwrap();
    assert_eq!(reply.into_inner().message, "wire-secret-grpc");
    // Opaque TCP.
    let back = echo(client, addr(ECHO_TCP), b"wire-secret-opaque").await;
    assert_eq!(back.as_deref(), Ok(&b"wire-secret-opaque"[..]));
    // The app's own TLS, inside mesh mTLS from a meshed caller and as it is from
    // the outsider: the client sees the app's certificate and its echo.
    let cert = &apps.tls_certificate;
    let back = tls_echo(client, addr(SECURE), cert, b"wire-secret-app-tls").await;
    assert_eq!(back.as_deref(), Ok(&b"wire-secret-app-tls"[..]));
    let direct = addr("198.18.0.3:8443");
    let back = tls_echo(net.pod(3), direct, cert, b"wire-secret-app-tls").await;
    assert_eq!(back.as_deref(), Ok(&b"wire-secret-app-tls"[..]));
    // What the capture can see: plaintext from the outsider (PERMISSIVE).
    let outsider = get_with_host(net.pod(3), addr("198.18.0.3:8080"), "/wire-visible", "x")
        .await
        .unwrap();
    assert_eq!(outsider.0, 200);
    let wire = capture.stop();

    assert!(
        contains(&wire, b"/wire-visible"),
        "the capture sees plaintext ({} bytes captured)",
        wire.len()
    );
    for secret in [
        &b"wire-secret-http1"[..],
        b"wire-secret-h2",
        b"wire-secret-grpc",
        b"wire-secret-opaque",
        b"wire-secret-app-tls",
    ] {
        assert!(
            !contains(&wire, secret),
            "{} crossed the wire in plaintext",
            String::from_utf8_lossy(secret)
        );
    }
    // The opaque bytes arrived inside mesh mTLS, not beside it.
    let inbound_opaque = server.metrics().await.sum(
        "trellis_tcp_connections_total",
        &[("direction", "inbound"), ("protocol", "opaque")],
    );
    assert_eq!(
        inbound_opaque, 0.0,
        "no plaintext opaque connection arrived"
    );

    // DISABLE: the caller is told the port takes no mesh mTLS and sends plaintext.
    cp.write(
        "disable.yaml",
        "apiVersion: policy.trellis.dev/v1alpha1
kind: ServerPolicy
metadata: {name: reviews, namespace: shop}
spec:
  targetRefs: [{group: '', kind: Service, name: reviews}]
  mtls: DISABLE
",
    );
    until(LIMIT, "a plaintext call to the DISABLEd port", || async {
        let capture = net.pod(1).capture("eth0");
        let status = get(client, "/wire-disabled").await;
        let wire = capture.stop();
        match status {
            Ok((200, _)) if contains(&wire, b"/wire-disabled") => Ok(()),
            other => Err(format!("{other:?}, still encrypted")),
        }
    })
    .await;
}

const AUTHORIZED: &str = "apiVersion: policy.trellis.dev/v1alpha1
kind: ServerPolicy
metadata: {name: reviews, namespace: shop}
spec:
  targetRefs: [{group: '', kind: Service, name: reviews}]
  mtls: STRICT
  authorization:
    action: ALLOW
    rules:
      - from: [{serviceAccounts: [shop/frontend]}]
        to: [{methods: [GET], paths: ['/api/*']}]
---
apiVersion: policy.trellis.dev/v1alpha1
kind: ServerPolicy
metadata: {name: echo-tcp, namespace: shop}
spec:
  targetRefs: [{group: '', kind: Service, name: echo-tcp}]
  authorization:
    action: DENY
    rules:
      - from: [{identities: ['spiffe://cluster.local/ns/shop/sa/cart']}]
";

#[tokio::test]
async fn a_server_policy_lets_in_only_the_callers_and_requests_it_allows() {
    // Pods: frontend (0), server (1), control plane (2), cart (3).
    let net = Network::new(4);
    let _apps = server_apps(net.pod(1));
    let secrets = TempDir::new("authz");
    let cp = ControlPlane::issuing(
        net.pod(2),
        &[("mesh.yaml", MESH)],
        &secrets,
        &["frontend", "reviews", "cart"],
        &[],
    )
    .await;
    let server = cp
        .meshed_sidecar(net.pod(1), "server", &secrets, "reviews")
        .await;
    let _frontend = cp
        .meshed_sidecar(net.pod(0), "frontend", &secrets, "frontend")
        .await;
    let _cart = cp
        .meshed_sidecar(net.pod(3), "cart", &secrets, "cart")
        .await;
    let (frontend, cart) = (net.pod(0), net.pod(3));
    wait_meshed(frontend).await;
    wait_meshed(cart).await;

    cp.write("authorization.yaml", AUTHORIZED);
    until(LIMIT, "cart refused by the policy", || async {
        match get(cart, "/api/items").await? {
            (403, flags) if flags == "AZ" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert_eq!(get(frontend, "/api/items").await, Ok((200, String::new())));
    assert_eq!(
        get(frontend, "/admin").await,
        Ok((403, "AZ".into())),
        "a path no rule allows"
    );
    let post = Request::post("/api/items")
        .header("host", "reviews.shop")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = trellis_tests::http::send_h1(frontend, addr(REVIEWS), post)
        .await
        .unwrap();
    assert_eq!(response.status(), 403, "a method no rule allows");

    // Opaque TCP: the DENY rule names cart; frontend still gets its echo.
    assert_eq!(
        echo(frontend, addr(ECHO_TCP), b"hello").await.as_deref(),
        Ok(&b"hello"[..])
    );
    let refused = echo(cart, addr(ECHO_TCP), b"hello").await;
    assert!(refused.is_err(), "cart's connection closed: {refused:?}");

    let metrics = server.metrics().await;
    let denied = |protocol| metrics.sum("trellis_authz_denied_total", &[("protocol", protocol)]);
    assert!(denied("http") >= 3.0, "{}", denied("http"));
    assert!(denied("opaque") >= 1.0, "{}", denied("opaque"));
}
