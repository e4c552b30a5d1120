//! Mutual TLS between meshed proxies: TLS 1.3 only, no resumption, one mesh ALPN
//! naming the protocol inside (HTTP/1, HTTP/2, opaque), each side's certificate
//! from the mesh CA ([`crate::identity`]).
//!
//! The calling proxy checks the peer's chain against the trust anchors and that its
//! only identity, a SPIFFE URI (the stock webpki verifier refuses certificates that
//! carry no DNS name), is the one the config expects for that endpoint. The
//! receiving proxy requires a client certificate from the same roots and takes the
//! caller's identity from it.

use crate::identity::Credentials;
use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{ring, CryptoProvider, WebPkiSupportedAlgorithms},
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime},
    server::WebPkiClientVerifier,
    ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme,
};
use std::sync::Arc;

/// ALPN of mesh mTLS carrying HTTP/1.1.
pub const ALPN_HTTP1: &[u8] = b"trellis.dev/http1";
/// ALPN of mesh mTLS carrying HTTP/2.
pub const ALPN_HTTP2: &[u8] = b"trellis.dev/h2";
/// ALPN of mesh mTLS carrying opaque bytes.
pub const ALPN_OPAQUE: &[u8] = b"trellis.dev/opaque";

/// Whether a ClientHello's ALPN list asks for mesh mTLS.
pub fn is_mesh_alpn(protocol: &[u8]) -> bool {
    [ALPN_HTTP1, ALPN_HTTP2, ALPN_OPAQUE].contains(&protocol)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

fn roots(credentials: &Credentials) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for anchor in &credentials.trust_anchors {
        roots
            .add(CertificateDer::from(anchor.clone()))
            .map_err(|e| format!("a trust anchor does not parse: {e}"))?;
    }
    Ok(roots)
}

fn chain_and_key(
    credentials: &Credentials,
) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let chain = credentials
        .chain
        .iter()
        .map(|der| CertificateDer::from(der.clone()))
        .collect();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(credentials.key.clone()));
    (chain, key)
}

/// What a proxy calling a meshed endpoint presents and expects: its own
/// certificate, and `peer` (a SPIFFE ID) as the endpoint's only identity.
pub fn client_config(
    credentials: &Credentials,
    peer: &str,
    alpn: &[u8],
) -> Result<Arc<ClientConfig>, String> {
    let provider = provider();
    let verifier = SpiffeVerifier {
        roots: Arc::new(roots(credentials)?),
        expected: peer.to_owned(),
        algorithms: provider.signature_verification_algorithms,
    };
    let (chain, key) = chain_and_key(credentials);
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(chain, key)
        .map_err(|e| format!("the proxy's own certificate: {e}"))?;
    config.alpn_protocols = vec![alpn.to_vec()];
    config.resumption = rustls::client::Resumption::disabled();
    config.enable_sni = false;
    Ok(Arc::new(config))
}

/// What a proxy accepting mesh mTLS presents and requires: its own certificate,
/// and a client certificate from the trust anchors.
pub fn server_config(credentials: &Credentials) -> Result<Arc<ServerConfig>, String> {
    let provider = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots(credentials)?),
        provider.clone(),
    )
    .build()
    .map_err(|e| format!("the trust anchors: {e}"))?;
    let (chain, key) = chain_and_key(credentials);
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| format!("the proxy's own certificate: {e}"))?;
    config.alpn_protocols = vec![
        ALPN_HTTP2.to_vec(),
        ALPN_HTTP1.to_vec(),
        ALPN_OPAQUE.to_vec(),
    ];
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// The SPIFFE URIs a certificate names.
pub fn uri_names(der: &[u8]) -> Vec<String> {
    let Ok((_, certificate)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let Ok(Some(san)) = certificate.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            x509_parser::extensions::GeneralName::URI(uri) => Some((*uri).to_owned()),
            _ => None,
        })
        .collect()
}

/// Checks the server's chain against the mesh roots and its identity against the
/// one expected, instead of a DNS name.
#[derive(Debug)]
struct SpiffeVerifier {
    roots: Arc<RootCertStore>,
    expected: String,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for SpiffeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let certificate = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|e| rustls::Error::General(format!("the peer's certificate: {e}")))?;
        certificate
            .verify_for_usage(
                self.algorithms.all,
                &self.roots.roots,
                intermediates,
                now,
                webpki::KeyUsage::server_auth(),
                None,
                None,
            )
            .map_err(|e| rustls::Error::General(format!("the peer's chain: {e}")))?;
        let names = uri_names(end_entity);
        if names != [self.expected.as_str()] {
            return Err(rustls::Error::General(format!(
                "the peer is {names:?}, not {}",
                self.expected
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("mesh mTLS is TLS 1.3 only".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
        SanType,
    };

    /// A root and a leaf it signed for `uri`, as DER.
    fn chain(uri: &str) -> (Vec<u8>, Vec<u8>) {
        let root_key = KeyPair::generate().unwrap();
        let mut root = CertificateParams::default();
        root.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let root_cert = root.self_signed(&root_key).unwrap();
        let issuer = Issuer::new(root, root_key);
        let leaf_key = KeyPair::generate().unwrap();
        let mut leaf = CertificateParams::default();
        leaf.subject_alt_names = vec![SanType::URI(uri.to_owned().try_into().unwrap())];
        leaf.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let leaf_cert = leaf.signed_by(&leaf_key, &issuer).unwrap();
        (root_cert.der().to_vec(), leaf_cert.der().to_vec())
    }

    fn verifier(root: &[u8], expected: &str) -> SpiffeVerifier {
        let mut roots = RootCertStore::empty();
        roots.add(CertificateDer::from(root.to_vec())).unwrap();
        SpiffeVerifier {
            roots: Arc::new(roots),
            expected: expected.to_owned(),
            algorithms: provider().signature_verification_algorithms,
        }
    }

    fn check(verifier: &SpiffeVerifier, leaf: &[u8]) -> Result<(), String> {
        let name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
        verifier
            .verify_server_cert(
                &CertificateDer::from(leaf.to_vec()),
                &[],
                &name,
                &[],
                UnixTime::now(),
            )
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn the_peer_must_chain_to_the_roots_and_be_the_identity_expected() {
        let reviews = "spiffe://cluster.local/ns/shop/sa/reviews";
        let (root, leaf) = chain(reviews);
        assert_eq!(uri_names(&leaf), [reviews]);
        assert!(check(&verifier(&root, reviews), &leaf).is_ok());
        // Someone else, from the same roots.
        let error = check(
            &verifier(&root, "spiffe://cluster.local/ns/shop/sa/other"),
            &leaf,
        )
        .unwrap_err();
        assert!(
            error.contains("not spiffe://cluster.local/ns/shop/sa/other"),
            "{error}"
        );
        // The right name, from another CA.
        let (other_root, _) = chain(reviews);
        let error = check(&verifier(&other_root, reviews), &leaf).unwrap_err();
        assert!(error.contains("chain"), "{error}");
    }

    #[test]
    fn mesh_alpns_are_told_from_the_apps_own() {
        for alpn in [ALPN_HTTP1, ALPN_HTTP2, ALPN_OPAQUE] {
            assert!(is_mesh_alpn(alpn));
        }
        assert!(!is_mesh_alpn(b"h2"));
        assert!(!is_mesh_alpn(b"http/1.1"));
    }
}
