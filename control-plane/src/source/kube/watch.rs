//! The watchers: one kube-rs watcher per kind, feeding a reflector store, with
//! kube's default backoff between errors. A watcher resumes from the last
//! resourceVersion it saw and relists when that is too old (410 Gone), and a
//! restarted control plane lists everything afresh, so no change is lost across
//! errors or restarts.
//!
//! A kind the API server does not serve (404: an API version it does not have, as
//! EndpointSlice v1 on Kubernetes 1.20, or a CRD that is not installed) or that the
//! control plane may not read (403) is logged once and counted as empty; its
//! watcher keeps retrying with backoff and the kind takes part as soon as it is
//! served. Until every kind has listed once (or is known not to be served) the
//! kinds are [`Sources::pending`].

use crate::crd::{ServerPolicy, TrafficPolicy};
use crate::translate::Objects;
use gateway_api::apis::standard::grpcroutes::GrpcRoute;
use gateway_api::apis::standard::httproutes::HttpRoute;
use k8s_openapi::api::{
    core::v1::{Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    runtime::{
        reflector::{self, ObjectRef, Store},
        watcher, WatchStreamExt,
    },
    Api, Client, Resource, ResourceExt,
};
use serde::de::DeserializeOwned;
use std::{
    fmt::Debug,
    sync::{Arc, Mutex},
};
use tokio::sync::Notify;
use tokio_stream::StreamExt;

/// Where one kind's watcher stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Not listed yet.
    Pending,
    /// Listed; the store holds the kind's objects.
    Listed,
    /// The API server does not serve the kind (or forbids it): counted as empty.
    NotServed,
}

/// One watched kind: its reflector store and its phase.
pub(super) struct Watched<K: Resource<DynamicType = ()> + Clone + 'static> {
    kind: &'static str,
    store: Store<K>,
    phase: Arc<Mutex<Phase>>,
}

impl<K> Watched<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    /// Starts watching `K` in every namespace; `changed` is notified whenever the
    /// store or the phase changes.
    fn start(client: &Client, kind: &'static str, changed: Arc<Notify>) -> Watched<K> {
        let (store, writer) = reflector::store::<K>();
        let phase = Arc::new(Mutex::new(Phase::Pending));
        let api: Api<K> = Api::all(client.clone());
        let stream = watcher(api, watcher::Config::default())
            .modify(|object| object.managed_fields_mut().clear())
            .default_backoff()
            .reflect(writer);
        let task_phase = phase.clone();
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            // Whether the last error was "not served" (so it is logged once).
            let mut not_served_logged = false;
            while let Some(event) = stream.next().await {
                let set = |to: Phase| {
                    let mut phase = task_phase.lock().unwrap_or_else(|p| p.into_inner());
                    std::mem::replace(&mut *phase, to)
                };
                match event {
                    Ok(watcher::Event::InitDone) => {
                        let before = set(Phase::Listed);
                        if before != Phase::Listed {
                            tracing::info!(kind, "listed");
                        }
                        not_served_logged = false;
                        changed.notify_one();
                    }
                    Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) => {
                        set(Phase::Listed);
                        changed.notify_one();
                    }
                    Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
                    Err(error) => match not_served(&error) {
                        Some(code) => {
                            if !not_served_logged {
                                tracing::warn!(
                                    kind,
                                    code,
                                    %error,
                                    "the API server does not serve this kind (or forbids it); \
                                     counting it as empty and retrying with backoff"
                                );
                                not_served_logged = true;
                            } else {
                                tracing::debug!(kind, code, %error, "still not served");
                            }
                            if set(Phase::NotServed) != Phase::NotServed {
                                changed.notify_one();
                            }
                        }
                        None => {
                            tracing::warn!(kind, %error, "watch failed; retrying with backoff");
                        }
                    },
                }
            }
        });
        Watched { kind, store, phase }
    }

    fn phase(&self) -> Phase {
        *self.phase.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The kind's current objects (none when it is not served).
    fn objects(&self) -> Vec<Arc<K>> {
        match self.phase() {
            Phase::NotServed => Vec::new(),
            Phase::Pending | Phase::Listed => {
                let mut objects = self.store.state();
                // A stable order, so the same state always translates the same way.
                objects.sort_by(|a, b| {
                    (a.namespace(), a.name_any()).cmp(&(b.namespace(), b.name_any()))
                });
                objects
            }
        }
    }

    /// One object as the store holds it now.
    pub(super) fn get(&self, namespace: &str, name: &str) -> Option<Arc<K>> {
        self.store.get(&ObjectRef::new(name).within(namespace))
    }
}

/// The HTTP status code of an error that says the kind is not there to be
/// watched: 404 (not served) or 403 (forbidden).
fn not_served(error: &watcher::Error) -> Option<u16> {
    let code = match error {
        watcher::Error::InitialListFailed(kube::Error::Api(status))
        | watcher::Error::WatchStartFailed(kube::Error::Api(status))
        | watcher::Error::WatchFailed(kube::Error::Api(status)) => status.code,
        watcher::Error::WatchError(status) => status.code,
        _ => return None,
    };
    matches!(code, 403 | 404).then_some(code)
}

/// Every watched kind.
pub(super) struct Sources {
    pub(super) services: Watched<Service>,
    pub(super) endpoint_slices: Watched<EndpointSlice>,
    pub(super) pods: Watched<Pod>,
    pub(super) http_routes: Watched<HttpRoute>,
    pub(super) grpc_routes: Watched<GrpcRoute>,
    pub(super) traffic_policies: Watched<TrafficPolicy>,
    pub(super) server_policies: Watched<ServerPolicy>,
}

impl Sources {
    /// Starts watching every kind; `changed` is notified whenever one changes.
    pub(super) fn start(client: &Client, changed: Arc<Notify>) -> Sources {
        Sources {
            services: Watched::start(client, "Service", changed.clone()),
            endpoint_slices: Watched::start(client, "EndpointSlice", changed.clone()),
            pods: Watched::start(client, "Pod", changed.clone()),
            http_routes: Watched::start(client, "HTTPRoute", changed.clone()),
            grpc_routes: Watched::start(client, "GRPCRoute", changed.clone()),
            traffic_policies: Watched::start(client, "TrafficPolicy", changed.clone()),
            server_policies: Watched::start(client, "ServerPolicy", changed),
        }
    }

    /// Kinds that have neither listed nor been found not served.
    pub(super) fn pending(&self) -> Vec<&'static str> {
        [
            (self.services.kind, self.services.phase()),
            (self.endpoint_slices.kind, self.endpoint_slices.phase()),
            (self.pods.kind, self.pods.phase()),
            (self.http_routes.kind, self.http_routes.phase()),
            (self.grpc_routes.kind, self.grpc_routes.phase()),
            (self.traffic_policies.kind, self.traffic_policies.phase()),
            (self.server_policies.kind, self.server_policies.phase()),
        ]
        .into_iter()
        .filter(|(_, phase)| *phase == Phase::Pending)
        .map(|(kind, _)| kind)
        .collect()
    }

    /// Every kind's current objects, each kind in a stable order.
    pub(super) fn objects(&self) -> Objects {
        Objects {
            services: self.services.objects(),
            endpoint_slices: self.endpoint_slices.objects(),
            pods: self.pods.objects(),
            http_routes: self.http_routes.objects(),
            grpc_routes: self.grpc_routes.objects(),
            traffic_policies: self.traffic_policies.objects(),
            server_policies: self.server_policies.objects(),
            // Objects in a cluster are named by kind, namespace and name alone.
            origins: Default::default(),
        }
    }
}
