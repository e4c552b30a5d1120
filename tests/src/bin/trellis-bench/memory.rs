//! `trellis-bench memory` (`benches/run memory`): a sidecar's resident memory
//! holding the control-plane benches' mesh (1 000 services, 10 000 endpoints,
//! 1 000 routes), taken from a real control plane, against the same sidecar
//! holding one service; and how much of `proxy/symbol-order.txt` the proxy
//! still has, since what it lists is laid out together.

use super::rss_mib;
use trellis_tests::{control_plane::ControlPlane, netns::Network};

#[path = "../../../../control-plane/benches/scale/mod.rs"]
mod scale;

/// The mesh of one service, for the baseline.
const ONE_SERVICE: &str = "apiVersion: v1
kind: Service
metadata: {name: svc-0, namespace: bench}
spec: {clusterIP: 198.19.0.1, ports: [{name: http, port: 80, targetPort: 8080}]}
";

/// VmRSS and RssAnon (MiB) of a sidecar once it holds the `services` of
/// `files`' mesh.
async fn holding(files: &[(&str, &str)], services: usize) -> (f64, f64) {
    let net = Network::new(2);
    let cp = ControlPlane::start(net.pod(1), files).await;
    let sidecar = cp.sidecar(net.pod(0), "client").await;
    // Started means ready: the first version is applied whole. Read before
    // asking for the config dump, which builds the whole config as JSON.
    let status = std::fs::read_to_string(format!("/proc/{}/status", sidecar.pid()))
        .expect("read the sidecar's status");
    let anon_kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    let rss = rss_mib(sidecar.pid());
    let dump = sidecar.config_dump().await.expect("the config dump");
    let held = dump["config"]["services"].as_array().map_or(0, Vec::len);
    assert_eq!(held, services, "the sidecar holds the whole mesh");
    (rss, anon_kib / 1024.0)
}

/// How many of the functions `proxy/symbol-order.txt` lists the proxy binary
/// defines (`nm`), and how many it lists: the ones it no longer has are laid out
/// with the rest, which shows in resident memory.
fn symbol_order_found() -> Option<(usize, usize)> {
    let list = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../proxy/symbol-order.txt"
    ))
    .ok()?;
    let nm = std::process::Command::new("nm")
        .arg("--defined-only")
        .arg(trellis_tests::sidecar::proxy_bin())
        .output()
        .ok()?;
    let nm = String::from_utf8_lossy(&nm.stdout);
    let defined: std::collections::HashSet<&str> =
        nm.lines().filter_map(|l| l.split(' ').nth(2)).collect();
    let listed: Vec<&str> = list.lines().filter(|l| !l.starts_with('#')).collect();
    let found = listed.iter().filter(|f| defined.contains(*f)).count();
    Some((found, listed.len()))
}

pub async fn memory() {
    match symbol_order_found() {
        Some((found, listed)) => println!(
            "The proxy defines {found} of the {listed} functions proxy/symbol-order.txt lays out first (benches/symbol-order rewrites it).\n"
        ),
        None => println!("(nm could not tell how much of proxy/symbol-order.txt the proxy has.)\n"),
    }
    let (mesh, slices) = (scale::mesh_file(), scale::slices_file());
    println!("| sidecar holding | services | VmRSS MiB | of it anonymous MiB |");
    println!("|---|---|---|---|");
    for (name, files, services) in [
        ("one service", vec![("mesh.yaml", ONE_SERVICE)], 1),
        (
            "1 000 services, 10 000 endpoints, 1 000 routes",
            vec![
                ("mesh.yaml", mesh.as_str()),
                ("slices.yaml", slices.as_str()),
            ],
            scale::SERVICES,
        ),
    ] {
        eprintln!("measuring a sidecar holding {name} ...");
        let (rss, anon) = holding(&files, services).await;
        println!("| {name} | {services} | {rss:.1} | {anon:.1} |");
    }
}
