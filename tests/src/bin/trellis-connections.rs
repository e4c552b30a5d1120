//! The harness behind `benches/connections`: what 10 000 idle client connections
//! cost a pair of sidecars (client outbound, server inbound). Three kinds, each in
//! fresh pods: HTTP/1.1 keep-alive connections that made one request, HTTP/2
//! connections that made one request, and connections that never sent a byte
//! (taken as opaque TCP after detection, so each holds an upstream connection).
//! Prints each sidecar's RSS before and after, and the cost per connection.

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use std::{net::SocketAddr, time::Duration};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use trellis_tests::{
    apps,
    http::{get_with_host, h2_client, send_h2},
    netns::{Network, Pod},
    sidecar::{Options, Sidecar},
    wait::until,
};

const CONNECTIONS: usize = 10_000;
/// Silent connections hold two descriptors each in each sidecar (client and
/// upstream), and this bench's process holds both ends: 10 000 would pass a hard
/// open-files limit of 20 000, so they are measured at 9 000.
const SILENT_CONNECTIONS: usize = 9_000;
/// Connections opened at once.
const PARALLEL: usize = 64;

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Http1,
    Http2,
    Silent,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Http1 => "HTTP/1.1 keep-alive, after one request",
            Kind::Http2 => "HTTP/2, after one request",
            Kind::Silent => "silent (opaque after detection, an upstream each)",
        }
    }

    fn count(self) -> usize {
        match self {
            Kind::Silent => SILENT_CONNECTIONS,
            _ => CONNECTIONS,
        }
    }
}

/// What keeps one connection open (held, never read).
#[allow(dead_code)]
enum Held {
    Stream(tokio::net::TcpStream),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

async fn open(pod: &Pod, to: SocketAddr, kind: Kind) -> std::io::Result<Held> {
    match kind {
        Kind::Http1 => {
            let mut stream = pod.connect(to).await?;
            stream
                .write_all(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n")
                .await?;
            let mut seen = Vec::new();
            let mut buf = [0u8; 1024];
            while !seen.ends_with(b"hello from app") {
                let n = stream.read(&mut buf).await?;
                if n == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                seen.extend_from_slice(&buf[..n]);
            }
            Ok(Held::Stream(stream))
        }
        Kind::Http2 => {
            let mut sender = h2_client(pod, to).await.map_err(std::io::Error::other)?;
            let req = Request::get(format!("http://app:{}/", to.port()))
                .body(Full::new(Bytes::new()))
                .unwrap();
            let response = send_h2(&mut sender, req)
                .await
                .map_err(std::io::Error::other)?;
            if response.status() != 200 {
                return Err(std::io::Error::other(format!("{}", response.status())));
            }
            Ok(Held::H2(sender))
        }
        Kind::Silent => Ok(Held::Stream(pod.connect(to).await?)),
    }
}

/// Open connections the client's outbound listener counts.
async fn open_outbound(client: &Sidecar) -> f64 {
    client
        .metrics()
        .await
        .sum("trellis_tcp_connections_open", &[("direction", "outbound")])
}

struct Row {
    kind: Kind,
    client: (u64, u64),
    server: (u64, u64),
}

async fn measure(kind: Kind) -> Row {
    let net = Network::new(2);
    let _app = apps::http_app(net.pod(1).listen(8080), "app");
    // Idle HTTP/1 connections are otherwise closed after the header read
    // timeout (10 s), before all 10 000 are open.
    // And the listener limit (--max-connections, 10 000) leaves room for the
    // request that checks the pair still serves.
    let args = [
        "--header-read-timeout",
        "600s",
        "--max-connections",
        "10100",
    ];
    let options = || Options {
        run_args: &args,
        ..Default::default()
    };
    let server = Sidecar::start(net.pod(1), options()).await;
    let client = Sidecar::start(net.pod(0), options()).await;
    let to = SocketAddr::from((net.pod(1).ip, 8080));
    let pod = net.pod(0).clone();
    get_with_host(&pod, to, "/", "app").await.expect("warm up");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = (client.rss_kib(), server.rss_kib());

    let count = kind.count();
    let mut held = Vec::with_capacity(count);
    while held.len() < count {
        let batch = PARALLEL.min(count - held.len());
        let opening = (0..batch).map(|_| {
            let pod = pod.clone();
            tokio::spawn(async move {
                tokio::time::timeout(Duration::from_secs(30), open(&pod, to, kind)).await
            })
        });
        for task in opening.collect::<Vec<_>>() {
            match task.await.expect("open task") {
                Ok(Ok(connection)) => held.push(connection),
                Ok(Err(error)) => panic!("connection {}: {error}", held.len()),
                Err(_) => panic!("connection {} not open within 30 s", held.len()),
            }
        }
    }
    until(
        Duration::from_secs(60),
        "every connection counted open",
        || async {
            match open_outbound(&client).await {
                n if n >= count as f64 => Ok(()),
                n => Err(format!("{n} open")),
            }
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = (client.rss_kib(), server.rss_kib());
    // Still serving.
    let (status, _, _) = get_with_host(&pod, to, "/", "app").await.expect("served");
    assert_eq!(status, 200);
    drop(held);
    Row {
        kind,
        client: (before.0, after.0),
        server: (before.1, after.1),
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn per_connection(before: u64, after: u64, count: usize) -> f64 {
    after.saturating_sub(before) as f64 / count as f64
}

#[tokio::main]
async fn main() {
    trellis_tests::netns::clean_up_on_panic();
    // The client ends of every connection are here, and for silent ones the
    // app's ends too; the sidecars inherit the limit and raise theirs the same way.
    let limit = rlimit::increase_nofile_limit(u64::MAX).expect("raise the open-files limit");
    assert!(
        limit >= 2 * SILENT_CONNECTIONS as u64 + 1024,
        "open-files limit {limit} is too low"
    );
    let mut rows = Vec::new();
    for kind in [Kind::Http1, Kind::Http2, Kind::Silent] {
        eprintln!("measuring {} ...", kind.name());
        rows.push(measure(kind).await);
    }
    println!("Idle client connections through the client's outbound sidecar to the server's inbound one\n");
    println!("| connections | count | client RSS before → after MiB | KiB per connection | server RSS before → after MiB | KiB per connection |");
    println!("|---|---|---|---|---|---|");
    for row in rows {
        println!(
            "| {} | {} | {:.1} → {:.1} | {:.1} | {:.1} → {:.1} | {:.1} |",
            row.kind.name(),
            row.kind.count(),
            mib(row.client.0),
            mib(row.client.1),
            per_connection(row.client.0, row.client.1, row.kind.count()),
            mib(row.server.0),
            mib(row.server.1),
            per_connection(row.server.0, row.server.1, row.kind.count()),
        );
    }
}
