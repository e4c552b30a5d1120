//! The control plane's state: the objects a source reported, translated once per
//! change into a versioned snapshot that every proxy stream reads.
//!
//! Changes are coalesced: a source may report many in a burst (a directory being
//! written, a watch relisting), and the hub translates once the burst is quiet for
//! the debounce time (or has lasted `max_delay`). An object that no longer
//! translates (Accepted=False) is replaced by its last accepted version, so what
//! was good before stays while the status says what is wrong.

use crate::translate::{self, InboundIndex, ObjectStatus, Objects, Translation};
use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::{Duration, Instant},
};
use tokio::sync::{mpsc, watch};
use trellis_proto::model::resources;

/// One resource's JSON, shared (unchanged resources keep the same allocation from
/// snapshot to snapshot, so comparing them is a pointer check).
pub type Json = Arc<[u8]>;

/// Resources by name.
pub type Resources = BTreeMap<String, Json>;

/// What one proxy should have: the mesh (shared by every proxy) and its pod's
/// inbound limits.
#[derive(Clone)]
pub struct View {
    pub mesh: Arc<Resources>,
    pub inbound: Resources,
}

impl View {
    pub fn len(&self) -> usize {
        self.mesh.len() + self.inbound.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &Json)> {
        self.mesh.iter().chain(self.inbound.iter())
    }

    /// What changed from `before` to `self`: resources added or changed, and the
    /// names of those removed.
    pub fn diff<'a>(&'a self, before: &View) -> (Vec<(&'a String, &'a Json)>, Vec<String>) {
        fn same(a: &Json, b: &Json) -> bool {
            Arc::ptr_eq(a, b) || a[..] == b[..]
        }
        let mut changed = Vec::new();
        let mut removed = Vec::new();
        let mut compare = |now: &'a Resources, then: &Resources| {
            for (name, json) in now {
                if !then.get(name).is_some_and(|old| same(old, json)) {
                    changed.push((name, json));
                }
            }
            removed.extend(then.keys().filter(|n| !now.contains_key(*n)).cloned());
        };
        if !Arc::ptr_eq(&self.mesh, &before.mesh) {
            compare(&self.mesh, &before.mesh);
        }
        compare(&self.inbound, &before.inbound);
        (changed, removed)
    }
}

/// The Pod annotation by which an operator narrows what a pod's proxy receives: a
/// comma list of namespaces (the services there, and those their routes send to).
/// Without it a proxy receives the whole mesh.
pub const REACH_ANNOTATION: &str = "trellis.dev/reach";

/// One translated state of the mesh.
pub struct Snapshot {
    pub version: u64,
    pub objects: Arc<Objects>,
    pub translation: Translation,
    /// The mesh's resources, computed once and shared by every proxy.
    pub mesh: Arc<Resources>,
    inbound: InboundIndex,
    /// Narrowed meshes, computed once per distinct set of namespaces.
    narrowed: std::sync::Mutex<HashMap<Vec<String>, Arc<Resources>>>,
    /// When the change that led here was first seen, for convergence time.
    pub changed_at: Instant,
}

impl Snapshot {
    fn new(
        version: u64,
        objects: Arc<Objects>,
        translation: Translation,
        changed_at: Instant,
        previous: Option<&Snapshot>,
    ) -> Snapshot {
        let mesh = resources::to_resources(&translation.mesh)
            .into_iter()
            .map(|(name, json)| {
                // Keep the previous allocation for a resource that did not change.
                let kept = previous
                    .and_then(|p| p.mesh.get(&name))
                    .filter(|old| old[..] == json[..])
                    .cloned();
                let json = kept.unwrap_or_else(|| Arc::from(json));
                (name, json)
            })
            .collect();
        let inbound = InboundIndex::new(&objects);
        Snapshot {
            version,
            objects,
            translation,
            mesh: Arc::new(mesh),
            inbound,
            narrowed: std::sync::Mutex::new(HashMap::new()),
            changed_at,
        }
    }

    /// The namespaces a pod's annotation narrows its view to, if it has one.
    fn reach_of(&self, namespace: &str, pod: &str) -> Option<Vec<String>> {
        let annotation = self
            .objects
            .pods
            .iter()
            .find(|p| {
                p.metadata.name.as_deref() == Some(pod)
                    && p.metadata.namespace.as_deref().unwrap_or("default") == namespace
            })?
            .metadata
            .annotations
            .as_ref()?
            .get(REACH_ANNOTATION)?;
        let mut namespaces: Vec<String> = annotation
            .split(',')
            .map(|n| n.trim().to_owned())
            .filter(|n| !n.is_empty())
            .collect();
        namespaces.sort();
        namespaces.dedup();
        Some(namespaces)
    }

    /// The mesh as a pod narrowed to `namespaces` sees it, shared by every pod with
    /// the same narrowing (resources keep the whole mesh's allocations).
    fn narrowed_mesh(&self, namespaces: Vec<String>) -> Arc<Resources> {
        let mut cache = self.narrowed.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(mesh) = cache.get(&namespaces) {
            return mesh.clone();
        }
        let services = translate::reachable(&self.translation.mesh.services, &namespaces);
        let mesh: Resources = services
            .iter()
            .filter_map(|s| {
                let name = resources::service_name(s);
                let json = self.mesh.get(&name)?.clone();
                Some((name, json))
            })
            .collect();
        let mesh = Arc::new(mesh);
        cache.insert(namespaces, mesh.clone());
        mesh
    }

    /// The resources one proxy should have.
    pub fn view(&self, namespace: &str, pod: &str, pod_ip: &str) -> View {
        let inbound = self
            .inbound
            .for_pod(namespace, pod, pod_ip)
            .iter()
            .filter_map(|port| {
                let json = serde_json::to_vec(port).ok()?;
                Some((resources::inbound_name(port), Arc::from(json)))
            })
            .collect();
        let mesh = match self.reach_of(namespace, pod) {
            Some(namespaces) => self.narrowed_mesh(namespaces),
            None => self.mesh.clone(),
        };
        View { mesh, inbound }
    }

    pub fn statuses(&self) -> &[ObjectStatus] {
        &self.translation.statuses
    }
}

/// Feeds object sets in; hands snapshots out.
#[derive(Clone)]
pub struct Hub {
    updates: mpsc::UnboundedSender<(Objects, Instant)>,
    snapshots: watch::Receiver<Option<Arc<Snapshot>>>,
}

impl Hub {
    /// Starts the translating task.
    pub fn start(debounce: Duration, max_delay: Duration) -> Hub {
        let (updates, mut incoming) = mpsc::unbounded_channel::<(Objects, Instant)>();
        let (publish, snapshots) = watch::channel(None);
        tokio::spawn(async move {
            let mut version = 0u64;
            let mut last_accepted = LastAccepted::default();
            while let Some((mut objects, mut first_seen)) = incoming.recv().await {
                // Coalesce a burst: keep the newest set, remember the oldest change.
                let deadline = tokio::time::Instant::now() + max_delay;
                loop {
                    let quiet = tokio::time::Instant::now() + debounce;
                    match tokio::time::timeout_at(quiet.min(deadline), incoming.recv()).await {
                        Ok(Some((newer, seen))) => {
                            objects = newer;
                            first_seen = first_seen.min(seen);
                        }
                        Ok(None) | Err(_) => break,
                    }
                }
                let (objects, translation) = last_accepted.translate(objects);
                version += 1;
                let rejected = translation
                    .statuses
                    .iter()
                    .filter(|s| !s.accepted || !s.resolved_refs)
                    .count();
                tracing::info!(
                    version,
                    services = translation.mesh.services.len(),
                    rejected,
                    "translated"
                );
                for status in translation
                    .statuses
                    .iter()
                    .filter(|s| !s.accepted || !s.resolved_refs)
                {
                    let file = objects
                        .origins
                        .get(&(
                            status.kind.to_owned(),
                            status.namespace.clone(),
                            status.name.clone(),
                        ))
                        .map(String::as_str)
                        .unwrap_or("");
                    tracing::warn!(
                        kind = status.kind,
                        namespace = %status.namespace,
                        name = %status.name,
                        file,
                        reason = %status.reason,
                        message = %status.message,
                        "object not accepted"
                    );
                }
                metrics::counter!("trellis_cp_translations_total").increment(1);
                let previous = publish.borrow().clone();
                let snapshot = Snapshot::new(
                    version,
                    Arc::new(objects),
                    translation,
                    first_seen,
                    previous.as_deref(),
                );
                publish.send_replace(Some(Arc::new(snapshot)));
            }
        });
        Hub { updates, snapshots }
    }

    /// Reports the source's complete current set of objects.
    pub fn update(&self, objects: Objects) {
        let _ = self.updates.send((objects, Instant::now()));
    }

    pub fn snapshots(&self) -> watch::Receiver<Option<Arc<Snapshot>>> {
        self.snapshots.clone()
    }

    pub fn current(&self) -> Option<Arc<Snapshot>> {
        self.snapshots.borrow().clone()
    }
}

/// The last version of each policy and route that translated cleanly.
#[derive(Default)]
struct LastAccepted {
    traffic: HashMap<(String, String), crate::crd::TrafficPolicy>,
    server: HashMap<(String, String), crate::crd::ServerPolicy>,
    routes: HashMap<(String, String), gateway_api::apis::standard::httproutes::HttpRoute>,
    grpc_routes: HashMap<(String, String), gateway_api::apis::standard::grpcroutes::GrpcRoute>,
}

fn key(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> (String, String) {
    (
        meta.namespace.clone().unwrap_or_else(|| "default".into()),
        meta.name.clone().unwrap_or_default(),
    )
}

impl LastAccepted {
    /// Translates `objects`; objects that are not accepted are swapped for their
    /// last accepted version (if any) and the set translated again. Statuses keep
    /// saying what is wrong with the new version.
    fn translate(&mut self, mut objects: Objects) -> (Objects, Translation) {
        let first = translate::translate(&objects);
        let rejected: Vec<(&'static str, String, String)> = first
            .statuses
            .iter()
            .filter(|s| !s.accepted)
            .map(|s| (s.kind, s.namespace.clone(), s.name.clone()))
            .collect();
        let mut swapped = false;
        for (kind, namespace, name) in &rejected {
            let id = (namespace.clone(), name.clone());
            match *kind {
                "TrafficPolicy" => {
                    if let Some(good) = self.traffic.get(&id) {
                        objects.traffic_policies.retain(|p| key(&p.metadata) != id);
                        objects.traffic_policies.push(good.clone());
                        swapped = true;
                    }
                }
                "ServerPolicy" => {
                    if let Some(good) = self.server.get(&id) {
                        objects.server_policies.retain(|p| key(&p.metadata) != id);
                        objects.server_policies.push(good.clone());
                        swapped = true;
                    }
                }
                "HTTPRoute" => {
                    if let Some(good) = self.routes.get(&id) {
                        objects.http_routes.retain(|r| key(&r.metadata) != id);
                        objects.http_routes.push(good.clone());
                        swapped = true;
                    }
                }
                "GRPCRoute" => {
                    if let Some(good) = self.grpc_routes.get(&id) {
                        objects.grpc_routes.retain(|r| key(&r.metadata) != id);
                        objects.grpc_routes.push(good.clone());
                        swapped = true;
                    }
                }
                _ => {}
            }
        }
        let translation = if swapped {
            let mut again = translate::translate(&objects);
            // Report the rejections of the new versions, not the old ones' acceptance.
            for status in &mut again.statuses {
                let rejected_now = first.statuses.iter().find(|s| {
                    s.kind == status.kind
                        && s.namespace == status.namespace
                        && s.name == status.name
                        && !s.accepted
                });
                if let Some(original) = rejected_now {
                    status.accepted = false;
                    status.reason = original.reason.clone();
                    status.message = format!(
                        "{} (the last accepted version stays in effect)",
                        original.message
                    );
                }
            }
            again
        } else {
            first
        };
        // Remember what is accepted now.
        let accepted =
            |kind: &str, meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
                let id = key(meta);
                !rejected
                    .iter()
                    .any(|(k, n, m)| *k == kind && *n == id.0 && *m == id.1)
            };
        for p in &objects.traffic_policies {
            if accepted("TrafficPolicy", &p.metadata) {
                self.traffic.insert(key(&p.metadata), p.clone());
            }
        }
        for p in &objects.server_policies {
            if accepted("ServerPolicy", &p.metadata) {
                self.server.insert(key(&p.metadata), p.clone());
            }
        }
        for r in &objects.http_routes {
            if accepted("HTTPRoute", &r.metadata) {
                self.routes.insert(key(&r.metadata), r.clone());
            }
        }
        for r in &objects.grpc_routes {
            if accepted("GRPCRoute", &r.metadata) {
                self.grpc_routes.insert(key(&r.metadata), r.clone());
            }
        }
        // Deleted objects are forgotten, so deleting a policy restores defaults.
        self.traffic.retain(|id, _| {
            objects
                .traffic_policies
                .iter()
                .any(|p| key(&p.metadata) == *id)
        });
        self.server.retain(|id, _| {
            objects
                .server_policies
                .iter()
                .any(|p| key(&p.metadata) == *id)
        });
        self.routes
            .retain(|id, _| objects.http_routes.iter().any(|r| key(&r.metadata) == *id));
        self.grpc_routes
            .retain(|id, _| objects.grpc_routes.iter().any(|r| key(&r.metadata) == *id));
        (objects, translation)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(text: &str) -> Json {
        Arc::from(text.as_bytes())
    }

    #[test]
    fn a_pod_annotation_narrows_its_view_to_namespaces() {
        let yaml = "
apiVersion: v1
kind: Service
metadata: {name: a, namespace: one}
spec: {clusterIP: 198.19.0.1, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: b, namespace: two}
spec: {clusterIP: 198.19.0.2, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Pod
metadata: {name: narrow, namespace: one, annotations: {trellis.dev/reach: 'one'}}
spec: {containers: [{name: app, image: app}]}
";
        let mut objects = Objects::default();
        for doc in serde_yaml_ng::Deserializer::from_str(yaml) {
            let value = <serde_yaml_ng::Value as serde::Deserialize>::deserialize(doc).unwrap();
            match value["kind"].as_str().unwrap() {
                "Service" => objects
                    .services
                    .push(serde_yaml_ng::from_value(value).unwrap()),
                _ => objects.pods.push(serde_yaml_ng::from_value(value).unwrap()),
            }
        }
        let translation = translate::translate(&objects);
        let snapshot = Snapshot::new(1, Arc::new(objects), translation, Instant::now(), None);
        let names = |view: &View| view.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
        assert_eq!(
            names(&snapshot.view("one", "narrow", "")),
            ["service/one/a/80"]
        );
        assert_eq!(
            names(&snapshot.view("one", "other", "")),
            ["service/one/a/80", "service/two/b/80"],
            "no annotation: the whole mesh"
        );
        // Pods with the same narrowing share one map.
        let (x, y) = (
            snapshot.view("one", "narrow", ""),
            snapshot.view("one", "narrow", ""),
        );
        assert!(Arc::ptr_eq(&x.mesh, &y.mesh));
    }

    #[test]
    fn a_view_diff_sends_only_what_changed() {
        let shared = json("{\"a\":1}");
        let mesh: Resources = [
            ("service/x/a/80".to_owned(), shared.clone()),
            ("service/x/b/80".to_owned(), json("{\"b\":1}")),
        ]
        .into();
        let before = View {
            mesh: Arc::new(mesh.clone()),
            inbound: [("inbound/8080".to_owned(), json("{}"))].into(),
        };
        // Same mesh object, same inbound: nothing to send.
        let same = View {
            mesh: before.mesh.clone(),
            inbound: before.inbound.clone(),
        };
        let (changed, removed) = same.diff(&before);
        assert!(changed.is_empty() && removed.is_empty());

        // A new mesh map: b changed (by value), c added, the inbound port gone.
        let mut next = mesh;
        next.insert("service/x/b/80".to_owned(), json("{\"b\":2}"));
        next.insert("service/x/c/80".to_owned(), json("{\"c\":1}"));
        let after = View {
            mesh: Arc::new(next),
            inbound: Resources::new(),
        };
        let (changed, removed) = after.diff(&before);
        let names: Vec<&str> = changed.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["service/x/b/80", "service/x/c/80"]);
        assert_eq!(removed, ["inbound/8080"]);
        assert_eq!(after.len(), 3);
    }
}
