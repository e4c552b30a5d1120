//! Translation at scale: the mesh of `scale` (1 000 Services, 10 000 endpoints,
//! 1 000 HTTPRoutes) handed to the hub whole, then one object changed at a time,
//! as a source hands it over (the unchanged objects the same allocations).
//!
//! Prints the time to parse the mesh's YAML, then, per kind of change, the time from the hub's update to its new snapshot
//! (translation and the views every stream reads), median and slowest of
//! `ROUNDS`, each round switching the object back and forth.
//!
//! `cargo bench -p trellis-control-plane --bench translation`

mod scale;

use scale::{endpoint_slice, mesh_file, slices_file};
use std::sync::Arc;
use std::time::{Duration, Instant};
use trellis_control_plane::hub::Hub;
use trellis_control_plane::source::local::parse_text;
use trellis_control_plane::translate::{Objects, Translator};

const ROUNDS: usize = 40;

/// One object changed in place.
type Change = Box<dyn Fn(&mut Objects)>;

fn objects(text: &str) -> Objects {
    parse_text("bench.yaml", text).expect("the bench's mesh parses")
}

/// `hub`'s time from `update(objects)` to the snapshot made of it.
async fn time_update(hub: &Hub, objects: Objects) -> Duration {
    let mut snapshots = hub.snapshots();
    snapshots.borrow_and_update();
    let started = Instant::now();
    hub.update(objects);
    snapshots.changed().await.expect("the hub runs");
    started.elapsed()
}

/// Median and slowest of `ROUNDS` updates, each `base` with `change` applied on
/// odd rounds (so every round changes one object).
async fn measure(hub: &Hub, base: &Objects, change: &dyn Fn(&mut Objects)) -> (Duration, Duration) {
    let mut changed = base.clone();
    change(&mut changed);
    let mut times = Vec::new();
    for round in 0..ROUNDS {
        let objects = if round % 2 == 0 { &changed } else { base };
        times.push(time_update(hub, objects.clone()).await);
    }
    times.sort();
    (times[times.len() / 2], times[times.len() - 1])
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let (mesh, slices) = (mesh_file(), slices_file());
    let started = Instant::now();
    let mut base = objects(&mesh);
    base.endpoint_slices = objects(&slices).endpoint_slices;
    let parsed = started.elapsed();
    let hub = Hub::start(Duration::ZERO, Duration::ZERO);
    let first = time_update(&hub, base.clone()).await;
    println!("| change | median | slowest of {ROUNDS} |");
    println!("|---|---|---|");
    println!(
        "| whole mesh, parsed from YAML ({} KiB) | {:.1} ms | |",
        (mesh.len() + slices.len()) / 1024,
        parsed.as_secs_f64() * 1e3
    );
    println!(
        "| whole mesh, first | {:.1} ms | |",
        first.as_secs_f64() * 1e3
    );

    let rows: Vec<(&str, Change)> = vec![
        (
            "one EndpointSlice gains an endpoint",
            Box::new(|o: &mut Objects| {
                o.endpoint_slices[7] = objects(&endpoint_slice(7, true)).endpoint_slices[0].clone();
            }),
        ),
        (
            "one HTTPRoute's path changes",
            Box::new(|o: &mut Objects| {
                let mut route = (*o.http_routes[7]).clone();
                let text = serde_json::to_string(&route)
                    .unwrap()
                    .replace("/api", "/v2");
                route = serde_json::from_str(&text).unwrap();
                o.http_routes[7] = Arc::new(route);
            }),
        ),
        (
            "one Service's clusterIP changes",
            Box::new(|o: &mut Objects| {
                let mut service = (*o.services[7]).clone();
                if let Some(spec) = service.spec.as_mut() {
                    spec.cluster_ip = Some("198.19.200.1".to_owned());
                }
                o.services[7] = Arc::new(service);
            }),
        ),
        ("nothing changes", Box::new(|_: &mut Objects| {})),
    ];
    for (name, change) in &rows {
        let (median, slowest) = measure(&hub, &base, change).await;
        println!(
            "| {name} | {:.2} ms | {:.2} ms |",
            median.as_secs_f64() * 1e3,
            slowest.as_secs_f64() * 1e3
        );
    }
    println!();
    println!("The translator alone (the hub's translation without its views):");
    println!();
    println!("| change | median | slowest of {ROUNDS} |");
    println!("|---|---|---|");
    for (name, change) in &rows {
        let mut changed = base.clone();
        change(&mut changed);
        let mut translator = Translator::default();
        translator.translate(&base);
        let mut times = Vec::new();
        for round in 0..ROUNDS {
            let objects = if round % 2 == 0 { &changed } else { &base };
            let started = Instant::now();
            std::hint::black_box(translator.translate(objects));
            times.push(started.elapsed());
        }
        times.sort();
        println!(
            "| {name} | {:.2} ms | {:.2} ms |",
            times[times.len() / 2].as_secs_f64() * 1e3,
            times[times.len() - 1].as_secs_f64() * 1e3
        );
    }
}
