//! Certificates and roots change under load with no failed request. Two meshed
//! sidecars renew short-lived certificates while a client keeps calling (HTTP,
//! and opaque TCP on a new mesh mTLS connection each time, so handshakes keep
//! happening with whatever certificates and roots are current); then the root is
//! rotated the way the reference describes: both roots in the trust bundle, then
//! signing with the new one, then the new one alone. And when the control plane
//! is gone, traffic between certified sidecars keeps flowing.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};
use trellis_tests::{
    netns::{Network, Pod},
    shop::{self, addr, echo, meshed_server, server_apps, wait_meshed, ECHO_TCP},
    sidecar::Sidecar,
    wait::until,
    TempDir,
};

const LIMIT: Duration = Duration::from_secs(30);
/// The most load iterations a test runs, whatever happens.
const MAX_CALLS: usize = 100_000;

/// What the load saw: calls that succeeded, and every failure.
#[derive(Default)]
struct Load {
    ok: usize,
    failures: Vec<String>,
}

/// Calls from `pod` until `stop`: an HTTP GET to reviews and an opaque echo on a
/// new connection, each iteration.
fn load(pod: Pod, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<Load> {
    tokio::spawn(async move {
        let mut seen = Load::default();
        for i in 0..MAX_CALLS {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            match shop::get(&pod, "/").await {
                Ok((200, _)) => seen.ok += 1,
                other => seen.failures.push(format!("call {i}: HTTP {other:?}")),
            }
            let payload = format!("load {i}");
            match echo(&pod, addr(ECHO_TCP), payload.as_bytes()).await {
                Ok(back) if back == payload.as_bytes() => seen.ok += 1,
                other => seen.failures.push(format!("call {i}: opaque {other:?}")),
            }
        }
        seen
    })
}

/// A sidecar's `/config_dump` identity section.
async fn identity(sidecar: &Sidecar) -> serde_json::Value {
    sidecar.config_dump().await.unwrap()["identity"].clone()
}

/// Waits until `check` holds for every sidecar's identity section.
async fn until_all(sidecars: &[&Sidecar], what: &str, check: impl Fn(&serde_json::Value) -> bool) {
    until(LIMIT, what, || async {
        for sidecar in sidecars {
            let identity = identity(sidecar).await;
            if !check(&identity) {
                return Err(format!("{}: {identity}", sidecar.pod.netns));
            }
        }
        Ok(())
    })
    .await;
}

fn anchor_serials(identity: &serde_json::Value) -> Vec<String> {
    identity["trustAnchors"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| a["serial"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// The serial of the (first) certificate in a PEM file.
fn serial_of(pem_file: &std::path::Path) -> String {
    let text = std::fs::read_to_string(pem_file).unwrap();
    let der = pem::parse(text).unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(der.contents()).unwrap();
    cert.raw_serial_as_string().replace(':', "").to_uppercase()
}

/// A new root, as an operator would make one: (certificate PEM, key PEM).
fn new_root() -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "trellis root, next");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), key.serialize_pem())
}

#[tokio::test]
async fn leaf_and_root_rotate_under_load_with_no_failed_request() {
    // Pods: client (0), server (1), control plane (2).
    let net = Network::new(3);
    let _apps = server_apps(net.pod(1));
    let secrets = TempDir::new("rotation");
    let (mut cp, server) = meshed_server(
        &net,
        &secrets,
        &["frontend"],
        &["--certificate-lifetime", "10s"],
    )
    .await;
    let client = cp
        .meshed_sidecar(net.pod(0), "client", &secrets, "frontend")
        .await;
    let sidecars = [&server, &client];
    wait_meshed(net.pod(0)).await;
    let ca_dir = secrets.0.join("ca");
    let old_root = serial_of(&ca_dir.join("ca.crt"));
    let handshakes_before = server
        .metrics()
        .await
        .sum("trellis_tls_handshakes_total", &[("result", "ok")]);

    let stop = Arc::new(AtomicBool::new(false));
    let running = load(net.pod(0).clone(), stop.clone());

    // The leaf: each sidecar renews (10 s certificates, renewed at 7 s), and the
    // new serial is what /config_dump shows.
    let mut first = Vec::new();
    for sidecar in sidecars {
        first.push(identity(sidecar).await["certificate"]["serial"].clone());
    }
    until(LIMIT, "both sidecars on a renewed certificate", || async {
        for (sidecar, serial) in sidecars.iter().zip(&first) {
            let now = identity(sidecar).await["certificate"]["serial"].clone();
            if now == *serial {
                return Err(format!("{} still on {serial}", sidecar.pod.netns));
            }
        }
        Ok(())
    })
    .await;

    // The root, step 1: trust old and new, sign with the old.
    let old_pem = std::fs::read_to_string(ca_dir.join("ca.crt")).unwrap();
    let (new_pem, new_key) = new_root();
    let new_file = secrets.0.join("new-root.crt");
    std::fs::write(&new_file, &new_pem).unwrap();
    let new_root = serial_of(&new_file);
    let bundle = ca_dir.join("trust-bundle.crt");
    std::fs::write(&bundle, format!("{old_pem}{new_pem}")).unwrap();
    cp.restart().await;
    let both = [old_root.clone(), new_root.clone()];
    until_all(&sidecars, "both roots trusted everywhere", |identity| {
        anchor_serials(identity) == both
    })
    .await;

    // Step 2: sign with the new root.
    std::fs::write(ca_dir.join("ca.crt"), &new_pem).unwrap();
    std::fs::write(ca_dir.join("ca.key"), &new_key).unwrap();
    cp.restart().await;
    until_all(
        &sidecars,
        "every certificate issued by the new root",
        |identity| identity["certificate"]["issuer"]["serial"] == new_root.as_str(),
    )
    .await;

    // Step 3: trust the new root alone.
    std::fs::write(&bundle, &new_pem).unwrap();
    cp.restart().await;
    until_all(&sidecars, "only the new root trusted", |identity| {
        anchor_serials(identity) == [new_root.clone()]
    })
    .await;

    // More calls after the last step, on the new root alone.
    let handshakes_now = server
        .metrics()
        .await
        .sum("trellis_tls_handshakes_total", &[("result", "ok")]);
    until(LIMIT, "more mesh handshakes after the rotation", || async {
        let now = server
            .metrics()
            .await
            .sum("trellis_tls_handshakes_total", &[("result", "ok")]);
        if now >= handshakes_now + 20.0 {
            Ok(())
        } else {
            Err(format!("{now} handshakes"))
        }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let seen = running.await.unwrap();
    assert!(
        seen.failures.is_empty(),
        "{} of {} calls failed: {:?}",
        seen.failures.len(),
        seen.ok + seen.failures.len(),
        &seen.failures[..seen.failures.len().min(5)]
    );
    assert!(seen.ok > 100, "only {} calls", seen.ok);
    assert!(handshakes_now > handshakes_before + 20.0);
}

#[tokio::test]
async fn traffic_keeps_flowing_while_the_control_plane_is_away() {
    let net = Network::new(3);
    let _apps = server_apps(net.pod(1));
    let secrets = TempDir::new("cp-away");
    let (mut cp, server) = meshed_server(&net, &secrets, &["frontend"], &[]).await;
    let _client = cp
        .meshed_sidecar(net.pod(0), "client", &secrets, "frontend")
        .await;
    wait_meshed(net.pod(0)).await;
    let handshakes = server
        .metrics()
        .await
        .sum("trellis_tls_handshakes_total", &[("result", "ok")]);

    cp.kill();
    for i in 0..20 {
        assert_eq!(
            shop::get(net.pod(0), "/").await,
            Ok((200, String::new())),
            "call {i}"
        );
        let payload = format!("away {i}");
        assert_eq!(
            echo(net.pod(0), addr(ECHO_TCP), payload.as_bytes()).await,
            Ok(payload.into_bytes()),
            "new connection {i}"
        );
    }
    let now = server
        .metrics()
        .await
        .sum("trellis_tls_handshakes_total", &[("result", "ok")]);
    assert!(
        now >= handshakes + 20.0,
        "new mesh mTLS connections were made without the control plane"
    );
}
