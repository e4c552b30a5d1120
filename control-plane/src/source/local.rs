//! Local mode: a directory of the same YAML an operator would `kubectl apply`
//! (Services, EndpointSlices, Pods, HTTPRoutes, GRPCRoutes, TrafficPolicies,
//! ServerPolicies), read again whenever a file in it changes, and reported whole
//! to the [`Hub`].
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
use serde::de::DeserializeOwned;
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

/// The errors of the last scan, by file, for the admin port.
#[derive(Clone, Default)]
pub struct FileErrors(pub Arc<Mutex<BTreeMap<String, String>>>);

impl FileErrors {
    pub fn list(&self) -> BTreeMap<String, String> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            yaml_files(&path, out);
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        ) {
            out.push(path);
        }
    }
}

/// What the directory looks like, to notice changes cheaply.
fn fingerprint(files: &[PathBuf]) -> Vec<(PathBuf, Option<SystemTime>, u64)> {
    files
        .iter()
        .map(|p| {
            let meta = std::fs::metadata(p).ok();
            (
                p.clone(),
                meta.as_ref().and_then(|m| m.modified().ok()),
                meta.map(|m| m.len()).unwrap_or(0),
            )
        })
        .collect()
}

fn parse_as<T: DeserializeOwned>(doc: serde_yaml_ng::Value) -> Result<T, String> {
    serde_path_to_error::deserialize(doc).map_err(|e| {
        let path = e.path().to_string();
        format!("{path}: {}", e.into_inner())
    })
}

/// Parses every document of one file; the error names the document and field.
fn parse_file(path: &Path) -> Result<Objects, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read: {e}"))?;
    parse_text(&path.display().to_string(), &text)
}

/// Parses every document of `text`, which came from `origin`; the error names
/// the document and field.
pub fn parse_text(origin: &str, text: &str) -> Result<Objects, String> {
    let mut objects = Objects::default();
    for (index, document) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let value = <serde_yaml_ng::Value as serde::Deserialize>::deserialize(document)
            .map_err(|e| format!("document {}: {e}", index + 1))?;
        if value.is_null() {
            continue;
        }
        let kind = value
            .get("kind")
            .and_then(|k| k.as_str())
            .unwrap_or("")
            .to_owned();
        let at = |e: String| format!("document {} ({kind}): {e}", index + 1);
        let meta = |field: &str, default: &str| {
            value
                .get("metadata")
                .and_then(|m| m.get(field))
                .and_then(|v| v.as_str())
                .unwrap_or(default)
                .to_owned()
        };
        objects.origins.insert(
            (kind.clone(), meta("namespace", "default"), meta("name", "")),
            origin.to_owned(),
        );
        match kind.as_str() {
            "Service" => objects.services.push(parse_as(value).map_err(at)?),
            "EndpointSlice" => objects.endpoint_slices.push(parse_as(value).map_err(at)?),
            "Pod" => objects.pods.push(parse_as(value).map_err(at)?),
            "HTTPRoute" => objects.http_routes.push(parse_as(value).map_err(at)?),
            "GRPCRoute" => objects.grpc_routes.push(parse_as(value).map_err(at)?),
            "TrafficPolicy" => objects
                .traffic_policies
                .push(parse_as::<TrafficPolicy>(value).map_err(at)?),
            "ServerPolicy" => objects
                .server_policies
                .push(parse_as::<ServerPolicy>(value).map_err(at)?),
            other => return Err(at(format!("kind {other:?} is not one Trellis reads"))),
        }
    }
    Ok(objects)
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

/// Watches `dir` (polling every `every`) and reports each changed state to `hub`.
pub async fn watch(dir: PathBuf, every: Duration, hub: Hub, errors: FileErrors) {
    // Each file's objects, as last parsed without error.
    let mut last_good: BTreeMap<PathBuf, Objects> = BTreeMap::new();
    let mut seen = None;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let mut files = Vec::new();
        yaml_files(&dir, &mut files);
        files.sort();
        let now = fingerprint(&files);
        if seen.as_ref() == Some(&now) {
            continue;
        }
        seen = Some(now);
        let mut file_errors = BTreeMap::new();
        last_good.retain(|path, _| files.contains(path));
        for path in &files {
            match parse_file(path) {
                Ok(objects) => {
                    last_good.insert(path.clone(), objects);
                }
                Err(error) => {
                    tracing::error!(file = %path.display(), %error, "file not applied; its last good version stays");
                    file_errors.insert(path.display().to_string(), error);
                }
            }
        }
        *errors.0.lock().unwrap_or_else(|p| p.into_inner()) = file_errors;
        let mut objects = Objects::default();
        for file in last_good.values() {
            merge(&mut objects, file);
        }
        hub.update(objects);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let objects = parse_file(&path);
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
}
