//! Graceful shutdown: SIGTERM or `POST /shutdown` stops new work, lets what is in
//! flight finish, and exits 0 within the drain time.

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::Request;
use http_body_util::Full;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use trellis_tests::{
    http::{collect, get, h2_client, send_h1, send_h2},
    mesh::{Mesh, ECHO, HTTP, WS},
    sidecar::admin,
    wait::within,
};

#[tokio::test]
async fn sigterm_lets_in_flight_requests_finish_then_exits_zero() {
    let mesh = Mesh::start(&["--drain-timeout", "10s"], &["--drain-timeout", "10s"]).await;
    let addr = mesh.server_addr(HTTP);
    let pod = mesh.client_pod().clone();

    // Each request takes 1.5 s at the app: long enough to be in flight at both
    // sidecars when they are told to stop.
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
            (http::Version::HTTP_11, status, headers, body)
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
            let (status, headers, body) =
                collect(send_h2(&mut h2, req).await.unwrap()).await.unwrap();
            (http::Version::HTTP_2, status, headers, body)
        }));
    }
    // Every request has crossed both sidecars and reached the app: stop both.
    let at_app = mesh
        .app(HTTP)
        .until_in_flight(8, "all 8 requests at the app");
    at_app.await;
    mesh.client.terminate();
    mesh.server.terminate();

    for request in in_flight {
        let (version, status, headers, body) = request.await.unwrap();
        assert_eq!(
            (status.as_u16(), &body[..]),
            (200, &b"slow done"[..]),
            "{version:?}"
        );
        if version == http::Version::HTTP_11 {
            // The client sidecar answers on its own connection with the client:
            // during a drain it says that connection is done.
            assert_eq!(
                headers.get("connection").map(|v| v.as_bytes()),
                Some(&b"close"[..]),
                "HTTP/1 responses during drain close the connection: {headers:?}"
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
    // The echo proves the connection is open through both sidecars.
    stream.write_all(b"hold").await.unwrap();
    let mut echoed = [0u8; 4];
    within(
        Duration::from_secs(10),
        "the echo through both sidecars",
        stream.read_exact(&mut echoed),
    )
    .await
    .unwrap();
    assert_eq!(&echoed, b"hold");
    let start = Instant::now();
    mesh.client.terminate();
    // Opaque bytes carry no signal to stop, so the drain waits for the
    // connection, up to the drain timeout (never less), then exits 0.
    assert_eq!(
        mesh.client.wait_exit(Duration::from_secs(10)).await.code(),
        Some(0)
    );
    assert!(
        start.elapsed() >= Duration::from_millis(500),
        "exited {:?} after SIGTERM, before the 500 ms drain timeout",
        start.elapsed()
    );
    // The connection went with the proxy.
    let mut rest = Vec::new();
    let read = within(
        Duration::from_secs(10),
        "the held connection to close",
        stream.read_to_end(&mut rest),
    )
    .await;
    assert!(
        read.is_err() || rest.is_empty(),
        "{read:?}: {rest:?} after the proxy exited"
    );
}

#[tokio::test]
async fn an_open_websocket_holds_the_drain_until_it_closes() {
    let mut mesh = Mesh::start(&["--drain-timeout", "60s"], &[]).await;
    let addr = mesh.server_addr(WS);
    let stream = mesh.client_pod().connect(addr).await.unwrap();
    let limit = Duration::from_secs(30);
    let (mut ws, response) = within(
        limit,
        "the WebSocket handshake",
        tokio_tungstenite::client_async(format!("ws://{addr}/chat"), stream),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), 101);
    for text in ["before", "after SIGTERM", "and again"] {
        if text == "after SIGTERM" {
            // Told to stop, the client's sidecar keeps the upgraded stream, as it
            // keeps an opaque connection: it has no way to ask the peers to finish.
            mesh.client.terminate();
        }
        ws.send(Message::text(text)).await.unwrap();
        let echoed = within(limit, "the echo", ws.next()).await.unwrap().unwrap();
        assert_eq!(echoed.into_text().unwrap().as_str(), text);
    }

    // Once the WebSocket closes there is nothing left to wait for: the proxy exits
    // 0, long before its 60 s drain timeout.
    within(limit, "the close", ws.close(None)).await.unwrap();
    while let Some(Ok(frame)) = within(limit, "the server's close", ws.next()).await {
        assert!(frame.is_close(), "{frame:?} after the close");
    }
    drop(ws);
    assert_eq!(mesh.client.wait_exit(limit).await.code(), Some(0));
}
