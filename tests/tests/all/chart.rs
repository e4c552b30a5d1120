//! The Helm chart with the real `helm` (installed by `scripts/setup`): it lints,
//! renders for Kubernetes 1.20 and for a current version (the PodDisruptionBudget's
//! API follows the version), and installs into a real API server (kube-apiserver
//! 1.20, `tests/kube/`), where every object it rendered exists as rendered: a field
//! the server dropped or changed fails the test.

use serde::Deserialize;
use serde_json::Value;
use std::path::{Path, PathBuf};
use trellis_tests::kube::{tool, ApiServer};

fn chart() -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../charts/trellis")).to_owned()
}

/// Runs helm with `args`; its stdout, or a panic with what it printed.
fn helm(args: &[&str]) -> String {
    let output = std::process::Command::new(tool("helm"))
        .args(args)
        .output()
        .expect("run helm");
    assert!(
        output.status.success(),
        "helm {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// The objects of a multi-document YAML stream, as JSON.
fn objects(yaml: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(yaml)
        .map(|document| serde_yaml_ng::Value::deserialize(document).unwrap())
        .map(|value| serde_json::to_value(value).unwrap())
        .filter(|object| !object.is_null())
        .collect()
}

/// The chart rendered for `kube_version` with `more` flags.
fn template(kube_version: &str, more: &[&str]) -> Vec<Value> {
    let chart = chart();
    let mut args = vec![
        "template",
        "trellis",
        chart.to_str().unwrap(),
        "--namespace",
        "trellis-system",
        "--kube-version",
        kube_version,
    ];
    args.extend_from_slice(more);
    objects(&helm(&args))
}

fn kinds(objects: &[Value]) -> Vec<String> {
    let mut kinds: Vec<String> = objects
        .iter()
        .map(|o| {
            format!(
                "{} {}",
                o["kind"].as_str().unwrap(),
                o["metadata"]["name"].as_str().unwrap()
            )
        })
        .collect();
    kinds.sort();
    kinds
}

#[test]
fn the_chart_lints_and_renders_for_1_20_and_a_current_version() {
    let chart = chart();
    let lint = helm(&["lint", chart.to_str().unwrap()]);
    assert!(lint.contains("0 chart(s) failed"), "{lint}");
    eprintln!("helm lint:\n{lint}");

    let expected = [
        "ClusterRole trellis-control-plane",
        "ClusterRoleBinding trellis-control-plane",
        "CustomResourceDefinition grpcroutes.gateway.networking.k8s.io",
        "CustomResourceDefinition httproutes.gateway.networking.k8s.io",
        "Deployment trellis-control-plane",
        "MutatingWebhookConfiguration trellis-sidecar-injector",
        "Role trellis-control-plane",
        "RoleBinding trellis-control-plane",
        "Service trellis-control-plane",
        "ServiceAccount trellis-control-plane",
    ];
    for version in ["1.20.0", "1.31.0"] {
        assert_eq!(
            kinds(&template(version, &[])),
            expected,
            "Kubernetes {version}"
        );
    }
    // A cluster that has the Gateway API CRDs already.
    let without = template("1.31.0", &["--set", "gatewayAPI.installCRDs=false"]);
    assert!(!kinds(&without)
        .iter()
        .any(|k| k.starts_with("CustomResourceDefinition")));

    // More than one replica: a PodDisruptionBudget of the API the version has.
    let budget = |version: &str| {
        template(version, &["--set", "controlPlane.replicas=2"])
            .into_iter()
            .find(|o| o["kind"] == "PodDisruptionBudget")
            .map(|o| o["apiVersion"].as_str().unwrap().to_owned())
    };
    assert_eq!(budget("1.20.0").as_deref(), Some("policy/v1beta1"));
    assert_eq!(budget("1.31.0").as_deref(), Some("policy/v1"));
    let replicas = template("1.31.0", &["--set", "controlPlane.replicas=2"]);
    let deployment = replicas.iter().find(|o| o["kind"] == "Deployment").unwrap();
    assert_eq!(deployment["spec"]["replicas"], 2);
}

/// Whether every field of `rendered` is in `live` with the same value (lists
/// element by element); where not, the path.
fn missing(rendered: &Value, live: &Value, path: &str) -> Option<String> {
    match (rendered, live) {
        (Value::Object(want), Value::Object(have)) => want.iter().find_map(|(key, value)| {
            let at = format!("{path}.{key}");
            match have.get(key) {
                Some(found) => missing(value, found, &at),
                None => Some(format!("{at} (absent)")),
            }
        }),
        (Value::Array(want), Value::Array(have)) if want.len() == have.len() => want
            .iter()
            .zip(have)
            .enumerate()
            .find_map(|(i, (w, h))| missing(w, h, &format!("{path}[{i}]"))),
        (want, have) if want == have => None,
        // Numbers rendered as text by a template (e.g. quoted) compare as text.
        (Value::String(want), Value::Number(have)) if *want == have.to_string() => None,
        (want, have) => Some(format!("{path}: rendered {want}, stored {have}")),
    }
}

#[tokio::test]
async fn helm_install_creates_every_object_as_rendered_on_a_real_api_server() {
    let api = ApiServer::start().await;
    let kubeconfig = api.kubeconfig.to_str().unwrap().to_owned();
    let chart = chart();
    let installed = helm(&[
        "install",
        "trellis",
        chart.to_str().unwrap(),
        "--kubeconfig",
        &kubeconfig,
        "--namespace",
        "trellis-system",
        "--create-namespace",
    ]);
    eprintln!("{installed}");
    let manifest = objects(&helm(&[
        "get",
        "manifest",
        "trellis",
        "--kubeconfig",
        &kubeconfig,
        "--namespace",
        "trellis-system",
    ]));
    assert_eq!(manifest.len(), 10, "{:?}", kinds(&manifest));
    for object in &manifest {
        let kind = object["kind"].as_str().unwrap();
        let name = object["metadata"]["name"].as_str().unwrap();
        let mut args = vec!["get", kind, name, "-o", "json"];
        if object["metadata"]["namespace"].is_string() {
            args.extend(["--namespace", "trellis-system"]);
        }
        let output = api.kubectl(&args, "").await;
        assert!(
            output.status.success(),
            "{kind} {name}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let live: Value = serde_json::from_slice(&output.stdout).unwrap();
        if let Some(path) = missing(object, &live, "") {
            panic!("{kind} {name} is not stored as rendered: {path}");
        }
    }
    // The chart's crds/ (Trellis's own) are installed too.
    for crd in [
        "trafficpolicies.policy.trellis.dev",
        "serverpolicies.policy.trellis.dev",
    ] {
        let output = api.kubectl(&["get", "crd", crd], "").await;
        assert!(
            output.status.success(),
            "{crd}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
