//! Traffic between two pods, each with a sidecar behind real iptables rules: an
//! unchanged client in the client pod reaches the server pod's apps through the
//! client sidecar (outbound) and the server sidecar (inbound), and both sidecars'
//! metrics show the hop.

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::Request;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use std::{convert::Infallible, time::Duration};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use trellis_tests::{
    apps::{self, pattern},
    grpc::echo_client,
    http::{collect, get, h2_client, send_h1, send_h2},
    mesh::{Mesh, BANNER_DETECTED, BANNER_OPAQUE, ECHO, GRPC, HTTP, RESET, WS},
    proto::{EchoRequest, StreamRequest},
    wait::{until, within},
};

#[tokio::test]
async fn http1_crosses_both_sidecars_with_hop_by_hop_headers_removed() {
    let mesh = Mesh::start(&[], &[]).await;
    let addr = mesh.server_addr(HTTP);
    let req = Request::get("/")
        .header("host", addr.to_string())
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "only for the first hop")
        .header("keep-alive", "timeout=5")
        .header("x-end-to-end", "kept")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (status, headers, body) = collect(send_h1(mesh.client_pod(), addr, req).await.unwrap())
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(body, "hello from server");
    assert_eq!(headers["x-seen-host"], addr.to_string().as_str());
    let seen = headers["x-seen-headers"].to_str().unwrap();
    assert!(seen.contains("x-end-to-end"), "{seen}");
    for hop in ["x-hop", "keep-alive", "connection"] {
        assert!(
            !seen.split(',').any(|h| h == hop),
            "{hop} crossed the proxy: {seen}"
        );
    }
    assert_eq!(mesh.hops("http1", "200").await, (1.0, 1.0));
}

#[tokio::test]
async fn http1_upstream_connections_are_pooled_across_client_connections() {
    let mesh = Mesh::start(&[], &[]).await;
    let addr = mesh.server_addr(HTTP);
    for _ in 0..5 {
        let (status, _, _) = get(mesh.client_pod(), addr, "/").await.unwrap();
        assert_eq!(status, 200);
    }
    let labels = |d| [("direction", d), ("protocol", "http1")];
    let client_conns = mesh
        .client
        .metrics()
        .await
        .sum("trellis_tcp_connections_total", &labels("outbound"));
    let server_conns = mesh
        .server
        .metrics()
        .await
        .sum("trellis_tcp_connections_total", &labels("inbound"));
    assert_eq!(
        client_conns, 5.0,
        "five client connections reach the client sidecar"
    );
    assert_eq!(
        server_conns, 1.0,
        "the client sidecar reuses one upstream connection"
    );
    assert_eq!(mesh.hops("http1", "200").await, (5.0, 5.0));
}

#[tokio::test]
async fn h2c_streams_cross_both_sidecars() {
    let mesh = Mesh::start(&[], &[]).await;
    let addr = mesh.server_addr(HTTP);
    let sender = h2_client(mesh.client_pod(), addr).await.unwrap();
    let requests = (0..10).map(|_| {
        let mut sender = sender.clone();
        async move {
            let req = Request::get(format!("http://{addr}/"))
                .version(http::Version::HTTP_2)
                .body(Full::new(Bytes::new()))
                .unwrap();
            collect(send_h2(&mut sender, req).await.unwrap())
                .await
                .unwrap()
        }
    });
    for (status, headers, body) in futures_util::future::join_all(requests).await {
        assert_eq!(status, 200);
        assert_eq!(body, "hello from server");
        assert_eq!(headers["x-seen-host"], addr.to_string().as_str());
    }
    assert_eq!(mesh.hops("http2", "200").await, (10.0, 10.0));
}

#[tokio::test]
async fn grpc_unary_and_server_streaming_keep_trailers() {
    let mesh = Mesh::start(&[], &[]).await;
    let mut client = echo_client(mesh.client_pod(), mesh.server_addr(GRPC))
        .await
        .unwrap();

    let reply = client
        .unary(EchoRequest {
            message: "hi".into(),
        })
        .await
        .unwrap();
    assert_eq!(reply.into_inner().message, "hi");

    // A stream that ends well: every message, then grpc-status 0 in trailers.
    let mut stream = client
        .server_stream(StreamRequest {
            message: "m".into(),
            count: 5,
            fail_with: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut indexes = Vec::new();
    while let Some(reply) = stream.message().await.unwrap() {
        indexes.push(reply.index);
    }
    assert_eq!(indexes, [0, 1, 2, 3, 4]);

    // A stream that ends in an error: the status and message arrive in trailers,
    // after the messages.
    let mut stream = client
        .server_stream(StreamRequest {
            message: "m".into(),
            count: 2,
            fail_with: "out of stock".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stream.message().await.unwrap().unwrap().index, 0);
    assert_eq!(stream.message().await.unwrap().unwrap().index, 1);
    let status = stream.message().await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert_eq!(status.message(), "out of stock");

    assert_eq!(mesh.hops("http2", "200").await, (3.0, 3.0));
}

#[tokio::test]
async fn websocket_upgrade_echoes_through_both_sidecars() {
    let mesh = Mesh::start(&[], &[]).await;
    let addr = mesh.server_addr(WS);
    let stream = mesh.client_pod().connect(addr).await.unwrap();
    within(Duration::from_secs(30), "the WebSocket exchange", async {
        let (mut ws, response) =
            tokio_tungstenite::client_async(format!("ws://{addr}/chat"), stream)
                .await
                .unwrap();
        assert_eq!(response.status(), 101);
        for text in ["one", "two", "three"] {
            ws.send(Message::text(text)).await.unwrap();
            let echoed = ws.next().await.unwrap().unwrap();
            assert_eq!(echoed.into_text().unwrap().as_str(), text);
        }
        ws.send(Message::binary(vec![0u8, 1, 2, 255]))
            .await
            .unwrap();
        assert_eq!(
            ws.next().await.unwrap().unwrap().into_data().as_ref(),
            [0u8, 1, 2, 255]
        );
        ws.close(None).await.unwrap();
    })
    .await;
    assert_eq!(mesh.hops("http1", "101").await, (1.0, 1.0));
}

#[tokio::test]
async fn opaque_tcp_echoes_through_both_sidecars() {
    let mesh = Mesh::start(&[], &[]).await;
    let mut stream = mesh
        .client_pod()
        .connect(mesh.server_addr(ECHO))
        .await
        .unwrap();
    stream.write_all(b"hello, opaque world\n").await.unwrap();
    let mut buf = [0u8; 20];
    within(
        Duration::from_secs(10),
        "the echo",
        stream.read_exact(&mut buf),
    )
    .await
    .unwrap();
    assert_eq!(&buf, b"hello, opaque world\n");
    stream.shutdown().await.unwrap();
    assert_eq!(
        within(
            Duration::from_secs(10),
            "the half-close",
            stream.read(&mut buf)
        )
        .await
        .unwrap(),
        0,
        "half-close crosses both proxies"
    );
    drop(stream);
    assert_eq!(mesh.opaque_hops().await, (1.0, 1.0));
    let bytes = mesh.server.metrics().await.sum(
        "trellis_tcp_bytes_total",
        &[("direction", "inbound"), ("flow", "client_to_server")],
    );
    assert_eq!(bytes, 20.0);
}

#[tokio::test]
async fn a_large_opaque_transfer_arrives_whole_and_is_counted_both_ways() {
    // Plain TCP on both sides of each sidecar: the bytes go by splice(2), in
    // chunks of at most a pipe's 64 KiB, while the echo sends them back.
    const SIZE: usize = 8 << 20;
    let mesh = Mesh::start(&[], &[]).await;
    let stream = mesh
        .client_pod()
        .connect(mesh.server_addr(ECHO))
        .await
        .unwrap();
    let (mut read, mut write) = stream.into_split();
    let sent: Vec<u8> = (0..SIZE).map(pattern).collect();
    let expected = sent.clone();
    let writer = async move {
        write.write_all(&sent).await?;
        write.shutdown().await
    };
    let reader = async move {
        let mut back = Vec::with_capacity(SIZE);
        read.read_to_end(&mut back).await?;
        std::io::Result::Ok(back)
    };
    let (written, back) = within(Duration::from_secs(60), "the echo of 8 MiB", async {
        tokio::join!(writer, reader)
    })
    .await;
    written.unwrap();
    let back = back.unwrap();
    assert_eq!(back.len(), SIZE, "the half-close came after every byte");
    assert!(back == expected, "the bytes came back as sent");
    for (sidecar, direction) in [(&mesh.client, "outbound"), (&mesh.server, "inbound")] {
        let metrics = sidecar.metrics().await;
        for flow in ["client_to_server", "server_to_client"] {
            let bytes = metrics.sum(
                "trellis_tcp_bytes_total",
                &[("direction", direction), ("flow", flow)],
            );
            assert_eq!(bytes, SIZE as f64, "{direction} {flow}");
        }
    }
}

#[tokio::test]
async fn server_first_protocol_on_an_opaque_port_is_not_delayed() {
    // Detection would hold a silent client for an hour: the banner arrives at all
    // only because the opaque port skips it (the deadline is a hang guard).
    let mesh = Mesh::start(&["--detect-timeout", "1h"], &["--detect-timeout", "1h"]).await;
    let mut stream = mesh
        .client_pod()
        .connect(mesh.server_addr(BANNER_OPAQUE))
        .await
        .unwrap();
    let mut banner = vec![0u8; apps::BANNER.len()];
    within(
        Duration::from_secs(30),
        "the banner (held back by protocol detection?)",
        stream.read_exact(&mut banner),
    )
    .await
    .unwrap();
    assert_eq!(banner, apps::BANNER);
    stream.write_all(b"QUIT\r\n").await.unwrap();
    let mut echo = [0u8; 6];
    within(
        Duration::from_secs(10),
        "the echo",
        stream.read_exact(&mut echo),
    )
    .await
    .unwrap();
    assert_eq!(&echo, b"QUIT\r\n");
    assert_eq!(mesh.opaque_hops().await, (1.0, 1.0));
}

#[tokio::test]
async fn silent_clients_are_proxied_as_opaque_after_the_detection_timeout() {
    let mesh = Mesh::start(
        &["--detect-timeout", "300ms"],
        &["--detect-timeout", "300ms"],
    )
    .await;

    // A client that says nothing at first, then talks: its bytes still arrive.
    // It stays silent until both sidecars have given up detecting and count its
    // connection as opaque.
    let mut stream = mesh
        .client_pod()
        .connect(mesh.server_addr(ECHO))
        .await
        .unwrap();
    until(
        Duration::from_secs(20),
        "both sidecars proxying the silent connection as opaque",
        || async {
            match mesh.opaque_hops().await {
                (1.0, 1.0) => Ok(()),
                hops => Err(format!("opaque connections (client, server): {hops:?}")),
            }
        },
    )
    .await;
    stream.write_all(b"PING").await.unwrap();
    let mut buf = [0u8; 4];
    within(
        Duration::from_secs(10),
        "the echo",
        stream.read_exact(&mut buf),
    )
    .await
    .unwrap();
    assert_eq!(&buf, b"PING");

    // A server-first protocol on a port nobody marked opaque: the banner comes
    // once both sidecars give up waiting for the client.
    let mut stream = mesh
        .client_pod()
        .connect(mesh.server_addr(BANNER_DETECTED))
        .await
        .unwrap();
    let mut banner = vec![0u8; apps::BANNER.len()];
    within(
        Duration::from_secs(20),
        "the banner",
        stream.read_exact(&mut banner),
    )
    .await
    .unwrap();
    assert_eq!(banner, apps::BANNER);
    assert_eq!(mesh.opaque_hops().await, (2.0, 2.0));
}

fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test]
async fn ten_mib_bodies_stream_both_ways_without_being_buffered() {
    const SIZE: usize = 10 * 1024 * 1024;
    let mesh = Mesh::start(&[], &[]).await;
    let addr = mesh.server_addr(HTTP);
    let rss_before = rss_kib(mesh.client.pid());

    // Upload, chunked (no content-length): the app reads it as a stream.
    let chunks = (0..SIZE).step_by(64 * 1024).map(|start| {
        let end = (start + 64 * 1024).min(SIZE);
        Ok::<_, Infallible>(Frame::data(Bytes::from(
            (start..end).map(pattern).collect::<Vec<_>>(),
        )))
    });
    let req = Request::post("/upload")
        .header("host", addr.to_string())
        .body(StreamBody::new(futures_util::stream::iter(chunks)))
        .unwrap();
    let (status, _, body) = collect(send_h1(mesh.client_pod(), addr, req).await.unwrap())
        .await
        .unwrap();
    assert_eq!(status, 200);
    let expected_sum = (0..SIZE).fold(0u64, |sum, i| {
        sum.wrapping_add((i as u64).wrapping_mul(u64::from(pattern(i))))
    });
    assert_eq!(body, format!("{SIZE} {expected_sum}"));

    // Download, read frame by frame and checked byte by byte.
    let req = Request::get(format!("/bytes/{SIZE}"))
        .header("host", addr.to_string())
        .body(Full::new(Bytes::new()))
        .unwrap();
    let mut body = send_h1(mesh.client_pod(), addr, req)
        .await
        .unwrap()
        .into_body();
    let mut received = 0usize;
    within(Duration::from_secs(60), "the 10 MiB download", async {
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.unwrap().into_data() {
                assert!(data
                    .iter()
                    .enumerate()
                    .all(|(i, b)| *b == pattern(received + i)));
                received += data.len();
            }
        }
    })
    .await;
    assert_eq!(received, SIZE);

    let grown = rss_kib(mesh.client.pid()).saturating_sub(rss_before);
    assert!(
        grown < 8 * 1024,
        "client sidecar grew by {grown} KiB moving 20 MiB: bodies were buffered"
    );
    assert_eq!(mesh.hops("http1", "200").await, (2.0, 2.0));
}

#[tokio::test]
async fn named_service_spreads_requests_over_its_endpoints() {
    // Ring hashing on a header: each user sticks to one endpoint, and the users
    // spread over both.
    let config = "services:
  - name: web
    namespace: shop
    port: 8080
    endpoints:
      - address: 198.18.0.3:8080
      - address: 198.18.0.3:8081
    policy:
      loadBalancer: {type: RingHash, hashOn: {header: x-user}}
";
    let mesh = Mesh::start_with_config(&[], &[], Some(config)).await;
    // The client dials some address and names the service in Host; the client
    // sidecar picks an endpoint.
    let addr = mesh.server_addr(HTTP);
    let mut served = std::collections::HashMap::new();
    for round in 0..2 {
        for user in 0..10 {
            let req = Request::get("/")
                .header("host", "web.shop:8080")
                .header("x-user", format!("user-{user}"))
                .body(Full::new(Bytes::new()))
                .unwrap();
            let (status, headers, _) =
                collect(send_h1(mesh.client_pod(), addr, req).await.unwrap())
                    .await
                    .unwrap();
            assert_eq!(status, 200);
            let app = headers["x-app"].to_str().unwrap().to_owned();
            let first = served.entry(user).or_insert_with(|| app.clone());
            assert_eq!(*first, app, "user-{user} moved endpoints in round {round}");
        }
    }
    let apps: std::collections::HashSet<_> = served.values().collect();
    assert_eq!(apps.len(), 2, "both endpoints serve some users: {served:?}");
    let metrics = mesh.client.metrics().await;
    assert_eq!(
        metrics.sum(
            "trellis_requests_total",
            &[("service", "web.shop:8080"), ("code", "200")]
        ),
        20.0
    );

    let (status, _, dump) = get(
        mesh.client_pod(),
        "127.0.0.1:15020".parse().unwrap(),
        "/config_dump",
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    let dump = String::from_utf8_lossy(&dump);
    assert!(dump.contains("\"198.18.0.3:8081\""), "{dump}");
    assert!(dump.contains("\"detectTimeout\": \"1s\""), "{dump}");
}

#[tokio::test]
async fn malformed_request_gets_400_and_the_proxy_keeps_serving() {
    let mesh = Mesh::start(&[], &[]).await;
    let addr = mesh.server_addr(HTTP);
    let mut stream = mesh.client_pod().connect(addr).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nthis is not a header\r\n\r\n")
        .await
        .unwrap();
    let mut response = Vec::new();
    within(
        Duration::from_secs(20),
        "an answer to a malformed request",
        stream.read_to_end(&mut response),
    )
    .await
    .unwrap();
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 400"), "{response}");

    let (status, _, body) = get(mesh.client_pod(), addr, "/").await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(body, "hello from server");
}

#[tokio::test]
async fn upstream_connect_failure_is_a_503_flagged_uf() {
    let mesh = Mesh::start(&[], &[]).await;
    // Nothing listens on this port in the server pod.
    let addr = mesh.server_addr(9999);
    let (status, headers, _) = get(mesh.client_pod(), addr, "/").await.unwrap();
    assert_eq!(status, 503);
    assert_eq!(headers["x-trellis-flags"], "UF");
    assert!(headers["x-trellis-error"]
        .to_str()
        .unwrap()
        .contains("9999"));
    let counted = mesh.server.metrics().await.sum(
        "trellis_requests_total",
        &[("direction", "inbound"), ("code", "503"), ("flags", "UF")],
    );
    assert_eq!(counted, 1.0);
    assert!(
        mesh.server.log().contains("upstream request failed"),
        "{}",
        mesh.server.log()
    );
}

#[tokio::test]
async fn upstream_reset_is_a_502_flagged_uc() {
    let mesh = Mesh::start(&[], &[]).await;
    let (status, headers, _) = get(mesh.client_pod(), mesh.server_addr(RESET), "/")
        .await
        .unwrap();
    assert_eq!(status, 502);
    assert_eq!(headers["x-trellis-flags"], "UC");
    let counted = mesh.server.metrics().await.sum(
        "trellis_requests_total",
        &[("direction", "inbound"), ("code", "502"), ("flags", "UC")],
    );
    assert_eq!(counted, 1.0);
    // The client sidecar passed the answer on as it came.
    let (client, _) = mesh.hops("http1", "502").await;
    assert_eq!(client, 1.0);
}

#[tokio::test]
async fn metric_labels_stay_bounded() {
    let mesh = Mesh::start(&[], &[]).await;
    let addr = mesh.server_addr(HTTP);
    for path in ["/a", "/b?user=1", "/c/d/e"] {
        get(mesh.client_pod(), addr, path).await.unwrap();
    }
    let metrics = mesh.client.metrics().await;
    let allowed = [
        "direction",
        "protocol",
        "service",
        "route",
        "backend",
        "code",
        "flags",
    ];
    let sets = metrics.label_sets("trellis_requests_total");
    assert!(!sets.is_empty());
    for labels in sets {
        for (key, value) in labels {
            assert!(
                allowed.contains(&key.as_str()),
                "unexpected label {key}={value}"
            );
            assert!(
                !value.contains('/') && !value.contains("198.18."),
                "unbounded value {key}={value}"
            );
        }
    }
}
