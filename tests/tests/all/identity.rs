//! The control plane as the mesh's certificate authority, end to end: started with
//! `--ca-dir` and `--bootstrap-tokens`, it serves its gRPC port over TLS only, with
//! a certificate from its own root; a client in another pod that trusts that root
//! sends a token and a CSR and gets a certificate for the token's identity, never
//! the one the CSR asks for; a bad token is refused and counted; the root survives
//! a restart. A proxy with an identity token is ready only once it holds a
//! certificate for the token's identity, and renews it before it expires.

use rcgen::{CertificateParams, KeyPair, SanType};
use std::net::SocketAddr;
use std::time::Duration;
use trellis_proto::v1::{identity_client::IdentityClient, CertifyRequest};
use trellis_tests::{
    control_plane::{ControlPlane, GRPC_PORT},
    http::{get, TIMEOUT},
    netns::{Network, Pod},
    prom::Metrics,
    sidecar::{run_refused, Options, Sidecar},
    wait::until,
    TempDir,
};
use x509_parser::extensions::GeneralName;

const SERVER_NAME: &str = "trellis-control-plane.trellis-system.svc";
const TOKEN: &str = "s3cret-frontend";

/// A channel from `pod` to the control plane's gRPC port over TLS, trusting
/// `root` (PEM) and checking the certificate names [`SERVER_NAME`].
async fn tls_channel(pod: &Pod, addr: SocketAddr, root: &str) -> tonic::transport::Channel {
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(root))
        .domain_name(SERVER_NAME);
    let endpoint = tonic::transport::Endpoint::from_shared(format!("https://{SERVER_NAME}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(TIMEOUT)
        .timeout(TIMEOUT);
    let pod = pod.clone();
    endpoint
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let pod = pod.clone();
            async move { pod.connect(addr).await.map(hyper_util::rt::TokioIo::new) }
        }))
        .await
        .expect("a TLS connection to the control plane")
}

/// A CSR for a new key that asks to be the cluster's admin.
fn greedy_csr() -> Vec<u8> {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["kubernetes.default.svc".to_owned()]).unwrap();
    params.subject_alt_names.push(SanType::URI(
        "spiffe://cluster.local/ns/kube-system/sa/admin"
            .to_owned()
            .try_into()
            .unwrap(),
    ));
    params.serialize_request(&key).unwrap().der().to_vec()
}

fn names(der: &[u8]) -> Vec<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap();
    san.value
        .general_names
        .iter()
        .map(|name| match name {
            GeneralName::URI(uri) => format!("uri:{uri}"),
            GeneralName::DNSName(dns) => format!("dns:{dns}"),
            other => format!("{other:?}"),
        })
        .collect()
}

#[tokio::test]
async fn the_control_plane_certifies_the_identity_a_token_proves_over_tls_only() {
    let net = Network::new(2);
    let secrets = TempDir::new("identity");
    let ca_dir = secrets.0.join("ca");
    let tokens = secrets.0.join("tokens");
    std::fs::write(
        &tokens,
        format!("# local credentials\n{TOKEN} shop/frontend\n"),
    )
    .unwrap();
    let args = [
        "--ca-dir",
        ca_dir.to_str().unwrap(),
        "--bootstrap-tokens",
        tokens.to_str().unwrap(),
    ];
    let mut cp = ControlPlane::start_with(net.pod(1), &[], &args).await;
    let root = std::fs::read_to_string(ca_dir.join("ca.crt")).expect("a root was made");
    let addr = SocketAddr::from((cp.pod.ip, GRPC_PORT));
    let client_pod = net.pod(0);

    let mut client = IdentityClient::new(tls_channel(client_pod, addr, &root).await);
    let issued = client
        .certify(CertifyRequest {
            token: TOKEN.into(),
            csr: greedy_csr(),
        })
        .await
        .expect("a certificate")
        .into_inner();
    assert_eq!(
        issued.identity,
        "spiffe://cluster.local/ns/shop/sa/frontend"
    );
    assert_eq!(
        names(&issued.chain[0]),
        ["uri:spiffe://cluster.local/ns/shop/sa/frontend"],
        "the token's identity, and nothing the CSR asked for"
    );
    assert_eq!(
        issued.trust_anchors,
        [pem::parse(&root).unwrap().into_contents()]
    );
    let lifetime = issued.not_after_unix
        - std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
    assert!((23 * 3600..=24 * 3600).contains(&lifetime), "{lifetime} s");

    // A token nobody issued: refused, and counted.
    let refused = client
        .certify(CertifyRequest {
            token: "guess".into(),
            csr: greedy_csr(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    let (status, _, body) = get(&cp.pod, cp.admin(), "/metrics").await.unwrap();
    assert_eq!(status, 200);
    let metrics = Metrics::parse(&String::from_utf8_lossy(&body));
    let count = |result| metrics.sum("trellis_ca_certificates_total", &[("result", result)]);
    assert_eq!((count("issued"), count("bad_credential")), (1.0, 1.0));
    let years = metrics.sum("trellis_ca_root_expiry_seconds", &[]) / (365.0 * 24.0 * 3600.0);
    assert!(years > 9.0, "{years} years left on the root");

    // The token never travels in plaintext: the port speaks only TLS.
    let plaintext = trellis_tests::grpc::channel(client_pod, addr, &format!("http://{addr}"))
        .await
        .map(IdentityClient::new);
    if let Ok(mut plaintext) = plaintext {
        let answer = plaintext
            .certify(CertifyRequest {
                token: TOKEN.into(),
                csr: greedy_csr(),
            })
            .await;
        assert!(answer.is_err(), "a plaintext call was answered: {answer:?}");
    }

    // The root survives a restart, and the same trust still holds.
    cp.restart().await;
    assert_eq!(
        std::fs::read_to_string(ca_dir.join("ca.crt")).unwrap(),
        root
    );
    let mut client = IdentityClient::new(tls_channel(client_pod, addr, &root).await);
    let again = client
        .certify(CertifyRequest {
            token: TOKEN.into(),
            csr: greedy_csr(),
        })
        .await
        .expect("a certificate after the restart")
        .into_inner();
    assert_eq!(again.trust_anchors, issued.trust_anchors);
}

/// The certificate section of a sidecar's `/config_dump`.
async fn certificate(sidecar: &Sidecar) -> serde_json::Value {
    sidecar.config_dump().await.unwrap()["identity"]["certificate"].clone()
}

#[tokio::test]
async fn a_proxy_is_ready_once_certified_for_its_tokens_identity_and_renews_before_expiry() {
    let net = Network::new(2);
    let secrets = TempDir::new("identity");
    let ca_dir = secrets.0.join("ca");
    let tokens = secrets.0.join("tokens");
    std::fs::write(&tokens, format!("{TOKEN} shop/frontend\n")).unwrap();
    let token_file = secrets.0.join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    // Certificates that live 3 s: renewed every 2.1 s.
    let args = [
        "--ca-dir",
        ca_dir.to_str().unwrap(),
        "--bootstrap-tokens",
        tokens.to_str().unwrap(),
        "--certificate-lifetime",
        "3s",
    ];
    let cp = ControlPlane::start_with(net.pod(1), &[], &args).await;
    let url = format!("https://{}:{GRPC_PORT}", cp.pod.ip);
    let anchors = ca_dir.join("ca.crt");
    let run_args = [
        "--control-plane",
        url.as_str(),
        "--trust-anchors",
        anchors.to_str().unwrap(),
        "--identity-token-file",
        token_file.to_str().unwrap(),
        "--pod-namespace",
        "shop",
        "--pod-name",
        "client",
    ];
    // Start-up waits for /ready: the certificate and the first config, both
    // over TLS.
    let proxy = Sidecar::start(
        net.pod(0),
        Options {
            run_args: &run_args,
            ..Default::default()
        },
    )
    .await;
    let first = certificate(&proxy).await;
    assert_eq!(
        first["identity"],
        "spiffe://cluster.local/ns/shop/sa/frontend"
    );
    assert!(first["expiresInSeconds"].as_u64().unwrap() <= 3, "{first}");
    let renewed = until(Duration::from_secs(20), "a renewed certificate", || async {
        let now = certificate(&proxy).await;
        match now["serial"] != first["serial"] {
            true => Ok(now),
            false => Err(format!("still {}", now["serial"])),
        }
    })
    .await;
    assert_eq!(renewed["identity"], first["identity"]);
    let metrics = proxy.metrics().await;
    assert!(metrics.sum("trellis_identity_renewals_total", &[("result", "ok")]) >= 2.0);
    assert_eq!(
        metrics.sum("trellis_identity_renewals_total", &[("result", "error")]),
        0.0
    );
    // Neither admin port shows a secret: no key, no token.
    let cp_admin = cp.admin();
    for (pod, addr, path) in [
        (&net.pod(0), cp_admin, "/status"),
        (&net.pod(0), cp_admin, "/proxies"),
        (&net.pod(0), cp_admin, "/metrics"),
        (&net.pod(0), trellis_tests::sidecar::admin(), "/config_dump"),
        (&net.pod(0), trellis_tests::sidecar::admin(), "/metrics"),
    ] {
        let (status, _, body) = get(pod, addr, path).await.unwrap();
        assert_eq!(status, 200, "{path}");
        let body = String::from_utf8_lossy(&body);
        assert!(!body.contains(TOKEN), "{addr}{path} shows the token");
        assert!(!body.contains("PRIVATE KEY"), "{addr}{path} shows a key");
    }
}

#[test]
fn an_identity_token_is_never_sent_to_a_plaintext_control_plane() {
    let dir = TempDir::new("token");
    let token = dir.0.join("token");
    std::fs::write(&token, "s3cret").unwrap();
    let output = run_refused(&[
        "--control-plane".as_ref(),
        "http://127.0.0.1:1".as_ref(),
        "--identity-token-file".as_ref(),
        token.as_os_str(),
    ]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("never sent in plaintext"), "{stderr}");

    // And an https:// control plane needs trust anchors to check it against.
    let output = run_refused(&["--control-plane", "https://127.0.0.1:1"]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("needs --trust-anchors"), "{stderr}");
}
