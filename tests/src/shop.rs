//! One meshed server pod and the Services in front of it, for the tests of what
//! mesh mTLS carries: the control plane's files, the pod's apps and the calls a
//! client pod makes to them.

use crate::{
    apps,
    control_plane::ControlPlane,
    http::{get_with_host, TIMEOUT},
    netns::{Network, Pod},
    sidecar::Sidecar,
    wait::until,
    TempDir,
};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(20);
use std::{net::SocketAddr, sync::Arc};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Four Services in front of the pod `server` (198.18.0.3), which runs as
/// `shop/reviews`; `frontend` (pod 0) and `cart` (pod 3) are callers.
pub const MESH: &str = "
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: shop}
spec: {clusterIP: 198.19.0.10, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: echo-grpc, namespace: shop}
spec: {clusterIP: 198.19.0.11, ports: [{name: grpc, port: 90, targetPort: 9090}]}
---
apiVersion: v1
kind: Service
metadata: {name: echo-tcp, namespace: shop}
spec: {clusterIP: 198.19.0.12, ports: [{name: tcp, port: 70, targetPort: 7000}]}
---
apiVersion: v1
kind: Service
metadata: {name: secure, namespace: shop}
spec: {clusterIP: 198.19.0.13, ports: [{name: tls, port: 443, targetPort: 8443}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: reviews-1, namespace: shop, labels: {kubernetes.io/service-name: reviews}}
addressType: IPv4
endpoints: [{addresses: [198.18.0.3], targetRef: {kind: Pod, name: server, namespace: shop}}]
ports: [{name: http, port: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: echo-grpc-1, namespace: shop, labels: {kubernetes.io/service-name: echo-grpc}}
addressType: IPv4
endpoints: [{addresses: [198.18.0.3], targetRef: {kind: Pod, name: server, namespace: shop}}]
ports: [{name: grpc, port: 9090}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: echo-tcp-1, namespace: shop, labels: {kubernetes.io/service-name: echo-tcp}}
addressType: IPv4
endpoints: [{addresses: [198.18.0.3], targetRef: {kind: Pod, name: server, namespace: shop}}]
ports: [{name: tcp, port: 7000}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: secure-1, namespace: shop, labels: {kubernetes.io/service-name: secure}}
addressType: IPv4
endpoints: [{addresses: [198.18.0.3], targetRef: {kind: Pod, name: server, namespace: shop}}]
ports: [{name: tls, port: 8443}]
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: shop}
spec: {serviceAccountName: reviews, containers: [{name: app, image: reviews}]}
";

pub const REVIEWS: &str = "198.19.0.10:80";
pub const ECHO_GRPC: &str = "198.19.0.11:90";
pub const ECHO_TCP: &str = "198.19.0.12:70";
pub const SECURE: &str = "198.19.0.13:443";

pub fn addr(text: &str) -> SocketAddr {
    text.parse().unwrap()
}

/// The server pod's apps: HTTP (1 and 2), gRPC, TCP echo and a TLS echo of its
/// own; the TLS app's certificate, for clients to trust.
pub struct Apps {
    _apps: Vec<apps::App>,
    pub tls_certificate: Vec<u8>,
}

pub fn server_apps(pod: &Pod) -> Apps {
    let (tls, tls_certificate) = apps::tls_echo_app(pod.listen(8443), "secure.shop");
    Apps {
        _apps: vec![
            apps::http_app(pod.listen(8080), "reviews"),
            apps::grpc_app(pod.listen(9090)),
            apps::tcp_echo_app(pod.listen(7000)),
            tls,
        ],
        tls_certificate,
    }
}

/// HTTP/1 GET from `pod` to reviews: the status and `x-trellis-flags`.
pub async fn get(pod: &Pod, path: &str) -> Result<(u16, String), String> {
    let (status, headers, _) = get_with_host(pod, addr(REVIEWS), path, "reviews.shop")
        .await
        .map_err(|e| e.to_string())?;
    let flags = headers
        .get("x-trellis-flags")
        .map(|v| v.to_str().unwrap_or_default().to_owned())
        .unwrap_or_default();
    Ok((status.as_u16(), flags))
}

/// Sends `payload` over opaque TCP from `pod` to `to` and reads it back.
pub async fn echo(pod: &Pod, to: SocketAddr, payload: &[u8]) -> Result<Vec<u8>, String> {
    let exchange = async {
        let mut stream = pod.connect(to).await.map_err(|e| e.to_string())?;
        stream.write_all(payload).await.map_err(|e| e.to_string())?;
        let mut back = vec![0u8; payload.len()];
        stream
            .read_exact(&mut back)
            .await
            .map_err(|e| format!("closed: {e}"))?;
        Ok(back)
    };
    tokio::time::timeout(TIMEOUT, exchange)
        .await
        .map_err(|_| "no echo in time".to_owned())?
}

/// Sends `payload` through the app's own TLS from `pod` to `to`, trusting only
/// the app's certificate, and reads it back.
pub async fn tls_echo(
    pod: &Pod,
    to: SocketAddr,
    app_certificate: &[u8],
    payload: &[u8],
) -> Result<Vec<u8>, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(app_certificate.to_vec().into())
        .map_err(|e| e.to_string())?;
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let exchange = async {
        let stream = pod.connect(to).await.map_err(|e| e.to_string())?;
        let name = rustls::pki_types::ServerName::try_from("secure.shop").unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, stream)
            .await
            .map_err(|e| format!("the app's TLS: {e}"))?;
        tls.write_all(payload).await.map_err(|e| e.to_string())?;
        let mut back = vec![0u8; payload.len()];
        tls.read_exact(&mut back).await.map_err(|e| e.to_string())?;
        Ok(back)
    };
    tokio::time::timeout(TIMEOUT, exchange)
        .await
        .map_err(|_| "no echo in time".to_owned())?
}

/// Waits until `pod`'s sidecar calls reviews over mesh mTLS and gets 200.
pub async fn wait_meshed(pod: &Pod) {
    until(LIMIT, "a 200 from reviews", || async {
        match get(pod, "/").await? {
            (200, _) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
}

/// The control plane in pod 2, the mesh CA for `shop/reviews` and `callers`
/// (with `args`, more flags), and the server's sidecar in pod 1, certified as
/// `shop/reviews`.
pub async fn meshed_server(
    net: &Network,
    secrets: &TempDir,
    callers: &[&str],
    args: &[&str],
) -> (ControlPlane, Sidecar) {
    let mut accounts = vec!["reviews"];
    accounts.extend_from_slice(callers);
    let cp =
        ControlPlane::issuing(net.pod(2), &[("mesh.yaml", MESH)], secrets, &accounts, args).await;
    let server = cp
        .meshed_sidecar(net.pod(1), "server", secrets, "reviews")
        .await;
    (cp, server)
}
