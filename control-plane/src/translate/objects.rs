//! What translation reads: the [`Objects`] as a source hands them over, and how
//! an object is named. A leaf: it knows nothing of translating any kind.
//!
//! An object is known by its [`Key`] (namespace, name; an absent or empty
//! namespace is `default`), a route by its kind as well ([`RouteKey`]: an
//! HTTPRoute and a GRPCRoute may share a name). The kind names are the ones an
//! [`ObjectStatus`](super::ObjectStatus) carries.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use std::collections::HashMap;
use std::sync::Arc;

/// Everything the control plane knows, from Kubernetes or from local YAML files.
/// Each object is shared: a source hands over its whole current set on every
/// change, and an object that did not change is the same allocation as before
/// (from the watch's store, or from the local file's unchanged document).
#[derive(Debug, Default, Clone)]
pub struct Objects {
    pub services: Vec<Arc<k8s_openapi::api::core::v1::Service>>,
    pub endpoint_slices: Vec<Arc<k8s_openapi::api::discovery::v1::EndpointSlice>>,
    pub pods: Vec<Arc<k8s_openapi::api::core::v1::Pod>>,
    pub http_routes: Vec<Arc<gateway_api::apis::standard::httproutes::HttpRoute>>,
    pub grpc_routes: Vec<Arc<gateway_api::apis::standard::grpcroutes::GrpcRoute>>,
    pub traffic_policies: Vec<Arc<crate::crd::TrafficPolicy>>,
    pub server_policies: Vec<Arc<crate::crd::ServerPolicy>>,
    /// Where each object came from, by (kind, namespace, name): in local mode its
    /// file, so a rejection can name the file as well as the field.
    pub origins: HashMap<(String, String, String), String>,
}

/// The kinds an [`ObjectStatus`](super::ObjectStatus) names.
pub const SERVICE: &str = "Service";
pub const HTTP_ROUTE: &str = "HTTPRoute";
pub const GRPC_ROUTE: &str = "GRPCRoute";
pub const TRAFFIC_POLICY: &str = "TrafficPolicy";
pub const SERVER_POLICY: &str = "ServerPolicy";

/// (namespace, name)
pub(super) type Key = (String, String);

/// A route's kind ([`HTTP_ROUTE`] or [`GRPC_ROUTE`]) and namespace/name.
pub(super) type RouteKey = (&'static str, Key);

pub(super) fn namespace_of(meta: &ObjectMeta) -> String {
    meta.namespace
        .clone()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "default".to_owned())
}

pub(super) fn key_of(meta: &ObjectMeta) -> Key {
    (namespace_of(meta), meta.name.clone().unwrap_or_default())
}

/// A Service reference's group: `""`, `core` or absent.
pub(super) fn is_core_group(group: Option<&str>) -> bool {
    matches!(group, None | Some("") | Some("core"))
}
