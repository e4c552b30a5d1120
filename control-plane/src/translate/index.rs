//! The order objects are read in, and the index every kind reads.
//!
//! Objects of one kind are read oldest first, each once ([`oldest_first`]): a
//! second object with the same namespace/name is refused, naming `metadata.name`,
//! and the oldest is used.
//!
//! The [`Index`] holds what the kinds refer to: the usable Services with their
//! EndpointSlices (`service.rs`), and every HTTPRoute and GRPCRoute (the latter in
//! HTTPRoute form, `grpc_route.rs`) in that one order, so a targetRef can find a
//! route and its rules whether or not the route itself is accepted.

use super::grpc_route::grpc_as_http;
use super::objects::{key_of, Key, Objects, RouteKey, GRPC_ROUTE, HTTP_ROUTE, SERVICE};
use super::problem::{invalid, status, ObjectStatus, Problem};
use super::service::{self, Services};
use gateway_api::apis::standard::httproutes::HttpRoute;
use k8s_openapi::api::core::v1::Service as KubeService;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use std::any::Any;
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// `items` oldest first (creationTimestamp, then namespace/name, then the order
/// given; objects without a creationTimestamp, as in local files, come first); a
/// second object with the same namespace/name is reported and skipped.
pub(super) fn oldest_first<'a, T>(
    items: &'a [Arc<T>],
    meta: impl Fn(&T) -> &ObjectMeta,
    kind: &'static str,
    statuses: &mut Vec<ObjectStatus>,
) -> Vec<(Key, &'a Arc<T>)> {
    let mut sorted: Vec<(Option<&Time>, Key, &'a Arc<T>)> = items
        .iter()
        .map(|item| {
            let meta = meta(item);
            (meta.creation_timestamp.as_ref(), key_of(meta), item)
        })
        .collect();
    sorted.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for (_, key, item) in sorted {
        if seen.insert(key.clone()) {
            out.push((key, item));
        } else {
            statuses.push(status(
                kind,
                &key,
                vec![invalid(
                    "Invalid",
                    "metadata.name",
                    format!(
                        "{kind} {}/{} is defined more than once; the oldest is used",
                        key.0, key.1
                    ),
                )],
            ));
        }
    }
    out
}

/// An HTTPRoute, or a GRPCRoute in HTTPRoute form (`grpc_route.rs`).
pub(super) struct MeshRoute<'a> {
    pub(super) kind: &'static str,
    pub(super) key: Key,
    pub(super) route: Cow<'a, HttpRoute>,
    /// What the conversion from a GRPCRoute found wrong.
    pub(super) problems: Vec<Problem>,
    /// The object it was read from, by which a [`Translator`](super::Translator)
    /// knows it again.
    pub(super) object: Arc<dyn Any + Send + Sync>,
}

/// The usable Services and every HTTPRoute and GRPCRoute, oldest first.
pub(super) struct Index<'a> {
    /// Every Service object, usable or not, oldest first.
    pub(super) service_objects: Vec<&'a Arc<KubeService>>,
    pub(super) services: Services<'a>,
    pub(super) routes: Vec<MeshRoute<'a>>,
    /// Positions in `routes`.
    pub(super) route_keys: BTreeMap<RouteKey, usize>,
    /// Services that cannot be used, and objects defined twice.
    pub(super) statuses: Vec<ObjectStatus>,
}

impl<'a> Index<'a> {
    pub(super) fn new(objects: &'a Objects) -> Index<'a> {
        let mut statuses = Vec::new();
        let service_list = oldest_first(&objects.services, |s| &s.metadata, SERVICE, &mut statuses);
        let service_objects = service_list.iter().map(|(_, s)| *s).collect();
        let services = service::services(service_list, &objects.endpoint_slices, &mut statuses);
        let mut routes: Vec<MeshRoute> = oldest_first(
            &objects.http_routes,
            |r| &r.metadata,
            HTTP_ROUTE,
            &mut statuses,
        )
        .into_iter()
        .map(|(key, route)| MeshRoute {
            kind: HTTP_ROUTE,
            key,
            route: Cow::Borrowed(&**route),
            problems: Vec::new(),
            object: route.clone(),
        })
        .collect();
        for (key, grpc) in oldest_first(
            &objects.grpc_routes,
            |r| &r.metadata,
            GRPC_ROUTE,
            &mut statuses,
        ) {
            let (route, problems) = grpc_as_http(grpc);
            routes.push(MeshRoute {
                kind: GRPC_ROUTE,
                key,
                route: Cow::Owned(route),
                problems,
                object: grpc.clone(),
            });
        }
        // Both kinds in one order, as for one kind (stable: HTTPRoutes first on a tie).
        routes.sort_by(|a, b| {
            (a.route.metadata.creation_timestamp.as_ref(), &a.key)
                .cmp(&(b.route.metadata.creation_timestamp.as_ref(), &b.key))
        });
        let route_keys = routes
            .iter()
            .enumerate()
            .map(|(i, r)| ((r.kind, r.key.clone()), i))
            .collect();
        Index {
            service_objects,
            services,
            routes,
            route_keys,
            statuses,
        }
    }
}
