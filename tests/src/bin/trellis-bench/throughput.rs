//! `trellis-bench throughput` (`benches/run throughput`): opaque TCP through no,
//! one and two sidecars.

use super::{cpu_seconds, load::pinned_runtime, start, Setup};
use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Opaque TCP through `setup`: `megabytes` written to the app's echo (port 7000)
/// on 4 connections from the client pod (a thread pinned to CPU 1) and read back
/// as it is written. Returns MB/s each way and each sidecar's CPU seconds per GB
/// it forwarded (both directions counted).
pub async fn throughput(setup: &Setup, megabytes: u64) -> (f64, Vec<f64>) {
    const CONNECTIONS: u64 = 4;
    let running = start(setup).await;
    let target = SocketAddr::from((running.net.pod(1).ip, 7000));
    let sidecars = &running.sidecars;
    let cpu_before: Vec<f64> = sidecars.iter().map(|s| cpu_seconds(s.pid())).collect();
    let client = running.net.pod(0).clone();
    let each = megabytes * 1_000_000 / CONNECTIONS;
    let started = Instant::now();
    let moved = std::thread::spawn(move || {
        let runtime = pinned_runtime(1);
        runtime.block_on(async move {
            let loops = (0..CONNECTIONS).map(|_| {
                let client = client.clone();
                tokio::spawn(async move {
                    let stream = client.connect(target).await?;
                    let (mut read, mut write) = stream.into_split();
                    let writer = async move {
                        let chunk = vec![0x5a_u8; 64 * 1024];
                        let mut sent = 0;
                        while sent < each {
                            let n = chunk.len().min((each - sent) as usize);
                            write.write_all(&chunk[..n]).await?;
                            sent += n as u64;
                        }
                        write.shutdown().await
                    };
                    let reader = async move {
                        let mut buffer = vec![0u8; 64 * 1024];
                        let mut got = 0u64;
                        while got < each {
                            match read.read(&mut buffer).await? {
                                0 => break,
                                n => got += n as u64,
                            }
                        }
                        std::io::Result::Ok(got)
                    };
                    let (_, got) = tokio::try_join!(writer, reader)?;
                    std::io::Result::Ok(got)
                })
            });
            let tasks: Vec<_> = loops.collect();
            let all = async {
                let mut total = 0;
                for task in tasks {
                    total += task.await.ok().and_then(Result::ok).unwrap_or(0);
                }
                total
            };
            // Bounded in time as well as in bytes.
            tokio::time::timeout(Duration::from_secs(300), all)
                .await
                .unwrap_or(0)
        })
    })
    .join()
    .expect("throughput loop");
    let seconds = started.elapsed().as_secs_f64();
    assert_eq!(moved, each * CONNECTIONS, "every byte came back");
    let gigabytes = 2.0 * moved as f64 / 1e9;
    let cpu_per_gb = sidecars
        .iter()
        .zip(cpu_before)
        .map(|(s, before)| (cpu_seconds(s.pid()) - before) / gigabytes)
        .collect();
    (moved as f64 / 1e6 / seconds, cpu_per_gb)
}
