//! The config model (shared with the control plane through `trellis-proto`), plus
//! what only the proxy can check: its route matches compile.

use std::path::Path;
pub use trellis_proto::model::config::*;

/// Reads, parses and validates a config file, route matches included.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let config = Config::load(path)?;
    check_routes(&config).map_err(|(field, message)| ConfigError {
        file: path.display().to_string(),
        location: None,
        path: field,
        message,
    })?;
    Ok(config)
}

/// Parses config text (`file` names it in errors), route matches included.
pub fn parse(file: &str, text: &str) -> Result<Config, ConfigError> {
    let config = Config::parse(file, text)?;
    check_routes(&config).map_err(|(field, message)| ConfigError {
        file: file.to_owned(),
        location: None,
        path: field,
        message,
    })?;
    Ok(config)
}

/// Every route match compiles (regexes, paths, header names); the error names the
/// field, e.g. `services[0].routes[1].matches[0].path.value`.
pub fn check_routes(config: &Config) -> Result<(), (String, String)> {
    for (i, service) in config.services.iter().enumerate() {
        for (j, route) in service.routes.iter().enumerate() {
            for (k, m) in route.matches.iter().enumerate() {
                crate::route::check_match(m).map_err(|(field, message)| {
                    (
                        format!("services[{i}].routes[{j}].matches[{k}].{field}"),
                        message,
                    )
                })?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROUTED: &str = "services:
  - name: reviews
    port: 8080
    routes:
      - matches: [{headers: [{name: x-canary, value: \"true\"}]}]
        backends: [{name: reviews, port: 8080}]
";

    #[test]
    fn bad_matches_are_refused_with_the_field_named() {
        let err = parse(
            "r.yaml",
            &ROUTED.replace("value: \"true\"", "type: RegularExpression, value: \"(\""),
        )
        .unwrap_err();
        assert_eq!(
            err.path,
            "services[0].routes[0].matches[0].headers[0].value"
        );
        assert!(err.message.contains("invalid regex"), "{err}");
        assert!(err.to_string().starts_with("r.yaml: "), "{err}");

        let err = parse(
            "r.yaml",
            &ROUTED.replace(
                "matches: [{headers",
                "matches: [{path: {type: Exact, value: api}, headers",
            ),
        )
        .unwrap_err();
        assert_eq!(err.path, "services[0].routes[0].matches[0].path.value");
        assert!(parse("r.yaml", ROUTED).is_ok());
    }
}
