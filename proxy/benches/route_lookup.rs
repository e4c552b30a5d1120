//! Route lookup cost: the authority lookup plus the route match a request pays, for
//! 10, 1 000 and 10 000 routes, laid out two ways: many services with one route
//! each (a hash lookup), and one service with many path routes (a scan of its
//! matches in precedence order). Prints nanoseconds per lookup.
//!
//! `cargo bench -p trellis-proxy --bench route_lookup`

use http::Request;
use std::{hint::black_box, time::Instant};
use trellis_proxy::{config::Config, routing::table::RouteTable, upstream::pool::Pool};

fn many_services(n: usize) -> String {
    let mut yaml = String::from("services:\n");
    for i in 0..n {
        yaml += &format!(
            "  - {{name: svc-{i}, port: 8080, endpoints: [{{address: 198.18.0.2:8080}}]}}\n"
        );
    }
    yaml
}

fn one_service_many_routes(n: usize) -> String {
    let mut yaml = String::from(
        "services:\n  - name: api\n    port: 8080\n    endpoints: [{address: 198.18.0.2:8080}]\n    routes:\n",
    );
    for i in 0..n {
        yaml += &format!("      - matches: [{{path: {{value: /api/r{i}}}, headers: [{{name: x-v, value: '{i}'}}]}}]\n");
    }
    yaml
}

fn measure(label: &str, yaml: &str, authority: &str, path: &str, header: &str) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = runtime.enter();
    let config = Config::parse("bench", yaml).unwrap();
    let table = RouteTable::new(config, &Pool::new(std::time::Duration::from_secs(1))).unwrap();
    let req = Request::get(path).header("x-v", header).body(()).unwrap();
    let iterations = 200_000;
    // Warm up, then time.
    for _ in 0..10_000 {
        black_box(
            table
                .lookup(authority)
                .and_then(|t| t.route(&req))
                .is_some(),
        );
    }
    let start = Instant::now();
    for _ in 0..iterations {
        let found = table
            .lookup(black_box(authority))
            .and_then(|t| t.route(black_box(&req)));
        assert!(found.is_some());
    }
    let ns = start.elapsed().as_nanos() as f64 / iterations as f64;
    println!("| {label} | {ns:.0} |");
}

fn main() {
    println!("| routes | ns per lookup |");
    println!("|---|---|");
    for n in [10, 1_000, 10_000] {
        let last = n - 1;
        measure(
            &format!("{n} services x 1 route"),
            &many_services(n),
            &format!("svc-{last}.default:8080"),
            "/x",
            "",
        );
    }
    for n in [10, 1_000, 10_000] {
        let last = n - 1;
        measure(
            &format!("1 service x {n} routes (worst case: the last)"),
            &one_service_many_routes(n),
            "api.default:8080",
            &format!("/api/r{last}"),
            &last.to_string(),
        );
    }
}
