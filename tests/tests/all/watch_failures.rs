//! The control plane in Kubernetes mode against a small API server of our own
//! ([`FakeApiServer`]): EndpointSlice `discovery.k8s.io/v1` (which the real 1.20
//! test server does not serve) reaches a real proxy, and the watches survive what
//! a real API server does to them: 410 Gone, streams that end early, bookmarks.

use serde_json::{json, Value};
use std::{future::Future, time::Duration};
use trellis_tests::{
    fake_apiserver::{FakeApiServer, Kind},
    kube::{ControlPlane, Proxy},
    wait::until,
};

const AUTHORITY: &str = "reviews.shop:80";

fn service() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "reviews", "namespace": "shop"},
        "spec": {
            "clusterIP": "198.19.0.10",
            "selector": {"app": "reviews"},
            "ports": [{"name": "http", "port": 80, "targetPort": 8080}],
        },
    })
}

/// The slice of `reviews` with `ready` endpoints and `not_ready` ones.
fn slice(ready: &[&str], not_ready: &[&str]) -> Value {
    let endpoint = |address: &&str, ready: bool| {
        json!({
            "addresses": [address],
            "conditions": {"ready": ready},
            "targetRef": {"kind": "Pod", "namespace": "shop", "name": format!("reviews-{address}")},
        })
    };
    let endpoints: Vec<Value> = ready
        .iter()
        .map(|a| endpoint(a, true))
        .chain(not_ready.iter().map(|a| endpoint(a, false)))
        .collect();
    // Typed, to be sure the fake server sends what k8s-openapi reads back.
    let value = json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": "reviews-x7k2p",
            "namespace": "shop",
            "labels": {"kubernetes.io/service-name": "reviews"},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints,
    });
    let typed: k8s_openapi::api::discovery::v1::EndpointSlice =
        serde_json::from_value(value.clone()).expect("an EndpointSlice");
    let mut back = serde_json::to_value(&typed).expect("serialise");
    back["kind"] = json!("EndpointSlice");
    back["apiVersion"] = json!("discovery.k8s.io/v1");
    back
}

/// The addresses the proxy has for `reviews.shop:80`, sorted (None: no such service).
fn endpoints_in(dump: &Value) -> Option<Vec<String>> {
    let service = dump["config"]["services"]
        .as_array()?
        .iter()
        .find(|s| s["service"] == AUTHORITY)?;
    let mut addresses: Vec<String> = service["endpoints"]
        .as_array()?
        .iter()
        .filter_map(|e| e["address"].as_str().map(str::to_owned))
        .collect();
    addresses.sort();
    Some(addresses)
}

struct Mesh {
    server: FakeApiServer,
    cp: ControlPlane,
    proxy: Proxy,
}

impl Mesh {
    /// Waits until the proxy has exactly `expected` for reviews.shop:80; returns
    /// its whole entry.
    async fn wait_endpoints(&self, expected: &[&str], what: &str) -> Value {
        until(Duration::from_secs(30), what, || async {
            let dump = self.proxy.config_dump().await;
            match endpoints_in(&dump) {
                Some(found) if found == expected => Ok(dump),
                found => Err(format!(
                    "endpoints {found:?}, want {expected:?}\n{dump:#}\n\
                     fake apiserver: lists {} watches {:?} unknown {:?}\n\
                     control plane log:\n{}",
                    self.server.lists(Kind::EndpointSlice),
                    self.server.watch_versions(Kind::EndpointSlice),
                    self.server.unknown(),
                    self.cp.log()
                )),
            }
        })
        .await
    }

    /// Waits until `kind` has an open watch again.
    async fn wait_watching(&self, kind: Kind, what: &str) {
        until(Duration::from_secs(30), what, || async {
            if self.server.open_watches(kind) > 0 {
                Ok(())
            } else {
                Err(format!(
                    "watches asked for {:?}\ncontrol plane log:\n{}",
                    self.server.watch_versions(kind),
                    self.cp.log()
                ))
            }
        })
        .await
    }
}

/// A fake API server with the reviews Service and its slice (198.18.0.2 and .3
/// ready, .4 not), the control plane and a proxy, the proxy showing the two
/// ready endpoints and the slice watch open.
async fn start() -> Mesh {
    let server = FakeApiServer::start().await;
    server.apply(service());
    server.apply(slice(&["198.18.0.2", "198.18.0.3"], &["198.18.0.4"]));
    let cp = ControlPlane::start(&server.kubeconfig).await;
    let proxy = Proxy::start(&cp.url()).await;
    let mesh = Mesh { server, cp, proxy };
    let dump = mesh
        .wait_endpoints(
            &["198.18.0.2:8080", "198.18.0.3:8080"],
            "the two ready endpoints in the proxy",
        )
        .await;
    let service = dump["config"]["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["service"] == AUTHORITY)
        .unwrap();
    assert_eq!(service["clusterIP"], "198.19.0.10", "{service:#}");
    mesh.wait_watching(Kind::EndpointSlice, "an EndpointSlice watch")
        .await;
    mesh
}

/// Each test, bounded.
async fn bounded(test: impl Future<Output = ()>) {
    tokio::time::timeout(Duration::from_secs(120), test)
        .await
        .expect("the test finished within 120 s");
}

#[tokio::test]
async fn endpoint_slice_v1_endpoints_reach_the_proxy() {
    bounded(async {
        let mesh = start().await;
        let server = &mesh.server;
        // What the control plane asked that the fake server does not serve: the
        // CRD kinds only (counted as empty), never the kinds it does serve.
        let unknown = server.unknown();
        eprintln!(
            "requests: {:#?}\nanswered 404: {unknown:#?}",
            server.requests()
        );
        for path in &unknown {
            assert!(
                !path.contains("/services")
                    && !path.contains("/pods")
                    && !path.contains("/endpointslices"),
                "{path} answered 404"
            );
        }
        assert_eq!(server.lists(Kind::EndpointSlice), 1);
        assert_eq!(server.lists(Kind::Service), 1);
        // The watches ask for bookmarks.
        let watch = server
            .requests()
            .into_iter()
            .find(|r| r.contains("/endpointslices?") && r.contains("watch=true"))
            .expect("an EndpointSlice watch request");
        assert!(watch.contains("allowWatchBookmarks=true"), "{watch}");

        server.apply(slice(&["198.18.0.2"], &["198.18.0.4"]));
        mesh.wait_endpoints(&["198.18.0.2:8080"], "the MODIFIED slice in the proxy")
            .await;
        assert_eq!(
            server.lists(Kind::EndpointSlice),
            1,
            "a MODIFIED event needs no relist"
        );
    })
    .await;
}

#[tokio::test]
async fn a_watch_answered_410_gone_relists() {
    bounded(async {
        let mesh = start().await;
        let server = &mesh.server;
        assert_eq!(server.lists(Kind::EndpointSlice), 1);
        server.compact();
        assert!(server.end_watches() > 0, "no watch was open");
        server.apply(slice(&["198.18.0.3", "198.18.0.5"], &["198.18.0.2"]));
        mesh.wait_endpoints(
            &["198.18.0.3:8080", "198.18.0.5:8080"],
            "the slice changed during the relist in the proxy",
        )
        .await;
        assert!(
            server.expired(Kind::EndpointSlice) >= 1,
            "the resumed watch got no 410: {:?}",
            server.watch_versions(Kind::EndpointSlice)
        );
        assert_eq!(
            server.lists(Kind::EndpointSlice),
            2,
            "410 Gone makes the watcher list again, once"
        );
        // Watching again after the relist, and changes still arrive.
        mesh.wait_watching(Kind::EndpointSlice, "a new EndpointSlice watch")
            .await;
        server.apply(slice(&["198.18.0.5"], &[]));
        mesh.wait_endpoints(&["198.18.0.5:8080"], "a change after the relist")
            .await;
    })
    .await;
}

#[tokio::test]
async fn a_watch_that_ends_early_is_resumed_without_a_relist() {
    bounded(async {
        let mesh = start().await;
        let server = &mesh.server;
        let lists = server.lists(Kind::EndpointSlice);
        let watches = server.watches(Kind::EndpointSlice);
        let last_seen = server.resource_version().to_string();
        assert!(server.end_watches() > 0, "no watch was open");
        let changed = server.apply(slice(&["198.18.0.2", "198.18.0.3", "198.18.0.6"], &[]));
        mesh.wait_endpoints(
            &["198.18.0.2:8080", "198.18.0.3:8080", "198.18.0.6:8080"],
            "the change after the watch ended in the proxy",
        )
        .await;
        let versions = server.watch_versions(Kind::EndpointSlice);
        assert!(versions.len() > watches, "no new watch: {versions:?}");
        // kube-rs resumes from the last resourceVersion it saw (the one the
        // list gave: nothing changed in between), so the change came by the
        // history the fake server replays.
        assert_eq!(versions[watches], last_seen, "{versions:?}");
        assert_ne!(
            changed["metadata"]["resourceVersion"],
            json!(last_seen),
            "the change is newer than where the watch resumed"
        );
        assert_eq!(server.lists(Kind::EndpointSlice), lists, "no relist");
        assert_eq!(server.expired(Kind::EndpointSlice), 0);
    })
    .await;
}

#[tokio::test]
async fn bookmarks_move_the_resume_point_on() {
    bounded(async {
        let mesh = start().await;
        let server = &mesh.server;
        let lists = server.lists(Kind::EndpointSlice);
        // A write of another kind moves the resourceVersion on without an
        // EndpointSlice event; a bookmark tells the slice watcher so.
        server.apply(json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "reviews-0", "namespace": "shop", "labels": {"app": "reviews"}},
            "spec": {"containers": [{"name": "app", "image": "example.com/reviews:1"}]},
        }));
        let bookmarked = server.resource_version().to_string();
        assert!(
            server.bookmark() > 0,
            "no watch asked for bookmarks (allowWatchBookmarks=true)"
        );
        assert_eq!(server.bookmarks_sent(Kind::EndpointSlice), 1);
        let watches = server.watches(Kind::EndpointSlice);
        // The bookmark is sent before the stream ends, so the watcher reads it
        // first and resumes from its resourceVersion.
        server.end_watches();
        mesh.wait_watching(Kind::EndpointSlice, "the resumed EndpointSlice watch")
            .await;
        let versions = server.watch_versions(Kind::EndpointSlice);
        assert_eq!(
            versions.get(watches),
            Some(&bookmarked),
            "the watch resumed from the bookmark's resourceVersion: {versions:?}"
        );
        server.apply(slice(&["198.18.0.7"], &["198.18.0.2"]));
        mesh.wait_endpoints(&["198.18.0.7:8080"], "a change after the bookmark")
            .await;
        assert_eq!(server.lists(Kind::EndpointSlice), lists, "no relist");
        assert_eq!(server.expired(Kind::EndpointSlice), 0);
    })
    .await;
}
