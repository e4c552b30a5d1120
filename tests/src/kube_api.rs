//! Working with the real API server in tests: installing the CRDs the control
//! plane reads, creating objects, and waiting for what the control plane does
//! with them (a proxy's config, an object's status conditions).

use crate::{
    kube::{tool, ControlPlane, Proxy},
    wait::until,
};
use gateway_api::apis::standard::{grpcroutes::GrpcRoute, httproutes::HttpRoute};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{Namespace, Service};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{
    api::{ApiResource, DynamicObject, PostParams},
    runtime::wait::{await_condition, conditions},
    Api, Client, CustomResourceExt, Resource,
};
use serde::{de::DeserializeOwned, Deserialize};
use serde_json::{json, Value};
use std::{fmt::Debug, time::Duration};
use trellis_control_plane::crd::for_kubernetes_1_20;

/// Installs Trellis's CRDs (`crds_yaml()`) and the HTTPRoute and GRPCRoute CRDs,
/// and waits until each is Established.
pub async fn install_crds(client: &Client) -> Vec<String> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut crds: Vec<CustomResourceDefinition> = Vec::new();
    for document in serde_yaml_ng::Deserializer::from_str(&trellis_control_plane::crd::crds_yaml())
    {
        crds.push(CustomResourceDefinition::deserialize(document).expect("crds_yaml() parses"));
    }
    let mut names = Vec::new();
    // Trellis's own CRDs must install exactly as generated (and as the chart holds them).
    for crd in &crds {
        let created = api
            .create(&PostParams::default(), crd)
            .await
            .unwrap_or_else(|e| panic!("create CRD {:?} as generated: {e}", crd.metadata.name));
        names.push(created.metadata.name.expect("a CRD has a name"));
    }
    // The routes' come from the gateway-api crate, which 1.20 refuses as written.
    for route in [HttpRoute::crd(), GrpcRoute::crd()] {
        let kind = route.spec.names.kind.clone();
        let created = match api.create(&PostParams::default(), &route).await {
            Ok(created) => created,
            Err(kube::Error::Api(e)) if e.code == 422 => {
                eprintln!(
                    "note: the {kind} CRD was refused as written ({}); retrying in its 1.20 form",
                    e.message
                );
                api.create(&PostParams::default(), &for_kubernetes_1_20(&route))
                    .await
                    .unwrap_or_else(|e| panic!("create the {kind} CRD: {e}"))
            }
            Err(e) => panic!("create the {kind} CRD: {e}"),
        };
        names.push(created.metadata.name.expect("a CRD has a name"));
    }
    for name in &names {
        let established = await_condition(api.clone(), name, conditions::is_crd_established());
        match tokio::time::timeout(Duration::from_secs(30), established).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("waiting for CRD {name}: {e}"),
            Err(_) => panic!("CRD {name} not Established after 30 s"),
        }
    }
    names
}

/// Creates `object` (given as JSON, and sent as written) in its namespace,
/// retrying for a while on 404: a CRD just Established may not be in discovery yet.
pub async fn create<K>(client: &Client, object: Value) -> K
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + serde::Serialize
        + Debug,
{
    let namespace = object["metadata"]["namespace"]
        .as_str()
        .unwrap_or("default")
        .to_owned();
    let name = object["metadata"]["name"].to_string();
    let dynamic: DynamicObject =
        serde_json::from_value(object.clone()).unwrap_or_else(|e| panic!("{e}: {object}"));
    let api: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &namespace, &ApiResource::erase::<K>(&()));
    let created = until(Duration::from_secs(20), "create", || async {
        match api.create(&PostParams::default(), &dynamic).await {
            Ok(created) => Ok(created),
            Err(kube::Error::Api(e)) if e.code == 404 => Err(format!("{e:?}")),
            Err(e) => panic!("create {name}: {e}"),
        }
    })
    .await;
    let value = serde_json::to_value(&created).expect("serialise");
    serde_json::from_value(value.clone()).unwrap_or_else(|e| panic!("{e}: {value}"))
}

pub async fn namespace(client: &Client, name: &str) {
    let api: Api<Namespace> = Api::all(client.clone());
    let namespace: Namespace =
        serde_json::from_value(json!({"metadata": {"name": name}})).expect("namespace");
    api.create(&PostParams::default(), &namespace)
        .await
        .unwrap_or_else(|e| panic!("create namespace {name}: {e}"));
}

pub async fn service(client: &Client, name: &str) -> Service {
    create(
        client,
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": "shop"},
            "spec": {
                "selector": {"app": name},
                "ports": [{"name": "http", "port": 80, "targetPort": 8080}],
            },
        }),
    )
    .await
}

pub fn cluster_ip(service: &Service) -> String {
    let ip = service
        .spec
        .as_ref()
        .and_then(|s| s.cluster_ip.clone())
        .expect("the API server assigns a clusterIP");
    assert!(
        ip.starts_with("198.19."),
        "clusterIP {ip} not in 198.19.0.0/16"
    );
    ip
}

/// The proxy's config for `authority` (`name.namespace:port`), if it has it.
pub fn find_service<'a>(dump: &'a Value, authority: &str) -> Option<&'a Value> {
    dump["config"]["services"]
        .as_array()?
        .iter()
        .find(|s| s["service"] == authority)
}

/// Waits until the proxy's config has `authority`; returns that service's entry.
pub async fn proxy_has(proxy: &Proxy, cp: &ControlPlane, authority: &str) -> Value {
    until(
        Duration::from_secs(30),
        &format!("{authority} in the proxy's config_dump"),
        || async {
            let dump = proxy.config_dump().await;
            find_service(&dump, authority).cloned().ok_or_else(|| {
                format!(
                    "{dump:#}\ncontrol plane log:\n{}\nproxy log:\n{}",
                    cp.log(),
                    proxy.log()
                )
            })
        },
    )
    .await
}

/// The condition of `type_` in a `conditions` list given as JSON.
pub fn condition<'a>(conditions: &'a Value, type_: &str) -> Option<&'a Value> {
    conditions.as_array()?.iter().find(|c| c["type"] == type_)
}

/// Waits until the object's `status` satisfies `check` (given the status as JSON).
pub async fn status_of<K>(
    client: &Client,
    name: &str,
    what: &str,
    check: impl Fn(&Value) -> bool,
) -> Value
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + serde::Serialize
        + Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), "shop");
    until(Duration::from_secs(30), what, || async {
        let object = api
            .get(name)
            .await
            .map_err(|e| format!("get {name}: {e}"))?;
        let value = serde_json::to_value(&object).map_err(|e| e.to_string())?;
        let status = value["status"].clone();
        if check(&status) {
            Ok(status)
        } else {
            Err(format!("status: {status}"))
        }
    })
    .await
}

/// The chart's MutatingWebhookConfiguration as `helm template` renders it, with
/// each webhook calling `url` instead of the in-cluster Service.
pub fn chart_webhooks(url: &str) -> MutatingWebhookConfiguration {
    let output = std::process::Command::new(tool("helm"))
        .args(["template", "trellis"])
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../charts/trellis"))
        .args(["--namespace", "trellis-system", "--kube-version", "1.20.0"])
        .output()
        .expect("run helm template");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).unwrap();
    let mut configuration: Value = serde_yaml_ng::Deserializer::from_str(&text)
        .map(|document| serde_yaml_ng::Value::deserialize(document).unwrap())
        .map(|value| serde_json::to_value(value).unwrap())
        .find(|object| object["kind"] == "MutatingWebhookConfiguration")
        .expect("the chart renders a MutatingWebhookConfiguration");
    for webhook in configuration["webhooks"].as_array_mut().unwrap() {
        webhook["clientConfig"] = json!({"url": url});
    }
    serde_json::from_value(configuration).unwrap()
}

/// Waits until the control plane has set the `caBundle` of both webhooks of
/// `trellis-sidecar-injector`; the bundle (PEM).
pub async fn ca_bundle_set(client: &Client) -> String {
    let configurations: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    until(
        Duration::from_secs(30),
        "the caBundle set by the control plane",
        || async {
            let configuration = configurations
                .get("trellis-sidecar-injector")
                .await
                .map_err(|e| e.to_string())?;
            let bundles: Vec<_> = configuration
                .webhooks
                .iter()
                .flatten()
                .filter_map(|w| w.client_config.ca_bundle.clone())
                .collect();
            match bundles.len() {
                2 => Ok(String::from_utf8(bundles[0].0.clone()).unwrap_or_default()),
                n => Err(format!("{n} of 2 webhooks have a caBundle")),
            }
        },
    )
    .await
}
