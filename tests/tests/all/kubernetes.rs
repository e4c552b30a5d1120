//! The control plane in Kubernetes mode against a real API server (kube-apiserver
//! 1.20 and etcd on loopback, `tests/kube/`): objects created through the API reach
//! a real proxy, statuses are written back, and a restarted control plane loses no
//! event. The API server has fixed ports, so every test here holds it alone
//! ([`ApiServer::start`] takes a process-wide lock); each gets fresh state.
//!
//! Kubernetes 1.20 does not serve EndpointSlice `discovery.k8s.io/v1`, so every
//! test here also proves that a kind the server does not serve stops nothing.

use gateway_api::apis::standard::httproutes::HttpRoute;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::{api::DeleteParams, Api};
use serde_json::json;
use std::time::Duration;
use trellis_control_plane::crd::{ServerPolicy, TrafficPolicy};
use trellis_tests::{
    kube::{ApiServer, ControlPlane, Proxy},
    kube_api::*,
    wait::until,
};

#[tokio::test]
async fn crds_install_and_become_established() {
    let server = ApiServer::start().await;
    let names = install_crds(&server.client).await;
    assert_eq!(
        names,
        [
            "trafficpolicies.policy.trellis.dev",
            "serverpolicies.policy.trellis.dev",
            "httproutes.gateway.networking.k8s.io",
            "grpcroutes.gateway.networking.k8s.io",
        ]
    );
    // The kinds are served: their lists answer, empty.
    let policies: Api<TrafficPolicy> = Api::all(server.client.clone());
    let servers: Api<ServerPolicy> = Api::all(server.client.clone());
    let routes: Api<HttpRoute> = Api::all(server.client.clone());
    until(
        Duration::from_secs(20),
        "the new kinds are listable",
        || async {
            let p = policies
                .list(&Default::default())
                .await
                .map_err(|e| e.to_string())?;
            let s = servers
                .list(&Default::default())
                .await
                .map_err(|e| e.to_string())?;
            let r = routes
                .list(&Default::default())
                .await
                .map_err(|e| e.to_string())?;
            assert!(p.items.is_empty() && s.items.is_empty() && r.items.is_empty());
            Ok(())
        },
    )
    .await;
}

#[tokio::test]
async fn objects_created_through_the_api_reach_a_connected_proxy() {
    let server = ApiServer::start().await;
    let client = &server.client;
    install_crds(client).await;
    namespace(client, "shop").await;
    let cp = ControlPlane::start(&server.kubeconfig).await;
    let proxy = Proxy::start(&cp.url()).await;

    let reviews = service(client, "reviews").await;
    service(client, "reviews-v1").await;
    service(client, "reviews-v2").await;
    create::<Pod>(
        client,
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "reviews-v1-0", "namespace": "shop", "labels": {"app": "reviews-v1"}},
            "spec": {"containers": [{"name": "app", "image": "example.com/reviews:1"}]},
        }),
    )
    .await;
    create::<HttpRoute>(
        client,
        json!({
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "HTTPRoute",
            "metadata": {"name": "reviews", "namespace": "shop"},
            "spec": {
                "parentRefs": [{"kind": "Service", "name": "reviews", "port": 80}],
                "rules": [{"backendRefs": [
                    {"name": "reviews-v1", "port": 80, "weight": 90},
                    {"name": "reviews-v2", "port": 80, "weight": 10},
                ]}],
            },
        }),
    )
    .await;
    create::<TrafficPolicy>(
        client,
        json!({
            "apiVersion": "policy.trellis.dev/v1alpha1",
            "kind": "TrafficPolicy",
            "metadata": {"name": "reviews", "namespace": "shop"},
            "spec": {
                "targetRefs": [{"kind": "Service", "name": "reviews"}],
                "retry": {"attempts": 3, "retryOn": ["5xx", "reset"]},
            },
        }),
    )
    .await;

    let ip = cluster_ip(&reviews);
    let entry = until(
        Duration::from_secs(30),
        "reviews.shop:80 with its clusterIP, canary route and retries in the proxy",
        || async {
            let dump = proxy.config_dump().await;
            let entry = find_service(&dump, "reviews.shop:80").cloned();
            match entry {
                Some(e)
                    if e["clusterIP"] == ip.as_str()
                        && e["routes"][0]["backends"].as_array().map(Vec::len) == Some(2)
                        && e["routes"][0]["policy"]["retry"]["attempts"] == 3 =>
                {
                    Ok(e)
                }
                _ => Err(format!("{dump:#}\ncontrol plane log:\n{}", cp.log())),
            }
        },
    )
    .await;
    let route = &entry["routes"][0];
    assert_eq!(route["name"], "reviews/0", "{entry:#}");
    let backends: Vec<(String, u64)> = route["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["name"].as_str().unwrap().to_owned(),
                b["weight"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        backends,
        [("reviews-v1".to_owned(), 90), ("reviews-v2".to_owned(), 10)],
        "{entry:#}"
    );
    assert_eq!(
        route["policy"]["retry"]["retryOn"],
        json!(["5xx", "reset"]),
        "{entry:#}"
    );
    // The backends are services the proxy knows, each with its own clusterIP.
    for name in ["reviews-v1", "reviews-v2"] {
        let dump = proxy.config_dump().await;
        let backend = find_service(&dump, &format!("{name}.shop:80"))
            .unwrap_or_else(|| panic!("{name} missing: {dump:#}"));
        assert!(backend["clusterIP"]
            .as_str()
            .unwrap()
            .starts_with("198.19."));
    }

    // Accepted objects say so in their status.
    let status =
        status_of::<TrafficPolicy>(client, "reviews", "TrafficPolicy reviews Accepted", |s| {
            condition(&s["conditions"], "Accepted").is_some()
        })
        .await;
    let accepted = condition(&status["conditions"], "Accepted").unwrap();
    assert_eq!(accepted["status"], "True", "{status:#}");
    assert_eq!(accepted["observedGeneration"], 1, "{status:#}");
    assert_eq!(
        condition(&status["conditions"], "ResolvedRefs").unwrap()["status"],
        "True",
        "{status:#}"
    );
    let status = status_of::<HttpRoute>(client, "reviews", "HTTPRoute reviews status", |s| {
        s["parents"].as_array().is_some_and(|p| !p.is_empty())
    })
    .await;
    let parents = status["parents"].as_array().unwrap();
    assert_eq!(parents.len(), 1, "{status:#}");
    assert_eq!(parents[0]["controllerName"], "trellis.dev/control-plane");
    assert_eq!(parents[0]["parentRef"]["kind"], "Service", "{status:#}");
    assert_eq!(parents[0]["parentRef"]["name"], "reviews", "{status:#}");
    assert_eq!(parents[0]["parentRef"]["port"], 80, "{status:#}");
    let accepted = condition(&parents[0]["conditions"], "Accepted").expect("Accepted");
    assert_eq!(accepted["status"], "True", "{status:#}");

    // Deleting through the API reaches the proxy too.
    let services: Api<Service> = Api::namespaced(client.clone(), "shop");
    services
        .delete("reviews-v2", &DeleteParams::default())
        .await
        .expect("delete reviews-v2");
    until(
        Duration::from_secs(30),
        "reviews-v2 gone from the proxy",
        || async {
            let dump = proxy.config_dump().await;
            match find_service(&dump, "reviews-v2.shop:80") {
                None => Ok(()),
                Some(_) => Err(format!("{dump:#}")),
            }
        },
    )
    .await;
}

#[tokio::test]
async fn an_invalid_traffic_policy_gets_accepted_false_naming_the_field() {
    let server = ApiServer::start().await;
    let client = &server.client;
    install_crds(client).await;
    namespace(client, "shop").await;
    let cp = ControlPlane::start(&server.kubeconfig).await;
    service(client, "ratings").await;
    create::<TrafficPolicy>(
        client,
        json!({
            "apiVersion": "policy.trellis.dev/v1alpha1",
            "kind": "TrafficPolicy",
            "metadata": {"name": "ratings", "namespace": "shop"},
            "spec": {
                "targetRefs": [{"kind": "Service", "name": "ratings"}],
                "retry": {"retryOn": ["sometimes"]},
            },
        }),
    )
    .await;
    create::<ServerPolicy>(
        client,
        json!({
            "apiVersion": "policy.trellis.dev/v1alpha1",
            "kind": "ServerPolicy",
            "metadata": {"name": "ratings", "namespace": "shop"},
            "spec": {
                "targetRefs": [{"kind": "Service", "name": "ratings"}],
                "mtls": "STRICT",
            },
        }),
    )
    .await;

    let status =
        status_of::<TrafficPolicy>(client, "ratings", "TrafficPolicy ratings status", |s| {
            condition(&s["conditions"], "Accepted").is_some()
        })
        .await;
    let accepted = condition(&status["conditions"], "Accepted").unwrap();
    assert_eq!(accepted["status"], "False", "{status:#}\n{}", cp.log());
    let message = accepted["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("spec.retry.retryOn[0]"),
        "the message names the field: {status:#}"
    );
    assert!(
        accepted["reason"]
            .as_str()
            .is_some_and(|r| !r.is_empty() && r != "Accepted"),
        "{status:#}"
    );
    assert!(accepted["lastTransitionTime"].is_string(), "{status:#}");

    // A valid ServerPolicy beside it is accepted: its status is written too.
    let status = status_of::<ServerPolicy>(client, "ratings", "ServerPolicy ratings status", |s| {
        condition(&s["conditions"], "Accepted").is_some()
    })
    .await;
    assert_eq!(
        condition(&status["conditions"], "Accepted").unwrap()["status"],
        "True",
        "{status:#}"
    );

    // Fixing the policy turns it Accepted=True.
    let api: Api<TrafficPolicy> = Api::namespaced(client.clone(), "shop");
    api.patch(
        "ratings",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(json!({"spec": {"retry": {"retryOn": ["5xx"]}}})),
    )
    .await
    .expect("patch the policy");
    let status =
        status_of::<TrafficPolicy>(client, "ratings", "TrafficPolicy ratings fixed", |s| {
            condition(&s["conditions"], "Accepted").is_some_and(|c| c["status"] == "True")
        })
        .await;
    assert_eq!(
        condition(&status["conditions"], "Accepted").unwrap()["observedGeneration"],
        2,
        "{status:#}"
    );
}

#[tokio::test]
async fn a_restarted_control_plane_loses_no_event() {
    let server = ApiServer::start().await;
    let client = &server.client;
    install_crds(client).await;
    namespace(client, "shop").await;
    let mut cp = ControlPlane::start(&server.kubeconfig).await;
    let proxy = Proxy::start(&cp.url()).await;
    service(client, "reviews").await;
    service(client, "ratings").await;
    proxy_has(&proxy, &cp, "reviews.shop:80").await;
    proxy_has(&proxy, &cp, "ratings.shop:80").await;

    cp.kill();
    // While it is down: one Service added, one deleted.
    let details = service(client, "details").await;
    let services: Api<Service> = Api::namespaced(client.clone(), "shop");
    services
        .delete("ratings", &DeleteParams::default())
        .await
        .expect("delete ratings");
    // The proxy keeps its last config while the control plane is away.
    assert!(find_service(&proxy.config_dump().await, "ratings.shop:80").is_some());

    cp.restart().await;
    let entry = proxy_has(&proxy, &cp, "details.shop:80").await;
    assert_eq!(
        entry["clusterIP"],
        cluster_ip(&details).as_str(),
        "{entry:#}"
    );
    until(
        Duration::from_secs(30),
        "ratings gone from the proxy",
        || async {
            let dump = proxy.config_dump().await;
            match find_service(&dump, "ratings.shop:80") {
                None => Ok(()),
                Some(_) => Err(format!("{dump:#}\ncontrol plane log:\n{}", cp.log())),
            }
        },
    )
    .await;
    assert!(find_service(&proxy.config_dump().await, "reviews.shop:80").is_some());
}

#[tokio::test]
async fn kinds_the_server_does_not_serve_stop_nothing() {
    let server = ApiServer::start().await;
    let client = &server.client;
    namespace(client, "shop").await;
    // No CRDs yet: HTTPRoute, TrafficPolicy and ServerPolicy answer 404, as does
    // EndpointSlice v1 on this server. Services still reach the proxy.
    let cp = ControlPlane::start(&server.kubeconfig).await;
    let proxy = Proxy::start(&cp.url()).await;
    service(client, "reviews").await;
    proxy_has(&proxy, &cp, "reviews.shop:80").await;
    let log = cp.log();
    for kind in ["EndpointSlice", "HTTPRoute", "TrafficPolicy"] {
        let reported = log
            .lines()
            .filter(|l| l.contains("does not serve") && l.contains(kind))
            .count();
        assert_eq!(reported, 1, "{kind} not served is logged once:\n{log}");
    }

    // Once the CRDs are installed, their kinds take part (after the backoff).
    install_crds(client).await;
    create::<TrafficPolicy>(
        client,
        json!({
            "apiVersion": "policy.trellis.dev/v1alpha1",
            "kind": "TrafficPolicy",
            "metadata": {"name": "reviews", "namespace": "shop"},
            "spec": {
                "targetRefs": [{"kind": "Service", "name": "reviews"}],
                "retry": {"attempts": 4},
            },
        }),
    )
    .await;
    until(
        Duration::from_secs(60),
        "the late TrafficPolicy in the proxy",
        || async {
            let dump = proxy.config_dump().await;
            match find_service(&dump, "reviews.shop:80") {
                Some(e) if e["routes"][0]["policy"]["retry"]["attempts"] == 4 => Ok(()),
                _ => Err(format!("{dump:#}\ncontrol plane log:\n{}", cp.log())),
            }
        },
    )
    .await;
}
