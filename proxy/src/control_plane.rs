//! The proxy's connection to the control plane, shared by the discovery stream
//! and the identity client: a gRPC channel, over TLS checked against the trust
//! anchors when the URL is `https://` (the identity token is a secret and never
//! travels in plaintext).

use std::{path::Path, time::Duration};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// How long connecting to the control plane may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct ControlPlane {
    url: String,
    tls: Option<ClientTlsConfig>,
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
                Some(
                    ClientTlsConfig::new()
                        .ca_certificate(Certificate::from_pem(roots))
                        .domain_name(server_name),
                )
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

    /// A new connection.
    pub async fn connect(&self) -> Result<Channel, tonic::transport::Error> {
        let mut endpoint =
            Endpoint::from_shared(self.url.clone())?.connect_timeout(CONNECT_TIMEOUT);
        if let Some(tls) = &self.tls {
            endpoint = endpoint.tls_config(tls.clone())?;
        }
        endpoint.connect().await
    }
}
