//! The client side of the policy tests: a client config naming services in the
//! server pod of a [`Mesh`], and calls to them by name as an unchanged client
//! makes them.

use crate::{
    http::{collect, send_h1},
    mesh::{Mesh, HTTP},
};
use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::Full;

pub const SERVER: &str = "198.18.0.3";

/// A client config with one service `name.shop` on `port`, whose endpoints are the
/// server pod's `ports`, with `extra` YAML (policy, routes) indented under it.
pub fn service(name: &str, port: u16, ports: &[u16], extra: &str) -> String {
    let endpoints: String = ports
        .iter()
        .map(|p| format!("      - address: {SERVER}:{p}\n"))
        .collect();
    let extra: String = extra.lines().map(|l| format!("    {l}\n")).collect();
    format!("  - name: {name}\n    namespace: shop\n    port: {port}\n    endpoints:\n{endpoints}{extra}")
}

pub fn config(services: &[String]) -> String {
    format!("services:\n{}", services.concat())
}

/// One request from the client pod to `host` (a service name), with headers.
pub async fn call(
    mesh: &Mesh,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, HeaderMap) {
    let mut req = Request::get(path).header("host", host);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(Bytes::new())).unwrap();
    // Any address in the server pod: the Host header names the service.
    let addr = mesh.server_addr(HTTP);
    let (status, headers, _) = collect(send_h1(mesh.client_pod(), addr, req).await.unwrap())
        .await
        .unwrap();
    (status, headers)
}

pub fn app(headers: &HeaderMap) -> String {
    headers
        .get("x-app")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_else(|| "(proxy)".into())
}

pub fn flags(headers: &HeaderMap) -> &str {
    headers
        .get("x-trellis-flags")
        .map(|v| v.to_str().unwrap())
        .unwrap_or("")
}
