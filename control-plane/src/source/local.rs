//! Local mode: a directory of the same YAML an operator would `kubectl apply`
//! (Services, EndpointSlices, Pods, HTTPRoutes, GRPCRoutes, TrafficPolicies,
//! ServerPolicies), read again whenever a file in it changes, and reported whole
//! to the [`Hub`]. A change is noticed as soon as a file is closed after writing,
//! moved in or out, or deleted (inotify), and otherwise by the next poll.
//!
//! A document that does not parse as its kind is reported with its file, document
//! number and field (in the log and on the admin port's `/status`); the last
//! version of that file that parsed stays in effect, so a bad edit changes nothing.
//! Each object's file is kept in [`Objects::origins`], so a status can name the
//! file as well as the field.

use crate::{
    crd::{ServerPolicy, TrafficPolicy},
    hub::Hub,
    translate::Objects,
};
use inotify::{EventStream, Inotify, WatchMask, Watches};
use serde::de::DeserializeOwned;
use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};
use tokio_stream::StreamExt;

/// The errors of the last scan, by file, for the admin port.
#[derive(Clone, Default)]
pub struct FileErrors(pub Arc<Mutex<BTreeMap<String, String>>>);

impl FileErrors {
    pub fn list(&self) -> BTreeMap<String, String> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>, dirs: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    dirs.push(dir.to_path_buf());
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            yaml_files(&path, out, dirs);
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        ) {
            out.push(path);
        }
    }
}

/// What ends a write: a file closed after writing, moved in or out, deleted. Not
/// its creation or each write, which would read a file still half written.
const WRITTEN: WatchMask = WatchMask::CLOSE_WRITE
    .union(WatchMask::MOVED_TO)
    .union(WatchMask::MOVED_FROM)
    .union(WatchMask::DELETE);

/// The directories' change events, or None where inotify is not to be had (the
/// poll then notices every change).
struct DirectoryEvents {
    events: Option<(Watches, EventStream<[u8; 4096]>)>,
}

impl DirectoryEvents {
    fn new() -> DirectoryEvents {
        let events = Inotify::init().and_then(|inotify| {
            let watches = inotify.watches();
            Ok((watches, inotify.into_event_stream([0; 4096])?))
        });
        if let Err(error) = &events {
            tracing::warn!(%error, "no inotify: changes are noticed by polling only");
        }
        DirectoryEvents {
            events: events.ok(),
        }
    }

    /// Watches `dirs` too (a directory already watched keeps its watch).
    fn watch(&mut self, dirs: &[PathBuf]) {
        if let Some((watches, _)) = &mut self.events {
            for dir in dirs {
                if let Err(error) = watches.add(dir, WRITTEN) {
                    tracing::warn!(dir = %dir.display(), %error, "cannot watch; it is polled");
                }
            }
        }
    }

    /// Returns at the next event; never without inotify.
    async fn next(&mut self) {
        let Some((_, events)) = &mut self.events else {
            return std::future::pending().await;
        };
        if !matches!(events.next().await, Some(Ok(_))) {
            tracing::warn!("inotify stopped: changes are noticed by polling only");
            self.events = None;
        }
    }
}

/// A file's size and modification time, to notice changes cheaply.
type Stamp = (Option<SystemTime>, u64);

fn stamp(path: &Path) -> Stamp {
    let meta = std::fs::metadata(path).ok();
    (
        meta.as_ref().and_then(|m| m.modified().ok()),
        meta.map(|m| m.len()).unwrap_or(0),
    )
}

fn parse_as<T: DeserializeOwned>(doc: serde_yaml_ng::Value) -> Result<Arc<T>, String> {
    serde_path_to_error::deserialize(doc)
        .map(Arc::new)
        .map_err(|e| {
            let path = e.path().to_string();
            format!("{path}: {}", e.into_inner())
        })
}

/// One parsed object of a kind Trellis reads.
#[derive(Clone)]
enum Object {
    Service(Arc<k8s_openapi::api::core::v1::Service>),
    EndpointSlice(Arc<k8s_openapi::api::discovery::v1::EndpointSlice>),
    Pod(Arc<k8s_openapi::api::core::v1::Pod>),
    HttpRoute(Arc<gateway_api::apis::standard::httproutes::HttpRoute>),
    GrpcRoute(Arc<gateway_api::apis::standard::grpcroutes::GrpcRoute>),
    TrafficPolicy(Arc<TrafficPolicy>),
    ServerPolicy(Arc<ServerPolicy>),
}

/// What one piece of a file (the text from one `---` line to the next) parsed
/// to: how many YAML documents it holds and the objects among them, each with its
/// (kind, namespace, name).
#[derive(Clone, Default)]
struct Piece {
    documents: usize,
    objects: Vec<((String, String, String), Object)>,
}

/// A file's pieces as last parsed, by their text: an edit re-parses only the
/// pieces it touched, so one EndpointSlice changing in a file of thousands costs
/// one document's parse.
type ParsedPieces = HashMap<String, Piece>;

/// `text` cut at its document markers (`---` at the start of a line), each marker
/// line starting the piece it opens, so every piece parses on its own as the
/// documents it held in the whole text.
fn pieces(text: &str) -> Vec<&str> {
    let mut pieces = Vec::new();
    let mut start = 0;
    let mut at = 0;
    for line in text.split_inclusive('\n') {
        let marker = line
            .strip_prefix("---")
            .is_some_and(|rest| rest.is_empty() || rest.starts_with(char::is_whitespace));
        if marker && at > start {
            pieces.push(&text[start..at]);
            start = at;
        }
        at += line.len();
    }
    if at > start {
        pieces.push(&text[start..]);
    }
    pieces
}

/// Parses one piece whose first document is document number `first` (from 1) of
/// its file; the error names the document and field.
fn parse_piece(first: usize, text: &str) -> Result<Piece, String> {
    let mut piece = Piece::default();
    for (index, document) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let number = first + index;
        piece.documents += 1;
        let value = <serde_yaml_ng::Value as serde::Deserialize>::deserialize(document)
            .map_err(|e| format!("document {number}: {e}"))?;
        if value.is_null() {
            continue;
        }
        let kind = value
            .get("kind")
            .and_then(|k| k.as_str())
            .unwrap_or("")
            .to_owned();
        let at = |e: String| format!("document {number} ({kind}): {e}");
        let meta = |field: &str, default: &str| {
            value
                .get("metadata")
                .and_then(|m| m.get(field))
                .and_then(|v| v.as_str())
                .unwrap_or(default)
                .to_owned()
        };
        let id = (kind.clone(), meta("namespace", "default"), meta("name", ""));
        let object = match kind.as_str() {
            "Service" => Object::Service(parse_as(value).map_err(at)?),
            "EndpointSlice" => Object::EndpointSlice(parse_as(value).map_err(at)?),
            "Pod" => Object::Pod(parse_as(value).map_err(at)?),
            "HTTPRoute" => Object::HttpRoute(parse_as(value).map_err(at)?),
            "GRPCRoute" => Object::GrpcRoute(parse_as(value).map_err(at)?),
            "TrafficPolicy" => Object::TrafficPolicy(parse_as(value).map_err(at)?),
            "ServerPolicy" => Object::ServerPolicy(parse_as(value).map_err(at)?),
            other => return Err(at(format!("kind {other:?} is not one Trellis reads"))),
        };
        piece.objects.push((id, object));
    }
    Ok(piece)
}

/// Parses every document of `text`, which came from `origin`, reusing the pieces
/// of `before` whose text is unchanged; returns the objects and the pieces to
/// reuse next time. The error names the document and field.
fn parse_pieces(
    origin: &str,
    text: &str,
    before: &ParsedPieces,
) -> Result<(Objects, ParsedPieces), String> {
    let mut objects = Objects::default();
    let mut parsed = ParsedPieces::new();
    let mut documents = 0;
    for text in pieces(text) {
        let piece = match parsed.get(text).or_else(|| before.get(text)) {
            Some(piece) => piece.clone(),
            None => parse_piece(documents + 1, text)?,
        };
        documents += piece.documents;
        for (id, object) in &piece.objects {
            objects.origins.insert(id.clone(), origin.to_owned());
            match object.clone() {
                Object::Service(o) => objects.services.push(o),
                Object::EndpointSlice(o) => objects.endpoint_slices.push(o),
                Object::Pod(o) => objects.pods.push(o),
                Object::HttpRoute(o) => objects.http_routes.push(o),
                Object::GrpcRoute(o) => objects.grpc_routes.push(o),
                Object::TrafficPolicy(o) => objects.traffic_policies.push(o),
                Object::ServerPolicy(o) => objects.server_policies.push(o),
            }
        }
        parsed.insert(text.to_owned(), piece);
    }
    Ok((objects, parsed))
}

/// Parses every document of `text`, which came from `origin`; the error names
/// the document and field.
pub fn parse_text(origin: &str, text: &str) -> Result<Objects, String> {
    parse_pieces(origin, text, &ParsedPieces::new()).map(|(objects, _)| objects)
}

fn merge(into: &mut Objects, from: &Objects) {
    into.services.extend(from.services.iter().cloned());
    into.endpoint_slices
        .extend(from.endpoint_slices.iter().cloned());
    into.pods.extend(from.pods.iter().cloned());
    into.http_routes.extend(from.http_routes.iter().cloned());
    into.grpc_routes.extend(from.grpc_routes.iter().cloned());
    into.traffic_policies
        .extend(from.traffic_policies.iter().cloned());
    into.server_policies
        .extend(from.server_policies.iter().cloned());
    into.origins
        .extend(from.origins.iter().map(|(k, v)| (k.clone(), v.clone())));
}

/// One file as last read: its stamp, and the objects and pieces of its last
/// version that parsed.
struct File {
    stamp: Stamp,
    objects: Objects,
    pieces: ParsedPieces,
}

/// Watches `dir` (on its change events, and polling every `every`) and reports
/// each changed state to `hub`. Only files whose size or modification time
/// changed are read again.
pub async fn watch(dir: PathBuf, every: Duration, hub: Hub, errors: FileErrors) {
    let mut files: BTreeMap<PathBuf, File> = BTreeMap::new();
    let mut file_errors: BTreeMap<PathBuf, (Stamp, String)> = BTreeMap::new();
    let mut first = true;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut events = DirectoryEvents::new();
    loop {
        // The first tick is at once.
        tokio::select! {
            _ = tick.tick() => {}
            () = events.next() => {}
        }
        let mut paths = Vec::new();
        let mut dirs = Vec::new();
        yaml_files(&dir, &mut paths, &mut dirs);
        events.watch(&dirs);
        let mut changed = first;
        first = false;
        let before = files.len() + file_errors.len();
        files.retain(|path, _| paths.contains(path));
        file_errors.retain(|path, _| paths.contains(path));
        changed |= files.len() + file_errors.len() != before;
        for path in &paths {
            let now = stamp(path);
            let known = files.get(path).map(|f| f.stamp);
            let failed = file_errors.get(path).map(|e| e.0);
            if known == Some(now) || failed == Some(now) {
                continue;
            }
            changed = true;
            let origin = path.display().to_string();
            let none = ParsedPieces::new();
            let reuse = files.get(path).map_or(&none, |f| &f.pieces);
            let parsed = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read: {e}"))
                .and_then(|text| parse_pieces(&origin, &text, reuse));
            match parsed {
                Ok((objects, pieces)) => {
                    file_errors.remove(path);
                    files.insert(
                        path.clone(),
                        File {
                            stamp: now,
                            objects,
                            pieces,
                        },
                    );
                }
                Err(error) => {
                    tracing::error!(file = %origin, %error, "file not applied; its last good version stays");
                    file_errors.insert(path.clone(), (now, error));
                }
            }
        }
        if !changed {
            continue;
        }
        *errors.0.lock().unwrap_or_else(|p| p.into_inner()) = file_errors
            .iter()
            .map(|(path, (_, error))| (path.display().to_string(), error.clone()))
            .collect();
        let mut objects = Objects::default();
        for file in files.values() {
            merge(&mut objects, &file.objects);
        }
        hub.update(objects);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERVICE: &str = "apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: shop}
spec: {ports: [{port: 80}]}
";

    /// The names of the services in `hub`'s snapshot once it has `count`, or
    /// whatever it has after 20 s.
    async fn services(hub: &Hub, count: usize) -> Vec<String> {
        let mut snapshots = hub.snapshots();
        let names = |snapshots: &tokio::sync::watch::Receiver<_>| -> Vec<String> {
            let snapshot: &Option<Arc<crate::hub::Snapshot>> = &snapshots.borrow();
            snapshot
                .iter()
                .flat_map(|s| s.objects.services.iter())
                .filter_map(|s| s.metadata.name.clone())
                .collect()
        };
        let _ = tokio::time::timeout(Duration::from_secs(20), async {
            while names(&snapshots).len() < count {
                snapshots.changed().await.expect("the hub runs");
            }
        })
        .await;
        names(&snapshots)
    }

    #[tokio::test]
    async fn a_file_written_or_moved_in_applies_without_waiting_for_the_poll() {
        let dir = std::env::temp_dir().join(format!("trellis-inotify-{}", std::process::id()));
        let sub = dir.join("more");
        std::fs::create_dir_all(&sub).unwrap();
        std::fs::write(dir.join("a.yaml"), SERVICE).unwrap();
        let hub = Hub::start(Duration::ZERO, Duration::ZERO);
        let watcher = tokio::spawn(watch(
            dir.clone(),
            Duration::from_secs(3600),
            hub.clone(),
            FileErrors::default(),
        ));
        assert_eq!(services(&hub, 1).await, ["reviews"]);

        // Written in place, then moved in (as `kubectl`-style tools and editors
        // do), in a subdirectory: each is seen long before the hour's poll.
        std::fs::write(sub.join("b.yaml"), SERVICE.replace("reviews", "ratings")).unwrap();
        assert_eq!(services(&hub, 2).await.len(), 2);
        let staged = dir.join(".c.tmp");
        std::fs::write(&staged, SERVICE.replace("reviews", "details")).unwrap();
        std::fs::rename(&staged, dir.join("c.yaml")).unwrap();
        let mut names = services(&hub, 3).await;
        names.sort();
        assert_eq!(names, ["details", "ratings", "reviews"]);
        watcher.abort();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_grpc_route_document_is_read() {
        let path = std::env::temp_dir().join(format!("trellis-grpc-{}.yaml", std::process::id()));
        std::fs::write(
            &path,
            "apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: reviews, namespace: shop}
spec:
  parentRefs: [{kind: Service, name: reviews}]
  rules:
    - matches: [{method: {service: shop.v1.Reviews, method: Get}}]
      backendRefs: [{name: reviews-v1, port: 8080}]
",
        )
        .unwrap();
        let objects = parse_text("grpc.yaml", &std::fs::read_to_string(&path).unwrap());
        std::fs::remove_file(&path).unwrap();
        let objects = objects.unwrap();
        assert_eq!(objects.grpc_routes.len(), 1);
        let rules = objects.grpc_routes[0].spec.rules.as_ref().unwrap();
        let method = rules[0].matches.as_ref().unwrap()[0]
            .method
            .as_ref()
            .unwrap();
        assert_eq!(method.service.as_deref(), Some("shop.v1.Reviews"));
    }

    const TWO_SERVICES: &str = "# the shop
apiVersion: v1
kind: Service
metadata: {name: a, namespace: shop}
spec: {ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: b, namespace: shop}
spec: {ports: [{port: 80}]}
--- {apiVersion: v1, kind: Service, metadata: {name: c, namespace: shop}, spec: {ports: [{port: 80}]}}
";

    #[test]
    fn documents_are_cut_at_markers_and_numbered_as_in_the_whole_file() {
        let cut = pieces(TWO_SERVICES);
        assert_eq!(cut.len(), 3);
        assert!(cut[1].starts_with("---\n") && cut[2].starts_with("--- {"));
        assert_eq!(cut.concat(), TWO_SERVICES);
        let objects = parse_text("shop.yaml", TWO_SERVICES).unwrap();
        let names: Vec<_> = objects
            .services
            .iter()
            .map(|s| s.metadata.name.clone().unwrap())
            .collect();
        assert_eq!(names, ["a", "b", "c"]);
        assert_eq!(
            objects.origins[&("Service".into(), "shop".into(), "c".into())],
            "shop.yaml"
        );

        // A bad third document is named as the third, as a whole-file parse would.
        let bad = TWO_SERVICES.replace("ports: [{port: 80}]}}", "ports: [{port: eighty}]}}");
        let error = parse_text("shop.yaml", &format!("---\n{bad}"))
            .err()
            .unwrap();
        assert!(
            error.starts_with("document 3 (Service): spec.ports[0].port"),
            "{error}"
        );
    }

    #[test]
    fn an_edit_parses_again_only_the_documents_it_touched() {
        let (first, pieces) =
            parse_pieces("shop.yaml", TWO_SERVICES, &ParsedPieces::new()).unwrap();
        let edited = TWO_SERVICES.replace("name: b,", "name: b, labels: {x: y},");
        let (second, _) = parse_pieces("shop.yaml", &edited, &pieces).unwrap();
        let same = |i: usize| Arc::ptr_eq(&first.services[i], &second.services[i]);
        assert!(
            same(0) && same(2),
            "unchanged documents are the same objects"
        );
        assert!(!same(1));
        assert_eq!(
            second.services[1].metadata.labels.as_ref().unwrap()["x"],
            "y"
        );
    }
}
