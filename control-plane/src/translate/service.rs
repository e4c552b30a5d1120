//! Services and their EndpointSlices.
//!
//! Each port of a Service becomes one model service (`name`, `namespace`, `port`,
//! `clusterIP`; a headless Service has none). ExternalName Services are left out:
//! their traffic is not ours to route. Endpoints come from the EndpointSlices in the
//! Service's namespace labelled `kubernetes.io/service-name: <service>`: ready
//! endpoints only (an absent `conditions.ready` counts as ready), the first address
//! of each (FQDN slices are skipped), with the slice port whose name is the Service
//! port's name. For an unnamed Service port, the slice's unnamed port is taken
//! (the one numbered like a numeric `targetPort` if there are several), and a
//! slice that lists no ports at all serves the `targetPort` number (the Service
//! port when absent), which suits hand-written slices in local mode.
//!
//! A Service that cannot be used (a name or namespace that is not a DNS label, a
//! port out of range or listed twice) is refused with the field named, and
//! everything that refers to it then finds nothing.

use super::inbound::{InboundIndex, PodKey};
use super::objects::{namespace_of, Key, SERVICE};
use super::problem::{invalid, status, ObjectStatus, Problem};
use k8s_openapi::api::core::v1::{Pod, Service as KubeService};
use k8s_openapi::api::discovery::v1::{EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU16;
use std::sync::Arc;
use trellis_proto::model::config::{self as model, is_dns_label};

/// The label that ties an EndpointSlice to its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// One port of a Service.
pub(super) struct Port {
    pub(super) name: Option<String>,
    pub(super) port: NonZeroU16,
    target_port: Option<IntOrString>,
}

/// A usable Service: its address, ports and EndpointSlices.
pub(super) struct ServiceInfo<'a> {
    pub(super) object: &'a Arc<KubeService>,
    pub(super) cluster_ip: Option<IpAddr>,
    /// By port number.
    pub(super) ports: Vec<Port>,
    pub(super) slices: Vec<&'a Arc<EndpointSlice>>,
}

impl ServiceInfo<'_> {
    pub(super) fn port(&self, number: i32) -> Option<&Port> {
        self.ports
            .iter()
            .find(|p| i32::from(p.port.get()) == number)
    }

    pub(super) fn port_named(&self, name: &str) -> Option<&Port> {
        self.ports.iter().find(|p| p.name.as_deref() == Some(name))
    }
}

/// The usable Services by namespace/name: what routes, backendRefs and targetRefs
/// resolve against.
pub(super) type Services<'a> = BTreeMap<Key, ServiceInfo<'a>>;

/// The usable Services among `services` (oldest first, each once), each with its
/// EndpointSlices among `slices` (sorted by name); a Service that cannot be used
/// gets a status in `statuses` instead.
pub(super) fn services<'a>(
    services: Vec<(Key, &'a Arc<KubeService>)>,
    slices: &'a [Arc<EndpointSlice>],
    statuses: &mut Vec<ObjectStatus>,
) -> Services<'a> {
    let mut usable = BTreeMap::new();
    for (key, service) in services {
        match service_info(&key, service) {
            Ok(Some(info)) => {
                usable.insert(key, info);
            }
            Ok(None) => {}
            Err(problem) => statuses.push(status(SERVICE, &key, vec![problem])),
        }
    }
    for slice in slices {
        let Some(service) = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|labels| labels.get(SERVICE_NAME_LABEL))
        else {
            continue;
        };
        let key = (namespace_of(&slice.metadata), service.clone());
        if let Some(info) = usable.get_mut(&key) {
            info.slices.push(slice);
        }
    }
    for info in usable.values_mut() {
        info.slices
            .sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    }
    usable
}

/// A Service's ports and address; None for an ExternalName Service.
fn service_info<'a>(
    key: &Key,
    service: &'a Arc<KubeService>,
) -> Result<Option<ServiceInfo<'a>>, Problem> {
    if !is_dns_label(&key.1) {
        return Err(invalid(
            "Invalid",
            "metadata.name",
            format!("{:?} is not a DNS label", key.1),
        ));
    }
    if !is_dns_label(&key.0) {
        return Err(invalid(
            "Invalid",
            "metadata.namespace",
            format!("{:?} is not a DNS label", key.0),
        ));
    }
    let Some(spec) = &service.spec else {
        return Ok(Some(ServiceInfo {
            object: service,
            cluster_ip: None,
            ports: Vec::new(),
            slices: Vec::new(),
        }));
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return Ok(None);
    }
    let mut ports: Vec<Port> = Vec::new();
    for (i, port) in spec.ports.iter().flatten().enumerate() {
        let Some(number) = port_number(port.port) else {
            return Err(invalid(
                "Invalid",
                format!("spec.ports[{i}].port"),
                format!("{} is not a port (1 to 65535)", port.port),
            ));
        };
        if ports.iter().any(|p| p.port == number) {
            return Err(invalid(
                "Invalid",
                format!("spec.ports[{i}].port"),
                format!("port {number} is listed twice"),
            ));
        }
        ports.push(Port {
            name: port.name.clone().filter(|n| !n.is_empty()),
            port: number,
            target_port: port.target_port.clone(),
        });
    }
    ports.sort_by_key(|p| p.port);
    Ok(Some(ServiceInfo {
        object: service,
        cluster_ip: spec.cluster_ip.as_deref().and_then(|ip| ip.parse().ok()),
        ports,
        slices: Vec::new(),
    }))
}

/// The port of `slice` that serves the Service port `port`.
pub(super) fn slice_port(slice: &EndpointSlice, port: &Port) -> Option<NonZeroU16> {
    let ports = slice.ports.as_deref().unwrap_or_default();
    let number = |p: &EndpointPort| p.port.and_then(port_number);
    if let Some(name) = &port.name {
        return ports
            .iter()
            .find(|p| p.name.as_deref() == Some(name))
            .and_then(number);
    }
    let target = match &port.target_port {
        None => Some(port.port),
        Some(IntOrString::Int(n)) => port_number(*n),
        Some(IntOrString::String(_)) => None,
    };
    if ports.is_empty() {
        return target;
    }
    let unnamed: Vec<NonZeroU16> = ports
        .iter()
        .filter(|p| p.name.as_deref().unwrap_or("").is_empty())
        .filter_map(number)
        .collect();
    target
        .filter(|t| unnamed.contains(t))
        .or_else(|| unnamed.first().copied())
}

/// The service account each pod runs as, by (namespace, name): who answers at the
/// endpoints whose `targetRef` names the pod.
pub(super) type PodAccounts<'a> = HashMap<(&'a str, &'a str), &'a str>;

/// The service accounts of `pods` (Kubernetes' `default` when a pod names none).
pub(super) fn pod_accounts(pods: &[Arc<Pod>]) -> PodAccounts<'_> {
    pods.iter()
        .filter_map(|pod| {
            let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
            let name = pod.metadata.name.as_deref()?;
            let account = pod
                .spec
                .as_ref()
                .and_then(|spec| spec.service_account_name.as_deref())
                .unwrap_or("default");
            Some(((namespace, name), account))
        })
        .collect()
}

/// The ready endpoints of one Service port, sorted and without duplicates, each
/// with the identity of the pod behind it when its `targetRef` names a known pod
/// and no ServerPolicy DISABLEs mTLS on its port.
pub(super) fn endpoints(
    service: &ServiceInfo,
    port: &Port,
    accounts: &PodAccounts<'_>,
    inbound: &InboundIndex,
) -> Vec<model::Endpoint> {
    let mut endpoints = BTreeMap::new();
    for slice in &service.slices {
        if slice.address_type == "FQDN" {
            continue;
        }
        let Some(number) = slice_port(slice, port) else {
            continue;
        };
        let slice_namespace = slice.metadata.namespace.as_deref().unwrap_or("default");
        for endpoint in &slice.endpoints {
            let ready = endpoint
                .conditions
                .as_ref()
                .and_then(|c| c.ready)
                .unwrap_or(true);
            if !ready {
                continue;
            }
            let Some(ip) = endpoint
                .addresses
                .first()
                .and_then(|a| a.parse::<IpAddr>().ok())
            else {
                continue;
            };
            let pod = endpoint
                .target_ref
                .as_ref()
                .filter(|r| r.kind.as_deref() == Some("Pod"))
                .and_then(|r| {
                    Some((
                        r.namespace.as_deref().unwrap_or(slice_namespace),
                        r.name.as_deref()?,
                    ))
                });
            let mut keys = vec![PodKey::Ip(ip)];
            if let Some((namespace, name)) = pod {
                keys.push(PodKey::Name {
                    namespace: namespace.to_owned(),
                    name: name.to_owned(),
                });
            }
            let identity =
                pod.filter(|_| inbound.takes_mtls(&keys, number))
                    .and_then(|(namespace, name)| {
                        let account = accounts.get(&(namespace, name))?;
                        Some(model::Workload {
                            namespace: namespace.to_owned(),
                            service_account: (*account).to_owned(),
                        })
                    });
            endpoints
                .entry(SocketAddr::new(ip, number.get()))
                .or_insert(identity);
        }
    }
    endpoints
        .into_iter()
        .map(|(address, identity)| model::Endpoint { address, identity })
        .collect()
}

/// A port number, 1 to 65535.
pub(super) fn port_number(value: i32) -> Option<NonZeroU16> {
    u16::try_from(value).ok().and_then(NonZeroU16::new)
}

#[cfg(test)]
mod tests {
    use crate::translate::fixtures::{addresses, service, translated, PODS, SHOP};
    use crate::translate::SERVICE;
    use trellis_proto::model::policy::Policy;

    #[test]
    fn services_and_endpoint_slices_become_model_services_with_ready_endpoints() {
        let t = translated(SHOP);
        let names: Vec<String> = t.mesh.services.iter().map(|s| s.authority()).collect();
        assert_eq!(
            names,
            [
                "reviews.shop:8080",
                "reviews-v1.shop:8080",
                "reviews-v2.shop:8080",
                "productpage.web:9080"
            ]
        );
        let reviews = service(&t.mesh, "shop", "reviews");
        assert_eq!(reviews.cluster_ip, Some("198.19.0.10".parse().unwrap()));
        // The named slice port behind the Service port; not-ready 198.18.0.4 is left out.
        assert_eq!(addresses(reviews), ["198.18.0.2:9080", "198.18.0.3:9080"]);
        assert!(reviews.routes.is_empty());
        assert_eq!(reviews.policy, Policy::default());
        // An unnamed Service port takes the slice's unnamed port ...
        let v1 = service(&t.mesh, "shop", "reviews-v1");
        assert_eq!(addresses(v1), ["198.18.0.2:9080"]);
        // ... and a slice listing no ports serves the targetPort.
        let v2 = service(&t.mesh, "shop", "reviews-v2");
        assert_eq!(addresses(v2), ["198.18.0.3:9080"]);
        assert_eq!(v2.cluster_ip, Some("198.19.0.12".parse().unwrap()));
        assert!(t.statuses.is_empty(), "{:?}", t.statuses);
    }

    #[test]
    fn an_endpoint_carries_the_service_account_of_the_pod_its_target_ref_names() {
        let t = translated(&format!("{SHOP}{PODS}"));
        let reviews = service(&t.mesh, "shop", "reviews");
        let identities: Vec<Option<String>> = reviews
            .endpoints
            .iter()
            .map(|e| e.identity.as_ref().map(|w| w.to_string()))
            .collect();
        assert_eq!(
            identities,
            [
                Some("shop/reviews".to_owned()),
                // A pod that names no service account runs as `default`.
                Some("shop/default".to_owned())
            ]
        );
        assert_eq!(
            reviews.endpoints[0]
                .identity
                .as_ref()
                .unwrap()
                .spiffe_id("cluster.local"),
            "spiffe://cluster.local/ns/shop/sa/reviews"
        );
        // Without the pod, who answers is not known.
        let bare = translated(SHOP);
        let reviews = service(&bare.mesh, "shop", "reviews");
        assert!(reviews.endpoints.iter().all(|e| e.identity.is_none()));
    }

    #[test]
    fn invalid_services_are_reported_and_left_out() {
        let t = translated(&format!(
            "{SHOP}
---
apiVersion: v1
kind: Service
metadata: {{name: Bad_Name, namespace: shop}}
spec: {{ports: [{{port: 80}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: reviews, namespace: shop}}
spec: {{ports: [{{port: 81}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: external, namespace: shop}}
spec: {{type: ExternalName, externalName: example.com}}
"
        ));
        let bad = t.status(SERVICE, "shop", "Bad_Name").unwrap();
        assert_eq!(
            bad.message,
            "metadata.name: \"Bad_Name\" is not a DNS label"
        );
        let twice = t.status(SERVICE, "shop", "reviews").unwrap();
        assert!(
            twice.message.contains("more than once"),
            "{}",
            twice.message
        );
        assert_eq!(t.mesh, translated(SHOP).mesh);
    }
}
