//! Routes, faults and limits end to end: the client sidecar's config names
//! services in the server pod; header canaries and weighted splits, a request no
//! route takes, injected faults, rate limits outbound and inbound, gRPC calls
//! that are retried or answered with a gRPC status, and HTTP/1.1 between plaintext
//! sidecars that stays HTTP/1.1 however busy, as the unchanged client and app see
//! them.

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use std::{
    collections::HashMap,
    time::{Duration, Instant},
};
use trellis_tests::{
    grpc::{channel, echo_client},
    http::{collect, get, send_h1},
    mesh::{Mesh, BROKEN, GRPC, HTTP},
    policy::{app, call, config, flags, service, SERVER},
    proto::EchoRequest,
};

#[tokio::test]
async fn header_canary_and_weighted_split() {
    let routes = "routes:
  - name: canary
    matches: [{headers: [{name: x-canary, value: 'true'}]}]
    backends: [{name: v2, port: 80}]
  - name: split
    backends: [{name: v1, port: 80, weight: 90}, {name: v2, port: 80, weight: 10}]";
    let cfg = config(&[
        service("reviews", 80, &[], routes),
        service("v1", 80, &[HTTP], ""),
        service("v2", 80, &[HTTP + 1], ""),
    ]);
    let mesh = Mesh::start_with_config(&[], &[], Some(&cfg)).await;
    for _ in 0..20 {
        let (_, headers) = call(&mesh, "reviews.shop", "/", &[("x-canary", "true")]).await;
        assert_eq!(
            app(&headers),
            "server-b",
            "x-canary: true always reaches v2"
        );
    }
    let mut counts: HashMap<String, usize> = HashMap::new();
    for _ in 0..1000 {
        *counts
            .entry(app(&call(&mesh, "reviews.shop", "/", &[]).await.1))
            .or_default() += 1;
    }
    // Binomial(1000, 0.1): standard deviation 9.5; 5 sigma is 47.
    let canary = counts.get("server-b").copied().unwrap_or(0);
    assert!((53..=147).contains(&canary), "{counts:?}");
    let metrics = mesh.client.metrics().await;
    assert_eq!(
        metrics.sum("trellis_requests_total", &[("route", "canary")]),
        20.0
    );
    assert_eq!(
        metrics.sum(
            "trellis_requests_total",
            &[("route", "split"), ("backend", "v2.shop:80")]
        ),
        canary as f64
    );
}

#[tokio::test]
async fn no_matching_route_is_404_nr_and_the_access_log_says_so() {
    let cfg = config(&[service(
        "api",
        80,
        &[HTTP],
        "routes:\n  - matches: [{path: {value: /api}}]",
    )]);
    let mesh = Mesh::start_with_config(&["--access-log"], &[], Some(&cfg)).await;
    assert_eq!(call(&mesh, "api.shop", "/api/items", &[]).await.0, 200);
    let (status, headers) = call(&mesh, "api.shop", "/other", &[]).await;
    assert_eq!((status.as_u16(), flags(&headers)), (404, "NR"));
    let log = mesh.client.log();
    let line = log
        .lines()
        .find(|l| l.contains("access") && l.contains("/other"))
        .unwrap_or_else(|| panic!("no access log line for /other:\n{log}"));
    for field in ["status=404", "NR", "api.shop:80", "method=GET"] {
        assert!(line.contains(field), "{field} missing from {line}");
    }
    assert!(
        log.lines()
            .any(|l| l.contains("access") && l.contains("/api/items") && l.contains("status=200")),
        "{log}"
    );
}

#[tokio::test]
async fn fault_abort_at_50_percent_and_delay_on_test_traffic_only() {
    let routes = "routes:
  - matches: [{headers: [{name: x-test, type: Present}]}]
    policy: {fault: {delay: {fixed: 300ms, percent: 100}}}
  - policy: {fault: {abort: {httpStatus: 418, percent: 50}}}";
    let cfg = config(&[service("faulty", 80, &[HTTP], routes)]);
    let mesh = Mesh::start_with_config(&[], &[], Some(&cfg)).await;
    let mut aborted = 0;
    for _ in 0..1000 {
        let (status, headers) = call(&mesh, "faulty.shop", "/", &[]).await;
        if status == 418 {
            assert_eq!(flags(&headers), "FI");
            aborted += 1;
        }
    }
    // Binomial(1000, 0.5): standard deviation 15.8; 5 sigma is 79.
    assert!((421..=579).contains(&aborted), "{aborted} of 1000 aborted");
    let start = Instant::now();
    let (status, headers) = call(&mesh, "faulty.shop", "/", &[("x-test", "1")]).await;
    assert_eq!((status.as_u16(), flags(&headers)), (200, "DI"));
    assert!(start.elapsed() >= Duration::from_millis(300));
    let metrics = mesh.client.metrics().await;
    assert_eq!(
        metrics.sum("trellis_faults_injected_total", &[("kind", "abort")]),
        aborted as f64
    );
    assert_eq!(
        metrics.sum("trellis_faults_injected_total", &[("kind", "delay")]),
        1.0
    );
}

#[tokio::test]
async fn rate_limits_outbound_per_key_and_inbound_per_port() {
    let cfg = config(&[service(
        "limited",
        80,
        &[HTTP],
        "policy:\n  rateLimit: {maxTokens: 3, fillInterval: 1h, keyHeader: x-user}",
    )]);
    let inbound = "inbound:
  - port: 8081
    rateLimit: {maxTokens: 2, fillInterval: 1h}
  - port: 8083
    rateLimit: {maxTokens: 1, fillInterval: 1h, keyHeader: x-user}
";
    let mesh = Mesh::start_with_configs(&[], &[], Some(&cfg), Some(inbound)).await;
    for user in ["ann", "bob"] {
        for _ in 0..3 {
            assert_eq!(
                call(&mesh, "limited.shop", "/", &[("x-user", user)])
                    .await
                    .0,
                200
            );
        }
        let (status, headers) = call(&mesh, "limited.shop", "/", &[("x-user", user)]).await;
        assert_eq!(
            (status.as_u16(), flags(&headers)),
            (429, "RL"),
            "{user}'s fourth request"
        );
    }
    // Inbound: the server sidecar limits calls to its pod's port 8081 only.
    let b = mesh.server_addr(HTTP + 1);
    assert_eq!(get(mesh.client_pod(), b, "/").await.unwrap().0, 200);
    assert_eq!(get(mesh.client_pod(), b, "/").await.unwrap().0, 200);
    let (status, headers, _) = get(mesh.client_pod(), b, "/").await.unwrap();
    assert_eq!((status.as_u16(), flags(&headers)), (429, "RL"));
    assert_eq!(
        get(mesh.client_pod(), mesh.server_addr(HTTP), "/")
            .await
            .unwrap()
            .0,
        200
    );
    // Inbound with keyHeader: a bucket per caller, and one for callers without it
    // (the app behind it answers 500 to whatever it is let through).
    let a = mesh.server_addr(BROKEN);
    let as_user = |user: &'static str| {
        let pod = mesh.client_pod().clone();
        async move {
            let req = Request::get("/")
                .header("host", a.to_string())
                .header("x-user", user)
                .body(Full::new(Bytes::new()))
                .unwrap();
            let response = send_h1(&pod, a, req).await.unwrap();
            collect(response).await.unwrap().0.as_u16()
        }
    };
    assert_eq!(as_user("ann").await, 500);
    assert_eq!(as_user("ann").await, 429, "ann's bucket is spent");
    assert_eq!(as_user("bob").await, 500, "bob has a bucket of his own");
    assert_eq!(get(mesh.client_pod(), a, "/").await.unwrap().0, 500);
    assert_eq!(
        mesh.server
            .metrics()
            .await
            .sum("trellis_ratelimited_total", &[]),
        2.0
    );
}

#[tokio::test]
async fn grpc_retries_unavailable_and_faults_answer_with_a_grpc_status() {
    let port = GRPC.to_string();
    let cfg = format!(
        "services:
  - name: echo
    namespace: shop
    port: {port}
    endpoints: [{{address: {SERVER}:{port}}}]
    routes:
      - matches: [{{headers: [{{name: x-fault, type: Present}}]}}]
        policy: {{fault: {{abort: {{grpcStatus: RESOURCE_EXHAUSTED, httpStatus: 503}}}}}}
      - matches: [{{headers: [{{name: x-void, type: Present}}]}}]
        backends: [{{name: void, port: {port}}}]
      - policy: {{retry: {{attempts: 2, retryOn: [unavailable], backoff: {{base: 1ms, max: 2ms}}}}}}
  - {{name: void, namespace: shop, port: {port}}}
"
    );
    let mesh = Mesh::start_with_config(&[], &[], Some(&cfg)).await;
    // The channel dials the server pod; :authority names the service.
    let channel = channel(
        mesh.client_pod(),
        mesh.server_addr(GRPC),
        &format!("http://echo.shop:{port}"),
    )
    .await
    .unwrap();
    let mut client = trellis_tests::proto::echo_client::EchoClient::new(channel);
    for i in 0..10 {
        let reply = client
            .unary(EchoRequest {
                message: format!("flaky {i}"),
            })
            .await
            .expect("retried past UNAVAILABLE");
        assert_eq!(reply.into_inner().message, format!("flaky {i}"));
    }
    assert_eq!(
        mesh.client
            .metrics()
            .await
            .sum("trellis_retries_total", &[]),
        10.0
    );

    let mut req = tonic::Request::new(EchoRequest {
        message: "hi".into(),
    });
    req.metadata_mut().insert("x-fault", "1".parse().unwrap());
    let status = client.unary(req).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    assert_eq!(status.message(), "fault injected");
    // What the proxy answers itself, a gRPC client reads as a gRPC status.
    let mut req = tonic::Request::new(EchoRequest {
        message: "hi".into(),
    });
    req.metadata_mut().insert("x-void", "1".parse().unwrap());
    let status = client.unary(req).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert_eq!(
        status.message(),
        format!("backend void.shop:{port} has no endpoints")
    );
    // Passthrough gRPC (no service named) still works.
    let mut plain = echo_client(mesh.client_pod(), mesh.server_addr(GRPC))
        .await
        .unwrap();
    assert!(plain
        .unary(EchoRequest {
            message: "x".into()
        })
        .await
        .is_ok());
}

#[tokio::test]
async fn between_plaintext_sidecars_http1_stays_http1_however_busy() {
    // The endpoint's identity is known (a pod with a sidecar), but neither proxy
    // has a certificate: HTTP/1 is carried over HTTP/2 only inside mesh mTLS.
    let cfg = format!(
        "services:
  - name: web
    namespace: shop
    port: 80
    endpoints: [{{address: '{SERVER}:{HTTP}', identity: {{namespace: shop, serviceAccount: web}}}}]
"
    );
    let mesh = Mesh::start_with_config(&[], &[], Some(&cfg)).await;
    let held =
        futures_util::future::join_all((0..4).map(|_| call(&mesh, "web.shop", "/slow/3000", &[])));
    let busy = async {
        let at_app = mesh
            .app(HTTP)
            .until_in_flight(4, "four slow requests at the app");
        at_app.await;
        let (status, headers) = call(&mesh, "web.shop", "/", &[]).await;
        assert_eq!(status, 200);
        assert_eq!(headers["x-seen-version"], "HTTP/1.1");
    };
    let (held, ()) = tokio::join!(held, busy);
    assert!(held.iter().all(|(status, _)| *status == 200));
    let http2_in = mesh.server.metrics().await.sum(
        "trellis_tcp_connections_total",
        &[("direction", "inbound"), ("protocol", "http2")],
    );
    assert_eq!(http2_in, 0.0);
    assert_eq!(mesh.hops("http1", "200").await, (5.0, 5.0));
}
