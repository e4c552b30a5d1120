//! What one EndpointSlice change costs a proxy holding a large mesh: 1 000
//! services, 10 000 endpoints and 1 000 routes, each version arriving the way the
//! discovery stream delivers it (every resource as JSON, reassembled, checked and
//! compiled on the proxy's one runtime thread).
//!
//! Two ways of applying a version are measured in the same run: `rebuild`, every
//! version parsed and compiled from nothing (what the proxy did before state was
//! kept across versions), and `diff`, what the proxy's discovery client does now
//! (`Versions::apply`: only the changed resource is parsed, and the table is
//! updated with `RouteTable::next`). For each: the time one change takes on
//! the runtime thread, and the latency of requests through the proxy's route stack
//! to a real HTTP server on loopback while 10 changes a second are applied, against
//! the same load with no changes.
//!
//! `cargo bench -p trellis-proxy --bench config_apply`

use http_body_util::BodyExt;
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};
use trellis_proto::{
    model::{
        config::Config,
        resources::{from_resources, to_resources},
    },
    v1::{DiscoveryResponse, Resource},
};
use trellis_proxy::{
    config::{check_routes, discovery::Versions},
    routing::table::{RouteTable, SharedTable},
    upstream::{pool::Pool, request_body::RequestBody},
};

const SERVICES: usize = 1_000;
const ENDPOINTS_PER_SERVICE: usize = 10;
const CHANGES: usize = 200;
const LOAD_SECONDS: u64 = 5;
const CONCURRENCY: usize = 8;
const CHANGES_PER_SECOND: u64 = 10;

/// The mesh as the control plane would send it; service 0 is the one under load,
/// its endpoints the loopback servers.
fn mesh(servers: &[SocketAddr]) -> Config {
    let mut yaml = String::from("services:\n");
    for i in 0..SERVICES {
        let endpoints: Vec<String> = if i == 0 {
            servers
                .iter()
                .map(|a| format!("{{address: {a}}}"))
                .collect()
        } else {
            (0..ENDPOINTS_PER_SERVICE)
                .map(|e| format!("{{address: 198.18.{}.{}:{}}}", i / 256, i % 256, 8080 + e))
                .collect()
        };
        yaml += &format!(
            "  - name: svc-{i}
    namespace: shop
    port: 8080
    endpoints: [{}]
    policy:
      outlierDetection: {{consecutive5xx: 5}}
    routes:
      - name: api
        matches: [{{path: {{value: /api}}}}]
        policy: {{retry: {{attempts: 2}}, timeouts: {{request: 5s}}}}
",
            endpoints.join(", ")
        );
    }
    trellis_proxy::config::parse("bench", &yaml).expect("the bench mesh parses")
}

/// Version `n` of the mesh: one service other than the loaded one loses an
/// endpoint or gets it back, as one EndpointSlice change does; with the name of
/// the resource that changed.
fn version(base: &Config, n: usize) -> (BTreeMap<String, Vec<u8>>, String) {
    let mut config = base.clone();
    let index = 1 + (n / 2) % (SERVICES - 1);
    let service = std::sync::Arc::make_mut(&mut config.services[index]);
    if n % 2 == 0 {
        service.endpoints.pop();
    }
    let name = trellis_proto::model::resources::service_name(service);
    (to_resources(&config), name)
}

/// The discovery response that carries version `n` to a proxy that has `n - 1`.
fn response(resources: &BTreeMap<String, Vec<u8>>, changed: &str, n: usize) -> DiscoveryResponse {
    DiscoveryResponse {
        version: n.to_string(),
        nonce: n.to_string(),
        full: false,
        resources: vec![Resource {
            name: changed.to_owned(),
            json: resources[changed].clone().into(),
        }],
        removed: Vec::new(),
        more: false,
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Rebuild,
    Diff,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Rebuild => "rebuild",
            Mode::Diff => "diff",
        }
    }
}

/// Applies version `n`: from nothing (`rebuild`), or as the discovery client does.
fn apply(
    mode: Mode,
    versions: &mut Versions,
    base: &Config,
    n: usize,
    table: &SharedTable,
    pool: &Arc<Pool>,
) {
    let (resources, changed) = version(base, n);
    match mode {
        Mode::Rebuild => {
            let config = from_resources(&resources).expect("valid resources");
            check_routes(&config).expect("valid routes");
            let table_now = RouteTable::new(config, pool).expect("the table builds");
            table.store(Arc::new(table_now));
        }
        Mode::Diff => {
            let answer = versions.apply(&response(&resources, &changed, n), table, pool);
            assert!(answer.nack.is_none(), "{:?}", answer.nack);
        }
    }
}

/// Loopback HTTP/1 servers on their own thread, standing in for the application.
fn servers() -> Vec<SocketAddr> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            let mut addrs = Vec::new();
            for i in 1..=ENDPOINTS_PER_SERVICE {
                let listener = tokio::net::TcpListener::bind(format!("127.0.0.{i}:0"))
                    .await
                    .expect("bind loopback");
                addrs.push(listener.local_addr().expect("addr"));
                tokio::spawn(async move {
                    while let Ok((stream, _)) = listener.accept().await {
                        tokio::spawn(async move {
                            let service = hyper::service::service_fn(|_| async {
                                Ok::<_, std::convert::Infallible>(http::Response::new(
                                    http_body_util::Full::new(bytes::Bytes::from_static(b"ok")),
                                ))
                            });
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                                .await;
                        });
                    }
                });
            }
            tx.send(addrs).expect("send addrs");
            std::future::pending::<()>().await;
        });
    });
    rx.recv().expect("servers started")
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// Request latencies under `CONCURRENCY` closed loops for `LOAD_SECONDS`, with
/// `CHANGES_PER_SECOND` versions applied meanwhile when `churn`.
async fn load(
    mode: Mode,
    churn: bool,
    (base, versions, first): (&Config, &mut Versions, usize),
    table: &SharedTable,
    pool: &Arc<Pool>,
) -> (Vec<Duration>, Vec<Duration>) {
    let deadline = Instant::now() + Duration::from_secs(LOAD_SECONDS);
    let mut workers = Vec::new();
    for _ in 0..CONCURRENCY {
        let table = table.clone();
        workers.push(tokio::task::spawn_local(async move {
            let mut latencies = Vec::new();
            // Bounded in count and in time.
            while Instant::now() < deadline && latencies.len() < 1_000_000 {
                let start = Instant::now();
                let req = http::Request::get("http://svc-0.shop:8080/api")
                    .body(RequestBody::Empty)
                    .expect("request");
                let current = table.load_full();
                let target = current.lookup("svc-0.shop:8080").expect("service 0");
                let route = target.route(&req).expect("route");
                let response = route.stack.call(req).await.expect("answered");
                let _ = response.response.into_body().collect().await;
                latencies.push(start.elapsed());
            }
            latencies
        }));
    }
    let mut applies = Vec::new();
    if churn {
        let mut tick = tokio::time::interval(Duration::from_millis(1000 / CHANGES_PER_SECOND));
        let mut n = first;
        while Instant::now() < deadline {
            tick.tick().await;
            let start = Instant::now();
            apply(mode, versions, base, n, table, pool);
            applies.push(start.elapsed());
            n += 1;
        }
    }
    let mut latencies = Vec::new();
    for worker in workers {
        latencies.extend(worker.await.expect("worker"));
    }
    latencies.sort();
    applies.sort();
    (latencies, applies)
}

fn main() {
    let servers = servers();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async {
        let base = mesh(&servers);
        let endpoints: usize = base.services.iter().map(|s| s.endpoints.len()).sum();
        let routes: usize = base.services.iter().map(|s| s.routes.len()).sum();
        println!(
            "{} services, {endpoints} endpoints, {routes} routes; {CHANGES} changes applied back to back, then {LOAD_SECONDS} s of load ({CONCURRENCY} in flight) with and without {CHANGES_PER_SECOND} changes a second\n",
            base.services.len()
        );
        println!("| apply | one change: p50 ms | p99 ms | requests p50 ms (no changes) | p99 ms (no changes) | requests p50 ms (10 changes/s) | p99 ms (10 changes/s) | max ms (10 changes/s) |");
        println!("|---|---|---|---|---|---|---|---|");
        for mode in [Mode::Rebuild, Mode::Diff] {
            let pool = Pool::new(Duration::from_secs(1));
            let table: SharedTable = trellis_proxy::routing::table::shared(Config::default(), &pool)
                .expect("the table builds");
            // The first, full version.
            let mut versions = Versions::default();
            let full = DiscoveryResponse {
                version: "start".into(),
                nonce: "start".into(),
                full: true,
                resources: to_resources(&base)
                    .into_iter()
                    .map(|(name, json)| Resource {
                        name,
                        json: json.into(),
                    })
                    .collect(),
                removed: Vec::new(),
                more: false,
            };
            assert!(versions.apply(&full, &table, &pool).nack.is_none());
            let mut times = Vec::with_capacity(CHANGES);
            for n in 0..CHANGES {
                let start = Instant::now();
                apply(mode, &mut versions, &base, n, &table, &pool);
                times.push(start.elapsed());
            }
            times.sort();
            let (quiet, _) = load(mode, false, (&base, &mut versions, CHANGES), &table, &pool).await;
            let (busy, _) = load(mode, true, (&base, &mut versions, CHANGES), &table, &pool).await;
            let ms = |d: Duration| d.as_secs_f64() * 1000.0;
            println!(
                "| {} | {:.2} | {:.2} | {:.3} | {:.3} | {:.3} | {:.3} | {:.2} |",
                mode.name(),
                ms(percentile(&times, 0.5)),
                ms(percentile(&times, 0.99)),
                ms(percentile(&quiet, 0.5)),
                ms(percentile(&quiet, 0.99)),
                ms(percentile(&busy, 0.5)),
                ms(percentile(&busy, 0.99)),
                ms(*busy.last().expect("requests")),
            );
        }
    });
}
