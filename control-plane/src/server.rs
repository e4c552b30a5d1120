//! The discovery service: one stream per proxy. The first response carries the
//! proxy's whole view; later ones only the resources of its view that changed or
//! went away, and a proxy whose view did not change is sent nothing. Every version
//! is answered with an ACK or a NACK, which the per-proxy status records.

use crate::hub::{Hub, Snapshot, View};
use serde::Serialize;
use std::{
    collections::HashMap,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Instant, SystemTime},
};
use tokio::sync::mpsc;
use tokio_stream::{wrappers::ReceiverStream, Stream};
use tonic::{Request, Response, Status, Streaming};
use trellis_proto::v1::{
    discovery_server::{Discovery, DiscoveryServer},
    DiscoveryRequest, DiscoveryResponse, Node, Resource,
};

/// What the admin port shows about one connected (or once connected) proxy.
#[derive(Debug, Clone, Serialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct ProxyStatus {
    pub namespace: String,
    pub pod: String,
    pub pod_ip: String,
    pub connected: bool,
    pub sent_version: String,
    pub acked_version: String,
    pub last_nack: Option<String>,
    /// Seconds since the Unix epoch of the last ACK.
    pub acked_at: Option<u64>,
}

/// Every proxy's status, by stream id.
#[derive(Clone, Default)]
pub struct Proxies(Arc<Mutex<HashMap<u64, ProxyStatus>>>);

impl Proxies {
    pub fn list(&self) -> Vec<ProxyStatus> {
        let mut list: Vec<_> = self.lock().values().cloned().collect();
        list.sort_by(|a, b| (&a.namespace, &a.pod).cmp(&(&b.namespace, &b.pod)));
        list
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, ProxyStatus>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn update(&self, id: u64, f: impl FnOnce(&mut ProxyStatus)) {
        if let Some(status) = self.lock().get_mut(&id) {
            f(status);
        }
    }
}

pub struct DiscoveryService {
    hub: Hub,
    proxies: Proxies,
    next_id: AtomicU64,
}

impl DiscoveryService {
    pub fn new(hub: Hub, proxies: Proxies) -> DiscoveryServer<DiscoveryService> {
        DiscoveryServer::new(DiscoveryService {
            hub,
            proxies,
            next_id: AtomicU64::new(1),
        })
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Discovery for DiscoveryService {
    type StreamStream = ResponseStream;

    async fn stream(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<ResponseStream>, Status> {
        let mut incoming = request.into_inner();
        let first = incoming.message().await?.ok_or_else(|| {
            Status::invalid_argument("the stream ended before the proxy said who it is")
        })?;
        let node = first.node.ok_or_else(|| {
            Status::invalid_argument("the first message must carry the proxy's node")
        })?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.proxies.lock().insert(
            id,
            ProxyStatus {
                namespace: node.namespace.clone(),
                pod: node.pod.clone(),
                pod_ip: node.pod_ip.clone(),
                connected: true,
                acked_version: first.applied_version.clone(),
                ..Default::default()
            },
        );
        metrics::gauge!("trellis_cp_connected_proxies").increment(1.0);
        tracing::info!(namespace = %node.namespace, pod = %node.pod, "proxy connected");
        let (out, responses) = mpsc::channel(4);
        tokio::spawn(serve(
            id,
            node,
            incoming,
            out,
            self.hub.clone(),
            self.proxies.clone(),
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(responses))))
    }
}

/// Runs one proxy's stream until it ends.
async fn serve(
    id: u64,
    node: Node,
    mut incoming: Streaming<DiscoveryRequest>,
    out: mpsc::Sender<Result<DiscoveryResponse, Status>>,
    hub: Hub,
    proxies: Proxies,
) {
    let mut snapshots = hub.snapshots();
    let mut sent: Option<View> = None;
    let mut in_flight: HashMap<String, (u64, Instant)> = HashMap::new();
    let mut nonce = 0u64;
    loop {
        let current = snapshots.borrow_and_update().clone();
        if let Some(snapshot) = current {
            if let Some(response) = next_response(&snapshot, &node, &mut sent, &mut nonce) {
                let size: usize = response.resources.iter().map(|r| r.json.len()).sum();
                metrics::counter!("trellis_cp_pushes_total").increment(1);
                metrics::histogram!("trellis_cp_push_bytes").record(size as f64);
                in_flight.insert(
                    response.nonce.clone(),
                    (snapshot.version, snapshot.changed_at),
                );
                proxies.update(id, |s| s.sent_version = response.version.clone());
                if out.send(Ok(response)).await.is_err() {
                    break;
                }
            }
        }
        tokio::select! {
            changed = snapshots.changed() => if changed.is_err() { break },
            message = incoming.message() => match message {
                Ok(Some(answer)) => record_answer(id, &node, answer, &mut in_flight, &proxies),
                Ok(None) | Err(_) => break,
            },
        }
    }
    proxies.update(id, |s| s.connected = false);
    metrics::gauge!("trellis_cp_connected_proxies").decrement(1.0);
    tracing::info!(namespace = %node.namespace, pod = %node.pod, "proxy disconnected");
}

/// The response that brings this proxy from what it was sent to `snapshot`, or
/// `None` when its view did not change.
fn next_response(
    snapshot: &Snapshot,
    node: &Node,
    sent: &mut Option<View>,
    nonce: &mut u64,
) -> Option<DiscoveryResponse> {
    let view = snapshot.view(&node.namespace, &node.pod, &node.pod_ip);
    let (full, resources, removed) = match sent.as_ref() {
        None => (true, view.iter().collect::<Vec<_>>(), Vec::new()),
        Some(before) => {
            let (changed, removed) = view.diff(before);
            if changed.is_empty() && removed.is_empty() {
                return None;
            }
            (false, changed, removed)
        }
    };
    *nonce += 1;
    let response = DiscoveryResponse {
        version: snapshot.version.to_string(),
        nonce: nonce.to_string(),
        full,
        resources: resources
            .into_iter()
            .map(|(name, json)| Resource {
                name: name.clone(),
                json: json.to_vec(),
            })
            .collect(),
        removed,
    };
    *sent = Some(view);
    Some(response)
}

fn record_answer(
    id: u64,
    node: &Node,
    answer: DiscoveryRequest,
    in_flight: &mut HashMap<String, (u64, Instant)>,
    proxies: &Proxies,
) {
    let Some((_, changed_at)) = in_flight.remove(&answer.nonce) else {
        return;
    };
    match answer.nack {
        None => {
            metrics::histogram!("trellis_cp_convergence_seconds")
                .record(changed_at.elapsed().as_secs_f64());
            let now = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .ok();
            proxies.update(id, |s| {
                s.acked_version = answer.version.clone();
                s.acked_at = now;
                s.last_nack = None;
            });
        }
        Some(nack) => {
            metrics::counter!("trellis_cp_nacks_total").increment(1);
            let message = format!(
                "version {}: {}: {}",
                answer.version, nack.resource, nack.message
            );
            tracing::warn!(namespace = %node.namespace, pod = %node.pod, %message, "proxy refused a version");
            proxies.update(id, |s| {
                s.acked_version = answer.applied_version.clone();
                s.last_nack = Some(message);
            });
        }
    }
}
