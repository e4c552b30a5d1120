//! Names the model's parts share: HTTP methods (route matches, authorization
//! rules) and workload identities (endpoints, authorization sources).

use serde::{de::Error as _, Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// An HTTP method name, checked as a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Method(pub http::Method);

impl Serialize for Method {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.0.as_str())
    }
}

impl<'de> Deserialize<'de> for Method {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        if text.is_empty() || !text.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(D::Error::custom(format!(
                "{text:?} is not an HTTP method (upper case, e.g. GET)"
            )));
        }
        http::Method::from_bytes(text.as_bytes())
            .map(Method)
            .map_err(|_| D::Error::custom(format!("{text:?} is not an HTTP method")))
    }
}

/// A workload identity: a service account in a namespace.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Workload {
    pub namespace: String,
    pub service_account: String,
}

impl Workload {
    /// `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`
    pub fn spiffe_id(&self, trust_domain: &str) -> String {
        format!(
            "spiffe://{trust_domain}/ns/{}/sa/{}",
            self.namespace, self.service_account
        )
    }
}

impl Workload {
    /// The workload a SPIFFE ID of the mesh's form names, whatever its trust domain.
    pub fn from_spiffe_id(id: &str) -> Option<Workload> {
        let rest = id.strip_prefix("spiffe://")?;
        let (_trust_domain, path) = rest.split_once('/')?;
        let mut parts = path.split('/');
        match (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) {
            (Some("ns"), Some(namespace), Some("sa"), Some(account), None)
                if !namespace.is_empty() && !account.is_empty() =>
            {
                Some(Workload {
                    namespace: namespace.to_owned(),
                    service_account: account.to_owned(),
                })
            }
            _ => None,
        }
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.service_account)
    }
}
