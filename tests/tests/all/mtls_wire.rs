//! What mesh mTLS means on the wire and to whom a pod answers. Between two meshed
//! pods, HTTP/1, HTTP/2, gRPC and opaque TCP reach the app unchanged while a
//! capture of the server pod's veth holds no byte of what was sent; the app's own
//! TLS passes through; a port that DISABLEs mTLS is called in plaintext. A
//! ServerPolicy's authorization lets in only the callers and requests it names:
//! 403 `AZ` for HTTP, a closed connection for opaque TCP.

use bytes::Bytes;
use http_body_util::Full;
use hyper::Request;
use std::time::Duration;
use trellis_tests::{
    grpc::echo_client,
    http::{collect, get_with_host, h2_client, send_h2},
    netns::{contains, Network},
    proto::EchoRequest,
    shop::{
        addr, echo, get, meshed_server, server_apps, tls_echo, wait_meshed, ECHO_GRPC, ECHO_TCP,
        REVIEWS, SECURE,
    },
    wait::until,
    TempDir,
};

const LIMIT: Duration = Duration::from_secs(20);

#[tokio::test]
async fn every_protocol_between_meshed_pods_is_encrypted_on_the_wire_and_arrives_unchanged() {
    // Pods: client (0), server (1), control plane (2), an outsider without a
    // sidecar (3).
    let net = Network::new(4);
    let apps = server_apps(net.pod(1));
    let secrets = TempDir::new("wire");
    let (cp, server) = meshed_server(&net, &secrets, &["frontend"], &[]).await;
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
    let (cp, server) = meshed_server(&net, &secrets, &["frontend", "cart"], &[]).await;
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
