//! The discovery service: one stream per proxy. The first response carries the
//! proxy's whole view; later ones only the resources of its view that changed or
//! went away, and a proxy whose view did not change is sent nothing. Every version
//! is answered with an ACK or a NACK, which the per-proxy status records; a proxy
//! is forgotten when its stream ends.
//!
//! A full push is the whole view encoded for one stream, held until the proxy has
//! read it; when many proxies connect at once (a control-plane restart), at most
//! [`FULL_PUSHES`] are in flight and the rest wait their turn, so memory holds a
//! bounded number of them. A push's turn ends when the proxy answers it (or after
//! [`FULL_PUSH_TURN`], for one that never does).
//!
//! Convergence (`trellis_cp_convergence_seconds`) is timed from when a change was
//! received (the start of the hub's debounce) to a proxy's ACK of the version
//! carrying it. A proxy's first push on connect carries no change of its own (the
//! snapshot may be hours old), so it is not a sample. A stream that falls behind
//! skips versions and receives their changes with a later one; the sample is then
//! timed from that later version's change.

mod wire;

use crate::hub::{Hub, Snapshot, View};
use bytes::Bytes;
use serde::Serialize;
use std::{
    collections::HashMap,
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll},
    time::SystemTime,
};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::time::{Duration, Instant};
use tokio_stream::{Stream, StreamExt};
use tonic::{server::NamedService, Request, Status, Streaming};
use trellis_proto::model::config::Workload;
use trellis_proto::v1::{DiscoveryRequest, DiscoveryResponse, Node};
pub use wire::PART_BYTES;
use wire::{encode_parts, EncodedMeshes, Message};

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
        "Versions sent to proxies (each in one or more parts)."
    );
    metrics::describe_histogram!(
        "trellis_cp_push_bytes",
        Unit::Bytes,
        "Resource bytes per version sent to a proxy."
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

/// Full pushes in flight at once: enough to keep a fast network busy, few enough
/// that 1 000 proxies reconnecting together do not hold 1 000 encoded views.
pub const FULL_PUSHES: usize = 32;

/// How long a full push keeps its turn when the proxy does not answer it.
pub const FULL_PUSH_TURN: Duration = Duration::from_secs(10);

pub struct DiscoveryService {
    hub: Hub,
    proxies: Proxies,
    full_pushes: Arc<Semaphore>,
    meshes: Arc<EncodedMeshes>,
    next_id: AtomicU64,
    /// With a CA: a stream must present a mesh certificate, and gets only the
    /// view of a pod of the workload it proves.
    authenticate: bool,
}

/// Counter, label `reason` (`no_certificate`, `other_namespace`,
/// `other_service_account`): discovery streams refused.
pub const STREAMS_REFUSED_TOTAL: &str = "trellis_cp_streams_refused_total";

/// The discovery service as the gRPC server routes to it. The method is written
/// by hand, not generated, so that responses go out as `wire` encodes them.
#[derive(Clone)]
pub struct DiscoveryServer(Arc<DiscoveryService>);

impl NamedService for DiscoveryServer {
    const NAME: &'static str = "trellis.v1.Discovery";
}

/// The one method.
const STREAM_PATH: &str = "/trellis.v1.Discovery/Stream";

type ResponseFuture =
    Pin<Box<dyn Future<Output = Result<http::Response<tonic::body::Body>, Infallible>> + Send>>;

impl tower::Service<http::Request<tonic::body::Body>> for DiscoveryServer {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> ResponseFuture {
        let service = self.0.clone();
        Box::pin(async move {
            if request.uri().path() != STREAM_PATH {
                let status = Status::unimplemented(format!("no method {}", request.uri().path()));
                return Ok(status.into_http());
            }
            Ok(match service.stream(wire::request(request)).await {
                Ok(messages) => wire::response(messages),
                Err(status) => status.into_http(),
            })
        })
    }
}

impl DiscoveryServer {
    /// The service the gRPC server routes discovery streams to.
    pub fn new(hub: Hub, proxies: Proxies, authenticate: bool) -> DiscoveryServer {
        let mut service = DiscoveryService::serving(hub, proxies);
        service.authenticate = authenticate;
        DiscoveryServer(Arc::new(service))
    }
}

impl DiscoveryService {
    fn serving(hub: Hub, proxies: Proxies) -> DiscoveryService {
        DiscoveryService {
            hub,
            proxies,
            full_pushes: Arc::new(Semaphore::new(FULL_PUSHES)),
            meshes: Arc::default(),
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
    ) -> Result<mpsc::Receiver<Message>, Status>
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
            ProxyStream {
                id,
                node,
                out,
                hub: self.hub.clone(),
                proxies: self.proxies.clone(),
                full_pushes: self.full_pushes.clone(),
                meshes: self.meshes.clone(),
            },
            incoming,
        ));
        Ok(responses)
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

impl DiscoveryService {
    /// Serves one proxy's stream: its responses come out of the returned channel.
    async fn stream(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<mpsc::Receiver<Message>, Status> {
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
        self.open(first, incoming)
    }
}

/// A response waiting for its answer: when the change it carries was received,
/// or None for the first push of a stream (which carries no change of its own).
type InFlight = HashMap<String, Option<Instant>>;

/// One proxy's stream, as [`serve`] runs it.
struct ProxyStream {
    id: u64,
    node: Node,
    out: mpsc::Sender<Message>,
    hub: Hub,
    proxies: Proxies,
    full_pushes: Arc<Semaphore>,
    meshes: Arc<EncodedMeshes>,
}

/// A full push's turn: held until the proxy answers `nonce`, or `until`.
struct Turn {
    nonce: String,
    until: Instant,
    _permit: OwnedSemaphorePermit,
}

/// Runs one proxy's stream until it ends, then forgets the proxy.
async fn serve(
    stream: ProxyStream,
    incoming: impl Stream<Item = Result<DiscoveryRequest, Status>>,
) {
    let ProxyStream {
        id,
        node,
        out,
        hub,
        proxies,
        full_pushes,
        meshes,
    } = stream;
    let mut incoming = std::pin::pin!(incoming);
    let mut snapshots = hub.snapshots();
    let mut sent: Option<View> = None;
    let mut in_flight = InFlight::new();
    let mut nonce = 0u64;
    let mut turn: Option<Turn> = None;
    // Wait for a turn at the full push (or for the proxy to go away).
    let mut permit = tokio::select! {
        permit = full_pushes.acquire_owned() => permit.ok(),
        () = out.closed() => None,
    };
    loop {
        let current = snapshots.borrow_and_update().clone();
        if let Some(snapshot) = current {
            let push = match next_push(&snapshot, &node, &mut sent, &mut nonce, &meshes) {
                Ok(push) => push,
                Err(message) => {
                    tracing::error!(namespace = %node.namespace, pod = %node.pod, %message, "cannot push");
                    break;
                }
            };
            let mut messages = Vec::new();
            if let Some(push) = push {
                metrics::counter!("trellis_cp_pushes_total").increment(1);
                metrics::histogram!("trellis_cp_push_bytes").record(push.bytes as f64);
                let change = (!push.full).then_some(snapshot.changed_at);
                in_flight.insert(push.last_nonce.clone(), change);
                if let Some(permit) = permit.take() {
                    turn = Some(Turn {
                        nonce: push.last_nonce,
                        until: Instant::now() + FULL_PUSH_TURN,
                        _permit: permit,
                    });
                }
                proxies.update(id, |s| s.sent_version = push.version);
                messages = push.messages;
            }
            // A proxy that stops reading mid-push still gives its turn up in time.
            let send = async {
                for message in messages {
                    out.send(message).await?;
                }
                Ok::<_, mpsc::error::SendError<_>>(())
            };
            let mut send = std::pin::pin!(send);
            let sent = loop {
                let turn_ends = turn.as_ref().map(|t| t.until);
                tokio::select! {
                    sent = &mut send => break sent,
                    () = sleep_until(turn_ends), if turn_ends.is_some() => turn = None,
                }
            };
            if sent.is_err() {
                break;
            }
        }
        let turn_ends = turn.as_ref().map(|t| t.until);
        tokio::select! {
            changed = snapshots.changed() => if changed.is_err() { break },
            message = incoming.next() => match message {
                Some(Ok(answer)) => {
                    if turn.as_ref().is_some_and(|t| t.nonce == answer.nonce) {
                        turn = None;
                    }
                    record_answer(id, &node, answer, &mut in_flight, &proxies)
                }
                None | Some(Err(_)) => break,
            },
            () = sleep_until(turn_ends), if turn_ends.is_some() => turn = None,
        }
    }
    proxies.forget(id);
    metrics::gauge!("trellis_cp_connected_proxies").decrement(1.0);
    tracing::info!(namespace = %node.namespace, pod = %node.pod, "proxy disconnected");
}

/// Sleeps until `at`; forever when there is none.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// A version as it goes to one proxy.
struct Push {
    /// Its parts, in order.
    messages: Vec<Message>,
    version: String,
    /// The last part's, which the proxy answers.
    last_nonce: String,
    /// Whether it is the proxy's whole view.
    full: bool,
    /// Resource bytes, every part's.
    bytes: usize,
}

/// The version that brings this proxy from what it was sent to `snapshot`, or
/// none when its view did not change: a full push of the whole view to a proxy
/// sent nothing yet (the mesh's parts as `meshes` encoded them once, then the
/// pod's own), else the resources that changed. Every part but the last has
/// `more`; the first carries `full` and the removed names.
fn next_push(
    snapshot: &Snapshot,
    node: &Node,
    sent: &mut Option<View>,
    nonce: &mut u64,
    meshes: &EncodedMeshes,
) -> Result<Option<Push>, String> {
    let view = snapshot.view(&node.namespace, &node.pod, &node.pod_ip);
    let (full, mut parts, removed) = match sent.as_ref() {
        None => {
            let mut parts = meshes.parts(&view.mesh).to_vec();
            parts.extend(encode_parts(&view.inbound));
            (true, parts, Vec::new())
        }
        Some(before) => {
            let (changed, removed) = view.diff(before);
            if changed.is_empty() && removed.is_empty() {
                return Ok(None);
            }
            (false, encode_parts(changed), removed)
        }
    };
    if parts.is_empty() {
        parts.push(Bytes::new());
    }
    let version = snapshot.version.to_string();
    let bytes = parts.iter().map(Bytes::len).sum();
    let last = parts.len() - 1;
    let mut removed = Some(removed);
    let messages = parts
        .into_iter()
        .enumerate()
        .map(|(i, resources)| {
            *nonce += 1;
            let head = DiscoveryResponse {
                version: version.clone(),
                nonce: nonce.to_string(),
                full: full && i == 0,
                removed: removed.take().unwrap_or_default(),
                more: i < last,
                resources: Vec::new(),
            };
            Message::new(&head, resources)
        })
        .collect::<Result<Vec<_>, _>>()?;
    *sent = Some(view);
    Ok(Some(Push {
        messages,
        version,
        last_nonce: nonce.to_string(),
        full,
        bytes,
    }))
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
        responses: mpsc::Receiver<Message>,
        /// A response [`TestProxy::has_response`] took off the stream.
        early: Option<DiscoveryResponse>,
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
                .open(first, tokio_stream::wrappers::ReceiverStream::new(incoming))
                .expect("the stream opens");
            TestProxy {
                answers: Some(answers),
                responses,
                early: None,
            }
        }

        /// Whether a response is waiting, without waiting for one.
        pub(crate) fn has_response(&mut self) -> bool {
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            match self.responses.poll_recv(&mut cx) {
                std::task::Poll::Ready(Some(message)) => {
                    self.early = Some(message.decode());
                    true
                }
                _ => false,
            }
        }

        pub(crate) async fn next(&mut self) -> DiscoveryResponse {
            if let Some(response) = self.early.take() {
                return response;
            }
            self.responses
                .recv()
                .await
                .expect("the stream is open")
                .decode()
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

    /// `count` services, `service-0` onwards, in namespace `shop`.
    pub(crate) fn numbered_services(count: usize) -> crate::translate::Objects {
        let names: Vec<String> = (0..count).map(|i| format!("service-{i}")).collect();
        services(&names.iter().map(String::as_str).collect::<Vec<_>>())
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
    use super::testing::{numbered_services, services, settle, TestProxy};
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

    #[tokio::test(start_paused = true)]
    async fn full_pushes_take_turns_so_a_crowd_of_proxies_holds_a_bounded_number() {
        let hub = Hub::start(Duration::from_millis(100), Duration::from_secs(1));
        hub.update(services(&["a", "b"]));
        let proxies = Proxies::default();
        let service = testing::service(&hub, &proxies);
        let mut crowd: Vec<TestProxy> = (0..FULL_PUSHES)
            .map(|i| TestProxy::connect(&service, "shop", &format!("p{i}")))
            .collect();
        let mut next = TestProxy::connect(&service, "shop", "next");
        let mut firsts = Vec::new();
        for proxy in &mut crowd {
            let first = proxy.next().await;
            assert!(first.full);
            firsts.push(first);
        }
        settle().await;
        assert!(!next.has_response(), "every turn is taken");

        // One proxy answering hands its turn on.
        crowd[0].answer(&firsts[0], None).await;
        let first = next.next().await;
        assert!(first.full);
        assert_eq!(first.resources.len(), 2);

        // Proxies that never answer hold their turns only so long.
        let mut late = TestProxy::connect(&service, "shop", "late");
        settle().await;
        assert!(!late.has_response());
        tokio::time::sleep(FULL_PUSH_TURN).await;
        assert!(late.next().await.full);

        // A turn is only for the first push: changes reach every proxy at once.
        hub.update(services(&["a", "b", "c"]));
        for proxy in crowd.iter_mut().chain([&mut next, &mut late]) {
            let change = proxy.next().await;
            assert!(!change.full);
            assert_eq!(change.resources.len(), 1);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_large_view_goes_in_parts_and_the_last_ones_answer_acks_it() {
        let hub = Hub::start(Duration::from_millis(100), Duration::from_secs(1));
        hub.update(numbered_services(1000));
        let proxies = Proxies::default();
        let service = testing::service(&hub, &proxies);
        let mut proxy = TestProxy::connect(&service, "shop", "p");
        let mut parts = vec![proxy.next().await];
        while parts.last().unwrap().more {
            parts.push(proxy.next().await);
        }
        assert!(parts.len() > 2, "{} parts", parts.len());
        assert!(parts[0].full && parts[1..].iter().all(|p| !p.full));
        let mut nonces: Vec<&str> = parts.iter().map(|p| p.nonce.as_str()).collect();
        nonces.dedup();
        assert_eq!(nonces.len(), parts.len(), "every part has its own nonce");
        for part in &parts {
            assert_eq!(part.version, parts[0].version);
            let size: usize = part.resources.iter().map(|r| r.json.len()).sum();
            let last = part.resources.last().map_or(0, |r| r.json.len());
            assert!(
                size - last < PART_BYTES,
                "a part stops once it passes the size"
            );
        }
        let sent: usize = parts.iter().map(|p| p.resources.len()).sum();
        assert_eq!(sent, 1000);

        // Answering a part before the last is not an ACK; answering the last is.
        proxy.answer(&parts[0], None).await;
        settle().await;
        assert_eq!(proxies.list()[0].acked_version, "");
        proxy.answer(parts.last().unwrap(), None).await;
        settle().await;
        assert_eq!(proxies.list()[0].acked_version, parts[0].version);
    }

    #[tokio::test(start_paused = true)]
    async fn a_proxy_that_stops_reading_mid_push_gives_its_turn_up() {
        let hub = Hub::start(Duration::from_millis(100), Duration::from_secs(1));
        hub.update(numbered_services(2000));
        let proxies = Proxies::default();
        let service = testing::service(&hub, &proxies);
        // Every turn taken by a proxy that reads nothing: its push (more parts than
        // its stream buffers) stalls.
        let _stalled: Vec<TestProxy> = (0..FULL_PUSHES)
            .map(|i| TestProxy::connect(&service, "shop", &format!("p{i}")))
            .collect();
        let mut next = TestProxy::connect(&service, "shop", "next");
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!next.has_response(), "every turn is taken");
        let first = tokio::time::timeout(FULL_PUSH_TURN * 2, next.next())
            .await
            .expect("a turn came free");
        assert!(first.full);
    }
}
