//! The sidecar injector against a real API server (kube-apiserver 1.20,
//! `tests/kube/`): the chart's MutatingWebhookConfiguration, pointed at the control
//! plane on loopback, whose `caBundle` the control plane fills in. Pods created
//! through the API come back injected (classic mode on 1.20), or untouched, or
//! refused with the bad annotation named; with the webhook down, meshed pods are
//! refused and the rest of the cluster is not held up. AdmissionReviews sent by
//! hand over HTTPS give the golden patches of both modes.

use k8s_openapi::api::{
    admissionregistration::v1::MutatingWebhookConfiguration,
    core::v1::{ConfigMap, Pod},
};
use kube::api::{Api, PostParams};
use serde_json::{json, Value};
use std::path::Path;
use trellis_tests::{
    kube::{free_port, ApiServer, ControlPlane},
    kube_api::{ca_bundle_set, chart_webhooks, namespace},
};

fn repo_root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// A control plane in Kubernetes mode, the CA with its root in
/// `trellis-system/trellis-ca`, serving the injector on `webhook_addr` with
/// `--native-sidecars native`.
async fn injector(api: &ApiServer, webhook_addr: &str, native: &str) -> ControlPlane {
    let args = [
        "--ca-secret",
        "trellis-system/trellis-ca",
        "--server-name",
        "127.0.0.1",
        "--webhook-addr",
        webhook_addr,
        "--proxy-image",
        "trellis:test",
        "--native-sidecars",
        native,
    ];
    ControlPlane::start_with(&api.kubeconfig, &args).await
}

fn pod(name: &str, labels: Value, annotations: Value) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels, "annotations": annotations},
        "spec": {"serviceAccountName": "default", "containers": [{"name": "app", "image": "reviews"}]},
    }))
    .unwrap()
}

fn container_names(list: &Option<Vec<k8s_openapi::api::core::v1::Container>>) -> Vec<String> {
    list.iter().flatten().map(|c| c.name.clone()).collect()
}

#[tokio::test]
async fn pods_created_through_the_api_are_injected_or_left_alone_as_their_namespace_says() {
    let api = ApiServer::start().await;
    let client = api.client.clone();
    for name in ["trellis-system", "shop", "other"] {
        namespace(&client, name).await;
    }
    kube::Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone())
        .patch(
            "shop",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(
                json!({"metadata": {"labels": {"trellis.dev/inject": "enabled"}}}),
            ),
        )
        .await
        .unwrap();
    let port = free_port();
    let url = format!("https://127.0.0.1:{port}/inject");
    Api::<MutatingWebhookConfiguration>::all(client.clone())
        .create(&PostParams::default(), &chart_webhooks(&url))
        .await
        .expect("the chart's webhook configuration, as the API server takes it");
    let mut cp = injector(&api, &format!("127.0.0.1:{port}"), "auto").await;
    // The control plane trusts its webhook to the API server.
    let ca_bundle = ca_bundle_set(&client).await;
    assert!(ca_bundle.contains("-----BEGIN CERTIFICATE-----"));

    let pods = |namespace: &str| Api::<Pod>::namespaced(client.clone(), namespace);
    let created = pods("shop")
        .create(
            &PostParams::default(),
            &pod("reviews", json!({}), json!({})),
        )
        .await
        .unwrap_or_else(|e| panic!("create: {e}\n{}", cp.log()));
    let spec = created.spec.as_ref().unwrap();
    // 1.20 has no native sidecars: classic mode, though the default prefers native.
    eprintln!("note: kube-apiserver 1.20 — classic injection chosen (native sidecars need 1.29)");
    assert_eq!(container_names(&spec.init_containers), ["trellis-init"]);
    assert_eq!(
        container_names(&Some(spec.containers.clone())),
        ["trellis-proxy", "app"]
    );
    let annotations = created.metadata.annotations.clone().unwrap_or_default();
    assert_eq!(annotations["trellis.dev/injected"], "classic");
    let proxy = &spec.containers[0];
    assert_eq!(proxy.image.as_deref(), Some("trellis:test"));
    assert!(
        proxy
            .lifecycle
            .as_ref()
            .and_then(|l| l.post_start.as_ref())
            .is_some(),
        "the postStart hook survived the API server"
    );
    // The trust anchors the proxy mounts, in the pod's namespace.
    let anchors = Api::<ConfigMap>::namespaced(client.clone(), "shop")
        .get("trellis-trust-anchors")
        .await
        .expect("the trust anchors ConfigMap");
    assert_eq!(anchors.data.unwrap()["ca-bundle.crt"], ca_bundle);

    // Injecting what is injected changes nothing: the stored pod, created again
    // under another name, keeps one proxy.
    let mut again = created.clone();
    again.metadata =
        serde_json::from_value(json!({"name": "reviews-again", "annotations": annotations}))
            .unwrap();
    let again = pods("shop")
        .create(&PostParams::default(), &again)
        .await
        .unwrap();
    assert_eq!(
        container_names(&Some(again.spec.unwrap().containers)),
        ["trellis-proxy", "app"]
    );

    // Left alone: a system namespace, a pod that opts out, an unlabelled namespace.
    for (namespace, name, annotations) in [
        ("kube-system", "system", json!({})),
        (
            "shop",
            "opted-out",
            json!({"trellis.dev/inject": "disabled"}),
        ),
        ("other", "plain", json!({})),
    ] {
        let created = pods(namespace)
            .create(&PostParams::default(), &pod(name, json!({}), annotations))
            .await
            .unwrap();
        assert_eq!(
            container_names(&Some(created.spec.unwrap().containers)),
            ["app"],
            "{namespace}/{name}"
        );
    }
    // Opting in by label in an unlabelled namespace.
    let labelled = pods("other")
        .create(
            &PostParams::default(),
            &pod(
                "opted-in",
                json!({"trellis.dev/inject": "enabled"}),
                json!({}),
            ),
        )
        .await
        .unwrap();
    assert_eq!(
        container_names(&Some(labelled.spec.unwrap().containers)),
        ["trellis-proxy", "app"]
    );

    // A bad annotation refuses the pod, naming it.
    let refused = pods("shop")
        .create(
            &PostParams::default(),
            &pod(
                "bad",
                json!({}),
                json!({"trellis.dev/proxy-memory": "lots"}),
            ),
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(
        refused.contains("annotation trellis.dev/proxy-memory: \"lots\" is not a memory quantity"),
        "{refused}"
    );
    let metrics = trellis_tests::kube::get(cp.admin, "/metrics")
        .await
        .unwrap()
        .1;
    let metrics = String::from_utf8_lossy(&metrics);
    for line in [
        "trellis_injections_total{result=\"injected\"} 2",
        "trellis_injections_total{result=\"refused\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} not in:\n{metrics}");
    }

    // The webhook down, failurePolicy Fail: a meshed pod is refused, clearly; the
    // rest of the cluster is not held up.
    cp.kill();
    let refused = pods("shop")
        .create(
            &PostParams::default(),
            &pod("while-down", json!({}), json!({})),
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(
        refused.contains("failed calling webhook \"namespaces.inject.trellis.dev\""),
        "{refused}"
    );
    for (namespace, labels) in [
        ("kube-system", json!({})),
        ("other", json!({})),
        ("other", json!({"trellis.dev/inject": "enabled"})),
    ] {
        let name = format!("down-{}", free_port());
        let created = pods(namespace)
            .create(
                &PostParams::default(),
                &pod(&name, labels.clone(), json!({})),
            )
            .await
            .unwrap_or_else(|e| panic!("{namespace} {labels} while the webhook is down: {e}"));
        assert_eq!(
            container_names(&Some(created.spec.unwrap().containers)),
            ["app"]
        );
    }
}

/// What the injector answers an AdmissionReview for `pod` in `shop` (labelled),
/// sent by hand over HTTPS (curl, trusting `ca`): the JSON patch, decoded.
fn review(addr: &str, ca: &Path, pod: &Value) -> Value {
    let body = json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "golden",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "operation": "CREATE",
            "namespace": "shop",
            "userInfo": {},
            "object": pod,
            "dryRun": true,
        },
    });
    let output = std::process::Command::new("curl")
        .args(["--silent", "--show-error", "--max-time", "10", "--cacert"])
        .arg(ca)
        .args(["-H", "content-type: application/json", "--data-binary"])
        .arg(body.to_string())
        .arg(format!("https://{addr}/inject"))
        .output()
        .expect("run curl");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let answer: Value = serde_json::from_slice(&output.stdout).unwrap();
    let response = &answer["response"];
    assert_eq!(response["uid"], "golden");
    assert_eq!(response["allowed"], true, "{answer}");
    assert_eq!(response["patchType"], "JSONPatch");
    // kube-rs writes the patch's bytes as a JSON array, which the API server's
    // decoder takes as it takes base64.
    let patch: Vec<u8> = match &response["patch"] {
        Value::Array(bytes) => bytes.iter().map(|b| b.as_u64().unwrap() as u8).collect(),
        other => {
            serde_json::from_value::<k8s_openapi::ByteString>(other.clone())
                .unwrap()
                .0
        }
    };
    serde_json::from_slice(&patch).unwrap()
}

/// `actual` equals the golden file `tests/golden/<name>`; `TRELLIS_BLESS=1`
/// writes it instead.
fn golden(name: &str, actual: &Value) {
    let path = repo_root().join("tests/golden").join(name);
    let text = format!("{}\n", serde_json::to_string_pretty(actual).unwrap());
    if std::env::var_os("TRELLIS_BLESS").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &text).unwrap();
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (TRELLIS_BLESS=1 writes it)", path.display()));
    assert!(
        expected == text,
        "the patch differs from {} (TRELLIS_BLESS=1 rewrites it):\n{text}",
        path.display()
    );
}

#[tokio::test]
async fn admission_reviews_over_https_get_the_golden_patches_of_both_modes() {
    let api = ApiServer::start().await;
    for name in ["trellis-system", "shop"] {
        namespace(&api.client, name).await;
    }
    let mut control_planes = Vec::new();
    let mut addrs = Vec::new();
    for mode in ["never", "always"] {
        let addr = format!("127.0.0.1:{}", free_port());
        control_planes.push(injector(&api, &addr, mode).await);
        addrs.push(addr);
    }
    let secret =
        Api::<k8s_openapi::api::core::v1::Secret>::namespaced(api.client.clone(), "trellis-system")
            .get("trellis-ca")
            .await
            .unwrap();
    let ca = api.dir().join("trellis-ca.crt");
    std::fs::write(&ca, &secret.data.unwrap()["ca.crt"].0).unwrap();
    let pod = json!({
        "metadata": {
            "name": "reviews",
            "namespace": "shop",
            "annotations": {
                "trellis.dev/inject": "enabled",
                "trellis.dev/exclude-inbound-ports": "22",
                "trellis.dev/opaque-ports": "5432",
            },
        },
        "spec": {"serviceAccountName": "reviews", "containers": [{"name": "app", "image": "reviews"}]},
    });
    golden("inject-classic.json", &review(&addrs[0], &ca, &pod));
    golden("inject-native.json", &review(&addrs[1], &ca, &pod));
    // Nothing was written for a dry run.
    let config_maps = Api::<ConfigMap>::namespaced(api.client.clone(), "shop");
    assert!(config_maps
        .get_opt("trellis-trust-anchors")
        .await
        .unwrap()
        .is_none());
    drop(control_planes);
}
