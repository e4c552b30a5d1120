//! Hostile HTTP/2, frame by frame, through both sidecars (a meshed client's
//! outbound, and an outsider straight to the server's inbound): each abuse is
//! bounded, the offending connection is closed with the GOAWAY code that says why
//! (or only the offending stream is refused, where HTTP/2 says so), everyone else
//! keeps being served, and the proxy's memory stays bounded.

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use std::{net::SocketAddr, time::Duration};
use trellis_tests::{
    apps,
    h2frames::{self, frame, get, reset, RawH2},
    http::{collect, get_with_host, h2_client, send_h2},
    netns::{Network, Pod},
    sidecar::{Options, Sidecar},
    wait::until,
};

const LIMIT: Duration = Duration::from_secs(20);

/// How much a proxy's RSS may grow over one abuse case. Generous: it is there to
/// catch growth with the size of the abuse (a queue without a bound), which would
/// be hundreds of MiB at these sizes.
const RSS_GROWTH_KIB: u64 = 24 * 1024;

struct Mesh {
    net: Network,
    _app: apps::App,
    server: Sidecar,
    client: Sidecar,
}

impl Mesh {
    /// Pods: a meshed client (0), the server with its app on 8080 (1), an
    /// outsider without a sidecar (2).
    async fn start() -> Mesh {
        let net = Network::new(3);
        let _app = apps::http_app(net.pod(1).listen(8080), "app");
        let server = Sidecar::start(net.pod(1), Options::default()).await;
        let client = Sidecar::start(net.pod(0), Options::default()).await;
        Mesh {
            net,
            _app,
            server,
            client,
        }
    }

    fn to(&self) -> SocketAddr {
        SocketAddr::from((self.net.pod(1).ip, 8080))
    }

    /// Who sends the abuse, the sidecar that takes it first, and its direction.
    fn senders(&self) -> [(&Pod, &Sidecar, &'static str); 2] {
        [
            (self.net.pod(0), &self.client, "outbound"),
            (self.net.pod(2), &self.server, "inbound"),
        ]
    }

    /// Runs `case` once each way, checking that others are served after it and
    /// that the sidecar that took it stayed within [`RSS_GROWTH_KIB`]. What the
    /// case returns (a connection it still holds) is dropped after the checks.
    async fn each_way<F, Fut, Held>(&self, what: &str, case: F)
    where
        F: Fn(Pod, SocketAddr, &'static str) -> Fut,
        Fut: std::future::Future<Output = Held>,
    {
        for (pod, sidecar, direction) in self.senders() {
            let before = sidecar.rss_kib();
            let held = case(pod.clone(), self.to(), direction).await;
            served(pod, self.to()).await;
            sidecar.assert_rss_bounded(&format!("{direction}, {what}"), before, RSS_GROWTH_KIB);
            drop(held);
        }
    }
}

/// Others are still served: HTTP/1.1, and HTTP/2 on a new connection.
async fn served(pod: &Pod, to: SocketAddr) {
    let (status, _, _) = get_with_host(pod, to, "/", "app").await.expect("HTTP/1.1");
    assert_eq!(status, 200, "HTTP/1.1 still served");
    let mut h2 = h2_client(pod, to).await.expect("an HTTP/2 connection");
    let req = Request::get(format!("http://app:{}/", to.port()))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (status, _, body) = collect(send_h2(&mut h2, req).await.expect("HTTP/2"))
        .await
        .expect("an HTTP/2 body");
    assert_eq!(status, 200, "HTTP/2 still served");
    assert_eq!(body, "hello from app");
}

impl Mesh {
    /// Waits (bounded) until each sidecar counted at least `n` HTTP/2 connections
    /// closed for a protocol violation.
    async fn counted(&self, n: f64) {
        for (_, sidecar, direction) in self.senders() {
            until(LIMIT, "HTTP/2 violations counted", || async {
                let counted = sidecar.metrics().await.sum(
                    "trellis_http_errors_total",
                    &[("direction", direction), ("kind", "http2")],
                );
                match counted >= n {
                    true => Ok(()),
                    false => Err(format!("{direction}: {counted} counted")),
                }
            })
            .await;
        }
    }
}

/// Writes `frames` over and over until `total` were sent or the server closed.
async fn flood(raw: &mut RawH2, frames: &[u8], times: usize) {
    for _ in 0..times {
        if raw.send(frames).await.is_err() {
            return;
        }
    }
}

#[tokio::test]
async fn rapid_reset_is_answered_with_enhance_your_calm() {
    let mesh = Mesh::start().await;
    mesh.each_way("rapid reset", |pod, to, direction| async move {
        let mut raw = RawH2::connect(&pod, to).await.unwrap();
        let block = get("app", "/");
        // Streams opened and cancelled at once, 10 000 of them, in batches.
        for batch in 0..100u32 {
            let mut bytes = Vec::new();
            for i in 0..100u32 {
                let stream = 2 * (batch * 100 + i) + 1;
                bytes.extend(h2frames::requests(&block, stream, 1));
                bytes.extend(reset(stream, h2frames::CANCEL));
            }
            if raw.send(&bytes).await.is_err() {
                break;
            }
        }
        assert_eq!(
            raw.goaway(LIMIT).await,
            Ok(h2frames::ENHANCE_YOUR_CALM),
            "{direction}"
        );
    })
    .await;
    mesh.counted(1.0).await;
}

/// Sends `opening`, then `one` frame 100 000 times (or until the server closes);
/// the server must close with GOAWAY ENHANCE_YOUR_CALM.
async fn calmed(pod: &Pod, to: SocketAddr, what: &str, opening: &[u8], one: &[u8]) {
    let mut raw = RawH2::connect(pod, to).await.unwrap();
    raw.send(opening).await.unwrap();
    flood(&mut raw, &one.repeat(1000), 100).await;
    assert_eq!(
        raw.goaway(LIMIT).await,
        Ok(h2frames::ENHANCE_YOUR_CALM),
        "{what}"
    );
}

#[tokio::test]
async fn streams_past_the_concurrency_limit_are_refused_one_by_one() {
    let mesh = Mesh::start().await;
    mesh.each_way("101 concurrent streams", |pod, to, direction| async move {
        let mut raw = RawH2::connect(&pod, to).await.unwrap();
        // 101 slow requests at once; --http2-max-concurrent-streams is 100.
        let bytes = h2frames::requests(&get("app", "/slow/1000"), 1, 101);
        raw.send(&bytes).await.unwrap();
        let (mut refused, mut answered) = (Vec::new(), 0);
        while answered + refused.len() < 101 {
            let Some(frame) = raw
                .next_where(LIMIT, |f| {
                    f.kind == h2frames::HEADERS || f.kind == h2frames::RST_STREAM
                })
                .await
            else {
                panic!("{direction}: {answered} answered, {refused:?} refused, then nothing");
            };
            match frame.kind {
                // `:status: 200` is entry 8 of the static table.
                h2frames::HEADERS => {
                    assert_eq!(frame.payload.first(), Some(&0x88), "{direction}: {frame:?}");
                    answered += 1;
                }
                _ => refused.push((frame.stream, frame.code())),
            }
        }
        assert_eq!(
            refused,
            [(201, Some(h2frames::REFUSED_STREAM))],
            "{direction}"
        );
        assert_eq!(answered, 100, "{direction}");
        // The connection itself goes on.
        raw.send(&h2frames::requests(&get("app", "/"), 203, 1))
            .await
            .unwrap();
        let next = raw.next_where(LIMIT, |f| f.kind == h2frames::HEADERS).await;
        assert_eq!(
            next.map(|f| (f.stream, f.payload[0])),
            Some((203, 0x88)),
            "{direction}"
        );
    })
    .await;
}

#[tokio::test]
async fn an_oversized_header_list_gets_431_and_the_connection_goes_on() {
    let mesh = Mesh::start().await;
    mesh.each_way("oversized header list", |pod, to, direction| async move {
        let mut h2 = h2_client(&pod, to).await.unwrap();
        // Over --max-header-bytes (64 KiB).
        let req = Request::get(format!("http://app:{}/", to.port()))
            .header("x-big", "a".repeat(70_000))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let status = send_h2(&mut h2, req).await.map(|r| r.status().as_u16());
        assert_eq!(status.ok(), Some(431), "{direction}");
        let req = Request::get(format!("http://app:{}/", to.port()))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let status = send_h2(&mut h2, req).await.map(|r| r.status().as_u16());
        assert_eq!(
            status.ok(),
            Some(200),
            "{direction}: the same connection goes on"
        );
    })
    .await;
}

#[tokio::test]
async fn a_flow_control_window_past_its_maximum_is_a_flow_control_error() {
    let mesh = Mesh::start().await;
    mesh.each_way("window overflow", |pod, to, direction| async move {
        let mut raw = RawH2::connect(&pod, to).await.unwrap();
        // 65 535 + 2^31 - 1 is past the largest window HTTP/2 allows.
        raw.send(&frame(
            h2frames::WINDOW_UPDATE,
            0,
            0,
            &0x7fff_ffffu32.to_be_bytes(),
        ))
        .await
        .unwrap();
        assert_eq!(
            raw.goaway(LIMIT).await,
            Ok(h2frames::FLOW_CONTROL_ERROR),
            "{direction}"
        );
    })
    .await;
}

#[tokio::test]
async fn a_client_that_never_opens_its_window_holds_no_more_than_its_streams() {
    let mesh = Mesh::start().await;
    mesh.each_way(
        "100 streams of 16 MiB, window never opened",
        |pod, to, direction| async move {
            let mut raw = RawH2::connect(&pod, to).await.unwrap();
            // SETTINGS_INITIAL_WINDOW_SIZE (0x4) = 0: no response byte may be sent.
            let mut zero = 0x4u16.to_be_bytes().to_vec();
            zero.extend(0u32.to_be_bytes());
            raw.send(&frame(h2frames::SETTINGS, 0, 0, &zero))
                .await
                .unwrap();
            let bytes = h2frames::requests(&get("app", "/bytes/16777216"), 1, 100);
            raw.send(&bytes).await.unwrap();
            // Headers are not flow controlled: all 100 answer, then no DATA flows.
            let mut answered = 0;
            while answered < 100 {
                let frame = raw.next(LIMIT).await;
                match frame {
                    Some(f) if f.kind == h2frames::HEADERS => answered += 1,
                    Some(f) if f.kind == h2frames::DATA => {
                        assert!(f.payload.is_empty(), "{direction}: DATA past a zero window")
                    }
                    Some(_) => {}
                    None => panic!("{direction}: {answered} of 100 answered"),
                }
            }
            // Held (1.6 GiB asked for) while RSS is read and others are served.
            raw
        },
    )
    .await;
}

#[tokio::test]
async fn floods_of_frames_are_answered_with_enhance_your_calm() {
    let mesh = Mesh::start().await;
    // POST /upload (:method POST is static entry 3), its body still to come.
    let mut post = get("app", "/upload");
    post[0] = 0x83;
    let floods = [
        (
            "empty DATA flood",
            frame(h2frames::HEADERS, h2frames::END_HEADERS, 1, &post),
            frame(h2frames::DATA, 0, 1, &[]),
        ),
        (
            // A header block that never ends.
            "CONTINUATION flood",
            frame(h2frames::HEADERS, h2frames::END_STREAM, 1, &get("app", "/")),
            frame(h2frames::CONTINUATION, 0, 1, &[]),
        ),
        (
            "PING flood",
            Vec::new(),
            frame(h2frames::PING, 0, 0, &[7; 8]),
        ),
        (
            "SETTINGS flood",
            Vec::new(),
            frame(h2frames::SETTINGS, 0, 0, &[]),
        ),
    ];
    for (what, opening, one) in &floods {
        mesh.each_way(what, |pod, to, direction| async move {
            calmed(&pod, to, &format!("{direction}, {what}"), opening, one).await;
        })
        .await;
    }
    // Each flood closed and counted, each way.
    mesh.counted(floods.len() as f64).await;
}
