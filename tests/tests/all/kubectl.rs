//! The operator's path with the real kubectl (installed by `scripts/setup`),
//! which reads YAML 1.1: every example and every object `docs/reference.md` shows
//! applies as written to a real API server (kube-apiserver 1.20, `tests/kube/`)
//! and is accepted by the control plane; and what YAML 1.1 does to `on:` is named.

use gateway_api::apis::standard::{grpcroutes::GrpcRoute, httproutes::HttpRoute};
use kube::{
    api::{ApiResource, DynamicObject},
    Api, Client,
};
use serde::Deserialize;
use serde_json::{json, Value};
use std::{
    path::{Path, PathBuf},
    time::Duration,
};
use trellis_control_plane::crd::{ServerPolicy, TrafficPolicy};
use trellis_tests::{
    kube::{ApiServer, ControlPlane, Proxy},
    kube_api::*,
    wait::{self, until},
};

/// The repository's root (this crate is `tests/` in it).
fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// YAML an operator is shown: a file of `examples/mesh`, or a ```yaml block of
/// `docs/reference.md`; `name` says which, for messages.
struct Shown {
    name: String,
    text: String,
    documents: Vec<Value>,
}

impl Shown {
    fn new(name: String, text: String) -> Shown {
        let documents = serde_yaml_ng::Deserializer::from_str(&text)
            .map(|document| {
                Value::deserialize(document).unwrap_or_else(|e| panic!("{name} is not YAML: {e}"))
            })
            .filter(|document| !document.is_null())
            .collect();
        Shown {
            name,
            text,
            documents,
        }
    }

    /// Whether it holds whole Kubernetes objects (every document has `apiVersion`
    /// and `kind`) rather than a fragment of one (a spec, a config file). Both in
    /// one block would be a mistake in the docs.
    fn is_objects(&self) -> bool {
        let whole = self
            .documents
            .iter()
            .filter(|d| d["apiVersion"].is_string() && d["kind"].is_string())
            .count();
        assert!(
            whole == 0 || whole == self.documents.len(),
            "{} mixes whole objects and fragments:\n{}",
            self.name,
            self.text
        );
        whole > 0
    }
}

/// Every file of `examples/mesh`, then every ```yaml block of `docs/reference.md`.
fn shown_to_operators() -> Vec<Shown> {
    let mut shown = Vec::new();
    let examples = repo_root().join("examples/mesh");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&examples)
        .unwrap_or_else(|e| panic!("read {}: {e}", examples.display()))
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    for file in files {
        let text = std::fs::read_to_string(&file).expect("read an example");
        let name = format!(
            "examples/mesh/{}",
            file.file_name().unwrap().to_string_lossy()
        );
        shown.push(Shown::new(name, text));
    }
    let reference = std::fs::read_to_string(repo_root().join("docs/reference.md"))
        .expect("read docs/reference.md");
    let mut block: Option<(usize, String)> = None;
    for (i, line) in reference.lines().enumerate() {
        match &mut block {
            None if line.trim() == "```yaml" => block = Some((i + 2, String::new())),
            None => {}
            Some((first, text)) if line.trim() == "```" => {
                shown.push(Shown::new(
                    format!("docs/reference.md:{first}"),
                    std::mem::take(text),
                ));
                block = None;
            }
            Some((_, text)) => {
                text.push_str(line);
                text.push('\n');
            }
        }
    }
    assert!(
        block.is_none(),
        "docs/reference.md ends inside a yaml block"
    );
    shown
}

/// The kinds `api_version` serves on this server.
async fn served_kinds(client: &Client, api_version: &str) -> Vec<String> {
    let resources = if api_version == "v1" {
        client.list_core_api_resources("v1").await
    } else {
        client.list_api_group_resources(api_version).await
    };
    match resources {
        Ok(list) => list.resources.into_iter().map(|r| r.kind).collect(),
        Err(kube::Error::Api(e)) if e.code == 404 => Vec::new(),
        Err(e) => panic!("discovery of {api_version}: {e}"),
    }
}

/// Ok when the control plane accepted `object` (given as applied): Accepted=True in
/// a policy's conditions, or in every parent's of a route.
async fn accepted_status(client: &Client, object: &Value) -> Result<(), String> {
    let kind = object["kind"].as_str().unwrap_or_default();
    let namespace = object["metadata"]["namespace"]
        .as_str()
        .unwrap_or("default");
    let name = object["metadata"]["name"].as_str().unwrap_or_default();
    let resource = match kind {
        "TrafficPolicy" => ApiResource::erase::<TrafficPolicy>(&()),
        "ServerPolicy" => ApiResource::erase::<ServerPolicy>(&()),
        "HTTPRoute" => ApiResource::erase::<HttpRoute>(&()),
        "GRPCRoute" => ApiResource::erase::<GrpcRoute>(&()),
        other => panic!("no status to check on a {other}"),
    };
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &resource);
    let stored = api
        .get(name)
        .await
        .map_err(|e| format!("get {kind} {namespace}/{name}: {e}"))?;
    let status = &stored.data["status"];
    let accepted: Vec<Option<&Value>> = match kind {
        "HTTPRoute" | "GRPCRoute" => status["parents"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|parent| condition(&parent["conditions"], "Accepted"))
            .collect(),
        _ => vec![condition(&status["conditions"], "Accepted")],
    };
    if !accepted.is_empty()
        && accepted
            .iter()
            .all(|c| c.is_some_and(|c| c["status"] == "True"))
    {
        Ok(())
    } else {
        Err(format!("{kind} {namespace}/{name} status: {status:#}"))
    }
}

/// Fewer than this many objects applied means the test checked next to nothing.
const MIN_APPLIED: usize = 9;

#[tokio::test]
async fn every_example_and_documented_object_applies_with_kubectl_and_is_accepted() {
    let shown = shown_to_operators();
    let (objects, fragments): (Vec<&Shown>, Vec<&Shown>) =
        shown.iter().partition(|s| s.is_objects());
    // Fragments (a policy spec, a config file) are not objects: skipped by rule.
    eprintln!(
        "fragments, not applied: {:?}",
        fragments.iter().map(|s| &s.name).collect::<Vec<_>>()
    );
    let server = ApiServer::start().await;
    let client = &server.client;
    install_crds(client).await;

    // What the documents need first: their namespaces.
    let mut namespaces: Vec<&str> = objects
        .iter()
        .flat_map(|s| &s.documents)
        .filter_map(|d| d["metadata"]["namespace"].as_str())
        .collect();
    namespaces.sort();
    namespaces.dedup();
    for namespace in &namespaces {
        let out = server
            .kubectl(&["create", "namespace", namespace], "")
            .await;
        assert!(
            out.status.success(),
            "kubectl create namespace {namespace}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let cp = ControlPlane::start(&server.kubeconfig).await;

    // Kinds this 1.20 server does not serve cannot be applied here; only
    // EndpointSlice v1 is expected among them (tests/kube/README.md), and in a
    // cluster Kubernetes writes EndpointSlices itself.
    let mut unserved: Vec<(String, String)> = Vec::new();
    for document in objects.iter().flat_map(|s| &s.documents) {
        let api_version = document["apiVersion"].as_str().unwrap_or_default();
        let kind = document["kind"].as_str().unwrap_or_default();
        if !served_kinds(client, api_version)
            .await
            .iter()
            .any(|k| k == kind)
        {
            unserved.push((api_version.to_owned(), kind.to_owned()));
        }
    }
    for (api_version, kind) in &unserved {
        assert_eq!(
            (api_version.as_str(), kind.as_str()),
            ("discovery.k8s.io/v1", "EndpointSlice"),
            "a kind the test server does not serve"
        );
    }

    // `kubectl apply -f` on each, as an operator would.
    let mut applied: Vec<&Value> = Vec::new();
    for (i, source) in objects.iter().enumerate() {
        let file = server.dir().join(format!("shown-{i}.yaml"));
        std::fs::write(&file, &source.text).expect("write the document");
        let out = server
            .kubectl(&["apply", "-f", file.to_str().unwrap()], "")
            .await;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let said = format!(
            "kubectl apply -f {} ({}):\n{stdout}{stderr}",
            source.name, out.status
        );
        let mut refused = 0;
        for document in &source.documents {
            let api_version = document["apiVersion"].as_str().unwrap_or_default();
            let kind = document["kind"].as_str().unwrap_or_default();
            if unserved.contains(&(api_version.to_owned(), kind.to_owned())) {
                refused += 1;
                continue;
            }
            let group = api_version.rsplit_once('/').map(|(g, _)| g).unwrap_or("");
            let resource = match group {
                "" => kind.to_lowercase(),
                group => format!("{}.{group}", kind.to_lowercase()),
            };
            let name = document["metadata"]["name"].as_str().unwrap_or_default();
            assert!(
                stdout
                    .lines()
                    .any(|l| l == format!("{resource}/{name} created")),
                "{resource}/{name} not created: {said}"
            );
            applied.push(document);
        }
        let not_served = stderr
            .lines()
            .filter(|l| {
                l.contains(
                    "no matches for kind \"EndpointSlice\" in version \"discovery.k8s.io/v1\"",
                )
            })
            .count();
        assert_eq!(not_served, refused, "{said}");
        for line in stderr.lines() {
            assert!(
                line.contains("no matches for kind \"EndpointSlice\"")
                    || line == "ensure CRDs are installed first",
                "unexpected: {line}\n{said}"
            );
        }
        assert_eq!(out.status.success(), refused == 0, "{said}");
    }

    // The control plane accepted every policy and route as written.
    let mut checked: Vec<String> = Vec::new();
    for object in &applied {
        let kind = object["kind"].as_str().unwrap_or_default();
        if !["TrafficPolicy", "ServerPolicy", "HTTPRoute", "GRPCRoute"].contains(&kind) {
            continue;
        }
        let verdict = wait::poll(Duration::from_secs(30), || accepted_status(client, object)).await;
        if let Err(reason) = verdict {
            panic!("not accepted: {reason}\ncontrol plane log:\n{}", cp.log());
        }
        checked.push(kind.to_owned());
    }
    eprintln!("applied {} objects; accepted: {checked:?}", applied.len());
    assert!(
        applied.len() >= MIN_APPLIED,
        "only {} objects applied: {:?}",
        applied.len(),
        applied
            .iter()
            .map(|d| &d["metadata"]["name"])
            .collect::<Vec<_>>()
    );
    for kind in ["TrafficPolicy", "ServerPolicy", "HTTPRoute", "GRPCRoute"] {
        assert!(
            checked.iter().any(|k| k == kind),
            "no {kind} among the examples and the reference: {checked:?}"
        );
    }
}

#[tokio::test]
async fn retry_on_survives_kubectl_and_a_retry_written_with_on_is_refused_naming_retry_on() {
    let server = ApiServer::start().await;
    let client = &server.client;
    install_crds(client).await;
    let cp = ControlPlane::start(&server.kubeconfig).await;
    let proxy = Proxy::start(&cp.url()).await;
    let apply = |yaml: &'static str| {
        let server = &server;
        async move {
            let out = server.kubectl(&["apply", "-f", "-"], yaml).await;
            assert!(
                out.status.success(),
                "kubectl apply: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    };
    apply(
        "apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Service
metadata: {name: ratings, namespace: shop}
spec: {ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: details, namespace: shop}
spec: {ports: [{name: http, port: 80, targetPort: 8080}]}
",
    )
    .await;
    apply(
        "apiVersion: policy.trellis.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: ratings, namespace: shop}
spec:
  targetRefs: [{group: \"\", kind: Service, name: ratings}]
  retry: {attempts: 3, retryOn: [5xx, reset]}
---
apiVersion: policy.trellis.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: details, namespace: shop}
spec:
  targetRefs: [{group: \"\", kind: Service, name: details}]
  retry: {attempts: 3, on: [5xx]}
",
    )
    .await;
    let stored = |name: &'static str| async move {
        let api: Api<TrafficPolicy> = Api::namespaced(client.clone(), "shop");
        let policy = api.get(name).await.expect("get the policy");
        serde_json::to_value(policy).expect("serialise")
    };

    // retryOn reaches the API server, the control plane and the proxy as written.
    let ratings = stored("ratings").await;
    assert_eq!(
        ratings["spec"]["retry"]["retryOn"],
        json!(["5xx", "reset"]),
        "{ratings:#}"
    );
    let status = status_of::<TrafficPolicy>(client, "ratings", "TrafficPolicy ratings", |s| {
        condition(&s["conditions"], "Accepted").is_some()
    })
    .await;
    assert_eq!(
        condition(&status["conditions"], "Accepted").unwrap()["status"],
        "True",
        "{status:#}\n{}",
        cp.log()
    );
    let entry = until(
        Duration::from_secs(30),
        "ratings' retries in the proxy",
        || async {
            let dump = proxy.config_dump().await;
            match find_service(&dump, "ratings.shop:80") {
                Some(e) if e["routes"][0]["policy"]["retry"]["attempts"] == 3 => Ok(e.clone()),
                _ => Err(format!("{dump:#}\ncontrol plane log:\n{}", cp.log())),
            }
        },
    )
    .await;
    assert_eq!(
        entry["routes"][0]["policy"]["retry"]["retryOn"],
        json!(["5xx", "reset"]),
        "{entry:#}"
    );

    // `on:` is YAML 1.1's `true`: kubectl sends the key `true`, and the control
    // plane refuses it, pointing at the field's name.
    let details = stored("details").await;
    let retry = &details["spec"]["retry"];
    assert_eq!(retry["true"], json!(["5xx"]), "kubectl sent: {details:#}");
    assert!(retry.get("on").is_none(), "kubectl sent: {details:#}");
    let status = status_of::<TrafficPolicy>(client, "details", "TrafficPolicy details", |s| {
        condition(&s["conditions"], "Accepted").is_some()
    })
    .await;
    let accepted = condition(&status["conditions"], "Accepted").unwrap();
    assert_eq!(accepted["status"], "False", "{status:#}\n{}", cp.log());
    let message = accepted["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("spec.retry") && message.contains("retryOn"),
        "the message names the field to use: {status:#}"
    );
}
