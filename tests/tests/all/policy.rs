//! Resilience policy end to end: the client sidecar's config names services in the
//! server pod and the policy on them; misbehaving apps in the server pod (30 %
//! 503s, resets, slow answers, an endpoint that always fails) show what retries,
//! timeouts, outlier ejection and pool limits do for the unchanged client, and a
//! bad config file changes nothing. Routes, faults and limits: `traffic.rs`.

use std::time::{Duration, Instant};
use trellis_tests::{
    mesh::{Mesh, BROKEN, FLAKY, HTTP, RESET},
    policy::{app, call, config, flags, service},
    wait::until,
};

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
    let at_app = mesh
        .app(HTTP)
        .until_in_flight(2, "two slow requests at the app");
    at_app.await;
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
