//! `benches/run rounds`: the max rate of direct, the pair and the pair with the full
//! policy stack, all three set up at once and measured in turn, round after round.
//! The two ratios the targets name (the pair against direct, the full stack
//! against the pair) are taken within each round, so a machine whose speed drifts
//! from one minute to the next still gives them: the median of the rounds, and
//! their range.

use super::{env_or, load::oha, setups, start, Running, Setup};

/// The names of the setups measured, in the order of the table's columns.
const MEASURED: [&str; 3] = ["direct", "two sidecars", "two sidecars, full policy stack"];

/// Requests per second at the highest rate `running` sustains for `seconds`.
async fn max_rate(setup: &Setup, running: &Running, seconds: u64) -> f64 {
    let (client, target) = (running.net.pod(0).clone(), running.target);
    let (host, cpu) = (setup.host, setup.load_cpu);
    let duration = format!("{seconds}s");
    tokio::task::spawn_blocking(move || {
        oha(&client, cpu, target, host, &["-z", &duration, "-c", "32"]).rps
    })
    .await
    .unwrap()
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    match sorted.len() % 2 {
        1 => sorted[mid],
        _ => (sorted[mid - 1] + sorted[mid]) / 2.0,
    }
}

pub async fn report() {
    let rounds = env_or("BENCH_ROUNDS", 7).max(1);
    let seconds = env_or("BENCH_SECONDS", 5).max(1);
    let all = setups();
    let chosen: Vec<&Setup> = MEASURED
        .iter()
        .map(|name| all.iter().find(|s| s.name == *name).expect("a setup"))
        .collect();
    let mut running = Vec::new();
    for setup in &chosen {
        running.push(start(setup).await);
    }
    for (setup, run) in chosen.iter().zip(&running) {
        eprintln!("warming up {} ...", setup.name);
        max_rate(setup, run, 2).await;
    }
    println!("Max rps with 32 connections, {seconds} s per setup and round; app and sidecars on CPU 0, oha on CPU 1\n");
    println!("| round | direct | two sidecars | full policy stack | the pair, % of direct | the full stack, % below the pair |");
    println!("|---|---|---|---|---|---|");
    let (mut pair_share, mut full_below) = (Vec::new(), Vec::new());
    for round in 0..rounds as usize {
        eprintln!("round {} of {rounds} ...", round + 1);
        let mut rps = [0.0; MEASURED.len()];
        // Each round starts with a different setup, so none always runs first.
        for k in 0..MEASURED.len() {
            let i = (k + round) % MEASURED.len();
            rps[i] = max_rate(chosen[i], &running[i], seconds).await;
        }
        let [direct, pair, full] = rps;
        pair_share.push(100.0 * pair / direct);
        full_below.push(100.0 * (pair - full) / pair);
        println!(
            "| {} | {direct:.0} | {pair:.0} | {full:.0} | {:.1} | {:.1} |",
            round + 1,
            pair_share[round],
            full_below[round],
        );
    }
    let range = |v: &[f64]| {
        let (lo, hi) = v
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), x| (lo.min(*x), hi.max(*x)));
        format!("{:.1} (from {lo:.1} to {hi:.1})", median(v))
    };
    println!(
        "| median | | | | {} | {} |",
        range(&pair_share),
        range(&full_below)
    );
}
