//! The proxy's connection to the control plane, shared by the discovery stream
//! and the identity client: a gRPC channel, over TLS checked against the trust
//! anchors when the URL is `https://` (the identity token is a secret and never
//! travels in plaintext). The anchors start as `--trust-anchors` and follow the
//! trust bundle each certificate arrives with, so a root rotated by the control
//! plane is trusted here without a restart. Once the proxy has a certificate it
//! presents it too, so that the control plane knows which workload the discovery
//! stream is for.

use arc_swap::ArcSwap;
use std::{path::Path, sync::Arc, time::Duration};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// How long connecting to the control plane may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct ControlPlane {
    url: String,
    /// The TLS configuration calls use, and the name the server's certificate
    /// must carry.
    tls: Option<(Arc<ArcSwap<ClientTlsConfig>>, String)>,
}

impl ControlPlane {
    /// `url` with, for `https://`, the PEM roots in `trust_anchors` and the name
    /// its certificate must carry; an error says what is missing or unreadable.
    pub fn new(
        url: &str,
        trust_anchors: Option<&Path>,
        server_name: &str,
    ) -> Result<ControlPlane, String> {
        let tls = match (url.starts_with("https://"), trust_anchors) {
            (false, _) => None,
            (true, None) => {
                return Err(format!(
                    "--control-plane {url}: an https:// control plane needs --trust-anchors"
                ))
            }
            (true, Some(path)) => {
                let roots = std::fs::read_to_string(path)
                    .map_err(|e| format!("--trust-anchors {}: {e}", path.display()))?;
                if !roots.contains("-----BEGIN CERTIFICATE-----") {
                    return Err(format!(
                        "--trust-anchors {}: no PEM certificate in it",
                        path.display()
                    ));
                }
                let config = ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(roots))
                    .domain_name(server_name);
                Some((
                    Arc::new(ArcSwap::from_pointee(config)),
                    server_name.to_owned(),
                ))
            }
        };
        Ok(ControlPlane {
            url: url.to_owned(),
            tls,
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Whether calls to it are encrypted.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// From the next connection on: trusts `anchors` (DER roots, the bundle a
    /// certificate came with) instead of what was trusted before, and presents
    /// `chain` and `key` (DER, PKCS#8), the proxy's certificate.
    pub fn certified(&self, anchors: &[Vec<u8>], chain: &[Vec<u8>], key: &[u8]) {
        let Some((config, server_name)) = &self.tls else {
            return;
        };
        if anchors.is_empty() {
            return;
        }
        let pem_of = |tag: &str, der: &[u8]| pem::encode(&pem::Pem::new(tag, der.to_vec()));
        let roots: Vec<Certificate> = anchors
            .iter()
            .map(|der| Certificate::from_pem(pem_of("CERTIFICATE", der)))
            .collect();
        let chain: String = chain.iter().map(|der| pem_of("CERTIFICATE", der)).collect();
        config.store(Arc::new(
            ClientTlsConfig::new()
                .ca_certificates(roots)
                .domain_name(server_name)
                .identity(tonic::transport::Identity::from_pem(
                    chain,
                    pem_of("PRIVATE KEY", key),
                )),
        ));
    }

    /// A new connection.
    pub async fn connect(&self) -> Result<Channel, tonic::transport::Error> {
        let mut endpoint =
            Endpoint::from_shared(self.url.clone())?.connect_timeout(CONNECT_TIMEOUT);
        if let Some((tls, _)) = &self.tls {
            endpoint = endpoint.tls_config(ClientTlsConfig::clone(&tls.load()))?;
        }
        endpoint.connect().await
    }
}
