//! A small Kubernetes API server of our own, for what a real one cannot easily be
//! made to do: serve EndpointSlice `discovery.k8s.io/v1` (Kubernetes 1.20 does not)
//! and fail watches on demand.
//!
//! It speaks the real protocol over plain HTTP on 127.0.0.1 (a random port, so any
//! number may run at once) for Services (`/api/v1/services`), Pods
//! (`/api/v1/pods`) and EndpointSlices (`/apis/discovery.k8s.io/v1/endpointslices`),
//! cluster-wide and under `/namespaces/{ns}/`:
//!
//! - list: `GET <path>` answers a `<Kind>List` with the current resourceVersion;
//!   every object carries its own `metadata.resourceVersion`.
//! - watch: `GET <path>?watch=true&resourceVersion=N` answers a chunked stream of
//!   JSON lines (`{"type":"ADDED|MODIFIED|DELETED|BOOKMARK","object":{...}}`):
//!   every event after N from the history, then live ones. When N is older than
//!   the compacted point, one `ERROR` line with a 410 `Expired` Status, and the
//!   stream ends, as a real API server does. Without a resourceVersion (or with
//!   `0`) the current objects are sent as `ADDED` first. `timeoutSeconds` ends the
//!   stream after that long.
//!
//! Everything else answers 404 with a Kubernetes `Status` body and is recorded
//! ([`FakeApiServer::unknown`]). The test controls are on [`FakeApiServer`].

use crate::TempDir;
use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::{body::Frame, service::service_fn, Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use std::{
    collections::{BTreeMap, HashMap},
    convert::Infallible,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};
use tokio::sync::mpsc;

/// A kind the server serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Service,
    Pod,
    EndpointSlice,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Service, Kind::Pod, Kind::EndpointSlice];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::Pod => "Pod",
            Kind::EndpointSlice => "EndpointSlice",
        }
    }

    pub fn api_version(self) -> &'static str {
        match self {
            Kind::Service | Kind::Pod => "v1",
            Kind::EndpointSlice => "discovery.k8s.io/v1",
        }
    }

    /// The path prefix of the kind's group/version.
    fn prefix(self) -> &'static str {
        match self {
            Kind::Service | Kind::Pod => "/api/v1/",
            Kind::EndpointSlice => "/apis/discovery.k8s.io/v1/",
        }
    }

    fn plural(self) -> &'static str {
        match self {
            Kind::Service => "services",
            Kind::Pod => "pods",
            Kind::EndpointSlice => "endpointslices",
        }
    }

    pub fn from_name(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == name)
    }
}

/// One change, as a watch sends it.
#[derive(Clone)]
struct Event {
    version: u64,
    kind: Kind,
    namespace: String,
    type_: &'static str,
    object: Value,
}

/// An open watch stream.
struct Watch {
    kind: Kind,
    namespace: Option<String>,
    bookmarks: bool,
    lines: mpsc::UnboundedSender<Bytes>,
}

impl Watch {
    fn wants(&self, kind: Kind, namespace: &str) -> bool {
        self.kind == kind && self.namespace.as_deref().is_none_or(|ns| ns == namespace)
    }
}

#[derive(Default)]
struct Inner {
    /// The global resourceVersion: that of the last write.
    version: u64,
    /// Watches from a resourceVersion older than this get 410 Gone.
    compacted: u64,
    objects: BTreeMap<(Kind, String, String), Value>,
    history: Vec<Event>,
    watches: Vec<Watch>,
    lists: HashMap<Kind, usize>,
    /// The `resourceVersion` parameter of each watch request, by kind.
    watch_versions: HashMap<Kind, Vec<String>>,
    bookmarks_sent: HashMap<Kind, usize>,
    expired_sent: HashMap<Kind, usize>,
    unknown: Vec<String>,
    requests: Vec<String>,
}

impl Inner {
    /// Sends `event` to the open watches that want it (dropping closed ones).
    fn publish(&mut self, event: Event) {
        let line = watch_line(event.type_, &event.object);
        self.watches.retain(|w| {
            !w.wants(event.kind, &event.namespace) || w.lines.send(line.clone()).is_ok()
        });
        self.history.push(event);
    }
}

fn watch_line(type_: &str, object: &Value) -> Bytes {
    let mut line =
        serde_json::to_vec(&json!({"type": type_, "object": object})).expect("an event serialises");
    line.push(b'\n');
    Bytes::from(line)
}

/// The running server; stops when dropped.
pub struct FakeApiServer {
    pub addr: SocketAddr,
    /// A kubeconfig naming `http://<addr>`.
    pub kubeconfig: PathBuf,
    state: Arc<Mutex<Inner>>,
    task: tokio::task::JoinHandle<()>,
    _dir: TempDir,
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.task.abort();
        // Ends open watch streams.
        self.lock().watches.clear();
    }
}

impl FakeApiServer {
    /// Starts it on a random port of 127.0.0.1 and writes its kubeconfig.
    pub async fn start() -> FakeApiServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let state = Arc::new(Mutex::new(Inner::default()));
        let dir = TempDir::new("fake-apiserver");
        let kubeconfig = dir.0.join("kubeconfig");
        write_kubeconfig(&kubeconfig, addr);
        let served = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = served.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(handle(&state, request)) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        FakeApiServer {
            addr,
            kubeconfig,
            state,
            task,
            _dir: dir,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds or modifies `object` (its `kind`, `metadata.namespace` — `default`
    /// when absent — and `metadata.name` say which), giving it the next
    /// resourceVersion and sending ADDED or MODIFIED to the watches. Returns the
    /// object as stored.
    pub fn apply(&self, mut object: Value) -> Value {
        let kind_name = object["kind"].as_str().unwrap_or_default().to_owned();
        let kind = Kind::from_name(&kind_name)
            .unwrap_or_else(|| panic!("the fake API server does not serve {kind_name:?}"));
        let name = object["metadata"]["name"]
            .as_str()
            .expect("metadata.name")
            .to_owned();
        let namespace = object["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_owned();
        let mut inner = self.lock();
        inner.version += 1;
        let version = inner.version;
        object["apiVersion"] = json!(kind.api_version());
        object["metadata"]["namespace"] = json!(namespace);
        object["metadata"]["resourceVersion"] = json!(version.to_string());
        let key = (kind, namespace.clone(), name.clone());
        let type_ = match inner.objects.get(&key) {
            Some(old) => {
                object["metadata"]["uid"] = old["metadata"]["uid"].clone();
                "MODIFIED"
            }
            None => {
                object["metadata"]["uid"] = json!(format!("uid-{version}"));
                "ADDED"
            }
        };
        inner.objects.insert(key, object.clone());
        inner.publish(Event {
            version,
            kind,
            namespace,
            type_,
            object: object.clone(),
        });
        object
    }

    /// Deletes an object, sending DELETED (with a new resourceVersion). Returns
    /// whether it was there.
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) -> bool {
        let mut inner = self.lock();
        let Some(mut object) = inner
            .objects
            .remove(&(kind, namespace.to_owned(), name.to_owned()))
        else {
            return false;
        };
        inner.version += 1;
        let version = inner.version;
        object["metadata"]["resourceVersion"] = json!(version.to_string());
        inner.publish(Event {
            version,
            kind,
            namespace: namespace.to_owned(),
            type_: "DELETED",
            object,
        });
        true
    }

    /// Forgets the history up to now. As in a busy cluster, where other writes
    /// happen between a watcher's last event and the compaction, the global
    /// resourceVersion first moves on by one, so every watcher's last version is
    /// older than the compacted point and a watch resumed from it gets 410 Gone.
    pub fn compact(&self) {
        let mut inner = self.lock();
        inner.version += 1;
        inner.compacted = inner.version;
        inner.history.clear();
    }

    /// Ends every open watch stream (cleanly, as a server timeout or restart
    /// does). Returns how many were open.
    pub fn end_watches(&self) -> usize {
        let mut inner = self.lock();
        let open = inner
            .watches
            .iter()
            .filter(|w| !w.lines.is_closed())
            .count();
        inner.watches.clear();
        open
    }

    /// Sends a BOOKMARK with the current resourceVersion to every open watch that
    /// asked for bookmarks. Returns how many got one.
    pub fn bookmark(&self) -> usize {
        let mut inner = self.lock();
        let version = inner.version.to_string();
        let mut sent = Vec::new();
        inner.watches.retain(|w| {
            if !w.bookmarks {
                return true;
            }
            let object = json!({
                "kind": w.kind.name(),
                "apiVersion": w.kind.api_version(),
                "metadata": {"resourceVersion": version},
            });
            let ok = w.lines.send(watch_line("BOOKMARK", &object)).is_ok();
            if ok {
                sent.push(w.kind);
            }
            ok
        });
        for kind in &sent {
            *inner.bookmarks_sent.entry(*kind).or_default() += 1;
        }
        sent.len()
    }

    /// The current (global) resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.lock().version
    }

    /// How many lists of `kind` were served.
    pub fn lists(&self, kind: Kind) -> usize {
        self.lock().lists.get(&kind).copied().unwrap_or(0)
    }

    /// How many watches of `kind` were requested.
    pub fn watches(&self, kind: Kind) -> usize {
        self.lock().watch_versions.get(&kind).map_or(0, Vec::len)
    }

    /// The `resourceVersion` each watch of `kind` asked for, in order.
    pub fn watch_versions(&self, kind: Kind) -> Vec<String> {
        self.lock()
            .watch_versions
            .get(&kind)
            .cloned()
            .unwrap_or_default()
    }

    /// How many watches of `kind` were answered 410 Gone.
    pub fn expired(&self, kind: Kind) -> usize {
        self.lock().expired_sent.get(&kind).copied().unwrap_or(0)
    }

    /// How many bookmarks were sent to watches of `kind`.
    pub fn bookmarks_sent(&self, kind: Kind) -> usize {
        self.lock().bookmarks_sent.get(&kind).copied().unwrap_or(0)
    }

    /// How many watches of `kind` are open now.
    pub fn open_watches(&self, kind: Kind) -> usize {
        self.lock()
            .watches
            .iter()
            .filter(|w| w.kind == kind && !w.lines.is_closed())
            .count()
    }

    /// Every request served (`METHOD path?query`), in order.
    pub fn requests(&self) -> Vec<String> {
        self.lock().requests.clone()
    }

    /// Every request answered 404 (`METHOD path?query`).
    pub fn unknown(&self) -> Vec<String> {
        self.lock().unknown.clone()
    }
}

fn write_kubeconfig(path: &Path, addr: SocketAddr) {
    let text = format!(
        "apiVersion: v1
kind: Config
clusters:
- name: fake
  cluster:
    server: http://{addr}
users:
- name: fake
  user: {{}}
contexts:
- name: fake
  context:
    cluster: fake
    user: fake
current-context: fake
"
    );
    std::fs::write(path, text).expect("write kubeconfig");
}

type Body = BoxBody<Bytes, Infallible>;

fn json_response(code: u16, value: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(value.to_string())).boxed())
        .expect("a response")
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

/// What a request path names: a kind, maybe a namespace, maybe one object.
fn route(path: &str) -> Option<(Kind, Option<String>, Option<String>)> {
    for kind in Kind::ALL {
        let Some(rest) = path.strip_prefix(kind.prefix()) else {
            continue;
        };
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [plural] if *plural == kind.plural() => return Some((kind, None, None)),
            ["namespaces", ns, plural] if *plural == kind.plural() => {
                return Some((kind, Some((*ns).to_owned()), None))
            }
            ["namespaces", ns, plural, name] if *plural == kind.plural() => {
                return Some((kind, Some((*ns).to_owned()), Some((*name).to_owned())))
            }
            _ => {}
        }
    }
    None
}

fn handle(state: &Mutex<Inner>, request: Request<hyper::body::Incoming>) -> Response<Body> {
    let mut inner = state.lock().unwrap_or_else(|p| p.into_inner());
    let path = request.uri().path().to_owned();
    inner
        .requests
        .push(format!("{} {}", request.method(), request.uri()));
    let query: HashMap<String, String> = request
        .uri()
        .query()
        .map(|q| {
            q.split('&')
                .map(|pair| {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    (k.to_owned(), v.to_owned())
                })
                .collect()
        })
        .unwrap_or_default();
    let routed = (request.method() == hyper::Method::GET)
        .then(|| route(&path))
        .flatten();
    let Some((kind, namespace, name)) = routed else {
        let what = format!("{} {}", request.method(), request.uri());
        eprintln!("fake apiserver: 404 for {what}");
        inner.unknown.push(what);
        return json_response(
            404,
            &status(
                404,
                "NotFound",
                "the server could not find the requested resource",
            ),
        );
    };
    let in_scope = |ns: &str| -> bool { namespace.as_deref().is_none_or(|wanted| wanted == ns) };
    if let Some(name) = name {
        let key = (kind, namespace.clone().unwrap_or_default(), name.clone());
        return match inner.objects.get(&key) {
            Some(object) => json_response(200, object),
            None => json_response(
                404,
                &status(
                    404,
                    "NotFound",
                    &format!("{} \"{name}\" not found", kind.plural()),
                ),
            ),
        };
    }
    if query.get("watch").is_some_and(|w| w == "true" || w == "1") {
        let from = query.get("resourceVersion").cloned().unwrap_or_default();
        inner
            .watch_versions
            .entry(kind)
            .or_default()
            .push(from.clone());
        let (lines, receiver) = mpsc::unbounded_channel::<Bytes>();
        match from.parse::<u64>() {
            Ok(n) if n != 0 && n < inner.compacted => {
                let _ = lines.send(watch_line(
                    "ERROR",
                    &json!({
                        "kind": "Status",
                        "apiVersion": "v1",
                        "metadata": {},
                        "status": "Failure",
                        "reason": "Expired",
                        "code": 410,
                        "message": format!("too old resource version: {n} ({})", inner.compacted),
                    }),
                ));
                *inner.expired_sent.entry(kind).or_default() += 1;
                drop(lines);
            }
            Ok(n) if n != 0 => {
                for event in inner
                    .history
                    .iter()
                    .filter(|e| e.kind == kind && e.version > n && in_scope(&e.namespace))
                {
                    let _ = lines.send(watch_line(event.type_, &event.object));
                }
                inner.watches.push(Watch {
                    kind,
                    namespace: namespace.clone(),
                    bookmarks: query
                        .get("allowWatchBookmarks")
                        .is_some_and(|b| b == "true"),
                    lines,
                });
            }
            _ if from.is_empty() || from == "0" => {
                for ((k, ns, _), object) in &inner.objects {
                    if *k == kind && in_scope(ns) {
                        let _ = lines.send(watch_line("ADDED", object));
                    }
                }
                inner.watches.push(Watch {
                    kind,
                    namespace: namespace.clone(),
                    bookmarks: query
                        .get("allowWatchBookmarks")
                        .is_some_and(|b| b == "true"),
                    lines,
                });
            }
            _ => {
                return json_response(
                    400,
                    &status(
                        400,
                        "BadRequest",
                        &format!("invalid resourceVersion {from:?}"),
                    ),
                )
            }
        }
        let stream = tokio_stream::wrappers::UnboundedReceiverStream::new(receiver)
            .map(|line| Ok::<_, Infallible>(Frame::data(line)));
        let body: Body = match query
            .get("timeoutSeconds")
            .and_then(|t| t.parse::<u64>().ok())
        {
            Some(seconds) => BodyExt::boxed(StreamBody::new(
                stream.take_until(tokio::time::sleep(Duration::from_secs(seconds))),
            )),
            None => BodyExt::boxed(StreamBody::new(stream)),
        };
        return Response::builder()
            .status(200)
            .header("content-type", "application/json")
            .body(body)
            .expect("a response");
    }
    *inner.lists.entry(kind).or_default() += 1;
    let items: Vec<Value> = inner
        .objects
        .iter()
        .filter(|((k, ns, _), _)| *k == kind && in_scope(ns))
        .map(|(_, object)| object.clone())
        .collect();
    json_response(
        200,
        &json!({
            "kind": format!("{}List", kind.name()),
            "apiVersion": kind.api_version(),
            "metadata": {"resourceVersion": inner.version.to_string()},
            "items": items,
        }),
    )
}
