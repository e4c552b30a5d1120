//! With the control plane as CA, the discovery stream knows who is asking: a stream
//! must present a mesh certificate, and may claim only a pod of the workload that
//! certificate proves; so no pod can read another workload's view by claiming to
//! be it. The sidecars of the other mTLS tests pass this check on every stream.

use hyper_util::rt::TokioIo;
use std::path::PathBuf;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, Uri};
use trellis_proto::v1::{discovery_client::DiscoveryClient, DiscoveryRequest, Node};
use trellis_tests::{
    control_plane::{mesh_ca, workload_certificate, ControlPlane, GRPC_PORT},
    http::TIMEOUT,
    netns::{Network, Pod},
    TempDir,
};

const MESH: &str = "apiVersion: v1
kind: Pod
metadata: {name: server, namespace: shop}
spec: {serviceAccountName: reviews, containers: [{name: app, image: reviews}]}
";

/// Opens a discovery stream from `pod` to the control plane on `cp`, presenting
/// `certificate` (if any) and claiming pod `namespace/name`; the first answer, or
/// the status the stream was refused with.
async fn claim(
    pod: &Pod,
    cp: &Pod,
    secrets: &TempDir,
    certificate: Option<(PathBuf, PathBuf)>,
    namespace: &str,
    name: &str,
) -> Result<String, tonic::Status> {
    let root = std::fs::read_to_string(secrets.0.join("ca/ca.crt")).unwrap();
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(root))
        .domain_name("trellis-control-plane.trellis-system.svc");
    if let Some((cert, key)) = certificate {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(cert).unwrap(),
            std::fs::read(key).unwrap(),
        ));
    }
    let addr = std::net::SocketAddr::from((cp.ip, GRPC_PORT));
    let pod = pod.clone();
    let channel = Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .timeout(TIMEOUT)
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let pod = pod.clone();
            async move { pod.connect(addr).await.map(TokioIo::new) }
        }))
        .await
        .expect("a TLS connection");
    let request = DiscoveryRequest {
        node: Some(Node {
            namespace: namespace.into(),
            pod: name.into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut responses = DiscoveryClient::new(channel)
        .stream(tokio_stream::iter(vec![request]))
        .await?
        .into_inner();
    let first = tokio::time::timeout(TIMEOUT, responses.message())
        .await
        .expect("an answer in time")?
        .expect("a response");
    Ok(first.version)
}

#[tokio::test]
async fn a_stream_gets_only_the_view_of_a_pod_its_certificate_proves() {
    let net = Network::new(2);
    let secrets = TempDir::new("discovery-auth");
    let cp = ControlPlane::issuing(
        net.pod(1),
        &[("mesh.yaml", MESH)],
        &secrets,
        &["frontend", "reviews"],
        &[],
    )
    .await;
    let (client, server) = (net.pod(0), net.pod(1));
    let ca = mesh_ca(&secrets);
    let reviews = || workload_certificate(&secrets, "reviews", &ca, "reviews", false);
    let frontend = || workload_certificate(&secrets, "frontend", &ca, "frontend", false);

    // The right workload for the pod: served.
    let version = claim(client, server, &secrets, Some(reviews()), "shop", "server").await;
    assert!(version.is_ok_and(|v| !v.is_empty()));

    // No certificate at all.
    let refused = claim(client, server, &secrets, None, "shop", "server")
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("needs the proxy's mesh certificate"),
        "{refused:?}"
    );

    // Another workload's pod, and a pod in another namespace.
    let refused = claim(client, server, &secrets, Some(frontend()), "shop", "server")
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert_eq!(
        refused.message(),
        "the certificate proves shop/frontend; pod shop/server runs as shop/reviews"
    );
    let refused = claim(
        client,
        server,
        &secrets,
        Some(frontend()),
        "kube-system",
        "x",
    )
    .await
    .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(
        refused.message().contains("claims pod kube-system/x"),
        "{refused:?}"
    );

    let (_, _, body) = trellis_tests::http::get(client, cp.admin(), "/metrics")
        .await
        .unwrap();
    let metrics = String::from_utf8_lossy(&body);
    for reason in ["no_certificate", "other_service_account", "other_namespace"] {
        assert!(
            metrics.contains(&format!(
                "trellis_cp_streams_refused_total{{reason=\"{reason}\"}} 1"
            )),
            "{reason}:\n{metrics}"
        );
    }
}
