//! The load harness behind `benches/run`: the same HTTP/1.1 app called directly,
//! through one sidecar (client pod outbound), through two (client outbound, then
//! server inbound), through two with a full policy stack on the client's route
//! (route, timeouts, retry, breaker, rate limit, balancer with outlier detection),
//! and through two configured by a control plane, to a service's cluster IP, in
//! plaintext and with mesh mTLS (the control plane as CA); each in fresh pods with
//! real iptables rules. The control-plane pairs also measure new connections per
//! second: opaque TCP to a cluster IP, each connection a new mesh mTLS handshake
//! when meshed.
//!
//! With `rounds` (`benches/run rounds`), it measures the max rate of direct, the
//! pair and the full policy stack in alternating rounds, for the two ratios the
//! targets name. With the argument `allocations` (`benches/allocations`), it counts instead
//! the heap allocations each sidecar makes per request. With `throughput`
//! (`benches/run throughput`), it measures opaque TCP instead: bytes per second
//! echoed through no, one and two sidecars, and each sidecar's CPU per GB.
//!
//! The app and every sidecar are pinned to CPU 0, the load generator (oha) to CPU 1;
//! the last three rows repeat direct, the pair and the mTLS pair with oha on CPU 0
//! too, where no response has to wake a reader on the other core.
//! For each setup: latency at a fixed rate (with oha's coordinated-omission
//! correction), the highest rate it sustains, and each sidecar's CPU and RSS.

use load::{connections_per_second, http2, oha, pinned_runtime, Load};
use std::{net::SocketAddr, process::Command, time::Duration};
use trellis_tests::{
    apps,
    control_plane::ControlPlane,
    netns::{Network, Pod},
    shop::{self, addr, meshed_server},
    sidecar::{Options, Sidecar},
    TempDir,
};

mod allocations;
mod load;
mod memory;
mod rounds;
mod throughput;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Pins every thread of `pid` to one CPU.
fn pin(pid: i32, cpu: usize) {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("list threads");
    for task in tasks.flatten() {
        let tid: i32 = task.file_name().to_string_lossy().parse().unwrap();
        // SAFETY: a zeroed cpu_set_t is valid; CPU_SET writes inside it.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set);
        }
    }
}

/// User plus system CPU time of a process, in seconds.
fn cpu_seconds(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read stat");
    // Fields after the command name (which may hold spaces) start past ") ".
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..]
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

fn rss_mib(pid: i32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    let kib: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

/// The app, on its own thread pinned to CPU 0, until the process ends.
fn start_app(pod: &Pod) {
    let pod = pod.clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = pinned_runtime(0);
        runtime.block_on(async move {
            let _app = apps::http_app(pod.listen(8080), "bench");
            let _echo = apps::tcp_echo_app(pod.listen(7000));
            ready_tx.send(()).unwrap();
            std::future::pending::<()>().await;
        });
    });
    ready_rx.recv().expect("app started");
}

struct Row {
    setup: &'static str,
    fixed: Load,
    max: Load,
    /// New opaque connections per second, for the control-plane pairs.
    connections: Option<f64>,
    cpu_per_1000: Vec<f64>,
    /// The app's (this process's) CPU per 1000 rps in the same phase: what a
    /// plain server costs on this machine, against which a sidecar's is read.
    app_cpu_per_1000: f64,
    rss_idle: Vec<f64>,
    rss_load: Vec<f64>,
}

/// The client sidecar's config for the policy row: one service with every stage of
/// the stack (call sections on its route, destination sections on the service),
/// none of which should trip (limits far above the load).
const FULL_POLICY: &str = "services:
  - name: bench
    namespace: shop
    port: 8080
    endpoints: [{address: 198.18.0.3:8080}]
    policy:
      connectionPool: {maxConnections: 10000, maxRequests: 10000, maxPendingRequests: 10000}
      loadBalancer: {type: P2CEwma}
      outlierDetection: {}
    routes:
      - matches: [{path: {value: /}}]
        policy:
          timeouts: {request: 10s, perTry: 5s}
          retry: {attempts: 2, retryOn: [connect-failure, reset, gateway-error]}
          rateLimit: {maxTokens: 4000000000, fillInterval: 1s}
";

/// Where the two sidecars of a setup get their config from.
#[derive(Clone, Copy, PartialEq)]
enum Source {
    /// A static file (or none: passthrough).
    File,
    /// A control plane serving `shop::MESH`, in plaintext.
    ControlPlane,
    /// The same control plane as the mesh CA: the pair speaks mesh mTLS.
    Mtls,
}

struct Setup {
    name: &'static str,
    sidecars_at: &'static [usize],
    source: Source,
    client_config: Option<&'static str>,
    host: Option<&'static str>,
    /// The core oha runs on. Waking a reader on the other core costs its waker an
    /// inter-processor interrupt, which a VM pays dearly: run on the sidecars'
    /// core, oha shows what the sidecars cost without it.
    load_cpu: usize,
}

/// The setup's sidecars (client first), and the control plane and CA files they
/// use, which must outlive them.
async fn sidecars(
    setup: &Setup,
    net: &Network,
) -> (Vec<Sidecar>, Option<ControlPlane>, Option<TempDir>) {
    let mut sidecars = Vec::new();
    let (mut control_plane, mut secrets) = (None, None);
    match setup.source {
        Source::File => {
            for &i in setup.sidecars_at {
                let options = Options {
                    config: if i == 0 { setup.client_config } else { None },
                    ..Default::default()
                };
                sidecars.push(Sidecar::start(net.pod(i), options).await);
            }
        }
        Source::ControlPlane => {
            let cp = ControlPlane::start(net.pod(2), &[("mesh.yaml", shop::MESH)]).await;
            sidecars.push(cp.sidecar(net.pod(0), "client").await);
            sidecars.push(cp.sidecar(net.pod(1), "server").await);
            control_plane = Some(cp);
        }
        Source::Mtls => {
            let files = TempDir::new("bench");
            let (cp, server) = meshed_server(net, &files, &["frontend"], &[]).await;
            sidecars.push(
                cp.meshed_sidecar(net.pod(0), "client", &files, "frontend")
                    .await,
            );
            sidecars.push(server);
            (control_plane, secrets) = (Some(cp), Some(files));
        }
    }
    for sidecar in &sidecars {
        pin(sidecar.pid(), 0);
    }
    (sidecars, control_plane, secrets)
}

/// A setup running in fresh pods. Fields drop in order: the sidecars and the
/// control plane before the pods they run in.
struct Running {
    sidecars: Vec<Sidecar>,
    _control_plane: Option<ControlPlane>,
    _secrets: Option<TempDir>,
    /// Where the client calls: the app, or the service's cluster IP.
    target: SocketAddr,
    net: Network,
}

async fn start(setup: &Setup) -> Running {
    let net = Network::new(3);
    start_app(net.pod(1));
    let (sidecars, _control_plane, _secrets) = sidecars(setup, &net).await;
    let target = match setup.source {
        Source::File => SocketAddr::from((net.pod(1).ip, 8080)),
        Source::ControlPlane | Source::Mtls => addr(shop::REVIEWS),
    };
    Running {
        sidecars,
        _control_plane,
        _secrets,
        target,
        net,
    }
}

async fn measure(setup: &Setup, rate: u64, seconds: u64) -> Row {
    let running = start(setup).await;
    let (net, sidecars, target) = (&running.net, &running.sidecars, running.target);
    let client = net.pod(0).clone();
    let duration = format!("{seconds}s");

    // Warm up connections and pools, then let RSS settle.
    let warm = client.clone();
    let (host, load_cpu) = (setup.host, setup.load_cpu);
    tokio::task::spawn_blocking(move || {
        oha(
            &warm,
            load_cpu,
            target,
            host,
            &["-z", "2s", "-q", "500", "-c", "8"],
        )
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_idle = sidecars.iter().map(|s| rss_mib(s.pid())).collect();

    let cpu_before: Vec<f64> = sidecars.iter().map(|s| cpu_seconds(s.pid())).collect();
    let app = std::process::id() as i32;
    let app_before = cpu_seconds(app);
    let (c, d, r) = (client.clone(), duration.clone(), rate.to_string());
    let fixed = tokio::task::spawn_blocking(move || {
        oha(
            &c,
            load_cpu,
            target,
            host,
            &["-z", &d, "-q", &r, "-c", "8", "--latency-correction"],
        )
    })
    .await
    .unwrap();
    let per_1000 =
        |pid: i32, before: f64| (cpu_seconds(pid) - before) / seconds as f64 / (fixed.rps / 1000.0);
    let cpu_per_1000 = sidecars
        .iter()
        .zip(cpu_before)
        .map(|(s, before)| per_1000(s.pid(), before))
        .collect();
    let app_cpu_per_1000 = per_1000(app, app_before);
    let rss_load = sidecars.iter().map(|s| rss_mib(s.pid())).collect();

    let (c, d) = (client.clone(), duration.clone());
    let max = tokio::task::spawn_blocking(move || {
        oha(&c, load_cpu, target, host, &["-z", &d, "-c", "32"])
    })
    .await
    .unwrap();
    let connections = (setup.source != Source::File)
        .then(|| connections_per_second(&client, addr(shop::ECHO_TCP), seconds.min(5)));
    drop(running);
    Row {
        setup: setup.name,
        fixed,
        max,
        connections,
        cpu_per_1000,
        app_cpu_per_1000,
        rss_idle,
        rss_load,
    }
}

fn list(values: &[f64], precision: usize) -> String {
    if values.is_empty() {
        return "-".into();
    }
    values
        .iter()
        .map(|v| format!("{v:.precision$}"))
        .collect::<Vec<_>>()
        .join(" / ")
}

/// Every setup, direct first; the last three again, with oha on the sidecars' core.
fn setups() -> [Setup; 9] {
    [
        Setup {
            name: "direct",
            sidecars_at: &[],
            source: Source::File,
            client_config: None,
            host: None,
            load_cpu: 1,
        },
        Setup {
            name: "one sidecar",
            source: Source::File,
            sidecars_at: &[0],
            client_config: None,
            host: None,
            load_cpu: 1,
        },
        Setup {
            name: "two sidecars",
            source: Source::File,
            sidecars_at: &[0, 1],
            client_config: None,
            host: None,
            load_cpu: 1,
        },
        Setup {
            name: "two sidecars, full policy stack",
            source: Source::File,
            sidecars_at: &[0, 1],
            client_config: Some(FULL_POLICY),
            host: Some("bench.shop:8080"),
            load_cpu: 1,
        },
        Setup {
            name: "two sidecars, control plane, plaintext",
            source: Source::ControlPlane,
            sidecars_at: &[0, 1],
            client_config: None,
            host: None,
            load_cpu: 1,
        },
        Setup {
            name: "two sidecars, control plane, mTLS",
            source: Source::Mtls,
            sidecars_at: &[0, 1],
            client_config: None,
            host: None,
            load_cpu: 1,
        },
        Setup {
            name: "direct, oha on CPU 0",
            sidecars_at: &[],
            source: Source::File,
            client_config: None,
            host: None,
            load_cpu: 0,
        },
        Setup {
            name: "two sidecars, oha on CPU 0",
            source: Source::File,
            sidecars_at: &[0, 1],
            client_config: None,
            host: None,
            load_cpu: 0,
        },
        Setup {
            name: "two sidecars, control plane, mTLS, oha on CPU 0",
            source: Source::Mtls,
            sidecars_at: &[0, 1],
            client_config: None,
            host: None,
            load_cpu: 0,
        },
    ]
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    trellis_tests::netns::clean_up_on_panic();
    if std::env::args().nth(1).as_deref() == Some("allocations") {
        allocations::report().await;
        return;
    }
    if std::env::args().nth(1).as_deref() == Some("memory") {
        println!("A sidecar's resident memory once it holds its control plane's mesh (idle, after the first version)\n");
        memory::memory().await;
        return;
    }
    if std::env::args().nth(1).as_deref() == Some("rounds") {
        rounds::report().await;
        return;
    }
    if std::env::args().nth(1).as_deref() == Some("throughput") {
        let megabytes = env_or("BENCH_MEGABYTES", 2000);
        println!("Opaque TCP: {megabytes} MB echoed on 4 connections (written and read back at once); app and sidecars on CPU 0, the client on CPU 1\n");
        println!("| setup | MB/s each way | CPU seconds per GB forwarded (each sidecar) |");
        println!("|---|---|---|");
        for setup in &setups()[..3] {
            eprintln!("measuring {} ...", setup.name);
            let (rate, cpu_per_gb) = throughput::throughput(setup, megabytes).await;
            println!("| {} | {rate:.0} | {} |", setup.name, list(&cpu_per_gb, 3));
        }
        return;
    }
    let rate = env_or("BENCH_RATE", 1000);
    let seconds = env_or("BENCH_SECONDS", 10);
    let proxy_version = Command::new(trellis_tests::sidecar::proxy_bin())
        .arg("--version")
        .output();
    println!(
        "{} | app and sidecars on CPU 0, oha on CPU 1 unless the row says otherwise | {} | {rate} rps fixed rate for {seconds}s, then max rate with 32 connections for {seconds}s\n",
        proxy_version.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned()).unwrap_or_default(),
        if http2() { "HTTP/2" } else { "HTTP/1.1" },
    );
    println!("| setup | p50 ms | p99 ms | max ms | +p50 ms | +p99 ms | success | max rps | vCPU per 1000 rps (each sidecar) | app's vCPU per 1000 rps | RSS idle MiB | RSS at {rate} rps MiB | new connections/s |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    // Each row as soon as it is measured; a `direct` row comes before the rows
    // with oha on its core, for the deltas.
    let mut direct = (0.0, 0.0);
    let setups = setups();
    let only = std::env::var("BENCH_ONLY").ok();
    let only = only.as_deref().map(|name| {
        setups
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("BENCH_ONLY: no setup is called {name:?}"))
    });
    let chosen = |s: &Setup| match only {
        None => true,
        Some(o) => s.name == o.name || (s.sidecars_at.is_empty() && s.load_cpu == o.load_cpu),
    };
    for setup in setups.iter().filter(|s| chosen(s)) {
        eprintln!("measuring {} ...", setup.name);
        let row = measure(setup, rate, seconds).await;
        if setup.sidecars_at.is_empty() {
            direct = (row.fixed.p50_ms, row.fixed.p99_ms);
        }
        println!(
            "| {} | {:.3} | {:.3} | {:.3} | {:+.3} | {:+.3} | {:.4} | {:.0} | {} | {:.3} | {} | {} | {} |",
            row.setup,
            row.fixed.p50_ms,
            row.fixed.p99_ms,
            row.fixed.max_ms,
            row.fixed.p50_ms - direct.0,
            row.fixed.p99_ms - direct.1,
            row.fixed.success.min(row.max.success),
            row.max.rps,
            list(&row.cpu_per_1000, 3),
            row.app_cpu_per_1000,
            list(&row.rss_idle, 1),
            list(&row.rss_load, 1),
            row.connections.map_or("-".into(), |c| format!("{c:.0}")),
        );
    }
}
