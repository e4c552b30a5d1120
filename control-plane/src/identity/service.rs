//! The identity service (`trellis.v1.Identity`): a proxy sends its credential and a
//! CSR for the key it made, and gets a certificate for the identity the credential
//! proves. Refusals are logged and counted; a refused request learns only that it
//! was refused and why in general terms, never which tokens exist.

use super::{
    ca::Authority,
    credentials::{Credentials, Refused},
};
use std::{sync::Arc, time::UNIX_EPOCH};
use tonic::{Request, Response, Status};
use trellis_proto::v1::{
    identity_server::{Identity, IdentityServer},
    CertifyRequest, CertifyResponse,
};

/// Counter, label `result`: `issued`, `bad_credential`, `bad_csr`, `error`.
pub const CERTIFICATES_TOTAL: &str = "trellis_ca_certificates_total";
/// Gauge: seconds until the authority's own certificate (the issuer) expires.
pub const ISSUER_EXPIRY_SECONDS: &str = "trellis_ca_issuer_expiry_seconds";
/// Gauge: seconds until the first root of the trust bundle expires.
pub const ROOT_EXPIRY_SECONDS: &str = "trellis_ca_root_expiry_seconds";

pub fn describe_metrics() {
    metrics::describe_counter!(
        CERTIFICATES_TOTAL,
        metrics::Unit::Count,
        "Certificate requests by result: issued, bad_credential, bad_csr, error."
    );
    metrics::describe_gauge!(
        ISSUER_EXPIRY_SECONDS,
        metrics::Unit::Seconds,
        "Seconds until the certificate the mesh CA signs with expires: alert long before it does."
    );
    metrics::describe_gauge!(
        ROOT_EXPIRY_SECONDS,
        metrics::Unit::Seconds,
        "Seconds until the first root proxies trust expires: rotate it long before it does."
    );
}

pub struct IdentityService {
    authority: Arc<Authority>,
    credentials: Arc<Credentials>,
}

impl IdentityService {
    pub fn new(
        authority: Arc<Authority>,
        credentials: Arc<Credentials>,
    ) -> IdentityServer<IdentityService> {
        IdentityServer::new(IdentityService {
            authority,
            credentials,
        })
    }

    fn refused(result: &'static str, status: Status) -> Status {
        metrics::counter!(CERTIFICATES_TOTAL, "result" => result).increment(1);
        tracing::warn!(result, reason = status.message(), "certificate refused");
        status
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn certify(
        &self,
        request: Request<CertifyRequest>,
    ) -> Result<Response<CertifyResponse>, Status> {
        let request = request.into_inner();
        let workload = match self.credentials.identity_of(&request.token).await {
            Ok(workload) => workload,
            Err(Refused::Invalid(reason)) => {
                tracing::debug!(%reason, "credential refused");
                return Err(Self::refused(
                    "bad_credential",
                    Status::unauthenticated("the credential is not valid"),
                ));
            }
            Err(error @ Refused::Unavailable(_)) => {
                return Err(Self::refused(
                    "error",
                    Status::unavailable(error.to_string()),
                ))
            }
        };
        let issued = match self.authority.certify(&workload, &request.csr) {
            Ok(issued) => issued,
            Err(error @ super::ca::CaError::Csr(_)) => {
                return Err(Self::refused(
                    "bad_csr",
                    Status::invalid_argument(error.to_string()),
                ))
            }
            Err(error) => return Err(Self::refused("error", Status::internal(error.to_string()))),
        };
        metrics::counter!(CERTIFICATES_TOTAL, "result" => "issued").increment(1);
        tracing::info!(identity = %issued.identity, "certificate issued");
        let not_after_unix = issued
            .not_after
            .duration_since(UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        Ok(Response::new(CertifyResponse {
            chain: issued.chain,
            trust_anchors: self.authority.trust_bundle().to_vec(),
            not_after_unix,
            identity: issued.identity,
        }))
    }
}
