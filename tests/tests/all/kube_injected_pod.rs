//! A pod the injector wrote, as the API server stored it, runs: its init step's
//! command and flags write the pod's rules in a network namespace, and its proxy,
//! with that container's command, environment (the downward API resolved as the
//! kubelet would) and mounts (the projected token with the audience the injector
//! asked for, the trust anchors ConfigMap), gets a certificate from the control
//! plane through a TokenReview, takes its config and is ready. This proves the
//! injected spec is one the binaries understand, not only that a patch was made.

use k8s_openapi::api::{
    admissionregistration::v1::MutatingWebhookConfiguration,
    authentication::v1::{TokenRequest, TokenRequestSpec},
    core::v1::{ConfigMap, Container, Pod, ServiceAccount},
};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use std::{
    net::{Ipv4Addr, SocketAddr},
    process::{Child, Stdio},
    time::Duration,
};
use trellis_tests::{
    http::get,
    kube::{free_port, ApiServer, ControlPlane},
    kube_api::{ca_bundle_set, chart_webhooks, namespace},
    netns::Network,
    sidecar::{admin, proxy_bin_for_uid},
    wait::until,
    TempDir,
};

/// The pod's proxy, killed with the test.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn command_of(container: &Container) -> Vec<String> {
    let mut command = container.command.clone().unwrap_or_default();
    command.extend(container.args.clone().unwrap_or_default());
    command
}

#[tokio::test]
async fn an_injected_pod_as_stored_runs_gets_a_certificate_and_is_ready() {
    let server = ApiServer::start().await;
    let client = &server.client;
    for name in ["trellis-system", "shop"] {
        namespace(client, name).await;
    }
    Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone())
        .patch(
            "shop",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"trellis.dev/inject": "enabled"}}})),
        )
        .await
        .unwrap();
    Api::<ServiceAccount>::namespaced(client.clone(), "shop")
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "reviews"}})).unwrap(),
        )
        .await
        .unwrap();

    // The pod's network, linked to the host where the control plane runs.
    let net = Network::new(1);
    let host = Ipv4Addr::new(198, 18, 0, 254);
    net.link_host(0, host);
    let grpc = SocketAddr::from((host, free_port()));
    let webhook = format!("127.0.0.1:{}", free_port());
    Api::<MutatingWebhookConfiguration>::all(client.clone())
        .create(
            &PostParams::default(),
            &chart_webhooks(&format!("https://{webhook}/inject")),
        )
        .await
        .unwrap();
    let proxy_url = format!("https://{grpc}");
    let cp = ControlPlane::start_at(
        &server.kubeconfig,
        grpc,
        &[
            "--ca-secret",
            "trellis-system/trellis-ca",
            "--server-name",
            &host.to_string(),
            "--server-name",
            "127.0.0.1",
            "--webhook-addr",
            &webhook,
            "--proxy-control-plane",
            &proxy_url,
        ],
    )
    .await;
    ca_bundle_set(client).await;

    let pods: Api<Pod> = Api::namespaced(client.clone(), "shop");
    let stored = pods
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "reviews-0"},
                "spec": {"serviceAccountName": "reviews", "nodeName": "node-0",
                         "containers": [{"name": "app", "image": "reviews"}]},
            }))
            .unwrap(),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", cp.log()));
    let spec = stored.spec.clone().unwrap();
    let pod = net.pod(0);

    // The init step, as stored.
    let init = &spec.init_containers.as_ref().unwrap()[0];
    let command = command_of(init);
    assert_eq!(command[0], "trellis-proxy");
    let output = pod
        .command(proxy_bin_for_uid().to_str().unwrap())
        .args(&command[1..])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(pod
        .nat_rules()
        .contains("-A PREROUTING -p tcp -j TRELLIS_INBOUND"));

    // Its volumes, as the kubelet would fill them.
    let proxy = spec
        .containers
        .iter()
        .find(|c| c.name == "trellis-proxy")
        .unwrap();
    let volumes = spec.volumes.clone().unwrap();
    let token_source = volumes
        .iter()
        .find_map(|v| v.projected.as_ref())
        .and_then(|p| {
            p.sources
                .as_ref()?
                .iter()
                .find_map(|s| s.service_account_token.clone())
        })
        .expect("a projected service-account token");
    let token = Api::<ServiceAccount>::namespaced(client.clone(), "shop")
        .create_token_request(
            "reviews",
            &PostParams::default(),
            &TokenRequest {
                spec: TokenRequestSpec {
                    audiences: vec![token_source.audience.clone().unwrap()],
                    expiration_seconds: token_source.expiration_seconds,
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await
        .unwrap()
        .status
        .unwrap()
        .token;
    let config_map = volumes.iter().find_map(|v| v.config_map.clone()).unwrap();
    let anchors = Api::<ConfigMap>::namespaced(client.clone(), "shop")
        .get(&config_map.name)
        .await
        .unwrap()
        .data
        .unwrap();
    let files = TempDir::new("pod-volumes");
    let mut script = String::from("set -e; mount -t tmpfs tmpfs /run; ");
    for mount in proxy.volume_mounts.iter().flatten() {
        let volume = volumes.iter().find(|v| v.name == mount.name).unwrap();
        let source = files.0.join(&mount.name);
        std::fs::create_dir_all(&source).unwrap();
        if volume.projected.is_some() {
            std::fs::write(source.join(token_source.path.as_str()), &token).unwrap();
        } else {
            for (key, value) in &anchors {
                std::fs::write(source.join(key), value).unwrap();
            }
        }
        assert!(mount.mount_path.starts_with("/var/run/") || mount.mount_path.starts_with("/run/"));
        script.push_str(&format!(
            "mkdir -p {target}; cp {source}/* {target}/; ",
            source = source.display(),
            target = mount.mount_path,
        ));
    }
    let command = command_of(proxy);
    assert_eq!(command[0], "trellis-proxy");
    script.push_str(&format!(
        "chmod -R a+rX /run; exec setpriv --reuid {uid} --regid {uid} --clear-groups -- {bin} {args}",
        uid = proxy.security_context.as_ref().unwrap().run_as_user.unwrap(),
        bin = proxy_bin_for_uid().display(),
        args = command[1..].join(" "),
    ));
    let log = std::fs::File::create(files.0.join("proxy.log")).unwrap();
    let mut run = pod.command("unshare");
    run.args(["--mount", "--propagation", "private", "sh", "-c", &script]);
    run.env_clear().env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
    for env in proxy.env.iter().flatten() {
        let value = match (&env.value, &env.value_from) {
            (Some(value), _) => value.clone(),
            (None, Some(from)) => match from.field_ref.as_ref().unwrap().field_path.as_str() {
                "metadata.name" => "reviews-0".into(),
                "metadata.namespace" => "shop".into(),
                "spec.serviceAccountName" => "reviews".into(),
                "status.podIP" => pod.ip.to_string(),
                "spec.nodeName" => "node-0".into(),
                other => panic!("a field the harness does not resolve: {other}"),
            },
            _ => panic!("{} has no value", env.name),
        };
        run.env(&env.name, value);
    }
    let _proxy = Running(
        run.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let proxy_log = || std::fs::read_to_string(files.0.join("proxy.log")).unwrap_or_default();
    until(
        Duration::from_secs(30),
        "the injected proxy ready",
        || async {
            match get(pod, admin(), "/ready").await {
                Ok((status, _, _)) if status == 200 => Ok(()),
                Ok((status, _, body)) => Err(format!(
                    "{status} {}\n{}",
                    String::from_utf8_lossy(&body),
                    proxy_log()
                )),
                Err(e) => Err(format!("{e}\n{}", proxy_log())),
            }
        },
    )
    .await;
    let (_, _, body) = get(pod, admin(), "/config_dump").await.unwrap();
    let dump: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        dump["identity"]["certificate"]["identity"],
        "spiffe://cluster.local/ns/shop/sa/reviews",
        "{}",
        cp.log()
    );
}
