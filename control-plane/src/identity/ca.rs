//! The mesh's certificate authority: a root (or an intermediate an operator's root
//! signed) kept as `ca.crt` and `ca.key` in a directory, made on first start when
//! neither file exists and never made again over an existing one.
//!
//! What proxies trust is the trust bundle: `trust-bundle.crt` beside them when it
//! exists, else `ca.crt` alone. A bundle of two roots is how a root rotates with no
//! failed request: first both roots in the bundle (signing with the old), then
//! signing with the new, then the new alone. A bundle that would not verify what
//! the authority signs is refused at start, not discovered in traffic.
//!
//! It signs a certificate for the key of a CSR and the identity a credential
//! proved. Nothing of what the CSR asks for is taken but its key (and the proof
//! that the requester holds it, its signature): the certificate carries
//! `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>` as its only
//! subject alternative name, serverAuth and clientAuth, and lives for the
//! configured lifetime but never past the issuer's own expiry.

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use std::{
    fmt, fs,
    io::Write,
    path::Path,
    time::{Duration, SystemTime},
};
use time::OffsetDateTime;
use trellis_proto::model::config::Workload;
use x509_parser::prelude::X509Certificate;

/// How long a generated root lives.
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Certificates start this much before they are issued, for clocks a little behind.
const CLOCK_SKEW: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// What is wrong with where the root is kept (a file, a Secret).
    #[error("{place}: {message}")]
    Root { place: String, message: String },
    #[error("the CSR is not valid: {0}")]
    Csr(String),
    #[error("cannot sign: {0}")]
    Sign(String),
}

/// A certificate the authority issued.
pub struct Issued {
    /// DER, the new certificate first, then the authority's.
    pub chain: Vec<Vec<u8>>,
    pub not_after: SystemTime,
    pub identity: String,
}

pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    cert_der: Vec<u8>,
    not_after: OffsetDateTime,
    /// The roots proxies trust, DER.
    trust_bundle: Vec<Vec<u8>>,
    /// When the first of them expires.
    roots_not_after: SystemTime,
    trust_domain: String,
    lifetime: Duration,
}

fn files_error(path: &Path, message: impl fmt::Display) -> CaError {
    CaError::Root {
        place: path.display().to_string(),
        message: message.to_string(),
    }
}

impl Authority {
    /// The authority kept in `dir` (`ca.crt`, `ca.key`, and `trust-bundle.crt` if
    /// it is there), made there when neither of the first two exists. One without
    /// the other is refused rather than replaced.
    pub fn load_or_create(
        dir: &Path,
        trust_domain: &str,
        lifetime: Duration,
    ) -> Result<Authority, CaError> {
        let (cert_path, key_path) = (dir.join("ca.crt"), dir.join("ca.key"));
        match (cert_path.exists(), key_path.exists()) {
            (true, true) => {}
            (false, false) => {
                fs::create_dir_all(dir).map_err(|e| files_error(dir, e))?;
                let (cert_pem, key_pem) = new_root(trust_domain)?;
                write_new(&key_path, &key_pem, 0o600)?;
                write_new(&cert_path, &cert_pem, 0o644)?;
                tracing::info!(dir = %dir.display(), "made a new mesh root");
            }
            (true, false) => {
                return Err(files_error(&key_path, "missing, while ca.crt exists"));
            }
            (false, true) => {
                return Err(files_error(&cert_path, "missing, while ca.key exists"));
            }
        }
        let read = |path: &Path| fs::read_to_string(path).map_err(|e| files_error(path, e));
        let (cert_pem, key_pem) = (read(&cert_path)?, read(&key_path)?);
        let bundle_path = dir.join(TRUST_BUNDLE);
        let bundle = match bundle_path.exists() {
            true => Some(read(&bundle_path)?),
            false => None,
        };
        Authority::from_pem(
            &cert_pem,
            &key_pem,
            bundle.as_deref(),
            &dir.display().to_string(),
            trust_domain,
            lifetime,
        )
    }

    /// The authority of a root (`ca.crt`) and its key (`ca.key`), both PEM, and
    /// the roots proxies trust (`trust-bundle.crt`; absent: `ca.crt`), kept at
    /// `place` (named in errors).
    pub fn from_pem(
        cert_pem: &str,
        key_pem: &str,
        bundle_pem: Option<&str>,
        place: &str,
        trust_domain: &str,
        lifetime: Duration,
    ) -> Result<Authority, CaError> {
        let error = |what: &str, message: String| CaError::Root {
            place: format!("{place}: {what}"),
            message,
        };
        let key = KeyPair::from_pem(key_pem).map_err(|e| error("ca.key", e.to_string()))?;
        let cert_der = pem_der(cert_pem).map_err(|e| error("ca.crt", e))?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&cert_der)
            .map_err(|e| error("ca.crt", e.to_string()))?;
        if !parsed.is_ca() {
            return Err(error("ca.crt", "not a CA certificate".into()));
        }
        let not_after = parsed.validity().not_after.to_datetime();
        let trust_bundle = match bundle_pem {
            None => vec![cert_der.clone()],
            Some(text) => trust_bundle(text, &parsed).map_err(|e| error(TRUST_BUNDLE, e))?,
        };
        let roots_not_after = trust_bundle
            .iter()
            .filter_map(|der| x509_parser::parse_x509_certificate(der).ok())
            .map(|(_, root)| SystemTime::from(root.validity().not_after.to_datetime()))
            .min()
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let issuer = Issuer::from_ca_cert_der(&cert_der.clone().into(), key)
            .map_err(|e| error("ca.crt", format!("does not go with ca.key: {e}")))?;
        Ok(Authority {
            issuer,
            cert_der,
            not_after,
            trust_bundle,
            roots_not_after,
            trust_domain: trust_domain.to_owned(),
            lifetime,
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The authority's own certificate (the issuer), DER.
    pub fn issuer_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// The roots proxies should trust, DER.
    pub fn trust_bundle(&self) -> &[Vec<u8>] {
        &self.trust_bundle
    }

    /// The trust bundle as PEM, as TLS configurations and ConfigMaps take it.
    pub fn trust_bundle_pem(&self) -> String {
        self.trust_bundle
            .iter()
            .map(|der| pem::encode(&pem::Pem::new("CERTIFICATE", der.clone())))
            .collect()
    }

    /// When the authority's own certificate (the issuer) expires.
    pub fn not_after(&self) -> SystemTime {
        SystemTime::from(self.not_after)
    }

    /// When the first root of the trust bundle expires.
    pub fn roots_not_after(&self) -> SystemTime {
        self.roots_not_after
    }

    /// A certificate for `workload` and the key of `csr` (PKCS#10, DER).
    pub fn certify(&self, workload: &Workload, csr: &[u8]) -> Result<Issued, CaError> {
        // Parsing checks the CSR's signature: the requester holds the key.
        let request = CertificateSigningRequestParams::from_der(&csr.to_vec().into())
            .map_err(|e| CaError::Csr(e.to_string()))?;
        let (params, identity) = self.leaf(workload)?;
        let cert = params
            .signed_by(&request.public_key, &self.issuer)
            .map_err(sign_error)?;
        Ok(Issued {
            chain: vec![cert.der().to_vec(), self.cert_der.clone()],
            not_after: SystemTime::from(params.not_after),
            identity,
        })
    }

    /// A certificate chain and key (PEM) for the control plane's own TLS server,
    /// as `workload`, also valid for `dns_names` (what proxies and the API server
    /// dial it by; an address becomes an IP SAN).
    pub fn serving_certificate(
        &self,
        workload: &Workload,
        dns_names: &[String],
    ) -> Result<(String, String), CaError> {
        let key = KeyPair::generate().map_err(sign_error)?;
        let (mut params, _) = self.leaf(workload)?;
        for name in dns_names {
            // An address (a webhook the API server calls on loopback) is an IP SAN.
            let san = match name.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(name.clone().try_into().map_err(sign_error)?),
            };
            params.subject_alt_names.push(san);
        }
        let cert = params.signed_by(&key, &self.issuer).map_err(sign_error)?;
        let root = pem::encode(&pem::Pem::new("CERTIFICATE", self.cert_der.clone()));
        Ok((format!("{}{root}", cert.pem()), key.serialize_pem()))
    }

    /// What every certificate the authority issues says: the workload's SPIFFE ID
    /// as its only name, both TLS usages, from now (less clock skew) for the
    /// lifetime, but not past the authority's own expiry.
    fn leaf(&self, workload: &Workload) -> Result<(CertificateParams, String), CaError> {
        let identity = workload.spiffe_id(&self.trust_domain);
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        let uri = identity.clone().try_into().map_err(sign_error)?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.is_ca = IsCa::ExplicitNoCa;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - CLOCK_SKEW;
        params.not_after = (now + self.lifetime).min(self.not_after);
        Ok((params, identity))
    }
}

/// The file (and Secret key) of the trust bundle.
pub const TRUST_BUNDLE: &str = "trust-bundle.crt";

/// The CA certificates of a PEM bundle, DER, if one of them is `issuer` itself or
/// signed it: otherwise proxies would refuse every certificate it signs.
fn trust_bundle(text: &str, issuer: &X509Certificate<'_>) -> Result<Vec<Vec<u8>>, String> {
    let blocks = pem::parse_many(text).map_err(|e| e.to_string())?;
    let mut roots = Vec::new();
    let mut anchors_issuer = false;
    for (i, block) in blocks.iter().enumerate() {
        if block.tag() != "CERTIFICATE" {
            return Err(format!(
                "block {} is a {}, not a CERTIFICATE",
                i + 1,
                block.tag()
            ));
        }
        let (_, root) = x509_parser::parse_x509_certificate(block.contents())
            .map_err(|e| format!("certificate {}: {e}", i + 1))?;
        if !root.is_ca() {
            return Err(format!("certificate {} is not a CA certificate", i + 1));
        }
        anchors_issuer |= block.contents() == issuer.as_raw()
            || (root.subject() == issuer.issuer()
                && issuer.verify_signature(Some(root.public_key())).is_ok());
        roots.push(block.contents().to_vec());
    }
    if roots.is_empty() {
        return Err("holds no certificate".into());
    }
    if !anchors_issuer {
        return Err("holds neither ca.crt nor the root that signed it: proxies would refuse every certificate issued".into());
    }
    Ok(roots)
}

fn sign_error(error: rcgen::Error) -> CaError {
    CaError::Sign(error.to_string())
}

/// A new self-signed root for `trust_domain`: (certificate PEM, key PEM).
pub fn new_root(trust_domain: &str) -> Result<(String, String), CaError> {
    let key = KeyPair::generate().map_err(sign_error)?;
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, format!("trellis root ({trust_domain})"));
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - CLOCK_SKEW;
    params.not_after = now + ROOT_LIFETIME;
    let cert = params.self_signed(&key).map_err(sign_error)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Writes a file that must not exist yet, readable as `mode` says.
fn write_new(path: &Path, text: &str, mode: u32) -> Result<(), CaError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| files_error(path, e))?;
    file.write_all(text.as_bytes())
        .map_err(|e| files_error(path, e))
}

/// The DER of the certificate in `text` (PEM).
fn pem_der(text: &str) -> Result<Vec<u8>, String> {
    let parsed = pem::parse(text).map_err(|e| e.to_string())?;
    if parsed.tag() != "CERTIFICATE" {
        return Err(format!("holds a {}, not a CERTIFICATE", parsed.tag()));
    }
    Ok(parsed.into_contents())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use x509_parser::extensions::{GeneralName, ParsedExtension};

    const DAY: Duration = Duration::from_secs(24 * 3600);

    /// A directory of its own under the temp dir, removed on drop.
    struct Dir(PathBuf);

    impl Dir {
        fn new(name: &str) -> Dir {
            let path =
                std::env::temp_dir().join(format!("trellis-ca-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&path);
            Dir(path)
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn frontend() -> Workload {
        Workload {
            namespace: "shop".into(),
            service_account: "frontend".into(),
        }
    }

    /// A CSR for a new key that asks for `uri` and a DNS name.
    fn csr_asking_for(uri: &str) -> Vec<u8> {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["evil.example".to_owned()]).unwrap();
        params
            .subject_alt_names
            .push(SanType::URI(uri.to_owned().try_into().unwrap()));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.serialize_request(&key).unwrap().der().to_vec()
    }

    fn parse(der: &[u8]) -> X509Certificate<'_> {
        x509_parser::parse_x509_certificate(der).unwrap().1
    }

    #[test]
    fn a_root_is_made_once_and_kept_across_restarts() {
        let dir = Dir::new("keep");
        let first = Authority::load_or_create(&dir.0, "cluster.local", DAY).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(dir.0.join("ca.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(
            mode & 0o777,
            0o600,
            "the key is for the control plane alone"
        );
        let again = Authority::load_or_create(&dir.0, "cluster.local", DAY).unwrap();
        assert_eq!(
            first.issuer_der(),
            again.issuer_der(),
            "the same root after a restart"
        );
        assert!(parse(again.issuer_der()).is_ca());
        let years = again.not_after().duration_since(SystemTime::now()).unwrap();
        assert!(years > Duration::from_secs(9 * 365 * 24 * 3600));
    }

    #[test]
    fn one_file_without_the_other_is_refused_and_not_replaced() {
        let dir = Dir::new("half");
        Authority::load_or_create(&dir.0, "cluster.local", DAY).unwrap();
        let root = fs::read(dir.0.join("ca.crt")).unwrap();
        fs::remove_file(dir.0.join("ca.key")).unwrap();
        let error = Authority::load_or_create(&dir.0, "cluster.local", DAY)
            .err()
            .unwrap();
        assert!(error.to_string().contains("ca.key: missing"), "{error}");
        assert_eq!(
            fs::read(dir.0.join("ca.crt")).unwrap(),
            root,
            "left as it was"
        );
        assert!(!dir.0.join("ca.key").exists());
    }

    #[test]
    fn a_certificate_carries_the_credentials_identity_and_nothing_the_csr_asked_for() {
        let dir = Dir::new("leaf");
        let ca = Authority::load_or_create(&dir.0, "cluster.local", DAY).unwrap();
        let issued = ca
            .certify(
                &frontend(),
                &csr_asking_for("spiffe://cluster.local/ns/kube-system/sa/admin"),
            )
            .unwrap();
        assert_eq!(
            issued.identity,
            "spiffe://cluster.local/ns/shop/sa/frontend"
        );
        assert_eq!(issued.chain.len(), 2);
        assert_eq!(issued.chain[1], ca.issuer_der());
        let leaf = parse(&issued.chain[0]);
        let root = parse(ca.issuer_der());
        leaf.verify_signature(Some(root.public_key()))
            .expect("signed by the root");
        assert!(!leaf.is_ca(), "the CSR asked to be a CA; it is not");
        let mut names = Vec::new();
        let mut usages = None;
        for extension in leaf.extensions() {
            match extension.parsed_extension() {
                ParsedExtension::SubjectAlternativeName(san) => {
                    for name in &san.general_names {
                        names.push(match name {
                            GeneralName::URI(uri) => format!("uri:{uri}"),
                            other => format!("{other:?}"),
                        });
                    }
                }
                ParsedExtension::ExtendedKeyUsage(eku) => {
                    usages = Some((eku.server_auth, eku.client_auth));
                }
                _ => {}
            }
        }
        assert_eq!(names, ["uri:spiffe://cluster.local/ns/shop/sa/frontend"]);
        assert_eq!(usages, Some((true, true)));
        let lifetime =
            leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp();
        assert_eq!(lifetime, (DAY + CLOCK_SKEW).as_secs() as i64);
    }

    #[test]
    fn a_certificate_never_outlives_its_issuer() {
        let dir = Dir::new("short");
        fs::create_dir_all(&dir.0).unwrap();
        // An operator's root that expires in an hour.
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        params.not_after = OffsetDateTime::now_utc() + Duration::from_secs(3600);
        let root = params.self_signed(&key).unwrap();
        fs::write(dir.0.join("ca.crt"), root.pem()).unwrap();
        fs::write(dir.0.join("ca.key"), key.serialize_pem()).unwrap();
        let ca = Authority::load_or_create(&dir.0, "cluster.local", DAY).unwrap();
        let issued = ca
            .certify(&frontend(), &csr_asking_for("spiffe://x/y"))
            .unwrap();
        assert!(issued.not_after <= ca.not_after());
        let left = issued.not_after.duration_since(SystemTime::now()).unwrap();
        assert!(left <= Duration::from_secs(3600), "{left:?}");
    }

    #[test]
    fn a_csr_that_does_not_prove_its_key_is_refused() {
        let dir = Dir::new("forged");
        let ca = Authority::load_or_create(&dir.0, "cluster.local", DAY).unwrap();
        let mut csr = csr_asking_for("spiffe://x/y");
        let last = csr.len() - 1;
        csr[last] ^= 0xff;
        assert!(matches!(
            ca.certify(&frontend(), &csr),
            Err(CaError::Csr(_))
        ));
        assert!(matches!(
            ca.certify(&frontend(), b"junk"),
            Err(CaError::Csr(_))
        ));
    }

    #[test]
    fn the_serving_certificate_names_the_control_plane_and_its_dns_names() {
        let dir = Dir::new("serving");
        let ca = Authority::load_or_create(&dir.0, "cluster.local", DAY).unwrap();
        let workload = Workload {
            namespace: "trellis-system".into(),
            service_account: "trellis-control-plane".into(),
        };
        let names = [
            "trellis-control-plane.trellis-system.svc".to_owned(),
            "127.0.0.1".to_owned(),
        ];
        let (chain, key) = ca.serving_certificate(&workload, &names).unwrap();
        assert!(KeyPair::from_pem(&key).is_ok());
        let leaf = pem::parse_many(&chain).unwrap();
        assert_eq!(leaf.len(), 2, "the certificate and the root");
        let text = format!("{:?}", parse(leaf[0].contents()).subject_alternative_name());
        assert!(
            text.contains("trellis-control-plane.trellis-system.svc"),
            "{text}"
        );
        assert!(
            text.contains("spiffe://cluster.local/ns/trellis-system/sa/trellis-control-plane"),
            "{text}"
        );
        assert!(text.contains("IPAddress([127, 0, 0, 1])"), "{text}");
    }

    #[test]
    fn a_trust_bundle_of_two_roots_is_what_proxies_get_and_must_hold_the_issuers_root() {
        let dir = Dir::new("bundle");
        let ca = Authority::load_or_create(&dir.0, "cluster.local", DAY).unwrap();
        assert_eq!(
            ca.trust_bundle(),
            [ca.issuer_der().to_vec()],
            "no bundle: ca.crt"
        );
        let old = fs::read_to_string(dir.0.join("ca.crt")).unwrap();
        let (new, _) = new_root("cluster.local").unwrap();

        // Old and new, signing with the old: both roots are trusted.
        fs::write(dir.0.join(TRUST_BUNDLE), format!("{old}{new}")).unwrap();
        let ca = Authority::load_or_create(&dir.0, "cluster.local", DAY).unwrap();
        assert_eq!(ca.trust_bundle().len(), 2);
        assert_eq!(ca.trust_bundle()[0], ca.issuer_der());

        // A bundle without the root that signs would fail every handshake: refused.
        fs::write(dir.0.join(TRUST_BUNDLE), &new).unwrap();
        let error = Authority::load_or_create(&dir.0, "cluster.local", DAY)
            .err()
            .unwrap()
            .to_string();
        assert!(
            error.contains("trust-bundle.crt: holds neither ca.crt nor the root that signed it"),
            "{error}"
        );
    }

    #[test]
    fn an_intermediate_signed_by_an_operators_root_issues_under_that_root() {
        let root_key = KeyPair::generate().unwrap();
        let mut root = CertificateParams::new(Vec::new()).unwrap();
        root.distinguished_name
            .push(DnType::CommonName, "operator root");
        root.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let root_cert = root.self_signed(&root_key).unwrap();
        let operator = Issuer::new(root, root_key);
        let key = KeyPair::generate().unwrap();
        let mut intermediate = CertificateParams::new(Vec::new()).unwrap();
        intermediate
            .distinguished_name
            .push(DnType::CommonName, "trellis intermediate");
        intermediate.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        let intermediate = intermediate.signed_by(&key, &operator).unwrap();
        let ca = Authority::from_pem(
            &intermediate.pem(),
            &key.serialize_pem(),
            Some(&root_cert.pem()),
            "test",
            "cluster.local",
            DAY,
        )
        .unwrap();
        assert_eq!(ca.trust_bundle(), [root_cert.der().to_vec()]);
        let issued = ca
            .certify(&frontend(), &csr_asking_for("spiffe://x/y"))
            .unwrap();
        assert_eq!(issued.chain[1], intermediate.der().to_vec());
    }
}
