//! `trellis-bench allocations` (`benches/allocations`): heap allocations per
//! request in each sidecar of every setup but `direct`.

use super::{env_or, list, load::oha, setups, start, Setup};

/// Allocations per request on each sidecar of `setup`: the proxy built with the
/// `count-allocations` feature (`benches/allocations`) reports what it allocated,
/// read before and after a fixed number of requests.
async fn allocations(setup: &Setup, requests: u64) -> Vec<(f64, f64)> {
    let running = start(setup).await;
    let (net, sidecars, target) = (&running.net, &running.sidecars, running.target);
    let (client, host, cpu) = (net.pod(0).clone(), setup.host, setup.load_cpu);
    let run = |n: u64| {
        let client = client.clone();
        tokio::task::spawn_blocking(move || {
            oha(
                &client,
                cpu,
                target,
                host,
                &["-n", &n.to_string(), "-c", "8"],
            )
        })
    };
    run(2000).await.unwrap();
    let mut counted = Vec::new();
    for sidecar in sidecars {
        let metrics = sidecar.metrics().await;
        counted.push((
            metrics.sum("trellis_allocations_total", &[]),
            metrics.sum("trellis_allocated_bytes_total", &[]),
        ));
    }
    // A scrape allocates too: the second of two back-to-back scrapes is the
    // baseline, and their difference is taken off again at the end.
    let mut baseline = Vec::new();
    for (sidecar, first) in sidecars.iter().zip(&counted) {
        let metrics = sidecar.metrics().await;
        let count = metrics.sum("trellis_allocations_total", &[]);
        let bytes = metrics.sum("trellis_allocated_bytes_total", &[]);
        baseline.push((count, bytes, count - first.0, bytes - first.1));
    }
    let load = run(requests).await.unwrap();
    assert!(load.success > 0.999, "{}: requests failed", setup.name);
    let mut per_request = Vec::new();
    for (sidecar, (count, bytes, scrape_count, scrape_bytes)) in sidecars.iter().zip(baseline) {
        let metrics = sidecar.metrics().await;
        let after = (
            metrics.sum("trellis_allocations_total", &[]),
            metrics.sum("trellis_allocated_bytes_total", &[]),
        );
        per_request.push((
            (after.0 - count - scrape_count) / requests as f64,
            (after.1 - bytes - scrape_bytes) / requests as f64,
        ));
    }
    per_request
}

pub async fn report() {
    let requests = env_or("BENCH_REQUESTS", 20_000);
    println!("Heap allocations per request, {requests} requests on 8 connections (oha -n), counted by each sidecar\n");
    println!(
        "| setup | allocations per request (each sidecar) | bytes per request (each sidecar) |"
    );
    println!("|---|---|---|");
    for setup in &setups()[1..6] {
        eprintln!("counting {} ...", setup.name);
        let counts = allocations(setup, requests).await;
        let (allocs, bytes): (Vec<f64>, Vec<f64>) = counts.into_iter().unzip();
        println!(
            "| {} | {} | {} |",
            setup.name,
            list(&allocs, 1),
            list(&bytes, 0)
        );
    }
}
