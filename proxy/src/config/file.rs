//! The static config file (`--config FILE`): read, checked (including what only
//! the proxy can check: that its route matches compile), and polled for changes;
//! a file that does not load is reported and the running config kept.

use crate::routing::table::SharedTable;
use crate::upstream::pool::Pool;
use std::{path::Path, path::PathBuf, sync::Arc, time::Duration};
use trellis_proto::model::config::{Config, ConfigError};

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
                crate::routing::router::check_match(m).map_err(|(field, message)| {
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

/// Reloads the config file when it changes, as a change to the running table.
/// A file that does not load is reported (with file, line and field) and the
/// running config stays.
pub async fn watch(path: PathBuf, every: Duration, table: SharedTable, pool: Arc<Pool>) {
    let stamp = |path: &PathBuf| {
        std::fs::metadata(path)
            .ok()
            .map(|m| (m.modified().ok(), m.len()))
    };
    let mut seen = stamp(&path);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = stamp(&path);
        if now == seen {
            continue;
        }
        seen = now;
        let loaded = load(&path)
            .map_err(|e| e.to_string())
            .and_then(|config| table.load().next(config, &pool));
        let result = match loaded {
            Ok(new) => {
                table.store(Arc::new(new));
                tracing::info!(file = %path.display(), "config reloaded");
                "ok"
            }
            Err(error) => {
                tracing::error!(%error, "config not reloaded; keeping the running config");
                "error"
            }
        };
        metrics::counter!(crate::metrics::CONFIG_RELOADS_TOTAL, "result" => result).increment(1);
    }
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
