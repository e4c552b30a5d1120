//! The control plane's state: the objects a source reported, translated once per
//! change into a versioned [`Snapshot`] that every proxy stream reads.
//!
//! Changes are coalesced: a source may report many in a burst (a directory being
//! written, a watch relisting), and the hub translates once the burst is quiet for
//! the debounce time (or has lasted `max_delay`). The snapshot remembers when the
//! burst began ([`Snapshot::changed_at`]), which is where a proxy's convergence
//! on it is timed from. An object that no longer translates (Accepted=False) is
//! replaced by its last accepted version, so what was good before stays while the
//! status says what is wrong.
//!
//! What one proxy sees of a snapshot (its [`View`]) is `view.rs`.

mod view;

use view::Views;
pub use view::{Json, Resources, View, REACH_ANNOTATION};

use crate::translate::{self, ObjectStatus, Objects, Translation};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// One translated state of the mesh.
pub struct Snapshot {
    pub version: u64,
    pub objects: Arc<Objects>,
    pub translation: Arc<Translation>,
    views: Views,
    /// When the change that led here was first received (the start of its
    /// debounce), for convergence time.
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
        let translation = Arc::new(translation);
        let views = Views::new(
            translation.clone(),
            &objects.pods,
            previous.map(|p| &p.views),
        );
        Snapshot {
            version,
            objects,
            translation,
            views,
            changed_at,
        }
    }

    /// The resources one proxy should have.
    pub fn view(&self, namespace: &str, pod: &str, pod_ip: &str) -> View {
        self.views.view(namespace, pod, pod_ip)
    }

    /// The service account pod `namespace/name` runs as, if the snapshot has the pod.
    pub fn service_account_of(&self, namespace: &str, name: &str) -> Option<&str> {
        self.objects
            .pods
            .iter()
            .find(|p| {
                p.metadata.namespace.as_deref().unwrap_or("default") == namespace
                    && p.metadata.name.as_deref() == Some(name)
            })
            .map(|p| {
                p.spec
                    .as_ref()
                    .and_then(|s| s.service_account_name.as_deref())
                    .unwrap_or("default")
            })
    }

    pub fn statuses(&self) -> &[ObjectStatus] {
        &self.translation.statuses
    }
}

/// Describes the metrics the hub records (`# HELP` on `/metrics`).
pub fn describe_metrics() {
    metrics::describe_counter!(
        "trellis_cp_translations_total",
        metrics::Unit::Count,
        "Snapshots translated: one per quiet burst of changes."
    );
    metrics::describe_histogram!(
        "trellis_cp_translation_seconds",
        metrics::Unit::Seconds,
        "Time to translate the objects into a snapshot and prepare its views."
    );
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
                let deadline = Instant::now() + max_delay;
                loop {
                    let quiet = Instant::now() + debounce;
                    match tokio::time::timeout_at(quiet.min(deadline), incoming.recv()).await {
                        Ok(Some((newer, seen))) => {
                            objects = newer;
                            first_seen = first_seen.min(seen);
                        }
                        Ok(None) | Err(_) => break,
                    }
                }
                let started = std::time::Instant::now();
                let (objects, translation) = last_accepted.translate(objects);
                version += 1;
                log_translation(version, &objects, &translation);
                metrics::counter!("trellis_cp_translations_total").increment(1);
                let previous = publish.borrow().clone();
                let snapshot = Snapshot::new(
                    version,
                    Arc::new(objects),
                    translation,
                    first_seen,
                    previous.as_deref(),
                );
                metrics::histogram!("trellis_cp_translation_seconds")
                    .record(started.elapsed().as_secs_f64());
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

/// One line per translation, and one per object not in effect (with its file in
/// local mode).
fn log_translation(version: u64, objects: &Objects, translation: &Translation) {
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
}

/// The last version of each policy and route that translated cleanly, and the
/// translator that remembers what it made of every object.
#[derive(Default)]
struct LastAccepted {
    translator: translate::Translator,
    traffic: HashMap<(String, String), Arc<crate::crd::TrafficPolicy>>,
    server: HashMap<(String, String), Arc<crate::crd::ServerPolicy>>,
    routes: HashMap<(String, String), Arc<gateway_api::apis::standard::httproutes::HttpRoute>>,
    grpc_routes: HashMap<(String, String), Arc<gateway_api::apis::standard::grpcroutes::GrpcRoute>>,
}

fn key(meta: &ObjectMeta) -> (String, String) {
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
        let first = self.translator.translate(&objects);
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
            let mut again = self.translator.translate(&objects);
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
        let accepted = |kind: &str, meta: &ObjectMeta| {
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
        fn present<T>(
            items: &[Arc<T>],
            meta: impl Fn(&T) -> &ObjectMeta,
        ) -> HashSet<(String, String)> {
            items.iter().map(|item| key(meta(item))).collect()
        }
        let traffic = present(&objects.traffic_policies, |p| &p.metadata);
        self.traffic.retain(|id, _| traffic.contains(id));
        let server = present(&objects.server_policies, |p| &p.metadata);
        self.server.retain(|id, _| server.contains(id));
        let routes = present(&objects.http_routes, |r| &r.metadata);
        self.routes.retain(|id, _| routes.contains(id));
        let grpc_routes = present(&objects.grpc_routes, |r| &r.metadata);
        self.grpc_routes.retain(|id, _| grpc_routes.contains(id));
        (objects, translation)
    }
}
