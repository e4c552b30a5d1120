//! Two control-plane replicas against a real API server (kube-apiserver 1.20,
//! `tests/kube/`) with `--lease`: both serve, only the Lease's holder writes
//! status, and when it dies the other takes the Lease over (after the Lease runs
//! out) and writes the status of what changed meanwhile.

use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use serde_json::json;
use std::time::Duration;
use trellis_control_plane::crd::TrafficPolicy;
use trellis_tests::{
    kube::{ApiServer, ControlPlane},
    kube_api::{condition, create, install_crds, namespace, service, status_of},
    wait::until,
};

async fn policy(client: &kube::Client, name: &str) {
    create::<TrafficPolicy>(
        client,
        json!({
            "apiVersion": "policy.trellis.dev/v1alpha1",
            "kind": "TrafficPolicy",
            "metadata": {"name": name, "namespace": "shop"},
            "spec": {"targetRefs": [{"kind": "Service", "name": "ratings"}], "timeouts": {"request": "1s"}},
        }),
    )
    .await;
}

fn writes(cp: &ControlPlane) -> usize {
    cp.log().matches("status written").count()
}

#[tokio::test]
async fn only_the_lease_holder_writes_status_and_another_replica_takes_over() {
    let server = ApiServer::start().await;
    let client = &server.client;
    install_crds(client).await;
    for name in ["shop", "trellis-system"] {
        namespace(client, name).await;
    }
    service(client, "ratings").await;
    let args = ["--lease", "trellis-system/trellis-control-plane"];
    let mut replicas = vec![
        ControlPlane::start_with(&server.kubeconfig, &args).await,
        ControlPlane::start_with(&server.kubeconfig, &args).await,
    ];
    policy(client, "first").await;
    status_of::<TrafficPolicy>(client, "first", "first's status", |s| {
        condition(&s["conditions"], "Accepted").is_some()
    })
    .await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), "trellis-system");
    let holder = leases.get("trellis-control-plane").await.unwrap();
    let holder = holder.spec.unwrap().holder_identity.unwrap();
    // The writer logs its write after the API server has it.
    let (leader, writers) = until(
        Duration::from_secs(20),
        "a replica logs that it wrote status",
        || async {
            let writers: Vec<usize> = replicas.iter().map(writes).collect();
            match writers.iter().position(|w| *w > 0) {
                Some(leader) => Ok((leader, writers)),
                None => Err(format!("writes logged: {writers:?}")),
            }
        },
    )
    .await;
    assert_eq!(
        writers[1 - leader],
        0,
        "only one replica wrote status: {writers:?}"
    );
    assert!(
        replicas[leader].log().contains(&holder),
        "the writer holds the Lease ({holder})"
    );

    // The holder dies; the other takes over once the Lease runs out.
    replicas[leader].kill();
    let survivor = replicas.remove(1 - leader);
    policy(client, "second").await;
    until(
        Duration::from_secs(60),
        "the survivor writes second's status",
        || async {
            let api: Api<TrafficPolicy> = Api::namespaced(client.clone(), "shop");
            let object = api.get("second").await.map_err(|e| e.to_string())?;
            let status = serde_json::to_value(&object).unwrap()["status"].clone();
            match condition(&status["conditions"], "Accepted") {
                Some(_) => Ok(()),
                None => Err(format!("no status yet; survivor log:\n{}", survivor.log())),
            }
        },
    )
    .await;
    let now = leases
        .get("trellis-control-plane")
        .await
        .unwrap()
        .spec
        .unwrap();
    assert_ne!(now.holder_identity.as_deref(), Some(holder.as_str()));
    assert_eq!(now.lease_transitions, Some(1));
}
