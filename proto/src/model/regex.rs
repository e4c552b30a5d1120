//! The one regex rule of route matching, shared by the proxy (which compiles
//! routes) and the control plane (which checks them before sending): a pattern
//! must match the whole path or value, as Envoy's and Gateway API's do.

use ::regex::Regex;

/// Compiles `pattern` anchored at both ends; the error names the pattern.
pub fn full_match(pattern: &str) -> Result<Regex, String> {
    Regex::new(&format!("^(?:{pattern})$")).map_err(|e| format!("invalid regex {pattern:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_whole_value_only() {
        let re = full_match("/v[0-9]+/.*").unwrap();
        assert!(re.is_match("/v2/items"));
        assert!(!re.is_match("/xv2/items"));
        // An alternation is anchored as a whole, not only its first branch.
        let re = full_match("a|b").unwrap();
        assert!(re.is_match("b"));
        assert!(!re.is_match("ab"));
        assert!(full_match("(").unwrap_err().contains("invalid regex \"(\""));
    }

    /// Both ends must accept the same patterns however each binary was built
    /// (alone, or with the control plane's dependencies, which enable more of
    /// the regex crate): the proxy built alone once refused these.
    #[test]
    fn case_insensitive_and_unicode_class_patterns_compile() {
        assert!(full_match("(?i)bearer .+").unwrap().is_match("Bearer x"));
        assert!(full_match(r"\p{Greek}+").unwrap().is_match("λόγος"));
    }
}
