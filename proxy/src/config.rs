//! The proxy's typed config model and its YAML form (`--config FILE`).
//!
//! This is the one model of DESIGN.md: the static file and (later) the control
//! plane's push both describe services and their endpoints in these types.

use serde::{Deserialize, Serialize};
use std::{collections::HashSet, fmt, net::SocketAddr, num::NonZeroU16, path::Path};

/// Everything the proxy routes by. An empty config makes the proxy a transparent
/// passthrough: every connection goes to its original destination.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Config {
    #[serde(default)]
    pub services: Vec<Service>,
}

/// A named service: requests whose authority names it (`name.namespace:port`, or the
/// longer `.svc` / `.svc.cluster.local` forms) go to its endpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Service {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    pub port: NonZeroU16,
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
}

/// One backend address of a service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Endpoint {
    pub address: SocketAddr,
}

fn default_namespace() -> String {
    "default".to_owned()
}

impl Service {
    /// The label this service carries in metrics and logs: `name.namespace:port`.
    pub fn authority(&self) -> String {
        format!("{}.{}:{}", self.name, self.namespace, self.port)
    }
}

/// A config that could not be loaded: which file, where in it, and what was wrong.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub file: String,
    /// 1-based line and column, when the YAML parser knows them.
    pub location: Option<(usize, usize)>,
    /// The field path, e.g. `services[1].endpoints[0].address`.
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some((line, column)) = self.location {
            write!(f, ":{line}:{column}")?;
        }
        if !self.path.is_empty() && self.path != "." {
            write!(f, ": {}", self.path)?;
        }
        write!(f, ": {}", self.message)
    }
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            location: None,
            path: String::new(),
            message: format!("cannot read: {e}"),
        })?;
        Config::parse(&file, &text)
    }

    /// Parses and validates config text; `file` names it in errors.
    pub fn parse(file: &str, text: &str) -> Result<Config, ConfigError> {
        // An empty file is an empty config, not an error.
        if text.trim().is_empty() {
            return Ok(Config::default());
        }
        let deserializer = serde_yaml_ng::Deserializer::from_str(text);
        let config: Config = serde_path_to_error::deserialize(deserializer).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            ConfigError {
                file: file.to_owned(),
                location: inner.location().map(|l| (l.line(), l.column())),
                message: bare_message(&inner.to_string(), &path),
                path,
            }
        })?;
        config.validate().map_err(|(path, message)| ConfigError {
            file: file.to_owned(),
            location: None,
            path,
            message,
        })?;
        Ok(config)
    }

    /// Checks what the types alone cannot: names and uniqueness.
    fn validate(&self) -> Result<(), (String, String)> {
        let mut seen = HashSet::new();
        for (i, service) in self.services.iter().enumerate() {
            let at = |field: &str| format!("services[{i}].{field}");
            if !is_dns_label(&service.name) {
                return Err((
                    at("name"),
                    format!(
                        "{:?} is not a DNS label (lowercase letters, digits and '-', at most 63)",
                        service.name
                    ),
                ));
            }
            if !is_dns_label(&service.namespace) {
                return Err((
                    at("namespace"),
                    format!("{:?} is not a DNS label", service.namespace),
                ));
            }
            if !seen.insert(service.authority()) {
                return Err((
                    at("name"),
                    format!("service {} is defined twice", service.authority()),
                ));
            }
        }
        Ok(())
    }
}

/// serde_yaml_ng's message repeats the location (" at line L column C") and often
/// the path ("services[0]: ..."); both are reported separately, so keep the rest.
fn bare_message(message: &str, path: &str) -> String {
    let message = match message.find(" at line ") {
        Some(i) => &message[..i],
        None => message,
    };
    match message.split_once(": ") {
        Some((prefix, rest)) if !prefix.contains(' ') && path.starts_with(prefix) => {
            rest.to_owned()
        }
        _ => message.to_owned(),
    }
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_services_with_defaults() {
        let config = Config::parse(
            "mesh.yaml",
            "services:\n  - name: reviews\n    port: 8080\n    endpoints:\n      - address: 198.18.0.2:8080\n",
        )
        .unwrap();
        assert_eq!(config.services.len(), 1);
        let service = &config.services[0];
        assert_eq!(service.namespace, "default");
        assert_eq!(service.authority(), "reviews.default:8080");
        assert_eq!(
            service.endpoints[0].address,
            "198.18.0.2:8080".parse().unwrap()
        );
    }

    #[test]
    fn empty_file_is_passthrough() {
        assert_eq!(Config::parse("x", "\n").unwrap(), Config::default());
    }

    #[test]
    fn bad_address_names_file_line_and_field() {
        let err = Config::parse(
            "mesh.yaml",
            "services:\n  - name: reviews\n    port: 8080\n    endpoints:\n      - address: 198.18.0.2\n",
        )
        .unwrap_err();
        assert_eq!(err.file, "mesh.yaml");
        assert_eq!(err.path, "services[0].endpoints[0].address");
        assert_eq!(err.location.map(|l| l.0), Some(5));
        let text = err.to_string();
        assert!(
            text.starts_with("mesh.yaml:5:"),
            "error should lead with file and line: {text}"
        );
        assert_eq!(
            text,
            "mesh.yaml:5:18: services[0].endpoints[0].address: invalid socket address syntax"
        );
    }

    #[test]
    fn unknown_field_and_zero_port_are_refused() {
        let err = Config::parse(
            "m.yaml",
            "services:\n  - name: a\n    port: 80\n    weight: 3\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("unknown field `weight`"), "{err}");
        assert_eq!(err.location.map(|l| l.0), Some(4));

        let err = Config::parse("m.yaml", "services:\n  - name: a\n    port: 0\n").unwrap_err();
        assert_eq!(err.path, "services[0].port");
        assert_eq!(err.location.map(|l| l.0), Some(3));
    }

    #[test]
    fn invalid_names_and_duplicates_name_the_field() {
        let err =
            Config::parse("m.yaml", "services:\n  - name: Reviews\n    port: 80\n").unwrap_err();
        assert_eq!(err.path, "services[0].name");
        let err = Config::parse(
            "m.yaml",
            "services:\n  - {name: a, port: 80}\n  - {name: a, port: 80}\n",
        )
        .unwrap_err();
        assert_eq!(err.path, "services[1].name");
        assert!(err.message.contains("defined twice"), "{err}");
    }
}
