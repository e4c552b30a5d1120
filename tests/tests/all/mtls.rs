//! Mutual TLS between two sidecars, end to end: both proxies get certificates from a
//! control plane acting as the mesh CA; the client's sidecar, knowing from the
//! EndpointSlice's pod who answers at the endpoint, calls it over mesh mTLS and
//! checks the peer is that identity; the server's sidecar terminates it, takes the
//! caller's certificate, and hands the request to the app as before; an HTTP/1
//! request that rides the pooled HTTP/2 connection when the endpoint is busy
//! reaches the app as HTTP/1.1. A STRICT port
//! refuses callers without mesh mTLS; a peer that is not who the config says is
//! refused by the caller. OpenSSL, as a client the proxy did not write, sees TLS
//! 1.3 and a SPIFFE-only certificate, and is refused with a certificate from
//! another CA or past its expiry.

use bytes::Bytes;
use http_body_util::Full;
use hyper::Request;
use std::{net::SocketAddr, time::Duration};
use trellis_tests::{
    apps,
    control_plane::{mesh_ca, workload_certificate, ControlPlane},
    http::{collect, get_with_host, h2_client, send_h1, send_h2},
    netns::Network,
    sidecar::Sidecar,
    wait::until,
    TempDir,
};

const MESH: &str = "
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: shop}
spec: {clusterIP: 198.19.0.10, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: reviews-1, namespace: shop, labels: {kubernetes.io/service-name: reviews}}
addressType: IPv4
endpoints: [{addresses: [198.18.0.3], targetRef: {kind: Pod, name: server, namespace: shop}}]
ports: [{name: http, port: 8080}]
";

const STRICT: &str = "apiVersion: policy.trellis.dev/v1alpha1
kind: ServerPolicy
metadata: {name: reviews, namespace: shop}
spec:
  targetRefs: [{group: '', kind: Service, name: reviews}]
  mtls: STRICT
";

fn pod(service_account: &str) -> String {
    format!(
        "apiVersion: v1
kind: Pod
metadata: {{name: server, namespace: shop}}
spec: {{serviceAccountName: {service_account}, containers: [{{name: app, image: reviews}}]}}
"
    )
}

const LIMIT: Duration = Duration::from_secs(20);

#[tokio::test]
async fn http_between_two_sidecars_goes_over_mtls_to_the_identity_the_config_names() {
    // Pods: client (0), server (1), control plane (2), and a caller outside the
    // mesh (3, no sidecar).
    let net = Network::new(4);
    let reviews_app = apps::http_app(net.pod(1).listen(8080), "reviews");
    let secrets = TempDir::new("mtls");
    let cp = issuing_control_plane(&net, &secrets, &["frontend", "reviews"]).await;
    let server = cp
        .meshed_sidecar(net.pod(1), "server", &secrets, "reviews")
        .await;
    let client = cp
        .meshed_sidecar(net.pod(0), "client", &secrets, "frontend")
        .await;

    let reviews: SocketAddr = "198.19.0.10:80".parse().unwrap();
    let call = || async {
        get_with_host(net.pod(0), reviews, "/", "reviews.shop")
            .await
            .map(|(status, headers, _)| (status.as_u16(), headers))
            .map_err(|e| e.to_string())
    };
    let (status, headers) = until(LIMIT, "a call to reviews", || async {
        match call().await? {
            (200, headers) => Ok((200, headers)),
            (status, headers) => Err(format!("{status} {headers:?}")),
        }
    })
    .await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-app"], "reviews");
    let handshakes = server
        .metrics()
        .await
        .sum("trellis_tls_handshakes_total", &[("result", "ok")]);
    assert!(handshakes >= 1.0, "the server's sidecar accepted mesh mTLS");
    let inbound_tls = server.metrics().await.sum(
        "trellis_tcp_connections_total",
        &[("direction", "inbound"), ("protocol", "tls")],
    );
    assert!(inbound_tls >= 1.0);

    // HTTP/2 from the app goes over mesh mTLS too, on a connection of its own
    // (ALPN `trellis.dev/h2`).
    let mut h2 = h2_client(net.pod(0), reviews).await.unwrap();
    let req = Request::get("http://reviews.shop/")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (status, headers, _) = collect(send_h2(&mut h2, req).await.unwrap()).await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(headers["x-app"], "reviews");
    let inbound_tls_now = server.metrics().await.sum(
        "trellis_tcp_connections_total",
        &[("direction", "inbound"), ("protocol", "tls")],
    );
    assert!(
        inbound_tls_now > inbound_tls,
        "a new mesh mTLS connection for HTTP/2"
    );

    // With four HTTP/1 requests holding four connections, a fifth rides that
    // HTTP/2 connection rather than open a fifth mTLS connection, and reaches the
    // app as the HTTP/1.1 request it was, body and all; both sidecars count it as
    // HTTP/1.
    let inbound = |protocol| {
        let server = &server;
        async move {
            let metrics = server.metrics().await;
            let connections = [("direction", "inbound"), ("protocol", "tls")];
            let requests = [("direction", "inbound"), ("protocol", protocol)];
            (
                metrics.sum("trellis_tcp_connections_total", &connections),
                metrics.sum("trellis_requests_total", &requests),
            )
        }
    };
    let held = futures_util::future::join_all(
        (0..4).map(|_| get_with_host(net.pod(0), reviews, "/slow/3000", "reviews.shop")),
    );
    let busy = async {
        reviews_app
            .until_in_flight(4, "four slow requests at the app")
            .await;
        let (tls_before, http2_before) = inbound("http2").await;
        const SIZE: usize = 300_000;
        let req = Request::post("/upload?to=reviews")
            .header("host", "reviews.shop")
            .header("x-user", "ann")
            .body(Full::new(Bytes::from(
                (0..SIZE).map(apps::pattern).collect::<Vec<_>>(),
            )))
            .unwrap();
        let sent = send_h1(net.pod(0), reviews, req).await.unwrap();
        let (status, headers, body) = collect(sent).await.unwrap();
        assert_eq!(status, 200);
        let sum = (0..SIZE).fold(0u64, |sum, i| {
            sum.wrapping_add((i as u64).wrapping_mul(u64::from(apps::pattern(i))))
        });
        assert_eq!(body, format!("{SIZE} {sum}"));
        assert_eq!(headers["x-seen-version"], "HTTP/1.1");
        assert_eq!(headers["x-seen-host"], "reviews.shop");
        let seen = headers["x-seen-headers"].to_str().unwrap();
        assert!(seen.contains("x-user"), "{seen}");
        assert!(
            !seen.contains("orig-proto"),
            "the mark reached the app: {seen}"
        );
        let (tls_after, http2_after) = inbound("http2").await;
        assert_eq!(tls_after, tls_before, "a new connection was opened");
        assert_eq!(http2_after, http2_before, "counted as HTTP/2");
        let client = client.metrics().await;
        let upload = [
            ("direction", "outbound"),
            ("protocol", "http1"),
            ("code", "200"),
        ];
        assert!(client.sum("trellis_requests_total", &upload) >= 1.0);
    };
    let (held, ()) = tokio::join!(held, busy);
    for answer in held {
        assert_eq!(answer.unwrap().0, 200);
    }

    // PERMISSIVE, the default: a caller outside the mesh still gets through.
    let app: SocketAddr = "198.18.0.3:8080".parse().unwrap();
    let outsider = || async {
        get_with_host(net.pod(3), app, "/", "reviews")
            .await
            .map(|(status, _, _)| status.as_u16())
            .map_err(|e| e.to_string())
    };
    assert_eq!(outsider().await, Ok(200));
    // STRICT: only mesh mTLS.
    cp.write("strict.yaml", STRICT);
    until(LIMIT, "the outsider refused by the STRICT port", || async {
        match outsider().await {
            Err(_) => Ok(()),
            Ok(status) => Err(format!("still answered {status}")),
        }
    })
    .await;
    let refused = server
        .metrics()
        .await
        .sum("trellis_mtls_refused_total", &[("reason", "plaintext")]);
    assert!(refused >= 1.0);
    assert_eq!(
        call().await.map(|(status, _)| status),
        Ok(200),
        "mTLS still passes"
    );

    // The pod behind the endpoint now says it runs as another account: the server's
    // certificate no longer proves what the config expects, so the client's
    // sidecar refuses to talk to it.
    cp.write("pod.yaml", &pod("impostor"));
    let refused = until(LIMIT, "the call refused as the wrong peer", || async {
        match call().await? {
            (503, headers) => Ok(headers),
            (status, _) => Err(format!("still {status}")),
        }
    })
    .await;
    assert_eq!(refused["x-trellis-flags"], "UF");
    let reason = refused["x-trellis-error"].to_str().unwrap();
    assert!(reason.contains("/ns/shop/sa/impostor"), "{reason}");
    let _ = &client;
}

/// A meshed `reviews` sidecar on pod 1 whose CA lives in `secrets/ca`.
async fn reviews_behind_a_sidecar(net: &Network, secrets: &TempDir) -> (ControlPlane, Sidecar) {
    let cp = issuing_control_plane(net, secrets, &["reviews"]).await;
    let server = cp
        .meshed_sidecar(net.pod(1), "server", secrets, "reviews")
        .await;
    (cp, server)
}

/// Runs `openssl s_client` from pod 0 to the sidecar of `reviews` with a client
/// certificate, sends one request, and returns what it printed: stdout, then
/// stdout and stderr together.
async fn s_client(
    net: &Network,
    secrets: &TempDir,
    (cert_file, key_file): (std::path::PathBuf, std::path::PathBuf),
) -> (String, String) {
    let mut child = net
        .pod(0)
        .command("openssl")
        .args(["s_client", "-connect", "198.18.0.3:8080", "-tls1_3"])
        .args([
            "-alpn",
            "trellis.dev/http1",
            "-showcerts",
            "-verify_return_error",
        ])
        .arg("-cert")
        .arg(&cert_file)
        .arg("-key")
        .arg(&key_file)
        .arg("-CAfile")
        .arg(secrets.0.join("ca").join("ca.crt"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("openssl");
    let mut stdin = child.stdin.take().unwrap();
    {
        use std::io::Write;
        stdin
            .write_all(b"GET / HTTP/1.1\r\nHost: reviews\r\nConnection: close\r\n\r\n")
            .unwrap();
    }
    // stdin stays open until openssl is done with the server's answer.
    let output = tokio::task::spawn_blocking(move || {
        let output = child.wait_with_output();
        drop(stdin);
        output
    })
    .await
    .unwrap()
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let all = format!("{stdout}{}", String::from_utf8_lossy(&output.stderr));
    (stdout, all)
}

#[tokio::test]
async fn openssl_s_client_with_a_mesh_certificate_gets_tls_1_3_and_the_servers_spiffe_identity() {
    let net = Network::new(3);
    let _app = apps::http_app(net.pod(1).listen(8080), "reviews");
    let secrets = TempDir::new("s-client");
    let (_cp, _server) = reviews_behind_a_sidecar(&net, &secrets).await;
    let client = workload_certificate(&secrets, "client", &mesh_ca(&secrets), "frontend", false);
    let (stdout, all) = s_client(&net, &secrets, client).await;
    assert!(all.contains("TLSv1.3"), "{all}");
    assert!(all.contains("ALPN protocol: trellis.dev/http1"), "{all}");
    assert!(
        all.contains("HTTP/1.1 200"),
        "the app answered inside: {all}"
    );
    // The server's certificate: its only name is its SPIFFE identity.
    let begin = stdout
        .find("-----BEGIN CERTIFICATE-----")
        .expect("a certificate shown");
    let end = stdout[begin..].find("-----END CERTIFICATE-----").unwrap() + begin + 25;
    let server_cert = pem::parse(&stdout[begin..end]).unwrap();
    let (_, parsed) = x509_parser::parse_x509_certificate(server_cert.contents()).unwrap();
    let names: Vec<String> = parsed
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .map(|n| match n {
            x509_parser::extensions::GeneralName::URI(uri) => format!("uri:{uri}"),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(
        names,
        ["uri:spiffe://cluster.local/ns/shop/sa/reviews"],
        "{all}"
    );
}

#[tokio::test]
async fn a_client_certificate_from_another_ca_or_past_its_expiry_is_refused_by_the_sidecar() {
    let net = Network::new(3);
    let _app = apps::http_app(net.pod(1).listen(8080), "reviews");
    let secrets = TempDir::new("s-client-refused");
    let (_cp, server) = reviews_behind_a_sidecar(&net, &secrets).await;
    let refused_with = |certificate, alert: &'static str, count: f64| {
        let (net, secrets, server) = (&net, &secrets, &server);
        async move {
            let (_, all) = s_client(net, secrets, certificate).await;
            assert!(!all.contains("HTTP/1.1"), "the app was reached: {all}");
            assert!(all.contains(alert), "{all}");
            until(LIMIT, "the handshake counted as refused", || async {
                let refused = server
                    .metrics()
                    .await
                    .sum("trellis_tls_handshakes_total", &[("result", "refused")]);
                if refused >= count {
                    Ok(())
                } else {
                    Err(format!("{refused} refused"))
                }
            })
            .await;
        }
    };

    // Same name, same shape, signed by a CA the mesh does not trust.
    let mut other = rcgen::CertificateParams::new(Vec::new()).unwrap();
    other.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let other_ca = rcgen::Issuer::new(other, rcgen::KeyPair::generate().unwrap());
    let foreign = workload_certificate(&secrets, "foreign", &other_ca, "frontend", false);
    refused_with(foreign, "alert unknown ca", 1.0).await;

    // Signed by the mesh CA, but its time is over.
    let expired = workload_certificate(&secrets, "expired", &mesh_ca(&secrets), "frontend", true);
    refused_with(expired, "alert certificate expired", 2.0).await;

    let accepted = server
        .metrics()
        .await
        .sum("trellis_tls_handshakes_total", &[("result", "ok")]);
    assert_eq!(accepted, 0.0, "neither certificate was taken");
}

/// A control plane on pod 2 that is the mesh's CA for `accounts` and knows the
/// `reviews` pod.
async fn issuing_control_plane(
    net: &Network,
    secrets: &TempDir,
    accounts: &[&str],
) -> ControlPlane {
    let pod = pod("reviews");
    ControlPlane::issuing(
        net.pod(2),
        &[("mesh.yaml", MESH), ("pod.yaml", &pod)],
        secrets,
        accounts,
        &[],
    )
    .await
}
