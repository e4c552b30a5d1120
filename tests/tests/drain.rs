//! Graceful shutdown: SIGTERM or `POST /shutdown` stops new work, lets what is in
//! flight finish, and exits 0 within the drain time.

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use trellis_tests::{
    http::{collect, get, h2_client, send_h1},
    mesh::{Mesh, ECHO, HTTP},
    sidecar::admin,
};

#[tokio::test]
async fn sigterm_lets_in_flight_requests_finish_then_exits_zero() {
    let mesh = Mesh::start(&["--drain-timeout", "10s"], &["--drain-timeout", "10s"]).await;
    let addr = mesh.server_addr(HTTP);
    let pod = mesh.client_pod().clone();

    let mut in_flight = Vec::new();
    for _ in 0..4 {
        let pod = pod.clone();
        in_flight.push(tokio::spawn(async move {
            let req = Request::get("/slow/1500")
                .header("host", addr.to_string())
                .body(Full::new(Bytes::new()))
                .unwrap();
            let (status, headers, body) = collect(send_h1(&pod, addr, req).await.unwrap())
                .await
                .unwrap();
            (status, headers.get("connection").cloned(), body)
        }));
    }
    let h2 = h2_client(&pod, addr).await.unwrap();
    for _ in 0..4 {
        let mut h2 = h2.clone();
        in_flight.push(tokio::spawn(async move {
            let req = Request::get(format!("http://{addr}/slow/1500"))
                .version(http::Version::HTTP_2)
                .body(Full::new(Bytes::new()))
                .unwrap();
            let (status, _, body) = collect(h2.send_request(req).await.unwrap()).await.unwrap();
            (status, None, body)
        }));
    }
    // Let every request reach the app, then stop both sidecars.
    tokio::time::sleep(Duration::from_millis(500)).await;
    mesh.client.terminate();
    mesh.server.terminate();

    for request in in_flight {
        let (status, connection, body) = request.await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(body, "slow done");
        if let Some(connection) = connection {
            assert_eq!(
                connection, "close",
                "HTTP/1 responses during drain close the connection"
            );
        }
    }
    let mut mesh = mesh;
    assert_eq!(
        mesh.client.wait_exit(Duration::from_secs(10)).await.code(),
        Some(0)
    );
    assert_eq!(
        mesh.server.wait_exit(Duration::from_secs(10)).await.code(),
        Some(0)
    );
}

#[tokio::test]
async fn admin_shutdown_stops_new_connections_and_exits_zero() {
    let mut mesh = Mesh::start(&[], &[]).await;
    let pod = mesh.server.pod.clone();
    let req = Request::post("/shutdown")
        .header("host", "admin")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (status, _, _) = collect(send_h1(&pod, admin(), req).await.unwrap())
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(
        mesh.server.wait_exit(Duration::from_secs(10)).await.code(),
        Some(0)
    );
    // The server sidecar is gone but its rules stay: inbound connections are
    // refused rather than slipping past the proxy, and the client sidecar says so.
    let (status, headers, _) = get(mesh.client_pod(), mesh.server_addr(HTTP), "/")
        .await
        .unwrap();
    assert_eq!(status, 503);
    assert_eq!(headers["x-trellis-flags"], "UF");
}

#[tokio::test]
async fn an_open_opaque_connection_holds_the_drain_only_until_its_timeout() {
    let mut mesh = Mesh::start(&["--drain-timeout", "500ms"], &[]).await;
    let mut stream = mesh
        .client_pod()
        .connect(mesh.server_addr(ECHO))
        .await
        .unwrap();
    stream.write_all(b"hold").await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let start = std::time::Instant::now();
    mesh.client.terminate();
    assert_eq!(
        mesh.client.wait_exit(Duration::from_secs(5)).await.code(),
        Some(0)
    );
    assert!(
        start.elapsed() >= Duration::from_millis(400),
        "exited before the drain timeout"
    );
}
