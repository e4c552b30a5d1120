//! What one proxy sees: the mesh's resources (every proxy's, or narrowed to the
//! namespaces its pod names) plus its own pod's inbound limits, and what changed
//! since it was last sent ([`View::diff`]).
//!
//! Everything a view needs is computed once per snapshot, in [`Views`]: the mesh
//! cut into the discovery API's resources (a resource that did not change keeps
//! the previous snapshot's allocation, so comparing it is a pointer check), an
//! index from pod to inbound limits, and each pod's narrowing. One proxy's view
//! then costs a few lookups, not a pass over every object.
//!
//! # Narrowing
//!
//! A Pod annotated [`REACH_ANNOTATION`] (`trellis.dev/reach: "shop,web"`) has its
//! proxy receive only the services of those namespaces and, transitively, every
//! service their routes' backends name, so the view is a valid config on its own.
//! A narrowed mesh is computed on first use and shared by every pod with the same
//! narrowing, with the whole mesh's allocations. Without the annotation a proxy
//! receives the whole mesh.
//!
//! # Inbound limits
//!
//! A pod's `inbound` entries are the translation's [`InboundLimit`]s that name it,
//! by an endpoint's `targetRef` (its namespace and name) or by its IP. When several
//! cover one pod port, the one with the lowest precedence wins.

use crate::translate::{InboundIndex, PodKey, Translation};
use k8s_openapi::api::core::v1::Pod;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use trellis_proto::model::config as model;
use trellis_proto::model::resources;

/// One resource's JSON, encoded once and shared by every stream that sends it
/// (unchanged resources keep the same allocation from snapshot to snapshot, so
/// comparing them is a pointer check).
pub type Json = bytes::Bytes;

/// Resources by name.
pub type Resources = BTreeMap<String, Json>;

/// The Pod annotation by which an operator narrows what a pod's proxy receives: a
/// comma list of namespaces (the services there, and those their routes send to).
/// Without it a proxy receives the whole mesh.
pub const REACH_ANNOTATION: &str = "trellis.dev/reach";

/// What one proxy should have: the mesh (shared by every proxy) and its pod's
/// inbound limits.
#[derive(Clone)]
pub struct View {
    pub mesh: Arc<Resources>,
    pub inbound: Resources,
    /// How `mesh` differs from the previous snapshot's, worked out once for every
    /// stream that was sent that one (not for a narrowed mesh).
    pub mesh_change: Option<Arc<MeshChange>>,
}

/// What changed from one snapshot's whole mesh (`from`) to the next's.
pub struct MeshChange {
    from: Arc<Resources>,
    changed: Vec<String>,
    removed: Vec<String>,
}

impl View {
    pub fn len(&self) -> usize {
        self.mesh.len() + self.inbound.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &Json)> {
        self.mesh.iter().chain(self.inbound.iter())
    }

    /// What changed from `before` to `self`: resources added or changed, and the
    /// names of those removed.
    pub fn diff<'a>(&'a self, before: &View) -> (Vec<(&'a String, &'a Json)>, Vec<String>) {
        let mut changed = Vec::new();
        let mut removed = Vec::new();
        let known = self
            .mesh_change
            .as_deref()
            .filter(|c| Arc::ptr_eq(&c.from, &before.mesh));
        match known {
            _ if Arc::ptr_eq(&self.mesh, &before.mesh) => {}
            Some(change) => {
                changed.extend(
                    change
                        .changed
                        .iter()
                        .filter_map(|n| self.mesh.get_key_value(n)),
                );
                removed.extend(change.removed.iter().cloned());
            }
            None => compare(&self.mesh, &before.mesh, &mut changed, &mut removed),
        }
        compare(&self.inbound, &before.inbound, &mut changed, &mut removed);
        (changed, removed)
    }
}

/// Adds to `changed` what `now` has that `then` has not (or not the same), and to
/// `removed` the names only `then` has.
fn compare<'a>(
    now: &'a Resources,
    then: &Resources,
    changed: &mut Vec<(&'a String, &'a Json)>,
    removed: &mut Vec<String>,
) {
    for (name, json) in now {
        if !then.get(name).is_some_and(|old| same(old, json)) {
            changed.push((name, json));
        }
    }
    removed.extend(then.keys().filter(|n| !now.contains_key(*n)).cloned());
}

fn same(a: &Json, b: &Json) -> bool {
    (a.as_ptr() == b.as_ptr() && a.len() == b.len()) || a[..] == b[..]
}

/// What every view of one snapshot is made from, computed once.
pub struct Views {
    translation: Arc<Translation>,
    /// The mesh's resources, shared by every proxy that is not narrowed.
    mesh: Arc<Resources>,
    inbound: InboundIndex,
    /// Each pod's narrowing by (namespace, name); None: the whole mesh.
    reach: HashMap<(String, String), Option<Vec<String>>>,
    /// Narrowed meshes, computed once per distinct set of namespaces.
    narrowed: Mutex<HashMap<Vec<String>, Arc<Resources>>>,
    /// How `mesh` differs from the previous snapshot's.
    change: Option<Arc<MeshChange>>,
}

impl Views {
    /// The views of `translation`, whose objects had these `pods`; a resource
    /// that is the same as in `previous` keeps its allocation.
    pub fn new(
        translation: Arc<Translation>,
        pods: &[Arc<Pod>],
        previous: Option<&Views>,
    ) -> Views {
        // A service the same as in the previous snapshot keeps its JSON, which is
        // then neither written again nor compared.
        let before: HashMap<(&str, &str, u16), &model::Service> = previous
            .map(|p| {
                p.translation
                    .mesh
                    .services
                    .iter()
                    .map(|s| ((s.namespace.as_str(), s.name.as_str(), s.port.get()), &**s))
                    .collect()
            })
            .unwrap_or_default();
        let mut mesh = Resources::new();
        for service in &translation.mesh.services {
            let name = resources::service_name(service);
            let kept = previous
                .filter(|_| {
                    before
                        .get(&(
                            service.namespace.as_str(),
                            service.name.as_str(),
                            service.port.get(),
                        ))
                        .is_some_and(|old| *old == &**service)
                })
                .and_then(|p| p.mesh.get(&name).cloned());
            let resource = match kept {
                Some(json) => Some((name, json)),
                None => resources::service_resource(service)
                    .map(|(name, json)| (name, Json::from(json))),
            };
            mesh.extend(resource);
        }
        let mut reach = HashMap::new();
        for pod in pods {
            let Some(name) = pod.metadata.name.clone() else {
                continue;
            };
            let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
            // The first pod of a name decides, as a lookup would find it.
            reach
                .entry((namespace.to_owned(), name))
                .or_insert_with(|| reach_of(pod));
        }
        let change = previous.map(|p| {
            let mut changed = Vec::new();
            let mut removed = Vec::new();
            compare(&mesh, &p.mesh, &mut changed, &mut removed);
            Arc::new(MeshChange {
                from: p.mesh.clone(),
                changed: changed.into_iter().map(|(name, _)| name.clone()).collect(),
                removed,
            })
        });
        Views {
            inbound: InboundIndex::new(&translation.inbound),
            translation,
            mesh: Arc::new(mesh),
            reach,
            narrowed: Mutex::new(HashMap::new()),
            change,
        }
    }

    /// The resources one proxy should have.
    pub fn view(&self, namespace: &str, pod: &str, pod_ip: &str) -> View {
        let mut keys = vec![PodKey::Name {
            namespace: namespace.to_owned(),
            name: pod.to_owned(),
        }];
        if let Ok(ip) = pod_ip.trim().parse::<IpAddr>() {
            keys.push(PodKey::Ip(ip));
        }
        let inbound = self
            .inbound
            .for_pod(&keys)
            .values()
            .filter_map(|port| {
                let json = serde_json::to_vec(port).ok()?;
                Some((resources::inbound_name(port), Json::from(json)))
            })
            .collect();
        let reach = self.reach.get(&(namespace.to_owned(), pod.to_owned()));
        let (mesh, mesh_change) = match reach {
            Some(Some(namespaces)) => (self.narrowed_mesh(namespaces), None),
            _ => (self.mesh.clone(), self.change.clone()),
        };
        View {
            mesh,
            inbound,
            mesh_change,
        }
    }

    /// The mesh as a pod narrowed to `namespaces` sees it, shared by every pod with
    /// the same narrowing (resources keep the whole mesh's allocations).
    fn narrowed_mesh(&self, namespaces: &[String]) -> Arc<Resources> {
        let mut cache = self.narrowed.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(mesh) = cache.get(namespaces) {
            return mesh.clone();
        }
        let services = reachable(&self.translation.mesh.services, namespaces);
        let mesh: Resources = services
            .iter()
            .filter_map(|s| {
                let name = resources::service_name(s);
                let json = self.mesh.get(&name)?.clone();
                Some((name, json))
            })
            .collect();
        let mesh = Arc::new(mesh);
        cache.insert(namespaces.to_vec(), mesh.clone());
        mesh
    }
}

/// The namespaces a pod's annotation narrows its view to, if it has one (sorted,
/// without duplicates).
fn reach_of(pod: &Pod) -> Option<Vec<String>> {
    let annotation = pod.metadata.annotations.as_ref()?.get(REACH_ANNOTATION)?;
    let mut namespaces: Vec<String> = annotation
        .split(',')
        .map(|n| n.trim().to_owned())
        .filter(|n| !n.is_empty())
        .collect();
    namespaces.sort();
    namespaces.dedup();
    Some(namespaces)
}

/// The services of `namespaces`, plus every service their routes send to, in
/// mesh order.
fn reachable<'a>(
    services: &'a [Arc<model::Service>],
    namespaces: &[String],
) -> Vec<&'a model::Service> {
    let by_authority: HashMap<(&str, &str, u16), usize> = services
        .iter()
        .enumerate()
        .map(|(i, s)| ((s.namespace.as_str(), s.name.as_str(), s.port.get()), i))
        .collect();
    let mut keep = BTreeSet::new();
    let mut queue: Vec<usize> = services
        .iter()
        .enumerate()
        .filter(|(_, s)| namespaces.contains(&s.namespace))
        .map(|(i, _)| i)
        .collect();
    while let Some(i) = queue.pop() {
        if !keep.insert(i) {
            continue;
        }
        let service = &services[i];
        for backend in service.routes.iter().flat_map(|r| &r.backends) {
            let namespace = backend.namespace.as_deref().unwrap_or(&service.namespace);
            if let Some(&j) =
                by_authority.get(&(namespace, backend.name.as_str(), backend.port.get()))
            {
                queue.push(j);
            }
        }
    }
    keep.into_iter().map(|i| &*services[i]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::translate::fixtures::{assert_valid, objects, CANARY, SERVER_POLICY_YAML, SHOP};
    use crate::translate::{translate, Objects};
    use std::time::Duration;
    use trellis_proto::model::config::Config;

    fn json(text: &str) -> Json {
        Json::copy_from_slice(text.as_bytes())
    }

    /// The translation of `objects` and its views, as a snapshot makes them.
    fn views_of(objects: &Objects) -> (Arc<Translation>, Views) {
        let translation = Arc::new(translate(objects));
        assert_valid(&translation.mesh);
        let views = Views::new(translation.clone(), &objects.pods, None);
        (translation, views)
    }

    /// The config a proxy reassembles from its view, checked as the proxy checks it.
    fn config(view: &View) -> Config {
        let resources = view.iter().map(|(n, j)| (n.clone(), j.to_vec())).collect();
        let config = resources::from_resources(&resources).unwrap();
        assert_valid(&config);
        config
    }

    /// Services in one order whatever order they came in.
    fn by_name(services: &[Arc<model::Service>]) -> Vec<&model::Service> {
        let mut services: Vec<&model::Service> = services.iter().map(|s| &**s).collect();
        services.sort_by_key(|s| (&s.namespace, &s.name, s.port));
        services
    }

    #[test]
    fn a_pod_annotation_narrows_its_view_to_namespaces() {
        let objects = objects(
            "
apiVersion: v1
kind: Service
metadata: {name: a, namespace: one}
spec: {clusterIP: 198.19.0.1, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: b, namespace: two}
spec: {clusterIP: 198.19.0.2, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Pod
metadata: {name: narrow, namespace: one, annotations: {trellis.dev/reach: 'one'}}
spec: {containers: [{name: app, image: app}]}
",
        );
        let (_, views) = views_of(&objects);
        let names = |view: &View| view.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
        assert_eq!(
            names(&views.view("one", "narrow", "")),
            ["service/one/a/80"]
        );
        assert_eq!(
            names(&views.view("one", "other", "")),
            ["service/one/a/80", "service/two/b/80"],
            "no annotation: the whole mesh"
        );
        // Pods with the same narrowing share one map.
        let (x, y) = (
            views.view("one", "narrow", ""),
            views.view("one", "narrow", ""),
        );
        assert!(Arc::ptr_eq(&x.mesh, &y.mesh));
    }

    #[test]
    fn a_view_diff_sends_only_what_changed() {
        let shared = json("{\"a\":1}");
        let mesh: Resources = [
            ("service/x/a/80".to_owned(), shared.clone()),
            ("service/x/b/80".to_owned(), json("{\"b\":1}")),
        ]
        .into();
        let before = View {
            mesh: Arc::new(mesh.clone()),
            inbound: [("inbound/8080".to_owned(), json("{}"))].into(),
            mesh_change: None,
        };
        // Same mesh object, same inbound: nothing to send.
        let same = View {
            mesh: before.mesh.clone(),
            inbound: before.inbound.clone(),
            mesh_change: None,
        };
        let (changed, removed) = same.diff(&before);
        assert!(changed.is_empty() && removed.is_empty());

        // A new mesh map: b changed (by value), c added, the inbound port gone.
        let mut next = mesh;
        next.insert("service/x/b/80".to_owned(), json("{\"b\":2}"));
        next.insert("service/x/c/80".to_owned(), json("{\"c\":1}"));
        let after = View {
            mesh: Arc::new(next),
            inbound: Resources::new(),
            mesh_change: None,
        };
        let (changed, removed) = after.diff(&before);
        let names: Vec<&str> = changed.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["service/x/b/80", "service/x/c/80"]);
        assert_eq!(removed, ["inbound/8080"]);
        assert_eq!(after.len(), 3);
    }

    #[test]
    fn unchanged_resources_keep_the_previous_snapshots_allocation() {
        let before = objects(SHOP);
        let (_, first) = views_of(&before);
        let after = objects(&SHOP.replace("198.18.1.2]", "198.18.1.3]"));
        let translation = Arc::new(translate(&after));
        let second = Views::new(translation, &after.pods, Some(&first));
        let (before, after) = (first.view("shop", "p", ""), second.view("shop", "p", ""));
        let (changed, removed) = after.diff(&before);
        let names: Vec<&str> = changed.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["service/web/productpage/9080"]);
        assert!(removed.is_empty());
        // That diff was worked out once per snapshot, and says what comparing
        // every resource says.
        assert!(after.mesh_change.is_some());
        let compared = View {
            mesh_change: None,
            ..after.clone()
        };
        assert_eq!(compared.diff(&before), (changed, removed));
        let kept = |name: &str| first.mesh[name].as_ptr() == second.mesh[name].as_ptr();
        assert!(kept("service/shop/reviews/8080"));
        assert!(!kept("service/web/productpage/9080"));
    }

    #[test]
    fn server_policy_rate_limit_is_inbound_only_for_pods_that_back_the_service() {
        let objects = objects(&format!("{SHOP}{CANARY}{SERVER_POLICY_YAML}"));
        let (t, views) = views_of(&objects);

        // By the endpoint's targetRef, on the pod's own port (the slice's, 9080).
        let v1 = config(&views.view("shop", "reviews-v1-0", ""));
        assert_eq!(by_name(&v1.services), by_name(&t.mesh.services));
        assert_eq!(v1.inbound.len(), 1);
        assert_eq!(v1.inbound[0].port.get(), 9080);
        let limit = v1.inbound[0].rate_limit.as_ref().unwrap();
        assert_eq!(limit.max_tokens.0, 1000);
        assert_eq!(limit.fill_interval, Duration::from_secs(1));

        // By address, and ready or not.
        let by_ip = config(&views.view("shop", "renamed", "198.18.0.3"));
        assert_eq!(by_ip.inbound, v1.inbound);
        let starting = config(&views.view("shop", "reviews-v2-1", "198.18.0.4"));
        assert_eq!(starting.inbound, v1.inbound);

        // A pod that does not back reviews gets none.
        let other = config(&views.view("web", "productpage-0", "198.18.1.2"));
        assert!(other.inbound.is_empty());
        assert_eq!(by_name(&other.services), by_name(&t.mesh.services));

        // Every pod, by name, by address or both, gets its limits as a resource.
        for (namespace, pod, ip, limited) in [
            ("shop", "reviews-v1-0", "", true),
            ("shop", "renamed", "198.18.0.3", true),
            ("shop", "reviews-v2-1", "198.18.0.4", true),
            ("web", "productpage-0", "198.18.1.2", false),
        ] {
            let view = views.view(namespace, pod, ip);
            let expected = if limited {
                v1.inbound.clone()
            } else {
                Vec::new()
            };
            assert_eq!(config(&view).inbound, expected, "{namespace}/{pod}");
            let names: Vec<&String> = view.inbound.keys().collect();
            assert_eq!(names.len(), usize::from(limited), "{namespace}/{pod}");
        }

        // A refused policy adds nothing.
        let bad = self::objects(&format!(
            "{SHOP}{}",
            SERVER_POLICY_YAML.replace("maxTokens: 1000,", "maxTokens: 0,")
        ));
        let (_, bad_views) = views_of(&bad);
        assert!(bad_views
            .view("shop", "reviews-v1-0", "")
            .inbound
            .is_empty());
    }

    #[test]
    fn a_policy_naming_its_port_beats_an_older_one_however_the_pod_is_known() {
        // `general` has no creationTimestamp, so it is the oldest; `reviews` names
        // its port, so it goes first all the same.
        let named = SERVER_POLICY_YAML.replace(
            "metadata: {name: reviews, namespace: shop}",
            "metadata: {name: reviews, namespace: shop, creationTimestamp: '2025-01-01T00:00:00Z'}",
        );
        assert_ne!(named, SERVER_POLICY_YAML);
        let objects = objects(&format!(
            "{SHOP}{named}
---
apiVersion: policy.trellis.dev/v1alpha1
kind: ServerPolicy
metadata: {{name: general, namespace: shop}}
spec:
  targetRefs: [{{group: '', kind: Service, name: reviews}}]
  rateLimit: {{maxTokens: 5, fillInterval: 1s}}
"
        ));
        let (_, views) = views_of(&objects);
        for (pod, ip) in [
            ("reviews-v1-0", ""),
            ("renamed", "198.18.0.2"),
            ("reviews-v1-0", "198.18.0.2"),
        ] {
            let inbound = config(&views.view("shop", pod, ip)).inbound;
            assert_eq!(inbound.len(), 1, "{pod} {ip}");
            assert_eq!(
                inbound[0].rate_limit.as_ref().unwrap().max_tokens.0,
                1000,
                "{pod} {ip}"
            );
        }
    }

    #[test]
    fn reach_narrows_a_view_to_its_namespaces_and_their_backends() {
        let objects = objects(&format!(
            "{SHOP}{CANARY}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: productpage, namespace: web}}
spec:
  parentRefs: [{{group: core, kind: Service, name: productpage}}]
  rules:
    - backendRefs: [{{name: reviews, namespace: shop, port: 8080}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: productpage-0, namespace: web, annotations: {{trellis.dev/reach: web}}}}
spec: {{containers: [{{name: app, image: app}}]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: reviews-v1-0, namespace: shop, annotations: {{trellis.dev/reach: 'shop, shop'}}}}
spec: {{containers: [{{name: app, image: app}}]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: x, namespace: ops, annotations: {{trellis.dev/reach: ''}}}}
spec: {{containers: [{{name: app, image: app}}]}}
"
        ));
        let (t, views) = views_of(&objects);
        let web = t
            .mesh
            .services
            .iter()
            .find(|s| s.name == "productpage")
            .unwrap();
        assert_eq!(web.routes[0].backends[0].namespace.as_deref(), Some("shop"));

        let narrowed = config(&views.view("web", "productpage-0", "198.18.1.2"));
        let mut names: Vec<String> = narrowed.services.iter().map(|s| s.authority()).collect();
        names.sort();
        // web's own service, the shop service its route sends to, and that one's
        // canary backends in turn.
        assert_eq!(
            names,
            [
                "productpage.web:9080",
                "reviews-v1.shop:8080",
                "reviews-v2.shop:8080",
                "reviews.shop:8080"
            ]
        );

        let shop = config(&views.view("shop", "reviews-v1-0", "198.18.0.2"));
        assert!(shop.services.iter().all(|s| s.namespace == "shop"));
        assert_eq!(shop.services.len(), 3);

        let nowhere = config(&views.view("ops", "x", "198.18.9.9"));
        assert_eq!(nowhere, Config::default());
    }
}
