//! Control-plane scale: a mesh of 1 000 services, 10 000 endpoints and 1 000 routes,
//! served to 1 000 proxy streams (`BENCH_PROXIES`; simulated in this process, each
//! ACKing what it gets and reconnecting when its stream breaks, as a proxy does,
//! without decoding the resources, which a real proxy does on its own cores),
//! by the real `trellis-control-plane --local` binary.
//!
//! Prints: the control plane's RSS (now and at its peak) and CPU to translate the
//! mesh and push it whole to every stream; then, for one EndpointSlice change
//! written to the directory, the time from the write to each stream's ACK (p50,
//! p99, last) and the bytes each stream was sent for it (the debounce is part of
//! that time and printed with it; local mode notices the write by inotify); then a
//! restart: the control plane killed and started again, and the time from the
//! start until every stream has reconnected and ACKed its full view.
//!
//! `cargo bench -p trellis-control-plane --bench convergence`
//! (`BENCH_PROXIES=5000 cargo bench ...` for the growth per proxy)

use std::{
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};
use tokio::sync::mpsc;
use trellis_proto::v1::{DiscoveryRequest, Node};

mod scale;

use scale::{endpoint_slice, mesh_file, slices_file, ENDPOINTS_PER_SERVICE, SERVICES};

const STREAMS_PER_CONNECTION: usize = 100;
const POLL: &str = "50ms";
const DEBOUNCE: &str = "20ms";

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..]
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// `field` of `/proc/<pid>/status` (VmRSS, VmHWM), in MiB.
fn status_mib(pid: u32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: f64 = status
        .lines()
        .find(|l| {
            l.strip_prefix(field)
                .is_some_and(|rest| rest.starts_with(':'))
        })
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

/// The control plane's `trellis_cp_translation_seconds` sum, from its admin port.
fn translation_seconds() -> f64 {
    use std::io::{Read, Write};
    let mut admin = std::net::TcpStream::connect("127.0.0.1:25014").unwrap();
    admin
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: bench\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    admin.read_to_string(&mut text).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("trellis_cp_translation_seconds_sum "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// What the simulated proxies saw: per version, when each stream ACKed it and the
/// bytes it was sent.
#[derive(Default)]
struct Seen {
    acks: Vec<(String, Instant, usize)>,
}

struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the control plane on `dir`.
fn control_plane(dir: &std::path::Path) -> Guard {
    Guard(
        Command::new(env!("CARGO_BIN_EXE_trellis-control-plane"))
            .args(["--local", dir.to_str().unwrap()])
            .args(["--grpc-addr", "127.0.0.1:25010"])
            .args(["--admin-addr", "127.0.0.1:25014"])
            .args(["--poll", POLL, "--debounce", DEBOUNCE])
            .env("RUST_LOG", "warn")
            .stderr(Stdio::null())
            .spawn()
            .expect("start trellis-control-plane"),
    )
}

/// What a simulated proxy reads of each DiscoveryResponse part. A real proxy
/// also decodes every resource's name and parses its JSON, on its own cores; the
/// simulated ones share the control plane's, so they skip both and only count the
/// JSON's bytes (as `Bytes` slices of the received buffer: no copy).
#[derive(Clone, PartialEq, prost::Message)]
struct Part {
    #[prost(string, tag = "1")]
    version: String,
    #[prost(string, tag = "2")]
    nonce: String,
    #[prost(message, repeated, tag = "4")]
    resources: Vec<ResourceJson>,
    #[prost(bool, tag = "6")]
    more: bool,
}

/// A `Resource` without its name.
#[derive(Clone, PartialEq, prost::Message)]
struct ResourceJson {
    #[prost(bytes = "bytes", tag = "2")]
    json: bytes::Bytes,
}

/// One simulated proxy: opens its stream, ACKs every version (recording it in
/// `seen`), and opens it again when it breaks, 20 ms later.
async fn proxy(i: usize, channel: tonic::transport::Channel, seen: Arc<Mutex<Seen>>) {
    loop {
        let (tx, rx) = mpsc::channel(4);
        let hello = DiscoveryRequest {
            node: Some(Node {
                namespace: "bench".into(),
                pod: format!("proxy-{i}"),
                pod_ip: format!("198.18.{}.{}", 200 + i / 250, 1 + i % 250),
                ..Default::default()
            }),
            ..Default::default()
        };
        tx.send(hello).await.unwrap();
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        let opened = match grpc.ready().await {
            Ok(()) => {
                grpc.streaming(
                    tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx)),
                    http::uri::PathAndQuery::from_static("/trellis.v1.Discovery/Stream"),
                    tonic_prost::ProstCodec::<DiscoveryRequest, Part>::default(),
                )
                .await
            }
            Err(error) => Err(tonic::Status::unavailable(error.to_string())),
        };
        if let Ok(stream) = opened {
            let mut stream = stream.into_inner();
            // A version comes in parts; the proxy answers the last one.
            let mut bytes = 0;
            while let Ok(Some(part)) = stream.message().await {
                bytes += part.resources.iter().map(|r| r.json.len()).sum::<usize>();
                if part.more {
                    continue;
                }
                let _ = tx
                    .send(DiscoveryRequest {
                        version: part.version.clone(),
                        nonce: part.nonce.clone(),
                        ..Default::default()
                    })
                    .await;
                seen.lock()
                    .unwrap()
                    .acks
                    .push((part.version, Instant::now(), bytes));
                bytes = 0;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until all `proxies` streams have ACKed `version`.
async fn wait_for(seen: &Mutex<Seen>, version: &str, proxies: usize) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let count = seen
            .lock()
            .unwrap()
            .acks
            .iter()
            .filter(|a| a.0 == version)
            .count();
        if count >= proxies {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "only {count} of {proxies} ACKed version {version}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::main]
async fn main() {
    let proxies: usize = std::env::var("BENCH_PROXIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000);
    let dir = std::env::temp_dir().join(format!("trellis-cp-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("mesh.yaml"), mesh_file()).unwrap();
    let slices = slices_file();
    std::fs::write(dir.join("slices.yaml"), &slices).unwrap();

    let start = Instant::now();
    let cp = control_plane(&dir);
    let pid = cp.0.id();
    // Connect once the port is up.
    let mut channels = Vec::new();
    while channels.len() < proxies.div_ceil(STREAMS_PER_CONNECTION) {
        match tonic::transport::Endpoint::from_static("http://127.0.0.1:25010")
            .connect()
            .await
        {
            Ok(channel) => channels.push(channel),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    let seen = Arc::new(Mutex::new(Seen::default()));
    for i in 0..proxies {
        let channel = channels[i / STREAMS_PER_CONNECTION].clone();
        tokio::spawn(proxy(i, channel, seen.clone()));
    }
    wait_for(&seen, "1", proxies).await;
    let first_push = start.elapsed();
    let full_bytes = seen.lock().unwrap().acks[0].2;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (rss, peak, cpu) = (
        status_mib(pid, "VmRSS"),
        status_mib(pid, "VmHWM"),
        cpu_seconds(pid),
    );

    // One EndpointSlice gains an endpoint.
    let changed = slices.replacen(&endpoint_slice(7, false), &endpoint_slice(7, true), 1);
    let tmp = dir.join(".slices.tmp");
    std::fs::write(&tmp, &changed).unwrap();
    let translated = translation_seconds();
    let t0 = Instant::now();
    std::fs::rename(&tmp, dir.join("slices.yaml")).unwrap();
    wait_for(&seen, "2", proxies).await;
    let cpu_change = cpu_seconds(pid) - cpu;
    let translation = translation_seconds() - translated;
    let mut times: Vec<Duration> = seen
        .lock()
        .unwrap()
        .acks
        .iter()
        .filter(|a| a.0 == "2")
        .map(|a| a.1 - t0)
        .collect();
    times.sort();
    let delta_bytes = seen
        .lock()
        .unwrap()
        .acks
        .iter()
        .find(|a| a.0 == "2")
        .map(|a| a.2)
        .unwrap_or(0);

    // A restart: every stream breaks, reconnects and is sent its full view again.
    drop(cp);
    seen.lock().unwrap().acks.clear();
    let restarted_at = Instant::now();
    let cp = control_plane(&dir);
    wait_for(&seen, "1", proxies).await;
    let restart = restarted_at.elapsed();
    let restart_peak = status_mib(cp.0.id(), "VmHWM");

    println!(
        "mesh: {SERVICES} services, {} endpoints, {SERVICES} routes; {proxies} proxy streams over {} HTTP/2 connections",
        SERVICES * ENDPOINTS_PER_SERVICE,
        channels.len()
    );
    println!("| measure | value |");
    println!("|---|---|");
    println!(
        "| start to every stream ACKing the full view | {:.2} s |",
        first_push.as_secs_f64()
    );
    println!(
        "| full view per stream | {:.0} KiB |",
        full_bytes as f64 / 1024.0
    );
    println!("| control plane RSS with {proxies} streams | {rss:.1} MiB |");
    println!("| control plane peak RSS (VmHWM) | {peak:.1} MiB |");
    println!("| control plane CPU to translate and push the full view to all | {cpu:.2} s |");
    println!("| one EndpointSlice change: bytes sent per stream | {delta_bytes} |");
    println!(
        "| one EndpointSlice change: write to ACK, p50 | {:.1} ms |",
        percentile(&times, 0.5).as_secs_f64() * 1000.0
    );
    println!(
        "| one EndpointSlice change: write to ACK, p99 | {:.1} ms |",
        percentile(&times, 0.99).as_secs_f64() * 1000.0
    );
    println!(
        "| one EndpointSlice change: write to last ACK | {:.1} ms |",
        times[times.len() - 1].as_secs_f64() * 1000.0
    );
    println!(
        "| one EndpointSlice change: control plane CPU | {:.3} s |",
        cpu_change
    );
    println!(
        "| one EndpointSlice change: translation and views | {:.1} ms |",
        translation * 1000.0
    );
    println!(
        "| restart: start to every stream reconnected and ACKing its full view | {:.2} s |",
        restart.as_secs_f64()
    );
    println!("| restart: control plane peak RSS | {restart_peak:.1} MiB |");
    println!(
        "(the write-to-ACK times include the {DEBOUNCE} debounce; the write is noticed by inotify, the {POLL} poll is the fallback)"
    );
    drop(cp);
    let _ = std::fs::remove_dir_all(&dir);
}
