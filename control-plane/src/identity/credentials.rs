//! What proves a proxy's identity: in local mode a bootstrap token
//! ([`BootstrapTokens`]); in Kubernetes the pod's projected service-account token,
//! checked with a TokenReview that names the audience Trellis's tokens are made
//! for, so a token minted for anything else is refused.

use super::tokens::BootstrapTokens;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};
use trellis_proto::model::config::Workload;

pub enum Credentials {
    Bootstrap(BootstrapTokens),
    Kubernetes {
        client: kube::Client,
        /// The audience the token must have been made for (`trellis`).
        audience: String,
    },
}

/// Why a credential proves nothing.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    /// Not a valid credential (unknown, expired, another audience, not a service
    /// account): the caller is told no more than that.
    #[error("{0}")]
    Invalid(String),
    /// The credential could not be checked now (the API server is away).
    #[error("cannot check the credential: {0}")]
    Unavailable(String),
}

impl Credentials {
    /// The identity `token` proves.
    pub async fn identity_of(&self, token: &str) -> Result<Workload, Refused> {
        match self {
            Credentials::Bootstrap(tokens) => tokens
                .identity_of(token)
                .cloned()
                .ok_or_else(|| Refused::Invalid("unknown bootstrap token".into())),
            Credentials::Kubernetes { client, audience } => review(client, audience, token).await,
        }
    }
}

async fn review(client: &kube::Client, audience: &str, token: &str) -> Result<Workload, Refused> {
    let request = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.to_owned()),
            audiences: Some(vec![audience.to_owned()]),
        },
        ..Default::default()
    };
    let reviewed = Api::<TokenReview>::all(client.clone())
        .create(&PostParams::default(), &request)
        .await
        .map_err(|e| Refused::Unavailable(e.to_string()))?;
    let status = reviewed.status.unwrap_or_default();
    if status.authenticated != Some(true) {
        return Err(Refused::Invalid(format!(
            "the token is not valid: {}",
            status.error.unwrap_or_else(|| "not authenticated".into())
        )));
    }
    // A server that knows audiences says which ones the token is for.
    if let Some(audiences) = &status.audiences {
        if !audiences.iter().any(|a| a == audience) {
            return Err(Refused::Invalid(format!(
                "the token is not for the audience {audience:?}"
            )));
        }
    }
    let username = status.user.and_then(|u| u.username).unwrap_or_default();
    service_account(&username)
        .ok_or_else(|| Refused::Invalid(format!("{username:?} is not a service account")))
}

/// `system:serviceaccount:<namespace>:<name>` as a workload.
fn service_account(username: &str) -> Option<Workload> {
    let rest = username.strip_prefix("system:serviceaccount:")?;
    let (namespace, name) = rest.split_once(':')?;
    (!namespace.is_empty() && !name.is_empty() && !name.contains(':')).then(|| Workload {
        namespace: namespace.to_owned(),
        service_account: name.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_service_account_users_are_workloads() {
        assert_eq!(
            service_account("system:serviceaccount:shop:frontend"),
            Some(Workload {
                namespace: "shop".into(),
                service_account: "frontend".into()
            })
        );
        for other in [
            "admin",
            "system:serviceaccount:shop",
            "system:serviceaccount::x",
            "system:serviceaccount:a:b:c",
            "system:node:n1",
        ] {
            assert_eq!(service_account(other), None, "{other}");
        }
    }
}
