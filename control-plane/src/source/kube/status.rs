//! Status writing: after each snapshot, every TrafficPolicy and ServerPolicy gets
//! `status.conditions` and every HTTPRoute or GRPCRoute with a Service parent gets
//! one entry per Service parentRef in `status.parents` (with `controllerName:
//! trellis.dev/control-plane`; other controllers' entries are kept), each by a JSON
//! merge patch on the `/status` subresource, and only when the conditions changed.
//! A condition keeps its `lastTransitionTime` while its status stays the same.

use super::watch::Sources;
use crate::{
    crd::{ServerPolicy, TrafficPolicy},
    hub::{Hub, Snapshot},
    translate::{self, ObjectStatus},
};
use gateway_api::apis::standard::grpcroutes::GrpcRoute;
use gateway_api::apis::standard::httproutes::HttpRoute;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta, Time};
use kube::{
    api::{Patch, PatchParams},
    Api, Client, Resource, ResourceExt,
};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use std::{collections::HashMap, fmt::Debug, sync::Arc};
use tokio::sync::watch;

/// The `controllerName` Trellis writes in an HTTPRoute's `status.parents`.
pub const CONTROLLER_NAME: &str = "trellis.dev/control-plane";

/// What makes two conditions the same for writing: everything but the time.
fn essence(c: &Condition) -> (&str, &str, &str, &str, Option<i64>) {
    (
        &c.type_,
        &c.status,
        &c.reason,
        &c.message,
        c.observed_generation,
    )
}

fn same_conditions(a: &[Condition], b: &[Condition]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| essence(x) == essence(y))
}

/// The conditions for `status`, keeping the `lastTransitionTime` of each old
/// condition whose status is unchanged.
fn conditions(
    status: &ObjectStatus,
    generation: Option<i64>,
    old: &[Condition],
    now: &Time,
) -> Vec<Condition> {
    let mut new = status.conditions(generation, now);
    for condition in &mut new {
        // Say something rather than nothing: some API servers (the 1.20 test
        // server among them) turn an empty string in a custom resource into null
        // and refuse it, as `message` is a required string.
        if condition.message.is_empty() {
            condition.message = match condition.type_.as_str() {
                "Accepted" => "accepted by the Trellis control plane",
                "ResolvedRefs" => "every reference resolved",
                _ => "ok",
            }
            .to_owned();
        }
        if let Some(before) = old
            .iter()
            .find(|o| o.type_ == condition.type_ && o.status == condition.status)
        {
            condition.last_transition_time = before.last_transition_time.clone();
        }
    }
    new
}

type StatusKey = (&'static str, String, String);

/// Writes the statuses of each new snapshot, while `leader` says this replica
/// writes status (always, without a Lease).
pub(super) async fn write_statuses(
    client: Client,
    hub: Hub,
    sources: Arc<Sources>,
    mut leader: Option<watch::Receiver<bool>>,
) {
    let mut snapshots = hub.snapshots();
    // What was last written to each object, and the resourceVersion it had before
    // the write: while the store still shows that version, it has not seen the
    // write yet, and the write is not repeated.
    let mut written: HashMap<StatusKey, (Value, String)> = HashMap::new();
    loop {
        let leading = leader.as_mut().is_none_or(|l| *l.borrow_and_update());
        let snapshot = snapshots.borrow_and_update().clone();
        match snapshot {
            Some(snapshot) if leading => {
                write_snapshot(&client, &sources, &snapshot, &mut written).await
            }
            // Another replica writes; whoever leads next writes everything again.
            _ => written.clear(),
        }
        let changed = async {
            match &mut leader {
                Some(leader) => tokio::select! {
                    changed = snapshots.changed() => changed.is_ok(),
                    changed = leader.changed() => changed.is_ok(),
                },
                None => snapshots.changed().await.is_ok(),
            }
        };
        if !changed.await {
            return;
        }
    }
}

async fn write_snapshot(
    client: &Client,
    sources: &Sources,
    snapshot: &Snapshot,
    written: &mut HashMap<StatusKey, (Value, String)>,
) {
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    for status in snapshot.statuses() {
        let (namespace, name) = (status.namespace.as_str(), status.name.as_str());
        let key: StatusKey = (status.kind, namespace.to_owned(), name.to_owned());
        let planned = match status.kind {
            translate::TRAFFIC_POLICY => {
                let Some(object) = sources.traffic_policies.get(namespace, name) else {
                    continue;
                };
                let old = object.status.as_ref().map(|s| &s.conditions[..]);
                policy_patch(status, object.meta(), old.unwrap_or_default(), &now)
            }
            translate::SERVER_POLICY => {
                let Some(object) = sources.server_policies.get(namespace, name) else {
                    continue;
                };
                let old = object.status.as_ref().map(|s| &s.conditions[..]);
                policy_patch(status, object.meta(), old.unwrap_or_default(), &now)
            }
            translate::HTTP_ROUTE => {
                let Some(route) = sources.http_routes.get(namespace, name) else {
                    continue;
                };
                route_patch(status, &*route, &now)
                    .map(|patch| (patch, route.resource_version().unwrap_or_default()))
            }
            translate::GRPC_ROUTE => {
                let Some(route) = sources.grpc_routes.get(namespace, name) else {
                    continue;
                };
                route_patch(status, &*route, &now)
                    .map(|patch| (patch, route.resource_version().unwrap_or_default()))
            }
            _ => continue,
        };
        let Some((patch, version)) = planned else {
            written.remove(&key);
            continue;
        };
        if written
            .get(&key)
            .is_some_and(|(sent, before)| *before == version && *sent == patch)
        {
            continue;
        }
        let result = match status.kind {
            translate::TRAFFIC_POLICY => {
                patch_status::<TrafficPolicy>(client, namespace, name, &patch).await
            }
            translate::SERVER_POLICY => {
                patch_status::<ServerPolicy>(client, namespace, name, &patch).await
            }
            translate::GRPC_ROUTE => {
                patch_status::<GrpcRoute>(client, namespace, name, &patch).await
            }
            _ => patch_status::<HttpRoute>(client, namespace, name, &patch).await,
        };
        match result {
            Ok(()) => {
                tracing::debug!(
                    kind = status.kind,
                    namespace,
                    name,
                    accepted = status.accepted,
                    "status written"
                );
                written.insert(key, (patch, version));
            }
            Err(kube::Error::Api(e)) if matches!(e.code, 404 | 409) => {
                // Deleted, or changed since the store saw it: the watch brings the
                // new state and the next snapshot writes again.
                tracing::debug!(
                    kind = status.kind,
                    namespace,
                    name,
                    code = e.code,
                    "status not written; will retry"
                );
                written.remove(&key);
            }
            Err(error) => {
                tracing::warn!(kind = status.kind, namespace, name, %error, "cannot write status");
                written.remove(&key);
            }
        }
    }
    // Forget objects that no longer have a status.
    written.retain(|(kind, namespace, name), _| {
        snapshot.translation.status(kind, namespace, name).is_some()
    });
}

/// The merge patch for a policy's status and the resource version it was planned
/// against, or None when the status is already so.
fn policy_patch(
    status: &ObjectStatus,
    meta: &ObjectMeta,
    old: &[Condition],
    now: &Time,
) -> Option<(Value, String)> {
    let new = conditions(status, meta.generation, old, now);
    if same_conditions(&new, old) {
        return None;
    }
    let version = meta.resource_version.clone().unwrap_or_default();
    Some((json!({ "status": { "conditions": new } }), version))
}

/// A route kind whose status is `status.parents`, as HTTPRoute's and GRPCRoute's.
trait RouteStatus: Resource {
    /// `spec.parentRefs` and `status.parents`, as JSON.
    fn parent_refs(&self) -> Vec<Value>;
    fn status_parents(&self) -> Vec<Value>;
}

fn to_values<T: serde::Serialize>(items: Option<&Vec<T>>) -> Vec<Value> {
    items
        .into_iter()
        .flatten()
        .filter_map(|p| serde_json::to_value(p).ok())
        .collect()
}

impl RouteStatus for HttpRoute {
    fn parent_refs(&self) -> Vec<Value> {
        to_values(self.spec.parent_refs.as_ref())
    }
    fn status_parents(&self) -> Vec<Value> {
        to_values(self.status.as_ref().map(|s| &s.parents))
    }
}

impl RouteStatus for GrpcRoute {
    fn parent_refs(&self) -> Vec<Value> {
        to_values(self.spec.parent_refs.as_ref())
    }
    fn status_parents(&self) -> Vec<Value> {
        to_values(self.status.as_ref().map(|s| &s.parents))
    }
}

/// The merge patch for a route's `status.parents` (ours replaced, other
/// controllers' kept), or None when ours are already so. Guarded by the
/// resourceVersion, as the list is shared with other controllers.
fn route_patch(status: &ObjectStatus, route: &impl RouteStatus, now: &Time) -> Option<Value> {
    let old_parents = route.status_parents();
    let ours = |p: &Value| p["controllerName"] == CONTROLLER_NAME;
    let generation = route.meta().generation;
    let mut new_ours = Vec::new();
    for parent_ref in route.parent_refs() {
        let group = parent_ref["group"].as_str().unwrap_or("");
        let kind = parent_ref["kind"].as_str().unwrap_or("Gateway");
        if !(matches!(group, "" | "core") && kind == "Service") {
            continue;
        }
        let old: Vec<Condition> = old_parents
            .iter()
            .find(|p| ours(p) && p["parentRef"] == parent_ref)
            .and_then(|p| serde_json::from_value(p["conditions"].clone()).ok())
            .unwrap_or_default();
        let new = conditions(status, generation, &old, now);
        let unchanged = same_conditions(&new, &old);
        new_ours.push((
            json!({
                "parentRef": parent_ref,
                "controllerName": CONTROLLER_NAME,
                "conditions": new,
            }),
            unchanged && !old.is_empty(),
        ));
    }
    let old_ours = old_parents.iter().filter(|p| ours(p)).count();
    if old_ours == new_ours.len() && new_ours.iter().all(|(_, unchanged)| *unchanged) {
        return None;
    }
    let parents: Vec<Value> = old_parents
        .iter()
        .filter(|p| !ours(p))
        .cloned()
        .chain(new_ours.into_iter().map(|(p, _)| p))
        .collect();
    Some(json!({
        "metadata": { "resourceVersion": route.meta().resource_version },
        "status": { "parents": parents },
    }))
}

async fn patch_status<K>(
    client: &Client,
    namespace: &str,
    name: &str,
    patch: &Value,
) -> Result<(), kube::Error>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(accepted: bool) -> ObjectStatus {
        ObjectStatus {
            kind: translate::HTTP_ROUTE,
            namespace: "shop".into(),
            name: "reviews".into(),
            accepted,
            reason: if accepted {
                "Accepted"
            } else {
                "UnsupportedValue"
            }
            .into(),
            message: if accepted {
                ""
            } else {
                "spec.rules[0].filters: not supported"
            }
            .into(),
            resolved_refs: true,
        }
    }

    fn route(status: Option<Value>) -> HttpRoute {
        let mut value = json!({
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "HTTPRoute",
            "metadata": {"name": "reviews", "namespace": "shop", "generation": 2, "resourceVersion": "7"},
            "spec": {"parentRefs": [
                {"group": "", "kind": "Service", "name": "reviews", "port": 80},
                {"name": "gw"},
            ]},
        });
        if let Some(status) = status {
            value["status"] = status;
        }
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn grpc_route_status_is_written_like_an_http_route_status() {
        let now = Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
        let mut value = serde_json::to_value(route(None)).unwrap();
        value["kind"] = json!("GRPCRoute");
        let grpc: GrpcRoute = serde_json::from_value(value).unwrap();
        let status = ObjectStatus {
            kind: translate::GRPC_ROUTE,
            ..status(true)
        };
        let patch = route_patch(&status, &grpc, &now).expect("a patch");
        assert_eq!(patch, route_patch(&status, &route(None), &now).unwrap());
        let parents = patch["status"]["parents"].as_array().unwrap();
        assert_eq!(parents.len(), 1, "{patch}");
        assert_eq!(parents[0]["controllerName"], CONTROLLER_NAME);
        assert_eq!(parents[0]["parentRef"]["name"], "reviews");
    }

    #[test]
    fn route_status_names_each_service_parent_and_keeps_other_controllers() {
        let now = Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
        let other = json!({
            "parentRef": {"name": "gw"},
            "controllerName": "example.com/gateway",
            "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted",
                            "message": "", "lastTransitionTime": "2020-01-01T00:00:00Z"}],
        });
        let route = route(Some(json!({"parents": [other.clone()]})));
        let patch = route_patch(&status(false), &route, &now).expect("a patch");
        assert_eq!(patch["metadata"]["resourceVersion"], "7");
        let parents = patch["status"]["parents"].as_array().unwrap();
        assert_eq!(parents.len(), 2, "{patch}");
        assert_eq!(parents[0], other);
        assert_eq!(parents[1]["controllerName"], CONTROLLER_NAME);
        assert_eq!(parents[1]["parentRef"]["kind"], "Service");
        assert_eq!(parents[1]["parentRef"]["port"], 80);
        let accepted = &parents[1]["conditions"][0];
        assert_eq!(accepted["type"], "Accepted");
        assert_eq!(accepted["status"], "False");
        assert_eq!(accepted["reason"], "UnsupportedValue");
        assert_eq!(accepted["observedGeneration"], 2);

        // Written once, the same status needs no second write.
        let route = super::tests::route(Some(patch["status"].clone()));
        assert_eq!(route_patch(&status(false), &route, &now), None);
        // A change of status is written, with a new transition time.
        let later = Time(k8s_openapi::jiff::Timestamp::from_second(60).unwrap());
        let patch = route_patch(&status(true), &route, &later).expect("a patch");
        let accepted = &patch["status"]["parents"][1]["conditions"][0];
        assert_eq!(accepted["status"], "True");
        assert_eq!(accepted["lastTransitionTime"], "1970-01-01T00:01:00Z");
        // ResolvedRefs did not change: its time stays.
        let resolved = &patch["status"]["parents"][1]["conditions"][1];
        assert_eq!(resolved["lastTransitionTime"], "1970-01-01T00:00:00Z");
    }

    #[test]
    fn policy_status_is_written_only_when_it_changes() {
        let now = Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
        let mut s = status(true);
        s.kind = translate::TRAFFIC_POLICY;
        let generation = |g| ObjectMeta {
            generation: Some(g),
            resource_version: Some("7".into()),
            ..ObjectMeta::default()
        };
        let (patch, version) = policy_patch(&s, &generation(1), &[], &now).expect("a patch");
        assert_eq!(version, "7");
        let written: Vec<Condition> =
            serde_json::from_value(patch["status"]["conditions"].clone()).unwrap();
        assert_eq!(written[0].type_, "Accepted");
        assert_eq!(written[0].status, "True");
        assert_eq!(policy_patch(&s, &generation(1), &written, &now), None);
        assert!(
            policy_patch(&s, &generation(2), &written, &now).is_some(),
            "new generation"
        );
    }
}
