//! Who may call a pod's port: the ServerPolicy `authorization` of one port, as the
//! control plane hands it to the receiving proxy, and the one place it is decided.
//!
//! A rule matches a call that comes from any of its `from` entries and goes to any
//! of its `to` entries; an empty list matches every call. Within one entry every
//! field given must match (any of its values). With ALLOW only matching calls pass
//! (no rules: none pass); with DENY matching calls are refused.

use super::names::{Method, Workload};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Authorization {
    pub action: Action,
    #[serde(default)]
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Action {
    Allow,
    Deny,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Rule {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<Source>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<Operation>,
}

/// Callers, known by the identity their mesh certificate proves; a caller
/// without one (plaintext) matches no field.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Source {
    /// Exact SPIFFE IDs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identities: Vec<String>,
    /// `namespace/name`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
}

/// HTTP requests by method and path. Opaque TCP matches only an operation that
/// names neither.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Operation {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<Method>,
    /// Exact, `prefix*`, `*suffix`, or `*` for any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
}

/// A caller as its mesh certificate proves it: the SPIFFE ID, and the workload it
/// names, parsed once per connection rather than per request.
#[derive(Debug, Clone, PartialEq)]
pub struct Peer {
    pub identity: String,
    pub workload: Option<Workload>,
}

impl Peer {
    pub fn new(identity: &str) -> Peer {
        Peer {
            identity: identity.to_owned(),
            workload: Workload::from_spiffe_id(identity),
        }
    }
}

/// What is being called.
#[derive(Debug, Clone, Copy)]
pub enum Call<'a> {
    Http {
        method: &'a http::Method,
        path: &'a str,
    },
    Opaque,
}

impl Authorization {
    /// Whether the call passes; `caller` is `None` without mesh mTLS.
    pub fn allows(&self, caller: Option<&Peer>, call: Call<'_>) -> bool {
        let matched = self.rules.iter().any(|rule| rule.matches(caller, call));
        match self.action {
            Action::Allow => matched,
            Action::Deny => !matched,
        }
    }
}

impl Rule {
    fn matches(&self, caller: Option<&Peer>, call: Call<'_>) -> bool {
        (self.from.is_empty() || self.from.iter().any(|s| s.matches(caller)))
            && (self.to.is_empty() || self.to.iter().any(|o| o.matches(call)))
    }
}

impl Source {
    fn matches(&self, caller: Option<&Peer>) -> bool {
        let workload = caller.and_then(|c| c.workload.as_ref());
        let given = |list: &[String]| !list.is_empty();
        (!given(&self.identities) || caller.is_some_and(|c| self.identities.contains(&c.identity)))
            && (!given(&self.service_accounts)
                || workload.is_some_and(|w| {
                    self.service_accounts.iter().any(|account| {
                        account.split_once('/')
                            == Some((w.namespace.as_str(), w.service_account.as_str()))
                    })
                }))
            && (!given(&self.namespaces)
                || workload.is_some_and(|w| self.namespaces.contains(&w.namespace)))
    }
}

impl Operation {
    fn matches(&self, call: Call<'_>) -> bool {
        match call {
            Call::Opaque => self.methods.is_empty() && self.paths.is_empty(),
            Call::Http { method, path } => {
                (self.methods.is_empty() || self.methods.iter().any(|m| m.0 == *method))
                    && (self.paths.is_empty() || self.paths.iter().any(|p| path_matches(p, path)))
            }
        }
    }
}

fn path_matches(pattern: &str, path: &str) -> bool {
    if pattern == "*" {
        true
    } else if let Some(prefix) = pattern.strip_suffix('*') {
        path.starts_with(prefix)
    } else if let Some(suffix) = pattern.strip_prefix('*') {
        path.ends_with(suffix)
    } else {
        pattern == path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FRONTEND: &str = "spiffe://cluster.local/ns/shop/sa/frontend";
    const OPS: &str = "spiffe://cluster.local/ns/ops/sa/debug";
    const OTHER: &str = "spiffe://cluster.local/ns/shop/sa/cart";

    fn policy(yaml: &str) -> Authorization {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    fn caller(identity: &str) -> Option<&'static Peer> {
        Some(Box::leak(Box::new(Peer::new(identity))))
    }

    fn get(path: &str) -> Call<'_> {
        Call::Http {
            method: &http::Method::GET,
            path,
        }
    }

    #[test]
    fn allow_passes_only_what_a_rule_matches() {
        // The example of the API reference.
        let allow = policy(
            "action: ALLOW
rules:
  - from: [{serviceAccounts: [shop/frontend]}, {namespaces: [ops]}]
    to: [{methods: [GET], paths: ['/api/*']}]",
        );
        assert!(allow.allows(caller(FRONTEND), get("/api/items")));
        assert!(allow.allows(caller(OPS), get("/api/")));
        assert!(!allow.allows(caller(OTHER), get("/api/items")), "cart");
        assert!(!allow.allows(caller(FRONTEND), get("/admin")), "path");
        let post = Call::Http {
            method: &http::Method::POST,
            path: "/api/items",
        };
        assert!(!allow.allows(caller(FRONTEND), post), "method");
        assert!(!allow.allows(None, get("/api/items")), "plaintext");
        assert!(!allow.allows(caller(FRONTEND), Call::Opaque), "not HTTP");
        assert!(!policy("action: ALLOW").allows(caller(FRONTEND), get("/")));
    }

    #[test]
    fn deny_refuses_what_a_rule_matches() {
        let deny = policy(
            "action: DENY
rules: [{from: [{identities: ['spiffe://cluster.local/ns/shop/sa/cart']}]}]",
        );
        assert!(!deny.allows(caller(OTHER), get("/")));
        assert!(!deny.allows(caller(OTHER), Call::Opaque));
        assert!(deny.allows(caller(FRONTEND), get("/")));
        assert!(deny.allows(None, Call::Opaque));
        assert!(policy("action: DENY").allows(caller(OTHER), get("/")));
    }

    #[test]
    fn fields_of_one_entry_all_match() {
        let allow = policy(
            "action: ALLOW
rules: [{from: [{namespaces: [shop], serviceAccounts: [shop/frontend]}], to: [{}]}]",
        );
        assert!(allow.allows(caller(FRONTEND), Call::Opaque));
        assert!(!allow.allows(caller(OTHER), Call::Opaque));
    }

    #[test]
    fn paths_match_exactly_by_prefix_or_by_suffix() {
        assert!(path_matches("/a", "/a") && !path_matches("/a", "/ab"));
        assert!(path_matches("/a*", "/ab") && !path_matches("/a*", "/b"));
        assert!(path_matches("*.json", "/x.json") && !path_matches("*.json", "/x"));
        assert!(path_matches("*", "/anything"));
    }
}
