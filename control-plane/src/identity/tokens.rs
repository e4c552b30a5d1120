//! Local mode's credentials: a file of bootstrap tokens, one per line as
//! `TOKEN NAMESPACE/SERVICEACCOUNT` (blank lines and `#` comments allowed), each
//! token proving the identity it names.

use std::{collections::HashMap, path::Path};
use trellis_proto::model::config::Workload;

pub struct BootstrapTokens(HashMap<String, Workload>);

impl BootstrapTokens {
    /// Reads the file; an error names the file and line.
    pub fn load(path: &Path) -> Result<BootstrapTokens, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
        BootstrapTokens::parse(&path.display().to_string(), &text)
    }

    /// Parses the file's text; `file` names it in errors.
    pub fn parse(file: &str, text: &str) -> Result<BootstrapTokens, String> {
        let mut tokens = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let at = |message: &str| format!("{file}:{}: {message}", i + 1);
            let mut words = line.split_whitespace();
            let (Some(token), Some(identity), None) = (words.next(), words.next(), words.next())
            else {
                return Err(at("expected `TOKEN NAMESPACE/SERVICEACCOUNT`"));
            };
            let Some((namespace, service_account)) = identity.split_once('/') else {
                return Err(at(&format!("{identity:?} is not NAMESPACE/SERVICEACCOUNT")));
            };
            if !is_name(namespace) || !is_name(service_account) {
                return Err(at(&format!(
                    "{identity:?}: namespace and service account must be DNS names"
                )));
            }
            let workload = Workload {
                namespace: namespace.to_owned(),
                service_account: service_account.to_owned(),
            };
            if tokens.insert(token.to_owned(), workload).is_some() {
                return Err(at("this token is listed twice"));
            }
        }
        Ok(BootstrapTokens(tokens))
    }

    /// The identity `token` proves, if any.
    pub fn identity_of(&self, token: &str) -> Option<&Workload> {
        self.0.get(token)
    }
}

/// A DNS subdomain name, as Kubernetes names namespaces and service accounts.
fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !s.starts_with(['-', '.'])
        && !s.ends_with(['-', '.'])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_name_their_identity_and_bad_lines_are_named() {
        let tokens =
            BootstrapTokens::parse("t", "# comment\n\nabc123 shop/frontend\nxyz shop/reviews\n")
                .unwrap();
        assert_eq!(
            tokens.identity_of("abc123"),
            Some(&Workload {
                namespace: "shop".into(),
                service_account: "frontend".into()
            })
        );
        assert!(tokens.identity_of("nope").is_none());
        for (text, message) in [
            ("abc\n", "t:1: expected"),
            ("a shop/x\nb shop\n", "t:2: \"shop\" is not"),
            ("a Shop/x\n", "t:1: \"Shop/x\": namespace"),
            ("a shop/x extra\n", "t:1: expected"),
            ("a shop/x\na shop/y\n", "t:2: this token is listed twice"),
        ] {
            let error = BootstrapTokens::parse("t", text).err().unwrap();
            assert!(error.starts_with(message), "{text:?}: {error}");
        }
    }
}
