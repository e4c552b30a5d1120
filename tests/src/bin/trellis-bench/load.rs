//! The load the harness puts on a setup: oha's HTTP requests, and new opaque
//! connections from a pinned loop.

use std::{net::SocketAddr, time::Duration};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use trellis_tests::netns::Pod;

pub struct Load {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub rps: f64,
    pub success: f64,
}

/// `BENCH_HTTP2=1`: every call over HTTP/2 (cleartext, prior knowledge), from
/// the client through the sidecars to the app.
pub fn http2() -> bool {
    std::env::var("BENCH_HTTP2").is_ok_and(|v| v == "1")
}

/// Runs oha from inside `pod`, pinned to `cpu`, and reads its JSON summary.
pub fn oha(pod: &Pod, cpu: usize, target: SocketAddr, host: Option<&str>, args: &[&str]) -> Load {
    let mut command = pod.command("taskset");
    let cpu = cpu.to_string();
    command.args(["-c", &cpu, "oha", "--no-tui", "--output-format", "json"]);
    if http2() {
        command.arg("--http2");
    }
    if let Some(host) = host {
        command.args(["-H", &format!("Host: {host}")]);
    }
    let output = command
        .args(args)
        .arg(format!("http://{target}/"))
        .output()
        .expect("run oha (benches/run installs it)");
    assert!(
        output.status.success(),
        "oha failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).expect("oha JSON");
    let ms = |v: &serde_json::Value| v.as_f64().unwrap_or(f64::NAN) * 1000.0;
    Load {
        p50_ms: ms(&json["latencyPercentiles"]["p50"]),
        p99_ms: ms(&json["latencyPercentiles"]["p99"]),
        max_ms: ms(&json["summary"]["slowest"]),
        rps: json["summary"]["requestsPerSec"].as_f64().unwrap_or(0.0),
        success: json["summary"]["successRate"].as_f64().unwrap_or(0.0),
    }
}

/// A single-threaded runtime for the calling thread, which it pins to `cpu`.
pub fn pinned_runtime(cpu: usize) -> tokio::runtime::Runtime {
    // SAFETY: pinning this thread (pid 0 = caller).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// How many connections per second `pod` opens to `target` and gets a one-byte
/// echo back on, from 16 loops on a thread pinned to CPU 1, for `seconds`.
pub fn connections_per_second(pod: &Pod, target: SocketAddr, seconds: u64) -> f64 {
    let pod = pod.clone();
    std::thread::spawn(move || {
        let runtime = pinned_runtime(1);
        runtime.block_on(async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(seconds);
            let loops = (0..16).map(|_| {
                let pod = pod.clone();
                tokio::spawn(async move {
                    let mut done = 0u64;
                    // Bounded by the deadline and by count.
                    while tokio::time::Instant::now() < deadline && done < 10_000_000 {
                        let once = async {
                            let mut stream = pod.connect(target).await?;
                            stream.write_all(b"x").await?;
                            let mut byte = [0u8; 1];
                            stream.read_exact(&mut byte).await?;
                            std::io::Result::Ok(())
                        };
                        match tokio::time::timeout(Duration::from_secs(5), once).await {
                            Ok(Ok(())) => done += 1,
                            _ => break,
                        }
                    }
                    done
                })
            });
            let mut total = 0;
            for task in loops.collect::<Vec<_>>() {
                total += task.await.unwrap_or(0);
            }
            total as f64 / seconds as f64
        })
    })
    .join()
    .expect("connection loop")
}
