//! Hostile HTTP/1 input, slow clients and too many connections, through both
//! sidecars (a meshed client's outbound, and an outsider straight to the
//! server's inbound). Each bad request gets a clear 4xx or a close, is counted,
//! never reaches the app, and the proxy keeps serving everyone else.

use std::{net::SocketAddr, time::Duration};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use trellis_tests::{
    apps,
    http::get_with_host,
    netns::{Network, Pod},
    sidecar::{Options, Sidecar},
    wait::until,
};

const LIMIT: Duration = Duration::from_secs(20);

/// How much a proxy's RSS may grow over one case: enough for what a few
/// connections need, far below what an unbounded buffer would take.
const RSS_GROWTH_KIB: u64 = 16 * 1024;

/// Sends `bytes` on a new connection from `pod` to `to` and returns all it reads
/// back until the other side closes (bounded: 10 s).
async fn exchange(pod: &Pod, to: SocketAddr, bytes: &[u8]) -> String {
    let mut stream = pod.connect(to).await.expect("connect");
    stream.write_all(bytes).await.expect("write");
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer));
    match read.await {
        Ok(_) => String::from_utf8_lossy(&answer).into_owned(),
        Err(_) => format!(
            "(still open after 10 s) {}",
            String::from_utf8_lossy(&answer)
        ),
    }
}

/// A normal request from `pod` to the app: 200.
async fn served(pod: &Pod, to: SocketAddr) {
    let (status, _, _) = get_with_host(pod, to, "/", "app")
        .await
        .expect("a normal request");
    assert_eq!(status, 200, "others are still served");
}

/// The requests that must not pass, and the status line each gets.
const BAD: [(&str, &[u8], &str); 7] = [
    // (A first line detection cannot take for HTTP goes on as opaque bytes, as
    // any other protocol would: the proxy cannot tell them apart.)
    (
        "a header line without a colon",
        b"GET / HTTP/1.1\r\nHost: app\r\nNo colon here\r\n\r\n",
        "HTTP/1.1 400",
    ),
    (
        "conflicting Content-Length",
        b"POST / HTTP/1.1\r\nHost: app\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        "HTTP/1.1 400",
    ),
    (
        "malformed Content-Length",
        b"POST / HTTP/1.1\r\nHost: app\r\nContent-Length: 5x\r\n\r\nhello",
        "HTTP/1.1 400",
    ),
    (
        "obs-fold",
        b"GET / HTTP/1.1\r\nHost: app\r\nX-Folded: a\r\n b\r\n\r\n",
        "HTTP/1.1 400",
    ),
    (
        "NUL in a header",
        b"GET / HTTP/1.1\r\nHost: app\r\nX-Nul: a\x00b\r\n\r\n",
        "HTTP/1.1 400",
    ),
    (
        "bare CR in a header",
        b"GET / HTTP/1.1\r\nHost: app\r\nX-Cr: a\rb\r\n\r\n",
        "HTTP/1.1 400",
    ),
    (
        "bad chunk encoding",
        b"POST / HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        "HTTP/1.1 400",
    ),
];

#[tokio::test]
async fn bad_requests_get_a_clear_answer_and_never_reach_the_app() {
    // Pods: client (0) and server (1) with sidecars, an outsider (2) without.
    let net = Network::new(3);
    let app = apps::http_app(net.pod(1).listen(8080), "app");
    let server = Sidecar::start(net.pod(1), Options::default()).await;
    let client = Sidecar::start(net.pod(0), Options::default()).await;
    let to = SocketAddr::from((net.pod(1).ip, 8080));
    for (sender, sidecar, direction) in [
        (net.pod(0), &client, "outbound"),
        (net.pod(2), &server, "inbound"),
    ] {
        let before = sidecar.rss_kib();
        for (what, bytes, status) in BAD {
            let answer = exchange(sender, to, bytes).await;
            assert!(
                answer.starts_with(status) && !answer.contains("still open"),
                "{direction}, {what}: {answer:?}"
            );
            assert!(
                !answer.contains("200 OK"),
                "{direction}, {what} reached the app: {answer}"
            );
            served(sender, to).await;
        }
        // Content-Length with Transfer-Encoding, the classic smuggling attempt:
        // the body is read as chunked (Transfer-Encoding wins, RFC 9112 6.3),
        // Content-Length is dropped, and the connection is closed after the
        // answer, so what follows the chunked body is never read as a request.
        let answer = exchange(
            sender,
            to,
            b"POST /te HTTP/1.1\r\nHost: app\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: app\r\n\r\n",
        )
        .await;
        assert!(
            answer.contains("connection: close"),
            "{direction}: {answer:?}"
        );
        assert!(
            answer.contains("x-seen-headers: host,transfer-encoding\r\n"),
            "{direction}: {answer:?}"
        );
        // Status lines, wherever a second one would start (the app's
        // x-seen-version header says HTTP/1.1 too, without the space).
        assert_eq!(
            answer.matches("HTTP/1.1 ").count(),
            1,
            "{direction}: one answer: {answer:?}"
        );
        served(sender, to).await;
        // An oversized request head (over --max-header-bytes, 64 KiB).
        let mut huge = b"GET / HTTP/1.1\r\nHost: app\r\nX-Big: ".to_vec();
        huge.extend(std::iter::repeat_n(b'a', 70_000));
        huge.extend(b"\r\n\r\n");
        let answer = exchange(sender, to, &huge).await;
        assert!(
            answer.starts_with("HTTP/1.1 431"),
            "{direction}, huge head: {answer:?}"
        );
        served(sender, to).await;
        sidecar.assert_rss_bounded(
            &format!("{direction}, malformed, smuggling and oversized HTTP/1"),
            before,
            RSS_GROWTH_KIB,
        );
        // Counted once each connection has ended: six malformed heads, one too
        // large; the bad body is a request the proxy answered (flag DPE).
        until(LIMIT, "the bad requests counted", || async {
            let metrics = sidecar.metrics().await;
            let counted = |kind| {
                metrics.sum(
                    "trellis_http_errors_total",
                    &[("direction", direction), ("kind", kind)],
                )
            };
            let dpe = metrics.sum(
                "trellis_requests_total",
                &[("direction", direction), ("flags", "DPE")],
            );
            match (counted("malformed"), counted("too_large"), dpe) {
                (6.0, 1.0, 1.0) => Ok(()),
                other => Err(format!(
                    "{direction}: (malformed, too_large, DPE) = {other:?}"
                )),
            }
        })
        .await;
    }
    // Only the normal requests and the chunked one reached the app; nothing
    // smuggled and none of the bad ones did.
    let seen = app.requests();
    assert!(
        seen.iter().all(|path| path == "/" || path == "/te"),
        "the app saw only normal requests: {seen:?}"
    );
}

#[tokio::test]
async fn a_slow_client_is_cut_off_without_delaying_others() {
    let net = Network::new(2);
    let _app = apps::http_app(net.pod(1).listen(8080), "app");
    let args = ["--header-read-timeout", "1s"];
    let _server = Sidecar::start(net.pod(1), Options::default()).await;
    let client = Sidecar::start(
        net.pod(0),
        Options {
            run_args: &args,
            ..Default::default()
        },
    )
    .await;
    let to = SocketAddr::from((net.pod(1).ip, 8080));
    let before = client.rss_kib();
    // Slowloris: a request head that never ends.
    let mut slow = net.pod(0).connect(to).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: app\r\nX-Slow: ")
        .await
        .unwrap();
    served(net.pod(0), to).await;
    let mut rest = Vec::new();
    let cut = tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut rest)).await;
    assert!(cut.is_ok(), "the slow client was disconnected");
    until(LIMIT, "the timeout counted", || async {
        let timeouts = client.metrics().await.sum(
            "trellis_http_errors_total",
            &[("direction", "outbound"), ("kind", "timeout")],
        );
        if timeouts >= 1.0 {
            Ok(())
        } else {
            Err(format!("{timeouts} timeouts"))
        }
    })
    .await;
    client.assert_rss_bounded("outbound, slowloris", before, RSS_GROWTH_KIB);
}

#[tokio::test]
async fn a_stalled_request_body_is_cut_with_408_without_delaying_others() {
    let net = Network::new(3);
    let _app = apps::http_app(net.pod(1).listen(8080), "app");
    // The client's sidecar cuts first on the way out; the server's on the way in.
    let (client_args, server_args) = (
        ["--request-idle-timeout", "1s"],
        ["--request-idle-timeout", "2s"],
    );
    let server = Sidecar::start(
        net.pod(1),
        Options {
            run_args: &server_args,
            ..Default::default()
        },
    )
    .await;
    let client = Sidecar::start(
        net.pod(0),
        Options {
            run_args: &client_args,
            ..Default::default()
        },
    )
    .await;
    let to = SocketAddr::from((net.pod(1).ip, 8080));
    for (sender, sidecar, direction) in [
        (net.pod(0), &client, "outbound"),
        (net.pod(2), &server, "inbound"),
    ] {
        let before = sidecar.rss_kib();
        // Ten bytes of a hundred, then nothing.
        let mut stalled = sender.connect(to).await.unwrap();
        stalled
            .write_all(
                b"POST /upload HTTP/1.1\r\nHost: app\r\nContent-Length: 100\r\n\r\nonly ten b",
            )
            .await
            .unwrap();
        served(sender, to).await;
        let mut answer = Vec::new();
        let read = tokio::time::timeout(LIMIT, stalled.read_to_end(&mut answer)).await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            read.is_ok() && answer.starts_with("HTTP/1.1 408"),
            "{direction}: {answer:?}"
        );
        assert!(
            answer.contains("x-trellis-flags: SI\r\n"),
            "{direction}: {answer:?}"
        );
        let cut = sidecar.metrics().await.sum(
            "trellis_requests_total",
            &[("direction", direction), ("flags", "SI")],
        );
        assert_eq!(cut, 1.0, "{direction}: counted with flag SI");
        sidecar.assert_rss_bounded(
            &format!("{direction}, stalled request body"),
            before,
            RSS_GROWTH_KIB,
        );
    }
}

#[tokio::test]
async fn a_listener_at_its_connection_limit_closes_new_connections_at_once() {
    let net = Network::new(2);
    let _app = apps::http_app(net.pod(1).listen(8080), "app");
    let args = ["--max-connections", "3"];
    let server = Sidecar::start(
        net.pod(1),
        Options {
            run_args: &args,
            ..Default::default()
        },
    )
    .await;
    let to = SocketAddr::from((net.pod(1).ip, 8080));
    let before = server.rss_kib();
    // The outsider (pod 0, no sidecar) holds three connections open.
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut stream = net.pod(0).connect(to).await.unwrap();
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n")
            .await
            .unwrap();
        let mut first = [0u8; 12];
        stream.read_exact(&mut first).await.unwrap();
        assert_eq!(&first, b"HTTP/1.1 200");
        held.push(stream);
    }
    // The fourth is closed at once, and counted.
    let answer = exchange(net.pod(0), to, b"GET / HTTP/1.1\r\nHost: app\r\n\r\n").await;
    assert_eq!(answer, "", "closed without an answer");
    let refused = server.metrics().await.sum(
        "trellis_connections_refused_total",
        &[("direction", "inbound")],
    );
    assert_eq!(refused, 1.0);
    // Once one closes, there is room again.
    drop(held.pop());
    until(LIMIT, "room for a new connection", || async {
        match get_with_host(net.pod(0), to, "/", "app").await {
            Ok((status, _, _)) if status == 200 => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    server.assert_rss_bounded("inbound, connection limit", before, RSS_GROWTH_KIB);
}

/// An app on `port` of `pod` that reads a request head and answers `answer`
/// (`None`: never answers, holding the connection).
fn raw_app(pod: &Pod, port: u16, answer: Option<Vec<u8>>) -> tokio::task::JoinHandle<()> {
    let listener = pod.listen(port);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let answer = answer.clone();
            tokio::spawn(async move {
                let mut head = vec![0u8; 4096];
                let _ = stream.read(&mut head).await;
                match answer {
                    Some(answer) => {
                        let _ = stream.write_all(&answer).await;
                        let _ = stream.shutdown().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            });
        }
    })
}

#[tokio::test]
async fn an_upstream_that_misbehaves_gets_the_client_a_clear_answer_not_a_hang() {
    let net = Network::new(2);
    let server_pod = net.pod(1);
    let mut huge = b"HTTP/1.1 200 OK\r\nX-Big: ".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 1 << 20));
    huge.extend(b"\r\nContent-Length: 0\r\n\r\n");
    let apps = [
        raw_app(
            server_pod,
            9001,
            Some(b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n".to_vec()),
        ),
        raw_app(server_pod, 9002, Some(huge)),
        raw_app(server_pod, 9003, None),
        raw_app(server_pod, 9004, Some(b"SMTP ready\r\n".to_vec())),
    ];
    let args = ["--response-headers-timeout", "1s"];
    let _server = Sidecar::start(
        server_pod,
        Options {
            run_args: &args,
            ..Default::default()
        },
    )
    .await;
    let client = Sidecar::start(net.pod(0), Options::default()).await;
    let before = client.rss_kib();
    let client_pod = net.pod(0);
    let call = |port: u16| {
        let to = SocketAddr::from((server_pod.ip, port));
        async move {
            let (status, headers, _) = get_with_host(client_pod, to, "/", "app").await.unwrap();
            let flags = headers
                .get("x-trellis-flags")
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default();
            (status.as_u16(), flags)
        }
    };
    assert_eq!(
        call(9001).await,
        (502, "UC".to_owned()),
        "a malformed response"
    );
    assert_eq!(
        call(9002).await,
        (502, "UC".to_owned()),
        "a 1 MiB response head"
    );
    assert_eq!(call(9003).await, (504, "UT".to_owned()), "no answer at all");
    assert_eq!(call(9004).await, (502, "UC".to_owned()), "not HTTP");
    client.assert_rss_bounded("outbound, misbehaving upstreams", before, RSS_GROWTH_KIB);
    drop(apps);
}
