use super::*;

fn settings(native: bool) -> Settings {
    Settings {
        proxy_image: "trellis/proxy:test".into(),
        control_plane_url: "https://trellis-control-plane.trellis-system.svc:15010".into(),
        control_plane_name: "trellis-control-plane.trellis-system.svc".into(),
        namespace: "trellis-system".into(),
        native_sidecars: native,
        token_audience: "trellis".into(),
        trust_anchors_config_map: "trellis-trust-anchors".into(),
        proxy_cpu: "100m".into(),
        proxy_memory: "64Mi".into(),
        log_level: "info".into(),
    }
}

fn pod(yaml: &str) -> Pod {
    serde_yaml_ng::from_str(yaml).unwrap()
}

const APP: &str = "
metadata: {name: reviews-0, namespace: shop}
spec:
  serviceAccountName: reviews
  containers: [{name: app, image: reviews}]
";

fn labelled() -> BTreeMap<String, String> {
    BTreeMap::from([(NAMESPACE_LABEL.to_owned(), "enabled".to_owned())])
}

/// Applies a decision's patch to `pod`, as the API server would.
fn injected(settings: &Settings, pod: &Pod) -> Value {
    let Decision::Inject(patch) = decide(settings, pod, "shop", &labelled()) else {
        panic!("not injected");
    };
    let mut document = serde_json::to_value(pod).unwrap();
    let patch: json_patch::Patch = serde_json::from_value(patch).unwrap();
    json_patch::patch(&mut document, &patch).unwrap();
    document
}

fn names(list: &Value) -> Vec<&str> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect()
}

#[test]
fn classic_mode_puts_the_proxy_first_and_holds_the_app_until_it_is_ready() {
    let pod = injected(&settings(false), &self::pod(APP));
    let spec = &pod["spec"];
    assert_eq!(names(&spec["initContainers"]), ["trellis-init"]);
    assert_eq!(names(&spec["containers"]), ["trellis-proxy", "app"]);
    let proxy = &spec["containers"][0];
    assert_eq!(
        proxy["lifecycle"]["postStart"]["exec"]["command"],
        json!(["trellis-proxy", "wait", "--timeout", "120s"])
    );
    assert!(proxy.get("restartPolicy").is_none());
    assert_eq!(pod["metadata"]["annotations"][INJECTED], "classic");
}

#[test]
fn native_mode_makes_the_proxy_an_init_container_that_keeps_running() {
    let pod = injected(&settings(true), &self::pod(APP));
    let spec = &pod["spec"];
    assert_eq!(
        names(&spec["initContainers"]),
        ["trellis-init", "trellis-proxy"]
    );
    assert_eq!(names(&spec["containers"]), ["app"]);
    let proxy = &spec["initContainers"][1];
    assert_eq!(proxy["restartPolicy"], "Always");
    assert_eq!(proxy["startupProbe"]["httpGet"]["path"], "/ready");
    assert_eq!(pod["metadata"]["annotations"][INJECTED], "native");
}

#[test]
fn the_proxy_runs_unprivileged_and_the_init_step_with_two_capabilities() {
    let pod = injected(&settings(false), &self::pod(APP));
    let proxy = &pod["spec"]["containers"][0];
    let security = &proxy["securityContext"];
    assert_eq!(security["runAsUser"], 1337);
    assert_eq!(security["runAsNonRoot"], true);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["capabilities"], json!({"drop": ["ALL"]}));
    assert_eq!(proxy["livenessProbe"]["httpGet"]["port"], 15020);
    assert_eq!(proxy["readinessProbe"]["httpGet"]["path"], "/ready");
    let env: BTreeMap<&str, &Value> = proxy["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap(), e))
        .collect();
    assert_eq!(
        env["TRELLIS_POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"],
        "status.podIP"
    );
    assert_eq!(
        env["TRELLIS_SERVICE_ACCOUNT"]["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.serviceAccountName"
    );
    assert_eq!(
        env["TRELLIS_IDENTITY_TOKEN_FILE"]["value"],
        "/var/run/trellis/identity/token"
    );
    let init = &pod["spec"]["initContainers"][0]["securityContext"]["capabilities"];
    assert_eq!(
        *init,
        json!({"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]})
    );
    let volumes = &pod["spec"]["volumes"];
    assert_eq!(
        names(volumes),
        ["trellis-identity", "trellis-trust-anchors"]
    );
    assert_eq!(
        volumes[0]["projected"]["sources"][0]["serviceAccountToken"]["audience"],
        "trellis"
    );
}

#[test]
fn annotations_reach_the_init_step_and_the_proxy() {
    let pod = injected(
        &settings(false),
        &self::pod(
            "
metadata:
  name: db-0
  namespace: shop
  annotations:
    trellis.dev/exclude-inbound-ports: '22'
    trellis.dev/exclude-outbound-cidrs: 10.0.0.0/8
    trellis.dev/opaque-ports: '5432,6379'
    trellis.dev/proxy-memory: 128Mi
spec:
  initContainers: [{name: migrate, image: db}]
  containers: [{name: db, image: db}]
  volumes: [{name: data, emptyDir: {}}]
",
        ),
    );
    let spec = &pod["spec"];
    assert_eq!(names(&spec["initContainers"]), ["trellis-init", "migrate"]);
    assert_eq!(
        spec["initContainers"][0]["args"],
        json!([
            "init",
            "--exclude-inbound-ports",
            "22",
            "--exclude-outbound-cidrs",
            "10.0.0.0/8"
        ])
    );
    let proxy = &spec["containers"][0];
    assert_eq!(proxy["args"], json!(["run", "--opaque-ports", "5432,6379"]));
    assert_eq!(proxy["resources"]["limits"]["memory"], "128Mi");
    assert_eq!(proxy["resources"]["requests"]["cpu"], "100m");
    assert_eq!(
        names(&spec["volumes"]),
        ["data", "trellis-identity", "trellis-trust-anchors"]
    );
}

#[test]
fn who_is_injected_and_who_is_not() {
    let settings = settings(false);
    let decide_in = |yaml: &str, namespace: &str, labels: BTreeMap<String, String>| {
        decide(&settings, &pod(yaml), namespace, &labels)
    };
    let skipped = |d: Decision| matches!(d, Decision::Skip(_));
    assert!(matches!(
        decide_in(APP, "shop", labelled()),
        Decision::Inject(_)
    ));
    assert!(
        skipped(decide_in(APP, "shop", BTreeMap::new())),
        "unlabelled"
    );
    for system in [
        "kube-system",
        "kube-public",
        "kube-node-lease",
        "trellis-system",
    ] {
        assert!(skipped(decide_in(APP, system, labelled())), "{system}");
    }
    let annotated = |value: &str| {
        format!(
            "metadata: {{name: a, annotations: {{trellis.dev/inject: {value}}}}}\nspec: {{containers: [{{name: app, image: a}}]}}"
        )
    };
    assert!(skipped(decide_in(
        &annotated("disabled"),
        "shop",
        labelled()
    )));
    assert!(matches!(
        decide_in(&annotated("enabled"), "shop", BTreeMap::new()),
        Decision::Inject(_)
    ));
    assert!(
        skipped(decide_in(
            &annotated("enabled"),
            "kube-system",
            BTreeMap::new()
        )),
        "never in a system namespace"
    );
    assert_eq!(
        decide_in(&annotated("yes"), "shop", labelled()),
        Decision::Refuse(
            "annotation trellis.dev/inject: \"yes\" is neither \"enabled\" nor \"disabled\"".into()
        )
    );
    let host =
        "metadata: {name: h}\nspec: {hostNetwork: true, containers: [{name: app, image: a}]}";
    assert!(skipped(decide_in(host, "shop", labelled())));
}

#[test]
fn injecting_an_injected_pod_changes_nothing() {
    let settings = settings(false);
    let once = injected(&settings, &pod(APP));
    let again: Pod = serde_json::from_value(once).unwrap();
    assert_eq!(
        decide(&settings, &again, "shop", &labelled()),
        Decision::Skip("already injected")
    );
}
