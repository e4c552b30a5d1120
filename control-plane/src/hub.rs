//! The control plane's state: the objects a source reported, translated once per
//! change into a versioned snapshot that every proxy stream reads.
//!
//! Changes are coalesced: a source may report many in a burst (a directory being
//! written, a watch relisting), and the hub translates once the burst is quiet for
//! the debounce time (or has lasted `max_delay`). An object that no longer
//! translates (Accepted=False) is replaced by its last accepted version, so what
//! was good before stays while the status says what is wrong.

use crate::translate::{self, ObjectStatus, Objects, Translation};
use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};
use tokio::sync::{mpsc, watch};
use trellis_proto::model::{config::Config, resources};

/// A proxy's resources by name, as JSON.
pub type Resources = BTreeMap<String, Vec<u8>>;

/// One translated state of the mesh.
pub struct Snapshot {
    pub version: u64,
    pub objects: Arc<Objects>,
    pub translation: Translation,
    /// The mesh's resources, computed once and shared by every proxy whose view is
    /// the whole mesh.
    pub mesh_resources: Resources,
    /// When the change that led here was first seen, for convergence time.
    pub changed_at: Instant,
    /// Views already computed, by (namespace, pod, pod IP).
    views: Mutex<HashMap<(String, String, String), Arc<Resources>>>,
}

impl Snapshot {
    fn new(
        version: u64,
        objects: Arc<Objects>,
        translation: Translation,
        changed_at: Instant,
    ) -> Snapshot {
        let mesh_resources = resources::to_resources(&translation.mesh);
        Snapshot {
            version,
            objects,
            translation,
            mesh_resources,
            changed_at,
            views: Mutex::new(HashMap::new()),
        }
    }

    /// The resources one proxy should have: the mesh, plus its pod's inbound policy.
    pub fn view(&self, namespace: &str, pod: &str, pod_ip: &str) -> Arc<Resources> {
        let key = (namespace.to_owned(), pod.to_owned(), pod_ip.to_owned());
        let mut views = self.views.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(view) = views.get(&key) {
            return view.clone();
        }
        let config: Config = translate::view(
            &self.translation,
            &self.objects,
            namespace,
            pod,
            pod_ip,
            None,
        );
        let mut resources = self.mesh_resources.clone();
        for port in &config.inbound {
            if let Ok(json) = serde_json::to_vec(port) {
                resources.insert(resources::inbound_name(port), json);
            }
        }
        let view = Arc::new(resources);
        views.insert(key, view.clone());
        view
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
                    tracing::warn!(
                        kind = status.kind,
                        namespace = %status.namespace,
                        name = %status.name,
                        reason = %status.reason,
                        message = %status.message,
                        "object not accepted"
                    );
                }
                metrics::counter!("trellis_cp_translations_total").increment(1);
                let snapshot = Snapshot::new(version, Arc::new(objects), translation, first_seen);
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
        (objects, translation)
    }
}
