//! Opaque TCP to a service's cluster IP, end to end: with no kube-proxy in the
//! pods, the connection reaches the service only because the client's sidecar
//! sends it to one of the service's endpoints, chosen by the service's balancer,
//! where it counts as in flight for as long as it lasts.

use std::{net::SocketAddr, time::Duration};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use trellis_tests::{
    apps,
    control_plane::ControlPlane,
    netns::Network,
    sidecar::Sidecar,
    wait::{until, within},
};

const MESH: &str = "
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: shop}
spec: {clusterIP: 198.19.0.50, ports: [{name: tcp, port: 7000}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: echo-1, namespace: shop, labels: {kubernetes.io/service-name: echo}}
addressType: IPv4
endpoints: [{addresses: [198.18.0.3]}]
ports: [{name: tcp, port: 7000}]
";

const LIMIT: Duration = Duration::from_secs(20);

/// The in-flight count the client's sidecar shows for the echo endpoint.
async fn in_flight(client: &Sidecar) -> Result<u64, String> {
    let dump = client.config_dump().await?;
    dump["config"]["services"]
        .as_array()
        .and_then(|all| all.iter().find(|s| s["service"] == "echo.shop:7000"))
        .and_then(|s| s["balancer"][0]["inFlight"].as_u64())
        .ok_or_else(|| "echo.shop:7000 not in the config yet".to_owned())
}

#[tokio::test]
async fn opaque_tcp_to_a_cluster_ip_goes_to_an_endpoint_of_the_service() {
    let net = Network::new(3);
    let _echo = apps::tcp_echo_app(net.pod(1).listen(7000));
    let cp = ControlPlane::start(net.pod(2), &[("mesh.yaml", MESH)]).await;
    let client = cp.sidecar(net.pod(0), "client").await;
    until(LIMIT, "the echo service in the client's config", || {
        in_flight(&client)
    })
    .await;

    let cluster_ip: SocketAddr = "198.19.0.50:7000".parse().unwrap();
    let mut stream = net.pod(0).connect(cluster_ip).await.unwrap();
    stream.write_all(b"ping over opaque tcp").await.unwrap();
    let mut echoed = [0u8; 20];
    within(LIMIT, "the echo", stream.read_exact(&mut echoed))
        .await
        .unwrap();
    assert_eq!(&echoed, b"ping over opaque tcp");
    // The connection is the endpoint's load while it lasts.
    until(LIMIT, "the connection counted in flight", || async {
        match in_flight(&client).await? {
            1 => Ok(()),
            n => Err(format!("{n} in flight")),
        }
    })
    .await;
    drop(stream);
    until(LIMIT, "the connection no longer counted", || async {
        match in_flight(&client).await? {
            0 => Ok(()),
            n => Err(format!("{n} in flight")),
        }
    })
    .await;
    let opaque = client.metrics().await.sum(
        "trellis_tcp_connections_total",
        &[("direction", "outbound"), ("protocol", "opaque")],
    );
    assert_eq!(opaque, 1.0);
}
