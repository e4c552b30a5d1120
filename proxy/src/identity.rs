//! The proxy's own identity. It makes an ECDSA P-256 key, which never leaves the
//! process, and asks the control plane to certify it with its identity token; it
//! keeps the certificate current, renewing at 70 % of its lifetime (Linkerd's
//! choice) with a new key and the token read again, and when the control plane
//! cannot be reached it keeps the certificate it has and tries again with backoff.

use crate::{backoff::backoff, control_plane::ControlPlane, rng::Rng};
use arc_swap::ArcSwapOption;
use rcgen::{CertificateParams, KeyPair};
use serde_json::json;
use std::{
    future::Future,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};
use trellis_proto::v1::{identity_client::IdentityClient, CertifyRequest};

/// Renew when this share of the certificate's lifetime has passed.
const RENEW_AT: f64 = 0.7;
const RETRY_BASE: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// Gauge: when the proxy's certificate expires, in seconds since the Unix epoch.
pub const CERTIFICATE_EXPIRY: &str = "trellis_identity_certificate_expiry_timestamp_seconds";
/// Counter, label `result` (`ok`, `error`): certificate requests.
pub const RENEWALS_TOTAL: &str = "trellis_identity_renewals_total";

/// A certificate the control plane issued for this proxy's key.
pub struct Credentials {
    /// The SPIFFE ID the certificate carries.
    pub identity: String,
    /// Hex, as `openssl x509 -serial` prints it.
    pub serial: String,
    pub not_after: SystemTime,
    /// DER, this proxy's certificate first.
    pub chain: Vec<Vec<u8>>,
    /// PKCS#8 DER; never shown anywhere.
    pub key: Vec<u8>,
    /// DER roots to check peers against.
    pub trust_anchors: Vec<Vec<u8>>,
}

/// The proxy's current credentials: none until the first certificate arrives.
#[derive(Default)]
pub struct Identity {
    current: ArcSwapOption<Credentials>,
    /// Woken when a certificate is stored.
    stored: tokio::sync::Notify,
}

impl Identity {
    pub fn current(&self) -> Option<Arc<Credentials>> {
        self.current.load_full()
    }

    /// Returns once there is a certificate.
    pub async fn wait_certified(&self) {
        loop {
            let stored = self.stored.notified();
            if self.is_certified() {
                return;
            }
            stored.await;
        }
    }

    /// Whether there is a certificate, without taking a reference to it (asked
    /// on every request).
    pub fn is_certified(&self) -> bool {
        self.current.load().is_some()
    }

    /// What `/config_dump` shows: who the certificate says the proxy is, its
    /// serial and expiry; never the key.
    pub fn dump(&self) -> serde_json::Value {
        match self.current() {
            None => json!({"certificate": null}),
            Some(credentials) => {
                let not_after = unix_seconds(credentials.not_after);
                let left = credentials
                    .not_after
                    .duration_since(SystemTime::now())
                    .map_or(0, |d| d.as_secs());
                let describe = |der: &Vec<u8>| match x509_parser::parse_x509_certificate(der) {
                    Ok((_, cert)) => json!({
                        "subject": cert.subject().to_string(),
                        "serial": serial_of(&cert),
                        "notAfter": cert.validity().not_after.timestamp(),
                    }),
                    Err(_) => json!(null),
                };
                json!({
                    "certificate": {
                        "identity": credentials.identity,
                        "serial": credentials.serial,
                        "notAfter": not_after,
                        "expiresInSeconds": left,
                        "issuer": credentials.chain.get(1).map(describe),
                    },
                    "trustAnchors": credentials.trust_anchors.iter().map(describe).collect::<Vec<_>>(),
                })
            }
        }
    }

    fn store(&self, credentials: Credentials) {
        metrics::gauge!(CERTIFICATE_EXPIRY).set(unix_seconds(credentials.not_after) as f64);
        tracing::info!(
            identity = %credentials.identity,
            serial = %credentials.serial,
            expires_in_s = credentials.not_after.duration_since(SystemTime::now()).map_or(0, |d| d.as_secs()),
            "certificate in place"
        );
        self.current.store(Some(Arc::new(credentials)));
        self.stored.notify_waiters();
    }
}

fn unix_seconds(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Keeps `identity` certified by the control plane with the token in `token_file`,
/// forever.
pub async fn run(control_plane: ControlPlane, token_file: PathBuf, identity: Arc<Identity>) {
    keep_current(&identity, || certify(&control_plane, &token_file)).await
}

/// The renewal schedule, whatever `fetch` asks: renew at [`RENEW_AT`] of each
/// certificate's lifetime; after a failure keep what there is and try again with
/// full-jitter backoff.
async fn keep_current<F, Fut>(identity: &Identity, mut fetch: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Credentials, String>>,
{
    let rng = Rng::from_entropy();
    let mut failures = 0u32;
    loop {
        match fetch().await {
            Ok(credentials) => {
                failures = 0;
                metrics::counter!(RENEWALS_TOTAL, "result" => "ok").increment(1);
                let lifetime = credentials
                    .not_after
                    .duration_since(SystemTime::now())
                    .unwrap_or_default();
                identity.store(credentials);
                tokio::time::sleep(lifetime.mul_f64(RENEW_AT)).await;
            }
            Err(error) => {
                failures = failures.saturating_add(1);
                metrics::counter!(RENEWALS_TOTAL, "result" => "error").increment(1);
                tracing::warn!(
                    %error,
                    keeping = identity.current().is_some(),
                    "cannot get a certificate; keeping the one there is and trying again"
                );
                tokio::time::sleep(backoff(RETRY_BASE, RETRY_MAX, failures, &rng)).await;
            }
        }
    }
}

/// A certificate's serial in hex, as `openssl x509 -serial` prints it.
fn serial_of(certificate: &x509_parser::certificate::X509Certificate<'_>) -> String {
    certificate
        .raw_serial_as_string()
        .replace(':', "")
        .to_uppercase()
}

/// One request: a new key, the token as it is now, the certificate back.
async fn certify(control_plane: &ControlPlane, token_file: &Path) -> Result<Credentials, String> {
    let token = std::fs::read_to_string(token_file)
        .map_err(|e| format!("--identity-token-file {}: {e}", token_file.display()))?;
    let key = KeyPair::generate().map_err(|e| format!("cannot make a key: {e}"))?;
    let csr = CertificateParams::default()
        .serialize_request(&key)
        .map_err(|e| format!("cannot make a CSR: {e}"))?;
    let channel = control_plane
        .connect()
        .await
        .map_err(|e| format!("cannot reach the control plane: {e}"))?;
    let response = IdentityClient::new(channel)
        .certify(CertifyRequest {
            token: token.trim().to_owned(),
            csr: csr.der().to_vec(),
        })
        .await
        .map_err(|status| format!("refused: {}", status.message()))?
        .into_inner();
    let leaf = response
        .chain
        .first()
        .ok_or("the answer holds no certificate")?;
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| format!("the certificate does not parse: {e}"))?;
    let not_after = UNIX_EPOCH
        + Duration::from_secs(u64::try_from(parsed.validity().not_after.timestamp()).unwrap_or(0));
    let key = key.serialize_der();
    control_plane.certified(&response.trust_anchors, &response.chain, &key);
    Ok(Credentials {
        identity: response.identity,
        serial: serial_of(&parsed),
        not_after,
        chain: response.chain,
        key,
        trust_anchors: response.trust_anchors,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use tokio::time::Instant;

    fn credentials(serial: &str, lifetime: Duration) -> Credentials {
        Credentials {
            identity: "spiffe://cluster.local/ns/shop/sa/frontend".into(),
            serial: serial.into(),
            not_after: SystemTime::now() + lifetime,
            chain: vec![],
            key: vec![1, 2, 3],
            trust_anchors: vec![],
        }
    }

    #[tokio::test(start_paused = true)]
    async fn renews_at_70_percent_and_keeps_the_certificate_while_the_ca_is_away() {
        let identity = Identity::default();
        let start = Instant::now();
        // What each request gets: a 100 s certificate, then the CA is away twice,
        // then another certificate.
        let answers = Mutex::new(vec![
            Ok(credentials("A", Duration::from_secs(100))),
            Err("unreachable".to_owned()),
            Err("unreachable".to_owned()),
            Ok(credentials("B", Duration::from_secs(100))),
        ]);
        let asked_at = Mutex::new(Vec::new());
        let held = Mutex::new(Vec::new());
        let schedule = keep_current(&identity, || {
            asked_at.lock().unwrap().push(start.elapsed());
            held.lock()
                .unwrap()
                .push(identity.current().map(|c| c.serial.clone()));
            let answer = answers.lock().unwrap().remove(0);
            async move { answer }
        });
        // Runs until the fourth answer is in place.
        let _ = tokio::time::timeout(Duration::from_secs(200), async {
            tokio::select! {
                _ = schedule => {}
                _ = async {
                    loop {
                        if identity.current().is_some_and(|c| c.serial == "B") {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                } => {}
            }
        })
        .await;
        let asked = asked_at.lock().unwrap().clone();
        assert_eq!(asked.len(), 4, "{asked:?}");
        assert_eq!(asked[0], Duration::ZERO);
        // 70 % of the 100 s it had left (SystemTime is not paused; allow for it).
        assert!(
            (Duration::from_secs(69)..=Duration::from_secs(70)).contains(&asked[1]),
            "{asked:?}"
        );
        // Then backoff: the first retry within 1 s, the second within 2 s more.
        assert!(asked[2] - asked[1] < Duration::from_secs(1), "{asked:?}");
        assert!(asked[3] - asked[2] < Duration::from_secs(2), "{asked:?}");
        assert_eq!(identity.current().unwrap().serial, "B");
        // While the CA was away, the proxy kept the certificate it had.
        let held = held.lock().unwrap().clone();
        assert_eq!(
            held,
            [None, Some("A".into()), Some("A".into()), Some("A".into())]
        );
    }

    #[test]
    fn the_dump_shows_identity_serial_and_expiry_never_the_key() {
        let identity = Identity::default();
        assert_eq!(identity.dump(), json!({"certificate": null}));
        identity.store(credentials("0A1B", Duration::from_secs(3600)));
        let dump = identity.dump();
        let certificate = &dump["certificate"];
        assert_eq!(certificate["serial"], "0A1B");
        assert_eq!(
            certificate["identity"],
            "spiffe://cluster.local/ns/shop/sa/frontend"
        );
        assert!(certificate["expiresInSeconds"].as_u64().unwrap() > 3500);
        assert!(!dump.to_string().contains("key"), "{dump}");
    }
}
