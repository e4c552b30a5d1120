//! The discovery service: one stream per proxy. The first response carries the
//! proxy's whole view; later ones only the resources of its view that changed or
//! went away, and a proxy whose view did not change is sent nothing. Every version
//! is answered with an ACK or a NACK, which the per-proxy status records; a proxy
//! is forgotten when its stream ends.
//!
//! Convergence (`trellis_cp_convergence_seconds`) is timed from when a change was
//! received (the start of the hub's debounce) to a proxy's ACK of the version
//! carrying it. A proxy's first push on connect carries no change of its own (the
//! snapshot may be hours old), so it is not a sample. A stream that falls behind
//! skips versions and receives their changes with a later one; the sample is then
//! timed from that later version's change.

use crate::hub::{Hub, Snapshot, View};
use serde::Serialize;
use std::{
    collections::HashMap,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::SystemTime,
};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::{wrappers::ReceiverStream, Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use trellis_proto::model::config::Workload;
use trellis_proto::v1::{
    discovery_server::{Discovery, DiscoveryServer},
    DiscoveryRequest, DiscoveryResponse, Node, Resource,
};

/// What the admin port shows about one connected proxy.
#[derive(Debug, Clone, Serialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct ProxyStatus {
    pub namespace: String,
    pub pod: String,
    pub pod_ip: String,
    /// Always true: a proxy is forgotten when its stream ends.
    pub connected: bool,
    pub sent_version: String,
    pub acked_version: String,
    pub last_nack: Option<String>,
    /// Seconds since the Unix epoch of the last ACK.
    pub acked_at: Option<u64>,
}

/// Every connected proxy's status, by stream id.
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

    fn forget(&self, id: u64) {
        self.lock().remove(&id);
    }
}

/// Describes the metrics the discovery streams record (`# HELP` on `/metrics`).
pub fn describe_metrics() {
    use metrics::Unit;
    metrics::describe_gauge!(
        "trellis_cp_connected_proxies",
        Unit::Count,
        "Open discovery streams."
    );
    metrics::describe_counter!(
        "trellis_cp_pushes_total",
        Unit::Count,
        "Discovery responses sent to proxies."
    );
    metrics::describe_histogram!(
        "trellis_cp_push_bytes",
        Unit::Bytes,
        "Resource bytes per discovery response."
    );
    metrics::describe_counter!(
        "trellis_cp_nacks_total",
        Unit::Count,
        "Versions refused (NACKed) by proxies."
    );
    metrics::describe_counter!(
        STREAMS_REFUSED_TOTAL,
        Unit::Count,
        "Discovery streams refused: no mesh certificate, or a pod the certificate's workload is not."
    );
    metrics::describe_histogram!(
        "trellis_cp_convergence_seconds",
        Unit::Seconds,
        "From a change being received (the start of its debounce) to a proxy's ACK of \
         the version carrying it; a proxy's first push on connect is not counted."
    );
}

pub struct DiscoveryService {
    hub: Hub,
    proxies: Proxies,
    next_id: AtomicU64,
    /// With a CA: a stream must present a mesh certificate, and gets only the
    /// view of a pod of the workload it proves.
    authenticate: bool,
}

/// Counter, label `reason` (`no_certificate`, `other_namespace`,
/// `other_service_account`): discovery streams refused.
pub const STREAMS_REFUSED_TOTAL: &str = "trellis_cp_streams_refused_total";

impl DiscoveryService {
    pub fn new(
        hub: Hub,
        proxies: Proxies,
        authenticate: bool,
    ) -> DiscoveryServer<DiscoveryService> {
        let mut service = DiscoveryService::serving(hub, proxies);
        service.authenticate = authenticate;
        DiscoveryServer::new(service)
    }

    fn serving(hub: Hub, proxies: Proxies) -> DiscoveryService {
        DiscoveryService {
            hub,
            proxies,
            next_id: AtomicU64::new(1),
            authenticate: false,
        }
    }

    /// Refuses a stream whose node is not a pod of `workload` (what its
    /// certificate proves): another namespace, or a pod the snapshot knows runs
    /// as another service account.
    fn check_claim(&self, workload: &Workload, node: Option<&Node>) -> Result<(), Status> {
        let Some(node) = node else {
            return Ok(());
        };
        let refuse = |reason: &'static str, message: String| {
            metrics::counter!(STREAMS_REFUSED_TOTAL, "reason" => reason).increment(1);
            tracing::warn!(reason, %message, "discovery stream refused");
            Err(Status::permission_denied(message))
        };
        if node.namespace != workload.namespace {
            return refuse(
                "other_namespace",
                format!(
                    "the certificate proves {workload}; the stream claims pod {}/{}",
                    node.namespace, node.pod
                ),
            );
        }
        let snapshot = self.hub.snapshots().borrow().clone();
        let account = snapshot.as_ref().and_then(|s| {
            s.service_account_of(&node.namespace, &node.pod)
                .map(str::to_owned)
        });
        match account {
            Some(account) if account != workload.service_account => refuse(
                "other_service_account",
                format!(
                    "the certificate proves {workload}; pod {}/{} runs as {}/{account}",
                    node.namespace, node.pod, node.namespace
                ),
            ),
            _ => Ok(()),
        }
    }

    /// Registers the proxy that said who it is in `first` and serves it until
    /// `incoming` ends; the responses come out of the returned stream.
    fn open<S>(
        &self,
        first: DiscoveryRequest,
        incoming: S,
    ) -> Result<ReceiverStream<Result<DiscoveryResponse, Status>>, Status>
    where
        S: Stream<Item = Result<DiscoveryRequest, Status>> + Send + 'static,
    {
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
        Ok(ReceiverStream::new(responses))
    }
}

/// The workload the client's mesh certificate proves.
fn caller<T>(request: &Request<T>) -> Result<Workload, Status> {
    let refused = || {
        metrics::counter!(STREAMS_REFUSED_TOTAL, "reason" => "no_certificate").increment(1);
        Status::unauthenticated(
            "discovery needs the proxy's mesh certificate (from the identity service)",
        )
    };
    let certificates = request.peer_certs().ok_or_else(refused)?;
    let leaf = certificates.first().ok_or_else(refused)?;
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf).map_err(|_| refused())?;
    let san = parsed
        .subject_alternative_name()
        .ok()
        .flatten()
        .ok_or_else(refused)?;
    san.value
        .general_names
        .iter()
        .find_map(|name| match name {
            x509_parser::extensions::GeneralName::URI(uri) => Workload::from_spiffe_id(uri),
            _ => None,
        })
        .ok_or_else(refused)
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Discovery for DiscoveryService {
    type StreamStream = ResponseStream;

    async fn stream(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<ResponseStream>, Status> {
        let workload = match self.authenticate {
            true => Some(caller(&request)?),
            false => None,
        };
        let mut incoming = request.into_inner();
        let first = incoming.message().await?.ok_or_else(|| {
            Status::invalid_argument("the stream ended before the proxy said who it is")
        })?;
        if let Some(workload) = &workload {
            self.check_claim(workload, first.node.as_ref())?;
        }
        let responses = self.open(first, incoming)?;
        Ok(Response::new(Box::pin(responses)))
    }
}

/// A response waiting for its answer: when the change it carries was received,
/// or None for the first push of a stream (which carries no change of its own).
type InFlight = HashMap<String, Option<Instant>>;

/// Runs one proxy's stream until it ends, then forgets the proxy.
async fn serve(
    id: u64,
    node: Node,
    incoming: impl Stream<Item = Result<DiscoveryRequest, Status>>,
    out: mpsc::Sender<Result<DiscoveryResponse, Status>>,
    hub: Hub,
    proxies: Proxies,
) {
    let mut incoming = std::pin::pin!(incoming);
    let mut snapshots = hub.snapshots();
    let mut sent: Option<View> = None;
    let mut in_flight = InFlight::new();
    let mut nonce = 0u64;
    loop {
        let current = snapshots.borrow_and_update().clone();
        if let Some(snapshot) = current {
            if let Some(response) = next_response(&snapshot, &node, &mut sent, &mut nonce) {
                let size: usize = response.resources.iter().map(|r| r.json.len()).sum();
                metrics::counter!("trellis_cp_pushes_total").increment(1);
                metrics::histogram!("trellis_cp_push_bytes").record(size as f64);
                let change = (!response.full).then_some(snapshot.changed_at);
                in_flight.insert(response.nonce.clone(), change);
                proxies.update(id, |s| s.sent_version = response.version.clone());
                if out.send(Ok(response)).await.is_err() {
                    break;
                }
            }
        }
        tokio::select! {
            changed = snapshots.changed() => if changed.is_err() { break },
            message = incoming.next() => match message {
                Some(Ok(answer)) => record_answer(id, &node, answer, &mut in_flight, &proxies),
                None | Some(Err(_)) => break,
            },
        }
    }
    proxies.forget(id);
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

/// Records a proxy's answer to the response it names: an ACK (and, for a change,
/// how long it took to converge) or a NACK.
fn record_answer(
    id: u64,
    node: &Node,
    answer: DiscoveryRequest,
    in_flight: &mut InFlight,
    proxies: &Proxies,
) {
    let Some(change) = in_flight.remove(&answer.nonce) else {
        return;
    };
    match answer.nack {
        None => {
            if let Some(changed_at) = change {
                metrics::histogram!("trellis_cp_convergence_seconds")
                    .record(changed_at.elapsed().as_secs_f64());
            }
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

/// A proxy speaking the protocol over in-process channels, for tests here and in
/// the modules that read what streams record.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use trellis_proto::v1::Nack;

    /// The service the server would run, without the server.
    pub(crate) fn service(hub: &Hub, proxies: &Proxies) -> DiscoveryService {
        DiscoveryService::serving(hub.clone(), proxies.clone())
    }

    pub(crate) struct TestProxy {
        answers: Option<mpsc::Sender<Result<DiscoveryRequest, Status>>>,
        responses: ReceiverStream<Result<DiscoveryResponse, Status>>,
    }

    impl TestProxy {
        pub(crate) fn connect(service: &DiscoveryService, namespace: &str, pod: &str) -> TestProxy {
            let (answers, incoming) = mpsc::channel(4);
            let first = DiscoveryRequest {
                node: Some(Node {
                    namespace: namespace.into(),
                    pod: pod.into(),
                    ..Default::default()
                }),
                ..Default::default()
            };
            let responses = service
                .open(first, ReceiverStream::new(incoming))
                .expect("the stream opens");
            TestProxy {
                answers: Some(answers),
                responses,
            }
        }

        pub(crate) async fn next(&mut self) -> DiscoveryResponse {
            self.responses
                .next()
                .await
                .expect("the stream is open")
                .expect("a response")
        }

        /// ACKs `response`, or NACKs it with `nack`.
        pub(crate) async fn answer(&self, response: &DiscoveryResponse, nack: Option<&str>) {
            let answer = DiscoveryRequest {
                version: response.version.clone(),
                nonce: response.nonce.clone(),
                nack: nack.map(|message| Nack {
                    resource: "service/shop/a/80".into(),
                    message: message.into(),
                }),
                ..Default::default()
            };
            let answers = self.answers.as_ref().expect("the stream is open");
            answers
                .send(Ok(answer))
                .await
                .expect("the stream is served");
        }

        /// Ends the proxy's side of the stream.
        pub(crate) fn hang_up(&mut self) {
            self.answers = None;
        }
    }

    /// Services `a`, `b`, ... in namespace `shop`.
    pub(crate) fn services(names: &[&str]) -> crate::translate::Objects {
        let yaml: Vec<String> = names
            .iter()
            .map(|name| {
                format!(
                    "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: shop}}\n\
                     spec: {{ports: [{{port: 80}}]}}\n"
                )
            })
            .collect();
        crate::translate::fixtures::objects(&yaml.join("---\n"))
    }

    /// Runs whatever is ready (streams answering, the hub publishing) without
    /// moving the paused clock.
    pub(crate) async fn settle() {
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{services, settle, TestProxy};
    use super::*;
    use std::time::Duration;

    /// `name`'s `_sum` and `_count` in the exporter's text.
    fn sum_and_count(rendered: &str, name: &str) -> (f64, f64) {
        let value = |suffix: &str| {
            rendered
                .lines()
                .find_map(|line| line.strip_prefix(&format!("{name}{suffix} ")))
                .map_or(0.0, |v| v.trim().parse().unwrap())
        };
        (value("_sum"), value("_count"))
    }

    #[tokio::test(start_paused = true)]
    async fn a_proxy_is_forgotten_when_its_stream_ends() {
        let hub = Hub::start(Duration::from_millis(100), Duration::from_secs(1));
        hub.update(services(&["a"]));
        let proxies = Proxies::default();
        let service = testing::service(&hub, &proxies);
        let mut proxy = TestProxy::connect(&service, "shop", "p");
        let mut other = TestProxy::connect(&service, "shop", "q");
        let first = proxy.next().await;
        assert!(first.full);
        proxy.answer(&first, None).await;
        other.next().await;
        settle().await;
        let list = proxies.list();
        assert_eq!(list.len(), 2);
        assert!(list[0].connected);
        assert_eq!(list[0].acked_version, first.version);

        proxy.hang_up();
        settle().await;
        let pods: Vec<String> = proxies.list().into_iter().map(|p| p.pod).collect();
        assert_eq!(
            pods,
            ["q"],
            "the disconnected proxy is forgotten, the other kept"
        );
        other.hang_up();
        settle().await;
        assert!(proxies.list().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn convergence_is_timed_from_a_change_to_its_ack_not_from_a_proxy_connecting() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let exporter = recorder.handle();
        let _recorder = metrics::set_default_local_recorder(&recorder);
        let convergence = || sum_and_count(&exporter.render(), "trellis_cp_convergence_seconds");

        let hub = Hub::start(Duration::from_millis(100), Duration::from_secs(1));
        hub.update(services(&["a"]));
        // The mesh stays as it is for three hours; then a proxy connects.
        tokio::time::sleep(Duration::from_secs(3 * 3600)).await;
        let proxies = Proxies::default();
        let service = testing::service(&hub, &proxies);
        let mut proxy = TestProxy::connect(&service, "shop", "p");
        let first = proxy.next().await;
        assert!(first.full);
        proxy.answer(&first, None).await;
        settle().await;
        assert_eq!(proxies.list()[0].acked_version, first.version);
        assert_eq!(convergence(), (0.0, 0.0), "a first push is no convergence");

        // A change: debounced for 100 ms, pushed, ACKed 50 ms later.
        hub.update(services(&["a", "b"]));
        let next = proxy.next().await;
        assert!(!next.full);
        assert_eq!(next.resources.len(), 1);
        tokio::time::sleep(Duration::from_millis(50)).await;
        proxy.answer(&next, None).await;
        settle().await;
        let (sum, count) = convergence();
        assert_eq!(count, 1.0);
        assert!((sum - 0.150).abs() < 1e-9, "{sum}");

        // A NACKed version did not converge.
        hub.update(services(&["a", "b", "c"]));
        let refused = proxy.next().await;
        proxy.answer(&refused, Some("not today")).await;
        settle().await;
        assert_eq!(convergence().1, 1.0);
        let status = &proxies.list()[0];
        assert!(status.last_nack.as_deref().unwrap().contains("not today"));
    }
}
