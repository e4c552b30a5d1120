//! The mesh root kept in a Kubernetes Secret (`ca.crt`, `ca.key`, and optionally
//! `trust-bundle.crt`), as the control
//! plane keeps it in a cluster: read when the Secret exists, made and stored when
//! it does not, never replaced. Two replicas starting at once agree on one root:
//! whichever creates the Secret second reads the first one's.

use super::ca::{new_root, Authority, CaError, TRUST_BUNDLE};
use k8s_openapi::{api::core::v1::Secret, ByteString};
use kube::api::{Api, PostParams};
use std::{collections::BTreeMap, time::Duration};

/// The authority whose root the Secret `namespace/name` holds, made there first
/// if it does not exist.
pub async fn load_or_create(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    trust_domain: &str,
    lifetime: Duration,
) -> Result<Authority, CaError> {
    let place = format!("Secret {namespace}/{name}");
    let fail = |message: String| CaError::Root {
        place: place.clone(),
        message,
    };
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let existing = secrets
        .get_opt(name)
        .await
        .map_err(|e| fail(e.to_string()))?;
    let secret = match existing {
        Some(secret) => secret,
        None => {
            let (cert_pem, key_pem) = new_root(trust_domain)?;
            let data = BTreeMap::from([
                ("ca.crt".to_owned(), ByteString(cert_pem.into_bytes())),
                ("ca.key".to_owned(), ByteString(key_pem.into_bytes())),
            ]);
            let secret = Secret {
                metadata: kube::api::ObjectMeta {
                    name: Some(name.to_owned()),
                    namespace: Some(namespace.to_owned()),
                    ..Default::default()
                },
                data: Some(data),
                type_: Some("Opaque".to_owned()),
                ..Default::default()
            };
            match secrets.create(&PostParams::default(), &secret).await {
                Ok(created) => {
                    tracing::info!(%place, "made a new mesh root");
                    created
                }
                // Another replica stored one first: that one is the root.
                Err(kube::Error::Api(status)) if status.is_already_exists() => {
                    secrets.get(name).await.map_err(|e| fail(e.to_string()))?
                }
                Err(error) => return Err(fail(error.to_string())),
            }
        }
    };
    let data = secret.data.unwrap_or_default();
    let text = |key: &str| -> Result<String, CaError> {
        let bytes = data.get(key).ok_or_else(|| fail(format!("has no {key}")))?;
        String::from_utf8(bytes.0.clone()).map_err(|_| fail(format!("{key} is not PEM text")))
    };
    let bundle = match data.contains_key(TRUST_BUNDLE) {
        true => Some(text(TRUST_BUNDLE)?),
        false => None,
    };
    Authority::from_pem(
        &text("ca.crt")?,
        &text("ca.key")?,
        bundle.as_deref(),
        &place,
        trust_domain,
        lifetime,
    )
}
