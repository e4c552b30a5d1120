//! Control-plane scale: a mesh of 1 000 services, 10 000 endpoints and 1 000 routes,
//! served to 1 000 proxy streams (simulated in this process, each ACKing what it
//! gets), by the real `trellis-control-plane --local` binary.
//!
//! Prints: the control plane's RSS and CPU to translate the mesh and push it whole
//! to every stream; then, for one EndpointSlice change written to the directory,
//! the time from the write to each stream's ACK (p50, p99, last) and the bytes each
//! stream was sent for it. The local-mode poll (`--poll`) and the debounce are part
//! of that time and printed with it.
//!
//! `cargo bench -p trellis-control-plane --bench convergence`

use std::{
    fmt::Write as _,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};
use tokio::sync::mpsc;
use trellis_proto::v1::{discovery_client::DiscoveryClient, DiscoveryRequest, Node};

const SERVICES: usize = 1_000;
const ENDPOINTS_PER_SERVICE: usize = 10;
const PROXIES: usize = 1_000;
const STREAMS_PER_CONNECTION: usize = 100;
const POLL: &str = "50ms";
const DEBOUNCE: &str = "20ms";

fn endpoint_slice(i: usize, extra: bool) -> String {
    let mut addresses = String::new();
    let count = ENDPOINTS_PER_SERVICE + usize::from(extra);
    for e in 0..count {
        let _ = writeln!(addresses, "  - addresses: [198.18.{}.{}]", i % 250, 1 + e);
    }
    format!(
        "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: svc-{i}-1, namespace: bench, labels: {{kubernetes.io/service-name: svc-{i}}}}}
addressType: IPv4
endpoints:
{addresses}ports: [{{name: http, port: 8080}}]
"
    )
}

fn mesh_file() -> String {
    let mut text = String::new();
    for i in 0..SERVICES {
        let _ = write!(
            text,
            "apiVersion: v1
kind: Service
metadata: {{name: svc-{i}, namespace: bench}}
spec: {{clusterIP: 198.19.{}.{}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: svc-{i}, namespace: bench}}
spec:
  parentRefs: [{{group: '', kind: Service, name: svc-{i}, port: 80}}]
  rules:
    - matches: [{{path: {{type: PathPrefix, value: /api}}}}]
      backendRefs: [{{name: svc-{i}, port: 80}}]
---
",
            i / 250,
            1 + i % 250
        );
    }
    text
}

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

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    kib / 1024.0
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

#[tokio::main]
async fn main() {
    let dir = std::env::temp_dir().join(format!("trellis-cp-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("mesh.yaml"), mesh_file()).unwrap();
    let mut slices = String::new();
    for i in 0..SERVICES {
        slices += &endpoint_slice(i, false);
        slices += "---\n";
    }
    std::fs::write(dir.join("slices.yaml"), &slices).unwrap();

    let start = Instant::now();
    let cp = Guard(
        Command::new(env!("CARGO_BIN_EXE_trellis-control-plane"))
            .args([
                "--local",
                dir.to_str().unwrap(),
                "--grpc-addr",
                "127.0.0.1:25010",
            ])
            .args([
                "--admin-addr",
                "127.0.0.1:25014",
                "--poll",
                POLL,
                "--debounce",
                DEBOUNCE,
            ])
            .env("RUST_LOG", "warn")
            .stderr(Stdio::null())
            .spawn()
            .expect("start trellis-control-plane"),
    );
    let pid = cp.0.id();
    // Connect once the port is up.
    let mut channels = Vec::new();
    while channels.len() < PROXIES / STREAMS_PER_CONNECTION {
        match tonic::transport::Endpoint::from_static("http://127.0.0.1:25010")
            .connect()
            .await
        {
            Ok(channel) => channels.push(channel),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    let seen = Arc::new(Mutex::new(Seen::default()));
    for i in 0..PROXIES {
        let channel = channels[i / STREAMS_PER_CONNECTION].clone();
        let seen = seen.clone();
        tokio::spawn(async move {
            let (tx, rx) = mpsc::channel(4);
            tx.send(DiscoveryRequest {
                node: Some(Node {
                    namespace: "bench".into(),
                    pod: format!("proxy-{i}"),
                    pod_ip: format!("198.18.{}.{}", 200 + i / 250, 1 + i % 250),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap();
            let mut stream = DiscoveryClient::new(channel)
                .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
                .unwrap()
                .into_inner();
            while let Ok(Some(response)) = stream.message().await {
                let bytes = response.resources.iter().map(|r| r.json.len()).sum();
                let _ = tx
                    .send(DiscoveryRequest {
                        version: response.version.clone(),
                        nonce: response.nonce.clone(),
                        ..Default::default()
                    })
                    .await;
                seen.lock()
                    .unwrap()
                    .acks
                    .push((response.version, Instant::now(), bytes));
            }
        });
    }
    let wait_for = |version: &'static str| {
        let seen = seen.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(120);
            loop {
                let count = seen
                    .lock()
                    .unwrap()
                    .acks
                    .iter()
                    .filter(|a| a.0 == version)
                    .count();
                if count == PROXIES {
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "only {count} of {PROXIES} ACKed version {version}"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    wait_for("1").await;
    let first_push = start.elapsed();
    let full_bytes = seen.lock().unwrap().acks[0].2;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (rss, cpu) = (rss_mib(pid), cpu_seconds(pid));

    // One EndpointSlice gains an endpoint.
    let changed = slices.replacen(&endpoint_slice(7, false), &endpoint_slice(7, true), 1);
    let tmp = dir.join(".slices.tmp");
    std::fs::write(&tmp, &changed).unwrap();
    let t0 = Instant::now();
    std::fs::rename(&tmp, dir.join("slices.yaml")).unwrap();
    wait_for("2").await;
    let cpu_change = cpu_seconds(pid) - cpu;
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

    println!(
        "mesh: {SERVICES} services, {} endpoints, {SERVICES} routes; {PROXIES} proxy streams over {} HTTP/2 connections",
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
    println!("| control plane RSS with {PROXIES} streams | {rss:.1} MiB |");
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
    println!("(the write-to-ACK times include the directory poll, up to {POLL}, and the debounce, {DEBOUNCE})");
    drop(cp);
    let _ = std::fs::remove_dir_all(&dir);
}
