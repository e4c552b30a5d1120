//! Traffic policy end to end: the client sidecar's config names services in the
//! server pod and the policy on their routes; misbehaving apps in the server pod
//! (30 % 503s, resets, slow answers, an endpoint that always fails) show what each
//! policy does for the unchanged client.

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::Full;
use std::{
    collections::HashMap,
    time::{Duration, Instant},
};
use trellis_tests::{
    grpc::{channel, echo_client},
    http::{collect, get, send_h1},
    mesh::{Mesh, BROKEN, FLAKY, GRPC, HTTP, RESET},
    proto::EchoRequest,
    wait::until,
};

const SERVER: &str = "198.18.0.3";

/// A client config with one service `name.shop` on `port`, whose endpoints are the
/// server pod's `ports`, with `extra` YAML (policy, routes) indented under it.
fn service(name: &str, port: u16, ports: &[u16], extra: &str) -> String {
    let endpoints: String = ports
        .iter()
        .map(|p| format!("      - address: {SERVER}:{p}\n"))
        .collect();
    let extra: String = extra.lines().map(|l| format!("    {l}\n")).collect();
    format!("  - name: {name}\n    namespace: shop\n    port: {port}\n    endpoints:\n{endpoints}{extra}")
}

fn config(services: &[String]) -> String {
    format!("services:\n{}", services.concat())
}

/// One request from the client pod to `host` (a service name), with headers.
async fn call(
    mesh: &Mesh,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, HeaderMap) {
    let mut req = Request::get(path).header("host", host);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(Bytes::new())).unwrap();
    // Any address in the server pod: the Host header names the service.
    let addr = mesh.server_addr(HTTP);
    let (status, headers, _) = collect(send_h1(mesh.client_pod(), addr, req).await.unwrap())
        .await
        .unwrap();
    (status, headers)
}

fn app(headers: &HeaderMap) -> String {
    headers
        .get("x-app")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_else(|| "(proxy)".into())
}

fn flags(headers: &HeaderMap) -> &str {
    headers
        .get("x-trellis-flags")
        .map(|v| v.to_str().unwrap())
        .unwrap_or("")
}

#[tokio::test]
async fn retries_hide_a_30_percent_failure_rate_and_their_absence_shows_it() {
    let retry = "policy:
  retry: {attempts: 5, retryOn: [5xx], backoff: {base: 1ms, max: 5ms}, budget: {percent: 100}}";
    let cfg = config(&[
        service("with-retries", 80, &[FLAKY], retry),
        service("without", 80, &[FLAKY], ""),
    ]);
    let mesh = Mesh::start_with_config(&[], &[], Some(&cfg)).await;
    const N: usize = 1000;
    let mut ok = 0;
    for _ in 0..N {
        if call(&mesh, "with-retries.shop", "/", &[]).await.0 == 200 {
            ok += 1;
        }
    }
    assert!(
        ok * 1000 >= N * 999,
        "with retries only {ok} of {N} succeeded"
    );
    let retries = mesh
        .client
        .metrics()
        .await
        .sum("trellis_retries_total", &[]);
    assert!(
        (200.0..=600.0).contains(&retries),
        "{retries} retries for ~30 % failures"
    );

    let mut failed = 0;
    for _ in 0..N {
        let (status, _) = call(&mesh, "without.shop", "/", &[]).await;
        if status == 503 {
            failed += 1;
        }
    }
    // Binomial(1000, 0.3): standard deviation 14.5; 5 sigma is 72.
    assert!(
        (228..=372).contains(&failed),
        "without retries {failed} of {N} failed"
    );
}

#[tokio::test]
async fn the_retry_budget_caps_retries_in_an_outage() {
    // Every request fails; the default budget (20 % + 10/s) must hold retries down.
    let cfg = config(&[service("down", 80, &[BROKEN], "policy:\n  retry: {attempts: 3, retryOn: [5xx], backoff: {base: 1ms, max: 2ms}, budget: {percent: 20, minPerSecond: 1}}")]);
    let mesh = Mesh::start_with_config(&[], &[], Some(&cfg)).await;
    for _ in 0..200 {
        let (status, headers) = call(&mesh, "down.shop", "/", &[]).await;
        assert_eq!(status, 500);
        assert!(flags(&headers).contains("URX"), "{}", flags(&headers));
    }
    let metrics = mesh.client.metrics().await;
    let retries = metrics.sum("trellis_retries_total", &[]);
    // 20 % of 200 requests plus 1 per second for the 10 s window.
    assert!(retries <= 40.0 + 10.0, "{retries} retries for 200 requests");
    assert!(metrics.sum("trellis_retry_budget_exhausted_total", &[]) > 100.0);
}

#[tokio::test]
async fn a_retry_after_a_reset_goes_to_another_endpoint() {
    // The server sidecar turns the app's reset into a 502 (UC), so the client
    // sidecar retries it as a gateway error.
    let cfg = config(&[service(
        "mixed",
        80,
        &[RESET, HTTP],
        "policy:\n  retry: {attempts: 1, retryOn: [gateway-error], backoff: {base: 1ms, max: 2ms}}",
    )]);
    let mesh = Mesh::start_with_config(&[], &[], Some(&cfg)).await;
    for _ in 0..50 {
        let (status, headers) = call(&mesh, "mixed.shop", "/", &[]).await;
        assert_eq!(status, 200, "flags {}", flags(&headers));
        assert_eq!(app(&headers), "server");
    }
}

#[tokio::test]
async fn request_and_per_try_timeouts_answer_504_ut() {
    let cfg = config(&[
        service("slow", 80, &[HTTP], "policy:\n  timeouts: {request: 300ms}"),
        service("per-try", 80, &[HTTP], "policy:\n  timeouts: {request: 5s, perTry: 200ms}\n  retry: {attempts: 2, retryOn: [5xx], backoff: {base: 1ms, max: 2ms}}"),
    ]);
    let mesh = Mesh::start_with_config(&[], &[], Some(&cfg)).await;
    // The app would answer 200 after 3 s: the 504 UT is the proxy's, cut short. How
    // soon is measured exactly on the paused clock beside the timeout stage; here
    // only that it never fires early.
    let start = Instant::now();
    let (status, headers) = call(&mesh, "slow.shop", "/slow/3000", &[]).await;
    assert_eq!((status.as_u16(), flags(&headers)), (504, "UT"));
    assert!(start.elapsed() >= Duration::from_millis(300));
    let (status, _) = call(&mesh, "slow.shop", "/slow/10", &[]).await;
    assert_eq!(status, 200);

    // Three attempts, each cut at 200 ms, then the client hears of it.
    let (status, headers) = call(&mesh, "per-try.shop", "/slow/1000", &[]).await;
    assert_eq!(status, 504);
    assert_eq!(flags(&headers), "UT,URX");
    assert_eq!(
        mesh.client
            .metrics()
            .await
            .sum("trellis_retries_total", &[]),
        2.0
    );
}

#[tokio::test]
async fn a_failing_endpoint_is_ejected_then_returns() {
    // Ring hashing on a per-request key spreads requests over both endpoints without
    // regard to latency, so the broken endpoint keeps getting its share until ejected.
    let cfg = config(&[service(
        "pair",
        80,
        &[HTTP, BROKEN],
        "policy:
  loadBalancer: {type: RingHash, hashOn: {header: x-key}}
  outlierDetection: {consecutive5xx: 3, interval: 1s, baseEjectionTime: 2s, maxEjectionPercent: 50}",
    )]);
    let mesh = Mesh::start_with_config(&[], &[], Some(&cfg)).await;
    let mut key = 0;
    let mut next = || {
        key += 1;
        format!("k{key}")
    };
    // The ejection starts after the third 500 reached the proxy, so it lasts at
    // least until 2 s after that request was sent.
    let mut broken = 0;
    let mut third_sent = None;
    for _ in 0..60 {
        let sent = Instant::now();
        if app(&call(&mesh, "pair.shop", "/", &[("x-key", &next())]).await.1) == "broken" {
            broken += 1;
            if broken == 3 {
                third_sent = Some(sent);
            }
        }
    }
    assert_eq!(broken, 3, "three 500s eject the broken endpoint");
    let third_sent = third_sent.expect("a third 500");
    let metrics = mesh.client.metrics().await;
    assert_eq!(
        metrics.sum(
            "trellis_outlier_ejections_total",
            &[("backend", "pair.shop:80")]
        ),
        1.0
    );
    assert_eq!(
        metrics.sum("trellis_endpoints_ejected", &[("backend", "pair.shop:80")]),
        1.0
    );
    // Every request answered while the ejection must still last avoids it (on a
    // slow machine fewer of them are, never none).
    let mut during = 0;
    for _ in 0..40 {
        let served = app(&call(&mesh, "pair.shop", "/", &[("x-key", &next())]).await.1);
        if third_sent.elapsed() < Duration::from_secs(2) {
            assert_eq!(served, "server", "ejected endpoint got traffic");
            during += 1;
        }
    }
    assert!(during > 0, "no request answered during the ejection");
    // After the ejection time it takes its share again (and fails again): wait
    // for the first request it serves, which cannot come before the time is out.
    until(
        Duration::from_secs(20),
        "the ejected endpoint serving again",
        || {
            let key = next();
            let mesh = &mesh;
            async move {
                match app(&call(mesh, "pair.shop", "/", &[("x-key", &key)]).await.1).as_str() {
                    "broken" => Ok(()),
                    other => Err(format!("{key} served by {other}")),
                }
            }
        },
    )
    .await;
    assert!(
        third_sent.elapsed() >= Duration::from_secs(2),
        "back {:?} after an ejection of 2 s",
        third_sent.elapsed()
    );
}

#[tokio::test]
async fn a_pool_limit_of_n_overflows_request_n_plus_one() {
    let cfg = config(&[service(
        "limited",
        80,
        &[HTTP],
        "policy:\n  connectionPool: {maxRequests: 2, maxPendingRequests: 0}",
    )]);
    let mesh = Mesh::start_with_config(&[], &[], Some(&cfg)).await;
    let mesh = std::sync::Arc::new(mesh);
    let slow: Vec<_> = (0..2)
        .map(|_| {
            let mesh = mesh.clone();
            tokio::spawn(async move { call(&mesh, "limited.shop", "/slow/1500", &[]).await.0 })
        })
        .collect();
    // Both slots are taken once both slow requests are at the app.
    until(
        Duration::from_secs(10),
        "two slow requests at the app",
        || async {
            match mesh.app(HTTP).in_flight() {
                2 => Ok(()),
                n => Err(format!("{n} in flight")),
            }
        },
    )
    .await;
    // Refused at once: had it queued for a slot, it would have had one when a slow
    // request finished, and a 200.
    let (status, headers) = call(&mesh, "limited.shop", "/", &[]).await;
    assert_eq!(
        (status.as_u16(), flags(&headers)),
        (503, "UO"),
        "overflow must not queue"
    );
    for task in slow {
        assert_eq!(task.await.unwrap(), 200);
    }
    assert_eq!(
        call(&mesh, "limited.shop", "/", &[]).await.0,
        200,
        "slots come back"
    );
    let overflow = mesh
        .client
        .metrics()
        .await
        .sum("trellis_overflow_total", &[("backend", "limited.shop:80")]);
    assert_eq!(overflow, 1.0);
}

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
async fn a_bad_config_file_is_refused_and_the_good_one_keeps_serving() {
    let good = config(&[service("web", 80, &[HTTP], "")]);
    let mesh = Mesh::start_with_config(&["--config-poll", "100ms"], &[], Some(&good)).await;
    assert_eq!(call(&mesh, "web.shop", "/", &[]).await.0, 200);
    let path = mesh.client.config_path().unwrap();

    // Invalid regex: refused, logged with file, line and field; traffic unchanged.
    let bad = config(&[service(
        "web",
        80,
        &[HTTP + 1],
        "routes:\n  - matches: [{path: {type: RegularExpression, value: '('}}]",
    )]);
    std::fs::write(&path, &bad).unwrap();
    until(Duration::from_secs(10), "bad config noticed", || async {
        let log = mesh.client.log();
        match log.contains("config not reloaded") {
            true => Ok(()),
            false => Err(log),
        }
    })
    .await;
    let log = mesh.client.log();
    assert!(
        log.contains("services[0].routes[0].matches[0].path.value"),
        "{log}"
    );
    assert!(log.contains(&path.display().to_string()), "{log}");
    assert_eq!(app(&call(&mesh, "web.shop", "/", &[]).await.1), "server");

    // A duration too long to count: refused the same way, and the proxy lives on.
    let forever = config(&[service(
        "web",
        80,
        &[HTTP + 1],
        "policy:\n  timeouts: {request: 18446744073709551615s1s}",
    )]);
    std::fs::write(&path, &forever).unwrap();
    until(
        Duration::from_secs(10),
        "the long duration refused",
        || async {
            let log = mesh.client.log();
            match log.contains("services[0].policy.timeouts.request") {
                true => Ok(()),
                false => Err(log),
            }
        },
    )
    .await;
    assert!(mesh.client.log().contains("is too long"));
    assert_eq!(app(&call(&mesh, "web.shop", "/", &[]).await.1), "server");

    // A good change takes effect.
    let moved = config(&[service("web", 80, &[HTTP + 1], "")]);
    std::fs::write(&path, &moved).unwrap();
    until(Duration::from_secs(10), "good config applied", || async {
        match app(&call(&mesh, "web.shop", "/", &[]).await.1).as_str() {
            "server-b" => Ok(()),
            other => Err(format!("served by {other}")),
        }
    })
    .await;
}
