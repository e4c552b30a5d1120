//! The sidecar injector: what a Pod being created gets, decided from its
//! namespace and annotations. [`webhook`] serves it as a mutating admission
//! webhook; this module is the pure part, a Pod in and a JSON patch (or a
//! refusal, or nothing) out, so every rule is testable without a server.
//!
//! Who is injected: pods in a namespace labelled `trellis.dev/inject=enabled`,
//! unless the pod's `trellis.dev/inject` annotation says `disabled`; elsewhere a
//! pod whose annotation (or label: the webhook configuration selects on it, so
//! the API server calls the injector only for such pods) says `enabled`. Never: the control plane's own namespace,
//! `kube-system`, `kube-public`, `kube-node-lease`, hostNetwork pods, and a pod
//! that already has the proxy (so re-injection changes nothing).
//!
//! What it gets: an init container that runs `trellis-proxy init` (NET_ADMIN and
//! NET_RAW only), then the proxy, uid 1337, no privilege, every capability
//! dropped, read-only root file system, probes on the admin port. On API servers
//! with native sidecars (1.29 and later) the proxy is an init container with
//! `restartPolicy: Always` and a startup probe, so Jobs finish and the app starts
//! after the proxy is ready; before that it is the first container, with a
//! postStart hook (`trellis-proxy wait`) that holds the app's start until then.

pub mod annotations;
pub mod webhook;

use annotations::{Overrides, INJECT};
use k8s_openapi::api::core::v1::Pod;
use serde_json::{json, Value};
use std::collections::BTreeMap;

/// The namespace label that turns injection on.
pub const NAMESPACE_LABEL: &str = "trellis.dev/inject";
/// The annotation a pod gets once injected.
pub const INJECTED: &str = "trellis.dev/injected";
pub const PROXY_CONTAINER: &str = "trellis-proxy";
pub const INIT_CONTAINER: &str = "trellis-init";
pub const PROXY_UID: i64 = 1337;
pub const ADMIN_PORT: i32 = 15020;
const IDENTITY_VOLUME: &str = "trellis-identity";
const TRUST_VOLUME: &str = "trellis-trust-anchors";
const IDENTITY_DIR: &str = "/var/run/trellis/identity";
const TRUST_DIR: &str = "/var/run/trellis/trust-anchors";
/// The key of the trust anchors ConfigMap the control plane keeps in each
/// namespace it injects into.
pub const TRUST_KEY: &str = "ca-bundle.crt";
/// Namespaces never injected, whatever their labels say.
const SYSTEM_NAMESPACES: [&str; 3] = ["kube-system", "kube-public", "kube-node-lease"];

/// What every injected pod gets that is not the pod's own choice.
#[derive(Debug, Clone)]
pub struct Settings {
    pub proxy_image: String,
    /// Where proxies reach the control plane, e.g.
    /// `https://trellis-control-plane.trellis-system.svc:15010`.
    pub control_plane_url: String,
    /// The name the control plane's certificate carries.
    pub control_plane_name: String,
    /// The control plane's own namespace, never injected.
    pub namespace: String,
    /// Whether the API server runs native sidecars (1.29 and later).
    pub native_sidecars: bool,
    /// The audience of the projected token proxies prove their identity with.
    pub token_audience: String,
    /// The ConfigMap (in the pod's namespace) that holds the trust anchors.
    pub trust_anchors_config_map: String,
    /// Requests, and the memory limit, unless a pod's annotations say otherwise.
    pub proxy_cpu: String,
    pub proxy_memory: String,
    /// `RUST_LOG` for the proxy.
    pub log_level: String,
}

/// What the injector does with one pod.
#[derive(Debug, PartialEq)]
pub enum Decision {
    /// A JSON patch (RFC 6902) that adds the init step and the proxy.
    Inject(Value),
    /// Admit unchanged, and why.
    Skip(&'static str),
    /// Refuse the pod: an annotation would make a broken proxy.
    Refuse(String),
}

/// What to do with `pod`, created in `namespace` whose labels are
/// `namespace_labels`.
pub fn decide(
    settings: &Settings,
    pod: &Pod,
    namespace: &str,
    namespace_labels: &BTreeMap<String, String>,
) -> Decision {
    if namespace == settings.namespace || SYSTEM_NAMESPACES.contains(&namespace) {
        return Decision::Skip("a system namespace");
    }
    let spec = pod.spec.as_ref();
    if spec.and_then(|s| s.host_network) == Some(true) {
        return Decision::Skip("hostNetwork");
    }
    let names = spec.into_iter().flat_map(|s| {
        s.containers
            .iter()
            .chain(s.init_containers.iter().flatten())
    });
    if names.clone().any(|c| c.name == PROXY_CONTAINER) {
        return Decision::Skip("already injected");
    }
    let annotations = pod.metadata.annotations.clone().unwrap_or_default();
    let label = pod.metadata.labels.as_ref().and_then(|l| l.get(INJECT));
    let (said, by) = match annotations.get(INJECT) {
        Some(value) => (Some(value), "annotation"),
        None => (label, "label"),
    };
    let wanted = match said.map(String::as_str) {
        Some("enabled") => true,
        Some("disabled") => false,
        Some(other) => {
            return Decision::Refuse(format!(
                "{by} {INJECT}: {other:?} is neither \"enabled\" nor \"disabled\""
            ))
        }
        None => namespace_labels.get(NAMESPACE_LABEL).map(String::as_str) == Some("enabled"),
    };
    if !wanted {
        return Decision::Skip("not enabled for this pod or namespace");
    }
    match Overrides::parse(&annotations) {
        Ok(overrides) => Decision::Inject(patch(settings, pod, &overrides)),
        Err(message) => Decision::Refuse(message),
    }
}

/// The patch that injects `pod`.
fn patch(settings: &Settings, pod: &Pod, overrides: &Overrides) -> Value {
    let spec = pod.spec.clone().unwrap_or_default();
    let mut operations = Vec::new();
    let mut init = vec![init_container(settings, overrides)];
    let proxy = proxy_container(settings, overrides);
    if settings.native_sidecars {
        init.push(proxy);
        prepend(
            &mut operations,
            "/spec/initContainers",
            spec.init_containers.is_some(),
            init,
        );
    } else {
        prepend(
            &mut operations,
            "/spec/initContainers",
            spec.init_containers.is_some(),
            init,
        );
        prepend(&mut operations, "/spec/containers", true, vec![proxy]);
    }
    let volumes = vec![
        json!({
            "name": IDENTITY_VOLUME,
            "projected": {"sources": [{"serviceAccountToken": {
                "audience": settings.token_audience,
                "expirationSeconds": 86400,
                "path": "token",
            }}]},
        }),
        json!({
            "name": TRUST_VOLUME,
            "configMap": {"name": settings.trust_anchors_config_map},
        }),
    ];
    append(
        &mut operations,
        "/spec/volumes",
        spec.volumes.is_some(),
        volumes,
    );
    let mode = if settings.native_sidecars {
        "native"
    } else {
        "classic"
    };
    if pod.metadata.annotations.is_none() {
        operations.push(json!({"op": "add", "path": "/metadata/annotations", "value": {}}));
    }
    operations.push(json!({
        "op": "add",
        "path": format!("/metadata/annotations/{}", INJECTED.replace('/', "~1")),
        "value": mode,
    }));
    Value::Array(operations)
}

/// Adds `items` before what a list holds (or as the list, when absent).
fn prepend(operations: &mut Vec<Value>, path: &str, exists: bool, items: Vec<Value>) {
    if !exists {
        operations.push(json!({"op": "add", "path": path, "value": items}));
        return;
    }
    for (i, item) in items.into_iter().enumerate() {
        operations.push(json!({"op": "add", "path": format!("{path}/{i}"), "value": item}));
    }
}

/// Adds `items` after what a list holds (or as the list, when absent).
fn append(operations: &mut Vec<Value>, path: &str, exists: bool, items: Vec<Value>) {
    if !exists {
        operations.push(json!({"op": "add", "path": path, "value": items}));
        return;
    }
    for item in items {
        operations.push(json!({"op": "add", "path": format!("{path}/-"), "value": item}));
    }
}

fn init_container(settings: &Settings, overrides: &Overrides) -> Value {
    let mut args = vec!["init".to_owned()];
    for (flag, values) in [
        ("--exclude-inbound-ports", &overrides.exclude_inbound_ports),
        (
            "--exclude-outbound-ports",
            &overrides.exclude_outbound_ports,
        ),
        (
            "--exclude-outbound-cidrs",
            &overrides.exclude_outbound_cidrs,
        ),
    ] {
        if !values.is_empty() {
            args.push(flag.to_owned());
            args.push(values.join(","));
        }
    }
    json!({
        "name": INIT_CONTAINER,
        "image": settings.proxy_image,
        "command": ["trellis-proxy"],
        "args": args,
        "securityContext": {
            "runAsUser": 0,
            "runAsNonRoot": false,
            "allowPrivilegeEscalation": false,
            "privileged": false,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
        },
        "resources": {
            "requests": {"cpu": "10m", "memory": "10Mi"},
            "limits": {"memory": "50Mi"},
        },
    })
}

fn proxy_container(settings: &Settings, overrides: &Overrides) -> Value {
    let field = |name: &str, path: &str| json!({"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}});
    let value = |name: &str, value: &str| json!({"name": name, "value": value});
    let mut args = vec!["run".to_owned()];
    if !overrides.opaque_ports.is_empty() {
        args.push("--opaque-ports".to_owned());
        args.push(overrides.opaque_ports.join(","));
    }
    let probe = |path: &str| json!({"httpGet": {"path": path, "port": ADMIN_PORT}});
    let cpu = overrides
        .proxy_cpu
        .as_deref()
        .unwrap_or(&settings.proxy_cpu);
    let memory = overrides
        .proxy_memory
        .as_deref()
        .unwrap_or(&settings.proxy_memory);
    let mut container = json!({
        "name": PROXY_CONTAINER,
        "image": settings.proxy_image,
        "command": ["trellis-proxy"],
        "args": args,
        "env": [
            field("TRELLIS_POD_NAME", "metadata.name"),
            field("TRELLIS_POD_NAMESPACE", "metadata.namespace"),
            field("TRELLIS_SERVICE_ACCOUNT", "spec.serviceAccountName"),
            field("TRELLIS_POD_IP", "status.podIP"),
            field("TRELLIS_NODE_NAME", "spec.nodeName"),
            value("TRELLIS_CONTROL_PLANE", &settings.control_plane_url),
            value("TRELLIS_CONTROL_PLANE_NAME", &settings.control_plane_name),
            value("TRELLIS_TRUST_ANCHORS", &format!("{TRUST_DIR}/{TRUST_KEY}")),
            value("TRELLIS_IDENTITY_TOKEN_FILE", &format!("{IDENTITY_DIR}/token")),
            value("RUST_LOG", &settings.log_level),
        ],
        "ports": [{"name": "trellis-admin", "containerPort": ADMIN_PORT}],
        "securityContext": {
            "runAsUser": PROXY_UID,
            "runAsGroup": PROXY_UID,
            "runAsNonRoot": true,
            "allowPrivilegeEscalation": false,
            "privileged": false,
            "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"]},
        },
        "livenessProbe": probe("/live"),
        "readinessProbe": probe("/ready"),
        "resources": {
            "requests": {"cpu": cpu, "memory": memory},
            "limits": {"memory": memory},
        },
        "volumeMounts": [
            {"name": IDENTITY_VOLUME, "mountPath": IDENTITY_DIR, "readOnly": true},
            {"name": TRUST_VOLUME, "mountPath": TRUST_DIR, "readOnly": true},
        ],
    });
    if settings.native_sidecars {
        container["restartPolicy"] = json!("Always");
        let mut startup = probe("/ready");
        startup["periodSeconds"] = json!(1);
        startup["failureThreshold"] = json!(120);
        container["startupProbe"] = startup;
    } else {
        container["lifecycle"] = json!({"postStart": {"exec": {"command": [
            "trellis-proxy", "wait", "--timeout", "120s",
        ]}}});
    }
    container
}

#[cfg(test)]
mod tests;
